"""Read and patch TFLite flatbuffers with the ``flatbuffers`` package alone.

LiteRT's wheel ships the generated TFLite schema module, with which
``backbone.split_model`` unpacks, edits and re-serialises the whole model.
``tflite-runtime`` ships no schema, and the ``tflite`` package on PyPI (2.18)
has only the read API, without the object API that packs a model again. So
this module reads the few tables it needs itself and cuts the final layer by
patching bytes in place: a flatbuffer locates each object by offsets, so
shortening a vector or overwriting a scalar leaves every other object valid.

Field numbers follow TFLite's ``schema.fbs``. A table's vtable contains the
offset of field ``n`` at byte ``4 + 2 * n``, and the generated code calls that
number the slot.
"""

from __future__ import annotations

import dataclasses

import flatbuffers
import numpy as np
from flatbuffers import number_types as types

# TFLite files carry this file identifier at bytes 4-8.
_IDENTIFIER = b"TFL3"

# Fields of the tables used here, as ``4 + 2 * field number`` in schema.fbs.
_MODEL_OPERATOR_CODES = 6
_MODEL_SUBGRAPHS = 8
_MODEL_BUFFERS = 12
_MODEL_SIGNATURE_DEFS = 18
_SUBGRAPH_TENSORS = 4
_SUBGRAPH_OUTPUTS = 8
_SUBGRAPH_OPERATORS = 10
_OPERATOR_OPCODE_INDEX = 4
_OPERATOR_INPUTS = 6
_OPERATOR_OUTPUTS = 8
_OPERATOR_CODE_DEPRECATED_BUILTIN = 4
_OPERATOR_CODE_BUILTIN = 10
_TENSOR_SHAPE = 4
_TENSOR_TYPE = 6
_TENSOR_BUFFER = 8
_TENSOR_NAME = 10
_BUFFER_DATA = 4
_BUFFER_OFFSET = 6

_UOFFSET = 4  # bytes of a flatbuffer offset, and of a vector's length prefix


class FlatbufferError(ValueError):
    """The bytes are not a TFLite flatbuffer that this module can read."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of the first subgraph.

    Attributes:
        name: the tensor's name in the file.
        shape: its shape as stored (-1 or 1 for a resizable batch).
        type: TFLite ``TensorType`` number (0 float32, 1 float16, 9 int8).
        buffer: index of its buffer in the model's buffer list; 0 is the empty buffer.
    """

    name: str
    shape: tuple[int, ...]
    type: int
    buffer: int


@dataclasses.dataclass(frozen=True)
class OperatorInfo:
    """One operator of the first subgraph.

    Attributes:
        builtin_code: TFLite ``BuiltinOperator`` number (9 FULLY_CONNECTED).
        inputs: tensor indices; -1 marks an omitted optional input.
        outputs: tensor indices.
    """

    builtin_code: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


