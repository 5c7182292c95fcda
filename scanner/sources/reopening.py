"""A read-only file over a remote object that survives transient failures by reopening it.

Archives are streamed (tar) or read at random (zip) by the standard library, which sees one file
object for the whole archive: a connection dropped after member 500 of a shard must not turn into a
"truncated archive". ReopeningReader keeps the offset it has handed out; when a read fails with a
transient error it closes the file, waits (scanner.sources.retry's backoff) and opens it again at that offset
(`open_at(offset)`: a seek, or for an HTTP stream a fresh GET that skips the bytes already read).
When the retries are spent it raises ItemError (`io`, or `not_found` when the object is gone), which
the archive readers turn into that kind of record instead of `archive`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from scanner.sources.retry import RetryPolicy, call_with_retries


class ReopeningReader(io.RawIOBase):
    """Binary reads of the object `open_at(offset)` opens, retried and resumed at the same offset.

    seekable=True (zip): seek and tell are the inner file's (fsspec files seek without a request).
    The first open happens here, with retries: ItemError when it fails.
    """

    def __init__(self, open_at: Callable[[int], Any], retry: RetryPolicy, action: str, *, seekable: bool = False):
        super().__init__()
        self._open_at = open_at
        self._retry = retry
        self._action = action
        self._seekable = seekable
        self._pos = 0
        self._fh: Any = None
        self._fh = call_with_retries(lambda: open_at(0), retry, action)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def tell(self) -> int:
        return self._pos

    def _inner(self) -> Any:
        if self._fh is None:
            self._fh = self._open_at(self._pos)
        return self._fh

    def _drop(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too; it is gone either way
                pass

    def _attempt(self, op: Callable[[Any], Any]) -> Any:
        try:
            return op(self._inner())
        except BaseException:
            self._drop()  # the next attempt reopens at self._pos
            raise

    def read(self, size: int = -1) -> bytes:
        data = call_with_retries(lambda: self._attempt(lambda fh: fh.read(size)), self._retry, self._action)
        self._pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if not self._seekable:
            if (offset, whence) in ((0, io.SEEK_CUR), (self._pos, io.SEEK_SET)):
                return self._pos
            raise io.UnsupportedOperation("seek on a streamed archive")
        self._pos = call_with_retries(lambda: self._attempt(lambda fh: fh.seek(offset, whence)), self._retry,
                                      self._action)
        return self._pos

    def close(self) -> None:
        self._drop()
        super().close()
