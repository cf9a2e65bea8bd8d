"""The systemd notify protocol of ``edge run`` and ``server run``, received on a real Unix datagram socket.

Each test binds its own socket, passes it to a real process in
``NOTIFY_SOCKET`` with ``WATCHDOG_USEC`` as systemd would, and reads what the
process sends: READY=1 once started, then WATCHDOG=1 while it is healthy.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid

import pytest

from dawnchorus.systemd_notify import ServiceNotifier

pytestmark = pytest.mark.broker

# A 1 s watchdog period, so the programs ping every 0.5 s.
WATCHDOG_USEC = "1000000"
STARTUP_TIMEOUT_S = 120.0


class NotifySocket:
    """A Unix datagram socket that records each notification with its arrival time."""

    def __init__(self, address: str):
        self.address = address
        self.messages: list[tuple[float, str]] = []
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind("\0" + address[1:] if address.startswith("@") else address)

    def receive_until(self, condition, timeout_s: float) -> bool:
        """Record notifications until ``condition(messages)`` holds; return False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not condition(self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._socket.settimeout(min(remaining, 0.5))
            try:
                payload = self._socket.recv(4096)
            except socket.timeout:
                continue
            for line in payload.decode().split("\n"):
                self.messages.append((time.monotonic(), line))
        return True

    def listen(self, seconds: float) -> None:
        """Record notifications for ``seconds``."""
        self.receive_until(lambda messages: False, seconds)

    def lines(self, prefix: str) -> list[float]:
        """Return the arrival times of the lines that start with ``prefix``."""
        return [at for at, line in self.messages if line.startswith(prefix)]

    def close(self) -> None:
        self._socket.close()
        if not self.address.startswith("@"):
            os.unlink(self.address)


@pytest.fixture()
def notify_socket(monkeypatch):
    """A notify socket in the abstract namespace, named in NOTIFY_SOCKET for the programs started next."""
    receiver = NotifySocket(f"@dawnchorus-test-{uuid.uuid4().hex}")
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    monkeypatch.setenv("WATCHDOG_USEC", WATCHDOG_USEC)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield receiver
    receiver.close()


def _ready_then_pings(count: int):
    def condition(messages) -> bool:
        lines = [line for _, line in messages]
        return "READY=1" in lines and lines[lines.index("READY=1"):].count("WATCHDOG=1") >= count
    return condition


def _stop(process) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


def test_recorder_ready_then_watchdog_pings(notify_socket, programs, mosquitto, data_dir, tmp_path):
    recording = data_dir / "soundscapes" / "maad-24h" / "S4A03895_20190522_000000.flac"
    process = programs.start("edge", "run", "--device", "rec-notify", "--site", "notify", "--broker",
                             mosquitto.address, "--input", str(recording), "--speed", "0", "--stay",
                             "--state-dir", str(tmp_path / "edge"), log="recorder.log")

    received = notify_socket.receive_until(_ready_then_pings(4), STARTUP_TIMEOUT_S)

    assert received, f"notifications: {notify_socket.messages}; log:\n{programs.log('recorder.log')}"
    assert notify_socket.lines("READY=1")[0] < notify_socket.lines("WATCHDOG=1")[0]
    assert process.poll() is None
    assert _stop(process) == 0
    assert notify_socket.receive_until(lambda messages: any(line == "STOPPING=1" for _, line in messages), 10)


def test_recorder_stalled_source_stops_pings(notify_socket, programs, mosquitto, data_dir, tmp_path):
    # Replayed at 1 % of real time, the first 3 s window takes 300 s to arrive:
    # the analysis loop waits for audio as it would on a microphone that stopped delivering.
    recording = data_dir / "soundscapes" / "maad-24h" / "S4A03895_20190522_000000.flac"
    process = programs.start("edge", "run", "--device", "rec-stall", "--site", "notify", "--broker",
                             mosquitto.address, "--input", str(recording), "--speed", "0.01",
                             "--stall-timeout", "2", "--state-dir", str(tmp_path / "edge"), log="recorder.log")
    assert notify_socket.receive_until(lambda messages: any(line == "READY=1" for _, line in messages),
                                       STARTUP_TIMEOUT_S), programs.log("recorder.log")
    ready_at = notify_socket.lines("READY=1")[0]

    # Pings may come until the 2 s stall timeout has passed since the last progress, and none after it.
    notify_socket.listen(8.0)

    pings = notify_socket.lines("WATCHDOG=1")
    assert process.poll() is None
    assert all(at - ready_at < 3.5 for at in pings), f"pings at {[round(at - ready_at, 1) for at in pings]} s"
    assert "no window was analysed" in programs.log("recorder.log")
    # systemd ends a service whose pings stopped with SIGABRT, then SIGKILL; a stalled
    # replay also takes 30 s to honour SIGTERM, so the test does not wait for it.
    process.kill()


def test_base_station_ready_then_watchdog_pings(notify_socket, programs, mosquitto, tmp_path):
    from dawnchorus.protocol.signing import generate_key_files

    private_key, _ = generate_key_files(tmp_path / "keys")
    process = programs.start("server", "run", "--broker", mosquitto.address, "--state-dir",
                             str(tmp_path / "server"), "--signing-key", str(private_key), log="station.log")

    received = notify_socket.receive_until(_ready_then_pings(4), STARTUP_TIMEOUT_S)

    assert received, f"notifications: {notify_socket.messages}; log:\n{programs.log('station.log')}"
    assert process.poll() is None
    assert _stop(process) == 0
    assert notify_socket.receive_until(lambda messages: any(line == "STOPPING=1" for _, line in messages), 10)


def test_notifier_without_socket_sends_nothing():
    notifier = ServiceNotifier("test", lambda: None, environ={})

    notifier.ready()
    notifier.stopping()

    assert not notifier.enabled


def test_notifier_watchdog_of_other_process_ignored(tmp_path):
    environ = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}

    notifier = ServiceNotifier("test", lambda: None, environ=environ)

    assert notifier.watchdog_period_s is None


def test_notifier_path_socket_pings_while_healthy(tmp_path):
    receiver = NotifySocket(str(tmp_path / "notify"))
    healthy = [True]
    environ = {"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "200000"}
    notifier = ServiceNotifier("test", lambda: None if healthy[0] else "stuck on purpose", environ=environ)
    try:
        notifier.ready("testing")
        assert receiver.receive_until(_ready_then_pings(3), 10)
        healthy[0] = False
        receiver.listen(0.3)
        count = len(receiver.lines("WATCHDOG=1"))
        receiver.listen(0.6)

        assert len(receiver.lines("WATCHDOG=1")) == count
        assert receiver.lines("STATUS=testing")
    finally:
        notifier.stopping()
        receiver.close()
