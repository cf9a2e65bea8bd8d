"""Soak of the whole fleet: simulated recorders, a real Mosquitto and a real base station, with restarts.

What runs, all on 127.0.0.1:

- Mosquitto with deploy/mosquitto/dawnchorus.conf, adapted to listen on a
  free loopback port, to accept anonymous clients (the soak tests delivery,
  not access control), to log to a file and to keep its database in the run
  directory. Persistence stays on with the file's autosave interval.
- ``dawnchorus server run`` with a fresh signing key, a state directory and a
  species list per site from BirdNET's range model.
- One or more recorder-simulator processes (this script with ``--worker``).
  Each runs the real ``edge.recorder.Recorder`` once per simulated recorder,
  in its own threads, with its own state directory, outbox, uplink and
  sequence numbers. Only the audio and the backbone are replaced: the source
  releases one window per hop, and the backbone returns embeddings that
  BirdNET computed once from the recordings in ../shared/data/soundscapes
  (cached under ~/.cache/dawnchorus/soak). Pushed heads go through the
  recorder's own checks (signature, sha256, LiteRT load, probe outputs), and
  the recorder acknowledges them.
- An audit subscriber in this process: a persistent MQTT session that records
  every embedding window, manifest and ack that the broker delivers. It tells
  a loss in the broker from one in the base station.

During the sending phase the script restarts the broker (SIGTERM by default,
or SIGKILL with ``--broker-signal kill``) and SIGKILLs the base station, each
after a short outage and at configurable times. At the end it stops the
sources, waits until every outbox is empty and the base station has accepted
every window, waits for the heads to settle, and stops everything. It then
reports windows sent, accepted by the base station (from ``dawnchorus server
inspect``), lost and duplicated in the base station's buffers, heads pushed
and acknowledged per site, and the RSS of each process over time.

Usage:

    .venv/bin/python benchmarks/soak.py --minutes 10 --out soak.json
    .venv/bin/python benchmarks/soak.py --minutes 1      # smoke run, about 3 minutes in all
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable, Iterator

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "soundscapes"
BROKER_TEMPLATE = REPO / "deploy" / "mosquitto" / "dawnchorus.conf"
WINDOW_SECONDS = 3.0
MIB = 2**20

_LOGGER = logging.getLogger("soak")

# (latitude, longitude, week) of each site's range-model species list, cycled
# over the sites. The lists keep pushed heads at site size (a few hundred
# classes, well under 1 MB) as in a deployment; 50 recorders with heads of all
# 6522 classes would hold 50 interpreters of 13 MB each.
# The two places and the weeks are ones where the replayed recordings' species
# are on the list: with lists that miss them, the collapse guard blocks every
# candidate head, and the soak would push no heads at those sites.
SITE_LOCATIONS = (
    (47.68, -122.29, 20),
    (45.50, -73.57, 20),
    (47.68, -122.29, 24),
    (45.50, -73.57, 24),
    (47.68, -122.29, 16),
)

# Embedding windows per backbone call while the cache is built.
_CACHE_BATCH = 8

# Poll interval of the control files and of the end-of-run conditions.
_POLL_S = 0.5


# Replayed embeddings ---------------------------------------------------------------------------


def replay_embeddings(data_dir: pathlib.Path, cache_dir: pathlib.Path) -> pathlib.Path:
    """Return the cache file of BirdNET embeddings [windows, 1024] float32 of every recording in ``data_dir``.

    The cache is keyed by the recordings' relative paths and sizes and is
    computed with the real backbone on first use.
    """
    from dawnchorus.edge.audio import find_audio_files

    files = find_audio_files([data_dir])
    if not files:
        raise ValueError(f"no audio files found in {data_dir}: pass --data with a folder of recordings")
    key = hashlib.sha256("\n".join(f"{path.relative_to(data_dir)}:{path.stat().st_size}"
                                   for path in files).encode()).hexdigest()[:16]
    cache = cache_dir / f"embeddings-{key}.npy"
    if cache.is_file():
        return cache

    from dawnchorus.edge.audio import FileSource
    from dawnchorus.models.backbone import Backbone, load_source_model

    _LOGGER.info("computing BirdNET embeddings of %d recordings in %s (once; cached in %s)", len(files),
                 data_dir, cache)
    started = time.monotonic()
    backbone = Backbone(load_source_model().backbone)
    batches: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    for window in FileSource([data_dir]):
        pending.append(window.samples)
        if len(pending) == _CACHE_BATCH:
            batches.append(backbone.embed(np.stack(pending)))
            pending = []
    if pending:
        batches.append(backbone.embed(np.stack(pending)))
    embeddings = np.concatenate(batches).astype(np.float32)

    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(cache.name + ".partial")
    with open(partial, "wb") as stream:
        np.save(stream, embeddings)
    os.replace(partial, cache)
    _LOGGER.info("cached %d embeddings in %.0f s", len(embeddings), time.monotonic() - started)
    return cache


class ReplayBackbone:
    """Stands in for the BirdNET backbone: returns cached embeddings.

    A replayed window carries one sample, the row of its embedding in the
    cache, so that windows cost no audio memory.
    """

    def __init__(self, embeddings: np.ndarray):
        self._embeddings = embeddings
        self.embedding_dim = int(embeddings.shape[1])

    def embed(self, windows: np.ndarray) -> np.ndarray:
        """Return embeddings [n, 1024] float32 for windows [n, 1] that hold cache rows."""
        return self._embeddings[np.asarray(windows)[:, 0].astype(np.int64)].copy()


class ReplaySource:
    """Releases one window per hop, on a fixed schedule, until ``stop`` is set.

    A window is released at ``start + start_delay_s + i * hop_s``. When the
    recorder falls behind, later windows are released at once and the
    largest delay is kept in ``max_lag_s``.
    """

    def __init__(self, windows_cached: int, first_row: int, hop_s: float, start_delay_s: float,
                 stop: threading.Event):
        self._windows_cached = windows_cached
        self._first_row = first_row
        self._hop_s = hop_s
        self._start_delay_s = start_delay_s
        self._stop = stop
        self.max_lag_s = 0.0

    def __iter__(self) -> Iterator:
        from dawnchorus.edge.audio import Window

        start = time.monotonic() + self._start_delay_s
        index = 0
        while True:
            due = start + index * self._hop_s
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            self.max_lag_s = max(self.max_lag_s, time.monotonic() - due)
            row = (self._first_row + index) % self._windows_cached
            yield Window(samples=np.array([row], dtype=np.float32), source=f"replay:{row}",
                         offset_s=index * WINDOW_SECONDS, start_time=time.time())
            index += 1


# Recorder-simulator process ------------------------------------------------------------------------


def _outbox_counts(path: pathlib.Path) -> dict[str, int]:
    """Read a recorder's outbox database: queued entries and the sequence and drop counters."""
    database = sqlite3.connect(path, timeout=10)
    try:
        depth = database.execute("SELECT count(*) FROM entries").fetchone()[0]
        counters = dict(database.execute("SELECT name, value FROM counters").fetchall())
    finally:
        database.close()
    return {"queue_depth": int(depth), "next_sequence": int(counters.get("next_sequence", 0)),
            "dropped": int(counters.get("dropped", 0)), "dropped_windows": int(counters.get("dropped_windows", 0))}


