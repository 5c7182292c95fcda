"""The `scanner` command line: parses options, calls the library, presents output on stderr.

User errors (scanner.errors.ScannerError) become one line and exit code 2; bugs keep their traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _threads(n: int | None) -> None:
    from scanner.scan.pipeline import set_threads

    set_threads(n)


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (click's test runner swaps it per call)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def _log_to_stderr() -> None:
    """The library's INFO messages (backend chosen, export cache) and warnings, one line each."""
    logger = logging.getLogger("scanner")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("scanner: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO)


class _Group(click.Group):
    def invoke(self, ctx):
        from scanner.errors import ScannerError

        _log_to_stderr()
        try:
            return super().invoke(ctx)
        except ScannerError as exc:
            click.echo(f"scanner: error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group)
@click.version_option(package_name="glff-scanner")
def main():
    """Tell AI-synthesized images (GANs, diffusion, face swaps) from real photographs."""


RUN_EPILOG = """\b
Exit codes:
  0    done (every item has a record)
  1    internal failure (a bug; the traceback says where)
  2    usage error (bad option, missing input, incompatible output)
  3    done, but more error records than --max-errors
  4    the output is locked by another running scan
  130  interrupted by SIGINT, 143 by SIGTERM: rerun the same command to resume
"""


def _kinds(errors_by_kind: dict) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(errors_by_kind.items()))


def _summary_line(summary, model_id: str, out) -> str:
    """The run's one summary line: this run's records, then the output's final view (each id's last
    record, scanner.scan.final_view) when earlier runs left records in it."""
    kinds = _kinds(summary.errors_by_kind)
    retried = f", {summary.retried} of them retried after transient errors" if summary.retried else ""
    line = (f"scanned {summary.scanned} files{retried} ({summary.errors} errors{': ' + kinds if kinds else ''}), "
            f"skipped {summary.skipped_done} already done and {summary.not_images} not images, "
            f"in {summary.seconds:.1f} s, {summary.images_per_s:.1f} files/s, model {model_id} -> {out}")
    final = summary.output
    if final and (final["ids"] != summary.scanned or final["transient"]):
        line += (f"; the output now holds {final['ids']} ids: {final['scored']} scored, {final['errors']} errors"
                 f"{' (' + _kinds(final['errors_by_kind']) + ')' if final['errors'] else ''}")
    if final and final["transient"]:
        line += f"; {final['transient']} transient errors will be retried by the next run"
    return line


def _ray_inputs(inputs: tuple, value: str) -> tuple[tuple, str]:
    """`--ray` takes an optional value, so in `--ray DIR ...` click reads the first input as the address:
    a value that is not one (local, auto, ray://..., HOST:PORT) goes back to the inputs."""
    import re

    if value in ("local", "auto") or value.startswith("ray://") or re.fullmatch(r"[\w.-]+:\d+", value):
        return inputs, value
    return (value, *inputs), "local"


@main.command(epilog=RUN_EPILOG)
@click.argument("inputs", nargs=-1)
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Results file; rerunning with the same file resumes (skips ids already in it). With --ray: "
                   "a directory of parts plus manifest.json (one file: `scanner merge DIR --out FILE`).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Scan on a Ray cluster (pip install 'glff-scanner[dist]'): no value starts a local Ray, `auto` attaches "
                   "to the cluster of this node, ray://HOST:10001 connects a client. See README, 'Scaling out'.")
@click.option("--from-list", "from_list", default=None, help="A file of paths or URLs to scan, one per line ('-': stdin).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet"]), default="jsonl", show_default=True,
              help="Output format (parquet needs pyarrow: pip install 'glff-scanner[parquet]').")
@click.option("--force", is_flag=True, help="Start over: discard the existing output instead of resuming.")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Detector weights (.safetensors; for --backend onnxruntime also a `scanner export` folder); "
                   "default: the shipped model.")
@click.option("--batch-size", type=int, default=None,
              help="Images per inference batch (default: 16 on the CPU, 256 when the model computes on a GPU).")
