"""scanner.training.evaluate on a tiny CNNDetection-layout folder with the test-only "tiny" backbone."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from scanner.config import ModelConfig
from scanner.errors import ScannerError
from scanner.model.detector import Detector
from scanner.model.weights import load_detector, save_detector
from scanner.training.data import find_samples, jpeg_compress
from scanner.training.evaluate import BLUR_SIGMAS, JPEG_QUALITIES, evaluate, format_markdown, score_samples

# source -> (real count, fake count); "extra" is deliberately missing from the manifest.
LAYOUT = {"gan_a": (3, 3), "gan_b": (1, 2), "sd": (0, 2), "coco": (2, 0), "extra": (1, 1)}
FAMILIES = {"gan_a": "gan", "gan_b": "gan", "sd": "diffusion", "coco": "diffusion"}
THRESHOLD = 0.37
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _real_image(rng: np.random.Generator) -> Image.Image:
    """A smooth colour gradient, 40x48 (H x W)."""
    y, x = np.mgrid[0:40, 0:48].astype(np.float32)
    a, b, c = rng.uniform(0.5, 3.0, size=3)
    rgb = np.stack([x * a, y * b, (x + y) * c], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _fake_image(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))


def _make_data(root, layout=LAYOUT, manifest=True):
    rng = np.random.default_rng(0)
    rows = ["split,source,generator,family,label,count"]
    for source, (n_real, n_fake) in layout.items():
        for dirname, n, make in (("0_real", n_real, _real_image), ("1_fake", n_fake, _fake_image)):
            if not n:
                continue
            folder = root / source / dirname
            folder.mkdir(parents=True)
            for i in range(n):
                make(rng).save(folder / f"{i:03d}.png")
            if source in FAMILIES:
                rows.append(f"test,{source},{source}-gen,{FAMILIES[source]},{dirname},{n}")
    if manifest:
        (root / "MANIFEST.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaluate")
    data = _make_data(base / "data")
    torch.manual_seed(0)
    # One patch per image keeps the CPU crop-resize reference cheap.
    cfg = ModelConfig(backbone="tiny", windows=(3,), patch_sizes=(224,), picks_per_window=1)
    save_detector(Detector(cfg).eval(), base / "tiny.safetensors", name="tiny-test", threshold=THRESHOLD)
    model, info = load_detector(base / "tiny.safetensors")
    samples = find_samples(data)
    scores = score_samples(model, samples, batch_size=8)
    out = base / "out"
    report = evaluate(model, info, data, batch_size=8, out_dir=out, num_workers=0)
    return {"base": base, "data": data, "model": model, "info": info, "samples": samples,
            "scores": scores, "report": report, "out": out}


def _sk_ap(samples, scores, keep):
    idx = [i for i, s in enumerate(samples) if keep(s)]
    return average_precision_score([samples[i].label for i in idx], scores[idx])


def test_report_structure(setup):
    report, info = setup["report"], setup["info"]
    for key in ("model", "data", "threshold", "images", "per_source", "per_family", "total_map",
                "global_ap", "accuracy", "notes"):
        assert key in report, key
    assert report["model"] == info.model_id
    assert report["images"] == sum(r + f for r, f in LAYOUT.values())
    assert set(report["per_source"]) == set(LAYOUT)
    for source, (n_real, n_fake) in LAYOUT.items():
        entry = report["per_source"][source]
        assert {"ap", "acc", "real", "fake", "family"} <= set(entry)
        assert (entry["real"], entry["fake"]) == (n_real, n_fake)
        assert entry["family"] == FAMILIES.get(source, "unknown")
    assert set(report["per_family"]) == {"gan", "diffusion", "unknown"}
    assert "robustness" not in report
    json.dumps(report, allow_nan=False)  # serialisable, no NaN


def test_scores_are_probabilities_in_sample_order(setup):
    scores = setup["scores"]
    assert scores.shape == (len(setup["samples"]),)
    assert np.all((scores >= 0) & (scores <= 1))
    # Batching and order do not change the scores (each image is scored independently).
    again = score_samples(setup["model"], setup["samples"][4::-1], batch_size=2)[::-1]
    np.testing.assert_allclose(again, scores[:5], atol=1e-5)


def test_ap_matches_sklearn(setup):
    report, samples, scores = setup["report"], setup["samples"], setup["scores"]
    per = report["per_source"]
    for source in ("gan_a", "gan_b", "extra"):
        assert per[source]["ap"] == pytest.approx(_sk_ap(samples, scores, lambda s: s.source == source), abs=1e-12)
    labels = np.array([s.label for s in samples])
    assert report["global_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    aps = [per[s]["ap"] for s in LAYOUT if per[s]["ap"] is not None]
    assert len(aps) == 4  # gan_a, gan_b, extra, sd (paired); coco has none
    assert report["total_map"] == pytest.approx(np.mean(aps), abs=1e-12)
    assert report["per_family"]["gan"]["map"] == pytest.approx(np.mean([per["gan_a"]["ap"], per["gan_b"]["ap"]]))
    assert report["per_family"]["unknown"]["map"] == pytest.approx(per["extra"]["ap"])


def test_one_class_sources(setup):
    report, samples, scores = setup["report"], setup["samples"], setup["scores"]
    sd, coco = report["per_source"]["sd"], report["per_source"]["coco"]
    # Fake-only source: its fakes against all images of the real-only sources.
    expected = _sk_ap(samples, scores, lambda s: s.source in ("sd", "coco"))
    assert sd["ap"] == pytest.approx(expected, abs=1e-12)
    assert sd["paired_with"] == ["coco"]
    # Real-only source: no AP, accuracy still there.
    assert coco["ap"] is None
    coco_scores = np.array([scores[i] for i, s in enumerate(samples) if s.source == "coco"])
    assert coco["acc"] == pytest.approx(float(np.mean(coco_scores < THRESHOLD)))
    assert report["per_family"]["diffusion"]["map"] == pytest.approx(sd["ap"])
    assert any("real-only" in note for note in report["notes"])


def test_threshold_defaults_to_model_info(setup):
    report, samples, scores = setup["report"], setup["samples"], setup["scores"]
    assert setup["info"].threshold == pytest.approx(THRESHOLD)
    assert report["threshold"] == pytest.approx(THRESHOLD)
    labels = np.array([s.label for s in samples])
    assert report["accuracy"] == pytest.approx(float(np.mean((scores >= THRESHOLD) == (labels == 1))))
    for source, entry in report["per_source"].items():
        idx = [i for i, s in enumerate(samples) if s.source == source]
        assert entry["acc"] == pytest.approx(float(np.mean((scores[idx] >= THRESHOLD) == (labels[idx] == 1))))


def test_files_written(setup):
    out, report = setup["out"], setup["report"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["per_source"].keys() == report["per_source"].keys()
    assert on_disk["global_ap"] == pytest.approx(report["global_ap"])
    md = (out / "report.md").read_text()
    assert md == format_markdown(report)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    for source in LAYOUT:
        assert sum(1 for r in rows if r.split("|")[1].strip().rstrip(" *") == source) == 1, source
    assert "total mAP" in md and "global AP" in md
    assert not (out / "robustness_blur.png").exists()


def test_subsample_and_explicit_threshold(setup):
    report = evaluate(setup["model"], setup["info"], setup["data"], batch_size=8, threshold=0.5,
                      max_images_per_source=2, num_workers=0)
    assert report["threshold"] == 0.5  # an explicit threshold wins over the model's
    assert set(report["per_source"]) == set(LAYOUT)
    for source, entry in report["per_source"].items():
        n_real, n_fake = LAYOUT[source]
        assert entry["real"] + entry["fake"] == min(2, n_real + n_fake)
        assert entry["real"] == (min(1, n_real) if n_fake else 2)
    assert any("at most 2 images per source" in note for note in report["notes"])


def test_robustness_sweeps_and_plots(setup, tmp_path):
    # A smaller folder so the sweep (12 extra scoring passes) stays cheap.
    data = _make_data(tmp_path / "data", {"gan_a": (1, 1), "sd": (0, 1), "coco": (1, 0)})
    model, info, out = setup["model"], setup["info"], tmp_path / "out"
    report = evaluate(model, info, data, batch_size=8, robustness=True, out_dir=out, num_workers=0)
    rob = report["robustness"]
    assert [p["sigma"] for p in rob["blur"]] == list(BLUR_SIGMAS)
    assert [p["quality"] for p in rob["jpeg"]] == list(JPEG_QUALITIES)
    assert rob["blur"][0]["global_ap"] == pytest.approx(report["global_ap"])  # sigma 0 = clean images
    assert rob["blur"][0]["total_map"] == pytest.approx(report["total_map"])
    for p in rob["blur"] + rob["jpeg"]:
        assert 0 <= p["global_ap"] <= 1 and 0 <= p["total_map"] <= 1

    # One sweep point recomputed independently from its own scores.
    samples = find_samples(data)
    scores = score_samples(model, samples, batch_size=8, transform=functools.partial(jpeg_compress, quality=50))
    labels = np.array([s.label for s in samples])
    point = next(p for p in rob["jpeg"] if p["quality"] == 50)
    assert point["global_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    gan = _sk_ap(samples, scores, lambda s: s.source == "gan_a")
    sd = _sk_ap(samples, scores, lambda s: s.source in ("sd", "coco"))
    assert point["total_map"] == pytest.approx((gan + sd) / 2, abs=1e-12)

    assert json.loads((out / "report.json").read_text())["robustness"] == rob
    for name in ("robustness_blur.png", "robustness_jpeg.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    md = (out / "report.md").read_text()
    assert "Robustness: Gaussian blur" in md and "Robustness: JPEG compression" in md


def test_without_manifest_every_source_is_its_family(setup, tmp_path):
    data = _make_data(tmp_path / "data", {"a": (1, 1), "b": (1, 1)}, manifest=False)
    report = evaluate(setup["model"], setup["info"], data, num_workers=0)
    assert {s: e["family"] for s, e in report["per_source"].items()} == {"a": "a", "b": "b"}
    assert set(report["per_family"]) == {"a", "b"}
    assert report["per_family"]["a"]["map"] == report["per_source"]["a"]["ap"]


def test_no_real_only_source_leaves_fake_only_without_ap(setup, tmp_path):
    data = _make_data(tmp_path / "data", {"gan_a": (1, 1), "sd": (0, 2)})
    report = evaluate(setup["model"], setup["info"], data, num_workers=0)
    assert report["per_source"]["sd"]["ap"] is None
    assert report["per_source"]["sd"]["acc"] is not None
    assert report["total_map"] == report["per_source"]["gan_a"]["ap"]
    assert math.isfinite(report["global_ap"])
    json.dumps(report, allow_nan=False)


def test_user_errors(setup, tmp_path):
    with pytest.raises(ScannerError):
        evaluate(setup["model"], setup["info"], tmp_path / "missing", num_workers=0)
    with pytest.raises(ScannerError):
        evaluate(setup["model"], setup["info"], setup["data"], max_images_per_source=0, num_workers=0)
