"""Tests of the benchmark metrics and adaptation methods, on hand-made cases and a synthetic domain."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from dawnchorus.models.head import LinearHead, sigmoid
from dawnchorus.evaluation.methods import METHODS, adapt
from dawnchorus.server.priors import estimate_priors
from dawnchorus.evaluation.metrics import average_precision, class_map, evaluate, sample_map, top1_accuracy

EMBEDDING_DIM = 1024


@dataclasses.dataclass
class _Domain:
    """The fields of a benchmark domain that metrics and methods read."""

    name: str
    classes: list[str]
    embeddings: np.ndarray
    labels: np.ndarray
    background_recording: np.ndarray
    bird_free: np.ndarray
    background_kind: np.ndarray
    snr_db: np.ndarray
    window_seconds: float = 3.0


def _tiny_domain() -> _Domain:
    logits = _tiny_logits()
    windows, classes = logits.shape
    labels = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=bool)
    return _Domain(
        name="tiny",
        classes=[f"Species {c}_Bird {c}" for c in range(classes)],
        embeddings=np.zeros((windows, EMBEDDING_DIM), dtype=np.float32),
        labels=labels,
        background_recording=np.array(["a", "a", "b", "b"]),
        bird_free=np.array([False, False, True, False]),
        background_kind=np.array(["rain"] * windows),
        snr_db=np.zeros(windows),
    )


def _tiny_logits() -> np.ndarray:
    return np.array([[3.0, 1.0, -2.0], [0.0, 2.0, 1.0], [-1.0, 0.3, -4.0], [2.0, 0.5, 1.0]])


def _synthetic_domain(windows: int = 300, classes: int = 8, seed: int = 0) -> tuple[_Domain, LinearHead]:
    """Mix class prototypes into four backgrounds, and build a source head that partly detects them."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0.0, 1.0, size=(classes, EMBEDDING_DIM)) * (rng.uniform(size=(classes, EMBEDDING_DIM)) < 0.1)
    backgrounds = rng.uniform(0.0, 0.5, size=(4, EMBEDDING_DIM))
    recording = np.repeat(np.arange(4), math.ceil(windows / 4))[:windows]
    labels = rng.uniform(size=(windows, classes)) < 0.15
    labels[recording == 3] = False
    embeddings = backgrounds[recording] + labels @ prototypes + rng.normal(0.0, 0.05, size=(windows, EMBEDDING_DIM))
    embeddings = np.maximum(embeddings, 0.0).astype(np.float32)

    centred = prototypes - prototypes.mean(axis=1, keepdims=True)
    weights = (0.05 * centred + rng.normal(0.0, 0.02, size=centred.shape)).astype(np.float32)
    head = LinearHead([f"Species {c}_Bird {c}" for c in range(classes)], weights, np.full(classes, -2.0, np.float32))
    domain = _Domain(
        name="synthetic",
        classes=head.labels,
        embeddings=embeddings,
        labels=labels,
        background_recording=np.array([f"rec{r}" for r in recording]),
        bird_free=~labels.any(axis=1),
        background_kind=np.array(["wind"] * windows),
        snr_db=np.zeros(windows),
    )
    return domain, head


@pytest.fixture(scope="module")
def synthetic() -> tuple[_Domain, LinearHead]:
    return _synthetic_domain()


def test_average_precision_known_ranking():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    positives = np.array([True, False, True, False])

    assert average_precision(scores, positives) == pytest.approx(0.5 * 1.0 + 0.5 * 2.0 / 3.0)


def test_average_precision_ties_ignore_order():
    first = average_precision(np.array([1.0, 1.0, 0.0]), np.array([True, False, False]))
    second = average_precision(np.array([1.0, 1.0, 0.0]), np.array([False, True, False]))

    assert first == pytest.approx(0.5)
    assert second == pytest.approx(0.5)


def test_average_precision_no_positive():
    assert math.isnan(average_precision(np.array([0.3, 0.1]), np.array([False, False])))


def test_average_precision_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for trial in range(20):
        # Rounded scores produce many ties.
        scores = np.round(rng.normal(size=200), 1)
        positives = rng.uniform(size=200) < 0.2
        expected = metrics.average_precision_score(positives, scores)
        assert average_precision(scores, positives) == pytest.approx(expected, abs=1e-12), trial


def test_sample_map_tiny_table():
    domain = _tiny_domain()

    expected = (1.0 + 0.5 + (0.5 * 0.5 + 0.5 * 2.0 / 3.0)) / 3.0
    assert sample_map(_tiny_logits(), domain.labels) == pytest.approx(expected)


def test_class_map_tiny_table():
    domain = _tiny_domain()

    value, classes = class_map(_tiny_logits(), domain.labels, min_positives=1)

    assert value == pytest.approx((1.0 + 1.0 / 3.0 + 1.0) / 3.0)
    assert classes == 3


def test_class_map_skips_rare_classes():
    value, classes = class_map(_tiny_logits(), _tiny_domain().labels)

    assert math.isnan(value)
    assert classes == 0


def test_top1_tiny_table():
    assert top1_accuracy(_tiny_logits(), _tiny_domain().labels) == pytest.approx(1.0 / 3.0)


def test_evaluate_detection_counts():
    result = evaluate(_tiny_logits(), _tiny_domain(), threshold=0.5)

    assert result["detections"] == 9
    assert result["precision"] == pytest.approx(4.0 / 9.0)
    assert result["recall"] == pytest.approx(1.0)
    assert result["false_detections_per_hour"] == pytest.approx(1.0 / (3.0 / 3600.0))
    assert result["bird_free_windows"] == 1


