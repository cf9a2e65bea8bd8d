"""Opt-in memory tracing of the base station, for finding what grows in a long run.

With ``DAWNCHORUS_TRACEMALLOC=SECONDS`` in its environment, the station starts
``tracemalloc`` and logs, every SECONDS, its resident set size, the memory
that Python's allocator traces, and the allocation sites that grew most since
the first trace. Memory that grows in the RSS but not in the traced total was
allocated outside Python's allocator: by TensorFlow, LiteRT, SQLite or glibc
arenas. Tracing slows allocations down and costs memory itself, so it is off
unless the variable is set; ``benchmarks/station_memory.py`` sets it.
"""

from __future__ import annotations

import logging
import os
import threading
import tracemalloc

_LOGGER = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "DAWNCHORUS_TRACEMALLOC"

# Frames kept per allocation. Two name the caller of a numpy or json call as
# well as the call itself, at a lower cost than deeper tracebacks.
_FRAMES = 2

# Allocation sites listed per trace.
_TOP = 12


def resident_bytes() -> int | None:
    """Return this process's resident set size in bytes, or None where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MemoryTrace:
    """A daemon thread that logs RSS, the traced total and the top growing allocation sites every ``interval_s``."""

    def __init__(self, interval_s: float):
        if not interval_s > 0:
            raise ValueError(f"interval {interval_s}: give the seconds between traces, above 0")
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._baseline: tracemalloc.Snapshot | None = None
        self._baseline_rss = 0
        self._baseline_traced = 0
        self._thread = threading.Thread(target=self._run, name="memory-trace", daemon=True)

    def start(self) -> None:
        tracemalloc.start(_FRAMES)
        self._thread.start()
        _LOGGER.info("memory trace: tracemalloc started, a trace every %.0f s", self.interval_s)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.trace()
            except Exception:
                _LOGGER.exception("memory trace failed; tracing stops")
                return

    def trace(self) -> None:
        """Log one trace; the first one becomes the baseline of the differences."""
        snapshot = tracemalloc.take_snapshot().filter_traces([
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
        ])
        rss = resident_bytes() or 0
        traced, peak = tracemalloc.get_traced_memory()
        if self._baseline is None:
            self._baseline, self._baseline_rss, self._baseline_traced = snapshot, rss, traced
            _LOGGER.info("memory trace baseline: rss %.1f MiB, traced %.1f MiB", rss / 2**20, traced / 2**20)
            return
        rss_growth = rss - self._baseline_rss
        traced_growth = traced - self._baseline_traced
        lines = [f"memory trace: rss {rss / 2**20:.1f} MiB ({rss_growth / 2**20:+.1f}), traced {traced / 2**20:.1f} "
                 f"MiB ({traced_growth / 2**20:+.1f}, peak {peak / 2**20:.1f}), untraced "
                 f"{(rss_growth - traced_growth) / 2**20:+.1f} MiB since the baseline; top growth:"]
        for difference in snapshot.compare_to(self._baseline, "traceback")[:_TOP]:
            where = " <- ".join(f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno}"
                                for frame in difference.traceback)
            lines.append(f"  {difference.size_diff / 2**10:+9.1f} KiB {difference.count_diff:+7d} blocks  {where}")
        _LOGGER.info("\n".join(lines))


def start_from_environment() -> MemoryTrace | None:
    """Start a ``MemoryTrace`` if ``DAWNCHORUS_TRACEMALLOC`` is set; an invalid value is logged and ignored."""
    text = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if not text:
        return None
    try:
        trace = MemoryTrace(float(text))
    except ValueError:
        _LOGGER.error("memory trace not started: %s=%r is not a number of seconds above 0", ENVIRONMENT_VARIABLE,
                      text)
        return None
    trace.start()
    return trace
