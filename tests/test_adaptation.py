"""Tests of a site's streaming adaptation rounds (SiteAdapter) on small synthetic cases."""

from __future__ import annotations

import numpy as np
import pytest

from dawnchorus.models.head import LinearHead
from dawnchorus.server.adaptation import AdaptationConfig, SiteAdapter
from dawnchorus.server.priors import prior_shift


def _case(windows: int = 300, classes: int = 6, seed: int = 0) -> tuple[LinearHead, np.ndarray]:
    rng = np.random.default_rng(seed)
    embeddings = rng.uniform(0.0, 1.0, size=(windows, 1024)).astype(np.float32)
    weights = rng.normal(0.0, 0.05, size=(classes, 1024)).astype(np.float32)
    # Class 0 scores high on every window; the others stay far below the threshold.
    bias = np.full(classes, -6.0, np.float32)
    bias[0] = 2.0
    head = LinearHead([f"Species {i}_Bird {i}" for i in range(classes)], weights, bias)
    return head, embeddings


def _config(**overrides) -> AdaptationConfig:
    return AdaptationConfig(**{"buffer_capacity": 1000, "update_interval": 100, "min_buffer": 100, **overrides})


def test_prior_shift_without_training():
    head, embeddings = _case()
    adapter = SiteAdapter("site", head, _config(prior_shift=True, steps=0))
    adapter.add(embeddings)

    result = adapter.run_round(version=1)

    shift = prior_shift(head.logits(embeddings))
    np.testing.assert_allclose(result.head.logits(embeddings), head.logits(embeddings) + shift, atol=1e-4)
    assert shift[0] == 0.0
    assert (shift[1:] < -1.0).all()
    assert result.stats["mean_prior_shift"] == pytest.approx(shift.mean())
    assert result.decision.accepted


def test_prior_shift_reestimated_each_round():
    head, embeddings = _case()
    adapter = SiteAdapter("site", head, _config(prior_shift=True, steps=2))
    adapter.add(embeddings[:100])
    first = adapter.run_round(version=1)
    adapter.add(embeddings[100:])
    second = adapter.run_round(version=2)

    np.testing.assert_allclose(adapter.trainer.offset.numpy(), prior_shift(head.logits(embeddings)), atol=1e-5)
    assert first.stats["mean_prior_shift"] != second.stats["mean_prior_shift"]


def test_offset_zero_without_prior_shift():
    head, embeddings = _case()
    adapter = SiteAdapter("site", head, _config(prior_shift=False, steps=2))
    adapter.add(embeddings)
    result = adapter.run_round(version=1)
    assert not adapter.trainer.offset.numpy().any()
    assert result.stats["mean_prior_shift"] == 0.0
