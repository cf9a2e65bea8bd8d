"""Shared fixtures: the real recordings beside the repository, a real Mosquitto broker, and the
``dawnchorus`` programs as processes."""

from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable

import pytest
from hypothesis import HealthCheck, settings

from dawnchorus.server.broker import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Property tests run the same few hundred examples on every run ("ci"), so that
# the suite stays fast and a failure reproduces. For a longer fuzzing session
# with fresh random examples: pytest tests/test_protocol.py --hypothesis-profile=fuzz
settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=5_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    if not DATA.is_dir():
        pytest.skip(f"the shared recordings are not at {DATA}")
    return DATA



def _wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Mosquitto:
    """A Mosquitto process on a loopback port, with queue limits raised as in deploy/.

    ``kill`` and ``start`` stop and restart the broker on the same port, for fault tests.

    Args:
        directory: the folder for the configuration file and the log.
        extra_config: lines appended to the default configuration.
        config: returns the whole configuration text for a port, in place of
            the default anonymous listener without persistence.
        port: the port to listen on, e.g. to restart a broker; a free one by default.
    """

    def __init__(self, directory: pathlib.Path, extra_config: str = "",
                 config: Callable[[int], str] | None = None, port: int | None = None):
        self._binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(self._binary):
            pytest.fail("mosquitto is not installed: run .ci/run, or apt-get install mosquitto")
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.directory = directory
        self.log_path = directory / "mosquitto.log"
        self._config = directory / "mosquitto.conf"
        self._extra_config = extra_config
        self._config_text = config
        self._log = None
        self._process: subprocess.Popen | None = None
        self.start()

    def start(self, override: str = "") -> None:
        """Start the broker, with the configuration lines in ``override`` added for this run only."""
        if self._config_text is not None:
            text = self._config_text(self.port)
        else:
            text = (
                f"listener {self.port} 127.0.0.1\n"
                "allow_anonymous true\n"
                "persistence false\n"
                "max_queued_messages 100000\n"
                "max_inflight_messages 0\n"
                + self._extra_config
            )
        # Later lines override earlier ones in a Mosquitto configuration.
        self._config.write_text(text + override)
        self._log = open(self.log_path, "a")
        self._process = subprocess.Popen([self._binary, "-c", str(self._config)], stdout=self._log,
                                         stderr=subprocess.STDOUT)
        if not _wait_for_port(self.port, 10):
            self.stop()
            pytest.fail(f"mosquitto did not listen on 127.0.0.1:{self.port}; see {self.log_path}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self) -> None:
        """SIGKILL the broker, as a crash or power cut would stop it."""
        self._process.kill()
        self._process.wait(timeout=10)
        self._log.close()

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._log.close()


@pytest.fixture()
def start_mosquitto(tmp_path):
    """Start brokers of the test's own, each in its own folder under tmp_path; all stop at teardown.

    Call it with a folder name, and optionally ``config`` and ``port`` as ``Mosquitto`` takes them.
    """
    started: list[Mosquitto] = []

    def start(name: str, config: Callable[[int], str] | None = None, port: int | None = None) -> Mosquitto:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        broker = Mosquitto(directory, config=config, port=port)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture()
def mosquitto(tmp_path) -> Mosquitto:
    """A broker of the test's own.

    One per test, because the base station keeps a persistent session under
    a fixed client id: on a shared broker, that session would queue every
    later test's messages for the next base station that connects.
    """
    directory = tmp_path / "mosquitto"
    directory.mkdir()
    broker = Mosquitto(directory)
    yield broker
    broker.stop()


class DawnchorusPrograms:
    """``dawnchorus`` commands run as processes, each logging to a file, and stopped at teardown."""

    def __init__(self, directory: pathlib.Path):
        self._directory = directory
        self._processes: list[tuple[subprocess.Popen, object]] = []

    def start(self, *args: str, log: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        stream = open(self._directory / log, "a")
        process = subprocess.Popen([sys.executable, "-m", "dawnchorus", *args], stdout=stream,
                                   stderr=subprocess.STDOUT, env=env)
        self._processes.append((process, stream))
        return process

    def log(self, name: str) -> str:
        return (self._directory / name).read_text()

    def stop_all(self) -> None:
        for process, stream in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            stream.close()


@pytest.fixture()
def programs(tmp_path) -> DawnchorusPrograms:
    started = DawnchorusPrograms(tmp_path)
    yield started
    started.stop_all()



class MqttObserver:
    """A test client on the broker that publishes heads as an operator would and records what recorders send.

    It records acks, retained statuses, the head version of each embeddings
    message and every manifest published, and clears the retained model
    topics it saw when it closes.
    """

    def __init__(self, broker: Mosquitto):
        import paho.mqtt.client as mqtt

        from dawnchorus.protocol import topics

        self._topics = topics
        self._condition = threading.Condition()
        self.acks: list = []
        self.statuses: dict[str, dict] = {}
        self.embedding_versions: dict[str, list[int]] = {}
        self.manifests: list[bytes] = []
        self._model_topics: set[str] = set()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-observer-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        for kind in ("ack", "status", "embeddings"):
            self.client.subscribe(topics.device_wildcard(kind), qos=1)
        self.client.subscribe(topics.manifest_wildcard(), qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        import json

        from dawnchorus.protocol.embeddings import decode_embeddings
        from dawnchorus.protocol.messages import Ack

        with self._condition:
            if message.topic.endswith("/manifest"):
                self._model_topics.add(message.topic)
                if message.payload:
                    self.manifests.append(bytes(message.payload))
            elif message.topic.endswith("/ack"):
                self.acks.append(Ack.decode(message.payload))
            elif message.topic.endswith("/status") and message.payload:
                status = json.loads(message.payload)
                self.statuses[status["device"]] = status
            elif message.topic.endswith("/embeddings"):
                batch = decode_embeddings(message.payload)
                self.embedding_versions.setdefault(batch.device, []).append(batch.head_version)
            self._condition.notify_all()

    def wait_for(self, condition, timeout: float):
        """Wait until ``condition()`` returns a true value, evaluated whenever a message arrives."""
        with self._condition:
            return self._condition.wait_for(condition, timeout=timeout)

    def acks_of(self, device: str) -> list:
        with self._condition:
            return [ack for ack in self.acks if ack.device == device]

    def wait_online(self, device: str, timeout: float = 120.0) -> bool:
        """Wait until ``device`` is connected: its status is "online", or "finished" once its replay ended."""
        return bool(self.wait_for(lambda: self.statuses.get(device, {}).get("state") in ("online", "finished"),
                                  timeout))

    def push(self, manifest_payload: bytes, blob_topic: str | None, blob: bytes | None, site: str,
             device: str, timeout: float = 60.0, retain: bool = True):
        """Publish a blob and a manifest, retained unless ``retain`` is False, and return the next ack from ``device``."""
        seen = len(self.acks_of(device))
        if blob_topic is not None:
            self._model_topics.add(blob_topic)
            self.client.publish(blob_topic, blob, qos=1, retain=retain).wait_for_publish(10)
        self.client.publish(self._topics.manifest_topic(site), manifest_payload, qos=1,
                            retain=retain).wait_for_publish(10)
        if not self.wait_for(lambda: len(self.acks_of(device)) > seen, timeout):
            raise AssertionError(f"no ack from {device} within {timeout} s")
        return self.acks_of(device)[seen]

    def close(self) -> None:
        for topic in sorted(self._model_topics):
            self.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture()
def observer(mosquitto) -> MqttObserver:
    watcher = MqttObserver(mosquitto)
    yield watcher
    watcher.close()


@pytest.fixture()
def persistent_mosquitto(tmp_path) -> Mosquitto:
    """A broker of the test's own, which keeps sessions and queued messages across ``kill`` and ``start``.

    It saves its database every second, so a subscriber's persistent session
    (clean_session False) survives a SIGKILL once the broker saved it.
    """
    directory = tmp_path / "broker"
    directory.mkdir()
    broker = Mosquitto(directory, extra_config=(
        f"persistence true\npersistence_location {directory}/\nautosave_interval 1\n"
        # Started as root, Mosquitto switches to this user, which must be able to write the test's folder.
        f"user {pwd.getpwuid(os.getuid()).pw_name}\n"))
    yield broker
    broker.stop()


@pytest.fixture()
def observe():
    """Start an ``MqttObserver`` on a given broker; it closes at teardown."""
    watchers: list[MqttObserver] = []

    def start(broker: Mosquitto) -> MqttObserver:
        watchers.append(MqttObserver(broker))
        return watchers[-1]

    yield start
    for watcher in watchers:
        watcher.close()
