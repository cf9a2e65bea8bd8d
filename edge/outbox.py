"""The recorder's store-and-forward queue: a bounded outbox in SQLite.

Every embeddings batch and detections message is committed here before it
is published. A detections message is deleted once the broker has
acknowledged its QoS 1 publish. An embeddings message is deleted only once
the base station's receipt confirms that its windows are on the station's disk
(see uplink.py): a broker can crash after its PUBACK and lose the message.
The queue therefore survives a broker outage or crash and a recorder
restart, SIGKILL included, and it is drained in the order in which entries
were queued.

The same database stores the per-device sequence counter. The counter is
committed before its numbers are used, in the same write-ahead log as the
entries that carry them. So after a crash or a power cut the counter is never
behind a queued or published number, and a number is never reused.

When the queue exceeds its quota, entries that the broker has acknowledged
but the base station has not confirmed go first, oldest first: the broker
still keeps them, so deleting them loses nothing unless the broker crashes
too. They are counted as released. Then the oldest entries that have not
been handed to the MQTT client yet are deleted and counted as dropped. Both
counts, and the embedding windows of those entries, are stored with the
queue and reported in the recorder's status.

A truly full disk needs more than catching SQLITE_FULL. Deleting rows also
writes to the write-ahead log, and a checkpoint copies the log into the
database file. So on a disk with no byte left, SQLite can neither add nor
delete. The outbox therefore keeps a reserve file of ``RESERVE_BYTES`` beside
the database. On SQLITE_FULL it deletes the reserve, drops the oldest tenth
of the unsent entries, checkpoints and truncates the log, and gives the
freed pages back to the file system (``auto_vacuum=INCREMENTAL``); then it
writes the message and makes a new reserve when there is room again. Drop
counts that cannot be written meanwhile are kept in memory and written with
the next commit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import sqlite3
import threading
import time

import numpy as np

_LOGGER = logging.getLogger(__name__)

# SQLite's result code for a full disk; sqlite3.SQLITE_FULL exists only from Python 3.11.
_SQLITE_FULL = 13

# 512 MiB of payloads. A 16-window embeddings message is about 33 KiB, so
# this is room for about 15,000 messages: 240,000 windows, over 8 days of audio
# recorded without a broker, and fits on any SD card a recorder runs from.
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

# Room set aside on the disk for the outbox to recover from a full disk. It
# must hold the write-ahead log between two checkpoints: SQLite checkpoints
# every WAL_AUTOCHECKPOINT_PAGES pages, 512 KiB at its default 4 KiB page.
RESERVE_BYTES = 2 * 1024 * 1024
WAL_AUTOCHECKPOINT_PAGES = 128
# After a checkpoint the log file is cut back to this size.
WAL_SIZE_LIMIT_BYTES = 512 * 1024
# Entries deleted, and free pages vacuumed, per transaction on a full disk: a
# transaction writes each page it changes to the log, which must fit on the disk.
_FREE_CHUNK_ENTRIES = 64
# Seconds between attempts to make a new reserve after it was used.
RESERVE_RETRY_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    windows INTEGER NOT NULL,
    first_sequence INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class OutboxEntry:
    """One queued MQTT message.

    Attributes:
        id: position in the queue; ids only grow, over the life of the database.
        topic: MQTT topic to publish on, at QoS 1.
        payload: the encoded message.
        windows: embedding windows in the message; 0 for detections.
        first_sequence: sequence number of the message's first window, for logs.
    """

    id: int
    topic: str
    payload: bytes
    windows: int
    first_sequence: int


@dataclasses.dataclass(frozen=True)
class OutboxStats:
    """Queue depth and drop counts, as the recorder's status reports them.

    Attributes:
        depth: entries queued, acknowledged ones excluded.
        bytes: payload bytes queued.
        dropped: entries deleted unsent because the quota was reached or the
            disk was full, since the database was created.
        dropped_windows: embedding windows in those entries.
        released: entries that the broker had acknowledged, deleted before
            the base station confirmed them because the quota was reached.
        released_windows: embedding windows in those entries.
    """

    depth: int
    bytes: int
    dropped: int
    dropped_windows: int
    released: int = 0
    released_windows: int = 0


class Outbox:
    """A bounded, persistent FIFO of MQTT messages, shared by the recorder thread and the sender.

    Args:
        path: the SQLite database file; it is created if missing.
        max_bytes: quota on queued payload bytes, or None for no limit.
        max_entries: quota on queued entries, or None for no limit.
        legacy_sequence_path: a ``next_sequence`` file that older versions
            kept; the counter starts at no less than the number in it.
    """

    def __init__(
        self,
        path: pathlib.Path,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        max_entries: int | None = None,
        legacy_sequence_path: pathlib.Path | None = None,
    ):
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"queue quota of {max_bytes} bytes is invalid: use at least 1, or no limit")
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"queue quota of {max_entries} entries is invalid: use at least 1, or no limit")
        self.path = pathlib.Path(path)
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._lock = threading.Lock()
        # Entries with an id below the cursor were handed to the MQTT client and wait for their PUBACK.
        self._cursor = 0
        # Entries that the broker acknowledged and that wait for the base station's receipt, in id order,
        # with their payload size and windows. Kept in memory: after a restart every entry is sent again.
        self._delivered: dict[int, tuple[int, int]] = {}
        # Ids deleted from _delivered by the quota since the last ``released_ids`` call.
        self._released_ids: list[int] = []

        # Drop counts that a full disk kept from being written: (entries, windows).
        self._unwritten_drops = (0, 0)
        self._reserve = self.path.with_name(self.path.name + ".reserve")
        self._reserve_attempt = 0.0

        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._use_incremental_vacuum()
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL syncs the log on every commit, so a power cut cannot roll the
        # sequence counter back below numbers that were already published.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        self._db.executescript(_SCHEMA)
        self._make_reserve()
        self._depth, self._bytes = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM entries").fetchone()
        self._import_legacy_sequence(legacy_sequence_path)
        if self._depth:
            _LOGGER.info("outbox %s: %d queued messages (%d bytes) from an earlier run", self.path,
                         self._depth, self._bytes)

    def _use_incremental_vacuum(self) -> None:
        """Let the outbox give freed pages back to the file system; a database of an older version is rewritten once."""
        # 2 is INCREMENTAL. It must be set before the first table is created, or be followed by a VACUUM.
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            return
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        try:
            self._db.execute("VACUUM")
        except sqlite3.Error as error:
            _LOGGER.warning("outbox %s: could not rewrite the database to free space incrementally (%s); on a "
                            "full disk it frees space only within its own file", self.path, error)

    def _make_reserve(self) -> None:
        """Set ``RESERVE_BYTES`` aside in a file beside the database, unless it exists or the disk lacks the room."""
        if self._reserve.exists():
            return
        self._reserve_attempt = time.monotonic()
        try:
            with open(self._reserve, "wb") as handle:
                # Allocated blocks, not a sparse file, so that deleting it frees real space.
                os.posix_fallocate(handle.fileno(), 0, RESERVE_BYTES)
        except OSError as error:
            self._reserve.unlink(missing_ok=True)
            _LOGGER.warning("outbox %s: could not set %d MiB aside for recovering from a full disk (%s); "
                            "retrying in %.0f s", self.path, RESERVE_BYTES // 2**20, error, RESERVE_RETRY_S)

    def _import_legacy_sequence(self, path: pathlib.Path | None) -> None:
        if path is None or not path.exists():
            return
        legacy = int(path.read_text())
        with self._lock:
            if legacy > self._counter("next_sequence"):
                self._db.execute("BEGIN IMMEDIATE")
                self._set_counter("next_sequence", legacy)
                self._db.execute("COMMIT")

    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _set_counter(self, name: str, value: int) -> None:
        self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                         "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (name, value))

    # Sequence numbers ---------------------------------------------------------

    def allocate_sequence(self, count: int) -> np.ndarray:
        """Reserve ``count`` sequence numbers and commit the counter before returning them.

        Returns:
            [count] uint64, consecutive numbers that no earlier call returned.
        Raises:
            sqlite3.Error: the counter could not be committed, also after
                dropping queued entries on a full disk.
        """
        with self._lock:
            for attempt in range(2):
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    first = self._counter("next_sequence")
                    self._set_counter("next_sequence", first + count)
                    self._db.execute("COMMIT")
                    break
                except sqlite3.Error as error:
                    self._rollback()
                    if attempt == 0 and _is_disk_full(error) and self._free_space_by_eviction():
                        continue
                    raise
                except BaseException:
                    self._rollback()
                    raise
        return np.arange(first, first + count, dtype=np.uint64)

    def count_unqueued(self, windows: int) -> None:
        """Count a batch of ``windows`` that could not be numbered or queued as one dropped entry."""
        with self._lock:
            self._unwritten_drops = (self._unwritten_drops[0] + 1, self._unwritten_drops[1] + windows)

    @property
    def next_sequence(self) -> int:
        with self._lock:
            return self._counter("next_sequence")

    # Queue --------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, windows: int, first_sequence: int) -> bool:
        """Queue a message, dropping the oldest unsent entries to stay within the quota.

        Returns:
            True if the message was queued. False if the disk is full or the
            database failed even after the oldest entries were dropped: the
            message is then counted as dropped and logged.
        """
        with self._lock:
            for attempt in range(2):
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._evict_for(len(payload))
                    self._db.execute(
                        "INSERT INTO entries (topic, payload, windows, first_sequence) VALUES (?, ?, ?, ?)",
                        (topic, payload, windows, first_sequence))
                    unwritten = self._unwritten_drops
                    if unwritten != (0, 0):
                        self._set_counter("dropped", self._counter("dropped") + unwritten[0])
                        self._set_counter("dropped_windows", self._counter("dropped_windows") + unwritten[1])
                    self._db.execute("COMMIT")
                    self._unwritten_drops = (0, 0)
                except sqlite3.Error as error:
                    self._rollback()
                    self._depth, self._bytes = self._db.execute(
                        "SELECT count(*), coalesce(sum(length(payload)), 0) FROM entries").fetchone()
                    if attempt == 0 and _is_disk_full(error) and self._free_space_by_eviction():
                        continue
                    self._count_lost(windows, topic, first_sequence, error)
                    return False
                self._depth += 1
                self._bytes += len(payload)
                if not self._reserve.exists() and time.monotonic() - self._reserve_attempt > RESERVE_RETRY_S:
                    self._make_reserve()
                return True
        return False

    def _evict_for(self, incoming_bytes: int) -> None:
        """Delete the oldest unsent entries until one more entry of ``incoming_bytes`` fits the quota."""
        excess_entries = 0 if self.max_entries is None else self._depth + 1 - self.max_entries
        excess_bytes = 0 if self.max_bytes is None else self._bytes + incoming_bytes - self.max_bytes
        if excess_entries <= 0 and excess_bytes <= 0:
            return
        excess_entries, excess_bytes = self._release_delivered(excess_entries, excess_bytes)
        if excess_entries <= 0 and excess_bytes <= 0:
            return
        victims = []
        freed_bytes = 0
        rows = self._db.execute(
            "SELECT id, length(payload), windows, first_sequence FROM entries WHERE id >= ? ORDER BY id",
            (self._cursor,))
        for row in rows:
            if len(victims) >= excess_entries and freed_bytes >= excess_bytes:
                break
            victims.append(row)
            freed_bytes += row[1]
        if victims:
            self._delete_as_dropped(victims, "the queue quota was reached")

    def _release_delivered(self, excess_entries: int, excess_bytes: int) -> tuple[int, int]:
        """Delete the oldest entries that wait for a receipt, inside the caller's transaction; return what is still in excess."""
        released = []
        for entry_id, (size, windows) in self._delivered.items():
            if excess_entries <= 0 and excess_bytes <= 0:
                break
            released.append((entry_id, size, windows))
            excess_entries -= 1
            excess_bytes -= size
        if not released:
            return excess_entries, excess_bytes
        self._db.executemany("DELETE FROM entries WHERE id = ?", [(row[0],) for row in released])
        windows = sum(row[2] for row in released)
        self._set_counter("released", self._counter("released") + len(released))
        self._set_counter("released_windows", self._counter("released_windows") + windows)
        for entry_id, size, _ in released:
            del self._delivered[entry_id]
            self._released_ids.append(entry_id)
            self._depth -= 1
            self._bytes -= size
        _LOGGER.warning("outbox %s: the queue quota was reached, deleted the %d oldest messages that the broker "
                        "holds but the base station has not confirmed yet (%d embedding windows)", self.path,
                        len(released), windows)
        return excess_entries, excess_bytes

    def _free_space_by_eviction(self) -> bool:
        """Drop the oldest unsent entries after SQLite reported a full disk, and give their space back.

        Deleting writes every changed page to the write-ahead log first, so
        the entries go in small transactions, each followed by a checkpoint
        that empties the log and an incremental vacuum that shrinks the file.
        """
        rows = self._db.execute(
            "SELECT id, length(payload), windows, first_sequence FROM entries WHERE id >= ? ORDER BY id",
            (self._cursor,)).fetchall()
        if not rows:
            return False
        if self._reserve.exists():
            self._reserve.unlink()
            _LOGGER.warning("outbox %s: the disk is full; released the %d MiB reserve to free space", self.path,
                            RESERVE_BYTES // 2**20)
        self._checkpoint()
        # The oldest tenth, and at least twice the reserve, so that a new reserve fits afterwards.
        count, freed = 0, 0
        while count < len(rows) and (count < max(1, len(rows) // 10) or freed < 2 * RESERVE_BYTES):
            freed += rows[count][1]
            count += 1
        deleted = 0
        for start in range(0, count, _FREE_CHUNK_ENTRIES):
            chunk = rows[start:start + _FREE_CHUNK_ENTRIES]
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._delete_as_dropped(chunk, log=False)
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback()
                self._depth, self._bytes = self._db.execute(
                    "SELECT count(*), coalesce(sum(length(payload)), 0) FROM entries").fetchone()
                _LOGGER.error("outbox %s: could not free space on a full disk: %s", self.path, error)
                break
            deleted += len(chunk)
            self._checkpoint()
            self._shrink_file()
        if deleted:
            _LOGGER.warning("outbox %s: the disk is full, dropped the %d oldest unsent messages (%d embedding "
                            "windows, sequence numbers from %d)", self.path, deleted,
                            sum(row[2] for row in rows[:deleted]), rows[0][3])
            self._make_reserve()
        return deleted > 0

    def _shrink_file(self) -> None:
        """Give the database's free pages back to the file system, a few at a time, checkpointing in between."""
        try:
            while self._db.execute("PRAGMA freelist_count").fetchone()[0] > 0:
                self._db.execute(f"PRAGMA incremental_vacuum({_FREE_CHUNK_ENTRIES})").fetchall()
                self._checkpoint()
        except sqlite3.Error as error:
            _LOGGER.warning("outbox %s: could not give freed pages back to the file system: %s", self.path, error)

    def _checkpoint(self) -> None:
        """Copy the write-ahead log into the database and cut the log file to zero bytes, if the disk allows."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as error:
            _LOGGER.warning("outbox %s: checkpoint failed: %s", self.path, error)

    def _delete_as_dropped(self, rows: list[tuple[int, int, int, int]], reason: str = "", log: bool = True) -> None:
        """Delete entries inside the caller's transaction, count them as dropped and, with ``log``, log why."""
        self._db.executemany("DELETE FROM entries WHERE id = ?", [(row[0],) for row in rows])
        dropped_windows = sum(row[2] for row in rows)
        self._set_counter("dropped", self._counter("dropped") + len(rows))
        self._set_counter("dropped_windows", self._counter("dropped_windows") + dropped_windows)
        self._depth -= len(rows)
        self._bytes -= sum(row[1] for row in rows)
        if log:
            _LOGGER.warning("outbox %s: %s, dropped the %d oldest unsent messages (%d embedding windows, "
                            "sequence numbers from %d)", self.path, reason, len(rows), dropped_windows, rows[0][3])

    def _count_lost(self, windows: int, topic: str, first_sequence: int, error: sqlite3.Error) -> None:
        _LOGGER.error("outbox %s: could not queue the message for %s (%d windows from sequence %d), "
                      "dropped it: %s", self.path, topic, windows, first_sequence, error)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._set_counter("dropped", self._counter("dropped") + 1)
            self._set_counter("dropped_windows", self._counter("dropped_windows") + windows)
            self._db.execute("COMMIT")
        except sqlite3.Error:
            self._rollback()
            # Counted in memory, and written with the next commit that succeeds.
            self._unwritten_drops = (self._unwritten_drops[0] + 1, self._unwritten_drops[1] + windows)

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def take(self, limit: int) -> list[OutboxEntry]:
        """Hand out up to ``limit`` entries that were not handed out yet, oldest first.

        A handed-out entry stays queued, and safe from the quota, until
        ``remove`` deletes it.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, windows, first_sequence FROM entries WHERE id >= ? ORDER BY id LIMIT ?",
                (self._cursor, limit)).fetchall()
            if rows:
                self._cursor = rows[-1][0] + 1
        return [OutboxEntry(row[0], row[1], bytes(row[2]), row[3], row[4]) for row in rows]

    def rewind(self, entry_id: int) -> None:
        """Hand out entry ``entry_id`` and every later one again, for a message the MQTT client did not keep."""
        with self._lock:
            self._cursor = min(self._cursor, entry_id)

    def get(self, entry_id: int) -> OutboxEntry | None:
        """Return a queued entry, or None if it was deleted (confirmed, or released by the quota)."""
        with self._lock:
            row = self._db.execute("SELECT id, topic, payload, windows, first_sequence FROM entries WHERE id = ?",
                                   (entry_id,)).fetchone()
        return None if row is None else OutboxEntry(row[0], row[1], bytes(row[2]), row[3], row[4])

    def mark_delivered(self, entries: list[OutboxEntry]) -> None:
        """Record that the broker acknowledged ``entries``, which stay queued until ``remove``.

        The quota deletes such entries before any unsent one.
        """
        with self._lock:
            for entry in entries:
                self._delivered[entry.id] = (len(entry.payload), entry.windows)
            if entries and min(entry.id for entry in entries) < max(self._delivered):
                self._delivered = dict(sorted(self._delivered.items()))

    def released_ids(self) -> list[int]:
        """Return, and forget, the ids of delivered entries that the quota deleted since the last call."""
        with self._lock:
            released, self._released_ids = self._released_ids, []
        return released

    def remove(self, entry_ids: list[int]) -> None:
        """Delete acknowledged entries.

        A failed delete is logged and only means the entry is sent again
        after a restart, which receivers deduplicate by sequence number.
        """
        if not entry_ids:
            return
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                removed = self._db.execute(
                    f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM entries WHERE id IN "
                    f"({','.join('?' * len(entry_ids))})", entry_ids).fetchone()
                self._db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in entry_ids])
                self._db.execute("COMMIT")
                for entry_id in entry_ids:
                    self._delivered.pop(entry_id, None)
            except sqlite3.Error as error:
                self._rollback()
                _LOGGER.error("outbox %s: could not delete %d acknowledged messages, they will be sent again "
                              "after a restart: %s", self.path, len(entry_ids), error)
                return
            self._depth -= removed[0]
            self._bytes -= removed[1]

    def unsent(self) -> int:
        """Return the number of entries not handed to the MQTT client yet."""
        with self._lock:
            return self._db.execute("SELECT count(*) FROM entries WHERE id >= ?", (self._cursor,)).fetchone()[0]

    def stats(self) -> OutboxStats:
        with self._lock:
            return OutboxStats(self._depth, self._bytes, self._counter("dropped") + self._unwritten_drops[0],
                               self._counter("dropped_windows") + self._unwritten_drops[1],
                               self._counter("released"), self._counter("released_windows"))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _is_disk_full(error: sqlite3.Error) -> bool:
    return getattr(error, "sqlite_errorcode", None) == _SQLITE_FULL or "full" in str(error)
