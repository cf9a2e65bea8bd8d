"""The live detection feed: a JSON-lines log on disk and callbacks for live views."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import threading
from typing import Callable

from dawnchorus.protocol.messages import Detection

_LOGGER = logging.getLogger(__name__)


class DetectionFeed:
    """Appends every detection to ``path`` (one JSON object per line) and calls ``listener``."""

    def __init__(self, path: pathlib.Path, listener: Callable[[Detection], None] | None = None):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = open(self.path, "a", encoding="utf-8", buffering=1)
        self._listener = listener
        self._lock = threading.Lock()
        self.count = 0

    def add(self, detection: Detection) -> None:
        with self._lock:
            self._stream.write(json.dumps(detection.to_json(), separators=(",", ":")) + "\n")
            self.count += 1
        if self._listener is not None:
            try:
                self._listener(detection)
            except Exception:  # a broken view must not stop ingestion
                _LOGGER.exception("detection listener failed on a detection from %s", detection.device)

    def sync(self) -> None:
        """Flush the log and sync it to disk, so that every detection added so far survives a crash."""
        with self._lock:
            self._stream.flush()
            os.fsync(self._stream.fileno())

    def close(self) -> None:
        with self._lock:
            self._stream.close()
