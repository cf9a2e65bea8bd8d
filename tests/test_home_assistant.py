"""Home Assistant MQTT discovery from the real recorder program, replaying a real recording, on a real Mosquitto.

A subscriber on ``homeassistant/#`` collects the discovery configs as Home
Assistant would, then renders each entity's templates (Jinja2, as Home
Assistant does) on the retained payloads of the topics they name.
"""

from __future__ import annotations

import json
import signal
import threading
import uuid

import jinja2
import paho.mqtt.client as mqtt
import pytest

from dawnchorus import __version__
from dawnchorus.edge.recorder import RecorderConfig
from dawnchorus.protocol import home_assistant, topics
from dawnchorus.protocol.messages import decode_detections

SITE = "ha-site"
DEVICE = "rec-ha.1"
NODE = "dawnchorus_rec-ha_1"
PREFIX = "homeassistant"
WINDOWS = 4  # birds_10s.wav: three full windows and a padded 1.1 s tail


class _Retained:
    """Records the latest payload of every topic under Home Assistant's prefix and the recorder's topics."""

    def __init__(self, broker):
        self.payloads: dict[str, bytes] = {}
        self.detections: list = []
        self._condition = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-ha-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe([(f"{PREFIX}/#", 1), (f"{topics.ROOT}/{SITE}/{DEVICE}/+", 1)])
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        with self._condition:
            self.payloads[message.topic] = bytes(message.payload)
            if message.topic.endswith("/detections"):
                self.detections.extend(decode_detections(message.payload))
            self._condition.notify_all()

    def wait_for(self, condition, timeout: float) -> bool:
        with self._condition:
            return self._condition.wait_for(condition, timeout=timeout)

    def json(self, topic: str) -> dict:
        with self._condition:
            return json.loads(self.payloads[topic])

    def clear(self) -> None:
        """Clear the retained messages the test left, as a user removing the recorder would."""
        with self._condition:
            retained = [topic for topic in self.payloads if not topic.endswith(("/detections", "/embeddings"))]
        for topic in retained:
            self.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
        self.client.loop_stop()
        self.client.disconnect()


def _render(template: str, payload: bytes) -> str:
    """Render a value template the way Home Assistant does for an MQTT message."""
    return jinja2.Environment().from_string(template).render(value=payload.decode(), value_json=json.loads(payload))


def _config_topics() -> dict[str, str]:
    return {
        "last_species": f"{PREFIX}/sensor/{NODE}/last_species/config",
        "last_confidence": f"{PREFIX}/sensor/{NODE}/last_confidence/config",
        "online": f"{PREFIX}/binary_sensor/{NODE}/online/config",
    }


@pytest.fixture()
def replayed(programs, mosquitto, data_dir, tmp_path):
    """A recorder with discovery on that has replayed birds_10s.wav and stays connected."""
    retained = _Retained(mosquitto)
    status_topic = topics.device_topic(SITE, DEVICE, "status")
    recorder = programs.start(
        "edge", "run", "--device", DEVICE, "--site", SITE, "--broker", mosquitto.address,
        "--input", str(data_dir / "soundscapes/opensoundscape/birds_10s.wav"), "--speed", "0", "--stay",
        "--min-conf", "0.3", "--home-assistant", "--state-dir", str(tmp_path / "edge"), "--threads", "1",
        log="recorder.log",
    )

    def replay_done() -> bool:
        status = retained.payloads.get(status_topic)
        last = retained.payloads.get(topics.last_detection_topic(SITE, DEVICE))
        # The outbox sends detections in order, so once the last one arrived, all before it did too.
        return (status is not None and json.loads(status).get("windows") == WINDOWS
                and all(topic in retained.payloads for topic in _config_topics().values())
                and last is not None
                and json.loads(last)["time"] in {detection.start_time for detection in retained.detections})

    assert retained.wait_for(replay_done, 120), programs.log("recorder.log")[-3000:]
    yield retained, recorder
    retained.clear()


def test_discovery_configs_published_retained(replayed):
    retained, _ = replayed

    configs = {topic for topic in retained.payloads if topic.startswith(f"{PREFIX}/")}

    assert configs == set(_config_topics().values())


def test_discovery_configs_name_device(replayed):
    retained, _ = replayed

    for name, topic in _config_topics().items():
        config = retained.json(topic)
        assert config["unique_id"] == f"dawnchorus_{DEVICE}_{name}", topic
        assert config["device"]["identifiers"] == [f"dawnchorus_{DEVICE}"], topic
        assert config["device"]["name"] == DEVICE, topic
        assert config["device"]["model"] == "dawnchorus recorder", topic
        assert config["device"]["sw_version"] == __version__, topic
        assert config["origin"]["name"] == "dawnchorus", topic


def test_discovery_sensors_read_last_detection(replayed):
    retained, _ = replayed
    species = retained.json(_config_topics()["last_species"])
    confidence = retained.json(_config_topics()["last_confidence"])
    # The most confident detection of the latest window with any.
    expected = max(retained.detections, key=lambda d: (d.start_time, d.confidence))
    state = retained.payloads[species["state_topic"]]

    assert species["state_topic"] == topics.last_detection_topic(SITE, DEVICE)
    assert confidence["state_topic"] == species["state_topic"]
    assert _render(species["value_template"], state) == expected.common_name
    assert float(_render(confidence["value_template"], state)) == round(expected.confidence * 100, 1)
    assert confidence["unit_of_measurement"] == "%"
    assert json.loads(retained.payloads[species["json_attributes_topic"]])["scientific_name"] == \
        expected.scientific_name


def test_discovery_online_follows_status(replayed):
    retained, recorder = replayed
    online = retained.json(_config_topics()["online"])
    species = retained.json(_config_topics()["last_species"])
    availability = species["availability"][0]

    while_running = _render(online["value_template"], retained.payloads[online["state_topic"]])
    available = _render(availability["value_template"], retained.payloads[availability["topic"]])
    recorder.send_signal(signal.SIGTERM)
    recorder.wait(timeout=60)
    assert retained.wait_for(lambda: retained.json(online["state_topic"])["state"] == "offline", 30)
    after_stop = _render(online["value_template"], retained.payloads[online["state_topic"]])
    unavailable = _render(availability["value_template"], retained.payloads[availability["topic"]])

    assert online["device_class"] == "connectivity"
    assert online["state_topic"] == topics.device_topic(SITE, DEVICE, "status")
    assert while_running == online["payload_on"]
    assert after_stop == online["payload_off"]
    assert available == "online"
    assert unavailable == "offline"


def test_discovery_node_id_replaces_dot():
    assert home_assistant.node_id("rec-ha.1") == NODE


@pytest.mark.parametrize("prefix", ["", "home/#", "/homeassistant", "ha/+/x", "homeassistant/"])
def test_recorder_config_rejects_invalid_prefix(prefix, tmp_path):
    with pytest.raises(ValueError, match="discovery prefix"):
        RecorderConfig(device=DEVICE, site=SITE, state_dir=tmp_path, home_assistant_prefix=prefix)
