"""State of the live web page: recent detections, recorders, per-site adaptation, species counts.

The station's worker thread owns the adaptation state and reports to a
``LiveState`` through its methods (a detection, a status, a round, a head).
``LiveState`` keeps its own bounded copy of what the page needs, under its
own lock, so the web server's threads never read the worker's buffers,
trainers or counters. Each change is also encoded once as a server-sent event
and queued to every subscriber (an open page).

Memory stays flat: the recent detections, the rounds and heads of each site,
and the days of species counts are capped below.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import pathlib
import queue
import threading
import time
from typing import Any, Iterable

from dawnchorus.protocol.messages import Ack, Detection, Status

_LOGGER = logging.getLogger(__name__)

# A page that opens gets this many of the newest detections. Older ones are in
# detections.jsonl. Each costs about 300 bytes in memory and in the first event.
MAX_DETECTIONS = 500

# Rounds and head versions kept per site for the tables and plots. A recorder
# sends 28,800 windows a day, so with a round every 256 windows a site runs
# about 110 rounds a day per recorder: 500 rounds are 4 days of one recorder,
# or half a day of ten.
MAX_ROUNDS = 500
MAX_HEADS = 200

# Days of species counts per site. A month covers what a field team compares.
MAX_DAYS = 31

# At start the counts and the recent detections are rebuilt from the end of
# detections.jsonl. 32 MiB are about 110,000 detections of 300 bytes, which
# took 0.8 s to read on a 2-core x86 machine.
SEED_BYTES = 32 * 2**20

# Open pages at once. Each one keeps a server thread busy, so the server rejects more with HTTP 503.
MAX_SUBSCRIBERS = 32

# Events queued for one page. A page that falls this far behind is
# disconnected; its browser reconnects and starts again from a fresh snapshot.
SUBSCRIBER_QUEUE = 1000

# Round statistics shown on the page and plotted; the rest of RoundResult.stats stays in the registry.
ROUND_STATS = (
    "mean_pseudo_label", "mean_teacher_score", "pseudo_label_top_changed", "windows_with_mutual_neighbour",
    "mean_mutual_neighbours", "mean_prior_shift", "loss", "candidate_mean_top_score", "source_mean_top_score",
    "candidate_positive_rate", "source_positive_rate", "candidate_detections_per_window",
    "source_detections_per_window", "confident_agreement", "round_s",
)


class TooManySubscribers(RuntimeError):
    """Raised by ``LiveState.subscribe`` when ``MAX_SUBSCRIBERS`` pages are already open."""


def _finite(value: Any) -> float | None:
    """Return ``value`` as a float, or None where JSON cannot carry it (NaN, infinity)."""
    number = float(value)
    return number if math.isfinite(number) else None


def day_of(timestamp: float) -> str | None:
    """Return the base station's local calendar day of a unix time as YYYY-MM-DD, or None if out of range."""
    try:
        return time.strftime("%Y-%m-%d", time.localtime(timestamp))
    except (OverflowError, ValueError, OSError):
        # A recorder's clock can be wildly wrong; the detection is still shown, just not counted.
        return None


def _detection_row(detection: Detection) -> dict[str, Any]:
    return {
        "time": detection.start_time,
        "day": day_of(detection.start_time),
        "site": detection.site,
        "device": detection.device,
        "label": detection.label,
        "scientific_name": detection.scientific_name,
        "common_name": detection.common_name,
        "confidence": round(float(detection.confidence), 4),
        "head_version": detection.head_version,
    }


def _is_stale_will(status: Status, recorder: dict[str, Any]) -> bool:
    """Return whether ``status`` is an offline status older than the recorder's last known status.

    An offline status that the recorder published itself on stopping is newer
    than every status before it, so its counts replace the known ones.
    """
    known_time = recorder["status_time"]
    return status.state == "offline" and known_time is not None and status.time < known_time


class Subscriber:
    """One open page: a bounded queue of encoded events.

    ``closed`` is set when the page fell ``SUBSCRIBER_QUEUE`` events behind or
    the web server stops; the reader then ends the stream.
    """

    def __init__(self):
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=SUBSCRIBER_QUEUE)
        self.closed = False

    def put(self, event: bytes) -> None:
        if self.closed:
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.close()

    def close(self) -> None:
        self.closed = True
        # Wake the reader. Dropping one event to make room is fine: the stream ends anyway.
        while True:
            try:
                self._queue.put_nowait(None)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass

    def get(self, timeout: float) -> bytes | None:
        """Return the next event, or None after ``timeout`` seconds or once closed."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


def encode_event(kind: str, data: Any) -> bytes:
    """Encode one server-sent event: its type and one line of JSON."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n".encode()


