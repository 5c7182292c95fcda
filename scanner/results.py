"""Results: one JSON object per line (DESIGN.md section 2, "Results").

Every record has exactly these keys, in this order:

    id, sha256, score, label, patches, width, height, model, error

`score` is sigmoid(logit) rounded to 6 decimals, `label` is "synthetic" or "real", `patches` is a
list of [x0, y0, x1, y1] integer boxes in original pixels, `error` is null or {"kind", "message"}.
In an error record score, label and patches are null (sha256, width and height too when unknown).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

SYNTHETIC = "synthetic"
REAL = "real"
KEYS = ("id", "sha256", "score", "label", "patches", "width", "height", "model", "error")


def label_for(score: float, threshold: float) -> str:
    return SYNTHETIC if score >= threshold else REAL


def result_record(id, sha256, score, label, boxes, width, height, model_id) -> dict[str, Any]:
    """boxes: (K, 4) tensor, array or nested list of [x0, y0, x1, y1]."""
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"score must be finite, got {score}")
    if label not in (SYNTHETIC, REAL):
        raise ValueError(f"label must be {SYNTHETIC!r} or {REAL!r}, got {label!r}")
    if hasattr(boxes, "tolist"):
        boxes = boxes.tolist()
    return {
        "id": id,
        "sha256": sha256,
        "score": round(score, 6),
        "label": label,
        "patches": [[int(v) for v in box] for box in boxes],
        "width": int(width),
        "height": int(height),
        "model": model_id,
        "error": None,
    }


def error_record(id, sha256, kind, message, model_id, *, width=None, height=None) -> dict[str, Any]:
    return {
        "id": id,
        "sha256": sha256,
        "score": None,
        "label": None,
        "patches": None,
        "width": width,
        "height": height,
        "model": model_id,
        "error": {"kind": str(kind), "message": str(message)},
    }


def dumps(record: dict[str, Any]) -> str:
    """One line of JSON. ASCII-escaped, so file names that are not valid UTF-8 still round-trip."""
    return json.dumps(record, ensure_ascii=True, allow_nan=False, separators=(", ", ": "))


class ResultWriter:
    """Writes records as JSON lines. `flush()` pushes them to the OS (the scan calls it per batch).

    Each record is written with a single write() of a complete line, so the lines already flushed
    are always whole. append=False truncates the file (this first form of `scanner run`).
    """

    def __init__(self, path, *, append: bool = False):
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._fh = open(self.path, "a" if append else "w", encoding="ascii", newline="\n")
        self.written = 0

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(dumps(record) + "\n")
        self.written += 1

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
