"""Image preprocessing equals transformers' CLIP image processor (the PIL one LLaVA-1.5 used)."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from nanovoco.image import expand_to_square, load_image, preprocess


@pytest.mark.parametrize("wh", [(56, 56), (70, 40), (31, 90)])
def test_matches_clip_image_processor(wh):
    img = Image.fromarray((np.random.default_rng(0).random((wh[1], wh[0], 3)) * 255).astype("uint8"))
    ref = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    for pad in (False, True):
        x = expand_to_square(img) if pad else img
        expected = ref(x, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(preprocess(img, 56, pad=pad), expected, atol=1e-5, rtol=0)


def test_padding_keeps_the_whole_image_centred():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand_to_square(img)
    assert square.size == (40, 40)
    assert square.getpixel((20, 20)) == (255, 0, 0) and square.getpixel((20, 2)) == (122, 116, 104)


def test_bad_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png is not a readable image"):
        load_image(tmp_path / "junk.png")
    Image.fromarray(np.zeros((4, 4), dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match="mode 'I;16'"):
        load_image(tmp_path / "deep.png")
    Image.new("L", (5, 7)).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").mode == "RGB"
