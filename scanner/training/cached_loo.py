"""Leave-one-generator-out on cached trunk outputs, out-of-fold calibration and false-positive rates.

    scanner eval --leave-one-out CONFIG --token-cache CACHE --data POOL [--data POOL ...] --out OUT

For each fold of scanner.training.leave_one_out.fold_plan (one per generator, small ones grouped), the
recipe's trainable part (embedding, AFFM, head) is trained from scratch on the cached tokens of
every image outside the fold (real-only sources: the recipe's training share), for the recipe's
fixed epochs, and scores the fold's held-out images clean, after JPEG q75 and after a 0.5x
downscale. No choice is made on the held-out images.

Out-of-fold (OOF) scores: each image of a fold's sources is scored by the model that did not see
its generator; the held-out share of the real-only photos (never trained on in any fold) gets the
mean logit of all folds. From them:
- Platt calibration (scanner.training.calibration), and its expected calibration error measured across
  folds (each fold's images calibrated by a fit on the other folds' OOF scores);
- the threshold: the calibrated score at which at most `max_fpr` of the OOF real photos are
  flagged (0.5 when that already holds), and at it the false-positive rate of every real-photo
  source and the share of fakes caught per fold.
Report: OUT/leave_one_out.json and .md; per-fold OOF logits in OUT/folds/<fold>.npz (a rerun
reuses the folds already done).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from scanner.config import Config
from scanner.errors import ScannerError
from scanner.training.calibration import expected_calibration_error, fit_platt, platt, reliability_table
from scanner.training.data import find_samples, read_manifest, split_by_source
from scanner.training.leave_one_out import CONDITIONS, fold_plan
from scanner.training.token_training import (
    load_tokens,
    logits_of,
    open_cache,
    patch_columns,
    train_on_tokens,
    training_conditions,
)

# Sources whose fakes have real counterparts of the same content: their AP is free of the
# "art means synthetic" shortcut the fake-only sources invite (data README), so it is reported apart.
CONTENT_PAIRED_PREFIXES = ("pix2pix_", "cyclegan_", "stylegan2_faces")


def run_fold(model, tokens, labels, train_idx, held_idx, train_conds, cfg, columns, log) -> dict[str, np.ndarray]:
    """Train the head without the fold; the held-out images' logits per evaluation condition."""
    model.reset_trainable(cfg.train.seed)
    train_on_tokens(model, [tokens[c][train_idx] for c in train_conds], labels[train_idx], cfg.train,
                    columns=columns, log=None)
    return {cond: logits_of(model, tokens[cond][held_idx], columns).numpy() for cond in CONDITIONS}


