"""Shared fixtures: the real recordings beside the repository, and a real Mosquitto broker."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    if not DATA.is_dir():
        pytest.skip(f"the shared recordings are not at {DATA}")
    return DATA


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Mosquitto:
    """A Mosquitto process on a free loopback port, with queue limits raised as in deploy/."""

    def __init__(self, directory: pathlib.Path):
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(binary):
            pytest.fail("mosquitto is not installed: run .ci/run, or apt-get install mosquitto")
        self.port = _free_port()
        self.host = "127.0.0.1"
        config = directory / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 0\n"
        )
        self._log = open(directory / "mosquitto.log", "w")
        self._process = subprocess.Popen([binary, "-c", str(config)], stdout=self._log, stderr=subprocess.STDOUT)
        if not _wait_for_port(self.port, 10):
            self.stop()
            pytest.fail(f"mosquitto did not listen on 127.0.0.1:{self.port}; see {directory}/mosquitto.log")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._log.close()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory) -> Mosquitto:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()
