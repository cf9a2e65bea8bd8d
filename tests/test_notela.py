"""Tests of the NOTELA teacher step and the head trainer, on small cases with known results."""

from __future__ import annotations

import numpy as np
import pytest

from dawnchorus.models.head import LinearHead
from dawnchorus.models.notela import HeadTrainer, notela_round, notela_targets

EMBEDDING_DIM = 1024


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _closed_form(logit: float, neighbour_logits: list[float], lam: float, alpha: float) -> float:
    """Normalise p ** (1 / alpha) * exp((lam / alpha) * mean p_j) over {negative, positive}, in float64."""
    p = _sigmoid(logit)
    mean = float(np.mean(_sigmoid(neighbour_logits))) if neighbour_logits else 0.0
    negative_mean = 1.0 - mean if neighbour_logits else 0.0
    positive = p ** (1.0 / alpha) * np.exp(lam / alpha * mean)
    negative = (1.0 - p) ** (1.0 / alpha) * np.exp(lam / alpha * negative_mean)
    return float(positive / (positive + negative))


def _binary_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    return float(np.mean(np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))))


def _random_head(classes: int, seed: int = 0) -> LinearHead:
    # Weights of BirdNET's scale (mean |w| about 0.08), so logits stay in a few units.
    rng = np.random.default_rng(seed)
    weights = rng.normal(0.0, 0.05, size=(classes, EMBEDDING_DIM)).astype(np.float32)
    bias = rng.normal(0.0, 0.5, size=classes).astype(np.float32)
    return LinearHead([f"Species {i}_Bird {i}" for i in range(classes)], weights, bias)


def _random_embeddings(windows: int, seed: int = 1) -> np.ndarray:
    # BirdNET embeddings are averages after a ReLU, so never negative.
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=(windows, EMBEDDING_DIM)).astype(np.float32)


def test_targets_lam_zero_keeps_probabilities():
    logits = np.random.default_rng(0).normal(0.0, 3.0, size=(6, 4)).astype(np.float32)
    neighbours = np.array([[1, 2], [0, -1], [0, 3], [2, -1], [5, -1], [4, -1]])

    targets = notela_targets(logits, neighbours, lam=0.0, alpha=1.0)

    np.testing.assert_allclose(targets, _sigmoid(logits), atol=1e-6)


def test_targets_positive_neighbours_move_up():
    logits = np.array([[0.0, 0.0], [8.0, -8.0], [6.0, -6.0]], dtype=np.float32)
    neighbours = np.array([[1, 2], [0, -1], [0, -1]])

    targets = notela_targets(logits, neighbours, lam=1.0, alpha=1.0)

    assert targets[0, 0] > 0.5
    assert targets[0, 1] < 0.5
    assert targets[0, 0] == pytest.approx(_closed_form(0.0, [8.0, 6.0], 1.0, 1.0), abs=1e-6)
    assert targets[0, 1] == pytest.approx(_closed_form(0.0, [-8.0, -6.0], 1.0, 1.0), abs=1e-6)


def test_targets_logit_form_matches_definition():
    logits = np.random.default_rng(2).normal(0.0, 2.0, size=(5, 3)).astype(np.float32)
    neighbours = np.array([[1, 2, -1], [0, -1, -1], [0, 3, 4], [2, -1, -1], [2, -1, -1]])
    lam, alpha = 0.7, 0.6

    targets = notela_targets(logits, neighbours, lam=lam, alpha=alpha)

    for i in range(5):
        rows = [j for j in neighbours[i] if j >= 0]
        for c in range(3):
            expected = _closed_form(float(logits[i, c]), [float(logits[j, c]) for j in rows], lam, alpha)
            assert targets[i, c] == pytest.approx(expected, abs=1e-6), (i, c)


def test_targets_empty_slots_ignored():
    logits = np.array([[0.0], [4.0], [-4.0]], dtype=np.float32)
    with_empty_slot = notela_targets(logits, np.array([[1, -1], [0, -1], [0, -1]]))
    single_column = notela_targets(logits, np.array([[1], [0], [0]]))

    np.testing.assert_allclose(with_empty_slot, single_column, atol=1e-7)


