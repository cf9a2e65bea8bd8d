"""Mosquitto running the shipped deploy/mosquitto/dawnchorus.conf as a conf.d snippet of Debian's
mosquitto.conf: the snippet starts there, and a base station that is offline while recorders publish,
and across a broker restart, receives every batch afterwards."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import soundfile

from dawnchorus.models.backbone import Backbone, load_source_model
from dawnchorus.protocol import topics
from dawnchorus.protocol.embeddings import EmbeddingBatch, decode_embeddings, encode_embeddings
from support import DEBIAN_MOSQUITTO_CONF, config_keys, debian_layout

REPO = pathlib.Path(__file__).resolve().parents[1]
DEPLOY_CONFIG = REPO / "deploy" / "mosquitto" / "dawnchorus.conf"
TLS_CONFIG = REPO / "deploy" / "mosquitto" / "dawnchorus-tls.conf"
SITE, DEVICE = "queue-site", "rec-queue"

# Batches published while the station is offline: two and a half times
# Mosquitto's default max_queued_messages (1000), 16 windows each as recorders send them.
BATCHES = 2500


def _shipped_config(directory: pathlib.Path, changes: dict[str, str]):
    """Return Debian's main configuration for a port, including the shipped snippet from its conf.d.

    The snippet's listener binds to loopback on the test's port and its
    password file points into ``directory``; Debian's lines keep their keys,
    with the persistence folder and the log moved into ``directory``
    (``support.debian_layout``). ``changes`` replaces further settings of the
    snippet by name.
    """

    def render(port: int) -> str:
        lines = []
        for line in DEPLOY_CONFIG.read_text().splitlines():
            key = line.split(" ", 1)[0]
            if key == "listener":
                line = f"listener {port} 127.0.0.1"
            elif key == "password_file":
                line = f"password_file {directory / 'passwd'}"
            elif key in changes:
                line = f"{key} {changes[key]}"
            lines.append(line)
        main = debian_layout(directory, "\n".join(lines) + "\n")
        if os.geteuid() == 0:
            # As root, Mosquitto would switch to the mosquitto user, which cannot enter pytest's private folders.
            main += "user root\n"
        return main

    return render


def _add_users(passwd: pathlib.Path, users) -> None:
    for user in users:
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if not passwd.exists() else []), str(passwd), user,
                        "secret-" + user], check=True, capture_output=True, timeout=30)


def _client(broker, client_id: str, user: str, clean_session: bool = True) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session)
    client.username_pw_set(user, "secret-" + user)
    return client


@pytest.fixture(scope="module")
def batch_embeddings(data_dir):
    audio, _ = soundfile.read(data_dir / "soundscapes/birdnet-example/soundscape.flac", dtype="float32")
    return Backbone(load_source_model().backbone).embed(audio[: 16 * 144_000].reshape(16, 144_000))


def _received_after_offline(start_mosquitto, tmp_path, batch_embeddings, changes: dict[str, str]):
    """Queue BATCHES for an offline station, restart the broker, reconnect; return (sequence numbers received, log)."""
    directory = tmp_path / "broker"
    directory.mkdir()
    _add_users(directory / "passwd", ("base-station", DEVICE))
    config = _shipped_config(directory, changes)
    broker = start_mosquitto("broker", config)

    received: set[int] = set()

    def on_message(client, userdata, message):
        received.add(int(decode_embeddings(message.payload).sequence[0]))

    subscribed = threading.Event()
    station = _client(broker, "test-offline-station", "base-station", clean_session=False)
    station.on_message = on_message
    station.on_subscribe = lambda *args: subscribed.set()
    station.connect(broker.host, broker.port)
    station.loop_start()
    station.subscribe(topics.device_wildcard("embeddings"), qos=1)
    assert subscribed.wait(20)
    station.disconnect()
    station.loop_stop()

    recorder = _client(broker, DEVICE, DEVICE)
    recorder.connect(broker.host, broker.port)
    recorder.loop_start()
    topic = topics.device_topic(SITE, DEVICE, "embeddings")
    sent = []
    for index in range(BATCHES):
        sequence = np.arange(16 * index, 16 * index + 16, dtype=np.uint64)
        batch = EmbeddingBatch(DEVICE, SITE, 0, sequence, sequence * 3.0, batch_embeddings)
        sent.append(recorder.publish(topic, encode_embeddings(batch), qos=1))
    for info in sent:
        info.wait_for_publish(60)
    assert all(info.is_published() for info in sent)
    recorder.disconnect()
    recorder.loop_stop()

    # A clean broker restart keeps the queue (persistence true).
    broker.stop()
    broker = start_mosquitto("broker", config, port=broker.port)

    station.connect(broker.host, broker.port)
    station.loop_start()
    # Wait for all, or until none has arrived for 3 s after the first, so that a count below BATCHES is final.
    deadline = time.monotonic() + 120
    count, last_change = 0, time.monotonic()
    while len(received) < BATCHES and time.monotonic() < deadline:
        time.sleep(0.2)
        if len(received) != count:
            count, last_change = len(received), time.monotonic()
        elif count and time.monotonic() - last_change > 3.0:
            break
    station.disconnect()
    station.loop_stop()
    broker.stop()
    return received, (directory / "mosquitto.log").read_text()


def test_shipped_config_keeps_offline_station_queue(start_mosquitto, tmp_path, batch_embeddings):
    received, log = _received_after_offline(start_mosquitto, tmp_path, batch_embeddings, {})
    lost = BATCHES - len(received)
    print(f"shipped Mosquitto configuration: {BATCHES} batches queued for an offline station, "
          f"{len(received)} received after a broker restart, {lost} lost")
    assert len(received) == BATCHES
    assert received == {16 * index for index in range(BATCHES)}
    assert "dropped" not in log


def test_default_queue_limit_drops_silently(start_mosquitto, tmp_path, batch_embeddings):
    # The same run with Mosquitto's default max_queued_messages shows what the shipped limits prevent.
    received, log = _received_after_offline(start_mosquitto, tmp_path, batch_embeddings,
                                            {"max_queued_messages": "1000"})
    assert len(received) < BATCHES
    assert "Outgoing messages are being dropped for client test-offline-station" in log


@pytest.mark.parametrize("shipped", [DEPLOY_CONFIG, TLS_CONFIG], ids=lambda path: path.name)
def test_snippet_leaves_out_debian_keys(shipped):
    # Mosquitto exits on a key such as persistence_location set both in mosquitto.conf and in a snippet.
    debian_keys = config_keys(DEBIAN_MOSQUITTO_CONF) - {"include_dir"}

    assert debian_keys == {"pid_file", "persistence", "persistence_location", "log_dest"}
    assert config_keys(shipped.read_text()) & debian_keys == set()


def test_snippet_runs_in_debian_layout(start_mosquitto, tmp_path):
    directory = tmp_path / "debian"
    directory.mkdir()
    _add_users(directory / "passwd", ("base-station",))
    broker = start_mosquitto("debian", _shipped_config(directory, {}))

    client = _client(broker, "test-debian-layout", "base-station")
    assert client.connect(broker.host, broker.port) == mqtt.MQTT_ERR_SUCCESS
    client.disconnect()
    broker.stop()
    log = (directory / "mosquitto.log").read_text()
    assert f"{directory}/conf.d/dawnchorus.conf" in log
    assert "Error" not in log


def test_duplicate_debian_key_stops_broker(tmp_path):
    # The failure that the snippet avoids: Debian's main file and a snippet that sets persistence_location again.
    main = tmp_path / "mosquitto.conf"
    main.write_text(debian_layout(tmp_path, "persistence_location /var/lib/mosquitto/\n"))
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

    result = subprocess.run([binary, "-c", str(main)], capture_output=True, text=True, timeout=30)

    assert result.returncode != 0
    assert "Duplicate persistence_location" in result.stdout + result.stderr
