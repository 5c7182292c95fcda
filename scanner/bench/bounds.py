"""What bounds a scan: each hardware unit's busy share of the wall time, and the scan without its network.

A scan is a pipeline (scanner.scan.pipeline): its rate is that of its busiest unit. `busy_shares` turns the
stage times of one bench run (scanner.stages) into the share of the wall time each unit worked:

    model     the model thread: global view, PSM, crop-resize and local branch (one thread)
    decode    the decode workers: read + sha256 + decode, spread over `workers` threads
    scan      the scan thread's timed work: a GPU loader's batch decode (its batching is not timed)
    write     the writer thread (one)
    enumerate the listing thread (one)

The unit with the largest share is the bound; when even that share is well below 1, the units wait on
something the stages do not time (the GIL, or the scan thread gathering batches).

`FeedRunner` stands in for the network: it computes nothing (score 0.5, empty boxes), so a scan with it
measures the rate at which reading, hashing, decoding, batching and writing can feed a network: the ceiling
of the CPU side, set beside the real scan in the same run (`scanner bench --feed`).
"""

from __future__ import annotations

import torch

from scanner.model.detector import DetectorOutput

MODEL_STAGES = ("global", "psm", "crop_resize", "local")
UNITS = ("model", "decode", "scan", "write", "enumerate")


def busy_shares(stage_seconds: dict[str, float], wall: float, workers: int) -> dict[str, float]:
    """Unit -> busy seconds / (wall seconds x its threads); see the module doc."""
    if wall <= 0:
        return {}
    model = sum(stage_seconds.get(name, 0.0) for name in MODEL_STAGES)
    decode = stage_seconds.get("read", 0.0) + stage_seconds.get("decode", 0.0)
    return {"model": model / wall, "decode": decode / (wall * max(1, workers)),
            "scan": stage_seconds.get("batch_decode", 0.0) / wall, "write": stage_seconds.get("write", 0.0) / wall, "enumerate": stage_seconds.get("enumerate", 0.0) / wall}


def bound(shares: dict[str, float]) -> str | None:
    """The busiest unit."""
    return max(shares, key=shares.get) if shares else None


class FeedRunner:
    """A runner (scanner.scan.inference contract) that computes nothing: logit 0 and `patches` empty boxes
    per image. On a GPU it waits for the device once per batch, so that asynchronous decoding is paid
    inside the timed scan as it would be before a real network."""

    def __init__(self, device: str | torch.device = "cpu", patches: int = 1):
        self.device = torch.device(device)
        self.patches = patches

    def eval(self) -> "FeedRunner":
        return self

    def __call__(self, images: list[torch.Tensor]) -> DetectorOutput:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        b = len(images)
        return DetectorOutput(logits=torch.zeros(b), boxes=torch.zeros((b, self.patches, 4), dtype=torch.long))
