"""Payload codecs: round trips, and rejection of malformed messages.

The property tests at the end feed the decoders arbitrary and mutated
payloads. They run a fixed set of examples by default (the "ci" profile in
conftest.py); ``--hypothesis-profile=fuzz`` runs 5,000 fresh ones per test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dawnchorus.protocol import topics
from hypothesis.extra import numpy as hnp

from dawnchorus.protocol.embeddings import (
    MAX_PAYLOAD_BYTES,
    REASONS,
    EmbeddingBatch,
    PayloadError,
    decode_embeddings,
    encode_embeddings,
)
from dawnchorus.protocol.messages import (
    MAX_JSON_BYTES,
    Ack,
    Detection,
    Manifest,
    ManifestSignature,
    Receipt,
    StationStats,
    Status,
    decode_detections,
    encode_detections,
)


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


def test_topics_parse_device_topic():
    parsed = topics.parse_device_topic(topics.device_topic("forest-a", "rec-1", "embeddings"))
    assert (parsed.site, parsed.device, parsed.kind) == ("forest-a", "rec-1", "embeddings")


@pytest.mark.parametrize("topic", ["dawnchorus/v1/a/b", "dawnchorus/v1/a/b/other", "x/v1/a/b/status",
                                   "dawnchorus/v1/a/model/manifest"])
def test_topics_invalid_rejected(topic):
    with pytest.raises(topics.TopicError):
        topics.parse_device_topic(topic)


# Property tests -----------------------------------------------------------------------------

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z").filter(lambda value: value != "model")
finite = st.floats(allow_nan=False, allow_infinity=False)
unsigned = st.integers(min_value=0, max_value=2**63)


@st.composite
def embedding_batches(draw) -> EmbeddingBatch:
    windows = draw(st.integers(min_value=1, max_value=6))
    dim = draw(st.integers(min_value=1, max_value=24))
    vectors = draw(hnp.arrays(np.float16, (windows, dim), elements=st.floats(width=16, allow_nan=False,
                                                                            allow_infinity=False)))
    return EmbeddingBatch(
        device=draw(ids), site=draw(ids), head_version=draw(st.integers(min_value=0, max_value=2**32 - 1)),
        sequence=draw(hnp.arrays(np.uint64, (windows,))),
        start_time=draw(hnp.arrays(np.float64, (windows,), elements=finite)),
        embeddings=vectors,
    )


def _same_batch(a: EmbeddingBatch, b: EmbeddingBatch) -> bool:
    return (a.device, a.site, a.head_version) == (b.device, b.site, b.head_version) and all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        for x, y in ((a.sequence, b.sequence), (a.start_time, b.start_time), (a.embeddings, b.embeddings))
    )


def _decode_or_reject(decoder, payload: bytes):
    """Return the decoded value, or None when the decoder raised PayloadError with a known reason."""
    try:
        return decoder(payload)
    except PayloadError as error:
        assert error.reason in REASONS, error.reason
        return None


@given(embedding_batches())
def test_embeddings_round_trip_exact(batch):
    payload = encode_embeddings(batch)
    decoded = decode_embeddings(payload)
    assert _same_batch(decoded, batch)
    assert encode_embeddings(decoded) == payload


@given(st.binary(max_size=4096))
def test_embeddings_decoder_arbitrary_bytes(payload):
    decoded = _decode_or_reject(decode_embeddings, payload)
    if decoded is not None:
        assert encode_embeddings(decoded) == payload


@st.composite
def mutated(draw, payload: bytes) -> bytes:
    """Apply one to four random edits to ``payload``: overwrite, insert, delete or truncate bytes."""
    data = bytearray(payload)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        position = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        edit = draw(st.sampled_from(["overwrite", "insert", "delete", "truncate"]))
        if edit == "overwrite" and data:
            data[position] = draw(st.integers(min_value=0, max_value=255))
        elif edit == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del data[position:position + draw(st.integers(min_value=1, max_value=8))]
        else:
            del data[position:]
    return bytes(data)


@given(st.data())
def test_embeddings_decoder_mutated_payload(data):
    payload = data.draw(mutated(encode_embeddings(data.draw(embedding_batches()))))
    decoded = _decode_or_reject(decode_embeddings, payload)
    if decoded is not None:
        assert encode_embeddings(decoded) == payload


def test_embeddings_oversized_rejected():
    with pytest.raises(PayloadError) as raised:
        decode_embeddings(bytes(MAX_PAYLOAD_BYTES + 1))
    assert raised.value.reason == "too_large"


def test_json_oversized_rejected():
    with pytest.raises(PayloadError) as raised:
        Manifest.decode(b" " * (MAX_JSON_BYTES + 1))
    assert raised.value.reason == "too_large"


@pytest.mark.parametrize("payload", [b'{"detections": [], "x": NaN}', b'{"detections": [], "x": 1e999}',
                                     b'{"detections": [], "x": -Infinity}'])
def test_json_non_finite_numbers_rejected(payload):
    with pytest.raises(PayloadError) as raised:
        decode_detections(payload)
    assert raised.value.reason == "not_finite"


def test_json_deep_nesting_rejected():
    with pytest.raises(PayloadError) as raised:
        Status.decode(b"[" * 100_000)
    assert raised.value.reason == "json"


def test_manifest_huge_probe_shape_rejected():
    record = json.loads(_manifest().encode())
    record["probe"]["embeddings"].update(shape=[2**32, 2**32], data="")
    with pytest.raises(PayloadError, match="do not fill shape"):
        Manifest.decode(json.dumps(record).encode())


def test_detections_unknown_protocol_rejected():
    with pytest.raises(PayloadError) as raised:
        decode_detections(b'{"protocol": 2, "detections": []}')
    assert raised.value.reason == "version"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)

detections = st.builds(
    Detection, device=ids, site=ids, sequence=unsigned, start_time=finite, end_time=finite,
    label=st.text(max_size=40), confidence=st.floats(min_value=0.0, max_value=1.0), head_version=unsigned,
)
statuses = st.builds(
    Status, device=ids, site=ids, state=st.sampled_from(Status.STATES), head_version=unsigned, windows=unsigned,
    time=finite, counters=st.dictionaries(st.text(max_size=20), st.integers(), max_size=5),
)
acks = st.builds(Ack, device=ids, site=ids, version=st.integers(), accepted=st.booleans(),
                 reason=st.text(max_size=40), time=finite)
station_stats = st.builds(
    StationStats, station=ids, time=finite,
    counters=st.dictionaries(st.text(max_size=20), st.integers(), max_size=5),
    rejected=st.dictionaries(st.text(max_size=20), st.integers(), max_size=5),
)


@st.composite
def receipts(draw) -> Receipt:
    bounds = sorted(set(draw(st.lists(st.integers(min_value=0, max_value=2**64), max_size=8))))
    pairs = [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds) - 1, 2)]
    return Receipt(draw(ids), draw(ids), pairs, draw(finite))


# Each JSON decoder, with how to encode what it returns.
JSON_CODECS = {
    "detections": (decode_detections, encode_detections),
    "status": (Status.decode, lambda status: status.encode()),
    "ack": (Ack.decode, lambda ack: ack.encode()),
    "station stats": (StationStats.decode, lambda stats: stats.encode()),
    "receipt": (Receipt.decode, lambda receipt: receipt.encode()),
    "manifest": (Manifest.decode, lambda manifest: manifest.encode()),
}


def _check_json_decoder(name: str, payload: bytes) -> None:
    """Decode ``payload``; if it is accepted, its encoding must decode to an equal value."""
    decode, encode = JSON_CODECS[name]
    decoded = _decode_or_reject(decode, payload)
    if decoded is None:
        return
    encoded = encode(decoded)
    again = decode(encoded)
    if name == "manifest":
        assert again.encode() == encoded
    else:
        assert again == decoded


@given(st.lists(detections, max_size=4))
def test_detections_round_trip_exact(items):
    assert decode_detections(encode_detections(items)) == items


@given(statuses)
def test_status_round_trip_exact(status):
    assert Status.decode(status.encode()) == status


@given(acks)
def test_ack_round_trip_exact(ack):
    assert Ack.decode(ack.encode()) == ack


@given(station_stats)
def test_station_stats_round_trip_exact(stats):
    assert StationStats.decode(stats.encode()) == stats


@given(receipts())
def test_receipt_round_trip_exact(receipt):
    assert Receipt.decode(receipt.encode()) == receipt


@pytest.mark.parametrize("ranges, problem", [
    ([[5, 5]], "empty"),
    ([[3, 1]], "empty"),
    ([[-1, 4]], "outside"),
    ([[0, 2**64 + 1]], "outside"),
    ([[0, 10], [5, 20]], "sorted and disjoint"),
    ([[10, 20], [0, 5]], "sorted and disjoint"),
    ([[0, 1, 2]], "two integers"),
    ([[0, True]], "two integers"),
    ([[0.0, 4]], "two integers"),
    ([[2 * i, 2 * i + 1] for i in range(4097)], "limit"),
])
def test_receipt_rejects_invalid_ranges(ranges, problem):
    payload = json.dumps({"device": "rec-01", "site": "forest-a", "ranges": ranges}).encode()
    with pytest.raises(PayloadError, match=problem):
        Receipt.decode(payload)


def test_receipt_covers_only_its_ranges():
    receipt = Receipt("rec-01", "forest-a", [(0, 16), (32, 48)])
    assert [number for number in range(50) if receipt.covers(number)] == [*range(16), *range(32, 48)]


def test_receipt_topic_is_per_device_and_not_a_recorder_kind():
    assert topics.receipt_topic("forest-a", "rec-01") == "dawnchorus/v1/forest-a/rec-01/receipt"
    assert topics.RECEIPT_KIND not in topics.DEVICE_KINDS
    with pytest.raises(topics.TopicError):
        topics.receipt_topic("forest-a", "rec/01")


@st.composite
def manifests(draw) -> Manifest:
    classes = draw(st.integers(min_value=1, max_value=4))
    probes = draw(st.integers(min_value=0, max_value=3))
    signature = draw(st.none() | st.builds(ManifestSignature, key_id=st.text(max_size=16),
                                           value=st.binary(min_size=64, max_size=64)))
    site = draw(ids)
    version = draw(st.integers(min_value=1, max_value=2**31))
    return Manifest(
        site=site, version=version, parent=draw(st.integers(min_value=0, max_value=version)),
        labels=draw(st.lists(st.text(min_size=1, max_size=20), min_size=classes, max_size=classes)),
        sha256=draw(st.from_regex(r"\A[0-9a-f]{64}\Z")), size=draw(unsigned),
        precision=draw(st.sampled_from(["fp16", "fp32"])), blob_topic=topics.blob_topic(site, version),
        created=draw(finite),
        probe_embeddings=draw(hnp.arrays(np.float16, (probes, 8), elements=st.floats(
            width=16, allow_nan=False, allow_infinity=False))).astype(np.float32),
        probe_logits=draw(hnp.arrays(np.float32, (probes, classes), elements=st.floats(
            width=32, allow_nan=False, allow_infinity=False))),
        stats=draw(st.dictionaries(st.text(max_size=12), finite, max_size=3)),
        sequence=draw(st.integers(min_value=1, max_value=2**62)), rollback=draw(st.booleans()),
        signature=signature,
    )


@given(manifests())
def test_manifest_round_trip_exact(manifest):
    payload = manifest.encode()
    decoded = Manifest.decode(payload)
    assert decoded.encode() == payload
    assert decoded.signed_record() == manifest.signed_record()


@given(st.sampled_from(sorted(JSON_CODECS)), st.binary(max_size=512))
def test_json_decoders_arbitrary_bytes(name, payload):
    _check_json_decoder(name, payload)


@given(st.sampled_from(sorted(JSON_CODECS)), st.dictionaries(st.text(max_size=12), json_values, max_size=8))
def test_json_decoders_arbitrary_objects(name, record):
    _check_json_decoder(name, json.dumps(record).encode())


@st.composite
def mutated_records(draw, record: dict) -> dict:
    """Delete fields of ``record``, or replace them (one level down too) with arbitrary JSON values."""
    record = json.loads(json.dumps(record))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        target = record
        nested = [key for key, value in record.items() if isinstance(value, dict) and value]
        if nested and draw(st.booleans()):
            target = record[draw(st.sampled_from(sorted(nested)))]
        if not target:
            break
        key = draw(st.sampled_from(sorted(target)))
        if draw(st.booleans()):
            del target[key]
        else:
            target[key] = draw(json_values)
    return record


@given(st.data())
def test_manifest_decoder_mutated_record(data):
    record = json.loads(data.draw(manifests()).encode())
    _check_json_decoder("manifest", json.dumps(data.draw(mutated_records(record))).encode())


@given(st.data())
def test_json_decoders_mutated_record(data):
    name, value = data.draw(st.sampled_from([
        ("detections", st.lists(detections, min_size=1, max_size=2).map(encode_detections)),
        ("status", statuses.map(Status.encode)),
        ("ack", acks.map(Ack.encode)),
        ("station stats", station_stats.map(StationStats.encode)),
        ("receipt", receipts().filter(lambda receipt: receipt.ranges).map(Receipt.encode)),
    ]))
    record = json.loads(data.draw(value))
    _check_json_decoder(name, json.dumps(data.draw(mutated_records(record))).encode())


@given(st.data())
def test_manifest_decoder_mutated_bytes(data):
    payload = data.draw(manifests()).encode()
    _check_json_decoder("manifest", data.draw(mutated(payload)))
