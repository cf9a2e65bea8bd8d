"""Fault test: the base station killed with SIGKILL and restarted while real recorders stream.

Two ``dawnchorus edge run`` processes replay real recordings through a
Mosquitto of their own. The ``dawnchorus server run`` process is killed twice
mid-stream and restarted. Afterwards, the windows persisted in the station's
buffer are compared with the sequence numbers that each recorder used: none
may be missing and none duplicated, and no head version may be published twice.
"""

from __future__ import annotations


import pytest
from support import accepted_windows, generate_keys, inspect_station, recorder_sent, write_species
from support import wait as _wait

from dawnchorus.protocol.messages import Manifest

SITE = "kill-station-site"


@pytest.mark.slow
def test_station_killed_mid_stream_loses_nothing(programs, start_mosquitto, observe, data_dir, tmp_path):
    # A broker of its own: the session broker may hold messages that other tests'
    # recorders sent to the same base-station client id.
    broker = start_mosquitto("broker")
    observer = observe(broker)
    keys = generate_keys(tmp_path / "keys")
    species = write_species(tmp_path / "species.txt")
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
        return sum(recorder_sent(edge_state, device) for device in recordings)

    def total_accepted() -> int:
        return accepted_windows(server_state, SITE)

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
    expected = {device: recorder_sent(edge_state, device) for device in recordings}

    def caught_up():
        site = inspect_station(server_state).get(SITE)
        return site is not None and all(
            site["devices"].get(device, {}).get("accepted_windows") == count for device, count in expected.items())

    assert _wait(caught_up, 240, interval=2), programs.log("server-2.log")[-3000:]
    server.terminate()
    assert server.wait(timeout=60) == 0, programs.log("server-2.log")[-3000:]
    site = inspect_station(server_state)[SITE]

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
    # A station publishes its newest manifest again, unchanged, after each connection; count each once.
    published = list(dict.fromkeys((manifest.version, manifest.sequence) for manifest in manifests
                                   if manifest.site == SITE))
    versions = [version for version, _ in published]
    sequences = [sequence for _, sequence in published]
    assert versions, programs.log("server-2.log")[-3000:]
    assert versions == sorted(set(versions))
    assert sequences == sorted(set(sequences))
