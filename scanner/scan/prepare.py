"""One work item -> bytes -> sha256 -> decoded image, on a decode worker thread.

The outcome is either an image awaiting the model, a finished error record, or a skip (the file is
not an image by content or name). Nothing here raises for a bad file; a ScannerError (an optional
package this file needs is missing) passes through and stops the scan, without a record for the file:
installing the package and rerunning scans it.

With a batch loader (scanner.decoding.loaders, `--loader dali`) the worker stops after the header: a file the
loader routes to itself keeps its bytes in `encoded`, and the loader decodes it with its batch right
before inference (`decode_into` is the CPU decoder it falls back to for a file it refuses).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from scanner.decoding.decode import DEFAULT_MAX_PIXELS, decode
from scanner.errors import ItemError, ScannerError
from scanner.scan.results import error_record
from scanner.sources import MAX_ITEM_BYTES, Item, read_item
from scanner.sources.retry import RetryPolicy
from scanner.stages import stage


@dataclass
class DecodeOptions:
    max_pixels: int = DEFAULT_MAX_PIXELS
    downscale_large: bool = False
    max_bytes: int = MAX_ITEM_BYTES
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # reading: retries and timeouts (scanner.sources.retry)


@dataclass
class Prepared:
    """A decoded item awaiting the model (`image` set), or a finished one (`record` set), or a skip."""

    item: Item
    sha256: str | None = None
    image: torch.Tensor | None = None  # uint8 (3, h, w) as scanned (smaller than width x height if downscaled)
    encoded: bytes | None = None  # bytes left for the batch loader to decode (width, height from the header)
    width: int = 0  # original size
    height: int = 0
    downscaled: bool = False
    record: dict | None = None
    skip: bool = False


def prepare(item: Item, model_id: str, options: DecodeOptions, loader=None) -> Prepared:
    """Read, hash and decode one item (with a batch `loader`, leave the files it routes to itself undecoded)."""
    out = Prepared(item)
    try:
        with stage("read"):  # bytes and their sha256
            data = read_item(item, options.max_bytes, options.retry)
            if data is None:
                out.skip = True
                return out
            out.sha256 = hashlib.sha256(data).hexdigest()
        size = None
        if loader is not None:
            with stage("decode"):  # the header check that routes the file; a GPU loader decodes it later
                size = loader.route(data, options)
    except Exception as exc:  # noqa: BLE001 - see _fail
        return _fail(out, exc, model_id)
    if size is not None:
        out.encoded, (out.width, out.height) = data, size
        return out
    return decode_into(out, data, model_id, options)


def decode_into(out: Prepared, data: bytes, model_id: str, options: DecodeOptions) -> Prepared:
    """Decode `data` on the CPU (scanner.decoding.decode) into `out`: its image, or its error record."""
    try:
        with stage("decode"):
            decoded = decode(data, options.max_pixels, downscale_large=options.downscale_large)
    except Exception as exc:  # noqa: BLE001 - see _fail
        return _fail(out, exc, model_id)
    out.image = decoded.image
    out.width, out.height, out.downscaled = decoded.width, decoded.height, decoded.downscaled
    return out


def _fail(out: Prepared, exc: Exception, model_id: str) -> Prepared:
    """The error record for an exception raised while reading or decoding `out`'s item."""
    item = out.item
    if isinstance(exc, ScannerError):
        raise exc  # not this file's fault: stop the scan and say what to install
    if isinstance(exc, ItemError):
        out.record = error_record(item.id, out.sha256, exc.kind, str(exc), model_id)
    elif isinstance(exc, MemoryError):
        out.record = error_record(item.id, out.sha256, "too_large", "out of memory while decoding", model_id)
    else:  # a third-party parser failing on hostile bytes is a bad file, not our bug
        out.record = error_record(item.id, out.sha256, "decode", f"decoder failed: {type(exc).__name__}: {exc}",
                                  model_id)
    return out
