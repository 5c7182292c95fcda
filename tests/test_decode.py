"""decode_image on odd files: each gives a (3, H, W) uint8 tensor or a DecodeError of the right kind;
decode(): the torchvision fast path against the Pillow reference, dispatch, downscaling, threads."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import scanner.decoding.decode as decode_module
from scanner.decoding.decode import (
    DOWNSCALE_CEILING,
    DecodeError,
    decode,
    decode_image,
    decode_pillow,
    decoder_for,
    fit_pixels,
    read_and_decode,
)


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


# -- the torchvision fast path against the Pillow reference --------------------------------------------

# The two libjpeg-turbo builds (torchvision 0.29.1: 3.1.3, Pillow 13.0: 3.2.0) were measured bit-identical
# (max and mean abs difference 0) on gradient+noise images of 1x1 to 1023x767 pixels, 4:2:0, 4:2:2 and
# 4:4:4 subsampling, progressive, optimized Huffman tables, grey, quality 30-95. The tolerance allows
# rounding-level drift from a rebuild while catching a different IDCT or upsampling (mean >> 0.01).
JPEG_MAX_ABS_DIFF = 1
JPEG_MEAN_ABS_DIFF = 0.01

SIZES = [(1, 1), (7, 5), (33, 17), (64, 64), (255, 129), (640, 480)]


def photo(w: int, h: int, seed: int = 0, noise: float = 10.0) -> Image.Image:
    """Photo-like: smooth gradients and a wave, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin(x / 7 + y / 11)], -1)
    arr = arr + rng.normal(0, noise, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def with_orientation(img: Image.Image, fmt: str, orientation: int, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif.tobytes(), **kw)


def assert_fast_matches_reference(data: bytes, max_abs: int = 0, max_mean: float = 0.0):
    assert decoder_for(data) == "torchvision"
    fast, ref = decode(data), decode_pillow(data)
    assert fast.image.dtype == torch.uint8 and fast.image.is_contiguous()
    assert fast.image.shape == ref.image.shape
    assert (fast.width, fast.height) == (ref.width, ref.height)
    assert not fast.downscaled and not ref.downscaled
    diff = (fast.image.int() - ref.image.int()).abs()
    assert diff.max().item() <= max_abs
    assert diff.float().mean().item() <= max_mean


JPEG_VARIANTS = {
    "420": dict(quality=90),
    "422": dict(quality=85, subsampling=1),
    "444": dict(quality=95, subsampling=0),
    "progressive": dict(quality=80, progressive=True),
    "optimized_q30": dict(quality=30, optimize=True),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", sorted(JPEG_VARIANTS) + ["grey"])
def test_jpeg_fast_path_within_tolerance_of_pillow(size, variant):
    img = photo(*size, seed=size[0])
    if variant == "grey":
        data = encode(img.convert("L"), "JPEG", quality=90)
    else:
        data = encode(img, "JPEG", **JPEG_VARIANTS[variant])
    assert_fast_matches_reference(data, JPEG_MAX_ABS_DIFF, JPEG_MEAN_ABS_DIFF)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "options", [dict(lossless=True), dict(quality=80), dict(quality=30, method=6)], ids=["lossless", "q80", "q30"]
)
def test_webp_fast_path_equals_pillow(size, options):
    assert_fast_matches_reference(encode(photo(*size, seed=size[1]), "WEBP", **options))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_orientations_same_on_both_paths(fmt, orientation):
    kw = dict(lossless=True) if fmt == "WEBP" else dict(quality=95)
    data = with_orientation(photo(50, 30), fmt, orientation, **kw)
    assert_fast_matches_reference(data)
    out = decode(data)
    expected = (30, 50) if orientation >= 5 else (50, 30)  # 5-8 exchange width and height
    assert (out.width, out.height) == expected
    assert tuple(out.image.shape) == (3, expected[1], expected[0])


def test_orientation_6_rotates_clockwise_on_the_fast_path():
    data = with_orientation(gradient(40, 20), "JPEG", 6, quality=95)
    assert decoder_for(data) == "torchvision"
    out = decode(data).image.int()
    assert tuple(out.shape) == (3, 40, 20)
    assert out[0, 0, :].float().mean() < 40 and out[0, -1, :].float().mean() > 215  # stored left column on top


def test_xmp_orientation_read_like_pillow():
    # Pillow's exif_transpose falls back to an XMP tiff:Orientation when EXIF has none; the fast path
    # takes its orientation from Pillow, so it follows.
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    data = encode(photo(50, 30), "JPEG", quality=95, xmp=xmp)
    assert_fast_matches_reference(data)
    assert tuple(decode(data).image.shape) == (3, 50, 30)


def test_mpo_first_image_on_fast_path():
    data = encode(photo(40, 30), "MPO", save_all=True, append_images=[Image.new("RGB", (40, 30), (255, 0, 0))])
    assert_fast_matches_reference(data, JPEG_MAX_ABS_DIFF, JPEG_MEAN_ABS_DIFF)


# -- dispatch -------------------------------------------------------------------------------------------


def animated_webp() -> bytes:
    frames = [Image.new("RGB", (16, 12), (255, 0, 0)), Image.new("RGB", (16, 12), (0, 0, 255))]
    return encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)


