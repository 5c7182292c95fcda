"""The unit of work every source yields (scanner.sources.read turns one into bytes)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_ITEM_BYTES = 1 << 30  # an item is read whole; larger ones get a too_large record


@dataclass(frozen=True)
class Item:
    """One file to scan. Exactly one of `path`, `url`, `data` says where its bytes are, unless `error`
    already says why it cannot be read.

    id:    stable across runs: the path as built from the root given, `archive.tar::member`, or the URL.
    path:  a local file, read by a decode worker.
    url:   a remote file (fsspec URL), read by a decode worker.
    data:  bytes already read (archive members, which are streamed and never extracted).
    error: (kind, message) for an item known to be bad before reading (e.g. an unreadable directory).
    """

    id: str
    path: str | None = None
    url: str | None = None
    data: bytes | None = None
    error: tuple[str, str] | None = None
