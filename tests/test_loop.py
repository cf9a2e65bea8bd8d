"""The whole loop against a real Mosquitto, with the real programs: recorders replay real
recordings, the base station adapts and pushes a head, and every recorder acknowledges it."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

SITE = "loop-site"


def _dawnchorus(*args: str, log: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    stream = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "dawnchorus", *args], stdout=stream,
                            stderr=subprocess.STDOUT, env=env)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _acks(state: pathlib.Path) -> dict:
    path = state / "sites" / SITE / "acks.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@pytest.mark.slow
def test_loop_processes_push_and_ack_head(mosquitto, data_dir, tmp_path):
    server_state = tmp_path / "server"
    keys = tmp_path / "keys"
    generated = subprocess.run([sys.executable, "-m", "dawnchorus", "keys", "generate", str(keys)],
                               capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr
    species = tmp_path / "species.txt"
    species.write_text("\n".join([
        "Hylocichla mustelina", "Setophaga ruticilla", "Setophaga citrina", "Poecile atricapillus",
        "Cardinalis cardinalis", "Baeolophus bicolor", "Haemorhous mexicanus", "Turdus migratorius",
        "Cyanocitta cristata", "Zenaida macroura",
    ]) + "\n")
    server = _dawnchorus(
        "server", "run", "--broker", mosquitto.address, "--state-dir", str(server_state),
        "--signing-key", str(keys / "head-signing.key"), "--default-species", f"@{species}", "--update-interval", "16", "--min-buffer", "16",
        "--buffer", "1000", log=tmp_path / "server.log",
    )
    deadline = time.monotonic() + 120
    while "base station ready" not in (tmp_path / "server.log").read_text():
        assert time.monotonic() < deadline, "the base station did not connect within 120 s"
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    recordings = {
        "rec-a": data_dir / "soundscapes/opensoundscape",
        "rec-b": data_dir / "soundscapes/birdnet-example/soundscape.flac",
    }
    recorders = [
        _dawnchorus("edge", "run", "--device", device, "--site", SITE, "--broker", mosquitto.address,
                    "--input", str(path), "--speed", "0", "--stay", "--min-conf", "0.5",
                    "--species-file", str(species), "--state-dir", str(tmp_path / "edge"),
                    "--head-public-key", str(keys / "head-signing.pub"), "--threads", "1",
                    log=tmp_path / f"{device}.log")
        for device, path in recordings.items()
    ]
    try:
        deadline = time.monotonic() + 240
        acks = {}
        while time.monotonic() < deadline:
            acks = _acks(server_state)
            latest = max((int(p.stem[1:]) for p in (server_state / "sites" / SITE / "heads").glob("v*.json")),
                         default=0) if (server_state / "sites" / SITE / "heads").is_dir() else 0
            if latest and set(acks) == set(recordings) and all(a["version"] == latest for a in acks.values()):
                break
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
    finally:
        for process in recorders + [server]:
            _stop(process)

    server_log = (tmp_path / "server.log").read_text()
    assert set(acks) == set(recordings), server_log[-3000:]
    versions = {entry["version"] for entry in acks.values()}
    assert len(versions) == 1
    version = versions.pop()
    assert version >= 1
    record = json.loads((server_state / "sites" / SITE / "heads" / f"v{version}.json").read_text())
    assert len(record["labels"]) == 10
    assert record["sha256"]
    assert "published head" in server_log
    detections = (server_state / "detections.jsonl").read_text().splitlines()
    assert detections
    assert {json.loads(line)["device"] for line in detections} <= set(recordings)
    for device in recordings:
        assert "now running head" in (tmp_path / f"{device}.log").read_text()


@pytest.mark.slow
def test_demo_summary_against_mosquitto(mosquitto, data_dir, tmp_path):
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "dawnchorus", "demo", str(data_dir / "soundscapes/opensoundscape"),
         str(data_dir / "soundscapes/xc563936.mp3"), "--broker", mosquitto.address, "--speed", "0",
         "--summary", str(summary_path), "--site-species", "demo=47.68,-122.29,20",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["windows"] == 24 + 24
    assert summary["wall_seconds"] > 0
    assert summary["sites"]["demo"]["head_versions"] >= 1
    latest = summary["sites"]["demo"]["latest_version"]
    assert set(summary["recorders"]) == {"rec-opensoundscape", "rec-xc563936"}
    for device, info in summary["recorders"].items():
        assert info["site"] == "demo"
        assert info["head_version"] == latest, device
    assert "== dawnchorus demo summary ==" in result.stdout


def _retained_status(broker, topic: str, timeout: float = 5.0) -> dict | None:
    import paho.mqtt.client as mqtt

    received: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, message: received.append(message.payload)
    client.connect(broker.host, broker.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    deadline = time.monotonic() + timeout
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    client.loop_stop()
    client.disconnect()
    return json.loads(received[-1]) if received and received[-1] else None


@pytest.mark.slow
def test_recorder_killed_status_goes_offline(mosquitto, data_dir, tmp_path):
    topic = f"dawnchorus/v1/{SITE}/rec-will/status"
    recorder = _dawnchorus("edge", "run", "--device", "rec-will", "--site", SITE, "--broker", mosquitto.address,
                           "--input", str(data_dir / "soundscapes/opensoundscape/birds_10s.wav"), "--speed", "0",
                           "--stay", "--state-dir", str(tmp_path), "--threads", "1", log=tmp_path / "rec.log")
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            status = _retained_status(mosquitto, topic, timeout=1.0)
            if status and status["state"] in ("online", "finished") and status["windows"] > 0:
                break
            assert recorder.poll() is None, (tmp_path / "rec.log").read_text()[-3000:]
        assert status is not None
        assert status["state"] in ("online", "finished")
        recorder.kill()
        recorder.wait(timeout=10)

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = _retained_status(mosquitto, topic, timeout=1.0)
            if status and status["state"] == "offline":
                break
        assert status["state"] == "offline"
        assert status["device"] == "rec-will"
    finally:
        _stop(recorder)
