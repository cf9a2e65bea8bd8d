"""JSON messages: detections, recorder status, head acknowledgements, receipts and head manifests.

Every decoder raises PayloadError with the field at fault, so that a receiver
can log and count a rejected message and carry on.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from typing import Any

import numpy as np

from dawnchorus.protocol.embeddings import (
    REASON_FIELD,
    REASON_JSON,
    REASON_MISSING_FIELD,
    REASON_NOT_FINITE,
    REASON_TOO_LARGE,
    REASON_VERSION,
    PayloadError,
)
from dawnchorus.protocol.topics import TopicError, validate_id

# A manifest carries its class list and a small probe; 4 MiB leaves room for
# all 6522 BirdNET classes while stopping a runaway payload before json.loads.
MAX_JSON_BYTES = 4 * 1024 * 1024


def _reject_constant(name: str) -> float:
    raise PayloadError(f"{name} is not a JSON number (NaN and infinities are invalid JSON)", REASON_NOT_FINITE)


def _parse_finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise PayloadError(f"number {text} is out of the float64 range", REASON_NOT_FINITE)
    return value


def _load_object(payload: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object, rejecting NaN and infinities so that every decoded message encodes again."""
    if len(payload) > MAX_JSON_BYTES:
        raise PayloadError(f"{what} of {len(payload)} bytes exceeds the {MAX_JSON_BYTES}-byte limit",
                           REASON_TOO_LARGE)
    try:
        value = json.loads(payload, parse_constant=_reject_constant, parse_float=_parse_finite_float)
    except PayloadError as error:
        raise PayloadError(f"{what}: {error}", error.reason) from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PayloadError(f"{what} is not valid JSON: {error}", REASON_JSON) from error
    except RecursionError as error:
        raise PayloadError(f"{what} is nested too deeply to parse", REASON_JSON) from error
    if not isinstance(value, dict):
        raise PayloadError(f"{what} must be a JSON object, got {type(value).__name__}", REASON_JSON)
    return value


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if name not in obj:
        raise PayloadError(f"{what} is missing field {name!r}", REASON_MISSING_FIELD)
    value = obj[name]
    # bool is an int in Python; a field typed int must not accept true/false.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise PayloadError(f"{what} field {name!r} must be {kind}, got a boolean")
    if not isinstance(value, kind):
        raise PayloadError(f"{what} field {name!r} must be {kind}, got {type(value).__name__}")
    return value


def _optional_field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str, default: Any) -> Any:
    return _field(obj, name, kind, what) if name in obj else default


def _counters_field(obj: dict[str, Any], what: str) -> dict[str, int]:
    counters = _optional_field(obj, "counters", dict, what, {})
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in counters.values()):
        raise PayloadError(f"{what}: every value of counters must be an integer")
    return dict(counters)


def _id_field(obj: dict[str, Any], name: str, what: str) -> str:
    value = _field(obj, name, str, what)
    try:
        return validate_id(value, name)
    except TopicError as error:
        raise PayloadError(f"{what}: {error}") from error


def _count_field(obj: dict[str, Any], name: str, what: str) -> int:
    """Return an optional non-negative integer field, 0 when it is absent."""
    if name not in obj:
        return 0
    value = _field(obj, name, int, what)
    if value < 0:
        raise PayloadError(f"{what} field {name!r} must not be negative, got {value}")
    return value


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


@dataclasses.dataclass
class Detection:
    """One species above the detection threshold in one window."""

    device: str
    site: str
    sequence: int
    start_time: float
    end_time: float
    label: str
    confidence: float
    head_version: int

    @property
    def scientific_name(self) -> str:
        return self.label.partition("_")[0]

    @property
    def common_name(self) -> str:
        scientific, _, common = self.label.partition("_")
        return common or scientific

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["scientific_name"] = self.scientific_name
        record["common_name"] = self.common_name
        return record


DETECTIONS_PROTOCOL = 1


def encode_detections(detections: list[Detection]) -> bytes:
    return _dumps({"protocol": DETECTIONS_PROTOCOL, "detections": [d.to_json() for d in detections]})


