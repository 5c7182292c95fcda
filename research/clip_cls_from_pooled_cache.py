"""The class-token CLIP recipe's leave-one-out, read from the pooled recipe's token cache.

    python research/clip_cls_from_pooled_cache.py --config configs/experiments/clip_b16_cls.yaml \
        --pooled-config configs/experiments/clip_b16_pooled.yaml --token-cache runs/tokens --seed 1 \
        --data DATA_DIR/dev DATA_DIR/extra DATA_DIR/photoreal --out runs/loo_cls_s1 [--folds a,b,...]

Why: comparing two recipes at another seed needs both at that seed (the seed also draws the
held-out share of the real-only photos, so a fold's negatives change with it). The pooled trunk's
vector is, per tapped layer, [class token, patch mean, patch std] (scanner.model.clip_vit), so the
class-token recipe's tokens are a column subset of the pooled cache's: no second hour of extraction.
Everything else is `scanner eval --leave-one-out` (scanner.training.cached_loo), same folds, same
report; its `token_cache` field names the pooled cache it read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def class_token_columns(pooled_cfg, cls_cfg) -> list[int]:
    """Channels of the pooled vector that hold the class tokens of cls_cfg's taps."""
    from scanner.model.clip_vit import pool_columns

    if tuple(cls_cfg.trunk_pool) != ("cls",) or tuple(pooled_cfg.trunk_taps) != tuple(cls_cfg.trunk_taps) \
            or pooled_cfg.trunk_blocks != cls_cfg.trunk_blocks:
        raise SystemExit("--config must be a class-token recipe with the pooled recipe's layers and taps")
    return pool_columns(len(cls_cfg.trunk_taps), pooled_cfg.trunk_pool, ("cls",))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--pooled-config", required=True)
    parser.add_argument("--token-cache", required=True)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--folds", default=None, help="comma-separated fold names (default: all)")
    args = parser.parse_args(argv)

    import dataclasses

    import torch

    import scanner.training.cached_loo as cached_loo
    from scanner.config import load_config
    from scanner.model.detector import Detector
    from scanner.training.token_cache import print_log
    from scanner.training.token_training import load_tokens, open_cache

    cfg, pooled = load_config(args.config), load_config(args.pooled_config)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=args.seed))
    columns = torch.tensor(class_token_columns(pooled.model, cfg.model))
    _, pooled_cache = open_cache(pooled, args.token_cache, seed=cfg.train.seed)
    if not pooled_cache.exists():
        raise SystemExit(f"no pooled token cache under {args.token_cache} (run the pooled leave-one-out first)")

    def open_pooled(cfg_, cache_dir, seed=None):  # the class-token detector, reading the pooled cache
        return Detector(cfg_.model, seed=seed), pooled_cache

    def load_class_tokens(cache, samples, conditions, *, bf16, log):
        return {cond: tokens.index_select(2, columns) for cond, tokens in
                load_tokens(cache, samples, conditions, bf16=bf16, log=log).items()}

    cached_loo.open_cache, cached_loo.load_tokens = open_pooled, load_class_tokens
    report = cached_loo.cached_leave_one_out(cfg, args.data, args.out, args.token_cache,
                                             folds=args.folds.split(",") if args.folds else None, log=print_log)
    for cond, values in report["summary"].items():
        print(f"{cond}: mean AP {values['mean_ap']:.3f}, min {values['min_ap']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
