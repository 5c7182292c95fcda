"""bench/carry.py: what a device call can carry beside the working tree (the files git tracks and the
untracked ones it does not ignore)."""

from __future__ import annotations

import subprocess

import pytest

from bench.carry import CARRY_LIMIT, MARGIN, carry_room_bytes, working_tree_bytes


def _repo(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("ignored/\n")
    return tmp_path


def test_the_tree_counts_tracked_and_untracked_files_not_ignored_ones(tmp_path):
    repo = _repo(tmp_path)
    (repo / "tracked.bin").write_bytes(bytes(3000))
    subprocess.run(["git", "add", "tracked.bin"], cwd=repo, check=True)
    (repo / "sub").mkdir()
    (repo / "sub" / "new.bin").write_bytes(bytes(500))
    (repo / "ignored").mkdir()
    (repo / "ignored" / "part-00").write_bytes(bytes(10_000))
    tree = 3000 + 500 + len("ignored/\n")  # the .gitignore is untracked and counts too
    assert working_tree_bytes(repo) == tree
    assert carry_room_bytes(repo) == CARRY_LIMIT - tree - MARGIN


def test_a_tree_that_leaves_no_room_is_refused(tmp_path):
    repo = _repo(tmp_path)
    (repo / "weights.bin").write_bytes(bytes(CARRY_LIMIT - 2 * MARGIN + 1))
    with pytest.raises(SystemExit, match="no room for a part"):
        carry_room_bytes(repo)