@click.option("--workers", type=int, default=None,
              help="Decode threads (default on the CPU: 2 on up to 4 cores, else 4; on a GPU: all cores but two, "
                   "4 to 12; more for network sources; 0: no overlap).")
@click.option("--threads", type=int, default=None, help="Torch intra-op threads (default: one per core).")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True, help="Inference backend; auto: tensorrt with a GPU and built engines, else torch on "
              "the GPU, else the faster CPU backend as measured: torch in bf16 for the CLIP default where the CPU "
              "has native bf16, else onnxruntime when installed (pip install 'glff-scanner[onnx]'; its first run "
              "exports the model once, about a minute), else torch.")
@click.option("--engines", "engines_dir", type=click.Path(path_type=Path), default=None,
              help="TensorRT engines (folder from build_engine.py), for the tensorrt backend.")
@click.option("--loader", type=click.Choice(["auto", "cpu", "dali", "nvjpeg"]), default="auto", show_default=True,
              help="Image decoding; dali: JPEGs decoded in batches by NVIDIA DALI (nvJPEG on a GPU; CPU mode "
              "without one), other formats on the CPU (pip install 'glff-scanner[dali]'); cpu: decode threads "
              "(--workers); nvjpeg: JPEGs decoded in batches on the GPU by torchvision's nvJPEG, for GPUs without DALI; "
              "auto: when the model runs on a CUDA GPU, dali if installed, else nvjpeg; on the CPU, cpu.")
@click.option("--threshold", type=float, default=None,
              help="Score at or above which the label is synthetic; default: the model's calibrated threshold.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="The torch backend on the CPU: bf16 about doubles the CLIP model's speed on CPUs with native "
              "bfloat16 (AVX512-BF16, AMX), scores within about 1e-3 of fp32; auto: bf16 there, else fp32.")
@click.option("--max-pixels", default=50_000_000, show_default=True, help="Refuse larger images (decompression bombs).")
@click.option("--downscale-large", is_flag=True, help="Scan images over --max-pixels at reduced size instead of refusing them.")
@click.option("--retries", type=int, default=4, show_default=True,
              help="Retries of a read that may work later (HTTP 5xx and 429, dropped connections, timeouts, disk "
                   "I/O errors), with exponential backoff and jitter; still failing: an `io` record, which the next "
                   "run on the same --out tries again.")
@click.option("--read-timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for a connection or for the next bytes of a remote file before the read "
                   "counts as failed (and is retried).")
