"""Calibrated scores: Platt scaling of the detector's logit, fitted on out-of-fold scores.

A detector's raw sigmoid(logit) ranks images but is not a probability: trained on some generators,
it is over- or under-confident on others. Platt scaling fits p = sigmoid(a * logit + b) on logits
that no model saw in training (leave-one-generator-out folds), so that among images scored 0.9,
about 90% are synthetic (at the mix of the calibration pool). Both numbers fold into the head's
last linear layer (fold_into_head): every backend, export and engine then gives calibrated scores
without knowing about calibration.
"""

from __future__ import annotations

import numpy as np
import torch


def fit_platt(logits, labels) -> tuple[float, float]:
    """(a, b) minimising the log-loss of sigmoid(a * logit + b) against labels (0 real, 1 synthetic)."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(logits, np.float64).reshape(-1, 1)
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        raise ValueError("calibration needs both real and synthetic images")
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(x, y)  # C large: plain maximum likelihood
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def platt(logits, a: float, b: float) -> np.ndarray:
    """Calibrated probabilities sigmoid(a * logit + b)."""
    z = a * np.asarray(logits, np.float64) + b
    return 1.0 / (1.0 + np.exp(-z))


def expected_calibration_error(probs, labels, bins: int = 15) -> float:
    """ECE: the mean |accuracy - confidence| over equal-width bins of the predicted probability of
    "synthetic", weighted by each bin's share of images (|share synthetic - mean score| per bin)."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for k in range(bins):
        members = which == k
        if members.any():
            total += members.mean() * abs(labels[members].mean() - probs[members].mean())
    return float(total)


def reliability_table(probs, labels, edges=(0, 0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.99, 0.999, 1)) -> list[dict]:
    """Counts and observed share of synthetic images per score range. The ranges are finer near 0
    and 1, where a calibrated detector puts most images, so the table stays readable there."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        members = (probs >= lo) & ((probs < hi) if hi < 1 else (probs <= hi))
        n = int(members.sum())
        rows.append({"range": [lo, hi], "images": n, "real": int((labels[members] == 0).sum()),
                     "synthetic": int((labels[members] == 1).sum()),
                     "mean_score": float(probs[members].mean()) if n else None,
                     "share_synthetic": float(labels[members].mean()) if n else None})
    return rows


@torch.no_grad()
def fold_into_head(model, a: float, b: float) -> None:
    """Make model.head output a * logit + b, so sigmoid of the model's logit is the calibrated score.
    With several heads, each gets it: the mean of a * z_i + b is a * (mean logit) + b."""
    for head in (model.head.linears() if hasattr(model.head, "linears") else [model.head]):
        head.weight.mul_(a)
        head.bias.mul_(a).add_(b)
