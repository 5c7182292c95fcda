"""The model's own thread in the scan: batch n+1 is gathered and decoded (GPU loaders) while batch n is scored,
and the records are those of the one-thread reference, in order, with nothing lost or written twice.

The batch loader is the nvjpeg loader on the CPU with torchvision's CPU decoder standing in for nvJPEG (the
loader's logic, not the GPU, is what is tested); the model is the tiny detector behind a wrapper that can wait
for, or signal, the scan thread.
"""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from scanner.config import ModelConfig
from scanner.decoding.nvjpeg import NvjpegLoader
from scanner.model.detector import Detector
from scanner.model.weights import load_detector, save_detector
from scanner.scan import pipeline
from scanner.scan.pipeline import ScanOptions, scan

WAIT_S = 20  # a wait that would only run out if the overlap were missing: the test then fails, never hangs


def _jpeg(w: int, h: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    model = Detector(ModelConfig(backbone="tiny"), seed=0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_detector(model, path, name="tiny-test", threshold=0.5)
    return load_detector(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """14 JPEGs of varied sizes and, between them, two files that get error records."""
    root = tmp_path_factory.mktemp("overlap")
    for i in range(14):
        (root / f"img_{i:02d}.jpg").write_bytes(_jpeg(40 + 7 * i, 60 + 3 * i, i))
    (root / "img_03b.jpg").write_bytes(b"not an image at all")
    (root / "img_09b.jpg").write_bytes(_jpeg(64, 64, 99)[:200])  # truncated
    return root


class _StandInLoader(NvjpegLoader):
    """The nvjpeg loader on the CPU; `on_load(batch size)` runs on the scan thread before each batch decode."""

    def __init__(self, model_id: str, options, on_load=None):
        from torchvision.io import decode_jpeg

        def decode_batch(datas, device):
            return [decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8)) for d in datas]

        super().__init__(model_id, options, device="cpu", decode=decode_batch)
        self.on_load = on_load
        self.loads = 0
        self.load_threads: set[str] = set()

    def load(self, batch):
        self.loads += 1
        self.load_threads.add(threading.current_thread().name)
        if self.on_load is not None:
            self.on_load(self.loads)
        return super().load(batch)


def _use_loader(monkeypatch, loader: _StandInLoader) -> None:
    monkeypatch.setattr(pipeline, "resolve_loader", lambda name, device=None: "nvjpeg")
    monkeypatch.setattr(pipeline, "make_loader", lambda name, **kw: loader)


class _Model(torch.nn.Module):
    """The detector, called with a hook before each batch; remembers the threads that scored."""

    def __init__(self, inner, before=None):
        super().__init__()
        self.inner = inner
        self.before = before
        self.calls = 0
        self.threads: set[str] = set()

    def forward(self, images):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        if self.before is not None:
            self.before(self.calls)
        return self.inner(images)


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_next_batch_is_decoded_while_this_one_is_scored(monkeypatch, detector, folder, tmp_path):
    """Batch 1's scoring waits for the loader to start on batch 2: without the model thread this times out."""
    model, info = detector
    second_load = threading.Event()
    loader = _StandInLoader(info.model_id, None, on_load=lambda n: second_load.set() if n == 2 else None)
    overlapped = []

    def before(call):
        if call == 1:
            overlapped.append(second_load.wait(WAIT_S))

    _use_loader(monkeypatch, loader)
    wrapped = _Model(model, before)
    summary = scan(folder, tmp_path / "out.jsonl", wrapped, info, options=ScanOptions(batch_size=4))
    assert overlapped == [True]
    assert summary.scanned == 16 and summary.errors == 2
    assert wrapped.threads == {"scan-model_0"} and "scan-model_0" not in loader.load_threads


def test_records_equal_the_one_thread_reference(monkeypatch, detector, folder, tmp_path):
    model, info = detector
    got, threads = {}, {}
    for workers, model_thread in ((0, True), (3, True), (3, False)):
        loader = _StandInLoader(info.model_id, None)
        _use_loader(monkeypatch, loader)
        out = tmp_path / f"w{workers}{model_thread}.jsonl"
        wrapped = _Model(model)
        scan(folder, out, wrapped, info, options=ScanOptions(batch_size=3, workers=workers, model_thread=model_thread))
        got[workers, model_thread], threads[workers, model_thread] = _records(out), wrapped.threads
    ids = [r["id"] for r in got[0, True]]
    assert len(ids) == len(set(ids)) == 16 and ids == sorted(ids)
    assert got[3, True] == got[0, True] == got[3, False]
    scan_thread = {threading.current_thread().name}
    assert threads[0, True] == threads[3, False] == scan_thread != threads[3, True]
    assert [r["error"]["kind"] for r in got[0, True] if r["error"]] == ["not_image", "decode"]


def test_stopping_writes_what_was_handed_to_the_model_and_a_rerun_does_the_rest(monkeypatch, detector, folder,
                                                                                  tmp_path):
    """Stopped while batch 1 is scored: batches already submitted are scored and written, none twice."""
    model, info = detector
    stop = threading.Event()
    loader = _StandInLoader(info.model_id, None)
    _use_loader(monkeypatch, loader)
    out = tmp_path / "out.jsonl"
    first = scan(folder, out, _Model(model, lambda call: stop.set() if call == 1 else None), info,
                 options=ScanOptions(batch_size=2), stop=stop)
    partial = _records(out)
    assert first.interrupted and 0 < len(partial) < 16
    assert all(r["error"] is not None or r["score"] is not None for r in partial)
    second = scan(folder, out, _Model(model), info, options=ScanOptions(batch_size=2))
    ids = [r["id"] for r in _records(out)]
    assert not second.interrupted and second.skipped_done == len(partial)
    assert len(ids) == len(set(ids)) == 16


def test_a_model_that_never_works_stops_the_scan_on_its_thread(monkeypatch, detector, folder, tmp_path):
    _, info = detector

    def broken(images):
        raise RuntimeError("model is broken")

    broken.eval = lambda: None
    _use_loader(monkeypatch, _StandInLoader(info.model_id, None))
    with pytest.raises(RuntimeError, match="model is broken"):
        scan(folder, tmp_path / "out.jsonl", broken, info, options=ScanOptions(batch_size=4))
    assert not any(t.name.startswith("scan-model") for t in threading.enumerate())
