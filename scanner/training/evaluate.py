"""Evaluation as in the paper (Table 2, Fig. 3): AP per source, mAP per family, total mAP, global AP,
accuracy at the model's threshold, and optional robustness sweeps under Gaussian blur and JPEG.

Data is a folder in the CNNDetection layout (<root>/<source>/0_real|1_fake/), optionally with a
MANIFEST.csv mapping sources to generator and family. Every image is scored once per condition;
all metrics are computed from those scores with scikit-learn's average precision.

Sources with one class only cannot have an AP of their own. The rule (also written into the report's
"notes"): a fake-only source (e.g. Stable Diffusion fakes without real images of their own) is scored
against all images of the real-only sources; a real-only source gets no AP (ap = None) but its
accuracy is reported.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from scanner.errors import ScannerError
from scanner.training.data import ImageDataset, Sample, collate, find_samples, gaussian_blur, jpeg_compress, read_manifest
from scanner.training.metrics import accuracy, average_precision

BLUR_SIGMAS = (0, 1, 2, 3, 4)
JPEG_QUALITIES = (100, 90, 80, 70, 60, 50, 40, 30)
UNKNOWN_FAMILY = "unknown"

PAIRING_NOTE = (
    "Sources with only fake images (e.g. diffusion fakes without real images of their own) are scored "
    "against all images of the real-only sources ({reals}); sources with only real images get no AP "
    "(ap = null) but their accuracy is reported. total_map is the mean AP over sources that have an AP "
    "(both classes of their own, or fake-only paired as above); per-family mAP is the mean over the "
    "family's sources that have an AP; global_ap ranks all images of all sources together."
)


# --------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_samples(
    model,
    samples: list[Sample],
    *,
    batch_size: int = 32,
    transform=None,
    num_workers: int = 0,
    progress=None,
    task=None,
) -> np.ndarray:
    """Probability of "synthetic" for each sample, in the order of `samples`: (N,) float64.

    `transform(PIL) -> PIL` is applied to every image before scoring (e.g. blur or JPEG); with
    num_workers > 0 it must be picklable (a module-level function or a functools.partial of one).
    """
    scores = np.full(len(samples), np.nan, dtype=np.float64)
    if not samples:
        return scores
    loader = DataLoader(
        ImageDataset(samples, transform=transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
    )
    model.eval()
    for images, _, index in loader:
        probs = torch.sigmoid(model(images).logits.float()).cpu().numpy()  # (B,)
        scores[index.numpy()] = probs
        if progress is not None:
            progress.advance(task, len(images))
    return scores


# --------------------------------------------------------------------------------------------- metrics


def _none_if_nan(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _source_groups(samples: list[Sample]) -> dict[str, np.ndarray]:
    """source -> indices of its samples (sorted by source name)."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.source, []).append(i)
    return {k: np.asarray(groups[k], dtype=np.int64) for k in sorted(groups)}


def _ap_index_sets(samples: list[Sample]) -> tuple[dict[str, np.ndarray | None], list[str]]:
    """source -> indices its AP is computed on (None: no AP), and the real-only sources.

    Both-class sources use their own images; fake-only sources add every image of the real-only
    sources; real-only sources (and fake-only ones when there is no real-only source) get None.
    """
    labels = np.asarray([s.label for s in samples])
    groups = _source_groups(samples)
    kinds = {src: set(labels[idx].tolist()) for src, idx in groups.items()}
    real_only = [src for src, k in kinds.items() if k == {0}]
    real_pool = np.concatenate([groups[src] for src in real_only]) if real_only else np.zeros(0, np.int64)
    out: dict[str, np.ndarray | None] = {}
    for src, idx in groups.items():
        if kinds[src] == {0, 1}:
            out[src] = idx
        elif kinds[src] == {1} and real_pool.size:
            out[src] = np.concatenate([idx, real_pool])
        else:
            out[src] = None
    return out, real_only


