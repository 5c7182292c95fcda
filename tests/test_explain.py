"""scanner.reports.explain and `scanner explain`: the PNG's size, the drawn boxes, the attention shown, backends."""

from __future__ import annotations

import io
import math
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from scanner import cli
from scanner.config import ModelConfig
from scanner.decoding.decode import decode
from scanner.model.detector import Detector, DetectorOutput
from scanner.model.weights import load_detector, save_detector
from scanner.reports import explain as ex

TOLERANCE = 40  # per channel; the outlines are drawn without antialiasing


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("explain-weights") / "tiny.safetensors"
    save_detector(Detector(ModelConfig(backbone="tiny"), seed=0), path, name="tiny-explain", threshold=0.5)
    return path


@pytest.fixture(scope="module")
def loaded(weights):
    return load_detector(weights)


def noise_image(path, w: int, h: int, seed: int = 0) -> None:
    """Grey-ish noise with a bright blob: no pure cyan or magenta anywhere, so outline pixels are ours."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(60, 190, size=(h, w, 3), dtype=np.uint8)
    arr[h // 4 : h // 2, w // 3 : w // 2] = (200, 180, 120)
    Image.fromarray(arr).save(path)


def reference(path, loaded):
    """What the torch model says about the decoded file (boxes, attention)."""
    model, _ = loaded
    image = decode(open(path, "rb").read(), downscale_large=True).image
    with torch.no_grad():
        return model([image], need_weights=True)


def _near(pixels: np.ndarray, x: float, y: float, colour, radius: int = 2) -> bool:
    """Whether some pixel within `radius` of (x, y) has `colour`."""
    h, w = pixels.shape[:2]
    xi, yi = int(round(x)), int(round(y))
    patch = pixels[max(0, yi - radius) : min(h, yi + radius + 1), max(0, xi - radius) : min(w, xi + radius + 1), :3]
    return bool((np.abs(patch.astype(int) - np.asarray(colour)).max(axis=-1) <= TOLERANCE).any())


def edge_hits(pixels: np.ndarray, lay: ex.Layout, box, colour, samples: int = 24) -> float:
    """Share of points along the middle 60% of the box's four edges where the outline colour is found."""
    x0, y0, x1, y1 = box
    hits = total = 0
    for t in np.linspace(0.2, 0.8, samples):
        for x, y in ((x0 + t * (x1 - x0), y0), (x0 + t * (x1 - x0), y1), (x0, y0 + t * (y1 - y0)), (x1, y0 + t * (y1 - y0))):
            total += 1
            hits += _near(pixels, *lay.to_canvas(x, y), colour)
    return hits / total


# ------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("size", [(640, 480), (3000, 2000), (300, 900), (64, 48), (5000, 10)])
def test_layout_is_deterministic(size):
    w, h = size
    lay = ex.layout_for(w, h)
    assert lay.width == ex.WIDTH_PX == 1200
    assert lay.height == ex.TOP_PX + lay.image_h + ex.BOTTOM_PX
    assert lay.image_w <= ex.WIDTH_PX - 2 * ex.MARGIN_PX and lay.image_h <= ex.MAX_IMAGE_PX
    assert lay.image_w == ex.WIDTH_PX - 2 * ex.MARGIN_PX or lay.image_h == ex.MAX_IMAGE_PX
    assert abs(lay.image_w / lay.image_h - w / h) <= max(1 / lay.image_h, 1 / lay.image_w) * (w / h) * 1.5 + 1e-9
    assert lay.to_canvas(0, 0) == (lay.left, lay.top)
    assert lay.to_canvas(w, h) == pytest.approx((lay.left + lay.image_w, lay.top + lay.image_h))
    assert ex.layout_for(w, h) == lay


# ---------------------------------------------------------------------------------------- pictures


