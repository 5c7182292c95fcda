"""bench/dali_bundle.py's pruning of CUDA fat binaries: only the kept architecture's machine code survives,
and nothing else in the file moves or changes."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("dali_bundle", Path(__file__).parents[1] / "bench" / "dali_bundle.py")
dali_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dali_bundle)

PTX, ELF = 1, dali_bundle.ELF_ENTRY


def entry(kind: int, arch: int, payload: bytes) -> bytes:
    """A fat binary entry: a 64-byte header (kind, version, header size, payload size, ..., arch at 28)."""
    header = bytearray(64)
    struct.pack_into("<HHIQ", header, 0, kind, 0x101, 64, len(payload))
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload


def fatbin(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", dali_bundle.FATBIN_MAGIC, 1, 16, len(body)) + body


def test_only_the_kept_architectures_code_survives():
    a75, a90, ptx, a80 = b"\x75" * 40, b"\x90" * 24, b"ptx text" * 3, b"\x80" * 16
    with_90 = fatbin(entry(ELF, 75, a75), entry(ELF, 90, a90), entry(PTX, 120, ptx))
    without_90 = fatbin(entry(ELF, 80, a80), entry(PTX, 80, ptx))
    region = with_90 + bytes(8) + without_90  # fat binaries padded apart, as in a library
    data = bytearray(b"before" + region + b"after")
    start, end = 6, 6 + len(region)

    zeroed = dali_bundle.keep_arch_in(data, start, end, 90)

    assert zeroed == len(a75) + len(ptx)
    assert len(data) == 6 + len(region) + 5 and data[:6] == b"before" and data[end:] == b"after"
    got = list(dali_bundle.fatbin_entries(data, start, end))
    assert [[(k, a, n) for k, a, _, n in blob] for blob in got] == [
        [(ELF, 75, len(a75)), (ELF, 90, len(a90)), (PTX, 120, len(ptx))], [(ELF, 80, len(a80)), (PTX, 80, len(ptx))]]
    (_, _, at75, _), (_, _, at90, _), (_, _, at_ptx, _) = got[0]
    assert data[at75 : at75 + len(a75)] == bytes(len(a75)) and data[at_ptx : at_ptx + len(ptx)] == bytes(len(ptx))
    assert data[at90 : at90 + len(a90)] == a90
    assert data[start + len(with_90) + 8 : end] == without_90  # no sm_90 code there: left whole


def test_a_region_that_is_not_fat_binaries_is_refused():
    with pytest.raises(ValueError, match="no fat binary header"):
        list(dali_bundle.fatbin_entries(b"\x01" * 32, 0, 32))
    broken = bytearray(fatbin(entry(ELF, 90, b"x" * 8)))
    struct.pack_into("<Q", broken, 8, 200)  # the fat binary claims more than its entries hold
    with pytest.raises(ValueError, match="does not fit"):
        list(dali_bundle.fatbin_entries(bytes(broken) + bytes(300), 0, len(broken) + 300))
    with pytest.raises(ValueError, match="runs past its section"):
        list(dali_bundle.fatbin_entries(bytes(broken), 0, len(broken)))


def test_pruning_a_real_dali_library():
    """libdali.so as installed: the sm_90 machine code byte for byte, the rest of the file unchanged
    except the other entries' payloads, now zero."""
    spec = importlib.util.find_spec("nvidia.dali") if importlib.util.find_spec("nvidia") else None
    if spec is None:
        pytest.skip("NVIDIA DALI is not installed (pip install 'glff-scanner[dali]')")
    original = (Path(next(iter(spec.submodule_search_locations))) / "libdali.so").read_bytes()
    sections = dali_bundle.elf_sections(original)
    blobs = [blob for name in dali_bundle.FATBIN_SECTIONS if name in sections
             for blob in dali_bundle.fatbin_entries(original, sections[name][0], sum(sections[name]))]
    assert len(blobs) > 1

    data = bytearray(original)
    zeroed = dali_bundle.keep_one_arch(data, 90)

    expected, cleared = bytearray(original), 0
    for blob in blobs:
        if any((k, a) == (ELF, 90) for k, a, _, _ in blob):
            for k, a, at, n in blob:
                if (k, a) != (ELF, 90):
                    expected[at : at + n] = bytes(n)
                    cleared += n
    assert zeroed == cleared > 0 and data == expected
