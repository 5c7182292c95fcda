"""The final view of an output: each id's last record.

Runs append to their output (a JSONL file, a Parquet file and its journal, the parts of a --ray scan),
so an id can have several records: a transient `io` record (scanner.errors) and, from a later run,
the record that supersedes it. The rule, applied by resume, `scanner merge`, `scanner report`, the
Parquet rewrite and the run summary:

    Each id's final record is the last one written for it; an archive's own record (`X::`, which
    says archive X could not be opened or read to its end) is also superseded by any later record
    of one of its members (`X::name`), which shows the archive was read after all.

Two readers apply it:
- ResumeState: one pass, while a run opens its output. It knows which ids are done (final record not
  transient: skipped by this run) and counts the final records; besides the done set (an IdSet) it
  keeps only the ids whose final record is transient, and archive records (both are few).
- FinalFilter: two passes, for readers that write or show the records themselves (merge, report,
  Parquet): the first over the ids finds the records superseded, the second keeps the others, in order.

The scan never writes a record for an id that is done, so within an output written by scanner a
non-transient record is always the last of its id; ResumeState relies on it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from scanner.errors import is_transient
from scanner.idset import IdSet

ARCHIVE_SEP = "::"
_CHUNK = 4096


def archive_prefixes(record_id: str) -> Iterator[str]:
    """The archive ids (`X::`) a member id `X::name` may belong to, excluding the id itself (names may
    hold `::`, so every split is a candidate; only those with a record of their own matter)."""
    pos = record_id.find(ARCHIVE_SEP)
    while pos != -1 and pos + len(ARCHIVE_SEP) < len(record_id):
        yield record_id[:pos + len(ARCHIVE_SEP)]
        pos = record_id.find(ARCHIVE_SEP, pos + len(ARCHIVE_SEP))


def is_archive_id(record_id: str) -> bool:
    return record_id.endswith(ARCHIVE_SEP)


def error_kind(record: dict) -> str | None:
    error = record.get("error")
    return error.get("kind") if isinstance(error, dict) else None


class ResumeState:
    """What a run needs to know about its output, read in one pass (see the module docstring).

    done:       ids to skip (final record not transient); the scan adds the ids it takes.
    transient:  id -> kind of the ids whose final record is transient (tried again by this run).
    counts:     final records by outcome: None for scored, else the error kind.
    """

    def __init__(self):
        self.done = IdSet()
        self.transient: dict[str, str] = {}
        self.counts: Counter = Counter()
        self.records = 0  # records added, superseded or not
        self._archives: dict[str, str | None] = {}  # X:: -> kind of its final record
        self._pending_done: list[str] = []

    def add(self, record_id: str, kind: str | None, *, mark_done: bool = True) -> None:
        """One record, in output order. mark_done=False for records the scan writes (its feed has
        marked their ids already)."""
        self.records += 1
        self._supersede(record_id)
        self.counts[kind] += 1
        if is_archive_id(record_id):
            self._archives[record_id] = kind
        if is_transient(kind):
            self.transient[record_id] = kind
        elif mark_done:
            self._pending_done.append(record_id)
            if len(self._pending_done) >= _CHUNK:
                self.flush()

    def flush(self) -> None:
        """Move the ids read so far into `done` (add() batches them: IdSet works a chunk at a time)."""
        if self._pending_done:
            self.done.add_new(self._pending_done)
            self._pending_done = []

    def _supersede(self, record_id: str) -> None:
        if self.transient:
            kind = self.transient.pop(record_id, _ABSENT)
            if kind is not _ABSENT:
                self.counts[kind] -= 1
                self._archives.pop(record_id, None)
        if self._archives and not is_archive_id(record_id):
            for prefix in archive_prefixes(record_id):
                if prefix in self._archives:
                    self.counts[self._archives.pop(prefix)] -= 1
                    self.transient.pop(prefix, None)

    @property
    def ids(self) -> int:
        """Ids in the final view."""
        return sum(self.counts.values())

    @property
    def scored(self) -> int:
        return self.counts[None]

    def errors_by_kind(self) -> dict[str, int]:
        return {kind: n for kind, n in sorted(self.counts.items(), key=lambda kv: str(kv[0]))
                if kind is not None and n > 0}

    def summary(self) -> dict:
        """The final view's counts, for the run summary."""
        errors = self.errors_by_kind()
        return {"ids": self.ids, "scored": self.scored, "errors": sum(errors.values()), "errors_by_kind": errors,
                "transient": len(self.transient)}


_ABSENT = object()


class FinalFilter:
    """Pass 1 (the constructor) reads the ids of an output in order; pass 2 calls keep(id) for the
    same records in the same order and drops those superseded (see the module docstring)."""

    def __init__(self, ids: Iterable[str]):
        seen = IdSet()
        self._repeats: dict[str, int] = {}  # ids with more than one record -> their number of records
        archives: dict[str, bool] = {}  # X:: -> whether a member record came after its latest record
        chunk: list[str] = []

        def check(chunk: list[str]) -> None:
            for record_id, new in zip(chunk, seen.add_new(chunk)):
                if not new:
                    self._repeats[record_id] = self._repeats.get(record_id, 1) + 1

        for record_id in ids:
            if is_archive_id(record_id):
                archives[record_id] = False
            elif archives:
                for prefix in archive_prefixes(record_id):
                    if prefix in archives:
                        archives[prefix] = True
            chunk.append(record_id)
            if len(chunk) >= _CHUNK:
                check(chunk)
                chunk = []
        check(chunk)
        self._dropped_archives = {archive for archive, superseded in archives.items() if superseded}
        self.superseded = 0  # records dropped by keep() so far

    def keep(self, record_id: str) -> bool:
        """Whether this record (the next one, in pass-1 order) is its id's final record."""
        if record_id in self._dropped_archives:
            self.superseded += 1
            return False
        left = self._repeats.get(record_id)
        if left is None:
            return True
        if left > 1:
            self._repeats[record_id] = left - 1
            self.superseded += 1
            return False
        del self._repeats[record_id]
        return True


def final_records(read: Callable[[], Iterable[dict]], on_filter: Callable[[FinalFilter], None] | None = None
                  ) -> Iterator[dict]:
    """The final records of an output, in order: `read()` is called twice and must give the same
    records both times (pass 1 keeps only ids). `on_filter` receives the filter (for its count of
    superseded records)."""
    kept = FinalFilter(record["id"] for record in read())
    if on_filter is not None:
        on_filter(kept)
    return (record for record in read() if kept.keep(record["id"]))
