"""Every head version of every site, kept on disk with its metadata and acks.

Layout under the base station's state directory:

    sites/<site>/heads/v<N>.tflite   the blob pushed to recorders
    sites/<site>/heads/v<N>.json     metadata: version, parent, site, classes,
                                     buffer size, pseudo-label statistics, time, sha256
    sites/<site>/heads/v<N>.npz      trainer state, to resume adaptation after a restart
    sites/<site>/acks.json           {device: {"version": N, "time": t}} as acknowledged
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import threading
import time

import numpy as np

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass
class HeadRecord:
    """Metadata of one head version.

    Attributes:
        site: site id.
        version: 1, 2, ... per site.
        parent: the version it was adapted from; 0 is the source head.
        labels: the K classes, in output order.
        precision: "fp32" or "fp16".
        buffer_size: embeddings in the buffer when the round ran.
        stats: pseudo-label and collapse-guard statistics of the round.
        created: unix time.
        sha256: hex digest of the blob.
        size: blob size in bytes.
    """

    site: str
    version: int
    parent: int
    labels: list[str]
    precision: str
    buffer_size: int
    stats: dict[str, float]
    created: float
    sha256: str
    size: int


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, path)


class HeadRegistry:
    """On-disk registry of head versions and acknowledgements, for all sites."""

    def __init__(self, state_dir: pathlib.Path):
        self.root = pathlib.Path(state_dir) / "sites"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _heads_dir(self, site: str) -> pathlib.Path:
        return self.root / site / "heads"

    def versions(self, site: str) -> list[int]:
        directory = self._heads_dir(site)
        if not directory.is_dir():
            return []
        found = []
        for path in directory.glob("v*.json"):
            try:
                found.append(int(path.stem[1:]))
            except ValueError:
                continue
        return sorted(found)

    def latest_version(self, site: str) -> int:
        versions = self.versions(site)
        return versions[-1] if versions else 0

    def add(
        self,
        site: str,
        parent: int,
        labels: list[str],
        precision: str,
        blob: bytes,
        buffer_size: int,
        stats: dict[str, float],
        trainer_state: dict[str, np.ndarray] | None = None,
    ) -> HeadRecord:
        """Store a new head as the next version of ``site`` and return its record."""
        with self._lock:
            version = self.latest_version(site) + 1
            record = HeadRecord(
                site=site, version=version, parent=parent, labels=list(labels), precision=precision,
                buffer_size=buffer_size, stats=dict(stats), created=time.time(),
                sha256=hashlib.sha256(blob).hexdigest(), size=len(blob),
            )
            directory = self._heads_dir(site)
            directory.mkdir(parents=True, exist_ok=True)
            _write_atomic(directory / f"v{version}.tflite", blob)
            if trainer_state is not None:
                partial = directory / f"v{version}.partial.npz"
                np.savez(partial, **trainer_state)
                os.replace(partial, directory / f"v{version}.npz")
            # The JSON is written last: a version exists once its metadata does.
            _write_atomic(directory / f"v{version}.json",
                          json.dumps(dataclasses.asdict(record), indent=1).encode())
        _LOGGER.info("registry: site %s head v%d stored (parent v%d, %d classes, %s, %d bytes)",
                     site, version, parent, len(labels), precision, len(blob))
        return record

    def record(self, site: str, version: int) -> HeadRecord:
        data = json.loads((self._heads_dir(site) / f"v{version}.json").read_text())
        return HeadRecord(**data)

    def blob(self, site: str, version: int) -> bytes:
        return (self._heads_dir(site) / f"v{version}.tflite").read_bytes()

    def trainer_state(self, site: str, version: int) -> dict[str, np.ndarray] | None:
        path = self._heads_dir(site) / f"v{version}.npz"
        if not path.is_file():
            return None
        with np.load(path) as state:
            return {name: state[name] for name in state.files}

    def record_ack(self, site: str, device: str, version: int) -> None:
        with self._lock:
            path = self.root / site / "acks.json"
            acks = json.loads(path.read_text()) if path.is_file() else {}
            acks[device] = {"version": version, "time": time.time()}
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, json.dumps(acks, indent=1, sort_keys=True).encode())

    def acks(self, site: str) -> dict[str, int]:
        path = self.root / site / "acks.json"
        if not path.is_file():
            return {}
        return {device: int(entry["version"]) for device, entry in json.loads(path.read_text()).items()}

    def sites(self) -> list[str]:
        return sorted(path.name for path in self.root.iterdir() if path.is_dir())
