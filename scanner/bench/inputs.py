"""Images for `scanner bench`: a sample of a folder, or generated JPEGs of chosen sizes."""

from __future__ import annotations

import os
import random
from pathlib import Path

from scanner.errors import ScannerError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def folder_images(folder: Path, limit: int | None, seed: int = 0) -> list[Path]:
    """Up to `limit` image files under `folder` (by suffix), a seeded sample in sorted order."""
    if not folder.is_dir():
        raise ScannerError(f"{str(folder)!r} is not a directory")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ScannerError(f"no image files (by suffix: {', '.join(sorted(IMAGE_SUFFIXES))}) under {str(folder)!r}")
    if limit is not None and len(paths) > limit:
        paths = sorted(random.Random(seed).sample(paths, limit))
    return paths


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"640x480,1920x1080" -> [(640, 480), (1920, 1080)] as (width, height)."""
    sizes = []
    for part in text.split(","):
        try:
            w, h = (int(v) for v in part.lower().strip().split("x"))
        except ValueError:
            raise ScannerError(f"image size {part!r} is not WIDTHxHEIGHT (e.g. 640x480)") from None
        if not (1 <= w <= 20000 and 1 <= h <= 20000):
            raise ScannerError(f"image size {part!r} is out of range (1..20000 per side)")
        sizes.append((w, h))
    return sizes


def _write_one(args: tuple[Path, int, tuple[int, int], int, int]) -> Path:
    import numpy as np
    from PIL import Image

    folder, i, (w, h), seed, rotate_every = args
    rng = np.random.default_rng([seed, i])
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.random(3) * 6.28
    base = np.stack([127 + 100 * np.sin(x / (7 + 40 * rng.random()) + phase[0]),
                     127 + 100 * np.cos(y / (7 + 40 * rng.random()) + phase[1]),
                     (x + y) / (w + h) * 255], axis=-1)
    noise = rng.standard_normal(base.shape, dtype=np.float32) * (4 + 16 * rng.random())
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    path = folder / f"bench_{i:06d}_{w}x{h}.jpg"
    exif = Image.Exif()
    if rotate_every and i % rotate_every == 0:
        exif[0x0112] = 6  # EXIF "rotate 90": decoders must turn it upright
    image.save(path, quality=int(rng.integers(75, 96)), exif=exif)
    return path


def generate_images(folder: Path, count: int, sizes: list[tuple[int, int]], seed: int = 0,
                    rotate_every: int = 0) -> list[Path]:
    """`count` JPEGs (smooth patterns plus noise: realistic to decode, unlike flat colour), cycling
    through `sizes`, written in parallel into `folder`; with `rotate_every` N, every Nth carries an
    EXIF orientation of 6."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder, i, sizes[i % len(sizes)], seed, rotate_every) for i in range(count)]
    if count <= 16:
        return [_write_one(job) for job in jobs]
    with ProcessPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_write_one, jobs, chunksize=8))
