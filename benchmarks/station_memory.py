"""Memory of a base station with full buffers: RSS per hour, per head, and what tracemalloc sees.

The soak (benchmarks/soak.py) measures every process of a fleet under
faults, and its 50 simulated recorders take most of a small machine. This
benchmark looks at the base station alone, so that its growth can be told
apart from noise and explained:

- Mosquitto with deploy/mosquitto/dawnchorus.conf on a loopback port, as in the soak.
- ``dawnchorus server run`` with the soak's sites and species lists. With
  ``--trace-interval``, ``DAWNCHORUS_TRACEMALLOC`` is set for it, so that it
  logs its traced Python memory and the allocation sites that grew
  (``server/memory_trace.py``). Tracing starts before TensorFlow is imported
  and keeps a record per live block, which added about 300 MiB of RSS and a
  slow growth of its own, so measure RSS slopes without it.
- A publisher in this process that sends what recorders send: BirdNET
  embeddings of the shared soundscapes (the soak's cache), 16 windows a
  message, and one detections message per embeddings message, for
  ``--sites`` x ``--recorders-per-site`` recorders at the field rate times
  ``--speed``. No recorder runs, so no head is acknowledged.

The buffers are full after ``--buffer`` windows per site; the growth is
measured from ``--warmup-minutes`` on, when they are. The report gives the
RSS slope per hour (least squares over the samples), the growth per head
published, and the traced (Python) and untraced (native) parts of the growth
from the station's last trace.

Usage:

    cd benchmarks
    ../.venv/bin/python station_memory.py --minutes 34 --warmup-minutes 6 --buffer 1000 --out memory.json
    ../.venv/bin/python station_memory.py --env MALLOC_ARENA_MAX=2 ...     # glibc arenas as an experiment
    ../.venv/bin/python station_memory.py --trace-interval 60 ...          # what grows, in station.log
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np

from soak import (BROKER_TEMPLATE, DEFAULT_DATA, SITE_LOCATIONS, ManagedProcess, broker_config, count_lines,
                  free_port, read_process, replay_embeddings, wait_for_port, wait_until)
from soak_recorders import WINDOW_SECONDS

_LOGGER = logging.getLogger("station_memory")

MIB = 2**20

# The station logs this once it has subscribed, and this for each head it published.
_READY = "base station ready"
_PUBLISHED = "published head"
_BASELINE = re.compile(r"memory trace baseline: rss ([\d.]+) MiB, traced ([\d.]+) MiB")
_TRACE = re.compile(r"memory trace: rss ([\d.]+) MiB \([-+\d.]+\), traced ([\d.]+) MiB")


class Publisher:
    """Sends embeddings and detections messages as ``recorders`` recorders would, on its own thread."""

    def __init__(self, port: int, recorders: list[tuple[str, str]], embeddings: np.ndarray, labels: dict[str, str],
                 hop_s: float, windows_per_message: int):
        import paho.mqtt.client as mqtt

        self._recorders = recorders
        self._embeddings = embeddings
        self._labels = labels
        self._hop_s = hop_s
        self._windows = windows_per_message
        self._stop = threading.Event()
        self.messages = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="station-memory-publisher")
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.client.loop_stop()
        self.client.disconnect()

    def _run(self) -> None:
        from dawnchorus.protocol import topics
        from dawnchorus.protocol.embeddings import EmbeddingBatch, encode_embeddings
        from dawnchorus.protocol.messages import Detection, encode_detections

        # Each recorder sends one message of `windows` windows per `windows * hop` seconds, spread over that time.
        period_s = self._windows * self._hop_s
        step_s = period_s / len(self._recorders)
        sequence = {device: 0 for device, _ in self._recorders}
        row = 0
        next_s = time.monotonic()
        while not self._stop.is_set():
            for device, site in self._recorders:
                wait_s = next_s - time.monotonic()
                if wait_s > 0 and self._stop.wait(wait_s):
                    return
                next_s += step_s
                first = sequence[device]
                numbers = np.arange(first, first + self._windows, dtype=np.uint64)
                rows = (np.arange(self._windows) + row) % len(self._embeddings)
                row += self._windows
                now = time.time()
                starts = now - self._hop_s * (self._windows - np.arange(self._windows, dtype=np.float64))
                batch = EmbeddingBatch(device, site, 0, numbers, starts, self._embeddings[rows])
                self.client.publish(topics.device_topic(site, device, "embeddings"), encode_embeddings(batch), qos=1)
                detection = Detection(device, site, first, float(starts[0]), float(starts[0]) + WINDOW_SECONDS,
                                      self._labels[site], 0.8, 0)
                self.client.publish(topics.device_topic(site, device, "detections"),
                                    encode_detections([detection]), qos=1)
                sequence[device] = first + self._windows
                self.messages += 1


def sample_memory(pid: int, log_path: pathlib.Path, origin: float, interval_s: float, samples: list,
                  stop: threading.Event) -> None:
    """Append (seconds, RSS bytes, CPU seconds, heads published so far) every ``interval_s`` until ``stop``."""
    while True:
        reading = read_process(pid)
        if reading is not None:
            heads = count_lines(log_path, _PUBLISHED)
            samples.append((round(time.monotonic() - origin, 1), reading[0], reading[1], heads))
        if stop.wait(interval_s):
            return


def summarize(samples: list[tuple[float, int, float, int]], warmup_s: float, log: str,
              trace_interval_s: float) -> dict:
    """Growth of the station's RSS after the warm-up, per hour, per head, and as traced by tracemalloc."""
    steady = [sample for sample in samples if sample[0] >= warmup_s]
    if len(steady) < 3:
        raise RuntimeError(f"only {len(steady)} RSS samples after the warm-up: run longer than --warmup-minutes")
    times = np.array([sample[0] for sample in steady])
    rss = np.array([sample[1] for sample in steady], dtype=np.float64) / MIB
    hours = (times[-1] - times[0]) / 3600
    slope = float(np.polyfit(times, rss, 1)[0]) * 3600
    heads = steady[-1][3] - steady[0][3]
    result = {
        "measured_from_s": float(times[0]),
        "measured_to_s": float(times[-1]),
        "rss_start_mib": round(float(rss[0]), 1),
        "rss_end_mib": round(float(rss[-1]), 1),
        "rss_growth_mib": round(float(rss[-1] - rss[0]), 1),
        "rss_slope_mib_per_hour": round(slope, 1),
        "cpu_s": steady[-1][2],
        "heads_published": heads,
        "heads_per_hour": round(float(heads / hours), 1),
        "rounds_in_run": log.count(" round ") + log.count("collapse guard blocked"),
    }
    if heads:
        result["rss_kib_per_head"] = round(float(slope * 1024 / (heads / hours)), 1)
    # The station's traces, every trace_interval_s from its start: (RSS, traced) in MiB. Those
    # after the warm-up split the growth into Python's (traced) and native (untraced) allocations.
    baseline = _BASELINE.search(log)
    traces = [(float(rss), float(traced)) for rss, traced in _TRACE.findall(log)]
    if baseline is not None and trace_interval_s > 0:
        traces.insert(0, (float(baseline.group(1)), float(baseline.group(2))))
        steady_traces = [trace for index, trace in enumerate(traces) if (index + 1) * trace_interval_s >= warmup_s]
        if len(steady_traces) >= 2:
            (rss_first, traced_first), (rss_last, traced_last) = steady_traces[0], steady_traces[-1]
            result["trace"] = {"traces": len(steady_traces), "rss_growth_mib": round(rss_last - rss_first, 1),
                               "traced_growth_mib": round(traced_last - traced_first, 1),
                               "untraced_growth_mib": round(rss_last - rss_first - traced_last + traced_first, 1),
                               "traced_end_mib": traced_last}
    result["hours"] = round(float(hours), 3)
    return result


