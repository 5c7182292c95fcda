"""Routing for the GPU loaders (scanner.decoding.routing): the fast marker walk against the Pillow
reference on every kind of JPEG header, the odd-files corpus and randomly damaged headers.

Parity here is exact: for each input, `route` and `route_pillow` give the same size, the same None, or
the same DecodeError (kind and message). The fast path may hand any file to Pillow; the tests also check
that it answers alone for the plain JPEGs a scan mostly meets, since that is its point."""

from __future__ import annotations

import random
import struct

import pytest
from PIL import Image

from scanner.decoding import routing
from scanner.decoding.decode import DEFAULT_MAX_PIXELS, DecodeError
from scanner.decoding.routing import jpeg_well_formed, route, route_pillow, walk_header
from tests.corpus import FILES, encode, photo

BUDGET = DEFAULT_MAX_PIXELS
# Pillow warns about the damaged EXIF these tests make on purpose (both paths parse it with Pillow).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def outcome(fn, data: bytes, max_pixels: int = BUDGET, downscale: bool = False, progressive: bool = True):
    try:
        return "routed", fn(data, max_pixels, downscale, progressive)
    except DecodeError as exc:
        return "refused", exc.kind, str(exc)
    except ValueError as exc:
        return "ValueError", str(exc)


def fast_answers(data: bytes, max_pixels: int = BUDGET) -> bool:
    return routing._route_fast(data, max_pixels) is not routing._ASK_PILLOW


def assert_same(data: bytes, max_pixels: int = BUDGET, downscale: bool = False) -> None:
    """Same answer with progressive JPEGs routed (DALI) and left to the CPU decoder (nvjpeg)."""
    for progressive in (True, False):
        assert (outcome(route, data, max_pixels, downscale, progressive)
                == outcome(route_pillow, data, max_pixels, downscale, progressive)), progressive


# -- building JPEGs --------------------------------------------------------------------------------------


def jpeg(w: int = 64, h: int = 48, **kw) -> bytes:
    return encode(photo(w, h), "JPEG", quality=kw.pop("quality", 90), **kw)


def with_segments(data: bytes, segments: list[tuple[int, bytes]]) -> bytes:
    """`data` with marker segments (marker, payload) inserted right after its SOI."""
    extra = b"".join(b"\xff" + bytes([m]) + struct.pack(">H", len(p) + 2) + p for m, p in segments)
    return data[:2] + extra + data[2:]


def tiff(entries: list[tuple[int, int, int, bytes]], little: bool = True) -> bytes:
    """A TIFF header and one IFD of (tag, type, count, value bytes); values over 4 bytes go after it."""
    e = "<" if little else ">"
    head = (b"II*\x00" if little else b"MM\x00*") + struct.pack(e + "I", 8)
    ifd_end = 8 + 2 + 12 * len(entries) + 4
    body, extra = struct.pack(e + "H", len(entries)), b""
    for tag, typ, count, value in entries:
        if len(value) <= 4:
            field = value.ljust(4, b"\x00")
        else:
            field = struct.pack(e + "I", ifd_end + len(extra))
            extra += value
        body += struct.pack(e + "HHI", tag, typ, count) + field
    return head + body + struct.pack(e + "I", 0) + extra


def exif_segment(entries, little: bool = True) -> tuple[int, bytes]:
    return 0xE1, b"Exif\x00\x00" + tiff(entries, little)


def short(v: int, little: bool = True) -> bytes:
    return struct.pack("<H" if little else ">H", v)


def rational(n: int, d: int, little: bool = True) -> bytes:
    return struct.pack("<II" if little else ">II", n, d)


def pillow_exif_jpeg(orientation: int | None = None, dpi: bool = False) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    if dpi:
        exif[0x0128] = 2
        exif[0x011A] = 300.0
        exif[0x011B] = 300.0
    return jpeg(exif=exif.tobytes())


