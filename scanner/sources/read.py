"""The one function that turns a work item into bytes: local files here, archive members from memory,
URLs through scanner.sources.remote (imported only for a URL: fsspec is an optional extra).

Apart from scanner.sources.item so that the sources which make items (archives, remote) never
import the reader that may call them.
"""

from __future__ import annotations

import os
import stat

from scanner.errors import ItemError
from scanner.sources.item import MAX_ITEM_BYTES, Item
from scanner.sources.retry import RetryPolicy, call_with_retries
from scanner.sources.sniff import HEAD_BYTES, looks_like_image


def read_item(item: Item, max_bytes: int = MAX_ITEM_BYTES, retry: RetryPolicy | None = None) -> bytes | None:
    """The item's bytes, or None when it is not an image (neither its first bytes nor its name say so),
    which the scan skips without a record. Raises ItemError for items that cannot be read: reads that
    may work later are retried first (`retry`, scanner.sources.retry; default RetryPolicy())."""
    retry = retry if retry is not None else RetryPolicy()
    if item.error is not None:
        raise ItemError(*item.error)
    if item.data is not None:
        data = item.data
        if len(data) > max_bytes:
            raise ItemError("too_large", f"member is {len(data)} bytes, more than the limit of {max_bytes}")
        return data if looks_like_image(item.id, data[:HEAD_BYTES]) else None
    if item.path is not None:
        return call_with_retries(lambda: _read_local(item, max_bytes), retry, "cannot read file")
    if item.url is not None:
        from scanner.sources.remote import read_url  # fsspec is an optional extra

        return read_url(item, max_bytes, retry)
    raise ValueError(f"item {item.id!r} has no path, url, data or error")


def _read_local(item: Item, max_bytes: int) -> bytes | None:
    """One attempt; OSError passes to call_with_retries (EIO and ESTALE are retried, ENOENT is not_found)."""
    st = os.stat(item.path)  # follows symlinks; a dangling or looping link raises here
    if not stat.S_ISREG(st.st_mode):
        # Never open FIFOs or devices (a FIFO blocks); a directory reached through a file path too.
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ItemError("not_image", what)
    with open(item.path, "rb") as fh:
        head = fh.read(HEAD_BYTES)
        if not looks_like_image(item.id, head):
            return None
        if st.st_size > max_bytes:
            raise ItemError("too_large", f"file is {st.st_size} bytes, more than the limit of {max_bytes}")
        # Ask for the size stat gave (+1 to notice growth), not for the limit: a read of n bytes allocates n
        # up front, and a 1 GiB buffer per file cost an mmap and munmap each time (about 70 us of system time
        # for a 60 KB JPEG, against 16 us; docs/benchmarks.md, issue 23).
        data = head + fh.read(max(st.st_size + 1 - len(head), 1))
        if st.st_size < len(data) <= max_bytes:  # it grew since stat: read on, up to the limit
            data += fh.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:  # grew while we read it
        raise ItemError("too_large", f"file is more than the limit of {max_bytes} bytes")
    return data
