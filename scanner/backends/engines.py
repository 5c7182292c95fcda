"""TensorRT engines: recipes, provenance sidecars, INT8 calibration data and the build.

The model is served as two graphs (docs/design.md, section 3), exported by `scanner.backends.export`:

    global.onnx        images (B, 3, 224, 224) in [0, 1]        -> fmap (B, C, 7, 7), g (B, D)
    local_fuser.onnx   patches (B, K, 3, 224, 224) in [0, 1], g  -> logits (B,)

with `export.json` beside them (weights_sha256, model_id, opset, config). A recipe (YAML, see
engines/*.yaml) says how to compile them; `build_engines` writes `NAME.global.engine` and
`NAME.local.engine`, each with a sidecar `X.engine.json` that records its provenance (docs/design.md,
"Conventions", rule 6). `check_sidecar` refuses an engine built for another TensorRT, GPU, ONNX export
or set of weights, with the command that rebuilds it.

Everything TensorRT-specific is in the `_trt_*` functions, which import tensorrt lazily and follow
the vendor's documented Python API for TensorRT 10 (explicit batch, named I/O tensors,
`build_serialized_network`). TensorRT 11 removed the weak-typing precision flags (BuilderFlag.FP16,
BuilderFlag.INT8) and the INT8 calibrators: there only `precision: fp32` builds, and fp16/int8
recipes are refused with a message saying so. The rest (recipes, sidecars, calibration batches, the
timing-cache lock, atomic writes, profile shapes) is plain Python, tested on the CPU.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from scanner.errors import ItemError, ScannerError

log = logging.getLogger(__name__)

# Recipe key -> ONNX file of the export, and the input names the export contract gives each graph.
GRAPHS: dict[str, str] = {"global": "global.onnx", "local": "local_fuser.onnx"}
GRAPH_INPUTS: dict[str, tuple[str, ...]] = {"global": ("images",), "local": ("patches", "g")}
PRECISIONS = ("fp32", "fp16", "int8")
SIDECAR_FORMAT = "scanner-engine/1"
CALIBRATION_DEVICE = "cuda"  # where the calibration model runs and its batches go for TensorRT
EXPORT_MANIFEST = "export.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
Shape = tuple[int, ...]
Batch = dict[str, torch.Tensor]  # a graph's inputs: name -> tensor


# -- recipes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes of one optimisation profile: the engine accepts min..max, tuned for opt."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Calibration:
    """INT8 calibration data: images from a folder, `batch` at a time, scales cached in `cache`."""

    images: Path
    cache: Path
    max_images: int = 512
    batch: int = 16


@dataclass(frozen=True)
class EngineRecipe:
    name: str
    precision: str
    profiles: dict[str, BatchProfile]  # graph ("global", "local") -> batch profile
    workspace_mib: int = 4096
    calibration: Calibration | None = None
    timing_cache: Path | None = None
    source: str = ""  # the recipe file as given, for the rebuild command


_RECIPE_KEYS = {"name", "precision", "profiles", "workspace_mib", "calibration", "timing_cache"}
_CALIBRATION_KEYS = {"images", "cache", "max_images", "batch"}


def _positive_int(value: Any, key: str) -> int:
    # bool is an int subclass: `true` in YAML must not pass as 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ScannerError(f"recipe key {key} is {value!r}; expected a positive integer")
    return value


def _mapping(value: Any, key: str, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(value, dict):
        raise ScannerError(f"recipe key {key} must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ScannerError(f"unknown recipe key {where}; expected one of {', '.join(sorted(allowed))}")
    missing = sorted(required - set(value))
    if missing:
        raise ScannerError(f"recipe is missing {key + '.' if key else ''}{missing[0]}")
    return value


def _batch_profile(value: Any, key: str) -> BatchProfile:
    value = _mapping(value, key, {"min", "opt", "max"}, {"min", "opt", "max"})
    profile = BatchProfile(*(_positive_int(value[k], f"{key}.{k}") for k in ("min", "opt", "max")))
    if not profile.min <= profile.opt <= profile.max:
        raise ScannerError(
            f"recipe key {key} is min {profile.min}, opt {profile.opt}, max {profile.max}; expected min <= opt <= max"
        )
    return profile


def _path(value: Any, key: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ScannerError(f"recipe key {key} is {value!r}; expected a path")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def recipe_from_dict(data: Any, base: Path = Path("."), source: str = "") -> EngineRecipe:
    """Validate a parsed recipe. Relative paths are resolved against `base` (the recipe's folder)."""
    data = _mapping(data, "", _RECIPE_KEYS, {"name", "precision", "profiles"})
    name = data["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise ScannerError(f"recipe key name is {name!r}; expected letters, digits, '_', '-' or '.' (it names files)")
    precision = data["precision"]
    if precision not in PRECISIONS:
        raise ScannerError(f"recipe key precision is {precision!r}; expected one of {', '.join(PRECISIONS)}")
    profiles_in = _mapping(data["profiles"], "profiles", set(GRAPHS), set(GRAPHS))
    profiles = {graph: _batch_profile(profiles_in[graph], f"profiles.{graph}") for graph in GRAPHS}
    calibration = None
    if precision == "int8":
        if "calibration" not in data:
            raise ScannerError("recipe has precision int8 but no calibration section (images, cache, max_images, batch)")
        calibration = _calibration(data["calibration"], base)
    elif "calibration" in data:
        raise ScannerError(f"recipe key calibration is only used with precision int8, not {precision}; remove it")
    timing_cache = _path(data["timing_cache"], "timing_cache", base) if data.get("timing_cache") is not None else None
    return EngineRecipe(
        name=name,
        precision=precision,
        profiles=profiles,
        workspace_mib=_positive_int(data.get("workspace_mib", 4096), "workspace_mib"),
        calibration=calibration,
        timing_cache=timing_cache,
        source=source,
    )


def _calibration(value: Any, base: Path) -> Calibration:
    value = _mapping(value, "calibration", _CALIBRATION_KEYS, {"images", "cache"})
    return Calibration(
        images=_path(value["images"], "calibration.images", base),
        cache=_path(value["cache"], "calibration.cache", base),
        max_images=_positive_int(value.get("max_images", 512), "calibration.max_images"),
        batch=_positive_int(value.get("batch", 16), "calibration.batch"),
    )


def load_recipe(path: str | Path) -> EngineRecipe:
    """Read and validate a recipe YAML file (engines/*.yaml)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ScannerError(f"recipe {str(path)!r} does not exist; pass a file such as engines/lite0_fp16.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        reason = str(exc).replace("\n", " ")
        raise ScannerError(f"recipe {str(path)!r} is not valid YAML: {reason}") from None
    return recipe_from_dict(data, path.parent, str(path))


# -- sidecars -----------------------------------------------------------------------------------------


@dataclass
class Sidecar:
    """Provenance of one engine file, stored beside it as `X.engine.json`."""

    graph: str  # "global" or "local"
    engine_file: str  # the engine's file name (the sidecar lies in the same folder)
    engine_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    precision: str
    batch: dict[str, int]  # {"min", "opt", "max"}
    inputs: dict[str, dict[str, list[int]]]  # input name -> {"min"|"opt"|"max": shape}
    onnx_file: str  # absolute path of the ONNX it was built from
    onnx_sha256: str
    weights_sha256: str
    model_id: str
    recipe: str
    recipe_file: str
    built_at: str  # ISO 8601, UTC
    config: dict  # the effective settings: {"recipe": ..., "model": the export's model config}
    format: str = SIDECAR_FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "sidecar") -> "Sidecar":
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ScannerError(f"{where} is not a scanner engine sidecar (format {got!r}, expected {SIDECAR_FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data) - {"format"})
        if missing:
            raise ScannerError(f"{where} lacks {', '.join(missing)}; rebuild the engine with build_engine.py")
        return cls(**{k: v for k, v in data.items() if k in names})


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(path: str | Path) -> Sidecar:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ScannerError(f"engine sidecar {str(path)!r} is missing; rebuild the engine with build_engine.py") from None
    except json.JSONDecodeError as exc:
        raise ScannerError(f"engine sidecar {str(path)!r} is not valid JSON ({exc}); rebuild the engine") from None
    return Sidecar.from_dict(data, repr(str(path)))


def write_sidecar(path: str | Path, sidecar: Sidecar) -> None:
    atomic_write(Path(path), sidecar.to_json().encode())


def rebuild_command(sidecar: Sidecar, model_path: str | Path = "WEIGHTS", out_dir: str | Path = "engines/") -> str:
    recipe = sidecar.recipe_file or f"engines/{sidecar.recipe}.yaml"
    out = str(out_dir)
    return f"python build_engine.py --model {model_path} --recipe {recipe} --out {out if out.endswith('/') else out + '/'}"


def check_sidecar(
    sidecar: Sidecar,
    *,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    weights_sha256: str,
    onnx_sha256: str | None,
    model_path: str | Path = "WEIGHTS",
    out_dir: str | Path = "engines/",
) -> None:
    """Refuse an engine whose provenance differs from here; the message says what and how to rebuild.

    onnx_sha256 None: no ONNX export at hand to compare with (serving from engines alone).
    """
    expected = [
        ("TensorRT version", sidecar.tensorrt_version, trt_version),
        ("GPU", sidecar.gpu_name, gpu_name),
        ("compute capability", sidecar.compute_capability, str(compute_capability)),
        ("weights sha256", sidecar.weights_sha256, weights_sha256),
    ]
    if onnx_sha256 is not None:
        expected.append(("ONNX sha256", sidecar.onnx_sha256, onnx_sha256))
    diffs = [f"{what} {_short(built)} (engine) vs {_short(here)} (here)" for what, built, here in expected if built != here]
    if diffs:
        raise ScannerError(
            f"TensorRT engine {sidecar.engine_file!r} does not match: {'; '.join(diffs)}; "
            f"rebuild it: {rebuild_command(sidecar, model_path, out_dir)}"
        )


def _short(value: str) -> str:
    # A sha256 is identified by its first 12 hex digits in messages (as model ids do).
    return value[:12] if re.fullmatch(r"[0-9a-f]{64}", value or "") else repr(value)


# -- files: hashes, atomic writes, a lock ---------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on `path` + ".lock", waiting for other holders (processes or threads).

    The lock file is never deleted, so every holder locks the same inode; the kernel releases
    the lock when its holder dies.
    """
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def read_locked(path: Path) -> bytes:
    """The file's bytes (b"" when it does not exist), read under its lock."""
    with file_lock(path):
        return path.read_bytes() if path.is_file() else b""


def update_locked(path: Path, merge: Callable[[bytes], bytes]) -> None:
    """Read-merge-write under the file's lock: concurrent updates all survive (no lost update)."""
    with file_lock(path):
        current = path.read_bytes() if path.is_file() else b""
        atomic_write(path, merge(current))


# -- the ONNX export ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportManifest:
    folder: Path
    weights_sha256: str
    model_id: str
    opset: int
    config: dict

    def onnx(self, graph: str) -> Path:
        return self.folder / GRAPHS[graph]


def read_export_manifest(onnx_dir: str | Path) -> ExportManifest:
    """Check that `onnx_dir` holds both graphs and export.json, and read the manifest."""
    folder = Path(onnx_dir)
    manifest = folder / EXPORT_MANIFEST
    if not manifest.is_file():
        raise ScannerError(f"{str(manifest)!r} not found; export the model first (build_engine.py without --onnx does)")
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise ScannerError(f"{str(manifest)!r} is not valid JSON ({exc}); export the model again") from None
    missing = [k for k in ("weights_sha256", "model_id", "opset", "config") if k not in data]
    if missing:
        raise ScannerError(f"{str(manifest)!r} lacks {', '.join(missing)}; export the model again")
    for graph, name in GRAPHS.items():
        if not (folder / name).is_file():
            raise ScannerError(f"{str(folder / name)!r} ({graph} graph) not found; export the model again")
    return ExportManifest(folder, data["weights_sha256"], data["model_id"], data["opset"], data["config"])


def input_profiles(graph: str, inputs: dict[str, Shape], batch: BatchProfile) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Profile shapes for each input of a graph: (min, opt, max), batch (dim 0) from the recipe.

    inputs: name -> shape as parsed from the ONNX, -1 for a dynamic dimension. Only dim 0 may be
    dynamic: the others (K, 3, 224, 224, D) are fixed by the export.
    """
    expected = GRAPH_INPUTS[graph]
    if tuple(sorted(inputs)) != tuple(sorted(expected)):
        raise ScannerError(
            f"{GRAPHS[graph]} has inputs {sorted(inputs)}; the export contract says {sorted(expected)}; "
            "export the model again"
        )
    shapes = {}
    for name in expected:
        dims = tuple(int(d) for d in inputs[name])
        if len(dims) < 1 or any(d < 1 for d in dims[1:]):
            raise ScannerError(f"{GRAPHS[graph]} input {name!r} has shape {dims}; only the batch dimension may be dynamic")
        shapes[name] = tuple((b, *dims[1:]) for b in (batch.min, batch.opt, batch.max))
    return shapes


# -- INT8 calibration data ----------------------------------------------------------------------------


def calibration_files(folder: Path) -> list[Path]:
    """Image files below `folder`, recursive, sorted by path (so calibration is reproducible)."""
    from scanner.sources.sniff import looks_like_image

    if not folder.is_dir():
        raise ScannerError(f"calibration images folder {str(folder)!r} does not exist; set calibration.images in the recipe")
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as fh:
            head = fh.read(64)
        if looks_like_image(path.name, head):
            found.append(path)
    return found


def _decoded(paths: Iterable[Path], limit: int) -> Iterator[torch.Tensor]:
    """Uint8 (3, H, W) images decoded from `paths`, at most `limit`; undecodable files are skipped."""
    from scanner.decoding.decode import read_and_decode

    count = 0
    for path in paths:
        if count >= limit:
            return
        try:
            image = read_and_decode(path)
        except (ItemError, OSError) as exc:  # a bad file must not stop calibration
            log.warning("calibration: skipping %s (%s)", path, exc)
            continue
        count += 1
        yield image


def _chunks(images: Iterator[torch.Tensor], batch: int) -> Iterator[list[torch.Tensor]]:
    """Full batches only: the calibration profile has one fixed batch size."""
    chunk: list[torch.Tensor] = []
    for image in images:
        chunk.append(image)
        if len(chunk) == batch:
            yield chunk
            chunk = []


def global_calibration_batches(paths: Iterable[Path], batch: int, max_images: int, size: int = 224) -> Iterator[Batch]:
    """Inputs of the global graph: {"images": float32 (batch, 3, size, size) in [0, 1]}.

    The same preprocessing as serving (`preprocess.global_views`), so the scales fit real inputs.
    """
    from scanner.model.preprocess import global_views

    for chunk in _chunks(_decoded(paths, max_images), batch):
        yield {"images": global_views(chunk, size)}


def local_calibration_batches(model, paths: Iterable[Path], batch: int, max_images: int) -> Iterator[Batch]:
    """Inputs of the local+fuser graph from the torch model: {"patches": float32 (batch, K, 3, S, S)
    in [0, 1], "g": float32 (batch, D)}, patches chosen by its PSM and cut by crop_resize as in serving.
    """
    from scanner.model.crop_resize import crop_patches
    from scanner.model.preprocess import global_views, image_sizes

    device = next(model.parameters()).device
    size = model.cfg.input_size
    for chunk in _chunks(_decoded(paths, max_images), batch):
        with torch.inference_mode():
            fmap, g = model.global_branch(global_views(chunk, size).to(device))  # (B, C, 7, 7), (B, D)
            boxes = model.selector(fmap, image_sizes(chunk))  # (B, K, 4)
            patches = crop_patches(chunk, boxes.cpu(), size).div_(255)  # (B, K, 3, S, S)
        yield {"patches": patches.float(), "g": g.float().cpu()}


def calibration_cache_path(cache: Path, graph: str, onnx_sha256: str) -> Path:
    """One cache per graph and ONNX export: scales from other weights must never be reused."""
    return cache.with_name(f"{cache.stem}.{graph}-{onnx_sha256[:12]}{cache.suffix or '.calib'}")


class CalibrationFeed:
    """What TensorRT's calibrator asks for, without TensorRT: device pointers of the next batch,
    and the calibration cache's bytes. The tensors of the current batch are held until the next.
    """

    def __init__(self, batches: Iterable[Batch], batch: int, cache: Path, device: str | torch.device = "cuda"):
        self.batches = iter(batches)
        self.batch = batch
        self.cache = cache
        self.device = torch.device(device)
        self.held: list[torch.Tensor] = []
        self.count = 0
        self.error: Exception | None = None  # raised in a TensorRT callback, re-raised after the build

    def next_pointers(self, names: list[str]) -> list[int] | None:
        """Device addresses of the next batch's tensors, in the order of `names`; None when done."""
        try:
            batch = next(self.batches)
        except StopIteration:
            if self.count == 0:
                raise ScannerError(
                    f"calibration has no batch for TensorRT: fewer decodable images than calibration.batch, "
                    f"or TensorRT rejected the cache {str(self.cache)!r} (delete it)"
                ) from None
            self.held = []
            return None
        self.held = [batch[name].to(self.device, torch.float32).contiguous() for name in names]
        if self.device.type == "cuda":
            # TensorRT reads these on its own stream: the copies must have landed.
            torch.cuda.current_stream(self.device).synchronize()
        self.count += 1
        return [t.data_ptr() for t in self.held]

    def read_cache(self) -> bytes | None:
        data = self.cache.read_bytes() if self.cache.is_file() else b""
        if data:
            log.info("calibration: reusing scales from %s", self.cache)
        return data or None

    def write_cache(self, data: bytes) -> None:
        if self.error is None:  # scales from a calibration that failed must not be reused
            atomic_write(self.cache, bytes(data))


# -- TensorRT (lazy imports; documented TensorRT 10 Python API) ---------------------------------------------


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ScannerError(
            "TensorRT is not installed (import tensorrt failed); on a CUDA machine: pip install 'tensorrt-cu13>=10.13,<11'"
        ) from None
    return trt


def current_gpu(device: int | None = None) -> tuple[str, str]:
    """(name, compute capability "major.minor") of the CUDA device; ScannerError without one."""
    if not torch.cuda.is_available():
        raise ScannerError("TensorRT engines need a CUDA GPU, and torch.cuda.is_available() is False here")
    index = torch.cuda.current_device() if device is None else device
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def _trt_set_precision(trt, config, precision: str) -> None:
    if precision == "fp32":
        return
    # TensorRT 11 removed weak typing: BuilderFlag.FP16/INT8 and the calibrators are gone.
    if not hasattr(trt.BuilderFlag, "FP16"):
        raise ScannerError(
            f"precision {precision} needs TensorRT 10 (BuilderFlag.FP16/INT8); TensorRT {trt.__version__} removed them: "
            f"pip install 'tensorrt-cu13>=10.13,<11', or use a recipe with precision: fp32"
        )
    config.set_flag(trt.BuilderFlag.FP16)  # int8 keeps fp16 for layers that have no int8 kernel
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)


def _trt_calibrator(trt, feed: CalibrationFeed):
    """An IInt8EntropyCalibrator2 that delegates to `feed`.

    TensorRT calls these from C++ functions declared noexcept: an exception must not unwind
    through them, so it is kept in `feed.error` and raised once the build returns.
    """

    def guarded(call, *args):
        try:
            return call(*args)
        except Exception as exc:  # noqa: BLE001 - re-raised by _trt_build
            feed.error = feed.error or exc
            return None

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # the binding's trampoline needs this call

        def get_batch_size(self) -> int:
            return feed.batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            return guarded(feed.next_pointers, list(names))

        def read_calibration_cache(self) -> bytes | None:
            return guarded(feed.read_cache)

        def write_calibration_cache(self, cache) -> None:
            guarded(feed.write_cache, bytes(cache))

    return EntropyCalibrator()


def _trt_parse(trt, builder, logger, onnx_path: Path):
    network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors))
        raise ScannerError(f"TensorRT could not parse {str(onnx_path)!r}: {errors or 'no error reported'}")
    inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs[tensor.name] = tuple(tensor.shape)
    return network, parser, inputs


