"""The command line: errors name the bad value and what to do instead."""

from __future__ import annotations

import subprocess
import sys


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dawnchorus", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_demo_without_paths_explains_usage():
    result = _run("demo")
    assert result.returncode == 2
    assert "no recordings given" in result.stderr
    assert "dawnchorus demo ../shared/data/soundscapes" in result.stderr


def test_demo_missing_path_rejected(tmp_path):
    result = _run("demo", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_edge_run_invalid_device_id_rejected():
    result = _run("edge", "run", "--device", "rec/1", "--site", "forest", "--input", "x.wav")
    assert result.returncode == 2
    assert "invalid device id 'rec/1'" in result.stderr


def test_server_run_invalid_species_spec_rejected(tmp_path):
    result = _run("server", "run", "--state-dir", str(tmp_path), "--site-species", "forest=north")
    assert result.returncode == 2
    assert "invalid species spec 'north'" in result.stderr


def test_broker_address_invalid_rejected():
    result = _run("edge", "run", "--device", "rec-1", "--site", "forest", "--broker", "host:port")
    assert result.returncode == 2
    assert "expected HOST:PORT" in result.stderr


def test_mqtt_user_without_password_rejected(tmp_path):
    result = _run("server", "run", "--state-dir", str(tmp_path), "--mqtt-user", "base")
    assert result.returncode == 2
    assert "DAWNCHORUS_MQTT_PASSWORD" in result.stderr
