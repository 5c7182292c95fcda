"""The final view of an output (each id's last record; an archive's own record superseded by a later
member record), as resume, merge, report, the Parquet rewrite and the summary apply it."""

from __future__ import annotations

import pytest

from scanner.distributed.parts import PartDir, merge_parts
from scanner.reports.report import read_stats
from scanner.scan.final_view import FinalFilter, ResumeState
from scanner.scan.results import dumps, error_record, iter_records, result_record
from scanner.scan.store import ResultStore

MODEL = "m@1"


def ok(record_id: str, score: float = 0.25) -> dict:
    return result_record(record_id, "0" * 64, score, "real", [[0, 0, 4, 4]] * 6, 8, 8, MODEL)


def err(record_id: str, kind: str) -> dict:
    return error_record(record_id, None, kind, f"{kind} failure", MODEL)


# Three runs' worth of records, in the order they were appended:
#  a: io, io, then scored           -> scored
#  b: scored                        -> scored
#  c: io three times                -> io (one final record)
#  d: not_found                     -> not_found
#  s.tar:: io (could not open), then its members scored by the next run -> the members only
#  t.tar::x scored, then t.tar:: io (the stream failed after x)          -> both
RUNS = [
    [err("a", "io"), ok("b"), err("c", "io"), err("d", "not_found"), err("s.tar::", "io"), ok("t.tar::x"),
     err("t.tar::", "io")],
    [err("a", "io"), err("c", "io")],
    [ok("a", 0.75), err("c", "io"), ok("s.tar::m1"), ok("s.tar::m2")],
]
RECORDS = [r for run in RUNS for r in run]
FINAL = ["b", "d", "t.tar::x", "t.tar::", "a", "c", "s.tar::m1", "s.tar::m2"]


def final_ids(records) -> list[str]:
    kept = FinalFilter(r["id"] for r in records)
    return [r["id"] for r in records if kept.keep(r["id"])]


def test_final_filter_keeps_each_ids_last_record():
    assert final_ids(RECORDS) == FINAL
    kept = FinalFilter(r["id"] for r in RECORDS)
    finals = [r for r in RECORDS if kept.keep(r["id"])]
    assert kept.superseded == len(RECORDS) - len(FINAL) == 5
    assert {r["id"]: r["score"] for r in finals}["a"] == 0.75
    assert final_ids([ok("x"), ok("y")]) == ["x", "y"]  # nothing to drop
    # A directory that could not be listed (`D/`) is superseded by a later record of a file below it,
    # an archive inside a directory by its members; an unrelated id with the same start is not inside.
    records = [err("r/sub/", "io"), err("r/subway.jpg", "io"), err("r/sub/t.tar::", "io"), ok("r/sub/t.tar::m")]
    assert final_ids(records) == ["r/subway.jpg", "r/sub/t.tar::m"]


def test_resume_state_done_transient_and_counts():
    state = ResumeState()
    for record in RECORDS:
        state.add(record["id"], record["error"] and record["error"]["kind"])
    state.flush()
    assert state.transient == {"c": "io", "t.tar::": "io"}  # tried again by the next run
    for done in ("a", "b", "d", "t.tar::x", "s.tar::m1", "s.tar::m2"):
        assert done in state.done
    for not_done in ("c", "t.tar::", "s.tar::"):
        assert not_done not in state.done
    assert state.summary() == {"ids": len(FINAL), "scored": 5, "errors": 3,
                               "errors_by_kind": {"io": 2, "not_found": 1}, "transient": 2}
    assert state.records == len(RECORDS)


def test_store_resume_retries_transient_ids_and_counts_the_final_view(tmp_path):
    out = tmp_path / "r.jsonl"
    with ResultStore(out, model_id=MODEL) as store:
        store.write(RUNS[0])
    with ResultStore(out, model_id=MODEL) as store:
        assert store.retry_ids == {"a", "c", "s.tar::", "t.tar::"}
        assert "a" not in store.done and "b" in store.done and "d" in store.done
        store.write(RUNS[1] + RUNS[2])
        assert store.state.summary()["transient"] == 2 and store.state.summary()["ids"] == len(FINAL)
    with ResultStore(out, model_id=MODEL) as store:
        assert store.retry_ids == {"c", "t.tar::"} and "a" in store.done
    assert [r["id"] for r in iter_records(out)] == [r["id"] for r in RECORDS]  # appended, never rewritten


def test_parquet_rewrite_keeps_one_row_per_id(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
    out = tmp_path / "r.parquet"
    for run in RUNS:  # one run each: the first rewrite holds io rows that later journals supersede
        with ResultStore(out, fmt="parquet", model_id=MODEL) as store:
            store.write([r for r in run if r["id"] not in store.done])
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == FINAL
    assert {r["id"]: r["score"] for r in rows}["a"] == 0.75


def test_report_counts_each_id_once(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(dumps(r) + "\n" for r in RECORDS))
    stats = read_stats(path, top_n=3)
    assert (stats.records, stats.scored, stats.errors, stats.superseded) == (len(FINAL), 5, 3, 5)
    assert stats.errors_by_kind == {"io": 2, "not_found": 1}
    assert [t.id for t in stats.top()] == ["a", "b", "t.tar::x"]


def test_merge_writes_the_final_view_of_the_parts(tmp_path):
    out = tmp_path / "parts"
    for run in RUNS:  # one driver run each: parts sort by run, so later runs' records come later
        with PartDir(str(out), MODEL) as parts:
            parts.commit([dumps(r) for r in run if r["id"] not in parts.done])
    summary = merge_parts(out, tmp_path / "merged.jsonl")
    merged = list(iter_records(tmp_path / "merged.jsonl"))
    assert [r["id"] for r in merged] == FINAL
    assert (summary.records, summary.superseded) == (len(FINAL), 5)
