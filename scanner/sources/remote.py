"""Remote sources through fsspec (an optional extra, imported lazily): buckets, prefixes, HTTP files.

- `s3://bucket/prefix/`, `gs://...`, `memory://...` prefixes are walked depth-first in sorted order, one
  directory listing held at a time, like the directory source (hidden names skipped, archives inside a
  prefix are items like any file: only an archive named as an input is expanded).
- http(s) URLs are single files (HTTP has no listing); an http(s) URL of an archive is streamed.
- Item ids are the URLs: the prefix as given, then `/`-joined names below it.

Every network call goes through scanner.sources.retry: transient failures are retried with backoff, a missing
file is `not_found`, anything still failing is `io` (tried again by the next run). Clients get the
policy's read timeout (aiohttp's connect and read timeouts for http(s), botocore's for s3), so a
stalled server ends in a timeout, which is retried like any transient failure. Archives are read
through a ReopeningReader, which picks a dropped stream up where it stopped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlparse

from scanner.errors import ItemError, MissingPackageError, ScannerError
from scanner.sources.archives import archive_kind, iter_archive
from scanner.sources.item import MAX_ITEM_BYTES, Item
from scanner.sources.reopening import ReopeningReader
from scanner.sources.retry import RetryPolicy, call_with_retries
from scanner.sources.sniff import HEAD_BYTES, looks_like_image

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_HTTP = ("http", "https")
INSTALL = "pip install 'glff-scanner[remote]'"


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
        raise MissingPackageError(f"reading URLs needs fsspec, which is not installed: {INSTALL}") from None
    return fsspec


# Extra packages of fsspec backends, beyond fsspec itself (the `remote` extra has fsspec and aiohttp).
_BACKEND_INSTALL = {"http": INSTALL, "https": INSTALL, "s3": "pip install s3fs", "s3a": "pip install s3fs",
                    "gs": "pip install gcsfs", "gcs": "pip install gcsfs"}


def _missing_backend(url: str, exc: ImportError) -> MissingPackageError:
    hint = _BACKEND_INSTALL.get(url_scheme(url) or "")
    return MissingPackageError(f"{url!r} needs a package that is not installed ({exc})" + (f": {hint}" if hint else ""))


def check_url(url: str) -> None:
    """Raise ScannerError when `url`'s scheme is unknown to fsspec, MissingPackageError when its
    backend is not installed.

    Cheap (no network): called for every URL input, and by scanner.scan.preflight for the schemes of a list
    file, before the scan starts.
    """
    fsspec = _fsspec()
    scheme = url_scheme(url)
    try:
        fsspec.get_filesystem_class(scheme)
        if scheme in _HTTP:
            import aiohttp  # noqa: F401 - fsspec imports it only when the first file is opened
    except ImportError as exc:  # e.g. "Install s3fs to access S3"
        raise _missing_backend(url, exc) from None
    except ValueError:
        raise ScannerError(f"{url!r}: unknown URL scheme {scheme!r}; pass a local path or an fsspec URL "
                           f"(s3://, gs://, http(s)://, ...)") from None


def _storage_options(url: str, read_timeout: float) -> dict:
    """Client settings that end a stalled read after `read_timeout` seconds without progress (the
    retries are ours: scanner.sources.retry)."""
    scheme = url_scheme(url)
    if scheme in _HTTP:
        import aiohttp

        # No total limit: a large file on a slow link may take long, as long as bytes keep coming.
        timeout = aiohttp.ClientTimeout(total=None, connect=read_timeout, sock_connect=read_timeout,
                                        sock_read=read_timeout)
        return {"client_kwargs": {"timeout": timeout}}
    if scheme in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": read_timeout, "read_timeout": read_timeout}}
    return {}


def _filesystem(url: str, read_timeout: float) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for `url`; MissingPackageError when the backend is missing.
    fsspec caches filesystems by their options (and thread), so this is cheap after the first call."""
    fsspec = _fsspec()
    try:
        return fsspec.core.url_to_fs(url, **_storage_options(url, read_timeout))
    except ImportError as exc:
        raise _missing_backend(url, exc) from None


def _open(url: str, read_timeout: float) -> Any:
    """A binary file for reading `url` front to back."""
    fs, path = _filesystem(url, read_timeout)
    if url_scheme(url) in _HTTP:
        # One streaming GET: no range requests (many servers refuse them, and we read sequentially).
        # Any `size` skips the HEAD request fsspec would send first (a stream does not use it): one
        # request per file, so one chance to fail instead of two.
        return fs.open(path, "rb", block_size=0, size=1)
    return fs.open(path, "rb")


def _policy(retry: RetryPolicy | None) -> RetryPolicy:
    return retry if retry is not None else RetryPolicy()


# ------------------------------------------------------------------------------------------ listing


