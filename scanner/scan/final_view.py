"""The final view of an output: each id's last record.

Runs append to their output (a JSONL file, a Parquet file and its journal, the parts of a --ray scan),
so an id can have several records: a transient `io` record (scanner.errors) and, from a later run,
the record that supersedes it. The rule, applied by resume, `scanner merge`, `scanner report`, the
Parquet rewrite and the run summary:

    Each id's final record is the last one written for it; the record of a container that could not
    be read (an archive's own id `X::`, a directory's `D/`) is also superseded by any later record
    of an id inside it (`X::name`, `D/name`), which shows it was read after all.

Two readers apply it:
- ResumeState: one pass, while a run opens its output. It knows which ids are done (final record not
  transient: skipped by this run) and counts the final records; besides the done set (an IdSet) it
  keeps only the ids whose final record is transient, and container records (both are few).
- FinalFilter: two passes, for readers that write or show the records themselves (merge, report,
  Parquet): the first over the ids finds the records superseded, the second keeps the others, in order.

The scan never writes a record for an id that is done, so within an output written by scanner a
non-transient record is always the last of its id; ResumeState relies on it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from scanner.errors import is_transient
from scanner.scan.idset import IdSet

_CHUNK = 4096


def is_container_id(record_id: str) -> bool:
    """An archive's own id (`X::`) or an unreadable directory's (`D/`)."""
    return record_id.endswith(("::", "/"))


def error_kind(record: dict) -> str | None:
    error = record.get("error")
    return error.get("kind") if isinstance(error, dict) else None


class _Containers:
    """Container ids that have a record, each with a value; which of them an id lies inside. They are
    few (archives and directories that could not be read), so while an id lies inside none of them
    the check is one C-level startswith over all of them."""

    def __init__(self):
        self._values: dict = {}
        self._keys: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self._values)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._values

    def set(self, record_id: str, value) -> None:
        if record_id not in self._values:
            self._keys = (*self._keys, record_id)
        self._values[record_id] = value

    def pop(self, record_id: str):
        value = self._values.pop(record_id)
        self._keys = tuple(self._values)
        return value

    def items(self):
        return self._values.items()

    def holding(self, record_id: str) -> list[str]:
        """The containers `record_id` lies inside (not itself)."""
        if not self._keys or not record_id.startswith(self._keys):
            return []
        return [key for key in self._keys if key != record_id and record_id.startswith(key)]


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
        self._containers = _Containers()  # container id -> kind of its final record
        self._pending_done: list[str] = []

    def add(self, record_id: str, kind: str | None, *, mark_done: bool = True) -> None:
        """One record, in output order. mark_done=False for records the scan writes (its feed has
        marked their ids already)."""
        self.records += 1
        self._supersede(record_id)
        self.counts[kind] += 1
        if is_container_id(record_id):
            self._containers.set(record_id, kind)
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
        """Uncount the records the next record of `record_id` supersedes."""
        if self.transient and record_id in self.transient:
            self.counts[self.transient.pop(record_id)] -= 1
            if record_id in self._containers:
                self._containers.pop(record_id)
        for container in self._containers.holding(record_id):
            self.counts[self._containers.pop(container)] -= 1
            self.transient.pop(container, None)

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


class FinalFilter:
    """Pass 1 (the constructor) reads the ids of an output in order; pass 2 calls keep(id) for the
    same records in the same order and drops those superseded (see the module docstring)."""

    def __init__(self, ids: Iterable[str]):
        seen = IdSet()
        self._repeats: dict[str, int] = {}  # ids with more than one record -> their number of records
        containers = _Containers()  # container id -> whether a record inside it came after its latest one
        chunk: list[str] = []

        def check(chunk: list[str]) -> None:
            for record_id, new in zip(chunk, seen.add_new(chunk)):
                if not new:
                    self._repeats[record_id] = self._repeats.get(record_id, 1) + 1

        for record_id in ids:
            for container in containers.holding(record_id):
                containers.set(container, True)
            if is_container_id(record_id):
                containers.set(record_id, False)
            chunk.append(record_id)
            if len(chunk) >= _CHUNK:
                check(chunk)
                chunk = []
        check(chunk)
        self._dropped_containers = {key for key, superseded in containers.items() if superseded}
        self.superseded = 0  # records dropped by keep() so far

    def keep(self, record_id: str) -> bool:
        """Whether this record (the next one, in pass-1 order) is its id's final record."""
        if record_id in self._dropped_containers:
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
