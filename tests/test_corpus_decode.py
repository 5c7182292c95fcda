"""Every file of the odd-files corpus (tests/corpus.py) through decode(): the expected image size or
error kind; downscale_large turns too_large files into downscaled images."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from scanner.decoding.decode import DecodeError, decode, decode_pillow
from scanner.sources.sniff import HEAD_BYTES, looks_like_image
from tests.corpus import BOMB, FILES, HUGE_HEADER, UNREADABLE, encode, make_corpus, photo, restore_permissions


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected = make_corpus(root, unreadable=True)
    yield root, expected
    restore_permissions(root)


def test_corpus_is_large_and_small_enough(corpus):
    root, expected = corpus
    assert len(expected) >= 32
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.name != "unreadable.jpg"]
    total = sum(p.stat().st_size for p in files)
    assert total < 2_000_000


@pytest.mark.parametrize("rel", sorted(FILES) + ["links/dangling.jpg", UNREADABLE])
def test_corpus_file(corpus, rel):
    root, expected = corpus
    if rel not in expected:
        pytest.skip("running as root: chmod 000 does not make a file unreadable")
    want = expected[rel]
    path = root / rel
    if want.kind == "error" and want.error in ("io", "not_found"):
        with pytest.raises(OSError):
            path.read_bytes()
        return
    data = path.read_bytes()
    if want.kind == "skip":
        assert not looks_like_image(rel, data[:HEAD_BYTES])
        return
    assert looks_like_image(rel, data[:HEAD_BYTES])
    if want.kind == "error":
        with pytest.raises(DecodeError) as info:
            decode(data)
        assert info.value.kind == want.error, str(info.value)
        assert str(info.value)
        return
    out = decode(data)
    w, h = want.size
    assert (out.width, out.height, out.downscaled) == (w, h, False)
    assert out.image.dtype == torch.uint8 and tuple(out.image.shape) == (3, h, w) and out.image.is_contiguous()
    assert torch.equal(out.image, decode_pillow(data).image)  # fast path or not, the reference's pixels


def assert_downscaled(out, width: int, height: int, max_pixels: int):
    assert out.downscaled and (out.width, out.height) == (width, height)
    _, h, w = out.image.shape
    assert w * h <= max_pixels and out.image.dtype == torch.uint8 and out.image.is_contiguous()
    assert math.isclose(w / h, width / height, rel_tol=2 / min(w, h))


def test_downscale_large_decodes_the_bomb(corpus):
    root, _ = corpus
    data = (root / BOMB).read_bytes()
    out = decode(data, downscale_large=True)  # 100 MP against the default 50 MP budget
    assert_downscaled(out, 10_000, 10_000, 50_000_000)
    assert out.image.max().item() == 0  # zeros stay zeros


def test_downscale_large_oversized_jpeg():
    data = encode(photo(1200, 800), "JPEG", quality=90)
    with pytest.raises(DecodeError):
        decode(data, 100_000)
    out = decode(data, 100_000, downscale_large=True)  # libjpeg decodes at 1/2 scale, then Lanczos
    assert_downscaled(out, 1200, 800, 100_000)


def test_huge_header_is_too_large_even_downscaled(corpus):
    root, _ = corpus
    # 400 MP is under 16 x 50 MP, but past Pillow's own bomb guard (2 x 89 MP), which refuses it at open.
    with pytest.raises(DecodeError) as info:
        decode((root / HUGE_HEADER).read_bytes(), downscale_large=True)
    assert info.value.kind == "too_large"


def test_corpus_paths_are_relative_posix(corpus):
    _, expected = corpus
    assert all(not Path(rel).is_absolute() and "\\" not in rel for rel in expected)