def run_worker(spec_path: pathlib.Path) -> int:
    """Run the simulated recorders that ``spec_path`` lists until the control files say stop."""
    from dawnchorus.edge.recorder import Recorder, RecorderConfig
    from dawnchorus.models.backbone import load_source_model
    from dawnchorus.models.species import species_from_file
    from dawnchorus.protocol.signing import load_public_key

    spec = json.loads(spec_path.read_text())
    control = pathlib.Path(spec["control_dir"])
    name = spec["name"]
    embeddings = np.load(spec["embeddings"])
    backbone = ReplayBackbone(embeddings)
    source_head = load_source_model().head
    public_key = load_public_key(pathlib.Path(spec["public_key"]))
    stop_sending = threading.Event()

    site_heads = {}
    recorders: list[tuple[Recorder, ReplaySource]] = []
    for entry in spec["recorders"]:
        site = entry["site"]
        if site not in site_heads:
            site_heads[site] = source_head.select(species_from_file(pathlib.Path(entry["species_file"]),
                                                                    source_head.labels))
        head = site_heads[site]
        config = RecorderConfig(
            device=entry["device"], site=site, broker_host="127.0.0.1", broker_port=spec["broker_port"],
            state_dir=pathlib.Path(spec["state_dir"]), head_public_key=public_key, head_labels=list(head.labels),
            windows_per_message=spec["windows_per_message"],
        )
        source = ReplaySource(len(embeddings), entry["first_row"], spec["hop_s"], entry["start_delay_s"],
                              stop_sending)
        recorders.append((Recorder(config, backbone, head, source), source))

    def run_recorder(recorder: Recorder) -> None:
        try:
            recorder.run(stay_after_source=True)
        except Exception:
            _LOGGER.exception("simulated recorder %s failed", recorder.config.device)

    threads = [threading.Thread(target=run_recorder, args=(recorder,), name=recorder.config.device, daemon=True)
               for recorder, _ in recorders]
    for thread in threads:
        thread.start()
    (control / f"{name}.started").write_text(str(time.time()))
    _LOGGER.info("%s: %d simulated recorders started", name, len(recorders))

    def report() -> list[dict]:
        rows = []
        for recorder, source in recorders:
            device = recorder.config.device
            row = {"device": device, "site": recorder.config.site, "windows": recorder.counters["windows"],
                   "head_version": recorder.head_version, "heads_applied": recorder.counters["heads_applied"],
                   "heads_rejected": recorder.counters["heads_rejected"], "max_lag_s": round(source.max_lag_s, 2)}
            row.update(_outbox_counts(pathlib.Path(spec["state_dir"]) / device / "outbox.sqlite3"))
            rows.append(row)
        return rows

    while not (control / "stop-sending").exists() and not (control / "exit").exists():
        time.sleep(_POLL_S)
    stop_sending.set()
    _LOGGER.info("%s: sources stopped, waiting for the outboxes to drain", name)

    deadline = time.monotonic() + spec["drain_timeout_s"]
    while time.monotonic() < deadline and not (control / "exit").exists():
        finished = all(recorder.finished.is_set() for recorder, _ in recorders)
        if finished and all(row["queue_depth"] == 0 for row in report()):
            break
        time.sleep(_POLL_S)
    (control / f"{name}.drained.json").write_text(json.dumps(report()))

    while not (control / "exit").exists():
        time.sleep(_POLL_S)
    final = report()
    for recorder, _ in recorders:
        recorder.stop()
    for thread in threads:
        thread.join(timeout=60)
    (control / f"{name}.final.json").write_text(json.dumps(final))
    _LOGGER.info("%s: stopped", name)
    return 0


# Processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class ManagedProcess:
    """A child process that logs to a file (appended across restarts) and can be signalled and restarted."""

    def __init__(self, role: str, argv: list[str], log_path: pathlib.Path):
        self.role = role
        self.argv = argv
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.starts += 1
        _LOGGER.info("%s started (pid %d)", self.role, self.process.pid)

    @property
    def pid(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        return self.process.pid

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 60.0) -> int | None:
        """Send ``signum`` and wait for the exit; SIGKILL after ``timeout_s``. Returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        _LOGGER.info("%s (pid %d): sending %s", self.role, self.process.pid, signal.Signals(signum).name)
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _LOGGER.error("%s did not exit within %.0f s of %s; killing it", self.role, timeout_s,
                          signal.Signals(signum).name)
            self.process.kill()
            return self.process.wait(timeout=30)


def broker_config(template: str, port: int, directory: pathlib.Path) -> str:
    """Adapt the deployed Mosquitto configuration to a loopback port and a run directory.

    Every other setting (queue limits, packet size, persistence and its
    autosave interval) is kept as deployed.
    """
    lines = []
    found = set()
    for line in template.splitlines():
        words = line.split()
        key = words[0] if words and not words[0].startswith("#") else ""
        found.add(key)
        if key == "listener":
            line = f"listener {port} 127.0.0.1"
        elif key == "allow_anonymous":
            line = "allow_anonymous true"
        elif key in ("password_file", "acl_file"):
            line = f"# {line}  (left out: the soak's clients are anonymous, on loopback)"
        elif key == "persistence_location":
            line = f"persistence_location {directory}/"
        elif key == "log_dest":
            line = f"log_dest file {directory / 'mosquitto.log'}"
        lines.append(line)
    missing = {"listener", "persistence", "persistence_location"} - found
    if missing:
        raise ValueError(f"{BROKER_TEMPLATE} has no {', '.join(sorted(missing))} line, which the soak adapts")
    # Started as root, Mosquitto switches to the user "mosquitto", which cannot write the run directory.
    lines.append(f"user {pwd.getpwuid(os.getuid()).pw_name}")
    return "\n".join(lines) + "\n"


# Audit subscriber ----------------------------------------------------------------------------------


class AuditSubscriber:
    """A persistent MQTT session that records what the broker delivers: windows, manifests and acks."""

    def __init__(self, port: int):
        import paho.mqtt.client as mqtt

        from dawnchorus.protocol import topics

        self._topics = topics
        self._lock = threading.Lock()
        # Per device, the sequence numbers of delivered windows, redeliveries included.
        self.windows: dict[str, list[int]] = collections.defaultdict(list)
        # Per site, manifest sequence number -> (version, time of arrival).
        self.manifests: dict[str, dict[int, tuple[int, float]]] = collections.defaultdict(dict)
        self.acks: list[dict] = []
        self.last_manifest_time = 0.0
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"soak-audit-{uuid.uuid4().hex[:8]}",
                                  clean_session=False)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe([(self._topics.device_wildcard("embeddings"), 1), (self._topics.device_wildcard("ack"), 1),
                          (self._topics.manifest_wildcard(), 1)])

    def _on_message(self, client, userdata, message) -> None:
        from dawnchorus.protocol.embeddings import PayloadError, decode_embeddings
        from dawnchorus.protocol.messages import Ack, Manifest

        try:
            if message.topic.endswith("/embeddings"):
                batch = decode_embeddings(message.payload)
                with self._lock:
                    self.windows[batch.device].extend(batch.sequence.tolist())
            elif message.topic.endswith("/ack"):
                ack = Ack.decode(message.payload)
                with self._lock:
                    self.acks.append({"device": ack.device, "site": ack.site, "version": ack.version,
                                      "accepted": ack.accepted, "reason": ack.reason})
            elif message.topic.endswith("/manifest") and message.payload:
                manifest = Manifest.decode(message.payload)
                with self._lock:
                    self.manifests[manifest.site][manifest.sequence] = (manifest.version, time.monotonic())
                    self.last_manifest_time = time.monotonic()
        except PayloadError as error:
            _LOGGER.error("audit subscriber: invalid message on %s: %s", message.topic, error)

    def newest_versions(self) -> dict[str, int]:
        """Return the version of each site's newest manifest."""
        with self._lock:
            return {site: manifests[max(manifests)][0] for site, manifests in self.manifests.items() if manifests}

    def accepted_acks(self) -> set[tuple[str, int]]:
        with self._lock:
            return {(ack["device"], ack["version"]) for ack in self.acks if ack["accepted"]}

    def snapshot(self) -> tuple[dict[str, list[int]], dict[str, dict[int, tuple[int, float]]], list[dict]]:
        with self._lock:
            return ({device: list(sequences) for device, sequences in self.windows.items()},
                    {site: dict(manifests) for site, manifests in self.manifests.items()}, list(self.acks))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# Memory ------------------------------------------------------------------------------------------


