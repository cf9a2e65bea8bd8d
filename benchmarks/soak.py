"""Soak of the whole fleet: simulated recorders, a real Mosquitto and a real base station, with restarts.

What runs, all on 127.0.0.1:

- Mosquitto with deploy/mosquitto/dawnchorus.conf, adapted to listen on a
  free loopback port, to accept anonymous clients (the soak tests delivery,
  not access control), to log to a file and to keep its database in the run
  directory. Persistence stays on with the file's autosave interval.
- ``dawnchorus server run`` with a fresh signing key, a state directory and a
  species list per site from BirdNET's range model.
- One or more recorder-simulator processes (benchmarks/soak_recorders.py).
  Each runs the real ``edge.recorder.Recorder`` once per simulated recorder,
  in its own threads, with its own state directory, outbox, uplink and
  sequence numbers. Only the audio and the backbone are replaced: the source
  releases one window per hop, and the backbone returns embeddings that
  BirdNET computed once from the recordings in ../shared/data/soundscapes
  (cached under ~/.cache/dawnchorus/soak). Pushed heads go through the
  recorder's own checks (signature, sha256, LiteRT load, probe outputs), and
  the recorder acknowledges them.
- An audit subscriber in this process: a persistent MQTT session that records
  every embedding window, manifest and ack that the broker delivers, so that
  a loss in the broker can be told apart from one in the base station.

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
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np

from dawnchorus.server.broker import free_port
from soak_recorders import WINDOW_SECONDS
from soak_report import markdown_report, station_buffer_bytes, station_counts, summarize_memory, tally

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "soundscapes"
BROKER_TEMPLATE = REPO / "deploy" / "mosquitto" / "dawnchorus.conf"
RECORDERS_SCRIPT = pathlib.Path(__file__).resolve().with_name("soak_recorders.py")

# The base station logs this once it has subscribed to the recorders' topics.
_STATION_READY = "base station ready"

_LOGGER = logging.getLogger("soak")

# (latitude, longitude, week) of each site's range-model species list, cycled
# over the sites. The lists keep pushed heads at site size (a few hundred
# classes, well under 1 MB) as in a deployment. 50 recorders with heads of all
# 6522 classes would hold 50 interpreters of 13 MB each. In a trial run on
# the shared soundscapes, heads for Seattle and Montreal passed the collapse
# guard, and heads for Ithaca, Bend and Berkeley were all blocked, which would
# leave those sites without pushed heads.
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


# Processes ---------------------------------------------------------------------------------------


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
    """Adapt the deployed Mosquitto snippet to a loopback port and a run directory.

    The snippet goes into the conf.d folder of Debian's mosquitto.conf,
    which sets persistence, its location and the log destination. The soak
    sets those three as that file does, in its run directory. Every other
    setting (queue limits, packet size, the autosave interval) is kept as
    deployed.
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
        elif key in ("persistence", "persistence_location", "log_dest"):
            line = f"# {line}  (set below, as Debian's mosquitto.conf sets it)"
        lines.append(line)
    if "listener" not in found:
        raise ValueError(f"{BROKER_TEMPLATE} has no listener line, which the soak adapts")
    lines += ["persistence true", f"persistence_location {directory}/",
              f"log_dest file {directory / 'mosquitto.log'}"]
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


