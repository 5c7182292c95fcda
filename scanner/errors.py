"""Error types.

ScannerError: a user error (bad paths, bad options), caught at the CLI boundary and printed as one
line with its exit code; bugs keep their traceback.

ItemError: one work item (a file, an archive member, a URL) that cannot be scanned. It never stops a
scan: it becomes that item's error record, with `kind` as the machine-readable `error.kind`.
"""

# error.kind values of result records (documented in README.md, "Results")
ITEM_ERROR_KINDS = ("decode", "too_large", "not_image", "io", "archive", "inference")


class ScannerError(Exception):
    """A problem the user can fix: the message says what was received, what was expected, what to do."""

    exit_code = 2


class LockedError(ScannerError):
    """Another run holds the output's lock file."""

    exit_code = 4


class ItemError(Exception):
    """One item cannot be scanned; `kind` is one of ITEM_ERROR_KINDS."""

    def __init__(self, kind: str, message: str):
        if kind not in ITEM_ERROR_KINDS:
            raise ValueError(f"unknown item error kind {kind!r}")
        super().__init__(message)
        self.kind = kind
