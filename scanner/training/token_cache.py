"""Cached trunk outputs: what a frozen trunk computes for an image, computed once.

With the trunk frozen, everything it gives for an image is fixed: the global view's vector, the
PSM boxes picked from its feature map, and the vectors of the patches cropped there. Training
only changes what follows (embedding, AFFM, head: Detector.fuse). So the trunk runs once per image
and condition (clean, JPEG q75, downscaled, augmented draws), its outputs are stored here, and
training and leave-one-out folds run on them in seconds per epoch instead of an hour
(scanner.training.token_training).

Layout: CACHE/<trunk key>/<condition>/shard-<n>.npz, each shard holding `paths` (n,), `tokens`
float16 (n, K+1, C) with the K patch vectors first and the global vector last (the AFFM's token
order), and `boxes` int32 (n, K, 4). The trunk key hashes the trunk's weights and everything that
decides the views (input size, patch strategy, windows, patch sizes), so a cache is never read for
another trunk; trunk.json records the config it was made with, whose picks per window may exceed a
reader's (token_training.patch_columns takes the reader's subset). Shards are written whole (temporary name, then rename): an interrupted
extraction keeps every finished shard and resumes with the images it lacks. Rows are keyed by the
image's resolved path, so `--data ../x` and `--data /abs/x` find the same rows (a relative path
stored by an older cache resolves against the working directory).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from scanner.config import ModelConfig
from scanner.errors import ScannerError
from scanner.model.crop_resize import crop_patches
from scanner.model.preprocess import global_views, image_sizes
from scanner.training.data import Augment, ImageDataset, Sample, collate

SHARD_IMAGES = 256


def row_key(path) -> str:
    """The key of an image's rows: its resolved path (one image, one key, however it was named)."""
    return str(Path(path).resolve())


