"""Home Assistant MQTT discovery for a recorder: the config messages and the state they read.

With discovery on, a recorder publishes, retained, one config message per
entity on ``<prefix>/<component>/dawnchorus_<device>/<object id>/config``
(Home Assistant's discovery topic layout, default prefix ``homeassistant``):

- ``sensor`` ``last_species``: common name of the last detection, with the
  scientific name, confidence, time, site and head version as attributes.
- ``sensor`` ``last_confidence``: its confidence, in percent.
- ``binary_sensor`` ``online``: ON while the recorder is connected.

The two sensors read the recorder's retained last-detection topic
(``topics.last_detection_topic``). The binary sensor reads the retained
status topic, whose ``state`` the broker sets to ``offline`` through the
recorder's last will. The sensors use the status topic for availability,
so they show as unavailable while the recorder is offline.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from typing import Any

from dawnchorus.protocol import topics
from dawnchorus.protocol.messages import Detection

DEFAULT_PREFIX = "homeassistant"
NODE_PREFIX = "dawnchorus_"
MANUFACTURER = "dawnchorus"
MODEL = "dawnchorus recorder"

# Home Assistant accepts only these characters in the node id and object id of a discovery topic.
_DISCOVERY_ID_INVALID = re.compile(r"[^A-Za-z0-9_-]")

# The status topic's state as Home Assistant's payloads. "finished" (replay
# done, still connected) counts as online.
_ONLINE_TEMPLATE = "{{ 'online' if value_json.state in ('online', 'finished') else 'offline' }}"
_ONLINE_BINARY_TEMPLATE = "{{ 'ON' if value_json.state in ('online', 'finished') else 'OFF' }}"


class DiscoveryError(ValueError):
    """An invalid discovery prefix: the message names it and the fix."""


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can be a discovery prefix (topic levels without wildcards), else raise."""
    if (not prefix or prefix.startswith("/") or prefix.endswith("/") or "//" in prefix
            or any(character in prefix for character in "+#\0")):
        raise DiscoveryError(f"invalid Home Assistant discovery prefix {prefix!r}: give the prefix set in Home "
                             f"Assistant's MQTT integration, {DEFAULT_PREFIX!r} unless it was changed, without "
                             "wildcards or a leading or trailing '/'")
    return prefix


def node_id(device: str) -> str:
    """Return the discovery topic's node id of a recorder: ``dawnchorus_`` and its id, '.' written as '_'.

    NOTE: recorders whose ids differ only in '.' against '_' (rec.1, rec_1)
    share a node id. Their unique ids still differ, so Home Assistant keeps
    their entities apart, but the broker ACL cannot tell their config topics apart.
    """
    return NODE_PREFIX + _DISCOVERY_ID_INVALID.sub("_", topics.validate_id(device, "device id"))


@dataclasses.dataclass(frozen=True)
class DiscoveryMessage:
    """One retained discovery config message: its topic and its JSON payload."""

    topic: str
    config: dict[str, Any]

    def encode(self) -> bytes:
        return json.dumps(self.config, separators=(",", ":")).encode()


def discovery_messages(prefix: str, site: str, device: str, software_version: str) -> list[DiscoveryMessage]:
    """Build the config messages of one recorder's three entities."""
    prefix = validate_prefix(prefix)
    node = node_id(device)
    status_topic = topics.device_topic(site, device, "status")
    state_topic = topics.last_detection_topic(site, device)
    device_block = {
        "identifiers": [f"dawnchorus_{device}"],
        "name": device,
        "manufacturer": MANUFACTURER,
        "model": MODEL,
        "sw_version": software_version,
        "suggested_area": site,
    }
    origin = {"name": "dawnchorus", "sw_version": software_version}
    availability = [{"topic": status_topic, "value_template": _ONLINE_TEMPLATE}]

    def config(component: str, object_id: str, entity: dict[str, Any]) -> DiscoveryMessage:
        body = {"unique_id": f"dawnchorus_{device}_{object_id}", **entity, "device": device_block,
                "origin": origin, "qos": 1}
        return DiscoveryMessage(f"{prefix}/{component}/{node}/{object_id}/config", body)

    return [
        config("sensor", "last_species", {
            "name": "Last species",
            "icon": "mdi:bird",
            "state_topic": state_topic,
            "value_template": "{{ value_json.common_name }}",
            "json_attributes_topic": state_topic,
            "availability": availability,
        }),
        config("sensor", "last_confidence", {
            "name": "Last confidence",
            "icon": "mdi:percent",
            "state_topic": state_topic,
            "value_template": "{{ (value_json.confidence * 100) | round(1) }}",
            "unit_of_measurement": "%",
            "state_class": "measurement",
            "availability": availability,
        }),
        config("binary_sensor", "online", {
            "name": "Online",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "state_topic": status_topic,
            "value_template": _ONLINE_BINARY_TEMPLATE,
            "payload_on": "ON",
            "payload_off": "OFF",
        }),
    ]


def encode_last_detection(detection: Detection) -> bytes:
    """Encode the retained last-detection state: the detection's fields, its names split, its start time in
    unix seconds (``time``) and as ISO 8601 UTC (``time_utc``)."""
    moment = datetime.datetime.fromtimestamp(detection.start_time, tz=datetime.timezone.utc)
    return json.dumps({
        "device": detection.device,
        "site": detection.site,
        "time": detection.start_time,
        "time_utc": moment.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "scientific_name": detection.scientific_name,
        "common_name": detection.common_name,
        "label": detection.label,
        "confidence": detection.confidence,
        "head_version": detection.head_version,
    }, separators=(",", ":"), allow_nan=False).encode()
