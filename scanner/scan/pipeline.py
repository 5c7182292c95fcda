"""`scanner run`: the production scan (docs/design.md, "A scan, step by step").

    enumerate (thread) -> read + sha256 + decode (pool of threads) -> batches (this thread) -> model (thread)
                                                                                          -> write (thread)

The stages are joined by bounded queues, so memory stays flat however long the listing is and a slow
stage holds the others back instead of piling up work. Records are written in enumeration order, one
per item, errors at their position; items already done in the output (resume: their final record is
not a transient error, scanner.scan.final_view) are skipped, and so are files that are not images
(scanner.sources.sniff). `workers=0` runs every stage on this thread, one
after the other: the reference the overlap is measured against.

The model runs on a thread of its own with one batch queued beside the one it scores: while batch n is
scored, this thread gathers batch n+1 and, with a GPU loader, decodes it (_ModelThread).

Loaders (`ScanOptions.loader`, scanner.decoding.loaders). With "cpu" (the default) the workers decode, as
above. With "dali" the workers read, hash and parse the header only; plain JPEGs keep their bytes
(Prepared.encoded) and the loader decodes them a batch at a time with NVIDIA DALI right before
inference (on the GPU, straight into device memory), while every other file is decoded by the worker
as before and waits in its place. A JPEG that DALI refuses is handed to the CPU decoder, so records,
order, resume and error semantics are the same with either loader:

    enumerate -> read + sha256 + header (+ decode non-JPEGs) -> batches -> DALI decode -> model -> write
                                                                    (batch n+1)         (batch n)

Stopping (`stop` event, set by SIGINT/SIGTERM in the CLI): no new items are taken, the batch being
assembled is scored and written, the output is synced, and the summary says `interrupted`. Items
that were read but not written are simply scanned again by the next run.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import torch

from scanner.decoding.loaders import CHOICES as LOADER_CHOICES
from scanner.decoding.loaders import is_gpu, make_loader, model_device, resolve_loader
from scanner.errors import ScannerError, is_transient
from scanner.scan.idset import IdSet
from scanner.scan.inference import BatchRunner
from scanner.scan.prepare import DecodeOptions, Prepared, prepare
from scanner.scan.progress import ScanProgress
from scanner.scan.store import ResultStore
from scanner.sources import iter_sources
from scanner.stages import stage

# Decoded pixels held for one batch (about 600 MB of uint8 RGB): a batch of huge images runs early.
BATCH_PIXEL_BUDGET = 200_000_000
_END = object()


@dataclass
class ScanOptions:
    batch_size: int | None = None  # None: default_batch_size(the model's device)
    workers: int | None = None  # decode threads; None: default_workers(the model's device); 0: no overlap
    threshold: float | None = None  # None: the model's calibrated threshold
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    fmt: str = "jsonl"
    force: bool = False  # start over instead of resuming
    fsync_interval: float = 5.0
    loader: str = "cpu"  # "cpu" | "dali" | "nvjpeg" | "auto" (scanner.decoding.loaders.resolve_loader)
    model_thread: bool = True  # score on a thread of its own (False: on the scan thread; bench comparisons)

    @property
    def retry(self):
        """Retries and timeouts of reads (scanner.sources.retry.RetryPolicy), kept with the decode options: they
        travel to the decode workers (and Ray actors) together."""
        return self.decode.retry

    def validate(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ScannerError(f"batch size is {self.batch_size}; expected a positive integer")
        if self.workers is not None and self.workers < 0:
            raise ScannerError(f"workers is {self.workers}; expected 0 (no overlap) or more")
        if self.decode.max_pixels < 1:
            raise ScannerError(f"max pixels is {self.decode.max_pixels}; expected a positive integer")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ScannerError(f"threshold is {self.threshold}; expected a probability in [0, 1]")
        if self.loader not in LOADER_CHOICES:
            raise ScannerError(f"loader is {self.loader!r}; expected one of {', '.join(LOADER_CHOICES)}")
        self.decode.retry.validate()


@dataclass
class ScanSummary:
    scanned: int  # records written by this run (one per item)
    errors: int  # of which error records
    skipped_done: int  # items already in the output (resume) or given twice
    not_images: int  # files skipped as not images
    seconds: float
    images_per_s: float  # records written per second
    interrupted: bool = False
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    transient: int = 0  # of the errors, transient ones (`io`): the next run tries these ids again
    retried: int = 0  # items scanned again because their earlier record was a transient error
    output: dict = field(default_factory=dict)  # the output's final view: ResumeState.summary()

    def to_json(self) -> dict:
        return asdict(self)


def default_batch_size(device=None) -> int:
    """Images per batch where none is given: 16 on the CPU; 256 on a GPU, the torch CUDA runner's largest
    fixed shape (the GPU scans of docs/benchmarks.md ran at 128-256: 490-660 images/s on an H100)."""
    return 256 if is_gpu(device) else 16


def default_workers(device=None) -> int:
    """Decode threads where none are given. On the CPU decoding costs a few percent of inference, so a
    small pool keeps the model fed without taking cores from torch's intra-op threads (2 on up to 4
    cores, else 4). On a GPU the workers' reading, hashing and header checks (and the CPU decodes of
    what the GPU decoder does not take) are what feeds the GPU: all cores but two, at most 12 (the GPU
    runs of docs/benchmarks.md used 12 of 16). More threads help when reads wait on the network
    (pass --workers)."""
    cores = os.cpu_count() or 1
    if is_gpu(device):
        return max(4, min(12, cores - 2))
    return 2 if cores <= 4 else 4


class _Feed:
    """Enumerates items on a thread into a bounded queue, dropping ids that are already done: in the
    output (resume) or earlier in this run (a file given twice, e.g. in a directory and a list)."""

    CHUNK = 64  # ids are checked against the done set a chunk at a time (scanner.scan.idset)

    def __init__(self, items, done: IdSet, maxsize: int, threaded: bool, retry_ids: frozenset = frozenset()):
        self.skipped_done = 0
        self.retried = 0
        self._retry_ids = retry_ids  # ids whose earlier record was transient: counted when taken again
        self._items = self._new_items(items, done)
        self._threaded = threaded
        self._closed = threading.Event()
        if threaded:
            self._queue: queue.Queue = queue.Queue(maxsize)
            self._thread = threading.Thread(target=self._fill, name="scan-enumerate", daemon=True)
            self._thread.start()

    def _new_items(self, items, done: IdSet):
        items = iter(items)
        while True:
            with stage("enumerate"):  # listing, and the check against the ids already done
                chunk = list(itertools.islice(items, self.CHUNK))
                new = done.add_new([item.id for item in chunk]) if chunk else []
            if not chunk:
                return
            self.skipped_done += new.count(False)
            taken = list(itertools.compress(chunk, new))
            if self._retry_ids:
                self.retried += sum(item.id in self._retry_ids for item in taken)
            yield from taken

    def _fill(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the scan thread, which raises it
            self._put(exc)

    def _put(self, value) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        """The next item, or _END."""
        if not self._threaded:
            return next(self._items, _END)
        value = self._queue.get()
        if isinstance(value, BaseException):
            raise value
        return value

    def close(self) -> None:
        self._closed.set()


class _Writer:
    """Writes batches of records on a thread (fsync can take a while on network storage)."""

    def __init__(self, store: ResultStore, progress: ScanProgress, threaded: bool):
        self._store = store
        self._progress = progress
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = queue.Queue(16) if threaded else None
        if threaded:
            self._thread = threading.Thread(target=self._drain, name="scan-write", daemon=True)
            self._thread.start()

    def _write(self, records: list[dict]) -> None:
        with stage("write"):
            self._store.write(records)
        self._progress.advance(len(records), sum(r["error"] is not None for r in records))

    def _drain(self) -> None:
        while (records := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(records)
                except BaseException as exc:  # noqa: BLE001 - raised on the scan thread
                    self._error = exc

    def put(self, records: list[dict]) -> None:
        self._raise_if_failed()
        if self._queue is None:
            self._write(records)
        else:
            self._queue.put(records)

    def close(self) -> None:
        """Write everything queued, then raise the first write error, if any."""
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class _ModelThread:
    """Scores batches on a thread of its own (the runner's work: inference and records).

    At most one batch waits beside the one being scored, so the pixels held stay bounded while the scan
    thread gathers (and a GPU loader decodes) the next batch. Records appear in the prepared items
    (`Prepared.record`) when their batch is done; the scan thread writes them in order. Without a thread
    (`threaded=False`, the no-overlap reference) a batch is scored on the spot. A model that fails outright
    raises on the scan thread, at the next submit or wait.
    """

    def __init__(self, runner: BatchRunner, threaded: bool):
        self._runner = runner
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="scan-model") if threaded else None
        self._inflight: deque[Future] = deque()

    def submit(self, batch: list[Prepared]) -> None:
        if self._pool is None:
            self._runner.run(batch)
            return
        self._inflight.append(self._pool.submit(self._runner.run, batch))
        while len(self._inflight) > 1:  # the one running, and this one queued
            self._inflight.popleft().result()

    def wait(self) -> None:
        """Until every submitted batch is scored."""
        while self._inflight:
            self._inflight.popleft().result()

    def close(self) -> None:
        """Let the batch being scored finish and drop any queued one (after a failure)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _Immediate:
    """Runs a call on this thread and looks like a Future (the no-overlap reference)."""

    def __init__(self, fn, *args):
        self._value = fn(*args)

    def result(self):
        return self._value


def scan(inputs, out_path, model, info, *, from_list: str | None = None, options: ScanOptions | None = None,
         console=None, stop: threading.Event | None = None, total: int | None = None,
         preflight: bool = True) -> ScanSummary:
    """Scan `inputs` (a path, URL, or a list of them; see scanner.sources) and `from_list` into `out_path`.

    model: a Detector (forward(list of uint8 (3, H, W)) -> logits (B,), boxes (B, K, 4)); info: its
    ModelInfo (model_id, threshold). Progress is drawn on `console` when given; `total` (items, when
    known) gives it an ETA. Raises ScannerError for bad inputs, and for optional packages they need but
    which are not installed (scanner.scan.preflight; preflight=False: the caller has checked), before the
    output is touched.
    """
    options = options or ScanOptions()
    options.validate()
    threshold = info.threshold if options.threshold is None else float(options.threshold)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(i) for i in inputs]
    if preflight:
        from scanner.scan.preflight import check_optional_packages

        check_optional_packages(inputs, from_list, fmt=options.fmt, loader=options.loader)
    items = iter_sources(inputs, from_list=from_list, max_bytes=options.decode.max_bytes, retry=options.retry)
    device = model_device(model)
    workers = default_workers(device) if options.workers is None else options.workers
    if options.batch_size is None:
        options = replace(options, batch_size=default_batch_size(device))
    loader_name = resolve_loader(options.loader, device)  # auto: decode where the model computes
    loader = None if loader_name == "cpu" else make_loader(loader_name, model_id=info.model_id, options=options.decode,
                                                          batch_size=options.batch_size, device=device)
    stop = stop or threading.Event()
    model.eval()
    with ResultStore(out_path, fmt=options.fmt, force=options.force, model_id=info.model_id,
                     fsync_interval=options.fsync_interval) as store:
        return _Scan(model, info.model_id, threshold, options, workers, stop, loader).run(items, store, console,
                                                                                           total)


