"""Serving: inference backends behind one contract, the ONNX export and the TensorRT engines
(docs/design.md, "Backends, export and kernels").

A runner is what scanner.scan.inference calls: `runner.eval()` and `runner(images) -> DetectorOutput`
with `.logits` (B,) and `.boxes` (B, K, 4) int64, for a list of uint8 (3, H_i, W_i) images.

    torch        the Detector itself on the CPU (the reference); on a CUDA GPU the torch CUDA runner
                 (scanner.backends.torch_cuda: fp16, CUDA kernels for PSM and crop-resize)
    onnxruntime  the two exported graphs in ONNX Runtime (CPU; the export's parity oracle)
    tensorrt     TensorRT engines (CUDA GPU; scanner.backends.tensorrt_backend)

`auto` picks by measurement, not by assumption (see resolve_auto). Optional libraries (onnxruntime,
tensorrt) are imported only when their backend is asked for.

Also here: export (the detector as two ONNX graphs, and their parity check), ort (ONNX Runtime
sessions), engines (TensorRT recipes, provenance sidecars, the build behind build_engine.py) and
compare (the backends timed side by side).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from scanner.errors import ScannerError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
CHOICES = ("auto", *BACKENDS)

# CPU ordering measured by compare_backends (scanner/backends/compare.py): default model
# (EfficientNet-Lite0), 64 dev-set JPEGs (256x256), batch 16, 2 threads, 2-core machine, backends
# alternating in one process: onnxruntime 2.8-3.5x torch's images/s (MEASURED_CPU there).
CPU_PREFERENCE = ("onnxruntime", "torch")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _engines_built(engines_dir) -> bool:
    """A folder with NAME.global.engine in it, or one engine set given as OUT/NAME or its file."""
    if engines_dir is None:
        return False
    path = Path(engines_dir)
    if path.is_dir():
        return any(path.glob("*.global.engine"))
    return path.is_file() or path.with_name(path.name + ".global.engine").is_file()


def available_backends(engines_dir=None) -> list[str]:
    """Backends whose libraries (and, for tensorrt, GPU and built engines) are present here."""
    found = ["torch"]
    if _importable("onnxruntime"):
        found.append("onnxruntime")
    if _tensorrt_missing(engines_dir) == []:
        found.append("tensorrt")
    return found


def resolve_auto(engines_dir=None, model_path=None) -> str:
    """tensorrt with a CUDA GPU and built engines; else torch on a CUDA GPU; else torch in bf16 for
    a model that runs it (the CLIP transformer on a CPU with native bf16: 3.65 images/s against
    ONNX Runtime's 2.37 in one `scanner bench` session, docs/benchmarks.md); else the faster CPU
    backend as measured here (CPU_PREFERENCE) among those installed."""
    available = available_backends(engines_dir)
    if "tensorrt" in available:
        return "tensorrt"
    if _cuda():
        return "torch"
    if _runs_bf16_on_torch(model_path):
        return "torch"
    return next(name for name in CPU_PREFERENCE if name in available)


def _runs_bf16_on_torch(model_path) -> bool:
    """Whether torch's automatic precision (scanner.backends.torch_cpu) picks bf16 for this model here."""
    from scanner.backends.export import is_export_dir
    from scanner.backends.torch_cpu import resolve_precision
    from scanner.model.weights import read_info

    if is_export_dir(model_path):
        return False
    try:
        backbone = read_info(model_path).config.backbone
    except ScannerError:
        return False  # a missing or bad file: the backend that loads it says so
    return resolve_precision("auto", backbone) == "bf16"


def load_backend(name: str, model_path=None, *, threads: int | None = None, engines_dir=None, cache_dir=None,
                 precision: str = "fp32"):
    """(runner, ModelInfo) for backend `name` (one of CHOICES) and the weights at `model_path`.

    model_path: .safetensors weights or a shipped model's name (default: the default model); for
    onnxruntime also an export folder. threads: intra-op threads (default: torch's count).
    engines_dir: TensorRT engines. cache_dir: root of the ONNX export cache (default:
    $XDG_CACHE_HOME/scanner/onnx). precision: torch on the CPU only, fp32, bf16 or auto
    (scanner.backends.torch_cpu).
    """
    if name not in CHOICES:
        raise ScannerError(f"unknown backend {name!r}; expected one of {', '.join(CHOICES)}")
    chosen = resolve_auto(engines_dir, model_path) if name == "auto" else name
    if chosen == "torch":
        runner, info = _load_torch(model_path, threads, precision)
    elif chosen == "onnxruntime":
        from scanner.backends.onnxruntime_backend import load_onnxruntime

        runner, info = load_onnxruntime(model_path, threads=threads, cache_dir=cache_dir)
    else:
        runner, info = _load_tensorrt(model_path, engines_dir)
    log.info("backend: %s%s, model %s", chosen, " (auto)" if name == "auto" else "", info.model_id)
    return runner, info


def _load_torch(model_path, threads: int | None, precision: str = "fp32"):
    import torch

    from scanner.backends.export import is_export_dir
    from scanner.backends.torch_cpu import load_torch_cpu

    if is_export_dir(model_path):
        raise ScannerError(f"{str(model_path)!r} is an ONNX export; the torch backend needs the .safetensors "
                           "weights (or use --backend onnxruntime)")
    if threads:
        torch.set_num_threads(threads)
    if _cuda():
        from scanner.backends.torch_cuda import load_torch_cuda

        return load_torch_cuda(model_path)
    return load_torch_cpu(model_path, precision)


def _tensorrt_missing(engines_dir) -> list[str]:
    """What the tensorrt backend lacks here, each as a short phrase; [] when it can run."""
    missing = []
    if not _cuda():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if not _importable("tensorrt"):
        missing.append("the tensorrt package (pip install 'glff-scanner[gpu]')")
    if not _engines_built(engines_dir):
        where = f"in {str(engines_dir)!r}" if engines_dir is not None else "(--engines DIR)"
        missing.append(f"built engines {where}: python build_engine.py --model WEIGHTS --recipe engines/NAME.yaml")
    if not _importable("scanner.backends.tensorrt_backend"):
        missing.append("scanner.backends.tensorrt_backend (not in this build)")
    return missing


def _load_tensorrt(model_path, engines_dir):
    missing = _tensorrt_missing(engines_dir)
    if missing:
        raise ScannerError(f"the tensorrt backend needs {'; '.join(missing)}; use --backend onnxruntime or torch here")
    from scanner.backends.tensorrt_backend import load_tensorrt

    return load_tensorrt(model_path, engines_dir)
