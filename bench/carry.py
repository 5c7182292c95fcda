"""How much one call to a lent GPU machine can carry beside the working tree, for the scripts that send
data there in parts, one call each (bench/dali_bundle.py, research/pack_pools.py).

A call carries 64 MiB in all: the working tree (the files git tracks, and the untracked ones it does not
ignore) and the ignored paths named in its `carry`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

CARRY_LIMIT = 64 << 20  # bytes a device call carries, the working tree included
MARGIN = 1 << 20


def working_tree_bytes(repo: Path) -> int:
    """The size of what travels with every call: git's tracked files and its untracked, not ignored ones."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            check=True, capture_output=True).stdout.split(b"\0")
    files = (repo / name.decode() for name in listed if name)
    return sum(path.stat().st_size for path in files if path.is_file())


def carry_room_bytes(repo: Path) -> int:
    """Bytes a call can carry beside `repo`'s working tree, less 1 MiB of margin; exits where that leaves
    less than 1 MiB (commit or ignore less)."""
    tree = working_tree_bytes(repo)
    room = CARRY_LIMIT - tree - MARGIN
    if room < MARGIN:
        raise SystemExit(f"the working tree takes {tree / 2**20:.1f} MiB of the {CARRY_LIMIT >> 20} MiB a device "
                         "call carries: no room for a part (commit or ignore less)")
    return room
