"""Inputs to items: one input (path or URL) dispatched to its source, list files, brace patterns.

An input is a directory (walked), a local archive (its members), another local file (one item), or a
URL (scanner.sources.remote). A list file (`--from-list FILE`, `-` for stdin) holds one input per line:
only the line ending (`\\n` or `\\r\\n`) is stripped, so names may start or end with spaces; blank
(empty or whitespace-only) lines and lines starting with `#` are skipped (write `./#name` for a file
whose name starts with `#`). Entries are dispatched like inputs, except that a missing path becomes a
`not_found` error item instead of stopping the scan.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator

from scanner.errors import ScannerError
from scanner.sources.archives import ARCHIVE_HEAD_BYTES, archive_kind, iter_archive
from scanner.sources.directory import iter_directory
from scanner.sources.item import MAX_ITEM_BYTES, Item
from scanner.sources.remote import file_url_path, is_url, iter_url
from scanner.sources.retry import NOT_FOUND, RetryPolicy, classify, describe
from scanner.sources.sniff import has_image_extension

STDIN = "-"
_BLOCK_CHARS = 1 << 16  # ~1,500 lines of a list at a time

# ----------------------------------------------------------------------------------- one input


def iter_input(entry: str, max_bytes: int = MAX_ITEM_BYTES, retry: RetryPolicy | None = None) -> Iterator[Item]:
    """The items of one input or list entry (see module docstring); a missing path -> a `not_found` item."""
    found = dispatch(entry, max_bytes, retry)
    if isinstance(found, Item):
        yield found
    else:
        yield from found


def dispatch(entry: str, max_bytes: int = MAX_ITEM_BYTES, retry: RetryPolicy | None = None) -> Item | Iterator[Item]:
    """Like iter_input, but a single item (a plain or missing file: the common case of a long list) is
    returned as such rather than through a generator, which halves the cost of listing a million files."""
    if "://" in entry and is_url(entry):
        try:
            local = file_url_path(entry)
        except ScannerError as exc:  # file://otherhost/...
            return Item(entry, url=entry, error=("not_found", str(exc)))
        if local is None:
            return iter_url(entry, max_bytes, retry)
        entry = local
    return _dispatch_local(entry, max_bytes)


def _dispatch_local(path: str, max_bytes: int) -> Item | Iterator[Item]:
    if not os.access(path, os.F_OK):
        # Answered without raising: on a long list of stale paths, building a FileNotFoundError for each
        # costs more than this extra system call costs on a list of existing files.
        return Item(path, path=path, error=("not_found", "no such file or directory"))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:  # removed in between
        return Item(path, path=path, error=("not_found", "no such file or directory"))
    except OSError as exc:  # permission on a parent, symlink loop, name too long
        kind = "not_found" if classify(exc) == NOT_FOUND else "io"
        return Item(path, path=path, error=(kind, f"cannot read file: {describe(exc)}"))
    if stat.S_ISDIR(mode):
        return iter_directory(path)
    kind = local_archive_kind(path) if stat.S_ISREG(mode) else None  # never open a FIFO to sniff it
    if kind is not None:
        return iter_archive(path, path, kind, max_bytes)
    return Item(path, path=path)  # read_item says what is wrong with a device or FIFO


def local_archive_kind(path: str) -> str | None:
    """archive_kind of a local regular file: by name, then by magic unless the name is an image's
    (so listing a million `.jpg` files does not open each of them twice)."""
    kind = archive_kind(path)
    if kind is not None or has_image_extension(path):
        return kind
    try:
        with open(path, "rb") as fh:
            head = fh.read(ARCHIVE_HEAD_BYTES)
    except OSError:
        return None  # reading it as a file reports the problem
    return archive_kind(path, head)


# ------------------------------------------------------------------------------------- list files


def _entry(line: str) -> str | None:
    """The entry on one line (with or without its `\n`), None for blank and comment lines."""
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    if not line.strip() or line.startswith("#"):
        return None
    return line


def _lines(file_or_dash: str) -> Iterator[str]:
    """The lines of a list file or stdin, read lazily and decoded like file names (undecodable bytes
    kept as surrogates, so every path on disk can be listed); only a newline ends a line."""
    if file_or_dash == STDIN:
        stream = sys.stdin
        if stream is None:
            raise ScannerError("--from-list - reads paths from stdin, but there is no stdin")
        binary = getattr(stream, "buffer", None)
        yield from (map(os.fsdecode, binary) if binary is not None else stream)
        return
    try:
        fh = open(file_or_dash, encoding=sys.getfilesystemencoding(), errors=sys.getfilesystemencodeerrors(),
                  newline="\n")
    except OSError as exc:
        raise ScannerError(f"cannot read the list file {file_or_dash!r}: {exc.strerror or exc}; "
                           f"pass a text file with one path or URL per line") from None
    with fh:
        yield from _split_lines(fh)


def _split_lines(fh) -> Iterator[str]:
    """The lines of a text file without their newline, one block at a time (a file, unlike stdin, never
    makes us wait for a block): one string per line instead of two."""
    rest = ""
    while True:
        block = fh.read(_BLOCK_CHARS)
        if not block:
            break
        lines = (rest + block).split("\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def iter_list_entries(file_or_dash: str) -> Iterator[str]:
    """The entries of a list file (`-` = stdin), lazily; a UTF-8 byte-order mark is ignored."""
    lines = _lines(file_or_dash)
    first = next(lines, None)
    if first is None:
        return
    for line in itertools.chain((first.removeprefix("\ufeff"),), lines):
        entry = _entry(line)
        if entry is not None:
            yield entry


def iter_list(file_or_dash: str, max_bytes: int = MAX_ITEM_BYTES, retry: RetryPolicy | None = None) -> Iterator[Item]:
    """The items of every entry of a list file (`-` = stdin), lazily and in order."""
    for entry in iter_list_entries(file_or_dash):
        found = dispatch(entry, max_bytes, retry)
        if isinstance(found, Item):
            yield found
        else:
            yield from found


def count_list_entries(file_or_dash: str) -> int | None:
    """How many entries a list file holds (one pass over it, nothing kept); None for stdin, which can
    be read only once. Entries that are directories or archives give more items than one."""
    if file_or_dash == STDIN:
        return None
    return sum(1 for _ in iter_list_entries(file_or_dash))


# --------------------------------------------------------------------------------- brace patterns

_GROUP = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _range(first: str, last: str) -> Iterator[str]:
    """`{0000..0099}` style: inclusive, either direction, zero padding kept when a bound has it."""
    a, b = int(first), int(last)
    padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (first, last))
    width = max(len(first), len(last)) if padded else 0
    step = 1 if b >= a else -1
    return (f"{i:0{width}d}" for i in range(a, b + step, step))


def _alternatives(body: str) -> Iterable[str] | None:
    """What one `{...}` group stands for, None when it is not a pattern (`{}`, `{x}` stay literal)."""
    match = _RANGE.match(body)
    if match:
        return _range(*match.groups())
    if "," in body:
        return body.split(",")
    return None


def has_braces(pattern: str) -> bool:
    """Whether `pattern` holds at least one `{a..b}` range or `{x,y}` list."""
    return any(_alternatives(m.group(1)) is not None for m in _GROUP.finditer(pattern))


def expand_braces(pattern: str) -> Iterator[str]:
    """Webdataset-style expansion, lazily, the leftmost group varying slowest:
    `shard-{0000..0002}.tar` -> shard-0000.tar, shard-0001.tar, shard-0002.tar; `{a,b}` lists too."""
    for match in _GROUP.finditer(pattern):
        alternatives = _alternatives(match.group(1))
        if alternatives is None:
            continue
        head, tail = pattern[:match.start()], pattern[match.end():]
        for alternative in alternatives:
            for expanded in expand_braces(tail):
                yield head + alternative + expanded
        return
    yield pattern


def expand_input(entry: str) -> Iterator[str]:
    """The inputs `entry` stands for: its brace expansion, unless a local file has that very name."""
    if not is_url(entry) and os.path.lexists(entry):
        return iter((entry,))
    return expand_braces(entry)
