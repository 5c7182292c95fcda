"""`--format parquet`: the JSONL records as a Parquet table (pyarrow, the `parquet` extra).

Columns mirror the JSONL keys; `error` is a struct {kind, message}. Written once per run from the
previous Parquet file plus the run's JSONL journal (scanner.scan.store), in bounded-size row groups, as
their final view (scanner.scan.final_view): a row superseded by a later record of its id (a transient
error scanned again) is dropped, so the Parquet file holds one row per id.
"""

from __future__ import annotations

import os

from scanner.errors import MissingPackageError, ScannerError
from scanner.scan.final_view import FinalFilter, ResumeState
from scanner.scan.results import KEYS, iter_records

ROWS_PER_GROUP = 65536


def require_pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingPackageError("--format parquet needs pyarrow: pip install 'glff-scanner[parquet]'") from None
    return pyarrow


def arrow_schema():
    pa = require_pyarrow()
    return pa.schema([
        ("schema", pa.int16()),
        ("id", pa.string()),
        ("sha256", pa.string()),
        ("score", pa.float64()),
        ("label", pa.string()),
        ("patches", pa.list_(pa.list_(pa.int64()))),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("downscaled", pa.bool_()),
        ("model", pa.string()),
        ("error", pa.struct([("kind", pa.string()), ("message", pa.string())])),
    ])


def read_parquet_state(path: str, model_id: str | None, state: ResumeState) -> None:
    """Adds the rows of an existing Parquet output to `state` (scanner.scan.final_view); refuses one written
    by another model."""
    require_pyarrow()
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(columns=["id", "model", "error"], batch_size=ROWS_PER_GROUP):
        models = set(batch.column("model").to_pylist())
        if model_id is not None and models - {model_id}:
            raise ScannerError(
                f"{path!r} was written with model {sorted(models - {model_id})[0]!r}, this run uses "
                f"{model_id!r}; pass --force to start over or write to another --out"
            )
        for record_id, error in zip(batch.column("id").to_pylist(), batch.column("error").to_pylist()):
            state.add(record_id, error["kind"] if error else None)
    state.flush()


def to_table(rows: list[dict], schema, hint: str):
    """An Arrow table of records; an id that is not valid UTF-8 (a file name in another encoding) cannot
    be a Parquet string: a ScannerError saying so, with `hint` on what to do instead."""
    pa = require_pyarrow()
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except UnicodeEncodeError:
        bad = next(r["id"] for r in rows if not _is_utf8(r["id"]))
        raise ScannerError(f"id {bad!r} is not valid UTF-8 (a file name in another encoding), which Parquet "
                           f"strings must be; {hint}") from None


def write_records(writer, records, schema, hint: str) -> None:
    """Append records to a ParquetWriter in row groups of ROWS_PER_GROUP (never all in memory)."""
    rows: list[dict] = []
    for record in records:
        rows.append({key: record[key] for key in KEYS})
        if len(rows) >= ROWS_PER_GROUP:
            writer.write_table(to_table(rows, schema, hint))
            rows = []
    if rows:
        writer.write_table(to_table(rows, schema, hint))


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def merge_journal(journal: str, path: str) -> None:
    """Rewrite `path` as its old rows plus the journal's records, atomically, then drop the journal.
    On failure the journal stays (the next run resumes from it) and `path` is untouched."""
    schema = arrow_schema()
    tmp = path + ".tmp"
    hint = f"the records are kept in {journal!r}; scan to JSONL instead (--format jsonl)"
    try:
        _write_merged(journal, path, tmp, schema, hint)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    os.unlink(journal)


def _parquet_batches(path: str, columns=None):
    import pyarrow.parquet as pq

    if os.path.exists(path):
        yield from pq.ParquetFile(path).iter_batches(columns=columns, batch_size=ROWS_PER_GROUP)


def _write_merged(journal: str, path: str, tmp: str, schema, hint: str) -> None:
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq

    # The old rows, then the journal (its records are the later ones); pass 1 reads only the ids.
    old_ids = (i for batch in _parquet_batches(path, ["id"]) for i in batch.column("id").to_pylist())
    kept = FinalFilter(itertools.chain(old_ids, (record["id"] for record in iter_records(journal))))
    with pq.ParquetWriter(tmp, schema) as writer:
        for batch in _parquet_batches(path):  # old rows stay Arrow batches; superseded ones are filtered out
            table = pa.Table.from_batches([batch]).cast(schema)
            mask = [kept.keep(i) for i in batch.column("id").to_pylist()]
            writer.write_table(table if all(mask) else table.filter(pa.array(mask)))
        write_records(writer, (r for r in iter_records(journal) if kept.keep(r["id"])), schema, hint)
