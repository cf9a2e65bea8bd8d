"""Payload codecs: round trips, and rejection of malformed messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dawnchorus.protocol import topics
from dawnchorus.protocol.embeddings import EmbeddingBatch, PayloadError, decode_embeddings, encode_embeddings
from dawnchorus.protocol.messages import Ack, Detection, Manifest, Status, decode_detections, encode_detections


def _batch(windows: int = 3, dim: int = 1024) -> EmbeddingBatch:
    rng = np.random.default_rng(0)
    return EmbeddingBatch(
        device="rec-1", site="forest-a", head_version=7,
        sequence=np.arange(100, 100 + windows, dtype=np.uint64),
        start_time=1_700_000_000.0 + 3.0 * np.arange(windows),
        embeddings=rng.random((windows, dim), dtype=np.float32) * 4,
    )


def _manifest() -> Manifest:
    rng = np.random.default_rng(1)
    return Manifest(
        site="forest-a", version=3, parent=2, labels=["A a_Aa", "B b_Bb"], sha256="ab" * 32, size=10,
        precision="fp16", blob_topic=topics.blob_topic("forest-a", 3), created=1.5,
        probe_embeddings=rng.random((4, 1024), dtype=np.float32),
        probe_logits=rng.random((4, 2), dtype=np.float32), stats={"loss": 0.5}, sequence=12,
    )


def test_embeddings_round_trip():
    batch = _batch()
    decoded = decode_embeddings(encode_embeddings(batch))
    assert decoded.device == "rec-1"
    assert decoded.site == "forest-a"
    assert decoded.head_version == 7
    assert decoded.sequence.tolist() == [100, 101, 102]
    assert np.array_equal(decoded.start_time, batch.start_time)
    assert np.allclose(decoded.embeddings, batch.embeddings, rtol=1e-3, atol=1e-3)


def test_embeddings_message_size_is_compact():
    payload = encode_embeddings(_batch(windows=16))
    assert len(payload) < 16 * (2 * 1024 + 32) + 64


@pytest.mark.parametrize("cut", [0, 5, 20, -1, -2048])
def test_embeddings_wrong_length_rejected(cut):
    payload = encode_embeddings(_batch())
    with pytest.raises(PayloadError):
        decode_embeddings(payload[:cut] if cut else b"")


def test_embeddings_unknown_version_rejected():
    payload = bytearray(encode_embeddings(_batch()))
    payload[4] = 99
    with pytest.raises(PayloadError, match="protocol version 99"):
        decode_embeddings(bytes(payload))


def test_embeddings_wrong_dtype_rejected():
    payload = bytearray(encode_embeddings(_batch()))
    payload[5] = 2
    with pytest.raises(PayloadError, match="dtype"):
        decode_embeddings(bytes(payload))


def test_embeddings_nan_rejected():
    batch = _batch()
    batch.embeddings[1, 5] = np.nan
    with pytest.raises(PayloadError, match="NaN"):
        decode_embeddings(encode_embeddings(batch))


def test_embeddings_invalid_device_id_rejected_on_encode():
    batch = _batch()
    batch.device = "rec/+"
    with pytest.raises(ValueError, match="device id"):
        encode_embeddings(batch)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_embeddings_decoder_fuzz(payload):
    try:
        decode_embeddings(payload)
    except PayloadError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255))
def test_embeddings_decoder_single_byte_corruption(position, value):
    payload = bytearray(encode_embeddings(_batch(windows=2, dim=8)))
    payload[position % len(payload)] = value
    try:
        decoded = decode_embeddings(bytes(payload))
    except PayloadError:
        return
    assert decoded.embeddings.shape[1] >= 1


def test_detections_round_trip():
    detection = Detection("rec-1", "forest-a", 5, 10.0, 13.0, "Turdus merula_Eurasian Blackbird", 0.91, 2)
    decoded = decode_detections(encode_detections([detection]))
    assert decoded == [detection]
    assert decoded[0].common_name == "Eurasian Blackbird"


@pytest.mark.parametrize("payload", [
    b"not json", b"[]", b'{"detections": 3}',
    b'{"detections": [{"device": "rec-1"}]}',
    json.dumps({"detections": [{"device": "rec-1", "site": "s", "sequence": 1, "start_time": 0,
                                "end_time": 3, "label": "x", "confidence": 7, "head_version": 0}]}).encode(),
])
def test_detections_invalid_rejected(payload):
    with pytest.raises(PayloadError):
        decode_detections(payload)


def test_status_and_ack_round_trip():
    status = Status("rec-1", "forest-a", "online", 3, 120, 5.0, {"windows": 120})
    ack = Ack("rec-1", "forest-a", 3, True, "", 6.0)
    assert Status.decode(status.encode()) == status
    assert Ack.decode(ack.encode()) == ack


def test_manifest_round_trip():
    manifest = _manifest()
    decoded = Manifest.decode(manifest.encode())
    assert decoded.version == 3
    assert decoded.sequence == 12
    assert decoded.rollback is False
    assert decoded.signature is None
    assert decoded.labels == manifest.labels
    assert np.allclose(decoded.probe_logits, manifest.probe_logits)


@pytest.mark.parametrize("field", ["labels", "sha256", "version", "probe", "site", "precision", "sequence",
                                   "rollback"])
def test_manifest_missing_field_rejected(field):
    record = json.loads(_manifest().encode())
    del record[field]
    with pytest.raises(PayloadError, match=field):
        Manifest.decode(json.dumps(record).encode())


def test_manifest_protocol_1_rejected_as_unsigned():
    record = json.loads(_manifest().encode())
    record["protocol"] = 1
    with pytest.raises(PayloadError, match="unsigned"):
        Manifest.decode(json.dumps(record).encode())


def test_manifest_probe_shape_mismatch_rejected():
    record = json.loads(_manifest().encode())
    record["labels"] = ["only one"]
    with pytest.raises(PayloadError, match="probe shapes"):
        Manifest.decode(json.dumps(record).encode())


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["protocol", "site", "version", "labels", "sha256", "probe", "size"]),
                       st.one_of(st.integers(), st.text(max_size=8), st.none(), st.lists(st.text(max_size=3)))))
def test_manifest_decoder_fuzz(record):
    try:
        Manifest.decode(json.dumps(record).encode())
    except PayloadError:
        pass


def test_topics_parse_device_topic():
    parsed = topics.parse_device_topic(topics.device_topic("forest-a", "rec-1", "embeddings"))
    assert (parsed.site, parsed.device, parsed.kind) == ("forest-a", "rec-1", "embeddings")


@pytest.mark.parametrize("topic", ["dawnchorus/v1/a/b", "dawnchorus/v1/a/b/other", "x/v1/a/b/status",
                                   "dawnchorus/v1/a/model/manifest"])
def test_topics_invalid_rejected(topic):
    with pytest.raises(topics.TopicError):
        topics.parse_device_topic(topic)
