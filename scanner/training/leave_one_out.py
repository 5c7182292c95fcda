"""Leave-one-generator-out evaluation: how well the detector does on a generator it never saw.

For each generator named in the data's MANIFEST.csv (the real-only photo sources name none), the
training config's recipe is run with `val_sources` = that generator's sources, for its fixed number
of epochs, into OUT/<generator>/ (resumable: scanner.training.train continues from its checkpoint). Then the
run's LAST weights score the held-out images: no choice (best epoch, threshold) is made on them.

Held-out images are the generator's sources (fakes with their own reals) plus the share of the
real-only sources that training never saw (train.real_only_val_share, split with the config's seed),
which fake-only sources such as Stable Diffusion are scored against (scanner.training.evaluate's rule).
Each is scored clean, after JPEG at quality 75, and after a 0.5x downscale. A generator's AP is the
mean AP over its held-out sources; the summary is the mean over generators.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from scanner.config import Config
from scanner.errors import ScannerError
from scanner.training.data import find_samples, jpeg_compress, read_manifest, split_by_source


def downscale(img: Image.Image, factor: float = 0.5) -> Image.Image:
    """Resize by `factor` (bicubic, antialiased), as a re-upload at lower resolution would."""
    w, h = img.size
    return img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BICUBIC)


def _jpeg75(img: Image.Image) -> Image.Image:
    return jpeg_compress(img, 75)


CONDITIONS = {"clean": None, "jpeg75": _jpeg75, "downscale0.5": downscale}


def generators_of(data_dir) -> dict[str, list[str]]:
    """generator -> its sources, from MANIFEST.csv (sources without a generator are left out)."""
    manifest = read_manifest(data_dir)
    if not manifest:
        raise ScannerError(f"leave-one-out needs a MANIFEST.csv (source -> generator) in {data_dir}")
    out: dict[str, list[str]] = {}
    for source, meta in sorted(manifest.items()):
        gen = (meta.get("generator") or "").strip()
        if gen and gen != "none":
            out.setdefault(gen, []).append(source)
    return out


# Generators with too few images (or too close a relative) for a fold of their own are held out
# together with the generator named here: the fold then tests both as unseen at once.
FOLD_GROUPS = {
    "majesty_diffusion": "disco_diffusion",  # 21 images; a fork of Disco Diffusion
    "biggan": "stylegan",  # 20 images; the other 2018-19 GAN
    "sdxl_turbo": "sdxl",  # 35 images; a distilled SDXL
}


def fold_plan(data_dir, groups: dict[str, str] | None = None) -> dict[str, list[str]]:
    """fold name -> held-out sources: one fold per generator, small ones grouped (FOLD_GROUPS).

    A grouped fold is named after its generators joined by '+', e.g. 'disco_diffusion+majesty_diffusion'.
    """
    groups = FOLD_GROUPS if groups is None else groups
    generators = generators_of(data_dir)
    members: dict[str, list[str]] = {}
    for gen in generators:
        lead = groups.get(gen, gen) if groups.get(gen) in generators else gen
        members.setdefault(lead, []).append(gen)
    plan = {}
    for lead, gens in sorted(members.items()):
        gens = [lead] + sorted(g for g in gens if g != lead)
        plan["+".join(gens)] = sorted(src for g in gens for src in generators[g])
    return plan


def fold_config(cfg: Config, sources: list[str]) -> Config:
    """The recipe with `sources` held out, and no early stopping: stopping on the held-out AP would
    be a choice made on the data the fold is judged on."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, val_sources=tuple(sources), patience=10**6))


