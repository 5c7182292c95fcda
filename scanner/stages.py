"""Per-stage busy time for `scanner bench`: free when no recording is active.

The scan's threads and the backends' runners mark their work with `with stage("decode"):` (the torch
CPU runner through Detector.step_timer: the model itself does not import this module). While a
`StageTimes` records (`with recording(times):`), each stage's wall time is added to its total, summed
over threads (so overlapped stages can add up to more than the run's wall time). Stages on a GPU pass
their device, and the clock is read after synchronizing the thread's current CUDA stream, so that asynchronous
work lands in its stage while another thread's work on another stream (a loader's decode) goes on.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

# batch_decode: a GPU loader decoding a batch on the scan thread (decode: the CPU decoder on the workers).
STAGES = ("enumerate", "read", "decode", "batch_decode", "global", "psm", "crop_resize", "local", "write")


class StageTimes:
    """Seconds and calls per stage, and (images, seconds) per inference batch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.calls = dict.fromkeys(STAGES, 0)
        self.batches: list[tuple[int, float]] = []

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            self.calls[name] = self.calls.get(name, 0) + 1

    def add_batch(self, images: int, seconds: float) -> None:
        with self._lock:
            self.batches.append((images, seconds))


_active: StageTimes | None = None


def _sync(device) -> None:
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.current_stream(device).synchronize()  # this thread's work only: the model and a loader overlap


@contextmanager
def stage(name: str, device=None):
    """Count the block's time towards stage `name` when a recording is active (else nothing)."""
    times = _active
    if times is None:
        yield
        return
    _sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync(device)
        times.add(name, time.perf_counter() - start)


def batch_done(images: int, seconds: float) -> None:
    """One inference batch of `images` took `seconds` (the bench's latency percentiles)."""
    if _active is not None:
        _active.add_batch(images, seconds)


def active() -> bool:
    return _active is not None


@contextmanager
def recording(times: StageTimes):
    """Record into `times` for the duration of the block (one recording at a time)."""
    global _active
    if _active is not None:
        raise RuntimeError("a stage recording is already active")
    _active = times
    try:
        yield times
    finally:
        _active = None
