"""The naive baseline of `scanner bench`: the detector run the way the paper's public code runs it.

PIL opens each file inside a torch DataLoader (ToTensor: float32 CHW in [0, 1]); the model runs
eagerly in float32 NCHW; each image's global view is resized on its own; the patches are cut and
resized in a Python loop over images and boxes; batches are as given (no pixel budget). It computes
the same function as scanner.model.detector.Detector (EXIF orientation applied, same resizes), so its scores
agree with the scan's up to float rounding, and the bench checks that they do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from scanner.model.preprocess import central_square


class PilImages(Dataset):
    """(path, float32 (3, H, W) in [0, 1]) per file, or (path, None) when PIL cannot read it."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image, ImageOps
        from torchvision.transforms.functional import to_tensor

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                rgb = ImageOps.exif_transpose(im).convert("RGB")
        except Exception:  # noqa: BLE001 - a bad file is skipped by the baseline, as its own code would crash
            return str(path), None
        return str(path), to_tensor(rgb)


def _collate(batch):
    return batch  # ragged images: a list, as the reference code keeps them


def naive_model(model):
    """The detector as the public code runs it: float32, NCHW (undo load_detector's channels_last)."""
    model.channels_last = False
    return model.float().to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def naive_forward(model, images: list[torch.Tensor]) -> torch.Tensor:
    """float32 (3, H, W) images in [0, 1] -> logits (B,), one image and one patch at a time."""
    size = model.cfg.input_size
    device = model.device
    images = [img.to(device) for img in images]
    views = []
    for img in images:
        square = central_square(img)[None]
        if square.shape[-1] != size:
            square = F.interpolate(square, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        views.append(square.clamp(0, 1))
    fmap, g = model.global_branch(torch.cat(views))
    sizes = torch.tensor([[img.shape[1], img.shape[2]] for img in images])
    boxes = model.selector(fmap, sizes)  # (B, K, 4)
    patches = []
    for img, img_boxes in zip(images, boxes.tolist()):
        for x0, y0, x1, y1 in img_boxes:
            crop = img[:, y0:y1, x0:x1][None]
            patches.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=True))
    patches = torch.cat(patches).view(len(images), len(boxes[0]), 3, size, size)
    logits, _ = model.local_fusion(patches, g)
    return logits


@dataclass
class NaiveRun:
    images: int
    seconds: float
    scores: dict[str, float] = field(default_factory=dict)
    failed: int = 0
    batch_seconds: list[float] = field(default_factory=list)  # the model's time per batch

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def run_naive(model, paths: list[Path], batch_size: int, workers: int) -> NaiveRun:
    """Score every path with the baseline; the clock covers loading, decoding and the model."""
    loader = DataLoader(PilImages(paths), batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    run = NaiveRun(0, 0.0)
    start = time.perf_counter()
    for batch in loader:
        good = [(p, img) for p, img in batch if img is not None]
        run.failed += len(batch) - len(good)
        if good:
            began = time.perf_counter()
            logits = naive_forward(model, [img for _, img in good])
            run.scores.update(zip((p for p, _ in good), torch.sigmoid(logits).tolist()))
            run.batch_seconds.append(time.perf_counter() - began)
    run.seconds = time.perf_counter() - start
    run.images = len(run.scores)
    return run