@click.option("--max-errors", type=int, default=None, help="Exit with code 3 if this run writes more error records than this.")
@click.option("--summary-json", type=click.Path(path_type=Path), default=None, help="Also write the final summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress display.")
def run(inputs, out, from_list, fmt, force, model_path, batch_size, workers, threads, backend, engines_dir, loader,
        threshold, precision, max_pixels, downscale_large, retries, read_timeout, max_errors, summary_json, quiet,
        ray_address):
    """Scan INPUTS (directories, image files, tar/zip/webdataset shards, URLs) and write one record per
    image to --out."""
    import json
    import signal
    import threading

    from scanner.backends import load_backend
    from scanner.decoding.loaders import resolve_loader
    from scanner.errors import ScannerError
    from scanner.scan.pipeline import ScanOptions, scan
    from scanner.scan.preflight import check_optional_packages
    from scanner.scan.prepare import DecodeOptions
    from scanner.sources.retry import RetryPolicy

    if ray_address is not None:
        inputs, ray_address = _ray_inputs(inputs, ray_address)
    if not inputs and from_list is None:
        raise ScannerError("nothing to scan: pass directories, files or URLs, or --from-list FILE")
    options = ScanOptions(batch_size=batch_size, workers=workers, threshold=threshold, fmt=fmt, force=force,
                          decode=DecodeOptions(max_pixels=max_pixels, downscale_large=downscale_large,
                                               retry=RetryPolicy(retries=retries, read_timeout=read_timeout)),
                          loader=loader)
    options.validate()
    # Missing optional packages stop the run here, before the model loads and the output opens; the
    # pass over a list file also gives the progress its total.
    listed = check_optional_packages(inputs, from_list, fmt=fmt, ray=ray_address is not None,
                                     loader=loader if ray_address is None else "cpu")
    total = listed if not inputs else None
    resolve_loader(loader)  # a missing GPU is an error before anything starts
    _threads(threads)
    if quiet:
        logging.getLogger("scanner").setLevel(logging.WARNING)
    if ray_address is None:  # with --ray every actor loads its own
        model, info = load_backend(backend, model_path, threads=threads, engines_dir=engines_dir, precision=precision)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: stop now (written records stay valid)
        received.append(signum)
        stop.set()
        click.echo(f"scanner: {signal.Signals(signum).name}: finishing the current batch (again to abort)", err=True)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if ray_address is not None:
            from scanner.distributed.ray_scan import scan_ray

            summary = scan_ray(list(inputs), out, from_list=from_list, address=ray_address, model_path=model_path,
                               backend=backend, engines_dir=engines_dir, options=options, threads=threads,
                               console=None if quiet else _console(), stop=stop, total=total, preflight=False)
        else:
            summary = scan(list(inputs), out, model, info, from_list=from_list, options=options,
                           console=None if quiet else _console(), stop=stop, total=total, preflight=False)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    model_id = summary.model if ray_address is not None else info.model_id
    click.echo(_summary_line(summary, model_id, out), err=True)
    if summary_json is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps({**summary.to_json(), "out": str(out), "model": model_id}, indent=2)
                                + "\n")
    if received:
        click.echo("scanner: interrupted; rerun the same command to resume", err=True)
        sys.exit(128 + received[0])
    if max_errors is not None and summary.errors > max_errors:
        click.echo(f"scanner: {summary.errors} error records, more than --max-errors {max_errors}", err=True)
        sys.exit(3)


@main.command(name="bench")
@click.argument("folder", required=False, type=click.Path(path_type=Path))
@click.option("--generate", type=int, default=None, help="Bench N generated JPEGs (of --sizes) instead of FOLDER.")
@click.option("--sizes", default="640x480", show_default=True, help="Sizes of generated images, WxH[,WxH...].")
@click.option("--limit", type=int, default=200, show_default=True,
              help="At most this many images of FOLDER (a seeded sample).")
@click.option("--batch-size", "batch_sizes", default=None,
              help="Batch sizes, comma-separated (default: scanner run's, 16 on the CPU and 256 on a GPU).")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True, help="Backend of the scan (as scanner run).")
@click.option("--loader", type=click.Choice(["auto", "cpu", "dali", "nvjpeg"]), default="auto", show_default=True)
@click.option("--engines", "engines_dir", type=click.Path(path_type=Path), default=None)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="The scan's precision with torch on the CPU (as scanner run); the naive baseline stays fp32.")
@click.option("--workers", type=int, default=None, help="Decode threads (and the baseline's DataLoader workers).")
@click.option("--threads", type=int, default=None, help="Intra-op threads of both (default: one per core).")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Detector weights; default: the shipped model.")
@click.option("--arch", default=None, help="Bench an untrained detector of this backbone (resnet50: the paper's "
              "model) or of a config YAML's model section instead; throughput does not depend on the weights.")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="Rounds per batch size, ours and the baseline alternating; medians are reported.")
@click.option("--no-naive", "no_naive", is_flag=True, help="Skip the naive baseline.")
@click.option("--serial-model", "serial_model", is_flag=True,
              help="Score on the scan thread instead of the model's own thread (before/after comparisons).")
@click.option("--feed", is_flag=True, help="Also time the scan with the network replaced by a no-op, in the same run: "
              "the rate reading, hashing, decoding, batching and writing can feed a network.")