def _trt_timing_cache(config, path: Path | None):
    if path is None:
        return None
    cache = config.create_timing_cache(read_locked(path))  # b"": a new, empty cache
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # Written by another TensorRT version or GPU: start afresh (saving replaces it).
        log.warning("timing cache %s does not fit this TensorRT/GPU; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _trt_save_timing_cache(config, path: Path | None) -> None:
    if path is None:
        return
    ours = config.get_timing_cache()

    def merge(current: bytes) -> bytes:
        # Another build may have saved since we loaded: keep its entries too.
        if current:
            ours.combine(config.create_timing_cache(current), False)
        return bytes(ours.serialize())

    update_locked(path, merge)


def _trt_build(trt, graph: str, onnx_path: Path, recipe: EngineRecipe, feed: CalibrationFeed | None):
    """Build one serialised engine. Returns (plan bytes, input profile shapes)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, parser, inputs = _trt_parse(trt, builder, logger, onnx_path)  # parser owns weights: keep it
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, recipe.workspace_mib << 20)
    _trt_set_precision(trt, config, recipe.precision)
    shapes = input_profiles(graph, inputs, recipe.profiles[graph])
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if feed is not None:
        # Calibration runs at one fixed batch: its own profile, min = opt = max.
        calib = builder.create_optimization_profile()
        for name, (lo, _, _) in shapes.items():
            fixed = (feed.batch, *lo[1:])
            calib.set_shape(name, fixed, fixed, fixed)
        config.set_calibration_profile(calib)
        config.int8_calibrator = _trt_calibrator(trt, feed)
    _trt_timing_cache(config, recipe.timing_cache)
    plan = builder.build_serialized_network(network, config)
    if feed is not None and feed.error is not None:
        raise feed.error
    if plan is None:
        raise ScannerError(f"TensorRT failed to build the {graph} engine from {str(onnx_path)!r} (its log above says why)")
    _trt_save_timing_cache(config, recipe.timing_cache)
    del parser  # the network's weights were needed until here
    return bytes(plan), shapes


# -- the build ---------------------------------------------------------------------------------------


def engine_paths(out_dir: str | Path, recipe_name: str) -> dict[str, Path]:
    """graph -> engine file: OUT/NAME.global.engine, OUT/NAME.local.engine."""
    return {graph: Path(out_dir) / f"{recipe_name}.{graph}.engine" for graph in GRAPHS}


def _calibration_feed(graph: str, recipe: EngineRecipe, export: ExportManifest, onnx_sha: str, model) -> CalibrationFeed:
    calib = recipe.calibration
    cache = calibration_cache_path(calib.cache, graph, onnx_sha)
    if cache.is_file():
        # TensorRT takes the scales from the cache and asks for no batch: images are not needed.
        return CalibrationFeed(iter(()), calib.batch, cache, CALIBRATION_DEVICE)
    files = calibration_files(calib.images)
    if len(files) < calib.batch:
        raise ScannerError(
            f"calibration needs at least calibration.batch={calib.batch} images; {str(calib.images)!r} has {len(files)}"
        )
    size = int(export.config.get("input_size", 224))
    if graph == "global":
        batches = global_calibration_batches(files, calib.batch, calib.max_images, size)
    else:
        batches = local_calibration_batches(model, files, calib.batch, calib.max_images)
    return CalibrationFeed(batches, calib.batch, cache, CALIBRATION_DEVICE)


def build_engines(
    onnx_dir: str | Path,
    recipe: EngineRecipe,
    out_dir: str | Path,
    *,
    weights: str | Path | None = None,
) -> dict[str, Path]:
    """Compile the export in `onnx_dir` into `out_dir` by `recipe`; returns graph -> engine path.

    weights: the .safetensors the export came from; checked against export.json, shown in the
    rebuild command, and needed for int8 (the local graph is calibrated on the torch model's PSM).
    """
    export = read_export_manifest(onnx_dir)
    model = None
    if weights is not None:
        from scanner.model.weights import read_info

        info = read_info(weights)
        if info.sha256 != export.weights_sha256:
            raise ScannerError(
                f"{str(onnx_dir)!r} was exported from weights {export.weights_sha256[:12]}, not {str(weights)!r} "
                f"({info.sha256[:12]}); export again or pass the matching --model"
            )
    if recipe.precision == "int8" and weights is None:
        raise ScannerError("precision int8 calibrates on the torch model: pass --model WEIGHTS")
    trt = import_tensorrt()
    gpu_name, capability = current_gpu()
    if recipe.precision == "int8":
        from scanner.model.weights import load_detector

        model, _ = load_detector(weights, device=CALIBRATION_DEVICE)
    paths = engine_paths(out_dir, recipe.name)
    for graph in GRAPHS:
        onnx_path = export.onnx(graph)
        onnx_sha = sha256_file(onnx_path)
        feed = _calibration_feed(graph, recipe, export, onnx_sha, model) if recipe.precision == "int8" else None
        log.info("building %s from %s (%s)", paths[graph], onnx_path, recipe.precision)
        plan, shapes = _trt_build(trt, graph, onnx_path, recipe, feed)
        atomic_write(paths[graph], plan)
        write_sidecar(
            sidecar_path(paths[graph]),
            make_sidecar(graph, paths[graph], plan, recipe, export, onnx_path, onnx_sha, shapes,
                         trt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability),
        )
    return paths


def make_sidecar(
    graph: str,
    engine_path: Path,
    plan: bytes,
    recipe: EngineRecipe,
    export: ExportManifest,
    onnx_path: Path,
    onnx_sha256: str,
    shapes: dict[str, tuple[Shape, Shape, Shape]],
    *,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
) -> Sidecar:
    batch = recipe.profiles[graph]
    return Sidecar(
        graph=graph,
        engine_file=engine_path.name,
        engine_sha256=hashlib.sha256(plan).hexdigest(),
        tensorrt_version=trt_version,
        gpu_name=gpu_name,
        compute_capability=compute_capability,
        precision=recipe.precision,
        batch={"min": batch.min, "opt": batch.opt, "max": batch.max},
        inputs={name: {k: list(s) for k, s in zip(("min", "opt", "max"), prof)} for name, prof in shapes.items()},
        onnx_file=str(Path(onnx_path).resolve()),
        onnx_sha256=onnx_sha256,
        weights_sha256=export.weights_sha256,
        model_id=export.model_id,
        recipe=recipe.name,
        recipe_file=recipe.source,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config={"recipe": json.loads(json.dumps(dataclasses.asdict(recipe), default=str)), "model": export.config},
    )
