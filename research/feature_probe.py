"""Leave-one-generator-out linear probes on frozen ImageNet EfficientNet-Lite0 features (issue 7).

    python research/feature_probe.py --data DATA_DIR/dev --work runs/probe --json docs/feature_probe_lite0.json

Asks what the backbone's features can tell apart on a generator never seen, before any training
recipe is tried: each image's global view (224x224, bilinear) goes through the pretrained Lite0 once
per condition (clean, JPEG q75); the mean and standard deviation over space of every block's output
are that depth's features (cached in --work as feats_<condition>.npz). For each generator of
MANIFEST.csv, a logistic regression (standardised features, balanced classes) is fitted on the
other generators' training split, as `scanner eval --leave-one-out` splits it (held-out real share
0.3, seed 0), and scored by AP on the held-out sources, per depth and for two ways of training: on
clean features, and on clean plus JPEG q75 features (JPEG augmentation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONDITIONS = ("clean", "jpeg75")
DEPTHS = {"b2": ["b2"], "b3": ["b3"], "b4": ["b4"], "b5": ["b5"], "b6": ["b6"], "head": ["head"],
          "b3-b6": ["b3", "b4", "b5", "b6"], "b2-head": ["b2", "b3", "b4", "b5", "b6", "head"]}


def extract(samples, condition: str, batch: int = 64) -> dict[str, np.ndarray]:
    """Pooled (mean, std over space) outputs of every Lite0 block and of the head, per sample."""
    import timm
    import torch
    from PIL import Image

    from scanner.model.backbones import load_lite0_imagenet
    from scanner.training.data import jpeg_compress

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, global_pool="")
    load_lite0_imagenet(net)
    net.eval()
    feats: dict[str, list] = {}

    def keep(name):
        def hook(module, inputs, output):
            feats.setdefault(name, []).append(torch.cat([output.mean((2, 3)), output.std((2, 3))], 1))
        return hook

    for i, block in enumerate(net.blocks):
        block.register_forward_hook(keep(f"b{i}"))
    net.bn2.register_forward_hook(keep("head"))
    views = []
    for n, sample in enumerate(samples):
        img = Image.open(sample.path).convert("RGB")
        if condition == "jpeg75":
            img = jpeg_compress(img, 75)
        img = img.resize((224, 224), Image.BILINEAR)
        views.append(torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5))
        if len(views) == batch or n == len(samples) - 1:
            with torch.inference_mode():
                net(torch.stack(views))  # Lite0's TF weights expect [-1, 1]
            views = []
            print(f"{condition}: {n + 1}/{len(samples)} images", file=sys.stderr, flush=True)
    return {name: torch.cat(parts).numpy() for name, parts in feats.items()}


def clip_global_views(samples, condition: str, batch: int = 32, make_views=None, workers: int = 1):
    """Yields (global views, CLIP-normalised (B, 3, 224, 224); their rows in `samples`) under the
    leave-one-out condition (clean, jpeg75, downscale0.5), with progress on stderr. make_views(uint8
    images) -> (B, 3, 224, 224) in [0, 1] replaces the global view (scanner.model.preprocess) if given;
    `workers` decode processes."""
    import time

    import torch
    from torch.utils.data import DataLoader

    from scanner.model.clip_vit import CLIP_MEAN, CLIP_STD
    from scanner.model.preprocess import global_views
    from scanner.training.data import ImageDataset, collate
    from scanner.training.leave_one_out import CONDITIONS as TRANSFORMS

    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    loader = DataLoader(ImageDataset(samples, transform=TRANSFORMS[condition]), batch_size=batch,
                        num_workers=workers, collate_fn=collate)
    done, start = 0, time.perf_counter()
    for images, _, index in loader:
        yield ((make_views or global_views)(images) - mean) / std, index.numpy()
        done += len(images)
        print(f"{condition}: {done}/{len(samples)} images, {done / (time.perf_counter() - start):.1f}/s",
              file=sys.stderr, flush=True)


def cached_features(cache: Path, samples, extract_fn) -> dict[str, np.ndarray]:
    """extract_fn(samples) -> {name: (N, F) array}, kept in the .npz cache while the sample paths match."""
    paths = [str(s.path) for s in samples]
    if cache.is_file():
        data = np.load(cache)
        if "paths" in data.files and list(data["paths"]) == paths:
            return {k: data[k] for k in data.files if k not in ("paths", "labels")}
    out = extract_fn(samples)
    np.savez(cache, paths=np.array(paths), labels=np.array([s.label for s in samples]), **out)
    return out


def features(samples, condition: str, work: Path) -> dict[str, np.ndarray]:
    return cached_features(work / f"feats_{condition}.npz", samples, lambda todo: extract(todo, condition))


def fold_setup(data: list[str], work: str) -> tuple[list, dict[str, list[str]], Path]:
    """(samples, leave-one-out folds, work folder made) for a probe over the pools `data`; torch on 2 threads."""
    import torch

    from scanner.training.data import find_samples
    from scanner.training.leave_one_out import fold_plan

    torch.set_num_threads(2)
    folder = Path(work)
    folder.mkdir(parents=True, exist_ok=True)
    return find_samples(data), fold_plan(data), folder


def fit_probe(x: np.ndarray, y: np.ndarray, c: float, sample_weight: np.ndarray | None = None, logit: bool = False):
    """A logistic regression on standardised features, classes balanced (or weighted by sample_weight,
    which then has to balance them itself); returns its scorer (probabilities, or logits with `logit`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=3000, class_weight=None if sample_weight is not None else "balanced")
    clf.fit(scaler.transform(x), y, sample_weight=sample_weight)
    if logit:
        return lambda z: clf.decision_function(scaler.transform(z))
    return lambda z: clf.predict_proba(scaler.transform(z))[:, 1]


