"""The TFLite interpreter a process runs on: LiteRT, or tflite-runtime where LiteRT
cannot be installed. Neither import pulls in TensorFlow."""

from __future__ import annotations

import logging
import os
from typing import Any

_LOGGER = logging.getLogger(__name__)

# BirdNET's convolutions run on XNNPACK in both runtimes' default op resolver;
# more threads than cores only adds contention on a 2- or 4-core recorder.
DEFAULT_NUM_THREADS = max(1, min(4, os.cpu_count() or 1))

_runtime_logged = False


def interpreter_class() -> tuple[type, str]:
    """Return the Interpreter class to use and the name of its runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite-runtime"
    except ImportError as error:
        raise ImportError(
            "no TFLite runtime is installed: install the edge extra "
            "(pip install 'dawnchorus[edge]'), which brings ai-edge-litert"
        ) from error


def make_interpreter(
    model_path: str | None = None,
    model_content: bytes | None = None,
    num_threads: int | None = None,
) -> Any:
    """Create an interpreter with the default delegate (XNNPACK) and allocate it."""
    global _runtime_logged
    interpreter_type, runtime = interpreter_class()
    if not _runtime_logged:
        _LOGGER.info("TFLite runtime: %s", runtime)
        _runtime_logged = True
    interpreter = interpreter_type(
        model_path=model_path,
        model_content=model_content,
        num_threads=num_threads or DEFAULT_NUM_THREADS,
    )
    interpreter.allocate_tensors()
    return interpreter