def read_process(pid: int) -> tuple[int, float] | None:
    """Return the RSS in bytes and the CPU seconds (user and system) of ``pid``, or None if it is gone."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rss_kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
    if rss_kib is None:
        return None
    # Fields after the command name, which is in brackets and may contain spaces: utime and stime are 14 and 15.
    fields = stat.rpartition(")")[2].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss_kib * 1024, cpu_s


class MemorySampler:
    """Samples RSS and CPU time of the managed processes every ``interval_s`` seconds, on its own thread."""

    def __init__(self, processes: list[ManagedProcess], interval_s: float, origin: float):
        self._processes = processes
        self._interval_s = interval_s
        self.origin = origin
        # (seconds since origin, role, pid, rss bytes, cpu seconds)
        self.samples: list[tuple[float, str, int, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sample(self) -> None:
        now = time.monotonic() - self.origin
        for managed in self._processes:
            pid = managed.pid
            reading = read_process(pid) if pid is not None else None
            if reading is not None:
                self.samples.append((round(now, 1), managed.role, pid, reading[0], round(reading[1], 2)))

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def summarize_memory(samples: list[tuple[float, str, int, int, float]], roles: list[str], send_end_s: float,
                     warmup_s: float, flat_mib: float,
                     expected_growth: dict[str, Callable[[float, float], float]]) -> dict[str, dict]:
    """Summarize each role's RSS over the sending phase [0, send_end_s].

    A restarted process is a new incarnation (a new pid). Growth is measured
    on the incarnation with the longest stretch after its warm-up: from the
    first sample ``warmup_s`` after the incarnation's first sample to its
    last sample in the sending phase. The slope is a least-squares fit over
    the same samples. ``expected_growth`` gives, per role, the bytes that the
    process is meant to add between two times (a buffer that fills); a role
    is flat when its growth beyond that is at most ``flat_mib``.
    """
    summary = {}
    for role in roles:
        mine = [sample for sample in samples if sample[1] == role and 0 <= sample[0] <= send_end_s]
        if not mine:
            continue
        incarnations: dict[int, list[tuple[float, int]]] = {}
        for time_s, _, pid, rss, _ in mine:
            incarnations.setdefault(pid, []).append((time_s, rss))
        cpu_s = sum(max(sample[4] for sample in samples if sample[1] == role and sample[2] == pid)
                    for pid in {sample[2] for sample in samples if sample[1] == role})

        def nearest(target: float) -> int:
            return min(mine, key=lambda sample: abs(sample[0] - target))[3]

        best = None
        for pid, series in incarnations.items():
            steady = [point for point in series if point[0] >= series[0][0] + warmup_s]
            if len(steady) >= 2 and (best is None or steady[-1][0] - steady[0][0] > best[1][-1][0] - best[1][0][0]):
                best = (pid, steady)
        entry = {
            "incarnations": len(incarnations),
            "rss_start_mib": round(mine[0][3] / MIB, 1),
            "rss_middle_mib": round(nearest(send_end_s / 2) / MIB, 1),
            "rss_end_mib": round(mine[-1][3] / MIB, 1),
            "rss_peak_mib": round(max(sample[3] for sample in mine) / MIB, 1),
            "cpu_s": round(cpu_s, 1),
        }
        if best is not None:
            pid, steady = best
            times = np.array([point[0] for point in steady])
            rss = np.array([point[1] for point in steady], dtype=np.float64) / MIB
            slope = float(np.polyfit(times, rss, 1)[0]) * 3600 if len(steady) >= 3 else float("nan")
            growth = float(rss[-1] - rss[0])
            expected = expected_growth[role](times[0], times[-1]) / MIB if role in expected_growth else 0.0
            entry.update({
                "measured_pid": pid,
                "measured_from_s": float(times[0]),
                "measured_to_s": float(times[-1]),
                "rss_after_warmup_mib": round(float(rss[0]), 1),
                "rss_at_end_mib": round(float(rss[-1]), 1),
                "growth_mib": round(growth, 1),
                "slope_mib_per_hour": None if np.isnan(slope) else round(slope, 1),
                "expected_growth_mib": round(expected, 1),
                "flat": bool(growth - expected <= flat_mib),
            })
        summary[role] = entry
    return summary


def station_buffer_bytes(from_s: float, to_s: float, sites: int, hop_s: float, recorders_per_site: int) -> float:
    """Estimate the bytes that the base station's neighbour buffers fill between two times of the sending phase.

    The buffer allocates its arrays for full capacity at once, and the
    operating system backs pages only once windows are written into them. So
    RSS grows by about two float32 vectors per window (the raw and the unit
    embedding) until a site's buffer is full. The candidate lists add under
    3 % and are left out.
    """
    from dawnchorus.server.adaptation import AdaptationConfig

    capacity = AdaptationConfig().buffer_capacity
    site_rate = recorders_per_site / hop_s

    def windows_by(time_s: float) -> float:
        return min(capacity, site_rate * time_s)

    return sites * 2 * 1024 * 4 * (windows_by(to_s) - windows_by(from_s))


# Base-station counts -------------------------------------------------------------------------------


def station_inspect_available() -> bool:
    """Return whether this version of dawnchorus has ``server inspect`` (persisted buffers)."""
    return importlib.util.find_spec("dawnchorus.server.journal") is not None


def inspect_station(state_dir: pathlib.Path) -> dict | None:
    """Run ``dawnchorus server inspect --json`` and return its output, or None if it failed."""
    result = subprocess.run([sys.executable, "-m", "dawnchorus", "server", "inspect", "--state-dir", str(state_dir),
                             "--json"], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        _LOGGER.error("dawnchorus server inspect failed (exit %d): %s", result.returncode, result.stderr[-2000:])
        return None
    return json.loads(result.stdout)


def count_in_ranges(ranges: list[list[int]], end: int) -> tuple[int, int]:
    """Return how many numbers of the [start, stop) ranges fall in [0, end), and how many fall outside."""
    inside = sum(max(0, min(stop, end) - start) for start, stop in ranges)
    total = sum(stop - start for start, stop in ranges)
    return inside, total - inside


def station_counts(inspected: dict, sent: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per device: windows accepted by the base station, lost, duplicated in its buffer, and accepted unsent."""
    by_device = {}
    for site in inspected["sites"]:
        for device, entry in site["devices"].items():
            by_device[device] = entry
    counts = {}
    for device, windows_sent in sent.items():
        entry = by_device.get(device, {"accepted_ranges": [], "buffer_duplicates": 0})
        accepted, unexpected = count_in_ranges(entry["accepted_ranges"], windows_sent)
        counts[device] = {"received": accepted, "lost": windows_sent - accepted,
                          "duplicated": int(entry["buffer_duplicates"]), "unexpected": unexpected}
    return counts


