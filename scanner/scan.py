"""`scanner run DIR --out results.jsonl`, first form: a sequential CPU/torch scan.

    files (sources.iter_directory) -> read + sha256 -> decode -> batches -> Detector -> JSONL

One record per file, in enumeration order; unreadable and undecodable files become error records
at their position. The output is truncated at start (resume comes later). Records are flushed after
every batch, so a killed run leaves whole lines for every batch before the one in flight.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import stat
import time
from dataclasses import dataclass

import torch

from scanner.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from scanner.errors import ScannerError
from scanner.results import ResultWriter, error_record, label_for, result_record
from scanner.sources import Item, iter_directory

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 30  # a file is read whole; larger ones are refused as too_large
# Decoded pixels held for one batch (about 600 MB of uint8 RGB): a batch of huge images runs early.
BATCH_PIXEL_BUDGET = 200_000_000


@dataclass
class ScanSummary:
    scanned: int  # records written (one per file)
    errors: int  # of which error records
    seconds: float
    images_per_s: float


@dataclass
class _Pending:
    """A file whose record is not written yet: either an error record, or an image awaiting the model."""

    item: Item
    sha256: str | None = None
    image: torch.Tensor | None = None  # uint8 (3, H, W)
    record: dict | None = None  # set once known


def read_item(item: Item, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The file's bytes. Raises OSError for I/O problems, DecodeError for non-regular or huge files."""
    st = os.stat(item.path)  # follows symlinks; a dangling or looping link raises OSError here
    if not stat.S_ISREG(st.st_mode):
        # Never open FIFOs or devices (a FIFO blocks); directories reached through a file path too.
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise DecodeError("not_image", f"{what}")
    if st.st_size > max_bytes:
        raise DecodeError("too_large", f"file is {st.st_size} bytes, more than the limit of {max_bytes}")
    with open(item.path, "rb") as fh:
        return fh.read(max_bytes + 1)


def _prepare(item: Item, model_id: str, max_pixels: int, max_bytes: int) -> _Pending:
    """Read, hash and decode one item; the result carries either an image or a finished error record."""
    pending = _Pending(item)
    if item.error is not None:
        pending.record = error_record(item.id, None, item.error[0], item.error[1], model_id)
        return pending
    try:
        data = read_item(item, max_bytes)
    except DecodeError as exc:
        pending.record = error_record(item.id, None, exc.kind, str(exc), model_id)
        return pending
    except OSError as exc:
        pending.record = error_record(item.id, None, "io", f"cannot read file: {exc.strerror or exc}", model_id)
        return pending
    pending.sha256 = hashlib.sha256(data).hexdigest()
    try:
        pending.image = decode_image(data, max_pixels)
    except DecodeError as exc:
        pending.record = error_record(item.id, pending.sha256, exc.kind, str(exc), model_id)
    except MemoryError:
        pending.record = error_record(item.id, pending.sha256, "too_large", "out of memory while decoding", model_id)
    except Exception as exc:  # noqa: BLE001 - a third-party parser failing on hostile bytes is a bad file, not our bug
        pending.record = error_record(
            item.id, pending.sha256, "decode", f"decoder failed: {type(exc).__name__}: {exc}", model_id
        )
    return pending


class _Inference:
    """Runs the detector on a batch; a batch that fails is retried image by image, so one image that
    breaks the model becomes one error record and never costs its neighbours their results."""

    def __init__(self, model, model_id: str, threshold: float):
        self.model = model
        self.model_id = model_id
        self.threshold = threshold
        self.succeeded = 0  # images scored so far in this run

    def _forward(self, images: list[torch.Tensor]) -> tuple[list[float], torch.Tensor]:
        with torch.no_grad():
            out = self.model(images)
        scores = torch.sigmoid(out.logits.float()).cpu().tolist()  # (B,)
        return scores, out.boxes.cpu()  # (B, K, 4)

    def _record(self, pending: _Pending, score: float, boxes: torch.Tensor) -> dict:
        item, image = pending.item, pending.image
        _, h, w = image.shape
        if not math.isfinite(score):
            return error_record(item.id, pending.sha256, "inference", "model produced a non-finite score",
                                self.model_id, width=w, height=h)
        return result_record(item.id, pending.sha256, score, label_for(score, self.threshold), boxes, w, h,
                             self.model_id)

    def run(self, batch: list[_Pending]) -> None:
        """Fill in `record` for every pending image of the batch."""
        try:
            scores, boxes = self._forward([p.image for p in batch])
        except Exception as exc:  # noqa: BLE001 - isolate the image that fails, below
            if len(batch) > 1:
                log.warning("batch of %d failed (%s: %s); retrying image by image", len(batch), type(exc).__name__, exc)
            for pending in batch:
                self._run_one(pending)
        else:
            for pending, score, box in zip(batch, scores, boxes):
                pending.record = self._record(pending, score, box)
            self.succeeded += len(batch)
        for pending in batch:
            pending.image = None  # free the pixels now

    def _run_one(self, pending: _Pending) -> None:
        try:
            scores, boxes = self._forward([pending.image])
        except Exception as exc:
            if self.succeeded == 0:
                # Nothing has ever run: the model or the setup is broken, not this image.
                raise
            _, h, w = pending.image.shape
            pending.record = error_record(pending.item.id, pending.sha256, "inference",
                                          f"model failed on this image: {type(exc).__name__}: {exc}",
                                          self.model_id, width=w, height=h)
            return
        pending.record = self._record(pending, scores[0], boxes[0])
        self.succeeded += 1


