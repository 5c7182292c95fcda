"""The leave-one-out report of several recipes' mean logit: would averaging their heads help?

    python research/loo_logit_mean.py runs/loo_cls_s1 runs/loo_pooled_s1 \
        --data DATA_DIR/dev DATA_DIR/extra DATA_DIR/photoreal --out runs/loo_mean_s1

The runs must be of the same data and seed (so every fold held out the same images); each fold's
logits are averaged over the runs and the report is built as `scanner eval --leave-one-out` builds
its own (scanner.training.cached_loo.report_from_fold_logits): fold AP per condition, family means,
out-of-fold Platt calibration, the 5% FPR threshold and the fakes caught at it. Folds not finished
in every run are left out. Writes OUT/leave_one_out.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mean_fold_logits(runs: list[str], plan: dict) -> dict:
    """fold -> (held-out sample indices, {condition: the runs' mean logits}), for the folds every run finished."""
    from scanner.training.leave_one_out import CONDITIONS

    fold_logits = {}
    for fold in plan:
        files = [Path(run) / "folds" / f"{fold}.npz" for run in runs]
        if not all(f.is_file() for f in files):
            continue
        loaded = [np.load(f) for f in files]
        if any(not np.array_equal(r["index"], loaded[0]["index"]) for r in loaded[1:]):
            raise SystemExit(f"fold {fold}: the runs held out different images (another seed?); "
                             "use research/loo_seed_noise.py for runs at different seeds")
        fold_logits[fold] = (loaded[0]["index"], {c: np.mean([r[c] for r in loaded], axis=0) for c in CONDITIONS})
    if not fold_logits:
        raise SystemExit("no fold is finished in every run")
    return fold_logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="leave-one-out output folders (same data, same seed)")
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from scanner.training.cached_loo import format_markdown, report_from_fold_logits
    from scanner.training.data import find_samples, read_manifest
    from scanner.training.leave_one_out import fold_plan

    samples, plan = find_samples(args.data), fold_plan(args.data)
    fold_logits = mean_fold_logits(args.runs, plan)
    report = report_from_fold_logits(samples, {f: plan[f] for f in fold_logits}, read_manifest(args.data),
                                     fold_logits)
    report["runs"] = args.runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "leave_one_out.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "leave_one_out.md").write_text(format_markdown(report))
    for cond, values in report["summary"].items():
        print(f"{cond}: {len(fold_logits)} folds, mean AP {values['mean_ap']:.3f}, min {values['min_ap']:.3f}")
    if "threshold" in report:
        t = report["threshold"]
        print(f"threshold {t['score']:.3f}: real photos flagged {t['real_flagged']:.3f}, fakes caught {t['fakes_caught']:.3f}; "
              f"ECE across folds {report['calibration']['ece_cross_fold']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