def decode_detections(payload: bytes) -> list[Detection]:
    """Decode a detections message; a message without ``protocol`` is read as protocol 1."""
    what = "detections message"
    obj = _load_object(payload, what)
    protocol = obj.get("protocol", DETECTIONS_PROTOCOL)
    if protocol != DETECTIONS_PROTOCOL or isinstance(protocol, bool):
        raise PayloadError(f"{what}: unknown protocol {protocol!r}, this build reads {DETECTIONS_PROTOCOL}",
                           REASON_VERSION)
    items = _field(obj, "detections", list, what)
    detections = []
    for item in items:
        if not isinstance(item, dict):
            raise PayloadError(f"{what}: each detection must be an object")
        confidence = float(_field(item, "confidence", (int, float), what))
        if not 0.0 <= confidence <= 1.0:
            raise PayloadError(f"{what}: confidence {confidence} outside [0, 1]")
        sequence = _field(item, "sequence", int, what)
        head_version = _field(item, "head_version", int, what)
        if sequence < 0 or head_version < 0:
            raise PayloadError(f"{what}: sequence {sequence} and head_version {head_version} must not be negative")
        detections.append(Detection(
            device=_id_field(item, "device", what),
            site=_id_field(item, "site", what),
            sequence=sequence,
            start_time=float(_field(item, "start_time", (int, float), what)),
            end_time=float(_field(item, "end_time", (int, float), what)),
            label=_field(item, "label", str, what),
            confidence=confidence,
            head_version=head_version,
        ))
    return detections


@dataclasses.dataclass
class Status:
    """A recorder's retained status; the broker publishes ``state="offline"`` as its last will.

    The ``queue_*`` fields describe the recorder's outbox, the messages not yet
    delivered (embeddings wait for the base station's receipt, detections for
    the broker's PUBACK). The other counts are totals since the
    recorder process started, the recorder's side of the base station's
    metrics. Recorders that predate a count field do not send it, and it
    decodes as 0.

    Attributes:
        windows: 3 s windows analysed.
        counters: the recorder's counters by name, as free-form diagnostics;
            the typed fields below are the ones to build on.
        queue_depth: messages queued.
        queue_bytes: payload bytes queued.
        queue_dropped: messages dropped unsent, because the queue quota was
            reached or the disk was full, over the life of the recorder's state.
        queue_dropped_windows: embedding windows in the dropped messages.
        embeddings_sent: embedding windows that left the outbox as delivered:
            confirmed by the base station's receipt, or acknowledged by the
            broker for a recorder that awaits no receipts.
        detections_sent: detections whose message the broker acknowledged.
        heads_verified: pushed heads that passed every check and were stored.
        heads_installed: heads swapped in and acknowledged to the base station,
            rollbacks included.
        heads_rejected: pushed heads rejected (signature, sequence, labels,
            size, probe or reference batch), with invalid manifests.
        rejected_payloads: messages from the base station (manifests, blobs,
            receipts) that failed to decode, had the wrong size or named
            another recorder.
    """

    device: str
    site: str
    state: str
    head_version: int = 0
    windows: int = 0
    time: float = 0.0
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    queue_depth: int = 0
    queue_bytes: int = 0
    queue_dropped: int = 0
    queue_dropped_windows: int = 0
    embeddings_sent: int = 0
    detections_sent: int = 0
    heads_verified: int = 0
    heads_installed: int = 0
    heads_rejected: int = 0
    rejected_payloads: int = 0

    STATES = ("online", "offline", "finished")
    QUEUE_FIELDS = ("queue_depth", "queue_bytes", "queue_dropped", "queue_dropped_windows")
    COUNT_FIELDS = (*QUEUE_FIELDS, "embeddings_sent", "detections_sent", "heads_verified", "heads_installed",
                    "heads_rejected", "rejected_payloads")

    def encode(self) -> bytes:
        return _dumps(dataclasses.asdict(self))

    @classmethod
    def decode(cls, payload: bytes) -> Status:
        what = "status message"
        obj = _load_object(payload, what)
        state = _field(obj, "state", str, what)
        if state not in cls.STATES:
            raise PayloadError(f"{what}: unknown state {state!r}, expected one of {cls.STATES}")
        return cls(
            device=_id_field(obj, "device", what),
            site=_id_field(obj, "site", what),
            state=state,
            head_version=_field(obj, "head_version", int, what),
            windows=_optional_field(obj, "windows", int, what, 0),
            time=float(_optional_field(obj, "time", (int, float), what, 0.0)),
            counters=_counters_field(obj, what),
            **{name: _count_field(obj, name, what) for name in cls.COUNT_FIELDS},
        )