@click.option("--quick", is_flag=True, help="A smoke run: 12 small generated images, batch 4, one round.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the report as JSON (images_per_s, naive_images_per_s, ratio, stages, ...).")
@click.option("--seed", type=int, default=0, show_default=True)
def bench_cmd(folder, generate, sizes, limit, batch_sizes, backend, loader, engines_dir, precision, workers, threads,
              model_path, arch, rounds, no_naive, serial_model, feed, quick, json_out, seed):
    """Measure scan throughput (images/s end to end and per stage, batch latency, peak memory) against a
    naive baseline run on the same images in the same run. FOLDER: images to sample (default: generated)."""
    import json
    import tempfile

    from scanner.bench.harness import BenchOptions, print_report, run_bench, untrained_model
    from scanner.bench.inputs import folder_images, generate_images, parse_sizes
    from scanner.decoding.loaders import resolve_loader
    from scanner.errors import ScannerError

    if quick:
        generate, sizes, batch_sizes, rounds = (generate or 12), "320x240,200x200", "4", 1
    try:
        batches = [int(b) for b in batch_sizes.split(",")] if batch_sizes is not None else None
    except ValueError:
        raise ScannerError(f"--batch-size {batch_sizes!r}: expected integers, comma-separated") from None
    if arch and model_path:
        raise ScannerError("--arch and --model exclude each other")
    with tempfile.TemporaryDirectory(prefix="scanner-bench-") as tmp:
        work = Path(tmp)
        if folder is not None and generate is None:
            paths = folder_images(folder, limit, seed)
        else:
            paths = generate_images(work / "images", generate or 64, parse_sizes(sizes), seed)
        if arch:
            model_path = untrained_model(arch, work)
        resolve_loader(loader)  # a missing DALI or GPU is an error before anything starts
        opts = BenchOptions(backend=backend, loader=loader, batch_sizes=batches, workers=workers,
                            threads=threads, model_path=model_path, engines_dir=engines_dir, naive=not no_naive,
                            rounds=rounds, precision=precision, feed=feed, model_thread=not serial_model)
        report = run_bench(paths, opts, work, log=lambda msg: click.echo(f"scanner: {msg}", err=True))
    from rich.console import Console

    print_report(report, Console())  # the report is the command's output: stdout
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"report written to {json_out}", err=True)


@main.command(name="merge")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="The single results file: JSONL, or Parquet when it ends in .parquet or with --format parquet.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet"]), default=None,
              help="Output format (default: from the --out suffix; parquet needs pip install 'glff-scanner[parquet]').")
def merge(out_dir, out, fmt):
    """Merge the parts of a distributed scan (`scanner run --ray ... --out OUT_DIR`) into one file, each id
    once (its last record: a rerun's record supersedes an earlier transient error), streamed."""
    from scanner.distributed.parts import merge_parts

    summary = merge_parts(out_dir, out, fmt)
    dropped = f"; dropped {summary.superseded} superseded records" if summary.superseded else ""
    click.echo(f"merged {summary.records} records from {summary.parts} parts{dropped} -> {out}", err=True)


@main.command()
@click.option("--data", "data_dir", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Folder in the CNNDetection layout: <root>/<source>/0_real|1_fake/; repeat it for several pools.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="YAML overrides of the paper's defaults.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (weights, checkpoint, config.yaml); rerun with the same folder to resume.")
@click.option("--name", default="detector", show_default=True, help="Model name recorded in the weights.")
@click.option("--epochs", type=int, default=None, help="Override train.epochs.")
@click.option("--val-sources", default=None, help="Comma-separated sources held out for validation.")
@click.option("--max-val-images", type=int, default=600, show_default=True, help="Cap on validation images per epoch.")
@click.option("--threads", type=int, default=None, help="Torch intra-op threads.")
@click.option("--token-cache", "cache_dir", type=click.Path(path_type=Path), default=None,
              help="Train on cached outputs of the frozen trunk kept in this folder (extracting what it lacks): "
                   "every image of --data, the config's fixed epochs, no validation split.")
@click.option("--calibration", "calibration", type=click.Path(path_type=Path, exists=True), default=None,
              help="With --token-cache: a leave_one_out.json of `scanner eval --leave-one-out --token-cache`; "
                   "its Platt calibration and threshold ship with the weights.")