class TFLiteFile:
    """The first subgraph of a TFLite model, read from its flatbuffer, with in-place edits.

    Edits change ``self.data``, a copy of the bytes given, and never move an
    object, so the file keeps its size.
    """

    def __init__(self, model_bytes: bytes):
        if len(model_bytes) < 8 or model_bytes[4:8] != _IDENTIFIER:
            raise FlatbufferError("not a TFLite model: the file identifier 'TFL3' is missing at byte 4")
        self.data = bytearray(model_bytes)
        self._model = self._table(flatbuffers.encode.Get(types.UOffsetTFlags.packer_type, self.data, 0))
        if self._vector_length(self._model, _MODEL_SUBGRAPHS) < 1:
            raise FlatbufferError("the TFLite model has no subgraph")
        self._subgraph = self._table(self._vector_table_position(self._model, _MODEL_SUBGRAPHS, 0))

    # Reading ----------------------------------------------------------------

    def _table(self, position: int) -> flatbuffers.table.Table:
        return flatbuffers.table.Table(self.data, position)

    def _vector_start(self, table: flatbuffers.table.Table, slot: int) -> int | None:
        """Return the position of a vector field's first element, or None when the field is absent."""
        offset = table.Offset(slot)
        return table.Vector(offset) if offset else None

    def _vector_length(self, table: flatbuffers.table.Table, slot: int) -> int:
        offset = table.Offset(slot)
        return table.VectorLen(offset) if offset else 0

    def _vector_table_position(self, table: flatbuffers.table.Table, slot: int, index: int) -> int:
        start = self._vector_start(table, slot)
        return table.Indirect(start + index * _UOFFSET)

    def _int32_vector(self, table: flatbuffers.table.Table, slot: int) -> tuple[int, ...]:
        start = self._vector_start(table, slot)
        if start is None:
            return ()
        count = self._vector_length(table, slot)
        return tuple(int(v) for v in np.frombuffer(self.data, dtype="<i4", count=count, offset=start))

    def _scalar(self, table: flatbuffers.table.Table, slot: int, flags, default: int) -> int:
        offset = table.Offset(slot)
        return int(table.Get(flags, table.Pos + offset)) if offset else default

    @property
    def tensor_count(self) -> int:
        return self._vector_length(self._subgraph, _SUBGRAPH_TENSORS)

    def tensor(self, index: int) -> TensorInfo:
        if not 0 <= index < self.tensor_count:
            raise FlatbufferError(f"tensor {index} does not exist: the subgraph has {self.tensor_count} tensors")
        table = self._table(self._vector_table_position(self._subgraph, _SUBGRAPH_TENSORS, index))
        name_offset = table.Offset(_TENSOR_NAME)
        name = table.String(table.Pos + name_offset).decode("utf-8", "replace") if name_offset else ""
        return TensorInfo(
            name=name,
            shape=self._int32_vector(table, _TENSOR_SHAPE),
            type=self._scalar(table, _TENSOR_TYPE, types.Int8Flags, 0),
            buffer=self._scalar(table, _TENSOR_BUFFER, types.Uint32Flags, 0),
        )

    def tensors(self) -> list[TensorInfo]:
        return [self.tensor(index) for index in range(self.tensor_count)]

    @property
    def outputs(self) -> tuple[int, ...]:
        return self._int32_vector(self._subgraph, _SUBGRAPH_OUTPUTS)

    @property
    def operator_count(self) -> int:
        return self._vector_length(self._subgraph, _SUBGRAPH_OPERATORS)

    def operator(self, index: int) -> OperatorInfo:
        table = self._table(self._vector_table_position(self._subgraph, _SUBGRAPH_OPERATORS, index))
        opcode_index = self._scalar(table, _OPERATOR_OPCODE_INDEX, types.Uint32Flags, 0)
        code = self._table(self._vector_table_position(self._model, _MODEL_OPERATOR_CODES, opcode_index))
        # Newer files store the code in builtin_code and older ones only in the int8
        # deprecated_builtin_code, so the larger of the two is the code.
        builtin_code = max(self._scalar(code, _OPERATOR_CODE_BUILTIN, types.Int32Flags, 0),
                           self._scalar(code, _OPERATOR_CODE_DEPRECATED_BUILTIN, types.Int8Flags, 0))
        return OperatorInfo(builtin_code, self._int32_vector(table, _OPERATOR_INPUTS),
                            self._int32_vector(table, _OPERATOR_OUTPUTS))

    def buffer_data(self, index: int) -> bytes:
        """Return a buffer's bytes, or b"" when it has none (a tensor computed at run time)."""
        table = self._table(self._vector_table_position(self._model, _MODEL_BUFFERS, index))
        if self._scalar(table, _BUFFER_OFFSET, types.Uint64Flags, 0):
            raise FlatbufferError(f"buffer {index} is stored outside the flatbuffer (a model over 2 GB), "
                                  "which this reader does not support")
        start = self._vector_start(table, _BUFFER_DATA)
        if start is None:
            return b""
        return bytes(self.data[start:start + self._vector_length(table, _BUFFER_DATA)])

    # Editing ----------------------------------------------------------------

    def _write_uint32(self, position: int, value: int) -> None:
        flatbuffers.encode.Write(types.Uint32Flags.packer_type, self.data, position, value)

    def set_single_output(self, tensor_index: int) -> None:
        """Make ``tensor_index`` the subgraph's only output; the subgraph must have exactly one now."""
        if len(self.outputs) != 1:
            raise FlatbufferError(f"the subgraph has {len(self.outputs)} outputs, expected 1")
        start = self._vector_start(self._subgraph, _SUBGRAPH_OUTPUTS)
        flatbuffers.encode.Write(types.Int32Flags.packer_type, self.data, start, tensor_index)

    def remove_operator(self, index: int) -> None:
        """Remove an operator from the subgraph's operator list; the operator table stays, unreferenced."""
        count = self.operator_count
        if not 0 <= index < count:
            raise FlatbufferError(f"operator {index} does not exist: the subgraph has {count} operators")
        start = self._vector_start(self._subgraph, _SUBGRAPH_OPERATORS)

        # Each element is an offset relative to its own position, so an element moved 4 bytes
        # towards the start of the vector must point 4 bytes further.
        for later in range(index + 1, count):
            position = start + later * _UOFFSET
            relative = flatbuffers.encode.Get(types.UOffsetTFlags.packer_type, self.data, position)
            self._write_uint32(position - _UOFFSET, relative + _UOFFSET)
        self._write_uint32(start - _UOFFSET, count - 1)

    def detach_buffer(self, tensor_index: int) -> None:
        """Point a constant tensor at buffer 0, the empty buffer; its data stays in the file, unreferenced.

        TFLite rejects a buffer whose data vector is empty but present, so the
        tensor is redirected rather than its buffer emptied.
        """
        table = self._table(self._vector_table_position(self._subgraph, _SUBGRAPH_TENSORS, tensor_index))
        offset = table.Offset(_TENSOR_BUFFER)
        if offset:
            self._write_uint32(table.Pos + offset, 0)

    def clear_signature_defs(self) -> None:
        """Drop the model's signature definitions, which name inputs and outputs by tensor."""
        start = self._vector_start(self._model, _MODEL_SIGNATURE_DEFS)
        if start is not None:
            self._write_uint32(start - _UOFFSET, 0)