DISPATCH = {
    "jpeg": (lambda: encode(photo(32, 24), "JPEG"), "torchvision"),
    "jpeg_grey": (lambda: encode(photo(32, 24).convert("L"), "JPEG"), "torchvision"),
    "jpeg_progressive": (lambda: encode(photo(32, 24), "JPEG", progressive=True), "torchvision"),
    "jpeg_exif6": (exif_rotated_jpeg, "torchvision"),
    "jpeg_trailing_garbage": (lambda: encode(photo(32, 24), "JPEG") + b"garbage" * 20, "torchvision"),
    "jpeg_cmyk": (cmyk_jpeg, "pillow"),
    "webp": (lambda: encode(photo(32, 24), "WEBP"), "torchvision"),
    "webp_alpha": (lambda: encode(Image.open(io.BytesIO(rgba())), "WEBP", lossless=True), "pillow"),
    "webp_animated": (animated_webp, "pillow"),
    "webp_extra_bytes": (lambda: encode(photo(32, 24), "WEBP") + b"\0" * 10, "pillow"),  # RIFF length disagrees
    # PNG stays on Pillow: torchvision's decode_png crashes the process on corrupt data (module docstring).
    "png_rgb": (lambda: encode(photo(32, 24), "PNG"), "pillow"),
    "png_grey": (lambda: encode(photo(32, 24).convert("L"), "PNG"), "pillow"),
    "gif": (animated_gif, "pillow"),
    "bmp": (lambda: encode(photo(32, 24), "BMP"), "pillow"),
    "tiff": (lambda: encode(photo(32, 24), "TIFF"), "pillow"),
}


@pytest.mark.parametrize("name", sorted(DISPATCH))
def test_dispatch(name):
    make, path = DISPATCH[name]
    data = make()
    assert decoder_for(data) == path
    diff = (decode(data).image.int() - decode_pillow(data).image.int()).abs()
    assert diff.max().item() <= JPEG_MAX_ABS_DIFF


def test_downscaling_always_takes_pillow():
    data = encode(photo(64, 48), "JPEG")
    assert decoder_for(data, 1000, downscale_large=True) == "pillow"
    assert decoder_for(data, 64 * 48, downscale_large=True) == "torchvision"  # fits: no downscaling


def test_dispatch_refuses_like_decode():
    with pytest.raises(DecodeError) as info:
        decoder_for(png_claiming(20000, 20000))
    assert info.value.kind == "too_large"


def test_torchvision_error_falls_back_to_pillow(monkeypatch):
    def broken(_tensor):
        raise RuntimeError("simulated libjpeg failure")

    data = encode(photo(32, 24), "JPEG")
    monkeypatch.setattr(decode_module, "_torchvision_ops", lambda: (broken, broken))
    assert decoder_for(data) == "torchvision"
    assert torch.equal(decode(data).image, decode_pillow(data).image)


def test_without_torchvision_everything_goes_through_pillow(monkeypatch):
    monkeypatch.setattr(decode_module, "_torchvision_ops", lambda: None)
    data = encode(photo(32, 24), "JPEG")
    assert decoder_for(data) == "pillow"
    assert decode(data).image.shape == (3, 24, 32)


def test_truncated_jpeg_is_a_decode_error_on_the_fast_path():
    data = encode(photo(256, 256), "JPEG")[:3000]
    assert decoder_for(data) == "torchvision"
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.kind == "decode"


def damaged(data: bytes, rng: np.random.Generator) -> bytes:
    """`data` with bytes overwritten, cut, inserted or deleted."""
    out = bytearray(data)
    how, at = rng.integers(0, 4), int(rng.integers(0, len(out)))
    if how == 0:
        for pos in rng.integers(0, len(out), rng.integers(1, 6)):
            out[pos] = rng.integers(0, 256)
    elif how == 1:
        del out[max(at, 1):]
    elif how == 2:
        out[at:at] = rng.integers(0, 256, rng.integers(1, 50), dtype=np.uint8).tobytes()
    else:
        del out[at:at + int(rng.integers(1, 200))]
    return bytes(out)


