"""The odd-file corpus (tests/corpus.py) through a whole scan: as a directory, as a tar.gz and as a
zip. Each file gets exactly one record (an error of the expected kind, or a correct score), files
that are not images get none, and every good file is scored."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import scanner.sources.read as read_module
from scanner.config import ModelConfig
from scanner.decoding.decode import decode_pillow
from scanner.model.detector import Detector
from scanner.model.weights import load_detector, save_detector
from scanner.scan.pipeline import ScanOptions, scan
from scanner.scan.prepare import DecodeOptions
from tests.corpus import BOMB, UNREADABLE, encode, make_corpus, photo, restore_permissions


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_detector(Detector(ModelConfig(backbone="tiny"), seed=0), path, name="tiny", threshold=0.5)
    return load_detector(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected = make_corpus(root, unreadable=True)
    if UNREADABLE not in expected:
        # Running as root, which chmod cannot stop: the file exists and its open() is refused below.
        (root / UNREADABLE).parent.mkdir(parents=True, exist_ok=True)
        (root / UNREADABLE).write_bytes(encode(photo(16, 16), "JPEG"))
        expected[UNREADABLE] = type(expected[BOMB])("error", error="io")
    yield root, expected
    restore_permissions(root)


@pytest.fixture()
def refuse_unreadable(monkeypatch):
    """open() of the unreadable file fails with EACCES, also for root (shadows the builtin in the reader)."""
    def guarded_open(path, *args, **kwargs):
        if str(path).endswith(UNREADABLE):
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(read_module, "open", guarded_open, raising=False)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def reference_score(model, data: bytes) -> float:
    with torch.inference_mode():
        return torch.sigmoid(model([decode_pillow(data).image]).logits.float()).item()


def check(records: list[dict], expected: dict, key, model, read_bytes) -> None:
    """`key(record_id)` -> the corpus path; every non-skip corpus file has exactly one record."""
    by_path = {}
    for record in records:
        rel = key(record["id"])
        assert rel not in by_path, f"{rel} has two records"
        by_path[rel] = record
    want = {rel: e for rel, e in expected.items() if e.kind != "skip"}
    assert sorted(by_path) == sorted(want)
    for rel, e in want.items():
        record = by_path[rel]
        if e.kind == "error":
            assert record["error"] is not None and record["error"]["kind"] == e.error, (rel, record["error"])
            assert record["score"] is None and record["error"]["message"]
            continue
        assert record["error"] is None, (rel, record["error"])
        w, h = e.size
        assert (record["width"], record["height"]) == (w, h), rel
        for x0, y0, x1, y1 in record["patches"]:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, rel
        assert abs(record["score"] - reference_score(model, read_bytes(rel))) <= 1e-5, rel


def test_corpus_directory(corpus, detector, tmp_path, refuse_unreadable):
    model, info = detector
    root, expected = corpus
    assert len(expected) >= 30
    out = tmp_path / "r.jsonl"
    summary = scan(root, out, model, info, options=ScanOptions(batch_size=4))
    records = read_records(out)
    check(records, expected, lambda i: os.path.relpath(i, root).replace(os.sep, "/"), model,
          lambda rel: (root / rel).read_bytes())
    assert summary.not_images == sum(e.kind == "skip" for e in expected.values())
    assert summary.errors == sum(e.kind == "error" for e in expected.values())


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_corpus_in_an_archive(corpus, detector, tmp_path, kind):
    model, info = detector
    root, expected = corpus
    members = {rel: (root / rel).read_bytes() for rel, e in expected.items()
               if (root / rel).is_file() and rel != UNREADABLE and not (root / rel).is_symlink()}
    archive = tmp_path / f"corpus.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for rel, data in members.items():
                zf.writestr(rel, data)
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for rel, data in members.items():
                info_ = tarfile.TarInfo(rel)
                info_.size = len(data)
                tf.addfile(info_, io.BytesIO(data))
    out = tmp_path / "r.jsonl"
    scan(archive, out, model, info, options=ScanOptions(batch_size=5))
    prefix = f"{archive}::"
    records = read_records(out)
    assert all(r["id"].startswith(prefix) for r in records)
    check(records, {rel: expected[rel] for rel in members}, lambda i: i[len(prefix):], model,
          lambda rel: members[rel])


def test_downscale_large_scores_the_bomb(corpus, detector, tmp_path):
    model, info = detector
    root, _ = corpus
    out = tmp_path / "r.jsonl"
    options = ScanOptions(decode=DecodeOptions(downscale_large=True))
    scan(root / BOMB, out, model, info, options=options)
    (record,) = read_records(out)
    assert record["error"] is None and record["downscaled"] is True
    assert (record["width"], record["height"]) == (10_000, 10_000)  # the original size
    from scanner.decoding.decode import DEFAULT_MAX_PIXELS, fit_pixels

    scale = 10_000 / fit_pixels(10_000, 10_000, DEFAULT_MAX_PIXELS)[0]  # scanned -> original pixels
    assert scale > 1.3
    for x0, y0, x1, y1 in record["patches"]:
        assert 0 <= x0 < x1 <= 10_000 and 0 <= y0 < y1 <= 10_000
        # The PSM's 224 and 112 boxes at the scanned scale, mapped back to original pixels.
        assert min(abs((x1 - x0) - 224 * scale), abs((x1 - x0) - 112 * scale)) <= 1.5
        assert min(abs((y1 - y0) - 224 * scale), abs((y1 - y0) - 112 * scale)) <= 1.5
