"""The base station's Prometheus metrics, read at each scrape from its counters and its ``LiveState``.

A custom collector (``prometheus_client``) turns the numbers the station
keeps anyway into metric families when ``/metrics`` is requested, so the
worker thread does no extra work per message. Counters count since the
process started, as Prometheus expects of a ``_total``.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from dawnchorus.protocol.messages import StationStats
from dawnchorus.server.live import LiveState

# Recorder states in which the recorder is connected to the broker: "finished" is a recorder whose replay
# ended and that still runs (with --stay, or while it sends what it queued).
CONNECTED_STATES = ("online", "finished")

# Station counters exported one to one: the counter key in BaseStation.counters, the metric name
# (without _total) and its help text.
_STATION_COUNTERS = (
    ("embeddings", "dawnchorus_embeddings_ingested", "Embedding windows accepted into the site buffers."),
    ("embeddings_duplicate", "dawnchorus_embeddings_duplicate",
     "Embedding windows dropped because their (device, sequence number) was already accepted."),
    ("rounds_failed", "dawnchorus_adaptation_rounds_failed", "Adaptation rounds that raised an error."),
    ("heads_discarded", "dawnchorus_heads_discarded",
     "Heads that passed the collapse guard but were discarded because a rollback was published during the round."),
    ("ingest_errors", "dawnchorus_ingest_errors", "Messages whose handling raised an unexpected error."),
    ("journal_errors", "dawnchorus_journal_errors", "Failed commits of the ingest journal (each one retried)."),
    ("snapshot_errors", "dawnchorus_snapshot_errors", "Failed writes of a site's buffer snapshot."),
)

# Per-site counters from LiveState: the key in its site summary, the metric name (without _total), the help.
_SITE_COUNTERS = (
    ("rounds", "dawnchorus_adaptation_rounds", "Adaptation rounds run."),
    ("blocked", "dawnchorus_adaptation_rounds_blocked", "Candidate heads blocked by the collapse guard."),
    ("published", "dawnchorus_heads_published", "Heads published to the site's recorders."),
    ("acks", "dawnchorus_heads_acknowledged", "Heads that a recorder verified and acknowledged as running."),
    ("head_rejections", "dawnchorus_heads_rejected_by_recorders", "Heads that a recorder rejected."),
    ("detections", "dawnchorus_detections", "Detections received from the site's recorders."),
)


class StationCollector(Collector):
    """Collects the station's metrics at scrape time.

    Args:
        stats: returns the station's counters and rejections (``BaseStation.stats``); thread-safe.
        live: the station's live state, for per-site and per-recorder numbers.
    """

    def __init__(self, stats: Callable[[], StationStats], live: LiveState):
        self._stats = stats
        self._live = live

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        live = self._live.metrics()

        for key, name, documentation in _STATION_COUNTERS:
            yield CounterMetricFamily(name, documentation, value=stats.counters.get(key, 0))

        rejected = CounterMetricFamily("dawnchorus_rejected_payloads",
                                       "Messages rejected as invalid, by message kind and reason.",
                                       labels=["kind", "reason"])
        for key, count in stats.rejected.items():
            kind, _, reason = key.partition(".")
            rejected.add_metric([kind, reason], count)
        yield rejected

        sites = sorted(live["sites"].items())
        for key, name, documentation in _SITE_COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=["site"])
            for site, summary in sites:
                family.add_metric([site], summary[key])
            yield family
        buffer = GaugeMetricFamily("dawnchorus_buffer_embeddings", "Embeddings in the site's rolling buffer.",
                                   labels=["site"])
        version = GaugeMetricFamily("dawnchorus_head_version", "Head version published for the site (0: source head).",
                                    labels=["site"])
        for site, summary in sites:
            buffer.add_metric([site], summary["buffer_size"])
            version.add_metric([site], summary["version"])
        yield buffer
        yield version

        yield from self._recorder_metrics(sorted(live["recorders"], key=lambda recorder: recorder["device"]))

    @staticmethod
    def _recorder_metrics(recorders: list[dict]) -> Iterator[Metric]:
        labels = ["site", "device"]
        online = GaugeMetricFamily("dawnchorus_recorder_online",
                                   "1 while the recorder's retained status is online or finished (connected), "
                                   "else 0.", labels=labels)
        last_seen = GaugeMetricFamily("dawnchorus_recorder_last_seen_timestamp_seconds",
                                      "Unix time of the recorder's newest message.", labels=labels)
        head = GaugeMetricFamily("dawnchorus_recorder_head_version", "Head version the recorder runs.",
                                 labels=labels)
        depth = GaugeMetricFamily("dawnchorus_recorder_queue_depth",
                                  "Messages in the recorder's store-and-forward queue (from its status).",
                                  labels=labels)
        dropped = CounterMetricFamily("dawnchorus_recorder_queue_dropped",
                                      "Messages the recorder dropped unsent over its life (from its status).",
                                      labels=labels)
        for recorder in recorders:
            ids = [recorder["site"], recorder["device"]]
            online.add_metric(ids, 1.0 if recorder["state"] in CONNECTED_STATES else 0.0)
            last_seen.add_metric(ids, recorder["last_seen"])
            head.add_metric(ids, recorder["head_version"] or 0)
            depth.add_metric(ids, recorder["queue_depth"])
            dropped.add_metric(ids, recorder["queue_dropped"])
        yield from (online, last_seen, head, depth, dropped)


def metrics_registry(stats: Callable[[], StationStats], live: LiveState) -> CollectorRegistry:
    """Return a registry with the station's collector and the process's memory, CPU and open files."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StationCollector(stats, live))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """Return the metrics in the Prometheus text format, and their content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