@click.option("--bf16", is_flag=True, help="With --token-cache: run the trunk in bfloat16 on the CPU (2x faster).")
def train(data_dir, config_path, out_dir, name, epochs, val_sources, max_val_images, threads, cache_dir, calibration,
          bf16):
    """Train the detector (BCE, Adam 1e-4, blur/JPEG augmentation) with validation and resume, or, with
    --token-cache, its embedding, AFFM and head on cached trunk outputs."""
    from scanner.config import load_config
    from scanner.training.train import train as run_training

    overrides: dict = {"train": {}}
    if epochs is not None:
        overrides["train"]["epochs"] = epochs
    if val_sources:
        overrides["train"]["val_sources"] = [s.strip() for s in val_sources.split(",") if s.strip()]
    cfg = load_config(config_path, overrides)
    _threads(threads)
    if cache_dir is not None:
        import json

        from scanner.training.token_training import train_from_cache

        report = json.loads(calibration.read_text()) if calibration is not None else None
        if report is not None and "calibration" not in report:
            from scanner.errors import ScannerError

            raise ScannerError(f"{calibration} holds no calibration; pass the leave_one_out.json of a cached "
                               "leave-one-out run over several folds")
        path = train_from_cache(cfg, list(data_dir), out_dir, cache_dir, name=name, calibration=report, bf16=bf16,
                                log=lambda msg: click.echo(f"scanner: {msg}", err=True))
        click.echo(f"trained on cached tokens -> {path}", err=True)
        return
    if calibration is not None or bf16:
        from scanner.errors import ScannerError

        raise ScannerError("--calibration and --bf16 apply to training with --token-cache only")
    data_dir = data_dir[0] if len(data_dir) == 1 else list(data_dir)
    result = run_training(cfg, data_dir, out_dir, name=name, max_val_images=max_val_images, console=_console())
    click.echo(
        f"best epoch {result.best_epoch}: validation AP {result.best_ap:.4f}, threshold {result.threshold:.4f} "
        f"-> {out_dir / 'best.safetensors'}",
        err=True,
    )


@main.command(name="eval")
@click.option("--data", "data_dir", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Labelled folder (CNNDetection layout); repeat it for several pools.")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None, help="Weights; default: the shipped model.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("eval-report"), show_default=True,
              help="Folder for report.json, report.md and plots.")
@click.option("--threshold", type=float, default=None, help="Accuracy threshold; default: the model's.")
@click.option("--robustness", is_flag=True, help="Add the blur and JPEG sweeps (Fig. 3) as PNG plots.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--holdout", "holdout_config", type=click.Path(path_type=Path), default=None,
              help="Training config (YAML): evaluate only the images its training run held out.")
@click.option("--threads", type=int, default=None, help="Torch intra-op threads.")
@click.option("--leave-one-out", "loo_config", type=click.Path(path_type=Path), default=None,
              help="Training config (YAML): for each generator in MANIFEST.csv, train that recipe without it "
                   "(into --out/GENERATOR, resumable) and report AP on it (clean, JPEG 75, 0.5x downscale).")
@click.option("--generators", default=None, help="With --leave-one-out: only these generators (comma-separated); with "
              "--token-cache: only these folds (names as in the report, e.g. sdxl+sdxl_turbo).")
@click.option("--epochs", type=int, default=None, help="With --leave-one-out: override the config's epochs.")
@click.option("--max-train-images", type=int, default=None, help="With --leave-one-out: cap each fold's training set.")
@click.option("--seed", type=int, default=None,
              help="With --leave-one-out: override train.seed (initialisation, order, held-out real-only share).")
@click.option("--max-images-per-source", type=int, default=None,
              help="With --leave-one-out: score at most this many held-out images per source.")
@click.option("--token-cache", "cache_dir", type=click.Path(path_type=Path), default=None,
              help="With --leave-one-out: train and score each fold on cached outputs of the frozen trunk kept in "
                   "this folder (minutes a fold instead of hours), over the folds of the fold plan (small "
                   "generators grouped), with out-of-fold calibration, threshold and false-positive rates.")
