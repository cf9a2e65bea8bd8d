"""Detection and ranking metrics of a head on a labeled domain, over the site's species list.

Every ranking metric ranks logits, not probabilities, because the float32
sigmoid saturates and would turn distinct scores into ties at 0 or 1.

Average precision. For scores s and binary labels y with P > 0 positives,
let t_1 > t_2 > ... be the distinct score values, highest first. At each
threshold t_m, every item with s >= t_m is detected, which gives precision
P_m = TP_m / (TP_m + FP_m) and recall R_m = TP_m / P, with R_0 = 0. Then

    AP = sum_m (R_m - R_{m-1}) * P_m.

Items with tied scores enter at the same threshold, so AP does not depend on
their order. This is the step-wise (non-interpolated) definition that
``sklearn.metrics.average_precision_score`` uses. With no positive, AP is
undefined and the callers skip that row or column.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import numpy as np

_LOGGER = logging.getLogger(__name__)

# A class enters cmAP only with at least this many positive windows. With
# fewer, one window more or less moves its AP by a large step, and a few such
# classes dominate the mean.
MIN_POSITIVES_PER_CLASS = 5

DEFAULT_THRESHOLD = 0.5


class LabeledDomain(Protocol):
    """The fields of a labeled domain that the metrics read.

    Attributes:
        classes: the K site classes, BirdNET labels.
        labels: [windows, K] bool, which classes are present in each window.
        bird_free: [windows] bool, windows without any bird call.
        window_seconds: length of one window in seconds.
    """

    classes: list[str]
    labels: np.ndarray
    bird_free: np.ndarray
    window_seconds: float


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Compute the average precision of one ranking, as defined in the module docstring.

    Args:
        scores: [items] float, higher ranks first.
        positives: [items] bool.
    Returns:
        AP in [0, 1], or NaN when there is no positive.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = np.asarray(positives, dtype=bool).ravel()
    if scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must have the same length")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; average precision needs finite scores")
    total_positives = int(positives.sum())
    if total_positives == 0:
        return float("nan")

    # Each threshold is read at the last item of a run of equal scores,
    # because the cumulative counts there include every tied item.
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    true_positives = np.cumsum(positives[order])
    detections = np.arange(1, len(scores) + 1)
    run_ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])

    precision = true_positives[run_ends] / detections[run_ends]
    recall = true_positives[run_ends] / total_positives
    recall_steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_steps * precision))


def sample_map(logits: np.ndarray, labels: np.ndarray) -> float:
    """Compute sample-wise mAP: AP over the classes of each window, averaged over windows with a label.

    Args:
        logits: [windows, K].
        labels: [windows, K] bool.
    Returns:
        The mean AP, or NaN when no window has a label.
    """
    values = [average_precision(row_logits, row_labels)
              for row_logits, row_labels in zip(logits, labels) if row_labels.any()]
    return float(np.mean(values)) if values else float("nan")


def class_map(logits: np.ndarray, labels: np.ndarray, min_positives: int = MIN_POSITIVES_PER_CLASS) -> tuple[float, int]:
    """Compute class-wise cmAP: AP over the windows of each class, averaged over classes.

    Args:
        logits: [windows, K].
        labels: [windows, K] bool.
        min_positives: classes with fewer positive windows are left out.
    Returns:
        The mean AP (NaN when no class qualifies) and the number of classes in the mean.
    """
    counts = labels.sum(axis=0)
    values = [average_precision(logits[:, c], labels[:, c])
              for c in range(labels.shape[1]) if counts[c] >= min_positives]
    return (float(np.mean(values)) if values else float("nan")), len(values)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Compute the share of windows with a label whose highest-scoring class is one of their labels.

    A tie for the highest logit goes to the lowest class index (``np.argmax``).
    Returns NaN when no window has a label.
    """
    labeled = labels.any(axis=1)
    if not labeled.any():
        return float("nan")
    top = np.argmax(logits[labeled], axis=1)
    hits = labels[labeled][np.arange(len(top)), top]
    return float(hits.mean())


def detection_logit(threshold: float) -> float:
    """Return the logit whose sigmoid equals a score threshold in (0, 1).

    The sigmoid is monotone, so ``logit >= detection_logit(t)`` detects what
    ``sigmoid(logit) >= t`` detects in exact arithmetic, without the
    saturation of a float32 sigmoid.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a sigmoid score strictly between 0 and 1, got {threshold}")
    return math.log(threshold) - math.log1p(-threshold)


def evaluate(logits: np.ndarray, domain: LabeledDomain, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Compute every metric of a head's logits on a domain.

    A detection is a (window, class) pair whose sigmoid score reaches
    ``threshold``. Precision and recall count detections over all windows,
    bird-free ones included.

    Args:
        logits: [windows, K] in the order of ``domain.classes``.
        domain: the labeled windows.
        threshold: detection threshold on the sigmoid score (sensitivity 1).
    Returns:
        ``sample_map``, ``class_map``, ``top1``, ``precision`` (NaN without any
        detection), ``recall`` (NaN without any positive),
        ``false_detections_per_hour`` (detections in bird-free windows per hour
        of bird-free audio, NaN without bird-free windows), and the counts
        behind them: ``windows``, ``labeled_windows``, ``classes_in_class_map``,
        ``detections``, ``bird_free_windows``.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(domain.labels, dtype=bool)
    bird_free = np.asarray(domain.bird_free, dtype=bool)
    windows, classes = labels.shape
    if logits.shape != (windows, classes):
        raise ValueError(f"logits {logits.shape} do not match the domain's labels [{windows}, {classes}]")
    if len(domain.classes) != classes:
        raise ValueError(f"the domain has {len(domain.classes)} classes but labels of {classes} columns")
    if bird_free.shape != (windows,):
        raise ValueError(f"bird_free {bird_free.shape} does not match {windows} windows")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinity; evaluate a head whose logits are finite")

    detected = logits >= detection_logit(threshold)
    detections = int(detected.sum())
    true_detections = int((detected & labels).sum())
    positives = int(labels.sum())

    bird_free_windows = int(bird_free.sum())
    bird_free_hours = bird_free_windows * float(domain.window_seconds) / 3600.0
    false_per_hour = float(detected[bird_free].sum()) / bird_free_hours if bird_free_windows else float("nan")

    cmap, cmap_classes = class_map(logits, labels)
    return {
        "sample_map": sample_map(logits, labels),
        "class_map": cmap,
        "top1": top1_accuracy(logits, labels),
        "precision": true_detections / detections if detections else float("nan"),
        "recall": true_detections / positives if positives else float("nan"),
        "false_detections_per_hour": false_per_hour,
        "windows": float(windows),
        "labeled_windows": float(labels.any(axis=1).sum()),
        "classes_in_class_map": float(cmap_classes),
        "detections": float(detections),
        "bird_free_windows": float(bird_free_windows),
    }
