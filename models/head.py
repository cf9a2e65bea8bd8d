"""The classifier head: a linear layer from the 1024-d embedding to a site's classes.

A head is pushed to recorders as a TFLite file (see ``models.export`` on the
base station). On a recorder it runs on LiteRT; the source head, which comes
from BirdNET's own weights, also runs as plain numpy before any head has been
pushed.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol, Sequence

import numpy as np

from dawnchorus.models.runtime import check_runtime_supports, make_interpreter

_LOGGER = logging.getLogger(__name__)

# BirdNET clips logits before its sigmoid; beyond +-20 the float64 sigmoid is
# within 2e-9 of 0 or 1 anyway, and exp() cannot overflow.
_LOGIT_CLIP = 20.0


def sigmoid(logits: np.ndarray, sensitivity: float = 1.0) -> np.ndarray:
    """BirdNET's output scores: ``1 / (1 + exp(-sensitivity * logit))``.

    Args:
        logits: any shape, float32 or float64.
        sensitivity: BirdNET's sigmoid sensitivity, 0.5 to 1.5; higher values
            push scores towards 0 and 1.
    """
    clipped = np.clip(np.asarray(logits, dtype=np.float64) * sensitivity, -_LOGIT_CLIP, _LOGIT_CLIP)
    return 1.0 / (1.0 + np.exp(-clipped))


@dataclasses.dataclass
class LinearHead:
    """A linear head in numpy.

    Attributes:
        labels: the K class labels, ``Scientific name_Common name``.
        weights: [K, 1024] float32.
        bias: [K] float32.
        version: head version; 0 is the unadapted source head.
    """

    labels: list[str]
    weights: np.ndarray
    bias: np.ndarray
    version: int = 0

    def __post_init__(self):
        self.weights = np.ascontiguousarray(self.weights, dtype=np.float32)
        self.bias = np.ascontiguousarray(self.bias, dtype=np.float32)
        if self.weights.shape != (len(self.labels), self.weights.shape[1]):
            raise ValueError(f"weights {self.weights.shape} do not match {len(self.labels)} labels")
        if self.bias.shape != (len(self.labels),):
            raise ValueError(f"bias {self.bias.shape} does not match {len(self.labels)} labels")

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Return logits [windows, K] float32 for embeddings [windows, 1024]."""
        return np.asarray(embeddings, dtype=np.float32) @ self.weights.T + self.bias

    def select(self, labels: Sequence[str]) -> LinearHead:
        """Return the head restricted to ``labels``, in that order."""
        position = {label: i for i, label in enumerate(self.labels)}
        missing = [label for label in labels if label not in position]
        if missing:
            raise KeyError(f"labels not in the head: {missing[:5]} ({len(missing)} in all)")
        rows = np.array([position[label] for label in labels], dtype=np.int64)
        return LinearHead(list(labels), self.weights[rows], self.bias[rows], self.version)


class HeadRunner(Protocol):
    """Anything that maps embeddings [windows, 1024] to logits [windows, K]."""

    labels: list[str]
    version: int

    def logits(self, embeddings: np.ndarray) -> np.ndarray: ...


class TFLiteHead:
    """A head exported as TFLite, run on LiteRT or tflite-runtime. Not thread-safe."""

    def __init__(self, model: bytes, labels: Sequence[str], version: int, num_threads: int = 1):
        self.labels = list(labels)
        self.version = version
        check_runtime_supports(model)
        self._interpreter = make_interpreter(model_content=model, num_threads=num_threads)
        input_details = self._interpreter.get_input_details()
        output_details = self._interpreter.get_output_details()
        if len(input_details) != 1 or len(output_details) != 1:
            raise ValueError("a head model must have exactly one input and one output")
        self._input = input_details[0]["index"]
        self._output = output_details[0]["index"]
        self.embedding_dim = int(input_details[0]["shape"][-1])
        classes = int(output_details[0]["shape"][-1])
        if classes != len(self.labels):
            raise ValueError(f"the head model has {classes} outputs but {len(self.labels)} labels")
        self._batch = int(input_details[0]["shape"][0])

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Return logits [windows, K] float32 for embeddings [windows, dim]."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"expected embeddings [n, {self.embedding_dim}], got {embeddings.shape}")
        if embeddings.shape[0] != self._batch:
            self._interpreter.resize_tensor_input(self._input, [embeddings.shape[0], self.embedding_dim])
            self._interpreter.allocate_tensors()
            self._batch = embeddings.shape[0]
        self._interpreter.set_tensor(self._input, embeddings)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output).copy()
