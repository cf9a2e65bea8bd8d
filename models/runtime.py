"""The TFLite interpreter a process runs on: LiteRT, or tflite-runtime where LiteRT
cannot be installed. Neither import pulls in TensorFlow."""

from __future__ import annotations

import logging
import os
import struct
from typing import Any

_LOGGER = logging.getLogger(__name__)

# BirdNET's convolutions run on XNNPACK in both runtimes' default op resolver;
# more threads than cores only adds contention on a 2- or 4-core recorder.
DEFAULT_NUM_THREADS = max(1, min(4, os.cpu_count() or 1))

_runtime_logged = False


# TFLite TensorType numbers (schema.fbs) of the integer weights that a quantised head carries.
_INT8 = 9
_UINT8 = 3

LITERT = "ai-edge-litert"
TFLITE_RUNTIME = "tflite-runtime"


def interpreter_class() -> tuple[type, str]:
    """Return the Interpreter class to use and the name of its runtime: LiteRT if installed, else tflite-runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, LITERT
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, TFLITE_RUNTIME
    except ImportError as error:
        raise ImportError(
            "no TFLite runtime is installed: install the edge extra "
            "(pip install 'dawnchorus[edge]'), which brings ai-edge-litert, or where ai-edge-litert has "
            "no wheel, the edge-tflite-runtime extra in an environment of its own"
        ) from error


def runtime_name() -> str:
    """Return the name of the runtime that ``make_interpreter`` uses."""
    return interpreter_class()[1]


def describe_runtime() -> str:
    """Return the runtime's name and version for logs, with tflite-runtime's limits."""
    import importlib.metadata

    runtime = runtime_name()
    try:
        version = importlib.metadata.version(runtime)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    if runtime == TFLITE_RUNTIME:
        return f"{runtime} {version} (ai-edge-litert is not installed; int8 heads are rejected)"
    return f"{runtime} {version}"


def check_runtime_supports(model_content: bytes) -> None:
    """Raise ValueError if the chosen runtime cannot run this model.

    tflite-runtime 2.14 loads fp32 and fp16 heads but not heads with int8
    weights. On a dynamic-range int8 head from TensorFlow 2.21's converter it
    fails with "Didn't find op for builtin opcode 'FULLY_CONNECTED' version
    '12'", which does not name the fix, so such heads are rejected here first.
    """
    if runtime_name() != TFLITE_RUNTIME:
        return
    from dawnchorus.models.flatbuffer import TFLiteFile

    try:
        tensors = TFLiteFile(model_content).tensors()
    except (ValueError, IndexError, struct.error) as error:
        raise ValueError(f"the model is not a readable TFLite flatbuffer: {error}") from error
    quantised = [tensor.name for tensor in tensors if tensor.type in (_INT8, _UINT8)]
    if quantised:
        raise ValueError(
            f"the model has int8 or uint8 tensors ({', '.join(quantised[:3])}), which tflite-runtime 2.14 "
            "cannot run: "
            "export heads as fp32 or fp16 (server run --precision), or install ai-edge-litert on this recorder"
        )


def make_interpreter(
    model_path: str | None = None,
    model_content: bytes | None = None,
    num_threads: int | None = None,
) -> Any:
    """Create an interpreter with the default delegate (XNNPACK where the runtime has it) and allocate it."""
    global _runtime_logged
    interpreter_type, runtime = interpreter_class()
    if not _runtime_logged:
        _LOGGER.info("TFLite runtime: %s", describe_runtime())
        _runtime_logged = True
    interpreter = interpreter_type(
        model_path=model_path,
        model_content=model_content,
        num_threads=num_threads or DEFAULT_NUM_THREADS,
    )
    interpreter.allocate_tensors()
    return interpreter
