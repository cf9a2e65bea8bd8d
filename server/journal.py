"""Durable storage of what a base station accepted: an SQLite journal and per-site snapshots.

Every accepted window goes into the journal, an append-only SQLite table in
WAL mode with ``synchronous=FULL``, in one transaction per group of MQTT
messages. The base station acknowledges a message to the broker only after
that transaction has committed, so a window that the broker counts as
delivered is on disk. Now and then the station writes a site's whole state
(neighbour buffer, pending count, duplicate filter, origin of every buffer
slot) to a snapshot file, atomically, and deletes the journal rows that the
snapshot covers. A restart loads the snapshot and replays the journal rows
after it.

Layout under the state directory:

    ingest.sqlite3 (+ -wal, -shm)   the journal, all sites
    sites/<site>/buffer.npz         the site's snapshot
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import sqlite3
from typing import Iterator

import numpy as np

_LOGGER = logging.getLogger(__name__)

JOURNAL_FILE = "ingest.sqlite3"
SNAPSHOT_FILE = "buffer.npz"

# Increase when the snapshot's arrays change meaning; older files are then rejected with a clear error.
SNAPSHOT_FORMAT = 1

# Journal rows read from SQLite at once while replaying (about 2 MiB of float16 embeddings at dim 1024).
_REPLAY_CHUNK = 1024


@dataclasses.dataclass
class JournalRows:
    """Consecutive journal rows of one site.

    Attributes:
        ids: [n] int64 journal row ids, increasing.
        devices: the recorder id of each row.
        sequences: [n] uint64 the recorder's sequence number of each window.
        embeddings: [n, dim] float16, as received.
    """

    ids: np.ndarray
    devices: list[str]
    sequences: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class IngestJournal:
    """Append-only SQLite journal of accepted windows, for all sites of a base station.

    Not thread-safe: the station's worker thread is its only user. A
    read-only journal (``read_only=True``) is for inspecting a state
    directory, also while the station runs.
    """

    def __init__(self, path: pathlib.Path, read_only: bool = False):
        self.path = pathlib.Path(path)
        if read_only:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL syncs the WAL at every commit, so a commit survives a power cut, not only a crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS windows ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " site TEXT NOT NULL, device TEXT NOT NULL, sequence INTEGER NOT NULL, embedding BLOB NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS windows_by_site ON windows (site, id)")

    def append(self, rows: list[tuple[str, str, int, bytes]]) -> int:
        """Commit rows (site, device, sequence, float16 embedding bytes) in one transaction.

        Returns the id of the last row. Raises sqlite3.Error when the commit
        fails (a full disk, for example); nothing of the call is stored then.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT INTO windows (site, device, sequence, embedding) VALUES (?, ?, ?, ?)", rows)
            last_id = self._db.execute("SELECT max(id) FROM windows").fetchone()[0]
            self._db.execute("COMMIT")
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return int(last_id or 0)

    def last_id(self) -> int:
        """Return the highest row id ever committed, also when those rows were deleted since (0 if none)."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'windows'").fetchone()
        return int(row[0]) if row else 0

    def reserve_ids_through(self, journal_id: int) -> None:
        """Make every later row id higher than ``journal_id``, which a snapshot already covers."""
        if self.last_id() >= journal_id:
            return
        with self._db:
            updated = self._db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'windows'", (journal_id,))
            if updated.rowcount == 0:
                self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('windows', ?)", (journal_id,))

    def sites(self) -> list[str]:
        return [site for (site,) in self._db.execute("SELECT DISTINCT site FROM windows ORDER BY site")]

    def count(self, site: str, after_id: int = 0) -> int:
        return int(self._db.execute("SELECT count(*) FROM windows WHERE site = ? AND id > ?",
                                    (site, after_id)).fetchone()[0])

    def rows(self, site: str, after_id: int = 0) -> Iterator[JournalRows]:
        """Yield the site's rows with an id above ``after_id``, in id order, in chunks."""
        last = after_id
        while True:
            fetched = self._db.execute(
                "SELECT id, device, sequence, embedding FROM windows WHERE site = ? AND id > ? ORDER BY id LIMIT ?",
                (site, last, _REPLAY_CHUNK)).fetchall()
            if not fetched:
                return
            ids = np.array([row[0] for row in fetched], dtype=np.int64)
            embeddings = np.stack([np.frombuffer(row[3], dtype="<f2") for row in fetched]).astype(np.float16)
            yield JournalRows(ids, [row[1] for row in fetched],
                              np.array([row[2] for row in fetched], dtype=np.uint64), embeddings)
            last = int(ids[-1])

    def discard_through(self, site: str, journal_id: int) -> None:
        """Delete the site's rows up to ``journal_id``, which a snapshot now covers."""
        self._db.execute("DELETE FROM windows WHERE site = ? AND id <= ?", (site, journal_id))

    def close(self) -> None:
        self._db.close()


