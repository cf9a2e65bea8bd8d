"""Training-free prior shift: re-estimate each class's prior on a site's windows and move its bias.

A head trained on focal recordings has, in its biases, the class priors of
its training data. At a site most of the species list never occurs, and the
ones that do occur at their own rates. Each class is a binary problem, so a
change of prior from ``s`` to ``q`` adds ``logit(q) - logit(s)`` to that
class's logits (Bayes' rule). The target priors ``q`` are estimated by EM
(Saerens, Latinne and Decaestecker, 2002) from the source head's scores on
unlabeled windows.

The source priors of BirdNET are not published. BirdNET was trained on focal
recordings with about one species each, so among a site's K classes each is
taken to have had the prior 1 / K. This choice was made on the western North
America benchmark domain. There, 1 / 6522 (all of BirdNET's classes) left
the biases where they were, and the mean source score over the site's
classes gained 1.4 mAP points less than 1 / K (docs/benchmarks.md).

The shift is cmAP-neutral: it adds a constant to every logit of a class, so
no class ranks its windows differently. It changes which class a window
ranks first, which is what sample-wise mAP and top-1 measure, and which
scores cross a detection threshold. Raising a bias moves bird-free windows
over a fixed threshold, so by default the shift only lowers biases.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from dawnchorus.models.head import sigmoid

_LOGGER = logging.getLogger(__name__)

DIRECTIONS = ("down", "both")
# Weight of the source prior in EM, as a share of the windows; see estimate_priors.
# On the western North America benchmark domain, sample-wise mAP fell slowly as
# the strength rose (89.8 at 0, unbounded; 89.5 at 0.003; 89.3 at 0.01; 88.7 at
# 0.03). 0.01 caps the shift at 4.6 logits, so that a species that starts to
# occur later is lowered by at most that much until its windows reach the buffer.
PRIOR_STRENGTH = 0.01
# The Beta prior is worth at least this many windows. On a small buffer a
# class's absence is weak evidence, so EM moves biases little there: at 16
# windows a class that never occurs is lowered by about 1 logit.
PRIOR_MIN_WINDOWS = 10.0


def logit(probability: np.ndarray | float) -> np.ndarray:
    """Return log(p / (1 - p)) in float64."""
    probability = np.asarray(probability, dtype=np.float64)
    return np.log(probability) - np.log1p(-probability)


def estimate_priors(
    logits: np.ndarray, source_prior: float | np.ndarray, strength: float = PRIOR_STRENGTH,
    iterations: int = 1000, tolerance: float = 1e-4, floor: float = 1e-9,
    min_windows: float = PRIOR_MIN_WINDOWS,
) -> np.ndarray:
    """Estimate each class's prior on the target windows by EM, with a Beta prior towards the source prior.

    Each class is a binary problem. With the source prior s and a current
    estimate q, the E-step corrects every posterior by Bayes' rule for the new
    prior, which in logit space adds ``logit(q) - logit(s)``. The M-step sets

        q = (sum of corrected posteriors + strength * n * s) / (n + strength * n)

    over the n windows: the maximum a posteriori estimate under a Beta prior
    worth ``max(strength * n, min_windows)`` pseudo-windows at the source
    prior. Plain EM, as published, has strength and min_windows 0. There the
    prior of a class that never occurs falls towards 0 for as long as EM
    runs. Its bias shift then depends on the iteration count and grows
    without bound. With it, the shift is at least ``log(strength / (1 + strength))``,
    whatever the number of windows: -4.6 logits at the default 0.01, and less
    on fewer than ``min_windows / strength`` windows. EM starts from q = s.

    Args:
        logits: [windows, K] logits of the source head.
        source_prior: a float or [K], each class's prior in the source training data.
        strength: weight of the source prior, as a share of the windows.
        iterations: maximum EM iterations.
        tolerance: stop once no prior's logit moves by more than this.
        floor: priors are clipped to [floor, 1 - floor].
        min_windows: the least weight of the source prior, in windows.
    Returns:
        [K] float64 estimated target priors.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be [windows, K] with at least one window, got shape {logits.shape}")
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"strength must be a non-negative number, got {strength}")
    if not (math.isfinite(min_windows) and min_windows >= 0):
        raise ValueError(f"min_windows must be a non-negative number, got {min_windows}")
    source = np.broadcast_to(np.asarray(source_prior, dtype=np.float64), logits.shape[1:]).copy()
    if not ((source > 0) & (source < 1)).all():
        raise ValueError(f"source priors must be in (0, 1), got values from {source.min()} to {source.max()}")

    windows = len(logits)
    pseudo = max(strength * windows, min_windows)
    priors = source.copy()
    change = math.inf
    iteration = 0
    for iteration in range(1, iterations + 1):
        corrected = sigmoid(logits + (logit(priors) - logit(source)))
        updated = np.clip((corrected.sum(axis=0) + pseudo * source) / (windows + pseudo), floor, 1.0 - floor)
        change = float(np.abs(logit(updated) - logit(priors)).max())
        priors = updated
        if change <= tolerance:
            break
    _LOGGER.debug("prior EM stopped after %d iterations, last change %.3g logits", iteration, change)
    return priors


def prior_shift(
    logits: np.ndarray, source_prior: float | np.ndarray | None = None, direction: str = "down",
    strength: float = PRIOR_STRENGTH, iterations: int = 1000, tolerance: float = 1e-4,
    min_windows: float = PRIOR_MIN_WINDOWS,
) -> np.ndarray:
    """Return the per-class bias shift [K] float64 that moves the source priors to the EM estimates.

    Args:
        logits: [windows, K] logits of the source head on the site's windows.
        source_prior: each class's source prior; None takes 1 / K.
        direction: "down" only lowers biases; "both" applies the estimate as it is.
        strength, iterations, tolerance, min_windows: as in ``estimate_priors``.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    logits = np.asarray(logits)
    if source_prior is None:
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(f"logits must be [windows, K] with K >= 2 for a 1 / K prior, got shape {logits.shape}")
        source_prior = 1.0 / logits.shape[1]
    priors = estimate_priors(logits, source_prior, strength, iterations, tolerance, min_windows=min_windows)
    shift = logit(priors) - logit(source_prior)
    if direction == "down":
        shift = np.minimum(shift, 0.0)
    return shift
