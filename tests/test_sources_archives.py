"""Tar and zip sources: streaming, ids, hostile and damaged archives (all built here, small)."""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import tarfile
import uuid
import zipfile

import pytest
from PIL import Image

from scanner.errors import ItemError
from scanner.sources import iter_sources, read_item
from scanner.sources.archives import MAX_COMPRESSION_RATIO, archive_kind, iter_tar, iter_zip


def _image(fmt: str = "JPEG", color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, fmt)
    return buf.getvalue()


JPEG = _image()
PNG = _image("PNG", (10, 200, 10))


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"", type_=tarfile.REGTYPE, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    info.size = len(data) if type_ == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)


def _tar(path, members, mode: str = "w") -> str:
    """Write a tar of (name, data) pairs at `path`; returns the path as a str."""
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            _add(tf, name, data)
    return str(path)


def _zip(path, members, compression=zipfile.ZIP_DEFLATED) -> str:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return str(path)


def _ids(items) -> list[str]:
    return [item.id for item in items]


def _tree(root) -> set[str]:
    return {os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files}


# ------------------------------------------------------------------------------------ archive_kind


@pytest.mark.parametrize("name, kind", [
    ("a.tar", "tar"), ("A.TAR.GZ", "tar"), ("a.tgz", "tar"), ("a.tar.bz2", "tar"), ("a.tbz2", "tar"),
    ("a.tar.xz", "tar"), ("a.txz", "tar"), ("a.zip", "zip"), ("a.jpg", None), ("a.gz", None), ("tar", None),
])
def test_archive_kind_by_extension(name, kind):
    assert archive_kind(name) == kind


def test_archive_kind_by_magic(tmp_path):
    tar_head = open(_tar(tmp_path / "x", [("a.jpg", JPEG)]), "rb").read(512)
    zip_head = open(_zip(tmp_path / "y", [("a.jpg", JPEG)]), "rb").read(512)
    assert archive_kind("noext", tar_head) == "tar"
    assert archive_kind("noext", zip_head) == "zip"
    assert archive_kind("noext", gzip.compress(b"x" * 600)) is None  # gzip alone may wrap anything
    assert archive_kind("noext", JPEG[:512]) is None


# --------------------------------------------------------------------------------------------- tar


def test_tar_members_in_order_with_ids_and_bytes(tmp_path):
    path = _tar(tmp_path / "a.tar", [("x/b.jpg", JPEG), ("a.png", PNG)])
    with tarfile.open(path, "a") as tf:
        _add(tf, "x", type_=tarfile.DIRTYPE)  # directory members give nothing
    items = list(iter_sources([path]))
    assert _ids(items) == [f"{path}::x/b.jpg", f"{path}::a.png"]
    assert [read_item(item) for item in items] == [JPEG, PNG]
    assert all(item.path is None and item.url is None for item in items)


@pytest.mark.parametrize("suffix, mode", [
    (".tar.gz", "w:gz"), (".tgz", "w:gz"), (".tar.bz2", "w:bz2"), (".tar.xz", "w:xz"), (".tar", "w"),
])
def test_compressed_tars(tmp_path, suffix, mode):
    path = _tar(tmp_path / f"s{suffix}", [("a.jpg", JPEG), ("b.png", PNG)], mode)
    items = list(iter_sources([path]))
    assert _ids(items) == [f"{path}::a.jpg", f"{path}::b.png"]
    assert [item.data for item in items] == [JPEG, PNG]


def test_tar_from_a_non_seekable_stream(tmp_path):
    raw = open(_tar(tmp_path / "a.tar.gz", [("a.jpg", JPEG), ("b.png", PNG)], "w:gz"), "rb").read()

    class Pipe:  # only read(): like a socket or an HTTP body
        def __init__(self, data: bytes):
            self._buf = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self._buf.read(min(n, 700) if n >= 0 else 700)  # short reads too

    items = list(iter_tar(Pipe(raw), "pipe", 1 << 20))
    assert _ids(items) == ["pipe::a.jpg", "pipe::b.png"]
    assert [item.data for item in items] == [JPEG, PNG]


