"""NVIDIA DALI for a lent GPU machine, in parts small enough to carry (issue 23, "DALI").

The GPU machines have no package index, and a device call carries 64 MiB with the working tree, of
which the tree takes about 49 MiB (the shipped weights). DALI's wheels are 224 MB (DALI 199, nvImageCodec
25), about 500 MB installed, so this builds a bundle for one Python and one GPU architecture:

    .venv/bin/python bench/dali_bundle.py        (Python 3.12, Hopper sm_90: the H100 and H200 machines)

(the project's environment: the Triton that torch brings has the cuobjdump that checks the pruning)

1. downloads the wheels (pinned below; pip's registry, reachable from the build machine only);
2. installs them into a folder (`pip install --target`, for the target Python and platform);
3. slims it: drops the extension modules of other Pythons, C headers and tools; strips the shared
   libraries' symbol tables (`strip --strip-unneeded`: .symtab and .strtab, not the dynamic symbols);
   and rewrites every CUDA fat binary that holds machine code for the target architecture to hold only
   that code: the fat binary a build for that architecture alone makes, in the same place (the space
   it no longer needs is zeroed), so that no offset in the file moves. That is what makes the bundle
   small: about 100 MB of code for six architectures barely compresses. Where NVIDIA's cuobjdump is
   found (Triton ships one), every pruned library is checked with it: only that architecture's code
   listed, and the same code extracted as from the library before;
4. packs it as tar.xz and splits it into parts under --out (default .dali/, ignored by git), with a
   manifest (sha256 of the whole and of each part). A part is what a call can carry beside the working
   tree: 64 MiB less the tree (git's tracked and untracked files) less 1 MiB, in whole MiB, unless
   --part-mib says.

For Python 3.12 and sm_90: about 56 MB, in 4 parts of 14 MiB (the tree takes about 49 MiB). On the GPU
machine, back to back while it stays warm: one call per part, `carry: [".dali/dali-<tag>.tar.xz.part-NN"]`
(earlier parts stay there: ignored files survive between calls; the manifest travels with the first),
and with the last part `STEPS=dali bash bench/gpu_checks.sh`, which checks the sha256 and unpacks into
/tmp/dali_site (this script's `--unpack MANIFEST`), then runs DALI's GPU tests and the scan with
--loader dali beside --loader nvjpeg (docs/benchmarks.md says how a GPU session fits this in). A bundle
built with `--python 3.11` runs here on the CPU (DALI's CPU mode), a check of the bundle itself.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.carry import carry_room_bytes  # noqa: E402

# DALI's requirements that the GPU machines' image lacks (it has numpy, packaging, pyyaml and
# typing-extensions; six too, bundled anyway for the check of a bundle here in a bare venv), at the
# versions the build machine's tests run. nvJPEG from CUDA 13.0, the CUDA of the machines' torch; nvcomp,
# nvJPEG2000 and nvTIFF are left out (DALI loads them on demand, for other formats).
PACKAGES = ["nvidia-dali-cuda130==2.4.0", "nvidia-nvimgcodec-cu13==0.9.0.20", "nvidia-nvjpeg==13.0.4.44",
            "astunparse==1.6.3", "gast==0.7.0", "optree==0.20.0", "nvtx==0.2.17", "makefun==1.16.0",
            "libcst==1.9.0", "six==1.17.0"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
DROPPED = ["bin", "nvidia/dali/include", "nvidia/nvimgcodec/include", "nvidia/cu13/include", "nvidia/nvimgcodec/tools",
           # the JPEG 2000 and TIFF codecs, whose libraries are not bundled (each logs an error when loaded)
           "nvidia/nvimgcodec/extensions/libnvjpeg2k_ext.so.0", "nvidia/nvimgcodec/extensions/libnvtiff_ext.so.0"]

FATBIN_MAGIC = 0xBA55ED50
FATBIN_SECTIONS = (".nv_fatbin", "__nv_relfatbin")
ELF_ENTRY = 2  # fat binary entry kinds: 1 PTX, 2 machine code (ELF)


# -- CUDA fat binaries ------------------------------------------------------------------------------------


def elf_sections(data: bytes) -> dict[str, tuple[int, int]]:
    """{section name: (file offset, size)} of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    sections = {}
    for name_offset, _type, _flags, _addr, offset, size in headers:
        start = names_at + name_offset
        sections[bytes(data[start : data.index(b"\0", start)]).decode()] = (offset, size)
    return sections


def fatbin_entries(data: bytes, start: int, end: int):
    """Each fat binary in data[start:end] as (its offset, its entries), an entry being (kind, arch, entry
    offset, payload offset, payload size). Between fat binaries there may be zero padding; anything else
    is an error."""
    pos = start
    while pos + 16 <= end:
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            if any(data[pos : pos + 8]):
                raise ValueError(f"no fat binary header at offset {pos:#x}")
            pos += 8
            continue
        entry, blob_end, entries = pos + header_size, pos + header_size + fat_size, []
        if blob_end > end:
            raise ValueError(f"fat binary at {pos:#x} runs past its section")
        while entry < blob_end:
            kind, _version, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            if entry_header < 32 or entry + entry_header + payload > blob_end:
                raise ValueError(f"fat binary at {pos:#x}: its entry at {entry:#x} does not fit in it")
            arch, = struct.unpack_from("<I", data, entry + 28)
            entries.append((kind, arch, entry, entry + entry_header, payload))
            entry += entry_header + payload
        yield pos, entries
        pos = blob_end


