"""``dawnchorus demo``: a broker, a base station and one recorder per recording, in one process.

The roles still meet only over MQTT: the demo starts them side by side
(recorders as threads, each with its own LiteRT interpreter) and watches
from outside. Recordings are replayed faster than real time; the base
station adapts the site's head, pushes it, and the recorders verify and
hot-swap it. The demo ends once every recorder has replayed its audio and
acknowledged the site's newest head. Heads are signed as in a fleet, with a
key pair that the demo keeps in its state directory (``keys/``) and creates
there on its first run.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import pathlib
import shutil
import sys
import tempfile
import threading
import time

from dawnchorus.cli import (add_http_argument, add_species_arguments, adaptation_arguments, broker_address,
                            build_station, probability, sensitivity, start_web_server)

_LOGGER = logging.getLogger(__name__)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from dawnchorus.models.species import add_threshold_arguments
    from dawnchorus.server.adaptation import AdaptationConfig

    parser.add_argument(
        "paths", nargs="*", type=pathlib.Path, metavar="PATH",
        help="recordings or folders, one recorder each; a single folder of recordings and "
             "folders gives one recorder per entry",
    )
    parser.add_argument("--broker", type=broker_address, default=None, metavar="HOST:PORT",
                        help="use this MQTT broker (e.g. Mosquitto) instead of the embedded one")
    parser.add_argument("--site", default="demo", help="site id of all recorders (default %(default)s)")
    parser.add_argument("--speed", type=float, default=20.0,
                        help="replay speed, times real time; 0 is as fast as possible (default %(default)s)")
    parser.add_argument("--min-conf", type=probability, default=0.5,
                        help="detection threshold (default %(default)s)")
    parser.add_argument("--sensitivity", type=sensitivity, default=1.0,
                        help="BirdNET sigmoid sensitivity, 0.5 to 1.5 (default %(default)s)")
    parser.add_argument("--overlap", type=float, default=0.0, help="window overlap in seconds, 0 to <3")
    parser.add_argument("--state-dir", type=pathlib.Path, default=None,
                        help="keep the registry, detection log and head stores here (default: a temporary "
                             "folder, deleted at the end)")
    parser.add_argument("--summary", type=pathlib.Path, default=None, help="write the summary as JSON here")
    add_http_argument(parser)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="give up waiting for heads after this many seconds (default %(default)s)")
    parser.add_argument("--model", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--labels", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
    add_species_arguments(parser)
    add_threshold_arguments(parser)
    adaptation_arguments(parser, AdaptationConfig(buffer_capacity=5000, update_interval=128, min_buffer=64))


def recorder_inputs(paths: list[pathlib.Path]) -> list[list[pathlib.Path]]:
    """Group the given paths into one input list per recorder.

    Each path is a recorder, except that a single folder holding several
    entries with audio gives one recorder per entry (its files and subfolders).
    """
    from dawnchorus.edge.audio import find_audio_files

    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    if len(paths) == 1 and paths[0].is_dir():
        # Inside the folder, a file becomes a recorder only if it is audio, as the recorder would skip it.
        entries = [entry for entry in sorted(paths[0].iterdir())
                   if (find_audio_files([entry]) if entry.is_dir() else _is_audio_file(entry))]
        if len(entries) > 1:
            return [[entry] for entry in entries]
    groups = [[path] for path in paths if find_audio_files([path])]
    if not groups:
        raise FileNotFoundError(f"no audio files (wav, flac, ogg, mp3, opus) in {', '.join(map(str, paths))}")
    return groups


def _is_audio_file(path: pathlib.Path) -> bool:
    from dawnchorus.edge.audio import AUDIO_EXTENSIONS

    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in AUDIO_EXTENSIONS


def _device_name(inputs: list[pathlib.Path], used: set[str]) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in inputs[0].stem)[:40].strip("-.") or "rec"
    name, n = f"rec-{stem}", 2
    while name in used:
        name, n = f"rec-{stem}-{n}", n + 1
    used.add(name)
    return name


def _microphone_available() -> bool:
    try:
        import sounddevice
        return any(device["max_input_channels"] > 0 for device in sounddevice.query_devices())
    except (OSError, ImportError):
        return False


class _TerminalFeed:
    """Prints detections as they arrive, one line each."""

    def __init__(self, stream=sys.stdout):
        self._stream = stream
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, detection) -> None:
        with self._lock:
            self.counts[detection.label] += 1
            clock = time.strftime("%H:%M:%S", time.localtime(detection.start_time))
            print(f"{clock}  {detection.device:<24} v{detection.head_version:<3} "
                  f"{detection.confidence:5.2f}  {detection.common_name} ({detection.scientific_name})",
                  file=self._stream, flush=True)


def run_demo(args: argparse.Namespace) -> int:
    from dawnchorus.edge.audio import FileSource
    from dawnchorus.edge.recorder import Recorder, RecorderConfig
    from dawnchorus.models.backbone import Backbone, load_source_model
    from dawnchorus.models.species import load_species_thresholds
    from dawnchorus.protocol import signing
    from dawnchorus.server.broker import EmbeddedBroker

    if not args.paths:
        hint = ("no recordings given. Pass files or folders, e.g.\n"
                "  dawnchorus demo ../shared/data/soundscapes\n"
                "Each file or folder becomes one recorder (wav, flac, ogg, mp3).")
        if _microphone_available():
            hint += "\nTo run a recorder on this machine's microphone use 'dawnchorus edge run'."
        print(f"dawnchorus demo: {hint}", file=sys.stderr)
        return 2

    groups = recorder_inputs(args.paths)
    unknown_sites = [entry.site for entry in args.site_species if entry.site != args.site]
    if unknown_sites:
        raise ValueError(f"--site-species names site(s) {unknown_sites}, but the demo's recorders are all in "
                         f"site {args.site!r}: use --site-species {args.site}=... or --site")

    started = time.monotonic()
    temporary = args.state_dir is None
    state_dir = args.state_dir or pathlib.Path(tempfile.mkdtemp(prefix="dawnchorus-demo-"))
    feed = _TerminalFeed()
    model = load_source_model(args.model, args.labels)
    keys_dir = state_dir / "keys"
    if not (keys_dir / signing.PRIVATE_KEY_NAME).exists():
        signing.generate_key_files(keys_dir)
    signing_key = signing.load_private_key(keys_dir / signing.PRIVATE_KEY_NAME)
    public_key = signing.load_public_key(keys_dir / signing.PUBLIC_KEY_NAME)

    broker = EmbeddedBroker() if args.broker is None else None
    address = (broker.host, broker.port) if broker is not None else args.broker
    station = build_station(args, state_dir / "server", address, on_detection=feed, model=model,
                            signing_key=signing_key)
    site_head = model.head.select(station.species_for_site(args.site))
    thresholds = load_species_thresholds(args.species_thresholds)
    per_species = thresholds.resolve(model.head.labels) if thresholds is not None else {}
    _LOGGER.info("site %s: recorders start on the source head over %d classes", args.site, len(site_head.labels))

    recorders: list[Recorder] = []
    threads: list[threading.Thread] = []
    web = None
    try:
        if args.http is not None:
            web = start_web_server(station, args.http)
            print(f"live page: {web.url}", flush=True)
        if broker is not None:
            broker.start()
        station.start()
        if not station.connected.wait(30):
            raise TimeoutError(f"the base station could not connect to the broker at {address[0]}:{address[1]}")
        # One LiteRT thread per recorder: interpreters side by side use the cores
        # better than one interpreter with several threads.
        threads_per_recorder = 1 if len(groups) > 1 else None
        used: set[str] = set()
        for inputs in groups:
            config = RecorderConfig(
                device=_device_name(inputs, used), site=args.site, broker_host=address[0],
                broker_port=address[1], state_dir=state_dir / "edge", min_conf=args.min_conf,
                sensitivity=args.sensitivity, species_thresholds=per_species, head_public_key=public_key,
                head_labels=list(site_head.labels),
            )
            source = FileSource(inputs, overlap_s=args.overlap, speed=args.speed or None)
            recorder = Recorder(config, Backbone(model.backbone, num_threads=threads_per_recorder),
                                site_head, source)
            recorders.append(recorder)
            _LOGGER.info("recorder %s replays %s", config.device, ", ".join(map(str, inputs)))
        for recorder in recorders:
            thread = threading.Thread(target=recorder.run, kwargs={"stay_after_source": True},
                                      name=recorder.config.device, daemon=True)
            thread.start()
            threads.append(thread)

        ok = _wait_for_adaptation(station, recorders, args.site, args.timeout)
    finally:
        for recorder in recorders:
            recorder.stop()
        for thread in threads:
            thread.join(timeout=30)
        if web is not None:
            web.stop()
        station.stop()
        if broker is not None:
            broker.stop()

    summary = _summary(station, recorders, feed, time.monotonic() - started)
    _print_summary(summary, None if temporary else state_dir)
    if args.summary is not None:
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    if temporary:
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0 if ok else 1


def _wait_for_adaptation(station, recorders, site: str, timeout: float) -> bool:
    """Wait until all audio is in, a final round has run, and every recorder acknowledged it."""
    deadline = time.monotonic() + timeout
    while not all(recorder.finished.is_set() for recorder in recorders):
        if time.monotonic() > deadline:
            _LOGGER.error("demo timed out while recorders were still replaying")
            return False
        time.sleep(0.2)

    sent = sum(recorder.counters["windows"] for recorder in recorders)
    while station.counters["embeddings"] + station.counters["embeddings_duplicate"] < sent or not station.idle():
        if time.monotonic() > deadline:
            _LOGGER.error("base station received %d of %d embeddings before the timeout",
                          station.counters["embeddings"], sent)
            return False
        time.sleep(0.2)

    _LOGGER.info("all %d windows received; running a final adaptation round", sent)
    station.request_flush()
    while not station.flush_done.wait(0.2):
        if time.monotonic() > deadline:
            _LOGGER.error("demo timed out waiting for the final adaptation round")
            return False
    latest = station.views[site].latest_version
    if latest == 0:
        _LOGGER.error("site %s has no accepted head: the collapse guard blocked every candidate", site)
        return False
    while True:
        if all(recorder.head_version == latest for recorder in recorders):
            acked = {ack.device for ack in station.acks.values() if ack.accepted and ack.version == latest}
            if acked >= {recorder.config.device for recorder in recorders}:
                return True
        if time.monotonic() > deadline:
            _LOGGER.error("demo timed out waiting for every recorder to acknowledge the site's newest head")
            return False
        time.sleep(0.2)


def _summary(station, recorders, feed: _TerminalFeed, wall_seconds: float) -> dict:
    sites = {}
    for site, view in station.views.items():
        versions = station.registry.versions(site)
        sites[site] = {
            "head_versions": len(versions),
            "latest_version": f"v{versions[-1]}" if versions else "v0",
            "rounds": view.rounds,
            "blocked": view.blocked,
        }
    acked = {device: ack.version for device, ack in station.acks.items() if ack.accepted}
    return {
        "windows": sum(recorder.counters["windows"] for recorder in recorders),
        "wall_seconds": round(wall_seconds, 2),
        "detections": dict(sorted(feed.counts.items(), key=lambda item: -item[1])),
        "sites": sites,
        "recorders": {
            recorder.config.device: {
                "site": recorder.config.site,
                "head_version": f"v{acked.get(recorder.config.device, 0)}",
            }
            for recorder in recorders
        },
    }


def _print_summary(summary: dict, state_dir: pathlib.Path | None) -> None:
    out = sys.stdout
    print("\n== dawnchorus demo summary ==", file=out)
    print(f"windows processed: {summary['windows']} in {summary['wall_seconds']:.1f} s", file=out)
    print("detections per species:", file=out)
    for label, count in list(summary["detections"].items())[:20]:
        print(f"  {count:5d}  {label.replace('_', ' / ')}", file=out)
    if len(summary["detections"]) > 20:
        print(f"  ... and {len(summary['detections']) - 20} more species", file=out)
    for site, info in summary["sites"].items():
        print(f"site {site}: head versions: {info['head_versions']}, latest {info['latest_version']}; "
              f"adaptation rounds: {info['rounds']}, blocked by the collapse guard: {info['blocked']}", file=out)
    for device, info in summary["recorders"].items():
        print(f"recorder {device} (site {info['site']}) runs {info['head_version']}", file=out)
    if state_dir is not None:
        print(f"state, head registry and detection log: {state_dir}", file=out)