def test_evaluate_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="do not match"):
        evaluate(_tiny_logits()[:, :2], _tiny_domain())


def test_prior_em_recovers_target_prior():
    rng = np.random.default_rng(0)
    source_prior, target_priors, separation = 0.01, np.array([0.2, 0.02]), 1.5
    labels = rng.uniform(size=(20_000, 2)) < target_priors
    features = np.where(labels, separation, -separation) + rng.normal(size=labels.shape)
    # Calibrated logits for the source prior: log-likelihood ratio plus the prior's logit.
    logits = 2.0 * separation * features + math.log(source_prior / (1.0 - source_prior))

    estimated = estimate_priors(logits, source_prior)
    naive = sigmoid(logits).mean(axis=0)

    assert abs(estimated[0] - 0.2) < 0.02
    assert abs(estimated[1] - 0.02) < 0.005
    assert abs(estimated[0] - 0.2) < abs(naive[0] - 0.2)


def test_prior_shift_raises_bias_of_common_class():
    rng = np.random.default_rng(1)
    labels = rng.uniform(size=2000) < 0.3
    features = (np.where(labels, 1.5, -1.5) + rng.normal(size=2000)).astype(np.float32)[:, None]
    source_prior = 0.01
    head = LinearHead(["Species 0_Bird 0"], np.array([[3.0]], np.float32),
                      np.array([math.log(source_prior / (1 - source_prior))], np.float32))

    result = adapt("prior-shift", head, features, {"source_prior": source_prior, "prior_shift_direction": "both"})
    adapted_prior = sigmoid(result.final_logits).mean()

    assert result.heads[0].bias[0] > head.bias[0]
    assert abs(adapted_prior - 0.3) < 0.03


def test_prior_shift_down_only_lowers_biases():
    rng = np.random.default_rng(2)
    labels = rng.uniform(size=(2000, 2)) < np.array([0.3, 0.0])
    features = (np.where(labels, 1.5, -1.5) + rng.normal(size=(2000, 2))).astype(np.float32)
    source_prior = 0.01
    bias = math.log(source_prior / (1 - source_prior))
    head = LinearHead(["Species 0_Bird 0", "Species 1_Bird 1"], np.diag([3.0, 3.0]).astype(np.float32),
                      np.array([bias, bias], np.float32))

    result = adapt("prior-shift", head, features, {"source_prior": source_prior})

    assert result.heads[0].bias[0] == pytest.approx(head.bias[0])
    assert result.heads[0].bias[1] < head.bias[1]


@pytest.mark.parametrize("method", METHODS)
def test_method_returns_finite_logits(method, synthetic):
    domain, head = synthetic

    result = adapt(method, head, domain.embeddings, {"epochs": 3}, seed=0)

    assert result.final_logits.shape == domain.labels.shape
    assert np.isfinite(result.final_logits).all()
    assert all(logits.shape == domain.labels.shape for logits in result.logits_by_round)
    assert result.blocked_heads >= 0


def test_streaming_one_head_per_round(synthetic):
    domain, head = synthetic

    result = adapt("notela-streaming", head, domain.embeddings, {"chunk_size": 64, "min_buffer": 64})

    # 300 windows in chunks of 64: rounds after 64, 128, 192 and 256 windows, and a flush round for the last 44.
    assert len(result.heads) == 5
    assert len(result.logits_by_round) == 5
    assert result.online_logits.shape == domain.labels.shape
    np.testing.assert_allclose(result.online_logits[:64], head.logits(domain.embeddings[:64]), atol=1e-5)


def test_streaming_online_uses_previous_head(synthetic):
    domain, head = synthetic

    result = adapt("notela-streaming", head, domain.embeddings, {"chunk_size": 64, "min_buffer": 64})

    np.testing.assert_allclose(result.online_logits[64:128], result.heads[0].logits(domain.embeddings[64:128]),
                               atol=1e-5)


def test_offline_methods_have_no_online_logits(synthetic):
    domain, head = synthetic

    assert adapt("source", head, domain.embeddings).online_logits is None


def test_notela_records_every_epoch(synthetic):
    domain, head = synthetic

    result = adapt("notela", head, domain.embeddings, {"epochs": 4})

    assert len(result.logits_by_round) == 4
    assert len(result.heads) == 4


def test_adapt_rejects_unknown_method(synthetic):
    domain, head = synthetic

    with pytest.raises(ValueError, match="unknown adaptation method"):
        adapt("adabn", head, domain.embeddings)


def test_adapt_rejects_unknown_hyperparameter(synthetic):
    domain, head = synthetic

    with pytest.raises(ValueError, match="unknown hyperparameters"):
        adapt("notela", head, domain.embeddings, {"lambda": 1.0})


def test_prior_shift_keeps_class_map(synthetic):
    domain, head = synthetic

    result = adapt("prior-shift", head, domain.embeddings)

    source_value, _ = class_map(head.logits(domain.embeddings), domain.labels)
    adapted_value, _ = class_map(result.final_logits, domain.labels)
    assert adapted_value == pytest.approx(source_value)


def test_tent_collapse_counted_by_guard(synthetic):
    domain, head = synthetic

    # Batches of 32 give 100 steps in 10 epochs, enough for entropy minimisation to drive scores towards 0.
    result = adapt("tent", head, domain.embeddings, {"epochs": 10, "batch_size": 32})

    assert result.blocked_heads > 0
    assert sigmoid(result.final_logits).max(axis=1).mean() < sigmoid(head.logits(domain.embeddings)).max(axis=1).mean()
