"""Source-free adaptation methods of the classifier head, for the focal-to-soundscape benchmark.

Every method starts from the source head (BirdNET's weights selected to the
site classes) and trains the same parameters through
``dawnchorus.models.notela.HeadTrainer``: the head's rows and, when
``train_affine`` is set, a per-dimension scale and shift of the embedding.
Every method is multi-label: each class is its own binary problem.

Offline methods see all windows at once (the transductive setting) and report
the logits after each epoch. ``notela-streaming`` runs the base station's own
``SiteAdapter`` on the windows in recording order. After every epoch or round
the candidate head goes through the collapse guard
(``server.adaptation.check_collapse``) against the source head, on the
windows seen so far. Offline methods only count the candidates it would
block and keep training, so that a collapse stays visible in the curves.
``SiteAdapter`` discards a blocked candidate, as on a base station.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import numpy as np

# notela sets TensorFlow's log level before it imports TensorFlow, so it comes first.
from dawnchorus.models.notela import HeadTrainer, notela_round
import tensorflow as tf  # noqa: E402 (after notela, see above)

from dawnchorus.evaluation import METHOD_NAMES
from dawnchorus.models.head import LinearHead, sigmoid
from dawnchorus.server.adaptation import AdaptationConfig, SiteAdapter, check_collapse
from dawnchorus.server.buffer import NeighbourBuffer
from dawnchorus.server.priors import DIRECTIONS as PRIOR_DIRECTIONS, PRIOR_STRENGTH, prior_shift

_LOGGER = logging.getLogger(__name__)

@dataclasses.dataclass
class MethodSettings:
    """Hyperparameters of the adaptation methods. Each method reads the ones it needs.

    Attributes:
        learning_rate: Adam step size.
        dropout_rate: dropout on the embedding during training (notela,
            dropout-student, pseudo-label, dust). Tent, shot and nrc train
            without dropout.
        train_affine: also train the per-dimension scale and shift of the embedding.
        epochs: offline passes over all windows; pseudo-labels are recomputed once per epoch.
        batch_size: windows per optimizer step.
        k: nearest neighbours counting the window itself (5 gives 4 neighbours).
        lam: weight of the neighbours' mean in NOTELA's pseudo-label.
        alpha: softness of NOTELA's pseudo-label.
        positive_threshold: pseudo-label: teacher probability at or above which
            an entry is a positive.
        negative_threshold: pseudo-label: teacher probability at or below which
            an entry is a negative. Entries between the two thresholds are ignored.
        tent_parameters: tent: "affine" (the batch-norm-affine analogue) or "head".
        diversity_weight: shot: weight of the diversity term.
        cluster_weight: shot: weight of the cross-entropy against the clustering
            pseudo-labels.
        nrc_expanded_weight: nrc: affinity of a non-reciprocal neighbour and of
            an expanded neighbour (a neighbour's neighbour).
        dust_passes: dust: forward passes with dropout per epoch.
        dust_max_uncertainty: dust: windows whose dropout probabilities differ
            from the clean ones by more than this are left out of training.
        source_prior: prior-shift: each class's prior in the source training
            data; None takes 1 / K for K site classes (see server/priors.py).
        prior_shift_direction: prior-shift: "both" applies the EM estimate as it is;
            "down" only lowers biases. Raising a bias moves bird-free windows
            over the recorders' fixed detection threshold: "both" raised false
            detections per hour from 8 to 72 on western North America.
        prior_strength: prior-shift: weight of the source prior in EM, as a
            share of the windows (``server.priors.estimate_priors``).
        em_iterations: prior-shift: maximum EM iterations.
        em_tolerance: prior-shift: EM stops once no prior's logit moves by more than this.
        chunk_size: notela-streaming: windows that arrive together, and the
            round interval U.
        buffer_capacity: notela-streaming: the rolling buffer's capacity.
        min_buffer: notela-streaming: windows needed before the first round.
        round_steps: notela-streaming: student steps per round.
        streaming_teacher: notela-streaming: "current" (NOTELA's own head as the
            teacher) or "source" (the source head as the teacher every round).
            The variant notela-streaming-source-teacher sets "source".
        streaming_prior_shift: notela-streaming: lower each class's bias by the
            prior shift estimated on the buffer before each round
            (``AdaptationConfig.prior_shift``). The variant
            notela-streaming-prior-shift sets it, with the source teacher.
    """

    learning_rate: float = 1e-3
    dropout_rate: float = 0.1
    train_affine: bool = True
    epochs: int = 10
    batch_size: int = 256
    k: int = 5
    lam: float = 1.0
    alpha: float = 1.0
    positive_threshold: float = 0.5
    negative_threshold: float = 0.1
    tent_parameters: str = "affine"
    diversity_weight: float = 1.0
    cluster_weight: float = 0.3
    nrc_expanded_weight: float = 0.1
    dust_passes: int = 5
    dust_max_uncertainty: float = 0.1
    source_prior: float | None = None
    prior_shift_direction: str = "down"
    prior_strength: float = PRIOR_STRENGTH
    em_iterations: int = 1000
    em_tolerance: float = 1e-4
    chunk_size: int = 256
    buffer_capacity: int = 20_000
    min_buffer: int = 64
    round_steps: int = 8
    streaming_teacher: str = "current"
    streaming_prior_shift: bool = False

    def __post_init__(self):
        checks = [
            (self.learning_rate > 0, "learning_rate must be positive"),
            (0 <= self.dropout_rate < 1, "dropout_rate must be in [0, 1)"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.k >= 2, "k must be at least 2 (it counts the window itself)"),
            (self.alpha > 0, "alpha must be positive"),
            (0 <= self.negative_threshold < self.positive_threshold <= 1,
             "thresholds must satisfy 0 <= negative_threshold < positive_threshold <= 1"),
            (self.tent_parameters in ("affine", "head"), "tent_parameters must be 'affine' or 'head'"),
            (0 <= self.nrc_expanded_weight <= 1, "nrc_expanded_weight must be in [0, 1]"),
            (self.dust_passes >= 1, "dust_passes must be at least 1"),
            (self.dust_max_uncertainty >= 0, "dust_max_uncertainty must be non-negative"),
            (self.source_prior is None or 0 < self.source_prior < 1, "source_prior must be None or in (0, 1)"),
            (self.prior_shift_direction in PRIOR_DIRECTIONS, "prior_shift_direction must be 'down' or 'both'"),
            (self.prior_strength >= 0, "prior_strength must be non-negative"),
            (self.em_iterations >= 1, "em_iterations must be at least 1"),
            (self.chunk_size >= 1, "chunk_size must be at least 1"),
            (self.round_steps >= 0, "round_steps must be non-negative"),
        ]
        for valid, message in checks:
            if not valid:
                raise ValueError(f"invalid method setting: {message} ({self})")


@dataclasses.dataclass
class AdaptResult:
    """The outcome of one adaptation run on one domain.

    Attributes:
        method: the method name.
        logits_by_round: after each epoch or round, the logits [windows, K]
            float32 of all windows under the head in force. The source logits
            are not included.
        final_logits: [windows, K] float32, the last entry of
            ``logits_by_round`` (the source logits when there was no round).
        heads: the head in force after each epoch or round, affine folded in.
        blocked_heads: candidates that the collapse guard blocked (streaming)
            or would have blocked (offline).
        online_logits: [windows, K] float32 for notela-streaming, each window
            scored by the head in force when it arrived. None for offline methods.
        stats: per epoch or round, the method's numbers (loss, guard statistics).
    """

    method: str
    logits_by_round: list[np.ndarray]
    final_logits: np.ndarray
    heads: list[LinearHead]
    blocked_heads: int
    online_logits: np.ndarray | None = None
    stats: list[dict[str, float]] = dataclasses.field(default_factory=list)


def _guard_config(settings: MethodSettings) -> AdaptationConfig:
    return AdaptationConfig(
        buffer_capacity=settings.buffer_capacity,
        update_interval=settings.chunk_size,
        min_buffer=min(settings.min_buffer, settings.buffer_capacity),
        k=settings.k,
        lam=settings.lam,
        alpha=settings.alpha,
        learning_rate=settings.learning_rate,
        dropout_rate=settings.dropout_rate,
        steps=settings.round_steps,
        batch_size=settings.batch_size,
        train_affine=settings.train_affine,
        teacher=settings.streaming_teacher,
        prior_shift=settings.streaming_prior_shift,
    )


class _EpochRecorder:
    """Collects each epoch's head and logits and counts what the guard would block."""

    def __init__(self, method: str, embeddings: np.ndarray, source_logits: np.ndarray, config: AdaptationConfig):
        self.method = method
        self.embeddings = embeddings
        self.source_logits = source_logits
        self.config = config
        self.logits_by_round: list[np.ndarray] = []
        self.heads: list[LinearHead] = []
        self.stats: list[dict[str, float]] = []
        self.blocked = 0

    def record(self, head: LinearHead, stats: dict[str, float]) -> None:
        logits = head.logits(self.embeddings)
        decision = check_collapse(self.source_logits, logits, self.config)
        if not decision.accepted:
            self.blocked += 1
            _LOGGER.info("%s epoch %d: the guard would block the head: %s",
                         self.method, len(self.heads) + 1, decision.reason)
        self.logits_by_round.append(logits)
        self.heads.append(head)
        self.stats.append({**stats, **decision.stats, "accepted": float(decision.accepted)})

    def result(self) -> AdaptResult:
        final = self.logits_by_round[-1] if self.logits_by_round else self.source_logits
        return AdaptResult(self.method, self.logits_by_round, final, self.heads, self.blocked, None, self.stats)


def _mutual_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Return the exact mutual neighbours [windows, k - 1] int32 of all windows, -1 for an empty slot."""
    buffer = NeighbourBuffer(capacity=len(embeddings), dim=embeddings.shape[1], k=k)
    buffer.add(embeddings)
    return buffer.mutual_neighbours()


def _steps_per_epoch(windows: int, batch_size: int) -> int:
    return max(1, math.ceil(windows / batch_size))


def _make_trainer(source_head: LinearHead, settings: MethodSettings, seed: int,
                  dropout_rate: float | None = None) -> HeadTrainer:
    return HeadTrainer(
        source_head,
        learning_rate=settings.learning_rate,
        dropout_rate=settings.dropout_rate if dropout_rate is None else dropout_rate,
        train_affine=settings.train_affine,
        seed=seed,
    )


def _run_source(source_head, embeddings, settings, seed, recorder: _EpochRecorder) -> AdaptResult:
    return recorder.result()


def _run_prior_shift(source_head, embeddings, settings, seed, recorder: _EpochRecorder) -> AdaptResult:
    shift = prior_shift(recorder.source_logits, settings.source_prior, settings.prior_shift_direction,
                        settings.prior_strength, settings.em_iterations, settings.em_tolerance)
    head = LinearHead(source_head.labels, source_head.weights,
                      (source_head.bias.astype(np.float64) + shift).astype(np.float32), source_head.version + 1)
    recorder.record(head, {"mean_bias_shift": float(shift.mean()), "min_bias_shift": float(shift.min())})
    return recorder.result()


def _run_notela(source_head, embeddings, settings, seed, recorder: _EpochRecorder, lam: float) -> AdaptResult:
    trainer = _make_trainer(source_head, settings, seed)
    neighbours = _mutual_neighbours(embeddings, settings.k)
    steps = _steps_per_epoch(len(embeddings), settings.batch_size)
    for epoch in range(settings.epochs):
        stats = notela_round(trainer, embeddings, neighbours, lam, settings.alpha, steps, settings.batch_size)
        recorder.record(trainer.export_head(epoch + 1), stats)
    return recorder.result()


def _run_notela_offline(source_head, embeddings, settings, seed, recorder: _EpochRecorder) -> AdaptResult:
    return _run_notela(source_head, embeddings, settings, seed, recorder, lam=settings.lam)


def _run_dropout_student(source_head, embeddings, settings, seed, recorder: _EpochRecorder) -> AdaptResult:
    return _run_notela(source_head, embeddings, settings, seed, recorder, lam=0.0)


def _run_notela_streaming(source_head, embeddings, settings, seed, recorder: _EpochRecorder) -> AdaptResult:
    """Feed the windows in recording order, ``chunk_size`` at a time, through a real ``SiteAdapter``.

    Each chunk is scored by the head in force before the chunk is added, and
    a round runs whenever the adapter has one due. A last round on the
    remaining windows runs at the end, so that every window is used.
    """
    adapter = SiteAdapter("benchmark", source_head, recorder.config, seed=seed)
    current = source_head
    online = np.zeros_like(recorder.source_logits)
    heads: list[LinearHead] = []
    logits_by_round: list[np.ndarray] = []
    stats: list[dict[str, float]] = []
    blocked = 0

    def run_round() -> None:
        nonlocal current, blocked
        result = adapter.run_round(version=len(heads) + 1)
        if result.decision.accepted:
            current = result.head
        else:
            blocked += 1
            _LOGGER.info("notela-streaming round %d: head blocked: %s", len(heads) + 1, result.decision.reason)
        heads.append(current)
        logits_by_round.append(current.logits(embeddings))
        stats.append({**result.stats, "accepted": float(result.decision.accepted)})

    for start in range(0, len(embeddings), settings.chunk_size):
        chunk = embeddings[start : start + settings.chunk_size]
        online[start : start + len(chunk)] = current.logits(chunk)
        adapter.add(chunk)
        if adapter.round_due():
            run_round()
    if adapter.round_due(flush=True):
        run_round()

    final = logits_by_round[-1] if logits_by_round else recorder.source_logits
    return AdaptResult(recorder.method, logits_by_round, final, heads, blocked, online, stats)


# Settings that make each streaming variant; every variant runs _run_notela_streaming.
STREAMING_VARIANTS = {
    "notela-streaming": {},
    # Pseudo-labels from the source head in every round.
    "notela-streaming-source-teacher": {"streaming_teacher": "source"},
    # The same, from the prior-shifted source head, re-estimated on the buffer each round.
    "notela-streaming-prior-shift": {"streaming_teacher": "source", "streaming_prior_shift": True},
}


def streaming_settings(method: str, settings: MethodSettings) -> MethodSettings:
    """Return ``settings`` with the fields that make ``method`` one of ``STREAMING_VARIANTS``."""
    return dataclasses.replace(settings, **STREAMING_VARIANTS[method])


def _streaming_variant(method: str) -> Callable:
    def run(source_head, embeddings, settings, seed, recorder: _EpochRecorder) -> AdaptResult:
        settings = streaming_settings(method, settings)
        recorder.config = _guard_config(settings)
        return _run_notela_streaming(source_head, embeddings, settings, seed, recorder)
    run.__doc__ = f"Run {method} through a real SiteAdapter."
    return run


# --- Methods with their own losses, trained on HeadTrainer's variables. ---


def _binary_entropy(logits):
    """Binary entropy of sigmoid(logits), elementwise, computed from logits so it stays finite."""
    probabilities = tf.sigmoid(logits)
    # H(p) = softplus(z) - p * z for p = sigmoid(z).
    return tf.nn.softplus(logits) - probabilities * logits


def _mean_prediction_entropy(logits):
    """Binary entropy of each class's mean probability over the batch, averaged over classes."""
    mean = tf.clip_by_value(tf.reduce_mean(tf.sigmoid(logits), axis=0), 1e-6, 1.0 - 1e-6)
    return -tf.reduce_mean(mean * tf.math.log(mean) + (1.0 - mean) * tf.math.log(1.0 - mean))


class _ObjectiveTrainer:
    """Adam on a chosen subset of a HeadTrainer's variables with a loss that HeadTrainer lacks.

    The loss is ``loss(logits [b, K], targets [b, K], mask [b, K]) -> scalar``.
    The forward pass matches HeadTrainer's: ``(x * scale + shift) @ W.T + b``.
    """

    def __init__(self, trainer: HeadTrainer, parameters: str, loss: Callable, learning_rate: float,
                 dropout_rate: float, seed: int):
        self.trainer = trainer
        if parameters == "affine":
            if trainer.scale is None:
                raise ValueError("parameters='affine' needs a HeadTrainer built with train_affine=True")
            self._variables = [trainer.scale, trainer.shift]
        elif parameters == "head":
            self._variables = [trainer.weights, trainer.bias]
        elif parameters == "all":
            self._variables = [v for v in (trainer.weights, trainer.bias, trainer.scale, trainer.shift) if v is not None]
        else:
            raise ValueError(f"parameters must be 'affine', 'head' or 'all', got {parameters!r}")
        self._loss = loss
        self._dropout_rate = float(dropout_rate)
        self._optimizer = tf.keras.optimizers.Adam(learning_rate)
        self._optimizer.build(self._variables)
        self._dropout = tf.random.Generator.from_seed(seed + 1)
        self._rng = np.random.default_rng(seed)
        self._step = tf.function(self._train_step)

    def features(self, embeddings):
        trainer = self.trainer
        if trainer.scale is None:
            return embeddings
        return embeddings * trainer.scale + trainer.shift

    def _train_step(self, embeddings, targets, mask):
        if self._dropout_rate > 0:
            keep = self._dropout.uniform(tf.shape(embeddings)) >= self._dropout_rate
            embeddings = tf.where(keep, embeddings / (1.0 - self._dropout_rate), tf.zeros_like(embeddings))
        with tf.GradientTape() as tape:
            logits = tf.matmul(self.features(embeddings), self.trainer.weights, transpose_b=True) + self.trainer.bias
            loss = self._loss(logits, targets, mask)
        gradients = tape.gradient(loss, self._variables)
        self._optimizer.apply_gradients(zip(gradients, self._variables))
        return loss

    def epoch(self, embeddings: np.ndarray, targets: np.ndarray, mask: np.ndarray, batch_size: int) -> float:
        """Take one pass over the windows in a shuffled order and return the mean loss.

        Args:
            embeddings: [windows, dim] float32.
            targets: [windows, K] float32.
            mask: [windows, K] float32, 1 where an entry counts in the loss.
        """
        order = self._rng.permutation(len(embeddings))
        losses = []
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            losses.append(float(self._step(
                tf.constant(embeddings[rows]), tf.constant(targets[rows]), tf.constant(mask[rows]),
            )))
        return float(np.mean(losses))


def _masked_cross_entropy(logits, targets, mask):
    entries = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits) * mask
    return tf.reduce_sum(entries) / tf.maximum(tf.reduce_sum(mask), 1.0)


