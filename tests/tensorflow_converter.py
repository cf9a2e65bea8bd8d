"""TensorFlow's TFLiteConverter for heads, as ``models/export.py`` used it before it wrote the flatbuffer itself.

Tests compare the written heads with the converter's, and build heads that
the exporter does not make (dynamic-range int8). Not for the base station:
the converter leaks native memory on every call (tensorflow/tensorflow#122598).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

from dawnchorus.models.head import LinearHead  # noqa: E402


class HeadModule(tf.Module):
    """``embeddings @ weights.T + bias``, with the weights as graph constants."""

    def __init__(self, head: LinearHead):
        super().__init__()
        self._weights = tf.constant(head.weights)
        self._bias = tf.constant(head.bias)

    def logits(self, embeddings: tf.Tensor) -> tf.Tensor:
        return tf.matmul(embeddings, self._weights, transpose_b=True) + self._bias


def convert(head: LinearHead, precision: str = "fp32") -> bytes:
    """Convert ``head`` with TFLiteConverter: "fp32", "fp16" (float16 weights) or "int8" (dynamic range)."""
    module = HeadModule(head)
    signature = tf.TensorSpec([None, head.weights.shape[1]], tf.float32, name="embeddings")
    function = tf.function(module.logits, input_signature=[signature]).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], module)
    if precision in ("fp16", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()
