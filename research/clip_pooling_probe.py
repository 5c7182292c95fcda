"""Leave-one-generator-out linear probes: do CLIP's patch tokens add to its class tokens? (issue 20)

    python research/clip_pooling_probe.py --data DATA_DIR/dev DATA_DIR/extra DATA_DIR/photoreal \
        --work runs/clip_pooling --json docs/clip_pooling_probe.json
    python research/clip_pooling_probe.py ... --sets 'cls|cls+mean+std' --json docs/clip_pooling_probe_heads.json
    python research/clip_pooling_probe.py ... --taps 4 5 6 7 8 9 10 11 12 --sets cls cls+mean+std 'cls|cls+mean+std' \
        --json docs/clip_pooling_probe_deep.json

The first CLIP detector read, per view, the class token after layers 4-9 of the frozen tower
(configs/experiments/clip_b16_cls.yaml); the 196 patch tokens of those layers fed only the PSM. A
generator's traces are local (upsampling, textures), so statistics over the patch tokens might carry
what the class token averages away. Each image's global view (scanner.model.preprocess) goes once per condition (clean, JPEG
q75) through the first 9 layers (bf16); per layer 4-9 the cache (--work, feats_<condition>.npz) keeps
the class token, and the mean and the standard deviation over the patch tokens, each token first
layer-normalised over its channels (as the detector normalises its class tokens). For each fold of
scanner.training.leave_one_out's plan, a logistic regression (research/feature_probe.py's fit_probe:
standardised features, balanced classes), trained on the fold's clean + JPEG q75 features, is scored by
AP on the held-out sources under both conditions, for feature sets that add the patch statistics to the
class tokens. The set `cls|cls+mean+std` is the shipped detector's two heads (configs/clip_b16.yaml) as
two probes, scored by the mean of their logits. `--taps` picks other layers (up to 12, CLIP's last: the
trunk then runs that deep); a cache made for other taps than the default is named after them
(feats_4-12_<condition>.npz).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from feature_probe import (  # noqa: E402  (research/ sibling)
    cached_features, clip_global_views, feature_set_parser, feature_set_rows, fold_setup)

TAPS = (4, 5, 6, 7, 8, 9)  # 1-based layers, as configs/experiments/clip_b16_cls.yaml
SETS = {
    "cls": ("cls",),
    "cls+mean": ("cls", "mean"),
    "cls+mean+std": ("cls", "mean", "std"),
    "mean+std": ("mean", "std"),
}
# The shipped detector's two heads (configs/clip_b16.yaml, head_pools): one probe per feature set, their
# logits averaged.
HEADS = {"cls|cls+mean+std": ("cls", "cls+mean+std")}


def extract(samples, condition: str, taps=TAPS, batch: int = 32) -> dict[str, np.ndarray]:
    """{cls, mean, std}: (N, len(taps), 768) float16 each, for each sample's global view."""
    import torch

    from scanner.model.clip_vit import LN_EPS, WIDTH, load_clip_trunk

    trunk = load_clip_trunk(max(taps)).eval()
    seen: list[torch.Tensor] = []
    for i, layer in enumerate(trunk.layers, start=1):
        if i in taps:
            layer.register_forward_hook(lambda m, inp, out: seen.append(out.float()))
    out = {k: np.zeros((len(samples), len(taps), WIDTH), np.float16) for k in ("cls", "mean", "std")}
    for views, rows in clip_global_views(samples, condition, batch):
        seen.clear()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            trunk.tokens(views)
        tokens = torch.nn.functional.layer_norm(torch.stack(seen, 1), (WIDTH,), eps=LN_EPS)  # (B, T, 197, 768)
        out["cls"][rows] = tokens[:, :, 0].numpy()
        out["mean"][rows] = tokens[:, :, 1:].mean(2).numpy()
        out["std"][rows] = tokens[:, :, 1:].std(2).numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = feature_set_parser(__doc__, "runs/clip_pooling", "feature cache", {**SETS, **HEADS})
    parser.add_argument("--taps", nargs="+", type=int, default=list(TAPS), help="1-based CLIP layers (1-12)")
    args = parser.parse_args(argv)
    taps = tuple(sorted(set(args.taps)))
    if not 1 <= taps[0] <= taps[-1] <= 12:
        parser.error(f"--taps must lie within CLIP's layers 1-12, not {list(taps)}")
    samples, folds, work = fold_setup(args.data, args.work)
    stem = "feats" if taps == TAPS else f"feats_{taps[0]}-{taps[-1]}" if taps == tuple(range(taps[0], taps[-1] + 1)) \
        else "feats_" + "_".join(map(str, taps))
    feats = {cond: cached_features(work / f"{stem}_{cond}.npz", samples,
                                   lambda todo, cond=cond: extract(todo, cond, taps))
             for cond in ("clean", "jpeg75")}

    def features_of(name: str):
        if name in HEADS:
            return [features_of(head) for head in HEADS[name]]
        return {cond: np.concatenate([f[p].reshape(len(samples), -1) for p in SETS[name]], 1).astype(np.float32)
                for cond, f in feats.items()}

    rows = feature_set_rows(samples, folds, args.sets, features_of, args.c)
    if args.json:
        Path(args.json).write_text(json.dumps({"c": args.c, "taps": taps, "images": len(samples), "folds": folds,
                                              "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