@pytest.mark.parametrize("size", [(640, 480), (3000, 2000), (300, 900)])
def test_png_size_and_drawn_boxes_match_the_model(tmp_path, weights, loaded, size):
    w, h = size
    src = tmp_path / "img.png"
    noise_image(src, w, h)
    out = tmp_path / "out.png"
    expl, path = ex.explain_file(str(src), model_path=weights, out=out)
    assert path == out
    png = Image.open(out)
    png.load()
    lay = ex.layout_for(w, h)
    assert png.format == "PNG" and png.size == (lay.width, lay.height)

    ref = reference(src, loaded)
    np.testing.assert_array_equal(expl.boxes, ref.boxes[0].numpy())
    assert expl.score == pytest.approx(torch.sigmoid(ref.logits[0]).item(), abs=1e-6)
    assert expl.groups.tolist() == [0, 0, 0, 1, 1, 1]
    pixels = np.asarray(png.convert("RGB"))
    for box, group in zip(expl.boxes.tolist(), expl.groups.tolist()):
        assert edge_hits(pixels, lay, box, ex.GROUP_COLOURS[group]) >= 0.7, (box, group)
    # A box the model did not pick: its outline is not there (the colour is not everywhere).
    x0, y0, x1, y1 = expl.boxes[0].tolist()
    shifted = [x0 + (x1 - x0) // 3, y0 + (y1 - y0) // 3, x1 - (x1 - x0) // 5, y1 - (y1 - y0) // 5]
    assert edge_hits(pixels, lay, shifted, ex.GROUP_COLOURS[0]) < 0.5


def test_attention_shown_sums_to_what_the_model_gave(tmp_path, weights, loaded):
    src = tmp_path / "img.png"
    noise_image(src, 500, 400, seed=1)
    expl, _ = ex.explain_file(str(src), model_path=weights, out=tmp_path / "o.png")
    ref = reference(src, loaded)
    last = ref.attention[-1][0]  # (K+1, K+1), global token last
    k = last.shape[0] - 1
    np.testing.assert_allclose(expl.attention, last[k, :k].numpy(), atol=1e-6)
    assert expl.attention.sum() == pytest.approx(last[k, :k].sum().item(), abs=1e-5)
    assert expl.attention.sum() + expl.global_self == pytest.approx(1.0, abs=1e-5)
    shown = [float(ex.box_label(expl, i).split(": ")[1]) for i in range(k)]
    assert [ex.box_label(expl, i).split(":")[0] for i in range(k)] == [str(i + 1) for i in range(k)]
    assert sum(shown) == pytest.approx(last[k, :k].sum().item(), abs=k * 0.0005 + 1e-9)
    # The heatmap is the channel mean of the model's feature map (the PSM's activation map / C).
    np.testing.assert_allclose(expl.heatmap, ref.fmap[0].float().mean(0).numpy(), atol=1e-6)


def test_a_model_of_several_heads_shows_their_mean_attention(tmp_path):
    """model.head_pools: each head has its own AFFM; the attention shown is the mean of theirs, and says so."""
    cfg = ModelConfig(backbone="clip_b16", pretrained=False, trunk_blocks=1, trunk_pool=("cls", "mean"),
                      head_pools=(("cls",), ("cls", "mean")), embed_dim=16, fusion_heads=2, fusion_layers=2,
                      picks_per_window=1)
    torch.manual_seed(0)
    path = tmp_path / "heads.safetensors"
    save_detector(Detector(cfg, seed=0), path, name="two-heads", threshold=0.5)
    src = tmp_path / "img.png"
    noise_image(src, 300, 260, seed=2)
    expl, _ = ex.explain_file(str(src), model_path=path, out=tmp_path / "o.png")

    model, _ = load_detector(path)
    seen = {}
    model.fusion.register_forward_pre_hook(lambda module, args: seen.update(tokens=args[0]))  # returns None
    image = decode(open(src, "rb").read(), downscale_large=True).image
    with torch.no_grad():
        model([image], need_weights=True)
        tokens, dim = seen["tokens"], cfg.embed_dim
        rows = []
        for i, affm in enumerate(model.fusion.members):  # each head's own last-layer attention, alone
            last = affm(tokens[..., i * dim:(i + 1) * dim], need_weights=True)[1][-1][0]
            rows.append(last[-1, :-1])
    assert len(rows) == 2 and not torch.allclose(rows[0], rows[1], atol=1e-3)  # the heads differ
    np.testing.assert_allclose(expl.attention, torch.stack(rows).mean(0).numpy(), atol=1e-6)
    assert expl.attention.sum() + expl.global_self == pytest.approx(1.0, abs=1e-5)
    assert any("2 heads" in note for note in expl.notes)


def test_backend_without_fmap_uses_torch_for_heatmap_and_attention(tmp_path, weights, loaded, monkeypatch):
    src = tmp_path / "img.png"
    noise_image(src, 400, 300, seed=2)
    boxes = torch.tensor([[[0, 0, 224, 224], [10, 10, 234, 234], [100, 50, 324, 274],
                           [30, 40, 142, 152], [200, 120, 312, 232], [280, 180, 392, 292]]])

    class Runner:
        def __call__(self, images):
            assert len(images) == 1 and images[0].dtype == torch.uint8
            return DetectorOutput(logits=torch.tensor([2.0]), boxes=boxes)

    seen = {}

    def fake_load(name, model_path, threads, engines_dir):
        seen["args"] = (name, model_path)
        return Runner()

    monkeypatch.setattr(ex, "_load_backend", fake_load)
    expl, out = ex.explain_file(str(src), model_path=weights, backend="fakert", out=tmp_path / "o.png")
    assert seen["args"] == ("fakert", weights)
    np.testing.assert_array_equal(expl.boxes, boxes[0].numpy())  # the backend's boxes are drawn
    assert expl.score == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert expl.backend == "fakert"
    ref = reference(src, loaded)
    np.testing.assert_allclose(expl.heatmap, ref.fmap[0].mean(0).numpy(), atol=1e-6)
    assert any("fakert backend" in n and "torch Detector" in n for n in expl.notes)
    pixels = np.asarray(Image.open(out).convert("RGB"))
    lay = ex.layout_for(400, 300)
    for box, group in zip(expl.boxes.tolist(), expl.groups.tolist()):
        assert edge_hits(pixels, lay, box, ex.GROUP_COLOURS[group]) >= 0.6


def test_backend_with_fmap_and_attention_is_used_alone(tmp_path, loaded):
    model, info = loaded
    image = decode(Image_bytes(300, 200)).image
    with torch.no_grad():
        full = model([image], need_weights=True)

    class Refuses:
        def __call__(self, *a, **k):
            raise AssertionError("the torch model must not run when the backend gives everything")

    expl = ex.explain_image(image, Refuses(), info, runner=lambda images: full, backend="onnxruntime")
    assert expl.notes == ["Score, label, boxes, heatmap and attention: the onnxruntime backend."]
    assert expl.attention is not None and expl.heatmap is not None


def Image_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_unknown_backend_is_a_user_error(tmp_path, weights, monkeypatch):
    import sys

    from scanner.errors import ScannerError

    src = tmp_path / "img.png"
    noise_image(src, 100, 80)
    monkeypatch.setitem(sys.modules, "scanner.backends", None)  # an install without backends
    with pytest.raises(ScannerError, match="not available"):
        ex.explain_file(str(src), model_path=weights, backend="nope", out=tmp_path / "o.png")


# ------------------------------------------------------------------------------------------- CLI


def test_cli_default_out_archive_member_and_errors(tmp_path, weights, monkeypatch):
    src = tmp_path / "photo.png"
    noise_image(src, 320, 240)
    with tarfile.open(tmp_path / "shard.tar", "w") as tf:
        tf.add(src, arcname="dir/member.png")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli.main, ["explain", str(src), "--model", str(weights)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "photo.explain.png").is_file()
    assert "-> photo.explain.png" in result.output
    member = runner.invoke(cli.main, ["explain", f"{tmp_path / 'shard.tar'}::dir/member.png", "--model", str(weights)])
    assert member.exit_code == 0, member.output
    a = np.asarray(Image.open(tmp_path / "photo.explain.png"))
    b = np.asarray(Image.open(tmp_path / "member.explain.png"))
    assert a.shape == b.shape  # same pixels, same geometry (the title's id differs)

    missing = runner.invoke(cli.main, ["explain", str(tmp_path / "nope.jpg"), "--model", str(weights)])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "text.jpg").write_text("not an image")
    bad = runner.invoke(cli.main, ["explain", str(tmp_path / "text.jpg"), "--model", str(weights)])
    assert bad.exit_code == 2 and "cannot decode" in bad.output
    absent = runner.invoke(cli.main, ["explain", f"{tmp_path / 'shard.tar'}::dir/none.png", "--model", str(weights)])
    assert absent.exit_code == 2 and "no such member" in absent.output
