"""Remote sources through fsspec: memory:// trees and archives, a local HTTP server, error mapping."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import socket
import sys
import tarfile
import threading
import uuid
import zipfile
from collections.abc import Iterator

import fsspec
import pytest
from PIL import Image

from scanner.errors import ItemError, ScannerError
from scanner.sources import is_url, iter_sources, iter_url, read_item
from scanner.sources.remote import file_url_path, read_url


def _image(fmt: str, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, fmt)
    return buf.getvalue()


JPEG = _image("JPEG", (200, 100, 0))
PNG = _image("PNG", (0, 100, 200))


def _tar_bytes(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip_bytes(members) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _ids(items) -> list[str]:
    return [item.id for item in items]


def test_is_url_and_file_urls():
    assert is_url("s3://bucket/key") and is_url("HTTP://x") and is_url("memory://a") and is_url("file:///a")
    assert not is_url("/data/a.jpg") and not is_url("C:\\data") and not is_url("relative/s3://x")
    assert file_url_path("file:///data/my%20photo.jpg") == "/data/my photo.jpg"
    assert file_url_path("file://localhost/data/a.jpg") == "/data/a.jpg"
    assert file_url_path("s3://b/k") is None
    with pytest.raises(ScannerError, match="another host"):
        file_url_path("file://server/share/a.jpg")


# ------------------------------------------------------------------------------------------- memory://


@pytest.fixture
def bucket():
    """A small tree in fsspec's in-memory filesystem, under a root of its own."""
    fs = fsspec.filesystem("memory")
    root = f"/t{uuid.uuid4().hex}"
    fs.pipe({
        f"{root}/b.jpg": JPEG,
        f"{root}/a/z.png": PNG,
        f"{root}/a/notes.txt": b"hello",
        f"{root}/.hidden.jpg": JPEG,
        f"{root}/c/d/deep.jpg": JPEG,
        f"{root}/shards/s-0.tar.gz": _tar_bytes([("0.jpg", JPEG), ("0.json", b"{}")]),
        f"{root}/shards/s-1.tar.gz": _tar_bytes([("1.png", PNG)]),
        f"{root}/pack.zip": _zip_bytes([("in.jpg", JPEG)]),
    })
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def test_memory_tree_is_walked_sorted_depth_first(bucket):
    items = list(iter_sources([bucket]))
    assert _ids(items) == [f"{bucket}/{name}" for name in (
        "a/notes.txt", "a/z.png", "b.jpg", "c/d/deep.jpg", "pack.zip", "shards/s-0.tar.gz", "shards/s-1.tar.gz")]
    assert all(item.url == item.id for item in items)
    assert [read_item(item) for item in items] == [None, PNG, JPEG, JPEG, None, None, None]
    assert _ids(iter_sources([bucket + "/"])) == _ids(items)  # a trailing slash changes nothing


def test_memory_archives_and_brace_patterns(bucket):
    items = list(iter_sources([f"{bucket}/shards/s-{{0..2}}.tar.gz", f"{bucket}/pack.zip"]))
    assert _ids(items) == [f"{bucket}/shards/s-0.tar.gz::0.jpg", f"{bucket}/shards/s-0.tar.gz::0.json",
                           f"{bucket}/shards/s-1.tar.gz::1.png", f"{bucket}/shards/s-2.tar.gz::",
                           f"{bucket}/pack.zip::in.jpg"]
    assert [items[i].data for i in (0, 2, 4)] == [JPEG, PNG, JPEG]
    assert read_item(items[1]) is None
    assert items[3].error[0] == "not_found" and items[3].error[1].startswith("cannot open archive: ")


def test_memory_single_file_and_missing_file(bucket):
    good, missing = f"{bucket}/b.jpg", f"{bucket}/nope.jpg"
    items = list(iter_sources([good, missing]))
    assert [(item.id, item.url) for item in items] == [(good, good), (missing, missing)]
    assert read_item(items[0]) == JPEG
    with pytest.raises(ItemError) as exc:
        read_item(items[1])
    assert exc.value.kind == "not_found" and str(exc.value).startswith("cannot read URL: ")


def test_read_url_limit(bucket):
    item = next(iter_url(f"{bucket}/b.jpg"))
    with pytest.raises(ItemError) as exc:
        read_url(item, max_bytes=len(JPEG) - 1)
    assert exc.value.kind == "too_large"
    assert read_url(item, max_bytes=len(JPEG)) == JPEG


def test_remote_list_entries(bucket, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{bucket}/b.jpg\n{bucket}/a\nnope://x/y.jpg\n")
    items = list(iter_sources([], from_list=str(listing)))
    assert _ids(items) == [f"{bucket}/b.jpg", f"{bucket}/a/notes.txt", f"{bucket}/a/z.png", "nope://x/y.jpg"]
    assert items[-1].error[0] == "not_found"  # a bad entry in a list does not stop the scan


def test_unknown_scheme_and_missing_fsspec_are_user_errors(monkeypatch):
    with pytest.raises(ScannerError, match="unknown URL scheme 'nope'"):
        iter_sources(["nope://bucket/a.jpg"])
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec -> ImportError
    with pytest.raises(ScannerError, match=r"pip install 'glff-scanner\[remote\]'"):
        iter_sources(["s3://bucket/a.jpg"])


# ---------------------------------------------------------------------------------------------- HTTP


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(tmp_path):
    """A ThreadingHTTPServer on 127.0.0.1 serving tmp_path; yields (base URL, directory)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler,
                                                                                 directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", tmp_path
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_files(http_root):
    base, root = http_root
    big = JPEG + bytes(300_000)  # more than one network read
    (root / "a.jpg").write_bytes(big)
    (root / "readme.txt").write_text("not an image")
    urls = [f"{base}/a.jpg", f"{base}/missing.jpg", f"{base}/readme.txt"]
    items = list(iter_sources(urls))
    assert [(item.id, item.url) for item in items] == list(zip(urls, urls))
    assert read_item(items[0]) == big
    with pytest.raises(ItemError) as exc:
        read_item(items[1])
    assert exc.value.kind == "not_found"  # 404: permanent
    assert read_item(items[2]) is None


def test_http_archives_are_streamed(http_root):
    base, root = http_root
    (root / "shard-0.tar.gz").write_bytes(_tar_bytes([("x.jpg", JPEG), ("x.txt", b"caption")]))
    (root / "shard-1.tar.gz").write_bytes(_tar_bytes([("y.png", PNG)]))
    items = list(iter_sources([f"{base}/shard-{{0..1}}.tar.gz", f"{base}/shard-9.tar.gz"]))
    assert _ids(items) == [f"{base}/shard-0.tar.gz::x.jpg", f"{base}/shard-0.tar.gz::x.txt",
                           f"{base}/shard-1.tar.gz::y.png", f"{base}/shard-9.tar.gz::"]
    assert [read_item(item) for item in items[:3]] == [JPEG, None, PNG]
    assert items[3].error[0] == "not_found"  # 404


@contextlib.contextmanager
def _closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that nothing listens on (bound, never listening, while the block runs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_unreachable_server_is_an_io_error():
    with _closed_port() as port:
        item = next(iter_url(f"http://127.0.0.1:{port}/a.jpg"))
        with pytest.raises(ItemError) as exc:
            read_item(item)
    assert exc.value.kind == "io"
