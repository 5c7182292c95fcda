"""`scanner samples`: real photographs to try the scanner on, with no download.

They are the photographs that ship inside the scikit-image wheel (skimage.data), written as JPEG
files. Grey ones are converted to RGB. Synthetic drawings in skimage.data (logo, colorwheel, text,
checkerboard, horse) are left out: every sample here is a real photograph or micrograph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scanner.errors import ScannerError

# skimage.data loaders whose files are inside the scikit-image package (no pooch download).
SAMPLES = (
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "moon",
    "coins",
    "brick",
    "grass",
    "gravel",
)
JPEG_QUALITY = 95


def _as_rgb(array: np.ndarray) -> np.ndarray:
    """(H, W) grey or (H, W, 3|4) -> (H, W, 3) uint8."""
    if array.dtype != np.uint8:
        array = np.clip(array.astype(np.float64) * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def write_samples(out_dir, names=SAMPLES) -> list[Path]:
    """Write the bundled photographs as <out_dir>/<name>.jpg; returns the paths written, in order."""
    try:
        import skimage.data
    except ImportError:
        raise ScannerError(
            "scikit-image is not installed, and the sample photographs come from it; "
            "run `pip install scikit-image` (or `pip install 'glff-scanner[samples]'`)"
        ) from None
    from PIL import Image

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ScannerError(f"{str(out)!r} exists and is not a directory; pass a directory for the samples")
    out.mkdir(parents=True, exist_ok=True)
    paths, failed = [], []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            failed.append(f"{name} (not in this scikit-image)")
            continue
        try:
            array = loader()
        except Exception as exc:  # noqa: BLE001 - e.g. a build without the data file; report below
            failed.append(f"{name} ({type(exc).__name__})")
            continue
        path = out / f"{name}.jpg"
        Image.fromarray(_as_rgb(np.asarray(array)), "RGB").save(path, "JPEG", quality=JPEG_QUALITY)
        paths.append(path)
    if not paths:
        raise ScannerError(
            f"none of the sample photographs could be loaded from scikit-image ({', '.join(failed)}); "
            "reinstall it with `pip install --force-reinstall scikit-image`"
        )
    return paths