def iter_url(url: str, max_bytes: int = MAX_ITEM_BYTES, retry: RetryPolicy | None = None) -> Iterator[Item]:
    """The items of one URL: a prefix's files, an archive's members, or the URL itself (see module doc).

    Lazy: nothing is contacted until the first item is asked for. A prefix that cannot be listed yields
    one error item (`io` after the retries); a single file is not checked here (reading it reports
    what is wrong).
    """
    retry = _policy(retry)
    kind = archive_kind(urlparse(url).path)
    if url_scheme(url) in _HTTP:
        yield from (_iter_remote_archive(url, kind, max_bytes, retry) if kind else [Item(url, url=url)])
        return
    try:
        fs, path = _filesystem(url, retry.read_timeout)
    except ValueError as exc:  # fsspec: "Protocol not known" (check_url catches it for inputs)
        yield Item(url, url=url, error=("not_found", f"cannot read URL: {exc}"))
        return
    try:
        is_dir = call_with_retries(lambda: fs.isdir(path), retry, "cannot list URL")
    except ItemError as exc:
        yield Item(url, url=url, error=(exc.kind, str(exc)))
        return
    if is_dir:
        yield from _walk(fs, path, url if url.endswith("/") else url + "/", retry)
    elif kind:
        yield from _iter_remote_archive(url, kind, max_bytes, retry)
    else:
        yield Item(url, url=url)


def _basename(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _listing(fs: Any, path: str, retry: RetryPolicy) -> list[tuple[str, bool, str]]:
    """(basename, is_dir, fs path) of one remote directory's non-hidden entries, sorted by name.
    Raises ItemError when it cannot be listed (after the retries)."""
    own = path.rstrip("/")
    entries = []
    for info in call_with_retries(lambda: fs.ls(path, detail=True), retry, "cannot list directory"):
        name = info["name"]
        base = _basename(name)
        if name.rstrip("/") == own or not base or base.startswith("."):
            continue  # the directory itself (bucket "folder" markers), hidden files
        entries.append((base, info.get("type") == "directory", name))
    entries.sort()
    return entries


def _walk(fs: Any, path: str, base_url: str, retry: RetryPolicy) -> Iterator[Item]:
    """Depth-first, sorted, like iter_directory; `base_url` ends with `/` and ids are built from it."""
    try:
        stack = [(base_url, iter(_listing(fs, path, retry)))]
    except ItemError as exc:
        yield Item(base_url, url=base_url, error=(exc.kind, str(exc)))
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
            stack.append((child + "/", iter(_listing(fs, name, retry))))
        except ItemError as exc:  # id with its `/`: a later record of a file in it supersedes this one
            yield Item(child + "/", url=child + "/", error=(exc.kind, str(exc)))


def _archive_opener(url: str, kind: str, read_timeout: float):
    """open_at(offset) for a ReopeningReader over a remote archive."""
    if kind == "zip":
        def open_zip(offset: int) -> Any:  # zip seeks to its central directory at the end: random access
            fs, path = _filesystem(url, read_timeout)
            fh = fs.open(path, "rb")
            fh.seek(offset)
            return fh
        return open_zip

    def open_tar(offset: int) -> Any:  # read front to back once; a reopened HTTP stream skips what was read
        fh = _open(url, read_timeout)
        try:
            if offset and url_scheme(url) in _HTTP:
                skip_bytes(fh, offset)
            elif offset:
                fh.seek(offset)
        except BaseException:
            fh.close()
            raise
        return fh
    return open_tar


def skip_bytes(fh: Any, n: int, chunk: int = 1 << 20) -> None:
    """Read and drop `n` bytes of a stream that cannot seek; EOFError when it ends first."""
    while n > 0:
        data = fh.read(min(n, chunk))
        if not data:
            raise EOFError(f"stream ended {n} bytes before the offset to resume from")
        n -= len(data)


def _iter_remote_archive(url: str, kind: str, max_bytes: int, retry: RetryPolicy) -> Iterator[Item]:
    try:
        fh = ReopeningReader(_archive_opener(url, kind, retry.read_timeout), retry, "cannot read archive",
                             seekable=kind == "zip")
    except ItemError as exc:
        yield Item(f"{url}::", error=(exc.kind, str(exc).replace("cannot read archive", "cannot open archive", 1)))
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


def _read_once(item: Item, max_bytes: int, read_timeout: float) -> bytes | None:
    with _open(item.url, read_timeout) as fh:
        head = _read_up_to(fh, HEAD_BYTES)
        if not looks_like_image(item.id, head):
            return None
        size = getattr(fh, "size", None)
        if isinstance(size, int) and size > max_bytes:
            raise ItemError("too_large", f"file is {size} bytes, more than the limit of {max_bytes}")
        return head + _read_up_to(fh, max_bytes + 1 - len(head))


def read_url(item: Item, max_bytes: int = MAX_ITEM_BYTES, retry: RetryPolicy | None = None) -> bytes | None:
    """The bytes of a remote item, None when it is not an image (by its first bytes and name, as for
    local files). Raises ItemError: `too_large` over max_bytes, `not_found` for a missing file (404),
    `io` when it cannot be fetched, after the retries of `retry` (scanner.sources.retry)."""
    retry = _policy(retry)
    data = call_with_retries(lambda: _read_once(item, max_bytes, retry.read_timeout), retry, "cannot read URL")
    if data is not None and len(data) > max_bytes:
        raise ItemError("too_large", f"file is more than the limit of {max_bytes} bytes")
    return data
