"""Lite0 (trained on the dev pool only) against the CLIP recipe's leave-one-out scores, on the folds
whose generators lie wholly outside dev: for both models these generators are unseen.

    python research/lite0_vs_clip.py --loo runs/loo_clip --data DATA_DIR/dev DATA_DIR/extra DATA_DIR/photoreal \
        --lite0-results runs/lite0_unseen.jsonl [--write-list runs/lite0_unseen.txt]

First with --write-list: the images to score; then `scanner run --model lite0 --from-list LIST --out
RESULTS`; then again with --lite0-results. Each fold's AP uses the images that fold held out (its
fakes and paired reals, the held-out share of the real-only photos), as the leave-one-out report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loo", required=True, help="a cached leave-one-out output folder")
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--write-list", default=None)
    parser.add_argument("--lite0-results", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from scanner.config import load_config
    from scanner.training.data import find_samples, read_manifest, split_by_source
    from scanner.training.evaluate import per_source_ap
    from scanner.training.leave_one_out import fold_plan

    report = json.loads((Path(args.loo) / "leave_one_out.json").read_text())
    # a report of research/loo_logit_mean.py has no config of its own: its runs share one split
    run_cfg = report.get("config") or json.loads((Path(report["runs"][0]) / "leave_one_out.json").read_text())["config"]
    cfg = load_config(None, {"train": {"real_only_val_share": run_cfg["train"]["real_only_val_share"],
                                       "seed": run_cfg["train"]["seed"]}})
    dev = {s for s in read_manifest(args.data[0])}
    samples = find_samples(args.data)
    plan = {f: src for f, src in fold_plan(args.data).items() if not set(src) & dev}
    held_of = {f: split_by_source(samples, tuple(src), cfg.train.real_only_val_share, cfg.train.seed)[1]
               for f, src in plan.items()}
    if args.write_list:
        paths = sorted({str(s.path) for held in held_of.values() for s in held})
        Path(args.write_list).write_text("\n".join(paths) + "\n")
        print(f"{len(paths)} images in {len(plan)} folds -> {args.write_list}")
        return 0
    scores = {}
    for line in Path(args.lite0_results).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("score") is not None:
            scores[rec["id"]] = rec["score"]
    rows = {}
    for fold, sources in plan.items():
        held = [s for s in held_of[fold] if str(s.path) in scores]
        aps = per_source_ap(held, np.array([scores[str(s.path)] for s in held]))
        lite0 = float(np.mean([aps[s] for s in sources if aps.get(s) is not None]))
        rows[fold] = {"lite0": lite0, "clip_b16": report["folds"][fold]["conditions"]["clean"]["ap"],
                      "scored": len(held), "held": len(held_of[fold])}
        print(f"| {fold} | {lite0:.3f} | {rows[fold]['clip_b16']:.3f} |")
    means = {m: float(np.mean([r[m] for r in rows.values()])) for m in ("lite0", "clip_b16")}
    print(f"| **mean** | **{means['lite0']:.3f}** | **{means['clip_b16']:.3f}** |")
    if args.json:
        Path(args.json).write_text(json.dumps({"folds": rows, "mean": means}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
