"""Backend throughput, measured: the numbers behind `--backend auto` (scanner.backends.CPU_PREFERENCE).

Both backends live in one process and take turns on the same batches, so a slow phase of a busy
machine hits both alike; the median over repetitions is reported. Decoding is outside the timing:
this compares the models, not the pipeline.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

# Measured on the 2-core build machine (no GPU, shared with other jobs: load average 1-4), default
# model (EfficientNet-Lite0), 64 JPEGs of 256x256 from the dev set, batch 16, 2 threads, 5 rounds
# alternating; images/s, median of each of three runs. onnxruntime was 2.8-3.5x faster in every run
# (and every round); scores agreed within 4e-7 and all boxes were equal.
MEASURED_CPU = {"torch": (1.3, 3.1, 1.4), "onnxruntime": (3.8, 10.9, 4.3)}


@dataclass
class BackendTiming:
    backend: str
    images_per_s: list[float] = field(default_factory=list)  # one per repetition

    @property
    def median(self) -> float:
        return statistics.median(self.images_per_s) if self.images_per_s else 0.0


@dataclass
class Comparison:
    batch: int
    threads: int
    images: int
    timings: dict[str, BackendTiming]
    max_score_diff: float  # max |sigmoid(logit) difference| between the backends over all images
    box_mismatches: int  # images whose patch boxes differ between the backends

    def format(self) -> str:
        lines = [f"{self.images} images, batch {self.batch}, {self.threads} threads:"]
        for t in self.timings.values():
            runs = ", ".join(f"{v:.1f}" for v in t.images_per_s)
            lines.append(f"  {t.backend:<12} median {t.median:6.1f} images/s  ({runs})")
        lines.append(f"  max score diff {self.max_score_diff:.2e}, images with different boxes: {self.box_mismatches}")
        return "\n".join(lines)


def compare_backends(model_path, images: list[torch.Tensor], threads: int, *, batch: int = 16, reps: int = 5,
                     backends: tuple[str, ...] = ("torch", "onnxruntime"), cache_dir=None) -> Comparison:
    """Throughput of each backend on `images` (uint8 (3, H, W)), in batches of `batch`.

    One untimed warm-up pass each, then `reps` rounds; in each round every backend runs all images
    once, the order alternating between rounds.
    """
    from scanner.backends import load_backend

    torch.set_num_threads(threads)
    runners = {name: load_backend(name, model_path, threads=threads, cache_dir=cache_dir)[0] for name in backends}
    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    outputs = {}
    for name, runner in runners.items():
        outputs[name] = _run_all(runner, batches)
    timings = {name: BackendTiming(name) for name in runners}
    for rep in range(reps):
        order = list(runners) if rep % 2 == 0 else list(reversed(runners))
        for name in order:
            start = time.perf_counter()
            _run_all(runners[name], batches)
            timings[name].images_per_s.append(len(images) / (time.perf_counter() - start))
    first, *others = backends
    score_diff, mismatches = 0.0, 0
    for other in others:
        (s0, b0), (s1, b1) = outputs[first], outputs[other]
        score_diff = max(score_diff, float((s0 - s1).abs().max()))
        mismatches += int((b0 != b1).flatten(1).any(dim=1).sum())
    return Comparison(batch, threads, len(images), timings, score_diff, mismatches)


def _run_all(runner, batches: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (N,) and boxes (N, K, 4) over all batches."""
    scores, boxes = [], []
    with torch.inference_mode():
        for chunk in batches:
            out = runner(chunk)
            scores.append(torch.sigmoid(out.logits.float()))
            boxes.append(out.boxes)
    return torch.cat(scores), torch.cat(boxes)
