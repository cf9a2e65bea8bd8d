"""Who may do what, against a real Mosquitto running deploy/mosquitto/dawnchorus-tls.conf.

The credentials come from deploy/make-credentials.sh, run into a temporary
folder. Mosquitto drops a publish that the ACL denies without telling an MQTT
3.1.1 client. So each "cannot" test publishes the denied messages first and
an allowed one last on the same connection. The broker handles one client's
messages in order, so a denied message that got through would arrive before
the allowed one.
"""

from __future__ import annotations

import getpass
import json
import os
import pathlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest


from dawnchorus.protocol import home_assistant, topics
from dawnchorus.protocol.tls import TlsSettings
from dawnchorus.server.broker import free_port
from support import debian_layout
from support import SPECIES
from support import wait as _wait

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "make-credentials.sh"
TLS_CONFIG = REPO / "deploy" / "mosquitto" / "dawnchorus-tls.conf"
PLAIN_CONFIG = REPO / "deploy" / "mosquitto" / "dawnchorus.conf"
INSTALLED_DIR = "/etc/mosquitto/dawnchorus/"

BASE_STATION = "base-station"
HOME_ASSISTANT = "home-assistant"
RECORDERS = {"rec-01": "forest-a", "rec-02": "forest-a", "rec-03": "meadow"}
WAIT_S = 30.0


def _make_credentials(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result



class SecureBroker:
    """Mosquitto with the shipped TLS configuration, its paths pointed at credentials in ``directory``."""

    def __init__(self, directory: pathlib.Path):
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(binary):
            pytest.fail("mosquitto is not installed: run .ci/run, or apt-get install mosquitto")
        self.credentials = directory / "credentials"
        _make_credentials("init", str(self.credentials), "127.0.0.1", "localhost")
        for site in sorted(set(RECORDERS.values())):
            _make_credentials("recorder", str(self.credentials), site,
                              *[device for device, of_site in RECORDERS.items() if of_site == site])
        _make_credentials("home-assistant", str(self.credentials), HOME_ASSISTANT)

        self.host = "127.0.0.1"
        self.port = free_port()
        config = TLS_CONFIG.read_text()
        replacements = [
            (INSTALLED_DIR, f"{self.credentials / 'broker'}/"),
            ("listener 8883\n", f"listener {self.port} 127.0.0.1\n"),
        ]
        for old, new in replacements:
            assert old in config, f"{TLS_CONFIG} no longer contains {old!r}; update this fixture"
            config = config.replace(old, new)
        # The shipped file is a snippet in the include_dir of Debian's mosquitto.conf, as installed.
        config = debian_layout(directory, config + "log_type all\n")
        # Mosquitto started as root changes to the user 'mosquitto', which cannot read
        # pytest's private temporary folders; this keeps it running as the test's user.
        config += f"user {getpass.getuser()}\n"
        self.config_path = directory / "mosquitto-tls.conf"
        self.config_path.write_text(config)
        self.log_path = directory / "mosquitto.log"
        self._log = open(self.log_path, "w")
        self._process = subprocess.Popen([binary, "-c", str(self.config_path)], stdout=self._log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT_S
        while "running" not in self.log_path.read_text():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mosquitto did not start with {self.config_path}:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def tls(self, identity: str) -> TlsSettings:
        files = self.credentials / "clients" / identity
        return TlsSettings(files / "ca.crt", files / "client.crt", files / "client.key")

    def client_arguments(self, identity: str) -> list[str]:
        tls = self.tls(identity)
        return ["--broker", self.address, "--mqtt-ca", str(tls.ca_file), "--mqtt-cert", str(tls.cert_file),
                "--mqtt-key", str(tls.key_file)]

    def reload(self) -> None:
        """Make Mosquitto reread the ACL and the CRL, as ``systemctl reload mosquitto`` does."""
        self._process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._log.close()


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory) -> SecureBroker:
    broker = SecureBroker(tmp_path_factory.mktemp("secure-broker"))
    yield broker
    broker.stop()


class Client:
    """A paho client that records the messages it receives."""

    def __init__(self, broker: SecureBroker, tls: TlsSettings | None):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}")
        if tls is not None:
            tls.apply(self.client)
        self.broker = broker
        self.messages: list[tuple[str, bytes, bool]] = []
        self.events: queue.Queue[str] = queue.Queue()
        self._condition = threading.Condition()
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda client, userdata, flags, reason_code, properties: \
            self.events.put(f"disconnected: {reason_code}")
        self.client.on_connect_fail = lambda client, userdata: self.events.put("connection failed")
        self.client.on_subscribe = lambda client, userdata, mid, reason_codes, properties: \
            self.events.put(f"subscribed: {[str(code) for code in reason_codes]}")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.events.put(f"refused: {reason_code}" if reason_code.is_failure else "connected")

    def _on_message(self, client, userdata, message) -> None:
        with self._condition:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))
            self._condition.notify_all()

    def connect(self) -> str:
        """Connect and return "connected", or how the broker turned the client away."""
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        except OSError as error:
            return f"connection failed: {error}"
        self.client.loop_start()
        try:
            return self.events.get(timeout=WAIT_S)
        except queue.Empty:
            return "no answer"

    def subscribe(self, *filters: str) -> str:
        self.client.subscribe([(topic, 1) for topic in filters])
        return self.events.get(timeout=WAIT_S)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT_S)
        assert info.is_published(), f"no PUBACK for {topic}"

    def wait_for(self, topic: str, payload: bytes) -> bool:
        with self._condition:
            return self._condition.wait_for(
                lambda: any(t == topic and p == payload for t, p, _ in self.messages), timeout=WAIT_S)

    def topics_received(self) -> set[str]:
        with self._condition:
            return {topic for topic, _, _ in self.messages}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def connect(secure_broker):
    """Connect clients as an identity of the fleet, and close them after the test."""
    opened: list[Client] = []

    def connect_as(identity: str) -> Client:
        client = Client(secure_broker, secure_broker.tls(identity))
        outcome = client.connect()
        assert outcome == "connected", f"{identity}: {outcome}\n{secure_broker.log_path.read_text()[-2000:]}"
        opened.append(client)
        return client

    yield connect_as
    for client in opened:
        client.close()