def _progress(console):
    from rich.progress import Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} files/s" if task.speed else "- files/s", style="progress.data.speed")

    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]scanning[/bold] {task.completed} files"),
        RateColumn(),
        TextColumn("[red]{task.fields[errors]} errors[/red]"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def scan(
    root,
    out_path,
    model,
    info,
    *,
    batch_size: int = 16,
    threshold: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    console=None,
    max_bytes: int = MAX_FILE_BYTES,
) -> ScanSummary:
    """Scan every file under `root` and write one JSONL record per file to `out_path`.

    model: a Detector (forward(list of uint8 (3, H, W)) -> logits (B,), boxes (B, K, 4)); info: its
    ModelInfo (model_id, threshold). A rich progress display is drawn on `console` when given.
    """
    if batch_size < 1:
        raise ScannerError(f"batch size is {batch_size}; expected a positive integer")
    if max_pixels < 1:
        raise ScannerError(f"max pixels is {max_pixels}; expected a positive integer")
    threshold = info.threshold if threshold is None else float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ScannerError(f"threshold is {threshold}; expected a probability in [0, 1]")
    model_id = info.model_id
    items = iter_directory(root)  # raises ScannerError before the output is touched
    first = next(items, None)
    model.eval()
    infer = _Inference(model, model_id, threshold)

    start = time.perf_counter()
    scanned = errors = 0
    pending: list[_Pending] = []  # in enumeration order; records written from the front
    batch: list[_Pending] = []
    batch_pixels = 0

    progress = _progress(console) if console is not None else None
    task = progress.add_task("scan", total=None, errors=0) if progress is not None else None

    def drain(writer: ResultWriter) -> None:
        nonlocal scanned, errors
        done = 0
        for p in pending:
            if p.record is None:
                break
            writer.write(p.record)
            scanned += 1
            errors += p.record["error"] is not None
            done += 1
        del pending[:done]
        if done:
            writer.flush()
            if progress is not None:
                progress.update(task, completed=scanned, errors=errors)

    def run_batch(writer: ResultWriter) -> None:
        nonlocal batch, batch_pixels
        if batch:
            infer.run(batch)
            batch, batch_pixels = [], 0
        drain(writer)

    def chain():
        if first is not None:
            yield first
            yield from items

    if progress is not None:
        progress.start()
    try:
        with ResultWriter(out_path) as writer:
            for item in chain():
                p = _prepare(item, model_id, max_pixels, max_bytes)
                pending.append(p)
                if p.image is not None:
                    batch.append(p)
                    batch_pixels += p.image.shape[1] * p.image.shape[2]
                if not batch:
                    drain(writer)  # only error records waiting: write them now
                elif len(batch) >= batch_size or batch_pixels >= BATCH_PIXEL_BUDGET or len(pending) >= 8 * batch_size:
                    run_batch(writer)
            run_batch(writer)
            if pending:  # cannot happen: every pending item has a record after the last batch
                raise RuntimeError(f"{len(pending)} results were not written")
    finally:
        if progress is not None:
            progress.update(task, completed=scanned, errors=errors)
            progress.stop()
    seconds = time.perf_counter() - start
    return ScanSummary(scanned, errors, seconds, scanned / seconds if seconds > 0 else 0.0)