@dataclasses.dataclass
class _Site:
    """The page's view of one site.

    ``rounds``, ``blocked``, ``published``, ``acks`` and ``head_rejections``
    count since the process started (the metrics' counters). ``round_history``
    and ``heads`` also hold what was read back from the registry at start.
    """

    version: int = 0
    buffer_size: int = 0
    embeddings: int = 0
    rounds: int = 0
    blocked: int = 0
    published: int = 0
    acks: int = 0
    head_rejections: int = 0
    detections: int = 0
    last_decision: str = ""
    round_history: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=MAX_ROUNDS))
    heads: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=MAX_HEADS))

    def summary(self, site: str) -> dict[str, Any]:
        return {
            "site": site, "version": self.version, "buffer_size": self.buffer_size, "embeddings": self.embeddings,
            "rounds": self.rounds, "blocked": self.blocked, "published": self.published, "acks": self.acks,
            "head_rejections": self.head_rejections, "detections": self.detections,
            "last_decision": self.last_decision,
        }


class LiveState:
    """Thread-safe, bounded state of the live page, fed by the station's worker.

    Args:
        station: the station's MQTT client id, shown on the page.
    """

    def __init__(self, station: str):
        self.station = station
        self._lock = threading.Lock()
        self._detections: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_DETECTIONS)
        self._recorders: dict[str, dict[str, Any]] = {}
        self._sites: dict[str, _Site] = {}
        # day -> site -> label -> count; at most MAX_DAYS days.
        self._counts: dict[str, dict[str, collections.Counter[str]]] = {}
        self._counts_since: float | None = None
        self._subscribers: set[Subscriber] = set()
        self.started = time.time()

    # Reports from the station's worker -------------------------------------

    def _site(self, site: str) -> _Site:
        view = self._sites.get(site)
        if view is None:
            view = self._sites[site] = _Site()
        return view

    def _emit(self, kind: str, data: Any) -> None:
        """Queue an event to every page. Call it holding ``_lock``, so events keep their order."""
        if not self._subscribers:
            return
        event = encode_event(kind, data)
        for subscriber in list(self._subscribers):
            subscriber.put(event)
            if subscriber.closed:
                self._subscribers.discard(subscriber)
                _LOGGER.warning("live page fell %d events behind and was disconnected; it reconnects with a "
                                "fresh snapshot", SUBSCRIBER_QUEUE)

    def _count(self, row: dict[str, Any]) -> None:
        day = row["day"]
        if day is None:
            return
        if day not in self._counts:
            if len(self._counts) >= MAX_DAYS and day < min(self._counts):
                return
            self._counts[day] = {}
            while len(self._counts) > MAX_DAYS:
                del self._counts[min(self._counts)]
        self._counts[day].setdefault(row["site"], collections.Counter())[row["label"]] += 1
        if self._counts_since is None or row["time"] < self._counts_since:
            self._counts_since = row["time"]

    def detection(self, detection: Detection) -> None:
        row = _detection_row(detection)
        with self._lock:
            self._detections.append(row)
            self._count(row)
            self._site(detection.site).detections += 1
            self._emit("detection", row)

    def seen(self, site: str, device: str, when: float | None = None) -> None:
        """Record that a message of ``device`` arrived now, or was sent at ``when``.

        ``last_seen`` never moves back, so an old retained status that the
        broker delivers again after a reconnect does not hide newer messages.
        """
        when = time.time() if when is None else when
        with self._lock:
            recorder = self._recorders.get(device)
            if recorder is None:
                recorder = self._recorders[device] = {
                    "device": device, "site": site, "state": "unknown", "last_seen": when, "status_time": None,
                    "head_version": None, "windows": 0, "queue_depth": 0, "queue_bytes": 0, "queue_dropped": 0,
                    "queue_dropped_windows": 0,
                }
                self._emit("recorder", recorder)
                return
            recorder["site"] = site
            if when <= recorder["last_seen"]:
                return
            # The page updates "last seen" itself between events, so a change below a second is not sent.
            send = when - recorder["last_seen"] >= 1.0
            recorder["last_seen"] = when
            if send:
                self._emit("recorder", recorder)

    def status(self, site: str, device: str, status: Status) -> None:
        """Record a recorder's status. ``site`` and ``device`` come from the topic, which the broker's ACL checks."""
        # A retained status may be old (a last will, or a status delivered again after a
        # reconnect), so it counts as seen when the recorder sent it, by its own clock.
        # A clock ahead of the station's would stop last_seen from moving, so it is capped at now.
        self.seen(site, device, min(status.time, time.time()) if status.time else None)
        with self._lock:
            recorder = self._recorders[device]
            if _is_stale_will(status, recorder):
                # The broker publishes the last will that the recorder set when it connected, so
                # its head version and counts are those of that moment. Only the state is news.
                recorder.update(state=status.state)
                self._emit("recorder", recorder)
                return
            recorder.update(
                state=status.state, status_time=status.time or None, head_version=status.head_version,
                windows=status.windows, queue_depth=status.queue_depth, queue_bytes=status.queue_bytes,
                queue_dropped=status.queue_dropped, queue_dropped_windows=status.queue_dropped_windows,
            )
            self._emit("recorder", recorder)

    def ack(self, ack: Ack) -> None:
        self.seen(ack.site, ack.device)
        with self._lock:
            site = self._site(ack.site)
            if ack.accepted:
                site.acks += 1
                self._recorders[ack.device]["head_version"] = ack.version
                self._emit("recorder", self._recorders[ack.device])
            else:
                site.head_rejections += 1
            self._emit("site", site.summary(ack.site))

    def buffer(self, site: str, buffer_size: int, embeddings: int) -> None:
        """Record a site's buffer size and the embeddings it accepted since start."""
        with self._lock:
            view = self._site(site)
            view.buffer_size = buffer_size
            view.embeddings += embeddings
            self._emit("site", view.summary(site))

    def round(self, site: str, version: int, accepted: bool, decision: str, stats: dict[str, float],
              buffer_size: int, when: float | None = None) -> None:
        """Record an adaptation round: the candidate ``version``, the guard's decision and why.

        Args:
            accepted: whether the collapse guard passed the candidate.
            decision: "published", the guard's reason for blocking, or why a passed head was discarded.
            stats: the round's statistics (``RoundResult.stats``).
        """
        entry = {
            "time": time.time() if when is None else when, "version": version, "accepted": accepted,
            "published": decision == "published", "decision": decision, "buffer_size": buffer_size,
            "stats": {name: _finite(stats[name]) for name in ROUND_STATS if name in stats},
        }
        with self._lock:
            view = self._site(site)
            view.rounds += 1
            view.blocked += not accepted
            view.last_decision = decision
            view.round_history.append(entry)
            self._emit("round", {"site": site, **entry})
            self._emit("site", view.summary(site))

    def head(self, site: str, version: int, parent: int, created: float, precision: str = "",
             size: int = 0, rollback: bool = False, published_here: bool = True) -> None:
        """Record a head version published for ``site``.

        Args:
            parent: the version the head was adapted from, or for a rollback the version it replaced.
            rollback: whether ``dawnchorus server rollback`` published it.
            published_here: whether this station published it; only those count in ``published``.
        """
        entry = {"version": version, "parent": parent, "time": created, "precision": precision, "size": size,
                 "rollback": rollback}
        with self._lock:
            view = self._site(site)
            view.version = version
            if published_here:
                view.published += 1
            view.heads.append(entry)
            self._emit("head", {"site": site, **entry})
            self._emit("site", view.summary(site))

    # Restoring after a restart ---------------------------------------------

    def seed_site(self, site: str, records: Iterable[Any], version: int) -> None:
        """Load a site's head history from the registry, oldest first, without counting it as new.

        Args:
            records: ``HeadRecord`` objects; each becomes a head and an accepted round.
            version: the version the site runs now (after a rollback, not the newest).
        """
        with self._lock:
            view = self._site(site)
            view.version = version
            for record in records:
                view.heads.append({"version": record.version, "parent": record.parent, "time": record.created,
                                   "precision": record.precision, "size": record.size, "rollback": False})
                view.round_history.append({
                    "time": record.created, "version": record.version, "accepted": True, "published": True,
                    "decision": "published", "buffer_size": record.buffer_size,
                    "stats": {name: _finite(record.stats[name]) for name in ROUND_STATS if name in record.stats},
                })
            self._emit("site_history", self._site_state(site, view))

    def seed_site_from_registry(self, registry: Any, site: str, version: int) -> None:
        """Load the newest ``MAX_HEADS`` head records of ``site`` from a ``HeadRegistry`` (see ``seed_site``)."""
        records = []
        for number in registry.versions(site)[-MAX_HEADS:]:
            try:
                records.append(registry.record(site, number))
            except (OSError, ValueError, TypeError) as error:
                _LOGGER.warning("live page: site %s head v%d's record cannot be read (%s); it is left out",
                                site, number, error)
        self.seed_site(site, records, version)

    def seed_detections(self, path: pathlib.Path, max_bytes: int = SEED_BYTES) -> int:
        """Rebuild the recent detections and the counts from the last ``max_bytes`` of a detection log.

        Returns the number of detections read. Lines that are not valid
        detections are skipped. This program writes the log, so such a line
        can only be one that a crash cut short.
        """
        path = pathlib.Path(path)
        if not path.is_file():
            return 0
        with open(path, "rb") as stream:
            size = stream.seek(0, os.SEEK_END)
            stream.seek(max(0, size - max_bytes))
            if size > max_bytes:
                stream.readline()  # the first line is probably cut
            lines = stream.read().splitlines()
        read = 0
        with self._lock:
            for line in lines:
                try:
                    record = json.loads(line)
                    detection = Detection(**{field.name: record[field.name]
                                             for field in dataclasses.fields(Detection)})
                    row = _detection_row(detection)
                except (ValueError, KeyError, TypeError):
                    continue
                self._detections.append(row)
                self._count(row)
                read += 1
        if read:
            _LOGGER.info("live page: %d detections read back from %s", read, path)
        return read

    # Readers: the web server's threads ---------------------------------------
    #
    # Detection rows, rounds and heads are never changed once appended, so a
    # snapshot shares them and copies only the containers and the recorder
    # rows. The lock is then held for copying, and the JSON encoding of a
    # large snapshot happens outside it, where it cannot stall the worker.

    @staticmethod
    def _site_state(site: str, view: _Site) -> dict[str, Any]:
        return {**view.summary(site), "rounds_history": list(view.round_history), "heads": list(view.heads)}

    def _snapshot(self) -> dict[str, Any]:
        return {
            "station": self.station,
            "time": time.time(),
            "started": self.started,
            "detections": list(self._detections),
            "recorders": sorted((dict(recorder) for recorder in self._recorders.values()),
                                key=lambda recorder: recorder["device"]),
            "sites": {site: self._site_state(site, view) for site, view in sorted(self._sites.items())},
            "counts": {day: {site: dict(labels) for site, labels in sites.items()}
                       for day, sites in sorted(self._counts.items())},
            "counts_since": self._counts_since,
        }

    def snapshot(self) -> dict[str, Any]:
        """Return everything the page shows, as data for ``json.dumps``. Treat it as read-only."""
        with self._lock:
            return self._snapshot()

    def subscribe(self) -> tuple[Subscriber, dict[str, Any]]:
        """Open an event stream. Returns it with a snapshot taken at the same instant, so no event is lost.

        Raises TooManySubscribers past ``MAX_SUBSCRIBERS``.
        """
        with self._lock:
            if len(self._subscribers) >= MAX_SUBSCRIBERS:
                raise TooManySubscribers(f"{MAX_SUBSCRIBERS} live pages are open already")
            subscriber = Subscriber()
            self._subscribers.add(subscriber)
            return subscriber, self._snapshot()

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    def close_subscribers(self) -> None:
        """End every open event stream, e.g. when the web server stops."""
        with self._lock:
            for subscriber in self._subscribers:
                subscriber.close()
            self._subscribers.clear()

    def metrics(self) -> dict[str, Any]:
        """Return the per-site counters and the recorders for the Prometheus collector."""
        with self._lock:
            return {
                "sites": {site: view.summary(site) for site, view in self._sites.items()},
                "recorders": [dict(recorder) for recorder in self._recorders.values()],
            }
