"""Signing and publishing head manifests, for the base station and for rollbacks.

Every manifest of a site gets a sequence number higher than all before it,
is signed with the base station's Ed25519 key and is published retained
beside its blob. A rollback republishes a stored version under a new
sequence number with ``rollback`` set. Recorders accept it although its
version is older than the one they run. A replay of any earlier manifest,
rollbacks included, carries a sequence number that they have passed, so
they reject it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dawnchorus.protocol import topics
from dawnchorus.protocol.embeddings import PayloadError
from dawnchorus.protocol.messages import Manifest
from dawnchorus.protocol.signing import key_id, sign_manifest
from dawnchorus.server.registry import HeadRegistry, Publication

_LOGGER = logging.getLogger(__name__)

# Seconds to wait for the broker's PUBACK of a manifest or blob. The site lock
# is held meanwhile, so that the broker receives a site's manifests in order.
PUBLISH_TIMEOUT_S = 10.0


class HeadPublisher:
    """Signs a site's manifests and publishes them with their blobs, in the order of their sequence numbers."""

    def __init__(self, client: mqtt.Client, registry: HeadRegistry, signing_key: Ed25519PrivateKey):
        self._client = client
        self._registry = registry
        self._signing_key = signing_key
        self.key_id = key_id(signing_key.public_key())

    def publish(self, manifest: Manifest, blob: bytes) -> tuple[Manifest, bool]:
        """Number, sign, record and publish ``manifest`` with its blob.

        The caller must hold ``registry.site_lock(manifest.site)``. The
        publication is recorded before anything is sent, so that a crash never
        lets two manifests share a sequence number. Returns the signed manifest
        and whether the broker confirmed both messages in time. Without a
        confirmation, paho still sends them once it is connected.
        """
        site = manifest.site
        last = self._registry.publication(site)
        numbered = dataclasses.replace(manifest, sequence=self._registry.next_sequence(site), signature=None)
        signed = sign_manifest(numbered, self._signing_key)
        payload = signed.encode()
        if not signed.rollback:
            self._registry.store_manifest(site, signed.version, payload)

        # The previous head's blob stays retained for recorders that are still
        # fetching it, except after a rollback, which replaces a head on purpose.
        keep = [signed.version] if signed.rollback or last is None else [last.version, signed.version]
        keep = list(dict.fromkeys(keep))
        stale = [version for version in (last.retained_blobs if last else []) if version not in keep]
        self._registry.record_publication(site, Publication(
            version=signed.version, sequence=signed.sequence, rollback=signed.rollback, time=time.time(),
            retained_blobs=keep,
        ))
        self._registry.store_published_manifest(site, payload)

        confirmed = self._send(signed.blob_topic, blob)
        confirmed = self._send(topics.manifest_topic(site), payload) and confirmed
        for version in stale:
            self._send(topics.blob_topic(site, version), b"")
        return signed, confirmed

    def republish(self, site: str) -> Manifest | None:
        """Publish the site's newest manifest and its retained blobs again, unchanged.

        A broker that crashed restarts with the retained messages of its last
        save, which can be an older manifest than the newest, or none. Recorders
        ignore a manifest whose sequence number they know, so publishing the
        same signed manifest again restores the broker's state and changes
        nothing for them. The caller must hold ``registry.site_lock(site)``.

        Returns:
            The manifest published again, or None if the site has none stored.
        """
        publication = self._registry.publication(site)
        if publication is None:
            return None
        payload = self._registry.published_manifest(site)
        if payload is None and not publication.rollback:
            # Registries written before published manifests were stored keep each version's manifest.
            try:
                payload = self._registry.manifest(site, publication.version)
            except FileNotFoundError:
                payload = None
        try:
            manifest = Manifest.decode(payload) if payload is not None else None
        except PayloadError as error:
            _LOGGER.warning("site %s: the stored manifest of v%d is invalid (%s); not published again", site,
                            publication.version, error)
            return None
        if manifest is None or manifest.sequence != publication.sequence:
            _LOGGER.warning("site %s: no stored manifest matches the newest publication (v%d, sequence %d); it "
                            "is not published again", site, publication.version, publication.sequence)
            return None
        for version in publication.retained_blobs:
            self._send(topics.blob_topic(site, version), self._registry.blob(site, version))
        self._send(topics.manifest_topic(site), payload)
        return manifest

    def _send(self, topic: str, payload: bytes) -> bool:
        info = self._client.publish(topic, payload, qos=1, retain=True)
        try:
            info.wait_for_publish(PUBLISH_TIMEOUT_S)
        except (RuntimeError, ValueError) as error:
            _LOGGER.warning("publish to %s not sent now (%s); paho retries once connected", topic, error)
            return False
        if not info.is_published():
            _LOGGER.warning("publish to %s not confirmed by the broker within %.0f s", topic, PUBLISH_TIMEOUT_S)
            return False
        return True


def stored_versions(registry: HeadRegistry, site: str) -> list[int]:
    """Return the versions of ``site`` that were published and can be rolled back to."""
    published = []
    for version in registry.versions(site):
        try:
            registry.manifest(site, version)
        except FileNotFoundError:
            continue
        published.append(version)
    return published


def load_rollback(registry: HeadRegistry, site: str, version: int) -> tuple[Manifest, bytes]:
    """Build the unsigned rollback manifest of a stored head and return it with the blob.

    Raises:
        ValueError: the site or version is not in the registry, or its files are damaged.
    """
    available = stored_versions(registry, site)
    if not available:
        sites = ", ".join(registry.sites()) or "none"
        raise ValueError(f"site {site!r} has no published heads in the registry {registry.root} "
                         f"(sites there: {sites}): check --state-dir and the site id")
    if version not in available:
        raise ValueError(f"site {site} has no published head v{version}: roll back to one of "
                         f"{', '.join(f'v{v}' for v in available)}")

    try:
        original = Manifest.decode(registry.manifest(site, version))
    except PayloadError as error:
        raise ValueError(f"the stored manifest of {site} v{version} is invalid: {error}") from error
    blob = registry.blob(site, version)
    if hashlib.sha256(blob).hexdigest() != original.sha256:
        raise ValueError(f"the stored blob of {site} v{version} does not match its manifest's sha256: "
                         "the registry is damaged, so roll back to another version")
    return dataclasses.replace(original, created=time.time(), rollback=True, signature=None), blob


def publish_rollback(publisher: HeadPublisher, registry: HeadRegistry, rollback: Manifest,
                     blob: bytes) -> tuple[Manifest, bool]:
    """Sign and publish a manifest from ``load_rollback``. Returns it signed, and whether the broker confirmed it."""
    site = rollback.site
    with registry.site_lock(site):
        last = registry.publication(site)
        if last is not None and last.version == rollback.version:
            _LOGGER.warning("site %s: v%d is already the published head; publishing it again as a rollback",
                            site, rollback.version)
        signed, confirmed = publisher.publish(rollback, blob)
    _LOGGER.info("site %s: published rollback to head v%d (sequence %d, signed with key %s)", site,
                 signed.version, signed.sequence, publisher.key_id)
    return signed, confirmed