def _summary(samples: list[Sample], scores: np.ndarray, threshold: float) -> dict:
    """global_ap, total_map, accuracy and per-source AP for one set of scores."""
    labels = np.asarray([s.label for s in samples])
    ap_sets, _ = _ap_index_sets(samples)
    per_source = {
        src: (_none_if_nan(average_precision(labels[idx], scores[idx])) if idx is not None else None)
        for src, idx in ap_sets.items()
    }
    return {
        "global_ap": _none_if_nan(average_precision(labels, scores)),
        "total_map": _mean_or_none(per_source.values()),
        "accuracy": _none_if_nan(accuracy(labels, scores, threshold)),
        "per_source_ap": per_source,
    }


def per_source_ap(samples: list[Sample], scores: np.ndarray) -> dict[str, float | None]:
    """AP of each source under the module's pairing rule (None where a source has none)."""
    return _summary(samples, scores, 0.5)["per_source_ap"]


def _subsample(samples: list[Sample], limit: int | None, seed: int = 0) -> list[Sample]:
    """At most `limit` images per source, seeded: one image of each class first (when the limit allows),
    then the classes in proportion to their counts."""
    if limit is None:
        return samples
    if limit < 1:
        raise ScannerError(f"max_images_per_source is {limit}; expected a positive number of images (or none)")
    rng = random.Random(seed)
    keep: set[Sample] = set()
    for idx in _source_groups(samples).values():
        group = [samples[i] for i in idx]
        if len(group) <= limit:
            keep.update(group)
            continue
        ranked = []
        for label in sorted({s.label for s in group}):
            members = sorted((s for s in group if s.label == label), key=lambda s: str(s.path))
            rng.shuffle(members)
            # Key: the first of each class before everything, then evenly spaced within the class.
            ranked += [((-1.0 if j == 0 else (j + 0.5) / len(members)), label, j, s) for j, s in enumerate(members)]
        ranked.sort(key=lambda r: r[:3])
        keep.update(r[3] for r in ranked[:limit])
    return [s for s in samples if s in keep]  # original (find_samples) order


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(
    model,
    info,
    data_dir,
    *,
    batch_size: int = 32,
    threshold: float | None = None,
    robustness: bool = False,
    out_dir=None,
    console=None,
    max_images_per_source: int | None = None,
    num_workers: int = 1,
    samples: list[Sample] | None = None,
) -> dict:
    """Evaluate `model` (a Detector in eval mode, described by ModelInfo `info`) on `data_dir`.

    Returns a JSON-serialisable report (no NaN: missing values are None); see the module docstring
    for the metrics. With `out_dir`, writes report.json, report.md, scores.csv (the clean score of
    every image, for `scanner report`'s PR curves) and (with `robustness`) the plots
    robustness_blur.png and robustness_jpeg.png there.
    """
    threshold = float(info.threshold if threshold is None else threshold)
    if not math.isfinite(threshold):
        raise ScannerError(f"threshold is {threshold}; expected a probability between 0 and 1")
    if batch_size < 1:
        raise ScannerError(f"batch_size is {batch_size}; expected a positive integer")
    if num_workers < 0:
        raise ScannerError(f"num_workers is {num_workers}; expected 0 or more")

    # `samples` restricts the evaluation to a subset of data_dir (e.g. a training run's held-out split).
    samples = _subsample(find_samples(data_dir) if samples is None else samples, max_images_per_source)
    manifest = read_manifest(data_dir)
    labels = np.asarray([s.label for s in samples])
    groups = _source_groups(samples)

    def family_of(source: str) -> str:
        if not manifest:
            return source
        return (manifest.get(source) or {}).get("family") or UNKNOWN_FAMILY

    conditions: list[tuple[str, float | int, object]] = []
    if robustness:
        conditions += [("blur", s, functools.partial(gaussian_blur, sigma=s)) for s in BLUR_SIGMAS if s > 0]
        conditions += [("jpeg", q, functools.partial(jpeg_compress, quality=q)) for q in JPEG_QUALITIES]

    with _progress(console) as progress:
        task = progress.add_task("score", total=len(samples)) if progress is not None else None
        scores = score_samples(model, samples, batch_size=batch_size, num_workers=num_workers,
                               progress=progress, task=task)
        sweep_scores = []
        for kind, value, transform in conditions:
            name = f"blur sigma={value}" if kind == "blur" else f"jpeg q={value}"
            task = progress.add_task(name, total=len(samples)) if progress is not None else None
            sweep_scores.append(score_samples(model, samples, batch_size=batch_size, transform=transform,
                                              num_workers=num_workers, progress=progress, task=task))

    base = _summary(samples, scores, threshold)
    _, real_only = _ap_index_sets(samples)
    per_source = {}
    for src, idx in groups.items():
        entry = {
            "ap": base["per_source_ap"][src],
            "acc": _none_if_nan(accuracy(labels[idx], scores[idx], threshold)),
            "real": int((labels[idx] == 0).sum()),
            "fake": int((labels[idx] == 1).sum()),
            "family": family_of(src),
        }
        if manifest.get(src, {}).get("generator"):
            entry["generator"] = manifest[src]["generator"]
        if entry["real"] == 0 and real_only:
            entry["paired_with"] = list(real_only)
        per_source[src] = entry

    families: dict[str, list[str]] = {}
    for src, entry in per_source.items():
        families.setdefault(entry["family"], []).append(src)
    per_family = {
        fam: {
            "map": _mean_or_none(per_source[s]["ap"] for s in srcs),
            "sources": srcs,
            "images": int(sum(per_source[s]["real"] + per_source[s]["fake"] for s in srcs)),
        }
        for fam, srcs in sorted(families.items())
    }

    notes = [PAIRING_NOTE.format(reals=", ".join(real_only) if real_only else "none present")]
    fake_only_unpaired = [s for s, e in per_source.items() if e["real"] == 0 and not real_only]
    if fake_only_unpaired:
        notes.append(f"fake-only sources without any real-only source to pair with (ap = null): "
                     f"{', '.join(fake_only_unpaired)}")
    if max_images_per_source is not None:
        notes.append(f"at most {max_images_per_source} images per source (seeded subsample: one per class, "
                     "then the classes in proportion)")
    if manifest:
        missing = sorted(s for s in groups if s not in manifest)
        if missing:
            notes.append(f"sources missing from MANIFEST.csv (family '{UNKNOWN_FAMILY}'): {', '.join(missing)}")
    else:
        notes.append("no MANIFEST.csv: every source is its own family")

    report = {
        "model": info.model_id,
        "model_path": str(info.path),
        "data": str(data_dir),
        "threshold": threshold,
        "images": len(samples),
        "real": int((labels == 0).sum()),
        "fake": int((labels == 1).sum()),
        "per_source": per_source,
        "per_family": per_family,
        "total_map": base["total_map"],
        "global_ap": base["global_ap"],
        "accuracy": base["accuracy"],
        "notes": notes,
        # The effective config beside every output (docs/design.md, "Conventions", rule 5).
        "config": {
            "model": dataclasses.asdict(info.config),
            "evaluate": {"batch_size": batch_size, "threshold": threshold, "robustness": robustness,
                         "max_images_per_source": max_images_per_source},
        },
    }
    if robustness:
        rob = {"blur": [], "jpeg": []}
        # sigma 0 is the identity transform (gaussian_blur returns the image): reuse the clean scores.
        rob["blur"].append({"sigma": 0, **_point(base)})
        for (kind, value, _), sc in zip(conditions, sweep_scores):
            key = "sigma" if kind == "blur" else "quality"
            rob[kind].append({key: value, **_point(_summary(samples, sc, threshold))})
        report["robustness"] = rob

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (out / "report.md").write_text(format_markdown(report), encoding="utf-8")
        write_scores_csv(out / "scores.csv", samples, scores)
        if robustness:
            plot_robustness(report["robustness"], out)
    return report