@dataclasses.dataclass
class Ack:
    """A recorder's reply to a head manifest: the version it now runs, or a rejection."""

    device: str
    site: str
    version: int
    accepted: bool
    reason: str = ""
    time: float = 0.0

    def encode(self) -> bytes:
        return _dumps(dataclasses.asdict(self))

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        what = "ack message"
        obj = _load_object(payload, what)
        return cls(
            device=_id_field(obj, "device", what),
            site=_id_field(obj, "site", what),
            version=_field(obj, "version", int, what),
            accepted=_field(obj, "accepted", bool, what),
            reason=_optional_field(obj, "reason", str, what, ""),
            time=float(_optional_field(obj, "time", (int, float), what, 0.0)),
        )


# Ranges in one receipt at most. A receipt lists the ranges that hold the
# numbers of one commit, and a device's numbers form few long runs.
MAX_RECEIPT_RANGES = 4096
_MAX_SEQUENCE_END = 2**64


@dataclasses.dataclass
class Receipt:
    """The base station's confirmation of the embedding windows it has committed to disk for one recorder.

    A recorder keeps a queued embeddings message until a receipt covers its
    sequence numbers: the broker's PUBACK alone does not survive a broker
    crash. The station publishes one after each journal commit, retained, so
    a recorder that reconnects finds the newest one.

    Attributes:
        device, site: the recorder.
        ranges: half-open ranges [start, end) of sequence numbers committed,
            sorted and disjoint. They are the station's accepted ranges that
            hold the numbers of the messages just committed, so a receipt
            also confirms earlier numbers in the same run.
        time: unix time of the commit.
    """

    device: str
    site: str
    ranges: list[tuple[int, int]]
    time: float = 0.0

    def covers(self, sequence: int) -> bool:
        return any(start <= sequence < end for start, end in self.ranges)

    def encode(self) -> bytes:
        return _dumps({"device": self.device, "site": self.site, "ranges": [list(pair) for pair in self.ranges],
                       "time": self.time})

    @classmethod
    def decode(cls, payload: bytes) -> Receipt:
        what = "receipt message"
        obj = _load_object(payload, what)
        items = _field(obj, "ranges", list, what)
        if len(items) > MAX_RECEIPT_RANGES:
            raise PayloadError(f"{what}: {len(items)} ranges exceed the limit of {MAX_RECEIPT_RANGES}",
                               REASON_TOO_LARGE)
        ranges = []
        for item in items:
            if (not isinstance(item, list) or len(item) != 2
                    or not all(isinstance(value, int) and not isinstance(value, bool) for value in item)):
                raise PayloadError(f"{what}: each range must be a list of two integers [start, end], got {item!r}",
                                   REASON_FIELD)
            start, end = item
            if not 0 <= start < end <= _MAX_SEQUENCE_END:
                raise PayloadError(f"{what}: range [{start}, {end}) is empty or outside the sequence numbers",
                                   REASON_FIELD)
            if ranges and start < ranges[-1][1]:
                raise PayloadError(f"{what}: ranges must be sorted and disjoint, got [{start}, {end}) after "
                                   f"[{ranges[-1][0]}, {ranges[-1][1]})", REASON_FIELD)
            ranges.append((start, end))
        return cls(
            device=_id_field(obj, "device", what),
            site=_id_field(obj, "site", what),
            ranges=ranges,
            time=float(_optional_field(obj, "time", (int, float), what, 0.0)),
        )


@dataclasses.dataclass
class StationStats:
    """A base-station process's counters, published retained on its stats topic.

    Attributes:
        station: the process's MQTT client id.
        time: unix time of the snapshot.
        counters: totals since the process started, such as ``embeddings``
            (accepted), ``embeddings_duplicate``, ``rejected_payloads`` and ``heads_published``.
        rejected: rejected messages since the process started, keyed
            ``<message kind>.<reason>``, for example ``embeddings.length``.
    """

    station: str
    time: float
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)

    def encode(self) -> bytes:
        return _dumps(dataclasses.asdict(self))

    @classmethod
    def decode(cls, payload: bytes) -> StationStats:
        what = "station stats message"
        obj = _load_object(payload, what)
        rejected = _field(obj, "rejected", dict, what)
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in rejected.values()):
            raise PayloadError(f"{what}: every value of rejected must be an integer")
        return cls(
            station=_id_field(obj, "station", what),
            time=float(_field(obj, "time", (int, float), what)),
            counters=_counters_field(obj, what),
            rejected=dict(rejected),
        )


