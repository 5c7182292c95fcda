"""`scanner run --ray`: the same scan as a Ray Data pipeline over a cluster (docs/design.md, "Scale-out").

    driver: iter_sources -> resume/dedupe (IdSet) -> chunks of items -> ray.put -> bounded queue
    Ray:    read (queue -> blocks) -> map_batches(_Infer, actor pool): prepare() on a thread pool,
            BatchRunner on the model; one model per actor, num_gpus=1 each when the cluster has GPUs
    driver: records -> whole JSONL parts + manifest (scanner.distributed.parts)

How items stream in: the driver enumerates the sources lazily (the same `scanner.sources.iter_sources`
as a local scan) on a thread, drops ids already done, packs up to 64 items (or 64 MB of archive
members) into an Arrow table, `ray.put`s it and hands the reference to a bounded
`ray.util.queue.Queue`. The dataset's source is a custom Datasource whose read task takes references
from the queue and yields them as blocks until the end marker. When the actors fall behind, Ray
Data's backpressure pauses the read task, the queue fills and the driver's enumeration blocks: a
listing of ten million files is never held anywhere, only a few chunks. (`from_items` per chunk,
unioned, would need every chunk before execution starts.)

One long-lived read task means one thing to know: Ray Data merges the small blocks a task yields
until they reach the dataset's `target_max_block_size` (128 MiB by default, about a million paths).
The scan sets it to FEED_BLOCK_BYTES for its dataset, so a block is a few hundred items at most and
work spreads over every actor from the start; the only other blocks, records, are small anyway.

Decoding happens in the actors, on `workers` threads that overlap with inference (as in a local
scan), so pixels never travel between processes: a block carries paths, URLs and archive member
bytes, which are far smaller than the decoded images.

Where bytes are read: archives (tar/zip members) are read on the driver and travel as bytes in the
`data` column; local paths travel as absolute paths and URLs as URLs, read by the actors, so local
inputs must be on a filesystem every node mounts at the same path (or be URLs). Records come back to
the driver, which alone writes the output directory: parts appear only while it holds the lock.

Ray is imported lazily: importing scanner never needs it (`pip install 'glff-scanner[dist]'`). Torch is
imported lazily too, so the read task and the queue actor start in a fraction of a second.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from scanner.distributed.parts import PartDir
from scanner.errors import MissingPackageError, ScannerError, is_transient
from scanner.scan.idset import IdSet
from scanner.scan.progress import ScanProgress
from scanner.scan.results import dumps
from scanner.sources import Item, iter_sources

if TYPE_CHECKING:  # torch: imported where the work is done, not where items are only moved
    from scanner.scan.pipeline import ScanOptions
    from scanner.scan.prepare import DecodeOptions, Prepared

log = logging.getLogger(__name__)

CHUNK_ITEMS = 64  # items per queue message
CHUNK_BYTES = 64 << 20  # ... or archive member bytes per message
QUEUE_CHUNKS = 8  # messages waiting between the driver and the read task (the feed's backpressure)
FEED_BLOCK_BYTES = 32 << 10  # the dataset's block size: ~100-300 paths, or one archive member
CALL_BATCHES = 4  # inference batches per actor call: decoding the next overlaps scoring this one
PART_SIZE = 4096  # records per part
PART_SECONDS = 60.0  # ... or whatever arrived in this long, so a slow scan still commits often
MANIFEST_SECONDS = 30.0
_END = None  # the queue's end marker


def require_ray():
    """The ray module, or a ScannerError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingPackageError("the distributed scan (--ray) needs Ray Data, which is not installed: "
                                  "pip install 'glff-scanner[dist]'") from None
    return ray


@dataclass
class DistributedSummary:
    """scanner.scan.pipeline.ScanSummary's fields (the CLI prints either), and where the parts went."""

    scanned: int  # records written by this run
    errors: int  # of which error records
    skipped_done: int  # items already in a part (resume) or given twice
    not_images: int
    seconds: float
    images_per_s: float
    interrupted: bool = False
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    transient: int = 0  # of the errors, transient ones (`io`): the next run tries these ids again
    retried: int = 0  # items scanned again because their earlier record was a transient error
    output: dict = field(default_factory=dict)  # the output's final view (scanner.scan.final_view)
    out_dir: str = ""
    model: str = ""  # model id
    run: str = ""  # this run's id (in its part names)
    parts: int = 0  # parts written by this run
    unfinished: int = 0  # items handed to Ray that got no record (interrupted, or a worker lost them)
    actors: int = 0

    def to_json(self) -> dict:
        return asdict(self)


