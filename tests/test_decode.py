"""decode_image on a corpus of odd files: each gives a (3, H, W) uint8 tensor or a DecodeError of the right kind."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from scanner.decode import DecodeError, decode_image, read_and_decode


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def png_claiming(width: int, height: int) -> bytes:
    """A real 4x4 PNG whose IHDR is patched to claim width x height (with a valid CRC)."""
    data = bytearray(encode(Image.new("RGB", (4, 4), (10, 20, 30)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC covers type + data
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return encode(gradient(40, 20), "JPEG", exif=exif.tobytes(), quality=95)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 12), (255, 0, 0)), Image.new("RGB", (16, 12), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_with_transparency() -> bytes:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 200, 30, 40] + [0] * (254 * 3))
    img.paste(1, (0, 0, 4, 8))  # left half colour 1, right half colour 0 (transparent)
    return encode(img, "PNG", transparency=0)


def rgba() -> bytes:
    arr = np.zeros((6, 6, 4), np.uint8)
    arr[..., 0] = 200
    arr[:, :3, 3] = 255  # left half opaque red
    arr[:, 3:, 3] = 0  # right half fully transparent
    return encode(Image.fromarray(arr, "RGBA"), "PNG")


def png16() -> bytes:
    arr = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (10, 10), (255, 0, 0, 0)), "JPEG", quality=95)  # pure cyan


GOOD = {
    "1x1.png": (lambda: encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), (1, 1)),
    "grey.png": (lambda: encode(Image.new("L", (7, 5), 99), "PNG"), (5, 7)),
    "rgba.png": (rgba, (6, 6)),
    "palette_transparent.png": (palette_with_transparency, (8, 8)),
    "16bit.png": (png16, (1, 4)),
    "cmyk.jpg": (cmyk_jpeg, (10, 10)),
    "animated.gif": (animated_gif, (12, 16)),
    "exif6.jpg": (exif_rotated_jpeg, (40, 20)),  # stored 40 wide x 20 high; displayed 20 x 40
    "plain.jpg": (lambda: encode(gradient(33, 17), "JPEG"), (17, 33)),
    "bitmap.bmp": (lambda: encode(gradient(9, 3), "BMP"), (3, 9)),
    "photo.webp": (lambda: encode(gradient(12, 8), "WEBP"), (8, 12)),
    "mono.tiff": (lambda: encode(Image.new("1", (5, 4), 1), "TIFF"), (4, 5)),
}

BAD = {
    "empty.jpg": (lambda: b"", "not_image"),
    "text.jpg": (lambda: b"this is not a JPEG, just text that happens to be named like one\n" * 3, "not_image"),
    "random.bin": (lambda: np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not_image"),
    "truncated.jpg": (lambda: encode(gradient(256, 256), "JPEG")[:3000], "decode"),
    "huge_header.png": (lambda: png_claiming(20000, 20000), "too_large"),
    # Between Pillow's own warning (89M) and error (178M) limits: must not escape as a warning.
    "bomb_warning.png": (lambda: png_claiming(10000, 10000), "too_large"),
    "over_budget.png": (lambda: png_claiming(8000, 8000), "too_large"),  # 64M > default 50M budget
    "zero_width.png": (lambda: png_claiming(0, 10), None),  # Pillow refuses it: any DecodeError kind
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_files_decode_to_rgb_uint8(name):
    make, (h, w) = GOOD[name]
    out = decode_image(make())
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.uint8
    assert tuple(out.shape) == (3, h, w)
    assert out.is_contiguous()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_give_decode_error_of_the_right_kind(name):
    make, kind = BAD[name]
    with pytest.raises(DecodeError) as info:
        decode_image(make())
    assert info.value.kind in {"decode", "not_image", "too_large"}
    if kind is not None:
        assert info.value.kind == kind, str(info.value)
    assert str(info.value)  # a message for the error record


def test_1x1_pixel_value():
    assert decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")).flatten().tolist() == [1, 2, 3]


def test_grey_becomes_three_equal_channels():
    out = decode_image(encode(Image.new("L", (7, 5), 99), "PNG"))
    assert (out == 99).all()


def test_16bit_is_scaled_not_clipped():
    out = decode_image(png16())
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all()
    assert out[0, 0].tolist() == [0, 1, 128, 255]


def test_palette_transparency_composited_on_white():
    out = decode_image(palette_with_transparency())
    assert out[:, 0, 0].tolist() == [200, 30, 40]
    assert out[:, 0, 7].tolist() == [255, 255, 255]


def test_rgba_composited_on_white():
    out = decode_image(rgba())
    assert out[:, 0, 0].tolist() == [200, 0, 0]
    assert out[:, 0, 5].tolist() == [255, 255, 255]


def test_cmyk_converted():
    out = decode_image(cmyk_jpeg()).int()
    r, g, b = out[:, 5, 5].tolist()
    assert r < 30 and g > 225 and b > 225  # cyan


def test_animated_gif_first_frame():
    out = decode_image(animated_gif()).int()
    r, g, b = out[:, 6, 8].tolist()
    assert r > 225 and g < 30 and b < 30  # red, not the blue second frame


def test_exif_orientation_applied():
    out = decode_image(exif_rotated_jpeg()).int()
    assert tuple(out.shape) == (3, 40, 20)
    # Stored image: red channel grows left -> right. Orientation 6 rotates 90 degrees clockwise, so the
    # stored left column becomes the top row: red grows top -> bottom in the decoded image.
    assert out[0, 0, :].float().mean() < 40 and out[0, -1, :].float().mean() > 215


def test_pixel_budget_is_configurable():
    data = encode(gradient(100, 100), "PNG")
    assert decode_image(data, max_pixels=10_000).shape == (3, 100, 100)
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels=9_999)
    assert info.value.kind == "too_large"


def test_read_and_decode(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(gradient(5, 6), "PNG"))
    assert read_and_decode(path).shape == (3, 6, 5)