def _device_topic(device: str, kind: str = "embeddings", site: str | None = None) -> str:
    return topics.device_topic(site or RECORDERS[device], device, kind)


def _base_station_watching(connect) -> Client:
    station = connect(BASE_STATION)
    filters = [topics.device_wildcard(kind) for kind in topics.DEVICE_KINDS]
    assert "Failure" not in station.subscribe(*filters, f"{topics.ROOT}/+/{topics.MODEL_SEGMENT}/#")
    return station


# Connections ---------------------------------------------------------------------------


def test_client_without_certificate_rejected(secure_broker):
    ca_file = secure_broker.credentials / "broker" / "ca.crt"
    plain = Client(secure_broker, None)
    plain.client.username_pw_set("rec-01", "any password")
    anonymous_tls = Client(secure_broker, TlsSettings(ca_file))
    password_tls = Client(secure_broker, TlsSettings(ca_file))
    password_tls.client.username_pw_set(BASE_STATION, "any password")

    outcomes = {name: client.connect() for name, client in
                [("plain", plain), ("tls", anonymous_tls), ("tls+password", password_tls)]}
    for client in (plain, anonymous_tls, password_tls):
        client.close()

    assert outcomes["plain"] != "connected"
    assert outcomes["tls"] != "connected"
    assert outcomes["tls+password"] != "connected"


def test_certificate_of_other_ca_rejected(secure_broker, tmp_path):
    _make_credentials("init", str(tmp_path / "other-fleet"), "127.0.0.1")
    _make_credentials("recorder", str(tmp_path / "other-fleet"), "forest-a", "rec-01")
    files = tmp_path / "other-fleet" / "clients" / "rec-01"
    # It trusts the real broker, so only the broker's check of the client certificate can fail.
    impostor = Client(secure_broker, TlsSettings(secure_broker.credentials / "broker" / "ca.crt",
                                                 files / "client.crt", files / "client.key"))
    outcome = impostor.connect()
    impostor.close()

    assert outcome != "connected"


