"""The base station's durable state: the sequence filter, the ingest journal, snapshots, and
restarts of a station against a real Mosquitto with real BirdNET embeddings."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import soundfile
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from support import wait as _wait

from dawnchorus.models.backbone import Backbone, load_source_model
from dawnchorus.protocol import topics
from dawnchorus.protocol.embeddings import EmbeddingBatch, encode_embeddings
from dawnchorus.server.adaptation import AdaptationConfig
from dawnchorus.server.journal import IngestJournal, inspect_state, number_ranges, read_snapshot, write_snapshot
from dawnchorus.server.sequences import SequenceFilter
from dawnchorus.server.station import BaseStation, StationConfig

LABELS = ["Poecile atricapillus_Black-capped Chickadee", "Baeolophus bicolor_Tufted Titmouse",
          "Haemorhous mexicanus_House Finch", "Cardinalis cardinalis_Northern Cardinal"]


def test_sequence_filter_out_of_order():
    seen = SequenceFilter()
    for number in (0, 2, 1, 5):
        assert seen.is_new("rec", number)
        seen.add("rec", number)
    assert not seen.is_new("rec", 1)
    assert not seen.is_new("rec", 5)
    assert seen.is_new("rec", 3)
    assert seen.is_new("other", 0)
    assert seen.ranges("rec") == [(0, 3), (5, 6)]


def test_sequence_filter_ranges_containing_numbers():
    seen = SequenceFilter()
    for number in (*range(0, 16), *range(20, 40), 50):
        seen.add("rec", number)
    # A receipt for numbers 21 and 33 confirms their whole run; 45 was never accepted.
    assert seen.ranges_containing("rec", [33, 21, 45]) == [(20, 40)]
    assert seen.ranges_containing("rec", [50, 3]) == [(0, 16), (50, 51)]
    assert seen.ranges_containing("rec", [17]) == []
    assert seen.ranges_containing("other", [0]) == []


def test_sequence_filter_late_number_after_long_gap():
    # 150,000 numbers after a gap: the late number from the gap is still new.
    seen = SequenceFilter()
    seen.add("rec", 0)
    for number in range(10, 150_010):
        seen.add("rec", number)
    assert seen.is_new("rec", 5)
    assert not seen.is_new("rec", 150_009)
    assert seen.ranges("rec") == [(0, 1), (10, 150_010)]


def test_sequence_filter_fills_lowest_gap_past_limit(caplog):
    seen = SequenceFilter("site test", max_ranges=3)
    for number in (0, 10, 20):
        seen.add("rec", number)
    with caplog.at_level(logging.WARNING):
        seen.add("rec", 30)
    assert len(seen.ranges("rec")) == 3
    assert not seen.is_new("rec", 5)
    assert seen.is_new("rec", 15)
    assert seen.filled_gap_numbers == 9
    assert "numbers 1 to 9 now count as accepted" in caplog.text
    assert "device rec" in caplog.text


def test_sequence_filter_state_round_trip():
    seen = SequenceFilter()
    for device, numbers in (("rec-a", (0, 1, 2, 7)), ("rec-b", (2**63 - 1,))):
        for number in numbers:
            seen.add(device, number)
    restored = SequenceFilter.from_state(seen.state())
    assert restored.ranges("rec-a") == [(0, 3), (7, 8)]
    assert restored.ranges("rec-b") == [(2**63 - 1, 2**63)]
    assert restored.is_new("rec-a", 3)


def test_journal_rows_after_snapshot_position(tmp_path):
    journal = IngestJournal(tmp_path / "ingest.sqlite3")
    vectors = np.arange(8, dtype=np.float16).reshape(4, 2)
    first = journal.append([("site-a", "rec", i, vectors[i].tobytes()) for i in range(2)])
    journal.append([("site-a", "rec", i, vectors[i].tobytes()) for i in range(2, 4)]
                   + [("site-b", "rec", 0, vectors[0].tobytes())])
    rows = list(journal.rows("site-a", after_id=first))
    assert [len(chunk) for chunk in rows] == [2]
    assert rows[0].sequences.tolist() == [2, 3]
    assert np.array_equal(rows[0].embeddings, vectors[2:])
    journal.discard_through("site-a", first + 2)
    assert journal.count("site-a") == 0
    assert journal.count("site-b") == 1
    journal.close()


def test_journal_ids_stay_above_snapshot(tmp_path):
    # A replaced journal file must not hand out ids that a snapshot already covers.
    journal = IngestJournal(tmp_path / "ingest.sqlite3")
    journal.reserve_ids_through(500)
    assert journal.append([("site-a", "rec", 0, b"\x00\x00")]) == 501
    journal.close()


def test_number_ranges_merges_runs():
    assert number_ranges(np.array([5, 1, 2, 3, 9, 9], dtype=np.uint64)) == [(1, 4), (5, 6), (9, 10)]
    assert number_ranges(np.zeros(0, dtype=np.uint64)) == []


def test_snapshot_write_leaves_no_partial(tmp_path):
    path = tmp_path / "sites" / "site-a" / "buffer.npz"
    write_snapshot(path, {"values": np.arange(3)})
    assert read_snapshot(path)["values"].tolist() == [0, 1, 2]
    assert [p.name for p in path.parent.iterdir()] == ["buffer.npz"]


@pytest.fixture(scope="module")
def source():
    return load_source_model()


@pytest.fixture(scope="module")
def embeddings(source, data_dir):
    audio, _ = soundfile.read(data_dir / "soundscapes/birdnet-example/soundscape.flac", dtype="float32")
    return Backbone(source.backbone).embed(audio[: 24 * 144_000].reshape(24, 144_000))


@pytest.fixture()
def mosquitto(start_mosquitto):
    # A broker of the test's own, so that these messages are not queued for the
    # persistent sessions that other tests' base stations leave on the shared broker.
    return start_mosquitto("broker")


@pytest.fixture()
def publisher(mosquitto):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-publisher-{uuid.uuid4().hex[:8]}")
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    yield client
    client.loop_stop()
    client.disconnect()




def _send(client, site: str, device: str, embeddings: np.ndarray, first: int) -> None:
    batch = EmbeddingBatch(device, site, 0, np.arange(first, first + len(embeddings), dtype=np.uint64),
                           np.arange(len(embeddings)) * 3.0, embeddings)
    client.publish(topics.device_topic(site, device, "embeddings"), encode_embeddings(batch),
                   qos=1).wait_for_publish(10)


def _config(mosquitto, state_dir, update_interval: int = 8) -> StationConfig:
    return StationConfig(
        broker_host=mosquitto.host, broker_port=mosquitto.port, state_dir=state_dir,
        client_id=f"test-station-{uuid.uuid4().hex[:8]}", signing_key=Ed25519PrivateKey.generate(),
        adaptation=AdaptationConfig(buffer_capacity=100, update_interval=update_interval, min_buffer=100, steps=1),
    )


def _crash(station: BaseStation) -> None:
    """Stop a station's threads without the snapshot and clean disconnect of ``stop``, as a crash would."""
    station._stop.set()
    station._worker.join(timeout=30)
    station._client.loop_stop()
    station._client.socket().close()


