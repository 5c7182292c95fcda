"""Runs the detector on a batch of prepared images and turns the outputs into records.

A batch that fails is retried image by image, so one image that breaks the model becomes one error
record and never costs its neighbours their results.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from scanner import stages
from scanner.scan.prepare import Prepared
from scanner.scan.results import error_record, label_for, result_record

log = logging.getLogger(__name__)


def _to_original_pixels(boxes: torch.Tensor, scanned: tuple[int, int], original: tuple[int, int]) -> torch.Tensor:
    """boxes (K, 4) in the scanned image's pixels -> the original image's (they differ when downscaled)."""
    (sh, sw), (oh, ow) = scanned, original
    if (sh, sw) == (oh, ow):
        return boxes
    scale = torch.tensor([ow / sw, oh / sh, ow / sw, oh / sh], dtype=torch.float64)
    limit = torch.tensor([ow, oh, ow, oh], dtype=torch.float64)
    return torch.minimum((boxes.double() * scale).round(), limit).long()


class BatchRunner:
    """`run(batch)` fills in `record` for every prepared image of the batch."""

    def __init__(self, model, model_id: str, threshold: float):
        self.model = model
        self.model_id = model_id
        self.threshold = threshold
        self.succeeded = 0  # images scored so far in this run

    def _forward(self, images: list[torch.Tensor]) -> tuple[list[float], torch.Tensor]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model(images)
        scores = torch.sigmoid(out.logits.float()).cpu().tolist()  # (B,)
        stages.batch_done(len(images), time.perf_counter() - start)
        return scores, out.boxes.cpu()  # (B, K, 4)

    def _record(self, p: Prepared, score: float, boxes: torch.Tensor) -> dict:
        if not math.isfinite(score):
            return error_record(p.item.id, p.sha256, "inference", "model produced a non-finite score",
                                self.model_id, width=p.width, height=p.height, downscaled=p.downscaled)
        boxes = _to_original_pixels(boxes, tuple(p.image.shape[1:]), (p.height, p.width))
        return result_record(p.item.id, p.sha256, score, label_for(score, self.threshold), boxes, p.width,
                             p.height, self.model_id, downscaled=p.downscaled)

    def run(self, batch: list[Prepared]) -> None:
        try:
            scores, boxes = self._forward([p.image for p in batch])
        except Exception as exc:  # noqa: BLE001 - isolate the image that fails, below
            if len(batch) > 1:
                log.warning("batch of %d failed (%s: %s); retrying image by image", len(batch), type(exc).__name__, exc)
            for p in batch:
                self._run_one(p)
        else:
            for p, score, box in zip(batch, scores, boxes):
                p.record = self._record(p, score, box)
            self.succeeded += len(batch)
        for p in batch:
            p.image = None  # free the pixels now

    def _run_one(self, p: Prepared) -> None:
        try:
            scores, boxes = self._forward([p.image])
        except Exception as exc:
            if self.succeeded == 0:
                # Nothing has ever run: the model or the setup is broken, not this image.
                raise
            p.record = error_record(p.item.id, p.sha256, "inference",
                                    f"model failed on this image: {type(exc).__name__}: {exc}",
                                    self.model_id, width=p.width, height=p.height, downscaled=p.downscaled)
            return
        p.record = self._record(p, scores[0], boxes[0])
        self.succeeded += 1
