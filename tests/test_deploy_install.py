"""deploy/install.sh in its --no-system mode, and the systemd units under ``systemd-analyze verify``."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
INSTALL = REPO / "deploy" / "install.sh"
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))
# The executable that the units in deploy/systemd start, before install.sh rewrites the path.
UNIT_EXECUTABLE = "/opt/dawnchorus/venv/bin/dawnchorus"


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed: apt-get install systemd (.ci/run does)")
    return path


def _verify(units: list[pathlib.Path]) -> subprocess.CompletedProcess:
    return subprocess.run([_systemd_analyze(), "verify", *map(str, units)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def recorder_install(tmp_path_factory) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
    """Run install.sh --no-system into a fresh prefix; return the prefix and the finished process."""
    prefix = tmp_path_factory.mktemp("install")
    process = subprocess.run(["bash", str(INSTALL), "--no-system", "--prefix", str(prefix)], capture_output=True,
                             text=True, timeout=900)
    return prefix, process


def test_units_pass_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart= names an executable, so the copies start this test run's dawnchorus.
    executable = pathlib.Path(sys.executable).parent / "dawnchorus"
    copies = []
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(UNIT_EXECUTABLE, str(executable)))
        copies.append(copy)

    result = _verify(copies)

    assert [unit.name for unit in UNITS] == ["dawnchorus-base-station.service", "dawnchorus-recorder.service"]
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_units_name_notify_watchdog_and_config():
    for unit in UNITS:
        text = unit.read_text()
        role = unit.stem.removeprefix("dawnchorus-")
        assert "Type=notify" in text, unit.name
        assert "WatchdogSec=" in text, unit.name
        assert "Restart=always" in text, unit.name
        assert f"--config /etc/dawnchorus/{role}.toml" in text, unit.name
        assert "User=dawnchorus" in text, unit.name


def test_recorder_unit_keeps_audio_devices():
    text = (REPO / "deploy" / "systemd" / "dawnchorus-recorder.service").read_text()

    assert "SupplementaryGroups=audio" in text
    assert "DeviceAllow=char-alsa rw" in text
    assert "PrivateDevices=yes" not in text


def test_install_no_system_completes(recorder_install):
    prefix, process = recorder_install

    assert process.returncode == 0, process.stderr
    assert "install.sh: done: recorder with dawnchorus[edge]" in process.stderr


def test_install_logs_platform(recorder_install):
    _, process = recorder_install
    platforms = [line.split()[2] for line in process.stderr.splitlines() if line.startswith("install.sh: platform:")]

    assert len(platforms) == 1, process.stderr
    assert platforms[0] in ("jetson", "raspberry-pi", "other")


def test_install_venv_runs_recorder_without_tensorflow(recorder_install):
    prefix, _ = recorder_install
    python = prefix / "venv" / "bin" / "python"

    help_text = subprocess.run([prefix / "venv" / "bin" / "dawnchorus", "edge", "run", "--help"],
                               capture_output=True, text=True, timeout=120)
    tensorflow = subprocess.run([python, "-c", "import importlib.util; print(importlib.util.find_spec('tensorflow'))"],
                                capture_output=True, text=True, timeout=60)
    runtime = subprocess.run([python, "-c", "from dawnchorus.models.runtime import runtime_name; print(runtime_name())"],
                             capture_output=True, text=True, timeout=60)

    assert help_text.returncode == 0, help_text.stderr
    assert "--device" in help_text.stdout
    assert tensorflow.stdout.strip() == "None"
    assert runtime.stdout.strip() == "ai-edge-litert"


def test_install_writes_units_that_verify(recorder_install):
    prefix, _ = recorder_install
    unit = prefix / "systemd" / "dawnchorus-recorder.service"
    text = unit.read_text()

    result = _verify([unit])

    assert f"ExecStart={prefix}/venv/bin/dawnchorus edge run --config {prefix}/etc/dawnchorus/recorder.toml" in text
    assert (prefix / "etc" / "dawnchorus" / "recorder.env").is_file()
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("model, tegra_release, platform", [
    ("Raspberry Pi 4 Model B Rev 1.5", False, "raspberry-pi (Raspberry Pi 4 Model B Rev 1.5;"),
    ("Raspberry Pi 5 Model B Rev 1.0", False, "raspberry-pi (Raspberry Pi 5 Model B Rev 1.0;"),
    ("NVIDIA Jetson Orin Nano Developer Kit", False, "jetson (NVIDIA Jetson Orin Nano Developer Kit;"),
    (None, True, "jetson (NVIDIA Jetson (# R36 (release), REVISION: 4.0);"),
    (None, False, "other (no device-tree model;"),
    ("Pine64 RockPro64 v2.1", False, "other (Pine64 RockPro64 v2.1;"),
])
def test_install_detects_platform(tmp_path, model, tegra_release, platform):
    environment = dict(os.environ, DAWNCHORUS_DEVICE_TREE_MODEL=str(tmp_path / "model"),
                       DAWNCHORUS_TEGRA_RELEASE=str(tmp_path / "nv_tegra_release"))
    if model is not None:
        # The device tree stores the model NUL-terminated.
        (tmp_path / "model").write_bytes(model.encode() + b"\0")
    if tegra_release:
        (tmp_path / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")

    process = subprocess.run(["bash", str(INSTALL), "--detect-only", "--no-system", "--prefix", str(tmp_path / "prefix")],
                             capture_output=True, text=True, timeout=60, env=environment)

    assert process.returncode == 0, process.stderr
    assert f"install.sh: platform: {platform}" in process.stderr
    assert not (tmp_path / "prefix").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--role", "gateway"], "invalid --role gateway"),
    (["--runtime", "tensorflow"], "invalid --runtime tensorflow"),
    (["--role", "base-station", "--runtime", "tflite-runtime"], "tflite-runtime is for recorders only"),
    (["--frobnicate"], "unknown option --frobnicate"),
])
def test_install_rejects_bad_option(tmp_path, arguments, message):
    process = subprocess.run(["bash", str(INSTALL), "--no-system", "--prefix", str(tmp_path), *arguments],
                             capture_output=True, text=True, timeout=60)

    assert process.returncode == 2
    assert message in process.stderr


def test_install_no_system_requires_prefix(tmp_path):
    # Without --prefix, the default /opt/dawnchorus belongs to the system installation.
    process = subprocess.run(["bash", str(INSTALL), "--no-system"], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)

    assert process.returncode == 2
    assert "--no-system needs --prefix DIR" in process.stderr
    assert "creating the virtual environment" not in process.stderr
