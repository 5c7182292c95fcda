"""Do the PSM patches add to the CLIP detector's global view? Leave-one-out on cached tokens (issue 20).

    python research/clip_view_ablation.py --config configs/experiments/clip_b16_cls.yaml --token-cache runs/tokens \
        --data DATA_DIR/dev DATA_DIR/extra DATA_DIR/photoreal --json docs/clip_view_ablation.json

The same recipe and folds as `scanner eval --leave-one-out --token-cache`, trained on the clean
tokens only, with the AFFM fed (a) the global token alone, (b) the global token and the patch tokens
of the cache. Only the clean condition must be in the cache. Reports AP per fold and the means.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--token-cache", required=True)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import dataclasses

    import torch

    from scanner.config import load_config
    from scanner.training.cached_loo import _sigmoid, open_cache
    from scanner.training.data import find_samples, split_by_source
    from scanner.training.evaluate import per_source_ap
    from scanner.training.leave_one_out import fold_plan
    from scanner.training.token_training import logits_of, train_on_tokens

    cfg = load_config(args.config)
    if args.epochs:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=args.epochs))
    samples = find_samples(args.data)
    plan = fold_plan(args.data)
    model, cache = open_cache(cfg, args.token_cache, seed=cfg.train.seed)
    tokens = cache.load(samples, "clean")[0]
    labels = torch.tensor([s.label for s in samples])
    index = {s.path: i for i, s in enumerate(samples)}
    variants = {"global only": [], f"global + {tokens.shape[1] - 1} patches": list(range(tokens.shape[1] - 1))}
    rows = {}
    for name, columns in variants.items():
        aps = {}
        for fold, sources in plan.items():
            train, held = split_by_source(samples, tuple(sources), cfg.train.real_only_val_share, cfg.train.seed)
            tr = torch.tensor([index[s.path] for s in train])
            te = torch.tensor([index[s.path] for s in held])
            model.reset_trainable(cfg.train.seed)
            train_on_tokens(model, [tokens[tr]], labels[tr], cfg.train, columns=columns)
            scores = _sigmoid(logits_of(model, tokens[te], columns).numpy())
            fold_aps = [ap for src, ap in per_source_ap(held, scores).items() if src in sources and ap is not None]
            aps[fold] = float(np.mean(fold_aps))
            print(f"{name}: {fold} {aps[fold]:.3f}", file=sys.stderr, flush=True)
        rows[name] = {"ap": aps, "mean_ap": float(np.mean(list(aps.values()))), "min_ap": float(min(aps.values()))}
        print(f"{name}: mean {rows[name]['mean_ap']:.3f} min {rows[name]['min_ap']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "epochs": cfg.train.epochs, "condition": "clean",
                                               "variants": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
