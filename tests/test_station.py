"""The base station against a real Mosquitto: deduplication, rejected payloads, shards,
the collapse guard, and heads made obsolete by a rollback."""

from __future__ import annotations

import json
import logging
import time
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import soundfile
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from support import wait as _wait

from dawnchorus.models.backbone import Backbone, load_source_model
from dawnchorus.protocol import topics
from dawnchorus.protocol.embeddings import MAX_PAYLOAD_BYTES, EmbeddingBatch, encode_embeddings
from dawnchorus.protocol.messages import MAX_JSON_BYTES, StationStats
from dawnchorus.protocol.rejections import LOG_BURST
from dawnchorus.server.adaptation import AdaptationConfig, check_collapse
from dawnchorus.server.publication import HeadPublisher, load_rollback, publish_rollback
from dawnchorus.server.registry import HeadRegistry, Publication
from dawnchorus.server.station import BaseStation, Shard, StationConfig

LABELS = ["Poecile atricapillus_Black-capped Chickadee", "Baeolophus bicolor_Tufted Titmouse",
          "Haemorhous mexicanus_House Finch", "Cardinalis cardinalis_Northern Cardinal"]


@pytest.fixture(scope="module")
def source():
    return load_source_model()


@pytest.fixture(scope="module")
def embeddings(source, data_dir):
    audio, _ = soundfile.read(data_dir / "soundscapes/birdnet-example/soundscape.flac", dtype="float32")
    return Backbone(source.backbone).embed(audio[: 20 * 144_000].reshape(20, 144_000))




@pytest.fixture()
def station(mosquitto, source, tmp_path):
    config = StationConfig(
        broker_host=mosquitto.host, broker_port=mosquitto.port, state_dir=tmp_path,
        shard=Shard(2, 4), client_id=f"test-station-{uuid.uuid4().hex[:8]}",
        adaptation=AdaptationConfig(buffer_capacity=100, update_interval=1000, min_buffer=10),
        signing_key=Ed25519PrivateKey.generate(),
    )
    base = BaseStation(config, source.head, lambda site: LABELS)
    base.start()
    assert base.connected.wait(20)
    yield base
    base.stop()


@pytest.fixture()
def publisher(mosquitto):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-publisher")
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    yield client
    client.loop_stop()
    client.disconnect()


def _owned_site(shard: Shard) -> str:
    return next(f"site-{i}" for i in range(1000) if shard.owns(f"site-{i}"))


def _send(client, site: str, device: str, embeddings: np.ndarray, first: int) -> None:
    batch = EmbeddingBatch(device, site, 0, np.arange(first, first + len(embeddings), dtype=np.uint64),
                           np.arange(len(embeddings)) * 3.0, embeddings)
    client.publish(topics.device_topic(site, device, "embeddings"), encode_embeddings(batch), qos=1).wait_for_publish(10)


def test_station_deduplicates_by_device_and_sequence(station, publisher, embeddings):
    site = _owned_site(station.config.shard)
    _send(publisher, site, "rec-1", embeddings[:10], first=0)
    _send(publisher, site, "rec-1", embeddings[:10], first=0)
    _send(publisher, site, "rec-1", embeddings[5:15], first=5)
    _send(publisher, site, "rec-2", embeddings[:10], first=0)
    assert _wait(lambda: station.counters["embeddings"] + station.counters["embeddings_duplicate"] >= 40)
    assert station.counters["embeddings"] == 25
    assert station.counters["embeddings_duplicate"] == 15
    assert station.sites[site].buffer.size == 25


def _embeddings_payload(site: str, device: str, embeddings: np.ndarray, first: int = 0) -> bytes:
    return encode_embeddings(EmbeddingBatch(device, site, 0, np.arange(first, first + len(embeddings), dtype=np.uint64),
                                            np.zeros(len(embeddings)), embeddings))