@click.option("--max-fpr", type=float, default=0.05, show_default=True,
              help="With --token-cache: the threshold flags at most this share of the out-of-fold real photos.")
@click.option("--bf16", is_flag=True, help="With --token-cache: run the trunk in bfloat16 on the CPU (2x faster).")
def eval_cmd(data_dir, model_path, out_dir, threshold, robustness, batch_size, holdout_config, threads, loo_config,
             generators, epochs, max_train_images, seed, max_images_per_source, cache_dir, max_fpr, bf16):
    """AP per source, mAP per family, total mAP, global AP and accuracy on labelled folders; with
    --leave-one-out, AP on each generator by a model trained without it."""
    from scanner.model.weights import load_detector
    from scanner.training.evaluate import evaluate, format_markdown

    _threads(threads)
    if cache_dir is not None:
        if loo_config is None:
            from scanner.errors import ScannerError

            raise ScannerError("--token-cache needs --leave-one-out CONFIG")
        _cached_leave_one_out(list(data_dir), out_dir, loo_config, cache_dir, generators, epochs, seed, max_fpr, bf16)
        return
    data_dir = data_dir[0] if len(data_dir) == 1 else list(data_dir)
    if loo_config is not None:
        _leave_one_out(data_dir, out_dir, loo_config, generators, epochs, max_train_images, seed, max_images_per_source)
        return
    model, info = load_detector(model_path)
    samples = None
    if holdout_config is not None:
        from scanner.config import load_config
        from scanner.training.data import find_samples, split_by_source

        tc = load_config(holdout_config).train
        _, samples = split_by_source(find_samples(data_dir), tuple(tc.val_sources), tc.real_only_val_share, tc.seed)
    report = evaluate(model, info, data_dir, batch_size=batch_size, threshold=threshold, robustness=robustness,
                      out_dir=out_dir, console=_console(), samples=samples)
    click.echo(format_markdown(report))
    click.echo(f"report written to {out_dir}", err=True)


def _cached_leave_one_out(data_dirs, out_dir, config_path, cache_dir, folds, epochs, seed, max_fpr, bf16):
    import dataclasses

    from scanner.config import load_config
    from scanner.training.cached_loo import cached_leave_one_out, format_markdown

    cfg = load_config(config_path)
    changes = {k: v for k, v in (("epochs", epochs), ("seed", seed)) if v is not None}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
    report = cached_leave_one_out(cfg, data_dirs, out_dir, cache_dir, folds=folds.split(",") if folds else None,
                                  max_fpr=max_fpr, bf16=bf16, log=lambda msg: click.echo(f"scanner: {msg}", err=True))
    click.echo(format_markdown(report))
    click.echo(f"report written to {out_dir}/leave_one_out.json", err=True)


def _leave_one_out(data_dir, out_dir, config_path, generators, epochs, max_train_images, seed, max_images_per_source):
    import dataclasses

    from scanner.config import load_config
    from scanner.training.leave_one_out import format_markdown, leave_one_out

    cfg = load_config(config_path)
    changes = {k: v for k, v in (("epochs", epochs), ("max_train_images", max_train_images), ("seed", seed))
               if v is not None}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
    report = leave_one_out(cfg, data_dir, out_dir, generators=generators.split(",") if generators else None,
                           max_images_per_source=max_images_per_source, console=_console(),
                           log=lambda msg: click.echo(f"scanner: {msg}", err=True))
    click.echo(format_markdown(report))
    click.echo(f"report written to {out_dir}/leave_one_out.json", err=True)