def cached_leave_one_out(cfg: Config, data_dirs, out_dir, cache_dir, *, folds: list[str] | None = None,
                         max_fpr: float = 0.05, bf16: bool = False, log=print) -> dict:
    out_dir = Path(out_dir)
    (out_dir / "folds").mkdir(parents=True, exist_ok=True)
    samples = find_samples(data_dirs)
    plan = fold_plan(data_dirs)
    if folds:
        unknown = [f for f in folds if f not in plan]
        if unknown:
            raise ScannerError(f"unknown folds {unknown}; the data's folds are {sorted(plan)}")
        plan = {f: plan[f] for f in folds}
    model, cache = open_cache(cfg, cache_dir, seed=cfg.train.seed)
    columns = patch_columns(cache.model.cfg, cfg.model)
    train_conds = training_conditions(cache, cfg)
    tokens = load_tokens(cache, samples, list(dict.fromkeys(list(CONDITIONS) + train_conds)), bf16=bf16, log=log)
    labels = torch.tensor([s.label for s in samples])
    index = {s.path: i for i, s in enumerate(samples)}

    fold_logits = {}
    for fold, sources in plan.items():
        train, held = split_by_source(samples, tuple(sources), cfg.train.real_only_val_share, cfg.train.seed)
        train_idx = torch.tensor([index[s.path] for s in train])
        held_idx = np.array([index[s.path] for s in held])
        saved = out_dir / "folds" / f"{fold}.npz"
        if saved.is_file() and np.array_equal(np.load(saved)["index"], held_idx):
            logits = {cond: np.load(saved)[cond] for cond in CONDITIONS}
        else:
            logits = run_fold(model, tokens, labels, train_idx, held_idx, train_conds, cfg, columns, log)
            np.savez(saved, index=held_idx, **logits)
        fold_logits[fold] = (held_idx, logits)
        result = fold_result(samples, held_idx, sources, logits, {})
        log(f"fold {fold}: AP " + ", ".join(f"{c} {_fmt(v['ap'])}" for c, v in result["conditions"].items()))

    report = report_from_fold_logits(samples, plan, read_manifest(data_dirs), fold_logits, max_fpr)
    report.update({"config": json.loads(cfg.to_json()), "token_cache": str(cache.dir), "patch_columns": columns})
    (out_dir / "leave_one_out.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "leave_one_out.md").write_text(format_markdown(report))
    return report


def fold_result(samples, held_idx, sources, logits: dict[str, np.ndarray], manifest: dict) -> dict:
    """One fold's report entry: AP per source and its mean, per evaluation condition."""
    from scanner.training.evaluate import per_source_ap

    held = [samples[i] for i in held_idx]
    result = {"sources": list(sources), "family": manifest.get(sources[0], {}).get("family", ""), "images": len(held),
              "conditions": {}}
    for cond in CONDITIONS:
        aps = {src: ap for src, ap in per_source_ap(held, _sigmoid(logits[cond])).items() if src in sources}
        known = [ap for ap in aps.values() if ap is not None]
        result["conditions"][cond] = {"per_source_ap": aps, "ap": float(np.mean(known)) if known else None}
    return result


def report_from_fold_logits(samples, plan: dict, manifest: dict, fold_logits: dict, max_fpr: float = 0.05) -> dict:
    """The leave-one-out report from each fold's held-out logits: fold_logits[fold] = (held indices
    into `samples`, {condition: logits}). Folds, summary, family means and, with several folds, the
    out-of-fold calibration, threshold and false-positive rates."""
    report_folds = {fold: fold_result(samples, held_idx, plan[fold], logits, manifest)
                    for fold, (held_idx, logits) in fold_logits.items()}
    summary = {cond: _mean_min([f["conditions"][cond]["ap"] for f in report_folds.values()]) for cond in CONDITIONS}
    families = sorted({f["family"] for f in report_folds.values()})
    family_means = {fam: {cond: _mean_min([f["conditions"][cond]["ap"] for f in report_folds.values()
                                           if f["family"] == fam])["mean_ap"] for cond in CONDITIONS}
                    for fam in families}
    report = {"folds": report_folds, "summary": summary, "family_means": family_means}
    if len(fold_logits) > 1:
        report.update(_oof_analysis(samples, *out_of_fold_logits(samples, plan, fold_logits), manifest, max_fpr))
    return report


def out_of_fold_logits(samples, plan: dict, fold_logits: dict) -> tuple[dict, dict]:
    """({sample index: (fold, clean logit)} for each held-out generator's images, {sample index:
    [clean logits]} for the held-out real-only photos, which every fold scores)."""
    oof, real_only_logits = {}, {}
    for fold, (held_idx, logits) in fold_logits.items():
        for i, z in zip(held_idx, logits["clean"]):
            if samples[i].source in plan[fold]:
                oof[int(i)] = (fold, float(z))
            else:
                real_only_logits.setdefault(int(i), []).append(float(z))
    return oof, real_only_logits


def _oof_analysis(samples, oof: dict, real_only_logits: dict, manifest: dict, max_fpr: float) -> dict:
    """Calibration, threshold, false-positive rates and catch rates from the out-of-fold logits."""
    idx, fold_of, z, y = oof_arrays(samples, oof, real_only_logits)
    a, b = fit_platt(z, y)
    # Cross-fold calibration error: each fold's images calibrated by a fit without them (the shared
    # real-only photos are split evenly among the folds for this).
    cross = np.zeros_like(z)
    names = sorted({f for f in fold_of if f})
    shared = np.flatnonzero(fold_of == "")
    for k, name in enumerate(names):
        mine = (fold_of == name)
        mine[shared[k::len(names)]] = True
        fa, fb = fit_platt(z[~mine], y[~mine])
        cross[mine] = platt(z[mine], fa, fb)
    probs = platt(z, a, b)
    threshold = _threshold(probs[y == 0], max_fpr)
    real_fpr, caught = {}, {}
    for i, p, label, f in zip(idx, probs, y, fold_of):
        source = samples[i].source
        if label == 0:
            real_fpr.setdefault(source, []).append(p >= threshold)
        else:
            caught.setdefault(f, []).append(p >= threshold)
    family = {src: meta.get("family", "") for src, meta in manifest.items()}
    return {
        "calibration": {"method": "platt", "a": a, "b": b, "images": len(z), "synthetic": int(y.sum()),
                        "ece_cross_fold": expected_calibration_error(cross, y),
                        "ece_in_sample": expected_calibration_error(probs, y),
                        "raw_ece": expected_calibration_error(_sigmoid(z), y),
                        "reliability": reliability_table(cross, y)},
        "threshold": {"score": threshold, "max_fpr": max_fpr,
                      "real_flagged": float(np.mean(probs[y == 0] >= threshold)),
                      "fakes_caught": float(np.mean(probs[y == 1] >= threshold)),
                      "fpr_by_real_source": {s: {"images": len(v), "flagged": float(np.mean(v)),
                                                 "family": family.get(s, "")} for s, v in sorted(real_fpr.items())},
                      "caught_by_fold": {f: {"images": len(v), "caught": float(np.mean(v))}
                                         for f, v in sorted(caught.items())}},
    }


def oof_arrays(samples, oof: dict, real_only_logits: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sample indices, fold names, logits, labels) of the out-of-fold set: each held-out generator's
    images once (fold name set), each held-out real-only photo once with its mean logit over the
    folds that scored it (fold name "")."""
    items = [(i, fold, z) for i, (fold, z) in oof.items()]
    items += [(i, None, float(np.mean(zs))) for i, zs in real_only_logits.items()]
    idx = np.array([i for i, _, _ in items])
    fold_of = np.array([f or "" for _, f, _ in items], dtype=object)
    z = np.array([v for _, _, v in items])
    return idx, fold_of, z, np.array([samples[i].label for i in idx])


def _threshold(real_probs: np.ndarray, max_fpr: float) -> float:
    """0.5, or the smallest score above which at most max_fpr of the real photos fall."""
    if np.mean(real_probs >= 0.5) <= max_fpr:
        return 0.5
    return float(np.quantile(real_probs, 1.0 - max_fpr, method="higher") + 1e-9)


def _sigmoid(z) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def _mean_min(values) -> dict:
    known = [v for v in values if v is not None]
    return {"mean_ap": float(np.mean(known)) if known else None, "min_ap": float(min(known)) if known else None}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_markdown(report: dict) -> str:
    conds = list(CONDITIONS)
    lines = ["| held-out fold | sources | " + " | ".join(f"AP {c}" for c in conds) + " |",
             "|---|---|" + "---:|" * len(conds)]
    for name, fold in report["folds"].items():
        lines.append(f"| {name} | {', '.join(fold['sources'])} | "
                     + " | ".join(_fmt(fold["conditions"][c]["ap"]) for c in conds) + " |")
    lines.append("| **mean** | | " + " | ".join(f"**{_fmt(report['summary'][c]['mean_ap'])}**" for c in conds) + " |")
    lines.append("| min | | " + " | ".join(_fmt(report["summary"][c]["min_ap"]) for c in conds) + " |")
    if report.get("family_means"):
        lines += ["", "Mean over the folds of each family:", "", "| family | " + " | ".join(f"AP {c}" for c in conds)
                  + " |", "|---|" + "---:|" * len(conds)]
        lines += [f"| {fam or '-'} | " + " | ".join(_fmt(means[c]) for c in conds) + " |"
                  for fam, means in report["family_means"].items()]
    paired = [(src, fold["conditions"][c]["per_source_ap"].get(src), c) for fold in report["folds"].values()
              for src in fold["sources"] if src.startswith(CONTENT_PAIRED_PREFIXES) for c in conds]
    if paired:
        lines += ["", "Content-paired sources (fakes with real images of the same content):", "",
                  "| source | " + " | ".join(f"AP {c}" for c in conds) + " |", "|---|" + "---:|" * len(conds)]
        for src in dict.fromkeys(p[0] for p in paired):
            lines.append(f"| {src} | " + " | ".join(_fmt(ap) for s, ap, _ in paired if s == src) + " |")
    if "threshold" in report:
        t, cal = report["threshold"], report["calibration"]
        lines += ["", f"Calibration (Platt, out-of-fold): a = {cal['a']:.4f}, b = {cal['b']:.4f}; expected calibration "
                  f"error across folds {cal['ece_cross_fold']:.4f} (uncalibrated {cal['raw_ece']:.4f}).",
                  "", f"Threshold {t['score']:.4f}: real photos flagged {t['real_flagged']:.3f}, fakes caught "
                  f"{t['fakes_caught']:.3f} (out-of-fold).", "", "| real-photo source | images | flagged |",
                  "|---|---:|---:|"]
        lines += [f"| {s} | {v['images']} | {v['flagged']:.3f} |" for s, v in t["fpr_by_real_source"].items()]
        lines += ["", "| fold | fakes | caught |", "|---|---:|---:|"]
        lines += [f"| {f} | {v['images']} | {v['caught']:.3f} |" for f, v in t["caught_by_fold"].items()]
        lines += ["", "Reliability (cross-fold calibrated scores):", "",
                  "| score range | images | real | synthetic | mean score | share synthetic |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in cal["reliability"]:
            lines.append(f"| {row['range'][0]:g}-{row['range'][1]:g} | {row['images']} | {row['real']} | "
                         f"{row['synthetic']} | {_fmt(row['mean_score'])} | {_fmt(row['share_synthetic'])} |")
    return "\n".join(lines) + "\n"
