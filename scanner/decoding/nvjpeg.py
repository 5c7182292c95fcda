"""The nvjpeg loader: plain JPEGs decoded a batch at a time on the GPU by torchvision's nvJPEG
(`torchvision.io.decode_jpeg(device="cuda")`), everything else by the CPU decoder. For CUDA machines
without DALI (`--loader nvjpeg`, and what `auto` picks there for a model on the GPU).

Routing is the dali loader's, scanner.decoding.routing.route, less progressive JPEGs: a well-formed
baseline JPEG, RGB or grey, no EXIF rotation, within the pixel budget. A file nvJPEG refuses, or decodes
to another size than its header gives, is decoded by the CPU decoder, whose error record it gets if that
refuses it too. Every image of the batch ends on the model's GPU, so the runner uploads nothing.

What torchvision does with a batch (its decode_jpegs_cuda, read for torchvision 0.2x): baseline JPEGs are
decoded together by nvJPEG's hardware backend on GPUs that have one (A100, H100, H200), falling back to
its default backend elsewhere; progressive JPEGs one by one, with the Huffman decoding on the calling CPU
thread; one batch at a time per process (a lock). Here that thread is the scan thread, which decodes
batch n+1 while batch n is scored. A progressive 500x375 JPEG takes 2.4 ms to decode on one core of the
build machine (baseline: 0.9 ms), most of the difference its entropy decoding, so a crawl's progressive
files would queue there, one at a time, however many cores the machine has. The decode workers decode
them in parallel instead (`route(..., progressive=False)`); their pixels then travel with the CPU
decoder's other images in one staged upload.

nvJPEG's chroma upsampling differs from libjpeg's: on an H200 its pixels differed from the CPU
decoder's by 2.4 on average (bench/gpu_scan_check.py), so scores differ slightly from the cpu
loader's, as with dali. Inside a scan on an H100 (16 cores) it scanned 533 images/s where the CPU
loader scanned 272 (docs/benchmarks.md); `auto` picks it on GPUs without DALI.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from scanner.decoding.routing import route
from scanner.stages import stage

log = logging.getLogger(__name__)


def _nvjpeg(data: list[bytes], device: torch.device) -> list:
    from scanner.backends.torch_cuda import decode_jpeg_cuda

    # route() hands the batch only JPEGs whose EXIF orientation is 1: no second header parse on the scan thread.
    return decode_jpeg_cuda(data, device, orient=False)


class NvjpegLoader:
    """The scan's batch loader (scanner.decoding.loaders): `route` on the workers, `load` before inference.

    device: the model's CUDA device; decode(list of bytes, device) -> per file a uint8 (3, H, W) tensor
    on the device or the exception it raised (default: torchvision's nvJPEG; tests pass their own).
    """

    name = "nvjpeg"

    def __init__(self, model_id: str, options=None, device=None, decode=None):
        from scanner.scan.prepare import DecodeOptions

        self.model_id = model_id
        self.options = options or DecodeOptions()
        self.target = torch.device(device) if device is not None else torch.device("cuda")
        self.decode = decode or _nvjpeg
        self.fallbacks = 0  # routed files the CPU decoder had to take
        # The scan thread decodes batch n+1 while the model thread scores batch n (scanner.scan.pipeline): on a
        # stream of its own the GPU can run both at once, and the bench's stage clock waits for the decode alone.
        self._stream = torch.cuda.Stream(self.target) if self.target.type == "cuda" else None
        log.info("loader: nvJPEG decodes JPEGs on %s, the CPU decoder the rest", self.target)

    def route(self, data: bytes, options) -> tuple[int, int] | None:
        """On a decode worker: (width, height) to leave `data` for the batch, None to decode it now."""
        return route(data, options.max_pixels, options.downscale_large, progressive=False)

    def load(self, batch: list) -> list:
        """Decode the batch's routed JPEGs in place; returns the Prepared that have an image, in order."""
        todo = [p for p in batch if p.encoded is not None]
        with self._on_own_stream():
            with stage("batch_decode", self.target):
                results = self.decode([p.encoded for p in todo], self.target) if todo else []
            loaded = self._place(batch, todo, results)
        self._hand_over(loaded)
        return loaded

    def _place(self, batch: list, todo: list, results: list) -> list:
        """Each routed file's image, or the CPU decoder's verdict; every image moved to the target."""
        from scanner.backends.torch_cuda import upload_prepared
        from scanner.scan.prepare import decode_into

        for p, got in zip(todo, results):
            data, p.encoded = p.encoded, None
            if isinstance(got, torch.Tensor) and tuple(got.shape) == (3, p.height, p.width):
                p.image = got
                continue
            self.fallbacks += 1
            log.debug("nvJPEG could not decode %s (%s); the CPU decoder decides", p.item.id,
                      got if isinstance(got, Exception) else f"shape {tuple(got.shape)}")
            decode_into(p, data, self.model_id, self.options)
        upload_prepared(batch, self.target)
        return [p for p in batch if p.image is not None]

    def _on_own_stream(self):
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def _hand_over(self, loaded: list) -> None:
        """Make the images safe for the model thread's stream: complete, and not reused while it reads them."""
        if self._stream is None:
            return
        self._stream.synchronize()
        consumer = torch.cuda.default_stream(self.target)
        for p in loaded:
            p.image.record_stream(consumer)
