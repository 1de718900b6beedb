"""Image preprocessing equals transformers' CLIP image processor (the PIL one LLaVA-1.5 used)."""
import struct
import zlib

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
    Image.fromarray(np.zeros((4, 4), dtype=np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(ValueError, match="float.tiff has mode 'F', which does not convert to RGB faithfully"):
        load_image(tmp_path / "float.tiff")
    Image.new("L", (5, 7)).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").mode == "RGB"


def test_a_header_that_declares_too_many_pixels_is_refused_before_decoding(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "bomb.png")
    data = bytearray((tmp_path / "bomb.png").read_bytes())
    ihdr = data[12:29]  # chunk type + width, height, ...: declare 20000 x 20000 and sign it with a right CRC
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    data[12:33] = ihdr + struct.pack(">I", zlib.crc32(ihdr))
    (tmp_path / "bomb.png").write_bytes(data)
    with pytest.raises(ValueError, match=r"bomb\.png declares too many pixels to decode safely .*: resize the image"):
        load_image(tmp_path / "bomb.png")


def test_16_bit_greyscale_keeps_its_top_8_bits(tmp_path):
    deep = np.array([[0, 0x12ff], [0x8000, 0xffff]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode in ("I;16", "I")  # what PIL reads back from a 16-bit greyscale PNG
    rgb = np.asarray(load_image(tmp_path / "deep.png"))
    assert rgb.shape == (2, 2, 3) and (rgb == np.array([[0, 0x12], [0x80, 0xff]])[..., None]).all()
