"""The recorder unit: audio in, embeddings and detections out over MQTT, heads in.

One thread runs the audio source and the inference pipeline and queues
what it produces in the outbox, a queue on disk that the uplink drains
whenever the broker is reachable (see outbox.py and uplink.py). paho's
network thread receives manifests and blobs, verifies them and hands a
verified head to the pipeline, which swaps it in between batches. The
recorder acknowledges a version once windows are being scored with it (or
at once when it is idle).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pathlib
import sqlite3
import threading
import time
from typing import Iterable

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dawnchorus.edge.audio import Window
from dawnchorus.edge.native_heap import release_free_memory
from dawnchorus.edge.backoff import Backoff
from dawnchorus.edge.outbox import DEFAULT_MAX_BYTES, Outbox, OutboxEntry
from dawnchorus.edge.ota import HeadRejected, HeadStore, check_manifest, verify_head
from dawnchorus.edge.pipeline import InferencePipeline, ScoredBatch
from dawnchorus.edge.uplink import DEFAULT_RECEIPT_TIMEOUT_S, Uplink
from dawnchorus.models.backbone import Backbone
from dawnchorus.models.head import HeadRunner, LinearHead, sigmoid
from dawnchorus import __version__
from dawnchorus.models.species import threshold_vector
from dawnchorus.protocol import home_assistant, topics
from dawnchorus.protocol.embeddings import (REASON_IDS, REASON_LENGTH, EmbeddingBatch, PayloadError,
                                            encode_embeddings)
from dawnchorus.protocol.messages import (Ack, Detection, Manifest, Receipt, Status, decode_detections,
                                          encode_detections)
from dawnchorus.protocol.rejections import RejectionCounter
from dawnchorus.protocol.signing import key_id
from dawnchorus.protocol.tls import TlsSettings

_LOGGER = logging.getLogger(__name__)

# Windows kept as the reference batch on which every pushed head must give
# finite scores of the right shape before it is swapped in.
REFERENCE_WINDOWS = 32


@dataclasses.dataclass
class RecorderConfig:
    """Settings of one recorder unit.

    Attributes:
        device: recorder id, unique in the fleet.
        site: site id; recorders of a site share one adapted head.
        broker_host, broker_port: the MQTT broker.
        username, password: MQTT credentials, or None for an anonymous connection.
        tls: CA, client certificate and key for a TLS connection, or None for plain MQTT.
        state_dir: sequence counter, reference batch and head store live here.
        min_conf: detection threshold on sigmoid scores, 0 to 1.
        sensitivity: BirdNET sigmoid sensitivity, 0.5 to 1.5.
        species_thresholds: detection thresholds that replace ``min_conf`` for
            some classes, keyed by model label, each in (0, 1].
        windows_per_message: embeddings per MQTT message; a partial message is
            sent when the source pauses or ends.
        status_interval_s: seconds between retained status updates.
        keepalive_s: MQTT keepalive; the broker publishes the last will after 1.5 times this.
        head_public_key: the base station's Ed25519 public key, given at provisioning.
            Pushed and stored heads must carry a valid signature by it. With None,
            the recorder runs the source head and rejects every pushed head.
        head_labels: the class list that every head must have, normally the site's
            species list. With None, the first head that the recorder installs or
            restores fixes the list.
        queue_max_bytes, queue_max_entries: quota of the outbox, the queue of
            embeddings and detections not yet acknowledged by the broker; None
            is no limit. Past it, the oldest unsent messages are dropped.
        reconnect_min_delay_s, reconnect_max_delay_s: the reconnect backoff. The
            delay before the n-th attempt in a row is drawn uniformly from
            [0, min(max, min * 2**n)].
        drain_timeout_s: after a replay ends, seconds to wait for the outbox to
            empty before exiting; what is left is sent after the next start.
        await_receipts: keep each embeddings message queued until the base
            station's receipt confirms it, not only until the broker's PUBACK,
            so that a broker crash loses nothing. Turn it off only for a
            recorder whose embeddings no dawnchorus base station receives.
        receipt_timeout_s: seconds without a confirming receipt, while
            messages wait for one, before the oldest is sent again as a probe.
        clock_offset_s: seconds added to every timestamp the recorder sends
            (window start times, detections, status, acks), for a recorder whose
            clock is known to be off. Sequence numbers are not affected.
        home_assistant_prefix: Home Assistant's MQTT discovery prefix, normally
            "homeassistant", to publish discovery configs and the retained last
            detection (protocol/home_assistant.py); None turns this off.
    """

    device: str
    site: str
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    tls: TlsSettings | None = None
    state_dir: pathlib.Path = pathlib.Path("state")
    min_conf: float = 0.7
    sensitivity: float = 1.0
    species_thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    windows_per_message: int = 16
    status_interval_s: float = 30.0
    keepalive_s: int = 30
    head_public_key: Ed25519PublicKey | None = None
    head_labels: list[str] | None = None
    queue_max_bytes: int | None = DEFAULT_MAX_BYTES
    queue_max_entries: int | None = None
    reconnect_min_delay_s: float = 1.0
    reconnect_max_delay_s: float = 60.0
    drain_timeout_s: float = 60.0
    await_receipts: bool = True
    receipt_timeout_s: float = DEFAULT_RECEIPT_TIMEOUT_S
    clock_offset_s: float = 0.0
    home_assistant_prefix: str | None = None

    def __post_init__(self):
        topics.validate_id(self.device, "device id")
        topics.validate_id(self.site, "site id")
        if not 0.0 < self.min_conf <= 1.0:
            raise ValueError(f"min_conf {self.min_conf} must be in (0, 1]")
        if not 0.5 <= self.sensitivity <= 1.5:
            raise ValueError(f"sensitivity {self.sensitivity} must be in [0.5, 1.5], as in BirdNET")
        for label, threshold in self.species_thresholds.items():
            if not 0.0 < threshold <= 1.0:
                raise ValueError(f"threshold {threshold} of {label!r} must be in (0, 1]")
        if not 1 <= self.windows_per_message <= 256:
            raise ValueError(f"windows_per_message {self.windows_per_message} must be 1 to 256")
        if self.receipt_timeout_s <= 0:
            raise ValueError(f"receipt timeout {self.receipt_timeout_s} s is invalid: use a positive number of seconds")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain timeout {self.drain_timeout_s} s is invalid: use 0 or more seconds")
        # Backoff validates the delays.
        Backoff(self.reconnect_min_delay_s, self.reconnect_max_delay_s)
        if self.home_assistant_prefix is not None:
            home_assistant.validate_prefix(self.home_assistant_prefix)
        self.state_dir = pathlib.Path(self.state_dir)


class Recorder:
    """Runs one recorder unit until its source ends (or for ever, for a microphone)."""

    def __init__(
        self,
        config: RecorderConfig,
        backbone: Backbone,
        source_head: LinearHead,
        source: Iterable[Window],
        batch_size: int = 1,
    ):
        self.config = config
        self._source = source
        self._state_dir = config.state_dir / config.device
        self._state_dir.mkdir(parents=True, exist_ok=True)
        # Sequence numbers are committed to the outbox's database before use, so
        # a crash can skip numbers but never reuse one: the base station
        # deduplicates by device and sequence number, so a reused number would
        # lose data.
        self._outbox = Outbox(self._state_dir / "outbox.sqlite3", max_bytes=config.queue_max_bytes,
                              max_entries=config.queue_max_entries,
                              legacy_sequence_path=self._state_dir / "next_sequence")
        self._reference_path = self._state_dir / "reference.npy"
        self._reference = np.load(self._reference_path) if self._reference_path.exists() else None
        self._store = HeadStore(self._state_dir / "heads")

        if config.head_public_key is None:
            _LOGGER.warning("recorder %s: no head public key is configured (--head-public-key), so it runs the "
                            "source head and rejects every pushed head", config.device)
        else:
            _LOGGER.info("recorder %s: accepts heads signed by key %s", config.device,
                         key_id(config.head_public_key))
        installed = self._store.load_last_good(config.site, config.head_public_key, config.head_labels)
        head: HeadRunner = installed.runner if installed is not None else source_head
        # Manifest of the newest verified head, which may still wait to be swapped in. None is the source head.
        self.manifest: Manifest | None = installed.manifest if installed is not None else None
        self._labels = config.head_labels
        if self._labels is None and installed is not None:
            self._labels = list(installed.manifest.labels)
        self.pipeline = InferencePipeline(backbone, head, batch_size=batch_size)

        self.counters = {"windows": 0, "messages": 0, "detections": 0, "heads_rejected": 0, "heads_applied": 0,
                         "heads_verified": 0, "embeddings_sent": 0, "detections_sent": 0}
        self.rejections = RejectionCounter(_LOGGER, f"recorder {config.device}")
        self.finished = threading.Event()
        # Set when the source ran out, not when ``stop`` cut it short. The status then reads "finished".
        self._input_ended = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending_manifest: Manifest | None = None
        self._acked_head: HeadRunner | None = None
        self._last_status = 0.0
        # Monotonic time of the main loop's last batch or idle tick, for the service watchdog.
        self._last_progress = time.monotonic()
        self._staying = False
        self._unsent: list[tuple[Window, np.ndarray, int]] = []
        self._thresholds: tuple[HeadRunner, np.ndarray] | None = None
        self._last_detection: Detection | None = None

        self._client = self._make_client()
        self._uplink = Uplink(
            self._client, config.broker_host, config.broker_port, config.keepalive_s, self._outbox,
            Backoff(config.reconnect_min_delay_s, config.reconnect_max_delay_s), config.device,
            on_connecting=self._set_last_will, on_connected=self._on_connected,
            receipts=config.await_receipts, receipt_timeout_s=config.receipt_timeout_s,
            on_delivered=self._count_delivered,
        )

    # MQTT -----------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"dawnchorus-recorder-{self.config.device}",
            clean_session=True,
        )
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self.config.password)
        if self.config.tls is not None:
            self.config.tls.apply(client)
        client.message_callback_add(topics.manifest_topic(self.config.site), self._on_manifest)
        client.message_callback_add(f"{topics.ROOT}/{self.config.site}/{topics.MODEL_SEGMENT}/blob/+", self._on_blob)
        client.message_callback_add(topics.receipt_topic(self.config.site, self.config.device), self._on_receipt)
        return client

    def _topic(self, kind: str) -> str:
        return topics.device_topic(self.config.site, self.config.device, kind)

    def _now(self) -> float:
        """Return the unix time that the recorder reports, with ``clock_offset_s`` applied."""
        return time.time() + self.config.clock_offset_s

    def _status(self, state: str) -> Status:
        queue = self._outbox.stats()
        return Status(self.config.device, self.config.site, state, self.head_version,
                      self.counters["windows"], self._now(), self._status_counters(),
                      queue_depth=queue.depth, queue_bytes=queue.bytes, queue_dropped=queue.dropped,
                      queue_dropped_windows=queue.dropped_windows,
                      embeddings_sent=self.counters["embeddings_sent"],
                      detections_sent=self.counters["detections_sent"],
                      heads_verified=self.counters["heads_verified"], heads_installed=self.counters["heads_applied"],
                      heads_rejected=self.counters["heads_rejected"], rejected_payloads=self.rejections.total)

    def _count_delivered(self, windows: int, entries: list[OutboxEntry]) -> None:
        """Count the embedding windows and the detections that left the outbox as delivered."""
        self.counters["embeddings_sent"] += windows
        for entry in entries:
            if entry.topic != self._topic("detections"):
                continue
            try:
                self.counters["detections_sent"] += len(decode_detections(entry.payload))
            except PayloadError:
                _LOGGER.exception("recorder %s: queued detections message %d does not decode", self.config.device,
                                  entry.id)

    def _set_last_will(self, client: mqtt.Client) -> None:
        """Set the offline status that the broker publishes if the recorder vanishes, with the current counts.

        NOTE: MQTT fixes the will at connect, so a head swapped in later is missing from it. The
        will's ``time`` is older than every status sent since, which lets the base station keep
        the newer head version and counts (server/live.py).
        """
        client.will_set(self._topic("status"), self._status("offline").encode(), qos=1, retain=True)

    def _on_connected(self, client: mqtt.Client) -> None:
        queue = self._outbox.stats()
        _LOGGER.info("recorder %s (site %s) connected to %s:%d; %d messages queued", self.config.device,
                     self.config.site, self.config.broker_host, self.config.broker_port, queue.depth)
        client.subscribe(topics.manifest_topic(self.config.site), qos=1)
        if self.config.await_receipts:
            client.subscribe(topics.receipt_topic(self.config.site, self.config.device), qos=1)
        self._publish_status()
        if self.config.home_assistant_prefix is not None:
            self._publish_home_assistant()

    def _on_receipt(self, client, userdata, message) -> None:
        if not message.payload:
            return  # a cleared retained receipt
        try:
            receipt = Receipt.decode(message.payload)
            if receipt.device != self.config.device or receipt.site != self.config.site:
                raise PayloadError(f"receipt names device {receipt.device} of site {receipt.site}, not this recorder",
                                   REASON_IDS)
        except PayloadError as error:
            self.rejections.reject(message.topic, "the base station", "receipt", error.reason, str(error))
            return
        self._uplink.on_receipt(receipt)

    def _on_manifest(self, client, userdata, message) -> None:
        if not message.payload:
            return  # a cleared retained manifest
        try:
            manifest = Manifest.decode(message.payload)
        except PayloadError as error:
            self.counters["heads_rejected"] += 1
            self.rejections.reject(message.topic, "the base station", "manifest", error.reason, str(error))
            return
        with self._lock:
            known = {m.sequence for m in (self.manifest, self._pending_manifest) if m is not None}
            if manifest.sequence in known:
                # The broker re-sends the retained manifest of the installed head on every reconnect.
                return
            newest_sequence = max([self._store.last_sequence, *known])
            installed_version = self.manifest.version if self.manifest is not None else 0
            try:
                check_manifest(manifest, self.config.head_public_key, self.config.site, self._labels,
                               installed_version, newest_sequence)
            except HeadRejected as error:
                self._reject_head(manifest, str(error))
                return
            self._pending_manifest = manifest
        kind = "rollback to head" if manifest.rollback else "head"
        _LOGGER.info("recorder %s: %s v%d announced for site %s (sequence %d), fetching %s", self.config.device,
                     kind, manifest.version, manifest.site, manifest.sequence, manifest.blob_topic)
        client.subscribe(manifest.blob_topic, qos=1)

    def _on_blob(self, client, userdata, message) -> None:
        with self._lock:
            manifest = self._pending_manifest
        if manifest is None or message.topic != manifest.blob_topic:
            return
        client.unsubscribe(message.topic)
        if not message.payload:
            return  # a cleared retained blob
        if len(message.payload) != manifest.size:
            reason = (f"blob is {len(message.payload)} bytes but the manifest gives {manifest.size}: "
                      "truncated or invalid")
            self.rejections.reject(message.topic, "the base station", "blob", REASON_LENGTH, reason)
            with self._lock:
                self._pending_manifest = None
            self._reject_head(manifest, reason)
            return
        with self._lock:
            reference = None if self._reference is None else self._reference.copy()
        try:
            runner = verify_head(manifest, bytes(message.payload), reference)
            self._store.install(manifest, bytes(message.payload))
        except (HeadRejected, OSError) as error:
            with self._lock:
                self._pending_manifest = None
            self._reject_head(manifest, str(error))
            return
        with self._lock:
            self._pending_manifest = None
            self.manifest = manifest
            if self._labels is None:
                self._labels = list(manifest.labels)
        self.counters["heads_verified"] += 1
        kind = "rollback to head" if manifest.rollback else "head"
        _LOGGER.info("recorder %s: %s v%d verified (sequence %d, sha256 %s...), swapping in between windows",
                     self.config.device, kind, manifest.version, manifest.sequence, manifest.sha256[:12])
        self.pipeline.swap_head(runner)

    def _reject_head(self, manifest: Manifest, reason: str) -> None:
        self.counters["heads_rejected"] += 1
        _LOGGER.error("recorder %s: rejected head v%d of site %s: %s; keeps running v%d",
                      self.config.device, manifest.version, manifest.site, reason, self.head_version)
        self._uplink.publish_now(self._topic("ack"), Ack(self.config.device, self.config.site, manifest.version,
                                                         False, reason, self._now()).encode())

    def _publish_status(self, state: str | None = None) -> None:
        """Publish the retained status, unless the broker is unreachable: a fresh one follows on connect.

        Without ``state``, the state is "finished" once the input has ended, else "online".
        """
        if state is None:
            state = "finished" if self._input_ended.is_set() else "online"
        self._last_status = time.monotonic()
        self._uplink.publish_now(self._topic("status"), self._status(state).encode(), retain=True,
                                 when_offline=False)

    def _publish_home_assistant(self) -> None:
        """Publish the retained discovery configs and the last detection, which may be newer than the broker's copy."""
        messages = home_assistant.discovery_messages(self.config.home_assistant_prefix, self.config.site,
                                                     self.config.device, __version__)
        for message in messages:
            self._uplink.publish_now(message.topic, message.encode(), retain=True, when_offline=False)
        _LOGGER.info("recorder %s: published %d Home Assistant discovery configs under %s/", self.config.device,
                     len(messages), self.config.home_assistant_prefix)
        with self._lock:
            last = self._last_detection
        if last is not None:
            self._publish_last_detection(last)

    def _publish_last_detection(self, detection: Detection) -> None:
        self._uplink.publish_now(topics.last_detection_topic(self.config.site, self.config.device),
                                 home_assistant.encode_last_detection(detection), retain=True, when_offline=False)

    def _status_counters(self) -> dict[str, int]:
        """Return the counters for the status: the recorder's own, rejected messages, and replayed files."""
        counters = dict(self.counters)
        counters.update({f"rejected.{key}": count for key, count in self.rejections.counts().items()})
        counters.update({f"receipts.{key}": count for key, count in self._uplink.counters.items()})
        queue = self._outbox.stats()
        if queue.released:
            counters["queue_released"] = queue.released
            counters["queue_released_windows"] = queue.released_windows
        for name in ("files_read", "files_rejected"):
            if hasattr(self._source, name):
                counters[name] = int(getattr(self._source, name))
        return counters

    # Inference ------------------------------------------------------------

    @property
    def head_version(self) -> int:
        return int(self.pipeline.head.version)

    def _acknowledge_if_swapped(self) -> None:
        # Compared by identity, so that a rollback to the version that runs is acknowledged too.
        head = self.pipeline.head
        if head is self._acked_head:
            return
        self._acked_head = head
        # The old head's interpreter is free now that no batch refers to it.
        release_free_memory()
        version = int(head.version)
        if version == 0:
            return
        self.counters["heads_applied"] += 1
        _LOGGER.info("recorder %s: now running head v%d", self.config.device, version)
        self._uplink.publish_now(self._topic("ack"), Ack(self.config.device, self.config.site, version, True,
                                                         "", self._now()).encode())
        self._publish_status()

    def _class_thresholds(self, head: HeadRunner) -> np.ndarray:
        """Return the detection threshold of each of ``head``'s classes [K], computed once per head."""
        if self._thresholds is None or self._thresholds[0] is not head:
            vector = threshold_vector(head.labels, self.config.min_conf, self.config.species_thresholds)
            self._thresholds = (head, vector)
        return self._thresholds[1]

    def _handle_batch(self, batch: ScoredBatch) -> None:
        version = int(batch.head.version)
        scores = sigmoid(batch.logits, self.config.sensitivity)
        thresholds = self._class_thresholds(batch.head)
        self.counters["windows"] += len(batch.windows)
        try:
            sequence = self._outbox.allocate_sequence(len(batch.windows))
        except sqlite3.Error as error:
            # Without a committed sequence number the windows cannot be sent; analysis goes on.
            self._outbox.count_unqueued(len(batch.windows))
            _LOGGER.error("recorder %s: could not number %d windows, so they were dropped: %s", self.config.device,
                          len(batch.windows), error)
            return
        offset = self.config.clock_offset_s

        detections = []
        for row, (window, seq) in enumerate(zip(batch.windows, sequence)):
            for column in np.flatnonzero(scores[row] >= thresholds):
                detections.append(Detection(
                    self.config.device, self.config.site, int(seq), window.start_time + offset,
                    window.start_time + offset + 3.0, batch.head.labels[column],
                    round(float(scores[row, column]), 4), version,
                ))
        if detections:
            self.counters["detections"] += len(detections)
            self._log_detections(detections)
            self._outbox.put(self._topic("detections"), encode_detections(detections), windows=0,
                             first_sequence=int(sequence[0]))
            if self.config.home_assistant_prefix is not None:
                # The last detection is the most confident one of the latest window that has any.
                last = max(detections, key=lambda d: (d.start_time, d.confidence))
                with self._lock:
                    self._last_detection = last
                self._publish_last_detection(last)

        for window, embedding, seq in zip(batch.windows, batch.embeddings, sequence):
            self._unsent.append((window, embedding, int(seq)))
        if len(self._unsent) >= self.config.windows_per_message:
            self._flush_embeddings(version)

        with self._lock:
            self._reference = np.concatenate(
                [batch.embeddings, self._reference] if self._reference is not None else [batch.embeddings]
            )[:REFERENCE_WINDOWS]

    def _log_detections(self, detections: list[Detection]) -> None:
        """Log one INFO line per detection, with the window's start on the recorder's clock and UTC offset."""
        for detection in detections:
            try:
                start = datetime.datetime.fromtimestamp(detection.start_time).astimezone().isoformat(timespec="seconds")
            except (OverflowError, ValueError, OSError):
                # A clock offset can move the time out of the platform's range, so the unix time is logged instead.
                start = f"unix time {detection.start_time:.0f}"
            _LOGGER.info("recorder %s: detected %s (%s) at %s, confidence %.2f, head v%d", self.config.device,
                         detection.common_name, detection.scientific_name, start, detection.confidence,
                         detection.head_version)

    def _flush_embeddings(self, version: int) -> None:
        while self._unsent:
            chunk = self._unsent[:self.config.windows_per_message]
            del self._unsent[:self.config.windows_per_message]
            message = EmbeddingBatch(
                device=self.config.device,
                site=self.config.site,
                head_version=version,
                sequence=np.array([seq for _, _, seq in chunk], dtype=np.uint64),
                start_time=np.array([window.start_time + self.config.clock_offset_s for window, _, _ in chunk]),
                embeddings=np.stack([embedding for _, embedding, _ in chunk]),
            )
            self._outbox.put(self._topic("embeddings"), encode_embeddings(message), windows=len(chunk),
                             first_sequence=chunk[0][2])
            self.counters["messages"] += 1

    def _save_reference(self) -> None:
        with self._lock:
            if self._reference is None:
                return
            reference = self._reference.copy()
        partial = self._reference_path.with_name("reference.partial.npy")
        try:
            np.save(partial, reference)
            os.replace(partial, self._reference_path)
        except OSError as error:
            partial.unlink(missing_ok=True)
            _LOGGER.warning("recorder %s: could not save the reference batch to %s (%s); the next start collects "
                            "a new one", self.config.device, self._reference_path, error)

    # Lifecycle ------------------------------------------------------------

    def health(self, stall_s: float) -> str | None:
        """Return None while audio is analysed and the uplink runs, else what is stuck (for the watchdog).

        Args:
            stall_s: seconds without a scored window (or, after a replay with
                ``stay_after_source``, without a tick of the idle loop) that count as stuck.
        """
        loop_running = not self.finished.is_set() or self._staying
        idle_s = time.monotonic() - self._last_progress
        if loop_running and idle_s > stall_s:
            return (f"recorder {self.config.device}: no window was analysed for {idle_s:.0f} s "
                    "(audio capture or inference is stuck)")
        uplink = self._uplink.health(stall_s)
        return None if uplink is None else f"recorder {self.config.device}: {uplink}"

    def stop(self) -> None:
        """Ask ``run`` to return after the current batch."""
        self._stop.set()

    def run(self, stay_after_source: bool = False) -> None:
        """Stream the source; with ``stay_after_source``, keep applying heads until ``stop``."""
        config = self.config
        _LOGGER.info("recorder %s starting: site %s, head v%d, broker %s:%d", config.device, config.site,
                     self.head_version, config.broker_host, config.broker_port)
        self._uplink.start()
        self._staying = stay_after_source
        self._last_progress = time.monotonic()
        try:
            for batch in self.pipeline.run(self._source):
                self._last_progress = time.monotonic()
                self._handle_batch(batch)
                self._acknowledge_if_swapped()
                if time.monotonic() - self._last_status > config.status_interval_s:
                    self._publish_status()
                if self._stop.is_set():
                    break
            self._flush_embeddings(self.head_version)
            self._save_reference()
            if not self._stop.is_set():
                self._input_ended.set()
            self.finished.set()
            self._publish_status()
            _LOGGER.info("recorder %s: source finished after %d windows", config.device, self.counters["windows"])
            if not stay_after_source and not self._stop.is_set():
                self._drain()

            while stay_after_source and not self._stop.wait(0.2):
                self._last_progress = time.monotonic()
                self.pipeline.apply_pending_head()
                self._acknowledge_if_swapped()
                if time.monotonic() - self._last_status > config.status_interval_s:
                    self._publish_status()
        finally:
            self._publish_status("offline")
            self._uplink.stop()
            queue = self._outbox.stats()
            self._outbox.close()
            _LOGGER.info("recorder %s stopped; %d messages stay queued for the next start", config.device,
                         queue.depth)

    def _drain(self) -> None:
        """Wait, up to ``drain_timeout_s``, until the broker has acknowledged every queued message."""
        queued = self._outbox.stats().depth
        if queued == 0:
            return
        _LOGGER.info("recorder %s: waiting up to %.0f s for %d queued messages to be sent", self.config.device,
                     self.config.drain_timeout_s, queued)
        if self._uplink.wait_drained(self.config.drain_timeout_s, cancel=self._stop):
            _LOGGER.info("recorder %s: every queued message was acknowledged", self.config.device)
        else:
            _LOGGER.warning("recorder %s: %d messages are still queued after %.0f s; they are sent after the next "
                            "start", self.config.device, self._outbox.stats().depth, self.config.drain_timeout_s)

