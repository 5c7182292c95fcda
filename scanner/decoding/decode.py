"""Bytes in, RGB uint8 (3, H, W) tensor out, or a DecodeError saying why not.

`decode(data)` returns a `Decoded` (image, original width/height, downscaled flag); `decode_image`
and `read_and_decode` are the tensor-only shorthands that training and evaluation use.

Two implementations of one function (docs/design.md, "Conventions", rules 1-2):

- **Pillow**, the reference, reads every format Pillow knows (HEIC/HEIF too when pillow-heif is
  installed): EXIF orientation applied; grey, palette, RGBA, CMYK and 16-bit converted to RGB, alpha
  composited on white; animated formats give their first frame.
- **torchvision.io**, the fast path, calls the libjpeg-turbo and libwebp decoders of torchvision's
  image extension for the plain cases, where they give the same pixels as Pillow: bit-identical in
  every case measured (the parity tests in tests/test_decode.py check it). It is faster because it
  skips Pillow's mode conversions and copies: about 1.4x the old Pillow-only decoder for 256x256
  JPEGs and 1.7x for 1024x768, one thread.

Dispatch rule. Pillow first parses the header only (lazy: no pixel is decoded), which gives format,
mode, size and EXIF orientation; the pixel budget is checked there, before either path decodes
anything. torchvision then decodes when all of these hold, and Pillow otherwise:

- JPEG (or MPO, whose first image is a plain JPEG) in Pillow mode RGB or L: not CMYK/YCCK;
- or WebP in mode RGB (no alpha), a single frame, whose RIFF length equals the data length
  (libwebp decodes some files with inserted bytes that Pillow refuses);
- the image is not being downscaled (downscaling uses Pillow's JPEG draft mode, see below);
- torchvision's image extension loaded (logged once, at the first decode).

On the fast path the EXIF orientation is the one Pillow read (EXIF, or XMP as Pillow's
`exif_transpose` does) and is applied with array flips, so both paths agree on it. When torchvision
raises on data Pillow parsed, Pillow decodes it, and Pillow's error is the DecodeError. (torchvision's
libjpeg prints its warnings, e.g. "Corrupt JPEG data: premature end of data segment", to stderr for
damaged JPEGs that still decode; Pillow decodes those silently, to the same result.)
`decoder_for(data)` says which path `decode(data)` takes; `decode_pillow` is the reference.

Everything else stays on Pillow: PNG (torchvision 0.29's decode_png kills the process with SIGSEGV
on any libpng error, e.g. a corrupt IDAT, which a scan of crawled files must survive), GIF (its
transparency and frame handling differ from Pillow's), TIFF, BMP, ICO, PNM, HEIC, AVIF, palette,
alpha, 16-bit and other modes.

Error kinds: not_image for empty data and bytes of no known format; decode for corrupt or truncated
data, including bytes that start like an image but whose header does not parse; too_large below.

Pixel budget. An image over `max_pixels` (width x height from the header) is refused as too_large,
or with `downscale_large=True` decoded at reduced size so that w*h <= max_pixels, aspect ratio kept:
a JPEG through Pillow's `draft()` (libjpeg decodes at 1/2, 1/4 or 1/8 scale) and a Lanczos resize;
any other format decoded at full size, then resized. Both refuse images over DOWNSCALE_CEILING x
max_pixels. Pillow's own bomb guard (DecompressionBombError past 2 x Image.MAX_IMAGE_PIXELS, about
179M pixels) refuses larger images on every path; its warning level (89M) is left to the budget here.

Thread safety: `decode` may be called from many threads at once. Header parsing takes a lock,
because silencing Pillow's DecompressionBombWarning needs the process-wide warnings filter
(`warnings.catch_warnings` is not thread-safe before Python 3.14); decoding itself runs unlocked,
and both libraries release the GIL while they decode.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from scanner.errors import ItemError, MissingPackageError

try:  # HEIC/HEIF through Pillow when the optional plugin is installed
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_PLUGIN = True
except ImportError:
    HEIF_PLUGIN = False

HEIF_INSTALL = "pip install 'glff-scanner[heif]'"
# ISO-BMFF brands of HEVC-coded HEIF (Pillow reads AVIF itself; only these need pillow-heif).
_HEVC_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs")

DEFAULT_MAX_PIXELS = 50_000_000
DOWNSCALE_CEILING = 16  # downscale_large still refuses images over this many times max_pixels
ORIENTATION_TAG = 0x0112

log = logging.getLogger(__name__)
_HEADER_LOCK = threading.Lock()
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that exchange width and height


class DecodeError(ItemError):
    """Bytes that cannot become an image. `kind`: decode, too_large or not_image."""


@dataclass(frozen=True, eq=False)
class Decoded:
    """A decoded image.

    image:      uint8 (3, H, W), contiguous, RGB, EXIF orientation applied.
    width:      the original image's width after EXIF orientation (differs from W when downscaled).
    height:     likewise.
    downscaled: True when the image was over the budget and decoded at reduced size.
    """

    image: torch.Tensor
    width: int
    height: int
    downscaled: bool = False


@dataclass(frozen=True)
class _Plan:
    """What the header says and how to decode it."""

    img: Image.Image  # opened, not loaded
    fast: Callable[[torch.Tensor], torch.Tensor] | None  # torchvision op, None: Pillow
    target: tuple[int, int] | None  # (w, h) in stored orientation to downscale to; None: full size


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, downscale_large: bool = False) -> Decoded:
    """Decode encoded image bytes (see the module docstring for the paths and the budget).

    Raises DecodeError (kind decode, too_large or not_image) for bytes that do not give an image.
    """
    plan = _plan(data, max_pixels, downscale_large)
    if plan.fast is not None:
        decoded = _decode_torchvision(data, plan)
        if decoded is not None:
            return decoded
    return _decode_pillow(plan)


def decode_pillow(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, downscale_large: bool = False) -> Decoded:
    """The reference: `decode` with Pillow for every format (what the fast path is tested against)."""
    return _decode_pillow(_plan(data, max_pixels, downscale_large, fast_allowed=False))


def decoder_for(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, downscale_large: bool = False) -> str:
    """The path `decode` takes for these bytes, "torchvision" or "pillow" (before any fallback).

    Raises DecodeError where `decode` would refuse the header.
    """
    return "pillow" if _plan(data, max_pixels, downscale_large).fast is None else "torchvision"


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode encoded image bytes to a uint8 (3, H, W) RGB tensor (over-budget images are refused)."""
    return decode(data, max_pixels).image


