"""iter_sources: command-line inputs, list files (file and stdin), brace patterns, bounded memory."""

from __future__ import annotations

import io
import os
import sys
import tarfile
import tracemalloc
import zipfile

import pytest
from PIL import Image

from scanner.errors import ItemError, ScannerError
from scanner.sources import count_list_entries, expand_braces, expected_total, iter_list, iter_sources, read_item


def _jpeg(color=(90, 90, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def _write(path, data: bytes = JPEG) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def _tar(path, names) -> str:
    with tarfile.open(path, "w") as tf:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(JPEG)
            tf.addfile(info, io.BytesIO(JPEG))
    return os.fspath(path)


def _ids(items) -> list[str]:
    return [item.id for item in items]


@pytest.fixture
def tree(tmp_path):
    """A directory, a plain file, a tar and a zip (without extension: found by magic)."""
    _write(tmp_path / "dir" / "b.jpg")
    _write(tmp_path / "dir" / "a" / "z.jpg")
    _write(tmp_path / "one.jpg")
    _tar(tmp_path / "s.tar", ["m1.jpg", "m2.jpg"])
    with zipfile.ZipFile(tmp_path / "packed", "w") as zf:
        zf.writestr("z.jpg", JPEG)
    return tmp_path


def test_every_local_source_type_in_input_order(tree):
    d, f, t, z = (str(tree / n) for n in ("dir", "one.jpg", "s.tar", "packed"))
    items = list(iter_sources([f, d, t, z]))
    assert _ids(items) == [f, f"{d}/a/z.jpg", f"{d}/b.jpg", f"{t}::m1.jpg", f"{t}::m2.jpg", f"{z}::z.jpg"]
    assert all(read_item(item) == JPEG for item in items)
    assert _ids(iter_sources([f, d, t, z])) == _ids(items)  # deterministic


def test_missing_input_raises_before_any_item(tree):
    good, bad = str(tree / "one.jpg"), str(tree / "nope.jpg")
    with pytest.raises(ScannerError, match="nope.jpg"):
        iter_sources([good, bad])  # eager: no next() needed
    with pytest.raises(ScannerError, match="list file"):
        iter_sources([good], from_list=str(tree / "nope.txt"))
    with pytest.raises(ScannerError, match="list file"):
        iter_sources([], from_list=str(tree / "dir"))


def test_file_url_is_a_local_path(tree):
    path = str(tree / "one.jpg")
    assert [(i.id, i.path) for i in iter_sources([f"file://{path}"])] == [(path, path)]
    with pytest.raises(ScannerError, match="nope"):
        iter_sources([f"file://{tree}/nope"])


def test_fifo_input_is_one_item_and_never_opened(tmp_path):
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    items = list(iter_sources([fifo]))  # opening it to sniff would block forever
    assert _ids(items) == [fifo]
    with pytest.raises(ItemError) as exc:
        read_item(items[0])
    assert exc.value.kind == "not_image"


# --------------------------------------------------------------------------------------- list files


LIST_TEXT = "# a comment\n{one}\n\n   \n{spaced}\r\n{lead}\n{missing}\n{dir}\n{tar}\n #not a comment\n{last}"


def _list_fixture(tree) -> tuple[str, list[str]]:
    spaced = _write(tree / "my photo.jpg ")  # trailing space kept
    lead = _write(tree / " lead.jpg")
    last = _write(tree / "last.jpg")
    text = LIST_TEXT.format(one=tree / "one.jpg", spaced=spaced, lead=lead, missing=tree / "gone.jpg",
                            dir=tree / "dir", tar=tree / "s.tar", last=last)
    expected = [str(tree / "one.jpg"), spaced, lead, str(tree / "gone.jpg"), f"{tree}/dir/a/z.jpg",
                f"{tree}/dir/b.jpg", f"{tree}/s.tar::m1.jpg", f"{tree}/s.tar::m2.jpg", " #not a comment", last]
    return text, expected


def _check_list_items(items, tree, expected) -> None:
    assert _ids(items) == expected
    missing = items[3]
    assert missing.path == str(tree / "gone.jpg")
    assert missing.error == ("not_found", "no such file or directory")
    assert items[8].error == ("not_found", "no such file or directory")  # " #not a comment" is a (missing) path
    good = [item for item in items if item.error is None]
    assert len(good) == 8 and all(read_item(item) == JPEG for item in good)


def test_list_file(tree):
    text, expected = _list_fixture(tree)
    listing = tree / "list.txt"
    listing.write_text(text)
    items = list(iter_sources([], from_list=str(listing)))
    _check_list_items(items, tree, expected)
    assert count_list_entries(str(listing)) == 8
    assert expected_total([], str(listing)) == 8
    assert expected_total([str(tree / "one.jpg")], str(listing)) is None


def test_list_after_inputs(tree):
    listing = tree / "list.txt"
    listing.write_text(f"{tree}/one.jpg\n")
    items = list(iter_sources([str(tree / "s.tar")], from_list=str(listing)))
    assert _ids(items) == [f"{tree}/s.tar::m1.jpg", f"{tree}/s.tar::m2.jpg", f"{tree}/one.jpg"]


@pytest.mark.parametrize("binary", [False, True])
def test_list_from_stdin(tree, monkeypatch, binary):
    text, expected = _list_fixture(tree)
    stdin = io.TextIOWrapper(io.BytesIO(text.encode())) if binary else io.StringIO(text)
    monkeypatch.setattr(sys, "stdin", stdin)
    items = iter_sources([], from_list="-")
    assert stdin.tell() == 0  # nothing read before the first item is asked for
    _check_list_items(list(items), tree, expected)
    assert count_list_entries("-") is None and expected_total([], "-") is None


def test_list_with_undecodable_name_and_bom(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 byte: not UTF-8
    path = _write(os.path.join(tmp_path, name))
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + os.fsencode(path) + b"\n")
    items = list(iter_list(str(listing)))
    assert _ids(items) == [path] and read_item(items[0]) == JPEG


# ---------------------------------------------------------------------------------------- braces


def test_expand_braces():
    assert list(expand_braces("shard-{0000..0003}.tar")) == [f"shard-{i:04d}.tar" for i in range(4)]
    assert list(expand_braces("s{8..11}")) == ["s8", "s9", "s10", "s11"]
    assert list(expand_braces("s{3..1}")) == ["s3", "s2", "s1"]
    assert list(expand_braces("{a,b}/{0..1}.tar")) == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert list(expand_braces("x{}{1}{a..b}.jpg")) == ["x{}{1}{a..b}.jpg"]  # not patterns: literal
    assert list(expand_braces("s3://b/p-{00..01}.tar")) == ["s3://b/p-00.tar", "s3://b/p-01.tar"]


def test_brace_expansion_is_lazy():
    pattern = "x-{000000000..999999999}-{0..9}.tar"
    gen = expand_braces(pattern)
    assert [next(gen) for _ in range(3)] == ["x-000000000-0.tar", "x-000000000-1.tar", "x-000000000-2.tar"]


def test_brace_inputs(tmp_path):
    for i in (0, 2):
        _tar(tmp_path / f"shard-{i:04d}.tar", ["a.jpg"])
    literal = _write(tmp_path / "odd{0..1}.jpg")  # a real file with braces in its name is not expanded
    items = list(iter_sources([f"{tmp_path}/shard-{{0000..0002}}.tar", literal]))
    assert _ids(items) == [f"{tmp_path}/shard-0000.tar::a.jpg", f"{tmp_path}/shard-0001.tar",
                           f"{tmp_path}/shard-0002.tar::a.jpg", literal]
    assert items[1].error == ("not_found", "no such file or directory")  # a generated name: not fatal


# ------------------------------------------------------------------------------------ bounded memory


def test_a_million_entries_stream_in_bounded_memory(tmp_path):
    listing = tmp_path / "million.txt"
    with open(listing, "w") as fh:
        fh.writelines(f"/nonexistent-scanner-test/{i:07d}.jpg\n" for i in range(1_000_000))
    assert listing.stat().st_size > 30_000_000
    assert count_list_entries(str(listing)) == 1_000_000

    tracemalloc.start()
    try:
        count, last = 0, None
        for item in iter_sources([], from_list=str(listing)):
            count += 1
            last = item
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 1_000_000
    assert last.id == "/nonexistent-scanner-test/0999999.jpg" and last.error[0] == "not_found"
    assert peak < 10 * 2**20