def write_scores_csv(path, samples: list[Sample], scores: np.ndarray) -> None:
    """One row per image: path, source, label (0 real, 1 fake), score (the clean condition)."""
    import csv

    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
        writer = csv.writer(fh)
        writer.writerow(("path", "source", "label", "score"))
        for s, score in zip(samples, scores):
            writer.writerow((str(s.path), s.source, int(s.label), repr(float(score))))


def _point(summary: dict) -> dict:
    return {"global_ap": summary["global_ap"], "total_map": summary["total_map"], "accuracy": summary["accuracy"]}


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(console):
    if console is None:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


# ------------------------------------------------------------------------------------------- outputs


def plot_robustness(robustness: dict, out_dir) -> list[Path]:
    """Fig. 3 style plots: AP against blur sigma and against JPEG quality. Returns the PNG paths."""
    # The Agg canvas is used directly: no GUI backend, no pyplot global state touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    paths = []
    for kind, key, xlabel in (("blur", "sigma", "Gaussian blur sigma"), ("jpeg", "quality", "JPEG quality")):
        points = robustness.get(kind) or []
        fig = Figure(figsize=(4.5, 3.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        xs = [p[key] for p in points]
        for metric, label, marker in (("global_ap", "global AP", "o"), ("total_map", "mAP", "s")):
            ys = [np.nan if p[metric] is None else p[metric] for p in points]
            ax.plot(xs, ys, marker=marker, label=label)
        if kind == "jpeg":
            ax.invert_xaxis()  # stronger compression to the right, as in the paper
        ax.set_xlabel(xlabel)
        ax.set_ylabel("AP")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left")
        ax.set_title(f"Robustness to {'blur' if kind == 'blur' else 'JPEG compression'}")
        fig.tight_layout()
        path = out / f"robustness_{kind}.png"
        fig.savefig(path, format="png")
        paths.append(path)
    return paths


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def format_markdown(report: dict) -> str:
    """The report as Markdown: header, a table per source, per family, totals, robustness, notes."""
    lines = [
        "# Evaluation report",
        "",
        f"- model: `{report['model']}`",
        f"- data: `{report['data']}`",
        f"- images: {report['images']}" + (
            f" ({report['real']} real, {report['fake']} fake)" if "real" in report else ""),
        f"- threshold: {_fmt(report['threshold'])}",
        "",
        "## Per source",
        "",
        "| source | family | real | fake | AP | acc |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for src, e in report["per_source"].items():
        name = _cell(src) + (" *" if e.get("paired_with") else "")
        lines.append(f"| {name} | {_cell(e['family'])} | {e['real']} | {e['fake']} | {_fmt(e['ap'])} | {_fmt(e['acc'])} |")
    if any(e.get("paired_with") for e in report["per_source"].values()):
        lines += ["", "\\* fake-only source, AP computed against the real-only sources' images."]
    lines += ["", "## Per family", "", "| family | sources | mAP |", "|---|---:|---:|"]
    for fam, e in report["per_family"].items():
        count = len(e["sources"]) if "sources" in e else ""
        lines.append(f"| {_cell(fam)} | {count} | {_fmt(e['map'])} |")
    lines += [
        "", "## Totals", "", "| metric | value |", "|---|---:|",
        f"| total mAP | {_fmt(report['total_map'])} |",
        f"| global AP | {_fmt(report['global_ap'])} |",
        f"| accuracy @ {_fmt(report['threshold'], 3)} | {_fmt(report['accuracy'])} |",
    ]
    rob = report.get("robustness")
    if rob:
        for kind, key, title in (("blur", "sigma", "Gaussian blur"), ("jpeg", "quality", "JPEG compression")):
            lines += ["", f"## Robustness: {title}", "", f"| {key} | global AP | mAP |", "|---:|---:|---:|"]
            for p in rob.get(kind, []):
                lines.append(f"| {p[key]} | {_fmt(p['global_ap'])} | {_fmt(p['total_map'])} |")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
