"""The output of a scan: a lock against concurrent runs, resume, and crash-safe appends.

JSONL is written in place: every batch of records goes to the file in one `write()` of whole lines
on an O_APPEND descriptor, so a killed process never leaves half a line (a power cut can; the torn
last line is dropped on the next open). Records are fsync'ed every `fsync_interval` seconds and at
close. Parquet cannot be appended to, so a Parquet output keeps the same JSONL file as a journal
beside it (`OUT.journal.jsonl`) and rewrites the Parquet file from the old rows plus the journal when
the run ends; a run killed before that resumes from the journal.

Resume: opening an existing output reads it once (scanner.scan.final_view.ResumeState) and remembers the
ids that are done, those whose final record is not transient; the scan skips them. An id whose last
record is a transient `io` error is scanned again, and its new record supersedes the old one.
`force=True` starts over instead.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from collections.abc import Iterable

from scanner.errors import LockedError, ScannerError
from scanner.scan.final_view import ResumeState, error_kind
from scanner.scan.idset import IdSet
from scanner.scan.results import SCHEMA_VERSION, dumps

FORMATS = ("jsonl", "parquet")


class OutputLock:
    """An exclusive flock on `OUT.lock`. The kernel drops it when the process dies, even by SIGKILL,
    so a crashed cron run never leaves a stale lock behind."""

    def __init__(self, target: str):
        self.path = target + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise LockedError(
                    f"another scan ({self._holder()}) is writing {self.path[:-5]!r}; wait for it to finish, "
                    f"or write to another --out"
                ) from None
            # The holder before us may have unlinked the file after we opened it: then our lock is on
            # an orphaned inode and a third run could lock a new file. Retry until the path is ours.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _holder(self) -> str:
        try:
            with open(self.path) as fh:
                pid = fh.read().strip()
        except OSError:
            pid = ""
        return f"pid {pid}" if pid.isdigit() else "another process"

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)  # while still holding the lock, so no one else has it yet
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None


def read_resume_state(path: str, model_id: str | None, state: ResumeState | None = None) -> ResumeState:
    """The records of a JSONL output (or journal), added to `state` (done ids, transient ids, final
    counts). Drops a torn last line (truncating the file to its last whole line); refuses a file
    written by another model or schema, or holding a bad line."""
    state = ResumeState() if state is None else state
    if not os.path.exists(path):
        return state
    good_end = 0
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                break  # torn last line: the process died while the OS was writing it
            try:
                record = json.loads(line)
                record_id = record["id"]
            except (ValueError, KeyError, TypeError):
                raise ScannerError(
                    f"{path!r} line {number} is not a scanner record; it was not written by `scanner run` "
                    f"or was edited. Fix or move it, or pass --force to start over"
                ) from None
            _check_compatible(path, record, model_id)
            state.add(record_id, error_kind(record))
            good_end += len(line)
    state.flush()
    if good_end != os.path.getsize(path):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    return state


def _check_compatible(path: str, record: dict, model_id: str | None) -> None:
    if record.get("schema") != SCHEMA_VERSION:
        raise ScannerError(
            f"{path!r} holds records of schema {record.get('schema')!r}, this version writes schema "
            f"{SCHEMA_VERSION}; pass --force to start over or write to another --out"
        )
    if model_id is not None and record.get("model") != model_id:
        raise ScannerError(
            f"{path!r} was written with model {record.get('model')!r}, this run uses {model_id!r}; "
            f"resuming would mix two models in one file. Pass --force to start over or write to another --out"
        )


class ResultStore:
    """Where a scan's records go. Use as a context manager; `done` holds the ids to skip, `state` the
    output's final view (scanner.scan.final_view), kept up to date as records are written."""

    def __init__(self, path, *, fmt: str = "jsonl", force: bool = False, model_id: str | None = None,
                 fsync_interval: float = 5.0):
        if fmt not in FORMATS:
            raise ScannerError(f"output format {fmt!r} is not one of {', '.join(FORMATS)}")
        self.path = os.fspath(path)
        self.fmt = fmt
        self.force = force
        self.model_id = model_id
        self.fsync_interval = fsync_interval
        self.journal = self.path if fmt == "jsonl" else self.path + ".journal.jsonl"
        self.state = ResumeState()
        self.retry_ids: frozenset[str] = frozenset()  # ids whose final record was transient at open
        self.written = 0
        self._lock = OutputLock(self.path)
        self._fd: int | None = None
        self._last_sync = time.monotonic()

    def open(self) -> "ResultStore":
        if self.fmt == "parquet":
            from scanner.scan.parquet import require_pyarrow

            require_pyarrow()  # fail before the scan, not after it
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._lock.acquire()
        try:
            if self.force:
                for stale in {self.path, self.journal}:
                    if os.path.exists(stale):
                        os.unlink(stale)
            self.state = ResumeState()
            if self.fmt == "parquet" and os.path.exists(self.path):
                from scanner.scan.parquet import read_parquet_state

                read_parquet_state(self.path, self.model_id, self.state)  # older than the journal
            read_resume_state(self.journal, self.model_id, self.state)
            self.retry_ids = frozenset(self.state.transient)
            self._fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            self._lock.release()
            raise
        return self

    @property
    def done(self) -> IdSet:
        return self.state.done

    def write(self, records: Iterable[dict]) -> None:
        """Append whole lines in one write; fsync when the interval has passed."""
        records = list(records)
        data = "".join(dumps(r) + "\n" for r in records).encode("ascii")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)  # a regular file takes it whole; loop for the rare short write
            view = view[n:]
        self.written += len(records)
        for record in records:  # the feed has marked their ids done already
            self.state.add(record["id"], error_kind(record), mark_done=False)
        if time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._fd)
        self._last_sync = time.monotonic()

    def close(self, *, finalize: bool = True) -> None:
        """Sync and unlock. For Parquet, `finalize` rewrites the Parquet file from the journal."""
        if self._fd is None:
            return
        try:
            self.sync()
            os.close(self._fd)
            self._fd = None
            if self.fmt == "parquet" and finalize:
                from scanner.scan.parquet import merge_journal

                merge_journal(self.journal, self.path)
        finally:
            self._lock.release()

    def __enter__(self) -> "ResultStore":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        # A failed run keeps its Parquet journal (nothing is lost; the next run resumes from it).
        self.close(finalize=exc_type is None)