def test_recorder_with_certificate_connects(connect):
    recorder = connect("rec-01")

    assert recorder.client.is_connected()


# Publishing ----------------------------------------------------------------------------


def test_recorder_cannot_publish_as_other_recorder(connect):
    station = _base_station_watching(connect)
    recorder = connect("rec-01")
    forged = {
        "other device, same site": _device_topic("rec-02"),
        "other device, other site": _device_topic("rec-03"),
        "own id, other site": _device_topic("rec-01", site="meadow"),
        "other device's status": _device_topic("rec-02", "status"),
    }

    for topic in forged.values():
        recorder.publish(topic, b"forged")
    recorder.publish(_device_topic("rec-01"), b"own")

    assert station.wait_for(_device_topic("rec-01"), b"own")
    received = station.topics_received()
    for case, topic in forged.items():
        assert topic not in received, case


def test_recorder_cannot_publish_heads(connect):
    station = _base_station_watching(connect)
    recorder = connect("rec-01")
    forged = [topics.manifest_topic("forest-a"), topics.blob_topic("forest-a", 99),
              topics.manifest_topic("meadow")]

    for topic in forged:
        recorder.publish(topic, b"forged head", retain=True)
    recorder.publish(_device_topic("rec-01", "ack"), b"own")

    assert station.wait_for(_device_topic("rec-01", "ack"), b"own")
    received = station.topics_received()
    for topic in forged:
        assert topic not in received


# Reading -------------------------------------------------------------------------------


def test_heads_reach_only_their_site(connect):
    station = connect(BASE_STATION)
    same_site = connect("rec-02")
    assert "Failure" not in same_site.subscribe(topics.manifest_topic("forest-a"))
    other_site = connect("rec-03")
    assert "Failure" not in other_site.subscribe(topics.manifest_topic("meadow"))
    prying = connect("rec-01")
    # Every filter that would match meadow's heads, and its own site's manifest last.
    prying.subscribe(topics.manifest_topic("meadow"), topics.manifest_wildcard(), f"{topics.ROOT}/#", "#",
                     topics.manifest_topic("forest-a"))

    station.publish(topics.manifest_topic("meadow"), b"meadow head")
    station.publish(topics.blob_topic("meadow", 1), b"meadow blob")
    station.publish(topics.manifest_topic("forest-a"), b"forest-a head")

    assert other_site.wait_for(topics.manifest_topic("meadow"), b"meadow head")
    assert same_site.wait_for(topics.manifest_topic("forest-a"), b"forest-a head")
    assert prying.wait_for(topics.manifest_topic("forest-a"), b"forest-a head")
    assert topics.manifest_topic("meadow") not in prying.topics_received()
    assert topics.blob_topic("meadow", 1) not in prying.topics_received()


def test_receipts_reach_only_their_recorder_and_come_only_from_the_base_station(connect):
    station = connect(BASE_STATION)
    own = topics.receipt_topic("forest-a", "rec-01")
    neighbour = topics.receipt_topic("forest-a", "rec-02")
    recorder = connect("rec-01")
    # Its own receipts, a neighbour's, and every filter that would match the neighbour's; its own last.
    recorder.subscribe(neighbour, f"{topics.ROOT}/forest-a/+/{topics.RECEIPT_KIND}", f"{topics.ROOT}/#", own)
    neighbour_recorder = connect("rec-02")
    assert "Failure" not in neighbour_recorder.subscribe(neighbour)

    # A recorder cannot confirm windows for another recorder or for itself.
    recorder.publish(neighbour, b"forged receipt")
    recorder.publish(own, b"self-made receipt")
    station.publish(neighbour, b"neighbour receipt")
    station.publish(own, b"own receipt")

    # The forged receipts were published, and acknowledged, before the station's.
    assert recorder.wait_for(own, b"own receipt")
    assert neighbour_recorder.wait_for(neighbour, b"neighbour receipt")
    assert neighbour not in recorder.topics_received()
    assert [payload for _, payload, _ in neighbour_recorder.messages] == [b"neighbour receipt"]
    assert [payload for _, payload, _ in recorder.messages] == [b"own receipt"]