def trunk_key(model) -> str:
    """12 hex digits naming the trunk (weights) and the view geometry the cache was made with."""
    cfg = model.cfg
    digest = hashlib.sha256()
    # Not picks_per_window: fewer picks are a prefix of more (token_training.patch_columns).
    geometry = {k: getattr(cfg, k) for k in ("backbone", "trunk_blocks", "input_size", "patch_strategy", "windows",
                                             "patch_sizes", "shared_trunk")}
    if tuple(cfg.trunk_pool) != ("cls",):  # a wider vector from the same weights (named only when not the default,
        geometry["trunk_pool"] = list(cfg.trunk_pool)  # so that caches made before it keep their key)
    digest.update(json.dumps(geometry, sort_keys=True, default=list).encode())
    for backbone in (model.backbone, model.local_backbone):
        for name, tensor in sorted(backbone.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


@torch.no_grad()
def trunk_outputs(model, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the frozen trunks give for uint8 images (3, H_i, W_i): tokens (B, K+1, C), boxes (B, K, 4).

    The same steps as Detector.forward up to Detector.fuse, so that
    `model.fuse(tokens[:, :-1], model.embed(tokens[:, -1]))` is the detector's logit.
    """
    device = model.device
    views = global_views(images, model.cfg.input_size).to(device)
    fmap, vector = model._features(model.backbone, views)  # (B, C, 7, 7), (B, C)
    boxes = model.selector(fmap.detach().float(), image_sizes(images))  # (B, K, 4)
    patches = crop_patches(images, boxes.to(images[0].device), model.cfg.input_size).div_(255)
    b, k = patches.shape[:2]
    _, local = model._features(model.local_backbone, patches.flatten(0, 1).to(device))  # (B*K, C)
    tokens = torch.cat([local.view(b, k, -1), vector[:, None, :]], dim=1).float()  # (B, K+1, C)
    return tokens.cpu(), boxes.cpu()


def augmented_condition(augment: Augment, draw: int) -> str:
    """The name of augmented draw `draw` (0, 1, ...) of the training augmentation `augment`."""
    params = json.dumps(dataclasses.asdict(augment), sort_keys=True)
    return f"augment-{hashlib.sha256(params.encode()).hexdigest()[:8]}-{draw}"


class _AugmentedDraw(ImageDataset):
    """Draw `draw` of the training augmentation, each image's randomness seeded by its path: a
    resumed or partial extraction draws exactly what a whole one does."""

    def __init__(self, samples: list[Sample], augment: Augment, draw: int):
        super().__init__(samples)
        self.draw_augment, self.draw = augment, draw

    def __getitem__(self, i: int):
        import random

        from PIL import Image

        from scanner.training.data import pil_to_tensor, read_and_decode

        sample = self.samples[i]
        img = Image.fromarray(read_and_decode(sample.path).permute(1, 2, 0).numpy())
        img = self.draw_augment(img, random.Random(f"{self.draw}:{sample.path}"))
        return pil_to_tensor(img), sample.label, i


class TokenCache:
    """The cached trunk outputs of one trunk (see the module docstring)."""

    def __init__(self, root: str | Path, model):
        self.model = model
        self.key = trunk_key(model)
        self.dir = Path(root) / self.key
        self.picks = model.cfg.picks_per_window
        self._augments: dict[str, tuple[Augment, int]] = {}

    def _shards(self, condition: str) -> list[Path]:
        folder = self.dir / condition
        return sorted(folder.glob("shard-*.npz")) if folder.is_dir() else []

    def _read(self, condition: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for shard in self._shards(condition):
            with np.load(shard) as data:
                for path, tokens, boxes in zip(data["paths"], data["tokens"], data["boxes"]):
                    rows[row_key(path)] = (tokens, boxes)
        return rows

    def ensure(self, samples: list[Sample], condition: str, *, batch_size: int = 32, num_workers: int = 1,
               bf16: bool = False, log=None) -> None:
        """Extract what the cache lacks of `samples` under `condition`: a name of
        scanner.training.leave_one_out.CONDITIONS ("clean", "jpeg75", "downscale0.5") or augmented_condition()."""
        have = {row_key(p) for shard in self._shards(condition) for p in np.load(shard)["paths"]}
        todo = [s for s in samples if row_key(s.path) not in have]
        if not todo:
            return
        folder = self.dir / condition
        folder.mkdir(parents=True, exist_ok=True)
        self._check_picks()
        (self.dir / "trunk.json").write_text(json.dumps(dataclasses.asdict(self.model.cfg), indent=2, default=list))
        self.model.eval()
        loader = DataLoader(self._dataset(todo, condition), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, collate_fn=collate)
        # bf16 on CPUs that have it: twice as fast for the CLIP trunk, cosine 0.99996 to float32 vectors.
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        written = len(self._shards(condition))
        done = 0
        for images, _, index in loader:
            with autocast:
                tokens, boxes = trunk_outputs(self.model, images)
            paths = np.array([row_key(todo[i].path) for i in index.tolist()])
            pending.append((paths, tokens.numpy().astype(np.float16), boxes.numpy().astype(np.int32)))
            done += len(images)
            if sum(len(p[0]) for p in pending) >= SHARD_IMAGES or done == len(todo):
                written = self._write_shard(folder, written, pending)
                pending = []
                if log is not None:
                    log(f"{condition}: {done}/{len(todo)} images through the trunk")

    def _dataset(self, samples: list[Sample], condition: str) -> ImageDataset:
        from scanner.training.leave_one_out import CONDITIONS

        if condition in CONDITIONS:
            return ImageDataset(samples, transform=CONDITIONS[condition])
        if condition in self._augments:
            augment, draw = self._augments[condition]
            return _AugmentedDraw(samples, augment, draw)
        raise ScannerError(f"unknown token-cache condition {condition!r}; expected one of {', '.join(CONDITIONS)} "
                           "or a name from augmented_condition()")

    def augmented(self, augment: Augment, draw: int) -> str:
        """Register draw `draw` of `augment` as a condition; returns its name (augmented_condition)."""
        name = augmented_condition(augment, draw)
        self._augments[name] = (augment, draw)
        return name

    @staticmethod
    def _write_shard(folder: Path, number: int, parts) -> int:
        paths, tokens, boxes = (np.concatenate([p[i] for p in parts]) for i in range(3))
        while (folder / f"shard-{number:05d}.npz").exists():
            number += 1
        tmp = folder / f".shard-{number:05d}.{os.getpid()}.npz"
        np.savez(tmp, paths=paths, tokens=tokens, boxes=boxes)
        tmp.replace(folder / f"shard-{number:05d}.npz")  # atomic: a shard is whole or absent
        return number + 1

    def _check_picks(self) -> None:
        made = self.dir / "trunk.json"
        if made.is_file() and json.loads(made.read_text())["picks_per_window"] != self.picks:
            raise ScannerError(f"the token cache {self.dir} was made with other picks_per_window than "
                               f"{self.picks}; open it with its own model config (trunk.json) or use another cache folder")

    def exists(self) -> bool:
        return (self.dir / "trunk.json").is_file()

    def made_with(self) -> ModelConfig:
        """The model config the cache was made with (its patch picks may exceed a reader's)."""
        from scanner.config import model_config_from_dict

        return model_config_from_dict(json.loads((self.dir / "trunk.json").read_text()))

    def load(self, samples: list[Sample], condition: str) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens float32 (N, K+1, C) and boxes int64 (N, K, 4) of `samples`, in their order."""
        rows = self._read(condition)
        keys = [row_key(s.path) for s in samples]
        missing = [str(s.path) for s, key in zip(samples, keys) if key not in rows]
        if missing:
            raise ScannerError(f"the token cache {self.dir / condition} lacks {len(missing)} images "
                               f"(e.g. {missing[0]}); extract them first (TokenCache.ensure)")
        tokens = torch.from_numpy(np.stack([rows[key][0] for key in keys])).float()
        boxes = torch.from_numpy(np.stack([rows[key][1] for key in keys])).long()
        return tokens, boxes


def print_log(message: str) -> None:
    print(f"scanner: {message}", file=sys.stderr, flush=True)
