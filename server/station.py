"""The base station: ingests embeddings, adapts each site's head, publishes heads.

paho's network thread only parses topics and queues messages. One worker
thread owns the sites (buffers, trainers) and does all decoding, adaptation
and publishing, so no lock guards the adaptation state. Sites can be split
across several base-station processes, and each owns the sites that a
stable hash of the site id assigns to its shard.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
import queue
import threading
import time
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
    StationStats,
    Status,
    decode_detections,
)
from dawnchorus.protocol.rejections import RejectionCounter
from dawnchorus.protocol.tls import TlsSettings
from dawnchorus.server.adaptation import AdaptationConfig, RoundResult, SiteAdapter
from dawnchorus.server.feed import DetectionFeed
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


class SequenceFilter:
    """Record of the sequence numbers accepted from each device.

    Per device, every number below ``floor`` was seen, and a set holds the
    numbers seen above it. The set shrinks as the floor advances, so memory
    stays small when numbers arrive roughly in order.
    """

    def __init__(self):
        self._floor: dict[str, int] = collections.defaultdict(int)
        self._above: dict[str, set[int]] = collections.defaultdict(set)

    def is_new(self, device: str, sequence: int) -> bool:
        return sequence >= self._floor[device] and sequence not in self._above[device]

    def add(self, device: str, sequence: int) -> None:
        above = self._above[device]
        above.add(sequence)
        floor = self._floor[device]
        while floor in above:
            above.discard(floor)
            floor += 1
        self._floor[device] = floor
        # A crashed recorder skips a block of numbers, which would keep the set
        # growing. Past 100,000 entries the floor jumps to the smallest one, so a
        # number in the skipped gap that still arrives later counts as a duplicate.
        if len(above) > 100_000:
            self._floor[device] = min(above)
            self.add(device, min(above))


@dataclasses.dataclass
class StationConfig:
    """Settings of a base-station process.

    Attributes:
        broker_host, broker_port: the MQTT broker.
        username, password: MQTT credentials, or None for an anonymous connection.
        tls: CA, client certificate and key for a TLS connection, or None for plain MQTT.
        state_dir: the head registry, acks and the detection log.
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
        self.sites: dict[str, SiteAdapter] = {}
        self.views: dict[str, SiteView] = collections.defaultdict(SiteView)
        self.recorders: dict[str, Status] = {}
        self.acks: dict[str, Ack] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.rejections = RejectionCounter(_LOGGER, "base station")
        self._rejections_lock = threading.Lock()
        self._stats_topic = topics.station_stats_topic(config.client_id)
        self._stats_published: tuple[dict[str, int], dict[str, int]] | None = None
        self._stats_time = 0.0
        self._seen = SequenceFilter()
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._flush_requested = threading.Event()
        self.flush_done = threading.Event()
        self._worker: threading.Thread | None = None
        self.connected = threading.Event()
        self._subscribe_mid: int | None = None
        # Per site, the sequence number of the newest published manifest that this process has seen.
        self._published_sequence: dict[str, int] = {}
        self._client = self._make_client()
        self._publisher = HeadPublisher(self._client, self.registry, config.signing_key)

    # MQTT ------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        # A persistent session: the broker queues recorders' QoS 1 messages while the
        # station is down and delivers them when it reconnects with the same client id.
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.config.client_id,
                             clean_session=False)
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
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            _LOGGER.warning("base station disconnected (%s); paho reconnects with backoff", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        try:
            parsed = topics.parse_device_topic(message.topic)
        except topics.TopicError as error:
            self._reject(message.topic, "?", "unknown", PayloadError(str(error), REASON_TOPIC))
            return
        if not self.config.shard.owns(parsed.site):
            return
        # Checked here, in paho's thread, so that an oversized message is never copied or queued.
        limit = MAX_PAYLOAD_BYTES if parsed.kind == "embeddings" else MAX_JSON_BYTES
        if len(message.payload) > limit:
            self._reject(message.topic, parsed.device, parsed.kind, PayloadError(
                f"{len(message.payload)} bytes exceed the {limit}-byte limit of {parsed.kind} messages",
                REASON_TOO_LARGE))
            return
        self._queue.put((parsed, bytes(message.payload)))

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
        self._published_sequence[site] = publication.sequence if publication is not None else 0
        self.sites[site] = adapter
        _LOGGER.info("site %s: %d classes, buffer of %d, a round every %d embeddings", site, len(labels),
                     self.config.adaptation.buffer_capacity, self.config.adaptation.update_interval)
        return adapter

    def _handle(self, parsed: topics.DeviceTopic, payload: bytes) -> None:
        try:
            if parsed.kind == "embeddings":
                self._ingest_embeddings(parsed, payload)
            elif parsed.kind == "detections":
                for detection in decode_detections(payload):
                    self.feed.add(detection)
            elif parsed.kind == "status":
                if payload:
                    self.recorders[parsed.device] = Status.decode(payload)
            elif parsed.kind == "ack":
                self._record_ack(parsed, Ack.decode(payload))
        except PayloadError as error:
            topic = topics.device_topic(parsed.site, parsed.device, parsed.kind)
            self._reject(topic, parsed.device, parsed.kind, error)

    def _ingest_embeddings(self, parsed: topics.DeviceTopic, payload: bytes) -> None:
        batch = decode_embeddings(payload)
        if batch.device != parsed.device or batch.site != parsed.site:
            raise PayloadError(f"header names device {batch.device} of site {batch.site}, "
                               f"the topic {parsed.device} of site {parsed.site}", REASON_IDS)
        dim = self.source_head.weights.shape[1]
        if batch.embeddings.shape[1] != dim:
            raise PayloadError(f"embeddings have {batch.embeddings.shape[1]} dimensions, the model's have {dim}",
                               REASON_DIM)
        fresh = [i for i, seq in enumerate(batch.sequence.tolist()) if self._seen.is_new(batch.device, seq)]
        self.counters["embeddings_duplicate"] += len(batch) - len(fresh)
        if not fresh:
            return
        adapter = self._site(batch.site)
        adapter.add(batch.embeddings[fresh].astype(np.float32))
        for i in fresh:
            self._seen.add(batch.device, int(batch.sequence[i]))
        self.counters["embeddings"] += len(fresh)
        self.views[batch.site].embeddings += len(fresh)

    def _record_ack(self, parsed: topics.DeviceTopic, ack: Ack) -> None:
        if ack.device != parsed.device or ack.site != parsed.site:
            raise PayloadError(f"ack names device {ack.device} of site {ack.site}, the topic another",
                               REASON_IDS)
        self.acks[ack.device] = ack
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

    def _follow_rollback(self, site: str, adapter: SiteAdapter) -> None:
        """Adopt a manifest that another process published for ``site``.

        After a rollback, the trainer goes back to the state of the version rolled back to.
        """
        publication = self.registry.publication(site)
        if publication is None or publication.sequence == self._published_sequence.get(site, 0):
            return
        self._published_sequence[site] = publication.sequence
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

    def _work(self) -> None:
        while not self._stop.is_set():
            self._publish_stats()
            try:
                parsed, payload = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._flush_requested.is_set():
                    self._flush_requested.clear()
                    self._run_rounds(flush=True)
                    self.flush_done.set()
                continue
            try:
                self._handle(parsed, payload)
            except Exception:
                self.counters["ingest_errors"] += 1
                _LOGGER.exception("base station failed on a %s message from device %s of site %s",
                                  parsed.kind, parsed.device, parsed.site)
            self._run_rounds()

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
        self.feed.close()
        stats = self.stats()
        _LOGGER.info("base station stopped: counters %s, rejected messages by kind and reason %s",
                     stats.counters, stats.rejected)

    def idle(self) -> bool:
        return self._queue.empty()