def _patched(payload: bytes, position: int, value: int) -> bytes:
    changed = bytearray(payload)
    changed[position] = value
    return bytes(changed)


def _with_nan(site: str, embeddings: np.ndarray) -> bytes:
    vectors = embeddings[:3].copy()
    vectors[1, 7] = np.nan
    return _embeddings_payload(site, "rec-1", vectors, first=50)


_DETECTION = {"device": "rec-1", "sequence": 1, "start_time": 0.0, "end_time": 3.0,
              "label": "Turdus merula_Eurasian Blackbird", "confidence": 0.9, "head_version": 0}

# Per case: the message kind, how to build its payload for (site, embeddings), and the reason it is counted under.
BAD_PAYLOADS = {
    "wrong length": ("embeddings", lambda site, e: _embeddings_payload(site, "rec-1", e[:3])[:-10], "length"),
    "wrong dtype": ("embeddings", lambda site, e: _patched(_embeddings_payload(site, "rec-1", e[:3]), 5, 2), "dtype"),
    "unknown version": ("embeddings", lambda site, e: _patched(_embeddings_payload(site, "rec-1", e[:3]), 4, 9),
                        "version"),
    "wrong embedding size": ("embeddings", lambda site, e: _embeddings_payload(site, "rec-1", e[:3, :512]), "dim"),
    "oversized embeddings": ("embeddings", lambda site, e: bytes(MAX_PAYLOAD_BYTES + 1), "too_large"),
    "not a batch": ("embeddings", lambda site, e: b"garbage" * 10, "magic"),
    "other device in header": ("embeddings", lambda site, e: _embeddings_payload(site, "rec-9", e[:3]), "ids"),
    "NaN embeddings": ("embeddings", lambda site, e: _with_nan(site, e), "not_finite"),
    "invalid JSON": ("detections", lambda site, e: b"{not json", "json"),
    "oversized JSON": ("detections", lambda site, e: b" " * (MAX_JSON_BYTES + 1), "too_large"),
    "unknown detections protocol": ("detections", lambda site, e: json.dumps(
        {"protocol": 7, "detections": []}).encode(), "version"),
    "detection missing field": ("detections", lambda site, e: json.dumps(
        {"protocol": 1, "detections": [_DETECTION]}).encode(), "missing_field"),
    "ack missing field": ("ack", lambda site, e: b'{"device": "rec-1"}', "missing_field"),
    "status unknown state": ("status", lambda site, e: b'{"state": "dancing"}', "field"),
}


@pytest.mark.parametrize("case", sorted(BAD_PAYLOADS))
def test_station_rejects_bad_payload(station, publisher, embeddings, caplog, case):
    kind, build, reason = BAD_PAYLOADS[case]
    site = _owned_site(station.config.shard)
    topic = topics.device_topic(site, "rec-1", kind)

    with caplog.at_level(logging.ERROR, logger="dawnchorus.server.station"):
        publisher.publish(topic, build(site, embeddings), qos=1).wait_for_publish(10)
        publisher.publish(topics.device_topic(site, "rec-1", "embeddings"),
                          _embeddings_payload(site, "rec-1", embeddings[:3], first=100), qos=1).wait_for_publish(10)
        assert _wait(lambda: station.counters["embeddings"] == 3 and station.rejections.total == 1, timeout=60), \
            (dict(station.counters), station.rejections.counts())

    assert station.rejections.counts() == {f"{kind}.{reason}": 1}
    assert station.counters["rejected_payloads"] == 1
    assert station.counters["ingest_errors"] == 0
    lines = [record.getMessage() for record in caplog.records if "rejected" in record.getMessage()]
    assert len(lines) == 1
    assert topic in lines[0]
    assert "device rec-1" in lines[0]
    assert f"reason {reason}" in lines[0]


