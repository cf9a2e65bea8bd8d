"""Counting and logging of rejected MQTT messages, shared by recorders and base stations.

Every rejected message is counted under its message kind and reason code
(``PayloadError.reason``), for example ``embeddings.length``. It is logged
with its topic and sender, but at most ``LOG_BURST`` lines per sender, kind
and reason in each ``LOG_WINDOW_S``, so that a misbehaving client cannot flood
the log. The counts always include the messages that were not logged.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

# Ten lines show the pattern of a fault. More lines from the same sender and
# cause only fill the disk of a process that runs for months.
LOG_BURST = 10
LOG_WINDOW_S = 60.0


class RejectionCounter:
    """Thread-safe counts of rejected messages per ``kind.reason``, with rate-limited log lines.

    Args:
        logger: where the rejections are logged, at ERROR level.
        owner: names the process in each line, e.g. ``base station`` or ``recorder rec-01``.
    """

    def __init__(self, logger: logging.Logger, owner: str):
        self._logger = logger
        self._owner = owner
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        # Per (sender, kind, reason): start of the current log window, lines logged in it, lines suppressed.
        self._windows: dict[tuple[str, str, str], list[float | int]] = {}

    def reject(self, topic: str, sender: str, kind: str, reason: str, detail: str) -> None:
        """Count one rejected message and log it unless its sender, kind and reason hit the rate limit.

        Args:
            topic: the message's topic.
            sender: who sent it, as the log line names it, e.g. ``device rec-01``.
            kind: the message kind, e.g. ``embeddings`` or ``manifest``.
            reason: the reason code, normally ``PayloadError.reason``.
            detail: the error message.
        """
        key = f"{kind}.{reason}"
        now = time.monotonic()
        with self._lock:
            self._counts[key] += 1
            count = self._counts[key]
            window = self._windows.setdefault((sender, kind, reason), [now, 0, 0])
            if now - window[0] >= LOG_WINDOW_S:
                window[:] = [now, 0, window[2]]
            if window[1] >= LOG_BURST:
                window[2] += 1
                return
            window[1] += 1
            suppressed, window[2] = window[2], 0

        note = f"; {suppressed} more like it were not logged" if suppressed else ""
        self._logger.error("%s rejected a %s message on %s from %s: %s (reason %s, %d so far%s)",
                           self._owner, kind, topic, sender, detail, reason, count, note)

    def counts(self) -> dict[str, int]:
        """Return the rejections so far, keyed ``kind.reason``, sorted by key."""
        with self._lock:
            return dict(sorted(self._counts.items()))

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
