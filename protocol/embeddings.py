"""Binary codec for batches of embeddings, the bulk of what recorders send.

A message carries several consecutive windows of one recorder. Layout, all
little-endian:

    header  magic b"DCEB", protocol version u8, dtype code u8, windows u16,
            dim u16, head version u32, device id length u8, site id length u8
    ids     device id, site id (UTF-8)
    per window (windows entries each)
            sequence numbers  u64
            start times       f64, unix seconds
    vectors [windows, dim] float16

float16 halves the size against float32 (a 1024-d vector is 2 KiB). BirdNET
embeddings are averages of non-negative activations well inside float16's
range, and neighbour search and the head see differences of about 1e-3
relative, which is below what changes a ranking in practice.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

from dawnchorus.protocol.topics import TopicError, validate_id

MAGIC = b"DCEB"
PROTOCOL_VERSION = 1
_DTYPE_FLOAT16 = 1

_HEADER = struct.Struct("<4sBBHHIBB")

# 256 windows of 1024 float16 values is 512 KiB: far below any broker limit and
# at most about 13 minutes of audio per message at 3 s windows.
MAX_WINDOWS_PER_MESSAGE = 256
MAX_DIM = 4096

# The maximum length of a valid message: header, two 255-byte ids, and 256
# windows of sequence number, start time and a 4096-d float16 vector (about 2 MiB).
# A receiver rejects anything longer before it queues or decodes it.
MAX_PAYLOAD_BYTES = _HEADER.size + 2 * 255 + MAX_WINDOWS_PER_MESSAGE * (8 + 8 + 2 * MAX_DIM)


# Reason codes of PayloadError, under which receivers count rejected messages.
REASON_TOO_LARGE = "too_large"
REASON_LENGTH = "length"
REASON_MAGIC = "magic"
REASON_VERSION = "version"
REASON_DTYPE = "dtype"
REASON_DIM = "dim"
REASON_WINDOWS = "windows"
REASON_IDS = "ids"
REASON_NOT_FINITE = "not_finite"
REASON_JSON = "json"
REASON_MISSING_FIELD = "missing_field"
REASON_FIELD = "field"
REASON_TOPIC = "topic"

REASONS = (REASON_TOO_LARGE, REASON_LENGTH, REASON_MAGIC, REASON_VERSION, REASON_DTYPE, REASON_DIM,
           REASON_WINDOWS, REASON_IDS, REASON_NOT_FINITE, REASON_JSON, REASON_MISSING_FIELD, REASON_FIELD,
           REASON_TOPIC)


class PayloadError(ValueError):
    """A message that does not decode: wrong length, version, dtype or field.

    Attributes:
        reason: one of ``REASONS``, the code under which receivers count the rejection.
    """

    def __init__(self, message: str, reason: str = REASON_FIELD):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class EmbeddingBatch:
    """Consecutive windows of one recorder.

    Attributes:
        device: recorder id.
        site: site id.
        head_version: version of the head that scored these windows (0: source head).
        sequence: [windows] uint64, per-device sequence numbers; they, not
            timestamps, order a recorder's data.
        start_time: [windows] float64, unix time of each window's first sample.
        embeddings: [windows, dim] float16 on the wire (float32 accepted to encode).
    """

    device: str
    site: str
    head_version: int
    sequence: np.ndarray
    start_time: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return int(self.sequence.shape[0])


def encode_embeddings(batch: EmbeddingBatch) -> bytes:
    """Encode a batch; raises ValueError on inconsistent shapes or ids."""
    device = validate_id(batch.device, "device id").encode()
    site = validate_id(batch.site, "site id").encode()
    vectors = np.asarray(batch.embeddings)
    if vectors.ndim != 2:
        raise ValueError(f"embeddings must be [windows, dim], got shape {vectors.shape}")
    windows, dim = vectors.shape
    if not 1 <= windows <= MAX_WINDOWS_PER_MESSAGE:
        raise ValueError(f"{windows} windows per message, expected 1 to {MAX_WINDOWS_PER_MESSAGE}")
    if not 1 <= dim <= MAX_DIM:
        raise ValueError(f"embedding dim {dim}, expected 1 to {MAX_DIM}")
    sequence = np.asarray(batch.sequence, dtype="<u8")
    start_time = np.asarray(batch.start_time, dtype="<f8")
    if sequence.shape != (windows,) or start_time.shape != (windows,):
        raise ValueError(
            f"sequence {sequence.shape} and start_time {start_time.shape} must both be ({windows},)"
        )
    if not 0 <= batch.head_version < 2**32:
        raise ValueError(f"head version {batch.head_version} does not fit in u32")

    header = _HEADER.pack(
        MAGIC, PROTOCOL_VERSION, _DTYPE_FLOAT16, windows, dim, batch.head_version,
        len(device), len(site),
    )
    return b"".join((
        header, device, site, sequence.tobytes(), start_time.tobytes(),
        np.ascontiguousarray(vectors, dtype="<f2").tobytes(),
    ))


def decode_embeddings(payload: bytes) -> EmbeddingBatch:
    """Decode a batch, raising PayloadError for anything malformed.

    The returned embeddings are float16 [windows, dim]; non-finite values are
    rejected because they would poison the neighbour buffer. Every payload
    that decodes encodes back to the same bytes.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit",
                           REASON_TOO_LARGE)
    if len(payload) < _HEADER.size:
        raise PayloadError(f"payload of {len(payload)} bytes is shorter than the {_HEADER.size}-byte header",
                           REASON_LENGTH)
    magic, version, dtype_code, windows, dim, head_version, device_len, site_len = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise PayloadError(f"invalid magic {magic!r}, expected {MAGIC!r}", REASON_MAGIC)
    if version != PROTOCOL_VERSION:
        raise PayloadError(f"unknown protocol version {version}, this build reads {PROTOCOL_VERSION}",
                           REASON_VERSION)
    if dtype_code != _DTYPE_FLOAT16:
        raise PayloadError(f"unknown dtype code {dtype_code}, expected {_DTYPE_FLOAT16} (float16)", REASON_DTYPE)
    if not 1 <= windows <= MAX_WINDOWS_PER_MESSAGE:
        raise PayloadError(f"{windows} windows, expected 1 to {MAX_WINDOWS_PER_MESSAGE}", REASON_WINDOWS)
    if not 1 <= dim <= MAX_DIM:
        raise PayloadError(f"embedding dim {dim}, expected 1 to {MAX_DIM}", REASON_DIM)

    expected = _HEADER.size + device_len + site_len + windows * (8 + 8 + 2 * dim)
    if len(payload) != expected:
        raise PayloadError(
            f"payload is {len(payload)} bytes, expected {expected} for {windows} windows of dim {dim}",
            REASON_LENGTH,
        )

    offset = _HEADER.size
    try:
        device = payload[offset:offset + device_len].decode()
        site = payload[offset + device_len:offset + device_len + site_len].decode()
        validate_id(device, "device id")
        validate_id(site, "site id")
    except (UnicodeDecodeError, TopicError) as error:
        raise PayloadError(f"invalid ids in header: {error}", REASON_IDS) from error
    offset += device_len + site_len

    sequence = np.frombuffer(payload, dtype="<u8", count=windows, offset=offset).astype(np.uint64)
    offset += 8 * windows
    start_time = np.frombuffer(payload, dtype="<f8", count=windows, offset=offset).astype(np.float64)
    offset += 8 * windows
    if not np.isfinite(start_time).all():
        raise PayloadError("start times contain NaN or infinite values", REASON_NOT_FINITE)
    vectors = np.frombuffer(payload, dtype="<f2", count=windows * dim, offset=offset)
    vectors = vectors.reshape(windows, dim).astype(np.float16)
    if not np.isfinite(vectors).all():
        raise PayloadError("embeddings contain NaN or infinite values", REASON_NOT_FINITE)

    return EmbeddingBatch(device, site, head_version, sequence, start_time, vectors)
