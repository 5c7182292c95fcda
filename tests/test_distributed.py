"""scan_ray (`scanner run --ray`) against the local scan on one local Ray instance: same records, whole
parts, resume without repeats, interruption, merge, lock."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'glff-scanner[dist]')")

import ray  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from scanner import cli  # noqa: E402
from scanner.config import ModelConfig  # noqa: E402
from scanner.distributed import ray_scan as distributed  # noqa: E402
from scanner.distributed.parts import MANIFEST, PartDir, list_parts, merge_parts  # noqa: E402
from scanner.distributed.ray_scan import actor_layout, scan_ray  # noqa: E402
from scanner.errors import LockedError, ScannerError  # noqa: E402
from scanner.model.detector import Detector  # noqa: E402
from scanner.model.weights import load_detector, save_detector  # noqa: E402
from scanner.scan.pipeline import ScanOptions, scan  # noqa: E402
from scanner.scan.results import iter_records  # noqa: E402
from tests.test_decode import encode, gradient  # noqa: E402

PART_SIZE = 8
# Ray Data's own deprecation notices, raised when it copies its context
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    # Two CPUs and no GPU (so the actors run the same CPU model as the local reference, also on a GPU
    # machine) on the loopback interface, no dashboard: one inference actor of two CPUs. Blocks of
    # about 1 KiB (a few items) and chunks of 8, so this small corpus streams in several blocks.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed, "CHUNK_ITEMS", 8)
        mp.setattr(distributed, "FEED_BLOCK_BYTES", 1024)
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """The inputs: a folder of 27 images in subfolders (one with a name that is not UTF-8), a truncated
    JPEG, a text file named like an image and one that is not (skipped); and a tar of three images
    and one broken member."""
    top = tmp_path_factory.mktemp("corpus")
    root = top / "images"
    for i in range(26):
        ext, fmt = (".jpg", "JPEG") if i % 3 else (".png", "PNG")
        path = root / f"d{i % 4}" / f"img{i:02d}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(gradient(60 + 13 * i, 240 - 5 * i).rotate(i * 29), fmt))
    with open(os.path.join(os.fsencode(root / "d0"), b"caf\xe9.jpg"), "wb") as fh:  # id with a surrogate
        fh.write(encode(gradient(77, 99), "JPEG"))
    (root / "d1" / "trunc.jpg").write_bytes(encode(gradient(256, 256), "JPEG")[:2000])
    (root / "d2" / "notes.jpg").write_bytes(b"not a picture\n")
    (root / "d3" / "readme.txt").write_text("skipped: not an image\n")
    members = {f"m{i}.jpg": encode(gradient(90 + 20 * i, 120).rotate(60 * i), "JPEG") for i in range(3)}
    members["bad.png"] = b"\x89PNG\r\n\x1a\n" + b"\0" * 40
    with tarfile.open(top / "pack.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return [str(root), str(top / "pack.tar")]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_detector(Detector(ModelConfig(backbone="tiny"), seed=0), path, name="tiny-dist", threshold=0.5)
    return path


@pytest.fixture(scope="module")
def local(corpus, weights, tmp_path_factory) -> dict[str, dict]:
    """The local scan's records by id: the reference."""
    model, info = load_detector(weights)
    out = tmp_path_factory.mktemp("local") / "results.jsonl"
    scan(corpus, out, model, info, options=ScanOptions(workers=0))
    records = {r["id"]: r for r in iter_records(out)}
    assert len(records) == 27 + 2 + 4
    return records


def dist(corpus, weights, out, **kw):
    kw.setdefault("part_size", PART_SIZE)
    return scan_ray(corpus, out, model_path=weights, backend="torch", threads=1, **kw)


def part_records(out: Path) -> list[dict]:
    """Every record of every part; asserts that no id is written twice."""
    records = [r for name in list_parts(str(out)) for r in iter_records(out / name)]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return records


def assert_same(records: list[dict], local: dict[str, dict]) -> None:
    got = {r["id"]: r for r in records}
    assert set(got) == set(local)
    for key, want in local.items():
        have = dict(got[key])
        if want["score"] is not None:
            # Batches differ from the local scan's, so float noise can flip the 6th decimal (rounded).
            assert abs(have.pop("score") - want["score"]) <= 2e-6, key
            want = {k: v for k, v in want.items() if k != "score"}
        assert have == want, key


