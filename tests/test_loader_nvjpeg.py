"""The nvjpeg loader: routing, batch decode, fallback to the CPU decoder, resolution; on a GPU, nvJPEG itself.

On the CPU the decoder is a stand-in (torchvision's CPU decode_jpeg, one file made to fail, one made to
return a wrong size): the loader's own logic is what is tested. The gpu-marked tests run the real one.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from scanner.decoding import loaders
from scanner.decoding.decode import decode
from scanner.decoding.nvjpeg import NvjpegLoader
from scanner.errors import ScannerError
from scanner.scan.prepare import DecodeOptions, prepare
from scanner.sources import Item

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def _jpeg(w, h, seed, **save) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def _png(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def _stand_in(fail_on: set[int], wrong_on: set[int]):
    from torchvision.io import decode_jpeg

    calls = []

    def decode_batch(datas, device):
        calls.append(len(datas))
        out = []
        for data in datas:
            width = Image.open(io.BytesIO(data)).size[0]
            if width in fail_on:
                out.append(RuntimeError("nvjpeg: unsupported"))
                continue
            img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            out.append(img[:, :-1] if width in wrong_on else img)
        return out

    return decode_batch, calls


def _prepared(loader, files: dict[str, bytes]) -> list:
    return [prepare(Item(name, data=data), "m", DecodeOptions(), loader) for name, data in files.items()]


def test_routes_plain_jpegs_to_the_batch_and_the_rest_to_the_workers():
    loader = NvjpegLoader("m", device="cpu", decode=_stand_in(set(), set())[0])
    rotated = _jpeg(30, 20, 1, exif=_exif_rotated())
    batch = _prepared(loader, {"a.jpg": _jpeg(40, 30, 0), "b.png": _png(12, 9), "c.jpg": rotated})
    assert batch[0].encoded is not None and (batch[0].width, batch[0].height) == (40, 30) and batch[0].image is None
    assert batch[1].encoded is None and batch[1].image is not None  # PNG: decoded on the worker
    assert batch[2].encoded is None and batch[2].image.shape == (3, 30, 20)  # EXIF rotation: the CPU decoder


def test_progressive_jpegs_are_decoded_on_the_workers():
    """torchvision's nvJPEG batch decodes progressive files one at a time on the scan thread: the loader
    leaves them to the decode workers, which decode them in parallel."""
    loader = NvjpegLoader("m", device="cpu", decode=_stand_in(set(), set())[0])
    batch = _prepared(loader, {"base.jpg": _jpeg(40, 30, 0), "prog.jpg": _jpeg(40, 30, 1, progressive=True)})
    assert batch[0].encoded is not None and batch[0].image is None
    assert batch[1].encoded is None and batch[1].image.shape == (3, 30, 40)
    assert [p.item.id for p in loader.load(batch)] == ["base.jpg", "prog.jpg"]


def _exif_rotated():
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


def test_load_decodes_the_batch_and_falls_back_per_file():
    decode_batch, calls = _stand_in(fail_on={33}, wrong_on={35})
    loader = NvjpegLoader("m", device="cpu", decode=decode_batch)
    files = {"ok.jpg": _jpeg(40, 30, 0), "fails.jpg": _jpeg(33, 20, 1), "wrong.jpg": _jpeg(35, 21, 2),
             "p.png": _png(8, 8), "ok2.jpg": _jpeg(50, 10, 3)}
    batch = _prepared(loader, files)
    loaded = loader.load(batch)
    assert calls == [4]  # one call for the batch's four JPEGs
    assert [p.item.id for p in loaded] == list(files)  # order kept, nothing lost
    for p, data in zip(loaded, files.values()):
        assert p.encoded is None and p.record is None
        assert torch.equal(p.image, decode(data).image)  # stand-in and fallbacks: the CPU decoder's pixels
    assert loader.fallbacks == 2


def test_a_file_neither_decoder_takes_gets_its_error_record(monkeypatch):
    import scanner.scan.prepare as prepare_module
    from scanner.decoding.decode import DecodeError

    decode_batch, _ = _stand_in(fail_on={33}, wrong_on=set())
    loader = NvjpegLoader("m", device="cpu", decode=decode_batch)
    batch = _prepared(loader, {"good.jpg": _jpeg(41, 30, 5), "bad.jpg": _jpeg(33, 20, 1), "last.jpg": _jpeg(45, 12, 6)})
    real_decode = prepare_module.decode

    def cpu_refuses_width_33(data, *args, **kw):
        if Image.open(io.BytesIO(data)).size[0] == 33:
            raise DecodeError("decode", "corrupt JPEG data")
        return real_decode(data, *args, **kw)

    monkeypatch.setattr(prepare_module, "decode", cpu_refuses_width_33)
    loaded = loader.load(batch)
    assert [p.item.id for p in loaded] == ["good.jpg", "last.jpg"]  # the neighbours keep their images
    bad = batch[1]
    assert bad.image is None and bad.record["error"]["kind"] == "decode" and bad.record["id"] == "bad.jpg"


def test_the_cpu_decoders_images_reach_the_target_in_one_upload(recorded_uploads):
    """Files left to the CPU decoder (a PNG, a rotated JPEG, one nvJPEG refuses) join the batch's device in
    one staged copy, in order; the "meta" device stands in for a GPU."""
    decode_batch, _ = _stand_in(fail_on={33}, wrong_on=set())
    loader = NvjpegLoader("m", device="meta", decode=lambda datas, device: [
        got if isinstance(got, Exception) else got.to(device) for got in decode_batch(datas, device)])
    files = {"a.jpg": _jpeg(40, 30, 0), "b.png": _png(12, 9), "c.jpg": _jpeg(30, 20, 1, exif=_exif_rotated()),
             "fails.jpg": _jpeg(33, 20, 1), "e.jpg": _jpeg(50, 10, 3)}
    loaded = loader.load(_prepared(loader, files))
    assert [p.item.id for p in loaded] == list(files)
    assert all(p.image.device.type == "meta" for p in loaded)
    assert recorded_uploads == [[(3, 9, 12), (3, 30, 20), (3, 20, 33)]]  # one call, the CPU decoder's three, in order


def test_resolve_and_make(monkeypatch):
    monkeypatch.setattr(loaders, "cuda_available", lambda: False)
    with pytest.raises(ScannerError, match="CUDA GPU"):
        loaders.resolve_loader("nvjpeg")
    monkeypatch.setattr(loaders, "cuda_available", lambda: True)
    monkeypatch.setattr(loaders, "dali_installed", lambda: False)
    assert loaders.resolve_loader("nvjpeg") == "nvjpeg"
    assert loaders.resolve_loader("auto") == "nvjpeg"  # a GPU without DALI
    assert loaders.resolve_loader("auto", torch.device("cuda", 0)) == "nvjpeg"
    assert loaders.resolve_loader("auto", torch.device("cpu")) == "cpu"  # the model on the CPU: decode there
    assert loaders.resolve_loader("auto", "cpu") == "cpu"
    made = loaders.make_loader("nvjpeg", model_id="m", device=torch.device("cpu"))
    assert isinstance(made, NvjpegLoader) and made.target == torch.device("cpu")


def test_the_loader_decodes_without_a_second_header_parse(monkeypatch):
    """decode_jpeg_cuda (run on the CPU here) applies the EXIF orientation unless told the files have none;
    the loader's own decode says so, since route() sends it only files of orientation 1."""
    from scanner.backends import torch_cuda
    from scanner.decoding import nvjpeg

    rotated = _jpeg(30, 20, 1, exif=_exif_rotated())
    assert torch_cuda.decode_jpeg_cuda([rotated], "cpu")[0].shape == (3, 30, 20)
    assert torch_cuda.decode_jpeg_cuda([rotated], "cpu", orient=False)[0].shape == (3, 20, 30)

    def no_parse(data):
        raise AssertionError("the header was parsed again")

    monkeypatch.setattr(torch_cuda, "_exif_orientation", no_parse)
    plain = _jpeg(40, 30, 0)
    got = nvjpeg._nvjpeg([plain], torch.device("cpu"))[0]
    assert torch.equal(got, decode(plain).image)


@pytest.mark.gpu
@needs_gpu
def test_gpu_nvjpeg_loader_matches_the_cpu_decoder_closely():
    """4:4:4 JPEGs of noise: no chroma upsampling, so only the IDCTs' rounding may differ. (4:2:0
    noise differs by a mean of 12.9 on an H100: nvJPEG upsamples chroma otherwise than libjpeg.)"""
    loader = NvjpegLoader("m", device="cuda")
    files = {f"{i}.jpg": _jpeg(64 + 7 * i, 48 + 5 * i, i, subsampling=0) for i in range(6)} | {"p.png": _png(9, 9)}
    loaded = loader.load(_prepared(loader, files))
    assert [p.item.id for p in loaded] == list(files) and loader.fallbacks == 0
    for p, data in zip(loaded, files.values()):
        assert p.image.device.type == "cuda"
        diff = (p.image.cpu().int() - decode(data).image.int()).abs().float()
        assert diff.mean() < 1.5, diff.mean()