def test_webdataset_shard_sidecars_are_yielded_and_skipped_by_read_item(tmp_path):
    path = _tar(tmp_path / "shard-0000.tar", [
        ("000.jpg", JPEG), ("000.json", b'{"caption": "a cat"}'), ("000.cls", b"3"), ("000.txt", b"a cat"),
        ("001.png", PNG), ("001.json", b"{}"),
    ])
    items = list(iter_sources([path]))
    assert [item.id.split("::")[1] for item in items] == ["000.jpg", "000.json", "000.cls", "000.txt", "001.png",
                                                         "001.json"]
    assert [read_item(item) for item in items] == [JPEG, None, None, None, PNG, None]


def test_path_traversal_names_are_ids_and_nothing_is_written(tmp_path, monkeypatch):
    tag = uuid.uuid4().hex
    names = [f"../../evil-{tag}.jpg", f"/etc/evil-{tag}.jpg", f"a/../../evil2-{tag}.jpg"]
    path = _tar(tmp_path / "evil.tar", [(name, JPEG) for name in names])
    zpath = _zip(tmp_path / "evil.zip", [(name, JPEG) for name in names])
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    items = list(iter_sources([path, zpath]))
    assert _tree(tmp_path) == before
    assert not os.path.exists(f"/etc/evil-{tag}.jpg")
    assert _ids(items) == [f"{path}::{name}" for name in names] + [f"{zpath}::{name}" for name in names]
    assert all(item.data == JPEG for item in items)


def test_links_and_special_members_are_not_followed(tmp_path):
    path = str(tmp_path / "links.tar")
    with tarfile.open(path, "w") as tf:
        _add(tf, "real.jpg", JPEG)
        _add(tf, "sym.jpg", type_=tarfile.SYMTYPE, linkname="/etc/passwd")
        _add(tf, "hard.jpg", type_=tarfile.LNKTYPE, linkname="real.jpg")
        _add(tf, "chr", type_=tarfile.CHRTYPE)
        _add(tf, "blk", type_=tarfile.BLKTYPE)
        _add(tf, "fifo", type_=tarfile.FIFOTYPE)
        _add(tf, "after.png", PNG)
    items = list(iter_tar(path, "L", 1 << 20))
    assert _ids(items) == ["L::real.jpg", "L::sym.jpg", "L::hard.jpg", "L::chr", "L::blk", "L::fifo", "L::after.png"]
    assert items[0].data == JPEG and items[-1].data == PNG
    kinds = [item.error for item in items[1:-1]]
    assert [k for k, _ in kinds] == ["archive"] * 5
    assert [m for _, m in kinds] == [f"{what} member not followed" for what in
                                    ("symbolic link", "hard link", "character device", "block device", "FIFO")]
    with pytest.raises(ItemError) as exc:
        read_item(items[1])
    assert exc.value.kind == "archive"


def test_tar_member_over_the_limit_is_not_read_and_the_next_still_comes(tmp_path):
    big = os.urandom(10_000)
    path = _tar(tmp_path / "big.tar.gz", [("big.jpg", big), ("small.jpg", JPEG)], "w:gz")
    items = list(iter_tar(path, "B", max_bytes=5_000))
    assert items[0].id == "B::big.jpg" and items[0].data is None
    assert items[0].error == ("too_large", "member is 10000 bytes, more than the limit of 5000")
    assert items[1].data == JPEG