def keep_arch_in(data: bytearray, start: int, end: int, arch: int) -> int:
    """Rewrite, in place, each fat binary in data[start:end] that has sm_<arch> machine code to hold only
    that code: those entries moved up behind the header, whose size drops to theirs, and the rest of the
    old extent zeroed. That is the fat binary a build for sm_<arch> alone makes, at the same offset, so
    the pointers to it stay valid. Fat binaries without such code stay whole. Returns the bytes zeroed."""
    zeroed = 0
    for blob, entries in list(fatbin_entries(data, start, end)):
        kept = [bytes(data[at : payload + n]) for kind, a, at, payload, n in entries if (kind, a) == (ELF_ENTRY, arch)]
        if not kept:
            continue
        header_size, = struct.unpack_from("<H", data, blob + 6)
        old_size, = struct.unpack_from("<Q", data, blob + 8)
        body, new = blob + header_size, b"".join(kept)
        data[body : body + old_size] = new + bytes(old_size - len(new))
        struct.pack_into("<Q", data, blob + 8, len(new))
        zeroed += old_size - len(new)
    return zeroed


def keep_one_arch(data: bytearray, arch: int) -> int:
    """keep_arch_in over the fat binary sections of an ELF file (a shared library)."""
    sections = elf_sections(data)
    return sum(keep_arch_in(data, sections[name][0], sum(sections[name]), arch)
               for name in FATBIN_SECTIONS if name in sections)


def find_cuobjdump() -> str | None:
    """NVIDIA's cuobjdump: on the PATH, or the one Triton (a dependency of torch on Linux) ships."""
    found = shutil.which("cuobjdump")
    spec = None if found else importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "backends" / "nvidia" / "bin" / "cuobjdump"
        found = str(bundled) if bundled.is_file() else None
    return found


def cubins(cuobjdump: str, library: Path, folder: Path, arch: int) -> list[bytes]:
    """The sm_<arch> machine code that cuobjdump extracts from `library`, in the order of its entries
    (raises CalledProcessError where cuobjdump cannot read the file)."""
    folder.mkdir(parents=True)
    subprocess.run([cuobjdump, "-xelf", "all", str(library.resolve())], cwd=folder, capture_output=True, check=True)
    files = sorted(folder.glob(f"*.sm_{arch}.cubin"), key=lambda p: int(p.name.split(".")[-3]))
    return [p.read_bytes() for p in files]


def same_code_for(cuobjdump: str, original: Path, pruned: Path, arch: int, work: Path) -> bool:
    """cuobjdump reads the pruned library, finds only sm_<arch> machine code in it, and the same as in the
    original."""
    try:
        listed = subprocess.run([cuobjdump, "-lelf", str(pruned)], capture_output=True, text=True, check=True).stdout
        ours = cubins(cuobjdump, pruned, work / "pruned", arch)
    except subprocess.CalledProcessError:  # e.g. "Uncompress failed": a fat binary it cannot read
        return False
    archs = {line.rsplit(".", 2)[-2] for line in listed.splitlines() if line.startswith("ELF file")}
    return archs == {f"sm_{arch}"} and bool(ours) and ours == cubins(cuobjdump, original, work / "original", arch)


