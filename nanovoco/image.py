"""Images and videos -> CLIP pixel values, as LLaVA-1.5 prepares them (no torchvision): pad to a square with the mean
colour, resize (bicubic) and center-crop to the vision tower's size, scale to [0, 1], normalise with CLIP's mean and
std. A video is a list of frames: an animated file or a folder of frame images (load_video)."""
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence, UnidentifiedImageError

FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Modes PIL converts to RGB faithfully. 16-bit greyscale ("I;16*", or "I" as older Pillows open such a PNG) PIL
# would clip to white: to_rgb scales it to 8 bits itself. Float images ("F") have no agreed range: refused.
CONVERTIBLE = {"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"}


def load_image(path) -> Image.Image:
    """Open an image file as RGB, with a clear error for a missing, unreadable or unsupported file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    with open_image(path) as img:
        try:
            img.load()
        except (OSError, SyntaxError) as e:  # SyntaxError: PIL's word for some malformed chunks
            raise ValueError(f"{path} is not a readable image ({e}): pass a PNG or JPEG file") from None
        return to_rgb(img, str(path))


def open_image(path) -> Image.Image:
    """Image.open, reading the header only (size, mode), with a one-line error for what PIL cannot or will not
    open: not an image, a damaged file, or a header that declares more pixels than PIL's decompression-bomb limit
    (which would otherwise take all the memory to decode)."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path} declares too many pixels to decode safely ({e}): resize the image") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e}): pass a PNG or JPEG file") from None


def convertible(mode: str) -> bool:
    return mode in CONVERTIBLE or is_16_bit(mode)


def is_16_bit(mode: str) -> bool:
    return mode.startswith("I;16") or mode == "I"


def to_rgb(img: Image.Image, name="image") -> Image.Image:
    if is_16_bit(img.mode):  # 16-bit greyscale: keep the top 8 bits
        grey = np.asarray(img).astype(np.int64)
        if grey.min() < 0 or grey.max() > 65535:
            raise ValueError(f"{name} is a 32-bit integer image: save it as an 8-bit RGB or grayscale image")
        return Image.fromarray((grey >> 8).astype(np.uint8), "L").convert("RGB")
    if not convertible(img.mode):
        raise ValueError(f"{name} has mode {img.mode!r}, which does not convert to RGB faithfully: save it as an "
                         f"8-bit RGB or grayscale image")
    return img.convert("RGB")


def expand_to_square(img: Image.Image) -> Image.Image:
    """LLaVA-1.5's image_aspect_ratio='pad': centre the image on a square of CLIP's mean colour, so that the
    center crop that follows cuts nothing off."""
    w, h = img.size
    if w == h:
        return img
    square = Image.new("RGB", (max(w, h),) * 2, tuple(int(m * 255) for m in CLIP_MEAN))
    square.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


def preprocess(img: Image.Image, size: int, pad: bool = True) -> torch.Tensor:
    """PIL image -> (3, size, size) float pixel values (CLIPImageProcessor with shortest_edge = crop = size)."""
    img = to_rgb(img)
    if pad:
        img = expand_to_square(img)
    w, h = img.size
    scale = size / min(w, h)  # shortest edge to `size`, the other edge in proportion
    img = img.resize((max(size, int(w * scale)), max(size, int(h * scale))), Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def natural_key(path: Path):
    """frame2.png before frame10.png."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_video(sources, fps=None, max_frames=None) -> list[Image.Image]:
    """Frames in time order from an animated file, a folder of frames (by natural name order) or a list of files."""
    if len(sources) == 1 and Path(sources[0]).is_dir():
        folder = Path(sources[0])
        paths = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=natural_key)
        if not paths:
            raise FileNotFoundError(f"folder {sources[0]} holds no frames ({', '.join(sorted(FRAME_SUFFIXES))})")
        frames, durations = [load_image(p) for p in paths], None
    elif len(sources) == 1:
        path = Path(sources[0])
        if not path.is_file():
            raise FileNotFoundError(f"video {path} does not exist")
        try:
            with open_image(path) as video:
                frames = [to_rgb(f, str(path)) for f in ImageSequence.Iterator(video)]
                durations = [f.info.get("duration", 0) for f in ImageSequence.Iterator(video)]
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path} is not a readable animated image ({e}): pass a GIF, WebP or PNG animation, or "
                             f"a folder of frames (video files: extract their frames first, e.g. with ffmpeg)") from e
    else:
        frames, durations = [load_image(p) for p in sources], None
    if fps:
        if not durations or not all(durations):
            raise ValueError("--fps needs an animated file whose frames have durations; for frame files or a folder, "
                             "pick the frames to keep yourself, or use --max_frames")
        starts = torch.tensor([0] + durations[:-1]).cumsum(0) / 1000  # seconds at which each frame appears
        keep = [int((starts <= t).nonzero().max()) for t in torch.arange(0, float(starts[-1]) + 1e-9, 1 / fps)]
        frames = [frames[i] for i in keep]
    if max_frames and len(frames) > max_frames:
        frames = [frames[round(i)] for i in torch.linspace(0, len(frames) - 1, max_frames).tolist()]
    return frames
