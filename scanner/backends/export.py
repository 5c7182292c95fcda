"""ONNX export of the detector as the two serving graphs, and its parity check against PyTorch.

    global.onnx        images  float32 (B, 3, S, S) in [0, 1]        -> fmap (B, C, S/32, S/32), g (B, D)
    local_fuser.onnx   patches float32 (B, K, 3, S, S) in [0, 1],
                       g       float32 (B, D)                         -> logits (B,)

S is the config's input_size (224), K the patch count (6 for PSM). The batch axis is dynamic and
named `B` on every input and output; every other axis is fixed. The backbone's own normalisation is
inside the graphs. PSM and crop-resize run between the graphs (docs/design.md, section 3). These names and
shapes are the contract the onnxruntime and tensorrt backends (scanner.backends.engines) are written against.
`export.json` beside the graphs records the provenance (weights sha256, model id, config, opset,
versions, shapes).

Exporter: torch.export-based ("dynamo", the default). Measured here on EfficientNet-Lite0 (torch
2.14, onnxscript 0.7, opset 18): it traces the 224-pixel input statically, so timm's TF-"same"
padding becomes constant Pads: the global graph has 96 nodes instead of 600 (local+fuser 244
instead of 1101), fmap gets its static 7x7 shape, and ONNX Runtime runs the two graphs 1.36x
faster (7.9 vs 5.8 images/s, batch 16, 2 threads, busy 2-core machine, 10 alternating runs).
Costs: it needs `onnxscript`, and exporting Lite0 takes 35-55 s instead of 5 s (once per weights
file: the onnxruntime backend caches the export). The TorchScript exporter (`exporter="torchscript"`,
deprecated by PyTorch) stays available and meets the same contract and tolerances.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scanner.config import model_config_from_dict
from scanner.errors import ScannerError
from scanner.model.patches import PatchSelector
from scanner.model.weights import ModelInfo

FORMAT = "scanner-onnx/1"
DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
GLOBAL_FILE = "global.onnx"
LOCAL_FILE = "local_fuser.onnx"
META_FILE = "export.json"
BATCH_AXIS = "B"

# Parity tolerances, elementwise |onnx - torch| <= atol + rtol * |torch|. Measured max abs diffs,
# EfficientNet-Lite0, random inputs, batches 3 and 1, seeds 0-2, ORT 1.32 CPU, both exporters:
# fmap 3e-5..7e-5 (values in [0, 6]), g 1e-6..3e-6, logits 5e-7..8e-6; the tiny test backbone:
# all below 1e-6. fmap sums up to 1280 channels (the full Lite0 trunk) of convolutions whose
# accumulation order differs between the runtimes, hence a relative term (a ResNet-50 fmap is
# larger); logits get an absolute bound only, 1e-4: ~10x the worst measured, and 1e-4 on a
# logit is < 2.5e-5 on a score.
FEATURE_ATOL = 1e-4
FEATURE_RTOL = 1e-3
LOGIT_ATOL = 1e-4
LOGIT_RTOL = 0.0
TOLERANCES: dict[str, tuple[float, float]] = {
    "fmap": (FEATURE_ATOL, FEATURE_RTOL),
    "g": (FEATURE_ATOL, FEATURE_RTOL),
    "logits": (LOGIT_ATOL, LOGIT_RTOL),
}


class GlobalGraph(nn.Module):
    """images (B, 3, S, S) in [0, 1] -> fmap (B, C, S/32, S/32), g (B, D)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.detector.global_branch(images)


class LocalFuserGraph(nn.Module):
    """patches (B, K, 3, S, S) in [0, 1], g (B, D) -> logits (B,)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, patches: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.detector.local_fusion(patches, g)[0]


@dataclass
class ExportResult:
    out_dir: Path
    global_path: Path
    local_path: Path
    meta_path: Path
    meta: dict


def graph_shapes(model: nn.Module) -> dict[str, dict[str, list]]:
    """The contract's shapes for this model, batch axis as "B": {graph: {tensor name: shape}}."""
    cfg = model.cfg
    s, fm = cfg.input_size, cfg.input_size // 32
    k, c, d = PatchSelector(cfg).count, model.backbone.fmap_channels, model.global_width
    b = BATCH_AXIS
    return {
        "global": {"images": [b, 3, s, s], "fmap": [b, c, fm, fm], "g": [b, d]},
        "local": {"patches": [b, k, 3, s, s], "g": [b, d], "logits": [b]},
    }


GRAPH_IO = {
    "global": (("images",), ("fmap", "g")),
    "local": (("patches", "g"), ("logits",)),
}
GRAPH_FILES = {"global": GLOBAL_FILE, "local": LOCAL_FILE}


