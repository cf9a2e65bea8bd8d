"""The base station's live page: its bounded state, and the JSON, event stream and /metrics of a
running ``dawnchorus server run --http`` against a real Mosquitto with real BirdNET embeddings."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import soundfile
from prometheus_client.parser import text_string_to_metric_families

from dawnchorus.models.backbone import Backbone, load_source_model
from dawnchorus.protocol import topics
from dawnchorus.protocol.embeddings import EmbeddingBatch, encode_embeddings
from dawnchorus.protocol.messages import Ack, Detection, StationStats, Status, encode_detections
from dawnchorus.protocol.signing import generate_key_files
from dawnchorus.server import live as live_module
from dawnchorus.server.broker import free_port
from dawnchorus.server.live import LiveState, TooManySubscribers
from dawnchorus.server.metrics import metrics_registry
from dawnchorus.server.registry import HeadRegistry
from dawnchorus.server.web import WebServer

SITE = "web-site"
DEVICE = "rec-web"
SPECIES = ["Poecile atricapillus", "Cardinalis cardinalis", "Baeolophus bicolor", "Haemorhous mexicanus",
           "Turdus migratorius", "Cyanocitta cristata", "Zenaida macroura", "Setophaga ruticilla"]
WINDOWS = 20


def _detection(day_offset: int = 0, site: str = SITE, label: str = "Turdus merula_Eurasian Blackbird",
               sequence: int = 0) -> Detection:
    start = time.time() - day_offset * 86400
    return Detection(DEVICE, site, sequence, start, start + 3.0, label, 0.91, 0)


# LiveState ------------------------------------------------------------------------


def test_live_state_keeps_newest_detections():
    state = LiveState("station")
    for sequence in range(live_module.MAX_DETECTIONS + 50):
        state.detection(_detection(sequence=sequence))
    detections = state.snapshot()["detections"]
    assert len(detections) == live_module.MAX_DETECTIONS
    assert detections[-1]["time"] >= detections[0]["time"]


def test_live_state_counts_per_site_and_day():
    state = LiveState("station")
    state.detection(_detection())
    state.detection(_detection())
    state.detection(_detection(site="other-site"))
    state.detection(_detection(day_offset=1, label="Erithacus rubecula_European Robin"))
    counts = state.snapshot()["counts"]
    today = live_module.day_of(time.time())
    yesterday = live_module.day_of(time.time() - 86400)
    assert counts[today][SITE] == {"Turdus merula_Eurasian Blackbird": 2}
    assert counts[today]["other-site"] == {"Turdus merula_Eurasian Blackbird": 1}
    assert counts[yesterday][SITE] == {"Erithacus rubecula_European Robin": 1}


def test_live_state_keeps_newest_days():
    state = LiveState("station")
    for day_offset in range(live_module.MAX_DAYS + 5):
        state.detection(_detection(day_offset=day_offset))
    days = sorted(state.snapshot()["counts"])
    assert len(days) == live_module.MAX_DAYS
    assert days[-1] == live_module.day_of(time.time())
    # A detection older than every kept day does not bring its day back.
    state.detection(_detection(day_offset=live_module.MAX_DAYS + 10))
    assert sorted(state.snapshot()["counts"]) == days


def test_live_state_rounds_bounded_and_json_safe():
    state = LiveState("station")
    for version in range(live_module.MAX_ROUNDS + 10):
        state.round(SITE, version + 1, False, "mean top score fell", {"loss": float("nan"),
                                                                      "mean_pseudo_label": 0.2}, 64)
    site = state.snapshot()["sites"][SITE]
    assert len(site["rounds_history"]) == live_module.MAX_ROUNDS
    assert site["rounds"] == live_module.MAX_ROUNDS + 10
    assert site["blocked"] == live_module.MAX_ROUNDS + 10
    assert site["rounds_history"][-1]["stats"] == {"loss": None, "mean_pseudo_label": 0.2}


def test_live_state_subscriber_gets_events_in_order():
    state = LiveState("station")
    subscriber, snapshot = state.subscribe()
    assert snapshot["detections"] == []
    state.detection(_detection())
    state.head(SITE, 1, 0, time.time(), "fp16", 1000)
    assert subscriber.get(timeout=1).decode().startswith("event: detection\n")
    assert subscriber.get(timeout=1).decode().startswith("event: head\n")


def test_live_state_disconnects_slow_subscriber():
    state = LiveState("station")
    subscriber, _ = state.subscribe()
    for sequence in range(live_module.SUBSCRIBER_QUEUE + 1):
        state.detection(_detection(sequence=sequence))
    assert subscriber.closed
    # A disconnected page is forgotten, so it no longer costs memory.
    state.detection(_detection())
    assert state._subscribers == set()


def test_live_state_limits_open_pages():
    state = LiveState("station")
    for _ in range(live_module.MAX_SUBSCRIBERS):
        state.subscribe()
    with pytest.raises(TooManySubscribers, match="live pages are open"):
        state.subscribe()


def test_live_state_reads_back_detection_log_tail(tmp_path):
    log = tmp_path / "detections.jsonl"
    lines = [json.dumps(_detection(sequence=sequence).to_json()) for sequence in range(100)]
    log.write_text("\n".join(lines) + "\n{cut by a cra")
    state = LiveState("station")
    tail_bytes = sum(len(line) + 1 for line in lines[-10:]) + len("{cut by a cra")
    read = state.seed_detections(log, max_bytes=tail_bytes + 5)
    assert read == 10
    snapshot = state.snapshot()
    assert [row["time"] for row in snapshot["detections"]] == [json.loads(line)["start_time"] for line in lines[-10:]]
    assert sum(sum(labels.values()) for sites in snapshot["counts"].values() for labels in sites.values()) == 10


def test_live_state_reads_back_registry_heads(tmp_path):
    registry = HeadRegistry(tmp_path)
    stats = {"mean_pseudo_label": 0.02, "candidate_mean_top_score": 0.3, "round_s": 1.5}
    registry.add(SITE, 0, ["a_A", "b_B"], "fp16", b"head one", 64, stats)
    registry.add(SITE, 1, ["a_A", "b_B"], "fp16", b"head two", 128, stats)
    state = LiveState("station")
    state.seed_site_from_registry(registry, SITE, 2)
    site = state.snapshot()["sites"][SITE]
    assert site["version"] == 2
    assert [(head["version"], head["parent"]) for head in site["heads"]] == [(1, 0), (2, 1)]
    assert [entry["buffer_size"] for entry in site["rounds_history"]] == [64, 128]
    assert site["rounds_history"][0]["stats"] == stats
    # History read back is not new work: the metrics' counters stay at zero.
    assert site["rounds"] == 0
    assert site["published"] == 0


def test_live_state_rollback_not_counted_published():
    state = LiveState("station")
    state.head(SITE, 1, 0, time.time(), "fp16", 1000)
    state.head(SITE, 2, 1, time.time(), "fp16", 1000)
    state.head(SITE, 1, 2, time.time(), rollback=True, published_here=False)
    site = state.snapshot()["sites"][SITE]
    assert site["version"] == 1
    assert site["published"] == 2
    assert site["heads"][-1] == {"version": 1, "parent": 2, "time": site["heads"][-1]["time"], "precision": "",
                                 "size": 0, "rollback": True}


def test_live_state_old_status_keeps_last_seen():
    state = LiveState("station")
    state.detection(_detection())
    state.seen(SITE, DEVICE)
    before = state.snapshot()["recorders"][0]["last_seen"]
    state.status(SITE, DEVICE, Status(DEVICE, SITE, "offline", time=before - 3600))
    recorder = state.snapshot()["recorders"][0]
    assert recorder["state"] == "offline"
    assert recorder["last_seen"] == before


def test_live_state_time_out_of_range_not_counted():
    state = LiveState("station")
    detection = _detection()
    detection.start_time = 1e300
    state.detection(detection)
    snapshot = state.snapshot()
    assert snapshot["detections"][0]["day"] is None
    assert snapshot["counts"] == {}


def test_live_state_future_status_time_capped():
    state = LiveState("station")
    state.status(SITE, DEVICE, Status(DEVICE, SITE, "online", time=time.time() + 10 * 365 * 86400))
    assert state.snapshot()["recorders"][0]["last_seen"] <= time.time()


def test_live_state_old_will_keeps_known_counts():
    state = LiveState("station")
    connected = time.time() - 600
    state.status(SITE, DEVICE, Status(DEVICE, SITE, "online", head_version=2, windows=40, time=connected + 300,
                                      queue_depth=1, queue_bytes=900))
    # The last will that the recorder set when it connected, with the counts of that moment.
    state.status(SITE, DEVICE, Status(DEVICE, SITE, "offline", head_version=0, windows=0, time=connected))
    recorder = state.snapshot()["recorders"][0]
    assert recorder["state"] == "offline"
    assert recorder["head_version"] == 2
    assert recorder["windows"] == 40
    assert recorder["queue_depth"] == 1
    assert recorder["queue_bytes"] == 900
    assert recorder["status_time"] == connected + 300


def test_live_state_newer_offline_replaces_counts():
    state = LiveState("station")
    stopped = time.time()
    state.status(SITE, DEVICE, Status(DEVICE, SITE, "finished", head_version=2, windows=40, time=stopped - 60,
                                      queue_depth=3))
    state.status(SITE, DEVICE, Status(DEVICE, SITE, "offline", head_version=2, windows=40, time=stopped,
                                      queue_depth=0))
    recorder = state.snapshot()["recorders"][0]
    assert recorder["state"] == "offline"
    assert recorder["queue_depth"] == 0
    assert recorder["status_time"] == stopped


# HTTP clients ---------------------------------------------------------------------------



def _wait(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _get(address: str, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(address, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


class _EventStream:
    """A client of /api/events that reads one server-sent event at a time."""

    def __init__(self, address: str):
        self._connection = http.client.HTTPConnection(address, timeout=60)
        self._connection.request("GET", "/api/events")
        self.response = self._connection.getresponse()
        self.events: list[tuple[str, dict]] = []

    def next_event(self) -> tuple[str, dict]:
        kind, data = None, None
        while True:
            line = self.response.fp.readline().decode()
            if not line:
                raise EOFError("the event stream ended")
            line = line.rstrip("\n")
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
            elif line == "" and kind is not None:
                return kind, data

    def wait_for(self, kind: str, condition=lambda data: True, timeout: float = 120.0) -> dict:
        """Return the first event of ``kind`` that meets ``condition``, among those read so far or next."""
        for event_kind, data in self.events:
            if event_kind == kind and condition(data):
                return data
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event_kind, data = self.next_event()
            self.events.append((event_kind, data))
            if event_kind == kind and condition(data):
                return data
        raise AssertionError(f"no {kind} event within {timeout} s; seen {[kind for kind, _ in self.events]}")

    def close(self) -> None:
        self._connection.close()


def _metrics(address: str) -> dict[tuple[str, tuple], float]:
    status, headers, body = _get(address, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


# The web server on its own ---------------------------------------------------------------


@pytest.fixture()
def web_server():
    """A ``WebServer`` on a free loopback port over an empty ``LiveState``; yields (server, live)."""
    state = LiveState("station")
    stats = StationStats("station", time.time(), {"embeddings": 3}, {"status.field": 2})
    server = WebServer(state, metrics_registry(lambda: stats, state), "127.0.0.1", 0)
    server.start()
    yield server, state
    server.stop()


def test_web_server_streams_live_events(web_server):
    server, state = web_server
    stream = _EventStream(f"127.0.0.1:{server.port}")
    assert stream.response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
    assert stream.wait_for("snapshot", timeout=10)["station"] == "station"
    state.detection(_detection())
    assert stream.wait_for("detection", timeout=10)["label"] == "Turdus merula_Eurasian Blackbird"
    stream.close()


def test_web_server_stop_ends_streams(web_server):
    server, _ = web_server
    stream = _EventStream(f"127.0.0.1:{server.port}")
    stream.wait_for("snapshot", timeout=10)
    server.stop()
    with pytest.raises(EOFError):
        stream.next_event()


def test_web_server_rejects_extra_streams(web_server):
    server, _ = web_server
    streams = [_EventStream(f"127.0.0.1:{server.port}") for _ in range(live_module.MAX_SUBSCRIBERS)]
    for stream in streams:
        stream.wait_for("snapshot", timeout=10)
    status, _, body = _get(f"127.0.0.1:{server.port}", "/api/events")
    assert status == 503
    assert b"live pages are open already" in body
    for stream in streams:
        stream.close()


def test_web_server_metrics_from_stats(web_server):
    server, _ = web_server
    metrics = _metrics(f"127.0.0.1:{server.port}")
    assert metrics[("dawnchorus_embeddings_ingested_total", ())] == 3
    assert metrics[("dawnchorus_rejected_payloads_total", (("kind", "status"), ("reason", "field")))] == 2


# A running base station -------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A Mosquitto of this module's own: the station's persistent session must not meet other tests' messages."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(binary):
        pytest.fail("mosquitto is not installed: run .ci/run, or apt-get install mosquitto")
    directory = tmp_path_factory.mktemp("web-broker")
    port = free_port()
    (directory / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                                              "persistence false\nmax_queued_messages 100000\n")
    log = open(directory / "mosquitto.log", "w")
    process = subprocess.Popen([binary, "-c", str(directory / "mosquitto.conf")], stdout=log,
                               stderr=subprocess.STDOUT)

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    assert _wait(listening, 10), (directory / "mosquitto.log").read_text()
    yield port
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def station(broker, tmp_path_factory):
    """``dawnchorus server run --http`` as a process; yields the page's base URL and the log path."""
    directory = tmp_path_factory.mktemp("web-station")
    generate_key_files(directory / "keys")
    species = directory / "species.txt"
    species.write_text("\n".join(SPECIES) + "\n")
    port = free_port()
    log_path = directory / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "dawnchorus", "server", "run", "--broker", f"127.0.0.1:{broker}",
         "--state-dir", str(directory / "state"), "--signing-key", str(directory / "keys" / "head-signing.key"),
         "--default-species", f"@{species}", "--update-interval", str(WINDOWS), "--min-buffer", str(WINDOWS),
         "--buffer", "1000", "--http", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    ready = _wait(lambda: "base station ready" in log_path.read_text() or process.poll() is not None, 180)
    assert ready and process.poll() is None, log_path.read_text()[-3000:]
    yield f"127.0.0.1:{port}", log_path
    process.terminate()
    process.wait(timeout=60)
    log.close()


