"""The one error type for user errors (bad paths, bad options, bad files given on purpose).

It is caught at the CLI boundary and printed as one line with exit code 2; bugs keep their traceback.
"""


class ScannerError(Exception):
    """A problem the user can fix: the message says what was received, what was expected, what to do."""

    exit_code = 2