class Soak:
    """One soak run: the inputs, the processes, the timeline of faults, the drain and the counts.

    ``run`` calls the phases in order and returns the results as a JSON-ready dict.
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.duration_s = args.minutes * 60
        self.events = schedule(args, self.duration_s)
        self.warmup_s = args.warmup_minutes * 60 if args.warmup_minutes is not None else min(120.0, 0.2 * self.duration_s)
        self.hop_s = WINDOW_SECONDS / args.speed
        self.work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="dawnchorus-soak-"))
        self.control = self.work / "control"
        self.sites = [f"soak-{index + 1}" for index in range(args.sites)]
        self.devices = [(f"{site}-rec-{number + 1:02d}", site) for site in self.sites
                        for number in range(args.recorders_per_site)]
        self.port = free_port()
        self.timeline: list[dict] = []
        self.phases_s: dict[str, float] = {}

    def run(self) -> dict:
        self.prepare_inputs()
        self.start_broker_and_station()
        self.start_recorders()
        self.origin = time.monotonic()
        self.sampler = MemorySampler([self.broker, self.station, *self.workers], self.args.sample_interval, self.origin)
        self.sampler.sample()
        self.sampler.start()
        self.run_timeline()
        self.drain()
        self.stop_all()
        return self.results()

    # Phases -------------------------------------------------------------------------------------

    def prepare_inputs(self) -> None:
        """Cache the embeddings, write a species list per site and create the signing key."""
        from dawnchorus.models import birdnet
        from dawnchorus.models.species import Location, species_from_range_model
        from dawnchorus.protocol.signing import generate_key_files

        self.control.mkdir(parents=True, exist_ok=True)
        _LOGGER.info("run directory %s", self.work)
        self.embeddings_path = replay_embeddings(self.args.data, self.args.cache_dir)
        self.windows_cached = len(np.load(self.embeddings_path, mmap_mode="r"))
        files = birdnet.locate_birdnet_files()
        labels = birdnet.read_labels(files.labels)
        self.species_files = {}
        for index, site in enumerate(self.sites):
            location = Location(*SITE_LOCATIONS[index % len(SITE_LOCATIONS)])
            species = species_from_range_model(files.range_model, labels, location)
            self.species_files[site] = self.work / f"species-{site}.txt"
            self.species_files[site].write_text("\n".join(species) + "\n")
        self.private_key, self.public_key = generate_key_files(self.work / "keys")

    def start_broker_and_station(self) -> None:
        """Start Mosquitto, the audit subscriber and the base station, and wait until the station subscribed."""
        broker_dir = self.work / "broker"
        broker_dir.mkdir(exist_ok=True)
        config_path = broker_dir / "mosquitto.conf"
        config_path.write_text(broker_config(BROKER_TEMPLATE.read_text(), self.port, broker_dir))
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.broker = ManagedProcess("mosquitto", [mosquitto, "-c", str(config_path)], broker_dir / "stdout.log")
        self.start_broker()
        self.audit = AuditSubscriber(self.port)
        if not self.audit.subscribed.wait(30):
            raise RuntimeError("the audit subscriber could not subscribe")

        self.station_dir = self.work / "station"
        argv = [sys.executable, "-m", "dawnchorus", "server", "run", "--broker", f"127.0.0.1:{self.port}",
                "--state-dir", str(self.station_dir), "--signing-key", str(self.private_key)]
        for site in self.sites:
            argv += ["--site-species", f"{site}=@{self.species_files[site]}"]
        if self.args.update_interval is not None:
            argv += ["--update-interval", str(self.args.update_interval)]
        if self.args.buffer is not None:
            argv += ["--buffer", str(self.args.buffer)]
        self.station = ManagedProcess("base station", argv, self.work / "station.log")
        self.start_station()

    def start_broker(self) -> None:
        self.broker.start()
        if not wait_for_port(self.port, 30):
            raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port}; see {self.broker.log_path}")

    def start_station(self) -> float:
        """Start the base station and return the seconds until it subscribed."""
        log = self.station.log_path
        ready_before = count_lines(log, _STATION_READY)
        started = time.monotonic()
        self.station.start()
        # The station's first subscription creates its persistent session; windows sent before it are not queued for it.
        if not wait_until(lambda: count_lines(log, _STATION_READY) > ready_before, 300):
            raise RuntimeError(f"the base station did not subscribe within 300 s; see {log}")
        return time.monotonic() - started

    def start_recorders(self) -> None:
        """Start the recorder-simulator processes and wait until each runs its recorders."""
        self.workers = []
        chunks = np.array_split(np.arange(len(self.devices)), self.args.recorder_processes)
        for number, chunk in enumerate(chunks, start=1):
            name = f"recorders-{number}"
            spec = {
                "name": name, "control_dir": str(self.control), "embeddings": str(self.embeddings_path),
                "public_key": str(self.public_key), "broker_port": self.port,
                "state_dir": str(self.work / "recorders"), "hop_s": self.hop_s,
                "windows_per_message": self.args.windows_per_message, "drain_timeout_s": self.args.drain_timeout,
                "recorders": [self._recorder_spec(int(index)) for index in chunk],
            }
            spec_path = self.control / f"{name}.json"
            spec_path.write_text(json.dumps(spec, indent=1))
            self.workers.append(ManagedProcess(name, [sys.executable, str(RECORDERS_SCRIPT), str(spec_path)],
                                               self.work / f"{name}.log"))
        for worker in self.workers:
            worker.start()
        for worker in self.workers:
            started = self.control / f"{worker.role}.started"
            if not wait_until(lambda: started.exists() or worker.pid is None, 300) or not started.exists():
                raise RuntimeError(f"{worker.role} did not start its recorders; see {worker.log_path}")

    def _recorder_spec(self, index: int) -> dict:
        """Spread the recorders over the cached windows and over one hop, so that they do not send in lockstep."""
        device, site = self.devices[index]
        return {"device": device, "site": site, "species_file": str(self.species_files[site]),
                "first_row": index * self.windows_cached // len(self.devices),
                "start_delay_s": self.hop_s * index / len(self.devices)}

    def run_timeline(self) -> None:
        """Send for ``--minutes``, restarting the broker and the base station at their times."""
        args = self.args
        for event in self.events:
            time.sleep(max(0.0, self.origin + event.at_s - time.monotonic()))
            began = time.monotonic() - self.origin
            if event.action == "broker":
                signum = signal.SIGKILL if args.broker_signal == "kill" else signal.SIGTERM
                code = self.broker.stop(signum)
                time.sleep(args.broker_downtime)
                self.start_broker()
                text = (f"broker {signal.Signals(signum).name} (exit {code}), restarted after "
                        f"{args.broker_downtime:g} s on the same port")
            else:
                self.station.stop(signal.SIGKILL)
                time.sleep(args.station_downtime)
                ready_s = self.start_station()
                text = (f"base station SIGKILL, restarted after {args.station_downtime:g} s on the same state "
                        f"dir, subscribed {ready_s:.0f} s later")
            self.timeline.append({"at_s": round(began, 1), "event": text})
            _LOGGER.info("t=%.0f s: %s", began, text)
        time.sleep(max(0.0, self.origin + self.duration_s - time.monotonic()))
        self.phases_s["sending"] = self._elapsed()
        self.sampler.sample()

    def drain(self) -> None:
        """Stop the sources, then wait for the outboxes, for the base station's acceptance and for the heads."""
        (self.control / "stop-sending").write_text(str(time.time()))
        self.drained = self._collect_reports("drained", self.args.drain_timeout + 60)
        self.sent = {device: row["next_sequence"] for device, row in self.drained.items()}
        self.phases_s["outboxes_drained"] = self._elapsed()

        self.use_inspect = station_inspect_available()
        self.station_complete = wait_until(self._station_has_everything, self.args.drain_timeout, interval_s=5.0)
        self.phases_s["station_complete"] = self._elapsed()
        self.heads_settled = wait_until(self._heads_settled, self.args.settle_timeout, interval_s=2.0)
        self.phases_s["heads_settled"] = self._elapsed()

    def _station_has_everything(self) -> bool:
        if self.use_inspect:
            inspected = inspect_station(self.station_dir)
            if inspected is None:
                return False
            counts = station_counts(inspected, self.sent)
        else:
            windows, _, _ = self.audit.snapshot()
            counts = {device: {"received": len(set(windows.get(device, [])) & set(range(sent)))}
                      for device, sent in self.sent.items()}
        return all(counts[device]["received"] >= sent for device, sent in self.sent.items())

    def _heads_settled(self) -> bool:
        newest = self.audit.newest_versions()
        acknowledged = self.audit.accepted_acks()
        quiet = time.monotonic() - self.audit.last_manifest_time >= self.args.settle_quiet
        return quiet and all((device, newest[site]) in acknowledged for device, site in self.devices if site in newest)

    def stop_all(self) -> None:
        """Stop the recorders, the base station (SIGTERM) and the broker, and read the final state."""
        (self.control / "exit").write_text(str(time.time()))
        self.final = self._collect_reports("final", 120)
        for worker in self.workers:
            worker.stop(signal.SIGTERM, timeout_s=120)
        self.sampler.stop()
        self.station.stop(signal.SIGTERM, timeout_s=120)
        self.inspected = inspect_station(self.station_dir) if self.use_inspect else None
        self.delivered = self.audit.snapshot()
        self.audit.close()
        self.broker.stop(signal.SIGTERM)

    def _collect_reports(self, kind: str, timeout_s: float) -> dict[str, dict]:
        """Wait for every recorder process's ``<name>.<kind>.json`` and return its rows by device."""
        rows = {}
        for worker in self.workers:
            path = self.control / f"{worker.role}.{kind}.json"
            if not wait_until(lambda: path.exists() or worker.pid is None, timeout_s) or not path.exists():
                raise RuntimeError(f"{worker.role} wrote no {path.name}; see {worker.log_path}")
            for row in json.loads(path.read_text()):
                rows[row["device"]] = row
        return rows

    def _elapsed(self) -> float:
        return round(time.monotonic() - self.origin, 1)

    # Results ------------------------------------------------------------------------------------

    def results(self) -> dict:
        args = self.args
        windows_delivered, manifests, acks = self.delivered
        result = {
            "command": " ".join(["python", *sys.argv]),
            "settings": {
                "minutes": args.minutes, "sites": args.sites, "recorders_per_site": args.recorders_per_site,
                "buffer": args.buffer,
                "recorders": len(self.devices), "speed": args.speed, "hop_s": self.hop_s,
                "windows_per_message": args.windows_per_message, "recorder_processes": args.recorder_processes,
                "broker_signal": args.broker_signal, "warmup_s": self.warmup_s, "flat_mib": args.flat_mib,
                "replayed_embeddings": self.windows_cached,
                "broker_config": str(BROKER_TEMPLATE.relative_to(REPO)),
            },
            "machine": machine_description(),
            "timeline": self.timeline,
            "phases_s": self.phases_s,
            "station_complete": self.station_complete,
            "heads_settled": self.heads_settled,
            "counted_at": "base station (dawnchorus server inspect)" if self.use_inspect else "audit subscriber",
            "work_dir": str(self.work),
        }
        result.update(tally(self.devices, self.sent, self.drained, self.final, self.inspected, windows_delivered,
                            manifests, acks))
        buffer_growth = functools.partial(station_buffer_bytes, sites=len(self.sites), hop_s=self.hop_s,
                                          recorders_per_site=args.recorders_per_site, capacity=args.buffer)
        roles = [self.broker.role, self.station.role, *[worker.role for worker in self.workers]]
        result["memory"] = summarize_memory(self.sampler.samples, roles, self.phases_s["sending"], self.warmup_s,
                                            args.flat_mib, {self.station.role: buffer_growth})
        result["memory_samples"] = self.sampler.samples
        result["recorder_memory_split"] = {}
        for worker in self.workers:
            path = self.control / f"{worker.role}.memory.jsonl"
            if path.exists():
                rows = [json.loads(line) for line in path.read_text().splitlines() if line]
                result["recorder_memory_split"][worker.role] = [
                    {"time": round(row.pop("monotonic_s") - self.origin, 1), **row} for row in rows]
        totals = result["totals"]
        result["targets"] = {
            "lost_zero": totals["lost"] == 0,
            # None: not counted, because this dawnchorus cannot inspect the base station's buffers.
            "duplicated_zero": None if totals["duplicated"] is None else totals["duplicated"] == 0,
            # Only processes with samples after their warm-up are judged; the report marks the others "n/a".
            "memory_flat": all(entry["flat"] for entry in result["memory"].values() if "flat" in entry),
        }
        return result


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
    parser.add_argument("--buffer", type=int, default=None,
                        help="the base station's --buffer: windows kept per site. A small buffer fills within the "
                             "run, so that the memory of a base station with full buffers can be measured "
                             "(default: the station's own default)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)

    if args.minutes <= 0 or args.speed <= 0:
        raise SystemExit("--minutes and --speed must be above 0")
    if args.sites < 1 or args.recorders_per_site < 1 or args.recorder_processes < 1:
        raise SystemExit("--sites, --recorders-per-site and --recorder-processes must be at least 1")
    if args.cache_dir is None:
        from dawnchorus.models.birdnet import default_cache_dir
        args.cache_dir = default_cache_dir() / "soak"

    result = Soak(args).run()
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
