"""bench/dali_bundle.py's pruning of CUDA fat binaries: each fat binary that has the kept architecture's
machine code is rewritten to hold only that code, in place, and nothing else in the file changes."""

from __future__ import annotations

import importlib.util
import json
import random
import struct
import sys
import tarfile
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


def shape(data, start: int, end: int) -> list:
    """(offset, [(kind, arch, payload bytes)]) per fat binary."""
    return [(blob, [(k, a, bytes(data[p : p + n])) for k, a, _, p, n in entries])
            for blob, entries in dali_bundle.fatbin_entries(data, start, end)]


def test_only_the_kept_architectures_code_survives_in_place():
    a75, a90, a90b, ptx, a80 = b"\x75" * 40, b"\x90" * 24, b"\x9a" * 8, b"ptx text" * 3, b"\x80" * 16
    with_90 = fatbin(entry(ELF, 75, a75), entry(ELF, 90, a90), entry(PTX, 120, ptx), entry(ELF, 90, a90b))
    without_90 = fatbin(entry(ELF, 80, a80), entry(PTX, 80, ptx))
    region = with_90 + bytes(8) + without_90  # fat binaries padded apart, as in a library
    data = bytearray(b"before" + region + b"after")
    start, end = 6, 6 + len(region)

    zeroed = dali_bundle.keep_arch_in(data, start, end, 90)

    assert zeroed == 2 * 64 + len(a75) + len(ptx)  # two entries, headers and payloads
    assert len(data) == 6 + len(region) + 5 and data[:6] == b"before" and data[end:] == b"after"
    second = start + len(with_90) + 8
    assert shape(data, start, end) == [(start, [(ELF, 90, a90), (ELF, 90, a90b)]),
                                       (second, [(ELF, 80, a80), (PTX, 80, ptx)])]
    assert data[start : start + 16 + 2 * 64 + len(a90) + len(a90b)] == fatbin(entry(ELF, 90, a90), entry(ELF, 90, a90b))
    assert not any(data[start + len(with_90) - zeroed : second])  # the freed space is zero
    assert data[second:end] == without_90  # no sm_90 code there: left whole


def test_a_region_that_is_not_fat_binaries_is_refused():
    with pytest.raises(ValueError, match="no fat binary header"):
        list(dali_bundle.fatbin_entries(b"\x01" * 32, 0, 32))
    broken = bytearray(fatbin(entry(ELF, 90, b"x" * 8)))
    struct.pack_into("<Q", broken, 8, 200)  # the fat binary claims more than its entries hold
    with pytest.raises(ValueError, match="does not fit"):
        list(dali_bundle.fatbin_entries(bytes(broken) + bytes(300), 0, len(broken) + 300))
    with pytest.raises(ValueError, match="runs past its section"):
        list(dali_bundle.fatbin_entries(bytes(broken), 0, len(broken)))


def _installed_libdali() -> Path:
    spec = importlib.util.find_spec("nvidia.dali") if importlib.util.find_spec("nvidia") else None
    if spec is None:
        pytest.skip("NVIDIA DALI is not installed (pip install 'glff-scanner[dali]')")
    return Path(next(iter(spec.submodule_search_locations))) / "libdali.so"


def test_pruning_a_real_dali_library():
    """libdali.so as installed: each fat binary with sm_90 code keeps exactly that code, byte for byte, at
    its offset; outside the fat binaries nothing changes."""
    original = _installed_libdali().read_bytes()
    sections = dali_bundle.elf_sections(original)
    extents = [(sections[n][0], sum(sections[n])) for n in dali_bundle.FATBIN_SECTIONS if n in sections]
    before = [blob for start, end in extents for blob in shape(original, start, end)]
    assert len(before) > 1

    data = bytearray(original)
    zeroed = dali_bundle.keep_one_arch(data, 90)

    after = [blob for start, end in extents for blob in shape(data, start, end)]
    kept = [(blob, [e for e in entries if e[:2] == (ELF, 90)] or entries) for blob, entries in before]
    assert after == kept and zeroed > 0
    gaps = [0] + [x for extent in extents for x in extent] + [len(original)]
    assert len(data) == len(original)
    assert all(data[s:e] == original[s:e] for s, e in zip(gaps[::2], gaps[1::2]))  # outside the fat binaries


