"""The output of a distributed scan: a directory of whole JSONL parts plus a manifest; and `merge`.

    OUT_DIR/
      part-<run>-<block>.jsonl   records (schema 1, scanner.scan.results), each part written whole
      manifest.json              schema, model, inputs, runs (start/end), parts with record counts
      manifest.json.lock         held while a driver writes here (scanner.scan.store.OutputLock)

A part is written under a temporary name, fsync'ed and renamed, so a run killed at any moment
leaves only whole parts (and maybe a `.part-*.tmp`, removed by the next run). Resume reads every
part, in name order (= run, then block), into a ResumeState (scanner.scan.final_view) and skips the ids that
are done; ids whose final record is transient are scanned again. `scanner merge` writes the final
view: each id's last record. Nothing here needs Ray: `scanner merge` runs anywhere.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from scanner.errors import ScannerError
from scanner.scan.final_view import FinalFilter, ResumeState
from scanner.scan.idset import IdSet
from scanner.scan.results import SCHEMA_VERSION, dumps, iter_records
from scanner.scan.store import OutputLock, read_resume_state

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "scanner-parts/1"
_PART = re.compile(r"^part-(?P<run>[0-9A-Za-z-]+)-(?P<block>\d+)\.jsonl$")
_TMP_PREFIX = ".part-"


def new_run_id() -> str:
    """Sorts by start time, to the microsecond (parts of later runs list after earlier ones: the final
    view, scanner.scan.final_view, takes an id's last record in that order); the suffix tells apart runs
    on different directories started at the same instant. (Ids of older versions, without the
    microseconds, sort before those of a later run started in the same second.)"""
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}-" + secrets.token_hex(2)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def list_parts(out_dir: str) -> list[str]:
    """Names of the whole parts in `out_dir`, sorted (= by run, then block)."""
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if _PART.match(name))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    """Temp name + fsync + rename + fsync of the directory: the file appears whole or not at all."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, _TMP_PREFIX + name + ".tmp") if name.startswith("part-") else path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(folder or ".")


@dataclass
class PartDir:
    """A scan's output directory, opened by one driver at a time. Use as a context manager.

    After `open()`, `state` holds the final view of every existing part (resume: `done` are the ids
    to skip); `commit(lines)` writes the next part; `close()` writes the final manifest and unlocks.
    """

    path: str
    model_id: str
    inputs: list[str] = field(default_factory=list)
    from_list: str | None = None
    force: bool = False
    run_id: str = field(default_factory=new_run_id)
    state: ResumeState = field(default_factory=ResumeState)
    retry_ids: frozenset = frozenset()  # ids whose final record was transient at open
    parts: dict[str, int] = field(default_factory=dict)  # part name -> records
    written: int = 0  # records committed by this run
    _block: int = 0
    _started: str = ""
    _runs: list[dict] = field(default_factory=list)
    _lock: OutputLock | None = None

    def open(self) -> "PartDir":
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ScannerError(f"{self.path!r} is a file; a distributed scan (--ray) writes a directory of parts: "
                               f"pass a directory to --out, and `scanner merge DIR --out FILE` for one file")
        os.makedirs(self.path, exist_ok=True)
        self._lock = OutputLock(os.path.join(self.path, MANIFEST))
        self._lock.acquire()
        try:
            self._load()
            self._write_manifest(ended=None)
        except BaseException:
            self._lock.release()
            raise
        return self

    def _load(self) -> None:
        for name in os.listdir(self.path):  # leftovers of a run killed while writing a part
            if name.startswith(_TMP_PREFIX) and name.endswith(".tmp"):
                os.unlink(os.path.join(self.path, name))
        if self.force:
            for name in list_parts(self.path):
                os.unlink(os.path.join(self.path, name))
            if os.path.exists(os.path.join(self.path, MANIFEST)):
                os.unlink(os.path.join(self.path, MANIFEST))
        previous = read_manifest(self.path)
        if previous is not None:
            self._runs = list(previous.get("runs", []))
        for name in list_parts(self.path):
            before = self.state.records
            # Checks schema and model on every line: a part of another model is refused, not mixed.
            read_resume_state(os.path.join(self.path, name), self.model_id, self.state)
            self.parts[name] = self.state.records - before
        self.retry_ids = frozenset(self.state.transient)
        self._started = _now()

    @property
    def done(self) -> IdSet:
        return self.state.done

    def commit(self, lines: list[str]) -> str:
        """Write the next part (atomically): `lines` are records serialised by scanner.scan.results.dumps.
        Returns its name. (`done` is not updated: the scan's feed owns it from the start, and adds
        every id it hands out, so an item given twice is scanned once; the driver adds the records
        to `state` as they arrive.)"""
        name = f"part-{self.run_id}-{self._block:06d}.jsonl"
        self._block += 1
        _write_atomic(os.path.join(self.path, name), "".join(line + "\n" for line in lines).encode("ascii"))
        self.parts[name] = len(lines)
        self.written += len(lines)
        return name

    def write_manifest(self) -> None:
        """The manifest as of now (a run in progress has no end time)."""
        self._write_manifest(ended=None)

    def _write_manifest(self, ended: str | None, interrupted: bool = False) -> None:
        run = {"run": self.run_id, "started": self._started, "ended": ended, "records": self.written,
               "interrupted": interrupted}
        manifest = {
            "format": MANIFEST_FORMAT,
            "schema": SCHEMA_VERSION,
            "model": self.model_id,
            "inputs": self.inputs,
            "from_list": self.from_list,
            "started": (self._runs[0]["started"] if self._runs else self._started),
            "ended": ended,
            "records": sum(self.parts.values()),
            "runs": [*self._runs, run],
            "parts": [{"name": name, "records": n} for name, n in sorted(self.parts.items())],
        }
        _write_atomic(os.path.join(self.path, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode())

    def close(self, *, interrupted: bool = False) -> None:
        if self._lock is None:
            return
        try:
            self._write_manifest(ended=_now(), interrupted=interrupted)
        finally:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "PartDir":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(interrupted=exc_type is not None)


def read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except ValueError:
        raise ScannerError(f"{path!r} is not valid JSON; it was edited or not written by `scanner run --ray`") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ScannerError(f"{path!r} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


# -- merge -----------------------------------------------------------------------------------------


@dataclass
class MergeSummary:
    parts: int
    records: int  # written to the merged file: one per id
    superseded: int  # records dropped because a later one of the same id supersedes them


def iter_part_records(out_dir: str) -> Iterator[dict]:
    """Every record of every part, part by part, streamed."""
    for name in list_parts(out_dir):
        yield from iter_records(os.path.join(out_dir, name))


def _checked(records: Iterable[dict], model_id: str | None) -> Iterator[dict]:
    """The records, refusing one of another model or schema."""
    for record in records:
        if record.get("schema") != SCHEMA_VERSION or (model_id is not None and record.get("model") != model_id):
            raise ScannerError(f"a part holds a record of schema {record.get('schema')!r} and model "
                               f"{record.get('model')!r}; expected schema {SCHEMA_VERSION} and model {model_id!r}")
        yield record


def _final(out_dir: str, model_id: str | None, summary: MergeSummary) -> Iterator[dict]:
    """The final view of the parts (scanner.scan.final_view): each id's last record, in part order."""
    kept = FinalFilter(record["id"] for record in iter_part_records(out_dir))
    for record in _checked(iter_part_records(out_dir), model_id):
        if kept.keep(record["id"]):
            summary.records += 1
            yield record
    summary.superseded = kept.superseded


def merge_parts(out_dir, out, fmt: str | None = None) -> MergeSummary:
    """Stream every part of `out_dir` into the single file `out` (JSONL, or Parquet for fmt="parquet"
    or a .parquet name), each id once (its final record, scanner.scan.final_view), written under a
    temporary name and renamed at the end.

    Parts are whole by construction, so merging during a run gives the records committed so far.
    Refuses a directory with no manifest, a part the manifest lists that is missing (rerun the scan
    to redo it), or parts of another model.
    """
    out_dir, out = os.fspath(out_dir), os.fspath(out)
    fmt = fmt or ("parquet" if out.endswith(".parquet") else "jsonl")
    if fmt not in ("jsonl", "parquet"):
        raise ScannerError(f"merge format {fmt!r} is not one of jsonl, parquet")
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise ScannerError(f"{out_dir!r} has no {MANIFEST}; pass the --out directory of `scanner run --ray`")
    present = set(list_parts(out_dir))
    missing = [p["name"] for p in manifest.get("parts", []) if p["name"] not in present]
    if missing:
        raise ScannerError(f"{len(missing)} part(s) listed in {out_dir}/{MANIFEST} are missing (first: {missing[0]}); "
                           f"rerun `scanner run --ray` with the same --out to scan their images again, then merge")
    summary = MergeSummary(parts=len(present), records=0, superseded=0)
    records = _final(out_dir, manifest.get("model"), summary)
    parent = os.path.dirname(out)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = out + ".tmp"
    try:
        if fmt == "jsonl":
            with open(tmp, "wb") as fh:
                for record in records:
                    fh.write((dumps(record) + "\n").encode("ascii"))
                fh.flush()
                os.fsync(fh.fileno())
        else:
            _write_parquet(records, tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    os.replace(tmp, out)
    return summary


def _write_parquet(records: Iterable[dict], path: str) -> None:
    from scanner.scan.parquet import arrow_schema, require_pyarrow, write_records

    require_pyarrow()
    import pyarrow.parquet as pq

    schema = arrow_schema()
    with pq.ParquetWriter(path, schema) as writer:
        write_records(writer, records, schema, "merge to JSONL instead (--out FILE.jsonl)")
