"""Is the training mix what limits the CLIP detector on unseen generators? (issue 20)

    python research/clip_training_mix_probe.py --data DATA_DIR/dev DATA_DIR/extra DATA_DIR/photoreal \
        --work runs/clip_pooling --json docs/clip_training_mix_probe.json

Two questions, answered with the leave-one-generator-out linear probes of research/clip_pooling_probe.py
(its cached global-view features, --work; the 21 folds; trained on clean + JPEG q75 features):

1. Weighting. The pools are uneven: a few sources hold hundreds of images (ImageNet photos, FFHQ
   photos, the Stable Diffusion v1 samples), others 20. Does giving each group the same total weight
   help a generator never seen? Schemes: `class` (the two classes weigh the same: what training does),
   `source` (every source's fakes and every source's reals weigh the same), `generator` (every
   generator's fakes weigh the same, every source's reals too); the classes weigh the same in each.
2. Data. Would more generators help? Each fold's probe is also trained on a random subset of k of the
   other 20 fold units (whole sources: their fakes and their content-paired reals leave together;
   the real-only photo sources stay), repeated --repeats times with different subsets. If the mean AP
   still rises from k = 10 to k = 20, more generators are worth more than any change of recipe on
   these features; if it has levelled off, the features are the limit.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clip_pooling_probe import SETS  # noqa: E402  (research/ sibling)
from feature_probe import ap_summary, cached_features, fold_aps, fold_setup  # noqa: E402

SCHEMES = ("class", "source", "generator")


def group_weights(train, scheme: str, generator_of: dict[str, str]) -> np.ndarray:
    """One weight per training sample: every group of `scheme` the same total, each class half the total."""
    labels = np.array([s.label for s in train])
    if scheme == "class":
        keys = [str(s.label) for s in train]
    elif scheme == "source":
        keys = [f"{s.source}/{s.label}" for s in train]
    elif scheme == "generator":
        keys = [f"gen:{generator_of[s.source]}" if s.label else f"real:{s.source}" for s in train]
    else:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {SCHEMES}")
    _, inverse, counts = np.unique(np.array(keys), return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    for label in (0, 1):
        weights[labels == label] *= len(train) / 2 / weights[labels == label].sum()
    return weights


def keep_units(folds: dict, units: int, seed: int):
    """select() for feature_probe.fold_aps: each fold keeps `units` of the other fold units (drawn with
    `seed`) and every source outside the plan (the real-only photos)."""
    unit_of = {src: fold for fold, sources in folds.items() for src in sources}

    def select(fold, train):
        kept = set(random.Random(f"{seed}/{fold}").sample(sorted(f for f in folds if f != fold), units))
        return [s for s in train if s.source not in unit_of or unit_of[s.source] in kept]

    return select


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="the pools, each with its MANIFEST.csv")
    parser.add_argument("--work", default="runs/clip_pooling", help="clip_pooling_probe.py's feature cache")
    parser.add_argument("--features", default="cls", choices=list(SETS))
    parser.add_argument("--units", type=int, nargs="+", default=[2, 5, 10, 15],
                        help="training fold units kept for the data curve (all 20 is the weighting run)")
    parser.add_argument("--repeats", type=int, default=3, help="random subsets per number of units")
    parser.add_argument("--c", type=float, default=0.01, help="inverse L2 strength, as clip_pooling_probe.py")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from scanner.training.leave_one_out import generators_of

    samples, folds, work = fold_setup(args.data, args.work)
    generator_of = {src: gen for gen, sources in generators_of(args.data).items() for src in sources}

    def stale(todo):
        parser.error(f"{work} holds no features of these images: run research/clip_pooling_probe.py first")

    feats = {cond: cached_features(work / f"feats_{cond}.npz", samples, stale) for cond in ("clean", "jpeg75")}
    x = {cond: np.concatenate([f[p].reshape(len(samples), -1) for p in SETS[args.features]], 1).astype(np.float32)
         for cond, f in feats.items()}

    def report(label: str, aps: dict, start: float) -> dict:
        row = {"ap": aps, **ap_summary(aps)}
        print(f"{label:<24} " + "  ".join(f"{cond} mean {row['mean_ap'][cond]:.3f} min {row['min_ap'][cond]:.3f}"
                                         for cond in aps) + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
        return row

    weighting = {}
    for scheme in SCHEMES:
        start = time.perf_counter()
        weigh = partial(group_weights, scheme=scheme, generator_of=generator_of)
        weighting[scheme] = report(f"weights {scheme}", fold_aps(samples, x, folds, args.c, weigh=weigh), start)
    curve = []
    for units in args.units:
        runs = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            runs.append(report(f"{units} units, subset {repeat}",
                               fold_aps(samples, x, folds, args.c, select=keep_units(folds, units, repeat)),
                               start))
        curve.append({"units": units, "runs": runs,
                      "mean_ap": {cond: float(np.mean([r["mean_ap"][cond] for r in runs])) for cond in x}})
    curve.append({"units": len(folds) - 1, "runs": [weighting["class"]], "mean_ap": weighting["class"]["mean_ap"]})
    for point in curve:
        print(f"{point['units']:>2} training units: " + "  ".join(f"{c} {v:.3f}" for c, v in point["mean_ap"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"features": args.features, "c": args.c, "images": len(samples),
                                              "folds": folds, "weighting": weighting, "data_curve": curve},
                                             indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
