"""The DALI loader: plain JPEGs decoded a batch at a time by NVIDIA DALI, the rest by scanner.decoding.decode.

One pipeline (`decode_pipeline`, one `@pipeline_def` parameterised by device) takes encoded bytes
through `fn.external_source` and gives, per image,

    image  uint8 (H, W, 3) RGB at full resolution (for crop-resize), handed on as (3, H, W)
    view   float32 (3, 224, 224) in [0, 1]: the central square (side min(H, W), offset
           ((H-m)//2, (W-m)//2)) resized with antialiasing, as scanner.model.preprocess.global_views
           (only when asked for: the scan's runners compute the view from the image themselves)

decoded by nvJPEG (device "mixed", on the GPU, chroma upsampled like libjpeg) or by libjpeg-turbo
(device "cpu", `device_id=None`, where there is no GPU). On the GPU the outputs reach torch through
DLPack on torch's current stream: no host copy. Two entry points use it: `DaliLoader` (the scan's batch
loader: scanner.scan.pipeline, scanner.scan.prepare) and `iter_webdataset` (tar shards through
`fn.readers.webdataset`, with `shard_id`/`num_shards`).

Routing (scanner.decoding.routing.route, on the scan's worker threads). DALI gets a file only when it is
certain to give the CPU decoder's pixels: a plain JPEG (baseline, extended or progressive Huffman, 8-bit,
RGB or grey, EXIF orientation 1, within the pixel budget, well-formed up to its EOI). Everything else
(PNG, WebP, GIF, TIFF, CMYK, arithmetic or lossless JPEG, rotated, truncated, over budget) is decoded by
scanner.decoding.decode.decode and rejoins the batch in its place.

Isolation. A corrupt JPEG that passes those checks makes the whole DALI batch fail, and the pipeline
object is unusable afterwards. The pipeline is then rebuilt (about 25 ms on the CPU) and the batch
bisected: each half runs again, down to single files. A file DALI still refuses alone goes to
scanner.decoding.decode.decode, the reference, whose DecodeError becomes its `decode` error record (or whose
image is scored, if libjpeg-turbo's own decoder accepts it): every file gets exactly the CPU loader's
outcome and its neighbours are decoded by DALI as usual. Cost: about 2·k·log2(B) pipeline runs for k
bad files in a batch of B.

Tolerances (tests/test_dali.py; CPU mode measured here, GPU not measured on this machine):
- image, DALI CPU vs scanner.decoding.decode (torchvision's libjpeg-turbo): bit-identical on every JPEG
  tried (4:4:4, 4:2:2, 4:2:0, quality 50-100, sizes 80x100 to 1024x768, grey, progressive). Tested
  with max |diff| <= 1 so that a libjpeg-turbo version skew cannot fail the build.
- view, DALI vs preprocess.global_views on the same pixels: the interior (all but the outermost 2
  pixels) within 1e-5; the 2-pixel frame up to 0.017 (4/255) because DALI clamps at the edges where
  torch renormalises its truncated antialiasing filter. Tested: interior <= 1e-4, frame <= 0.03.
- GPU (nvJPEG with fancy upsampling vs libjpeg-turbo): IDCTs differ, expected within a few levels;
  the GPU tests assert mean |diff| <= 1 and 99.9th percentile <= 8, unmeasured until a GPU runs them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from scanner.decoding.decode import DecodeError, decode
from scanner.decoding.routing import route
from scanner.errors import ItemError
from scanner.model.preprocess import global_views
from scanner.stages import stage

log = logging.getLogger(__name__)

INPUT = "encoded"  # the external source's name
VIEW_SIZE = 224
WEBDATASET_EXTENSIONS = "jpg;jpeg;png;webp;bmp;gif;tif;tiff"


# -- the pipeline ----------------------------------------------------------------------------------------


@functools.cache
def _pipeline_def():
    """The @pipeline_def function, made on first use (importing nvidia.dali takes about a second)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def
    def decode_pipeline(decoder: str = "cpu", views: bool = False, size: int = VIEW_SIZE):
        """decoder: "mixed" (GPU) or "cpu". Outputs image (H, W, 3) uint8 [, view (3, size, size)]."""
        encoded = fn.external_source(name=INPUT, dtype=types.UINT8, ndim=1)
        # Orientation is left to routing (rotated files go to the CPU decoder); fancy upsampling makes
        # nvJPEG upsample chroma as libjpeg-turbo does (the CPU backend always does).
        image = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False,
                                  jpeg_fancy_upsampling=True)
        if not views:
            return image
        shape = image.shape(dtype=types.INT32)  # (H, W, 3), on the CPU even for GPU images
        h, w = shape[0], shape[1]
        m = dmath.min(h, w)
        anchor = fn.stack((h - m) // 2, (w - m) // 2)  # preprocess.central_square's offsets exactly
        square = fn.slice(image, anchor, fn.stack(m, m), axes=[0, 1], normalized_anchor=False,
                          normalized_shape=False)
        resized = fn.resize(square, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True,
                            dtype=types.FLOAT)
        view = fn.crop_mirror_normalize(resized, dtype=types.FLOAT, output_layout="CHW", mean=[0.0, 0.0, 0.0],
                                        std=[255.0, 255.0, 255.0])
        return image, view

    return decode_pipeline


def build_pipeline(batch_size: int, device: str = "cpu", *, device_id: int | None = None, num_threads: int = 2,
                   views: bool = False, size: int = VIEW_SIZE):
    """A built decode pipeline. device "gpu": nvJPEG on CUDA device `device_id` (default: torch's
    current one); "cpu": DALI's CPU decoder (`device_id=None`, no GPU needed). `feed_input` then
    `run()` once per batch of at most `batch_size` (prefetch depth 1: feeding ahead of a run is not
    needed, and depth 2 refuses a second feed_input/run pair)."""
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device is {device!r}; expected 'gpu' or 'cpu'")
    if device == "gpu" and device_id is None:
        device_id = torch.cuda.current_device()
    pipe = _pipeline_def()(decoder="mixed" if device == "gpu" else "cpu", views=views, size=size,
                           batch_size=batch_size, num_threads=num_threads,
                           device_id=device_id if device == "gpu" else None, prefetch_queue_depth=1)
    pipe.build()
    return pipe


def _image_to_torch(sample, target: torch.device) -> torch.Tensor:
    """One (H, W, 3) DALI output sample -> a contiguous uint8 (3, H, W) tensor on `target`, owning its
    memory (DALI reuses its output buffers on the next run)."""
    if hasattr(sample, "as_cpu") and target.type == "cuda":
        # DLPack on torch's current stream: DALI's stream is synchronised with it, nothing goes through the host.
        return torch.from_dlpack(sample).permute(2, 0, 1).contiguous()
    if hasattr(sample, "as_cpu"):  # a GPU image for a CPU model
        sample = sample.as_cpu()
    # One strided copy both transposes and detaches from DALI's buffer (numpy's is ~4x torch's here).
    return torch.from_numpy(np.array(np.asarray(sample).transpose(2, 0, 1), order="C"))


def _views_to_torch(batch, target: torch.device) -> torch.Tensor:
    """The dense (B, 3, S, S) view output -> a float32 tensor on `target` owning its memory."""
    dense = batch.as_tensor()
    if hasattr(dense, "as_cpu") and target.type == "cuda":
        return torch.from_dlpack(dense).clone()
    if hasattr(dense, "as_cpu"):
        dense = dense.as_cpu()
    return torch.from_numpy(np.array(dense))


# -- decoding batches with isolation ---------------------------------------------------------------------


class DaliFailed(Exception):
    """DALI could not decode this one file (found by bisection)."""


@dataclass
class Loaded:
    """One decoded file: `image` (and `view` when asked for), or `error`."""

    image: torch.Tensor | None = None  # uint8 (3, H, W), contiguous, on the decoder's target device
    view: torch.Tensor | None = None  # float32 (3, S, S) in [0, 1]
    width: int = 0  # original size (differs from the image's only when the CPU decoder downscaled)
    height: int = 0
    downscaled: bool = False
    decoder: str = ""  # "dali" or "cpu"
    error: ItemError | None = None


class DaliDecoder:
    """Decodes lists of encoded files, exactly one result per input, in order; never raises for bad data.

    device: "gpu" | "cpu" | "auto" (gpu when CUDA is available). target: where images go (default:
    the GPU in GPU mode, else the CPU). views: also compute the 224 global views. rebuilds: how many
    times a failed pipeline was rebuilt.
    """

    def __init__(self, batch_size: int = 16, device: str = "auto", *, target=None, num_threads: int | None = None,
                 views: bool = False, size: int = VIEW_SIZE, device_id: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch size is {batch_size}; expected a positive integer")
        if device == "auto":
            device = "gpu" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.device_id = device_id
        if target is None:
            target = torch.device("cuda", device_id or 0) if device == "gpu" else torch.device("cpu")
        self.target = torch.device(target)
        self.batch_size = batch_size
        self.num_threads = num_threads or max(1, min(8, os.cpu_count() or 1))
        self.views = views
        self.size = size
        self.rebuilds = 0
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = build_pipeline(self.batch_size, self.device, device_id=self.device_id,
                                        num_threads=self.num_threads, views=self.views, size=self.size)
        return self._pipe

    def decode_jpegs(self, encoded: Sequence[bytes]) -> list[tuple[torch.Tensor, torch.Tensor | None] | DaliFailed]:
        """Routed JPEGs -> per file (image, view or None) or DaliFailed, in order."""
        out: list = []
        for start in range(0, len(encoded), self.batch_size):  # the last chunk is simply shorter
            got = self._isolate(list(encoded[start : start + self.batch_size]))
            failed = [g for g in got if isinstance(g, DaliFailed)]
            if len(got) > 1 and len(failed) == len(got):  # more likely DALI itself than every file
                log.warning("DALI failed on every file of a batch of %d (%s); the CPU decoder takes them",
                            len(got), failed[0])
            out.extend(got)
        return out

    def _isolate(self, chunk: list[bytes]) -> list:
        pipe = self._pipeline()  # a pipeline that cannot be built is a setup problem, not a bad file: it raises
        try:
            return self._run(pipe, chunk)
        except RuntimeError as exc:  # DALI reports every operator failure as RuntimeError
            self._pipe = None  # the failed pipeline object is unusable: build a fresh one
            self.rebuilds += 1
            if len(chunk) == 1:
                return [DaliFailed(_first_line(exc))]
            log.debug("DALI failed on a batch of %d; bisecting (%s)", len(chunk), _first_line(exc))
            mid = len(chunk) // 2
            return self._isolate(chunk[:mid]) + self._isolate(chunk[mid:])

    def _run(self, pipe, chunk: list[bytes]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        pipe.feed_input(INPUT, [np.frombuffer(data, dtype=np.uint8) for data in chunk])
        outputs = pipe.run()
        images = [_image_to_torch(outputs[0][i], self.target) for i in range(len(chunk))]
        views = list(_views_to_torch(outputs[1], self.target)) if self.views else [None] * len(chunk)
        return list(zip(images, views))

    def decode(self, samples: Sequence[bytes], max_pixels: int | None = None, downscale_large: bool = False
               ) -> list[Loaded]:
        """Any encoded files -> one Loaded per input, in order: routed JPEGs through DALI, the rest (and
        files DALI refuses) through scanner.decoding.decode.decode; errors as its DecodeError kinds."""
        from scanner.decoding.decode import DEFAULT_MAX_PIXELS

        max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        results: list[Loaded | None] = [None] * len(samples)
        jpegs: list[int] = []
        for i, data in enumerate(samples):
            try:
                size = route(data, max_pixels, downscale_large)
            except ItemError as exc:
                results[i] = Loaded(error=exc)
                continue
            if size is None:
                results[i] = self._decode_cpu(data, max_pixels, downscale_large)
            else:
                jpegs.append(i)
                results[i] = Loaded(width=size[0], height=size[1], decoder="dali")
        for i, got in zip(jpegs, self.decode_jpegs([samples[i] for i in jpegs])):
            if isinstance(got, DaliFailed):
                results[i] = self._decode_cpu(samples[i], max_pixels, downscale_large)
            else:
                results[i].image, results[i].view = got
        return results  # type: ignore[return-value]

    def _decode_cpu(self, data: bytes, max_pixels: int, downscale_large: bool) -> Loaded:
        try:
            decoded = decode(data, max_pixels, downscale_large=downscale_large)
        except ItemError as exc:
            return Loaded(error=exc)
        except Exception as exc:  # noqa: BLE001 - as scanner.scan.prepare: a parser failing on hostile bytes is a bad file
            return Loaded(error=DecodeError("decode", f"decoder failed: {type(exc).__name__}: {exc}"))
        image = decoded.image.to(self.target)
        view = global_views([image], self.size)[0] if self.views else None
        return Loaded(image, view, decoded.width, decoded.height, decoded.downscaled, "cpu")


def _first_line(exc: BaseException) -> str:
    """DALI's message minus the pipeline's traceback: what it says after "encountered:" (the decoder's
    own reason, e.g. libjpeg's "Bogus Huffman table", goes to stderr, not into the exception)."""
    text = str(exc)
    _, found, after = text.partition("encountered:")
    for line in (after if found else text).splitlines():
        line = line.strip().rstrip(" :")
        if line and not line.startswith("Current pipeline object"):
            return line
    return type(exc).__name__


# -- the scan's batch loader ------------------------------------------------------------------------------


class DaliLoader:
    """The scan's batch loader (scanner.decoding.loaders): `route` on the workers, `load` before inference.

    options: the scan's scanner.scan.prepare.DecodeOptions (for files the CPU decoder takes over). device:
    the model's device; images are put there. Decoding runs on the GPU whenever CUDA is available
    (DALI's CPU mode otherwise, logged once).
    """

    name = "dali"

    def __init__(self, model_id: str, options=None, batch_size: int = 16, device=None,
                 num_threads: int | None = None):
        from scanner.scan.prepare import DecodeOptions

        target = torch.device(device) if device is not None else torch.device("cpu")
        mode = "gpu" if torch.cuda.is_available() else "cpu"
        if mode == "gpu" and target.type != "cuda":
            log.info("loader: DALI decodes JPEGs on the GPU (nvJPEG); images are copied to the model on %s", target)
        elif mode == "gpu":
            log.info("loader: DALI decodes JPEGs on %s (nvJPEG), the CPU decoder the rest", target)
        else:
            log.info("loader: DALI in CPU mode (no CUDA GPU): same pixels as the CPU loader, not faster")
        self.model_id = model_id
        self.options = options or DecodeOptions()
        self.decoder = DaliDecoder(batch_size, mode, target=target, num_threads=num_threads,
                                   device_id=target.index if target.type == "cuda" else None)

    def route(self, data: bytes, options) -> tuple[int, int] | None:
        """On a decode worker: (width, height) to leave `data` for the batch, None to decode it now."""
        return route(data, options.max_pixels, options.downscale_large)

    def load(self, batch: list) -> list:
        """Decode the batch's routed JPEGs (Prepared.encoded) with DALI, in place; files DALI refuses
        are decoded by the CPU decoder (scanner.scan.prepare.decode_into), whose error record they get if it
        refuses them too. Returns the Prepared that have an image, in order."""
        from scanner.backends.torch_cuda import upload_prepared
        from scanner.scan.prepare import decode_into

        todo = [p for p in batch if p.encoded is not None]
        with stage("batch_decode", self.decoder.target):
            results = self.decoder.decode_jpegs([p.encoded for p in todo]) if todo else []
        for p, got in zip(todo, results):
            data, p.encoded = p.encoded, None
            if isinstance(got, DaliFailed):
                log.debug("DALI could not decode %s (%s); the CPU decoder decides", p.item.id, got)
                decode_into(p, data, self.model_id, self.options)
            else:
                p.image = got[0]
        upload_prepared(batch, self.decoder.target)  # one device for the batch
        return [p for p in batch if p.image is not None]


# -- webdataset shards ------------------------------------------------------------------------------------


def iter_webdataset(paths: Sequence[str], *, batch_size: int = 16, shard_id: int = 0, num_shards: int = 1,
                    extensions: str = WEBDATASET_EXTENSIONS, device: str = "auto", views: bool = True,
                    max_pixels: int | None = None, index_paths: Sequence[str] | None = None,
                    num_threads: int | None = None) -> Iterator[tuple[str, str, Loaded]]:
    """Yield (id, sha256, Loaded) for every sample of tar shards `paths` that has an image component
    (`extensions`, ';'-separated), exactly once, in reader order, for shard `shard_id` of `num_shards`
    (DALI's split: samples [N*i//n, N*(i+1)//n) of the N in all the tars). ids are the scan's archive
    ids, `path::member`.

    `fn.readers.webdataset` reads the bytes (a CPU pipeline), and the DaliDecoder decodes them, so a
    corrupt member costs only its own result (a `decode` error) and non-JPEGs go to the CPU decoder.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    paths = [os.fspath(p) for p in paths]
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} is not in [0, {num_shards})")

    @pipeline_def
    def read_pipeline():
        encoded = fn.readers.webdataset(paths=paths, index_paths=list(index_paths or []), ext=[extensions],
                                        missing_component_behavior="skip", shard_id=shard_id, num_shards=num_shards,
                                        pad_last_batch=True, dtypes=[types.UINT8], name="reader")
        return encoded, fn.get_property(encoded, key="source_info")

    reader = read_pipeline(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
    try:
        reader.build()
    except RuntimeError as exc:  # DALI refuses fewer samples than shards, none at all included
        found = re.search(r"number of input samples: (\d+)", str(exc))
        if found is None:
            raise
        if found.group(1) == "0":
            return
        raise ValueError(f"{found.group(1)} samples in {len(paths)} tar file(s) cannot be split into {num_shards} "
                         "shards; use fewer shards") from None
    meta = reader.reader_meta("reader")
    total = meta["epoch_size"]
    count = total * (shard_id + 1) // num_shards - total * shard_id // num_shards  # this shard's samples
    decoder = DaliDecoder(batch_size, device, num_threads=num_threads, views=views)
    while count > 0:
        encoded, info = reader.run()
        take = min(count, len(encoded))  # the last batch is padded by repeating a sample: drop those
        count -= take
        data = [np.array(encoded[i]).tobytes() for i in range(take)]
        ids = [_member_id(bytes(np.array(info[i])).decode("utf-8", "replace"), paths) for i in range(take)]
        for sample_id, raw, loaded in zip(ids, data, decoder.decode(data, max_pixels)):
            yield sample_id, hashlib.sha256(raw).hexdigest(), loaded


def _member_id(source_info: str, paths: Sequence[str]) -> str:
    """DALI's "PATH:OFFSET:MEMBER" -> the scan's "PATH::MEMBER" (paths may contain ':' themselves)."""
    for path in paths:
        if source_info.startswith(path + ":"):
            _, _, member = source_info[len(path) + 1 :].partition(":")
            return f"{path}::{member}"
    return source_info