def _run_pseudo_label(source_head, embeddings, settings, seed, recorder: _EpochRecorder) -> AdaptResult:
    trainer = _make_trainer(source_head, settings, seed)
    objective = _ObjectiveTrainer(trainer, "all", _masked_cross_entropy, settings.learning_rate,
                                  settings.dropout_rate, seed)
    for epoch in range(settings.epochs):
        probabilities = sigmoid(trainer.logits(embeddings))
        positive = probabilities >= settings.positive_threshold
        negative = probabilities <= settings.negative_threshold
        mask = (positive | negative).astype(np.float32)
        loss = objective.epoch(embeddings, positive.astype(np.float32), mask, settings.batch_size)
        recorder.record(trainer.export_head(epoch + 1), {
            "loss": loss, "positive_share": float(positive.mean()), "ignored_share": float(1.0 - mask.mean()),
        })
    return recorder.result()


def _run_tent(source_head, embeddings, settings, seed, recorder: _EpochRecorder) -> AdaptResult:
    def entropy(logits, targets, mask):
        return tf.reduce_mean(_binary_entropy(logits))

    trainer = _make_trainer(source_head, dataclasses.replace(settings, train_affine=True), seed, dropout_rate=0.0)
    objective = _ObjectiveTrainer(trainer, settings.tent_parameters, entropy, settings.learning_rate, 0.0, seed)
    unused = np.zeros((len(embeddings), len(source_head.labels)), dtype=np.float32)
    for epoch in range(settings.epochs):
        loss = objective.epoch(embeddings, unused, unused, settings.batch_size)
        recorder.record(trainer.export_head(epoch + 1), {"loss": loss})
    return recorder.result()