def test_targets_no_neighbour_unchanged():
    logits = np.array([[2.5, -1.0, 0.0], [9.0, 9.0, 9.0]], dtype=np.float32)
    neighbours = np.array([[-1, -1], [-1, -1]])

    targets = notela_targets(logits, neighbours, lam=1.0, alpha=1.0)

    np.testing.assert_allclose(targets, _sigmoid(logits), atol=1e-7)


def test_targets_alpha_sharpens():
    logits = np.array([[1.0, -1.0, 0.0]], dtype=np.float32)
    neighbours = np.full((1, 2), -1)

    targets = notela_targets(logits, neighbours, lam=0.0, alpha=0.5)

    assert targets[0, 0] > _sigmoid(1.0)
    assert targets[0, 1] < _sigmoid(-1.0)
    assert targets[0, 2] == pytest.approx(0.5, abs=1e-7)
    np.testing.assert_allclose(targets, _sigmoid(2.0 * logits), atol=1e-6)


def test_targets_saturated_logit_tempered():
    # sigmoid(40) is exactly 1.0 in float32, so p ** (1 / alpha) normalised
    # in probability space would give 1.0; the true target is sigmoid(4).
    logits = np.array([[40.0]], dtype=np.float32)

    targets = notela_targets(logits, np.array([[-1]]), lam=1.0, alpha=10.0)

    assert targets[0, 0] == pytest.approx(_sigmoid(4.0), abs=1e-6)


def test_targets_bad_index_raises():
    logits = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="neighbour indices"):
        notela_targets(logits, np.array([[1], [3], [0]]))


def test_targets_bad_alpha_raises():
    logits = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="alpha"):
        notela_targets(logits, np.array([[1], [0]]), alpha=0.0)


def test_trainer_starts_at_source():
    head = _random_head(12)
    embeddings = _random_embeddings(40)

    with_affine = HeadTrainer(head, train_affine=True)
    without_affine = HeadTrainer(head, train_affine=False)

    np.testing.assert_allclose(with_affine.logits(embeddings), head.logits(embeddings), atol=1e-5)
    np.testing.assert_allclose(without_affine.logits(embeddings), head.logits(embeddings), atol=1e-5)


def test_trainer_logits_batched():
    head = _random_head(3)
    # More rows than one forward batch, so the result is stitched from two.
    embeddings = _random_embeddings(8192 + 5)

    logits = HeadTrainer(head).logits(embeddings)

    assert logits.shape == (8192 + 5, 3)
    np.testing.assert_allclose(logits, head.logits(embeddings), atol=1e-5)


def test_trainer_fit_reduces_loss():
    source = _random_head(8, seed=0)
    teacher = LinearHead(source.labels, source.weights, source.bias + np.linspace(-2, 2, 8, dtype=np.float32))
    embeddings = _random_embeddings(300)
    targets = _sigmoid(teacher.logits(embeddings)).astype(np.float32)
    trainer = HeadTrainer(source, learning_rate=1e-2)

    before = _binary_cross_entropy(trainer.logits(embeddings), targets)
    training_loss = trainer.fit(embeddings, targets, steps=150, batch_size=64)
    after = _binary_cross_entropy(trainer.logits(embeddings), targets)

    assert np.isfinite(training_loss)
    assert after < before


def test_trainer_fit_batch_sizes_no_retrace():
    head = _random_head(4)
    embeddings = _random_embeddings(50)
    targets = np.full((50, 4), 0.2, dtype=np.float32)
    trainer = HeadTrainer(head)

    for batch_size in (3, 17, 64):
        trainer.fit(embeddings, targets, steps=2, batch_size=batch_size)

    assert trainer._train_step.experimental_get_tracing_count() == 1


def test_trainer_export_folds_affine():
    source = _random_head(10)
    embeddings = _random_embeddings(200)
    targets = np.clip(_sigmoid(source.logits(embeddings)) + 0.3, 0.0, 1.0).astype(np.float32)
    trainer = HeadTrainer(source, learning_rate=1e-2, train_affine=True)
    trainer.fit(embeddings, targets, steps=30, batch_size=50)

    exported = trainer.export_head(version=3)

    assert np.abs(trainer.scale.numpy() - 1.0).max() > 1e-3
    assert np.abs(trainer.shift.numpy()).max() > 1e-3
    assert exported.version == 3
    assert exported.labels == source.labels
    np.testing.assert_allclose(exported.logits(embeddings), trainer.logits(embeddings), atol=1e-4)


