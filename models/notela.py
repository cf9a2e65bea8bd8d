"""NOTELA (Boudiaf, Denton, van Merriënboer, Dumoulin and Triantafillou, ICML
2023) on the classifier head.

The teacher step moves each window's per-class probability towards the mean
probability of its mutual nearest neighbours (a Laplacian term with weight
``lam``). The student step trains the head, optionally with a per-dimension
affine on the embedding, by binary cross-entropy against those soft targets,
with dropout on its input as the only noise. With ``lam = 0`` the targets are
the teacher's own probabilities, which is Dropout Student.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

# TensorFlow reads this once, at import, so it only takes effect when this
# module imports TensorFlow first. Level 2 hides TensorFlow's C++ INFO and
# WARNING lines but keeps its errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

from dawnchorus.models.head import LinearHead, sigmoid  # noqa: E402

_LOGGER = logging.getLogger(__name__)

# Rows per forward pass in HeadTrainer.logits: 8192 x 1024 float32 inputs are
# 32 MiB, small on a GPU or a base station, and large enough that the call
# overhead per batch does not matter.
_FORWARD_BATCH = 8192

_OPTIMIZER_PREFIX = "optimizer/"


def _validate_targets_input(logits: np.ndarray, neighbours: np.ndarray, lam: float, alpha: float) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be [windows, classes], got shape {logits.shape}")
    if neighbours.ndim != 2 or neighbours.shape[0] != logits.shape[0]:
        raise ValueError(
            f"neighbours must be [windows, k - 1] with {logits.shape[0]} rows to match the "
            f"logits, got shape {neighbours.shape}"
        )
    if not np.issubdtype(neighbours.dtype, np.integer):
        raise ValueError(f"neighbours must contain integer row indices, got dtype {neighbours.dtype}")
    if neighbours.size and (neighbours.min() < -1 or neighbours.max() >= logits.shape[0]):
        raise ValueError(
            f"neighbour indices must be -1 (no neighbour) or in [0, {logits.shape[0]}), got "
            f"values from {neighbours.min()} to {neighbours.max()}"
        )
    if not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number, got {lam}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha}")


def _target_logits(logits: np.ndarray, neighbours: np.ndarray, lam: float, alpha: float) -> tf.Tensor:
    """Validate the inputs and compute the pseudo-labels in logit space.

    Args:
        logits: [windows, K] float32.
        neighbours: [windows, m] int, -1 for an empty slot.
    Returns:
        [windows, K] float32, ``logit / alpha + (lam / alpha) * (2 * mean_p - 1)``.
    """
    logits = np.asarray(logits, dtype=np.float32)
    neighbours = np.asarray(neighbours)
    _validate_targets_input(logits, neighbours, lam, alpha)
    logits = tf.convert_to_tensor(logits)
    neighbours = tf.convert_to_tensor(neighbours, dtype=tf.int64)

    probabilities = tf.sigmoid(logits)
    valid = neighbours >= 0
    rows = tf.where(valid, neighbours, tf.zeros_like(neighbours))

    # One gather per neighbour slot keeps memory at [windows, K], where a single
    # gather of all slots would need [windows, m, K].
    total = tf.zeros_like(probabilities)
    for slot in range(neighbours.shape[1]):
        gathered = tf.gather(probabilities, rows[:, slot])
        total += tf.where(valid[:, slot : slot + 1], gathered, tf.zeros_like(gathered))

    count = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1, keepdims=True)
    mean = total / tf.maximum(count, 1.0)
    laplacian = tf.where(count > 0, (lam / alpha) * (2.0 * mean - 1.0), tf.zeros_like(mean))
    return logits / alpha + laplacian


def notela_targets(
    logits: np.ndarray, neighbours: np.ndarray, lam: float = 1.0, alpha: float = 1.0
) -> np.ndarray:
    """Compute NOTELA's soft pseudo-labels (the teacher step).

    For each window i and class, ``y ∝ p_i ** (1 / alpha) * exp((lam / alpha) *
    mean_j p_j)`` over {negative, positive}, with j over the mutual neighbours
    of i. In logit space the positive part is ``sigmoid(logit_i / alpha +
    (lam / alpha) * (2 * mean_j p_j - 1))``, which is what is computed, because
    float32 probabilities saturate. A window without mutual neighbours gets
    ``sigmoid(logit_i / alpha)``.

    Args:
        logits: [windows, K] float32, the teacher's logits without dropout.
        neighbours: [windows, k - 1] int, row indices of each window's mutual
            nearest neighbours, nearest first, -1 for an empty slot.
        lam: weight of the neighbour term. 0 gives Dropout Student.
        alpha: temperature, > 0. Values below 1 sharpen the targets.
    Returns:
        [windows, K] float32 targets in [0, 1].
    """
    return tf.sigmoid(_target_logits(logits, neighbours, lam, alpha)).numpy()


class HeadTrainer:
    """The student: a linear head, optionally after a per-dimension affine on the
    embedding, trained with Adam and input dropout.

    Its logits are ``(embeddings * scale + shift) @ weights.T + bias + offset``.
    All variables start from the source head, with ``scale = 1`` and ``shift = 0``.
    ``offset`` is a fixed per-class logit offset, zero unless ``set_offset``
    sets it (the base station puts the prior shift there). It is not trained
    and not part of ``get_state``: the caller sets it again before each use.

    Attributes:
        labels: the K class labels of the source head.
        weights: [K, dim] float32 variable.
        bias: [K] float32 variable.
        scale: [dim] float32 variable, or None without the affine.
        shift: [dim] float32 variable, or None without the affine.
        offset: [K] float32 variable, not trained.
    """

    def __init__(
        self,
        source: LinearHead,
        learning_rate: float = 1e-3,
        dropout_rate: float = 0.1,
        train_affine: bool = True,
        seed: int = 0,
    ):
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        if not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {learning_rate}")

        self.labels = list(source.labels)
        self._dropout_rate = float(dropout_rate)
        classes, dim = source.weights.shape
        self._dim = dim

        self.weights = tf.Variable(source.weights, name="weights")
        self.bias = tf.Variable(source.bias, name="bias")
        self.scale: tf.Variable | None = None
        self.shift: tf.Variable | None = None
        if train_affine:
            self.scale = tf.Variable(tf.ones([dim]), name="scale")
            self.shift = tf.Variable(tf.zeros([dim]), name="shift")
        self._variables = [v for v in (self.weights, self.bias, self.scale, self.shift) if v is not None]
        self.offset = tf.Variable(tf.zeros([classes]), trainable=False, name="offset")

        self._optimizer = tf.keras.optimizers.Adam(learning_rate)
        self._optimizer.build(self._variables)
        self._dropout_generator = tf.random.Generator.from_seed(seed)
        self._batch_rng = np.random.default_rng(seed)

        embeddings_spec = tf.TensorSpec([None, dim], tf.float32)
        self._forward = tf.function(self._head_logits, input_signature=[embeddings_spec])
        self._train_step = tf.function(
            self._step,
            input_signature=[
                embeddings_spec,
                tf.TensorSpec([None, classes], tf.float32),
                tf.TensorSpec([None], tf.int64),
            ],
        )
        _LOGGER.info(
            "head trainer: %d classes, source version %d, affine %s, learning rate %g, dropout %g",
            classes, source.version, train_affine, learning_rate, dropout_rate,
        )

    def _head_logits(self, embeddings: tf.Tensor) -> tf.Tensor:
        if self.scale is not None:
            embeddings = embeddings * self.scale + self.shift
        return tf.matmul(embeddings, self.weights, transpose_b=True) + self.bias + self.offset

    def _step(self, embeddings: tf.Tensor, targets: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        batch = tf.gather(embeddings, rows)
        batch_targets = tf.gather(targets, rows)

        keep = self._dropout_generator.uniform(tf.shape(batch)) >= self._dropout_rate
        dropped = tf.where(keep, batch / (1.0 - self._dropout_rate), tf.zeros_like(batch))

        with tf.GradientTape() as tape:
            logits = self._head_logits(dropped)
            loss = tf.reduce_mean(
                tf.nn.sigmoid_cross_entropy_with_logits(labels=batch_targets, logits=logits)
            )
        gradients = tape.gradient(loss, self._variables)
        self._optimizer.apply_gradients(zip(gradients, self._variables))
        return loss

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Compute logits without dropout (the teacher's view).

        Args:
            embeddings: [windows, dim] float32.
        Returns:
            [windows, K] float32.
        """
        embeddings = self._check_embeddings(embeddings)
        chunks = [
            self._forward(tf.convert_to_tensor(embeddings[start : start + _FORWARD_BATCH])).numpy()
            for start in range(0, embeddings.shape[0], _FORWARD_BATCH)
        ]
        if not chunks:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.concatenate(chunks)

    def fit(self, embeddings: np.ndarray, targets: np.ndarray, steps: int, batch_size: int = 256) -> float:
        """Take ``steps`` Adam steps on minibatches and return the mean training loss.

        Minibatches walk through a shuffled order of the windows, reshuffled
        whenever it runs out, so every window is seen equally often. The loss is
        binary cross-entropy with dropout on, averaged over windows and classes.

        Args:
            embeddings: [windows, dim] float32.
            targets: [windows, K] float32 soft targets in [0, 1].
            steps: number of optimizer steps; 0 trains nothing and returns NaN.
            batch_size: windows per step, capped at the number of windows.
        """
        embeddings = self._check_embeddings(embeddings)
        targets = np.asarray(targets, dtype=np.float32)
        if targets.shape != (embeddings.shape[0], len(self.labels)):
            raise ValueError(
                f"targets must be [{embeddings.shape[0]}, {len(self.labels)}] to match the "
                f"embeddings and labels, got {targets.shape}"
            )
        if embeddings.shape[0] == 0:
            raise ValueError("embeddings are empty: fit needs at least one window")
        if steps < 0 or batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {steps} and {batch_size}")
        if steps == 0:
            return float("nan")

        embeddings_tensor = tf.convert_to_tensor(embeddings)
        targets_tensor = tf.convert_to_tensor(targets)
        windows = embeddings.shape[0]
        batch_size = min(batch_size, windows)

        order = self._batch_rng.permutation(windows)
        position = 0
        losses = []
        for _ in range(steps):
            if position + batch_size > windows:
                order = self._batch_rng.permutation(windows)
                position = 0
            rows = tf.convert_to_tensor(order[position : position + batch_size], dtype=tf.int64)
            position += batch_size
            losses.append(self._train_step(embeddings_tensor, targets_tensor, rows))

        return float(tf.reduce_mean(tf.stack(losses)).numpy())

    def set_offset(self, offset: np.ndarray) -> None:
        """Set the fixed per-class logit offset [K]; zeros remove it."""
        offset = np.asarray(offset, dtype=np.float32)
        if offset.shape != (len(self.labels),) or not np.isfinite(offset).all():
            raise ValueError(f"offset must be [{len(self.labels)}] finite values, got shape {offset.shape}")
        self.offset.assign(offset)

    def export_head(self, version: int) -> LinearHead:
        """Return the trained head with the affine and the offset folded in.

        ``W' = W * scale`` and ``b' = b + W @ shift + offset``, so a recorder
        runs one linear layer. The fold is computed in float64, then stored as
        float32.
        """
        weights = self.weights.numpy().astype(np.float64)
        bias = self.bias.numpy().astype(np.float64) + self.offset.numpy().astype(np.float64)
        if self.scale is not None:
            bias = bias + weights @ self.shift.numpy().astype(np.float64)
            weights = weights * self.scale.numpy().astype(np.float64)[None, :]
        return LinearHead(self.labels, weights.astype(np.float32), bias.astype(np.float32), version)

    def get_state(self) -> dict[str, np.ndarray]:
        """Return copies of the variables and the Adam state, keyed by name.

        Keys are ``weights``, ``bias``, ``scale`` and ``shift`` (with the affine)
        and ``optimizer/...`` for Adam's step count and moments. The learning
        rate is not part of the state. The random generators are not saved
        either, so dropout masks and batch order differ after a restore.
        """
        state = {variable.name.split(":")[0]: variable.numpy() for variable in self._variables}
        for key, variable in self._optimizer_state().items():
            state[key] = np.array(variable.numpy())
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Load a state returned by ``get_state``. The Adam entries are optional.

        Raises:
            ValueError: a variable is missing, has another shape, or the state
                has keys this trainer does not have (for example an affine
                state loaded into a trainer built with ``train_affine=False``).
        """
        variables = {variable.name.split(":")[0]: variable for variable in self._variables}
        optimizer_variables = self._optimizer_state()
        missing = sorted(set(variables) - set(state))
        unknown = sorted(set(state) - set(variables) - set(optimizer_variables))
        if missing or unknown:
            raise ValueError(
                f"state does not match this trainer: missing {missing}, unknown {unknown}. "
                "Build the trainer with the same labels and train_affine setting as the saved one"
            )

        targets = {**variables, **{key: optimizer_variables[key] for key in state if key in optimizer_variables}}
        for key, variable in targets.items():
            value = np.asarray(state[key])
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(f"state entry {key!r} has shape {value.shape}, expected {tuple(variable.shape)}")
        for key, variable in targets.items():
            variable.assign(tf.cast(state[key], tf.as_dtype(variable.dtype)))

    def _optimizer_state(self) -> dict[str, tf.Variable]:
        # Keras prefixes each path with the optimizer's name, which it makes
        # unique per process ("adam", "adam_1", ...), so the prefix is replaced
        # by a fixed one. The learning rate is configuration, not state.
        state = {}
        for variable in self._optimizer.variables:
            name = variable.path.removeprefix(self._optimizer.name + "/")
            if name != "learning_rate":
                state[_OPTIMIZER_PREFIX + name] = variable
        return state

    def _check_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self._dim:
            raise ValueError(f"expected embeddings [windows, {self._dim}], got shape {embeddings.shape}")
        return embeddings


def notela_round(
    trainer: HeadTrainer,
    embeddings: np.ndarray,
    neighbours: np.ndarray,
    lam: float,
    alpha: float,
    steps: int,
    batch_size: int = 256,
) -> dict[str, float]:
    """Run one teacher step and ``steps`` student steps on a buffer.

    Args:
        trainer: the student, also used without dropout as the teacher.
        embeddings: [windows, dim] float32, the buffer.
        neighbours: [windows, k - 1] int, mutual neighbours as in ``notela_targets``.
    Returns:
        ``mean_target``, ``mean_teacher_probability``, ``mean_top_score`` (the
        teacher's highest probability per window, averaged), ``top_class_changed``
        (share of windows whose pseudo-label has another top class than the
        teacher's logits) and ``loss`` (the student's mean training loss).
    """
    teacher_logits = trainer.logits(embeddings)
    if teacher_logits.shape[0] == 0:
        raise ValueError("cannot run a NOTELA round on an empty buffer")

    target_logits = _target_logits(teacher_logits, neighbours, lam, alpha)
    targets = tf.sigmoid(target_logits).numpy()
    teacher_probabilities = sigmoid(teacher_logits)

    # Ranked by logits, because float32 probabilities tie at 1.0.
    changed = np.argmax(target_logits.numpy(), axis=1) != np.argmax(teacher_logits, axis=1)

    loss = trainer.fit(embeddings, targets, steps, batch_size)
    return {
        "mean_target": float(targets.mean()),
        "mean_teacher_probability": float(teacher_probabilities.mean()),
        "mean_top_score": float(teacher_probabilities.max(axis=1).mean()),
        "top_class_changed": float(changed.mean()),
        "loss": loss,
    }
