"""The torch backend on the CPU: the Detector in float32 (the reference), or under bfloat16 autocast.

CPUs with native bfloat16 arithmetic (AVX512-BF16, AMX) run the transformer trunk's matrix products
about twice as fast in bf16 (measured on a 2-core AMD EPYC with AVX512-BF16: CLIP ViT-B/16 cut after
6 layers, 7.6 -> 16 views/s; class-token cosine to float32 0.99996). The feature map, PSM and crop-
resize are unchanged; trunk outputs carry bf16 rounding, so scores move by about 1e-3 and a box can
differ where two PSM windows nearly tie. Without native bf16 the CPU emulates it, slower than float32.
`auto` takes bf16 only where it was measured faster: a transformer trunk (clip_b16) on a CPU with
native bf16; float32 everywhere else. At either precision the runner's copy of a CLIP trunk has its
activation folded into one SiLU (fold_for_inference; same function, 0.88x the trunk's time).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from scanner.errors import ScannerError
from scanner.stages import stage

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (Linux: an avx512_bf16 or amx_bf16 flag)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool({"avx512_bf16", "amx_bf16"} & flags)


BF16_BACKBONES = ("clip_b16",)  # measured faster in bf16 on the CPU; the CNNs were not


def resolve_precision(precision: str, backbone: str, cpuinfo: str | None = None) -> str:
    if precision not in PRECISIONS:
        raise ScannerError(f"--precision is {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if backbone in BF16_BACKBONES and cpu_has_native_bf16(cpuinfo) else "fp32"
    return precision


class Bf16Detector(torch.nn.Module):
    """Runs a Detector under CPU bfloat16 autocast; logits come back as float32."""

    precision = "bf16"  # read by scanner bench's report

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.cfg = model.cfg

    def forward(self, images, need_weights: bool = False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.model(images, need_weights)
        out.logits = out.logits.float()
        return out


def fold_for_inference(model) -> None:
    """Rewrites the Detector's trunks into a faster form of the same function (a CLIP trunk's activation:
    ClipVisionTrunk.fold_activation_scale). The runner's model is only run, never saved."""
    from scanner.model.clip_vit import ClipVisionTrunk

    for backbone in (model.backbone, model.local_backbone):
        trunk = getattr(backbone, "trunk", None)
        if isinstance(trunk, ClipVisionTrunk):
            trunk.fold_activation_scale()


def load_torch_cpu(model_path, precision: str = "auto"):
    """(runner, ModelInfo): the Detector on the CPU at `precision` (auto: bf16 where native)."""
    from scanner.model.weights import load_detector

    model, info = load_detector(model_path)
    fold_for_inference(model)
    model.step_timer = stage  # the Detector's steps count as the scan's global/psm/crop_resize/local stages
    chosen = resolve_precision(precision, info.config.backbone)
    if chosen == "bf16":
        if not cpu_has_native_bf16():
            log.warning("this CPU has no native bfloat16: bf16 is emulated and slower than fp32")
        model = Bf16Detector(model).eval()
    log.info("torch on the CPU: %s%s", chosen, " (auto)" if precision == "auto" else "")
    return model, info