class _Scan:
    def __init__(self, model, model_id: str, threshold: float, options: ScanOptions, workers: int,
                 stop: threading.Event, loader=None):
        self.runner = BatchRunner(model, model_id, threshold)
        self.model_thread: _ModelThread | None = None  # made by run()
        self.loader = loader  # None: the workers decode every file (the CPU loader)
        self.model_id = model_id
        self.options = options
        self.workers = workers
        self.stop = stop
        self.pending: list[Prepared] = []  # in enumeration order; records leave from the front
        self.batch: list[Prepared] = []
        self.batch_pixels = 0
        self.scanned = 0
        self.not_images = 0
        self.kinds: Counter = Counter()

    def run(self, items, store: ResultStore, console, total: int | None) -> ScanSummary:
        threaded = self.workers > 0
        window_size = self.options.batch_size + 2 * max(self.workers, 1)  # decoded images held at most
        start = time.perf_counter()
        progress = ScanProgress(console, total)
        feed = _Feed(items, store.done, window_size, threaded, store.retry_ids)
        writer = _Writer(store, progress, threaded)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="scan-decode") if threaded else None
        self.model_thread = _ModelThread(self.runner, threaded and self.options.model_thread)
        try:
            self._loop(feed, pool, writer, progress, window_size)
        finally:
            feed.close()
            self.model_thread.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            try:
                writer.close()  # what was scored is written, even when the scan fails
            finally:
                progress.close()
        seconds = time.perf_counter() - start
        errors = sum(self.kinds.values())
        transient = sum(n for kind, n in self.kinds.items() if is_transient(kind))
        return ScanSummary(self.scanned, errors, feed.skipped_done, self.not_images, seconds,
                           self.scanned / seconds if seconds > 0 else 0.0, self.stop.is_set(), dict(self.kinds),
                           transient=transient, retried=feed.retried, output=store.state.summary())

    def _loop(self, feed: _Feed, pool, writer: _Writer, progress: ScanProgress, window_size: int) -> None:
        window: deque[Future] = deque()
        decode_options = self.options.decode
        exhausted = False
        skipped_before = 0
        while not self.stop.is_set():
            while not exhausted and len(window) < window_size:
                item = feed.get()
                if item is _END:
                    exhausted = True
                elif pool is not None:
                    window.append(pool.submit(prepare, item, self.model_id, decode_options, self.loader))
                else:
                    window.append(_Immediate(prepare, item, self.model_id, decode_options, self.loader))
                    break  # one at a time: no read-ahead without overlap
            if feed.skipped_done > skipped_before:  # resumed items count towards the total
                progress.advance(feed.skipped_done - skipped_before)
                skipped_before = feed.skipped_done
            if not window:
                break
            self._take(window.popleft().result(), progress)
            if not self.batch:
                self._emit(writer)  # only error records waiting: write them now
            elif (len(self.batch) >= self.options.batch_size or self.batch_pixels >= BATCH_PIXEL_BUDGET
                  or len(self.pending) >= 8 * self.options.batch_size or (exhausted and not window)):
                self._run_batch(writer)
        self._run_batch(writer)  # the last partial batch, or the one in progress when stopped
        self.model_thread.wait()
        self._emit(writer)

    def _take(self, p: Prepared, progress: ScanProgress) -> None:
        if p.skip:
            self.not_images += 1
            progress.advance(1)
            return
        self.pending.append(p)
        if p.image is not None:
            self.batch.append(p)
            self.batch_pixels += p.image.shape[1] * p.image.shape[2]
        elif p.encoded is not None:  # decoded by the loader with its batch
            self.batch.append(p)
            self.batch_pixels += p.width * p.height

    def _run_batch(self, writer: _Writer) -> None:
        """Decode the batch (GPU loaders) and hand it to the model thread; write what is finished."""
        batch, self.batch, self.batch_pixels = self.batch, [], 0
        if batch and self.loader is not None:
            batch = self.loader.load(batch)  # files it cannot decode have their error records now
        if batch:
            self.model_thread.submit(batch)  # returns once the batch before it is scored
        self._emit(writer)

    def _emit(self, writer: _Writer) -> None:
        """Hand the leading finished records to the writer, in order."""
        done = 0
        for p in self.pending:
            if p.record is None:
                break
            done += 1
        if not done:
            return
        records = [p.record for p in self.pending[:done]]
        del self.pending[:done]
        for record in records:
            if record["error"] is not None:
                self.kinds[record["error"]["kind"]] += 1
        self.scanned += len(records)
        writer.put(records)


def set_threads(intra_op: int | None) -> None:
    """Torch intra-op threads; None leaves torch's choice (one per core)."""
    if intra_op:
        torch.set_num_threads(intra_op)