def export_onnx(model: nn.Module, info: ModelInfo, out_dir, *, opset: int = DEFAULT_OPSET, batch: int = 2,
                exporter: str | None = None) -> ExportResult:
    """Write global.onnx, local_fuser.onnx and export.json to `out_dir`; check both graphs.

    model: a float32 Detector (weights.load_detector); info: its ModelInfo. Traced at batch `batch`
    (>= 2, so the exporter cannot specialise the batch axis to 1). export.json is written last: a
    folder without it is an unfinished export.
    """
    import onnx

    exporter = exporter or DEFAULT_EXPORTER
    if exporter not in EXPORTERS:
        raise ScannerError(f"exporter is {exporter!r}; expected one of {', '.join(EXPORTERS)}")
    if batch < 2:
        raise ScannerError(f"export batch is {batch}; expected 2 or more (a batch of 1 may be specialised away)")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ScannerError("the model is not float32; load it with scanner.model.weights.load_detector")
    if exporter == "dynamo":
        _require_onnxscript()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    shapes = graph_shapes(model)
    device = next(model.parameters()).device
    s, k = model.cfg.input_size, shapes["local"]["patches"][1]
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, s, s, generator=gen).to(device)
    patches = torch.rand(batch, k, 3, s, s, generator=gen).to(device)
    with torch.no_grad():
        g = model.global_branch(images)[1]
    graphs = {"global": (GlobalGraph(model), (images,)), "local": (LocalFuserGraph(model), (patches, g))}
    meta_graphs = {}
    for name, (module, args) in graphs.items():
        path = out_dir / GRAPH_FILES[name]
        inputs, outputs = GRAPH_IO[name]
        _export_graph(module, args, path, inputs, outputs, opset, exporter)
        _pin_shapes(path, shapes[name])
        onnx.checker.check_model(str(path), full_check=True)
        meta_graphs[name] = {
            "file": path.name,
            "sha256": sha256_file(path),
            "inputs": {n: {"shape": shapes[name][n], "dtype": "float32"} for n in inputs},
            "outputs": {n: {"shape": shapes[name][n], "dtype": "float32"} for n in outputs},
        }
    meta = {
        "format": FORMAT,
        "model_id": info.model_id,
        "name": info.name,
        "weights_sha256": info.sha256,
        "threshold": info.threshold,
        "config": dataclasses.asdict(info.config),
        "opset": opset,
        "exporter": exporter,
        "traced_batch": batch,
        "dtype": "float32",
        "batch_axis": BATCH_AXIS,
        "patches": k,
        "graphs": meta_graphs,
        "versions": _versions(),
    }
    meta_path = out_dir / META_FILE
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp.replace(meta_path)
    return ExportResult(out_dir, out_dir / GLOBAL_FILE, out_dir / LOCAL_FILE, meta_path, meta)


def _require_onnxscript() -> None:
    try:
        import onnxscript  # noqa: F401 - torch's exporter imports it itself; checked here for the message
    except ImportError:
        raise ScannerError("the ONNX export needs the onnxscript package (not installed); "
                           "run: pip install onnxscript") from None


def _export_graph(module: nn.Module, args: tuple, path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...],
                  opset: int, exporter: str) -> None:
    with warnings.catch_warnings(), _quiet_loggers("onnxscript", "onnx_ir", "torch.onnx"):
        # Both exporters warn about things that do not apply here (legacy API, unused axis names),
        # and the onnxscript optimiser logs every pass at INFO.
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim(BATCH_AXIS, min=1)
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset, input_names=list(inputs),
                              output_names=list(outputs), dynamic_shapes=tuple({0: batch} for _ in inputs),
                              external_data=False, optimize=True, verbose=False)
        else:
            axes = {n: {0: BATCH_AXIS} for n in (*inputs, *outputs)}
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=list(inputs),
                              output_names=list(outputs), dynamic_axes=axes, do_constant_folding=True)


@contextmanager
def _quiet_loggers(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _pin_shapes(path: Path, shapes: dict[str, list]) -> None:
    """Name the batch axis "B" and fix every other axis to the contract's size in the graph's I/O.

    The batch axis must have come out symbolic (a fixed one means the exporter specialised it: a
    bug, raised). Symbolic non-batch axes (the TorchScript exporter's fmap) are set to their value.
    """
    import onnx

    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        expected = shapes[value.name]
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(expected):
            raise RuntimeError(f"{path.name}: {value.name} has rank {len(dims)}, the contract says {len(expected)}")
        if dims[0].HasField("dim_value"):
            raise RuntimeError(f"{path.name}: the exporter fixed the batch axis of {value.name} to {dims[0].dim_value}")
        dims[0].dim_param = BATCH_AXIS
        for dim, size in zip(list(dims)[1:], expected[1:]):
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise RuntimeError(f"{path.name}: {value.name} is {_dims(dims)}, the contract says {expected}")
            dim.dim_value = size
    onnx.save(model, str(path))


def _dims(dims) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims]