def encode_array(array: np.ndarray, dtype: str) -> dict[str, Any]:
    """Pack an array as ``{"dtype", "shape", "data"}`` with base64 data, for JSON."""
    array = np.ascontiguousarray(array, dtype=dtype)
    return {"dtype": dtype, "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def decode_array(obj: Any, what: str) -> np.ndarray:
    """Unpack what ``encode_array`` wrote, as float32; raises PayloadError when the data does not fill the shape."""
    if obj is None:
        raise PayloadError(f"{what} is missing", REASON_MISSING_FIELD)
    if not isinstance(obj, dict):
        raise PayloadError(f"{what} must be an object with dtype, shape and data")
    dtype = _field(obj, "dtype", str, what)
    shape = _field(obj, "shape", list, what)
    if dtype not in ("<f2", "<f4"):
        raise PayloadError(f"{what}: dtype {dtype!r} not supported, expected '<f2' or '<f4'")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise PayloadError(f"{what}: shape {shape} must be non-negative integers")
    try:
        raw = base64.b64decode(_field(obj, "data", str, what), validate=True)
    except ValueError as error:
        raise PayloadError(f"{what}: data is not valid base64: {error}") from error
    # math.prod on Python ints cannot overflow, unlike np.prod, which wraps around in int64.
    count = math.prod(shape)
    if len(raw) != count * np.dtype(dtype).itemsize:
        raise PayloadError(f"{what}: {len(raw)} bytes of data do not fill shape {shape} of {dtype}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.float32)


# Protocol 2 added the publish sequence number, the rollback flag and the
# Ed25519 signature. Protocol 1 manifests were unsigned, and no recorder of
# this build accepts them.
MANIFEST_PROTOCOL = 2


@dataclasses.dataclass
class ManifestSignature:
    """An Ed25519 signature over a manifest's signed content (see ``protocol.signing``).

    Attributes:
        key_id: first 16 hex digits of the sha256 of the raw 32-byte public key,
            so that a log can name the key that signed a head.
        value: the 64-byte signature.
    """

    key_id: str
    value: bytes

    ALGORITHM = "ed25519"

    def to_json(self) -> dict[str, str]:
        return {"algorithm": self.ALGORITHM, "key_id": self.key_id,
                "value": base64.b64encode(self.value).decode()}

    @classmethod
    def from_json(cls, obj: Any) -> ManifestSignature:
        what = "manifest signature"
        if not isinstance(obj, dict):
            raise PayloadError(f"{what} must be an object with algorithm, key_id and value")
        algorithm = _field(obj, "algorithm", str, what)
        if algorithm != cls.ALGORITHM:
            raise PayloadError(f"{what}: algorithm {algorithm!r} is not supported, expected {cls.ALGORITHM!r}")
        try:
            value = base64.b64decode(_field(obj, "value", str, what), validate=True)
        except ValueError as error:
            raise PayloadError(f"{what}: value is not valid base64: {error}") from error
        if len(value) != 64:
            raise PayloadError(f"{what}: value is {len(value)} bytes, an Ed25519 signature is 64")
        return cls(key_id=_field(obj, "key_id", str, what), value=value)


@dataclasses.dataclass
class Manifest:
    """Describes one head version of one site; published retained beside the blob.

    Attributes:
        site: site id.
        version: head version, increasing per site from 1.
        parent: version it was adapted from (0: the source head).
        labels: the K class labels, in the head's output order.
        sha256: hex digest of the TFLite blob.
        size: blob size in bytes.
        precision: "fp32" or "fp16".
        blob_topic: where the blob is retained.
        created: unix time.
        probe_embeddings: [n, 1024] float32 (sent as float16), windows from the site's buffer.
        probe_logits: [n, K] float32, the blob's own outputs for them on LiteRT; a recorder
            that gets other outputs from its copy rejects the head.
        stats: pseudo-label and guard statistics of the round that made this head.
        sequence: publish sequence number of the site's manifests. Every manifest
            that the base station or a rollback publishes for a site has a higher
            one than all before it, and recorders reject one that is not higher
            than the one they installed last.
        rollback: True for a manifest published by ``dawnchorus server rollback``,
            which may carry an older version than the one a recorder runs.
        signature: the base station's signature, or None for an unsigned manifest.
    """

    site: str
    version: int
    parent: int
    labels: list[str]
    sha256: str
    size: int
    precision: str
    blob_topic: str
    created: float
    probe_embeddings: np.ndarray
    probe_logits: np.ndarray
    stats: dict[str, float] = dataclasses.field(default_factory=dict)
    sequence: int = 0
    rollback: bool = False
    signature: ManifestSignature | None = None

    def signed_record(self) -> dict[str, Any]:
        """Return every field but the signature, as the JSON types that ``encode`` writes.

        Decoding what ``encode`` wrote and calling this again gives an equal
        record, which is what lets a recorder recompute the signed content.
        """
        return {
            "protocol": MANIFEST_PROTOCOL,
            "site": self.site,
            "version": int(self.version),
            "parent": int(self.parent),
            "labels": list(self.labels),
            "sha256": self.sha256,
            "size": int(self.size),
            "precision": self.precision,
            "blob_topic": self.blob_topic,
            "created": float(self.created),
            "probe": {
                "embeddings": encode_array(self.probe_embeddings, "<f2"),
                "logits": encode_array(self.probe_logits, "<f4"),
            },
            "stats": {str(name): float(value) for name, value in self.stats.items()},
            "sequence": int(self.sequence),
            "rollback": bool(self.rollback),
        }

    def encode(self) -> bytes:
        record = self.signed_record()
        if self.signature is not None:
            record["signature"] = self.signature.to_json()
        return _dumps(record)

    @classmethod
    def decode(cls, payload: bytes) -> Manifest:
        """Decode a manifest; a missing signature is not an error here, ``signature`` is then None."""
        what = "manifest"
        obj = _load_object(payload, what)
        protocol = _field(obj, "protocol", int, what)
        if protocol != MANIFEST_PROTOCOL:
            hint = " (an unsigned manifest: upgrade the base station)" if protocol == 1 else ""
            raise PayloadError(f"{what}: unknown protocol {protocol!r}{hint}, this build reads {MANIFEST_PROTOCOL}",
                               REASON_VERSION)
        labels = _field(obj, "labels", list, what)
        if not labels or not all(isinstance(label, str) and label for label in labels):
            raise PayloadError(f"{what}: labels must be a non-empty list of strings")
        version = _field(obj, "version", int, what)
        if version < 1:
            raise PayloadError(f"{what}: version {version} must be at least 1")
        sequence = _field(obj, "sequence", int, what)
        if sequence < 1:
            raise PayloadError(f"{what}: sequence {sequence} must be at least 1")
        sha256 = _field(obj, "sha256", str, what)
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise PayloadError(f"{what}: sha256 {sha256!r} is not 64 lowercase hex digits")
        precision = _field(obj, "precision", str, what)
        if precision not in ("fp32", "fp16"):
            raise PayloadError(f"{what}: precision {precision!r}, expected 'fp32' or 'fp16'")
        size = _field(obj, "size", int, what)
        if size < 0:
            raise PayloadError(f"{what}: size {size} must not be negative")
        probe = _field(obj, "probe", dict, what)
        probe_embeddings = decode_array(probe.get("embeddings"), "manifest probe embeddings")
        probe_logits = decode_array(probe.get("logits"), "manifest probe logits")
        if probe_embeddings.ndim != 2 or probe_logits.shape != (probe_embeddings.shape[0], len(labels)):
            raise PayloadError(
                f"{what}: probe shapes {probe_embeddings.shape} and {probe_logits.shape} do not "
                f"match {len(labels)} labels"
            )
        stats = obj.get("stats", {})
        if not isinstance(stats, dict):
            raise PayloadError(f"{what}: stats must be an object")
        signature = obj.get("signature")
        return cls(
            site=_id_field(obj, "site", what),
            version=version,
            parent=_field(obj, "parent", int, what),
            labels=labels,
            sha256=sha256,
            size=size,
            precision=precision,
            blob_topic=_field(obj, "blob_topic", str, what),
            created=float(_field(obj, "created", (int, float), what)),
            probe_embeddings=probe_embeddings,
            probe_logits=probe_logits,
            stats={str(k): float(v) for k, v in stats.items() if isinstance(v, (int, float))},
            sequence=sequence,
            rollback=_field(obj, "rollback", bool, what),
            signature=None if signature is None else ManifestSignature.from_json(signature),
        )
