"""Fault injection: transient failures are retried within a run and by the next run, never recorded
as final. A scripted server on 127.0.0.1 (503, 429, dropped connections, resets, stalls past the
read timeout, 404, a 500 that never ends) and an fsspec in-memory filesystem that raises injected
errors; after a run and a rerun every reachable image is scored, the always-failing one has exactly
one final `io` record, and no id is lost or duplicated in the final view."""

from __future__ import annotations

import errno
import io
import tarfile
import threading
import time
import uuid
from collections import Counter

import fsspec
import pytest
from click.testing import CliRunner
from fsspec.implementations.memory import MemoryFileSystem

from scanner import cli
from scanner.config import ModelConfig
from scanner.errors import ItemError
from scanner.model.detector import Detector
from scanner.model.weights import save_detector
from scanner.scan.final_view import FinalFilter
from scanner.scan.results import iter_records
from scanner.sources import Item, iter_sources, read_item
from scanner.sources.retry import RetryPolicy
from tests.flaky_http import FlakyServer
from tests.test_decode import encode, gradient

FAST = RetryPolicy(retries=3, read_timeout=0.5, base_delay=0.01)


def jpeg(i: int) -> bytes:
    return encode(gradient(40 + 3 * i, 48).rotate(17 * i), "JPEG")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_detector(Detector(ModelConfig(backbone="tiny"), seed=0), path, name="tiny-flaky", threshold=0.5)
    return path


def final_view(path) -> dict[str, dict]:
    """The final record of every id, asserting that the final view has each id once."""
    records = list(iter_records(path))
    kept = FinalFilter(r["id"] for r in records)
    final = [r for r in records if kept.keep(r["id"])]
    ids = [r["id"] for r in final]
    assert len(ids) == len(set(ids)), "an id has two final records"
    return {r["id"]: r for r in final}


def kind(record: dict) -> str | None:
    return record["error"]["kind"] if record["error"] else None


# -------------------------------------------------------------------------------------- reading one URL


@pytest.mark.parametrize("faults, requests", [
    (["503", "503"], 3),
    (["429", "429"], 3),  # with Retry-After: 0
    (["drop"], 2),  # headers and half the body, then the connection closes
    (["reset"], 2),  # closed before any answer
    ([("stall", 30)], 2),  # nothing for longer than the read timeout
])
def test_transient_faults_are_retried(faults, requests):
    with FlakyServer({"/a.jpg": jpeg(0)}, {"/a.jpg": faults}) as server:
        url = server.url("/a.jpg")
        assert read_item(Item(url, url=url), retry=FAST) == jpeg(0)
        assert server.requests["/a.jpg"] == requests


def test_permanent_and_endless_faults():
    with FlakyServer({"/a.jpg": jpeg(0)}, {"/a.jpg": [("always", "500")]}) as server:
        with pytest.raises(ItemError) as info:
            read_item(Item(server.url("/gone.jpg"), url=server.url("/gone.jpg")), retry=FAST)
        assert info.value.kind == "not_found" and server.requests["/gone.jpg"] == 1  # a 404 is not retried
        with pytest.raises(ItemError) as info:
            read_item(Item(server.url("/a.jpg"), url=server.url("/a.jpg")), retry=FAST)
        assert info.value.kind == "io" and "after 4 attempts" in str(info.value) and "500" in str(info.value)
        assert server.requests["/a.jpg"] == 1 + FAST.retries


def test_a_stalled_server_never_hangs_the_read():
    with FlakyServer({"/a.jpg": jpeg(0)}, {"/a.jpg": [("always", ("stall", 600))]}) as server:
        start = time.monotonic()
        with pytest.raises(ItemError) as info:
            read_item(Item(server.url("/a.jpg"), url=server.url("/a.jpg")),
                      retry=RetryPolicy(retries=1, read_timeout=0.3, base_delay=0.01))
        assert time.monotonic() - start < 10
        assert info.value.kind == "io" and "nothing received for 0.3 s" in str(info.value)