def test_cuobjdump_reads_the_same_code_from_the_pruned_library(tmp_path):
    """NVIDIA's own reading of the result: cuobjdump lists only sm_90 machine code in the pruned
    libdali.so and extracts the same cubins as from the original; one changed byte of that code and the
    comparison fails."""
    cuobjdump = dali_bundle.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (neither on the PATH nor shipped with Triton)")
    original, pruned = tmp_path / "original.so", tmp_path / "libdali.so"
    original.write_bytes(_installed_libdali().read_bytes())
    data = bytearray(original.read_bytes())
    dali_bundle.keep_one_arch(data, 90)
    pruned.write_bytes(data)
    assert dali_bundle.same_code_for(cuobjdump, original, pruned, 90, tmp_path / "first")

    offset, size = dali_bundle.elf_sections(data)[".nv_fatbin"]
    _, entries = next(dali_bundle.fatbin_entries(data, offset, offset + size))
    data[entries[0][3] + 200] ^= 0xFF
    pruned.write_bytes(data)
    assert not dali_bundle.same_code_for(cuobjdump, original, pruned, 90, tmp_path / "second")


# -- the parts: split here, joined and unpacked on the GPU machine ----------------------------------------


def _bundle(tmp_path: Path) -> Path:
    """A small tar.xz of a site folder, incompressible enough to need several 4 KiB parts."""
    site = tmp_path / "site"
    (site / "nvidia" / "dali").mkdir(parents=True)
    (site / "nvidia" / "dali" / "__init__.py").write_text("__version__ = 'test'\n")
    (site / "nvidia" / "dali" / "libdali.so").write_bytes(random.Random(0).randbytes(10_000))
    bundle = tmp_path / "dali-test.tar.xz"
    with tarfile.open(bundle, "w:xz") as tar:
        tar.add(site / "nvidia", arcname="nvidia")
    return bundle


def _split(tmp_path: Path) -> Path:
    out = tmp_path / "parts"
    out.mkdir()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return dali_bundle.split(_bundle(tmp_path), out, 4096, python=python)


def test_parts_join_and_unpack_to_the_bundled_files(tmp_path):
    manifest_path = _split(tmp_path)
    manifest = json.loads(manifest_path.read_text())
    assert len(manifest["parts"]) == 3 and all(p["bytes"] <= 4096 for p in manifest["parts"])
    dest = tmp_path / "dali_site"
    (dest / "stale").mkdir(parents=True)  # left by an earlier unpacking: emptied first
    dali_bundle.unpack(manifest_path, dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "nvidia/dali/__init__.py", "nvidia/dali/libdali.so"]
    assert (dest / "nvidia/dali/libdali.so").read_bytes() == (tmp_path / "site/nvidia/dali/libdali.so").read_bytes()


def test_a_missing_or_damaged_part_or_another_python_is_refused_by_name(tmp_path):
    manifest_path = _split(tmp_path)
    part = manifest_path.parent / json.loads(manifest_path.read_text())["parts"][1]["name"]
    good = part.read_bytes()
    part.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(SystemExit, match=part.name + ": sha256 differs"):
        dali_bundle.unpack(manifest_path, tmp_path / "dest")
    part.unlink()
    with pytest.raises(SystemExit, match=part.name + ": missing"):
        dali_bundle.unpack(manifest_path, tmp_path / "dest")
    part.write_bytes(good)
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "sha256": "0" * 64}))
    with pytest.raises(SystemExit, match="joined bundle's sha256 differs"):
        dali_bundle.unpack(manifest_path, tmp_path / "dest")
    manifest_path.write_text(json.dumps({**manifest, "python": "2.7"}))
    with pytest.raises(SystemExit, match="the bundle is for Python 2.7"):
        dali_bundle.unpack(manifest_path, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()  # nothing unpacked from a bundle that does not check out