def test_station_rejection_log_rate_limited(station, publisher, caplog):
    site = _owned_site(station.config.shard)
    topic = topics.device_topic(site, "rec-1", "detections")
    count = LOG_BURST + 5
    with caplog.at_level(logging.ERROR, logger="dawnchorus.server.station"):
        for _ in range(count):
            publisher.publish(topic, b"{not json", qos=1).wait_for_publish(10)
        assert _wait(lambda: station.rejections.total == count)
    assert station.rejections.counts() == {"detections.json": count}
    assert len([record for record in caplog.records if "rejected" in record.getMessage()]) == LOG_BURST


def test_station_publishes_retained_stats(mosquitto, source, publisher, embeddings, tmp_path, caplog):
    config = StationConfig(
        broker_host=mosquitto.host, broker_port=mosquitto.port, state_dir=tmp_path,
        client_id=f"test-station-{uuid.uuid4().hex[:8]}", stats_interval_s=0.2,
        adaptation=AdaptationConfig(buffer_capacity=100, update_interval=1000, min_buffer=10),
        signing_key=Ed25519PrivateKey.generate(),
    )
    base = BaseStation(config, source.head, lambda site: LABELS)
    base.start()
    try:
        assert base.connected.wait(20)
        site = "site-stats"
        publisher.publish(topics.device_topic(site, "rec-1", "embeddings"), b"garbage" * 10, qos=1).wait_for_publish(10)
        publisher.publish(topics.device_topic(site, "rec-1", "embeddings"),
                          _embeddings_payload(site, "rec-1", embeddings[:4]), qos=1).wait_for_publish(10)
        assert _wait(lambda: base.counters["embeddings"] == 4)

        stats_topic = topics.station_stats_topic(config.client_id)
        received = []
        reader = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-stats-{uuid.uuid4().hex[:8]}")
        reader.on_message = lambda client, userdata, message: received.append(StationStats.decode(message.payload))
        reader.connect(mosquitto.host, mosquitto.port)
        reader.subscribe(stats_topic, qos=1)
        reader.loop_start()
        try:
            assert _wait(lambda: any(stats.counters.get("embeddings") == 4 for stats in received), timeout=30)
        finally:
            reader.loop_stop()
            reader.disconnect()
    finally:
        with caplog.at_level(logging.INFO, logger="dawnchorus.server.station"):
            base.stop()
        publisher.publish(topics.station_stats_topic(config.client_id), b"", qos=1, retain=True).wait_for_publish(10)

    latest = [stats for stats in received if stats.counters.get("embeddings") == 4][-1]
    assert latest.station == config.client_id
    assert latest.rejected == {"embeddings.magic": 1}
    assert latest.counters["rejected_payloads"] == 1
    summary = [record.getMessage() for record in caplog.records if "base station stopped" in record.getMessage()]
    assert "'embeddings.magic': 1" in summary[0]


def test_station_ignores_sites_of_other_shards(station, publisher, embeddings):
    foreign = next(f"site-{i}" for i in range(1000) if not station.config.shard.owns(f"site-{i}"))
    owned = _owned_site(station.config.shard)
    _send(publisher, foreign, "rec-1", embeddings[:5], first=0)
    _send(publisher, owned, "rec-1", embeddings[:5], first=100)
    assert _wait(lambda: station.counters["embeddings"] == 5)
    assert foreign not in station.sites


def test_shard_assigns_each_site_to_one_shard():
    shards = [Shard(i, 4) for i in range(1, 5)]
    for n in range(200):
        assert sum(shard.owns(f"site-{n}") for shard in shards) == 1


def test_shard_parse_rejects_invalid():
    with pytest.raises(ValueError, match="INDEX/COUNT"):
        Shard.parse("two")
    with pytest.raises(ValueError):
        Shard.parse("5/4")


def test_collapse_guard_blocks_low_scores():
    config = AdaptationConfig()
    source = np.array([[3.0, -2.0], [2.0, -1.0], [-1.0, -3.0]])
    decision = check_collapse(source, source - 6.0, config)
    assert not decision.accepted
    assert "mean top score" in decision.reason
    assert decision.stats["candidate_mean_top_score"] < decision.stats["source_mean_top_score"]


