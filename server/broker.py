"""An MQTT broker embedded in the process (amqtt), for the demo and for trying
dawnchorus without installing Mosquitto. Fleets run Mosquitto (see deploy/)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

_LOGGER = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class _PubackTimeoutFilter(logging.Filter):
    """Drop amqtt's records of a subscriber's PUBACK that came after its fixed 5 s wait, and of that PUBACK.

    amqtt 0.12 waits 5 s for each PUBACK and then logs a warning and a
    traceback, although the message was already sent. The base station
    acknowledges a message only once its windows are committed, which takes
    longer while an adaptation round runs; it still receives the message,
    and recorders send again what the base station's receipts do not confirm.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        text = f"{record.getMessage()} {error or ''}"
        # The PUBACK that comes after the wait is then reported as unknown.
        return "Timeout waiting for PUBACK" not in text and "Received PUBACK for unknown" not in text


_PUBACK_FILTER = _PubackTimeoutFilter()


class EmbeddedBroker:
    """amqtt running on its own event loop in a daemon thread.

    Anonymous clients are allowed, so bind it to the loopback interface only.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        for name in ("amqtt.broker", "amqtt.mqtt.protocol.handler"):
            if _PUBACK_FILTER not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_PUBACK_FILTER)
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 15.0) -> None:
        self._thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"embedded MQTT broker did not start on {self.host}:{self.port} in {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"embedded MQTT broker failed to start: {self._error}") from self._error
        _LOGGER.info("embedded MQTT broker (amqtt) listening on %s:%d", self.host, self.port)

    def _run(self) -> None:
        from amqtt.broker import Broker

        # amqtt logs every connection at INFO, which would bury the demo's own log.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        try:
            self._broker = Broker(config, loop=self._loop)
            self._loop.run_until_complete(self._broker.start())
        except BaseException as error:  # reported to start()'s caller
            self._error = error
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._loop is None or self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            future.result(timeout=10)
        except Exception as error:  # shutting down anyway
            _LOGGER.warning("embedded broker shutdown: %s", error)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        _LOGGER.info("embedded MQTT broker stopped")

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
