"""Export a linear head as a TFLite flatbuffer for the recorders.

The model has one input, embeddings [batch, dim] float32 with a resizable
batch dimension, and one output, logits [batch, K] float32. In fp32 the graph
is a single FULLY_CONNECTED operator. In fp16 the weights and the bias are
stored as float16, and a DEQUANTIZE operator turns each back to float32
before the FULLY_CONNECTED, so inputs, outputs and arithmetic stay float32.

The flatbuffer is written directly with the TFLite schema module that the
LiteRT wheel ships, not with TensorFlow's ``TFLiteConverter``. The converter
of TensorFlow 2.20 and 2.21 keeps native memory after ``convert()`` returns
(tensorflow/tensorflow#122598), and a base station converts a head every
round. In a loop of 1,200 fp16 conversions of a 199-class head (TensorFlow
2.21, x86), the RSS grew by about 90 MiB over the first 200 calls and then
stayed about 105 MiB above its start. This writer added nothing measurable
over 600 calls.

The graph written here is the one the converter made for the same head: the
same operators, operator versions, tensor types and shapes. So LiteRT and
tflite-runtime run it with the same kernels and give the same logits
(tests/test_export.py compares them), and TensorFlow is not needed to write
it.
"""

from __future__ import annotations

import logging
import time

import flatbuffers
import numpy as np

from dawnchorus.models.head import LinearHead

_LOGGER = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")

# Operator versions as TensorFlow 2.21's converter writes them for this graph:
# FULLY_CONNECTED with float32 tensors is version 1, DEQUANTIZE from float16
# is version 3. A runtime rejects an operator version that it does not know,
# so these must stay versions that tflite-runtime 2.14 has.
_FULLY_CONNECTED_VERSION = 1
_DEQUANTIZE_FP16_VERSION = 3

# Byte alignment of the constant buffers inside the file. 16 covers every
# element type and SIMD load, so kernels can read the weights in place.
_BUFFER_ALIGNMENT = 16

_FILE_IDENTIFIER = b"TFL3"
_SCHEMA_VERSION = 3

# Names of the signature and of its input and output, as the converter named them.
_SIGNATURE = "serving_default"
_INPUT_NAME = "embeddings"
_OUTPUT_NAME = "output_0"


class _AlignedBuffer:
    """A TFLite ``Buffer`` whose bytes start on a ``_BUFFER_ALIGNMENT`` boundary.

    It replaces the schema's ``BufferT`` in ``ModelT.buffers``, because the
    generated ``BufferT.Pack`` aligns a uint8 vector to 1 byte only.
    """

    def __init__(self, data: bytes):
        self.data = data

    def Pack(self, builder: flatbuffers.Builder) -> int:  # noqa: N802 (the schema's method name)
        from ai_edge_litert import schema_py_generated as schema

        builder.StartVector(1, len(self.data), _BUFFER_ALIGNMENT)
        builder.head -= len(self.data)
        builder.Bytes[builder.head:builder.head + len(self.data)] = self.data
        data = builder.EndVector()
        schema.BufferStart(builder)
        schema.BufferAddData(builder, data)
        return schema.BufferEnd(builder)


def _tensor(schema, name: str, shape: list[int], tensor_type: int, buffer: int, batch: bool = False):
    tensor = schema.TensorT()
    tensor.name = name
    tensor.shape = np.array(shape, dtype=np.int32)
    if batch:
        # The stored batch of 1 can be resized, which -1 in the shape signature marks.
        tensor.shapeSignature = np.array([-1, *shape[1:]], dtype=np.int32)
    tensor.type = tensor_type
    tensor.buffer = buffer
    tensor.hasRank = True
    return tensor