def _versions() -> dict[str, str]:
    import onnx

    versions = {"torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxscript

        versions["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return versions


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- reading an export ----------------------------------------------------------------------------


def read_export(export_dir, *, check_files: bool = True) -> dict:
    """export.json of `export_dir`, checked: format, both graphs present (and their sha256)."""
    folder = Path(export_dir)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise ScannerError(f"{str(folder)!r} is not an ONNX export ({META_FILE} not found); "
                           f"create one with: scanner export --out {folder}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ScannerError(f"{str(meta_path)!r} is unreadable ({exc}); export the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ScannerError(f"{str(meta_path)!r} is not a {FORMAT} export manifest; export the model again")
    for name, graph in meta["graphs"].items():
        path = folder / graph["file"]
        if not path.is_file():
            raise ScannerError(f"{str(path)!r} ({name} graph) not found; export the model again")
        if check_files and sha256_file(path) != graph["sha256"]:
            raise ScannerError(f"{str(path)!r} is not the graph {META_FILE} describes (changed or truncated); "
                               "export the model again")
    return meta


def is_export_dir(path) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / META_FILE).is_file()


def info_from_export(export_dir, meta: dict | None = None) -> ModelInfo:
    """The ModelInfo of the weights an export came from, from its export.json alone."""
    meta = meta if meta is not None else read_export(export_dir)
    cfg = model_config_from_dict(meta["config"])
    return ModelInfo(Path(export_dir), meta["name"], meta["weights_sha256"], float(meta["threshold"]), cfg,
                     {"format": meta["format"], "export": str(export_dir)})


# -- parity ---------------------------------------------------------------------------------------


@dataclass
class OutputDiff:
    batch: int
    output: str
    max_abs: float
    atol: float
    rtol: float
    ok: bool


@dataclass
class ParityReport:
    export_dir: Path
    rows: list[OutputDiff] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def format(self) -> str:
        lines = [f"ONNX Runtime vs PyTorch, {self.export_dir}:"]
        for r in self.rows:
            lines.append(f"  batch {r.batch:<3} {r.output:<7} max |diff| {r.max_abs:.2e}  "
                         f"(atol {r.atol:g}, rtol {r.rtol:g})  {'ok' if r.ok else 'FAIL'}")
        lines.append("parity: " + ("ok" if self.ok else "FAILED"))
        return "\n".join(lines)


def _compare(batch: int, name: str, got: np.ndarray, want: torch.Tensor) -> OutputDiff:
    want = want.detach().float().cpu().numpy()
    if got.shape != want.shape:
        return OutputDiff(batch, name, float("inf"), *TOLERANCES[name], ok=False)
    atol, rtol = TOLERANCES[name]
    diff = np.abs(got.astype(np.float64) - want)
    ok = bool(np.all(diff <= atol + rtol * np.abs(want))) and bool(np.isfinite(got).all())
    return OutputDiff(batch, name, float(diff.max(initial=0.0)), atol, rtol, ok)


def verify_onnx(export_dir, model: nn.Module, batch: int = 3, seed: int = 0, threads: int | None = None) -> ParityReport:
    """Run both graphs in ONNX Runtime and in PyTorch on random inputs at batch `batch` and 1.

    The local graph gets PyTorch's g for the same random images, so each graph is checked alone.
    Returns max |diff| per output and batch, each against its tolerance (TOLERANCES).
    """
    from scanner.backends.ort import ort_session

    folder = Path(export_dir)
    meta = read_export(folder)
    sessions = {name: ort_session(folder / graph["file"], threads) for name, graph in meta["graphs"].items()}
    model = model.eval()
    cfg = model.cfg
    k = meta["patches"]
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    report = ParityReport(folder)
    for b in dict.fromkeys((batch, 1)):  # ordered, without a duplicate when batch == 1
        images = torch.rand(b, 3, cfg.input_size, cfg.input_size, generator=gen)  # (b, 3, S, S)
        patches = torch.rand(b, k, 3, cfg.input_size, cfg.input_size, generator=gen)  # (b, K, 3, S, S)
        with torch.inference_mode():
            fmap, g = model.global_branch(images.to(device))
            logits = model.local_fusion(patches.to(device), g)[0]
        ort_fmap, ort_g = sessions["global"].run(["fmap", "g"], {"images": images.numpy()})
        (ort_logits,) = sessions["local"].run(["logits"], {"patches": patches.numpy(), "g": g.cpu().numpy()})
        report.rows += [_compare(b, "fmap", ort_fmap, fmap), _compare(b, "g", ort_g, g),
                        _compare(b, "logits", ort_logits, logits)]
    return report
