"""Over-the-air heads against a real Mosquitto: a running recorder rejects bad heads and
keeps scoring with the head it has, and applies a good one between windows."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from dawnchorus.edge.audio import FileSource
from dawnchorus.edge.recorder import Recorder, RecorderConfig
from dawnchorus.models.backbone import Backbone, load_source_model
from dawnchorus.models.export import head_to_tflite
from dawnchorus.models.head import TFLiteHead
from dawnchorus.protocol import topics
from dawnchorus.protocol.messages import Ack, Manifest

SITE = "ota-site"
DEVICE = "rec-ota"
SITE_LABELS = [
    "Turdus merula_Eurasian Blackbird", "Erithacus rubecula_European Robin",
    "Fringilla coelebs_Common Chaffinch", "Phylloscopus collybita_Common Chiffchaff",
]


@pytest.fixture(scope="module")
def source():
    return load_source_model()


@pytest.fixture(scope="module")
def head_blob(source):
    head = source.head.select(SITE_LABELS)
    head.version = 1
    return head, head_to_tflite(head, "fp16")


def _manifest(head, blob: bytes, version: int, **changes) -> Manifest:
    probe = np.random.default_rng(0).random((4, 1024), dtype=np.float32).astype(np.float16).astype(np.float32)
    manifest = Manifest(
        site=SITE, version=version, parent=version - 1, labels=head.labels,
        sha256=hashlib.sha256(blob).hexdigest(), size=len(blob), precision="fp16",
        blob_topic=topics.blob_topic(SITE, version), created=time.time(), probe_embeddings=probe,
        probe_logits=TFLiteHead(blob, head.labels, version).logits(probe),
    )
    for name, value in changes.items():
        setattr(manifest, name, value)
    return manifest


class _Operator:
    """Plays the base station's part: publishes manifests and blobs and collects acks."""

    def __init__(self, broker):
        self.acks: list[Ack] = []
        self._got_ack = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-operator")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topics.device_wildcard("ack"), qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, message):
        with self._got_ack:
            self.acks.append(Ack.decode(message.payload))
            self._got_ack.notify_all()

    def push(self, manifest: Manifest, blob: bytes) -> Ack:
        count = len(self.acks)
        self.client.publish(manifest.blob_topic, blob, qos=1, retain=True).wait_for_publish(10)
        self.client.publish(topics.manifest_topic(SITE), manifest.encode(), qos=1, retain=True).wait_for_publish(10)
        with self._got_ack:
            assert self._got_ack.wait_for(lambda: len(self.acks) > count, timeout=30), "no ack within 30 s"
            return self.acks[-1]

    def clear(self):
        self.client.publish(topics.manifest_topic(SITE), b"", qos=1, retain=True).wait_for_publish(10)
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture()
def running_recorder(mosquitto, source, data_dir, tmp_path):
    config = RecorderConfig(device=DEVICE, site=SITE, broker_host=mosquitto.host, broker_port=mosquitto.port,
                            state_dir=tmp_path, min_conf=0.5, windows_per_message=4)
    # 10x real time over 16 min of audio: the recorder is busy for the whole test.
    recorder = Recorder(config, Backbone(source.backbone, num_threads=1), source.head,
                        FileSource([data_dir / "soundscapes/maad-24h"], speed=10.0))
    thread = threading.Thread(target=recorder.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while recorder.counters["windows"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    yield recorder
    recorder.stop()
    thread.join(timeout=30)


def test_ota_bad_heads_rejected_then_good_head_applied(mosquitto, running_recorder, head_blob, tmp_path):
    head, blob = head_blob
    operator = _Operator(mosquitto)
    try:
        wrong_sha = operator.push(_manifest(head, blob, 1, sha256="0" * 64), blob)
        windows_after_reject = running_recorder.counters["windows"]
        truncated = operator.push(_manifest(head, blob, 2), blob[: len(blob) // 2])
        other_site = operator.push(_manifest(head, blob, 3, site="elsewhere"), blob)
        bad_probe = _manifest(head, blob, 4)
        bad_probe.probe_logits = bad_probe.probe_logits + 1.0
        probe_mismatch = operator.push(bad_probe, blob)

        assert not wrong_sha.accepted
        assert "sha256" in wrong_sha.reason
        assert not truncated.accepted
        assert "truncated" in truncated.reason
        assert not other_site.accepted
        assert "site" in other_site.reason
        assert not probe_mismatch.accepted
        assert "probe" in probe_mismatch.reason
        assert running_recorder.head_version == 0
        assert running_recorder.counters["heads_rejected"] == 4

        time.sleep(1.0)
        assert running_recorder.counters["windows"] > windows_after_reject, "recorder stopped scoring"

        good = operator.push(_manifest(head, blob, 5), blob)
        assert good.accepted
        assert good.version == 5
        assert running_recorder.head_version == 5

        stored = json.loads((tmp_path / DEVICE / "heads" / "current.json").read_text())
        assert stored["version"] == 5
        assert (tmp_path / DEVICE / "heads" / "current.tflite").read_bytes() == blob

        replay = operator.push(_manifest(head, blob, 4), blob)
        assert not replay.accepted
        assert "replay" in replay.reason
        assert running_recorder.head_version == 5
    finally:
        operator.clear()


def test_ota_restart_resumes_last_good_head(mosquitto, source, head_blob, tmp_path, data_dir):
    head, blob = head_blob
    config = RecorderConfig(device=DEVICE, site=SITE, broker_host=mosquitto.host, broker_port=mosquitto.port,
                            state_dir=tmp_path)
    from dawnchorus.edge.ota import HeadStore

    store = HeadStore(tmp_path / DEVICE / "heads")
    store.install(_manifest(head, blob, 2), blob)
    store.install(_manifest(head, blob, 3), blob)
    (tmp_path / DEVICE / "heads" / "current.tflite").write_bytes(blob[:100])

    recorder = Recorder(config, Backbone(source.backbone, num_threads=1), source.head,
                        FileSource([data_dir / "soundscapes/opensoundscape/birds_10s.wav"]))
    assert recorder.head_version == 2
