"""RSS of one process of real recorders while they verify and swap in many pushed heads.

The script starts Mosquitto on a free loopback port and runs ``--recorders``
real ``edge.recorder.Recorder`` objects in this process, on replayed BirdNET
embeddings as in the soak (benchmarks/soak.py). It then publishes ``--heads``
signed heads for their site, one after another, and waits after each until
every recorder runs it. Every head goes through the recorder's own checks
(signature, sha256, LiteRT load, probe outputs, reference batch) and is
installed in its head store. A recorder holds one head at a time, so RSS
that keeps growing with the number of heads would be a leak per swap, and
RSS that levels off is a fixed cost per recorder.

The head is the source head restricted to the species list of the soak's
first site and exported once, as fp16, in a separate process (so that
TensorFlow stays out of the measured one). Every version reuses that blob.

The script runs once per variant, each in a child process of its own:
``release`` is the recorder as shipped, which returns free heap pages to
the kernel after each swap (``edge.native_heap.release_free_memory``);
``no-release`` is the reference without that call; ``fixed-threshold``
releases too and also fixes glibc's mmap threshold at 128 KiB through
``MALLOC_MMAP_THRESHOLD_``. The table gives the RSS of each side by side.

Usage:

    .venv/bin/python benchmarks/head_swap_memory.py --recorders 1 --heads 1000
    .venv/bin/python benchmarks/head_swap_memory.py --recorders 10 --heads 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from soak import SITE_LOCATIONS, free_port, read_process, replay_embeddings, wait_for_port
from soak_recorders import ReplayBackbone

_LOGGER = logging.getLogger("head_swap_memory")

SITE = "swap"
MIB = 2**20

# The variants compared (see the module docstring), and the environment each child gets on top of this one's.
RELEASE = "release"
NO_RELEASE = "no-release"
FIXED_THRESHOLD = "fixed-threshold"
VARIANT_ENVIRONMENT = {RELEASE: {}, NO_RELEASE: {}, FIXED_THRESHOLD: {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}}

# Windows each recorder analyses before the heads arrive, enough for a full reference batch.
_REFERENCE_WINDOWS = 40

# Probe windows in every manifest, as the base station sends.
_PROBE_WINDOWS = 8


def export_head(labels: list[str], out_path: str) -> None:
    """Export the source head restricted to ``labels`` as fp16 TFLite to ``out_path`` (runs in a child process)."""
    from dawnchorus.models.backbone import load_source_model
    from dawnchorus.models.export import head_to_tflite

    head = load_source_model().head.select(labels)
    pathlib.Path(out_path).write_bytes(head_to_tflite(head, "fp16"))


def site_labels() -> list[str]:
    from dawnchorus.models import birdnet
    from dawnchorus.models.species import Location, species_from_range_model

    files = birdnet.locate_birdnet_files()
    return species_from_range_model(files.range_model, birdnet.read_labels(files.labels), Location(*SITE_LOCATIONS[0]))


def rss_mib() -> float:
    reading = read_process(multiprocessing.current_process().pid)
    return reading[0] / MIB if reading is not None else float("nan")


def run(args: argparse.Namespace) -> dict:
    import paho.mqtt.client as mqtt

    from dawnchorus.edge.audio import Window
    from dawnchorus.edge.recorder import Recorder, RecorderConfig
    from dawnchorus.models.backbone import load_source_model
    from dawnchorus.models.birdnet import default_cache_dir
    from dawnchorus.models.head import TFLiteHead
    from dawnchorus.protocol import topics
    from dawnchorus.protocol.messages import Manifest
    from dawnchorus.protocol.signing import generate_key_files, load_private_key, load_public_key, sign_manifest

    from dawnchorus.edge import recorder as recorder_module

    if args.variant == NO_RELEASE:
        recorder_module.release_free_memory = lambda: False
    for name, value in VARIANT_ENVIRONMENT[args.variant].items():
        if os.environ.get(name) != value:
            raise SystemExit(f"--variant {args.variant} needs {name}={value} in the environment, which glibc reads "
                             "at start-up: set it, or leave out --variant")
    work = pathlib.Path(tempfile.mkdtemp(prefix="dawnchorus-head-swap-"))
    embeddings = np.load(replay_embeddings(args.data, default_cache_dir() / "soak"))
    labels = site_labels()
    blob_path = work / "head.tflite"
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(export_head, (labels, str(blob_path)))
    blob = blob_path.read_bytes()
    probe = embeddings[:_PROBE_WINDOWS].astype(np.float16).astype(np.float32)
    probe_logits = TFLiteHead(blob, labels, 1).logits(probe)
    private_path, public_path = generate_key_files(work / "keys")
    private_key, public_key = load_private_key(private_path), load_public_key(public_path)

    port = free_port()
    config_path = work / "mosquitto.conf"
    config_path.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n"
                           "max_packet_size 33554432\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_for_port(port, 30):
            raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{port}")

        source_head = load_source_model().head.select(labels)
        backbone = ReplayBackbone(embeddings)
        recorders = []
        for number in range(args.recorders):
            config = RecorderConfig(device=f"swap-rec-{number + 1:02d}", site=SITE, broker_port=port,
                                    state_dir=work / "recorders", head_public_key=public_key, head_labels=labels)
            windows = [Window(np.array([row % len(embeddings)], dtype=np.float32), "replay", 0.0, time.time())
                       for row in range(number, number + _REFERENCE_WINDOWS)]
            recorder = Recorder(config, backbone, source_head, windows)
            threading.Thread(target=recorder.run, kwargs={"stay_after_source": True}, daemon=True).start()
            recorders.append(recorder)
        deadline = time.monotonic() + 120
        while not all(recorder.finished.is_set() for recorder in recorders) and time.monotonic() < deadline:
            time.sleep(0.1)

        operator = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="head-swap-operator")
        operator.connect("127.0.0.1", port)
        operator.loop_start()
        digest = hashlib.sha256(blob).hexdigest()
        rss_by_heads = [(0, round(rss_mib(), 1))]
        _LOGGER.info("%d recorders ready, RSS %.1f MiB", len(recorders), rss_by_heads[0][1])
        for version in range(1, args.heads + 1):
            manifest = sign_manifest(Manifest(
                site=SITE, version=version, parent=version - 1, labels=labels, sha256=digest, size=len(blob),
                precision="fp16", blob_topic=topics.blob_topic(SITE, version), created=time.time(),
                probe_embeddings=probe, probe_logits=probe_logits, sequence=version,
            ), private_key)
            operator.publish(manifest.blob_topic, blob, qos=1, retain=True).wait_for_publish(30)
            operator.publish(topics.manifest_topic(SITE), manifest.encode(), qos=1, retain=True).wait_for_publish(30)
            deadline = time.monotonic() + 120
            while not all(recorder.head_version == version for recorder in recorders):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out after 120 s waiting for every recorder to run head v{version}")
                time.sleep(0.05)
            if version > 1:
                operator.publish(topics.blob_topic(SITE, version - 1), b"", qos=1, retain=True)
            if version % args.report_every == 0 or version == args.heads:
                rss_by_heads.append((version, round(rss_mib(), 1)))
                _LOGGER.info("head v%d running on every recorder, RSS %.1f MiB", version, rss_by_heads[-1][1])

        for recorder in recorders:
            recorder.stop()
        operator.loop_stop()
        operator.disconnect()
    finally:
        broker.terminate()
        broker.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    half = [rss for heads, rss in rss_by_heads if heads >= args.heads // 2]
    return {"variant": args.variant, "recorders": args.recorders, "heads": args.heads, "blob_bytes": len(blob),
            "classes": len(labels), "rss_by_heads": rss_by_heads,
            "second_half_growth_mib": round(half[-1] - half[0], 1)}


def run_variants(args: argparse.Namespace) -> list[dict]:
    """Run the benchmark once per variant, each in a fresh child process, and return the results."""
    results = []
    for variant, variables in VARIANT_ENVIRONMENT.items():
        with tempfile.TemporaryDirectory(prefix="dawnchorus-head-swap-") as scratch:
            out = pathlib.Path(scratch) / "result.json"
            command = [sys.executable, __file__, "--variant", variant, "--recorders", str(args.recorders),
                       "--heads", str(args.heads), "--report-every", str(args.report_every), "--data", str(args.data),
                       "--out", str(out)]
            environment = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
            environment.update(variables)
            subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
            results.append(json.loads(out.read_text()))
    return results


def print_results(results: list[dict]) -> None:
    print("| heads swapped | " + " | ".join(f"RSS, {result['variant']}" for result in results) + " |")
    print("|---:|" + "---:|" * len(results))
    for row, (heads, _) in enumerate(results[0]["rss_by_heads"]):
        print(f"| {heads} | " + " | ".join(f"{result['rss_by_heads'][row][1]:.1f} MiB" for result in results) + " |")
    first = results[0]
    print(f"\n{first['recorders']} recorders, {first['classes']}-class fp16 head of {first['blob_bytes']} bytes")
    for result in results:
        start, after_first, last = (result["rss_by_heads"][index][1] for index in (0, 1, -1))
        print(f"{result['variant']}: {last - start:+.1f} MiB in all, {last - after_first:+.1f} MiB after the first "
              f"{result['rss_by_heads'][1][0]} heads, {result['second_half_growth_mib']:+.1f} MiB over the second half")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("dawnchorus", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recorders", type=int, default=1, help="recorders in this process (default 1)")
    parser.add_argument("--heads", type=int, default=100, help="heads pushed one after another (default 100)")
    parser.add_argument("--report-every", type=int, default=10, help="heads between two RSS readings (default 10)")
    parser.add_argument("--data", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "soundscapes",
                        help="recordings whose cached embeddings are replayed (default ../shared/data/soundscapes)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the results as JSON to this file")
    parser.add_argument("--variant", choices=tuple(VARIANT_ENVIRONMENT), default=None,
                        help="run only this variant, in this process (see the description); without it, every "
                             "variant runs in a child process of its own")
    args = parser.parse_args(argv)
    if args.recorders < 1 or args.heads < 2 or args.report_every < 1:
        raise SystemExit("--recorders and --report-every must be at least 1, --heads at least 2")

    results = run_variants(args) if args.variant is None else [run(args)]
    print_results(results)
    if args.out is not None:
        args.out.write_text(json.dumps(results[0] if args.variant is not None else results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
