"""Training the detector on cached trunk outputs (scanner.training.token_cache): embedding, AFFM and head only.

The trunk is frozen, so a training step needs only each image's tokens: K patch vectors and the
global vector. An epoch over 7,000 images then takes seconds on two cores, where running the
trunk takes an hour; a leave-one-out fold takes about a minute.

Augmentation: the trunk cannot see a new blur or JPEG draw each epoch, so the cache holds a few
fixed augmented draws per image (the recipe's Augment, seeded by the image path) beside the clean
tokens; every epoch each image takes the clean tokens or one of its draws, uniformly.
"""

from __future__ import annotations

import dataclasses
import random
import time

import numpy as np
import torch

from scanner.config import Config, ModelConfig, TrainConfig
from scanner.errors import ScannerError
from scanner.training.data import Augment
from scanner.training.leave_one_out import CONDITIONS
from scanner.training.token_cache import TokenCache


def patch_columns(cache_cfg: ModelConfig, cfg: ModelConfig) -> list[int]:
    """Which of the cache's K patch tokens a model with `cfg` uses.

    PSM picks greedily (best window first), so a model with fewer picks per window size sees exactly
    the first picks of each window size of a cache made with more.
    """
    if cfg.patch_strategy != cache_cfg.patch_strategy or cfg.windows != cache_cfg.windows \
            or cfg.patch_sizes != cache_cfg.patch_sizes or cfg.picks_per_window > cache_cfg.picks_per_window:
        raise ValueError("the token cache was made with other patches (strategy, windows, sizes or fewer picks)")
    if cfg.patch_strategy != "psm":
        if cfg.picks_per_window != cache_cfg.picks_per_window:
            raise ValueError("only PSM patches can be subset by picks_per_window")
        return list(range(len(cfg.windows) * cfg.picks_per_window))
    per = cache_cfg.picks_per_window
    return [w * per + j for w in range(len(cfg.windows)) for j in range(cfg.picks_per_window)]


def logits_of(model, tokens: torch.Tensor, columns: list[int] | None = None, batch: int = 512) -> torch.Tensor:
    """The detector's logits (N,) from cached tokens (N, K+1, C): Detector.fuse after the trunks."""
    columns = list(range(tokens.shape[1] - 1)) if columns is None else columns
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(tokens), batch):
            chunk = tokens[i:i + batch]
            g = model.embed(chunk[:, -1])  # (b, D)
            out.append(model.fuse(chunk[:, columns], g)[0])
    return torch.cat(out) if out else torch.zeros(0)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters after the trunks: embedding, AFFM, head."""
    return [p for m in (model.embed, model.fusion, model.head) for p in m.parameters()]


def train_on_tokens(model, conditions: list[torch.Tensor], labels: torch.Tensor, tc: TrainConfig, *,
                    columns: list[int] | None = None, log=None) -> list[dict]:
    """Train model.embed, model.fusion and model.head in place; returns the per-epoch history.

    conditions: the same N images' tokens (N, K+1, C) under each cached condition (clean first,
    then augmented draws); labels: (N,) 0 real, 1 synthetic. The recipe is tc's: Adam (lr, betas,
    weight decay), BCE with logits, batch size, epochs, seed. Classes are weighted to balance.
    """
    torch.manual_seed(tc.seed)
    rng = random.Random(tc.seed)
    columns = list(range(conditions[0].shape[1] - 1)) if columns is None else columns
    params = trainable_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    labels = labels.float()
    fakes = float(labels.sum())
    # BCE's pos_weight balances real against synthetic whatever the pool's mix is.
    pos_weight = torch.tensor((len(labels) - fakes) / max(fakes, 1.0))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    n = len(labels)
    history = []
    for epoch in range(1, tc.epochs + 1):
        start = time.time()
        model.train()
        order = list(range(n))
        rng.shuffle(order)
        choice = torch.tensor([rng.randrange(len(conditions)) for _ in range(n)])  # a condition per image
        losses = []
        for i in range(0, n, tc.batch_size):
            idx = torch.tensor(order[i:i + tc.batch_size])
            batch = torch.empty((len(idx), *conditions[0].shape[1:]))  # (b, K+1, C)
            for c, tokens in enumerate(conditions):
                mine = choice[idx] == c
                batch[mine] = tokens[idx[mine]]
            # Each head's own loss, summed: a head's gradient is what it would get trained alone
            # (Adam is per parameter), so several heads train as they would one by one.
            logits = model.head_logits(batch[:, columns], model.embed(batch[:, -1]))[0]  # (b, M)
            loss = sum(loss_fn(logits[:, m], labels[idx]) for m in range(logits.shape[1]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "seconds": time.time() - start})
        if log is not None:
            log(f"epoch {epoch}/{tc.epochs}: loss {history[-1]['train_loss']:.4f}")
    model.eval()
    return history


def training_conditions(cache: TokenCache, cfg: Config) -> list[str]:
    """clean, the recipe's fixed cached conditions, then its cached augmented draws."""
    tc = cfg.train
    unknown = [c for c in tc.cached_conditions if c not in CONDITIONS or c == "clean"]
    if unknown:
        raise ScannerError(f"train.cached_conditions: unknown {', '.join(unknown)}; "
                           f"expected some of {', '.join(c for c in CONDITIONS if c != 'clean')}")
    augment = Augment(tc.blur_prob, tc.blur_sigma_max, tc.jpeg_prob, tuple(tc.jpeg_quality), tc.hflip,
                      tc.resize_prob, tuple(tc.resize_range))
    return ["clean", *tc.cached_conditions] + [cache.augmented(augment, draw) for draw in range(tc.cached_draws)]