def _cluster_labels(features: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Compute SHOT's clustering pseudo-labels, per class as a binary problem.

    For each class, a positive centroid weights the features by p and a
    negative one by 1 - p. Each window takes the label of the centroid nearer
    by cosine. The centroids are then recomputed once from those hard labels.

    Args:
        features: [windows, dim] the adapted embeddings.
        probabilities: [windows, K] the current predictions.
    Returns:
        [windows, K] float32 hard labels.
    """
    units = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    weights = {True: probabilities, False: 1.0 - probabilities}
    labels = None
    for _ in range(2):
        similarity = {}
        for positive, weight in weights.items():
            centroids = weight.T @ units / np.maximum(weight.sum(axis=0), 1e-12)[:, None]
            centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
            similarity[positive] = units @ centroids.T
        labels = similarity[True] > similarity[False]
        weights = {True: labels.astype(np.float64), False: (~labels).astype(np.float64)}
    return labels.astype(np.float32)


def _run_shot(source_head, embeddings, settings, seed, recorder: _EpochRecorder) -> AdaptResult:
    def information_maximisation(logits, targets, mask):
        # NOTE: the diversity term raises the binary entropy of each class's
        # mean prediction over the batch, which pushes every class towards a
        # prevalence of 0.5. That is the multi-label reading of SHOT's
        # "uniform marginal", and it is wrong for rare species.
        entropy = tf.reduce_mean(_binary_entropy(logits))
        diversity = _mean_prediction_entropy(logits)
        cluster = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits))
        return entropy - settings.diversity_weight * diversity + settings.cluster_weight * cluster

    trainer = _make_trainer(source_head, dataclasses.replace(settings, train_affine=True), seed, dropout_rate=0.0)
    objective = _ObjectiveTrainer(trainer, "affine", information_maximisation, settings.learning_rate, 0.0, seed)
    mask = np.ones((len(embeddings), len(source_head.labels)), dtype=np.float32)
    for epoch in range(settings.epochs):
        features = objective.features(tf.constant(embeddings)).numpy().astype(np.float64)
        targets = _cluster_labels(features, sigmoid(trainer.logits(embeddings)))
        loss = objective.epoch(embeddings, targets, mask, settings.batch_size)
        recorder.record(trainer.export_head(epoch + 1), {"loss": loss, "cluster_positive_share": float(targets.mean())})
    return recorder.result()


def _neighbour_affinity_targets(features: np.ndarray, probabilities: np.ndarray, k: int,
                                 expanded_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Sum the stored predictions of each window's neighbourhood, weighted as in NRC.

    A window's own prediction has weight 1. Each of its k - 1 nearest
    neighbours has weight 1 when the window is also among that neighbour's
    k - 1 nearest (reciprocal), and ``expanded_weight`` otherwise. Each
    neighbour's own k - 1 nearest neighbours, the window itself left out, form
    the expanded neighbourhood with weight ``expanded_weight``.

    Args:
        features: [windows, dim] the adapted embeddings.
        probabilities: [windows, K] the stored predictions.
    Returns:
        The weighted sum of predictions [windows, K] and the sum of weights [windows, 1], float32.
    """
    windows = len(features)
    buffer = NeighbourBuffer(capacity=windows, dim=features.shape[1], k=k)
    buffer.add(features)
    neighbours = buffer.neighbours().astype(np.int64)
    valid = neighbours >= 0
    safe = np.where(valid, neighbours, 0)
    rows = np.arange(windows)[:, None]

    reciprocal = valid & (neighbours[safe] == rows[:, :, None]).any(axis=2)
    weights = np.where(reciprocal, 1.0, expanded_weight) * valid
    targets = probabilities.astype(np.float64).copy()
    total = 1.0 + weights.sum(axis=1)
    for slot in range(neighbours.shape[1]):
        targets += weights[:, slot : slot + 1] * probabilities[safe[:, slot]]

    expanded = neighbours[safe].reshape(windows, -1)
    expanded_valid = (np.repeat(valid, neighbours.shape[1], axis=1) & (expanded >= 0) & (expanded != rows))
    expanded_safe = np.where(expanded_valid, expanded, 0)
    for slot in range(expanded.shape[1]):
        targets += expanded_weight * expanded_valid[:, slot : slot + 1] * probabilities[expanded_safe[:, slot]]
    total += expanded_weight * expanded_valid.sum(axis=1)
    return targets.astype(np.float32), total[:, None].astype(np.float32)


def _run_nrc(source_head, embeddings, settings, seed, recorder: _EpochRecorder) -> AdaptResult:
    """NRC (neighbourhood reciprocity clustering), per class as a binary problem, classifier frozen.

    The loss raises the agreement ``s_j * p_i + (1 - s_j) * (1 - p_i)`` between
    each window's prediction p_i and the stored predictions s_j of its
    neighbourhood, weighted by ``_neighbour_affinity_targets``, and adds the
    diversity term of SHOT. Neighbours and stored predictions are recomputed
    once per epoch, where NRC updates its memory bank every batch.
    """

    def neighbourhood_agreement(logits, targets, mask):
        # Here targets carries the weighted sum of neighbour predictions and mask the sum of weights.
        probabilities = tf.sigmoid(logits)
        agreement = targets * probabilities + (mask - targets) * (1.0 - probabilities)
        return -tf.reduce_mean(agreement) - settings.diversity_weight * _mean_prediction_entropy(logits)

    trainer = _make_trainer(source_head, dataclasses.replace(settings, train_affine=True), seed, dropout_rate=0.0)
    objective = _ObjectiveTrainer(trainer, "affine", neighbourhood_agreement, settings.learning_rate, 0.0, seed)
    classes = len(source_head.labels)
    for epoch in range(settings.epochs):
        features = objective.features(tf.constant(embeddings)).numpy()
        targets, weight_sums = _neighbour_affinity_targets(
            features, sigmoid(trainer.logits(embeddings)), settings.k, settings.nrc_expanded_weight)
        loss = objective.epoch(embeddings, targets, np.repeat(weight_sums, classes, axis=1), settings.batch_size)
        recorder.record(trainer.export_head(epoch + 1), {"loss": loss})
    return recorder.result()


def _run_dust(source_head, embeddings, settings, seed, recorder: _EpochRecorder) -> AdaptResult:
    """DUST (dropout-based uncertainty-driven self-training), per class as a binary problem.

    Each epoch, the hard pseudo-labels come from the head without dropout
    (positive at ``positive_threshold``). ``dust_passes`` forward passes with
    dropout then score each window's uncertainty as the largest absolute
    difference between a dropout probability and the clean one, over passes
    and classes. Only windows at or below ``dust_max_uncertainty`` enter the
    binary cross-entropy, which trains with dropout.
    """
    trainer = _make_trainer(source_head, settings, seed)
    objective = _ObjectiveTrainer(trainer, "all", _masked_cross_entropy, settings.learning_rate,
                                  settings.dropout_rate, seed)
    rng = np.random.default_rng(seed)
    keep_probability = 1.0 - settings.dropout_rate
    for epoch in range(settings.epochs):
        head = trainer.export_head(epoch)
        clean = sigmoid(head.logits(embeddings))
        uncertainty = np.zeros(len(embeddings))
        for _ in range(settings.dust_passes):
            keep_mask = rng.uniform(size=embeddings.shape) < keep_probability
            dropped = np.where(keep_mask, embeddings / keep_probability, 0.0).astype(np.float32)
            uncertainty = np.maximum(uncertainty, np.abs(sigmoid(head.logits(dropped)) - clean).max(axis=1))

        certain = uncertainty <= settings.dust_max_uncertainty
        targets = (clean >= settings.positive_threshold).astype(np.float32)
        mask = np.repeat(certain[:, None], clean.shape[1], axis=1).astype(np.float32)
        loss = objective.epoch(embeddings, targets, mask, settings.batch_size) if certain.any() else float("nan")
        recorder.record(trainer.export_head(epoch + 1), {"loss": loss, "kept_share": float(certain.mean())})
    return recorder.result()


_METHODS: dict[str, Callable[..., AdaptResult]] = {
    "source": _run_source,
    "prior-shift": _run_prior_shift,
    "notela": _run_notela_offline,
    **{name: _streaming_variant(name) for name in STREAMING_VARIANTS},
    "dropout-student": _run_dropout_student,
    "pseudo-label": _run_pseudo_label,
    "tent": _run_tent,
    "shot": _run_shot,
    "nrc": _run_nrc,
    "dust": _run_dust,
}

METHODS = tuple(_METHODS)
if METHODS != METHOD_NAMES:
    raise ImportError(f"methods {METHODS} differ from dawnchorus.evaluation.METHOD_NAMES {METHOD_NAMES}")


def adapt(method: str, source_head: LinearHead, embeddings: np.ndarray, hyper: dict | None = None,
          seed: int = 0) -> AdaptResult:
    """Adapt the source head to a domain's windows with one method.

    Args:
        method: one of ``METHODS``.
        source_head: the source head over the site classes [K, dim].
        embeddings: [windows, dim] float32, in recording order.
        hyper: fields of ``MethodSettings`` to override.
        seed: seed of dropout masks, batch order and the affine-free parts of training.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown adaptation method {method!r}; choose one of {', '.join(METHODS)}")
    known = {field.name for field in dataclasses.fields(MethodSettings)}
    unknown = sorted(set(hyper or {}) - known)
    if unknown:
        raise ValueError(f"unknown hyperparameters {unknown} for {method!r}; known ones are {sorted(known)}")
    settings = MethodSettings(**(hyper or {}))

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != source_head.weights.shape[1] or len(embeddings) < 2:
        raise ValueError(
            f"embeddings must be [windows >= 2, {source_head.weights.shape[1]}] to match the head, "
            f"got shape {embeddings.shape}"
        )

    _LOGGER.info("adapting with %s: %d windows, %d classes, seed %d", method, len(embeddings),
                 len(source_head.labels), seed)
    source_logits = source_head.logits(embeddings)
    recorder = _EpochRecorder(method, embeddings, source_logits, _guard_config(settings))
    return _METHODS[method](source_head, embeddings, settings, seed, recorder)
