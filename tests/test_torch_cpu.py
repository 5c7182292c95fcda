"""The torch CPU backend's precision: bf16 autocast against the float32 reference, and auto's choice."""

from __future__ import annotations

import pytest
import torch

from scanner.backends.torch_cpu import Bf16Detector, cpu_has_native_bf16, resolve_precision
from scanner.config import ModelConfig
from scanner.errors import ScannerError
from scanner.model.detector import Detector

WITH_BF16 = "processor : 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n"
WITHOUT = "processor : 0\nflags\t\t: fpu sse2 avx2 fma\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16(WITH_BF16) and cpu_has_native_bf16("flags : amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16(WITHOUT) and not cpu_has_native_bf16("")


def test_auto_takes_bf16_only_for_the_transformer_on_a_native_cpu():
    assert resolve_precision("auto", "clip_b16", WITH_BF16) == "bf16"
    assert resolve_precision("auto", "clip_b16", WITHOUT) == "fp32"
    assert resolve_precision("auto", "efficientnet_lite0", WITH_BF16) == "fp32"
    assert resolve_precision("bf16", "tiny", WITHOUT) == "bf16"  # asked for: given, with a warning on load
    with pytest.raises(ScannerError, match="fp16"):
        resolve_precision("fp16", "clip_b16", WITH_BF16)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_scores_stay_close_to_float32(seed):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="clip_b16", trunk_blocks=2, trunk_taps=(1, 2), pretrained=False, embed_dim=64,
                      fusion_heads=4, picks_per_window=1)
    model = Detector(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in ((256, 256), (300, 410), (120, 90))]
    with torch.no_grad():
        want = model(images)
        got = Bf16Detector(model).eval()(images)
    assert got.logits.dtype == torch.float32
    scores, ref = torch.sigmoid(got.logits), torch.sigmoid(want.logits)
    assert (scores - ref).abs().max() < 2e-2  # an untrained trunk; the shipped model: see the model card


@pytest.mark.parametrize("seed", [0, 1])
def test_the_folded_clip_activation_computes_the_same_trunk(seed):
    import copy

    from scanner.model.clip_vit import ClipVisionTrunk

    torch.manual_seed(seed)
    trunk = ClipVisionTrunk(2, taps=(1, 2), pool=("cls", "mean", "std")).eval()
    for p in trunk.parameters():  # CLIP-like scales: a zero-initialised embedding would hide differences
        torch.nn.init.normal_(p, std=0.05)
    folded = copy.deepcopy(trunk)
    folded.fold_activation_scale()
    folded.fold_activation_scale()  # a shared trunk is reached twice: the second call changes nothing
    assert all(isinstance(layer.act, torch.nn.SiLU) for layer in folded.layers)
    views = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        (want_map, want_vec), (got_map, got_vec) = trunk(views), folded(views)
    torch.testing.assert_close(got_vec, want_vec, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_map, want_map, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shared", [True, False])
def test_the_cpu_runner_folds_clip_trunks_and_scores_as_the_saved_detector(tmp_path, shared):
    from scanner.backends.torch_cpu import load_torch_cpu
    from scanner.model.weights import load_detector, save_detector

    torch.manual_seed(2)
    cfg = ModelConfig(backbone="clip_b16", trunk_blocks=2, trunk_taps=(1, 2), pretrained=False, embed_dim=32,
                      fusion_heads=4, picks_per_window=1, shared_trunk=shared)
    model = Detector(cfg).eval()
    for p in model.backbone.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_detector(model, tmp_path / "clip.safetensors", name="clip-fold", dtype=torch.float32)
    reference, _ = load_detector(tmp_path / "clip.safetensors")
    runner, _ = load_torch_cpu(tmp_path / "clip.safetensors", "fp32")
    assert all(isinstance(layer.act, torch.nn.SiLU) for layer in runner.local_backbone.trunk.layers)
    g = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in ((256, 256), (300, 410))]
    with torch.no_grad():
        want, got = reference.eval()(images), runner(images)
    torch.testing.assert_close(got.boxes, want.boxes)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