def probe_parts(x) -> list[dict]:
    """fold_aps' features as a list of {condition: (N, F)} dicts, one per probe."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def fold_aps(samples, x, folds: dict, c: float, augment: bool = True, *, select=None, weigh=None) -> dict:
    """condition -> fold -> held-out AP of a probe per leave-one-out fold, fitted on the fold's training split
    (clean features, plus the JPEG q75 ones with `augment`); x: condition -> (N, F) features of `samples`,
    or a list of such dicts: one probe each, scored by the mean of their logits (as the detector's heads).
    select(fold, train) -> the training samples to keep; weigh(train) -> a weight per training sample."""
    from scanner.training.data import split_by_source

    parts = probe_parts(x)
    index = {s.path: i for i, s in enumerate(samples)}
    labels = np.array([s.label for s in samples])
    out: dict[str, dict] = {cond: {} for cond in parts[0]}
    copies = 2 if augment else 1
    for fold, sources in folds.items():
        train, held = split_by_source(samples, tuple(sources), 0.3, 0)
        if select is not None:
            train = select(fold, train)
        tr, te = [index[s.path] for s in train], [index[s.path] for s in held]
        weights = np.concatenate([weigh(train)] * copies) if weigh is not None else None
        logits = {cond: 0.0 for cond in out}
        for part in parts:
            fit_x = np.concatenate([part["clean"][tr], part["jpeg75"][tr]]) if augment else part["clean"][tr]
            # One probe: its probabilities, as before; several: their logits, averaged.
            score = fit_probe(fit_x, np.concatenate([labels[tr]] * copies), c, weights, logit=len(parts) > 1)
            for cond in out:
                logits[cond] = logits[cond] + score(part[cond][te]) / len(parts)
        for cond in out:
            out[cond][fold] = held_out_ap(held, logits[cond], sources)
    return out


def feature_set_parser(doc: str, work: str, work_help: str, sets) -> argparse.ArgumentParser:
    """The command line of the probes that compare named feature sets on the leave-one-out folds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="one or more data folders (pools)")
    parser.add_argument("--work", default=work, help=work_help)
    parser.add_argument("--sets", nargs="+", default=list(sets), choices=list(sets))
    parser.add_argument("--c", type=float, default=0.01, help="inverse L2 strength of the logistic regression")
    parser.add_argument("--json", default=None)
    return parser


