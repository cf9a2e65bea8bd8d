"""What one site has accepted: its adapter, the origin of each buffer slot and its duplicate filter.

``SiteIngest`` is the unit that the base station persists. Its snapshot
contains the neighbour buffer (with its neighbour lists, so a restart needs no
recomputation), the count of windows since the last round, the duplicate
filter, and the (device, sequence number) of every buffer slot, which
``dawnchorus server inspect`` reports.
"""

from __future__ import annotations

import logging

import numpy as np

from dawnchorus.server.adaptation import SiteAdapter
from dawnchorus.server.buffer import NeighbourBuffer
from dawnchorus.server.sequences import SequenceFilter

_LOGGER = logging.getLogger(__name__)


class SiteIngest:
    """A site's adapter with the bookkeeping that makes its state durable.

    Attributes:
        site: site id.
        adapter: the site's buffer and NOTELA trainer.
        filter: (device, sequence number) pairs the site accepted.
        journal_id: the newest journal row that the last snapshot contains.
        unsaved: windows accepted since the last snapshot.
    """

    def __init__(self, site: str, adapter: SiteAdapter):
        self.site = site
        self.adapter = adapter
        self.filter = SequenceFilter(f"site {site}")
        capacity = adapter.buffer.capacity
        self._slot_devices = np.full(capacity, "", dtype=object)
        self._slot_sequences = np.zeros(capacity, dtype=np.uint64)
        self.journal_id = 0
        self.unsaved = 0

    def new_rows(self, device: str, sequences: list[int]) -> list[int]:
        """Return the rows of ``sequences`` that the site has not accepted; a number repeated in the call counts once."""
        fresh, seen = [], set()
        for row, sequence in enumerate(sequences):
            if sequence not in seen and self.filter.is_new(device, sequence):
                seen.add(sequence)
                fresh.append(row)
        return fresh

    def add(self, devices: list[str], sequences: np.ndarray, embeddings: np.ndarray) -> None:
        """Add accepted windows to the buffer, record where each slot came from and mark them accepted.

        Args:
            devices: the recorder of each window.
            sequences: [n] uint64 their sequence numbers.
            embeddings: [n, dim] float16 or float32.
        """
        slots = self.adapter.add(np.asarray(embeddings, dtype=np.float32))
        stored = slots >= 0
        self._slot_devices[slots[stored]] = np.asarray(devices, dtype=object)[stored]
        self._slot_sequences[slots[stored]] = np.asarray(sequences, dtype=np.uint64)[stored]
        for device, sequence in zip(devices, np.asarray(sequences).tolist()):
            self.filter.add(device, int(sequence))
        self.unsaved += len(devices)

    def origins(self) -> tuple[list[str], np.ndarray]:
        """Return the device and sequence number [size] uint64 of each buffer slot, in slot order."""
        size = self.adapter.buffer.size
        return list(self._slot_devices[:size]), self._slot_sequences[:size].copy()

    def state(self) -> dict[str, np.ndarray]:
        """Return the snapshot arrays of the site (see ``journal.write_snapshot``)."""
        devices, sequences = self.origins()
        arrays = {f"buffer_{key}": value for key, value in self.adapter.buffer.state().items()}
        arrays.update({f"filter_{key}": value for key, value in self.filter.state().items()})
        arrays.update({
            "site": np.asarray(self.site, dtype=np.str_),
            "slot_devices": np.array(devices, dtype=np.str_),
            "slot_sequences": sequences,
            "pending": np.asarray(self.adapter.pending, dtype=np.int64),
            "rounds": np.asarray(self.adapter.rounds, dtype=np.int64),
            "journal_id": np.asarray(self.journal_id, dtype=np.int64),
        })
        return arrays

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Load a snapshot written from ``state``.

        A snapshot taken with another buffer capacity or k (the station was
        restarted with other settings) is replayed window by window into the
        configured buffer, oldest first, so the newest windows are kept.

        Raises:
            ValueError, KeyError: the snapshot is damaged or was written for a
                model of another embedding dimension.
        """
        buffer_state = {key[len("buffer_"):]: value for key, value in arrays.items() if key.startswith("buffer_")}
        filter_state = {key[len("filter_"):]: value for key, value in arrays.items() if key.startswith("filter_")}
        devices = [str(device) for device in arrays["slot_devices"]]
        sequences = np.asarray(arrays["slot_sequences"], dtype=np.uint64)
        buffer = self.adapter.buffer
        same_layout = (int(buffer_state["capacity"]), int(buffer_state["dim"]), int(buffer_state["k"]),
                       int(buffer_state["reserve"])) == (buffer.capacity, buffer.dim, buffer.k, buffer.reserve)

        restored_filter = SequenceFilter.from_state(filter_state, f"site {self.site}")
        if same_layout:
            self.adapter.buffer = NeighbourBuffer.from_state(buffer_state)
            size = self.adapter.buffer.size
            self._slot_devices[:size] = devices
            self._slot_sequences[:size] = sequences
        else:
            embeddings = np.asarray(buffer_state["embeddings"])
            if embeddings.ndim != 2 or embeddings.shape[1] != buffer.dim:
                raise ValueError(f"the snapshot's embeddings have shape {embeddings.shape}, the model's "
                                 f"dimension is {buffer.dim}: it was written for another model")
            _LOGGER.warning("site %s: the snapshot's buffer (capacity %d, k %d) differs from the settings "
                            "(capacity %d, k %d); its windows are added again, oldest first", self.site,
                            int(buffer_state["capacity"]), int(buffer_state["k"]), buffer.capacity, buffer.k)
            order = np.argsort(buffer_state["sequence_numbers"], kind="stable")
            self.add([devices[i] for i in order], sequences[order], embeddings[order])
        self.filter = restored_filter
        self.adapter.pending = int(arrays["pending"])
        self.adapter.rounds = int(arrays["rounds"])
        self.journal_id = int(arrays["journal_id"])
        self.unsaved = 0
