"""Export a linear head as a TFLite flatbuffer for the recorders.

The model has one input, embeddings [batch, dim] float32 with a resizable
batch dimension, and one output, logits [batch, K] float32. In fp32 the graph
is a single FULLY_CONNECTED operator. In fp16 the weights are stored as
float16 and a DEQUANTIZE operator turns them back to float32 before the
FULLY_CONNECTED, so inputs, outputs and arithmetic stay float32.
"""

from __future__ import annotations

import logging
import os
import time

# TensorFlow reads this once, at import, so it only takes effect when this
# module imports TensorFlow first. Level 2 hides the converter's C++ INFO and
# WARNING lines (temporary SavedModel paths, ignored flags) but keeps errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

from dawnchorus.models.head import LinearHead  # noqa: E402

_LOGGER = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")


class _HeadModule(tf.Module):
    """``embeddings @ weights.T + bias``, with the weights as graph constants."""

    def __init__(self, head: LinearHead):
        super().__init__()
        self._weights = tf.constant(head.weights)
        self._bias = tf.constant(head.bias)

    def logits(self, embeddings: tf.Tensor) -> tf.Tensor:
        return tf.matmul(embeddings, self._weights, transpose_b=True) + self._bias


def head_to_tflite(head: LinearHead, precision: str = "fp32") -> bytes:
    """Convert a head to a TFLite flatbuffer that ``TFLiteHead`` loads.

    Args:
        head: the head to export. Its labels are not stored in the model.
        precision: "fp32", or "fp16" for float16 weights at half the size.
            Inputs and outputs are float32 either way.
    Returns:
        The flatbuffer, input [batch, dim] float32, output [batch, K] float32.
    Raises:
        ValueError: the precision is not one of ``PRECISIONS``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"invalid precision {precision!r}: use one of {', '.join(PRECISIONS)}")

    started = time.perf_counter()
    module = _HeadModule(head)
    signature = tf.TensorSpec([None, head.weights.shape[1]], tf.float32, name="embeddings")
    function = tf.function(module.logits, input_signature=[signature]).get_concrete_function()

    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], module)
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    model = converter.convert()

    _LOGGER.info(
        "exported head version %d: %d classes, %s, %d bytes in %.2f s",
        head.version, len(head.labels), precision, len(model), time.perf_counter() - started,
    )
    return model