def snapshot_path(state_dir: pathlib.Path, site: str) -> pathlib.Path:
    return pathlib.Path(state_dir) / "sites" / site / SNAPSHOT_FILE


def write_snapshot(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an npz file that is either complete or absent after a crash.

    The data goes to a temporary file, which is synced and renamed over
    ``path``, and then the folder is synced so that the rename is on disk.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as stream:
        np.savez(stream, format=np.asarray(SNAPSHOT_FORMAT), **arrays)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_snapshot(path: pathlib.Path) -> dict[str, np.ndarray] | None:
    """Return the arrays of a snapshot, or None if there is none.

    Raises:
        ValueError: the file is of another snapshot format.
    """
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    found = int(arrays.pop("format", -1))
    if found != SNAPSHOT_FORMAT:
        raise ValueError(f"{path} has snapshot format {found}, this version reads {SNAPSHOT_FORMAT}: "
                         "run the dawnchorus version that wrote it, or move the file away to start the site afresh")
    return arrays


def number_ranges(numbers: np.ndarray) -> list[tuple[int, int]]:
    """Return sorted unique integers [n] as half-open ranges [start, end)."""
    values = np.unique(np.asarray(numbers, dtype=np.uint64))
    if len(values) == 0:
        return []
    breaks = np.flatnonzero(np.diff(values) != 1)
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [len(values) - 1]))
    return [(int(values[s]), int(values[e]) + 1) for s, e in zip(starts, ends)]


def inspect_site(state_dir: pathlib.Path, site: str, journal: IngestJournal | None) -> dict:
    """Describe a site's persisted state: the buffer that a restart would load, and what it accepted.

    Reads only the snapshot and the journal, so it needs no model and works
    while the station runs. Returns a JSON-ready dict; per device, the buffer's
    sequence numbers and the accepted ones are given as [start, end) ranges.
    """
    from dawnchorus.server.sequences import SequenceFilter

    snapshot = read_snapshot(snapshot_path(state_dir, site))
    devices: list[str] = []
    sequences = np.zeros(0, dtype=np.uint64)
    capacity, pending, rounds, journal_id = 0, 0, 0, 0
    accepted = SequenceFilter(site)
    if snapshot is not None:
        order = np.argsort(snapshot["buffer_sequence_numbers"], kind="stable")
        devices = [str(device) for device in snapshot["slot_devices"][order]]
        sequences = snapshot["slot_sequences"][order].astype(np.uint64)
        capacity = int(snapshot["buffer_capacity"])
        pending, rounds = int(snapshot["pending"]), int(snapshot["rounds"])
        journal_id = int(snapshot["journal_id"])
        accepted = SequenceFilter.from_state(
            {key[len("filter_"):]: value for key, value in snapshot.items() if key.startswith("filter_")}, site)

    journal_windows = 0
    if journal is not None:
        for rows in journal.rows(site, journal_id):
            journal_windows += len(rows)
            devices.extend(rows.devices)
            sequences = np.concatenate((sequences, rows.sequences))
            for device, sequence in zip(rows.devices, rows.sequences.tolist()):
                accepted.add(device, sequence)
    pending += journal_windows
    if capacity:
        devices, sequences = devices[-capacity:], sequences[-capacity:]

    per_device = {}
    device_array = np.array(devices, dtype=np.str_)
    for device in sorted(set(devices) | set(accepted.devices())):
        in_buffer = sequences[device_array == device] if len(devices) else np.zeros(0, dtype=np.uint64)
        accepted_ranges = accepted.ranges(device)
        per_device[device] = {
            "buffer_windows": int(len(in_buffer)),
            "buffer_duplicates": int(len(in_buffer) - len(np.unique(in_buffer))),
            "buffer_ranges": number_ranges(in_buffer),
            "accepted_windows": accepted.accepted_count(device),
            "accepted_ranges": accepted_ranges,
            "gaps": [(end, start) for (_, end), (start, _) in zip(accepted_ranges, accepted_ranges[1:])],
        }
    return {
        "site": site,
        "buffer_capacity": capacity,
        "buffer_windows": len(devices),
        "pending_windows": pending,
        "rounds": rounds,
        "snapshot": snapshot is not None,
        "journal_windows": journal_windows,
        "filled_gap_numbers": accepted.filled_gap_numbers,
        "devices": per_device,
    }


def inspect_state(state_dir: pathlib.Path) -> list[dict]:
    """Describe every site persisted under ``state_dir`` (see ``inspect_site``)."""
    state_dir = pathlib.Path(state_dir)
    journal_path = state_dir / JOURNAL_FILE
    journal = IngestJournal(journal_path, read_only=True) if journal_path.is_file() else None
    try:
        sites = set(journal.sites()) if journal is not None else set()
        sites_dir = state_dir / "sites"
        if sites_dir.is_dir():
            sites.update(path.parent.name for path in sites_dir.glob(f"*/{SNAPSHOT_FILE}"))
        return [inspect_site(state_dir, site, journal) for site in sorted(sites)]
    finally:
        if journal is not None:
            journal.close()
