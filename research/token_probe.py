"""Fast leave-one-generator-out screen of the trained layers on a frozen trunk (issue 7).

    python research/token_probe.py --data DATA_DIR/dev --config configs/experiments/mid_b4.yaml \
        --work runs/probe --json docs/token_probe_mid_b4.json

When the whole trunk is frozen (the block-4 config), what the detector's trained layers read is
fixed per image: the pooled trunk features of its global view and of its K PSM patches (PSM picks
its boxes from the frozen global map, so they are fixed too). This script computes those K+1 tokens
once per image and condition (clean, JPEG q75, 0.5x downscale: scanner.training.leave_one_out's), cached in
--work, and then trains only embed + AFFM + head on them, in seconds instead of the 75 minutes of a
full `scanner eval --leave-one-out` run. Splits, subsampling (--max-train-images 1200 of the training
split, --max-images-per-source 100 of the held-out one), optimiser and epochs follow that command.

Each variant changes one thing about the trained layers (standardised inputs, weight decay, width,
a frozen random embedding, ...); the report gives its held-out AP per generator and condition, and
the mean, next to the same layers trained as the real recipe trains them ("recipe"). What the
screen leaves out: the recipe's blur/JPEG/flip augmentation of the training images.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def extract_tokens(model, samples, transform, batch: int = 16) -> np.ndarray:
    """(N, K+1, C) float32: pooled trunk features of the K patches, then of the global view."""
    import torch
    from torch.utils.data import DataLoader

    from scanner.model.crop_resize import crop_patches
    from scanner.model.preprocess import global_views, image_sizes
    from scanner.training.data import ImageDataset, collate

    out = np.zeros((len(samples), model.selector.count + 1, model.backbone.channels), np.float32)
    loader = DataLoader(ImageDataset(samples, transform=transform), batch_size=batch, collate_fn=collate)
    model.eval()
    done = 0
    for images, _, index in loader:
        with torch.inference_mode():
            fmap, _ = model.global_branch(global_views(images, model.cfg.input_size))
            boxes = model.selector(fmap, image_sizes(images))
            patches = crop_patches(images, boxes, model.cfg.input_size).div_(255)
            local = model.backbone(patches.flatten(0, 1)).mean((2, 3)).view(len(images), -1, fmap.shape[1])
            out[index.numpy()] = torch.cat([local, fmap.mean((2, 3))[:, None]], 1).numpy()
        done += len(images)
        print(f"  {done}/{len(samples)} images", file=sys.stderr, flush=True)
    return out


@dataclass(frozen=True)
class Variant:
    """How embed + AFFM + head are trained on the tokens."""

    name: str
    standardise: bool = False  # fixed per-channel mean/std of the training tokens before the embedding
    weight_decay: float = 0.0  # decoupled (AdamW) on every trained weight
    embed_dim: int | None = None  # None: the config's
    freeze_embed: bool = False  # the embedding stays at its random initialisation
    lr: float | None = None
    epochs: int | None = None
    token_dropout: float = 0.0  # drop whole patch tokens while training
    linear_probe: str | None = None  # instead: a logistic regression on the "global" token or the "mean" token


def train_head(cfg, variant: Variant, x: np.ndarray, y: np.ndarray, epochs: int, seed: int):
    """Trains the detector's embed/AFFM/head on tokens x (N, K+1, C); returns a scorer."""
    import dataclasses

    import torch

    from research.feature_probe import fit_probe
    from scanner.model.detector import Detector

    if variant.linear_probe:
        pool = (lambda z: z[:, -1]) if variant.linear_probe == "global" else (lambda z: z.mean(1))
        scorer = fit_probe(pool(x), y, 0.1)
        return lambda z: scorer(pool(z))
    # Seeded as scanner.training.train seeds it, so embed/AFFM/head start from the real run's initialisation.
    torch.manual_seed(seed)
    mcfg = dataclasses.replace(cfg.model, embed_dim=variant.embed_dim or cfg.model.embed_dim, pretrained=False)
    det = Detector(mcfg, seed=seed)
    embed, fusion, head = det.embed, det.fusion, det.head
    mean, std = 0.0, 1.0
    if variant.standardise:
        flat = torch.from_numpy(x.reshape(-1, x.shape[-1]))
        mean, std = flat.mean(0), flat.std(0, correction=0) + 1e-6

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        e = embed((tokens - mean) / std)  # the global token is last, as in Detector.local_fusion
        fused, _ = fusion(e, False)
        return head(fused).squeeze(-1)

    if variant.freeze_embed:
        embed.requires_grad_(False)
    params = [p for m in (embed, fusion, head) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=variant.lr or cfg.train.lr, betas=tuple(cfg.train.betas),
                            weight_decay=variant.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).float()
    gen = torch.Generator().manual_seed(seed)
    for m in (embed, fusion, head):
        m.train()
    for _ in range(variant.epochs or epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(cfg.train.batch_size):
            tokens = xt[idx]
            if variant.token_dropout:
                keep = torch.rand(len(idx), tokens.shape[1] - 1, 1, generator=gen) >= variant.token_dropout
                tokens = torch.cat([tokens[:, :-1] * keep, tokens[:, -1:]], 1)
            loss = loss_fn(forward(tokens), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for m in (embed, fusion, head):
        m.eval()

    def score(z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return forward(torch.from_numpy(z)).numpy()
    return score


VARIANTS = [
    Variant("linear-probe-global", linear_probe="global"),
    Variant("linear-probe-mean", linear_probe="mean"),
    Variant("recipe"),
    Variant("standardise", standardise=True),
    Variant("standardise+wd0.5", standardise=True, weight_decay=0.5),
    Variant("standardise+lr1e-5x20ep", standardise=True, lr=1e-5, epochs=20),
    Variant("standardise+20ep", standardise=True, epochs=20),
    Variant("standardise+token-drop0.3", standardise=True, token_dropout=0.3),
    Variant("frozen-embed", freeze_embed=True),
    Variant("standardise+frozen-embed", standardise=True, freeze_embed=True),
    Variant("embed256", embed_dim=256),
    Variant("embed512", embed_dim=512),
    Variant("embed768", embed_dim=768),
    Variant("standardise+embed256", standardise=True, embed_dim=256),
    Variant("standardise+embed512", standardise=True, embed_dim=512),
    Variant("standardise+embed768", standardise=True, embed_dim=768),
    Variant("standardise+frozen-embed512", standardise=True, freeze_embed=True, embed_dim=512),
    Variant("standardise+embed512+20ep", standardise=True, embed_dim=512, epochs=20),
    Variant("standardise+embed512+wd5", standardise=True, embed_dim=512, weight_decay=5.0),
]


def write_report(path: Path, protocol: dict, rows: list[dict]) -> None:
    """Writes the rows; an existing report of the same protocol keeps its rows of other variants/seeds."""
    kept = []
    if path.is_file():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in protocol} == protocol:
            done = {(r["variant"], r["seed"]) for r in rows}
            kept = [r for r in old["rows"] if (r["variant"], r["seed"]) not in done]
    order = {v.name: i for i, v in enumerate(VARIANTS)}
    rows = sorted(kept + rows, key=lambda r: (order.get(r["variant"], len(order)), r["variant"], r["seed"]))
    means = {}
    for r in rows:
        means.setdefault(r["variant"], []).append(r["mean_ap"])
    summary = {v: {"seeds": len(m), **{c: float(np.mean([x[c] for x in m])) for c in m[0]}} for v, m in means.items()}
    path.write_text(json.dumps({**protocol, "summary": summary, "rows": rows}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="configs/experiments/mid_b4.yaml", help="a config whose trunk is frozen")
    parser.add_argument("--work", default="runs/probe", help="token cache folder")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-train-images", type=int, default=1200)
    parser.add_argument("--max-images-per-source", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="*", help="names to run (default: all)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)

    from research.feature_probe import cached_features, held_out_ap
    from scanner.config import load_config
    from scanner.model.detector import Detector
    from scanner.training.data import find_samples, split_by_source
    from scanner.training.evaluate import _subsample as per_source_subsample
    from scanner.training.leave_one_out import CONDITIONS, generators_of
    from scanner.training.train import _subsample, freeze

    cfg = load_config(args.config)
    model = Detector(cfg.model, seed=cfg.train.seed)
    freeze(model, tuple(cfg.train.freeze))
    if any(p.requires_grad for p in model.backbone.parameters()):
        parser.error(f"{args.config} trains part of the trunk: its tokens are not fixed per image")
    samples = find_samples(args.data)
    generators = generators_of(args.data)
    folds = {}
    for gen, sources in sorted(generators.items()):
        train, held = split_by_source(samples, tuple(sources), cfg.train.real_only_val_share, cfg.train.seed)
        folds[gen] = (_subsample(train, args.max_train_images, cfg.train.seed),
                      per_source_subsample(held, args.max_images_per_source))
    # Training reads clean tokens of any image; the JPEG and downscaled ones are only scored.
    scored = sorted({s for _, held in folds.values() for s in held}, key=lambda s: str(s.path))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tag = Path(args.config).stem
    model.to_channels_last()  # twice as fast on this CPU; same features to 1e-5
    tokens, index = {}, {}
    for cond, fn in CONDITIONS.items():
        group = samples if cond == "clean" else scored
        print(f"{cond} tokens of {len(group)} images", file=sys.stderr, flush=True)
        tokens[cond] = cached_features(work / f"tokens_{tag}_{cond}.npz", group,
                                       lambda s, t=fn: {"tokens": extract_tokens(model, s, t)})["tokens"]
        index[cond] = {s.path: i for i, s in enumerate(group)}
    chosen = [v for v in VARIANTS if not args.variants or v.name in args.variants]

    rows = []
    for variant in chosen:
        for seed in args.seeds[:1] if variant.linear_probe else args.seeds:  # the probe is deterministic
            ap: dict[str, dict[str, float]] = {c: {} for c in CONDITIONS}
            for gen, (train, held) in folds.items():
                sources = generators[gen]
                x = tokens["clean"][[index["clean"][s.path] for s in train]]
                score = train_head(cfg, variant, x, np.array([s.label for s in train]), args.epochs, seed)
                for cond in CONDITIONS:
                    ap[cond][gen] = held_out_ap(held, score(tokens[cond][[index[cond][s.path] for s in held]]),
                                                sources)
            mean = {c: float(np.mean(list(v.values()))) for c, v in ap.items()}
            rows.append({"variant": variant.name, "seed": seed, "ap": ap, "mean_ap": mean})
            print(f"{variant.name:<30} seed {seed}  " + "  ".join(f"{c} {m:.3f}" for c, m in mean.items())
                  + "   clean: " + " ".join(f"{g} {a:.3f}" for g, a in ap["clean"].items()), flush=True)
    if args.json:
        write_report(Path(args.json), {"config": args.config, "epochs": args.epochs,
                                       "max_train_images": args.max_train_images,
                                       "max_images_per_source": args.max_images_per_source}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
