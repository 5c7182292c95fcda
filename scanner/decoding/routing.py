"""Routing for the GPU loaders: which files a batch decoder (DALI, nvJPEG) may take, decided on the decode
workers from the header alone.

`route(data, max_pixels, downscale_large, progressive)` returns (width, height) when a GPU decoder may
decode `data` and give the CPU decoder's image, None when scanner.decoding.decode must decode it, and
raises the DecodeError that the CPU decoder raises for a header it refuses. A file is routed when it is a
plain JPEG: Pillow's parse says JPEG (not MPO) in mode RGB or L within the pixel budget, EXIF orientation
1 (the GPU decoders do not rotate), and `jpeg_well_formed` passes: SOF0/1/2 (Huffman baseline, extended,
progressive), 8-bit, 1 or 3 components, marker segments consistent up to the first SOS, only legal
marker codes in the entropy-coded data, an EOI after it. With progressive=False, progressive JPEGs
(SOF2) stay with the CPU decoder too (the nvjpeg loader's choice: scanner.decoding.nvjpeg says why).

Two implementations of that decision (docs/design.md, "Conventions"):

- `route_pillow`, the reference: scanner.decoding.decode's header parse (Pillow), then the checks above.
- `route`, the fast path: `walk_header` walks the marker segments in a few lines of Python, and the
  walk answers alone for headers made only of segments whose Pillow parse it mirrors (`_route_fast`;
  EXIF read by Pillow's own EXIF parser, XMP left to Pillow); everything else goes to `route_pillow`.
  On a GPU scan's CPU side the header check was the largest share of the work that holds the GIL:
  Pillow's parse of a 500x375 JPEG took 65-95 us under its lock, the walk with the scan check 25-40 us,
  16 of them numpy's scan of the entropy-coded data without the GIL (docs/benchmarks.md, issue 23).

tests/test_routing.py compares `route` with `route_pillow` on generated JPEGs of every kind named here,
on the decode corpus and on thousands of randomly damaged headers: same size, same None, same error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, TiffImagePlugin

from scanner.decoding.decode import ORIENTATION_TAG, _orientation, _plan

_SOF_ROUTED = frozenset({0xC0, 0xC1, 0xC2})  # Huffman baseline, extended sequential, progressive
_SOF_ANY = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# After 0xFF inside or between scans only these codes are legal: stuffing, fill, RSTn, EOI, and the
# tables, comments and APPn that may sit between progressive scans. Anything else (a reserved code, a
# second SOI or SOF, DNL) makes libjpeg stop with an error or needs the CPU decoder's judgement.
_LEGAL_IN_SCAN = np.zeros(256, dtype=bool)
_LEGAL_IN_SCAN[[0x00, 0xFF, 0xC4, 0xCC, 0xD9, 0xDA, 0xDB, 0xDD, 0xFE, *range(0xD0, 0xD8), *range(0xE0, 0xF0)]] = True
# Segments whose Pillow parse the fast path mirrors. Pillow skips DHT, DAC, DRI and SOS by their length
# and stores COM; APPn and DQT are checked below; any other marker goes to Pillow.
_SKIPPED = frozenset({0xC4, 0xCC, 0xDD, 0xDA, 0xFE})
_EXIF = (0xE1, b"Exif\0\0")
# APPn payloads Pillow parses, by (marker, prefix): the shortest payload its parse survives, or None
# for payloads the fast path leaves to Pillow (orientation in XMP, MPO, Photoshop resources). EXIF is
# read by Pillow's own EXIF parser (_exif_orientation).
_APP_PARSED = {
    (0xE0, b"JFIF"): 7,  # version at offset 5
    (0xE1, b"http://ns.adobe.com/xap/1.0/\x00"): None,
    (0xE2, b"ICC_PROFILE\0"): 14,  # sequence number and count at 12-13, read when the SOF comes
    (0xE2, b"MPF\0"): None,
    (0xED, b"Photoshop 3.0\x00"): None,
    (0xEE, b"Adobe"): 7,  # version at offset 5
}
_ASK_PILLOW = object()  # the fast path's "only Pillow can tell"


@dataclass(frozen=True)
class JpegHeader:
    """What the marker walk found: the frame's size and components, whether it is progressive (SOF2), each
    segment as (marker, payload start, payload end), and where the entropy-coded data of the first scan
    starts."""

    width: int
    height: int
    components: int
    progressive: bool
    segments: tuple[tuple[int, int, int], ...]
    scan_start: int


def walk_header(data: bytes) -> JpegHeader | None:
    """The marker segments up to the first SOS, or None unless: SOI; segments whose lengths chain up to
    the first SOS; exactly one SOF, and it SOF0/1/2, 8-bit, 1 or 3 components."""
    n = len(data)
    if n < 4 or data[:2] != b"\xff\xd8":
        return None
    pos, frame, segments = 2, None, []
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD9:  # standalone markers have no place here
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > n:
            return None
        if marker in _SOF_ANY:
            if marker not in _SOF_ROUTED or length < 8 or frame is not None:
                return None
            precision, components = data[pos + 4], data[pos + 9]
            if precision != 8 or components not in (1, 3):
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            frame = (width, height, components, marker == 0xC2)
        segments.append((marker, pos + 4, pos + 2 + length))
        pos += 2 + length
        if marker == 0xDA:  # SOS: entropy-coded data follows
            break
    if frame is None:
        return None
    return JpegHeader(*frame, tuple(segments), pos)


def scan_legal(data: bytes, start: int) -> bool:
    """An EOI after `start`, and between them no 0xFF followed by an illegal marker code."""
    end = data.rfind(b"\xff\xd9")
    if end < start:
        return False
    # numpy: 16 us for 60 KB where a regular expression or bytes.count take 20-22 us.
    scan = np.frombuffer(data, dtype=np.uint8, count=end - start, offset=start)
    at = np.flatnonzero(scan[:-1] == 0xFF)
    return bool(_LEGAL_IN_SCAN[scan[at + 1]].all())


def jpeg_well_formed(data: bytes) -> bool:
    """A cheap structural check (no pixel decoded): `walk_header` accepts the header, and `scan_legal`
    the data after it (trailing bytes after the last EOI allowed)."""
    header = walk_header(data)
    return header is not None and scan_legal(data, header.scan_start)


def _route_fast(data: bytes, max_pixels: int, progressive: bool = True):
    """route's answer where the marker walk can give it for certain, else _ASK_PILLOW."""
    header = walk_header(data)
    if header is None or header.width < 1 or header.height < 1 or max_pixels < 1:
        return _ASK_PILLOW
    pixels = header.width * header.height
    if pixels > max_pixels or (Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS):
        return _ASK_PILLOW  # the budget's and Pillow's own size errors are Pillow's to raise
    exif = None
    for marker, start, end in header.segments:
        if marker in _SKIPPED or marker in _SOF_ROUTED:
            continue
        if marker == 0xDB:
            if not _quantization_tables_whole(data, start, end):
                return _ASK_PILLOW
        elif (marker, bytes(data[start : start + 6])) == _EXIF:
            if exif is not None:  # Pillow joins several
                return _ASK_PILLOW
            exif = data[start:end]
        elif not 0xE0 <= marker <= 0xEF or not _app_parses(marker, data, start, end):
            return _ASK_PILLOW  # DNL, DHP, EXP, JPGn...: Pillow's walk treats some of them differently
    if exif is not None:
        orientation = _exif_orientation(exif)
        if orientation is _ASK_PILLOW:
            return _ASK_PILLOW
        if orientation != 1:
            return None
    if header.progressive and not progressive:
        return None
    return (header.width, header.height) if scan_legal(data, header.scan_start) else None


