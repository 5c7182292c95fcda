"""Which views keep the mid-level cue: linear probes on block-4 features per view (issue 7).

    python research/view_probe.py --data DATA_DIR/dev --work runs/probe

The detector sees each image three ways: the global view (the whole image resized to 224), 224-pixel
patches and 112-pixel patches resized up to 224. This probe takes the frozen ImageNet Lite0 trunk cut
after block 4 (`model.trunk_blocks: 5`, mean-pooled 112 channels) on three such views of every image:
`global` (the model's global view), `crop224` (the native 224 centre crop) and `crop112up` (the 112
centre crop, bilinear up to 224). For each generator of MANIFEST.csv a logistic regression is fitted
on one view of the other generators' training split (`scanner eval --leave-one-out`'s splits) and
scored by AP on every view of the held-out sources. Features are cached in --work/feats_views.npz.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VIEWS = ("global", "crop224", "crop112up")


def _centre(img, side: int):
    h, w = img.shape[1:]
    top, left = (h - side) // 2, (w - side) // 2
    return img[:, top:top + side, left:left + side]


def extract(samples, batch: int = 64) -> dict[str, np.ndarray]:
    import torch
    from PIL import Image

    from scanner.config import ModelConfig
    from scanner.model.backbones import build_backbone
    from scanner.model.preprocess import global_views

    trunk = build_backbone(ModelConfig(backbone="efficientnet_lite0", trunk_blocks=5)).eval()
    feats: dict[str, list] = {view: [] for view in VIEWS}
    for start in range(0, len(samples), batch):
        imgs = [torch.from_numpy(np.asarray(Image.open(s.path).convert("RGB"))).permute(2, 0, 1)
                for s in samples[start:start + batch]]
        small = torch.stack([_centre(img, 112) for img in imgs]).float().div(255)
        views = {
            "global": global_views(imgs, 224),
            "crop224": torch.stack([_centre(img, 224) for img in imgs]).float().div(255),
            "crop112up": torch.nn.functional.interpolate(small, size=224, mode="bilinear", align_corners=False),
        }
        with torch.inference_mode():
            for view, x in views.items():
                feats[view].append(trunk(x).mean((2, 3)).numpy())
        print(f"{min(start + batch, len(samples))}/{len(samples)} images", file=sys.stderr, flush=True)
    return {view: np.concatenate(parts) for view, parts in feats.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", default="runs/probe", help="feature cache")
    parser.add_argument("--c", type=float, default=0.1, help="inverse L2 strength of the logistic regression")
    args = parser.parse_args(argv)

    from research.feature_probe import cached_features, fit_probe, held_out_ap
    from scanner.training.data import find_samples, split_by_source
    from scanner.training.leave_one_out import generators_of

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    samples = find_samples(args.data)
    feats = cached_features(work / "feats_views.npz", samples, extract)
    labels = np.array([s.label for s in samples])
    index = {s.path: i for i, s in enumerate(samples)}
    generators = generators_of(args.data)
    for fit_view in VIEWS:
        aps: dict[str, list[float]] = {view: [] for view in VIEWS}
        for gen, sources in sorted(generators.items()):
            train, held = split_by_source(samples, tuple(sources), 0.3, 0)
            tr, te = [index[s.path] for s in train], [index[s.path] for s in held]
            score = fit_probe(feats[fit_view][tr], labels[tr], args.c)
            for view in VIEWS:
                aps[view].append(held_out_ap(held, score(feats[view][te]), sources))
        for view in VIEWS:
            cells = " ".join(f"{g[:9]}={a:.3f}" for g, a in zip(sorted(generators), aps[view]))
            print(f"fit {fit_view:<9} score {view:<9} {cells} mean={np.mean(aps[view]):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
