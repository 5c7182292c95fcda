"""Results: one JSON object per line (docs/design.md, "Outputs and resume").

Schema version 1 (README.md, "Results"). Every record has exactly these keys, in this order:

    schema, id, sha256, score, label, patches, width, height, downscaled, model, error

`schema` is 1. `score` is sigmoid(logit) rounded to 6 decimals, `label` is "synthetic" or "real",
`patches` is a list of [x0, y0, x1, y1] integer boxes in original pixels, `width`/`height` are the
original image's size, `downscaled` is true when the image was over the pixel budget and scanned at
reduced size (`--downscale-large`), `error` is null or {"kind", "message"}. In an error record score,
label and patches are null (sha256, width and height too when unknown).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

SYNTHETIC = "synthetic"
REAL = "real"
SCHEMA_VERSION = 1
KEYS = ("schema", "id", "sha256", "score", "label", "patches", "width", "height", "downscaled", "model", "error")


def label_for(score: float, threshold: float) -> str:
    return SYNTHETIC if score >= threshold else REAL


def result_record(id, sha256, score, label, boxes, width, height, model_id, *, downscaled=False) -> dict[str, Any]:
    """boxes: (K, 4) tensor, array or nested list of [x0, y0, x1, y1], in original pixels."""
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"score must be finite, got {score}")
    if label not in (SYNTHETIC, REAL):
        raise ValueError(f"label must be {SYNTHETIC!r} or {REAL!r}, got {label!r}")
    if hasattr(boxes, "tolist"):
        boxes = boxes.tolist()
    return {
        "schema": SCHEMA_VERSION,
        "id": id,
        "sha256": sha256,
        "score": round(score, 6),
        "label": label,
        "patches": [[int(v) for v in box] for box in boxes],
        "width": int(width),
        "height": int(height),
        "downscaled": bool(downscaled),
        "model": model_id,
        "error": None,
    }


def error_record(id, sha256, kind, message, model_id, *, width=None, height=None, downscaled=False) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "id": id,
        "sha256": sha256,
        "score": None,
        "label": None,
        "patches": None,
        "width": width,
        "height": height,
        "downscaled": bool(downscaled),
        "model": model_id,
        "error": {"kind": str(kind), "message": str(message)},
    }


def dumps(record: dict[str, Any]) -> str:
    """One line of JSON. ASCII-escaped, so file names that are not valid UTF-8 still round-trip."""
    return json.dumps(record, ensure_ascii=True, allow_nan=False, separators=(", ", ": "))


def iter_records(path) -> Iterator[dict]:
    """The records of a JSONL output, in order (whole lines only)."""
    with open(path, "rb") as fh:
        for line in fh:
            if line.endswith(b"\n"):
                yield json.loads(line)