def test_duplicate_member_names_get_deterministic_suffixes(tmp_path):
    path = _tar(tmp_path / "dup.tar", [("a.jpg", b"1"), ("a.jpg", b"2"), ("a.jpg#2", b"3"), ("a.jpg", b"4"), ("", b"5")])
    items = list(iter_tar(path, "D", 1 << 20))
    assert _ids(items) == ["D::a.jpg", "D::a.jpg#2", "D::a.jpg#2#2", "D::a.jpg#3", "D::#2"]
    assert [item.data for item in items] == [b"1", b"2", b"3", b"4", b"5"]
    assert _ids(iter_tar(path, "D", 1 << 20)) == _ids(items)  # stable across runs


def _cut_inside_member(raw: bytes, members: list[tuple[str, bytes]], index: int) -> bytes:
    """Cut an uncompressed tar in the middle of member `index`'s data (512-byte headers, padded data)."""
    offset = 0
    for name, data in members[:index]:
        offset += 512 + -(-len(data) // 512) * 512
    return raw[:offset + 512 + len(members[index][1]) // 2]


def test_truncated_tar_yields_the_good_members_then_one_error(tmp_path):
    members = [("a.jpg", JPEG), ("b.png", PNG), ("c.jpg", os.urandom(3000))]
    raw = open(_tar(tmp_path / "full.tar", members), "rb").read()
    path = tmp_path / "cut.tar"
    path.write_bytes(_cut_inside_member(raw, members, 2))
    items = list(iter_sources([str(path)]))
    assert _ids(items) == [f"{path}::a.jpg", f"{path}::b.png", f"{path}::"]
    assert [item.data for item in items[:2]] == [JPEG, PNG]
    kind, message = items[-1].error
    assert kind == "archive"
    assert message.startswith("truncated or corrupt archive after member 2: member 'c.jpg': ")


def test_truncated_tar_gz_yields_the_good_members_then_one_error(tmp_path):
    members = [("a.jpg", JPEG), ("noise1.jpg", os.urandom(20_000)), ("noise2.jpg", os.urandom(20_000))]
    raw = open(_tar(tmp_path / "full.tar.gz", members, "w:gz"), "rb").read()
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(raw[:len(raw) * 6 // 10])  # inside noise2 (noise does not compress)
    items = list(iter_tar(str(path), "G", 1 << 20))
    assert _ids(items) == ["G::a.jpg", "G::noise1.jpg", "G::"]
    assert items[0].data == JPEG and items[1].data == members[1][1]
    assert items[-1].error[0] == "archive"
    assert "after member 2" in items[-1].error[1]


def test_tar_cut_at_a_member_boundary_reports_the_missing_end_marker(tmp_path):
    raw = open(_tar(tmp_path / "full.tar", [("a.jpg", JPEG)]), "rb").read()
    path = tmp_path / "cut.tar"
    path.write_bytes(raw[:512 + -(-len(JPEG) // 512) * 512])
    items = list(iter_tar(str(path), "E", 1 << 20))
    assert _ids(items) == ["E::a.jpg", "E::"]
    assert items[1].error == ("archive", "truncated or corrupt archive after member 1: data ends without the "
                                         "end-of-archive marker")


def test_corrupt_header_in_the_middle(tmp_path):
    members = [("a.jpg", JPEG), ("b.png", PNG)]
    raw = bytearray(open(_tar(tmp_path / "full.tar", members), "rb").read())
    second = 512 + -(-len(JPEG) // 512) * 512
    raw[second + 148:second + 156] = b"9999999\x00"  # wrong checksum
    path = tmp_path / "bad.tar"
    path.write_bytes(bytes(raw))
    items = list(iter_tar(str(path), "C", 1 << 20))
    assert _ids(items) == ["C::a.jpg", "C::"]
    assert items[1].error[0] == "archive" and "after member 1" in items[1].error[1]


@pytest.mark.parametrize("content", [b"", b"this is not a tar file" * 40, gzip.compress(b"not a tar" * 100)])
def test_unopenable_tar_is_one_error_item(tmp_path, content):
    path = tmp_path / "junk.tar.gz"
    path.write_bytes(content)
    items = list(iter_sources([str(path)]))
    assert len(items) == 1 and items[0].id == f"{path}::"
    assert items[0].error[0] == "archive" and items[0].error[1].startswith("cannot open archive: ")


def test_huge_pax_header_is_refused_without_reading_it(tmp_path):
    path = str(tmp_path / "pax.tar")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "a.jpg", JPEG)
        info = tarfile.TarInfo("b.jpg")
        info.size = len(JPEG)
        info.pax_headers = {"comment": "x" * (2 << 20)}
        tf.addfile(info, io.BytesIO(JPEG))
    items = list(iter_tar(path, "P", 1 << 20))
    assert _ids(items) == ["P::a.jpg", "P::"]
    assert "extended header of" in items[1].error[1]


def test_tar_ids_are_stable_across_runs(tmp_path):
    path = _tar(tmp_path / "s.tar", [(f"{i:03d}.jpg", JPEG) for i in range(20)])
    first = [(item.id, item.data) for item in iter_sources([path])]
    assert first == [(item.id, item.data) for item in iter_sources([path])]
    assert len(first) == 20


# --------------------------------------------------------------------------------------------- zip


def test_zip_members_in_order(tmp_path):
    path = str(tmp_path / "a.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dir/", b"")
        zf.writestr("dir/b.jpg", JPEG)
        zf.writestr("a.png", PNG)
        zf.writestr("meta.json", b"{}")
    items = list(iter_sources([path]))
    assert _ids(items) == [f"{path}::dir/b.jpg", f"{path}::a.png", f"{path}::meta.json"]
    assert [read_item(item) for item in items] == [JPEG, PNG, None]


def test_zip_duplicate_names(tmp_path):
    path = str(tmp_path / "dup.zip")
    with pytest.warns(UserWarning), zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.jpg", b"1")
        zf.writestr("a.jpg", b"2")
    items = list(iter_zip(path, "Z", 1 << 20))
    assert [(item.id, item.data) for item in items] == [("Z::a.jpg", b"1"), ("Z::a.jpg#2", b"2")]


def test_zip_bomb_is_refused_but_small_flat_members_are_read(tmp_path):
    bomb = bytes(4 << 20)  # 4 MiB of zeros deflate ~1000x
    flat = bytes(100_000)  # same ratio, but small: nothing to fear
    path = _zip(tmp_path / "bomb.zip", [("bomb.bmp", bomb), ("flat.bmp", flat), ("ok.jpg", JPEG)])
    info = zipfile.ZipFile(path).getinfo("bomb.bmp")
    assert info.file_size > MAX_COMPRESSION_RATIO * info.compress_size
    items = list(iter_zip(path, "Z", 1 << 30))
    assert items[0].error[0] == "archive" and "zip bomb" in items[0].error[1]
    assert items[0].data is None
    assert items[1].data == flat and items[2].data == JPEG


def test_zip_member_over_the_limit(tmp_path):
    path = _zip(tmp_path / "big.zip", [("big.jpg", os.urandom(5000)), ("ok.jpg", JPEG)])
    items = list(iter_zip(path, "Z", max_bytes=4000))
    assert items[0].error == ("too_large", "member is 5000 bytes, more than the limit of 4000")
    assert items[1].data == JPEG


def _patch_central(raw: bytes, offset: int, fmt: str, value: int, occurrence: int = 0) -> bytes:
    """Overwrite one field of the `occurrence`-th central-directory entry."""
    at = -1
    for _ in range(occurrence + 1):
        at = raw.index(b"PK\x01\x02", at + 1)
    return raw[:at + offset] + struct.pack(fmt, value) + raw[at + offset + struct.calcsize(fmt):]


def _liar_zip(tmp_path, real: bytes, claimed: int) -> str:
    raw = open(_zip(tmp_path / "x.zip", [("liar.jpg", real), ("ok.jpg", JPEG)], zipfile.ZIP_STORED), "rb").read()
    path = tmp_path / "liar.zip"
    path.write_bytes(_patch_central(raw, 24, "<I", claimed))  # uncompressed size
    return str(path)


def test_zip_member_claiming_fewer_bytes_than_it_holds(tmp_path):
    # Actually over the limit, but only the claimed 100 bytes are inflated, then the CRC fails.
    items = list(iter_zip(_liar_zip(tmp_path, os.urandom(10_000), 100), "Z", max_bytes=5_000))
    assert items[0].id == "Z::liar.jpg" and items[0].data is None
    assert items[0].error[0] == "archive" and items[0].error[1].startswith("corrupt member: ")
    assert "CRC" in items[0].error[1]
    assert items[1].data == JPEG  # zip members are independent


def test_zip_member_claiming_more_bytes_than_it_holds(tmp_path):
    real = os.urandom(10_000)
    items = list(iter_zip(_liar_zip(tmp_path, real, 50_000), "Z", max_bytes=100_000))
    assert items[0].data == real  # only what is really there, checked by its CRC
    assert items[1].data == JPEG
    too_large = list(iter_zip(_liar_zip(tmp_path, real, 50_000), "Z", max_bytes=20_000))
    assert too_large[0].error[0] == "too_large"  # the claim alone is over the limit


def test_zip_encrypted_and_symlink_members(tmp_path):
    path = str(tmp_path / "x.zip")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("secret.jpg", JPEG)
        link = zipfile.ZipInfo("link.jpg")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        fifo = zipfile.ZipInfo("fifo")
        fifo.create_system = 3
        fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
        zf.writestr(fifo, "")
        zf.writestr("ok.jpg", JPEG)
    raw = bytearray(open(path, "rb").read())
    raw[6] |= 1  # local header flag of the first member
    raw = _patch_central(bytes(raw), 8, "<H", 1)  # central directory flag: encrypted
    open(path, "wb").write(raw)
    items = list(iter_zip(path, "Z", 1 << 20))
    assert [(item.id, item.error) for item in items] == [
        ("Z::secret.jpg", ("archive", "encrypted member not read")),
        ("Z::link.jpg", ("archive", "symbolic link member not followed")),
        ("Z::fifo", ("archive", "special file member not followed")),
        ("Z::ok.jpg", None),
    ]


def test_zip_corrupt_member_does_not_stop_the_others(tmp_path):
    noise = os.urandom(3000)
    raw = bytearray(open(_zip(tmp_path / "x.zip", [("a.jpg", JPEG), ("n.jpg", noise), ("c.png", PNG)],
                              zipfile.ZIP_STORED), "rb").read())
    at = raw.index(noise)
    raw[at:at + 10] = bytes(10)  # CRC no longer matches
    path = tmp_path / "bad.zip"
    path.write_bytes(bytes(raw))
    items = list(iter_zip(str(path), "Z", 1 << 20))
    assert [item.data for item in items] == [JPEG, None, PNG]
    assert items[1].error[0] == "archive" and "CRC" in items[1].error[1]


def test_truncated_zip_is_one_error_item(tmp_path):
    raw = open(_zip(tmp_path / "x.zip", [("a.jpg", JPEG), ("b.png", PNG)]), "rb").read()
    path = tmp_path / "cut.zip"
    path.write_bytes(raw[:len(raw) // 2])
    items = list(iter_sources([str(path)]))
    assert _ids(items) == [f"{path}::"]
    assert items[0].error[0] == "archive" and items[0].error[1].startswith("cannot open archive: ")


def test_missing_archive_is_one_not_found_item(tmp_path):
    items = list(iter_tar(str(tmp_path / "gone.tar"), "gone.tar", 100)) + list(
        iter_zip(str(tmp_path / "gone.zip"), "gone.zip", 100))
    assert [(item.id, item.error[0]) for item in items] == [("gone.tar::", "not_found"), ("gone.zip::", "not_found")]
