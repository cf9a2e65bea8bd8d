"""The duplicate filter: ranges of the sequence numbers accepted from each recorder.

QoS 1 can deliver a message twice, and a base station that restarts gets
again every message it had not acknowledged. The base station therefore
accepts a window only if its (device, sequence number) is new. Recorders
number their windows 0, 1, 2, ... and skip numbers only when they crash or
drop queued windows, so the accepted numbers of a device form a few long
runs. Storing them as half-open ranges ``[start, end)`` keeps memory
proportional to the number of gaps, not to the number of windows.
"""

from __future__ import annotations

import logging

import numpy as np
from sortedcontainers import SortedDict

_LOGGER = logging.getLogger(__name__)

# Ranges kept per device. Each gap between two ranges costs one range, so a
# device reaches this only after 10,000 separate gaps (crashes or dropped
# queue entries). Past it, the lowest gap is filled: its numbers count as
# accepted, and a window from it that still arrives is dropped as a
# duplicate, with a warning in the log. Each range costs about 200 bytes in
# a SortedDict, so a device's ranges stay below about 2 MB.
MAX_RANGES_PER_DEVICE = 10_000


class SequenceFilter:
    """Record of the (device, sequence number) pairs accepted, as ranges per device.

    Args:
        owner: named in log lines, e.g. the site id.
        max_ranges: ranges kept per device before the lowest gap is filled.
    """

    def __init__(self, owner: str = "", max_ranges: int = MAX_RANGES_PER_DEVICE):
        if max_ranges < 1:
            raise ValueError(f"max_ranges must be at least 1, got {max_ranges}")
        self.owner = owner
        self.max_ranges = max_ranges
        # Per device, start -> end (exclusive) of disjoint, non-adjacent ranges.
        self._ranges: dict[str, SortedDict] = {}
        self.filled_gap_numbers = 0

    def is_new(self, device: str, sequence: int) -> bool:
        ranges = self._ranges.get(device)
        if not ranges:
            return True
        index = ranges.bisect_right(sequence) - 1
        if index < 0:
            return True
        start, end = ranges.peekitem(index)
        return sequence >= end

    def add(self, device: str, sequence: int) -> None:
        """Mark ``sequence`` of ``device`` as accepted, merging it with the ranges beside it."""
        ranges = self._ranges.setdefault(device, SortedDict())
        index = ranges.bisect_right(sequence) - 1
        start, end = sequence, sequence + 1
        if index >= 0:
            before_start, before_end = ranges.peekitem(index)
            if sequence < before_end:
                return
            if before_end == sequence:
                start = before_start
                del ranges[before_start]
        after_end = ranges.pop(end, None)
        if after_end is not None:
            end = after_end
        ranges[start] = end
        if len(ranges) > self.max_ranges:
            self._fill_lowest_gap(device, ranges)

    def _fill_lowest_gap(self, device: str, ranges: SortedDict) -> None:
        first_start, first_end = ranges.popitem(0)
        second_start, second_end = ranges.popitem(0)
        ranges[first_start] = second_end
        self.filled_gap_numbers += second_start - first_end
        _LOGGER.warning(
            "%s: device %s has more than %d gaps in its accepted sequence numbers, so numbers %d to %d now "
            "count as accepted; windows with these numbers that arrive later are dropped as duplicates",
            self.owner or "sequence filter", device, self.max_ranges, first_end, second_start - 1)

    def devices(self) -> list[str]:
        return sorted(self._ranges)

    def ranges(self, device: str) -> list[tuple[int, int]]:
        """Return the accepted numbers of ``device`` as sorted half-open ranges [start, end)."""
        return list(self._ranges.get(device, SortedDict()).items())

    def ranges_containing(self, device: str, sequences: list[int]) -> list[tuple[int, int]]:
        """Return the accepted ranges of ``device`` that hold any of ``sequences``, sorted; numbers not accepted add none."""
        ranges = self._ranges.get(device)
        if not ranges:
            return []
        found = {}
        for sequence in sequences:
            index = ranges.bisect_right(sequence) - 1
            if index >= 0:
                start, end = ranges.peekitem(index)
                if sequence < end:
                    found[start] = end
        return sorted(found.items())

    def accepted_count(self, device: str) -> int:
        return sum(end - start for start, end in self.ranges(device))

    def state(self) -> dict[str, np.ndarray]:
        """Return the filter as numpy arrays, for ``from_state`` (through ``np.savez``)."""
        devices = self.devices()
        counts = [len(self._ranges[device]) for device in devices]
        ranges = [pair for device in devices for pair in self._ranges[device].items()]
        return {
            "devices": np.array(devices, dtype=np.str_),
            "range_counts": np.array(counts, dtype=np.int64),
            "ranges": np.array(ranges, dtype=np.uint64).reshape(-1, 2),
            "filled_gap_numbers": np.asarray(self.filled_gap_numbers, dtype=np.int64),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], owner: str = "",
                   max_ranges: int = MAX_RANGES_PER_DEVICE) -> SequenceFilter:
        """Restore a filter saved with ``state``."""
        devices = [str(device) for device in state["devices"]]
        counts = np.asarray(state["range_counts"], dtype=np.int64)
        ranges = np.asarray(state["ranges"], dtype=np.uint64).reshape(-1, 2)
        if len(counts) != len(devices) or int(counts.sum()) != len(ranges):
            raise ValueError(f"sequence filter state of {owner or 'a site'} is inconsistent: {len(devices)} devices, "
                             f"{len(counts)} range counts, {int(counts.sum())} ranges expected, {len(ranges)} stored")
        restored = cls(owner, max_ranges)
        offset = 0
        for device, count in zip(devices, counts.tolist()):
            pairs = ranges[offset:offset + count].tolist()
            restored._ranges[device] = SortedDict((int(start), int(end)) for start, end in pairs)
            offset += count
        restored.filled_gap_numbers = int(state["filled_gap_numbers"])
        return restored