def read_and_decode(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read a file and decode it to a uint8 (3, H, W) RGB tensor."""
    with open(path, "rb") as fh:
        return decode_image(fh.read(), max_pixels)


# -- header and dispatch ------------------------------------------------------------------------------


def _plan(data: bytes, max_pixels: int, downscale_large: bool, fast_allowed: bool = True) -> _Plan:
    if max_pixels < 1:
        raise ValueError(f"max_pixels is {max_pixels}; expected a positive integer")
    if not data:
        raise DecodeError("not_image", "file is empty (0 bytes)")
    img = _open_header(data)
    width, height = img.size
    if width < 1 or height < 1:
        raise DecodeError("decode", f"image has no pixels ({width}x{height})")
    target = _check_budget(width, height, max_pixels, downscale_large)
    fast = _fast_decoder(img, data) if fast_allowed and target is None else None
    return _Plan(img, fast, target)


def _open_header(data: bytes) -> Image.Image:
    try:
        with _HEADER_LOCK, warnings.catch_warnings():
            # Pillow warns past MAX_IMAGE_PIXELS (89M); our own budget decides below that of its error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if not HEIF_PLUGIN and is_hevc_heif(data):
            # The file is fine; this installation is not. No record: installing the plugin and rerunning scans it.
            raise MissingPackageError(f"a HEIC/HEIF image needs pillow-heif, which is not installed: {HEIF_INSTALL}"
                                      ) from None
        raise _unidentified(data) from None
    except Image.DecompressionBombError as exc:  # past 2x MAX_IMAGE_PIXELS: refused on every path
        raise DecodeError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError("decode", f"corrupt image header: {exc}") from None


def is_hevc_heif(data: bytes) -> bool:
    """Whether `data` starts with an ISO-BMFF `ftyp` box naming an HEVC HEIF brand (major or compatible)."""
    if data[4:8] != b"ftyp":
        return False
    box = data[8:min(int.from_bytes(data[:4], "big"), 64)]
    return any(box[i:i + 4] in _HEVC_BRANDS for i in range(0, len(box) - 3, 4))


def _unidentified(data: bytes) -> DecodeError:
    """not_image for bytes of no image format; decode for bytes that start like one (a PNG with a bad
    header checksum, a JPEG cut after a few bytes, a format without its Pillow plugin)."""
    from scanner.sources.sniff import HEAD_BYTES, has_image_magic  # late: sources is a larger package

    if has_image_magic(data[:HEAD_BYTES]):
        return DecodeError("decode", "starts like an image, but its header is corrupt or its format unsupported")
    return DecodeError("not_image", "not a recognised image format")


def _check_budget(width: int, height: int, max_pixels: int, downscale_large: bool) -> tuple[int, int] | None:
    """None when the image fits the budget; else the reduced size, or DecodeError too_large."""
    pixels = width * height
    if pixels <= max_pixels:
        return None
    if not downscale_large:
        raise DecodeError("too_large", f"{width}x{height} = {pixels} pixels exceeds the budget of {max_pixels}")
    if pixels > DOWNSCALE_CEILING * max_pixels:
        raise DecodeError(
            "too_large",
            f"{width}x{height} = {pixels} pixels exceeds {DOWNSCALE_CEILING}x the budget of {max_pixels} "
            f"(too large even to downscale)",
        )
    return fit_pixels(width, height, max_pixels)


def fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest (w, h) with the aspect ratio of (width, height) and w*h <= max_pixels (never
    larger than the original; a strip too thin to keep its ratio keeps a side of 1 pixel)."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w = max(1, min(width, math.floor(width * scale)))
    h = max(1, min(height, math.floor(height * scale)))
    w = max(1, min(w, max_pixels // h))
    h = max(1, min(h, max_pixels // w))
    return w, h


def _fast_decoder(img: Image.Image, data: bytes) -> Callable[[torch.Tensor], torch.Tensor] | None:
    ops = _torchvision_ops()
    if ops is None:
        return None
    if img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L"):
        return ops[0]
    if img.format == "WEBP" and img.mode == "RGB" and not getattr(img, "is_animated", False) and _riff_complete(data):
        return ops[1]
    return None


def _riff_complete(data: bytes) -> bool:
    return len(data) >= 8 and int.from_bytes(data[4:8], "little") + 8 == len(data)


_ops_lock = threading.Lock()


def _torchvision_ops() -> tuple[Callable, Callable] | None:
    """_load_torchvision_ops under a lock: functools.cache lets two decode threads that arrive
    together both run (and log) the first load."""
    with _ops_lock:
        return _load_torchvision_ops()


@functools.cache
def _load_torchvision_ops() -> tuple[Callable, Callable] | None:
    """(decode_jpeg, decode_webp) to RGB, or None when torchvision's image extension is missing.

    The registered ops are called directly: the public wrappers warn on every call that torchvision's
    image decoding is deprecated (in favour of TorchCodec), and silencing that is not thread-safe.
    """
    try:
        import torchvision.io  # noqa: F401 - loads the extension that registers torch.ops.image
        from torchvision.io import ImageReadMode

        rgb = ImageReadMode.RGB.value
        jpeg_op, webp_op = torch.ops.image.decode_jpeg, torch.ops.image.decode_webp
    except (ImportError, OSError, RuntimeError, AttributeError) as exc:
        log.info("decode: torchvision image ops unavailable (%s); Pillow decodes every format", exc)
        return None
    log.info("decode: torchvision.io decodes plain JPEG and WebP, Pillow the rest")
    return (lambda t: jpeg_op(t, rgb, False)), (lambda t: webp_op(t, rgb))


# -- the two paths -------------------------------------------------------------------------------------


def _decode_torchvision(data: bytes, plan: _Plan) -> Decoded | None:
    """The fast path; None when torchvision cannot decode it or Pillow must decide (then Pillow runs)."""
    try:
        orientation = _orientation(plan.img)
    except Exception:  # noqa: BLE001 - odd EXIF: Pillow's exif_transpose decides what it means
        return None
    width, height = plan.img.size
    try:
        image = plan.fast(torch.frombuffer(bytearray(data), dtype=torch.uint8))  # (3, H, W), a view of HWC
    except RuntimeError as exc:
        log.debug("decode: torchvision failed (%s); Pillow decodes it", exc)
        return None
    if tuple(image.shape) != (3, height, width):  # not what the header promised: let Pillow decide
        return None
    image = _to_chw(_orient(image.permute(1, 2, 0).numpy(), orientation))
    return Decoded(image, image.shape[2], image.shape[1])


def _decode_pillow(plan: _Plan) -> Decoded:
    img = plan.img
    stored_w, stored_h = img.size
    try:
        img.seek(0)  # first frame of animations
        if plan.target is not None and img.format in ("JPEG", "MPO"):
            img.draft(None, plan.target)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale, still >= target
        img.load()
        swapped = _orientation(img) in _SWAPS_AXES
        img = ImageOps.exif_transpose(img)
        if plan.target is not None:
            img = _shrink(img, plan.target[::-1] if swapped else plan.target)
        img = _to_rgb(img)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:  # GIF frames and TIFF tiles are checked while loading
        raise DecodeError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated or corrupt data: Pillow reports it as OSError ("image file is truncated", ...).
        raise DecodeError("decode", f"corrupt or truncated image: {exc}") from None
    image = _to_chw(np.asarray(img, dtype=np.uint8))
    width, height = (stored_h, stored_w) if swapped else (stored_w, stored_h)
    return Decoded(image, width, height, downscaled=plan.target is not None)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 when absent) exactly as ImageOps.exif_transpose reads it."""
    return img.getexif().get(ORIENTATION_TAG, 1)


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an (H, W, 3) array as Pillow's exif_transpose does (a view)."""
    if orientation == 2:  # mirrored
        return image[:, ::-1]
    if orientation == 3:  # rotated 180
        return image[::-1, ::-1]
    if orientation == 4:  # mirrored vertically
        return image[::-1]
    if orientation == 5:  # transpose (mirror along the main diagonal)
        return image.transpose(1, 0, 2)
    if orientation == 6:  # displayed rotated 90 degrees clockwise
        return np.rot90(image, -1)
    if orientation == 7:  # transverse (mirror along the anti-diagonal)
        return image.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:  # displayed rotated 90 degrees counter-clockwise
        return np.rot90(image, 1)
    return image


def _to_chw(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> contiguous (3, H, W) tensor. numpy's strided copy is about 4x faster
    than torch's `.contiguous()` for this uint8 transposition on one thread."""
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    if not chw.flags.writeable:  # a 1x1 image needs no transposition copy: still Pillow's read-only buffer
        chw = chw.copy()
    return torch.from_numpy(chw)


def _shrink(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Antialiased resize to `size` (Lanczos, after an integer box reduction for speed)."""
    if img.mode not in ("L", "RGB"):
        img = _to_rgb(img)  # resize after compositing alpha, palette lookup and 16-bit scaling
    if img.size == size:
        return img
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white so transparent regions do not become arbitrary colours.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
