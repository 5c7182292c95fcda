"""`--format parquet`: the JSONL records as a Parquet table (pyarrow, the `parquet` extra).

Columns mirror the JSONL keys; `error` is a struct {kind, message}. Written once per run from the
previous Parquet file plus the run's JSONL journal (scanner.store), in bounded-size row groups.
"""

from __future__ import annotations

import os

from scanner.errors import ScannerError
from scanner.idset import IdSet
from scanner.results import KEYS

ROWS_PER_GROUP = 65536


def require_pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ScannerError("--format parquet needs pyarrow: pip install 'scanner[parquet]'") from None
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


def read_parquet_ids(path: str, model_id: str | None, done: IdSet) -> None:
    """Adds the ids of an existing Parquet output to `done`; refuses one written by another model."""
    require_pyarrow()
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(columns=["id", "model"], batch_size=ROWS_PER_GROUP):
        models = set(batch.column("model").to_pylist())
        if model_id is not None and models - {model_id}:
            raise ScannerError(
                f"{path!r} was written with model {sorted(models - {model_id})[0]!r}, this run uses "
                f"{model_id!r}; pass --force to start over or write to another --out"
            )
        done.add_new(batch.column("id").to_pylist())


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


def _write_merged(journal: str, path: str, tmp: str, schema, hint: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scanner.store import iter_records

    with pq.ParquetWriter(tmp, schema) as writer:
        if os.path.exists(path):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_GROUP):
                writer.write_table(pa.Table.from_batches([batch]).cast(schema))
        write_records(writer, iter_records(journal), schema, hint)