def test_retained_heads_reach_only_their_site(connect):
    station = connect(BASE_STATION)
    meadow_manifest, forest_manifest = topics.manifest_topic("meadow"), topics.manifest_topic("forest-a")
    station.publish(meadow_manifest, b"retained meadow head", retain=True)
    station.publish(forest_manifest, b"retained forest-a head", retain=True)
    try:
        late = connect("rec-01")
        # Mosquitto sends retained messages filter by filter, in the order of the SUBSCRIBE.
        late.subscribe(meadow_manifest, forest_manifest)

        assert late.wait_for(forest_manifest, b"retained forest-a head")
        assert meadow_manifest not in late.topics_received()
    finally:
        station.publish(meadow_manifest, b"", retain=True)
        station.publish(forest_manifest, b"", retain=True)


def test_only_base_station_publishes_stats(connect):
    station = connect(BASE_STATION)
    stats = topics.station_stats_topic("dawnchorus-base-station-1-of-1")
    assert "Failure" not in station.subscribe(stats)
    recorder = connect("rec-01")

    recorder.publish(stats, b"forged stats")
    station.publish(stats, b"station stats")

    assert station.wait_for(stats, b"station stats")
    assert [payload for _, payload, _ in station.messages] == [b"station stats"]


def test_base_station_reads_recorder_topics(connect):
    station = _base_station_watching(connect)
    recorder = connect("rec-03")

    for kind in topics.DEVICE_KINDS:
        recorder.publish(_device_topic("rec-03", kind), kind.encode())

    for kind in topics.DEVICE_KINDS:
        assert station.wait_for(_device_topic("rec-03", kind), kind.encode()), kind


# Home Assistant ------------------------------------------------------------------------


def _discovery_topic(device: str) -> str:
    return f"{home_assistant.DEFAULT_PREFIX}/sensor/{home_assistant.node_id(device)}/last_species/config"


def test_recorder_publishes_only_own_discovery_and_state(connect):
    watcher = connect(HOME_ASSISTANT)
    assert "Failure" not in watcher.subscribe(f"{home_assistant.DEFAULT_PREFIX}/#",
                                              f"{topics.ROOT}/+/+/{topics.LAST_DETECTION_KIND}")
    recorder = connect("rec-01")
    forged = [_discovery_topic("rec-02"), _discovery_topic("rec-03"), topics.last_detection_topic("forest-a", "rec-02"),
              topics.last_detection_topic("meadow", "rec-01")]

    for topic in forged:
        recorder.publish(topic, b"forged", retain=True)
    recorder.publish(topics.last_detection_topic("forest-a", "rec-01"), b"own state")
    recorder.publish(_discovery_topic("rec-01"), b"own config")

    assert watcher.wait_for(topics.last_detection_topic("forest-a", "rec-01"), b"own state")
    assert watcher.wait_for(_discovery_topic("rec-01"), b"own config")
    received = watcher.topics_received()
    for topic in forged:
        assert topic not in received


def test_recorder_with_dot_in_id_publishes_discovery(secure_broker, connect):
    _make_credentials("recorder", str(secure_broker.credentials), "meadow", "rec.04")
    secure_broker.reload()
    watcher = connect(HOME_ASSISTANT)
    assert "Failure" not in watcher.subscribe(f"{home_assistant.DEFAULT_PREFIX}/#")

    recorder = connect("rec.04")

    # The ACL and the recorder must agree on the node id that replaces '.'. Mosquitto rereads the ACL
    # between network reads, so the first publishes may still meet the old ACL.
    deadline = time.monotonic() + WAIT_S
    while _discovery_topic("rec.04") not in watcher.topics_received() and time.monotonic() < deadline:
        recorder.publish(_discovery_topic("rec.04"), b"own config")
        time.sleep(0.2)

    assert _discovery_topic("rec.04") in watcher.topics_received()


