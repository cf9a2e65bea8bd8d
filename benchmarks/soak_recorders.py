"""The recorder-simulator process of the soak (benchmarks/soak.py): many real recorders on replayed embeddings.

Each simulated recorder is the real ``edge.recorder.Recorder`` with its own
threads, state directory, outbox, uplink and sequence numbers. Only the audio
and the backbone are replaced: ``ReplaySource`` releases one window per hop,
and ``ReplayBackbone`` returns embeddings that BirdNET computed beforehand.
Pushed heads go through the recorder's own checks (signature, sha256,
LiteRT load, probe outputs) and are acknowledged as in the field.

soak.py starts this script with a JSON spec and steers it with files in the
spec's control directory:

    stop-sending            (soak.py) the sources end; the outboxes drain
    <name>.started          (this script) every recorder runs
    <name>.drained.json     (this script) per recorder: windows, sequence counter, queue, drops
    exit                    (soak.py) the recorders stop
    <name>.final.json       (this script) the same report, with the head each recorder ended on
    <name>.memory.jsonl     (this script) every 30 s: RSS, SQLite's heap, Python's allocated blocks

Usage (by soak.py): python benchmarks/soak_recorders.py SPEC.json
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import pathlib
import sqlite3
import sys
import threading
import time
from typing import Callable, Iterator

import numpy as np

WINDOW_SECONDS = 3.0

# Poll interval of the control files.
_POLL_S = 0.5

# Seconds between two rows of <name>.memory.jsonl: RSS, SQLite heap and Python's allocated blocks.
_MEMORY_INTERVAL_S = 30.0

_LOGGER = logging.getLogger("soak.recorders")


class ReplayBackbone:
    """Stands in for the BirdNET backbone: returns cached embeddings.

    A replayed window carries one sample, the row of its embedding in the
    cache, so that windows cost no audio memory.
    """

    def __init__(self, embeddings: np.ndarray):
        self._embeddings = embeddings
        self.embedding_dim = int(embeddings.shape[1])

    def embed(self, windows: np.ndarray) -> np.ndarray:
        """Return embeddings [n, 1024] float32 for windows [n, 1] that hold cache rows."""
        return self._embeddings[np.asarray(windows)[:, 0].astype(np.int64)].copy()


class ReplaySource:
    """Releases one window per hop, on a fixed schedule, until ``stop`` is set.

    A window is released at ``start + start_delay_s + i * hop_s``. When the
    recorder falls behind, later windows are released at once and the
    largest delay is kept in ``max_lag_s``.
    """

    def __init__(self, windows_cached: int, first_row: int, hop_s: float, start_delay_s: float,
                 stop: threading.Event):
        self._windows_cached = windows_cached
        self._first_row = first_row
        self._hop_s = hop_s
        self._start_delay_s = start_delay_s
        self._stop = stop
        self.max_lag_s = 0.0

    def __iter__(self) -> Iterator:
        from dawnchorus.edge.audio import Window

        start = time.monotonic() + self._start_delay_s
        index = 0
        while True:
            due = start + index * self._hop_s
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            self.max_lag_s = max(self.max_lag_s, time.monotonic() - due)
            row = (self._first_row + index) % self._windows_cached
            yield Window(samples=np.array([row], dtype=np.float32), source=f"replay:{row}",
                         offset_s=index * WINDOW_SECONDS, start_time=time.time())
            index += 1


def outbox_counts(path: pathlib.Path) -> dict[str, int]:
    """Read a recorder's outbox database: queued entries and the sequence and drop counters."""
    database = sqlite3.connect(path, timeout=10)
    try:
        depth = database.execute("SELECT count(*) FROM entries").fetchone()[0]
        counters = dict(database.execute("SELECT name, value FROM counters").fetchall())
    finally:
        database.close()
    return {"queue_depth": int(depth), "next_sequence": int(counters.get("next_sequence", 0)),
            "dropped": int(counters.get("dropped", 0)), "dropped_windows": int(counters.get("dropped_windows", 0))}


def sqlite_memory_function() -> Callable[[], int] | None:
    """Return a function that reads SQLite's heap in bytes (``sqlite3_memory_used``), or None where it is unreachable."""
    import _sqlite3

    for library in (_sqlite3.__file__, "libsqlite3.so.0"):
        try:
            function = ctypes.CDLL(library).sqlite3_memory_used
        except (OSError, AttributeError):
            continue
        function.restype = ctypes.c_int64
        function.argtypes = []
        return function
    return None


