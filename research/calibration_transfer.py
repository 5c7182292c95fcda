"""Does a calibration fitted on one leave-one-out run hold on another run? (issue 20)

    python research/calibration_transfer.py --calibration docs/loo_clip_b16_heads_seed0.json \
        runs/loo_cls_s1 runs/loo_pooled_s1 --data DATA_DIR/dev DATA_DIR/extra DATA_DIR/photoreal

The shipped model's Platt calibration (a, b) and its threshold come from one leave-one-out report
(--calibration: the seed-0 run). Another run of the same recipe (the runs given: their fold logits are
averaged, as research/loo_logit_mean.py does; a different seed holds out other real photos and draws
other initialisations) gives other out-of-fold logits. On those, the shipped (a, b) and threshold are
applied as they are, beside that run's own fit: expected calibration error, real photos flagged and
fakes caught at the threshold. If the shipped pair's figures are close to the run's own, the score and
the threshold do not hang on the one run that chose them. --thresholds tries others with the shipped (a, b).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loo_logit_mean import mean_fold_logits  # noqa: E402  (research/ sibling)


def figures(z: np.ndarray, y: np.ndarray, a: float, b: float, threshold: float) -> dict:
    from scanner.training.calibration import expected_calibration_error, platt

    probs = platt(z, a, b)
    return {"a": a, "b": b, "threshold": threshold, "ece": expected_calibration_error(probs, y),
            "real_flagged": float(np.mean(probs[y == 0] >= threshold)),
            "fakes_caught": float(np.mean(probs[y == 1] >= threshold))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="leave-one-out output folders of another run (same seed)")
    parser.add_argument("--calibration", required=True, help="the leave-one-out report the shipped model took")
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--thresholds", type=float, nargs="*", default=[],
                        help="other thresholds to try with the shipped calibration")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from scanner.training.cached_loo import oof_arrays, out_of_fold_logits, report_from_fold_logits
    from scanner.training.data import find_samples, read_manifest
    from scanner.training.leave_one_out import fold_plan

    shipped = json.loads(Path(args.calibration).read_text())
    samples, plan = find_samples(args.data), fold_plan(args.data)
    fold_logits = mean_fold_logits(args.runs, plan)
    _, _, z, y = oof_arrays(samples, *out_of_fold_logits(samples, plan, fold_logits))
    own = report_from_fold_logits(samples, {f: plan[f] for f in fold_logits}, read_manifest(args.data), fold_logits)
    rows = {
        "shipped calibration and threshold": figures(z, y, shipped["calibration"]["a"], shipped["calibration"]["b"],
                                                     shipped["threshold"]["score"]),
        "this run's own fit": figures(z, y, own["calibration"]["a"], own["calibration"]["b"], own["threshold"]["score"]),
    }
    for t in args.thresholds:
        rows[f"shipped calibration at {t}"] = figures(z, y, shipped["calibration"]["a"], shipped["calibration"]["b"], t)
    print(f"{len(fold_logits)} folds, {len(z)} out-of-fold images ({int(y.sum())} synthetic)")
    for name, row in rows.items():
        print(f"{name:<34} a {row['a']:.3f} b {row['b']:.3f} threshold {row['threshold']:.3f}: ECE {row['ece']:.3f}, "
              f"real flagged {row['real_flagged']:.3f}, fakes caught {row['fakes_caught']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration_from": args.calibration, "runs": args.runs,
                                              "folds": len(fold_logits), "images": len(z), "rows": rows},
                                             indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
