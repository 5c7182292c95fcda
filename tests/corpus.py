"""A corpus of broken and odd files for decode and scan tests (a helper module, not a test file).

`make_corpus(root)` writes the files under `root` (a few nested folders, about 200 KB in all) and
returns, per relative path (POSIX separators), what a scan must produce for it:

    Expected("image", size=(W, H))   scored; W, H after EXIF orientation
    Expected("error", error=KIND)    an error record of that kind (decode, too_large, not_image, io)
    Expected("skip")                 not an image by content nor by name: skipped without a record

Expectations hold for the default pixel budget (scanner.decoding.decode.DEFAULT_MAX_PIXELS, 50 MP) without
downscale_large. `BOMB` and `HUGE_HEADER` name the two too_large files.

Unreadable files. A file made unreadable with chmod 000 is unreadable only when the tests do not run
as root (root ignores permissions), so it is opt-in: `make_corpus(root, unreadable=True)` creates
`locked/unreadable.jpg` (mode 000, expected io) only when `can_make_unreadable()`, and leaves it out
otherwise; a test that needs it skips when `"locked/unreadable.jpg" not in corpus`. Call
`restore_permissions(root)` before deleting the tree yourself. The dangling symlink
`links/dangling.jpg` is an io error for root too.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BOMB = "png/bomb_10000x10000.png"
HUGE_HEADER = "png/huge_header_20000x20000.png"
UNREADABLE = "locked/unreadable.jpg"


@dataclass(frozen=True)
class Expected:
    """What a scan must produce for one corpus file (see the module docstring)."""

    kind: str  # "image" | "error" | "skip"
    size: tuple[int, int] | None = None  # (W, H) after EXIF orientation, for images
    error: str | None = None  # error kind, for errors


def image(w: int, h: int) -> Expected:
    return Expected("image", size=(w, h))


def error(kind: str) -> Expected:
    return Expected("error", error=kind)


SKIP = Expected("skip")


# -- encoders -------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Gradients plus noise: compresses like a photo, not like a flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / max(w, 1), y * 255 / max(h, 1), (x + y) * 127 / max(w + h, 1)], -1)
    return Image.fromarray(np.clip(arr + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8), "RGB")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_raw(width: int, height: int, idat: bytes, bit_depth: int = 8, colour: int = 0) -> bytes:
    """A PNG from its parts: IHDR for width x height, one IDAT holding `idat`, IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bomb_png(side: int = 10_000) -> bytes:
    """side x side grey zeros: about 100 KB of file for 100 MB of pixels, made without holding them."""
    compressor = zlib.compressobj(9)
    rows = b"\x00" * ((side + 1) * 500)  # 500 rows, each a filter byte and `side` zero pixels
    body = b"".join(compressor.compress(rows) for _ in range(side // 500)) + compressor.flush()
    return png_raw(side, side, body)


def huge_header_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny valid PNG whose IHDR claims width x height (valid CRC): refused before decoding."""
    return png_raw(width, height, zlib.compress(b"\x00" * 5))


def corrupt_idat_png() -> bytes:
    """A byte of the compressed data flipped, CRC recomputed: only the inflate step can notice."""
    raw = b"".join(b"\x00" + bytes(range(i, i + 48)) for i in range(16))  # 16 rows of 48 grey pixels
    idat = bytearray(zlib.compress(raw))
    idat[len(idat) // 2] ^= 0xFF
    return png_raw(48, 16, bytes(idat))


def interlaced_png(w: int = 20, h: int = 12) -> bytes:
    """Adam7-interlaced 8-bit grey, written by hand (Pillow reads interlaced PNGs but does not write them)."""
    pixels = np.asarray(photo(w, h).convert("L"))
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = pixels[y0::dy, x0::dx]
        if sub.size:  # an empty pass has no rows at all, not even filter bytes
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    png = bytearray(png_raw(w, h, zlib.compress(raw)))
    png[28] = 1  # IHDR interlace method: Adam7
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def bad_header_crc_png() -> bytes:
    data = bytearray(encode(photo(16, 16), "PNG"))
    data[29] ^= 0xFF  # the IHDR CRC
    return bytes(data)


def with_exif(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=90, exif=exif.tobytes())


def palette_transparent_png() -> bytes:
    img = Image.new("P", (10, 6), 0)
    img.putpalette([0, 0, 0, 200, 30, 40] + [0] * (254 * 3))
    img.paste(1, (0, 0, 5, 6))
    return encode(img, "PNG", transparency=0)


def rgba_png() -> bytes:
    arr = np.zeros((9, 12, 4), np.uint8)
    arr[..., 0] = 200
    arr[:, :6, 3] = 255
    return encode(Image.fromarray(arr, "RGBA"), "PNG")


def la_png() -> bytes:
    arr = np.zeros((5, 7, 2), np.uint8)
    arr[..., 0] = 90
    arr[:, :3, 1] = 255
    return encode(Image.fromarray(arr, "LA"), "PNG")


def grey16(w: int, h: int) -> Image.Image:
    return Image.fromarray((np.arange(w * h, dtype=np.uint16).reshape(h, w) * 977).astype(np.uint16))


def rgb16_png(w: int = 6, h: int = 4) -> bytes:
    """16-bit RGB PNG, written by hand (Pillow does not write 16-bit RGB)."""
    arr = (np.arange(w * h * 3, dtype=np.uint32).reshape(h, w * 3) * 911 % 65536).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in arr)
    return png_raw(w, h, zlib.compress(raw), bit_depth=16, colour=2)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 14), (255, 0, 0)), Image.new("RGB", (20, 14), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def alpha_webp() -> bytes:
    img = photo(18, 10).convert("RGBA")
    img.putalpha(Image.linear_gradient("L").resize((18, 10)))
    return encode(img, "WEBP", quality=80)


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("inside.txt", "a zip archive, not a PNG\n")
    return buf.getvalue()


def random_bytes(n: int, seed: int) -> bytes:
    # Starts with "\x00\x01" so no image magic can match by chance.
    return b"\x00\x01" + np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# -- the corpus -----------------------------------------------------------------------------------------

# relative path -> (bytes maker, expectation)
FILES: dict[str, tuple[Callable[[], bytes], Expected]] = {
    # JPEG
    "jpeg/plain.jpg": (lambda: encode(photo(48, 32), "JPEG"), image(48, 32)),
    "jpeg/grey.jpg": (lambda: encode(photo(30, 20).convert("L"), "JPEG"), image(30, 20)),
    "jpeg/progressive.jpg": (lambda: encode(photo(40, 28), "JPEG", progressive=True), image(40, 28)),
    "jpeg/cmyk.jpg": (lambda: encode(photo(24, 16).convert("CMYK"), "JPEG"), image(24, 16)),
    "jpeg/exif6_rotated.jpg": (lambda: with_exif(photo(40, 24), 6), image(24, 40)),  # stored 40x24
    "jpeg/exif8_rotated.jpg": (lambda: with_exif(photo(36, 20), 8), image(20, 36)),
    "jpeg/exif3_upside_down.jpg": (lambda: with_exif(photo(36, 20), 3), image(36, 20)),
    "jpeg/trailing_garbage.jpg": (lambda: encode(photo(32, 32), "JPEG") + b"\x00garbage" * 64, image(32, 32)),
    "jpeg/truncated.jpg": (lambda: encode(photo(256, 256), "JPEG")[:3000], error("decode")),
    "jpeg/zero_bytes.jpg": (lambda: b"", error("not_image")),
    "jpeg/text.jpg": (lambda: b"this is text that is named like a JPEG\n" * 4, error("not_image")),
    "jpeg/png_inside.jpg": (lambda: encode(photo(26, 18), "PNG"), image(26, 18)),  # wrong extension: fine
    "noext/jpeg_without_extension": (lambda: encode(photo(22, 14), "JPEG"), image(22, 14)),  # found by magic
    # PNG
    "png/1x1.png": (lambda: encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), image(1, 1)),
    "png/strip_1x4000.png": (lambda: encode(photo(1, 4000), "PNG"), image(1, 4000)),
    "png/grey16.png": (lambda: encode(grey16(8, 5), "PNG"), image(8, 5)),
    "png/rgb16.png": (rgb16_png, image(6, 4)),
    "png/palette_transparent.png": (palette_transparent_png, image(10, 6)),
    "png/rgba.png": (rgba_png, image(12, 9)),
    "png/la.png": (la_png, image(7, 5)),
    "png/interlaced.png": (interlaced_png, image(20, 12)),
    "png/truncated.png": (lambda: encode(photo(64, 64), "PNG")[:900], error("decode")),
    "png/corrupt_idat.png": (corrupt_idat_png, error("decode")),
    "png/bad_header_crc.png": (bad_header_crc_png, error("decode")),
    HUGE_HEADER: (huge_header_png, error("too_large")),
    BOMB: (bomb_png, error("too_large")),
    "png/zip_archive.png": (zip_bytes, error("not_image")),
    # GIF, WebP and the rest
    "other/animated.gif": (animated_gif, image(20, 14)),
    "other/static.gif": (lambda: encode(photo(15, 11).quantize(16), "GIF"), image(15, 11)),
    "other/lossy.webp": (lambda: encode(photo(30, 18), "WEBP", quality=75), image(30, 18)),
    "other/lossless.webp": (lambda: encode(photo(30, 18), "WEBP", lossless=True), image(30, 18)),
    "other/alpha.webp": (alpha_webp, image(18, 10)),
    "other/plain.tiff": (lambda: encode(photo(21, 13), "TIFF"), image(21, 13)),
    "other/grey16.tiff": (lambda: encode(grey16(9, 7), "TIFF"), image(9, 7)),
    "other/plain.bmp": (lambda: encode(photo(17, 9), "BMP"), image(17, 9)),
    "other/1bit.bmp": (lambda: encode(photo(19, 10).convert("1"), "BMP"), image(19, 10)),
    "other/icon.ico": (lambda: encode(photo(32, 32).convert("RGBA"), "ICO", sizes=[(32, 32)]), image(32, 32)),
    "other/image.ppm": (lambda: encode(photo(14, 9), "PPM"), image(14, 9)),
    # not images
    "junk/random.jpg": (lambda: random_bytes(4000, 1), error("not_image")),  # image name: reported
    "junk/random_binary": (lambda: random_bytes(4000, 2), SKIP),  # no magic, no image name: skipped
    "junk/notes.csv": (lambda: b"path,label\na.jpg,0\nb.png,1\n", SKIP),
    "junk/empty": (lambda: b"", SKIP),
    "junk/deeper/readme.txt": (lambda: b"not an image\n", SKIP),
}


def make_corpus(root: Path, *, unreadable: bool = False) -> dict[str, Expected]:
    """Write the corpus under `root`; return relative path -> Expected (see the module docstring)."""
    root = Path(root)
    expected: dict[str, Expected] = {}
    for rel, (make, want) in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make())
        expected[rel] = want
    dangling = root / "links" / "dangling.jpg"
    dangling.parent.mkdir(parents=True, exist_ok=True)
    dangling.symlink_to(root / "links" / "missing.jpg")
    expected["links/dangling.jpg"] = error("not_found")
    if unreadable and can_make_unreadable():
        path = root / UNREADABLE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(photo(16, 16), "JPEG"))
        path.chmod(0)
        expected[UNREADABLE] = error("io")
    return expected


def can_make_unreadable() -> bool:
    """chmod 000 makes a file unreadable for everyone but root (and not at all on Windows)."""
    return hasattr(os, "geteuid") and os.geteuid() != 0


def restore_permissions(root: Path) -> None:
    """Make the unreadable file readable again (for tools that cannot delete what they cannot read)."""
    path = Path(root) / UNREADABLE
    if path.exists():
        path.chmod(0o644)
