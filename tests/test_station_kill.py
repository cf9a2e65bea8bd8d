"""Fault test: the base station killed with SIGKILL and restarted while real recorders stream.

Two ``dawnchorus edge run`` processes replay real recordings through a
Mosquitto of their own. The ``dawnchorus server run`` process is killed twice
mid-stream and restarted. Afterwards, the windows persisted in the station's
buffer are compared with the sequence numbers that each recorder used: none
may be missing and none duplicated, and no head version may be published twice.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import sqlite3
import subprocess
import sys
import time

import pytest

from dawnchorus.protocol.messages import Manifest

SITE = "kill-station-site"
SPECIES = [
    "Hylocichla mustelina", "Setophaga ruticilla", "Setophaga citrina", "Poecile atricapillus",
    "Cardinalis cardinalis", "Baeolophus bicolor", "Haemorhous mexicanus", "Turdus migratorius",
    "Cyanocitta cristata", "Zenaida macroura",
]


def _wait(condition, timeout: float, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def _sent(edge_state: pathlib.Path, device: str) -> int:
    """Return how many sequence numbers the recorder has taken (its next free number, kept in its outbox)."""
    path = edge_state / device / "outbox.sqlite3"
    if not path.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as database:
        row = database.execute("SELECT value FROM counters WHERE name = 'next_sequence'").fetchone()
    return int(row[0]) if row else 0


def _inspect(server_state: pathlib.Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "dawnchorus", "server", "inspect", "--state-dir",
                             str(server_state), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {site["site"]: site for site in json.loads(result.stdout)["sites"]}


@pytest.mark.slow
def test_station_killed_mid_stream_loses_nothing(programs, start_mosquitto, observe, data_dir, tmp_path):
    # A broker of its own: the session broker may hold messages that other tests'
    # recorders sent to the same base-station client id.
    broker = start_mosquitto("broker")
    observer = observe(broker)
    keys = tmp_path / "keys"
    generated = subprocess.run([sys.executable, "-m", "dawnchorus", "keys", "generate", str(keys)],
                               capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr
    species = tmp_path / "species.txt"
    species.write_text("\n".join(SPECIES) + "\n")
    server_state, edge_state = tmp_path / "server", tmp_path / "edge"

    def start_server(log: str):
        process = programs.start(
            "server", "run", "--broker", broker.address, "--state-dir", str(server_state),
            "--signing-key", str(keys / "head-signing.key"), "--default-species", f"@{species}",
            "--buffer", "2000", "--update-interval", "24", "--min-buffer", "24",
            # The prior shift on these mostly bird-free night recordings makes the guard block
            # every head, and the test needs heads published across restarts.
            "--no-prior-shift", log=log)
        assert _wait(lambda: "base station ready" in programs.log(log) or process.poll() is not None, 180)
        assert process.poll() is None, programs.log(log)[-3000:]
        return process

    recordings = {
        # 252 s of audio with many birds (88 windows) at 4 times real time: about 60 s.
        "rec-a": ([data_dir / "soundscapes/birdnet-example", data_dir / "soundscapes/xc563936.mp3",
                   data_dir / "soundscapes/opensoundscape"], "4"),
        # 96 night and day files of 10 s (384 windows) at 15 times real time: about 65 s.
        "rec-b": ([data_dir / "soundscapes/maad-24h"], "15"),
    }
    server = start_server("server-0.log")
    recorders = {
        device: programs.start(
            "edge", "run", "--device", device, "--site", SITE, "--broker", broker.address,
            "--input", *map(str, paths), "--speed", speed, "--species-file", str(species),
            "--head-public-key", str(keys / "head-signing.pub"), "--state-dir", str(edge_state),
            "--threads", "1", "--min-conf", "0.5", log=f"{device}.log")
        for device, (paths, speed) in recordings.items()
    }

    def total_sent() -> int:
        return sum(_sent(edge_state, device) for device in recordings)

    def total_accepted() -> int:
        site = _inspect(server_state).get(SITE)
        return sum(entry["accepted_windows"] for entry in site["devices"].values()) if site else 0

    # Each kill comes once the station has accepted windows since it started:
    # 16 for the first, and 64 more, part of them from the broker's backlog, for the second.
    accepted_before = 0
    for kill, new_windows in enumerate((16, 64), start=1):
        assert _wait(lambda: total_accepted() >= accepted_before + new_windows, 240, interval=1), \
            programs.log(f"server-{kill - 1}.log")[-3000:]
        assert all(process.poll() is None for process in recorders.values()), "the recorders ended before the kill"
        server.kill()
        server.wait(timeout=30)
        sent_at_kill = total_sent()
        # Recorders keep publishing while the station is down; the broker queues for its session.
        assert _wait(lambda: total_sent() >= sent_at_kill + 16, 120)
        accepted_before = total_accepted()
        server = start_server(f"server-{kill}.log")
        assert f"site {SITE} restored: {accepted_before} windows in the buffer" in programs.log(f"server-{kill}.log")

    for device, process in recorders.items():
        assert process.wait(timeout=300) == 0, programs.log(f"{device}.log")[-3000:]
    expected = {device: _sent(edge_state, device) for device in recordings}

    def caught_up():
        site = _inspect(server_state).get(SITE)
        return site is not None and all(
            site["devices"].get(device, {}).get("accepted_windows") == count for device, count in expected.items())

    assert _wait(caught_up, 240, interval=2), programs.log("server-2.log")[-3000:]
    server.terminate()
    assert server.wait(timeout=60) == 0, programs.log("server-2.log")[-3000:]
    site = _inspect(server_state)[SITE]

    lost, duplicated = 0, 0
    for device, count in expected.items():
        entry = site["devices"][device]
        in_buffer = sum(end - start for start, end in entry["buffer_ranges"])
        lost += count - in_buffer
        duplicated += entry["buffer_duplicates"]
        assert entry["buffer_ranges"] == [[0, count]], (device, entry)
    print(f"base station killed twice: recorders sent {sum(expected.values())} windows {expected}, "
          f"buffer holds {site['buffer_windows']}, lost {lost}, duplicated {duplicated}")
    assert lost == 0
    assert duplicated == 0
    assert site["buffer_windows"] == sum(expected.values())

    manifests = [Manifest.decode(payload) for payload in observer.manifests]
    versions = [manifest.version for manifest in manifests if manifest.site == SITE]
    sequences = [manifest.sequence for manifest in manifests if manifest.site == SITE]
    assert versions, programs.log("server-2.log")[-3000:]
    assert versions == sorted(set(versions))
    assert sequences == sorted(set(sequences))
