"""The counters on a recorder's retained status, from the real recorder program against a real Mosquitto."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from dawnchorus.models.backbone import load_source_model
from dawnchorus.models.export import head_to_tflite
from dawnchorus.models.head import TFLiteHead
from dawnchorus.protocol import topics
from dawnchorus.protocol.messages import Manifest, Receipt, Status, decode_detections
from dawnchorus.protocol.signing import load_private_key, sign_manifest

SITE = "status-site"
DEVICE = "rec-status"
HEAD_LABELS = [
    "Setophaga castanea_Bay-breasted Warbler", "Leiothlypis peregrina_Tennessee Warbler",
    "Setophaga citrina_Hooded Warbler", "Turdus migratorius_American Robin",
]
# birds_10s.wav lasts 10.1 s: three full windows and a 1.1 s tail, which BirdNET pads to a fourth.
WINDOWS = 4


class _DetectionCounter:
    """Counts the detections that reach the broker on one recorder's detections topic."""

    def __init__(self, broker):
        self.count = 0
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"test-detections-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topics.device_topic(SITE, DEVICE, "detections"), qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.count += len(decode_detections(message.payload))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _signed_head(keys_dir) -> tuple[Manifest, bytes]:
    head = load_source_model().head.select(HEAD_LABELS)
    blob = head_to_tflite(head, "fp16")
    probe = np.random.default_rng(0).random((4, 1024), dtype=np.float32).astype(np.float16).astype(np.float32)
    manifest = Manifest(
        site=SITE, version=1, parent=0, labels=head.labels, sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob), precision="fp16", blob_topic=topics.blob_topic(SITE, 1), created=time.time(),
        probe_embeddings=probe, probe_logits=TFLiteHead(blob, head.labels, 1).logits(probe), sequence=1,
    )
    return sign_manifest(manifest, load_private_key(keys_dir / "head-signing.key")), blob


def test_recorder_status_counts_work(programs, observer, mosquitto, data_dir, tmp_path):
    keys = tmp_path / "keys"
    generated = subprocess.run([sys.executable, "-m", "dawnchorus", "keys", "generate", str(keys)],
                               capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr
    manifest, blob = _signed_head(keys)
    detections = _DetectionCounter(mosquitto)
    try:
        recorder = programs.start(
            "edge", "run", "--device", DEVICE, "--site", SITE, "--broker", mosquitto.address,
            "--input", str(data_dir / "soundscapes/opensoundscape/birds_10s.wav"), "--speed", "0", "--stay",
            "--min-conf", "0.3", "--head-public-key", str(keys / "head-signing.pub"),
            # No base station runs here to confirm embeddings, so the broker's PUBACK delivers them.
            "--no-receipts", "--state-dir", str(tmp_path / "edge"), "--threads", "1", log="recorder.log",
        )
        assert observer.wait_for(lambda: observer.statuses.get(DEVICE, {}).get("windows") == WINDOWS, 120), \
            programs.log("recorder.log")[-3000:]

        # A manifest that is not JSON: a rejected payload and a rejected head.
        observer.client.publish(topics.manifest_topic(SITE), b"not a manifest", qos=1).wait_for_publish(10)
        ack = observer.push(manifest.encode(), manifest.blob_topic, blob, SITE, DEVICE)
        assert ack.accepted, ack.reason
        assert observer.wait_for(lambda: observer.statuses[DEVICE].get("heads_installed") == 1, 30)
        status = Status.decode(json.dumps(observer.statuses[DEVICE]).encode())
        received = detections.count
    finally:
        detections.close()

    assert recorder.poll() is None, programs.log("recorder.log")[-3000:]
    # The replay ended and the recorder stays for heads.
    assert status.state == "finished"
    assert status.windows == WINDOWS
    assert status.embeddings_sent == WINDOWS
    assert received > 0
    assert status.detections_sent == received
    assert status.heads_verified == 1
    assert status.heads_installed == 1
    assert status.heads_rejected == 1
    assert status.rejected_payloads == 1
    assert status.queue_depth == 0
    assert status.queue_dropped == 0
    assert status.head_version == 1


def test_status_decodes_old_message_without_counts():
    old = json.dumps({"device": "rec-1", "site": "forest-a", "state": "online", "head_version": 2,
                      "windows": 40, "time": 5.0, "counters": {"windows": 40}}).encode()

    status = Status.decode(old)

    assert status.windows == 40
    for name in Status.COUNT_FIELDS:
        assert getattr(status, name) == 0, name


def test_status_round_trips_counts():
    status = Status("rec-1", "forest-a", "online", 2, 40, 5.0, embeddings_sent=32, detections_sent=7,
                    heads_verified=2, heads_installed=1, heads_rejected=3, rejected_payloads=4, queue_depth=1)

    assert Status.decode(status.encode()) == status


def test_status_rejects_negative_count():
    payload = json.dumps({"device": "rec-1", "site": "forest-a", "state": "online", "head_version": 0,
                          "embeddings_sent": -1}).encode()

    with pytest.raises(ValueError, match="embeddings_sent"):
        Status.decode(payload)


@pytest.mark.slow
def test_recorder_status_counts_confirmed_embeddings(programs, start_mosquitto, observe, data_dir, tmp_path):
    # A broker of its own: the base station's persistent session would queue later tests' messages.
    mosquitto = start_mosquitto("receipts")
    observer = observe(mosquitto)
    keys = tmp_path / "keys"
    generated = subprocess.run([sys.executable, "-m", "dawnchorus", "keys", "generate", str(keys)],
                               capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr
    species = tmp_path / "species.txt"
    species.write_text("\n".join(HEAD_LABELS) + "\n")
    device = "rec-receipts"
    receipts: list = []
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-receipts-{uuid.uuid4().hex[:8]}")
    watcher.on_message = lambda client, userdata, message: receipts.append(Receipt.decode(message.payload))
    watcher.connect(mosquitto.host, mosquitto.port)
    watcher.subscribe(topics.receipt_topic(SITE, device), qos=1)
    watcher.loop_start()
    try:
        server = programs.start(
            "server", "run", "--broker", mosquitto.address, "--state-dir", str(tmp_path / "server"),
            "--signing-key", str(keys / "head-signing.key"), "--default-species", f"@{species}",
            "--min-buffer", "1000", log="server.log",
        )
        deadline = time.monotonic() + 180
        while ("base station ready" not in programs.log("server.log") and server.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.2)
        assert server.poll() is None, programs.log("server.log")[-3000:]
        recorder = programs.start(
            "edge", "run", "--device", device, "--site", SITE, "--broker", mosquitto.address,
            "--input", str(data_dir / "soundscapes/opensoundscape/birds_10s.wav"), "--speed", "0", "--stay",
            "--state-dir", str(tmp_path / "edge"), "--threads", "1", log="recorder.log",
        )
        deadline = time.monotonic() + 120
        while not any(receipt.covers(WINDOWS - 1) for receipt in list(receipts)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any(receipt.covers(WINDOWS - 1) for receipt in list(receipts)), programs.log("recorder.log")[-3000:]
        # The recorder's sender applies the receipt at once; the offline status on stop carries the counts.
        time.sleep(1.0)
        recorder.send_signal(signal.SIGTERM)
        recorder.wait(timeout=60)
        assert observer.wait_for(lambda: observer.statuses.get(device, {}).get("state") == "offline", 30)
        status = Status.decode(json.dumps(observer.statuses[device]).encode())
    finally:
        watcher.loop_stop()
        watcher.disconnect()

    assert status.windows == WINDOWS
    assert status.embeddings_sent == WINDOWS
    assert status.queue_depth == 0
