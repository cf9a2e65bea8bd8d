"""Over-the-air heads on a recorder: verification and the on-disk store.

A head is accepted only if its manifest carries a valid signature by the
base station's key, names this recorder's site and class list, and is newer
than the installed head (or is a signed rollback). Its blob must then match
the manifest's sha256 and size and load in a fresh LiteRT interpreter. It
must also reproduce the base station's outputs on the manifest's probe
windows and give finite scores of the right shape on the recorder's own
reference batch. The store keeps the running head and the one before it, and
switches between them by renaming one index file, so a recorder killed at any
moment restarts on a complete head.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dawnchorus.models.head import TFLiteHead
from dawnchorus.protocol.embeddings import PayloadError
from dawnchorus.protocol.messages import Manifest
from dawnchorus.protocol.signing import SignatureError, verify_manifest

_LOGGER = logging.getLogger(__name__)

# The base station computes the probe logits with the same blob on LiteRT, so a
# correct copy reproduces them to float32 rounding (about 1e-5); 1e-3 absolute
# plus 1e-3 relative leaves room for a different CPU's kernels.
PROBE_ATOL = 1e-3
PROBE_RTOL = 1e-3


class HeadRejected(Exception):
    """A pushed head failed verification. The message names the failed check and the reason."""


@dataclasses.dataclass
class InstalledHead:
    """A verified head and its manifest."""

    manifest: Manifest
    runner: TFLiteHead


def check_manifest_origin(
    manifest: Manifest, public_key: Ed25519PublicKey | None, site: str, labels: Sequence[str] | None,
) -> None:
    """Raise HeadRejected unless the manifest is signed by ``public_key`` and made for this recorder.

    The signature is checked first, so that no other field of an unsigned or
    altered manifest is trusted.
    """
    if public_key is None:
        raise HeadRejected("no head public key is configured (--head-public-key), so this recorder "
                           "rejects every pushed head")
    try:
        verify_manifest(manifest, public_key)
    except SignatureError as error:
        raise HeadRejected(str(error)) from error

    if manifest.site != site:
        raise HeadRejected(f"manifest is for site {manifest.site!r}, this recorder is in {site!r}")
    # The order may differ: the recorder maps outputs to classes with the manifest's labels.
    if labels is not None and (len(manifest.labels) != len(labels) or set(manifest.labels) != set(labels)):
        details = [f"{len(manifest.labels)} classes against this recorder's {len(labels)}"]
        added = sorted(set(manifest.labels) - set(labels))
        missing = sorted(set(labels) - set(manifest.labels))
        if added:
            details.append(f"{len(added)} not in its list, such as {added[0]!r}")
        if missing:
            details.append(f"{len(missing)} missing, such as {missing[0]!r}")
        raise HeadRejected(f"head has another class list: {', '.join(details)}")


def check_manifest(
    manifest: Manifest,
    public_key: Ed25519PublicKey | None,
    site: str,
    labels: Sequence[str] | None,
    installed_version: int,
    installed_sequence: int,
) -> None:
    """Raise HeadRejected unless the manifest may replace the installed head.

    The checks run in this order: signature, site, class list (see
    ``check_manifest_origin``), then sequence number and version.

    Args:
        manifest: the manifest as received.
        public_key: the base station's public key from provisioning. With None,
            every manifest is rejected.
        site: this recorder's site id.
        labels: the class list that every head of this recorder must have, or
            None while no list is fixed yet.
        installed_version: version of the installed head (0: the source head).
        installed_sequence: the highest manifest sequence number installed so
            far (0: none). Only a higher one can be installed, so a replayed
            manifest, rollbacks included, is rejected.
    """
    check_manifest_origin(manifest, public_key, site, labels)
    if manifest.sequence <= installed_sequence:
        raise HeadRejected(f"sequence number {manifest.sequence} is not newer than {installed_sequence}, "
                           f"the newest installed (replay)")
    if not manifest.rollback and manifest.version <= installed_version:
        raise HeadRejected(f"version {manifest.version} is not newer than the running version "
                           f"{installed_version} (replay), and the manifest is not a rollback")


def verify_head(manifest: Manifest, blob: bytes, reference_embeddings: np.ndarray | None) -> TFLiteHead:
    """Check a pushed head's blob against its manifest and return it loaded in a new interpreter.

    Args:
        manifest: the manifest the blob belongs to, already checked with ``check_manifest``.
        blob: the TFLite bytes as received.
        reference_embeddings: [n, 1024] float32, recent windows of this recorder, or None.

    Raises:
        HeadRejected: with the check that failed.
    """
    if len(blob) != manifest.size:
        raise HeadRejected(f"blob is {len(blob)} bytes but the manifest gives {manifest.size}: truncated or invalid")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest.sha256:
        raise HeadRejected(f"blob sha256 {digest[:16]}... does not match manifest {manifest.sha256[:16]}...")

    try:
        runner = TFLiteHead(blob, manifest.labels, manifest.version)
    except (ValueError, RuntimeError) as error:
        raise HeadRejected(f"blob does not load as a head: {error}") from error

    probe = runner.logits(manifest.probe_embeddings)
    if not np.allclose(probe, manifest.probe_logits, atol=PROBE_ATOL, rtol=PROBE_RTOL):
        worst = float(np.max(np.abs(probe - manifest.probe_logits)))
        raise HeadRejected(f"probe logits differ from the base station's by up to {worst:.3g}")

    if reference_embeddings is not None and len(reference_embeddings):
        reference = runner.logits(reference_embeddings)
        if reference.shape != (len(reference_embeddings), len(manifest.labels)):
            raise HeadRejected(f"reference batch gave logits of shape {reference.shape}")
        if not np.isfinite(reference).all():
            raise HeadRejected("reference batch gave NaN or infinite logits")
    return runner


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, path)


def _fsync_dir(directory: pathlib.Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclasses.dataclass
class _StoreIndex:
    """Contents of installed.json: entry ids of the two heads, and the newest sequence number installed."""

    current: str | None = None
    previous: str | None = None
    last_sequence: int = 0


class HeadStore:
    """The installed head, the one before it, and the newest manifest sequence number installed.

    Layout of the directory:

        <id>.tflite, <id>.json   a head's blob and its signed manifest; <id> is the first
                                 16 hex digits of the sha256 of the manifest file
        installed.json           {"current": id, "previous": id or null, "last_sequence": n}

    ``install`` writes and syncs a head's files before it renames a new
    installed.json into place. A process killed at any moment therefore leaves
    the old or the new index, and each names complete files. Files with the
    store's suffixes that the index does not name are deleted after an install
    and when the store opens.
    """

    SLOTS = ("current", "previous")
    INDEX = "installed.json"
    _OWNED_SUFFIXES = (".tflite", ".json", ".partial")

    def __init__(self, directory: pathlib.Path):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._index = self._read_index()
        removed = self._remove_unreferenced()
        if removed:
            _LOGGER.info("head store %s: removed %d files that installed.json does not name (an interrupted "
                         "install or an older layout)", self.directory, removed)

    @property
    def last_sequence(self) -> int:
        """The highest manifest sequence number installed; a later head must have a higher one."""
        return self._index.last_sequence

    def _read_index(self) -> _StoreIndex:
        path = self.directory / self.INDEX
        if not path.is_file():
            return _StoreIndex()
        try:
            record = json.loads(path.read_bytes())
            return _StoreIndex(current=record.get("current"), previous=record.get("previous"),
                               last_sequence=int(record.get("last_sequence", 0)))
        except (ValueError, TypeError, AttributeError) as error:
            _LOGGER.error("head store %s: %s is invalid (%s); starting without a stored head",
                          self.directory, self.INDEX, error)
            return _StoreIndex()

    def _paths(self, entry: str) -> tuple[pathlib.Path, pathlib.Path]:
        return self.directory / f"{entry}.tflite", self.directory / f"{entry}.json"

    def _remove_unreferenced(self) -> int:
        keep = {self.INDEX} | {
            path.name for entry in (self._index.current, self._index.previous) if entry
            for path in self._paths(entry)
        }
        removed = 0
        for path in self.directory.iterdir():
            if path.name in keep or not path.is_file() or path.suffix not in self._OWNED_SUFFIXES:
                continue
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def install(self, manifest: Manifest, blob: bytes) -> None:
        """Make ``blob`` the current head and keep the old current one as previous.

        After a rollback no previous head is kept, so that a damaged current
        head never falls back to the head that the rollback replaced.
        """
        payload = manifest.encode()
        entry = hashlib.sha256(payload).hexdigest()[:16]
        blob_path, json_path = self._paths(entry)
        _write_atomic(blob_path, blob)
        _write_atomic(json_path, payload)
        _fsync_dir(self.directory)

        old = self._index
        previous = None if manifest.rollback else old.current
        if previous == entry:
            previous = old.previous
        index = _StoreIndex(current=entry, previous=previous,
                            last_sequence=max(old.last_sequence, manifest.sequence))
        _write_atomic(self.directory / self.INDEX, json.dumps(dataclasses.asdict(index)).encode())
        _fsync_dir(self.directory)
        self._index = index
        self._remove_unreferenced()

    def load(self, slot: str) -> tuple[Manifest, bytes] | None:
        """Return the slot's manifest and blob if both are present and consistent."""
        entry = getattr(self._index, slot)
        if not entry:
            return None
        blob_path, json_path = self._paths(entry)
        if not (blob_path.is_file() and json_path.is_file()):
            _LOGGER.error("head store %s: the %s head's files %s.* are missing", self.directory, slot, entry)
            return None
        try:
            manifest = Manifest.decode(json_path.read_bytes())
        except PayloadError as error:
            _LOGGER.error("head store %s: %s manifest is invalid: %s", self.directory, slot, error)
            return None
        blob = blob_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != manifest.sha256:
            _LOGGER.error("head store %s: %s blob does not match its manifest", self.directory, slot)
            return None
        return manifest, blob

    def load_last_good(
        self, site: str, public_key: Ed25519PublicKey | None, labels: Sequence[str] | None,
    ) -> InstalledHead | None:
        """Load the newest complete head of ``site``: current, else previous, else None.

        A stored head must pass the same checks as a pushed one, except for the
        sequence number and version: a valid signature by ``public_key``, this
        site, the class list ``labels`` (unless None), and the blob checks.
        """
        for slot in self.SLOTS:
            stored = self.load(slot)
            if stored is None:
                continue
            manifest, blob = stored
            try:
                check_manifest_origin(manifest, public_key, site, labels)
                runner = verify_head(manifest, blob, reference_embeddings=None)
            except HeadRejected as error:
                _LOGGER.error("head store %s: %s head v%d of site %s not loaded: %s", self.directory, slot,
                              manifest.version, manifest.site, error)
                continue
            _LOGGER.info("restored head v%d of site %s from the %s slot", manifest.version, site, slot)
            return InstalledHead(manifest, runner)
        return None