@pytest.fixture(scope="module")
def publisher(broker):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-web-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", broker)
    client.loop_start()
    yield client
    client.loop_stop()
    client.disconnect()


@pytest.fixture(scope="module")
def embeddings(data_dir):
    samples, _ = soundfile.read(data_dir / "soundscapes/birdnet-example/soundscape.flac", dtype="float32")
    source = load_source_model()
    return Backbone(source.backbone, num_threads=1).embed(samples[: WINDOWS * 144_000].reshape(WINDOWS, 144_000))


def _publish(client, kind: str, payload: bytes, retain: bool = False) -> None:
    client.publish(topics.device_topic(SITE, DEVICE, kind), payload, qos=1, retain=retain).wait_for_publish(10)


@pytest.fixture(scope="module")
def fed_station(station, publisher, embeddings):
    """The station after a recorder's status, a detection, enough windows for a round, and a bad payload.

    Yields the page address and the events seen on one stream opened before the messages were sent.
    """
    address, log_path = station
    stream = _EventStream(address)
    snapshot = stream.wait_for("snapshot")

    status = Status(DEVICE, SITE, "online", head_version=0, windows=WINDOWS, time=time.time(), queue_depth=7,
                    queue_dropped=2)
    _publish(publisher, "status", status.encode(), retain=True)
    _publish(publisher, "detections", encode_detections([_detection()]))
    batch = EmbeddingBatch(DEVICE, SITE, 0, np.arange(WINDOWS, dtype=np.uint64), np.arange(WINDOWS) * 3.0,
                           embeddings)
    _publish(publisher, "embeddings", encode_embeddings(batch))
    _publish(publisher, "embeddings", b"garbage" * 10)

    events = {
        "recorder": stream.wait_for("recorder", lambda data: data["state"] == "online"),
        "detection": stream.wait_for("detection"),
        "round": stream.wait_for("round", timeout=180),
        "head": stream.wait_for("head"),
    }
    _publish(publisher, "ack", Ack(DEVICE, SITE, events["head"]["version"], True).encode())
    events["acknowledged"] = stream.wait_for("site", lambda data: data["acks"] == 1)
    stream.close()
    yield address, snapshot, events, log_path
    _publish(publisher, "status", b"", retain=True)