KINDS = {
    "baseline": lambda: jpeg(),
    "grey": lambda: encode(photo(64, 48).convert("L"), "JPEG"),
    "progressive": lambda: jpeg(progressive=True),
    "4:4:4": lambda: jpeg(subsampling=0),
    "optimized": lambda: jpeg(optimize=True),
    "16-bit tables": lambda: jpeg(qtables=[[300] * 64, [2] * 64]),
    "cmyk": lambda: encode(photo(64, 48).convert("CMYK"), "JPEG"),  # Adobe APP14: the CPU decoder's
    "icc": lambda: jpeg(icc_profile=b"\x00" * 300),
    "comment": lambda: jpeg(comment=b"made here"),
    "jfif dpi": lambda: jpeg(dpi=(300, 300)),
    "restart markers": lambda: jpeg(w=128, h=96, restart_marker_blocks=2),
    "exif empty": lambda: pillow_exif_jpeg(),
    "exif orientation 1": lambda: pillow_exif_jpeg(1),
    "exif dpi": lambda: pillow_exif_jpeg(1, dpi=True),
    **{f"exif orientation {o}": (lambda o=o: pillow_exif_jpeg(o)) for o in range(2, 9)},
    "xmp orientation": lambda: jpeg(xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'),
    "mpo": lambda: encode(photo(64, 48), "MPO", save_all=True, append_images=[photo(64, 48, seed=1)]),
    "png": lambda: encode(photo(16, 16), "PNG"),
    "truncated": lambda: jpeg()[:-200],
    "no EOI": lambda: jpeg()[:-2],
    "trailing bytes": lambda: jpeg() + b"trailer",
    "one pixel": lambda: jpeg(1, 1),
}
PLAIN = ["baseline", "grey", "progressive", "4:4:4", "optimized", "16-bit tables", "icc", "comment", "jfif dpi",
         "restart markers", "exif empty", "exif orientation 1", "exif dpi", "trailing bytes", "one pixel"]


@pytest.mark.parametrize("kind", KINDS)
def test_route_equals_the_pillow_reference_for_every_kind_of_jpeg(kind):
    data = KINDS[kind]()
    assert_same(data)
    assert_same(data, max_pixels=1000)  # over budget: refused
    assert_same(data, max_pixels=1000, downscale=True)  # over budget, downscaled by the CPU decoder
    assert_same(data, max_pixels=0)  # a bad budget raises as before


@pytest.mark.parametrize("kind", PLAIN)
def test_the_fast_path_answers_alone_for_plain_jpegs(kind, monkeypatch):
    data = KINDS[kind]()
    expected = route_pillow(data, BUDGET)
    assert expected is not None  # the reference routes it: the GPU takes it
    monkeypatch.setattr(routing, "route_pillow", lambda *a: pytest.fail("asked Pillow"))
    assert route(data, BUDGET) == expected


def test_progressive_jpegs_can_be_left_to_the_cpu_decoder(monkeypatch):
    """progressive=False (the nvjpeg loader) leaves SOF2 files to the CPU decoder, decided by the walk alone;
    the other plain kinds are routed as before."""
    monkeypatch.setattr(routing, "route_pillow", lambda *a: pytest.fail("asked Pillow"))
    assert route(KINDS["progressive"](), BUDGET) == (64, 48)
    assert route(KINDS["progressive"](), BUDGET, progressive=False) is None
    assert walk_header(KINDS["progressive"]()).progressive and not walk_header(KINDS["baseline"]()).progressive
    for kind in PLAIN:
        if kind != "progressive":
            assert route(KINDS[kind](), BUDGET, progressive=False) == route(KINDS[kind](), BUDGET), kind


def test_rotated_and_unusual_files_stay_on_the_cpu_decoder():
    for kind in [f"exif orientation {o}" for o in range(2, 9)] + ["xmp orientation", "mpo", "cmyk", "png",
                                                                   "truncated", "no EOI"]:
        assert route(KINDS[kind](), BUDGET) is None, kind


def test_the_corpus_routes_as_the_reference_does():
    for rel, (make, _) in FILES.items():
        data = make()
        for progressive in (True, False):
            assert outcome(route, data, progressive=progressive) == outcome(route_pillow, data,
                                                                            progressive=progressive), rel


def test_pillows_own_size_guard_stays_pillows(monkeypatch):
    data = jpeg(64, 48)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3072 pixels: past twice the limit, an error
    assert not fast_answers(data)
    assert_same(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert fast_answers(data)
    assert_same(data)


def _set_frame_size(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    sof = next(start for marker, start, _ in walk_header(data).segments if marker in (0xC0, 0xC1, 0xC2))
    out[sof + 1 : sof + 5] = struct.pack(">HH", height, width)
    return bytes(out)


ODD_SEGMENTS = {
    **{f"JFIF of {n} bytes": [(0xE0, b"JFIF\x00\x01\x02"[:n])] for n in range(4, 8)},
    **{f"Adobe of {n} bytes": [(0xEE, b"Adobe\x00\x64"[:n])] for n in range(5, 8)},
    **{f"ICC of {n} bytes": [(0xE2, b"ICC_PROFILE\x00\x01\x01"[:n])] for n in (12, 13, 14)},
    "ICC fragments counted wrong": [(0xE2, b"ICC_PROFILE\x00\x01\x02abc")],
    "Photoshop resources": [(0xED, b"Photoshop 3.0\x00" + b"8BIM\x03\xed\x00\x00" + b"\x00\x00\x00\x02")],
    "Photoshop resource cut after its code": [(0xED, b"Photoshop 3.0\x00" + b"8BIM\x03\xed")],
    "MPF naming two images": [(0xE2, b"MPF\x00" + tiff([
        (0xB000, 7, 4, b"0100"), (0xB001, 4, 1, struct.pack("<I", 2)),
        (0xB002, 7, 32, struct.pack("<IIIHH", 0x20030000, 100, 0, 0, 0) + struct.pack("<IIIHH", 0, 100, 50, 0, 0))]))],
    "two EXIF, orientation 6 first": [exif_segment([(0x0112, 3, 1, short(6))]),
                                      exif_segment([(0x0112, 3, 1, short(1))])],
    "two EXIF, orientation 1 first": [exif_segment([(0x0112, 3, 1, short(1))]),
                                      exif_segment([(0x0112, 3, 1, short(6))])],
    "EXIF prefix alone": [(0xE1, b"Exif\x00\x00")],
    "EXIF, big-endian TIFF": [exif_segment([(0x0112, 3, 1, short(1, False))], little=False)],
    "EXIF, not TIFF": [(0xE1, b"Exif\x00\x00JUNKJUNK")],
    "XMP without orientation": [(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>")],
    "APP1, other": [(0xE1, b"something else")],
    "APP15, empty": [(0xEF, b"")],
    "DNL": [(0xDC, b"\x00\x30")],
    "DHP": [(0xDE, b"\x08\x00\x30\x00\x40\x01\x01\x11\x00")],
    "DHP of 12 bits": [(0xDE, b"\x0c\x00\x30\x00\x40\x01\x01\x11\x00")],  # Pillow parses it as a frame
    "JPG0 holding a marker": [(0xF0, b"\xff\x02")],  # Pillow walks into it byte by byte
    "EXP": [(0xDF, b"\x11")],
    "JPG0": [(0xF0, b"ab")],
    "DAC": [(0xCC, b"\x00\x10")],
    "DRI": [(0xDD, b"\x00\x04")],
}


@pytest.mark.parametrize("name", ODD_SEGMENTS)
def test_segments_that_pillow_parses_its_own_way_route_as_the_reference_does(name):
    assert_same(with_segments(jpeg(), ODD_SEGMENTS[name]))


@pytest.mark.parametrize("between", [b"\xff\xff", b"\xff\x00", b"junk", b"\x00", b"\xff\xff\xff"])
def test_bytes_between_segments_route_as_the_reference_does(between):
    data = jpeg()
    after_app0 = walk_header(data).segments[0][2]
    assert_same(data[:after_app0] + between + data[after_app0:])


@pytest.mark.parametrize("size", [(0, 48), (64, 0), (0, 0), (65535, 65535)])
def test_frame_sizes_pillow_refuses_route_as_the_reference_does(size):
    assert_same(_set_frame_size(jpeg(), *size))


# -- EXIF --------------------------------------------------------------------------------------------------


def test_exif_orientation_read_by_the_fast_path(monkeypatch):
    for little in (True, False):
        for o in range(1, 9):
            data = with_segments(jpeg(), [exif_segment([(0x0112, 3, 1, short(o, little))], little)])
            assert fast_answers(data)
            assert route(data, BUDGET) == ((64, 48) if o == 1 else None)
            assert_same(data)


@pytest.mark.parametrize("seed", range(4))
def test_random_exif_directories_route_as_the_reference_does(seed):
    """IFD0s of the tags the route reads (orientation; the unit and resolution that Pillow's DPI read takes)
    and a few others, of random types, counts and values, sometimes cut short or pointing outside."""
    rng = random.Random(seed)
    answered = 0
    for _ in range(400):
        little = rng.random() < 0.5
        entries = []
        for _ in range(rng.randint(0, 5)):
            tag = rng.choice([0x0112, 0x0112, 0x0128, 0x011A, 0x011B, 0x8769, 0x010F, rng.randrange(65536)])
            typ = rng.choice([1, 2, 3, 3, 4, 5, 5, 7, 9, 10, 11, 12, 13, 16, 0, 99])
            count = rng.choice([0, 1, 1, 1, 2, 3, rng.randrange(1 << 32)])
            value = bytes(rng.randrange(256) for _ in range(rng.choice([2, 4, 8, 16])))
            if rng.random() < 0.5 and typ == 3 and count == 1:
                value = short(rng.randint(0, 9), little)
            if rng.random() < 0.3 and typ in (5, 10) and count == 1:
                value = rational(rng.randrange(1000), rng.choice([0, 1, 72]), little)
            entries.append((tag, typ, count, value))
        payload = b"Exif\x00\x00" + tiff(entries, little)
        cut = rng.random()
        if cut < 0.15:
            payload = payload[: rng.randrange(len(payload) + 1)]
        elif cut < 0.25:
            payload = b"Exif\x00\x00" + payload  # a doubled prefix
        segments = [(0xE1, payload)]
        if rng.random() < 0.3:
            segments.insert(0, (0xE0, b"JFIF\x00\x01\x01\x01\x01,\x01,\x00\x00"))  # with DPI
        data = with_segments(jpeg(), segments)
        answered += fast_answers(data)
        assert_same(data)
    assert answered > 100  # the fast path decided most of them itself


# -- damaged headers ------------------------------------------------------------------------------------


def _mutants(base: bytes, rng: random.Random, n: int):
    header_end = walk_header(base).scan_start
    for _ in range(n):
        data = bytearray(base)
        what = rng.random()
        if what < 0.5:  # a few bytes of the header changed
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(2, header_end)] = rng.choice([0x00, 0xFF, 0x01, 0xD8, 0xDA, 0xC2, 0xC3, 0xE1,
                                                                 rng.randrange(256)])
        elif what < 0.7:  # bytes inserted into or cut from the header
            at = rng.randrange(2, header_end)
            if rng.random() < 0.5:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            else:
                del data[at : at + rng.randint(1, 4)]
        elif what < 0.85:  # cut anywhere
            del data[rng.randrange(len(data)) :]
        else:  # a byte of the entropy-coded data changed
            data[rng.randrange(header_end, len(data))] = rng.randrange(256)
        yield bytes(data)


@pytest.mark.parametrize("kind", ["baseline", "progressive", "exif dpi", "icc", "jfif dpi", "grey"])
def test_randomly_damaged_headers_route_as_the_reference_does(kind):
    rng = random.Random(kind)
    answered = 0
    for data in _mutants(KINDS[kind](), rng, 500):
        answered += fast_answers(data)
        assert_same(data)
    assert answered > 50


def test_structure_check_rejects_illegal_markers_in_the_scan():
    good = jpeg(80, 60)
    assert jpeg_well_formed(good) and jpeg_well_formed(good + b"trailing bytes after EOI")
    damaged = bytearray(good)
    damaged[len(good) // 2 : len(good) // 2 + 4] = b"\xff\x02\xff\x03"  # reserved markers: libjpeg stops
    assert not jpeg_well_formed(bytes(damaged))
    assert route(bytes(damaged), BUDGET) is None
    assert not jpeg_well_formed(good[: len(good) // 2])
    assert not jpeg_well_formed(b"\xff\xd8\xff")
