"""Over-the-air heads on a recorder: verification and the on-disk store.

A head is accepted only if its blob matches the manifest's sha256 and size
and loads in a fresh LiteRT interpreter. It must also reproduce the base
station's outputs on the manifest's probe windows and give finite scores of
the right shape on the recorder's own reference batch. The store keeps the
running head and the one before it. Every write goes to a temporary file
that is renamed into place, so a recorder killed mid-write restarts on a
complete head.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib

import numpy as np

from dawnchorus.models.head import TFLiteHead
from dawnchorus.protocol.embeddings import PayloadError
from dawnchorus.protocol.messages import Manifest

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


def verify_head(
    manifest: Manifest,
    blob: bytes,
    site: str,
    running_version: int,
    reference_embeddings: np.ndarray | None,
) -> TFLiteHead:
    """Check a pushed head and return it loaded in a new interpreter.

    Args:
        manifest: the retained manifest the blob belongs to.
        blob: the TFLite bytes as received.
        site: this recorder's site id.
        running_version: version the recorder runs now (0: source head).
        reference_embeddings: [n, 1024] float32, recent windows of this recorder, or None.

    Raises:
        HeadRejected: with the check that failed.
    """
    if manifest.site != site:
        raise HeadRejected(f"manifest is for site {manifest.site!r}, this recorder is in {site!r}")
    if manifest.version <= running_version:
        raise HeadRejected(f"version {manifest.version} is not newer than the running version {running_version}")
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


class HeadStore:
    """The running head and the previous one, as ``<slot>.tflite`` + ``<slot>.json``.

    Slots: ``current`` and ``previous``. A slot is complete only when its JSON
    (the manifest) exists and the blob matches the manifest's sha256; the JSON
    is written last, so a crash between the two leaves an incomplete slot that
    loading skips.
    """

    SLOTS = ("current", "previous")

    def __init__(self, directory: pathlib.Path):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _paths(self, slot: str) -> tuple[pathlib.Path, pathlib.Path]:
        return self.directory / f"{slot}.tflite", self.directory / f"{slot}.json"

    def install(self, manifest: Manifest, blob: bytes) -> None:
        """Make ``blob`` the current head and keep the old current one as previous."""
        current_blob, current_json = self._paths("current")
        previous_blob, previous_json = self._paths("previous")
        staged_blob = self.directory / "staged.tflite"
        staged_json = self.directory / "staged.json"
        _write_atomic(staged_blob, blob)
        _write_atomic(staged_json, manifest.encode())

        if current_json.exists() and current_blob.exists():
            previous_json.unlink(missing_ok=True)
            os.replace(current_blob, previous_blob)
            os.replace(current_json, previous_json)
        os.replace(staged_blob, current_blob)
        os.replace(staged_json, current_json)
        _fsync_dir(self.directory)

    def load(self, slot: str) -> tuple[Manifest, bytes] | None:
        """Return the slot's manifest and blob if both are present and consistent."""
        blob_path, json_path = self._paths(slot)
        if not (blob_path.is_file() and json_path.is_file()):
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

    def load_last_good(self, site: str) -> InstalledHead | None:
        """Load the newest complete head of ``site``: current, else previous, else None."""
        for slot in self.SLOTS:
            stored = self.load(slot)
            if stored is None:
                continue
            manifest, blob = stored
            if manifest.site != site:
                _LOGGER.warning("head store %s: %s head is for site %s, not %s; ignored",
                                self.directory, slot, manifest.site, site)
                continue
            try:
                runner = verify_head(manifest, blob, site, running_version=0, reference_embeddings=None)
            except HeadRejected as error:
                _LOGGER.error("head store %s: %s head v%d rejected: %s", self.directory, slot, manifest.version, error)
                continue
            _LOGGER.info("restored head v%d of site %s from the %s slot", manifest.version, site, slot)
            return InstalledHead(manifest, runner)
        return None