def test_home_assistant_reads_status_and_state_only(connect):
    watcher = connect(HOME_ASSISTANT)
    # Every recorder topic; the ACL decides which messages it receives.
    assert "Failure" not in watcher.subscribe(f"{topics.ROOT}/#")
    recorder = connect("rec-03")

    for kind in ("embeddings", "detections", "ack"):
        recorder.publish(_device_topic("rec-03", kind), kind.encode())
    recorder.publish(_device_topic("rec-03", "status"), b"status")
    recorder.publish(topics.last_detection_topic("meadow", "rec-03"), b"last detection")

    assert watcher.wait_for(_device_topic("rec-03", "status"), b"status")
    assert watcher.wait_for(topics.last_detection_topic("meadow", "rec-03"), b"last detection")
    received = watcher.topics_received()
    for kind in ("embeddings", "detections", "ack"):
        assert _device_topic("rec-03", kind) not in received, kind


def test_home_assistant_cannot_publish_recorder_topics(connect):
    station = _base_station_watching(connect)
    watcher = connect(HOME_ASSISTANT)
    assert "Failure" not in watcher.subscribe(f"{topics.ROOT}/+/+/status", f"{home_assistant.DEFAULT_PREFIX}/#")
    forger = connect(HOME_ASSISTANT)
    forged = [_device_topic("rec-01", "status"), _device_topic("rec-01"), topics.manifest_topic("forest-a")]

    for topic in forged:
        forger.publish(topic, b"forged")
    forger.publish(f"{home_assistant.DEFAULT_PREFIX}/status", b"online")
    connect("rec-01").publish(_device_topic("rec-01", "ack"), b"marker")

    assert watcher.wait_for(f"{home_assistant.DEFAULT_PREFIX}/status", b"online")
    assert station.wait_for(_device_topic("rec-01", "ack"), b"marker")
    received = watcher.topics_received() | station.topics_received()
    for topic in forged:
        assert topic not in received


