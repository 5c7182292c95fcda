"""Error types and the error kinds of result records.

ScannerError: a user error (bad paths, bad options, a missing optional package), caught at the CLI
boundary and printed as one line with its exit code; bugs keep their traceback.

ItemError: one work item (a file, an archive member, a URL) that cannot be scanned. It never stops a
scan: it becomes that item's error record, with `kind` as the machine-readable `error.kind`.

Kinds (README.md, "What a scan writes"). All are permanent but one: the next run skips their ids.
- `io` is transient: a read that still failed after its retries (a 5xx, a dropped connection, a
  timeout, a permission or disk error). The next run on the same output tries that id again, and its
  record supersedes this one.
- `not_found`: the path or URL names nothing (no such file, a 404 or 410, a dangling link, an unknown
  URL scheme in a list).
- `not_image`, `decode` (corrupt, truncated or unsupported), `too_large`, `archive` (a broken archive or
  member), `inference` (the model failed on this one image).
"""

# error.kind values of result records (documented in README.md, "What a scan writes")
ITEM_ERROR_KINDS = ("decode", "too_large", "not_image", "not_found", "io", "archive", "inference")

# Kinds whose ids are not done: a later run scans them again (scanner.scan.final_view).
TRANSIENT_KINDS = frozenset({"io"})


def is_transient(kind: str | None) -> bool:
    """Whether a record of error kind `kind` (None: no error) leaves its id to be tried again."""
    return kind in TRANSIENT_KINDS


class ScannerError(Exception):
    """A problem the user can fix: the message says what was received, what was expected, what to do."""

    exit_code = 2


class LockedError(ScannerError):
    """Another run holds the output's lock file."""

    exit_code = 4


class MissingPackageError(ScannerError):
    """An optional package the inputs or options need is not installed (found before the scan when
    the inputs say so, scanner.scan.preflight; else at the first item that needs it, which stops the scan
    without a record for that item)."""


class ItemError(Exception):
    """One item cannot be scanned; `kind` is one of ITEM_ERROR_KINDS."""

    def __init__(self, kind: str, message: str):
        if kind not in ITEM_ERROR_KINDS:
            raise ValueError(f"unknown item error kind {kind!r}")
        super().__init__(message)
        self.kind = kind
