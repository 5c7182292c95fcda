"""ResultStore: lock, resume (torn last line, foreign files, model mismatch), whole-line appends, Parquet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from scanner.errors import LockedError, ScannerError
from scanner.scan.results import dumps, error_record, iter_records, result_record
from scanner.scan.store import OutputLock, ResultStore, read_resume_state


def holds(done, ids) -> bool:
    """The IdSet holds exactly `ids` (it cannot be listed: same size and every id in it)."""
    return len(done) == len(ids) and all(i in done for i in ids)


def rec(i: int, model: str = "m@1") -> dict:
    if i % 3 == 2:
        return error_record(f"img/{i}.jpg", None, "decode", "broken", model)
    return result_record(f"img/{i}.jpg", f"{i:064x}", i / 100, "real", [[0, 0, 4, 4]] * 6, 8, 8, model)


def test_write_resume_and_force(tmp_path):
    out = tmp_path / "deep" / "r.jsonl"
    with ResultStore(out, model_id="m@1") as store:
        assert len(store.done) == 0
        store.write([rec(0), rec(1)])
        assert out.read_text().count("\n") == 2  # visible at once: no user-space buffering
        store.write([rec(2)])
    assert list(iter_records(out)) == [rec(0), rec(1), rec(2)]
    with ResultStore(out, model_id="m@1") as store:
        assert holds(store.done, ["img/0.jpg", "img/1.jpg", "img/2.jpg"])
        store.write([rec(3)])
    assert [r["id"] for r in iter_records(out)] == [f"img/{i}.jpg" for i in range(4)]
    with ResultStore(out, model_id="m@1", force=True) as store:
        assert len(store.done) == 0
    assert out.read_text() == ""


def test_torn_last_line_is_dropped(tmp_path):
    out = tmp_path / "r.jsonl"
    whole = dumps(rec(0)) + "\n" + dumps(rec(1)) + "\n"
    out.write_text(whole + dumps(rec(2))[:25])  # the process died while this line was being written
    assert holds(read_resume_state(str(out), "m@1").done, ["img/0.jpg", "img/1.jpg"])
    assert out.read_text() == whole  # truncated to the last whole line, so appends start clean
    with ResultStore(out, model_id="m@1") as store:
        store.write([rec(2)])
    assert [r["id"] for r in iter_records(out)] == ["img/0.jpg", "img/1.jpg", "img/2.jpg"]


@pytest.mark.parametrize("content, match", [
    ("hello\n", "line 1 is not a scanner record"),
    (dumps(rec(0)) + "\n[1, 2]\n", "line 2 is not a scanner record"),
    (dumps(rec(0, model="other@2")) + "\n", "written with model 'other@2'"),
    (json.dumps({**rec(0), "schema": 99}) + "\n", "schema 99"),
])
def test_foreign_or_incompatible_output_is_refused(tmp_path, content, match):
    out = tmp_path / "r.jsonl"
    out.write_text(content)
    with pytest.raises(ScannerError, match=match):
        ResultStore(out, model_id="m@1").open()
    assert out.read_text() == content  # untouched
    assert not (tmp_path / "r.jsonl.lock").exists()  # and unlocked


def test_lock_refuses_a_second_writer_and_dies_with_its_holder(tmp_path):
    out = tmp_path / "r.jsonl"
    with ResultStore(out, model_id="m@1"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}") as info:
            ResultStore(out, model_id="m@1").open()
        assert info.value.exit_code == 4
    assert not (tmp_path / "r.jsonl.lock").exists()
    ResultStore(out, model_id="m@1").open().close()  # free again

    # A holder killed with SIGKILL leaves no stale lock: the kernel releases flocks of dead processes.
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from scanner.scan.store import OutputLock
        lock = OutputLock({str(out)!r}); lock.acquire()
        print("locked", flush=True); time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            OutputLock(str(out)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = OutputLock(str(out))
    lock.acquire()  # the lock file is still there, but nobody holds it
    lock.release()


def test_periodic_fsync(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    store = ResultStore(tmp_path / "r.jsonl", model_id="m@1", fsync_interval=0.0).open()
    store.write([rec(0)])
    store.write([rec(1)])
    assert len(synced) == 2
    store.close()
    assert len(synced) == 3  # and once more at close
    synced.clear()
    with ResultStore(tmp_path / "r2.jsonl", model_id="m@1", fsync_interval=3600) as store:
        store.write([rec(0)])
        assert synced == []
    assert len(synced) == 1


def test_parquet_journal_resume_and_merge(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
    out = tmp_path / "r.parquet"
    journal = tmp_path / "r.parquet.journal.jsonl"
    with ResultStore(out, fmt="parquet", model_id="m@1") as store:
        store.write([rec(0), rec(1), rec(2)])
    assert not journal.exists()
    assert pq.read_table(out).to_pylist() == [rec(0), rec(1), rec(2)]

    # A run that fails keeps its journal; the next run resumes from journal and Parquet file together.
    with pytest.raises(RuntimeError):
        with ResultStore(out, fmt="parquet", model_id="m@1") as store:
            store.write([rec(3)])
            raise RuntimeError("killed")
    assert journal.exists() and len(pq.read_table(out)) == 3
    with ResultStore(out, fmt="parquet", model_id="m@1") as store:
        assert holds(store.done, [f"img/{i}.jpg" for i in range(4)])
        store.write([rec(4)])
    assert pq.read_table(out).to_pylist() == [rec(i) for i in range(5)]
    with pytest.raises(ScannerError, match="written with model"):
        ResultStore(out, fmt="parquet", model_id="other@2").open()
    with ResultStore(out, fmt="parquet", model_id="other@2", force=True):
        pass
    assert len(pq.read_table(out)) == 0


def test_parquet_refuses_an_id_that_is_not_utf8_and_keeps_the_journal(tmp_path):
    pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
    out = tmp_path / "r.parquet"
    bad = error_record("img/\udcff.jpg", None, "decode", "broken", "m@1")  # a non-UTF-8 file name
    with pytest.raises(ScannerError, match="not valid UTF-8.*--format jsonl"):
        with ResultStore(out, fmt="parquet", model_id="m@1") as store:
            store.write([rec(0), bad])
    journal = tmp_path / "r.parquet.journal.jsonl"
    assert [r["id"] for r in iter_records(journal)] == ["img/0.jpg", "img/\udcff.jpg"]  # nothing lost
    assert not out.exists() and not (tmp_path / "r.parquet.tmp").exists()
    assert not (tmp_path / "r.parquet.lock").exists()


def test_unknown_format(tmp_path):
    with pytest.raises(ScannerError, match="not one of jsonl, parquet"):
        ResultStore(tmp_path / "r", fmt="csv")
