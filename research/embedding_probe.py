"""Where a trained detector loses a held-out generator: probes before and after its embedding (issue 7).

    python research/embedding_probe.py --data DATA_DIR/dev --model runs/loo_mid_b4/stylegan2/last.safetensors \
        --generator stylegan2

For a leave-one-out fold's weights, scores the held-out generator (mean AP over its sources, each
against the held-out real photos and its own reals) three ways: the detector itself; a logistic regression on
the trunk's pooled global features (what the trained layers read); and one on the trained embedding
g of the global view (what AFFM and the head read). Both probes are fitted on a seeded sample of the
fold's training split. If the trunk probe sees the generator and the embedding probe does not, the
embedding trained on the other generators has thrown the cue away.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _decode(sample):
    import torch
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(sample.path).convert("RGB"))).permute(2, 0, 1).contiguous()


def run_model(model, samples, with_logits: bool, batch: int = 32):
    """(trunk features (N, C), embeddings (N, D), detector logits (N,) or None)."""
    import torch

    from scanner.model.preprocess import global_views

    trunk, embed, logits = [], [], []
    for start in range(0, len(samples), batch):
        images = [_decode(s) for s in samples[start:start + batch]]
        with torch.inference_mode():
            fmap, g = model.global_branch(global_views(images, model.cfg.input_size))
            trunk.append(fmap.mean((2, 3)).numpy())
            embed.append(g.numpy())
            if with_logits:
                logits.append(model(images).logits.numpy())
        print(f"{min(start + batch, len(samples))}/{len(samples)} images", file=sys.stderr, flush=True)
    return np.concatenate(trunk), np.concatenate(embed), (np.concatenate(logits) if with_logits else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True, help="weights of the fold that held --generator out")
    parser.add_argument("--generator", required=True, help="the fold's held-out generator (MANIFEST.csv)")
    parser.add_argument("--train-images", type=int, default=1500, help="probe training sample")
    parser.add_argument("--c", type=float, default=0.1, help="inverse L2 strength of the logistic regressions")
    args = parser.parse_args(argv)

    from research.feature_probe import fit_probe, held_out_ap
    from scanner.model.weights import load_detector
    from scanner.training.data import find_samples, split_by_source
    from scanner.training.leave_one_out import generators_of

    model, _ = load_detector(args.model)
    samples = find_samples(args.data)
    sources = tuple(generators_of(args.data)[args.generator])
    train, held = split_by_source(samples, sources, 0.3, 0)
    held = [s for s in held if s.source in sources or s.label == 0]
    random.Random(0).shuffle(train)
    train = train[:args.train_images]
    trunk_tr, embed_tr, _ = run_model(model, train, with_logits=False)
    trunk_te, embed_te, logits = run_model(model, held, with_logits=True)
    labels = np.array([s.label for s in train])

    print(f"{'detector':<30} AP {held_out_ap(held, logits, sources):.3f}")
    for name, fit_x, test_x in (("probe on trunk features", trunk_tr, trunk_te),
                                ("probe on trained embedding g", embed_tr, embed_te)):
        print(f"{name:<30} AP {held_out_ap(held, fit_probe(fit_x, labels, args.c)(test_x), sources):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
