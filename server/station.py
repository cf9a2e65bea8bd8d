"""The base station: ingests embeddings, adapts each site's head, publishes heads.

paho's network thread only queues messages. One worker thread owns the
sites (buffers, trainers) and does all decoding, adaptation and publishing,
so no lock guards the adaptation state. Sites can be split across several
base-station processes, and each owns the sites that a stable hash of the
site id assigns to its shard.

Nothing acknowledged is lost: the station subscribes in a persistent
session and acknowledges each QoS 1 message itself (paho's ``manual_ack``),
only after the windows it carried are committed to the journal
(``server/journal.py``). A message that was not acknowledged when the
station stopped or crashed is delivered again by the broker, and the
(device, sequence number) filter drops the windows already accepted.
After each commit the station also publishes a receipt per recorder, so
that recorders keep their embeddings until they are on the station's disk
and not only at the broker, which can crash (see edge/uplink.py).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pathlib
import queue
import sqlite3
import threading
import time
import zipfile
import zlib
from typing import Callable

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dawnchorus.models.export import head_to_tflite
from dawnchorus.models.head import LinearHead, TFLiteHead
from dawnchorus.protocol import topics
from dawnchorus.protocol.embeddings import (
    MAX_PAYLOAD_BYTES,
    REASON_DIM,
    REASON_FIELD,
    REASON_IDS,
    REASON_TOO_LARGE,
    REASON_TOPIC,
    PayloadError,
    decode_embeddings,
)
from dawnchorus.protocol.messages import (
    MAX_JSON_BYTES,
    Ack,
    Detection,
    Manifest,
    Receipt,
    StationStats,
    Status,
    decode_detections,
)
from dawnchorus.protocol.rejections import RejectionCounter
from dawnchorus.protocol.tls import TlsSettings
from dawnchorus.server.adaptation import AdaptationConfig, RoundResult, SiteAdapter
from dawnchorus.server.feed import DetectionFeed
from dawnchorus.server.ingest import SiteIngest
from dawnchorus.server.journal import (JOURNAL_FILE, SNAPSHOT_FILE, IngestJournal, read_snapshot, snapshot_path,
                                       write_snapshot)
from dawnchorus.server.live import LiveState
from dawnchorus.server.memory_trace import start_from_environment as start_memory_trace
from dawnchorus.server.publication import HeadPublisher
from dawnchorus.server.registry import HeadRegistry

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's share of the sites: ``index`` of ``count``, 1-based as on the command line."""

    index: int = 1
    count: int = 1

    def __post_init__(self):
        if not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index}/{self.count}: the index must be 1 to {self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        index, _, count = text.partition("/")
        try:
            return cls(int(index), int(count))
        except ValueError as error:
            raise ValueError(f"invalid shard {text!r}: expected INDEX/COUNT such as 2/4 ({error})") from None

    def owns(self, site: str) -> bool:
        """Return whether this shard owns ``site``. CRC-32 is stable across processes and Python versions."""
        return zlib.crc32(site.encode()) % self.count == self.index - 1


# Messages handled, committed to the journal in one transaction and then
# acknowledged, at most. Larger groups need fewer disk syncs. The broker
# sends at most max_inflight_messages unacknowledged messages (100 in
# deploy/mosquitto/dawnchorus.conf), so a larger group would rarely fill.
GROUP_MESSAGES = 64

# Seconds between retries of a journal commit that failed, for example on a
# full disk. Nothing of the group is acknowledged meanwhile, so the broker
# keeps it.
COMMIT_RETRY_S = 5.0

# The journal stores sequence numbers as SQLite's signed 64-bit integers.
MAX_SEQUENCE = 2**63 - 1


@dataclasses.dataclass
class _Received:
    """A message as paho delivered it, with what the worker needs to acknowledge it.

    Attributes:
        connection: the number of the connection that delivered it; an
            acknowledgement is only sent on that connection.
        mid, qos: the MQTT packet id and QoS, for ``Client.ack``.
    """

    connection: int
    mid: int
    qos: int
    topic: str
    payload: bytes


@dataclasses.dataclass
class StationConfig:
    """Settings of a base-station process.

    Attributes:
        broker_host, broker_port: the MQTT broker.
        username, password: MQTT credentials, or None for an anonymous connection.
        tls: CA, client certificate and key for a TLS connection, or None for plain MQTT.
        state_dir: the head registry, acks, the detection log, the ingest journal and site snapshots.
        shard: which sites this process owns.
        adaptation: streaming NOTELA settings.
        client_id: MQTT client id; unique per process. It also names the process's stats topic.
        signing_key: the Ed25519 key that signs every published manifest. Required.
        stats_interval_s: minimum seconds between two retained stats messages. One is sent
            only when a counter changed, and a last one when the station stops.
    """

    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    tls: TlsSettings | None = None
    state_dir: pathlib.Path = pathlib.Path("state/server")
    shard: Shard = Shard()
    adaptation: AdaptationConfig = dataclasses.field(default_factory=AdaptationConfig)
    client_id: str = "dawnchorus-base-station"
    signing_key: Ed25519PrivateKey | None = dataclasses.field(default=None, repr=False)
    stats_interval_s: float = 30.0


@dataclasses.dataclass
class SiteView:
    """The station's view of one site, for summaries and the live view."""

    latest_version: int = 0
    blocked: int = 0
    rounds: int = 0
    embeddings: int = 0
    last_decision: str = ""


class BaseStation:
    """Runs the base station until ``stop`` is called.

    Args:
        config: the station's settings.
        source_head: the full source head (all classes of the model).
        species_for_site: returns the labels a site's head covers (in the source
            head's order); called once per site when its first embedding arrives.
        on_detection: optional callback for every accepted detection.
    """

    def __init__(
        self,
        config: StationConfig,
        source_head: LinearHead,
        species_for_site: Callable[[str], list[str]],
        on_detection: Callable[[Detection], None] | None = None,
    ):
        if config.signing_key is None:
            raise ValueError("the base station has no signing key, and recorders reject unsigned heads: "
                             "create one with 'dawnchorus keys generate DIR' and pass --signing-key DIR/head-signing.key")
        self.config = config
        self.source_head = source_head
        self.species_for_site = species_for_site
        self.registry = HeadRegistry(config.state_dir)
        self.feed = DetectionFeed(pathlib.Path(config.state_dir) / "detections.jsonl", on_detection)
        # What the live web page shows: the worker reports to it, the web server only reads it.
        self.live = LiveState(config.client_id)
        self.live.seed_detections(self.feed.path)
        self.sites: dict[str, SiteAdapter] = {}
        self._ingests: dict[str, SiteIngest] = {}
        self._journal = IngestJournal(pathlib.Path(config.state_dir) / JOURNAL_FILE)
        # The newest journal row id committed; every window up to it is in the sites' buffers.
        self._committed_id = self._journal.last_id()
        self.views: dict[str, SiteView] = collections.defaultdict(SiteView)
        self.recorders: dict[str, Status] = {}
        self.acks: dict[str, Ack] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.rejections = RejectionCounter(_LOGGER, "base station")
        self._rejections_lock = threading.Lock()
        self._stats_topic = topics.station_stats_topic(config.client_id)
        self._stats_published: tuple[dict[str, int], dict[str, int]] | None = None
        self._stats_time = 0.0
        self._queue: queue.Queue[_Received] = queue.Queue()
        self._busy = False
        self._snapshot_due: set[str] = set()
        # Incremented on every connection; messages from an earlier one are not acknowledged.
        self._connection = 0
        self._stop = threading.Event()
        self._flush_requested = threading.Event()
        # Set on every connection: the worker then publishes each site's newest head again.
        self._republish_due = threading.Event()
        self.flush_done = threading.Event()
        self._worker: threading.Thread | None = None
        self.connected = threading.Event()
        self._subscribe_mid: int | None = None
        # Per (site, device), the sequence numbers of the group being handled, confirmed once it is committed.
        self._receipts_due: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
        # Per site, the sequence number of the newest published manifest that this process has seen.
        self._published_sequence: dict[str, int] = {}
        self._client = self._make_client()
        self._publisher = HeadPublisher(self._client, self.registry, config.signing_key)

    # MQTT ------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        # A persistent session: the broker queues recorders' QoS 1 messages while the
        # station is down and delivers them when it reconnects with the same client id.
        # With manual_ack, paho does not acknowledge a message when on_message
        # returns; the worker does, once the message's windows are committed.
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.config.client_id,
                             clean_session=False, manual_ack=True)
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self.config.password)
        if self.config.tls is not None:
            self.config.tls.apply(client)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            _LOGGER.error("base station: broker refused the connection: %s", reason_code)
            return
        self._connection += 1
        result, self._subscribe_mid = client.subscribe(
            [(topics.device_wildcard(kind), 1) for kind in topics.DEVICE_KINDS])
        if result != mqtt.MQTT_ERR_SUCCESS:
            _LOGGER.error("base station: subscribing failed: %s", mqtt.error_string(result))
        _LOGGER.info("base station connected to %s:%d (shard %d/%d)", self.config.broker_host,
                     self.config.broker_port, self.config.shard.index, self.config.shard.count)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._subscribe_mid:
            return
        failed = [code for code in reason_codes if code.is_failure]
        if failed:
            _LOGGER.error("base station: the broker refused subscriptions: %s", failed)
            return
        # Only now does the broker route recorders' messages to this station.
        _LOGGER.info("base station ready: subscribed to the recorders' topics")
        self._republish_due.set()
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            _LOGGER.warning("base station disconnected (%s); paho reconnects with backoff", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        # Every message goes through the worker, which acknowledges them in the order they arrived.
        self._queue.put(_Received(self._connection, message.mid, message.qos, message.topic,
                                  bytes(message.payload)))

    def _reject(self, topic: str, device: str, kind: str, error: PayloadError) -> None:
        """Count and log a rejected message. Both paho's thread and the worker call it."""
        with self._rejections_lock:
            self.counters["rejected_payloads"] += 1
        self.rejections.reject(topic, f"device {device}", kind, error.reason, str(error))

    # Worker ----------------------------------------------------------------

    def _site(self, site: str) -> SiteAdapter:
        adapter = self.sites.get(site)
        if adapter is not None:
            return adapter
        labels = self.species_for_site(site)
        adapter = SiteAdapter(site, self.source_head.select(labels), self.config.adaptation)
        publication = self.registry.publication(site)
        # After a rollback the published head, not the newest in the registry, is where adaptation resumes.
        latest = publication.version if publication is not None else self.registry.latest_version(site)
        if latest:
            state = self.registry.trainer_state(site, latest)
            if state is not None:
                adapter.restore(state)
            _LOGGER.info("site %s resumes after head v%d from the registry", site, latest)
        self.views[site].latest_version = latest
        self.live.seed_site_from_registry(self.registry, site, latest)
        self._published_sequence[site] = publication.sequence if publication is not None else 0
        self.sites[site] = adapter
        _LOGGER.info("site %s: %d classes, buffer of %d, a round every %d embeddings", site, len(labels),
                     self.config.adaptation.buffer_capacity, self.config.adaptation.update_interval)
        return adapter

    def _ingest(self, site: str) -> SiteIngest:
        ingest = self._ingests.get(site)
        if ingest is None:
            ingest = SiteIngest(site, self._site(site))
            self._ingests[site] = ingest
        return ingest

    def _handle(self, received: _Received, staged: list[tuple[str, str, int, bytes]]) -> None:
        """Decode and apply one message; accepted windows are added to ``staged`` for the journal."""
        try:
            parsed = topics.parse_device_topic(received.topic)
        except topics.TopicError as error:
            self._reject(received.topic, "?", "unknown", PayloadError(str(error), REASON_TOPIC))
            return
        if not self.config.shard.owns(parsed.site):
            return
        if parsed.kind != "status":
            self.live.seen(parsed.site, parsed.device)
        payload = received.payload
        # The broker's max_packet_size bounds what reaches this point; the decoders never see more than the limit.
        limit = MAX_PAYLOAD_BYTES if parsed.kind == "embeddings" else MAX_JSON_BYTES
        if len(payload) > limit:
            self._reject(received.topic, parsed.device, parsed.kind, PayloadError(
                f"{len(payload)} bytes exceed the {limit}-byte limit of {parsed.kind} messages", REASON_TOO_LARGE))
            return
        try:
            if parsed.kind == "embeddings":
                self._ingest_embeddings(parsed, payload, staged)
            elif parsed.kind == "detections":
                for detection in decode_detections(payload):
                    self.feed.add(detection)
                    self.live.detection(detection)
            elif parsed.kind == "status":
                if payload:
                    status = Status.decode(payload)
                    self._log_state_change(parsed, self.recorders.get(parsed.device), status)
                    self.recorders[parsed.device] = status
                    self.live.status(parsed.site, parsed.device, status)
            elif parsed.kind == "ack":
                self._record_ack(parsed, Ack.decode(payload))
        except PayloadError as error:
            self._reject(received.topic, parsed.device, parsed.kind, error)

    @staticmethod
    def _log_state_change(parsed: topics.DeviceTopic, previous: Status | None, status: Status) -> None:
        """Log a recorder going online, finishing its input or going offline, once per change."""
        if previous is not None and previous.state == status.state:
            return
        if status.state == "offline":
            _LOGGER.warning("recorder %s of site %s is offline (it stopped, or the broker lost it and sent its "
                            "last will)", parsed.device, parsed.site)
        else:
            _LOGGER.info("recorder %s of site %s is %s, running head v%d", parsed.device, parsed.site, status.state,
                         status.head_version)

    def _ingest_embeddings(self, parsed: topics.DeviceTopic, payload: bytes,
                           staged: list[tuple[str, str, int, bytes]]) -> None:
        batch = decode_embeddings(payload)
        if batch.device != parsed.device or batch.site != parsed.site:
            raise PayloadError(f"header names device {batch.device} of site {batch.site}, "
                               f"the topic {parsed.device} of site {parsed.site}", REASON_IDS)
        dim = self.source_head.weights.shape[1]
        if batch.embeddings.shape[1] != dim:
            raise PayloadError(f"embeddings have {batch.embeddings.shape[1]} dimensions, the model's have {dim}",
                               REASON_DIM)
        if int(batch.sequence.max()) > MAX_SEQUENCE:
            raise PayloadError(f"sequence number {int(batch.sequence.max())} is above {MAX_SEQUENCE}, "
                               "the largest that the journal stores", REASON_FIELD)
        ingest = self._ingest(batch.site)
        numbers = batch.sequence.tolist()
        fresh = ingest.new_rows(batch.device, numbers)
        self.counters["embeddings_duplicate"] += len(batch) - len(fresh)
        # Duplicates are confirmed too: their first copy may be the one whose receipt the recorder missed.
        self._receipts_due[(batch.site, batch.device)].extend(numbers)
        if not fresh:
            return
        sequences = batch.sequence[fresh]
        vectors = np.ascontiguousarray(batch.embeddings[fresh], dtype="<f2")
        ingest.add([batch.device] * len(fresh), sequences, vectors)
        staged.extend((batch.site, batch.device, sequence, vectors[row].tobytes())
                      for row, sequence in enumerate(sequences.tolist()))
        self.counters["embeddings"] += len(fresh)
        self.views[batch.site].embeddings += len(fresh)
        self.live.buffer(batch.site, ingest.adapter.buffer.size, len(fresh))

    def _record_ack(self, parsed: topics.DeviceTopic, ack: Ack) -> None:
        if ack.device != parsed.device or ack.site != parsed.site:
            raise PayloadError(f"ack names device {ack.device} of site {ack.site}, the topic another",
                               REASON_IDS)
        self.acks[ack.device] = ack
        self.live.ack(ack)
        if ack.accepted:
            self.counters["acks"] += 1
            self.registry.record_ack(ack.site, ack.device, ack.version)
            _LOGGER.info("recorder %s of site %s acknowledged head v%d", ack.device, ack.site, ack.version)
        else:
            self.counters["head_rejections"] += 1
            _LOGGER.warning("recorder %s of site %s rejected head v%d: %s", ack.device, ack.site,
                            ack.version, ack.reason)

    def _run_rounds(self, flush: bool = False) -> None:
        for site, adapter in self.sites.items():
            if not adapter.round_due(flush):
                continue
            try:
                self._adapt(site, adapter)
            except Exception:
                # The buffer keeps its embeddings, so the next round retries with them.
                self.counters["rounds_failed"] += 1
                _LOGGER.exception("site %s: adaptation round failed; the current head stays published", site)
            self._snapshot_due.add(site)

    def _follow_rollback(self, site: str, adapter: SiteAdapter) -> None:
        """Adopt a manifest that another process published for ``site``.

        After a rollback, the trainer goes back to the state of the version rolled back to.
        """
        publication = self.registry.publication(site)
        if publication is None or publication.sequence == self._published_sequence.get(site, 0):
            return
        self._published_sequence[site] = publication.sequence
        self.live.head(site, publication.version, self.views[site].latest_version, publication.time,
                       rollback=publication.rollback, published_here=False)
        self.views[site].latest_version = publication.version
        if not publication.rollback:
            return
        state = self.registry.trainer_state(site, publication.version)
        if state is None:
            _LOGGER.warning("site %s was rolled back to head v%d, which has no trainer state in the registry; "
                            "adaptation continues from its current state", site, publication.version)
            return
        adapter.restore(state)
        _LOGGER.info("site %s was rolled back to head v%d (sequence %d); adaptation continues from that head",
                     site, publication.version, publication.sequence)

    def _adapt(self, site: str, adapter: SiteAdapter) -> None:
        self._follow_rollback(site, adapter)
        view = self.views[site]
        version = self.registry.latest_version(site) + 1
        result = adapter.run_round(version)
        view.rounds += 1
        self.counters["rounds"] += 1
        stats = result.stats
        if not result.decision.accepted:
            view.blocked += 1
            view.last_decision = result.decision.reason
            self.counters["heads_blocked"] += 1
            _LOGGER.warning("site %s: collapse guard blocked candidate v%d: %s", site, version,
                            result.decision.reason)
            self.live.round(site, version, False, result.decision.reason, stats, result.buffer_size)
            return
        _LOGGER.info(
            "site %s round %d: buffer %d, pseudo-label mean %.4f, top class changed %.3f, "
            "mean top score %.4f (source %.4f), %.2f s",
            site, adapter.rounds, result.buffer_size, stats["mean_pseudo_label"],
            stats["pseudo_label_top_changed"], stats["candidate_mean_top_score"],
            stats["source_mean_top_score"], stats["round_s"],
        )
        if self._publish_head(site, adapter, result):
            view.last_decision = "published"
        else:
            view.last_decision = "discarded: a rollback was published during the round"
        self.live.round(site, version, True, view.last_decision, stats, result.buffer_size)

    def _publish_head(self, site: str, adapter: SiteAdapter, result: RoundResult) -> bool:
        """Store, sign and publish the round's head. Return False if a rollback made it obsolete."""
        precision = self.config.adaptation.precision
        blob = head_to_tflite(result.head, precision)
        # The probe travels as float16, so its logits are those of the rounded values.
        probe = result.probe_embeddings.astype(np.float16).astype(np.float32)
        probe_logits = TFLiteHead(blob, result.head.labels, result.head.version).logits(probe)

        with self.registry.site_lock(site):
            publication = self.registry.publication(site)
            rolled_back = (publication.sequence if publication else 0) != self._published_sequence.get(site, 0)
            if not rolled_back:
                parent = publication.version if publication else self.registry.latest_version(site)
                record = self.registry.add(site, parent, result.head.labels, precision, blob, result.buffer_size,
                                           result.stats, adapter.trainer.get_state())
                manifest = Manifest(
                    site=site, version=record.version, parent=parent, labels=record.labels, sha256=record.sha256,
                    size=record.size, precision=precision, blob_topic=topics.blob_topic(site, record.version),
                    created=record.created, probe_embeddings=probe, probe_logits=probe_logits, stats=result.stats,
                )
                signed, _ = self._publisher.publish(manifest, blob)
                self._published_sequence[site] = signed.sequence

        if rolled_back:
            # A rollback arrived while this round trained from the head it replaced.
            self.counters["heads_discarded"] += 1
            _LOGGER.warning("site %s: a rollback was published during the round, so candidate v%d is discarded",
                            site, result.head.version)
            self._follow_rollback(site, adapter)
            return False
        self.views[site].latest_version = signed.version
        self.live.head(site, signed.version, signed.parent, record.created, precision, signed.size)
        self.counters["heads_published"] += 1
        _LOGGER.info("site %s: published head v%d (%s, %d bytes, sha256 %s..., sequence %d, key %s)", site,
                     signed.version, precision, signed.size, signed.sha256[:12], signed.sequence,
                     self._publisher.key_id)
        return True

    def stats(self) -> StationStats:
        """Return the station's counters and its rejected messages per kind and reason."""
        # dict() copies the Counter in one step under the GIL, while paho's thread may add a key.
        snapshot = dict(self.counters)
        counters = {name: int(value) for name, value in sorted(snapshot.items())}
        return StationStats(self.config.client_id, time.time(), counters, self.rejections.counts())

    def _publish_stats(self, force: bool = False) -> None:
        """Publish the retained stats if a counter changed and ``stats_interval_s`` has passed (or ``force``)."""
        if not force and time.monotonic() - self._stats_time < self.config.stats_interval_s:
            return
        stats = self.stats()
        if (stats.counters, stats.rejected) == self._stats_published:
            return
        self._stats_time = time.monotonic()
        self._stats_published = (stats.counters, stats.rejected)
        info = self._client.publish(self._stats_topic, stats.encode(), qos=1, retain=True)
        if force and info.rc == mqtt.MQTT_ERR_SUCCESS:
            try:
                info.wait_for_publish(timeout=5)
            except (RuntimeError, ValueError) as error:
                _LOGGER.warning("base station: the final stats were not delivered: %s", error)

    # Persistence -----------------------------------------------------------

    def _restore_sites(self) -> None:
        """Load every site of this shard that has a snapshot or journal rows under the state directory."""
        sites = set(self._journal.sites())
        sites_dir = pathlib.Path(self.config.state_dir) / "sites"
        if sites_dir.is_dir():
            sites.update(path.parent.name for path in sites_dir.glob(f"*/{SNAPSHOT_FILE}"))
        for site in sorted(sites):
            if not self.config.shard.owns(site):
                _LOGGER.warning("site %s has persisted windows in %s but belongs to another shard; left as it is",
                                site, self.config.state_dir)
                continue
            self._restore_site(site)

    def _restore_site(self, site: str) -> None:
        ingest = self._ingest(site)
        path = snapshot_path(self.config.state_dir, site)
        try:
            arrays = read_snapshot(path)
            if arrays is not None:
                ingest.restore(arrays)
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as error:
            rejected = path.with_name(f"{path.name}.rejected-{int(time.time())}")
            os.replace(path, rejected)
            self.counters["snapshots_rejected"] += 1
            _LOGGER.error("site %s: the snapshot %s cannot be loaded (%s); it was moved to %s, and the site "
                          "starts from the journal rows alone", site, path, error, rejected)
            self._ingests.pop(site)
            self.sites.pop(site)
            ingest = self._ingest(site)
        # Ids below a snapshot's must never be given out again, even if the journal file was replaced.
        self._journal.reserve_ids_through(ingest.journal_id)
        self._committed_id = max(self._committed_id, ingest.journal_id)

        replayed = 0
        for rows in self._journal.rows(site, ingest.journal_id):
            ingest.add(rows.devices, rows.sequences, rows.embeddings)
            replayed += len(rows)
        ingest.unsaved = replayed
        size = ingest.adapter.buffer.size
        self.live.buffer(site, size, 0)
        _LOGGER.info("site %s restored: %d windows in the buffer (%d from the journal), %d since the last round, "
                     "%d devices", site, size, replayed, ingest.adapter.pending, len(ingest.filter.devices()))

    def _commit(self, staged: list[tuple[str, str, int, bytes]]) -> bool:
        """Commit the group's windows and detections to disk; retry until done or the station stops.

        Returns whether they were committed, and so may be acknowledged.
        """
        while True:
            try:
                if staged:
                    self._committed_id = self._journal.append(staged)
                self.feed.sync()
                return True
            except (sqlite3.Error, OSError) as error:
                self.counters["journal_errors"] += 1
                _LOGGER.error("base station: committing %d windows to %s failed (%s); the group's messages stay "
                              "unacknowledged, retrying in %.0f s", len(staged), self._journal.path, error,
                              COMMIT_RETRY_S)
            if self._stop.wait(COMMIT_RETRY_S):
                return False

    def _acknowledge(self, group: list[_Received]) -> None:
        """Send the PUBACK of every QoS 1 message in ``group``, in the order they arrived.

        A message from an earlier connection is not acknowledged: the broker
        sends it again on the new connection, with the same packet id, and
        that copy, dropped as a duplicate, is acknowledged instead.
        """
        for received in group:
            if received.qos == 0:
                continue
            if received.connection != self._connection:
                self.counters["acks_left_to_redelivery"] += 1
                continue
            result = self._client.ack(received.mid, received.qos)
            if result != mqtt.MQTT_ERR_SUCCESS:
                _LOGGER.warning("base station: acknowledging message %d on %s failed (%s); the broker sends it "
                                "again", received.mid, received.topic, mqtt.error_string(result))

    def _republish_heads(self) -> None:
        """Publish the newest head of every site of this shard again, after a connection to the broker.

        A broker restarted after a crash holds the retained heads of its last
        save, which may be older than the newest or missing.
        """
        for site in self.registry.sites():
            if not self.config.shard.owns(site):
                continue
            try:
                with self.registry.site_lock(site):
                    manifest = self._publisher.republish(site)
            except (OSError, ValueError) as error:
                _LOGGER.error("site %s: publishing the newest head again failed: %s", site, error)
                continue
            if manifest is not None:
                self.counters["heads_republished"] += 1
                _LOGGER.info("site %s: published head v%d (sequence %d) again after connecting to the broker", site,
                             manifest.version, manifest.sequence)

    def _send_receipts(self) -> None:
        """Tell each recorder of the group which of its sequence numbers are now committed.

        Recorders keep an embeddings message queued until a receipt covers
        it, because a broker that crashes loses messages it had already
        acknowledged to them. The receipt is retained, so a recorder that
        was offline finds the newest one when it subscribes.
        """
        for (site, device), numbers in self._receipts_due.items():
            ranges = self._ingests[site].filter.ranges_containing(device, numbers)
            if not ranges:
                continue
            receipt = Receipt(device, site, ranges, time.time())
            info = self._client.publish(topics.receipt_topic(site, device), receipt.encode(), qos=1, retain=True)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                # The recorder sends the messages again after its receipt timeout, and they are confirmed then.
                _LOGGER.warning("base station: the receipt for recorder %s of site %s was not sent: %s", device, site,
                                mqtt.error_string(info.rc))
                continue
            self.counters["receipts"] += 1

    def _save_snapshots(self, every_site: bool = False) -> None:
        """Snapshot each site after a round, after ``update_interval`` new windows, or (``every_site``) at all."""
        interval = self.config.adaptation.update_interval
        for site, ingest in self._ingests.items():
            due = site in self._snapshot_due or ingest.unsaved >= interval or (every_site and ingest.unsaved)
            if due:
                self._save_snapshot(site, ingest)

    def _save_snapshot(self, site: str, ingest: SiteIngest) -> None:
        ingest.journal_id = self._committed_id
        path = snapshot_path(self.config.state_dir, site)
        try:
            write_snapshot(path, ingest.state())
            self._journal.discard_through(site, ingest.journal_id)
        except (OSError, sqlite3.Error) as error:
            self.counters["snapshot_errors"] += 1
            _LOGGER.error("site %s: writing the snapshot %s failed (%s); its windows stay in the journal",
                          site, path, error)
            return
        self._snapshot_due.discard(site)
        _LOGGER.debug("site %s: snapshot of %d windows written, journal rows through %d discarded", site,
                      ingest.unsaved, ingest.journal_id)
        ingest.unsaved = 0

    # Worker ------------------------------------------------------------------

    def _take_group(self) -> list[_Received]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        self._busy = True
        group = [first]
        while len(group) < GROUP_MESSAGES:
            try:
                group.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return group

    def _work(self) -> None:
        # Restored sites may have a round due. It runs once the station is
        # connected, so that a head it publishes reaches the broker at once.
        rounds_after_restore = True
        while not self._stop.is_set():
            self._publish_stats()
            if self._republish_due.is_set() and self.connected.is_set():
                self._republish_due.clear()
                self._republish_heads()
            group = self._take_group()
            if not group:
                if rounds_after_restore and self.connected.is_set():
                    rounds_after_restore = False
                    self._run_rounds()
                    self._save_snapshots()
                if self._flush_requested.is_set():
                    self._flush_requested.clear()
                    self._run_rounds(flush=True)
                    self._save_snapshots()
                    self.flush_done.set()
                continue
            staged: list[tuple[str, str, int, bytes]] = []
            handled: list[_Received] = []
            for received in group:
                try:
                    self._handle(received, staged)
                except Exception:
                    self.counters["ingest_errors"] += 1
                    _LOGGER.exception("base station failed on a message on %s", received.topic)
                handled.append(received)
                # Rounds come after every message, as the windows arrive, however the messages were grouped.
                # What was handled is committed and acknowledged first: a round takes seconds, and a broker
                # may give up waiting for a PUBACK (amqtt, the demo's broker, waits 5 s).
                if any(adapter.round_due() for adapter in self.sites.values()):
                    if not self._commit_and_acknowledge(staged, handled):
                        break
                    staged, handled = [], []
                    self._run_rounds()
            if handled:
                self._commit_and_acknowledge(staged, handled)
            self._busy = False
            # Only now, with the group committed, may a snapshot cover its windows.
            self._save_snapshots()

    def _commit_and_acknowledge(self, staged: list[tuple[str, str, int, bytes]], handled: list[_Received]) -> bool:
        """Commit the staged windows, then acknowledge the handled messages and send receipts; return whether committed."""
        committed = self._commit(staged)
        if committed:
            self._acknowledge(handled)
            self._send_receipts()
        self._receipts_due.clear()
        return committed

    # Lifecycle ---------------------------------------------------------------

    def request_flush(self) -> None:
        """Run a round for every site with any new embeddings once the queue is idle.

        ``flush_done`` is set when those rounds have run (and their heads, if
        accepted, are published).
        """
        self.flush_done.clear()
        self._flush_requested.set()

    def start(self) -> None:
        _LOGGER.info("base station starting: state in %s", self.config.state_dir)
        # Off unless DAWNCHORUS_TRACEMALLOC is set (benchmarks/station_memory.py).
        start_memory_trace()
        self._restore_sites()
        self._client.connect_async(self.config.broker_host, self.config.broker_port, keepalive=30)
        self._client.loop_start()
        self._worker = threading.Thread(target=self._work, name="base-station-worker", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
        self._publish_stats(force=True)
        self._client.disconnect()
        self._client.loop_stop()
        if self._worker is None or not self._worker.is_alive():
            self._save_snapshots(every_site=True)
            self._journal.close()
        self.feed.close()
        stats = self.stats()
        _LOGGER.info("base station stopped: counters %s, rejected messages by kind and reason %s",
                     stats.counters, stats.rejected)

    def health(self) -> str | None:
        """Return None while the worker thread runs, else what failed (for the service watchdog)."""
        if self._worker is None or not self._worker.is_alive():
            return "the base station's worker thread is not running"
        return None

    def idle(self) -> bool:
        """Return whether every received message has been handled."""
        return self._queue.empty() and not self._busy
