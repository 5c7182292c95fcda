"""The tensorrt backend: the detector as two TensorRT engines with PSM and crop-resize between them.

    images (uint8, CPU) -> CUDA -> global_views -> global engine -> fmap, g
        -> PSM (scanner.model.patches, on the device) -> boxes -> crop_resize (on the device) -> patches
        -> local engine (patches, g) -> logits

Everything between the engines runs on the GPU in torch's current stream, which the engines also
run on (`execute_async_v3`), so nothing waits on the host until the caller reads the results.
Engines come from build_engine.py (scanner.backends.engines) and are refused when their sidecar says they
were built for another TensorRT, GPU or set of weights. tensorrt is imported lazily.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from scanner.backends.engines import (
    Sidecar,
    check_sidecar,
    current_gpu,
    engine_paths,
    import_tensorrt,
    read_sidecar,
    sha256_file,
    sidecar_path,
)
from scanner.config import ModelConfig
from scanner.errors import ScannerError
from scanner.model.detector import DetectorOutput
from scanner.model.weights import ModelInfo, read_info
from scanner.stages import stage

# tensorrt.DataType member name -> torch dtype of the buffer we allocate for it.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in TORCH_DTYPES:
        raise ScannerError(f"engine tensor type {name} is not supported; rebuild the engine from this project's export")
    return TORCH_DTYPES[name]


def batch_ranges(n: int, largest: int) -> list[tuple[int, int]]:
    """[start, end) slices of at most `largest` items covering range(n)."""
    return [(i, min(i + largest, n)) for i in range(0, n, largest)]


def pad_batch(t: torch.Tensor, smallest: int) -> torch.Tensor:
    """(B, ...) -> (max(B, smallest), ...), repeating the last row: a profile may not accept B."""
    if t.shape[0] >= smallest:
        return t
    return torch.cat([t, t[-1:].expand(smallest - t.shape[0], *t.shape[1:])])


def _stream(device: torch.device) -> int:
    """The CUDA stream handle torch enqueues on for `device` (0 off CUDA: tests with stand-ins)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