def test_remote_tar_resumes_where_a_dropped_stream_stopped():
    members = {f"m{i}.jpg": jpeg(i) for i in range(4)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with FlakyServer({"/s.tar": buf.getvalue()}, {"/s.tar": ["drop", "503"]}) as server:
        items = list(iter_sources([server.url("/s.tar")], retry=FAST))
        assert [(i.id.split("::")[1], i.data) for i in items] == list(members.items())  # no archive error
        assert server.requests["/s.tar"] == 3


def test_local_reads_retry_transient_os_errors(tmp_path, monkeypatch):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg(0))
    errors = [OSError(errno.EIO, "Input/output error"), OSError(errno.ESTALE, "Stale file handle")]
    calls = []

    def flaky_open(file, *args, **kwargs):  # an NFS mount having a bad moment
        calls.append(file)
        if errors:
            raise errors.pop(0)
        return open(file, *args, **kwargs)

    monkeypatch.setattr("scanner.sources.read.open", flaky_open, raising=False)
    assert read_item(Item(str(path), path=str(path)), retry=FAST) == jpeg(0) and len(calls) == 3
    errors.extend([PermissionError(errno.EACCES, "Permission denied")] * 5)
    with pytest.raises(ItemError) as info:
        read_item(Item(str(path), path=str(path)), retry=FAST)
    assert info.value.kind == "io" and len(calls) == 4  # not retried within the run, but transient
    with pytest.raises(ItemError) as info:
        read_item(Item(str(tmp_path / "gone.jpg"), path=str(tmp_path / "gone.jpg")), retry=FAST)
    assert info.value.kind == "not_found"


# --------------------------------------------------------------------------------- a scan and a rerun


N_GOOD = 8
# path -> faults of its first requests. Run 1 (--retries 1) uses two of them and gives up on those with
# three; run 2 (--retries 4) gets through the rest.
SCRIPT = {
    "/0.jpg": ["503", "503", "503"],
    "/1.jpg": ["429", "429", "429"],
    "/2.jpg": ["drop", "drop", "drop"],
    "/3.jpg": ["500", "500", "500"],  # (resets are left to the test above: aiohttp itself retries a
    #                                    request once when a reused keep-alive connection was closed)
    "/4.jpg": [("stall", 20), ("stall", 20)],
    "/5.jpg": ["503"],  # recovered by run 1's retry
    "/dead.jpg": [("always", "500")],  # a 500 that never ends
}


