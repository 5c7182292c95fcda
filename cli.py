"""The `scanner` command line: parses options, calls the library, presents output on stderr.

User errors (scanner.errors.ScannerError) become one line and exit code 2; bugs keep their traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


class _Group(click.Group):
    def invoke(self, ctx):
        from scanner.errors import ScannerError

        try:
            return super().invoke(ctx)
        except ScannerError as exc:
            click.echo(f"scanner: error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group)
@click.version_option(package_name="scanner")
def main():
    """Tell AI-synthesized images (GANs, diffusion, face swaps) from real photographs."""


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="JSONL file to write.")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Detector weights (.safetensors); default: the shipped model.")
@click.option("--batch-size", default=16, show_default=True, help="Images per inference batch.")
@click.option("--threshold", type=float, default=None, help="Score at or above which the label is synthetic; default: the model's calibrated threshold.")
@click.option("--max-pixels", default=50_000_000, show_default=True, help="Refuse larger images (decompression bombs).")
@click.option("--threads", type=int, default=None, help="Torch intra-op threads (default: torch's choice).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(directory, out, model_path, batch_size, threshold, max_pixels, threads, quiet):
    """Scan every file under DIRECTORY and write one JSON line per file to --out."""
    from scanner.errors import ScannerError
    from scanner.scan import scan
    from scanner.weights import load_detector

    if not directory.is_dir():
        raise ScannerError(f"{str(directory)!r} is not a directory; pass a folder of images to scan")
    _threads(threads)
    console = None if quiet else _console()
    model, info = load_detector(model_path)
    summary = scan(directory, out, model, info, batch_size=batch_size, threshold=threshold,
                   max_pixels=max_pixels, console=console)
    click.echo(
        f"scanned {summary.scanned} files ({summary.errors} errors) in {summary.seconds:.1f} s, "
        f"{summary.images_per_s:.1f} images/s, model {info.model_id} -> {out}",
        err=True,
    )


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Folder in the CNNDetection layout: <root>/<source>/0_real|1_fake/.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="YAML overrides of the paper's defaults.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (weights, checkpoint, config.yaml); rerun with the same folder to resume.")
@click.option("--name", default="detector", show_default=True, help="Model name recorded in the weights.")
@click.option("--epochs", type=int, default=None, help="Override train.epochs.")
@click.option("--val-sources", default=None, help="Comma-separated sources held out for validation.")
@click.option("--max-val-images", type=int, default=600, show_default=True, help="Cap on validation images per epoch.")
@click.option("--threads", type=int, default=None, help="Torch intra-op threads.")
def train(data_dir, config_path, out_dir, name, epochs, val_sources, max_val_images, threads):
    """Train the detector (BCE, Adam 1e-4, blur/JPEG augmentation) with validation and resume."""
    from scanner.config import load_config
    from scanner.train import train as run_training

    overrides: dict = {"train": {}}
    if epochs is not None:
        overrides["train"]["epochs"] = epochs
    if val_sources:
        overrides["train"]["val_sources"] = [s.strip() for s in val_sources.split(",") if s.strip()]
    cfg = load_config(config_path, overrides)
    _threads(threads)
    result = run_training(cfg, data_dir, out_dir, name=name, max_val_images=max_val_images, console=_console())
    click.echo(
        f"best epoch {result.best_epoch}: validation AP {result.best_ap:.4f}, threshold {result.threshold:.4f} "
        f"-> {out_dir / 'best.safetensors'}",
        err=True,
    )


@main.command(name="eval")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Labelled folder (CNNDetection layout).")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None, help="Weights; default: the shipped model.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("eval-report"), show_default=True,
              help="Folder for report.json, report.md and plots.")
@click.option("--threshold", type=float, default=None, help="Accuracy threshold; default: the model's.")
@click.option("--robustness", is_flag=True, help="Add the blur and JPEG sweeps (Fig. 3) as PNG plots.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--holdout", "holdout_config", type=click.Path(path_type=Path), default=None,
              help="Training config (YAML): evaluate only the images its training run held out.")
@click.option("--threads", type=int, default=None, help="Torch intra-op threads.")
def eval_cmd(data_dir, model_path, out_dir, threshold, robustness, batch_size, holdout_config, threads):
    """AP per source, mAP per family, total mAP, global AP and accuracy on labelled folders."""
    from scanner.evaluate import evaluate, format_markdown
    from scanner.weights import load_detector

    _threads(threads)
    model, info = load_detector(model_path)
    samples = None
    if holdout_config is not None:
        from scanner.config import load_config
        from scanner.data import find_samples, split_by_source

        tc = load_config(holdout_config).train
        _, samples = split_by_source(find_samples(data_dir), tuple(tc.val_sources), tc.real_only_val_share, tc.seed)
    report = evaluate(model, info, data_dir, batch_size=batch_size, threshold=threshold, robustness=robustness,
                      out_dir=out_dir, console=_console(), samples=samples)
    click.echo(format_markdown(report))
    click.echo(f"report written to {out_dir}", err=True)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
def samples(directory):
    """Write a few real photographs (shipped inside scikit-image) to DIRECTORY, to try a scan."""
    from scanner.samples import write_samples

    paths = write_samples(directory)
    click.echo(f"wrote {len(paths)} images to {directory}", err=True)


@main.command()
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None)
def info(model_path):
    """Show the model's name, hash, threshold and config."""
    import json

    from scanner.weights import read_info

    mi = read_info(model_path)
    click.echo(json.dumps({"model": mi.model_id, "path": str(mi.path), "threshold": mi.threshold,
                           "config": json.loads(mi.metadata["config"])}, indent=2))


if __name__ == "__main__":
    main()