def _operator_code(schema, builtin: int, version: int):
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    # Codes below 127 are also kept in the deprecated int8 field, which older runtimes read.
    code.deprecatedBuiltinCode = min(builtin, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
    code.version = version
    return code


def _operator(schema, opcode_index: int, inputs: list[int], outputs: list[int], options=None):
    operator = schema.OperatorT()
    operator.opcodeIndex = opcode_index
    operator.inputs = np.array(inputs, dtype=np.int32)
    operator.outputs = np.array(outputs, dtype=np.int32)
    if options is not None:
        operator.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
        operator.builtinOptions = options
    return operator


def _signature(schema, input_index: int, output_index: int):
    def entry(name: str, index: int):
        tensor_map = schema.TensorMapT()
        tensor_map.name = name
        tensor_map.tensorIndex = index
        return tensor_map

    signature = schema.SignatureDefT()
    signature.signatureKey = _SIGNATURE
    signature.inputs = [entry(_INPUT_NAME, input_index)]
    signature.outputs = [entry(_OUTPUT_NAME, output_index)]
    signature.subgraphIndex = 0
    return signature


def _build(head: LinearHead, precision: str) -> bytes:
    from ai_edge_litert import schema_py_generated as schema

    classes, dim = head.weights.shape
    float32, float16 = schema.TensorType.FLOAT32, schema.TensorType.FLOAT16
    stored = np.float16 if precision == "fp16" else np.float32
    # Buffer 0 is the empty buffer that every tensor without constant data points at.
    buffers = [schema.BufferT(),
               _AlignedBuffer(np.ascontiguousarray(head.weights, dtype="<f4").astype(stored).tobytes()),
               _AlignedBuffer(np.ascontiguousarray(head.bias, dtype="<f4").astype(stored).tobytes())]

    tensors = [_tensor(schema, f"serving_default_{_INPUT_NAME}:0", [1, dim], float32, 0, batch=True)]
    fully_connected = schema.FullyConnectedOptionsT()
    if precision == "fp16":
        tensors += [
            _tensor(schema, "weights_fp16", [classes, dim], float16, 1),
            _tensor(schema, "bias_fp16", [classes], float16, 2),
            _tensor(schema, "weights", [classes, dim], float32, 0),
            _tensor(schema, "bias", [classes], float32, 0),
        ]
        codes = [_operator_code(schema, schema.BuiltinOperator.DEQUANTIZE, _DEQUANTIZE_FP16_VERSION),
                 _operator_code(schema, schema.BuiltinOperator.FULLY_CONNECTED, _FULLY_CONNECTED_VERSION)]
        operators = [_operator(schema, 0, [1], [3]), _operator(schema, 0, [2], [4]),
                     _operator(schema, 1, [0, 3, 4], [5], fully_connected)]
    else:
        tensors += [
            _tensor(schema, "weights", [classes, dim], float32, 1),
            _tensor(schema, "bias", [classes], float32, 2),
        ]
        codes = [_operator_code(schema, schema.BuiltinOperator.FULLY_CONNECTED, _FULLY_CONNECTED_VERSION)]
        operators = [_operator(schema, 0, [0, 1, 2], [3], fully_connected)]
    output = len(tensors)
    tensors.append(_tensor(schema, "logits", [1, classes], float32, 0, batch=True))

    subgraph = schema.SubGraphT()
    subgraph.tensors = tensors
    subgraph.inputs = np.array([0], dtype=np.int32)
    subgraph.outputs = np.array([output], dtype=np.int32)
    subgraph.operators = operators
    subgraph.name = "main"

    model = schema.ModelT()
    model.version = _SCHEMA_VERSION
    model.description = "dawnchorus head"
    model.operatorCodes = codes
    model.subgraphs = [subgraph]
    model.buffers = buffers
    model.signatureDefs = [_signature(schema, 0, output)]

    builder = flatbuffers.Builder(head.weights.nbytes + 4096)
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())


def head_to_tflite(head: LinearHead, precision: str = "fp32") -> bytes:
    """Write a head as a TFLite flatbuffer that ``TFLiteHead`` loads.

    Args:
        head: the head to export. Its labels are not stored in the model.
        precision: "fp32", or "fp16" for float16 weights and bias at half the size.
            Inputs and outputs are float32 either way.
    Returns:
        The flatbuffer, input [batch, dim] float32, output [batch, K] float32.
    Raises:
        ValueError: the precision is not one of ``PRECISIONS``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"invalid precision {precision!r}: use one of {', '.join(PRECISIONS)}")

    started = time.perf_counter()
    model = _build(head, precision)
    _LOGGER.info(
        "exported head version %d: %d classes, %s, %d bytes in %.3f s",
        head.version, len(head.labels), precision, len(model), time.perf_counter() - started,
    )
    return model
