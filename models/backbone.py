"""The BirdNET classifier cut in two: a backbone whose output is the embedding,
and the linear head that turns embeddings into logits.

LiteRT's default XNNPACK delegate makes intermediate tensors unreadable, and
turning the delegate off costs about 40 % speed. So the flatbuffer is
rewritten: the final FULLY_CONNECTED operator is removed and its input, the
embedding, becomes the graph's output. The head's weights and bias are read
from the same flatbuffer, so ``logits = embedding @ W.T + b`` reproduces the
full model.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np

from dawnchorus.models.runtime import make_interpreter

_LOGGER = logging.getLogger(__name__)

_FULLY_CONNECTED = 9  # BuiltinOperator.FULLY_CONNECTED in the TFLite schema
_FLOAT32 = 0  # TensorType.FLOAT32


class ModelLayoutError(ValueError):
    """The TFLite file does not end in a float32 FULLY_CONNECTED classifier layer."""


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """A classifier split at its last layer.

    Attributes:
        backbone: TFLite flatbuffer, input [batch, samples] float32, output
            [batch, embedding_dim] float32.
        weights: [classes, embedding_dim] float32, the head's kernel.
        bias: [classes] float32.
        embedding_tensor: index of the embedding tensor in the original model.
    """

    backbone: bytes
    weights: np.ndarray
    bias: np.ndarray
    embedding_tensor: int


def _buffer_array(model, tensor_index: int) -> np.ndarray:
    subgraph = model.subgraphs[0]
    tensor = subgraph.tensors[tensor_index]
    if tensor.type != _FLOAT32:
        raise ModelLayoutError(
            f"tensor {tensor_index} ({tensor.name!r}) has TFLite type {tensor.type}, expected "
            "float32: use a float32 model, not a quantised one"
        )
    data = model.buffers[tensor.buffer].data
    if data is None or len(data) == 0:
        raise ModelLayoutError(f"tensor {tensor_index} ({tensor.name!r}) has no constant data")
    return np.frombuffer(bytes(data), dtype=np.float32).reshape(tuple(tensor.shape)).copy()


def split_model(model_bytes: bytes) -> SplitModel:
    """Cut a single-output TFLite classifier before its final FULLY_CONNECTED layer.

    With LiteRT installed, the model is unpacked with its schema module and
    written anew without the head's weights. Under tflite-runtime, which ships
    no schema, the same cut is patched into the bytes in place (see
    ``models.flatbuffer``), and the head's weights stay in the file unused.
    """
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return _split_in_place(model_bytes)
    return _split_with_schema(model_bytes, schema)


def _split_with_schema(model_bytes: bytes, schema) -> SplitModel:
    import flatbuffers

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model_bytes, 0))
    subgraph = model.subgraphs[0]
    if len(subgraph.outputs) != 1:
        raise ModelLayoutError(f"model has {len(subgraph.outputs)} outputs, expected 1")

    output = int(subgraph.outputs[0])
    producers = [op for op in subgraph.operators if output in list(op.outputs)]
    last = producers[0] if producers else None
    if last is None or model.operatorCodes[last.opcodeIndex].builtinCode != _FULLY_CONNECTED:
        raise ModelLayoutError("the model's output is not produced by a FULLY_CONNECTED operator")
    if len(last.inputs) < 3 or last.inputs[2] < 0:
        raise ModelLayoutError("the final FULLY_CONNECTED operator has no bias")

    embedding_tensor, weights_tensor, bias_tensor = (int(i) for i in last.inputs[:3])
    weights = _buffer_array(model, weights_tensor)
    bias = _buffer_array(model, bias_tensor)

    # Drop the last operator and its now unused constants, and make the
    # embedding the output. Signature defs name the old output, so they go too.
    subgraph.operators = [op for op in subgraph.operators if op is not last]
    subgraph.outputs = [embedding_tensor]
    for index in (weights_tensor, bias_tensor):
        model.buffers[subgraph.tensors[index].buffer].data = None
    model.signatureDefs = []

    builder = flatbuffers.Builder(len(model_bytes))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return SplitModel(bytes(builder.Output()), weights, bias, embedding_tensor)


def _split_in_place(model_bytes: bytes) -> SplitModel:
    from dawnchorus.models.flatbuffer import FlatbufferError, TFLiteFile

    try:
        model = TFLiteFile(model_bytes)
        outputs = model.outputs
        if len(outputs) != 1:
            raise ModelLayoutError(f"model has {len(outputs)} outputs, expected 1")
        producers = [index for index in range(model.operator_count) if outputs[0] in model.operator(index).outputs]
        last = model.operator(producers[0]) if producers else None
        if last is None or last.builtin_code != _FULLY_CONNECTED:
            raise ModelLayoutError("the model's output is not produced by a FULLY_CONNECTED operator")
        if len(last.inputs) < 3 or last.inputs[2] < 0:
            raise ModelLayoutError("the final FULLY_CONNECTED operator has no bias")

        embedding_tensor, weights_tensor, bias_tensor = last.inputs[:3]
        weights = _constant_array(model, weights_tensor)
        bias = _constant_array(model, bias_tensor)

        # NOTE: the head's weights stay in the patched bytes, unreferenced: BirdNET's backbone is then
        # 52 MB instead of 25 MB, which a recorder on tflite-runtime holds in memory.
        model.remove_operator(producers[0])
        model.set_single_output(embedding_tensor)
        for index in (weights_tensor, bias_tensor):
            model.detach_buffer(index)
        model.clear_signature_defs()
    except FlatbufferError as error:
        raise ModelLayoutError(str(error)) from error
    return SplitModel(bytes(model.data), weights, bias, embedding_tensor)


def _constant_array(model, tensor_index: int) -> np.ndarray:
    tensor = model.tensor(tensor_index)
    if tensor.type != _FLOAT32:
        raise ModelLayoutError(
            f"tensor {tensor_index} ({tensor.name!r}) has TFLite type {tensor.type}, expected "
            "float32: use a float32 model, not a quantised one"
        )
    data = model.buffer_data(tensor.buffer)
    if not data:
        raise ModelLayoutError(f"tensor {tensor_index} ({tensor.name!r}) has no constant data")
    return np.frombuffer(data, dtype=np.float32).reshape(tensor.shape).copy()


class Backbone:
    """Embeds 3 s windows of 48 kHz audio on LiteRT.

    Not thread-safe, like the interpreter it wraps: one thread calls ``embed``.
    """

    def __init__(self, backbone: bytes, num_threads: int | None = None):
        self._interpreter = make_interpreter(model_content=backbone, num_threads=num_threads)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch = 1
        self.window_samples = int(self._interpreter.get_input_details()[0]["shape"][-1])
        self.embedding_dim = int(self._interpreter.get_output_details()[0]["shape"][-1])

    def embed(self, windows: np.ndarray) -> np.ndarray:
        """Return embeddings [windows, dim] float32 for windows [windows, samples] float32."""
        windows = np.ascontiguousarray(windows, dtype=np.float32)
        if windows.ndim != 2 or windows.shape[1] != self.window_samples:
            raise ValueError(
                f"expected windows of shape [n, {self.window_samples}], got {windows.shape}"
            )
        if windows.shape[0] != self._batch:
            self._interpreter.resize_tensor_input(self._input, [windows.shape[0], self.window_samples])
            self._interpreter.allocate_tensors()
            self._batch = windows.shape[0]
        self._interpreter.set_tensor(self._input, windows)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output).copy()


@dataclasses.dataclass(frozen=True)
class SourceModel:
    """The source classifier ready to run: backbone bytes and the full linear head."""

    backbone: bytes
    head: "LinearHead"


def load_source_model(model_path: pathlib.Path | None = None, labels_path: pathlib.Path | None = None) -> SourceModel:
    """Load BirdNET V2.4 (or another TFLite classifier and its labels) and split it.

    Without arguments the BirdNET files are located or fetched (see ``models.birdnet``).
    """
    from dawnchorus.models import birdnet
    from dawnchorus.models.head import LinearHead

    if (model_path is None) != (labels_path is None):
        raise ValueError("give both a model file and its labels file, or neither for BirdNET V2.4")
    if model_path is None:
        files = birdnet.locate_birdnet_files()
        model_path, labels_path = files.model, files.labels
    split = split_model(pathlib.Path(model_path).read_bytes())
    labels = birdnet.read_labels(pathlib.Path(labels_path))
    if len(labels) != split.weights.shape[0]:
        raise ModelLayoutError(
            f"{labels_path} has {len(labels)} labels but {model_path} has {split.weights.shape[0]} classes"
        )
    return SourceModel(split.backbone, LinearHead(labels, split.weights, split.bias, version=0))