def record_memory(path: pathlib.Path, interval_s: float, stop: threading.Event) -> None:
    """Append this process's RSS, SQLite heap and Python's allocated blocks to ``path`` every ``interval_s``.

    The split separates a growing page cache of the outboxes (SQLite) and
    growing Python objects from the rest, which is native memory of LiteRT,
    numpy and the allocator.
    """
    from soak import read_process

    sqlite_memory = sqlite_memory_function()
    while not stop.wait(interval_s):
        rss_bytes, _ = read_process(os.getpid())
        # CLOCK_MONOTONIC is system-wide on Linux, so soak.py can put the rows on its own time axis.
        row = {"monotonic_s": time.monotonic(), "rss_bytes": rss_bytes, "python_blocks": sys.getallocatedblocks(),
               "sqlite_bytes": None if sqlite_memory is None else int(sqlite_memory())}
        with path.open("a") as log:
            log.write(json.dumps(row) + "\n")


def run_worker(spec_path: pathlib.Path) -> int:
    """Run the simulated recorders that ``spec_path`` lists until the control files say stop."""
    from dawnchorus.edge.recorder import Recorder, RecorderConfig
    from dawnchorus.models.backbone import load_source_model
    from dawnchorus.models.species import species_from_file
    from dawnchorus.protocol.signing import load_public_key

    spec = json.loads(spec_path.read_text())
    control = pathlib.Path(spec["control_dir"])
    name = spec["name"]
    embeddings = np.load(spec["embeddings"])
    backbone = ReplayBackbone(embeddings)
    source_head = load_source_model().head
    public_key = load_public_key(pathlib.Path(spec["public_key"]))
    stop_sending = threading.Event()

    site_heads = {}
    recorders: list[tuple[Recorder, ReplaySource]] = []
    for entry in spec["recorders"]:
        site = entry["site"]
        if site not in site_heads:
            site_heads[site] = source_head.select(species_from_file(pathlib.Path(entry["species_file"]),
                                                                    source_head.labels))
        head = site_heads[site]
        config = RecorderConfig(
            device=entry["device"], site=site, broker_host="127.0.0.1", broker_port=spec["broker_port"],
            state_dir=pathlib.Path(spec["state_dir"]), head_public_key=public_key, head_labels=list(head.labels),
            windows_per_message=spec["windows_per_message"],
        )
        source = ReplaySource(len(embeddings), entry["first_row"], spec["hop_s"], entry["start_delay_s"],
                              stop_sending)
        recorders.append((Recorder(config, backbone, head, source), source))

    def run_recorder(recorder: Recorder) -> None:
        try:
            recorder.run(stay_after_source=True)
        except Exception:
            _LOGGER.exception("simulated recorder %s failed", recorder.config.device)

    threads = [threading.Thread(target=run_recorder, args=(recorder,), name=recorder.config.device, daemon=True)
               for recorder, _ in recorders]
    for thread in threads:
        thread.start()
    (control / f"{name}.started").write_text(str(time.time()))
    stop_recording = threading.Event()
    threading.Thread(target=record_memory, args=(control / f"{name}.memory.jsonl", _MEMORY_INTERVAL_S, stop_recording),
                     name="memory-recorder", daemon=True).start()
    _LOGGER.info("%s: %d simulated recorders started", name, len(recorders))

    def report() -> list[dict]:
        rows = []
        for recorder, source in recorders:
            device = recorder.config.device
            row = {"device": device, "site": recorder.config.site, "windows": recorder.counters["windows"],
                   "head_version": recorder.head_version, "heads_applied": recorder.counters["heads_applied"],
                   "heads_rejected": recorder.counters["heads_rejected"], "max_lag_s": round(source.max_lag_s, 2)}
            row.update(outbox_counts(pathlib.Path(spec["state_dir"]) / device / "outbox.sqlite3"))
            rows.append(row)
        return rows

    while not (control / "stop-sending").exists() and not (control / "exit").exists():
        time.sleep(_POLL_S)
    stop_sending.set()
    _LOGGER.info("%s: sources stopped, waiting for the outboxes to drain", name)

    deadline = time.monotonic() + spec["drain_timeout_s"]
    while time.monotonic() < deadline and not (control / "exit").exists():
        finished = all(recorder.finished.is_set() for recorder, _ in recorders)
        if finished and all(row["queue_depth"] == 0 for row in report()):
            break
        time.sleep(_POLL_S)
    (control / f"{name}.drained.json").write_text(json.dumps(report()))

    while not (control / "exit").exists():
        time.sleep(_POLL_S)
    final = report()
    for recorder, _ in recorders:
        recorder.stop()
    for thread in threads:
        thread.join(timeout=60)
    stop_recording.set()
    (control / f"{name}.final.json").write_text(json.dumps(final))
    _LOGGER.info("%s: stopped", name)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: soak_recorders.py SPEC.json (soak.py writes the spec and starts this script)")
    return run_worker(pathlib.Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