def open_cache(cfg: Config, cache_dir, seed: int | None = None):
    """(model, cache): a detector of cfg.model, and the token cache of its trunk. A cache made with
    more picks per window than cfg.model serves it (patch_columns); its own model extracts."""
    from scanner.model.detector import Detector

    if seed is not None:
        torch.manual_seed(seed)  # an untrained trunk (tests) is then the same in every run: same cache
    model = Detector(cfg.model, seed=seed)
    cache = TokenCache(cache_dir, model)
    if cache.exists() and cache.made_with().picks_per_window != cfg.model.picks_per_window:
        made = dataclasses.replace(cache.made_with(), pretrained=cfg.model.pretrained)
        extractor = Detector(made, seed=seed)
        extractor.load_state_dict(model.state_dict(), strict=False)
        cache = TokenCache(cache_dir, extractor)
    return model, cache


def load_tokens(cache: TokenCache, samples, conditions: list[str], *, bf16: bool, log) -> dict[str, torch.Tensor]:
    for cond in conditions:
        cache.ensure(samples, cond, bf16=bf16, log=log)
    return {cond: cache.load(samples, cond)[0] for cond in conditions}


def train_from_cache(cfg, data_dirs, out_dir, cache_dir, *, name: str = "detector", calibration: dict | None = None,
                     bf16: bool = False, log=print):
    """Train the recipe on every image of `data_dirs` from cached trunk outputs (extracting what the
    cache lacks) and write OUT/detector.safetensors, config.yaml and history.json. Returns its path.

    No validation split and no early stop: the recipe's epochs are fixed, chosen by leave-one-out
    (scanner.training.cached_loo), whose report's `calibration` (Platt a, b) and `threshold` ship with the
    weights when given: the calibration folds into the head, the threshold becomes the model's.
    """
    import json
    from pathlib import Path

    import yaml

    from scanner.model.weights import save_detector
    from scanner.training.calibration import fold_into_head
    from scanner.training.data import find_samples

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(json.loads(cfg.to_json()), sort_keys=True))
    samples = find_samples(data_dirs)
    model, cache = open_cache(cfg, cache_dir, seed=cfg.train.seed)
    conditions = training_conditions(cache, cfg)
    tokens = load_tokens(cache, samples, conditions, bf16=bf16, log=log)
    labels = torch.tensor([s.label for s in samples])
    model.reset_trainable(cfg.train.seed)
    log(f"training on {len(samples)} images ({int(labels.sum())} synthetic) from cached tokens, "
        f"{len(conditions)} conditions")
    history = train_on_tokens(model, [tokens[c] for c in conditions], labels, cfg.train,
                              columns=patch_columns(cache.model.cfg, cfg.model), log=log)
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    threshold, extra = 0.5, {"train_images": len(samples), "train_sources": sorted({s.source for s in samples})}
    if calibration is not None:
        fold_into_head(model, calibration["calibration"]["a"], calibration["calibration"]["b"])
        threshold = calibration["threshold"]["score"]
        extra["calibration"] = {k: calibration["calibration"][k] for k in ("method", "a", "b", "ece_cross_fold")}
    path = out / "detector.safetensors"
    save_detector(model, path, name=name, threshold=threshold, extra=extra)
    return path