def test_web_event_stream_starts_with_snapshot(fed_station):
    _, snapshot, _, _ = fed_station
    assert snapshot["station"] == "dawnchorus-base-station-1-of-1"
    assert snapshot["detections"] == []
    assert snapshot["sites"] == {}


def test_web_event_stream_sends_changes(fed_station):
    _, _, events, log_path = fed_station
    assert events["recorder"]["device"] == DEVICE
    assert events["recorder"]["queue_depth"] == 7
    assert events["recorder"]["queue_dropped"] == 2
    assert events["detection"]["common_name"] == "Eurasian Blackbird"
    assert events["detection"]["scientific_name"] == "Turdus merula"
    assert events["detection"]["site"] == SITE
    assert events["round"]["site"] == SITE
    assert events["round"]["buffer_size"] == WINDOWS
    assert "mean_pseudo_label" in events["round"]["stats"]
    assert "candidate_mean_top_score" in events["round"]["stats"]
    assert events["round"]["accepted"], log_path.read_text()[-3000:]
    assert events["round"]["decision"] == "published"
    assert events["head"]["version"] == 1
    assert events["head"]["parent"] == 0
    assert events["acknowledged"]["version"] == 1


def test_web_state_has_site_recorder_and_counts(fed_station):
    address, _, _, _ = fed_station
    status, headers, body = _get(address, "/api/state")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    state = json.loads(body)
    recorder = next(recorder for recorder in state["recorders"] if recorder["device"] == DEVICE)
    assert recorder["state"] == "online"
    assert recorder["head_version"] == 1
    site = state["sites"][SITE]
    assert site["version"] == 1
    assert site["buffer_size"] == WINDOWS
    assert [head["version"] for head in site["heads"]] == [1]
    assert len(site["rounds_history"]) == 1
    today = live_module.day_of(time.time())
    assert state["counts"][today][SITE] == {"Turdus merula_Eurasian Blackbird": 1}


