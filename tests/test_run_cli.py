"""`scanner run` as cron runs it: exit codes, summary, lock, signals, and SIGKILL at random points."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from scanner import cli
from scanner.config import ModelConfig
from scanner.model.detector import Detector
from scanner.model.weights import save_detector
from scanner.scan.store import OutputLock

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 36


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_detector(Detector(ModelConfig(backbone="tiny"), seed=0), path, name="tiny", threshold=0.5)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """N_IMAGES images of mixed sizes, two broken files and one non-image, in two folders."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for i in range(N_IMAGES):
        w, h = int(rng.integers(200, 700)), int(rng.integers(200, 700))
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "readme.txt").write_text("not an image\n")
    return root


def run_cli(args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", "run", "--backend", "torch", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def records(path: Path) -> list[dict]:
    if not path.exists():  # killed during start-up, before the output was created
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(images, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    result = CliRunner().invoke(cli.main, ["run", "--backend", "torch", str(images), "--out", str(out), "--model", str(weights),
                                           "--batch-size", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    return records(out)


def assert_same_results(got: list[dict], want: list[dict]) -> None:
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)), "an id was written twice"
    assert sorted(ids) == sorted(r["id"] for r in want), "an id was lost"
    by_id = {r["id"]: r for r in got}
    for r in want:
        g = by_id[r["id"]]
        assert g["sha256"] == r["sha256"] and g["error"] == r["error"] and g["patches"] == r["patches"]
        if r["score"] is not None:
            # Resumed batches are composed differently; the backbone's kernels may round differently
            # by batch size, at the 1e-7 level (see test_scan.test_batch_size_does_not_change_scores).
            assert abs(g["score"] - r["score"]) <= 1e-5, r["id"]


def test_reference_run(reference):
    assert len(reference) == N_IMAGES + 2  # the text file is skipped
    assert sum(r["error"] is not None for r in reference) == 2


def test_sigkill_at_random_points_then_resume(images, weights, reference, tmp_path):
    out = tmp_path / "r.jsonl"
    rng = random.Random(7)
    args = [images, "--out", out, "--model", weights, "--batch-size", "2", "--quiet"]
    kills = 0
    for attempt in range(5):
        before = lines(out)
        proc = run_cli(args)
        # Alternate between killing after a random delay (also during start-up) and after a random
        # number of new lines (mid-scan, between or during writes).
        if attempt % 2 == 0:
            deadline = time.monotonic() + rng.uniform(0.5, 6.0)
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
        else:
            target = before + rng.randint(1, 8)
            while lines(out) < target and proc.poll() is None:
                time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
        for record in records(out):  # every line on disk is a whole record, after every kill
            assert record["schema"] == 1
    assert kills >= 3, "the scan finished before it could be killed; make the corpus bigger"
    final = run_cli(args)
    _, err = final.communicate()
    assert final.returncode == 0, err
    assert_same_results(records(out), reference)
    assert not Path(str(out) + ".lock").exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_batch_and_exits_cleanly(images, weights, reference, tmp_path, sig, code):
    out = tmp_path / "r.jsonl"
    summary = tmp_path / "summary.json"
    args = [images, "--out", out, "--model", weights, "--batch-size", "1", "--workers", "1", "--quiet"]
    proc = run_cli([*args, "--summary-json", summary])
    while lines(out) < 3 and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the scan finished before the signal"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "finishing the current batch" in err and "rerun the same command to resume" in err
    partial = records(out)
    assert 3 <= len(partial) < len(reference)
    assert json.loads(summary.read_text())["interrupted"] is True
    resumed = run_cli(args)
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert f"skipped {len(partial)} already done" in err
    assert_same_results(records(out), reference)


def test_exit_codes_summary_and_lock(images, weights, reference, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.jsonl"
    summary = tmp_path / "s" / "summary.json"
    base = [str(images), "--out", str(out), "--model", str(weights), "--quiet", "--backend", "torch"]
    result = runner.invoke(cli.main, ["run", *base, "--max-errors", "1", "--summary-json", str(summary)])
    assert result.exit_code == 3, result.output  # done, but 2 errors > 1
    assert "more than --max-errors 1" in result.output
    payload = json.loads(summary.read_text())
    assert payload["scanned"] == len(reference) and payload["errors"] == 2 and payload["not_images"] == 1
    assert payload["errors_by_kind"] == {"decode": 1, "not_image": 1}
    assert payload["interrupted"] is False and payload["out"] == str(out)

    again = runner.invoke(cli.main, ["run", *base, "--max-errors", "2"])  # resumes: nothing new, no errors
    assert again.exit_code == 0, again.output
    assert f"skipped {len(reference)} already done" in again.output and "scanned 0 files" in again.output

    lock = OutputLock(str(out))
    lock.acquire()
    try:
        locked = runner.invoke(cli.main, ["run", *base])
    finally:
        lock.release()
    assert locked.exit_code == 4 and "another scan" in locked.output

    assert runner.invoke(cli.main, ["run", "--out", str(out)]).exit_code == 2  # nothing to scan
    assert runner.invoke(cli.main, ["run", *base, "--batch-size", "0"]).exit_code == 2
    assert runner.invoke(cli.main, ["run", *base, "--format", "csv"]).exit_code == 2


def test_from_list_on_stdin_and_parquet(images, weights, reference, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
    listed = sorted(str(p) for p in images.rglob("*.png"))[:5]
    out = tmp_path / "r.parquet"
    result = CliRunner().invoke(
        cli.main, ["run", "--backend", "torch", "--from-list", "-", "--out", str(out), "--model", str(weights), "--format", "parquet",
                   "--quiet"], input="\n".join(listed) + "\n# a comment\n\n")
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in rows) == listed
    want = {r["id"]: r for r in reference}
    assert_same_results(rows, [want[i] for i in listed])
    assert not os.path.exists(str(out) + ".journal.jsonl")