def test_damaged_jpeg_and_webp_same_outcome_on_both_paths():
    # The fast path must not turn a Pillow error into an image or the reverse (measured on 6000 damaged
    # files: same error kind or identical pixels every time; this runs a sample).
    rng = np.random.default_rng(0)
    img = photo(96, 64, noise=20)
    seeds = [encode(img, "JPEG"), encode(img, "JPEG", progressive=True), encode(img.convert("L"), "JPEG"),
             encode(img, "WEBP"), encode(img, "WEBP", lossless=True)]
    for i in range(300):
        data = damaged(seeds[i % len(seeds)], rng)
        assert _outcome(data, decode) == _outcome(data, decode_pillow), i


@pytest.mark.parametrize("cut", [4, 12])
def test_image_magic_with_unparsable_header_is_decode_not_not_image(cut):
    with pytest.raises(DecodeError) as info:
        decode(encode(photo(32, 24), "JPEG")[:cut])
    assert info.value.kind == "decode"


def test_png_with_bad_header_checksum_is_a_decode_error():
    data = bytearray(encode(photo(8, 8), "PNG"))
    data[29] ^= 0xFF  # IHDR CRC
    with pytest.raises(DecodeError) as info:
        decode(bytes(data))
    assert info.value.kind == "decode"


# -- Decoded, downscaling ------------------------------------------------------------------------------


def test_decoded_fields():
    out = decode(encode(photo(33, 17), "PNG"))
    assert (out.width, out.height, out.downscaled) == (33, 17, False)
    assert tuple(out.image.shape) == (3, 17, 33) and out.image.is_contiguous()


@pytest.mark.parametrize("w,h,budget", [(2000, 1500, 200_000), (1000, 1000, 999_999), (1, 4000, 100), (4000, 1, 100),
                                        (3, 5000, 10), (7, 3, 1), (12345, 678, 1_000_000)])
def test_fit_pixels(w, h, budget):
    fw, fh = fit_pixels(w, h, budget)
    assert 1 <= fw <= w and 1 <= fh <= h and fw * fh <= budget
    if min(w, h) * (budget / (w * h)) ** 0.5 >= 2:  # both sides can keep the ratio
        assert abs(fw / fh - w / h) <= (w / h) * (1.5 / min(fw, fh))
        assert fw * fh >= budget * (1 - 2.5 / min(fw, fh))  # close to the budget, not far below


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_downscale_large(fmt):
    img = photo(400, 300)
    data = encode(img, fmt)
    with pytest.raises(DecodeError):
        decode(data, 10_000)
    out = decode(data, 10_000, downscale_large=True)
    assert out.downscaled and (out.width, out.height) == (400, 300)
    _, h, w = out.image.shape
    assert w * h <= 10_000 and abs(w / h - 4 / 3) < 0.02
    # Antialiased: close to Pillow's own Lanczos resize of the full image (JPEG draft adds a little blur).
    ref = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((w, h), Image.LANCZOS)).copy())
    assert (out.image.permute(1, 2, 0).float() - ref.float()).abs().mean() < 4


def test_downscale_keeps_exif_orientation_and_reports_original_size():
    data = with_orientation(photo(400, 200), "JPEG", 6, quality=95)
    out = decode(data, 5_000, downscale_large=True)
    assert out.downscaled and (out.width, out.height) == (200, 400)
    _, h, w = out.image.shape
    assert h > w and w * h <= 5_000


def test_downscale_refuses_past_the_ceiling():
    data = encode(photo(100, 100), "PNG")
    budget = 10_000 // DOWNSCALE_CEILING
    assert decode(data, budget + 1, downscale_large=True).downscaled
    with pytest.raises(DecodeError) as info:
        decode(data, budget - 1, downscale_large=True)
    assert info.value.kind == "too_large"


def test_image_within_budget_is_not_downscaled():
    out = decode(encode(photo(100, 100), "JPEG"), 10_000, downscale_large=True)
    assert not out.downscaled and tuple(out.image.shape) == (3, 100, 100)


# -- threads --------------------------------------------------------------------------------------------


def test_decode_is_thread_safe():
    files = [encode(photo(64 + i, 48, seed=i), fmt) for i in range(12) for fmt in ("JPEG", "PNG", "WEBP", "GIF")]
    files += [png_claiming(10000, 10000), encode(photo(32, 24), "JPEG")[:500], b"not an image"]
    expected = [_outcome(data) for data in files]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            assert list(pool.map(_outcome, files)) == expected


def _outcome(data: bytes, fn=decode):
    try:
        out = fn(data)
    except DecodeError as exc:
        return exc.kind
    return out.width, out.height, int(out.image.int().sum())
