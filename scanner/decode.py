"""Bytes in, RGB uint8 (3, H, W) tensor out, or a DecodeError saying why not.

Pillow does the work here: EXIF orientation applied; grey, palette, RGBA, CMYK and 16-bit
converted to RGB; animated formats give their first frame; a pixel budget refuses decompression
bombs before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from scanner.errors import ItemError

DEFAULT_MAX_PIXELS = 50_000_000


class DecodeError(ItemError):
    """Bytes that cannot become an image. `kind`: decode, too_large or not_image."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode encoded image bytes to a uint8 (3, H, W) RGB tensor."""
    if not data:
        raise DecodeError("not_image", "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise DecodeError(
                    "too_large", f"{width}x{height} = {width * height} pixels exceeds the budget of {max_pixels}"
                )
            if width < 1 or height < 1:
                raise DecodeError("decode", f"image has no pixels ({width}x{height})")
            img.seek(0)  # first frame of animations
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not_image", "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard: an error past 2x MAX_IMAGE_PIXELS, a warning (raised as an exception by
        # the filter above) past 1x; both fire in Image.open, before our budget check can run.
        raise DecodeError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated or corrupt data: Pillow reports it as OSError ("image file is truncated", ...).
        raise DecodeError("decode", f"corrupt or truncated image: {exc}") from None
    array = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _to_rgb(img: Image.Image) -> Image.Image:
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


def read_and_decode(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    with open(path, "rb") as fh:
        return decode_image(fh.read(), max_pixels)
