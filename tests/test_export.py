"""Tests of the TFLite head export, run on LiteRT through TFLiteHead."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dawnchorus.models import backbone, birdnet
from dawnchorus.models.export import head_to_tflite
from dawnchorus.models.head import LinearHead, TFLiteHead

EMBEDDING_DIM = 1024
SHARED_DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SOUNDSCAPE = SHARED_DATA / "soundscapes" / "birdnet-example" / "soundscape.flac"
WINDOW_SAMPLES = 144_000  # 3 s at 48 kHz
SITE_CLASSES = 150

# float16 keeps 11 significant bits, so each stored weight and bias is within a
# relative 2 ** -11 of its float32 value. The logit error is then at most
# 2 ** -11 * (|x| @ |W|.T + |b|). The absolute slack covers float32 rounding
# and float16 subnormals, whose rounding error is absolute (below 2 ** -25).
_FP16_RELATIVE = 2.0**-11
_FP16_SLACK = 1e-4


@pytest.fixture(scope="module")
def random_head() -> LinearHead:
    rng = np.random.default_rng(0)
    weights = rng.normal(0.0, 0.05, size=(SITE_CLASSES, EMBEDDING_DIM)).astype(np.float32)
    bias = rng.normal(0.0, 0.5, size=SITE_CLASSES).astype(np.float32)
    return LinearHead([f"Species {i}_Bird {i}" for i in range(SITE_CLASSES)], weights, bias, version=4)


@pytest.fixture(scope="module")
def random_embeddings() -> np.ndarray:
    return np.random.default_rng(1).uniform(0.0, 1.0, size=(64, EMBEDDING_DIM)).astype(np.float32)


def _operator_names(model: bytes) -> list[str]:
    from ai_edge_litert import schema_py_generated as schema

    parsed = schema.Model.GetRootAsModel(model, 0)
    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    subgraph = parsed.Subgraphs(0)
    return [
        names[parsed.OperatorCodes(subgraph.Operators(i).OpcodeIndex()).BuiltinCode()]
        for i in range(subgraph.OperatorsLength())
    ]


def test_fp32_matches_numpy(random_head, random_embeddings):
    runner = TFLiteHead(head_to_tflite(random_head, "fp32"), random_head.labels, random_head.version)

    for windows in (1, 7, 64):
        embeddings = random_embeddings[:windows]
        logits = runner.logits(embeddings)
        assert logits.shape == (windows, SITE_CLASSES)
        assert logits.dtype == np.float32
        np.testing.assert_allclose(logits, random_head.logits(embeddings), atol=1e-4, err_msg=f"batch {windows}")


def test_fp32_single_fully_connected(random_head):
    assert _operator_names(head_to_tflite(random_head, "fp32")) == ["FULLY_CONNECTED"]


def test_fp16_dequantizes_weights_and_bias(random_head):
    assert _operator_names(head_to_tflite(random_head, "fp16")) == ["DEQUANTIZE", "DEQUANTIZE", "FULLY_CONNECTED"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_constant_buffers_aligned(random_head, precision):
    from ai_edge_litert import schema_py_generated as schema

    model = head_to_tflite(random_head, precision)
    parsed = schema.Model.GetRootAsModel(model, 0)
    start = np.frombuffer(model, np.uint8).ctypes.data
    offsets = [parsed.Buffers(i).DataAsNumpy().ctypes.data - start for i in range(parsed.BuffersLength())
               if parsed.Buffers(i).DataLength()]

    assert len(offsets) == 2, "expected the weights and the bias as constant buffers"
    assert [offset % 16 for offset in offsets] == [0, 0]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_same_logits_as_tensorflow_converter(random_head, random_embeddings, precision):
    import tensorflow_converter

    written = TFLiteHead(head_to_tflite(random_head, precision), random_head.labels, random_head.version)
    converted = TFLiteHead(tensorflow_converter.convert(random_head, precision), random_head.labels,
                           random_head.version)

    for windows in (1, 7, 64):
        embeddings = random_embeddings[:windows]
        np.testing.assert_array_equal(written.logits(embeddings), converted.logits(embeddings),
                                      err_msg=f"{precision}, batch {windows}")


def test_export_imports_no_tensorflow(random_head):
    # The converter leaked native memory on every call; the exporter must not fall back to it.
    code = ("import sys, numpy as np; from dawnchorus.models.export import head_to_tflite; "
            "from dawnchorus.models.head import LinearHead; "
            "head_to_tflite(LinearHead(['a_b'], np.ones((1, 4), np.float32), np.zeros(1, np.float32)), 'fp16'); "
            "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_fp16_within_rounding_bound(random_head, random_embeddings):
    runner = TFLiteHead(head_to_tflite(random_head, "fp16"), random_head.labels, random_head.version)

    logits = runner.logits(random_embeddings)

    bound = _FP16_RELATIVE * (np.abs(random_embeddings) @ np.abs(random_head.weights).T + np.abs(random_head.bias))
    error = np.abs(logits - random_head.logits(random_embeddings))
    assert logits.dtype == np.float32
    assert np.all(error <= bound + _FP16_SLACK), f"max error {error.max()}, max bound {bound.max()}"


def test_fp16_half_size(random_head):
    fp32 = head_to_tflite(random_head, "fp32")
    fp16 = head_to_tflite(random_head, "fp16")

    assert len(fp16) < 0.6 * len(fp32)


def test_invalid_precision_raises(random_head):
    with pytest.raises(ValueError, match="'int8'.*fp32, fp16"):
        head_to_tflite(random_head, "int8")


def test_birdnet_head_fp32_matches_numpy():
    if not SOUNDSCAPE.exists():
        pytest.skip(f"recording not found: {SOUNDSCAPE}")
    import soundfile

    files = birdnet.locate_birdnet_files()
    split = backbone.split_model(files.model.read_bytes())
    source = LinearHead(birdnet.read_labels(files.labels), split.weights, split.bias)

    audio, sample_rate = soundfile.read(SOUNDSCAPE, frames=8 * WINDOW_SAMPLES, dtype="float32", always_2d=True)
    assert sample_rate == 48_000
    windows = audio[:, 0].reshape(8, WINDOW_SAMPLES)
    embeddings = backbone.Backbone(split.backbone).embed(windows)

    # A site list: the classes that score highest anywhere in the recording.
    ranked = np.argsort(-source.logits(embeddings).max(axis=0))[:SITE_CLASSES]
    site_head = source.select([source.labels[i] for i in ranked])
    runner = TFLiteHead(head_to_tflite(site_head, "fp32"), site_head.labels, site_head.version)

    np.testing.assert_allclose(runner.logits(embeddings), site_head.logits(embeddings), atol=1e-4)
