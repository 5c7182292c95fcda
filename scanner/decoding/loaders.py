"""Loaders: how the scan turns encoded bytes into images (docs/design.md, "A scan, step by step").

    cpu   the decode workers read, hash and decode every file (scanner.decoding.decode: torchvision.io for
          plain JPEG/WebP, Pillow for the rest). The reference, and the default without a GPU.
    dali  the workers read, hash and check the header; plain JPEGs are decoded a batch at a time by
          NVIDIA DALI right before inference (nvJPEG on a CUDA GPU, libjpeg-turbo in DALI's CPU mode),
          everything else by the CPU decoder as above (scanner.decoding.dali).
    nvjpeg  the same routing, with the batch's JPEGs decoded on a CUDA GPU by torchvision's nvJPEG,
          for GPUs without DALI (scanner.decoding.nvjpeg).

`resolve_loader("auto", device)` decodes on the GPU only when the model computes on one: dali when
`nvidia.dali` is importable, else nvjpeg (a GPU scan is bound by CPU decoding: on an H100 with 16
cores, nvjpeg scanned 533 img/s where the CPU loader scanned 272, docs/benchmarks.md). On the CPU,
DALI decodes at about half torchvision's speed (256x256 JPEGs, one thread on a 2-core build machine:
DALI about 700 images/s, torchvision about 1,500), so auto never picks it there.
`dali` without a GPU is honoured: DALI runs in CPU mode (logged), which computes the same pixels and
is what the parity tests use. nvidia.dali is never imported here (importing scanner, `scanner --help`
and the CPU tests must not need it).

A batch loader (what scanner.scan.pipeline and scanner.scan.prepare use) has two methods:

    route(data, options) -> (width, height) | None   on a decode worker: None = decode on the CPU now
    load(batch) -> batch                             on the scan thread, right before inference
"""

from __future__ import annotations

import importlib.util
import logging

from scanner.errors import ScannerError

log = logging.getLogger(__name__)

LOADERS = ("cpu", "dali", "nvjpeg")
CHOICES = ("auto", *LOADERS)
INSTALL_HINT = "pip install 'glff-scanner[dali]'"


def dali_installed() -> bool:
    """nvidia.dali is importable (looked up, not imported: the import takes about a second)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no `nvidia` namespace package at all
        return False


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_loader(name: str, device=None) -> str:
    """"auto" | "cpu" | "dali" | "nvjpeg" -> one of LOADERS. device: where the model computes (None:
    on the GPU when there is one). Raises ScannerError for an unknown name, for "dali" when
    nvidia.dali is not installed and for "nvjpeg" without a CUDA GPU."""
    if name not in CHOICES:
        raise ScannerError(f"loader {name!r} is not one of {', '.join(CHOICES)}")
    if name == "auto":
        if not (cuda_available() if device is None else is_gpu(device)):
            return "cpu"
        return "dali" if dali_installed() else "nvjpeg"
    if name == "dali" and not dali_installed():
        raise ScannerError(f"--loader dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT} "
                           "(or use --loader cpu)")
    if name == "nvjpeg" and not cuda_available():
        raise ScannerError("--loader nvjpeg decodes on a CUDA GPU, and torch.cuda.is_available() is False here "
                           "(use --loader cpu)")
    return name


def make_loader(name: str, *, model_id: str, options=None, batch_size: int = 16, device=None,
                num_threads: int | None = None):
    """The batch loader for a resolved loader name: None for "cpu" (the scan decodes on its workers),
    a scanner.decoding.dali.DaliLoader for "dali". options: the scan's scanner.scan.prepare.DecodeOptions;
    device: where the model wants its images (DALI's images are put there)."""
    if name == "cpu":
        return None
    if name == "nvjpeg":
        from scanner.decoding.nvjpeg import NvjpegLoader

        return NvjpegLoader(model_id, options, device=device)
    if name != "dali":
        raise ValueError(f"unresolved loader {name!r}")
    from scanner.decoding.dali import DaliLoader

    return DaliLoader(model_id, options, batch_size=batch_size, device=device, num_threads=num_threads)


def is_gpu(device) -> bool:
    """Whether `device` (a torch.device or its name, e.g. "cuda:0") is a CUDA GPU; None is not."""
    return device is not None and getattr(device, "type", str(device)).startswith("cuda")


def model_device(model):
    """The torch.device a runner computes on: its `device` attribute (torch CUDA and TensorRT
    runners), else its first parameter's (a Detector), else the CPU (e.g. ONNX Runtime)."""
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, (str, torch.device)):
        return torch.device(device)
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for p in parameters():
            return p.device
    return torch.device("cpu")
