"""scan(): one record per image file, in order, errors at their position; the directory source; records."""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from scanner.config import ModelConfig
from scanner.errors import ScannerError
from scanner.model.detector import Detector
from scanner.model.weights import load_detector, save_detector
from scanner.scan.pipeline import ScanOptions, scan
from scanner.scan.results import KEYS, error_record, result_record
from scanner.sources import iter_directory

from tests.test_decode import encode, gradient, png_claiming

# Good images (path -> (W, H)): sizes below, equal to and above the 224/112 patches, two equal
# shapes (batched together), portrait and landscape, nested directories.
GOOD = {
    "a.jpg": (300, 200),
    "b/c.png": (90, 150),
    "b/d/e.jpg": (224, 224),
    "b/z.png": (64, 48),
    "c/sub/g.bmp": (500, 120),
}
BAD = {
    "b/empty.jpg": (b"", "not_image"),
    "b/d/notes.jpg": (b"some text\n", "not_image"),  # named like an image: reported, not skipped
    "c/trunc.jpg": (None, "decode"),
    "c/sub/huge.png": (None, "too_large"),
}


def part_key(path: str):
    return Path(path).parts


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    torch.manual_seed(0)
    model = Detector(ModelConfig(backbone="tiny"), seed=0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_detector(model, path, name="tiny-test", threshold=0.5)
    return load_detector(path)


def make_tree(root: Path) -> dict[str, object]:
    """Writes the corpus; returns relative path -> (W, H) for images or error kind for bad files."""
    expected: dict[str, object] = {}
    for i, (rel, (w, h)) in enumerate(GOOD.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img = gradient(w, h).rotate(i * 37)
        path.write_bytes(encode(img, {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}[path.suffix]))
        expected[rel] = (w, h)
    for rel, (data, kind) in BAD.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("trunc.jpg"):
            data = encode(gradient(256, 256), "JPEG")[:3000]
        elif rel.endswith("huge.png"):
            data = png_claiming(20000, 20000)
        path.write_bytes(data)
        expected[rel] = kind
    (root / "c" / "dangling.jpg").symlink_to(root / "nowhere.jpg")  # unreadable, also for root
    expected["c/dangling.jpg"] = "not_found"
    (root / "b" / "loop").symlink_to("..", target_is_directory=True)  # directory loop: not followed
    (root / "c" / "self.jpg").symlink_to("self.jpg")  # link to itself: ELOOP on read
    expected["c/self.jpg"] = "io"
    (root / "c" / "a_link.jpg").symlink_to(root / "a.jpg")  # file symlink: an item of its own
    expected["c/a_link.jpg"] = GOOD["a.jpg"]
    (root / "b" / "d" / "notes.txt").write_bytes(b"neither an image by name nor by content\n")  # skipped
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(encode(gradient(8, 8), "JPEG"))
    (root / "b" / ".skip.jpg").write_bytes(b"hidden")
    os.mkfifo(root / "c" / "pipe")  # never opened (it would block)
    expected["c/pipe"] = "not_image"
    return expected


def read_records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan") / "images"
    return root, make_tree(root)


@pytest.fixture(scope="module")
def scanned(tree, detector, tmp_path_factory):
    """batch_size -> (summary, records), each scanned once per module (the CPU is shared)."""
    model, info = detector
    out_dir = tmp_path_factory.mktemp("out")
    cache = {}

    def get(batch_size):
        if batch_size not in cache:
            out = out_dir / f"bs{batch_size}" / "results.jsonl"  # the parent is created by the writer
            summary = scan(tree[0], out, model, info, options=ScanOptions(batch_size=batch_size))
            cache[batch_size] = summary, read_records(out)
        return cache[batch_size]

    return get


def test_scan_tree(tree, detector, scanned):
    _, info = detector
    root, expected = tree
    summary, records = scanned(3)

    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "an id was reported twice"
    assert ids == sorted(ids, key=part_key), "records are not in enumeration order"
    assert sorted(os.path.relpath(i, root) for i in ids) == sorted(expected)
    assert summary.scanned == len(records) == len(expected)
    assert summary.not_images == 1 and summary.skipped_done == 0  # notes.txt
    assert summary.errors == sum(not isinstance(v, tuple) for v in expected.values())
    assert summary.errors_by_kind == dict(collections.Counter(v for v in expected.values() if isinstance(v, str)))
    assert summary.images_per_s > 0

    for record in records:
        assert tuple(record) == KEYS
        assert record["model"] == info.model_id
        rel = os.path.relpath(record["id"], root)
        want = expected[rel]
        if isinstance(want, tuple):
            w, h = want
            assert record["error"] is None, record
            assert (record["width"], record["height"]) == (w, h)
            assert 0.0 <= record["score"] <= 1.0
            assert record["label"] == ("synthetic" if record["score"] >= info.threshold else "real")
            assert len(record["patches"]) == 6
            for x0, y0, x1, y1 in record["patches"]:
                assert all(isinstance(v, int) for v in (x0, y0, x1, y1))
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert record["sha256"] == hashlib.sha256(Path(record["id"]).read_bytes()).hexdigest()
        else:
            assert record["error"]["kind"] == want, record
            assert record["error"]["message"]
            assert record["score"] is None and record["label"] is None and record["patches"] is None


def test_batch_size_does_not_change_scores(scanned):
    _, alone = scanned(1)
    for bs in (3, 64):  # 64: every image in one batch
        _, records = scanned(bs)
        assert [r["id"] for r in records] == [r["id"] for r in alone]
        for r1, r in zip(alone, records):
            assert r["patches"] == r1["patches"]
            assert r["error"] == r1["error"]
            if r1["score"] is not None:
                assert abs(r["score"] - r1["score"]) <= 1e-5, (bs, r["id"])


def test_model_scores_same_alone_or_batched(detector):
    model, _ = detector
    sizes = [(300, 200), (300, 200), (90, 150), (640, 480)]
    images = [torch.from_numpy(np.array(gradient(w, h).rotate(17 * i))).permute(2, 0, 1).contiguous()
              for i, (w, h) in enumerate(sizes)]
    with torch.no_grad():
        batched = model(images)
        for i, img in enumerate(images):
            alone = model([img])
            assert torch.allclose(torch.sigmoid(alone.logits), torch.sigmoid(batched.logits[i : i + 1]), atol=1e-5)
            assert torch.equal(alone.boxes[0], batched.boxes[i])


def test_inference_failure_isolated_to_its_image(tmp_path, tree, detector, scanned):
    model, info = detector
    root, _ = tree

    class Flaky(torch.nn.Module):
        """Fails whenever a 90x150 image is in the batch."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            if any(tuple(img.shape[1:]) == (150, 90) for img in images):
                raise RuntimeError("boom")
            return self.inner(images)

    out = tmp_path / "flaky.jsonl"
    summary = scan(root, out, Flaky(model), info, options=ScanOptions(batch_size=3))
    ok_summary, ok = scanned(3)
    flaky = read_records(out)
    assert [r["id"] for r in ok] == [r["id"] for r in flaky]
    assert summary.errors == ok_summary.errors + 1
    for a, b in zip(ok, flaky):
        if b["id"].endswith(os.path.join("b", "c.png")):
            assert b["error"]["kind"] == "inference" and "boom" in b["error"]["message"]
            assert (b["width"], b["height"]) == (90, 150) and b["sha256"] == a["sha256"]
        elif a["score"] is None:
            assert a == b
        else:
            assert abs(a["score"] - b["score"]) <= 1e-5 and a["patches"] == b["patches"]


def test_broken_model_raises_instead_of_erroring_every_image(tmp_path, tree, detector):
    _, info = detector
    root, _ = tree

    def broken(images):
        raise RuntimeError("model is broken")

    broken.eval = lambda: None
    out = tmp_path / "r.jsonl"
    with pytest.raises(RuntimeError, match="model is broken"):
        scan(root, out, broken, info)
    # The error records written before the failure are whole lines, and no lock is left behind.
    assert all(r["error"] is not None for r in read_records(out))
    assert not (tmp_path / "r.jsonl.lock").exists()


def test_scan_empty_dir_and_bad_inputs(tmp_path, detector):
    model, info = detector
    (tmp_path / "empty").mkdir()
    out = tmp_path / "r.jsonl"
    summary = scan(tmp_path / "empty", out, model, info)
    assert summary.scanned == 0 and out.read_text() == ""
    out.write_text("keep\n")
    with pytest.raises(ScannerError, match="does not exist"):
        scan(tmp_path / "missing", out, model, info)
    with pytest.raises(ScannerError, match="not a scanner record"):
        scan(tmp_path / "empty", out, model, info)  # a foreign file is never appended to
    assert out.read_text() == "keep\n"
    with pytest.raises(ScannerError, match="batch size"):
        scan(tmp_path / "empty", out, model, info, options=ScanOptions(batch_size=0))
    with pytest.raises(ScannerError, match="workers"):
        scan(tmp_path / "empty", out, model, info, options=ScanOptions(workers=-1))
    assert out.read_text() == "keep\n"
    scan(tmp_path / "empty", out, model, info, options=ScanOptions(force=True))
    assert out.read_text() == ""


def test_threshold_override_and_progress(tmp_path, detector):
    from rich.console import Console

    model, info = detector
    root = tmp_path / "images"
    root.mkdir()
    (root / "x.png").write_bytes(encode(gradient(50, 40), "PNG"))
    (root / "y.jpg").write_bytes(b"nope")
    buf = io.StringIO()
    for threshold, label in ((0.0, "synthetic"), (1.0, None)):
        out = tmp_path / f"r{threshold}.jsonl"
        summary = scan(root, out, model, info, options=ScanOptions(threshold=threshold),
                       console=Console(file=buf, force_terminal=True, width=150))
        rec = read_records(out)[0]
        assert rec["label"] == (label or ("synthetic" if rec["score"] >= 1.0 else "real"))
        assert summary.scanned == 2 and summary.errors == 1
    assert "files/s" in buf.getvalue() and "1 errors" in buf.getvalue()


def test_no_overlap_reference_gives_the_same_records(tree, detector, scanned, tmp_path):
    model, info = detector
    _, overlapped = scanned(3)
    out = tmp_path / "seq.jsonl"
    summary = scan(tree[0], out, model, info, options=ScanOptions(batch_size=3, workers=0))
    assert read_records(out) == overlapped
    assert summary.not_images == 1


# sources -------------------------------------------------------------------------------------------


def test_iter_directory_order_hidden_and_loops(tmp_path):
    root = tmp_path / "r"
    for rel in ["b/2.jpg", "b/10.jpg", "a-c/x", "a/b/y", "a/z", "top", ".h/hidden", "a/.dot"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "a" / "b" / "up").symlink_to("../..", target_is_directory=True)
    (root / "a" / "self").symlink_to("self")
    items = list(itertools.islice(iter_directory(root), 1000))  # a followed loop would exceed 1000
    rel = [os.path.relpath(i.id, root) for i in items]
    assert rel == ["a/b/y", "a/self", "a/z", "a-c/x", "b/10.jpg", "b/2.jpg", "top"]
    assert all(i.error is None and i.path == i.id for i in items)
    assert items[0].id == os.path.join(str(root), "a", "b", "y")  # full path as the id


def test_iter_directory_is_lazy(tmp_path, monkeypatch):
    for d in range(3):
        (tmp_path / f"d{d}").mkdir()
        (tmp_path / f"d{d}" / "f").write_bytes(b"x")
    listed = []
    real_scandir = os.scandir

    def spy(path):
        listed.append(os.path.basename(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", spy)
    it = iter_directory(tmp_path)
    next(it)
    assert "d2" not in listed  # later directories are listed only when reached
    assert len(list(it)) == 2


def test_unreadable_directory_becomes_an_io_item(tmp_path, monkeypatch):
    for rel in ["a/1", "locked/2", "z/3"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path):
        # chmod 000 does not stop root (the tests run as root), so the refusal is simulated.
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items = list(iter_directory(tmp_path))
    assert [os.path.relpath(i.id, tmp_path) for i in items] == ["a/1", "locked", "z/3"]
    assert items[1].error[0] == "io" and "Permission denied" in items[1].error[1]


def test_iter_directory_rejects_non_directories(tmp_path):
    with pytest.raises(ScannerError, match="does not exist"):
        next(iter_directory(tmp_path / "nope"))
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ScannerError, match="not a directory"):
        next(iter_directory(tmp_path / "f"))


# results -------------------------------------------------------------------------------------------


def test_records():
    ok = result_record("p/1.jpg", "ab" * 32, 0.123456789, "real", torch.tensor([[0, 1, 2, 3]]), 10, 20, "m@1")
    assert tuple(ok) == KEYS
    assert ok["schema"] == 1 and ok["downscaled"] is False
    assert ok["score"] == 0.123457 and ok["patches"] == [[0, 1, 2, 3]] and ok["error"] is None
    bad = error_record("p/\udcff.jpg", None, "not_image", "nope", "m@1")  # undecodable file name
    assert tuple(bad) == KEYS
    assert bad["score"] is None and bad["label"] is None and bad["patches"] is None
    assert bad["error"] == {"kind": "not_image", "message": "nope"}
    with pytest.raises(ValueError):
        result_record("x", None, float("nan"), "real", [], 1, 1, "m")
    with pytest.raises(ValueError):
        result_record("x", None, 0.5, "fake", [], 1, 1, "m")


def test_an_item_given_twice_is_scanned_once(tree, detector, tmp_path):
    model, info = detector
    root, expected = tree
    again = os.path.join(str(root), "a.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(again + "\n")
    out = tmp_path / "r.jsonl"
    summary = scan([root, again], out, model, info, from_list=str(listing))
    ids = [r["id"] for r in read_records(out)]
    assert len(ids) == len(set(ids)) == len(expected)
    assert summary.skipped_done == 2


class _BatchRecorder:
    """A runner (scanner.scan.inference's contract) that computes nothing and records its batch sizes;
    `device` is where it says it computes, as the GPU runners do (nothing runs there)."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.sizes: list[int] = []

    def eval(self):
        return self

    def __call__(self, images):
        from scanner.model.detector import DetectorOutput

        self.sizes.append(len(images))
        return DetectorOutput(logits=torch.zeros(len(images)), boxes=torch.zeros((len(images), 1, 4), dtype=torch.long))


def test_batch_size_and_workers_default_by_the_models_device(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from scanner.scan import pipeline

    folder = tmp_path / "images"
    folder.mkdir()
    jpeg = encode(gradient(8, 8), "JPEG")
    for i in range(300):
        (folder / f"{i:03d}.jpg").write_bytes(jpeg)
    info = SimpleNamespace(model_id="stub@0", threshold=0.5)
    pools = []
    real_pool = pipeline.ThreadPoolExecutor
    monkeypatch.setattr(pipeline, "ThreadPoolExecutor",
                        lambda n, **kw: pools.append((kw.get("thread_name_prefix"), n)) or real_pool(n, **kw))
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 16)
    for device, batches, workers in (("cpu", [16] * 18 + [12], 4), ("cuda", [256, 44], 12)):
        runner, pools[:] = _BatchRecorder(device), []
        summary = scan(folder, tmp_path / f"{device}.jsonl", runner, info, options=ScanOptions(force=True))
        assert summary.scanned == 300 and summary.errors == 0
        assert runner.sizes == batches
        assert ("scan-decode", workers) in pools
    # Given ones win.
    runner = _BatchRecorder("cuda")
    scan(folder, tmp_path / "given.jsonl", runner, info, options=ScanOptions(force=True, batch_size=100))
    assert runner.sizes == [100, 100, 100]


def test_default_workers_by_cores(monkeypatch):
    from scanner.scan import pipeline

    for cores, cpu, gpu in ((1, 2, 4), (2, 2, 4), (4, 2, 4), (8, 4, 6), (16, 4, 12), (64, 4, 12)):
        monkeypatch.setattr(pipeline.os, "cpu_count", lambda cores=cores: cores)
        assert pipeline.default_workers() == pipeline.default_workers(torch.device("cpu")) == cpu
        assert pipeline.default_workers(torch.device("cuda", 0)) == gpu
    assert pipeline.default_batch_size() == pipeline.default_batch_size(torch.device("cpu")) == 16
    assert pipeline.default_batch_size(torch.device("cuda")) == 256
