"""The directory source.

A directory tree, walked depth-first in sorted order. Every regular file is an item; whether it is
an image is decided when it is read (scanner.sources.sniff), not here, so listing stays cheap.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from scanner.errors import ScannerError
from scanner.sources.item import Item


def _entries(path: str) -> list[os.DirEntry]:
    """The non-hidden entries of one directory, sorted by name (only one directory is held at a time)."""
    with os.scandir(path) as it:
        entries = [entry for entry in it if not entry.name.startswith(".")]
    entries.sort(key=lambda entry: entry.name)
    return entries


def _is_real_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _classify(entry: os.DirEntry) -> str:
    """'dir', 'file' (yield it), 'dir_link' (a symlink to a directory: not followed) or 'special'."""
    if _is_real_dir(entry):
        return "dir"
    try:
        if entry.is_symlink():
            # Directory symlinks are not followed (like find and os.walk): no loops, no escapes out of
            # the tree, no file reported twice. File symlinks (and dangling or looping ones) are items;
            # reading them says what is wrong.
            return "dir_link" if entry.is_dir() else "file"
        if entry.is_file(follow_symlinks=False):
            return "file"
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return "file"  # let the read report it
    return "file" if stat.S_ISREG(mode) else "special"


def _special_kind(path: str) -> str:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "special file"
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _dir_id(path: str) -> str:
    return path if path.endswith("/") else path + "/"


def iter_directory(root) -> Iterator[Item]:
    """Every non-hidden file under `root`, depth-first, sorted by name within each directory.

    Lazy: only the listings of the directories on the current path are held. Unreadable directories
    yield an Item with error ("io", ...) whose id is the directory's path and a `/` (so that a later
    record of a file in it supersedes that error, scanner.scan.final_view); FIFOs, sockets and devices yield error ("not_image", ...)
    (they are never opened: a FIFO would block). Symlinks to directories are skipped.
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise ScannerError(f"{root!r} does not exist; pass a directory of images")
    if not os.path.isdir(root):
        raise ScannerError(f"{root!r} is not a directory; pass a directory of images")
    try:
        stack: list[tuple[str, Iterator[os.DirEntry]]] = [(root, iter(_entries(root)))]
    except OSError as exc:
        yield Item(_dir_id(root), path=root, error=("io", f"cannot list directory: {exc.strerror or exc}"))
        return
    while stack:
        _, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        path = os.path.join(stack[-1][0], entry.name)
        kind = _classify(entry)
        if kind == "dir":
            try:
                listing = _entries(path)
            except OSError as exc:
                yield Item(_dir_id(path), path=path, error=("io", f"cannot list directory: {exc.strerror or exc}"))
                continue
            stack.append((path, iter(listing)))
        elif kind == "file":
            yield Item(path, path=path)
        elif kind == "special":
            yield Item(path, path=path, error=("not_image", f"not a regular file ({_special_kind(path)})"))
        # dir_link: not followed