def test_station_restart_restores_buffer_and_filter(mosquitto, source, publisher, embeddings, tmp_path):
    config = _config(mosquitto, tmp_path)
    first = BaseStation(config, source.head, lambda site: LABELS)
    first.start()
    assert first.connected.wait(20)
    _send(publisher, "site-restart", "rec-1", embeddings[:12], first=0)
    _send(publisher, "site-restart", "rec-2", embeddings[12:20], first=100)
    assert _wait(lambda: first.counters["embeddings"] == 20)
    assert _wait(first.idle)
    before = first.sites["site-restart"].buffer.embeddings.copy()
    first.stop()

    second = BaseStation(config, source.head, lambda site: LABELS)
    second.start()
    try:
        assert second.connected.wait(20)
        restored = second.sites["site-restart"].buffer
        assert restored.size == 20
        assert np.array_equal(restored.embeddings, before)
        _send(publisher, "site-restart", "rec-1", embeddings[:12], first=0)
        _send(publisher, "site-restart", "rec-1", embeddings[20:24], first=12)
        assert _wait(lambda: second.counters["embeddings"] + second.counters["embeddings_duplicate"] == 16)
        assert second.counters["embeddings_duplicate"] == 12
        assert second.counters["embeddings"] == 4
    finally:
        second.stop()


def test_station_crash_replays_journal_and_drops_redelivery(mosquitto, source, publisher, embeddings, tmp_path):
    # A round interval above the windows sent means no snapshot is written before the crash.
    config = _config(mosquitto, tmp_path, update_interval=1000)
    first = BaseStation(config, source.head, lambda site: LABELS)
    # The crash comes after the journal commit and before the acknowledgement.
    first._acknowledge = lambda group: None
    first.start()
    assert first.connected.wait(20)
    _send(publisher, "site-crash", "rec-1", embeddings[:10], first=0)
    assert _wait(lambda: first.counters["embeddings"] == 10)
    assert _wait(first.idle)
    _crash(first)
    assert not (tmp_path / "sites" / "site-crash" / "buffer.npz").exists()

    second = BaseStation(config, source.head, lambda site: LABELS)
    second.start()
    try:
        assert second.connected.wait(20)
        assert second.sites["site-crash"].buffer.size == 10
        assert second.sites["site-crash"].pending == 10
        # The broker delivers the unacknowledged message again, and its windows are duplicates.
        assert _wait(lambda: second.counters["embeddings_duplicate"] == 10)
        assert second.counters["embeddings"] == 0
    finally:
        second.stop()
    [site] = inspect_state(tmp_path)
    assert site["buffer_windows"] == 10
    assert site["devices"]["rec-1"]["buffer_ranges"] == [(0, 10)]


def test_server_inspect_prints_ranges(mosquitto, source, publisher, embeddings, tmp_path):
    config = _config(mosquitto, tmp_path)
    station = BaseStation(config, source.head, lambda site: LABELS)
    station.start()
    try:
        assert station.connected.wait(20)
        _send(publisher, "site-inspect", "rec-1", embeddings[:6], first=0)
        _send(publisher, "site-inspect", "rec-1", embeddings[6:9], first=10)
        assert _wait(lambda: station.counters["embeddings"] == 9)
        assert _wait(station.idle)
    finally:
        station.stop()
    command = [sys.executable, "-m", "dawnchorus", "server", "inspect", "--state-dir", str(tmp_path)]
    text = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "site site-inspect: 9 windows in the buffer (capacity 100)" in text.stdout
    assert "missing between them: 6-9" in text.stdout
    document = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120)
    device = json.loads(document.stdout)["sites"][0]["devices"]["rec-1"]
    assert device["accepted_ranges"] == [[0, 6], [10, 13]]
    assert device["buffer_duplicates"] == 0
