"""Pack the labelled pools into tar parts small enough to carry to a GPU machine one call at a time.

    python research/pack_pools.py --data DATA_DIR/dev DATA_DIR/extra DATA_DIR/photoreal --out runs/carry

A lent GPU machine gets only what a call carries: the working tree (every tracked file, the shipped
weights included, about 48 MiB) and the paths named in `carry`, 64 MiB together. The three pools
are about 240 MiB, so they go over in parts, one call each, of at most what the tree leaves free
(--max-mib; by default 64 MiB less this checkout's tracked and untracked-not-ignored files, less
1 MiB). Each part holds whole files only, under <pool name>/<path in the pool>, so every part unpacks
on its own, in any order:

    tar -xf runs/carry/pools-01.tar -C /tmp/pools      (one call per part, carrying runs/carry/pools-01.tar)

and after the last one /tmp/pools/dev, /tmp/pools/extra and /tmp/pools/photoreal are the pools, each with
its MANIFEST.csv (STEPS=tuning bash bench/gpu_checks.sh reads them there). Nothing is compressed: the
images are JPEGs already. The images stay out of git (runs/ is ignored).
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.carry import carry_room_bytes  # noqa: E402


def pool_files(pools: list[Path]) -> list[tuple[Path, str]]:
    """(file, name in the tar) for every file under each pool, sorted; names start with the pool's folder name."""
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise SystemExit(f"two pools share a folder name: {names}")
    return [(f, f"{pool.name}/{f.relative_to(pool).as_posix()}")
            for pool in pools for f in sorted(pool.rglob("*")) if f.is_file()]


def pack(files: list[tuple[Path, str]], out: Path, max_bytes: int) -> list[Path]:
    """Tar parts of whole files, each at most max_bytes: a USTAR tar adds a 512-byte header a file, pads
    each file to 512 bytes and the archive to a 10,240-byte record, which the budget leaves room for."""
    out.mkdir(parents=True, exist_ok=True)
    budget = max_bytes - tarfile.RECORDSIZE
    parts: list[list[tuple[Path, str]]] = [[]]
    size = 1024  # the end-of-archive blocks
    for path, name in files:
        cost = 512 + -(-path.stat().st_size // 512) * 512
        if cost + 1024 > budget:
            raise SystemExit(f"{path} alone is over the part size")
        if parts[-1] and size + cost > budget:
            parts.append([])
            size = 1024
        parts[-1].append((path, name))
        size += cost
    written = []
    for i, part in enumerate(parts, start=1):
        target = out / f"pools-{i:02d}.tar"
        with tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as tar:
            for path, name in part:
                tar.add(path, arcname=name, recursive=False)
        if target.stat().st_size > max_bytes:  # cannot happen by the count above; checked all the same
            raise SystemExit(f"{target} is {target.stat().st_size} bytes, over {max_bytes}")
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="the pool folders")
    parser.add_argument("--out", default="runs/carry", help="where the parts go (keep it out of git)")
    parser.add_argument("--max-mib", type=float, default=None,
                        help="the most one part may hold; default: what one call carries beside the working tree")
    args = parser.parse_args(argv)
    if args.max_mib is None:
        args.max_mib = carry_room_bytes(Path(__file__).resolve().parents[1]) / 2**20
    files = pool_files([Path(d) for d in args.data])
    parts = pack(files, Path(args.out), int(args.max_mib * 2**20))
    for part in parts:
        print(f"{part}  {part.stat().st_size / 2**20:.1f} MiB")
    print(f"{len(files)} files in {len(parts)} parts of at most {args.max_mib:.1f} MiB; per part, one call "
          "carrying it: mkdir -p /tmp/pools && tar -xf PART -C /tmp/pools", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