@main.command(name="export")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Detector weights (.safetensors); default: the shipped model.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for global.onnx, local_fuser.onnx and export.json.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset.")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="torch.onnx exporter (torchscript: PyTorch's deprecated one, no onnxscript needed).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check ONNX Runtime against PyTorch on random inputs and print the parity report.")
def export_cmd(model_path, out_dir, opset, exporter, verify):
    """Export the detector as two ONNX graphs (global; local+fuser) for onnxruntime and TensorRT."""
    from scanner.backends.export import export_onnx, verify_onnx
    from scanner.model.weights import load_detector

    model, info = load_detector(model_path)
    result = export_onnx(model, info, out_dir, opset=opset, exporter=exporter)
    click.echo(f"exported {info.model_id} (opset {opset}, {exporter}) -> {result.out_dir}", err=True)
    if verify:
        report = verify_onnx(result.out_dir, model)
        click.echo(report.format())
        if not report.ok:
            click.echo("scanner: ONNX Runtime does not match PyTorch within tolerance; do not serve this export", err=True)
            sys.exit(1)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
def samples(directory):
    """Write a few real photographs (shipped inside scikit-image) to DIRECTORY, to try a scan."""
    from scanner.samples import write_samples

    paths = write_samples(directory)
    click.echo(f"wrote {len(paths)} images to {directory}", err=True)


@main.command()
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="A shipped model's name or a weights file; default: the default model.")
def info(model_path):
    """Show the model's name, hash, threshold and config, and the models that ship (`--model NAME`)."""
    import json

    from scanner.model.weights import read_info, shipped_models

    mi = read_info(model_path)
    payload = {"model": mi.model_id, "path": str(mi.path), "threshold": mi.threshold,
               "config": json.loads(mi.metadata["config"])}
    if "calibration" in mi.metadata:
        payload["calibration"] = json.loads(mi.metadata["calibration"])
    payload["shipped"] = shipped_models()
    click.echo(json.dumps(payload, indent=2))


@main.command(name="explain")
@click.argument("image")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Detector weights (.safetensors); default: the shipped model.")
@click.option("--backend", default="torch", show_default=True,
              help="Backend for score and boxes; heatmap and attention come from the torch model of the same "
                   "weights when the backend gives none.")
@click.option("--engines", "engines_dir", type=click.Path(path_type=Path), default=None,
              help="Engine folder, for the tensorrt backend.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="PNG to write; default: IMAGE_STEM.explain.png in the current directory.")
@click.option("--threads", type=int, default=None, help="Torch intra-op threads.")
def explain_cmd(image, model_path, backend, engines_dir, out, threads):
    """Draw why the model scores IMAGE as it does: activation heatmap, the six patches and their attention
    weights, score and label (a PNG 1200 px wide). IMAGE: a file or an archive member id (a.tar::member)."""
    from scanner.reports.explain import explain_file

    _threads(threads)
    expl, path = explain_file(image, model_path=model_path, backend=backend, out=out, threads=threads,
                              engines_dir=engines_dir)
    click.echo(f"{expl.label} {expl.score:.4f} (threshold {expl.threshold:.4g}, model {expl.model_id}, "
               f"backend {expl.backend}) -> {path}", err=True)


@main.command(name="report")
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("report.html"), show_default=True,
              help="HTML file to write (self-contained: figures inline, no network).")
@click.option("--top", "top_n", type=int, default=50, show_default=True,
              help="Thumbnails of the N most synthetic images (0: none).")
@click.option("--eval-report", "eval_report", type=click.Path(path_type=Path), default=None,
              help="The --out folder of `scanner eval`: adds PR curves per source and the robustness plots.")
@click.option("--title", default=None, help="Page title; default: 'Scan report: RESULTS'.")
@click.option("--threshold", type=float, default=None,
              help="Threshold line on the histogram; default: inferred from the labels.")
@click.option("--log-counts", is_flag=True, help="Log-scaled count axis on the score histogram.")
def report_cmd(results, out, top_n, eval_report, title, threshold, log_counts):
    """One self-contained HTML report of a scan's RESULTS (JSONL): counts, score histogram, errors by kind,
    thumbnails of the most synthetic images with their patches, and an evaluation's curves."""
    from scanner.reports.report import write_report

    path = write_report(results, out, top_n=top_n, eval_report=eval_report, title=title, threshold=threshold,
                        log_counts=log_counts)
    click.echo(f"report written to {path} ({path.stat().st_size / 1e6:.2f} MB)", err=True)


if __name__ == "__main__":
    main()