def test_collapse_guard_blocks_everything_positive():
    config = AdaptationConfig()
    source = np.full((8, 2), -3.0)
    source[0, 0] = 3.0
    decision = check_collapse(source, np.full_like(source, 4.0), config)
    assert not decision.accepted
    assert "positive rate rose" in decision.reason


def test_collapse_guard_blocks_many_detections_per_window():
    # Every window already has a detection, so the share of positive windows
    # cannot rise; a head that detects four classes in each window must still be blocked.
    config = AdaptationConfig()
    source = np.full((8, 4), -3.0)
    source[:, 0] = 3.0
    candidate = np.full_like(source, 3.0)
    decision = check_collapse(source, candidate, config)
    assert not decision.accepted
    assert "detections per window rose to 4.000 from the source head's 1.000" in decision.reason
    two = source.copy()
    two[:, 1] = 3.0
    assert check_collapse(source, two, config).accepted


def test_collapse_guard_blocks_changed_top_classes():
    config = AdaptationConfig(min_confident_windows=10)
    source = np.full((10, 3), -4.0)
    source[:, 0] = 2.0
    # The same scores, but the top class of 2 of the 10 confident windows moves to class 1.
    candidate = source.copy()
    candidate[:2, 1] = 3.0
    decision = check_collapse(source, candidate, config)
    assert not decision.accepted
    assert "agrees with the source head's on 0.800 of the 10 windows" in decision.reason
    candidate[1, 1] = -4.0
    assert check_collapse(source, candidate, config).accepted


def test_collapse_guard_skips_agreement_on_few_confident_windows():
    source = np.full((10, 3), -4.0)
    source[:, 0] = 2.0
    candidate = source.copy()
    candidate[:5, 1] = 3.0
    assert check_collapse(source, candidate, AdaptationConfig(min_confident_windows=11)).accepted
    assert not check_collapse(source, candidate, AdaptationConfig(min_confident_windows=10)).accepted


def test_collapse_guard_accepts_small_change():
    config = AdaptationConfig()
    source = np.array([[3.0, -2.0], [2.0, -1.0], [-1.0, -3.0]])
    assert check_collapse(source, source - 0.2, config).accepted


def test_collapse_guard_blocks_nan():
    config = AdaptationConfig()
    source = np.zeros((2, 2))
    candidate = np.array([[np.nan, 0.0], [0.0, 0.0]])
    assert not check_collapse(source, candidate, config).accepted


def test_station_without_signing_key_rejected(source, tmp_path):
    config = StationConfig(state_dir=tmp_path)
    with pytest.raises(ValueError, match="dawnchorus keys generate"):
        BaseStation(config, source.head, lambda site: LABELS)


def test_station_receives_messages_sent_while_down(mosquitto, source, publisher, embeddings, tmp_path):
    config = StationConfig(
        broker_host=mosquitto.host, broker_port=mosquitto.port, state_dir=tmp_path,
        client_id=f"test-station-{uuid.uuid4().hex[:8]}",
        adaptation=AdaptationConfig(buffer_capacity=100, update_interval=1000, min_buffer=10),
        signing_key=Ed25519PrivateKey.generate(),
    )
    first = BaseStation(config, source.head, lambda site: LABELS)
    first.start()
    assert first.connected.wait(20)
    first.stop()

    _send(publisher, "site-offline", "rec-1", embeddings[:8], first=0)
    second = BaseStation(config, source.head, lambda site: LABELS)
    second.start()
    try:
        assert _wait(lambda: second.counters["embeddings"] == 8)
    finally:
        second.stop()


def test_registry_sequence_grows_past_clock(tmp_path):
    registry = HeadRegistry(tmp_path)
    assert registry.next_sequence("site-a") >= int(time.time() * 1000) - 1000
    future = int(time.time() * 1000) + 10**9
    registry.record_publication("site-a", Publication(version=3, sequence=future, rollback=False, time=0.0))
    assert registry.next_sequence("site-a") == future + 1