def test_make_credentials_rejects_invalid_prefix(secure_broker):
    result = subprocess.run(["bash", str(SCRIPT), "home-assistant", "--prefix", "ha/#", str(secure_broker.credentials)],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert "invalid discovery prefix" in result.stderr


# Rotation and revocation ----------------------------------------------------------------


def _wait_until_rejected(broker: SecureBroker, tls: TlsSettings) -> str:
    """Connect with ``tls`` until the broker rejects it, which it does once it has reread the CRL."""
    deadline = time.monotonic() + WAIT_S
    while True:
        client = Client(broker, tls)
        outcome = client.connect()
        client.close()
        if outcome != "connected" or time.monotonic() > deadline:
            return outcome
        time.sleep(0.2)


def test_rotated_certificate_replaces_old(secure_broker, connect, tmp_path):
    _make_credentials("recorder", str(secure_broker.credentials), "forest-a", "rec-rotated")
    secure_broker.reload()
    connect("rec-rotated")
    old_files = tmp_path / "old"
    shutil.copytree(secure_broker.credentials / "clients" / "rec-rotated", old_files)

    _make_credentials("recorder", str(secure_broker.credentials), "forest-a", "rec-rotated")
    secure_broker.reload()

    outcome = _wait_until_rejected(secure_broker, TlsSettings(old_files / "ca.crt", old_files / "client.crt",
                                                              old_files / "client.key"))
    assert outcome != "connected"
    assert connect("rec-rotated").client.is_connected()


def test_renewed_base_station_certificate_replaces_old(secure_broker, connect, tmp_path):
    old_files = tmp_path / "old"
    shutil.copytree(secure_broker.credentials / "clients" / BASE_STATION, old_files)

    _make_credentials("renew", str(secure_broker.credentials), "base-station")
    secure_broker.reload()

    outcome = _wait_until_rejected(secure_broker, TlsSettings(old_files / "ca.crt", old_files / "client.crt",
                                                              old_files / "client.key"))
    assert outcome != "connected"
    assert connect(BASE_STATION).client.is_connected()


def test_revoked_recorder_rejected(secure_broker, connect, tmp_path):
    _make_credentials("recorder", str(secure_broker.credentials), "meadow", "rec-lost")
    secure_broker.reload()
    station = _base_station_watching(connect)
    lost = connect("rec-lost")
    files = tmp_path / "lost"
    shutil.copytree(secure_broker.credentials / "clients" / "rec-lost", files)

    _make_credentials("revoke", str(secure_broker.credentials), "rec-lost")
    secure_broker.reload()

    outcome = _wait_until_rejected(secure_broker, TlsSettings(files / "ca.crt", files / "client.crt",
                                                              files / "client.key"))
    assert outcome != "connected"
    assert "rec-lost" not in (secure_broker.credentials / "broker" / "dawnchorus.acl").read_text()
    # The connection opened before the revocation stays open, but the reloaded ACL
    # gives it nothing. Its PUBACK comes after the broker routed or dropped the
    # message, so a message published after it reaches the station later.
    lost_topic = topics.device_topic("meadow", "rec-lost", "embeddings")
    if lost.client.is_connected():
        lost.publish(lost_topic, b"after revocation")
    connect("rec-03").publish(_device_topic("rec-03"), b"marker")
    assert station.wait_for(_device_topic("rec-03"), b"marker")
    assert lost_topic not in station.topics_received()


# Script and configuration ----------------------------------------------------------------


def test_make_credentials_rejects_invalid_ids(secure_broker):
    for device in ("model", "rec/01", "rec+", "", BASE_STATION):
        result = subprocess.run(["bash", str(SCRIPT), "recorder", str(secure_broker.credentials), "forest-a",
                                 device], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, device
        assert "error" in result.stderr, device


def test_private_keys_readable_by_owner_only(secure_broker):
    keys = [secure_broker.credentials / "ca" / "ca.key", secure_broker.credentials / "broker" / "broker.key",
            *(secure_broker.credentials / "clients").glob("*/client.key")]

    for key in keys:
        assert key.stat().st_mode & 0o077 == 0, key


def _settings(path: pathlib.Path) -> dict[str, str]:
    settings = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^(max_\w+)\s+(\S+)", line)
        if match:
            settings[match.group(1)] = match.group(2)
    return settings


def test_tls_config_keeps_plain_queue_limits():
    plain, secure = _settings(PLAIN_CONFIG), _settings(TLS_CONFIG)

    assert plain
    assert secure == plain


# TLS options -----------------------------------------------------------------------------


def test_tls_settings_reject_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        TlsSettings(tmp_path / "missing-ca.crt")


def test_tls_settings_reject_certificate_without_key(secure_broker):
    files = secure_broker.credentials / "clients" / "rec-01"

    with pytest.raises(ValueError, match="--mqtt-key"):
        TlsSettings(files / "ca.crt", files / "client.crt")


def test_tls_settings_reject_mismatched_key(secure_broker):
    rec_01, rec_02 = (secure_broker.credentials / "clients" / device for device in ("rec-01", "rec-02"))
    settings = TlsSettings(rec_01 / "ca.crt", rec_01 / "client.crt", rec_02 / "client.key")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)

    with pytest.raises(ValueError, match="invalid TLS files"):
        settings.apply(client)


def test_edge_run_rejects_certificate_without_ca(secure_broker):
    files = secure_broker.credentials / "clients" / "rec-01"
    result = subprocess.run(
        [sys.executable, "-m", "dawnchorus", "edge", "run", "--device", "rec-01", "--site", "forest-a",
         "--broker", secure_broker.address, "--mqtt-cert", str(files / "client.crt"),
         "--mqtt-key", str(files / "client.key")],
        capture_output=True, text=True, timeout=120)

    assert result.returncode == 2
    assert "need --mqtt-ca" in result.stderr


# The programs ------------------------------------------------------------------------------





@pytest.mark.slow
def test_programs_exchange_embeddings_and_heads_over_tls(secure_broker, programs, data_dir, tmp_path):
    recording = data_dir / "soundscapes" / "opensoundscape" / "1min.wav"
    windows = 20  # 60 s in 3 s windows
    keys = tmp_path / "keys"
    generated = programs.start("keys", "generate", str(keys), log="keys.log")
    assert generated.wait(timeout=120) == 0, programs.log("keys.log")
    species = tmp_path / "species.txt"
    species.write_text("\n".join(SPECIES) + "\n")
    server_state = tmp_path / "server"

    server = programs.start(
        "server", "run", *secure_broker.client_arguments(BASE_STATION), "--state-dir", str(server_state),
        "--signing-key", str(keys / "head-signing.key"), "--default-species", f"@{species}",
        "--min-buffer", str(windows), "--update-interval", str(windows), "--buffer", "1000", log="server.log",
    )
    assert _wait(lambda: "base station ready" in programs.log("server.log") or server.poll() is not None, 180)
    assert server.poll() is None, programs.log("server.log")[-3000:]
    recorder = programs.start(
        "edge", "run", "--device", "rec-01", "--site", "forest-a", *secure_broker.client_arguments("rec-01"),
        "--input", str(recording), "--speed", "0", "--stay", "--species-file", str(species),
        "--state-dir", str(tmp_path / "edge"), "--head-public-key", str(keys / "head-signing.pub"),
        "--threads", "1", log="rec-01.log",
    )

    acks = server_state / "sites" / "forest-a" / "acks.json"

    def head_acknowledged():
        assert server.poll() is None, programs.log("server.log")[-3000:]
        assert recorder.poll() is None, programs.log("rec-01.log")[-3000:]
        return acks.is_file() and json.loads(acks.read_text()).get("rec-01", {}).get("version") == 1

    acknowledged = _wait(head_acknowledged, 240)
    server_log = programs.log("server.log")
    assert f"source finished after {windows} windows" in programs.log("rec-01.log")
    assert f"site forest-a round 1: buffer {windows}," in server_log
    assert "published head v1" in server_log
    assert acknowledged, programs.log("rec-01.log")[-3000:]


def test_recorder_program_reaches_home_assistant_over_tls(secure_broker, connect, programs, data_dir, tmp_path):
    watcher = connect(HOME_ASSISTANT)
    assert "Failure" not in watcher.subscribe(f"{home_assistant.DEFAULT_PREFIX}/#",
                                              f"{topics.ROOT}/+/+/{topics.LAST_DETECTION_KIND}")
    node = home_assistant.node_id("rec-02")
    expected = {f"{home_assistant.DEFAULT_PREFIX}/sensor/{node}/last_species/config",
                f"{home_assistant.DEFAULT_PREFIX}/sensor/{node}/last_confidence/config",
                f"{home_assistant.DEFAULT_PREFIX}/binary_sensor/{node}/online/config",
                topics.last_detection_topic("forest-a", "rec-02")}
    recorder = programs.start(
        "edge", "run", "--device", "rec-02", "--site", "forest-a", *secure_broker.client_arguments("rec-02"),
        "--input", str(data_dir / "soundscapes/opensoundscape/birds_10s.wav"), "--speed", "0", "--stay",
        "--min-conf", "0.3", "--home-assistant", "--state-dir", str(tmp_path / "edge"), "--threads", "1",
        log="rec-02.log",
    )
    try:
        arrived = _wait(lambda: expected <= watcher.topics_received() or recorder.poll() is not None, 120)
        assert arrived, programs.log("rec-02.log")[-3000:]
        assert expected <= watcher.topics_received(), programs.log("rec-02.log")[-3000:]
    finally:
        # Other tests here check that rec-02's config topics stay empty; Home Assistant may clear them.
        for topic in expected - {topics.last_detection_topic("forest-a", "rec-02")}:
            watcher.publish(topic, b"", retain=True)
