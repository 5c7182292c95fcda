"""Optional packages a scan will need, checked before it starts.

A missing optional package is this installation's problem, not the images': it must not turn into
error records (which a rerun would skip as done). So before the output is opened, the inputs and
options say what the scan will need, and whatever is missing stops it with one ScannerError (exit 2)
listing each package and its install command:

- URL schemes of the inputs and of every entry of a list file (`--from-list FILE`: one pass over it,
  which also counts the entries for the progress ETA): fsspec and the scheme's backend (aiohttp for
  http(s), s3fs for s3://, gcsfs for gs://);
- HEIC/HEIF names among them (`.heic`, `.heif`, `.hif`): pillow-heif;
- `--format parquet`: pyarrow; `--ray`: Ray Data; `--loader dali`: NVIDIA DALI.

What the names cannot tell (a list read from stdin, a HEIC file found inside a directory or a bucket
without such a name) is found at the first item that needs it, and stops the scan the same way
(scanner.errors.MissingPackageError) without writing a record for that item.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

from scanner.errors import MissingPackageError, ScannerError

HEIF_SUFFIXES = (".heic", ".heif", ".hif")


def _installed(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _names(inputs: Sequence[str], from_list: str | None) -> tuple[list[str], int | None]:
    """The inputs, plus the entries of the list file (not stdin: it can be read only once), and the
    number of list entries (None without a list file)."""
    from scanner.sources.listing import STDIN, iter_list_entries

    if from_list is None or from_list == STDIN:
        return list(inputs), None
    names = list(inputs)
    count = 0
    schemes_seen: set[str] = set()
    heif_seen = False
    for entry in iter_list_entries(from_list):
        count += 1
        # Keep one example per scheme and one HEIF name, not the whole list.
        scheme = entry.split("://", 1)[0].lower() if "://" in entry else ""
        if scheme and scheme not in schemes_seen:
            schemes_seen.add(scheme)
            names.append(entry)
        elif not heif_seen and entry.lower().endswith(HEIF_SUFFIXES):
            heif_seen = True
            names.append(entry)
    return names, count


def _url_problem(url: str) -> str | None:
    """Why `url` cannot be read by this installation (a missing package), or None."""
    from scanner.sources.remote import check_url, file_url_path

    try:
        if file_url_path(url) is None:
            check_url(url)
    except MissingPackageError as exc:
        return str(exc)
    except ScannerError:
        return None  # an unknown scheme or host: the input check or the item's record says so
    return None


def check_optional_packages(inputs: Sequence[str], from_list: str | None = None, *, fmt: str = "jsonl",
                            ray: bool = False, loader: str = "cpu") -> int | None:
    """Raise MissingPackageError naming every optional package the scan needs and lacks (see the module
    docstring). Returns the number of entries of the list file (None without one, or for stdin)."""
    from scanner.sources.remote import is_url, url_scheme

    names, count = _names(inputs, from_list)
    problems: list[str] = []
    schemes_checked: set[str] = set()
    heif = False
    for name in names:
        if is_url(name):
            scheme = url_scheme(name)
            if scheme not in schemes_checked:
                schemes_checked.add(scheme)
                problem = _url_problem(name)
                if problem:
                    problems.append(problem)
        heif = heif or posixpath.splitext(name.lower())[1] in HEIF_SUFFIXES
    if heif and not _installed("pillow_heif"):
        from scanner.decoding.decode import HEIF_INSTALL

        problems.append(f"HEIC/HEIF images need pillow-heif: {HEIF_INSTALL}")
    if fmt == "parquet" and not _installed("pyarrow.parquet"):
        problems.append("--format parquet needs pyarrow: pip install 'glff-scanner[parquet]'")
    if ray and not _installed("ray.data"):
        problems.append("the distributed scan (--ray) needs Ray Data: pip install 'glff-scanner[dist]'")
    if loader == "dali":
        from scanner.decoding.loaders import INSTALL_HINT, dali_installed

        if not dali_installed():
            problems.append(f"--loader dali needs NVIDIA DALI: {INSTALL_HINT}")
    if problems:
        unique = list(dict.fromkeys(problems))
        raise MissingPackageError("optional packages this scan needs are not installed (nothing was scanned): "
                                  + "; ".join(unique))
    return count
