"""systemd service notifications: READY=1 once started, WATCHDOG=1 while healthy, STOPPING=1 at the end.

In systemd's notify protocol (sd_notify(3)), a notification is one datagram of
newline-separated ``KEY=VALUE`` lines, sent to the Unix socket named in
``$NOTIFY_SOCKET``. A leading ``@`` names a socket in Linux's abstract
namespace. ``$WATCHDOG_USEC``
is the unit's ``WatchdogSec=`` in microseconds, and ``$WATCHDOG_PID``, when
set, names the process that must send the pings.

The protocol is written here in a few lines instead of taken from a library.
``systemd-python`` (python-systemd) builds against libsystemd's headers, which
a recorder's virtual environment would then need a compiler and -dev packages
for. ``sdnotify`` 0.3.2, the small pure-Python package, swallows every
exception including KeyboardInterrupt, and reads neither ``$WATCHDOG_USEC`` nor
``$WATCHDOG_PID``, so it would save only the socket call itself.

Outside systemd (no ``$NOTIFY_SOCKET``) every call here does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

_LOGGER = logging.getLogger(__name__)

# A health check returns None when the process is healthy, else the reason it is not.
HealthCheck = Callable[[], "str | None"]

# Pings per watchdog period: sd_watchdog_enabled(3) recommends a ping every
# half period, so a ping that is late by less than half a period is harmless.
_PINGS_PER_PERIOD = 2


class ServiceNotifier:
    """Sends READY=1 and STOPPING=1, and WATCHDOG=1 from a thread while ``health`` returns None.

    Args:
        name: the program, for logs.
        health: called before each ping. When it returns a string (what is stuck),
            no ping is sent, and systemd restarts the service once ``WatchdogSec=``
            passes without one.
        environ: the environment to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
            ``WATCHDOG_PID`` from; ``os.environ`` by default.
    """

    def __init__(self, name: str, health: HealthCheck, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self._name = name
        self._health = health
        self._address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
        self._watchdog_s = _watchdog_period_s(environ)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unhealthy_reason: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether systemd listens, that is, ``$NOTIFY_SOCKET`` is set."""
        return self._address is not None

    @property
    def watchdog_period_s(self) -> float | None:
        """The unit's ``WatchdogSec=`` in seconds, or None without a watchdog."""
        return self._watchdog_s

    def ready(self, status: str = "") -> None:
        """Send READY=1 and, with a watchdog, start the thread that pings it."""
        if not self.enabled:
            return
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))
        _LOGGER.info("%s: told systemd it is ready%s", self._name,
                     f"; watchdog pings every {self._watchdog_s / _PINGS_PER_PERIOD:.1f} s"
                     if self._watchdog_s else "")
        if self._watchdog_s is not None:
            self._thread = threading.Thread(target=self._ping, name=f"{self._name}-watchdog", daemon=True)
            self._thread.start()

    def stopping(self) -> None:
        """Stop the pings and send STOPPING=1, so that systemd waits for the exit without a watchdog."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.enabled:
            self._send("STOPPING=1")

    def _ping(self) -> None:
        interval_s = self._watchdog_s / _PINGS_PER_PERIOD
        while not self._stop.wait(interval_s):
            try:
                reason = self._health()
            except Exception as error:  # a failing check must not end the thread: no ping is sent
                reason = f"the health check failed: {error!r}"
            if reason is None:
                if self._unhealthy_reason is not None:
                    _LOGGER.info("%s: healthy again, watchdog pings resume", self._name)
                    self._unhealthy_reason = None
                self._send("WATCHDOG=1")
            elif reason != self._unhealthy_reason:
                # Logged once per reason, not every interval.
                _LOGGER.error("%s: %s; watchdog pings stop, so systemd restarts the service after %.0f s",
                              self._name, reason, self._watchdog_s)
                self._unhealthy_reason = reason

    def _send(self, message: str) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self._address)
        except OSError as error:
            # systemd restarts a service whose watchdog pings stop, so a failed send is logged, not raised.
            _LOGGER.error("%s: sending %r to systemd's notify socket failed: %s", self._name,
                          message.split("\n")[0], error)


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def _watchdog_period_s(environ) -> float | None:
    """Return ``$WATCHDOG_USEC`` in seconds if the watchdog is meant for this process, else None."""
    text = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not text:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        microseconds = int(text)
    except ValueError:
        _LOGGER.error("WATCHDOG_USEC=%r is not a number of microseconds; the watchdog is not pinged", text)
        return None
    return microseconds / 1e6 if microseconds > 0 else None