def run(args: argparse.Namespace) -> dict:
    from dawnchorus.models import birdnet
    from dawnchorus.models.species import Location, species_from_range_model
    from dawnchorus.protocol.signing import generate_key_files

    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="dawnchorus-station-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    _LOGGER.info("run directory %s", work)
    embeddings = np.load(replay_embeddings(args.data, args.cache_dir)).astype(np.float16)
    files = birdnet.locate_birdnet_files()
    labels = birdnet.read_labels(files.labels)
    sites = [f"memory-{index + 1}" for index in range(args.sites)]
    species_files, detected = {}, {}
    for index, site in enumerate(sites):
        species = species_from_range_model(files.range_model, labels, Location(*SITE_LOCATIONS[index % 5]))
        species_files[site] = work / f"species-{site}.txt"
        species_files[site].write_text("\n".join(species) + "\n")
        detected[site] = species[0]
    private_key, _ = generate_key_files(work / "keys")

    port = free_port()
    broker_dir = work / "broker"
    broker_dir.mkdir(exist_ok=True)
    (broker_dir / "mosquitto.conf").write_text(broker_config(BROKER_TEMPLATE.read_text(), port, broker_dir))
    broker = ManagedProcess("mosquitto", [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                                          str(broker_dir / "mosquitto.conf")], broker_dir / "stdout.log")
    broker.start()
    if not wait_for_port(port, 30):
        raise RuntimeError(f"mosquitto did not listen on port {port}; see {broker.log_path}")

    argv = [sys.executable, "-m", "dawnchorus", "server", "run", "--broker", f"127.0.0.1:{port}",
            "--state-dir", str(work / "station"), "--signing-key", str(private_key),
            "--buffer", str(args.buffer), "--update-interval", str(args.update_interval)]
    for site in sites:
        argv += ["--site-species", f"{site}=@{species_files[site]}"]
    extra = dict(entry.split("=", 1) for entry in args.env)
    if args.trace_interval > 0:
        extra["DAWNCHORUS_TRACEMALLOC"] = str(args.trace_interval)
    os.environ.update(extra)
    station = ManagedProcess("base station", argv, work / "station.log")
    station.start()
    if not wait_until(lambda: count_lines(station.log_path, _READY) > 0 or station.pid is None, 300):
        raise RuntimeError(f"the base station did not subscribe; see {station.log_path}")

    recorders = [(f"{site}-rec-{number + 1:02d}", site) for site in sites for number in range(args.recorders_per_site)]
    publisher = Publisher(port, recorders, embeddings, detected, WINDOW_SECONDS / args.speed, args.windows_per_message)
    origin = time.monotonic()
    samples: list[tuple[float, int, float, int]] = []
    stop_sampling = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(station.pid, station.log_path, origin,
                                                           args.sample_interval, samples, stop_sampling), daemon=True)
    sampler.start()
    publisher.start()
    try:
        time.sleep(args.minutes * 60)
    finally:
        publisher.stop()
        stop_sampling.set()
        sampler.join(timeout=10)
        station.stop(signal.SIGTERM, timeout_s=120)
        broker.stop(signal.SIGTERM)

    log = station.log_path.read_text(errors="replace")
    result = {
        "command": " ".join(["python", *sys.argv]),
        "settings": {key: (str(value) if isinstance(value, pathlib.Path) else value)
                     for key, value in vars(args).items()},
        "recorders": len(recorders),
        "messages_sent": publisher.messages,
        "windows_sent": publisher.messages * args.windows_per_message,
        "station": summarize(samples, args.warmup_minutes * 60, log, args.trace_interval),
        "samples": samples,
        "work_dir": str(work),
    }
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=12.0, help="length of the run (default 12)")
    parser.add_argument("--warmup-minutes", type=float, default=4.0,
                        help="minutes left out of the growth; the buffers must be full by then (default 4)")
    parser.add_argument("--sites", type=int, default=5, help="sites (default 5)")
    parser.add_argument("--recorders-per-site", type=int, default=10, help="recorders per site (default 10)")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="rate as a multiple of one window per recorder every 3 s (default 1)")
    parser.add_argument("--windows-per-message", type=int, default=16, help="windows per message (default 16)")
    parser.add_argument("--buffer", type=int, default=300, help="the station's --buffer (default 300)")
    parser.add_argument("--update-interval", type=int, default=64, help="the station's --update-interval (default 64)")
    parser.add_argument("--trace-interval", type=float, default=0.0,
                        help="seconds between the station's tracemalloc traces, which its log lists; tracing "
                             "inflates the RSS (default 0: off)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the station, e.g. MALLOC_ARENA_MAX=2; repeatable")
    parser.add_argument("--sample-interval", type=float, default=5.0, help="seconds between RSS samples (default 5)")
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA,
                        help="recordings whose BirdNET embeddings are replayed (default ../shared/data/soundscapes)")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None,
                        help="embedding cache (default ~/.cache/dawnchorus/soak, as the soak's)")
    parser.add_argument("--work-dir", type=pathlib.Path, default=None, help="run directory (default: a new one)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the results as JSON to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    for entry in args.env:
        if "=" not in entry:
            raise SystemExit(f"--env {entry!r}: give NAME=VALUE")
    if args.minutes <= args.warmup_minutes:
        raise SystemExit(f"--minutes {args.minutes:g} must be above --warmup-minutes {args.warmup_minutes:g}")
    if args.cache_dir is None:
        from dawnchorus.models.birdnet import default_cache_dir
        args.cache_dir = default_cache_dir() / "soak"

    result = run(args)
    station = result["station"]
    print(json.dumps({key: value for key, value in result.items() if key != "samples"}, indent=1))
    print(f"\nbase station RSS {station['rss_slope_mib_per_hour']:+.1f} MiB/h with full buffers "
          f"({station['rss_growth_mib']:+.1f} MiB over {station['hours'] * 60:.1f} min, "
          f"{station['heads_published']} heads published, {station.get('rss_kib_per_head', float('nan')):.0f} KiB "
          "per head)")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
