"""Archive sources: the members of tar and zip files, streamed one at a time, never extracted to disk.

Member ids are `f"{archive_id}::{member name}"` with the name verbatim (even `../x` or `/etc/x`: nothing
is ever written to disk, so such names are harmless); a name seen twice in one archive gets `#2`, `#3`...
so ids stay unique and, the order of members being fixed, stable across runs (resume relies on it).

What becomes what:
- a regular member -> Item(id, data=bytes), read whole (at most max_bytes; it is the only one held);
- a directory member -> nothing;
- links, devices, FIFOs, encrypted zip members -> an `archive` error item (never followed or read);
- a member over max_bytes -> a `too_large` error item, without reading it into memory;
- a zip member that inflates more than MAX_COMPRESSION_RATIO times -> an `archive` error item;
- a tar that ends in damage -> the members before it, then one `archive` error item with id
  `f"{archive_id}::"`; an archive that cannot be opened -> that one error item alone.
- a read that fails (the disk, or the network through a ReopeningReader once its retries are spent)
  is not damage: the error item gets the read's kind, `io` (transient: the next run reads the
  archive again and scans the members not yet done) or `not_found`, instead of `archive`.
Iteration never raises for a damaged or hostile archive.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from typing import BinaryIO, Union

from scanner.errors import ItemError
from scanner.sources.item import MAX_ITEM_BYTES, Item
from scanner.sources.retry import NOT_FOUND, classify, describe

Source = Union[str, "os.PathLike[str]", BinaryIO]

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
ZIP_EXTENSIONS = (".zip",)
ARCHIVE_HEAD_BYTES = 512  # enough for the `ustar` magic at offset 257

# Zip-bomb guard. Images barely compress: JPEG, PNG, WebP and AVIF are compressed already (ratio ~1),
# natural-image BMP/TIFF/PPM deflate 2-10x. Only flat synthetic pictures go far: a blank BMP deflates up
# to ~1000x (deflate's ceiling is ~1032x), so such a blank image over MIN_RATIO_CHECK_BYTES gets an
# `archive` error record (reported, not silently dropped) - the price of refusing members that would
# inflate a few kilobytes into up to max_bytes of memory.
MAX_COMPRESSION_RATIO = 200
MIN_RATIO_CHECK_BYTES = 1 << 20  # smaller members inflate to little whatever their ratio: always read

# Pax and GNU long-name headers are read into memory whole by tarfile; real ones are a few hundred
# bytes, a hostile one could claim gigabytes.
MAX_TAR_HEADER_BYTES = 1 << 20
_EXTENDED_HEADER_TYPES = frozenset(
    (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
)

# Python's zipfile raises many types on hostile input (BadZipFile, zlib.error, EOFError,
# NotImplementedError for unknown methods, RuntimeError for encryption, ValueError, OverflowError,
# UnicodeDecodeError, lzma.LZMAError, struct.error...); tarfile similarly. A damaged archive must become
# an error record and never stop a scan of millions of files, so archive parsing catches Exception.
_DAMAGE = Exception


def archive_kind(name: str, head: bytes = b"") -> str | None:
    """"tar", "zip" or None for a file called `name` whose first bytes are `head`.

    By extension first (compressed tars are only known by it: gzip magic alone may wrap anything),
    then by magic: a zip local header `PK\\x03\\x04` or `ustar` at offset 257 (needs 262 bytes of head).
    """
    lower = name.lower()
    if lower.endswith(ZIP_EXTENSIONS):
        return "zip"
    if lower.endswith(TAR_EXTENSIONS):
        return "tar"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def iter_archive(source: Source, archive_id: str, kind: str, max_bytes: int = MAX_ITEM_BYTES) -> Iterator[Item]:
    """iter_tar or iter_zip, by `kind` as returned by archive_kind."""
    if kind == "tar":
        return iter_tar(source, archive_id, max_bytes)
    if kind == "zip":
        return iter_zip(source, archive_id, max_bytes)
    raise ValueError(f"unknown archive kind {kind!r}")


def _error_item(archive_id: str, kind: str, message: str) -> Item:
    return Item(f"{archive_id}::", error=(kind, message))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _failure_kind(exc: BaseException) -> str:
    """The record kind of an exception raised while reading an archive: a failed read (an ItemError
    of a ReopeningReader, an OSError of the disk) keeps its kind; anything else is damage."""
    if isinstance(exc, ItemError):
        return exc.kind
    if isinstance(exc, OSError) and exc.errno is not None:  # gzip's BadGzipFile is an OSError without errno
        return "not_found" if classify(exc) == NOT_FOUND else "io"
    return "archive"


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ItemError):
        return str(exc)
    return describe(exc) if isinstance(exc, OSError) else _describe(exc)


class _UniqueIds:
    """Member ids, made unique within one archive: the second `a.jpg` is `a.jpg#2` (deterministic)."""

    def __init__(self, archive_id: str):
        self._prefix = f"{archive_id}::"
        self._count: dict[str, int] = {"": 1}  # an empty member name must not take the archive's own id

    def __call__(self, name: str) -> str:
        if name not in self._count:
            self._count[name] = 1
            return self._prefix + name
        n = self._count[name]
        while True:
            n += 1
            candidate = f"{name}#{n}"
            if candidate not in self._count:
                break
        self._count[name] = n
        self._count[candidate] = 1
        return self._prefix + candidate


# ---------------------------------------------------------------------------------------------- tar


def _watched_tarinfo() -> type[tarfile.TarInfo]:
    """A TarInfo class (one per archive) that remembers why the last header could not be read.

    TarFile.next() returns None both at a proper end-of-archive marker and when a later header is
    truncated or fails its checksum; this tells the two apart, and refuses oversized extended headers.
    """

    class WatchedTarInfo(tarfile.TarInfo):
        last_header_error: Exception | None = None

        @classmethod
        def frombuf(cls, buf, encoding, errors):
            info = super().frombuf(buf, encoding, errors)
            if info.type in _EXTENDED_HEADER_TYPES and info.size > MAX_TAR_HEADER_BYTES:
                raise tarfile.HeaderError(f"extended header of {info.size} bytes")
            return info

        @classmethod
        def fromtarfile(cls, tf):
            try:
                info = super().fromtarfile(tf)
            except tarfile.HeaderError as exc:
                cls.last_header_error = exc
                raise
            cls.last_header_error = None
            return info

    return WatchedTarInfo


def _end_problem(watched: type) -> str | None:
    """Why a tar ended, when it did not end at its end-of-archive marker (None when it did)."""
    exc = watched.last_header_error
    if exc is None or isinstance(exc, tarfile.EOFHeaderError):
        return None
    if isinstance(exc, tarfile.EmptyHeaderError):
        return "data ends without the end-of-archive marker"
    return _describe(exc)


def _tar_member_type(info: tarfile.TarInfo) -> str | None:
    """What a non-regular member is, for its error message; None for a regular file."""
    if info.isreg():
        return None
    if info.issym():
        return "symbolic link"
    if info.islnk():
        return "hard link"
    if info.ischr():
        return "character device"
    if info.isblk():
        return "block device"
    if info.isfifo():
        return "FIFO"
    return f"type {info.type!r}"


def _tar_member_item(tf: tarfile.TarFile, info: tarfile.TarInfo, item_id: str, max_bytes: int) -> Item:
    """The item for one non-directory tar member (reads its data when it is a regular file)."""
    what = _tar_member_type(info)
    if what is not None:
        return Item(item_id, error=("archive", f"{what} member not followed"))
    if info.size > max_bytes:
        # Not read: stream mode skips its data block by block when the next header is read.
        return Item(item_id, error=("too_large", f"member is {info.size} bytes, more than the limit of {max_bytes}"))
    fh = tf.extractfile(info)
    data = fh.read(info.size) if fh is not None else b""
    if len(data) != info.size:
        raise tarfile.ReadError("unexpected end of data")
    return Item(item_id, data=data)


def _open_source(source: Source) -> tuple[BinaryIO, bool]:
    """(binary file, whether we opened it and must close it)."""
    if isinstance(source, (str, os.PathLike)):
        return open(source, "rb"), True
    return source, False


def iter_tar(source: Source, archive_id: str, max_bytes: int = MAX_ITEM_BYTES) -> Iterator[Item]:
    """The members of a tar (plain, .gz, .bz2 or .xz), streamed in archive order (see module docstring).

    `source` is a path or a binary file object, which need not be seekable (`r|*` stream mode reads it
    front to back once). Only the current member's data is held; damage ends the iteration with one
    `archive` error item after the good members.
    """
    try:
        fileobj, owned = _open_source(source)
    except OSError as exc:
        yield _error_item(archive_id, _failure_kind(exc), f"cannot open archive: {_failure_reason(exc)}")
        return
    try:
        yield from _iter_tar_stream(fileobj, archive_id, max_bytes)
    finally:
        if owned:
            fileobj.close()


def _iter_tar_stream(fileobj: BinaryIO, archive_id: str, max_bytes: int) -> Iterator[Item]:
    watched = _watched_tarinfo()
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=watched)
    except _DAMAGE as exc:
        yield _error_item(archive_id, _failure_kind(exc), f"cannot open archive: {_failure_reason(exc)}")
        return
    unique = _UniqueIds(archive_id)
    done = 0  # members fully read
    kind = "archive"
    with tf:
        while True:
            current = None
            try:
                info = tf.next()
                # TarFile keeps every TarInfo it has read; stream mode never needs them again.
                tf.members.clear()
                if info is None:
                    problem = _end_problem(watched)
                    break
                current = info.name
                item = None if info.isdir() else _tar_member_item(tf, info, unique(info.name), max_bytes)
            except _DAMAGE as exc:
                where = f"member {current!r}: " if current is not None else ""
                problem = where + _failure_reason(exc)
                kind = _failure_kind(exc)
                break
            done += 1
            if item is not None:
                yield item
    if problem is not None:
        what = "truncated or corrupt archive" if kind == "archive" else "archive read failed"
        yield _error_item(archive_id, kind, f"{what} after member {done}: {problem}")


# ---------------------------------------------------------------------------------------------- zip


def _zip_refusal(info: zipfile.ZipInfo, max_bytes: int) -> tuple[str, str] | None:
    """(kind, message) when a zip member must not be read, from its central-directory entry."""
    if info.flag_bits & 0x1:
        return "archive", "encrypted member not read"
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        what = "symbolic link" if stat.S_ISLNK(mode) else "special file"
        return "archive", f"{what} member not followed"
    if info.file_size > max_bytes:
        return "too_large", f"member is {info.file_size} bytes, more than the limit of {max_bytes}"
    if info.file_size > MIN_RATIO_CHECK_BYTES and info.file_size > MAX_COMPRESSION_RATIO * info.compress_size:
        return "archive", (
            f"member inflates {info.compress_size} bytes to {info.file_size} "
            f"(more than {MAX_COMPRESSION_RATIO}x): possible zip bomb, not read"
        )
    return None


def _zip_member_item(zf: zipfile.ZipFile, info: zipfile.ZipInfo, item_id: str, max_bytes: int) -> Item:
    refusal = _zip_refusal(info, max_bytes)
    if refusal is not None:
        return Item(item_id, error=refusal)
    try:
        with zf.open(info) as fh:
            data = fh.read(max_bytes + 1)  # the header sizes are checked above but never trusted
    except _DAMAGE as exc:
        kind = _failure_kind(exc)
        what = "corrupt member" if kind == "archive" else "cannot read member"
        return Item(item_id, error=(kind, f"{what}: {_failure_reason(exc)}"))
    if len(data) > max_bytes:
        return Item(item_id, error=("too_large", f"member is more than the limit of {max_bytes} bytes"))
    return Item(item_id, data=data)


def iter_zip(source: Source, archive_id: str, max_bytes: int = MAX_ITEM_BYTES) -> Iterator[Item]:
    """The members of a zip in central-directory order (see module docstring).

    `source` is a path or a seekable binary file object (zip keeps its directory at the end). Members
    are independent, so a corrupt member gets its own `archive` error item and the others still come.
    """
    try:
        zf = zipfile.ZipFile(source)
    except _DAMAGE as exc:  # OSError from the disk, ItemError from a ReopeningReader, or damage
        yield _error_item(archive_id, _failure_kind(exc), f"cannot open archive: {_failure_reason(exc)}")
        return
    unique = _UniqueIds(archive_id)
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            yield _zip_member_item(zf, info, unique(info.filename), max_bytes)
