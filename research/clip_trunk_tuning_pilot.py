"""Is the frozen CLIP trunk the limit? A pilot of tuning its last kept layers on a CPU (issue 20).

    python research/clip_trunk_tuning_pilot.py --data DATA_DIR/dev DATA_DIR/extra DATA_DIR/photoreal \
        --work runs/clip_tune --folds stylegan2 stable_diffusion_v2 unknown_diffusion --json docs/clip_trunk_tuning_pilot.json

The shipped detector reads the class tokens after layers 4-9 of a frozen CLIP ViT-B/16, and linear
probes on those features get about as far as its trained heads (0.883 against 0.891 mean AP clean over
21 folds). Would tuning the trunk help a generator never seen? A full answer (every fold, every view,
LoRA or full tuning) needs a GPU; this pilot asks it on the weakest folds, on the global view only:

- Each image's global view goes once per condition (clean, JPEG q75) through layers 1-9 (bf16); the
  cache (--work) keeps the 197 tokens after layer --tune-from - 1 (6 by default; float16,
  memory-mapped, about 2.1 GB per condition) and the layer-normalised class tokens after layers 4-9.
- Per fold (scanner's leave-one-out plan and split, --seed), two models read the same vector as the
  shipped class-token head, the class tokens after layers 4-9, each layer-normalised, concatenated,
  through a linear head: `frozen` (layers --tune-from to 9 as CLIP has them, only the head trains) and
  `tuned` (those layers train too, at a learning rate 100x below the head's). Both see the same batches: BCE
  with logits, classes balanced by pos_weight, Adam, batch 32, --epochs epochs, each image clean or
  JPEG q75 at random in each epoch. The held-out generator's sources are scored, clean and q75, with
  research/feature_probe.py's held_out_ap (each held-out source against the held-out real photos).

It runs on a CUDA GPU where there is one (--device), where every fold (--folds all), more tuned layers
(--tune-from 5) and more epochs take minutes instead of days: `STEPS=tuning bash bench/gpu_checks.sh`,
with the pools copied there by research/pack_pools.py's parts.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from feature_probe import clip_global_views, fold_setup, held_out_ap  # noqa: E402  (research/ sibling)

CONDITIONS = ("clean", "jpeg75")
TAPS = (4, 5, 6, 7, 8, 9)  # the shipped class-token head's vector
TOKENS, WIDTH = 197, 768


def extract(samples, condition: str, work: Path, tune_from: int, device, workers: int = 1,
            batch: int = 32) -> tuple[np.memmap, np.ndarray]:
    """(tokens after layer tune_from - 1 (N, 197, 768) float16, memory-mapped; class tokens after layers
    4-9, layer-normalised (N, 6, 768) float16), cached in `work` while the sample paths match."""
    import torch

    from scanner.model.clip_vit import LN_EPS, load_clip_trunk

    last_frozen = tune_from - 1  # 1-based
    grid_file, cls_file, paths_file = (work / f"{name}_{condition}.{ext}" for name, ext in
                                       ((f"grid{last_frozen}", "f16"), ("cls4-9", "npy"), (f"paths{last_frozen}", "json")))
    paths = [str(s.path) for s in samples]
    if paths_file.is_file() and json.loads(paths_file.read_text()) == paths:
        return np.memmap(grid_file, np.float16, "r", shape=(len(samples), TOKENS, WIDTH)), np.load(cls_file)
    trunk = load_clip_trunk(max(TAPS)).eval().to(device)
    grid = np.memmap(grid_file, np.float16, "w+", shape=(len(samples), TOKENS, WIDTH))
    cls = np.zeros((len(samples), len(TAPS), WIDTH), np.float16)
    seen = [None]  # the tokens after the last frozen layer, kept by a hook on it
    trunk.layers[last_frozen - 1].register_forward_hook(lambda m, inp, out: seen.__setitem__(0, out.float()))
    for views, rows in clip_global_views(samples, condition, batch, workers=workers):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            _, kept = trunk.tokens(views.to(device), TAPS)
        grid[rows] = seen[0].cpu().numpy()
        cls[rows] = torch.nn.functional.layer_norm(torch.stack(kept, 1).float(), (WIDTH,), eps=LN_EPS).cpu().numpy()
    grid.flush()
    np.save(cls_file, cls)
    paths_file.write_text(json.dumps(paths))
    return grid, cls


class LastLayersDetector:
    """A linear head on the class tokens after layers 4-9, each layer-normalised, as the shipped
    class-token head reads them: all from the cache (`frozen`), or those of the layers from
    --tune-from on from copies of those trunk layers, run and trained on the cached tokens before
    them (`tuned`)."""

    def __init__(self, layers, tune: bool, lr: float, trunk_lr_ratio: float, seed: int, device):
        import torch

        torch.manual_seed(seed)
        self.tune, self.device = tune, device
        self.frozen_taps = len(TAPS) - len(layers)  # taps before the first tunable layer come from the cache
        self.layers = copy.deepcopy(layers).train(tune).to(device) if tune else None
        self.head = torch.nn.Linear(WIDTH * len(TAPS), 1).to(device)
        groups = [{"params": self.head.parameters(), "lr": lr}]
        if tune:
            groups.append({"params": self.layers.parameters(), "lr": lr * trunk_lr_ratio})
        self.optimiser = torch.optim.Adam(groups)

    def logits(self, cls, grid=None):
        """cls: cached class tokens after layers 4-9 (B, 6, 768); grid: tokens before the first tunable
        layer (B, 197, 768), tuned only."""
        import torch

        from scanner.model.clip_vit import LN_EPS

        cls = cls.to(self.device)
        if self.tune:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                x, taps = grid.to(self.device), []
                for layer in self.layers:
                    x = layer(x)
                    taps.append(x[:, 0])
            tuned = torch.nn.functional.layer_norm(torch.stack(taps, 1).float(), (WIDTH,), eps=LN_EPS)
            cls = torch.cat([cls[:, :self.frozen_taps], tuned], 1)
        return self.head(cls.flatten(1)).squeeze(1)


def batch_of(data, conds, rows, tune: bool):
    """(class tokens, tokens before the first tunable layer or None) of `rows`, each row under its condition, as float32 tensors."""
    import torch

    cls = torch.from_numpy(np.stack([data[c][1][r] for c, r in zip(conds, rows)]).astype(np.float32))
    grid = torch.from_numpy(np.stack([data[c][0][r] for c, r in zip(conds, rows)]).astype(np.float32)) if tune else None
    return cls, grid


def run_fold(data, train_rows, test_rows, labels, layers, args, tune: bool) -> dict:
    """Train one model on train_rows; its held-out logits per condition."""
    import torch

    model = LastLayersDetector(layers, tune, args.lr, args.trunk_lr_ratio, args.seed, args.device)
    y = torch.tensor(labels[train_rows], dtype=torch.float32, device=args.device)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(y == 0).sum() / (y == 1).sum())
    rng = random.Random(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = list(range(len(train_rows)))
        rng.shuffle(order)
        for step in range(0, len(order), args.batch_size):
            pick = order[step:step + args.batch_size]
            rows = np.asarray(train_rows)[pick]
            conds = [rng.choice(CONDITIONS) for _ in pick]
            loss = loss_fn(model.logits(*batch_of(data, conds, rows, tune)), y[pick])
            model.optimiser.zero_grad()
            loss.backward()
            model.optimiser.step()
        print(f"  {'tuned' if tune else 'frozen'} epoch {epoch + 1}: loss {loss.item():.3f} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    out = {}
    with torch.no_grad():
        for c in CONDITIONS:
            out[c] = np.concatenate([model.logits(*batch_of(data, [c] * len(rows), rows, tune)).float().cpu().numpy()
                                     for rows in np.array_split(np.asarray(test_rows), max(1, len(test_rows) // 64))])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="the pools, each with its MANIFEST.csv")
    parser.add_argument("--work", default="runs/clip_tune", help="token cache (about 4.3 GB)")
    parser.add_argument("--folds", nargs="+", required=True, help="leave-one-out folds to run, in order, or all")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="the head's learning rate")
    parser.add_argument("--trunk-lr-ratio", type=float, default=0.01, help="the tuned layers' rate over the head's")
    parser.add_argument("--tune-from", type=int, default=7, choices=range(5, 10), metavar="{5..9}",
                        help="the first of the layers (up to 9) that `tuned` trains")
    parser.add_argument("--device", default=None, help="cpu or cuda; default: cuda where there is one")
    parser.add_argument("--workers", type=int, default=1, help="decode processes while the cache is made")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="written after every fold")
    args = parser.parse_args(argv)

    import torch

    from scanner.model.clip_vit import load_clip_trunk
    from scanner.training.data import split_by_source

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples, folds, work = fold_setup(args.data, args.work)
    if args.folds == ["all"]:
        args.folds = list(folds)
    unknown = [f for f in args.folds if f not in folds]
    if unknown:
        parser.error(f"unknown folds {unknown}; the plan has {sorted(folds)}")
    data = {c: extract(samples, c, work, args.tune_from, args.device, args.workers) for c in CONDITIONS}
    layers = load_clip_trunk(max(TAPS)).layers[args.tune_from - 1:]
    labels = np.array([s.label for s in samples])
    index = {s.path: i for i, s in enumerate(samples)}
    results = {}
    for fold in args.folds:
        sources = folds[fold]
        train, held = split_by_source(samples, tuple(sources), 0.3, args.seed)
        train_rows, test_rows = [index[s.path] for s in train], [index[s.path] for s in held]
        results[fold] = {}
        for tune in (False, True):
            logits = run_fold(data, train_rows, test_rows, labels, layers, args, tune)
            results[fold]["tuned" if tune else "frozen"] = {c: held_out_ap(held, 1 / (1 + np.exp(-z)), sources)
                                                           for c, z in logits.items()}
        print(f"{fold}: " + "  ".join(f"{name} " + " ".join(f"{c} {ap:.3f}" for c, ap in aps.items())
                                      for name, aps in results[fold].items()), flush=True)
        if args.json:
            settings = {k: v for k, v in vars(args).items() if k not in ("json", "data", "work", "device")}
            Path(args.json).write_text(json.dumps(settings | {"pools": [Path(d).name for d in args.data],
                                                              "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
