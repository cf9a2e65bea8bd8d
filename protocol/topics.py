"""MQTT topics shared by recorders and base stations.

Layout, with ``dawnchorus/v1`` as the root:

    <root>/<site>/<device>/embeddings   binary embedding batches, QoS 1
    <root>/<site>/<device>/detections   JSON detections, QoS 1
    <root>/<site>/<device>/status       JSON status, retained; the last will sets "offline"
    <root>/<site>/<device>/ack          JSON: the head version a recorder runs, or why it rejected one
    <root>/<site>/<device>/receipt      JSON from the base station: sequence numbers it has committed, retained
    <root>/<site>/<device>/last_detection  JSON, retained: the recorder's last detection, for Home Assistant
    <root>/<site>/model/manifest        JSON head manifest, retained
    <root>/<site>/model/blob/<version>  the TFLite head, retained while it may be needed
    <root>/_station/<station>/stats     JSON counters of one base-station process, retained

The site id comes first so that a broker ACL can give a recorder exactly its
own site's model topics and its own device's data topics.
"""

from __future__ import annotations

import dataclasses
import re

ROOT = "dawnchorus/v1"
MODEL_SEGMENT = "model"
# Ids cannot start with '_', so no site can take this topic level.
STATION_SEGMENT = "_station"

# What recorders publish under their own device id.
DEVICE_KINDS = ("embeddings", "detections", "status", "ack")
# What the base station publishes to one recorder. Not in DEVICE_KINDS: the
# station does not subscribe to it, and a recorder only reads it.
RECEIPT_KIND = "receipt"
# Written by a recorder with Home Assistant discovery on, for dashboards; the base station does not read it.
LAST_DETECTION_KIND = "last_detection"

# Ids become topic levels and file names: no MQTT wildcards or separators,
# nothing that a shell or a file system would interpret.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TopicError(ValueError):
    """A topic or id that does not follow the dawnchorus layout."""


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid site or device id, else raise TopicError."""
    if not isinstance(value, str) or not _ID_PATTERN.match(value) or value == MODEL_SEGMENT:
        raise TopicError(
            f"invalid {what} {value!r}: use 1 to 64 letters, digits, '_', '.' or '-', "
            f"starting with a letter or digit (and not {MODEL_SEGMENT!r})"
        )
    return value


def device_topic(site: str, device: str, kind: str) -> str:
    """Return the topic of one recorder's ``kind`` messages."""
    if kind not in DEVICE_KINDS:
        raise TopicError(f"unknown device topic kind {kind!r}, expected one of {DEVICE_KINDS}")
    return f"{ROOT}/{validate_id(site, 'site id')}/{validate_id(device, 'device id')}/{kind}"


def receipt_topic(site: str, device: str) -> str:
    """Return the topic on which the base station confirms what it committed of ``device``'s embeddings."""
    return f"{ROOT}/{validate_id(site, 'site id')}/{validate_id(device, 'device id')}/{RECEIPT_KIND}"


def device_wildcard(kind: str, site: str = "+") -> str:
    """Return the subscription for ``kind`` messages of every recorder (of one site, or all)."""
    if kind not in DEVICE_KINDS:
        raise TopicError(f"unknown device topic kind {kind!r}, expected one of {DEVICE_KINDS}")
    return f"{ROOT}/{site}/+/{kind}"


def last_detection_topic(site: str, device: str) -> str:
    """Return the retained topic of a recorder's last detection (Home Assistant's sensors read it)."""
    return f"{ROOT}/{validate_id(site, 'site id')}/{validate_id(device, 'device id')}/{LAST_DETECTION_KIND}"


def manifest_topic(site: str) -> str:
    return f"{ROOT}/{validate_id(site, 'site id')}/{MODEL_SEGMENT}/manifest"


def manifest_wildcard() -> str:
    return f"{ROOT}/+/{MODEL_SEGMENT}/manifest"


def blob_topic(site: str, version: int) -> str:
    if not isinstance(version, int) or version < 1:
        raise TopicError(f"invalid head version {version!r}: pushed heads start at version 1")
    return f"{ROOT}/{validate_id(site, 'site id')}/{MODEL_SEGMENT}/blob/{version}"


def station_stats_topic(station: str) -> str:
    """Return the topic of a base-station process's retained stats; ``station`` is its MQTT client id."""
    return f"{ROOT}/{STATION_SEGMENT}/{validate_id(station, 'station id')}/stats"


def station_stats_wildcard() -> str:
    return f"{ROOT}/{STATION_SEGMENT}/+/stats"


@dataclasses.dataclass(frozen=True)
class DeviceTopic:
    """A parsed recorder topic."""

    site: str
    device: str
    kind: str


def parse_device_topic(topic: str) -> DeviceTopic:
    """Parse ``<root>/<site>/<device>/<kind>``, raising TopicError for anything else."""
    prefix = ROOT + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"topic {topic!r} is not under {ROOT!r}")
    parts = topic[len(prefix):].split("/")
    if len(parts) != 3 or parts[2] not in DEVICE_KINDS:
        raise TopicError(f"topic {topic!r} is not <site>/<device>/<kind> under {ROOT!r}")
    site, device, kind = parts
    return DeviceTopic(validate_id(site, "site id"), validate_id(device, "device id"), kind)