@pytest.fixture(scope="module")
def scanned(corpus, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "out"
    return out, dist(corpus, weights, out, options=ScanOptions(batch_size=8))  # actor calls of 32 items


def test_same_records_as_the_local_scan(scanned, local):
    out, summary = scanned
    assert_same(part_records(out), local)
    errors = {}
    for r in local.values():
        if r["error"]:
            errors[r["error"]["kind"]] = errors.get(r["error"]["kind"], 0) + 1
    assert (summary.scanned, summary.not_images, summary.unfinished) == (len(local), 1, 0)
    assert summary.errors_by_kind == errors and summary.errors == sum(errors.values())
    assert not summary.interrupted and summary.parts == len(list_parts(str(out)))


def test_parts_and_manifest(scanned, local):
    out, summary = scanned
    manifest = json.loads((out / MANIFEST).read_text())
    names = list_parts(str(out))
    assert [p["name"] for p in manifest["parts"]] == names
    for part in manifest["parts"]:
        assert part["records"] == len((out / part["name"]).read_bytes().splitlines()) <= PART_SIZE
    assert manifest["records"] == len(local) and manifest["model"] == next(iter(local.values()))["model"]
    assert manifest["schema"] == 1 and manifest["inputs"] and manifest["ended"] >= manifest["started"]
    assert all(name.startswith(f"part-{summary.run}-") for name in names)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp") or n.endswith(".lock")]


def test_interrupted_run_then_resumed_from_the_cli(corpus, weights, local, tmp_path):
    out = tmp_path / "out"
    stop = threading.Event()
    first = dist(corpus, weights, out, stop=stop, on_part=lambda name, n: stop.set(), part_size=4,
                 options=ScanOptions(batch_size=4))  # actor calls of 16 items: the first part comes early
    assert first.interrupted and 0 < first.scanned < len(local)
    assert len(part_records(out)) == first.scanned
    names = list_parts(str(out))
    assert names  # one part or more, as the stop met the actors' calls (a loaded machine: often one)
    (out / names[0]).unlink()  # lost: scanned again; any other parts are kept: skipped
    kept = len(part_records(out))
    # `--ray` before the inputs: they are not taken for an address
    result = CliRunner().invoke(cli.main, ["run", "--ray", *corpus, "--out", str(out), "--model", str(weights),
                                           "--backend", "torch", "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"scanned {len(local) - kept} files" in result.output
    assert f"skipped {kept} already done and 1 not images" in result.output
    assert_same(part_records(out), local)
    merged = tmp_path / "merged.jsonl"
    result = CliRunner().invoke(cli.main, ["merge", str(out), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    assert_same(list(iter_records(merged)), local)
    runs = json.loads((out / MANIFEST).read_text())["runs"]
    assert [r["interrupted"] for r in runs] == [True, False]


def test_merge_jsonl_and_parquet(scanned, local, tmp_path):
    out = scanned[0]
    summary = merge_parts(out, tmp_path / "all.jsonl")
    assert (summary.records, summary.superseded) == (len(local), 0)
    assert_same(list(iter_records(tmp_path / "all.jsonl")), local)
    pq = pytest.importorskip("pyarrow.parquet")
    with pytest.raises(ScannerError, match="not valid UTF-8"):  # Arrow strings cannot hold the odd name
        merge_parts(out, tmp_path / "all.parquet")
    assert not (tmp_path / "all.parquet").exists() and not (tmp_path / "all.parquet.tmp").exists()
    utf8 = tmp_path / "utf8"
    shutil.copytree(out, utf8)
    for name in list_parts(str(utf8)):
        lines = (utf8 / name).read_text().splitlines(keepends=True)
        (utf8 / name).write_text("".join(line for line in lines if "\\udc" not in line))
    merge_parts(utf8, tmp_path / "all.parquet")
    rows = pq.read_table(tmp_path / "all.parquet").to_pylist()
    assert_same(rows, {k: v for k, v in local.items() if "\udce9" not in k})


def test_merge_drops_repeats_and_refuses_missing_parts(scanned, local, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(scanned[0], out)
    names = list_parts(str(out))
    shutil.copy(out / names[0], out / "part-99999999T000000-0000-000000.jsonl")  # a stray copy
    summary = merge_parts(out, tmp_path / "m.jsonl")
    assert summary.records == len(local) and summary.superseded > 0  # the stray copy is the later record
    assert_same(list(iter_records(tmp_path / "m.jsonl")), local)
    (out / names[-1]).unlink()
    with pytest.raises(ScannerError, match="missing"):
        merge_parts(out, tmp_path / "m2.jsonl")


def test_lock_and_bad_output(corpus, weights, tmp_path):
    out = tmp_path / "out"
    with PartDir(str(out), "tiny-dist@x"):
        with pytest.raises(LockedError):
            dist(corpus, weights, out)
    (tmp_path / "file.jsonl").write_text("")
    with pytest.raises(ScannerError, match="is a file"):
        dist(corpus, weights, tmp_path / "file.jsonl")
    with pytest.raises(ScannerError, match="scanner merge"):
        dist(corpus, weights, tmp_path / "p", options=ScanOptions(fmt="parquet"))


def test_actor_layout():
    assert actor_layout([{"CPU": 2}], None, None) == (0, 1, {"num_cpus": 2})
    assert actor_layout([{"CPU": 16}, {"CPU": 8}], None, None) == (0, 6, {"num_cpus": 4})
    assert actor_layout([{"CPU": 16}, {"CPU": 8}], 3, 2) == (0, 3, {"num_cpus": 2})
    gpu_nodes = [{"CPU": 16, "GPU": 2}, {"CPU": 8, "GPU": 4}, {"CPU": 32}]
    assert actor_layout(gpu_nodes, None, None) == (6, 6, {"num_gpus": 1, "num_cpus": 2})
    assert actor_layout(gpu_nodes[:1], None, None) == (2, 2, {"num_gpus": 1, "num_cpus": 8})


def test_transient_failures_are_retried_by_the_next_ray_run(weights, tmp_path):
    """The same rules under --ray: the actors retry reads, the next run scans the ids whose final record
    is transient, and merge writes one final record per id."""
    from scanner.scan.prepare import DecodeOptions
    from scanner.sources.retry import RetryPolicy
    from tests.flaky_http import FlakyServer

    files = {f"/{i}.jpg": encode(gradient(50 + 7 * i, 60), "JPEG") for i in range(6)}
    files["/dead.jpg"] = encode(gradient(70, 70), "JPEG")
    script = {"/0.jpg": ["503"] * 3, "/1.jpg": ["drop"] * 3, "/2.jpg": [("stall", 20)] * 2, "/3.jpg": ["429"] * 3,
              "/4.jpg": ["503"], "/dead.jpg": [("always", "500")]}
    with FlakyServer(files, script) as server:
        urls = [server.url(f"/{i}.jpg") for i in range(6)] + [server.url("/dead.jpg"), server.url("/gone.jpg")]
        listing = tmp_path / "urls.txt"
        listing.write_text("\n".join(urls) + "\n")
        out = tmp_path / "out"

        def run(retries: int):
            options = ScanOptions(batch_size=4, decode=DecodeOptions(retry=RetryPolicy(retries=retries, read_timeout=0.5)))
            return dist([], weights, out, from_list=str(listing), options=options)

        first = run(retries=1)  # 0-3 and dead.jpg fail for this run; 4.jpg's one 503 is retried
        assert (first.scanned, first.transient, first.errors_by_kind) == (8, 5, {"io": 5, "not_found": 1})
        second = run(retries=4)
        assert (second.scanned, second.retried, second.skipped_done, second.transient) == (5, 5, 3, 1)
        assert second.output == {"ids": 8, "scored": 6, "errors": 2, "errors_by_kind": {"io": 1, "not_found": 1},
                                 "transient": 1}
        assert server.requests["/gone.jpg"] == 1
    summary = merge_parts(out, tmp_path / "merged.jsonl")
    merged = {r["id"]: r for r in iter_records(tmp_path / "merged.jsonl")}
    assert (summary.records, summary.superseded) == (8, 5) and set(merged) == set(urls)
    assert all(merged[u]["score"] is not None for u in urls[:6])
    assert merged[urls[6]]["error"]["kind"] == "io" and merged[urls[7]]["error"]["kind"] == "not_found"
