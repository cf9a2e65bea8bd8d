"""A recorder's state as the base station's live page shows it, with the real programs: a base station
with ``--http``, and a recorder that replays a real recording through a real Mosquitto, receives the
station's head, reports ``finished``, logs its detections and is then killed.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dawnchorus.protocol.signing import generate_key_files
from dawnchorus.server.broker import free_port

SITE = "states-site"
DEVICE = "rec-states"
# Species of the recording, so that the recorder detects some of them at the threshold below.
SPECIES = ["Poecile atricapillus", "Cardinalis cardinalis", "Baeolophus bicolor", "Haemorhous mexicanus",
           "Turdus migratorius", "Cyanocitta cristata", "Zenaida macroura", "Setophaga ruticilla"]
# soundscape.flac lasts 120 s: 40 windows. A round every 24 windows gives exactly one head, v1.
WINDOWS = 40
ROUND_WINDOWS = "24"
DETECTION_LINE = re.compile(
    r"recorder rec-states: detected (?P<common>[^(]+) \((?P<scientific>[^)]+)\) at (?P<time>\S+), "
    r"confidence (?P<confidence>[01]\.\d\d), head v(?P<version>\d+)$", re.MULTILINE)



def _get(address: str, path: str) -> bytes:
    connection = http.client.HTTPConnection(address, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200, f"GET {path}: HTTP {response.status}"
        return response.read()
    finally:
        connection.close()


def _recorder_row(address: str) -> dict:
    state = json.loads(_get(address, "/api/state"))
    return next((row for row in state["recorders"] if row["device"] == DEVICE), {})


def _recorder_metrics(address: str) -> dict[str, float]:
    labels = {"site": SITE, "device": DEVICE}
    text = _get(address, "/metrics").decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.labels == labels}


def _wait_for(condition, timeout: float, failure) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure()
        time.sleep(0.3)


@pytest.mark.slow
def test_recorder_finished_then_killed_keeps_head(start_mosquitto, programs, data_dir, tmp_path):
    broker = start_mosquitto("broker")
    generate_key_files(tmp_path / "keys")
    species = tmp_path / "species.txt"
    species.write_text("\n".join(SPECIES) + "\n")
    address = f"127.0.0.1:{free_port()}"
    server = programs.start(
        "server", "run", "--broker", broker.address, "--state-dir", str(tmp_path / "server"),
        "--signing-key", str(tmp_path / "keys" / "head-signing.key"), "--default-species", f"@{species}",
        "--update-interval", ROUND_WINDOWS, "--min-buffer", ROUND_WINDOWS, "--buffer", "1000",
        "--http", address, log="server.log")

    def failure(what: str):
        return lambda: (f"{what}; recorder row: {_recorder_row(address)}\n"
                        f"server log: {programs.log('server.log')[-2000:]}\n"
                        f"recorder log: {programs.log('recorder.log')[-2000:]}")

    deadline = time.monotonic() + 180
    while "base station ready" not in programs.log("server.log"):
        assert server.poll() is None and time.monotonic() < deadline, programs.log("server.log")[-3000:]
        time.sleep(0.3)

    recorder = programs.start(
        "edge", "run", "--device", DEVICE, "--site", SITE, "--broker", broker.address,
        "--input", str(data_dir / "soundscapes/birdnet-example/soundscape.flac"), "--speed", "0", "--stay",
        "--min-conf", "0.3", "--species-file", str(species), "--state-dir", str(tmp_path / "edge"),
        "--head-public-key", str(tmp_path / "keys" / "head-signing.pub"), "--threads", "1", log="recorder.log")

    # The replay ends long before the round, so the recorder reports "finished" while it waits for heads.
    _wait_for(lambda: _recorder_row(address).get("state") == "finished", 180,
              failure("the recorder never reported finished"))
    _wait_for(lambda: _recorder_row(address).get("head_version") == 1, 180,
              failure("the recorder never ran head v1"))
    finished = _recorder_row(address)
    finished_metrics = _recorder_metrics(address)
    log = programs.log("recorder.log")
    logged = [match.groupdict() for match in DETECTION_LINE.finditer(log)]

    def received() -> set[tuple[str, str]]:
        state = json.loads(_get(address, "/api/state"))
        return {(row["common_name"], row["scientific_name"]) for row in state["detections"]}

    species_logged = {(line["common"], line["scientific"]) for line in logged}
    _wait_for(lambda: received() == species_logged, 60,
              failure(f"the station's detections differ from the logged ones {sorted(species_logged)}"))

    recorder.send_signal(signal.SIGKILL)
    recorder.wait(timeout=30)
    _wait_for(lambda: _recorder_row(address).get("state") == "offline", 60,
              failure("the broker's last will did not reach the page"))
    killed = _recorder_row(address)
    killed_metrics = _recorder_metrics(address)

    assert finished["state"] == "finished"
    assert finished["windows"] == WINDOWS
    assert finished_metrics["dawnchorus_recorder_online"] == 1
    assert finished_metrics["dawnchorus_recorder_head_version"] == 1

    assert logged, log[-3000:]
    assert all(0.3 <= float(line["confidence"]) <= 1.0 for line in logged)
    assert {line["version"] for line in logged} <= {"0", "1"}

    assert killed["state"] == "offline"
    assert killed["head_version"] == 1
    assert killed["windows"] == WINDOWS
    assert killed["queue_depth"] == finished["queue_depth"]
    assert killed_metrics["dawnchorus_recorder_online"] == 0
    assert killed_metrics["dawnchorus_recorder_head_version"] == 1
    assert killed_metrics["dawnchorus_recorder_queue_depth"] == finished["queue_depth"]
    station_log = programs.log("server.log")
    assert f"recorder {DEVICE} of site {SITE} is finished, running head v" in station_log
    assert f"recorder {DEVICE} of site {SITE} is offline" in station_log
