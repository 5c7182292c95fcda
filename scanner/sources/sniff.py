"""Which files are images: found by content (magic bytes), not only by name.

A file is scanned when its first bytes are those of an image format, or when its name has an image
extension (so `photo.jpg` holding text gets a `not_image` record instead of vanishing). Anything
else (CSV manifests, JSON sidecars, videos) is skipped without a record and counted.
"""

from __future__ import annotations

import posixpath

HEAD_BYTES = 64

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .webp .bmp .dib .tif .tiff .heic .heif .avif .jp2 .j2k "
    ".jpx .ppm .pgm .pbm .pnm .ico .tga .psd".split()
)

# (offset, magic) pairs; ISO-BMFF brands (HEIF, AVIF) are checked separately.
_MAGIC = (
    (0, b"\xff\xd8\xff"),  # JPEG
    (0, b"\x89PNG\r\n\x1a\n"),
    (0, b"GIF87a"),
    (0, b"GIF89a"),
    (0, b"BM"),  # BMP
    (0, b"II*\x00"),  # TIFF, little-endian
    (0, b"MM\x00*"),  # TIFF, big-endian
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n"),  # JPEG 2000
    (0, b"\xff\x4f\xff\x51"),  # JPEG 2000 codestream
    (0, b"\x00\x00\x01\x00"),  # ICO
    (0, b"8BPS"),  # Photoshop
)
_PNM = (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")
_BMFF_IMAGE_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1", b"avif", b"avis")


def has_image_magic(head: bytes) -> bool:
    """True when `head` (the first bytes of a file) starts like an image format we may decode."""
    if any(head[offset:offset + len(magic)] == magic for offset, magic in _MAGIC):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[4:8] == b"ftyp" and head[8:12] in _BMFF_IMAGE_BRANDS:
        return True
    return head[:2] in _PNM and head[2:3] in (b"\n", b"\r", b" ", b"\t", b"#")


def has_image_extension(name: str) -> bool:
    return posixpath.splitext(name.lower())[1] in IMAGE_EXTENSIONS


def looks_like_image(name: str, head: bytes) -> bool:
    """Whether a file called `name` starting with `head` is to be scanned (see the module docstring)."""
    return has_image_magic(head) or has_image_extension(name)