def test_web_metrics_count_station_work(fed_station):
    address, _, _, _ = fed_station
    metrics = _metrics(address)
    site = (("site", SITE),)
    recorder = (("device", DEVICE), ("site", SITE))
    assert metrics[("dawnchorus_embeddings_ingested_total", ())] == WINDOWS
    assert metrics[("dawnchorus_buffer_embeddings", site)] == WINDOWS
    assert metrics[("dawnchorus_adaptation_rounds_total", site)] == 1
    assert metrics[("dawnchorus_heads_published_total", site)] == 1
    assert metrics[("dawnchorus_heads_acknowledged_total", site)] == 1
    assert metrics[("dawnchorus_head_version", site)] == 1
    assert metrics[("dawnchorus_detections_total", site)] == 1
    assert metrics[("dawnchorus_rejected_payloads_total", (("kind", "embeddings"), ("reason", "magic")))] == 1
    assert metrics[("dawnchorus_recorder_online", recorder)] == 1
    assert metrics[("dawnchorus_recorder_queue_depth", recorder)] == 7
    assert metrics[("dawnchorus_recorder_head_version", recorder)] == 1
    assert metrics[("process_resident_memory_bytes", ())] > 0


def test_web_metrics_show_recorder_offline(fed_station, publisher):
    address, _, _, _ = fed_station
    offline = Status(DEVICE, SITE, "offline", head_version=1, time=time.time())
    _publish(publisher, "status", offline.encode(), retain=True)
    recorder = (("device", DEVICE), ("site", SITE))
    assert _wait(lambda: _metrics(address)[("dawnchorus_recorder_online", recorder)] == 0, 30)


def test_web_page_loads_nothing_from_other_hosts(fed_station):
    address, _, _, _ = fed_station
    status, headers, page = _get(address, "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for name in ("/app.js", "/style.css"):
        asset_status, _, asset = _get(address, name)
        assert asset_status == 200
        assert b"http://" not in asset.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"https://" not in asset
    assert b"http://" not in page
    assert b"https://" not in page


def test_web_unknown_path_not_found(fed_station):
    address, _, _, _ = fed_station
    status, _, body = _get(address, "/nothing-here")
    assert status == 404
    assert b"not found: /nothing-here" in body


# Command line -------------------------------------------------------------------------


def test_server_run_invalid_http_address_rejected():
    result = subprocess.run([sys.executable, "-m", "dawnchorus", "server", "run", "--http", "8080"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "invalid --http address '8080'" in result.stderr


def test_server_run_http_port_in_use_rejected(tmp_path):
    generate_key_files(tmp_path / "keys")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "dawnchorus", "server", "run", "--state-dir", str(tmp_path / "state"),
             "--signing-key", str(tmp_path / "keys" / "head-signing.key"), "--http", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"the live page cannot listen on 127.0.0.1:{port}" in result.stderr
