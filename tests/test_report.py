"""scanner.reports.report and `scanner report`: a self-contained, escaped, well-formed HTML report."""

from __future__ import annotations

import base64
import csv
import io
import re
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from scanner import cli
from scanner.config import ModelConfig
from scanner.errors import ScannerError
from scanner.model.detector import Detector
from scanner.model.weights import load_detector, save_detector
from scanner.reports import report as rp
from scanner.scan.results import dumps, error_record, result_record
from scanner.training.evaluate import evaluate

from tests.test_evaluate import _make_data

HOSTILE = "<script>alert(1)</script>.jpg"
MODEL = "tiny@0123456789ab"
IMG_PREFIX = "data:image/png;base64,"
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "section", "table", "tr",
                "th", "td", "img", "div", "figure", "figcaption", "span", "code", "br"}


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _boxes(w: int, h: int) -> list[list[int]]:
    return [[0, 0, min(w, 224), min(h, 224)]] * 3 + [[0, 0, min(w, 112), min(h, 112)]] * 3


@pytest.fixture()
def scan_dir(tmp_path):
    """Images, archives and a results file that names them, with every kind of awkward record.

    Returns (results path, {id: score} of scored records, ids in expected top order)."""
    root = tmp_path / "data"
    root.mkdir()
    records, scored = [], {}

    def good(item_id: str, score: float, size: tuple[int, int]):
        rec = result_record(item_id, "0" * 64, score, "synthetic" if score >= 0.5 else "real", _boxes(*size),
                            size[0], size[1], MODEL)
        records.append(rec)
        scored[item_id] = score

    for i in range(5):
        path = root / f"img{i}.png"
        _photo(300 + 10 * i, 200, i).save(path)
        good(str(path), 0.2 + 0.1 * i, (300 + 10 * i, 200))
    hostile_path = root / HOSTILE  # a directory "<script>alert(1)<" holding "script>.jpg"
    hostile_path.parent.mkdir(parents=True)
    _photo(260, 260, 9).save(hostile_path, "JPEG")
    good(str(hostile_path), 0.97, (260, 260))
    # Archive members: a tar with a duplicated name (the second is `m.png#2`) and a zip.
    with tarfile.open(root / "shard.tar", "w") as tf:
        for n, size in enumerate(((320, 200), (200, 320))):
            data = _encode(_photo(*size, 20 + n))
            info = tarfile.TarInfo("dir/m.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    good(f"{root / 'shard.tar'}::dir/m.png", 0.95, (320, 200))
    good(f"{root / 'shard.tar'}::dir/m.png#2", 0.94, (200, 320))
    with zipfile.ZipFile(root / "pack.zip", "w") as zf:
        zf.writestr("z.png", _encode(_photo(240, 180, 30)))
    good(f"{root / 'pack.zip'}::z.png", 0.93, (240, 180))
    good(str(root / "gone.jpg"), 0.99, (400, 300))  # missing since the scan: placeholder
    (root / "text.jpg").write_text("no longer an image")
    good(str(root / "text.jpg"), 0.92, (64, 64))  # undecodable: placeholder
    good(f"{root / 'shard.tar'}::absent.png", 0.91, (64, 64))  # member not in the archive: placeholder
    good("bad\udcff\x1bname.png", 0.05, (64, 64))  # non-UTF-8 name and a control character
    records += [
        error_record(str(root / "e1.jpg"), None, "decode", "truncated <b>data</b> & more", MODEL),
        error_record(str(root / "e2.jpg"), None, "decode", "broken", MODEL),
        error_record(HOSTILE, None, "io", '<img src=x onerror="alert(2)">', MODEL),
        error_record(f"{root / 'shard.tar'}::", None, "archive", "truncated archive", MODEL),
    ]
    results = tmp_path / "results.jsonl"
    text = "".join(dumps(r) + "\n" for r in records)
    results.write_text(text + '{"schema": 1, "id": "torn', encoding="ascii")  # a scan killed mid-line
    order = sorted(scored, key=lambda k: -scored[k])
    return results, scored, order


def parse(text: str) -> ET.Element:
    """The report as XML (it is well-formed apart from the doctype), after the HTML parser accepts it."""
    HTMLParser().feed(text)
    assert text.startswith("<!DOCTYPE html>\n")
    return ET.fromstring(text[len("<!DOCTYPE html>\n") :])


def images_of(root: ET.Element) -> list[Image.Image]:
    out = []
    for img in root.iter("img"):
        src = img.get("src")
        assert src.startswith(IMG_PREFIX)
        pic = Image.open(io.BytesIO(base64.b64decode(src[len(IMG_PREFIX) :], validate=True)))
        pic.load()
        assert pic.format == "PNG"
        out.append(pic)
    return out


def section(root: ET.Element, name: str) -> ET.Element | None:
    return next((s for s in root.iter("section") if s.get("id") == name), None)


def test_report_is_self_contained_escaped_and_complete(scan_dir, tmp_path):
    results, scored, order = scan_dir
    out = rp.write_report(results, tmp_path / "r.html", top_n=8, title="<b>My</b> scan")
    text = out.read_text(encoding="utf-8")
    root = parse(text)
    assert {el.tag for el in root.iter()} <= ALLOWED_TAGS  # no script, link, iframe, object...
    assert {a for el in root.iter() for a in el.attrib} <= {"lang", "charset", "id", "class", "src", "alt"}  # no on*
    assert "http://" not in text and "https://" not in text and "url(" not in text and "@import" not in text
    assert "<script" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in text
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in text
    assert "&lt;b&gt;My&lt;/b&gt; scan" in text and root.find("head/title").text == "<b>My</b> scan"
    # every figure inline: histogram, errors chart, 8 thumbnails
    pics = images_of(root)
    assert text.count(f'src="{IMG_PREFIX}') == len(pics) == 1 + 1 + 8

    counts = {tr.find("th").text: int(tr.find("td").text) for tr in section(root, "counts").iter("tr")}
    synthetic = sum(1 for v in scored.values() if v >= 0.5)
    assert counts == {"records": len(scored) + 4, "scored": len(scored), "synthetic (by label)": synthetic,
                      "real (by label)": len(scored) - synthetic, "errors": 4, "downscaled": 0}
    assert "incomplete" in "".join(section(root, "counts").itertext())  # the torn last line is noted

    errors = section(root, "errors")
    rows = {tr.findall("td")[0].text: int(tr.findall("td")[1].text) for tr in errors.iter("tr") if tr.findall("td")}
    assert rows == {"decode": 2, "io": 1, "archive": 1}

    figures = list(section(root, "top").iter("figure"))
    assert len(figures) == 8
    captions = ["".join(f.find("figcaption").itertext()) for f in figures]
    for rank, (item_id, caption) in enumerate(zip(order[:8], captions), 1):
        assert caption.startswith(f"#{rank} {scored[item_id]:.4f}") and item_id in caption
    by_id = {item_id: fig for item_id, fig in zip(order, figures)}
    notes = {item_id: "".join(fig.find("figcaption").itertext()) for item_id, fig in by_id.items()}
    root_dir = results.parent / "data"
    assert "no such file" in notes[str(root_dir / "gone.jpg")]
    assert "not_image" in notes[str(root_dir / "text.jpg")] or "decode" in notes[str(root_dir / "text.jpg")]
    assert "no such member" in notes[f"{root_dir / 'shard.tar'}::absent.png"]
    # Real thumbnails keep the image's aspect (max side 256); placeholders are 256x192 tiles.
    thumbs = dict(zip(order, pics[2:]))
    assert thumbs[f"{root_dir / 'shard.tar'}::dir/m.png"].size == (256, 160)
    assert thumbs[f"{root_dir / 'shard.tar'}::dir/m.png#2"].size == (160, 256)  # the second member, not the first
    assert thumbs[f"{root_dir / 'pack.zip'}::z.png"].size == (240, 180)  # small images are not enlarged
    assert thumbs[str(root_dir / HOSTILE)].size == (256, 256)
    assert thumbs[str(root_dir / "gone.jpg")].size == (256, 192)
    # The patches are drawn: the 224 px box of the 260x260 image is cyan on the thumbnail.
    hostile = np.asarray(thumbs[str(root_dir / HOSTILE)].convert("RGB")).astype(int)
    edge = round(224 * 256 / 260) - 1
    column = hostile[20:200, edge - 1 : edge + 2]
    assert (np.abs(column - np.array([0, 255, 255])).max(axis=-1) <= 40).any(axis=1).mean() > 0.8


def test_non_utf8_and_control_characters_are_shown_escaped(scan_dir, tmp_path):
    results, _, _ = scan_dir
    text = rp.build_report(results, top_n=20)
    parse(text)
    assert "bad\\udcff\\x1bname.png" in text
    assert "\x1b" not in text


def test_empty_results_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    root = parse(rp.build_report(empty))
    assert images_of(root) == []
    assert "No scored records" in "".join(section(root, "scores").itertext())
    assert "No error records" in "".join(section(root, "errors").itertext())
    assert "No scored images" in "".join(section(root, "top").itertext())


def test_only_errors_and_top_zero(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(dumps(error_record(f"f{i}.jpg", None, "io", "gone", MODEL)) + "\n" for i in range(3)))
    root = parse(rp.build_report(path, top_n=0, log_counts=True))
    assert section(root, "top") is None
    assert len(images_of(root)) == 1  # the error chart


def test_bad_lines_and_missing_file_are_user_errors(tmp_path):
    path = tmp_path / "r.jsonl"
    good = dumps(result_record("a.jpg", "0" * 64, 0.3, "real", _boxes(300, 300), 300, 300, MODEL))
    path.write_text(f"{good}\n{good}\nnot json\n")
    with pytest.raises(ScannerError, match="line 3 is not JSON"):
        rp.read_stats(path)
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(ScannerError, match="line 2 is not a scanner record"):
        rp.read_stats(path)
    with pytest.raises(ScannerError, match="does not exist"):
        rp.read_stats(tmp_path / "nope.jsonl")
    runner = CliRunner()
    result = runner.invoke(cli.main, ["report", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "does not exist" in result.output
    result = runner.invoke(cli.main, ["report", str(path), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "line 2" in result.output


def test_top_heap_streams(tmp_path):
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(5000), 3)  # many ties
    path = tmp_path / "r.jsonl"
    with open(path, "w") as fh:
        for i, s in enumerate(scores):
            fh.write(dumps(result_record(f"{i}.jpg", "0" * 64, s, "synthetic" if s >= 0.5 else "real",
                                         _boxes(300, 300), 300, 300, MODEL)) + "\n")
    stats = rp.read_stats(path, top_n=7)
    assert len(stats._heap) == 7
    expected = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:7]  # ties: the earlier record first
    assert [t.id for t in stats.top()] == [f"{i}.jpg" for i in expected]
    assert stats.hist_real.sum() + stats.hist_synthetic.sum() == 5000
    assert stats.hist_synthetic.sum() == int((scores >= 0.5).sum())
    assert stats.threshold() == scores[scores >= 0.5].min()


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("report-eval")
    data = _make_data(base / "data")
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="tiny", windows=(3,), patch_sizes=(224,), picks_per_window=1)
    save_detector(Detector(cfg).eval(), base / "tiny.safetensors", name="tiny-test", threshold=0.4)
    model, info = load_detector(base / "tiny.safetensors")
    out = base / "eval"
    report = evaluate(model, info, data, batch_size=8, out_dir=out, num_workers=0, robustness=True)
    return out, report


def test_eval_writes_scores_csv(eval_dir):
    out, report = eval_dir
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == report["images"]
    assert sum(int(r["label"]) for r in rows) == report["fake"]
    assert {r["source"] for r in rows} == set(report["per_source"])
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)


def test_eval_section(scan_dir, eval_dir, tmp_path):
    results, _, _ = scan_dir
    out, report = eval_dir
    result = CliRunner().invoke(cli.main, ["report", str(results), "--out", str(tmp_path / "r.html"), "--top", "2",
                                           "--eval-report", str(out), "--title", "T", "--log-counts",
                                           "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    root = parse(text)
    ev = section(root, "eval")
    assert [el.text for el in ev.iter("h3")] == ["Precision-recall per source", "Robustness (AP under blur and JPEG)"]
    pics = images_of(root)
    assert len(pics) == 1 + 1 + 2 + 3  # histogram, errors, 2 thumbnails, PR curves + 2 robustness plots
    robust = (out / "robustness_blur.png").read_bytes()
    assert base64.b64encode(robust).decode() in text  # embedded as written by scanner eval
    assert f"{report['global_ap']:.4f}" in "".join(ev.itertext())
    assert re.search(r"Threshold: 0\.5000 \(given\)", "".join(section(root, "scores").itertext()))

    (out / "scores.csv").rename(out / "scores.bak")  # an older eval report: PR curves omitted, said why
    try:
        root = parse(rp.build_report(results, top_n=0, eval_report=out))
    finally:
        (out / "scores.bak").rename(out / "scores.csv")
    assert "No scores.csv" in "".join(section(root, "eval").itertext())
    with pytest.raises(ScannerError, match="not a folder"):
        rp.build_report(results, eval_report=tmp_path / "nope")


def test_histogram_bins_spread_scores_near_0_and_1():
    # Equal steps in logit: 0.99, 0.999 and 0.9999 land in different bins; 0.5 in the middle; the
    # outer bins take everything beyond 0.0001 / 0.9999; bins are monotone in the score.
    assert len({rp.score_bin(s) for s in (0.9, 0.99, 0.999, 0.9998)}) == 4
    assert len({rp.score_bin(s) for s in (0.01, 0.001)}) == 2
    assert rp.score_bin(0.5) == rp.BINS // 2
    assert rp.score_bin(0.0) == rp.score_bin(1e-6) == 0 and rp.score_bin(1.0) == rp.score_bin(1 - 1e-6) == rp.BINS - 1
    assert 0 < rp.score_bin(0.0002) and rp.score_bin(0.9998) < rp.BINS - 1
    scores = np.linspace(0, 1, 1001)
    assert np.all(np.diff([rp.score_bin(s) for s in scores]) >= 0)
