"""Compile the CUDA sources in this folder with NVRTC, and cache the results on disk.

Needs cuda-python (`cuda.bindings.nvrtc`) and the NVRTC library (the `nvidia-cuda-nvrtc` wheel), but
no GPU: PTX for any architecture NVRTC knows compiles anywhere. Nothing here imports torch.

Cache: `$XDG_CACHE_HOME/scanner/kernels/` (default `~/.cache/...`), one file per compiled program,
named `<kernel>-<target>-<key>.<ptx|cubin>` where key = sha256(source, options, NVRTC version,
target). A changed source, option or NVRTC therefore never reuses a stale file. Files are written
atomically (temporary name, then rename), so concurrent first uses at worst compile twice.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from scanner.errors import ScannerError

SOURCE_DIR = Path(__file__).parent
KERNELS = ("psm", "crop_resize")

# Bit-exact parity with the references needs IEEE arithmetic: no fused multiply-add contraction, no
# approximate division or square root, no flushing of subnormals (this is what "fast math off" means).
OPTIONS = ("-std=c++17", "--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false")

# Counted per process (tests read them): compiles served from the disk cache, and real compiles.
STATS = {"hits": 0, "misses": 0}

_INSTALL = "pip install cuda-python nvidia-cuda-nvrtc (or: pip install -e '.[gpu]')"


class KernelUnavailable(ScannerError):
    """cuda-python, NVRTC, the driver or a GPU is missing: the message says which and what to do."""


def nvrtc_module():
    """`cuda.bindings.nvrtc`, imported on first use."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        raise KernelUnavailable(
            f"the CUDA kernels need cuda-python >= 13 (cuda.bindings), which is not installed; {_INSTALL}"
        ) from None
    return nvrtc


def _check(result, what: str, program=None):
    """cuda-python returns (status, *values): the values, or KernelUnavailable/RuntimeError."""
    nvrtc = nvrtc_module()
    status, *values = result
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = _program_log(program) if program is not None else ""
        raise RuntimeError(f"NVRTC {what} failed: {status.name}\n{log}".rstrip())
    return values[0] if len(values) == 1 else tuple(values)


def _program_log(program) -> str:
    nvrtc = nvrtc_module()
    status, size = nvrtc.nvrtcGetProgramLogSize(program)
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS or size <= 1:
        return ""
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(program, buf)
    return buf.rstrip(b"\0").decode(errors="replace")


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library; KernelUnavailable when it cannot be loaded."""
    nvrtc = nvrtc_module()
    try:
        result = nvrtc.nvrtcVersion()
    except Exception as exc:  # noqa: BLE001 - a missing libnvrtc raises cuda.pathfinder's own error type
        raise KernelUnavailable(
            f"the NVRTC library could not be loaded ({type(exc).__name__}: {exc}); {_INSTALL}"
        ) from None
    return tuple(_check(result, "version"))


def supported_archs() -> list[int]:
    """Compute capabilities (as 80, 90, ...) this NVRTC can compile for."""
    nvrtc_version()  # a clear error first when the library is missing
    return sorted(_check(nvrtc_module().nvrtcGetSupportedArchs(), "GetSupportedArchs"))


def parse_target(arch: int | str, cubin: bool) -> str:
    """80, "80", "sm_80" or "compute_80" -> "sm_80" (cubin) or "compute_80" (PTX)."""
    match = re.fullmatch(r"(?:sm_|compute_)?(\d{2,3})[a-z]?", str(arch).strip())
    if not match:
        raise ValueError(f"GPU architecture {arch!r} is not understood; expected e.g. 90, 'sm_90' or 'compute_90'")
    return f"{'sm' if cubin else 'compute'}_{match.group(1)}"


def source(name: str) -> str:
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; expected one of {', '.join(KERNELS)}")
    return (SOURCE_DIR / f"{name}.cu").read_text()


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "scanner" / "kernels"


def cache_key(text: str, target: str, options: tuple[str, ...], version: tuple[int, int]) -> str:
    h = hashlib.sha256()
    for part in (text, "\0".join(options), f"nvrtc {version[0]}.{version[1]}", target):
        h.update(part.encode())
        h.update(b"\0\1")  # separator: no two part lists hash alike by concatenation
    return h.hexdigest()


def compile_source(name: str, text: str, target: str, options: tuple[str, ...] = OPTIONS) -> bytes:
    """NVRTC-compile `text` for `target` ("sm_90": cubin, "compute_90": PTX), through the disk cache."""
    version = nvrtc_version()
    options = tuple(options)
    key = cache_key(text, target, options, version)
    path = cache_dir() / f"{name}-{target}-{key[:32]}.{'cubin' if target.startswith('sm_') else 'ptx'}"
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    if data:
        STATS["hits"] += 1
        return data
    data = _nvrtc_compile(name, text, target, options)
    STATS["misses"] += 1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError:
        pass  # a read-only or full cache costs a compile per process, nothing else
    return data


def _nvrtc_compile(name: str, text: str, target: str, options: tuple[str, ...]) -> bytes:
    nvrtc = nvrtc_module()
    program = _check(nvrtc.nvrtcCreateProgram(text.encode(), f"{name}.cu".encode(), 0, [], []), "CreateProgram")
    try:
        opts = [f"--gpu-architecture={target}".encode(), *(o.encode() for o in options)]
        _check(nvrtc.nvrtcCompileProgram(program, len(opts), opts), f"compile of {name}.cu for {target}", program)
        if target.startswith("sm_"):
            size = _check(nvrtc.nvrtcGetCUBINSize(program), "GetCUBINSize")
            buf = b" " * size
            _check(nvrtc.nvrtcGetCUBIN(program, buf), "GetCUBIN")
        else:
            size = _check(nvrtc.nvrtcGetPTXSize(program), "GetPTXSize")
            buf = b" " * size  # includes the terminating NUL that cuModuleLoadData needs
            _check(nvrtc.nvrtcGetPTX(program, buf), "GetPTX")
        return bytes(buf)
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def compile_ptx(name: str, arch: int | str, options: tuple[str, ...] = OPTIONS) -> bytes:
    """PTX (NUL-terminated text) of kernels/<name>.cu for compute capability `arch`. Needs no GPU."""
    return compile_source(name, source(name), parse_target(arch, cubin=False), options)


def compile_cubin(name: str, arch: int | str, options: tuple[str, ...] = OPTIONS) -> bytes:
    """Cubin (machine code) of kernels/<name>.cu for `arch` exactly. Needs no GPU."""
    return compile_source(name, source(name), parse_target(arch, cubin=True), options)


def binary_for(name: str, capability: tuple[int, int]) -> bytes:
    """What to load on a GPU of this compute capability: its cubin when NVRTC knows the
    architecture, else PTX for the newest older one (the driver JIT-compiles it)."""
    arch = capability[0] * 10 + capability[1]
    archs = supported_archs()
    if arch in archs:
        return compile_cubin(name, arch)
    older = [a for a in archs if a <= arch]
    if not older:
        raise KernelUnavailable(
            f"this NVRTC ({'.'.join(map(str, nvrtc_version()))}) cannot compile for compute capability "
            f"{capability[0]}.{capability[1]} (it supports {archs}); use the torch backend"
        )
    return compile_ptx(name, older[-1])