def test_trainer_state_round_trip():
    source = _random_head(6)
    embeddings = _random_embeddings(64)
    targets = np.full((64, 6), 0.7, dtype=np.float32)
    trained = HeadTrainer(source, learning_rate=1e-2)
    trained.fit(embeddings, targets, steps=10, batch_size=16)
    state = trained.get_state()

    restored = HeadTrainer(source, learning_rate=1e-2)
    restored.set_state(state)
    restored_state = restored.get_state()

    assert sorted(restored_state) == sorted(state)
    assert int(restored_state["optimizer/iteration"]) == 10
    for key in state:
        np.testing.assert_array_equal(restored_state[key], state[key], err_msg=key)
    np.testing.assert_array_equal(restored.logits(embeddings), trained.logits(embeddings))


def test_trainer_state_affine_mismatch_raises():
    source = _random_head(4)
    state = HeadTrainer(source, train_affine=True).get_state()
    with pytest.raises(ValueError, match="unknown"):
        HeadTrainer(source, train_affine=False).set_state(state)


def test_trainer_bad_dropout_raises():
    with pytest.raises(ValueError, match="dropout_rate"):
        HeadTrainer(_random_head(2), dropout_rate=1.0)


def test_round_lam_zero_statistics():
    source = _random_head(5)
    embeddings = _random_embeddings(40)
    neighbours = np.tile(np.array([[1, -1]]), (40, 1))
    teacher_probabilities = _sigmoid(source.logits(embeddings))

    stats = notela_round(HeadTrainer(source), embeddings, neighbours, lam=0.0, alpha=1.0, steps=3, batch_size=16)

    assert set(stats) == {"mean_target", "mean_teacher_probability", "mean_top_score", "top_class_changed", "loss"}
    assert all(isinstance(value, float) for value in stats.values())
    assert stats["top_class_changed"] == 0.0
    assert stats["mean_target"] == pytest.approx(stats["mean_teacher_probability"], abs=1e-6)
    assert stats["mean_teacher_probability"] == pytest.approx(teacher_probabilities.mean(), abs=1e-5)
    assert stats["mean_top_score"] == pytest.approx(teacher_probabilities.max(axis=1).mean(), abs=1e-5)


def test_round_neighbours_change_top_class():
    # Window 0 prefers class 0 by a logit of 0.1. Its only mutual neighbour,
    # window 1, is sure of class 1, so window 0's pseudo-label ranks class 1 first.
    weights = np.zeros((2, EMBEDDING_DIM), dtype=np.float32)
    weights[0, 0] = 0.1
    weights[1, 1] = 8.0
    source = LinearHead(["A a_A", "B b_B"], weights, np.zeros(2, dtype=np.float32))
    embeddings = np.zeros((2, EMBEDDING_DIM), dtype=np.float32)
    embeddings[0, 0] = 1.0
    embeddings[1, 1] = 1.0

    stats = notela_round(
        HeadTrainer(source), embeddings, np.array([[1], [0]]), lam=1.0, alpha=1.0, steps=1, batch_size=2
    )

    assert stats["top_class_changed"] == 0.5


def test_trainer_offset_is_fixed_and_exported():
    source = _random_head(4)
    embeddings = _random_embeddings(64)
    offset = np.array([0.0, -1.0, -2.5, 0.5], np.float32)
    trainer = HeadTrainer(source, learning_rate=1e-2, train_affine=True)
    trainer.set_offset(offset)

    np.testing.assert_allclose(trainer.logits(embeddings), source.logits(embeddings) + offset, atol=1e-4)
    trainer.fit(embeddings, np.full((64, 4), 0.2, np.float32), steps=5, batch_size=32)

    np.testing.assert_array_equal(trainer.offset.numpy(), offset)
    np.testing.assert_allclose(trainer.export_head(2).logits(embeddings), trainer.logits(embeddings), atol=1e-4)
    assert "offset" not in trainer.get_state()


def test_trainer_offset_rejects_wrong_shape():
    trainer = HeadTrainer(_random_head(4))
    with pytest.raises(ValueError, match="offset must be"):
        trainer.set_offset(np.zeros(3))
