"""`scanner samples`: the bundled scikit-image photographs become decodable RGB JPEGs."""

from __future__ import annotations

import builtins

import pytest

from scanner.decoding.decode import decode_image
from scanner.errors import ScannerError
from scanner.samples import SAMPLES, write_samples

pytest.importorskip("skimage", reason="scikit-image is the source of the samples (extra: samples)")


def test_write_samples_writes_decodable_jpegs(tmp_path):
    paths = write_samples(tmp_path / "samples")
    assert [p.stem for p in paths] == list(SAMPLES)  # all of them load offline
    for path in paths:
        data = path.read_bytes()
        assert data[:3] == b"\xff\xd8\xff"  # JPEG
        image = decode_image(data)
        assert image.shape[0] == 3 and min(image.shape[1:]) >= 100
    by_name = {p.stem: decode_image(p.read_bytes()) for p in paths if p.stem in ("camera", "astronaut")}
    assert tuple(by_name["astronaut"].shape) == (3, 512, 512)
    grey = by_name["camera"].int()  # grey source: three (nearly) equal channels after JPEG
    assert (grey[0] - grey[1]).abs().max() <= 3 and (grey[1] - grey[2]).abs().max() <= 3


def test_write_samples_overwrites_and_rejects_a_file(tmp_path):
    first = write_samples(tmp_path, names=("coffee",))
    assert write_samples(tmp_path, names=("coffee",)) == first
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ScannerError, match="not a directory"):
        write_samples(target)


def test_unknown_samples_only_is_a_clear_error(tmp_path):
    with pytest.raises(ScannerError, match="none of the sample photographs"):
        write_samples(tmp_path, names=("no_such_image",))


def test_missing_scikit_image_says_how_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name == "skimage" or name.startswith("skimage."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    with pytest.raises(ScannerError, match="pip install scikit-image"):
        write_samples(tmp_path)