def _quantization_tables_whole(data: bytes, start: int, end: int) -> bool:
    """Pillow's DQT parse: tables of 1 + 64 bytes (8-bit) or 1 + 128 (16-bit) must fill the segment."""
    while start < end:
        start += 65 if data[start] < 16 else 129
    return start == end


def _app_parses(marker: int, data: bytes, start: int, end: int) -> bool:
    for (parsed_marker, prefix), shortest in _APP_PARSED.items():
        if marker == parsed_marker and data.startswith(prefix, start, end):
            return shortest is not None and end - start >= shortest
    return True  # Pillow only stores it


def _exif_orientation(payload: bytes):
    """The orientation Pillow's getexif reads from this APP1 payload (its own parser, Image.Exif.load, on
    the bytes its JPEG parse hands it), or _ASK_PILLOW where Pillow's opening of the file could fail or
    differ: the parse raises, or its DPI read (JpegImageFile._read_dpi_from_exif, which only catches
    some errors) would meet values other than the standard int unit and rational resolution."""
    exif = Image.Exif()
    try:
        exif.load(payload)
        orientation = exif.get(ORIENTATION_TAG, 1)
        unit, resolution = exif.get(0x0128), exif.get(0x011A)  # ResolutionUnit, XResolution
    except Exception:  # noqa: BLE001 - whatever it is, Pillow's own path decides
        return _ASK_PILLOW
    if unit is not None and resolution is not None and not (
            type(unit) is int and isinstance(resolution, TiffImagePlugin.IFDRational)):
        return _ASK_PILLOW
    return orientation


def route(data: bytes, max_pixels: int, downscale_large: bool = False,
          progressive: bool = True) -> tuple[int, int] | None:
    """(width, height) when a GPU loader may decode `data`, None when scanner.decoding.decode.decode must;
    progressive=False leaves progressive JPEGs to it too.

    Raises DecodeError exactly where scanner.decoding.decode.decode refuses the header (route_pillow's
    answer, which the fast path gives whenever it answers).
    """
    answer = _route_fast(data, max_pixels, progressive)
    return route_pillow(data, max_pixels, downscale_large, progressive) if answer is _ASK_PILLOW else answer


def route_pillow(data: bytes, max_pixels: int, downscale_large: bool = False,
                 progressive: bool = True) -> tuple[int, int] | None:
    """The reference: `route`'s answer from scanner.decoding.decode's header parse (Pillow)."""
    plan = _plan(data, max_pixels, downscale_large, fast_allowed=False)
    img = plan.img
    if plan.target is not None or img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    if not progressive and img.info.get("progressive"):  # Pillow's flag for a progressive frame (SOF2)
        return None
    try:
        if _orientation(img) != 1:
            return None
    except Exception:  # noqa: BLE001 - odd EXIF: the CPU decoder's exif_transpose decides what it means
        return None
    return img.size if jpeg_well_formed(data) else None
