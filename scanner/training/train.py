"""Training: the paper's recipe (BCE, Adam 1e-4, batch 64, blur/JPEG p=0.1, flips) on CNNDetection folders.

Writes into the output folder: config.yaml (effective config), checkpoint.pt (resume state, loaded
with weights_only=True), best.safetensors / last.safetensors (detector weights), history.json.
A rerun with the same output folder resumes from the last finished epoch.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from scanner.config import Config
from scanner.errors import ScannerError
from scanner.model.detector import Detector
from scanner.model.weights import save_detector
from scanner.training.data import Augment, ImageDataset, collate, find_samples, split_by_source
from scanner.training.evaluate import score_samples
from scanner.training.metrics import accuracy, average_precision, eer_threshold


@dataclass
class TrainResult:
    best_epoch: int
    best_ap: float
    threshold: float
    history: list[dict]
    out_dir: Path


def freeze(model: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    """Freeze parameters whose name starts with one of `prefixes`; returns the count left trainable."""
    for name, p in model.named_parameters():
        if any(name.startswith(pre) for pre in prefixes):
            p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _frozen_modules(model: torch.nn.Module, prefixes: tuple[str, ...]) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if name and any(name.startswith(p) for p in prefixes)]


def _subsample(samples, limit, seed):
    if limit is None or len(samples) <= limit:
        return samples
    rng = random.Random(seed)
    return sorted(rng.sample(samples, limit), key=lambda s: str(s.path))


def train(cfg: Config, data_dir: str | Path, out_dir: str | Path, name: str = "detector", max_val_images: int | None = 600, console=None) -> TrainResult:
    import yaml
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    tc = cfg.train
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(json.loads(cfg.to_json()), sort_keys=True))
    torch.manual_seed(tc.seed)

    samples = find_samples(data_dir)
    train_set, val_set = split_by_source(samples, tc.val_sources, tc.real_only_val_share, tc.seed)
    train_set = _subsample(train_set, tc.max_train_images, tc.seed)
    val_set = _subsample(val_set, max_val_images, tc.seed)
    if not train_set or not val_set:
        raise ScannerError(f"need both training and validation images; got {len(train_set)} and {len(val_set)}")
    for split, group in (("training", train_set), ("validation", val_set)):
        if len({s.label for s in group}) < 2:
            raise ScannerError(f"the {split} split has only one class; choose other --val-sources")
    (out / "split.json").write_text(json.dumps({
        "train_sources": sorted({s.source for s in train_set}),
        "val_sources": sorted({s.source for s in val_set}),
        "train_images": len(train_set), "val_images": len(val_set),
    }, indent=2))

    augment = Augment(tc.blur_prob, tc.blur_sigma_max, tc.jpeg_prob, tuple(tc.jpeg_quality), tc.hflip,
                      tc.resize_prob, tuple(tc.resize_range))
    train_ds = ImageDataset(train_set, augment, seed=tc.seed)
    loader_gen = torch.Generator().manual_seed(tc.seed)
    train_loader = DataLoader(train_ds, batch_size=tc.batch_size, shuffle=True, generator=loader_gen,
                              num_workers=tc.num_workers, collate_fn=collate, persistent_workers=False)

    model = Detector(cfg.model, seed=tc.seed)
    trainable = freeze(model, tuple(tc.freeze))
    if tc.channels_last:
        model.to_channels_last()
    frozen = _frozen_modules(model, tuple(tc.freeze))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                                 betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    state = {"epoch": 0, "best_ap": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": [], "threshold": 0.5}
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        loader_gen.set_state(saved["loader_rng"])

    log = console.print if console is not None else print
    resumed = f"; resuming after epoch {state['epoch']}" if state["epoch"] else ""
    log(f"training {trainable:,} parameters on {len(train_set)} images, validating on {len(val_set)}{resumed}")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        while state["epoch"] < tc.epochs and state["bad_epochs"] < tc.patience:
            epoch = state["epoch"] + 1
            train_ds.epoch = epoch
            model.train()
            for m in frozen:
                m.eval()
            task = progress.add_task(f"epoch {epoch}/{tc.epochs}", total=len(train_set), info="")
            losses, start = [], time.time()
            for images, labels, _ in train_loader:
                heads = model(images).head_logits  # (B, M): each head its own loss, as on cached tokens
                loss = sum(loss_fn(heads[:, m], labels) for m in range(heads.shape[1]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                progress.update(task, advance=len(images), info=f"loss {np.mean(losses[-20:]):.4f}")
            train_time = time.time() - start
            vtask = progress.add_task("  validate", total=len(val_set), info="")
            y = np.array([sample.label for sample in val_set])
            s = score_samples(model, val_set, batch_size=tc.batch_size, num_workers=tc.num_workers,
                              progress=progress, task=vtask)
            ap, acc = average_precision(y, s), accuracy(y, s)
            record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_ap": ap, "val_acc": acc,
                      "train_images_per_s": len(train_set) / train_time}
            progress.update(vtask, info=f"AP {ap:.4f} acc {acc:.4f}")
            state["history"].append(record)
            save_detector(model, out / "last.safetensors", name=name, threshold=eer_threshold(y, s))
            if ap > state["best_ap"]:
                state.update(best_ap=ap, best_epoch=epoch, bad_epochs=0, threshold=eer_threshold(y, s))
                save_detector(model, out / "best.safetensors", name=name, threshold=state["threshold"],
                              extra={"val_ap": ap, "epoch": epoch})
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                        "loader_rng": loader_gen.get_state()}, tmp)
            tmp.replace(ckpt)  # atomic: an interrupted save keeps the previous checkpoint
            (out / "history.json").write_text(json.dumps(state["history"], indent=2))
    return TrainResult(state["best_epoch"], state["best_ap"], state["threshold"], state["history"], out)
