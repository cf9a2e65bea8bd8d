"""Tests of the training-free prior shift (EM re-estimation of class priors)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dawnchorus.models.head import sigmoid
from dawnchorus.server.priors import estimate_priors, logit, prior_shift


def _calibrated_logits(labels: np.ndarray, source_prior: float, separation: float, seed: int) -> np.ndarray:
    # Log-likelihood ratio of two unit Gaussians at +-separation, plus the source prior's logit.
    features = np.where(labels, separation, -separation) + np.random.default_rng(seed).normal(size=labels.shape)
    return 2.0 * separation * features + logit(source_prior)


def test_plain_em_recovers_target_priors():
    rng = np.random.default_rng(0)
    labels = rng.uniform(size=(20_000, 2)) < np.array([0.2, 0.02])
    logits = _calibrated_logits(labels, 0.01, 1.5, seed=1)

    estimated = estimate_priors(logits, 0.01, strength=0.0, tolerance=1e-8, min_windows=0.0)
    naive = sigmoid(logits).mean(axis=0)

    assert estimated[0] == pytest.approx(0.2, abs=0.02)
    assert estimated[1] == pytest.approx(0.02, abs=0.005)
    assert abs(estimated[0] - 0.2) < abs(naive[0] - 0.2)


def test_strength_weights_source_prior():
    # Scores of exactly 0 leave only the pseudo-windows: q = strength * s / (1 + strength).
    logits = np.full((500, 1), -200.0)
    estimated = estimate_priors(logits, 0.1, strength=0.25)
    assert estimated[0] == pytest.approx(0.25 * 0.1 / 1.25, rel=1e-6)


def test_min_windows_weakens_small_buffers():
    # 16 windows: the prior is worth 10 windows, not 0.16, so q = 10 s / 26.
    logits = np.full((16, 1), -200.0)
    estimated = estimate_priors(logits, 0.1, strength=0.01, min_windows=10.0)
    assert estimated[0] == pytest.approx(10 * 0.1 / 26, rel=1e-6)
    assert prior_shift(logits, 0.1)[0] == pytest.approx(-1.02, abs=0.01)


@pytest.mark.parametrize("windows", [2_000, 20_000])
def test_absent_class_shift_is_capped(windows):
    logits = np.full((windows, 2), -30.0)
    logits[: windows // 4, 0] = 5.0

    shift = prior_shift(logits, 0.05, strength=0.01)

    assert shift[0] == 0.0
    # The cap: logit(s * r / (1 + r)) - logit(s), about log(r / (1 + r)) for a small prior.
    cap = logit(0.05 * 0.01 / 1.01) - logit(0.05)
    assert shift[1] == pytest.approx(cap, abs=0.01)


def test_plain_em_shift_grows_with_iterations():
    # Every posterior a little below the source prior: each EM step lowers the prior by about 0.5 logits.
    logits = np.full((1000, 1), logit(0.01) - 0.5)
    short = prior_shift(logits, 0.01, strength=0.0, iterations=10, tolerance=0.0, min_windows=0.0)
    long = prior_shift(logits, 0.01, strength=0.0, iterations=200, tolerance=0.0, min_windows=0.0)
    assert short[0] == pytest.approx(-5.0, abs=0.2)
    assert long[0] < short[0] - 10.0


def test_default_source_prior_is_one_over_k():
    logits = np.random.default_rng(2).normal(-4.0, 1.0, size=(300, 8))
    np.testing.assert_allclose(prior_shift(logits), prior_shift(logits, 1.0 / 8))


def test_both_directions_raise_a_common_class():
    labels = np.random.default_rng(3).uniform(size=(5000, 1)) < 0.3
    logits = _calibrated_logits(labels, 0.01, 1.5, seed=4)
    assert prior_shift(logits, 0.01, direction="both")[0] > 0
    assert prior_shift(logits, 0.01, direction="down")[0] == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"direction": "up"}, "direction"),
    ({"strength": -1.0}, "strength"),
    ({"min_windows": -1.0}, "min_windows"),
    ({"source_prior": 1.5}, "source priors"),
])
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prior_shift(np.zeros((10, 3)), **kwargs)


def test_cap_is_about_log_strength():
    assert logit(1e-4 * 0.01 / 1.01) - logit(1e-4) == pytest.approx(math.log(0.01 / 1.01), abs=1e-3)
