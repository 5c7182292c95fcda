"""Detection metrics. AP is scikit-learn's definition (the library's, not re-implemented)."""

from __future__ import annotations

import numpy as np


def average_precision(labels, scores) -> float:
    """AP of `scores` ranking synthetic (1) above real (0); NaN when only one class is present."""
    from sklearn.metrics import average_precision_score

    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return float("nan")
    return float(average_precision_score(labels, np.asarray(scores)))


def accuracy(labels, scores, threshold: float = 0.5) -> float:
    labels = np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    return float(np.mean((np.asarray(scores) >= threshold) == (labels == 1)))


def eer_threshold(labels, scores) -> float:
    """Score threshold where the false-positive rate equals the false-negative rate (equal error rate)."""
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, np.asarray(scores))
    i = int(np.argmin(np.abs(fpr - (1 - tpr))))
    return float(np.clip(thresholds[i], 0.0, 1.0))
