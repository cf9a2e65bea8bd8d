"""Recorders on tflite-runtime 2.14: the in-place model split, and ``analyze`` in an environment of its own.

The slow test builds that environment with deploy/install.sh --runtime
tflite-runtime (Python 3.11, numpy < 2, no ai-edge-litert) and compares its
scores with LiteRT's on a real recording.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import soundfile

from dawnchorus.edge import analyze
from dawnchorus.models import birdnet
from dawnchorus.models.backbone import Backbone, ModelLayoutError, _split_in_place, split_model

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
# 120 s of 48 kHz audio: 40 windows, a few seconds on either runtime.
SOUNDSCAPE = DATA / "soundscapes" / "birdnet-example" / "soundscape.flac"
MIN_CONF = 0.01
# The CSV rounds confidences to 4 decimals. The runtimes' logits differ by
# float32 rounding, so a confidence may round to the neighbouring 1e-4 step.
CONFIDENCE_TOLERANCE = 2e-4

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real recordings not found at {DATA}")


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return birdnet.locate_birdnet_files().model.read_bytes()


def _soundscape_windows(count: int) -> np.ndarray:
    """Return the soundscape's first ``count`` 3 s windows, [count, 144000] float32."""
    samples, rate = soundfile.read(SOUNDSCAPE, dtype="float32", frames=count * 144_000)
    assert rate == 48_000
    return samples[: count * 144_000].reshape(count, 144_000)


def test_split_in_place_matches_schema_split(model_bytes):
    with_schema = split_model(model_bytes)
    in_place = _split_in_place(model_bytes)
    windows = _soundscape_windows(4)

    embeddings_schema = Backbone(with_schema.backbone).embed(windows)
    embeddings_in_place = Backbone(in_place.backbone).embed(windows)

    assert in_place.embedding_tensor == with_schema.embedding_tensor
    assert np.array_equal(in_place.weights, with_schema.weights)
    assert np.array_equal(in_place.bias, with_schema.bias)
    assert embeddings_in_place.shape == (4, 1024)
    assert np.array_equal(embeddings_in_place, embeddings_schema)


def test_split_in_place_leaves_input_intact(model_bytes):
    before = bytes(model_bytes[:4096])

    _split_in_place(model_bytes)

    assert model_bytes[:4096] == before


def test_split_in_place_rejects_non_tflite():
    with pytest.raises(ModelLayoutError, match="not a TFLite model"):
        _split_in_place(b"\x00" * 64)


def test_split_in_place_rejects_model_without_final_layer(model_bytes):
    backbone = _split_in_place(model_bytes).backbone

    # The backbone ends in MEAN, not FULLY_CONNECTED.
    with pytest.raises(ModelLayoutError, match="not produced by a FULLY_CONNECTED operator"):
        _split_in_place(backbone)


# tflite-runtime's own environment ------------------------------------------------------


