"""Labelled image folders in the CNNDetection layout, and the training augmentation.

Layout: <root>/<source>/0_real/*, <root>/<source>/1_fake/* (or <root>/0_real, <root>/1_fake, whose
source is the root's name). An optional <root>/MANIFEST.csv maps sources to generator and family.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageFilter

from scanner.decoding.decode import read_and_decode
from scanner.errors import ScannerError

LABEL_DIRS = {"0_real": 0, "1_fake": 1}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 real, 1 synthetic
    source: str


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _roots(roots) -> list[Path]:
    """One data folder or several (pools in the same layout, e.g. dev/ extra/ photoreal/)."""
    return [Path(r) for r in ([roots] if isinstance(roots, (str, Path)) else roots)]


def find_samples(roots: str | Path | list) -> list[Sample]:
    """Every image of one data folder, or of several: their sources must have distinct names."""
    samples, seen = [], {}
    for root in _roots(roots):
        if not root.is_dir():
            raise ScannerError(f"data folder {str(root)!r} does not exist; expected <root>/<source>/0_real|1_fake/")
        found = _samples_under(root)
        if not found:
            raise ScannerError(f"no images found under {str(root)!r}; expected <root>/<source>/0_real|1_fake/ folders")
        for source in sorted({s.source for s in found}):
            if source in seen:
                raise ScannerError(f"source {source!r} is in both {seen[source]} and {root}; pools must not share "
                                   "source names")
            seen[source] = root
        samples += found
    return samples


def _samples_under(root: Path) -> list[Sample]:
    samples = []
    sources = [root] if any((root / d).is_dir() for d in LABEL_DIRS) else sorted(p for p in root.iterdir() if p.is_dir())
    for src in sources:
        for dirname, label in LABEL_DIRS.items():
            if (src / dirname).is_dir():
                samples += [Sample(p, label, src.name) for p in _images_under(src / dirname)]
    return samples


def read_manifest(roots: str | Path | list) -> dict[str, dict[str, str]]:
    """source -> {"generator": ..., "family": ...} from each folder's MANIFEST.csv (empty without one)."""
    out: dict[str, dict[str, str]] = {}
    for root in _roots(roots):
        path = root / "MANIFEST.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                out.setdefault(row["source"], {"generator": row.get("generator", ""), "family": row.get("family", "")})
    return out


def split_by_source(
    samples: list[Sample], val_sources: tuple[str, ...], real_only_share: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Whole sources in `val_sources` go to validation. Real-only sources are split by a fixed share
    (seeded), so fake-only validation sources have real images no training step has seen."""
    known = {s.source for s in samples}
    unknown = [v for v in val_sources if v not in known]
    if unknown:
        raise ScannerError(f"validation sources {unknown} not found; sources present: {sorted(known)}")
    labels_of: dict[str, set[int]] = {}
    for s in samples:
        labels_of.setdefault(s.source, set()).add(s.label)
    rng = random.Random(seed)
    train, val = [], []
    for source in sorted(labels_of):
        group = [s for s in samples if s.source == source]
        if source in val_sources:
            val += group
        elif labels_of[source] == {0} and real_only_share > 0:
            group = sorted(group, key=lambda s: str(s.path))
            rng.shuffle(group)
            cut = int(round(len(group) * real_only_share))
            val += group[:cut]
            train += group[cut:]
        else:
            train += group
    return train, val


@dataclass
class Augment:
    """Paper: blur sigma ~ U[0, sigma_max] with p_blur, JPEG quality ~ U{q0..q1} with p_jpeg, h-flip."""

    blur_prob: float = 0.1
    blur_sigma_max: float = 3.0
    jpeg_prob: float = 0.1
    jpeg_quality: tuple[int, int] = (30, 100)
    hflip: bool = True
    # Not in the paper: a downscale by a factor ~ U[resize_range] with resize_prob, before the rest.
    resize_prob: float = 0.0
    resize_range: tuple[float, float] = (0.5, 1.0)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        # Drawn in the paper's order with the resize draw last (resize_prob 0 leaves every other draw
        # as it always was); applied blur, resize, JPEG, flip, as a re-upload would be made.
        sigma = rng.uniform(0, self.blur_sigma_max) if rng.random() < self.blur_prob else None
        quality = rng.randint(*self.jpeg_quality) if rng.random() < self.jpeg_prob else None
        flip = self.hflip and rng.random() < 0.5
        factor = rng.uniform(*self.resize_range) if self.resize_prob > 0 and rng.random() < self.resize_prob else None
        if sigma is not None:
            img = gaussian_blur(img, sigma)
        if factor is not None:
            w, h = img.size
            img = img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BICUBIC)
        if quality is not None:
            img = jpeg_compress(img, quality)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=sigma)) if sigma > 0 else img


def jpeg_compress(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageDataset(torch.utils.data.Dataset):
    """Yields (uint8 (3, H, W), label, index). `transform(PIL) -> PIL` is applied before tensor conversion."""

    def __init__(self, samples: list[Sample], augment: Augment | None = None, transform=None, seed: int = 0):
        self.samples = samples
        self.augment = augment
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        sample = self.samples[i]
        tensor = read_and_decode(sample.path)
        if self.augment is not None or self.transform is not None:
            img = Image.fromarray(tensor.permute(1, 2, 0).numpy())
            if self.augment is not None:
                img = self.augment(img, random.Random(hash((self.seed, self.epoch, i))))
            if self.transform is not None:
                img = self.transform(img)
            tensor = pil_to_tensor(img)
        return tensor, sample.label, i


def collate(batch):
    """Images stay a list (they may differ in size); labels become a float tensor."""
    images = [b[0] for b in batch]
    labels = torch.tensor([b[1] for b in batch], dtype=torch.float32)
    index = torch.tensor([b[2] for b in batch], dtype=torch.long)
    return images, labels, index