# The soak ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Event:
    """One fault of the timeline: ``action`` ("broker" or "station") at ``at_s`` seconds into the sending phase."""

    at_s: float
    action: str


def schedule(args: argparse.Namespace, duration_s: float) -> list[Event]:
    broker = args.broker_restarts if args.broker_restarts is not None else [0.2 * args.minutes, 0.4 * args.minutes]
    station = args.station_restarts if args.station_restarts is not None else [0.3 * args.minutes]
    events = [Event(minute * 60, "broker") for minute in broker] + [Event(minute * 60, "station") for minute in station]
    for event in events:
        if not 0 <= event.at_s < duration_s:
            raise ValueError(f"a restart at {event.at_s / 60:g} min is outside the {args.minutes:g}-minute run: "
                             "give times below --minutes")
    return sorted(events, key=lambda event: event.at_s)


def wait_until(condition, timeout_s: float, interval_s: float = _POLL_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


def count_lines(path: pathlib.Path, text: str) -> int:
    try:
        return path.read_text(errors="replace").count(text)
    except OSError:
        return 0


def run_soak(args: argparse.Namespace) -> dict:
    from dawnchorus.models import birdnet
    from dawnchorus.models.species import Location, species_from_range_model
    from dawnchorus.protocol.signing import generate_key_files

    duration_s = args.minutes * 60
    events = schedule(args, duration_s)
    warmup_s = args.warmup_minutes * 60 if args.warmup_minutes is not None else min(120.0, 0.2 * duration_s)
    hop_s = WINDOW_SECONDS / args.speed
    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="dawnchorus-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    control = work / "control"
    control.mkdir(exist_ok=True)
    _LOGGER.info("run directory %s", work)

    # Inputs: embeddings, species lists, keys.
    embeddings_path = replay_embeddings(args.data, args.cache_dir)
    windows_cached = len(np.load(embeddings_path, mmap_mode="r"))
    files = birdnet.locate_birdnet_files()
    labels = birdnet.read_labels(files.labels)
    sites = [f"soak-{index + 1}" for index in range(args.sites)]
    species_files = {}
    for index, site in enumerate(sites):
        species = species_from_range_model(files.range_model, labels, Location(*SITE_LOCATIONS[index % len(SITE_LOCATIONS)]))
        species_files[site] = work / f"species-{site}.txt"
        species_files[site].write_text("\n".join(species) + "\n")
    private_key, public_key = generate_key_files(work / "keys")
    devices = [(f"{site}-rec-{number + 1:02d}", site) for site in sites for number in range(args.recorders_per_site)]

    # Broker.
    port = free_port()
    broker_dir = work / "broker"
    broker_dir.mkdir(exist_ok=True)
    (broker_dir / "mosquitto.conf").write_text(broker_config(BROKER_TEMPLATE.read_text(), port, broker_dir))
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = ManagedProcess("mosquitto", [mosquitto, "-c", str(broker_dir / "mosquitto.conf")],
                            broker_dir / "mosquitto.stdout.log")

    def start_broker() -> None:
        broker.start()
        if not wait_for_port(port, 30):
            raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{port}; see {broker_dir}")

    start_broker()
    audit = AuditSubscriber(port)
    if not audit.subscribed.wait(30):
        raise RuntimeError("the audit subscriber could not subscribe")

    # Base station.
    station_dir = work / "station"
    station_log = work / "station.log"
    station_argv = [sys.executable, "-m", "dawnchorus", "server", "run", "--broker", f"127.0.0.1:{port}",
                    "--state-dir", str(station_dir), "--signing-key", str(private_key)]
    for site in sites:
        station_argv += ["--site-species", f"{site}=@{species_files[site]}"]
    if args.update_interval is not None:
        station_argv += ["--update-interval", str(args.update_interval)]
    station = ManagedProcess("base station", station_argv, station_log)
    ready_text = "base station ready"

    def start_station() -> None:
        ready_before = count_lines(station_log, ready_text)
        station.start()
        # The station's first subscription creates its persistent session; windows sent before it are not queued for it.
        if not wait_until(lambda: count_lines(station_log, ready_text) > ready_before, 300):
            raise RuntimeError(f"the base station did not subscribe within 300 s; see {station_log}")

    start_station()

    # Recorder simulators.
    workers = []
    chunks = np.array_split(np.arange(len(devices)), args.recorder_processes)
    for number, chunk in enumerate(chunks, start=1):
        name = f"recorders-{number}"
        spec = {
            "name": name, "control_dir": str(control), "embeddings": str(embeddings_path),
            "public_key": str(public_key), "broker_port": port, "state_dir": str(work / "recorders"),
            "hop_s": hop_s, "windows_per_message": args.windows_per_message,
            "drain_timeout_s": args.drain_timeout,
            "recorders": [{
                "device": devices[index][0], "site": devices[index][1], "species_file": str(species_files[devices[index][1]]),
                "first_row": int(index * windows_cached // len(devices)),
                "start_delay_s": hop_s * index / len(devices),
            } for index in chunk],
        }
        spec_path = control / f"{name}.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        workers.append(ManagedProcess(name, [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker",
                                             str(spec_path)], work / f"{name}.log"))
    for worker in workers:
        worker.start()
    for worker in workers:
        if not wait_until(lambda: (control / f"{worker.role}.started").exists() or worker.pid is None, 300):
            raise RuntimeError(f"{worker.role} did not start within 300 s; see {worker.log_path}")
        if worker.pid is None:
            raise RuntimeError(f"{worker.role} exited at start-up; see {worker.log_path}")

    # Sending phase with the faults.
    origin = time.monotonic()
    sampler = MemorySampler([broker, station, *workers], args.sample_interval, origin)
    sampler.sample()
    sampler.start()
    timeline = []
    for event in events:
        time.sleep(max(0.0, origin + event.at_s - time.monotonic()))
        began = time.monotonic() - origin
        if event.action == "broker":
            signum = signal.SIGKILL if args.broker_signal == "kill" else signal.SIGTERM
            code = broker.stop(signum)
            time.sleep(args.broker_downtime)
            start_broker()
            timeline.append({"at_s": round(began, 1), "event": f"broker {signal.Signals(signum).name}, exit {code}, "
                             f"restarted after {args.broker_downtime:g} s on port {port}"})
        else:
            code = station.stop(signal.SIGKILL)
            time.sleep(args.station_downtime)
            restarted = time.monotonic()
            start_station()
            timeline.append({"at_s": round(began, 1), "event": f"base station SIGKILL, restarted after "
                             f"{args.station_downtime:g} s on the same state dir, ready "
                             f"{time.monotonic() - restarted:.0f} s later"})
        _LOGGER.info("t=%.0f s: %s", began, timeline[-1]["event"])
    time.sleep(max(0.0, origin + duration_s - time.monotonic()))
    send_end_s = time.monotonic() - origin
    sampler.sample()

    # Drain: sources stop, outboxes empty, the base station accepts everything, heads settle.
    (control / "stop-sending").write_text(str(time.time()))
    drained = {}
    for worker in workers:
        path = control / f"{worker.role}.drained.json"
        if not wait_until(lambda: path.exists() or worker.pid is None, args.drain_timeout + 60):
            raise RuntimeError(f"{worker.role} did not report its outboxes; see {worker.log_path}")
        for row in json.loads(path.read_text()):
            drained[row["device"]] = row
    drained_s = time.monotonic() - origin
    sent = {device: row["next_sequence"] for device, row in drained.items()}

    use_inspect = station_inspect_available()
    last_counts: dict = {}

    def station_has_everything() -> bool:
        nonlocal last_counts
        if use_inspect:
            inspected = inspect_station(station_dir)
            if inspected is None:
                return False
            last_counts = station_counts(inspected, sent)
        else:
            windows, _, _ = audit.snapshot()
            last_counts = {device: {"received": len(set(windows.get(device, [])) & set(range(count)))}
                           for device, count in sent.items()}
        return all(counts["received"] >= sent[device] for device, counts in last_counts.items())

    complete = wait_until(station_has_everything, args.drain_timeout, interval_s=5.0)
    accepted_s = time.monotonic() - origin

    def heads_settled() -> bool:
        newest = audit.newest_versions()
        acked = audit.accepted_acks()
        quiet = time.monotonic() - audit.last_manifest_time >= args.settle_quiet
        return quiet and all((device, newest[site]) in acked for device, site in devices if site in newest)

    settled = wait_until(heads_settled, args.settle_timeout, interval_s=2.0)
    settled_s = time.monotonic() - origin

    (control / "exit").write_text(str(time.time()))
    final = {}
    for worker in workers:
        path = control / f"{worker.role}.final.json"
        wait_until(lambda: path.exists() or worker.pid is None, 120)
        worker.stop(signal.SIGTERM, timeout_s=120)
        if path.exists():
            for row in json.loads(path.read_text()):
                final[row["device"]] = row
    sampler.stop()
    station.stop(signal.SIGTERM, timeout_s=120)
    inspected = inspect_station(station_dir) if use_inspect else None
    windows_delivered, manifests, acks = audit.snapshot()
    audit.close()
    broker.stop(signal.SIGTERM)

    result = {
        "command": " ".join([pathlib.Path(sys.executable).name, *sys.argv]),
        "settings": {
            "minutes": args.minutes, "sites": args.sites, "recorders_per_site": args.recorders_per_site,
            "recorders": len(devices), "speed": args.speed, "hop_s": hop_s,
            "windows_per_message": args.windows_per_message, "recorder_processes": args.recorder_processes,
            "broker_signal": args.broker_signal, "warmup_s": warmup_s, "flat_mib": args.flat_mib,
            "replayed_embeddings": windows_cached, "broker_config": str(BROKER_TEMPLATE.relative_to(REPO)),
        },
        "machine": machine_description(),
        "timeline": timeline,
        "phases_s": {"sending": round(send_end_s, 1), "outboxes_drained": round(drained_s, 1),
                     "station_complete": round(accepted_s, 1), "heads_settled": round(settled_s, 1)},
        "station_complete": complete,
        "heads_settled": settled,
        "counted_at": "base station (dawnchorus server inspect)" if use_inspect else "audit subscriber",
        "work_dir": str(work),
    }
    result.update(tally(devices, sent, drained, final, inspected, last_counts, windows_delivered, manifests, acks))
    buffer_growth = functools.partial(station_buffer_bytes, sites=len(sites), hop_s=hop_s,
                                      recorders_per_site=args.recorders_per_site)
    result["memory"] = summarize_memory(sampler.samples, [broker.role, station.role, *[w.role for w in workers]],
                                        send_end_s, warmup_s, args.flat_mib, {station.role: buffer_growth})
    result["memory_samples"] = sampler.samples
    result["targets"] = {
        "lost_zero": result["totals"]["lost"] == 0,
        # None: no count, because this dawnchorus cannot inspect the base station's buffers.
        "duplicated_zero": None if result["totals"]["duplicated"] is None else result["totals"]["duplicated"] == 0,
        # Only processes with a stretch after their warm-up are judged; the report marks the others "n/a".
        "memory_flat": all(entry["flat"] for entry in result["memory"].values() if "flat" in entry),
    }
    return result