@pytest.fixture(scope="module")
def tflite_runtime_venv(tmp_path_factory) -> pathlib.Path:
    """A virtual environment with dawnchorus[edge-tflite-runtime], made by install.sh; returns its bin folder."""
    python = shutil.which("python3.11")
    if python is None:
        pytest.skip("python3.11 is not installed: tflite-runtime 2.14 has wheels for Python 3.11 at most")
    prefix = tmp_path_factory.mktemp("tflite-runtime")
    process = subprocess.run(["bash", str(REPO / "deploy" / "install.sh"), "--no-system", "--prefix", str(prefix),
                              "--runtime", "tflite-runtime", "--python", python],
                             capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr
    return prefix / "venv" / "bin"


def _read_scores(path: pathlib.Path) -> dict[tuple[str, str], float]:
    with open(path, newline="") as stream:
        return {(row["Start (s)"], row["Scientific name"]): float(row["Confidence"]) for row in csv.DictReader(stream)}


@pytest.mark.slow
def test_analyze_on_tflite_runtime_matches_litert(tflite_runtime_venv, tmp_path):
    litert_csv = tmp_path / "litert.csv"
    tflite_csv = tmp_path / "tflite-runtime.csv"
    parser = argparse.ArgumentParser()
    analyze.add_arguments(parser)
    assert analyze.run(parser.parse_args([str(SOUNDSCAPE), "--out", str(litert_csv), "--min-conf", str(MIN_CONF)])) == 0

    process = subprocess.run([tflite_runtime_venv / "dawnchorus", "analyze", str(SOUNDSCAPE), "--out", str(tflite_csv),
                              "--min-conf", str(MIN_CONF)], capture_output=True, text=True, timeout=600)
    litert = _read_scores(litert_csv)
    tflite = _read_scores(tflite_csv)
    # A row may exist on one side only when its confidence is within the tolerance of the threshold.
    one_sided = [litert[key] for key in set(litert) - set(tflite)] + [tflite[key] for key in set(tflite) - set(litert)]
    common = sorted(set(litert) & set(tflite))

    assert process.returncode == 0, process.stderr
    assert "TFLite runtime: tflite-runtime 2.14" in process.stderr
    assert len(litert) > 300
    assert all(abs(score - MIN_CONF) <= CONFIDENCE_TOLERANCE for score in one_sided), one_sided
    assert max(abs(litert[key] - tflite[key]) for key in common) <= CONFIDENCE_TOLERANCE


_HEAD_SCRIPT = """
import json, sys
import numpy as np
from dawnchorus.models.head import TFLiteHead
blob = open(sys.argv[1], "rb").read()
embeddings = np.load(sys.argv[2])
try:
    head = TFLiteHead(blob, [f"class {i}" for i in range(int(sys.argv[3]))], 1)
except ValueError as error:
    print(json.dumps({"error": str(error)}))
else:
    print(json.dumps({"logits": head.logits(embeddings).tolist()}))
"""


def _run_head(venv_bin: pathlib.Path, blob: bytes, embeddings: np.ndarray, classes: int, tmp_path) -> dict:
    (tmp_path / "head.tflite").write_bytes(blob)
    np.save(tmp_path / "embeddings.npy", embeddings)
    process = subprocess.run([venv_bin / "python", "-c", _HEAD_SCRIPT, str(tmp_path / "head.tflite"),
                              str(tmp_path / "embeddings.npy"), str(classes)], capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout)


def _site_head(classes: int):
    from dawnchorus.models.backbone import load_source_model

    head = load_source_model().head
    return head.select(head.labels[:classes])


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tflite_runtime_runs_exported_head(tflite_runtime_venv, tmp_path, precision):
    from dawnchorus.models.export import head_to_tflite

    from dawnchorus.models.head import TFLiteHead

    head = _site_head(40)
    blob = head_to_tflite(head, precision)
    embeddings = np.abs(np.random.default_rng(0).standard_normal((8, 1024))).astype(np.float32)
    on_litert = TFLiteHead(blob, head.labels, 1).logits(embeddings)

    result = _run_head(tflite_runtime_venv, blob, embeddings, 40, tmp_path)

    assert "logits" in result, result
    assert np.allclose(np.array(result["logits"]), on_litert, atol=1e-4)


@pytest.mark.slow
def test_tflite_runtime_rejects_int8_head(tflite_runtime_venv, tmp_path):
    import tensorflow_converter

    # A dynamic-range quantised head (int8 weights), as TFLiteConverter makes it with the default optimisation.
    head = _site_head(40)
    blob = tensorflow_converter.convert(head, "int8")

    result = _run_head(tflite_runtime_venv, blob, np.ones((1, 1024), np.float32), 40, tmp_path)

    assert "error" in result, result
    assert "int8" in result["error"]
    assert "fp32 or fp16" in result["error"]


@pytest.mark.slow
@pytest.mark.broker
def test_recorder_on_tflite_runtime_applies_signed_head(tflite_runtime_venv, observer, mosquitto, tmp_path):
    import hashlib
    import time

    from dawnchorus.models.export import head_to_tflite
    from dawnchorus.models.head import TFLiteHead
    from dawnchorus.protocol import topics
    from dawnchorus.protocol.messages import Manifest
    from dawnchorus.protocol.signing import generate_key_files, load_private_key, sign_manifest

    site, device = "tflite-site", "rec-tflite"
    head = _site_head(40)
    blob = head_to_tflite(head, "fp16")
    private_path, public_path = generate_key_files(tmp_path / "keys")
    species = tmp_path / "species.txt"
    species.write_text("\n".join(head.labels) + "\n")
    # The base station computes the probe logits on LiteRT; the recorder checks them on tflite-runtime.
    probe = np.random.default_rng(1).random((4, 1024), dtype=np.float32).astype(np.float16).astype(np.float32)
    manifest = sign_manifest(Manifest(
        site=site, version=1, parent=0, labels=head.labels, sha256=hashlib.sha256(blob).hexdigest(), size=len(blob),
        precision="fp16", blob_topic=topics.blob_topic(site, 1), created=time.time(), probe_embeddings=probe,
        probe_logits=TFLiteHead(blob, head.labels, 1).logits(probe), sequence=1,
    ), load_private_key(private_path))

    log_path = tmp_path / "recorder.log"
    with open(log_path, "w") as log:
        recorder = subprocess.Popen([
            tflite_runtime_venv / "dawnchorus", "edge", "run", "--device", device, "--site", site, "--broker",
            mosquitto.address, "--input", str(SOUNDSCAPE), "--speed", "0", "--stay", "--species-file", str(species),
            "--head-public-key", str(public_path), "--state-dir", str(tmp_path / "edge"),
        ], stdout=log, stderr=subprocess.STDOUT)
    try:
        online = observer.wait_online(device)
        ack = observer.push(manifest.encode(), manifest.blob_topic, blob, site, device) if online else None
        embeddings_received = observer.wait_for(lambda: observer.embedding_versions.get(device), 60)
    finally:
        recorder.terminate()
        recorder.wait(timeout=60)

    assert online, log_path.read_text()[-3000:]
    assert ack.accepted, ack.reason
    assert "TFLite runtime: tflite-runtime 2.14" in log_path.read_text()
    assert embeddings_received, log_path.read_text()[-3000:]