class Engine:
    """One deserialised engine with its execution context: `engine(name=tensor, ...) -> {name: tensor}`.

    Inputs and outputs are torch tensors on the device; outputs are allocated per call to the
    shapes the context infers. Not thread-safe: one context, one caller at a time.
    """

    def __init__(self, trt, engine, sidecar: Sidecar, device: torch.device):
        self.engine = engine
        self.context = engine.create_execution_context()
        self.device = device
        self.min_batch, self.max_batch = sidecar.batch["min"], sidecar.batch["max"]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = next(iter(inputs.values())).shape[0]
        held = {}  # the input buffers must live until the stream has run the engine
        for name in self.inputs:
            t = pad_batch(inputs[name], self.min_batch).to(self.device, self.dtypes[name]).contiguous()
            held[name] = t
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise RuntimeError(f"engine input {name!r} rejects shape {tuple(t.shape)}")
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(_stream(self.device)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        # The caching allocator reuses freed blocks in stream order, so dropping `held` after
        # enqueueing on the same stream is safe.
        return {name: t[:batch] for name, t in outputs.items()}


class TensorRTRunner:
    """The detector's contract (scanner.scan.inference): `runner(images) -> DetectorOutput`.

    global_engine: images (B, 3, S, S) -> fmap (B, C, 7, 7), g (B, D).
    local_engine: patches (B, K, 3, S, S), g (B, D) -> logits (B,).
    Either may be any callable of that form with `min_batch`/`max_batch` (tests use torch ones).
    """

    def __init__(self, global_engine, local_engine, cfg: ModelConfig, device: str | torch.device = "cuda"):
        from scanner.model.patches import PatchSelector

        self.global_engine = global_engine
        self.local_engine = local_engine
        self.cfg = cfg
        self.device = torch.device(device)
        self.selector = PatchSelector(cfg)
        self.chunk = min(global_engine.max_batch, local_engine.max_batch)
        self.runtime: Any = None  # the TensorRT runtime the engines came from: it must outlive them

    def eval(self) -> "TensorRTRunner":
        return self

    def __call__(self, images: list[torch.Tensor]) -> DetectorOutput:
        """images: list of uint8 (3, H_i, W_i). Returns logits (B,) on the device, boxes (B, K, 4) int64 on the CPU."""
        if not images:
            raise ValueError("no images")
        parts = [self._run(images[a:b]) for a, b in batch_ranges(len(images), self.chunk)]
        logits = torch.cat([p[0] for p in parts])
        boxes = torch.cat([p[1] for p in parts])
        return DetectorOutput(logits=logits, boxes=boxes.cpu())

    def _run(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from scanner.model.crop_resize import crop_resize
        from scanner.model.preprocess import global_views, image_sizes

        size = self.cfg.input_size
        with stage("global", self.device):
            on_device = [img.to(self.device, non_blocking=True) for img in images]
            views = global_views(on_device, size)  # (B, 3, S, S) in [0, 1]
            out = self.global_engine(images=views)
            fmap, g = out["fmap"], out["g"]  # (B, C, 7, 7), (B, D)
        with stage("psm", self.device):
            boxes = self.selector(fmap.float(), image_sizes(images))  # (B, K, 4) on the device
        with stage("crop_resize", self.device):
            patches = crop_resize(on_device, boxes.to(self.device), size).div_(255)  # (B, K, 3, S, S)
        with stage("local", self.device):
            logits = self.local_engine(patches=patches, g=g)["logits"]  # (B,)
        return logits.float().reshape(-1), boxes


# -- loading ----------------------------------------------------------------------------------------


def find_engines(engines: str | Path, weights_sha256: str, model_path: str | Path) -> dict[str, Path]:
    """graph -> engine path for these weights.

    `engines` is a folder (the one engine set built for these weights in it) or one set's prefix
    OUT/NAME (or either of its .engine files), which picks a recipe when several were built.
    """
    engines = Path(engines)
    if engines.is_dir():
        stems = sorted(p.name[: -len(".global.engine")] for p in engines.glob("*.global.engine"))
        folder = engines
    else:
        name = engines.name
        for suffix in (".global.engine", ".local.engine"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        folder, stems = engines.parent, [name]
    build = f"python build_engine.py --model {model_path} --recipe engines/NAME.yaml --out {folder}/"
    sets = {stem: engine_paths(folder, stem) for stem in stems if (folder / f"{stem}.global.engine").is_file()}
    if not sets:
        raise ScannerError(
            f"no TensorRT engines at {str(engines)!r} (NAME.global.engine, NAME.local.engine); build them: {build}"
        )
    ours = [stem for stem, paths in sets.items() if _weights_of(paths["global"]) == weights_sha256]
    if len(ours) > 1:
        raise ScannerError(
            f"{str(engines)!r} holds several engine sets for this model ({', '.join(ours)}); pass one as {folder}/NAME"
        )
    stem = ours[0] if ours else next(iter(sets))  # none ours: the check below says what differs
    for graph, path in sets[stem].items():
        if not path.is_file():
            raise ScannerError(f"{str(path)!r} ({graph} engine) is missing; rebuild: {build.replace('NAME', stem)}")
    return sets[stem]


def _weights_of(engine: Path) -> str | None:
    """The weights sha256 an engine was built from; None when its sidecar is unreadable."""
    try:
        return read_sidecar(sidecar_path(engine)).weights_sha256
    except ScannerError:
        return None


def _check_engine(path: Path, sidecar: Sidecar, trt_version: str, gpu: tuple[str, str], info: ModelInfo,
                  model_path: str | Path) -> bytes:
    """The engine's bytes, once its sidecar matches this machine and model; ScannerError otherwise."""
    onnx = Path(sidecar.onnx_file)
    check_sidecar(
        sidecar,
        trt_version=trt_version,
        gpu_name=gpu[0],
        compute_capability=gpu[1],
        weights_sha256=info.sha256,
        # The export is compared only when it is still there; serving from engines alone is fine.
        onnx_sha256=sha256_file(onnx) if onnx.is_file() else None,
        model_path=model_path,
        out_dir=str(path.parent),
    )
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sidecar.engine_sha256:
        raise ScannerError(f"{str(path)!r} is not the engine its sidecar describes (changed or truncated); rebuild it")
    return data


def load_tensorrt(model_path: str | Path | None, engines_dir: str | Path) -> tuple[TensorRTRunner, ModelInfo]:
    """The tensorrt backend for the weights at `model_path`, from engines in `engines_dir`."""
    if not torch.cuda.is_available():
        raise ScannerError("the tensorrt backend needs a CUDA GPU, and torch.cuda.is_available() is False here; "
                           "use the torch or onnxruntime backend")
    trt = import_tensorrt()
    info = read_info(model_path)
    shown = model_path if model_path is not None else info.path
    gpu = current_gpu()
    paths = find_engines(engines_dir, info.sha256, shown)
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    device = _device()
    engines = {}
    for graph, path in paths.items():
        sidecar = read_sidecar(sidecar_path(path))
        if sidecar.graph != graph:
            raise ScannerError(f"{str(path)!r} holds the {sidecar.graph} graph, not {graph}; rebuild the engines")
        data = _check_engine(path, sidecar, trt.__version__, gpu, info, shown)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise ScannerError(f"TensorRT could not load {str(path)!r} (see its log); rebuild it")
        engines[graph] = Engine(trt, engine, sidecar, device)
    runner = TensorRTRunner(engines["global"], engines["local"], info.config, device)
    runner.runtime = runtime
    return runner, info