def ap_summary(aps: dict) -> dict:
    """{mean_ap, min_ap}: per condition, the mean and the lowest of fold_aps' per-fold APs."""
    return {"mean_ap": {cond: float(np.mean(list(v.values()))) for cond, v in aps.items()},
            "min_ap": {cond: float(np.min(list(v.values()))) for cond, v in aps.items()}}


def feature_set_rows(samples, folds: dict, names, features_of, c: float) -> list[dict]:
    """One row per feature set: its fold APs (fold_aps) and their mean and min per condition, printed as
    each set finishes; features_of(name) -> {condition: (N, F) float32 features of `samples`}, or a list
    of such dicts (probes whose logits are averaged)."""
    import time

    rows = []
    for name in names:
        start = time.perf_counter()
        x = features_of(name)
        aps = fold_aps(samples, x, folds, c)
        dims = sum(part["clean"].shape[1] for part in probe_parts(x))
        row = {"features": name, "dims": int(dims), "ap": aps, **ap_summary(aps)}
        rows.append(row)
        print(f"{name:<18} " + "  ".join(f"{cond} mean {row['mean_ap'][cond]:.3f} min {row['min_ap'][cond]:.3f}"
                                         for cond in aps) + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def held_out_ap(held, scores: np.ndarray, sources) -> float:
    """Mean AP over the held-out generator's sources (each against the held-out reals)."""
    from scanner.training.evaluate import per_source_ap

    return float(np.mean([ap for src, ap in per_source_ap(held, scores).items() if src in sources and ap is not None]))


def probe(samples, feats: dict, generators: dict, depth: list[str], augment: bool, c: float) -> dict:
    from scanner.training.data import split_by_source

    index = {s.path: i for i, s in enumerate(samples)}
    labels = np.array([s.label for s in samples])
    x = {cond: np.concatenate([feats[cond][d] for d in depth], 1) for cond in CONDITIONS}
    out: dict[str, dict] = {cond: {} for cond in CONDITIONS}
    for gen, sources in sorted(generators.items()):
        train, held = split_by_source(samples, tuple(sources), 0.3, 0)
        tr, te = [index[s.path] for s in train], [index[s.path] for s in held]
        fit_x = np.concatenate([x["clean"][tr], x["jpeg75"][tr]]) if augment else x["clean"][tr]
        fit_y = np.concatenate([labels[tr]] * (2 if augment else 1))
        score = fit_probe(fit_x, fit_y, c)
        for cond in CONDITIONS:
            out[cond][gen] = held_out_ap(held, score(x[cond][te]), sources)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", default="runs/probe", help="feature cache")
    parser.add_argument("--c", type=float, default=0.1, help="inverse L2 strength of the logistic regression")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from scanner.training.data import find_samples
    from scanner.training.leave_one_out import generators_of

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    samples = find_samples(args.data)
    generators = generators_of(args.data)
    feats = {cond: features(samples, cond, work) for cond in CONDITIONS}
    rows = []
    for augment in (False, True):
        for name, depth in DEPTHS.items():
            aps = probe(samples, feats, generators, depth, augment, args.c)
            rows.append({"features": name, "train": "clean+jpeg75" if augment else "clean", "ap": aps,
                         "mean_ap": {cond: float(np.mean(list(v.values()))) for cond, v in aps.items()}})
            cells = "  ".join(f"{cond} " + " ".join(f"{g[:9]}={a:.3f}" for g, a in aps[cond].items())
                              + f" mean={rows[-1]['mean_ap'][cond]:.3f}" for cond in CONDITIONS)
            print(f"train {rows[-1]['train']:<12} {name:<8} {cells}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"c": args.c, "images": len(samples), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