# -- the feed: items -> Arrow chunks -> queue (driver) -> blocks (read task) -------------------------

def _enc(text: str | None) -> bytes | None:
    # Ids and paths of file names that are not valid UTF-8 hold lone surrogates; Arrow strings would
    # refuse them, so they travel as bytes (lossless both ways).
    return None if text is None else text.encode("utf-8", "surrogatepass")


def _dec(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", "surrogatepass")


def _items_table(items: list[Item]):
    """Arrow table of items: id, path (absolute: workers have another cwd), url, data (bytes of archive
    members), error_kind, error_message."""
    import pyarrow as pa

    return pa.table({
        "id": pa.array([_enc(i.id) for i in items], pa.binary()),
        "path": pa.array([_enc(os.path.abspath(i.path)) if i.path is not None else None for i in items], pa.binary()),
        "url": pa.array([_enc(i.url) for i in items], pa.binary()),
        "data": pa.array([i.data for i in items], pa.large_binary()),
        "error_kind": pa.array([i.error[0] if i.error else None for i in items], pa.string()),
        "error_message": pa.array([_enc(i.error[1]) if i.error else None for i in items], pa.binary()),
    })


def _table_items(table) -> list[Item]:
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    return [
        Item(_dec(id_), path=_dec(path), url=_dec(url), data=data,
             error=(kind, _dec(message)) if kind is not None else None)
        for id_, path, url, data, kind, message in zip(cols["id"], cols["path"], cols["url"], cols["data"],
                                                       cols["error_kind"], cols["error_message"])
    ]


class _Feeder:
    """Enumerates on a driver thread; new items go to the queue in chunks. Owns `done` from the start:
    the ids of existing parts (resume) plus every id it hands out (an item given twice goes once)."""

    def __init__(self, ray, queue, items: Iterator[Item], done: IdSet, progress: ScanProgress,
                 retry_ids: frozenset = frozenset()):
        self._ray = ray
        self._queue = queue
        self._items = items
        self._done = done
        self._retry_ids = retry_ids  # ids whose earlier record was transient: counted when taken again
        self._progress = progress
        self._closed = threading.Event()
        self.fed = 0
        self.skipped_done = 0
        self.retried = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="scan-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            chunk: list[Item] = []
            size = 0
            while group := list(itertools.islice(self._items, CHUNK_ITEMS)):
                new = self._done.add_new([item.id for item in group])
                skipped = new.count(False)
                if skipped:
                    self.skipped_done += skipped
                    self._progress.advance(skipped)  # resumed items count towards the total
                for item in itertools.compress(group, new):
                    if self._retry_ids and item.id in self._retry_ids:
                        self.retried += 1
                    chunk.append(item)
                    size += len(item.data or b"")
                    if len(chunk) >= CHUNK_ITEMS or size >= CHUNK_BYTES:
                        if not self._send(chunk):
                            return
                        chunk, size = [], 0
            if chunk and not self._send(chunk):
                return
        except BaseException as exc:  # noqa: BLE001 - raised on the driver's main thread after the run
            self.error = exc
        self._put(_END)

    def _send(self, chunk: list[Item]) -> bool:
        # In a list, so the queue actor keeps the reference instead of resolving it.
        if not self._put([self._ray.put(_items_table(chunk))]):
            return False
        self.fed += len(chunk)
        return True

    def _put(self, value) -> bool:
        from ray.util.queue import Full

        while not self._closed.is_set():
            try:
                self._queue.put(value, timeout=0.5)
                return True
            except Full:
                continue
        return False

    def close(self) -> None:
        self._closed.set()
        self._thread.join()


def _read_chunks(queue) -> Iterator:
    """The read task's blocks: chunks from the queue until the end marker (put back, in case Ray runs
    another read task)."""
    import ray

    while True:
        message = queue.get(block=True)
        if message is _END:
            queue.put(_END)
            return
        yield ray.get(message[0])


def _block_metadata():
    from ray.data.block import BlockMetadata

    fields = {"num_rows": None, "size_bytes": None, "input_files": None, "exec_stats": None}
    if "schema" in inspect.signature(BlockMetadata).parameters:  # older Ray
        fields["schema"] = None
    return BlockMetadata(**fields)


def _items_datasource(queue):
    """A Datasource with one read task that streams the queue's chunks (their number is not known)."""
    from ray.data import Datasource, ReadTask

    class ScanItems(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, **kwargs):
            return [ReadTask(functools.partial(_read_chunks, queue), _block_metadata())]

    return ScanItems()


# -- the actors: decode + score -------------------------------------------------------------------------

class _Infer:
    """One model per actor (scanner.backends.load_backend), fed by prepare() on `workers` threads (0:
    on this thread) and run by the same BatchRunner as a local scan, `batch_size` images at a time.
    Out: the record of every item (a JSON line), its id and error kind, or a skip."""

    def __init__(self, backend: str, model_path, engines_dir, threads: int | None, model_id: str, threshold: float,
                 decode_options: DecodeOptions, batch_size: int, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        from scanner.backends import load_backend
        from scanner.scan.inference import BatchRunner

        # A user error here (no GPU for tensorrt, other weights) is raised by the first call instead: Ray
        # reports a failed constructor as a dead actor, losing the message's type; a failed call keeps it.
        self.error: ScannerError | None = None
        try:
            model, info = load_backend(backend, model_path, threads=threads, engines_dir=engines_dir)
            if info.model_id != model_id:
                raise ScannerError(f"a worker loaded model {info.model_id!r} from {str(model_path)!r}, the driver "
                                   f"{model_id!r}: the file differs between nodes; give every node the same weights")
        except ScannerError as exc:
            self.error = exc
        else:
            model.eval()
            self.runner = BatchRunner(model, model_id, threshold)
        self.model_id = model_id
        self.decode_options = decode_options
        self.batch_size = batch_size
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="scan-decode") if workers else None

    def _prepared(self, items: list[Item]) -> Iterator[Prepared]:
        """prepare() of each item, in order; with a pool at most batch_size + 2 * workers decoded ahead
        (decoded pixels are the memory that matters)."""
        from scanner.scan.prepare import prepare

        if self.pool is None:
            for item in items:
                yield prepare(item, self.model_id, self.decode_options)
            return
        window: deque = deque()
        pending = iter(items)
        for item in itertools.islice(pending, self.batch_size + 2 * self.workers):
            window.append(self.pool.submit(prepare, item, self.model_id, self.decode_options))
        while window:
            done = window.popleft().result()
            for item in itertools.islice(pending, 1):
                window.append(self.pool.submit(prepare, item, self.model_id, self.decode_options))
            yield done

    def __call__(self, table):
        import pyarrow as pa

        from scanner.scan.pipeline import BATCH_PIXEL_BUDGET

        if self.error is not None:
            raise self.error
        prepared: list[Prepared] = []
        batch: list[Prepared] = []
        pixels = 0
        for p in self._prepared(_table_items(table)):
            prepared.append(p)
            if p.image is None:
                continue
            batch.append(p)
            pixels += p.image.shape[1] * p.image.shape[2]
            if len(batch) >= self.batch_size or pixels >= BATCH_PIXEL_BUDGET:  # huge images run early, as locally
                self.runner.run(batch)
                batch, pixels = [], 0
        if batch:
            self.runner.run(batch)
        records = [p.record for p in prepared]
        return pa.table({
            "record": pa.array([dumps(r) if r is not None else None for r in records], pa.string()),
            "id": pa.array([_enc(p.item.id) for p in prepared], pa.binary()),
            "error_kind": pa.array([r["error"]["kind"] if r is not None and r["error"] else None for r in records],
                                   pa.string()),
            "skip": pa.array([p.skip for p in prepared], pa.bool_()),
        })


# -- the driver ---------------------------------------------------------------------------------------

def _model_info(model_path):
    """The model's id and threshold, read on the driver without loading it (workers load it)."""
    from scanner.backends.export import info_from_export, is_export_dir
    from scanner.model.weights import read_info

    return info_from_export(model_path) if is_export_dir(model_path) else read_info(model_path)


@contextmanager
def _ray_session(ray, address: str | None):
    """Attach to Ray (an address, `auto`) or start a local one (None or `local`); shut down only what
    this call started. A session already initialised by the caller is used as it is."""
    if ray.is_initialized():
        yield
        return
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=None if address in (None, "local") else address, include_dashboard=False,
                 logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise ScannerError(f"cannot reach a Ray cluster at {address!r} ({exc}); start one with `ray start --head`, "
                           f"pass its address (--ray HEAD:6379), or --ray alone for a local Ray") from None
    if main and sigterm is not None:
        # ray.init makes SIGTERM exit at once; the caller's handler (the CLI's: finish the current
        # part, exit 143) stays in charge.
        signal.signal(signal.SIGTERM, sigterm)
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _data_context(ray):
    """The scan's Ray Data settings (FEED_BLOCK_BYTES blocks; no Ray progress bars or per-dataset INFO
    lines: ScanProgress reports on the whole scan), restored afterwards."""
    ctx = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    settings = {"target_max_block_size": FEED_BLOCK_BYTES, "enable_progress_bars": False,
                # a ScannerError from an actor reaches the driver as itself, not as "UDF failed"
                "raise_original_map_exception": True}
    settings = {name: value for name, value in settings.items() if hasattr(ctx, name)}  # Ray versions differ
    saved = {name: getattr(ctx, name) for name in settings}, logger.level
    for name, value in settings.items():
        setattr(ctx, name, value)
    logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for name, value in saved[0].items():
            setattr(ctx, name, value)
        logger.setLevel(saved[1])


def _read_kwargs(ray) -> dict:
    """The read task only waits on the queue: no CPU for it, and no splitting of its output (Ray splits
    each read task's blocks to reach 200 read blocks unless told how many to expect)."""
    params = inspect.signature(ray.data.read_datasource).parameters
    kwargs = {"num_cpus": 0} if "num_cpus" in params else {"ray_remote_args": {"num_cpus": 0}}
    kwargs["override_num_blocks" if "override_num_blocks" in params else "parallelism"] = 1
    return kwargs


def _node_resources(ray) -> list[dict]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def actor_layout(nodes: list[dict], actors: int | None, actor_cpus: int | None) -> tuple[int, int, dict]:
    """(GPUs in the cluster, inference actors, each actor's resources) for the alive nodes' resources.

    With GPUs: one actor per GPU, num_gpus=1 and `actor_cpus` CPUs for its decode threads (default:
    the CPUs per GPU of the leanest GPU node, at most 8). Without: actors of `actor_cpus` CPUs
    (default min(4, the smallest node's CPUs): torch scales well to about 4 intra-op threads, and an
    actor must fit on a node), as many as fit on the nodes.
    """
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1]
    if gpu_nodes:
        gpus = sum(int(n["GPU"]) for n in gpu_nodes)
        cpus = actor_cpus or max(1, min(8, min(int(n.get("CPU", 0) // n["GPU"]) for n in gpu_nodes)))
        return gpus, actors or gpus, {"num_gpus": 1, "num_cpus": cpus}
    node_cpus = [int(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) >= 1] or [1]
    cpus = actor_cpus or min(4, min(node_cpus))
    return 0, actors or max(1, sum(c // cpus for c in node_cpus)), {"num_cpus": cpus}


def _user_error(exc: BaseException) -> ScannerError | None:
    """A ScannerError raised on a worker (e.g. no GPU for tensorrt), unwrapped from Ray's RayTaskError
    (an instance of it too, whose message is the remote traceback; `.cause` is the original)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(exc, ScannerError) and not isinstance(cause, ScannerError):
            return exc
        exc = cause or exc.__cause__ or exc.__context__
    return None


def scan_ray(inputs, out_dir, *, from_list: str | None = None, address: str | None = None, model_path=None,
             backend: str = "auto", engines_dir=None, options: ScanOptions | None = None, actors: int | None = None,
             actor_cpus: int | None = None, threads: int | None = None, part_size: int = PART_SIZE,
             part_seconds: float = PART_SECONDS, console=None, stop: threading.Event | None = None,
             total: int | None = None, on_part=None, preflight: bool = True) -> DistributedSummary:
    """Scan `inputs` (and `from_list`) on a Ray cluster into the directory `out_dir` (scanner.distributed.parts).

    address: None or "local" starts a local Ray (unless one is initialised already), "auto" attaches
    to the cluster this node belongs to, "ray://HOST:10001" connects a client. model_path: weights
    (default: the shipped model) at a path every worker can read. actors, actor_cpus: models running
    at once and the CPUs each reserves (see actor_layout). threads: torch intra-op threads per actor
    (default: a CPU actor's CPUs). options.workers: decode threads per actor (default: a GPU actor's
    CPUs, 1 beside a CPU model; 0: decode between batches). Records are committed in parts of
    `part_size` (or what arrived in `part_seconds`); `on_part(name, records)` is called after each.
    `stop` (an Event) ends the run after the records received so far are written, like SIGINT.
    Rerunning with the same `out_dir` resumes (ids whose final record is a transient error are scanned
    again); options.force starts over. Optional packages the inputs need are checked first
    (scanner.scan.preflight; preflight=False: the caller has checked).
    """
    from scanner.backends import CHOICES
    from scanner.scan.pipeline import ScanOptions, default_batch_size

    ray = require_ray()
    options = options or ScanOptions()
    options.validate()
    if getattr(options, "loader", "cpu") in ("dali", "nvjpeg"):
        log.info("the distributed scan decodes on CPU threads in its actors; the %s loader is not used", options.loader)
    if options.fmt != "jsonl":
        raise ScannerError("a distributed scan writes JSONL parts; for Parquet run `scanner merge OUT_DIR --out "
                           "results.parquet` afterwards")
    if part_size < 1:
        raise ScannerError(f"part size is {part_size}; expected a positive number of records")
    if backend not in CHOICES:
        raise ScannerError(f"unknown backend {backend!r}; expected one of {', '.join(CHOICES)}")
    info = _model_info(model_path)
    threshold = info.threshold if options.threshold is None else float(options.threshold)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(i) for i in inputs]
    if preflight:
        from scanner.scan.preflight import check_optional_packages

        check_optional_packages(inputs, from_list, fmt=options.fmt, ray=True)  # actors decode on CPUs
    items = iter_sources(inputs, from_list=from_list, max_bytes=options.decode.max_bytes,
                         retry=options.retry)  # validates now
    model_path = os.path.abspath(info.path) if model_path is not None else None
    engines_dir = os.path.abspath(engines_dir) if engines_dir is not None else None
    stop = stop or threading.Event()
    # Locked before Ray starts, so a second driver on the same directory fails in a second.
    parts = PartDir(os.fspath(out_dir), info.model_id, inputs=inputs, from_list=from_list, force=options.force).open()
    try:
        with _ray_session(ray, address), _data_context(ray):
            gpus, actors, resources = actor_layout(_node_resources(ray), actors, actor_cpus)
            workers = options.workers if options.workers is not None else (resources["num_cpus"] if gpus else 1)
            log.info("ray: %d inference actor(s), each with %s and %d decode thread(s)", actors, resources, workers)
            actor_args = {"backend": backend, "model_path": model_path, "engines_dir": engines_dir,
                          "threads": threads or (None if gpus else resources["num_cpus"]),
                          "model_id": info.model_id, "threshold": threshold, "decode_options": options.decode,
                          "batch_size": options.batch_size or default_batch_size("cuda" if gpus else None),
                          "workers": workers}
            summary = _Driver(ray, parts, stop, part_size, part_seconds, on_part).run(
                items, console, total, actors=actors, resources=resources, actor_args=actor_args)
    except BaseException:
        parts.close(interrupted=True)  # the manifest says this run did not finish; its parts stay
        raise
    parts.close(interrupted=summary.interrupted)
    return summary


class _Driver:
    """Builds the dataset, consumes its records on the driver and commits them as parts."""

    def __init__(self, ray, parts: PartDir, stop: threading.Event, part_size: int, part_seconds: float, on_part):
        self.ray = ray
        self.parts = parts
        self.stop = stop
        self.part_size = part_size
        self.part_seconds = part_seconds
        self.on_part = on_part
        self.lines: list[str] = []
        self.kinds: Counter = Counter()
        self.received = 0  # items with an outcome (record or skip)
        self.not_images = 0
        self.new_parts = 0
        self._last_commit = self._last_manifest = time.monotonic()

    def _dataset(self, queue, actors: int, resources: dict, actor_args: dict):
        from ray.data import ActorPoolStrategy

        ds = self.ray.data.read_datasource(_items_datasource(queue), **_read_kwargs(self.ray))
        # A call takes CALL_BATCHES inference batches (Ray bundles small blocks up to it), so decoding
        # the next batch overlaps scoring this one, and archive members (a block each) batch together.
        return ds.map_batches(_Infer, batch_format="pyarrow", batch_size=CALL_BATCHES * actor_args["batch_size"],
                              compute=ActorPoolStrategy(size=actors), fn_constructor_kwargs=actor_args, **resources)

    def run(self, items, console, total, *, actors: int, resources: dict, actor_args: dict) -> DistributedSummary:
        from ray.util.queue import Queue

        start = time.perf_counter()
        progress = ScanProgress(console, total)
        queue = Queue(maxsize=QUEUE_CHUNKS, actor_options=self._queue_placement())
        feeder = _Feeder(self.ray, queue, items, self.parts.done, progress, self.parts.retry_ids)
        batches = None
        try:
            batches = iter(self._dataset(queue, actors, resources, actor_args).iter_batches(
                batch_size=None, batch_format="pyarrow"))
            for batch in batches:
                self._take(batch, progress)
                if self.stop.is_set():
                    break
        except Exception as exc:
            user = _user_error(exc)
            if user is not None and user is not exc:
                raise user from exc  # one line at the CLI, with its exit code
            raise
        finally:
            if batches is not None and hasattr(batches, "close"):
                batches.close()  # shuts Ray Data's executor down when we stop early
            feeder.close()
            self._commit(force=True)  # everything received is written, even when the run fails
            progress.close()
            queue.shutdown(force=True)
        if feeder.error is not None:
            raise feeder.error
        seconds = time.perf_counter() - start
        written = self.parts.written
        unfinished = feeder.fed - self.received
        if unfinished and not self.stop.is_set():
            log.warning("%d items got no record (a worker was lost?); rerun with the same --out to scan them",
                        unfinished)
        return DistributedSummary(
            written, sum(self.kinds.values()), feeder.skipped_done, self.not_images, seconds,
            written / seconds if seconds > 0 else 0.0, self.stop.is_set(), dict(self.kinds),
            transient=sum(n for kind, n in self.kinds.items() if is_transient(kind)), retried=feeder.retried,
            output=self.parts.state.summary(), out_dir=self.parts.path, model=self.parts.model_id, run=self.parts.run_id, parts=self.new_parts,
            unfinished=unfinished, actors=actors)

    def _queue_placement(self) -> dict:
        # The queue actor beside the driver (it relays only references) and on no CPU.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = self.ray.get_runtime_context().get_node_id()
        return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)}

    def _take(self, batch, progress: ScanProgress) -> None:
        records = batch.column("record").to_pylist()
        ids = batch.column("id").to_pylist()
        kinds = batch.column("error_kind").to_pylist()
        skips = batch.column("skip").to_pylist()
        errors = 0
        for record, record_id, kind, skip in zip(records, ids, kinds, skips):
            self.received += 1
            if skip:
                self.not_images += 1
                continue
            self.lines.append(record)
            self.parts.state.add(_dec(record_id), kind, mark_done=False)  # the run's final view, for the summary
            if kind is not None:
                self.kinds[kind] += 1
                errors += 1
        progress.advance(len(records), errors)
        self._commit()

    def _commit(self, force: bool = False) -> None:
        """Parts of part_size records; a smaller one when part_seconds have passed or at the end."""
        now = time.monotonic()
        due = force or now - self._last_commit >= self.part_seconds
        while self.lines and (len(self.lines) >= self.part_size or due):
            lines, self.lines = self.lines[:self.part_size], self.lines[self.part_size:]
            name = self.parts.commit(lines)
            self.new_parts += 1
            self._last_commit = now
            if self.on_part is not None:
                self.on_part(name, len(lines))
        if now - self._last_manifest >= MANIFEST_SECONDS:
            self.parts.write_manifest()
            self._last_manifest = now
