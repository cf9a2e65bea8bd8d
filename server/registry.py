"""Every head version of every site, kept on disk with its metadata and acks.

Layout under the base station's state directory:

    sites/<site>/heads/v<N>.tflite   the blob pushed to recorders
    sites/<site>/heads/v<N>.json     metadata: version, parent, site, classes,
                                     buffer size, pseudo-label statistics, time, sha256
    sites/<site>/heads/v<N>.npz      trainer state, to resume adaptation after a restart
    sites/<site>/manifests/v<N>.json the signed manifest first published for version N
    sites/<site>/published.json      the newest manifest published for the site: version,
                                     sequence number, rollback flag, retained blobs
    sites/<site>/publish.lock        flock(2) lock that the base station and the rollback
                                     command hold while they publish a manifest of the site
    sites/<site>/acks.json           {device: {"version": N, "time": t}} as acknowledged
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import threading
import time
from typing import Iterator

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


@dataclasses.dataclass
class Publication:
    """The newest manifest published for a site.

    Attributes:
        version: the head version it announced.
        sequence: its sequence number; the next manifest of the site gets a higher one.
        rollback: whether ``dawnchorus server rollback`` published it.
        time: unix time of publishing.
        retained_blobs: versions whose blobs are retained on the broker.
    """

    version: int
    sequence: int
    rollback: bool
    time: float
    retained_blobs: list[int] = dataclasses.field(default_factory=list)


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

    @contextlib.contextmanager
    def site_lock(self, site: str) -> Iterator[None]:
        """Hold the site's publish lock, which excludes other threads and processes.

        A publisher takes the sequence number, records the publication and
        sends the messages under this lock, so that the broker receives a
        site's manifests in the order of their sequence numbers.
        """
        directory = self.root / site
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "publish.lock", "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def publication(self, site: str) -> Publication | None:
        """Return the record of the newest manifest published for ``site``, or None if there was none."""
        path = self.root / site / "published.json"
        if not path.is_file():
            return None
        return Publication(**json.loads(path.read_text()))

    def next_sequence(self, site: str) -> int:
        """Return the sequence number for the site's next manifest. Call it under ``site_lock``.

        The number is one more than the last, but at least the current unix time
        in milliseconds. A base station whose registry was lost therefore still
        publishes numbers that its recorders accept, unless its clock runs behind.
        """
        last = self.publication(site)
        return max((last.sequence + 1) if last else 1, int(time.time() * 1000))

    def record_publication(self, site: str, publication: Publication) -> None:
        """Store ``publication`` as the site's newest. Call it under ``site_lock``, before publishing."""
        path = self.root / site / "published.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(dataclasses.asdict(publication), indent=1).encode())

    def store_manifest(self, site: str, version: int, payload: bytes) -> None:
        """Keep the signed manifest of a version, from which a rollback to it is built."""
        directory = self.root / site / "manifests"
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / f"v{version}.json", payload)

    def store_published_manifest(self, site: str, payload: bytes) -> None:
        """Keep the signed manifest last published for ``site``, rollbacks included, to publish it again."""
        _write_atomic(self.root / site / "published-manifest.json", payload)

    def published_manifest(self, site: str) -> bytes | None:
        """Return the signed manifest last published for ``site``, or None if this registry never stored one."""
        path = self.root / site / "published-manifest.json"
        return path.read_bytes() if path.is_file() else None

    def manifest(self, site: str, version: int) -> bytes:
        """Return the stored manifest of a version. Raises FileNotFoundError if it was never published."""
        return (self.root / site / "manifests" / f"v{version}.json").read_bytes()

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
