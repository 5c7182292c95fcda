"""The onnxruntime backend: the two exported graphs on the CPU, PSM and crop-resize between them.

    images (uint8) -> global_views -> global.onnx -> fmap, g -> PSM (scanner.model.patches) -> boxes
        -> crop_resize / 255 -> patches -> local_fuser.onnx (patches, g) -> logits

Same function as the torch Detector (docs/design.md, section 3); the parity tests hold it to that. Given
weights (.safetensors), the model is exported once into a cache folder keyed by the weights sha256
and reused afterwards; given an export folder (with export.json), it runs from that alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from scanner.backends.ort import INSTALL_HINT, import_onnxruntime, ort_session
from scanner.errors import ScannerError
from scanner.model.crop_resize import crop_patches
from scanner.model.detector import DetectorOutput
from scanner.model.patches import PatchSelector
from scanner.model.preprocess import global_views, image_sizes
from scanner.model.weights import ModelInfo
from scanner.stages import stage

log = logging.getLogger(__name__)


class OnnxRuntimeDetector:
    """The Detector's inference contract (scanner.scan.inference): `runner(images) -> DetectorOutput`."""

    def __init__(self, export_dir, info: ModelInfo, threads: int | None = None):
        from scanner.backends.export import read_export

        self.export_dir = Path(export_dir)
        meta = read_export(self.export_dir)
        if meta["weights_sha256"] != info.sha256:
            raise ScannerError(f"{str(self.export_dir)!r} was exported from weights {meta['weights_sha256'][:12]}, "
                               f"not {info.sha256[:12]} ({info.path}); export the model again")
        self.cfg = info.config
        self.selector = PatchSelector(self.cfg)
        graphs = meta["graphs"]
        self.global_session = ort_session(self.export_dir / graphs["global"]["file"], threads)
        self.local_session = ort_session(self.export_dir / graphs["local"]["file"], threads)

    def eval(self) -> "OnnxRuntimeDetector":
        return self

    def __call__(self, images: list[torch.Tensor]) -> DetectorOutput:
        """images: list of uint8 (3, H_i, W_i). Returns logits (B,), boxes (B, K, 4) int64, fmap (B, C, 7, 7)."""
        if not images:
            raise ValueError("no images")
        images = [img.cpu() for img in images]
        size = self.cfg.input_size
        with stage("global"):
            views = global_views(images, size)  # (B, 3, S, S) float32 in [0, 1]
            fmap, g = self.global_session.run(["fmap", "g"], {"images": views.numpy()})  # (B, C, 7, 7), (B, D)
            fmap = torch.from_numpy(fmap)
        with stage("psm"):
            boxes = self.selector(fmap, image_sizes(images))  # (B, K, 4)
        with stage("crop_resize"):
            patches = crop_patches(images, boxes, size).div_(255)  # (B, K, 3, S, S)
        with stage("local"):
            (logits,) = self.local_session.run(["logits"], {"patches": patches.numpy(), "g": g})  # (B,)
        return DetectorOutput(logits=torch.from_numpy(logits), boxes=boxes.cpu(), fmap=fmap)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/scanner/onnx (XDG_CACHE_HOME defaults to ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scanner" / "onnx"


def cached_export(model_path, info: ModelInfo, cache_dir=None, opset: int | None = None) -> Path:
    """The export of these weights under `cache_dir`/<sha256[:16]>/, exported now if missing or stale.

    Written into a temporary folder and renamed into place, so a crash or a concurrent run never
    leaves a half export where a reader would take it for a finished one.
    """
    from scanner.backends import export as onnx_export
    from scanner.model.weights import load_detector

    opset = opset or onnx_export.DEFAULT_OPSET
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / info.sha256[:16]
    if _usable(target, info, opset):
        log.info("onnxruntime: using the cached export %s", target)
        return target
    log.info("onnxruntime: exporting %s to %s (once per weights file)", info.model_id, target)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    except OSError as exc:
        raise ScannerError(f"cannot write the ONNX export cache {str(root)!r} ({exc}); "
                           "set XDG_CACHE_HOME to a writable folder") from None
    try:
        model, _ = load_detector(model_path)
        onnx_export.export_onnx(model, info, tmp, opset=opset)
        _replace_dir(tmp, target, info, opset)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _usable(folder: Path, info: ModelInfo, opset: int) -> bool:
    from scanner.backends.export import DEFAULT_OPSET, read_export

    if not (folder / "export.json").is_file():
        return False
    try:
        meta = read_export(folder)
    except ScannerError:
        return False
    return meta.get("weights_sha256") == info.sha256 and meta.get("opset", DEFAULT_OPSET) == opset


def _replace_dir(tmp: Path, target: Path, info: ModelInfo, opset: int) -> None:
    """Move the finished export `tmp` to `target`; a stale `target` is moved aside first."""
    if target.exists():
        if _usable(target, info, opset):
            return  # another process finished the same export first
        stale = target.with_name(f".{target.name}.stale.{os.getpid()}")
        target.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:
        if not _usable(target, info, opset):  # lost a race to another writer: theirs is as good
            raise


def load_onnxruntime(model_path=None, *, threads: int | None = None,
                     cache_dir=None) -> tuple[OnnxRuntimeDetector, ModelInfo]:
    """The onnxruntime backend for weights (.safetensors; default: the shipped model) or an export folder."""
    from scanner.backends.export import info_from_export, is_export_dir
    from scanner.model.weights import read_info

    import_onnxruntime()
    if is_export_dir(model_path):
        info = info_from_export(model_path)
        return OnnxRuntimeDetector(model_path, info, threads), info
    _require_export_tools()
    info = read_info(model_path)
    folder = cached_export(info.path, info, cache_dir)
    return OnnxRuntimeDetector(folder, info, threads), info


def _require_export_tools() -> None:
    """Exporting needs onnx (and onnxscript for the default exporter) besides onnxruntime."""
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ScannerError(f"exporting the model for onnxruntime needs {' and '.join(missing)}, not installed; "
                           f"run: {INSTALL_HINT} onnxscript, or pass --model with an export folder")
