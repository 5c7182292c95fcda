"""How much of a leave-one-out result is the seed? Two or more runs of one recipe at different seeds.

    python research/loo_seed_noise.py runs/loo_seed0 runs/loo_seed1 \
        --data DATA_DIR/dev DATA_DIR/extra DATA_DIR/photoreal [--json OUT]

The seed of `scanner eval --leave-one-out` draws two things: the head's initialisation and batch
order, and which 30% of the real-only photos are held out as every fold's negatives. Per fold and
condition this reports the AP of each run on its own held-out images (what the reports say), then,
on the images every run held out, the AP of each run and of the runs' mean logit: the first
difference is the whole seed effect, the second the initialisation's alone, the third what a
seed ensemble of heads would add. Reads the per-fold logits of the runs' OUT/folds/<fold>.npz.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fold_ap(held, logits: np.ndarray, sources) -> float:
    """The leave-one-out report's fold AP: the mean AP of the fold's sources (scanner.training.cached_loo)."""
    from scanner.training.evaluate import per_source_ap

    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    aps = [ap for src, ap in per_source_ap(held, probs).items() if src in sources and ap is not None]
    return float(np.mean(aps))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="leave-one-out output folders of one recipe at different seeds")
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        raise SystemExit("give at least two leave-one-out folders")

    from scanner.training.data import find_samples
    from scanner.training.leave_one_out import CONDITIONS, fold_plan

    samples, plan = find_samples(args.data), fold_plan(args.data)
    folds = {}
    for fold, sources in plan.items():
        files = [Path(run) / "folds" / f"{fold}.npz" for run in args.runs]
        if not all(f.is_file() for f in files):
            continue  # a fold not every run has finished
        runs = [dict(np.load(f)) for f in files]
        common = sorted(set.intersection(*(set(r["index"].tolist()) for r in runs)))
        held_common = [samples[i] for i in common]
        row = {"common_images": len(common), "common_real": sum(s.label == 0 for s in held_common)}
        for cond in CONDITIONS:
            own = [fold_ap([samples[i] for i in r["index"]], r[cond], sources) for r in runs]
            on_common = []
            for r in runs:
                where = {int(i): j for j, i in enumerate(r["index"])}
                on_common.append(np.array([r[cond][where[i]] for i in common]))
            row[cond] = {"own": own, "common": [fold_ap(held_common, z, sources) for z in on_common],
                         "common_mean_logit": fold_ap(held_common, np.mean(on_common, axis=0), sources)}
        folds[fold] = row
    if not folds:
        raise SystemExit("no fold is finished in every run")

    summary = {}
    for cond in CONDITIONS:
        own = np.array([f[cond]["own"] for f in folds.values()])
        common = np.array([f[cond]["common"] for f in folds.values()])
        ens = np.array([f[cond]["common_mean_logit"] for f in folds.values()])
        summary[cond] = {"own_means": own.mean(0).round(4).tolist(), "common_means": common.mean(0).round(4).tolist(),
                         "common_mean_logit": round(float(ens.mean()), 4),
                         "fold_spread_own": round(float((own.max(1) - own.min(1)).mean()), 4),
                         "fold_spread_common": round(float((common.max(1) - common.min(1)).mean()), 4)}
        s = summary[cond]
        print(f"{cond}: {len(folds)} folds; own held-out sets {s['own_means']} (fold spread {s['fold_spread_own']:.3f}); "
              f"common images {s['common_means']} (spread {s['fold_spread_common']:.3f}); mean logit {s['common_mean_logit']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": args.runs, "folds": folds, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
