"""Bad MQTT payloads sent through a real Mosquitto to the real base-station program and to a recorder.

Each bad message must be rejected with a log line that names its topic and
sender, counted under its reason, and a good message sent afterwards must be
accepted. tests/test_station.py covers every reason on an in-process base station.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import soundfile

from support import wait as _wait

from dawnchorus.edge.recorder import Recorder, RecorderConfig
from dawnchorus.models.backbone import Backbone, load_source_model
from dawnchorus.models.export import head_to_tflite
from dawnchorus.models.head import TFLiteHead
from dawnchorus.protocol import topics
from dawnchorus.protocol.embeddings import EmbeddingBatch, encode_embeddings
from dawnchorus.protocol.messages import MAX_JSON_BYTES, Manifest, StationStats
from dawnchorus.protocol.signing import load_private_key, load_public_key, sign_manifest

SITE_LABELS = ["Turdus migratorius_American Robin", "Cardinalis cardinalis_Northern Cardinal",
               "Zenaida macroura_Mourning Dove"]


@pytest.fixture(scope="module")
def source():
    return load_source_model()


@pytest.fixture(scope="module")
def embeddings(source, data_dir):
    samples, _ = soundfile.read(data_dir / "soundscapes/birdnet-example/soundscape.flac", dtype="float32")
    return Backbone(source.backbone, num_threads=1).embed(samples[: 4 * 144_000].reshape(4, 144_000))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys") / "keys"
    result = subprocess.run([sys.executable, "-m", "dawnchorus", "keys", "generate", str(directory)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return directory




def _read_retained(broker, topic: str, timeout: float = 10.0) -> bytes | None:
    received: list[bytes] = []
    arrived = threading.Event()

    def on_message(client, userdata, message):
        received.append(bytes(message.payload))
        arrived.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-retained-{uuid.uuid4().hex[:8]}")
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        arrived.wait(timeout)
    finally:
        client.loop_stop()
        client.disconnect()
    return received[0] if received else None


def _clear_station_state(broker, station_id: str, stats_topic: str) -> None:
    """Clear the retained stats and end the station's persistent session on the shared broker.

    Otherwise the broker queues every later test's messages for that client id,
    and the next base station started with it receives them all.
    """
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=station_id, clean_session=True)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(stats_topic, b"", qos=1, retain=True).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def test_server_process_rejects_bad_payloads(programs, mosquitto, keys, embeddings, tmp_path):
    site, device = "bad-payload-site", "rec-bad-payload"
    station_id = "dawnchorus-base-station-1-of-1"
    server = programs.start("server", "run", "--broker", mosquitto.address, "--state-dir", str(tmp_path / "server"),
                            "--signing-key", str(keys / "head-signing.key"), log="server.log")
    assert _wait(lambda: "base station ready" in programs.log("server.log"), 180), programs.log("server.log")[-3000:]

    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-publisher-{uuid.uuid4().hex[:8]}")
    publisher.connect(mosquitto.host, mosquitto.port)
    publisher.loop_start()
    good = encode_embeddings(EmbeddingBatch(device, site, 0, np.arange(3, dtype=np.uint64), np.zeros(3),
                                            embeddings[:3]))
    wrong_size = encode_embeddings(EmbeddingBatch(device, site, 0, np.arange(10, 13, dtype=np.uint64),
                                                  np.zeros(3), embeddings[:3, :256]))
    bad = {
        "embeddings.length": ("embeddings", good[:-7]),
        "embeddings.dim": ("embeddings", wrong_size),
        "detections.json": ("detections", b"[unclosed"),
        "detections.too_large": ("detections", b"x" * (MAX_JSON_BYTES + 1)),
    }
    try:
        for kind, payload in bad.values():
            publisher.publish(topics.device_topic(site, device, kind), payload, qos=1).wait_for_publish(10)
        publisher.publish(topics.device_topic(site, device, "embeddings"), good, qos=1).wait_for_publish(10)
        assert _wait(lambda: f"site {site}:" in programs.log("server.log"), 60), programs.log("server.log")[-3000:]
    finally:
        publisher.loop_stop()
        publisher.disconnect()
    assert server.poll() is None

    programs.stop_all()
    assert server.returncode == 0
    log = programs.log("server.log")
    stats_topic = topics.station_stats_topic(station_id)
    retained = _read_retained(mosquitto, stats_topic)
    _clear_station_state(mosquitto, station_id, stats_topic)

    assert retained is not None, "no retained stats after the base station stopped"
    stats = StationStats.decode(retained)
    assert stats.rejected == {reason: 1 for reason in bad}
    assert stats.counters["embeddings"] == 3
    for reason, (kind, _) in bad.items():
        lines = [line for line in log.splitlines() if f"(reason {reason.split('.')[1]}," in line]
        assert any(topics.device_topic(site, device, kind) in line and f"device {device}" in line for line in lines), \
            reason
    assert "'embeddings.dim': 1" in log


@pytest.fixture(scope="module")
def site_head(source):
    head = source.head.select(SITE_LABELS)
    return head.labels, head_to_tflite(head, "fp32")


def _manifest(site: str, labels: list[str], blob: bytes, version: int, sequence: int) -> Manifest:
    probe = np.random.default_rng(version).random((4, 1024), dtype=np.float32).astype(np.float16).astype(np.float32)
    return Manifest(
        site=site, version=version, parent=version - 1, labels=labels, sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob), precision="fp32", blob_topic=topics.blob_topic(site, version), created=time.time(),
        probe_embeddings=probe, probe_logits=TFLiteHead(blob, labels, version).logits(probe), sequence=sequence,
    )


def test_recorder_rejects_bad_manifests_and_blobs(mosquitto, observer, source, site_head, keys, tmp_path, caplog):
    site, device = "bad-manifest-site", f"rec-bad-manifest-{uuid.uuid4().hex[:6]}"
    labels, blob = site_head
    private_key = load_private_key(keys / "head-signing.key")
    config = RecorderConfig(device=device, site=site, broker_host=mosquitto.host, broker_port=mosquitto.port,
                            state_dir=tmp_path, head_public_key=load_public_key(keys / "head-signing.pub"),
                            head_labels=list(labels), status_interval_s=0.5)
    recorder = Recorder(config, Backbone(source.backbone, num_threads=1), source.head.select(labels), [])
    runner = threading.Thread(target=recorder.run, kwargs={"stay_after_source": True}, daemon=True)

    valid = json.loads(sign_manifest(_manifest(site, labels, blob, 1, 1), private_key).encode())
    missing_field = {key: value for key, value in valid.items() if key != "sha256"}
    float64_probe = json.loads(json.dumps(valid))
    float64_probe["probe"]["embeddings"]["dtype"] = "<f8"
    bad_manifests = {
        "manifest.json": b'{"protocol": 2, "site": ',
        "manifest.missing_field": json.dumps(missing_field).encode(),
        "manifest.version": json.dumps(dict(valid, protocol=3)).encode(),
        "manifest.too_large": b" " * (MAX_JSON_BYTES + 1),
        "manifest.field": json.dumps(float64_probe).encode(),
    }

    with caplog.at_level(logging.ERROR, logger="dawnchorus.edge.recorder"):
        runner.start()
        try:
            assert observer.wait_online(device, timeout=60)
            for payload in bad_manifests.values():
                observer.client.publish(topics.manifest_topic(site), payload, qos=1).wait_for_publish(10)
            assert _wait(lambda: recorder.rejections.total == len(bad_manifests), 60), recorder.rejections.counts()

            truncated = sign_manifest(_manifest(site, labels, blob, 1, 1), private_key)
            rejected = observer.push(truncated.encode(), truncated.blob_topic, blob[:-100], site, device)
            good = sign_manifest(_manifest(site, labels, blob, 2, 2), private_key)
            accepted = observer.push(good.encode(), good.blob_topic, blob, site, device)
            assert observer.wait_for(
                lambda: observer.statuses.get(device, {}).get("counters", {}).get("rejected.blob.length") == 1, 30)
        finally:
            recorder.stop()
            runner.join(timeout=30)

    assert not rejected.accepted
    assert "truncated or invalid" in rejected.reason
    assert accepted.accepted, accepted.reason
    assert accepted.version == 2
    assert recorder.rejections.counts() == {**{reason: 1 for reason in bad_manifests}, "blob.length": 1}
    counters = observer.statuses[device]["counters"]
    for reason in bad_manifests:
        assert counters[f"rejected.{reason}"] == 1, reason
    lines = [record.getMessage() for record in caplog.records if "rejected a" in record.getMessage()]
    assert len(lines) == len(bad_manifests) + 1
    assert all(f"recorder {device}" in line for line in lines)
    assert sum(topics.manifest_topic(site) in line for line in lines) == len(bad_manifests)
    assert sum(truncated.blob_topic in line for line in lines) == 1
