"""Reading a local file: whole, with reads sized by the file (not by the limit), and files that grow or
shrink between the stat and the read."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from scanner.errors import ItemError
from scanner.sources import read as read_module
from scanner.sources.item import Item
from scanner.sources.read import read_item


def _jpeg(side: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((side, side), 64).convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _item(path) -> Item:
    return Item(str(path), path=str(path))


class _RecordingFile:
    """A file object that records the size of every read."""

    def __init__(self, fh, sizes: list):
        self._fh, self._sizes = fh, sizes

    def read(self, n=-1):
        self._sizes.append(n)
        return self._fh.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@pytest.fixture
def read_sizes(monkeypatch):
    sizes: list = []
    monkeypatch.setattr(read_module, "open", lambda *a, **k: _RecordingFile(open(*a, **k), sizes), raising=False)
    return sizes


def _stat_says(monkeypatch, path, size: int) -> None:
    """os.stat, as read.py sees it, reports `size` bytes for `path` (what it said before the file changed)."""
    real = os.stat

    def fake(p, *a, **k):
        st = real(p, *a, **k)
        if os.fspath(p) != str(path):
            return st
        fields = list(st)
        fields[6] = size  # st_size
        return os.stat_result(fields)

    monkeypatch.setattr(read_module.os, "stat", fake)


def test_a_file_is_read_whole_by_reads_no_larger_than_the_file(tmp_path, read_sizes):
    data = _jpeg(300)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    assert read_item(_item(path), max_bytes=1 << 30) == data
    # Never a read sized by the 1 GiB limit: that allocates the limit up front for every file.
    assert read_sizes and all(0 <= n <= len(data) + 1 for n in read_sizes), read_sizes


def test_a_file_that_grew_after_stat_is_read_whole(tmp_path, monkeypatch):
    data = _jpeg(300)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    _stat_says(monkeypatch, path, len(data) // 3)
    assert read_item(_item(path), max_bytes=1 << 30) == data


def test_a_file_that_grew_past_the_limit_after_stat_is_too_large(tmp_path, monkeypatch):
    data = _jpeg(300)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    limit = len(data) - 10
    _stat_says(monkeypatch, path, limit - 100)  # under the limit when stat looked
    with pytest.raises(ItemError) as info:
        read_item(_item(path), max_bytes=limit)
    assert info.value.kind == "too_large"


def test_a_file_smaller_than_stat_said_gives_what_it_holds(tmp_path, monkeypatch):
    data = _jpeg(64)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    _stat_says(monkeypatch, path, len(data) * 4)
    assert read_item(_item(path), max_bytes=1 << 30) == data


def test_a_file_that_grew_from_below_the_sniffed_head_is_read_whole(tmp_path, monkeypatch):
    data = _jpeg(64)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    _stat_says(monkeypatch, path, 10)  # fewer bytes than the head read
    assert read_item(_item(path), max_bytes=1 << 30) == data