def run_cli(args) -> str:
    result = CliRunner().invoke(cli.main, ["run", "--backend", "torch", "--quiet", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_scan_and_rerun_over_a_flaky_server(weights, tmp_path, fmt):
    files = {f"/{i}.jpg": jpeg(i) for i in range(N_GOOD)}
    files["/dead.jpg"] = jpeg(99)
    with FlakyServer(files, SCRIPT) as server:
        urls = [server.url(f"/{i}.jpg") for i in range(N_GOOD)] + [server.url("/dead.jpg"), server.url("/gone.jpg")]
        listing = tmp_path / "urls.txt"
        listing.write_text("\n".join(urls) + "\n")
        out = tmp_path / f"out.{fmt}"
        base = ["--from-list", listing, "--out", out, "--model", weights, "--format", fmt, "--read-timeout", "0.5"]

        first = run_cli([*base, "--retries", "1"])
        view = final_records(out, fmt)
        assert {u for u, r in view.items() if kind(r) == "io"} == {urls[i] for i in range(5)} | {urls[N_GOOD]}
        assert kind(view[urls[N_GOOD + 1]]) == "not_found"
        assert "6 transient errors will be retried by the next run" in first

        second = run_cli(base)
        view = final_records(out, fmt)
        assert set(view) == set(urls), "an id was lost"
        assert all(kind(view[u]) is None for u in urls[:N_GOOD]), "a reachable image is not scored"
        assert kind(view[urls[N_GOOD]]) == "io" and kind(view[urls[N_GOOD + 1]]) == "not_found"
        assert "scanned 6 files, 6 of them retried after transient errors" in second
        assert "skipped 4 already done" in second
        assert "the output now holds 10 ids: 8 scored, 2 errors (io 1, not_found 1)" in second
        assert server.requests["/gone.jpg"] == 1  # not_found is permanent: not asked again
        assert server.requests["/dead.jpg"] == 2 + 5  # run 1: 1 + 1 retry; run 2: 1 + 4 retries
    if fmt == "jsonl":
        raw = Counter(r["id"] for r in iter_records(out))
        assert raw[urls[N_GOOD]] == 2 and raw[urls[0]] == 2  # appended, never rewritten
        report = CliRunner().invoke(cli.main, ["report", str(out), "--out", str(tmp_path / "r.html"), "--top", "0"])
        assert report.exit_code == 0, report.output
        html = (tmp_path / "r.html").read_text()
        assert "<th>records</th><td class=\"n\">10</td>" in html and "6 earlier records" in html


def final_records(out, fmt: str) -> dict[str, dict]:
    if fmt == "jsonl":
        return final_view(out)
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
    rows = pq.read_table(out).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "the Parquet file holds an id twice"
    return {r["id"]: r for r in rows}


def test_a_remote_archive_that_cannot_be_opened_is_read_by_the_next_run(weights, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"m{i}.jpg")
            info.size = len(jpeg(i))
            tar.addfile(info, io.BytesIO(jpeg(i)))
    with FlakyServer({"/s.tar": buf.getvalue()}, {"/s.tar": ["503"] * 2}) as server:
        out = tmp_path / "out.jsonl"
        args = [server.url("/s.tar"), "--out", out, "--model", weights]
        run_cli([*args, "--retries", "1"])
        assert {r["id"]: kind(r) for r in final_view(out).values()} == {server.url("/s.tar") + "::": "io"}
        run_cli(args)
        view = final_view(out)
    assert sorted(view) == [f"{server.url('/s.tar')}::m{i}.jpg" for i in range(3)]  # the X:: record is superseded
    assert all(kind(r) is None for r in view.values())


# -------------------------------------------------------------------- fsspec memory with injected errors


class FlakyMemoryFS(MemoryFileSystem):
    """fsspec's in-memory filesystem (its store is shared) under the protocol `flakymem`, raising the
    injected errors of FAULTS[path] from open() and of FAULTS[directory + "/"] from ls(), one per call,
    then ALWAYS[path] on every call if it has one."""

    protocol = ("flakymem",)
    FAULTS: dict[str, list[BaseException]] = {}
    ALWAYS: dict[str, BaseException] = {}
    _lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flakymem://") if isinstance(path, str) else path)

    def _inject(self, key: str) -> None:
        with self._lock:
            faults = self.FAULTS.get(key)
            fault = faults.pop(0) if faults else self.ALWAYS.get(key)
        if fault is not None:
            raise fault

    def _open(self, path, mode="rb", **kwargs):
        self._inject(self._strip_protocol(path))
        return super()._open(path, mode, **kwargs)

    def ls(self, path, detail=True, **kwargs):
        self._inject(self._strip_protocol(path).rstrip("/") + "/")
        return super().ls(path, detail=detail, **kwargs)


@pytest.fixture
def flaky_bucket():
    fsspec.register_implementation("flakymem", FlakyMemoryFS, clobber=True)
    root = f"/b{uuid.uuid4().hex}"
    store = MemoryFileSystem()
    store.pipe({f"{root}/{name}": jpeg(i) for i, name in enumerate(
        ["a.jpg", "b.jpg", "c.jpg", "dead.jpg", "sub/d.jpg", "sub/e.jpg"])})
    eio = OSError(5, "Input/output error")
    FlakyMemoryFS.FAULTS = {
        f"{root}/a.jpg": [ConnectionResetError(104, "Connection reset by peer")] * 2,
        f"{root}/b.jpg": [TimeoutError(), eio],
        f"{root}/sub/": [eio, eio],  # the listing of sub/ fails twice
    }
    FlakyMemoryFS.ALWAYS = {f"{root}/dead.jpg": eio}
    yield f"flakymem://{root}"
    store.rm(root, recursive=True)


def test_scan_and_rerun_over_an_fsspec_filesystem_with_injected_errors(weights, tmp_path, flaky_bucket):
    out = tmp_path / "out.jsonl"
    args = [flaky_bucket, "--out", out, "--model", weights, "--workers", "0"]

    def names(view):
        return {u[len(flaky_bucket) + 1:]: kind(r) for u, r in view.items()}

    run_cli([*args, "--retries", "0"])  # every injected error is final for this run
    assert names(final_view(out)) == {"a.jpg": "io", "b.jpg": "io", "c.jpg": None, "dead.jpg": "io", "sub/": "io"}
    second = run_cli(args)  # default retries: a.jpg's second reset, b.jpg's EIO and sub/'s listing pass
    assert "scanned 5 files, 3 of them retried" in second and "skipped 1 already done" in second
    # The sub/ record is superseded by its files' records; dead.jpg keeps one final io record.
    assert names(final_view(out)) == {"a.jpg": None, "b.jpg": None, "c.jpg": None, "dead.jpg": "io",
                                      "sub/d.jpg": None, "sub/e.jpg": None}