# -- the bundle -------------------------------------------------------------------------------------------


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def target_flags(python: str) -> list[str]:
    flags = ["--python-version", python, "--implementation", "cp", "--only-binary=:all:"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def slim(stage: Path, python: str, arch: int) -> dict:
    tag = "cpython-" + python.replace(".", "") + "-"
    dropped = 0
    for path in list(stage.rglob("*.cpython-3*")):
        if tag not in path.name:
            dropped += path.stat().st_size
            path.unlink()
    for rel in DROPPED:
        for path in stage.glob(rel + "*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for cache in list(stage.rglob("__pycache__")):
        shutil.rmtree(cache)
    libraries = [p for p in stage.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    strip = shutil.which("strip")
    for lib in libraries:
        if strip:
            subprocess.run([strip, "--strip-unneeded", str(lib)], check=True)
    zeroed, checked, cuobjdump = 0, [], find_cuobjdump()
    for lib in libraries:
        data = bytearray(lib.read_bytes())
        if data[:4] != b"\x7fELF":
            continue
        n = keep_one_arch(data, arch)
        if not n:
            continue
        zeroed += n
        if cuobjdump:  # NVIDIA's own reading of the result, against the library as it was
            with tempfile.TemporaryDirectory() as tmp:
                original = Path(tmp) / lib.name
                shutil.copyfile(lib, original)
                lib.write_bytes(data)
                if not same_code_for(cuobjdump, original, lib, arch, Path(tmp)):
                    raise SystemExit(f"{lib}: cuobjdump does not find the same sm_{arch} code after pruning")
            checked.append(lib.name)
        else:
            lib.write_bytes(data)
    return {"other_pythons_bytes": dropped, "stripped": bool(strip), "fatbin_bytes_zeroed": zeroed,
            "checked_by_cuobjdump": checked}


def split(bundle: Path, out: Path, part_bytes: int, **about) -> Path:
    """Writes `bundle` as parts of `part_bytes` into `out`, with a manifest beside them (the sha256 of each
    part and of the whole, and `about`: at least the bundle's "python"); returns the manifest's path."""
    parts, whole = [], hashlib.sha256()
    with open(bundle, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(part_bytes), b"")):
            part = out / f"{bundle.name}.part-{i:02d}"
            part.write_bytes(block)
            parts.append({"name": part.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
            whole.update(block)
    manifest = {"bundle": bundle.name, "bytes": bundle.stat().st_size, "sha256": whole.hexdigest(), **about,
                "parts": parts}
    path = out / (bundle.name.removesuffix(".tar.xz") + ".json")
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def unpack(manifest_path: Path, dest: Path) -> dict:
    """On the GPU machine: checks the parts beside `manifest_path` against it (each part's sha256, then
    the whole's), joins them and unpacks the bundle into `dest` (emptied first). Exits naming what is
    wrong: a bundle for another Python, a missing or damaged part."""
    manifest = json.loads(manifest_path.read_text())
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != python:
        raise SystemExit(f"the bundle is for Python {manifest['python']}, this is {python}")
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        joined = Path(tmp) / manifest["bundle"]
        with open(joined, "wb") as whole:
            for part in manifest["parts"]:
                path = manifest_path.parent / part["name"]
                if not path.is_file():
                    raise SystemExit(f"{part['name']}: missing (carry each part in its own call)")
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() != part["sha256"]:
                    raise SystemExit(f"{part['name']}: sha256 differs")
                whole.write(data)
                digest.update(data)
        if digest.hexdigest() != manifest["sha256"]:
            raise SystemExit("the joined bundle's sha256 differs")
        shutil.rmtree(dest, ignore_errors=True)
        with tarfile.open(joined) as tar:
            tar.extractall(dest, filter="data")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--arch", type=int, default=90, help="GPU architecture kept, e.g. 90 (default: Hopper)")
    parser.add_argument("--out", default=".dali", help="folder for the parts and manifest (default .dali/)")
    parser.add_argument("--work", default="/tmp/dali_bundle", help="download and staging folder")
    parser.add_argument("--part-mib", type=int, help="part size in MiB (default: what a device call can carry "
                        "beside the working tree)")
    parser.add_argument("--unpack", type=Path, metavar="MANIFEST",
                        help="instead of building: check, join and unpack the parts beside MANIFEST into --to")
    parser.add_argument("--to", type=Path, default=Path("/tmp/dali_site"), help="where --unpack unpacks")
    args = parser.parse_args()
    if args.unpack:
        manifest = unpack(args.unpack, args.to)
        print(f"parts joined and unpacked into {args.to}: {len(manifest['parts'])} parts, {manifest['bytes']} bytes")
        return
    part_mib = args.part_mib or carry_room_bytes(Path(__file__).resolve().parents[1]) >> 20

    work, out = Path(args.work), Path(args.out)
    wheels, stage = work / f"wheels-{args.python}", work / f"stage-{args.python}"
    pip("download", "-q", "--no-deps", *target_flags(args.python), "-d", str(wheels), *PACKAGES)
    # A wheel's file name starts with its normalised name and version: exactly the pinned ones, however
    # many other versions earlier runs left in the folder.
    pins = [p.replace("-", "_").replace("==", "-").lower() + "-" for p in PACKAGES]
    chosen = [str(w) for w in sorted(wheels.glob("*.whl")) if w.name.lower().startswith(tuple(pins))]
    if len(chosen) != len(PACKAGES):
        raise SystemExit(f"expected {len(PACKAGES)} wheels in {wheels}, found {len(chosen)}: {chosen}")
    shutil.rmtree(stage, ignore_errors=True)
    pip("install", "-q", "--no-deps", "--no-index", "--no-compile", "--target", str(stage),
        *target_flags(args.python), *chosen)
    report = slim(stage, args.python, args.arch)

    tag = f"py{args.python.replace('.', '')}-sm{args.arch}"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"dali-{tag}.tar.xz*"):
        old.unlink()
    bundle = work / f"dali-{tag}.tar.xz"
    with tarfile.open(bundle, "w:xz", preset=9) as tar:
        for path in sorted(stage.iterdir()):
            tar.add(path, arcname=path.name)
    manifest_path = split(bundle, out, part_mib << 20, python=args.python, arch=args.arch, packages=PACKAGES,
                          **report)
    manifest = json.loads(manifest_path.read_text())
    print(json.dumps({k: v for k, v in manifest.items() if k != "packages"}, indent=1))
    print(f"carry each of {out}/{bundle.name}.part-NN in its own device call ({len(manifest['parts'])} calls), "
          f"with {manifest_path} in the first; then STEPS=dali bash bench/gpu_checks.sh")

if __name__ == "__main__":
    main()
