"""The base station's HTTP server: the live page, its JSON and event stream, and Prometheus metrics.

Routes:
    GET /              the live page (HTML, one script and one style sheet, nothing from other hosts)
    GET /api/state     everything the page shows, as one JSON document
    GET /api/events    server-sent events: a ``snapshot`` event, then one event per change
    GET /metrics       Prometheus text format

The standard library's ``ThreadingHTTPServer`` serves each request on its own
thread. An event stream holds its thread while the page is open, which
``live.MAX_SUBSCRIBERS`` bounds. The server only reads a ``LiveState`` and the
station's thread-safe stats, never the adaptation state.
"""

from __future__ import annotations

import http.server
import importlib.resources
import json
import logging
import socket
import threading
from typing import Any

from prometheus_client.registry import CollectorRegistry

from dawnchorus.server.live import LiveState, TooManySubscribers, encode_event
from dawnchorus.server.metrics import render

_LOGGER = logging.getLogger(__name__)

# Seconds between keep-alive comments on an idle event stream. Writing them
# finds closed pages, whose threads would otherwise wait forever, and keeps
# proxies from closing a quiet connection (nginx's default timeout is 60 s).
KEEPALIVE_S = 15.0

# Milliseconds a browser waits before it reconnects a broken event stream.
RECONNECT_MS = 3000

# The page's files, shipped in the package's webpage/ folder: name -> content type.
_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

# Everything the page loads comes from this server. A CDN link added by mistake fails in every browser.
_CSP = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


def _load_assets() -> dict[str, bytes]:
    folder = importlib.resources.files("dawnchorus.server").joinpath("webpage")
    return {name: folder.joinpath(name).read_bytes() for name in _ASSETS}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    # Seconds a read or write may block. A page that stops reading its event stream
    # (a suspended laptop) then frees its thread instead of keeping it for good.
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        _LOGGER.debug("web %s: " + format, self.client_address[0], *args)

    def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=60" if cache else "no-store")
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        path = self.path.partition("?")[0]
        try:
            if path in ("/", "/index.html"):
                self._send(200, self.server.assets["index.html"], _ASSETS["index.html"])
            elif path.lstrip("/") in _ASSETS:
                name = path.lstrip("/")
                self._send(200, self.server.assets[name], _ASSETS[name], cache=True)
            elif path == "/api/state":
                body = json.dumps(self.server.live.snapshot(), separators=(",", ":")).encode()
                self._send(200, body, "application/json")
            elif path == "/api/events":
                self._stream_events()
            elif path == "/metrics":
                body, content_type = render(self.server.metrics)
                self._send(200, body, content_type)
            else:
                self._send(404, f"not found: {path}; the page is at /, metrics at /metrics\n".encode(),
                           "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            _LOGGER.debug("web %s: client closed the connection during %s", self.client_address[0], path)

    def _stream_events(self) -> None:
        live = self.server.live
        try:
            subscriber, snapshot = live.subscribe()
        except TooManySubscribers as error:
            self._send(503, f"{error}; close one and reload\n".encode(), "text/plain; charset=utf-8")
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            # nginx buffers responses by default, which would hold events back.
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            self.wfile.write(f"retry: {RECONNECT_MS}\n\n".encode() + encode_event("snapshot", snapshot))
            self.wfile.flush()
            while not subscriber.closed and not self.server.stopping.is_set():
                event = subscriber.get(timeout=KEEPALIVE_S)
                self.wfile.write(event if event is not None else b": keep-alive\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        finally:
            live.unsubscribe(subscriber)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], live: LiveState, metrics: CollectorRegistry):
        self.live = live
        self.metrics = metrics
        self.assets = _load_assets()
        self.stopping = threading.Event()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)


class WebServer:
    """Serves the live page and /metrics on ``host:port`` from a thread of its own.

    Args:
        live: the station's live state.
        metrics: the registry that ``/metrics`` renders (``metrics.metrics_registry``).
        host, port: where to listen; port 0 picks a free one (see ``port`` after ``start``).
    """

    def __init__(self, live: LiveState, metrics: CollectorRegistry, host: str = "127.0.0.1", port: int = 8080):
        self._live = live
        self._metrics = metrics
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        """Bind and serve. Raises OSError (e.g. the port is in use) with the address in the message."""
        try:
            self._server = _Server((self.host, self.port), self._live, self._metrics)
        except OSError as error:
            raise OSError(error.errno, f"the live page cannot listen on {self.host}:{self.port}: {error.strerror}; "
                                       "choose another --http HOST:PORT") from None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="web-server", daemon=True)
        self._thread.start()
        _LOGGER.info("live page at %s, Prometheus metrics at %smetrics", self.url, self.url)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stopping.set()
        self._live.close_subscribers()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        _LOGGER.info("live page at %s stopped", self.url)
