"""The command line: errors name the bad value and what to do instead."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest

from dawnchorus.protocol.signing import generate_key_files


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


@pytest.fixture()
def key_dir(tmp_path):
    generate_key_files(tmp_path / "keys")
    return tmp_path / "keys"


def test_server_run_invalid_species_spec_rejected(tmp_path, key_dir):
    result = _run("server", "run", "--state-dir", str(tmp_path), "--site-species", "forest=north",
                  "--signing-key", str(key_dir / "head-signing.key"))
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


def test_server_run_without_signing_key_rejected(tmp_path):
    result = _run("server", "run", "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--signing-key is missing" in result.stderr
    assert "dawnchorus keys generate DIR" in result.stderr


def test_keys_generate_writes_key_pair(tmp_path):
    result = _run("keys", "generate", str(tmp_path / "keys"))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((tmp_path / "keys" / "head-signing.key").stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "head-signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert "key id: " in result.stdout


def test_keys_generate_existing_key_rejected(key_dir):
    before = (key_dir / "head-signing.key").read_bytes()
    result = _run("keys", "generate", str(key_dir))
    assert result.returncode == 2
    assert "already exists" in result.stderr
    assert (key_dir / "head-signing.key").read_bytes() == before


def test_edge_run_private_key_as_public_rejected(key_dir):
    result = _run("edge", "run", "--device", "rec-1", "--site", "forest", "--input", "x.wav",
                  "--head-public-key", str(key_dir / "head-signing.key"))
    assert result.returncode == 2
    assert "contains a private key" in result.stderr


def test_server_rollback_without_registry_rejected(tmp_path, key_dir):
    result = _run("server", "rollback", "forest", "2", "--state-dir", str(tmp_path / "empty"),
                  "--signing-key", str(key_dir / "head-signing.key"))
    assert result.returncode == 2
    assert "contains no head registry" in result.stderr


def test_server_rollback_source_version_rejected(tmp_path, key_dir):
    result = _run("server", "rollback", "forest", "0", "--state-dir", str(tmp_path),
                  "--signing-key", str(key_dir / "head-signing.key"))
    assert result.returncode == 2
    assert "version 0 is the source head" in result.stderr


def test_demo_makes_recorders_only_for_audio(tmp_path):
    from dawnchorus.demo import recorder_inputs

    (tmp_path / "dawn.flac").write_bytes(b"")
    (tmp_path / "scores.csv").write_text("start,end\n")
    (tmp_path / ".hidden.wav").write_bytes(b"")
    (tmp_path / "site-b").mkdir()
    (tmp_path / "site-b" / "dusk.wav").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("field notes")

    assert recorder_inputs([tmp_path]) == [[tmp_path / "dawn.flac"], [tmp_path / "site-b"]]