def score_fold(model, held_out, generator_sources: list[str], *, batch_size: int = 32,
               max_images_per_source: int | None = None, num_workers: int = 0) -> dict:
    """Per-condition AP of each held-out source of the generator, and their mean."""
    from scanner.training.evaluate import _subsample, per_source_ap, score_samples

    samples = _subsample(held_out, max_images_per_source)
    labels = np.asarray([s.label for s in samples])
    out = {"images": len(samples), "fakes": int(labels.sum()), "conditions": {}}
    for name, transform in CONDITIONS.items():
        scores = score_samples(model, samples, batch_size=batch_size, transform=transform, num_workers=num_workers)
        aps = {src: ap for src, ap in per_source_ap(samples, scores).items() if src in generator_sources}
        known = [ap for ap in aps.values() if ap is not None]
        out["conditions"][name] = {"per_source_ap": aps, "ap": float(np.mean(known)) if known else None}
    return out


def run_fold(cfg: Config, data_dir, out_dir: Path, generator: str, sources: list[str], *,
             max_images_per_source: int | None = None, console=None) -> dict:
    """Train without `generator` (or resume/reuse that training) and score its held-out images."""
    from scanner.model.weights import load_detector
    from scanner.training.train import train

    fold = fold_config(cfg, sources)
    run_dir = out_dir / generator
    done = run_dir / "last.safetensors"
    history = run_dir / "history.json"
    finished = history.is_file() and len(json.loads(history.read_text())) >= fold.train.epochs and done.is_file()
    if not finished:
        train(fold, data_dir, run_dir, name=f"loo-{generator}", max_val_images=200, console=console)
    model, _ = load_detector(done)
    _, held_out = split_by_source(find_samples(data_dir), fold.train.val_sources, fold.train.real_only_val_share,
                                  fold.train.seed)
    result = score_fold(model, held_out, sources, max_images_per_source=max_images_per_source)
    result.update(generator=generator, sources=sources, weights=str(done))
    (run_dir / "holdout.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def leave_one_out(cfg: Config, data_dir, out_dir, *, generators: list[str] | None = None,
                  max_images_per_source: int | None = None, console=None, log=print) -> dict:
    """Every fold (or those of `generators`), then the means; writes OUT/leave_one_out.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    available = generators_of(data_dir)
    chosen = generators or sorted(available)
    unknown = [g for g in chosen if g not in available]
    if unknown:
        raise ScannerError(f"unknown generators {unknown}; MANIFEST.csv names {sorted(available)}")
    folds = {}
    for gen in chosen:
        log(f"fold {gen}: training without {', '.join(available[gen])}")
        folds[gen] = run_fold(cfg, data_dir, out_dir, gen, available[gen],
                              max_images_per_source=max_images_per_source, console=console)
        log(f"fold {gen}: AP " + ", ".join(f"{c} {_fmt(v['ap'])}" for c, v in folds[gen]["conditions"].items()))
    summary = {}
    for cond in CONDITIONS:
        aps = [f["conditions"][cond]["ap"] for f in folds.values() if f["conditions"][cond]["ap"] is not None]
        summary[cond] = {"mean_ap": float(np.mean(aps)) if aps else None, "min_ap": float(min(aps)) if aps else None}
    report = {"folds": folds, "summary": summary, "epochs": cfg.train.epochs, "seed": cfg.train.seed,
              "max_train_images": cfg.train.max_train_images, "max_images_per_source": max_images_per_source}
    (out_dir / "leave_one_out.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "leave_one_out.md").write_text(format_markdown(report))
    return report


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_markdown(report: dict) -> str:
    conds = list(CONDITIONS)
    lines = ["| held-out generator | sources | " + " | ".join(f"AP {c}" for c in conds) + " |",
             "|---|---|" + "---:|" * len(conds)]
    for gen, fold in report["folds"].items():
        lines.append(f"| {gen} | {', '.join(fold['sources'])} | "
                     + " | ".join(_fmt(fold["conditions"][c]["ap"]) for c in conds) + " |")
    lines.append("| **mean** | | " + " | ".join(f"**{_fmt(report['summary'][c]['mean_ap'])}**" for c in conds) + " |")
    lines.append("| min | | " + " | ".join(_fmt(report["summary"][c]["min_ap"]) for c in conds) + " |")
    return "\n".join(lines) + "\n"
