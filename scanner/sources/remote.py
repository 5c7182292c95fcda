"""Remote sources through fsspec (an optional extra, imported lazily): buckets, prefixes, HTTP files.

- `s3://bucket/prefix/`, `gs://...`, `memory://...` prefixes are walked depth-first in sorted order, one
  directory listing held at a time, like the directory source (hidden names skipped, archives inside a
  prefix are items like any file: only an archive named as an input is expanded).
- http(s) URLs are single files (HTTP has no listing); an http(s) URL of an archive is streamed.
- Item ids are the URLs: the prefix as given, then `/`-joined names below it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlparse

from scanner.errors import ItemError, ScannerError
from scanner.sources.archives import archive_kind, iter_archive
from scanner.sources.item import MAX_ITEM_BYTES, Item
from scanner.sources.sniff import HEAD_BYTES, looks_like_image

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_HTTP = ("http", "https")
_INSTALL = "pip install 'scanner[remote]'"


def url_scheme(s: str) -> str | None:
    """The lower-case scheme of `s` when it looks like `scheme://...`, else None."""
    match = _SCHEME.match(s)
    return match.group(1).lower() if match else None


def is_url(s: str) -> bool:
    """Whether `s` is a URL (`scheme://...`). `file://` URLs are URLs too: see file_url_path."""
    return url_scheme(s) is not None


def file_url_path(url: str) -> str | None:
    """The local path of a `file://` URL (`file:///a/b` or `file://localhost/a/b`), else None."""
    if url_scheme(url) != "file":
        return None
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ScannerError(f"{url!r} names another host; file:// URLs must be local (file:///path)")
    return unquote(parsed.path)


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        raise ScannerError(f"reading URLs needs fsspec, which is not installed: {_INSTALL}") from None
    return fsspec


def check_url(url: str) -> None:
    """Raise ScannerError when `url`'s scheme is unknown to fsspec or its backend is not installed.

    Cheap (no network): the CLI calls it for every URL input before the scan starts.
    """
    fsspec = _fsspec()
    scheme = url_scheme(url)
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:  # e.g. "Install s3fs to access S3"
        raise ScannerError(f"{url!r} needs a package that is not installed: {exc}") from None
    except ValueError:
        raise ScannerError(f"{url!r}: unknown URL scheme {scheme!r}; pass a local path or an fsspec URL "
                           f"(s3://, gs://, http(s)://, ...)") from None


def _filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for `url`; ScannerError when the backend is missing."""
    fsspec = _fsspec()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise ScannerError(f"{url!r} needs a package that is not installed: {exc}") from None


def _open(url: str) -> Any:
    """A binary file for reading `url` front to back."""
    fs, path = _filesystem(url)
    if url_scheme(url) in _HTTP:
        # One streaming GET: no range requests (many servers refuse them, and we read sequentially).
        return fs.open(path, "rb", block_size=0)
    return fs.open(path, "rb")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------ listing


def iter_url(url: str, max_bytes: int = MAX_ITEM_BYTES) -> Iterator[Item]:
    """The items of one URL: a prefix's files, an archive's members, or the URL itself (see module doc).

    Lazy: nothing is contacted until the first item is asked for. A prefix that cannot be listed yields
    one `io` error item; a single file is not checked here (reading it reports what is wrong).
    """
    kind = archive_kind(urlparse(url).path)
    if url_scheme(url) in _HTTP:
        yield from (_iter_remote_archive(url, kind, max_bytes) if kind else [Item(url, url=url)])
        return
    try:
        fs, path = _filesystem(url)
    except ValueError as exc:  # fsspec: "Protocol not known" (check_url catches it for inputs)
        yield Item(url, url=url, error=("io", f"cannot read URL: {exc}"))
        return
    try:
        is_dir = fs.isdir(path)
    except Exception as exc:  # network, credentials, backend errors: fsspec has no common base class
        yield Item(url, url=url, error=("io", f"cannot list URL: {_describe(exc)}"))
        return
    if is_dir:
        yield from _walk(fs, path, url if url.endswith("/") else url + "/")
    elif kind:
        yield from _iter_remote_archive(url, kind, max_bytes)
    else:
        yield Item(url, url=url)


def _basename(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _listing(fs: Any, path: str) -> list[tuple[str, bool, str]]:
    """(basename, is_dir, fs path) of one remote directory's non-hidden entries, sorted by name."""
    own = path.rstrip("/")
    entries = []
    for info in fs.ls(path, detail=True):
        name = info["name"]
        base = _basename(name)
        if name.rstrip("/") == own or not base or base.startswith("."):
            continue  # the directory itself (bucket "folder" markers), hidden files
        entries.append((base, info.get("type") == "directory", name))
    entries.sort()
    return entries


def _walk(fs: Any, path: str, base_url: str) -> Iterator[Item]:
    """Depth-first, sorted, like iter_directory; `base_url` ends with `/` and ids are built from it."""
    try:
        stack = [(base_url, iter(_listing(fs, path)))]
    except Exception as exc:
        yield Item(base_url, url=base_url, error=("io", f"cannot list directory: {_describe(exc)}"))
        return
    while stack:
        dir_url, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        base, is_dir, name = entry
        child = dir_url + base
        if not is_dir:
            yield Item(child, url=child)
            continue
        try:
            stack.append((child + "/", iter(_listing(fs, name))))
        except Exception as exc:
            yield Item(child, url=child, error=("io", f"cannot list directory: {_describe(exc)}"))


def _open_archive(url: str, kind: str) -> Any:
    if kind == "tar":
        return _open(url)  # read front to back once
    fs, path = _filesystem(url)
    return fs.open(path, "rb")  # zip seeks to its central directory at the end


def _iter_remote_archive(url: str, kind: str, max_bytes: int) -> Iterator[Item]:
    try:
        fh = _open_archive(url, kind)
    except ScannerError:
        raise
    except Exception as exc:
        yield Item(f"{url}::", error=("io", f"cannot open archive: {_describe(exc)}"))
        return
    with fh:
        yield from iter_archive(fh, url, kind, max_bytes)


# ------------------------------------------------------------------------------------------ reading


def _read_up_to(fh: Any, n: int) -> bytes:
    """Up to `n` bytes, fewer only at the end (streaming HTTP files return short reads)."""
    chunks = []
    while n > 0:
        chunk = fh.read(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_url(item: Item, max_bytes: int = MAX_ITEM_BYTES) -> bytes | None:
    """The bytes of a remote item, None when it is not an image (by its first bytes and name, as for
    local files). Raises ItemError: `too_large` over max_bytes, `io` for any failure to fetch it."""
    try:
        with _open(item.url) as fh:
            head = _read_up_to(fh, HEAD_BYTES)
            if not looks_like_image(item.id, head):
                return None
            size = getattr(fh, "size", None)
            if isinstance(size, int) and size > max_bytes:
                raise ItemError("too_large", f"file is {size} bytes, more than the limit of {max_bytes}")
            data = head + _read_up_to(fh, max_bytes + 1 - len(head))
    except (ItemError, ScannerError):
        raise
    except Exception as exc:  # fsspec and its backends (aiohttp, botocore...) share no base class
        raise ItemError("io", f"cannot read URL: {_describe(exc)}") from None
    if len(data) > max_bytes:
        raise ItemError("too_large", f"file is more than the limit of {max_bytes} bytes")
    return data
