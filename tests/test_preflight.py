"""Missing optional packages stop `scanner run` before the scan (exit 2, the install command, no
output written), or, when only a file's content tells (stdin lists, HEIC inside a folder), at the
first file that needs one, without a record for it."""

from __future__ import annotations

import re
import sys

import pytest
from click.testing import CliRunner

from scanner import cli
from scanner.config import ModelConfig
from scanner.decoding import decode as decode_module
from scanner.errors import MissingPackageError
from scanner.model.detector import Detector
from scanner.model.weights import save_detector
from scanner.scan.preflight import check_optional_packages
from scanner.scan.results import iter_records
from tests.flaky_http import FlakyServer
from tests.test_decode import encode, gradient

JPEG = encode(gradient(40, 40), "JPEG")
# The first bytes of an HEVC HEIF file: an ftyp box of brand heic; Pillow cannot read it without pillow-heif.
HEIC = (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_detector(Detector(ModelConfig(backbone="tiny"), seed=0), path, name="tiny-pre", threshold=0.5)
    return path


def run(args, **kwargs):
    return CliRunner().invoke(cli.main, ["run", "--backend", "torch", "--quiet", *map(str, args)], **kwargs)


def block(monkeypatch, *modules: str) -> None:
    """Make `import module` fail, as when the package is not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("blocked, entry, options, message", [
    (["fsspec"], "s3://bucket/a.jpg", [], r"fsspec.*pip install 'glff-scanner\[remote\]'"),
    (["aiohttp"], "http://127.0.0.1:9/a.jpg", [], r"pip install 'glff-scanner\[remote\]'"),
    ([], "photos/IMG_0001.HEIC", [], r"pillow-heif.*pip install 'glff-scanner\[heif\]'"),
    (["pyarrow", "pyarrow.parquet"], "a.jpg", ["--format", "parquet"], r"pip install 'glff-scanner\[parquet\]'"),
    (["ray", "ray.data"], "a.jpg", ["--ray"], r"pip install 'glff-scanner\[dist\]'"),
])
def test_missing_package_stops_the_run_before_anything_is_written(monkeypatch, tmp_path, weights, blocked, entry,
                                                                  options, message):
    if entry.endswith(".HEIC") and decode_module.HEIF_PLUGIN:
        pytest.skip("pillow-heif is installed here")
    block(monkeypatch, *blocked)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'a.jpg'}\n{entry}\n")
    (tmp_path / "a.jpg").write_bytes(JPEG)
    out = tmp_path / ("out" if "--ray" in options else "out.jsonl")
    result = run(["--from-list", listing, "--out", out, "--model", weights, *options])
    assert result.exit_code == 2, result.output
    assert "optional packages this scan needs are not installed" in result.output
    assert re.search(message, result.output), result.output
    assert not out.exists()  # no record, not even an empty output


def test_every_missing_package_is_named_at_once(monkeypatch):
    block(monkeypatch, "fsspec", "pyarrow", "pyarrow.parquet")
    with pytest.raises(MissingPackageError) as info:
        check_optional_packages(["gs://b/x.jpg"], fmt="parquet")
    assert "glff-scanner[remote]" in str(info.value) and "glff-scanner[parquet]" in str(info.value)


def test_preflight_passes_and_counts_the_list(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\n# comment\nmemory://x/b.jpg\nhttp://127.0.0.1:9/c.jpg\n\n")
    assert check_optional_packages([], str(listing)) == 3
    assert check_optional_packages(["a.jpg"]) is None


def test_url_backend_missing_when_read_from_stdin_stops_at_that_url(monkeypatch, tmp_path, weights):
    # A list on stdin cannot be read twice: the first URL finds the missing package, and the scan stops
    # with exit 2 and no record for it (a rerun after installing scans it; files already written stay).
    (tmp_path / "a.jpg").write_bytes(JPEG)
    with FlakyServer({"/b.jpg": JPEG}) as server:
        block(monkeypatch, "aiohttp")
        out = tmp_path / "out.jsonl"
        result = run(["--from-list", "-", "--out", out, "--model", weights, "--workers", "0"],
                     input=f"{tmp_path / 'a.jpg'}\n{server.url('/b.jpg')}\n")
    assert result.exit_code == 2, result.output
    assert "pip install 'glff-scanner[remote]'" in result.output
    assert server.url("/b.jpg") not in [r["id"] for r in iter_records(out)]


def test_heic_found_inside_a_folder_stops_the_scan_without_a_record(monkeypatch, tmp_path, weights):
    monkeypatch.setattr(decode_module, "HEIF_PLUGIN", False)
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(JPEG)
    (root / "b").write_bytes(HEIC)  # no HEIF name: only its content tells
    out = tmp_path / "out.jsonl"
    result = run([root, "--out", out, "--model", weights, "--workers", "0"])
    assert result.exit_code == 2, result.output
    assert "pip install 'glff-scanner[heif]'" in result.output
    assert str(root / "b") not in [r["id"] for r in iter_records(out)]
    assert decode_module.is_hevc_heif(HEIC) and not decode_module.is_hevc_heif(JPEG)
