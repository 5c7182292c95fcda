"""Sources: enumerate work items lazily and deterministically (docs/design.md, "A scan, step by step").

Every source yields `Item`s; `read_item` (read) turns one into bytes on a decode worker. `iter_sources`
is the entry point of `scanner run`: command-line inputs (directories, files, archives, URLs, brace
patterns) and then an optional list file. Every read goes through retry (which failures are tried
again, with what backoff and timeouts, and what a read that still fails becomes); reopening keeps a
remote archive's stream going across dropped connections.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from scanner.errors import ScannerError
from scanner.sources.archives import archive_kind, iter_tar, iter_zip
from scanner.sources.directory import iter_directory
from scanner.sources.item import MAX_ITEM_BYTES, Item
from scanner.sources.listing import (
    STDIN,
    count_list_entries,
    expand_braces,
    expand_input,
    has_braces,
    iter_input,
    iter_list,
)
from scanner.sources.read import read_item
from scanner.sources.remote import check_url, file_url_path, is_url, iter_url, read_url
from scanner.sources.retry import RetryPolicy
from scanner.sources.sniff import looks_like_image

__all__ = [
    "Item", "MAX_ITEM_BYTES", "archive_kind", "count_list_entries", "expand_braces", "expected_total",
    "is_url", "iter_directory", "iter_input", "iter_list", "iter_sources", "iter_tar", "iter_url",
    "iter_zip", "looks_like_image", "read_item", "read_url",
]

_EXPECTED = "pass image files, directories, tar/zip archives, URLs, or --from-list FILE"


def _validate_input(entry: str) -> None:
    """Raise ScannerError for an input that cannot be scanned at all (before anything is read).

    Brace patterns are generated lists: their missing members become `not_found` items, like list entries.
    """
    if has_braces(entry) and (is_url(entry) or not os.path.lexists(entry)):
        if is_url(entry) and file_url_path(entry) is None:
            check_url(entry)
        return
    if is_url(entry):
        local = file_url_path(entry)
        if local is None:
            check_url(entry)
            return
        entry = local
    if not os.path.exists(entry):
        raise ScannerError(f"{entry!r} does not exist; {_EXPECTED}")


def _validate_list(from_list: str) -> None:
    if from_list != STDIN and not os.path.isfile(from_list):
        what = "does not exist" if not os.path.exists(from_list) else "is not a file"
        raise ScannerError(f"list file {from_list!r} {what}; pass a text file with one path or URL per "
                           f"line, or - for stdin")


def iter_sources(inputs: Sequence[str], from_list: str | None = None, max_bytes: int = MAX_ITEM_BYTES,
                 retry: RetryPolicy | None = None) -> Iterator[Item]:
    """Every item of `inputs` in order, then of the list file `from_list` (`-` = stdin).

    Validation is eager: a missing local input (or list file, or an unusable URL scheme) raises
    ScannerError here, before any item is produced. Everything else is lazy: the returned generator
    lists directories, expands brace patterns and reads archives and the list as it is consumed.
    `retry` applies to the reads done while listing (bucket prefixes, remote archives).
    """
    for entry in inputs:
        _validate_input(entry)
    if from_list is not None:
        _validate_list(from_list)
    return _chain(list(inputs), from_list, max_bytes, retry)


def _chain(inputs: list[str], from_list: str | None, max_bytes: int, retry: RetryPolicy | None) -> Iterator[Item]:
    for entry in inputs:
        for expanded in expand_input(entry):
            yield from iter_input(expanded, max_bytes, retry)
    if from_list is not None:
        yield from iter_list(from_list, max_bytes, retry)


def expected_total(inputs: Sequence[str], from_list: str | None) -> int | None:
    """A cheap total for the progress ETA: the entry count when the only input is a list file (one
    fast pass over it), None otherwise (directories and archives are never listed twice)."""
    if inputs or from_list is None:
        return None
    return count_list_entries(from_list)