def test_station_discards_head_after_rollback(mosquitto, source, embeddings, tmp_path):
    signing_key = Ed25519PrivateKey.generate()
    config = StationConfig(
        broker_host=mosquitto.host, broker_port=mosquitto.port, state_dir=tmp_path,
        client_id=f"test-station-{uuid.uuid4().hex[:8]}", signing_key=signing_key,
        adaptation=AdaptationConfig(buffer_capacity=100, update_interval=1000, min_buffer=10),
    )
    base = BaseStation(config, source.head, lambda site: LABELS)
    base.start()
    operator = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-rollback-{uuid.uuid4().hex[:8]}")
    operator.connect(mosquitto.host, mosquitto.port)
    operator.loop_start()
    site = "site-rollback"
    try:
        assert base.connected.wait(20)
        adapter = base._site(site)
        adapter.add(embeddings)
        for version in (1, 2):
            assert base._publish_head(site, adapter, adapter.run_round(version))

        rollback, blob = load_rollback(base.registry, site, 1)
        signed, confirmed = publish_rollback(HeadPublisher(operator, base.registry, signing_key), base.registry,
                                             rollback, blob)
        candidate = adapter.run_round(3)
        published = base._publish_head(site, adapter, candidate)
        after_rollback = adapter.run_round(3)
        republished = base._publish_head(site, adapter, after_rollback)
    finally:
        operator.loop_stop()
        operator.disconnect()
        base.stop()

    assert confirmed
    assert signed.rollback
    assert not published
    assert base.counters["heads_discarded"] == 1
    assert republished
    assert base.registry.record(site, 3).parent == 1
    assert base.registry.publication(site).version == 3
    assert base.registry.publication(site).sequence > signed.sequence


def _retained(broker, topic: str, timeout: float = 20.0) -> bytes | None:
    """Subscribe to ``topic`` with a fresh client and return its retained payload, or None if none comes."""
    received: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-retained-{uuid.uuid4().hex[:8]}")
    client.on_message = lambda client, userdata, message: received.append(bytes(message.payload))
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        _wait(lambda: received, timeout)
    finally:
        client.loop_stop()
        client.disconnect()
    return received[0] if received else None


def test_station_republishes_heads_after_broker_loses_them(start_mosquitto, source, embeddings, tmp_path):
    # A broker without persistence forgets its retained messages when it restarts, as a crashed one
    # forgets those it received since its last save.
    broker = start_mosquitto("broker")
    signing_key = Ed25519PrivateKey.generate()
    config = StationConfig(
        broker_host=broker.host, broker_port=broker.port, state_dir=tmp_path,
        client_id=f"test-station-{uuid.uuid4().hex[:8]}", signing_key=signing_key,
        adaptation=AdaptationConfig(buffer_capacity=100, update_interval=1000, min_buffer=10),
    )
    base = BaseStation(config, source.head, lambda site: LABELS)
    base.start()
    site = "site-republish"
    try:
        assert base.connected.wait(20)
        adapter = base._site(site)
        adapter.add(embeddings)
        for version in (1, 2):
            assert base._publish_head(site, adapter, adapter.run_round(version))
        rollback, blob = load_rollback(base.registry, site, 1)
        signed, confirmed = publish_rollback(base._publisher, base.registry, rollback, blob)
        assert confirmed

        broker.kill()
        base.connected.clear()
        broker.start()
        assert base.connected.wait(60)
        assert _wait(lambda: base.counters["heads_republished"] == 1, 30)
        manifest = _retained(broker, topics.manifest_topic(site))
        retained_blob = _retained(broker, topics.blob_topic(site, 1))
    finally:
        base.stop()

    assert manifest == signed.encode()
    assert retained_blob == blob