def tally(devices, sent, drained, final, inspected, last_counts, windows_delivered, manifests, acks) -> dict:
    """Count windows and heads per device, per site and in total."""
    if inspected is not None:
        counts = station_counts(inspected, sent)
    else:
        counts = {device: {"received": len(set(windows_delivered.get(device, [])) & set(range(n))),
                           "lost": n - len(set(windows_delivered.get(device, [])) & set(range(n))),
                           "duplicated": None, "unexpected": 0} for device, n in sent.items()}
    per_device = {}
    for device, site in devices:
        delivered = windows_delivered.get(device, [])
        delivered_unique = set(delivered)
        per_device[device] = {
            "site": site,
            "sent": sent.get(device, 0),
            **counts.get(device, {}),
            "dropped_by_outbox": drained.get(device, {}).get("dropped_windows"),
            "queue_depth_after_drain": drained.get(device, {}).get("queue_depth"),
            "broker_delivered_unique": len(delivered_unique),
            "broker_redelivered": len(delivered) - len(delivered_unique),
            "broker_lost": len(set(range(sent.get(device, 0))) - delivered_unique),
            "head_version": final.get(device, {}).get("head_version"),
            "max_lag_s": final.get(device, {}).get("max_lag_s"),
        }

    per_site = {}
    accepted_acks = {(ack["device"], ack["version"]) for ack in acks if ack["accepted"]}
    for site in sorted({site for _, site in devices}):
        members = [device for device, device_site in devices if device_site == site]
        versions = sorted({version for version, _ in manifests.get(site, {}).values()})
        newest = manifests[site][max(manifests[site])][0] if manifests.get(site) else 0
        rows = [per_device[device] for device in members]
        per_site[site] = {
            "recorders": len(members),
            "sent": sum(row["sent"] for row in rows),
            "received": sum(row.get("received", 0) for row in rows),
            "lost": sum(row.get("lost", 0) for row in rows),
            "duplicated": None if any(row.get("duplicated") is None for row in rows)
            else sum(row["duplicated"] for row in rows),
            "heads_pushed": len(manifests.get(site, {})),
            "versions": versions,
            "acks_accepted": len({(device, version) for device, version in accepted_acks if device in members}),
            "acks_rejected": sum(1 for ack in acks if ack["site"] == site and not ack["accepted"]),
            "recorders_on_newest": sum(1 for row in rows if row["head_version"] == newest and newest),
            "newest_version": newest,
        }

    def total(key):
        values = [site[key] for site in per_site.values()]
        return None if any(value is None for value in values) else sum(values)

    totals = {key: total(key) for key in ("sent", "received", "lost", "duplicated", "heads_pushed", "acks_accepted",
                                          "acks_rejected", "recorders_on_newest")}
    totals.update({
        "dropped_by_outbox": sum(row["dropped_by_outbox"] or 0 for row in per_device.values()),
        "broker_lost": sum(row["broker_lost"] for row in per_device.values()),
        "broker_redelivered": sum(row["broker_redelivered"] for row in per_device.values()),
        "unexpected": sum(row.get("unexpected", 0) for row in per_device.values()),
        "rejection_reasons": sorted({ack["reason"] for ack in acks if not ack["accepted"]}),
    })
    return {"totals": totals, "per_site": per_site, "per_device": per_device}


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    version = subprocess.run([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"], capture_output=True,
                             text=True).stdout.splitlines()[:1]
    return f"{os.cpu_count()} cores, {cpu}, {memory_gib:.0f} GiB RAM, {version[0] if version else 'mosquitto'}"


# Report ------------------------------------------------------------------------------------------


def markdown_report(result: dict) -> str:
    settings = result["settings"]
    totals = result["totals"]
    lines = [
        f"Soak: {settings['recorders']} recorders in {settings['sites']} sites, {settings['minutes']:g} min of "
        f"sending at {settings['speed']:g}x the field rate (one window per recorder every {settings['hop_s']:.2f} s), "
        f"counted at the {result['counted_at']}.",
        "",
        "| time | event |",
        "|---:|---|",
        *[f"| {event['at_s'] / 60:.1f} min | {event['event']} |" for event in result["timeline"]],
        "",
        "| site | windows sent | received (unique) | lost | duplicated | heads pushed | (recorder, head) acks "
        "| acks rejected | recorders on newest head |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for site, row in result["per_site"].items():
        lines.append(f"| {site} | {row['sent']} | {row['received']} | {row['lost']} | {_show(row['duplicated'])} | "
                     f"{row['heads_pushed']} | {row['acks_accepted']} | {row['acks_rejected']} | "
                     f"{row['recorders_on_newest']}/{row['recorders']} (v{row['newest_version']}) |")
    lines.append(f"| all | {totals['sent']} | {totals['received']} | {totals['lost']} | {_show(totals['duplicated'])} "
                 f"| {totals['heads_pushed']} | {totals['acks_accepted']} | {totals['acks_rejected']} | "
                 f"{totals['recorders_on_newest']}/{settings['recorders']} |")
    lines += [
        "",
        f"Dropped by recorder outboxes: {totals['dropped_by_outbox']}. Audit subscriber: {totals['broker_lost']} "
        f"windows never delivered, {totals['broker_redelivered']} delivered twice (QoS 1 redelivery).",
        "",
        "| process | RSS start | middle | end | peak | growth after warm-up | slope | CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for role, entry in result["memory"].items():
        growth = "n/a"
        if "growth_mib" in entry:
            growth = (f"{entry['growth_mib']:+.1f} MiB ({entry['measured_from_s'] / 60:.1f}-"
                      f"{entry['measured_to_s'] / 60:.1f} min)")
            if entry["expected_growth_mib"]:
                growth += f", of which buffer fill about {entry['expected_growth_mib']:.1f} MiB"
        slope = "n/a" if entry.get("slope_mib_per_hour") is None else f"{entry['slope_mib_per_hour']:+.1f} MiB/h"
        lines.append(f"| {role} ({entry['incarnations']} pid{'s' if entry['incarnations'] > 1 else ''}) | "
                     f"{entry['rss_start_mib']:.1f} MiB | {entry['rss_middle_mib']:.1f} MiB | "
                     f"{entry['rss_end_mib']:.1f} MiB | {entry['rss_peak_mib']:.1f} MiB | {growth} | {slope} | "
                     f"{entry['cpu_s']:.0f} s |")
    targets = result["targets"]
    lines += ["", f"Targets: 0 lost {_met(targets['lost_zero'])}, 0 duplicated {_met(targets['duplicated_zero'])}, "
                  f"memory flat (growth at most {settings['flat_mib']:g} MiB) {_met(targets['memory_flat'])}."]
    return "\n".join(lines)


def _show(value) -> str:
    return "n/a" if value is None else str(value)


def _met(flag: bool | None) -> str:
    if flag is None:
        return "not measured"
    return "met" if flag else "NOT met"


# Command line --------------------------------------------------------------------------------------


def minutes_list(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()] if text else []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the sending phase (default 10)")
    parser.add_argument("--sites", type=int, default=5, help="sites (default 5)")
    parser.add_argument("--recorders-per-site", type=int, default=10, help="simulated recorders per site (default 10)")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="rate as a multiple of the field rate of one 3 s window per recorder every 3 s "
                             "(default 1)")
    parser.add_argument("--windows-per-message", type=int, default=16,
                        help="embedding windows per MQTT message, as the recorder's option (default 16)")
    parser.add_argument("--update-interval", type=int, default=None,
                        help="the base station's --update-interval: new windows per site between adaptation "
                             "rounds (default: the station's own default)")
    parser.add_argument("--recorder-processes", type=int, default=1,
                        help="processes that share the simulated recorders (default 1)")
    parser.add_argument("--broker-restarts", type=minutes_list, default=None, metavar="MIN,MIN",
                        help="minutes into the sending phase at which the broker is restarted "
                             "(default 20 %% and 40 %% of --minutes)")
    parser.add_argument("--broker-signal", choices=("term", "kill"), default="term",
                        help="signal that stops the broker: term (a clean stop, which saves its database) or "
                             "kill (a crash) (default term)")
    parser.add_argument("--broker-downtime", type=float, default=10.0,
                        help="seconds between stopping and restarting the broker (default 10)")
    parser.add_argument("--station-restarts", type=minutes_list, default=None, metavar="MIN,MIN",
                        help="minutes into the sending phase at which the base station is SIGKILLed and "
                             "restarted (default 30 %% of --minutes)")
    parser.add_argument("--station-downtime", type=float, default=10.0,
                        help="seconds between killing and restarting the base station (default 10)")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds to wait for the outboxes to drain and for the base station to accept "
                             "every window after the sources stop (default 300)")
    parser.add_argument("--settle-quiet", type=float, default=20.0,
                        help="the heads have settled when no manifest arrived for this many seconds and every "
                             "recorder acknowledged its site's newest head (default 20)")
    parser.add_argument("--settle-timeout", type=float, default=180.0,
                        help="seconds to wait for the heads to settle (default 180)")
    parser.add_argument("--sample-interval", type=float, default=10.0, help="seconds between RSS samples (default 10)")
    parser.add_argument("--warmup-minutes", type=float, default=None,
                        help="minutes after each process start left out of the memory growth "
                             "(default 2, or 20 %% of --minutes if less)")
    parser.add_argument("--flat-mib", type=float, default=16.0,
                        help="memory counts as flat when RSS grows by at most this many MiB after the warm-up "
                             "(default 16)")
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA,
                        help="recordings whose BirdNET embeddings are replayed (default ../shared/data/soundscapes)")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None,
                        help="embedding cache (default ~/.cache/dawnchorus/soak, or $DAWNCHORUS_CACHE/soak)")
    parser.add_argument("--work-dir", type=pathlib.Path, default=None,
                        help="run directory for logs and state (default a new temporary folder)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the run directory even when every target is met")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the results as JSON to this file")
    parser.add_argument("--worker", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        return run_worker(args.worker)

    if args.minutes <= 0 or args.speed <= 0:
        raise SystemExit("--minutes and --speed must be above 0")
    if args.sites < 1 or args.recorders_per_site < 1 or args.recorder_processes < 1:
        raise SystemExit("--sites, --recorders-per-site and --recorder-processes must be at least 1")
    if args.cache_dir is None:
        from dawnchorus.models.birdnet import default_cache_dir
        args.cache_dir = default_cache_dir() / "soak"

    result = run_soak(args)
    print(markdown_report(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    met = all(flag is not False for flag in result["targets"].values())
    if met and not args.keep:
        shutil.rmtree(result["work_dir"], ignore_errors=True)
    else:
        print(f"\nrun directory kept: {result['work_dir']}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
