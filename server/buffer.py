"""A per-site rolling buffer of embeddings with incrementally updated nearest neighbours.

Streaming NOTELA needs, for every window in the buffer, its k - 1 nearest
neighbours by cosine similarity. Recomputing them for a full buffer costs
O(capacity^2 * dim), which is seconds at 20,000 x 1024 on two CPU cores.
``NeighbourBuffer`` therefore keeps for every member an extended candidate
list, the top ``k - 1 + reserve`` other members, and updates these lists when
embeddings arrive and leave:

- An arriving embedding is compared with every member (one matrix product,
  [new, size]). It gets its own list, and it is inserted into the list of each
  member that it ranks above the last kept candidate of.
- An evicted embedding is removed from every list. A list that falls below
  k - 1 candidates is recomputed against the whole buffer.

Each list is always the exact head of its member's full ranking, so the first
k - 1 entries equal a brute-force search.

Ranking. Members are ranked by cosine similarity, highest first, and equal
similarities by slot index, lowest first. The similarity of two members is
defined as the float64 dot product of their float32 unit vectors, rounded to
float32. A float32 matrix product only selects candidates, within a margin that
covers its worst-case rounding error, and the chosen pairs are recomputed in
float64. This keeps the ranking independent of how the products were batched,
which matters for exact duplicates and near ties. A zero vector has similarity
0 with every member.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

_LOGGER = logging.getLogger(__name__)

# Candidates kept per member beyond the k - 1 neighbours. A list shrinks when
# one of its candidates is evicted and is recomputed against the whole buffer
# once fewer than k - 1 remain. More reserve means fewer such recomputations
# but more insertions per update. In 120 updates of 256 noisy copies of real
# BirdNET embeddings into a full buffer of 20,000 (k = 5), reserve 16 needed no
# recomputation, reserve 4 about 70 rows per update, at about the same time.
DEFAULT_RESERVE = 16

# Rows x members of float32 similarities computed at once. 2**24 values are
# 64 MiB, which bounds the memory of a first add of 20,000 rows into an empty
# buffer (one [20,000, 20,000] matrix would be 1.6 GB).
_BLOCK_VALUES = 1 << 24

# Pairs whose similarity is recomputed in float64 at once. Their unit vectors
# are gathered into two reused [256, dim] float32 work arrays (2 MiB at 1024).
_PAIR_BLOCK = 256


@dataclasses.dataclass
class AddStats:
    """Counts from one call of ``NeighbourBuffer.add``.

    Attributes:
        added: rows written into the buffer.
        dropped: rows of the call that a later row of the same call overwrote.
        evicted: members removed to make room.
        merged_rows: existing members whose list gained a new embedding.
        recomputed_rows: existing members whose list was recomputed against
            the whole buffer because evictions left it too short.
        exact_pairs: similarities recomputed in float64.
    """

    added: int = 0
    dropped: int = 0
    evicted: int = 0
    merged_rows: int = 0
    recomputed_rows: int = 0
    exact_pairs: int = 0


def unit_vectors(embeddings: np.ndarray) -> np.ndarray:
    """Return the L2-normalised rows [n, dim] float32 of embeddings [n, dim].

    A row of zeros stays zeros. The norm is taken in float64, so a row's result
    does not depend on the other rows.
    """
    values = np.asarray(embeddings, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", values, values))
    safe_norms = np.where(norms > 0.0, norms, 1.0)
    return (values / safe_norms[:, None]).astype(np.float32)


def _ranking_keys(similarities: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Return int64 keys [n] that sort as (similarity descending, slot ascending).

    The high 32 bits are the bit pattern of -similarity (float32), mapped so
    that integer order is float order, and the low 32 bits are the slot.
    Sorting one integer key was about 1.5 times faster than two separate keys.
    """
    bits = np.ascontiguousarray(-similarities, dtype=np.float32).view(np.int32)
    ordered = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64)
    return (ordered << 32) + slots.astype(np.int64)


def _nonzero_2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the row and column indices of the True entries of a C-contiguous 2-D mask, row by row.

    Equal to ``np.nonzero(mask)``, which was about 6 times slower on a
    [256, 20,000] mask in numpy 2.4.
    """
    rows, columns = np.divmod(np.flatnonzero(mask), mask.shape[1])
    return rows, columns


class NeighbourBuffer:
    """A fixed-capacity FIFO buffer of embeddings that keeps each member's nearest neighbours.

    Storage is a ring of ``capacity`` slots. Slots fill in order from 0, so the
    members always occupy slots ``0 .. size - 1``, and once the buffer is full
    each add overwrites the oldest slots. Neighbour lists hold slot indices.

    Memory: two [capacity, dim] float32 arrays (the raw embeddings and their
    unit vectors; 164 MB at 20,000 x 1024) and two [capacity, k - 1 + reserve]
    arrays for the candidate lists.

    Not thread-safe: one thread adds and reads.
    """

    def __init__(self, capacity: int, dim: int = 1024, k: int = 5, reserve: int = DEFAULT_RESERVE):
        """Create an empty buffer.

        Args:
            capacity: the maximum number of members.
            dim: the embedding dimension.
            k: neighbourhood size counting the window itself (NOTELA's
                convention), so each member has k - 1 neighbours.
            reserve: candidates kept per member beyond the k - 1 neighbours.
        """
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if dim < 1:
            raise ValueError(f"dim must be at least 1, got {dim}")
        if k < 2:
            raise ValueError(f"k counts the window itself and must be at least 2 for one neighbour, got {k}")
        if reserve < 0:
            raise ValueError(f"reserve must be 0 or more, got {reserve}")

        self.capacity = int(capacity)
        self.dim = int(dim)
        self.k = int(k)
        self.reserve = int(reserve)
        self._list_length = self.k - 1 + self.reserve

        # The float32 matrix product of two unit vectors a and b differs from
        # their exact dot product by at most about dim * 2**-24 * sum |a_i b_i|
        # (the standard bound for a sum of dim products), and that sum is at
        # most 1. Rounding the exact value to float32 adds half an ulp.
        # Selection compares two such values, so the margin is twice the
        # bound, with slack for norms a rounding step above 1.
        self._margin = 2.0 * (self.dim + 8) * 2.0**-24

        self._raw = np.zeros((self.capacity, self.dim), dtype=np.float32)
        self._unit = np.zeros((self.capacity, self.dim), dtype=np.float32)
        self._sequence = np.zeros(self.capacity, dtype=np.int64)
        self._candidate_slots = np.full((self.capacity, self._list_length), -1, dtype=np.int32)
        self._candidate_similarities = np.full((self.capacity, self._list_length), -np.inf, dtype=np.float32)
        self._candidate_counts = np.zeros(self.capacity, dtype=np.int64)

        # Work arrays reused by every add. Fresh arrays in every add cost page
        # faults, because glibc maps large blocks anew, and made an add of 256
        # into a buffer of 1,000 about 4 times slower in the round benchmark.
        self._pair_work = np.empty((2, _PAIR_BLOCK, self.dim), dtype=np.float32)
        self._similarity_work = np.empty(0, dtype=np.float32)

        self._size = 0
        self._next_slot = 0
        self._total_added = 0
        self.last_add_stats = AddStats()

    @property
    def size(self) -> int:
        """The number of members, at most ``capacity``."""
        return self._size

    @property
    def neighbour_count(self) -> int:
        """The number of neighbours per member, m = k - 1."""
        return self.k - 1

    @property
    def total_added(self) -> int:
        """The number of embeddings ever passed to ``add``, dropped ones included."""
        return self._total_added

    @property
    def embeddings(self) -> np.ndarray:
        """The raw embeddings [size, dim] float32 in slot order.

        A read-only view: the next ``add`` changes its rows.
        """
        view = self._raw[: self._size]
        view.flags.writeable = False
        return view

    @property
    def sequence_numbers(self) -> np.ndarray:
        """The insertion number [size] int64 of each slot: how many embeddings were added before it."""
        return self._sequence[: self._size].copy()

    def neighbours(self) -> np.ndarray:
        """Return the slot indices [size, k - 1] int32 of each member's nearest neighbours.

        Nearest first. Rows are padded with -1 while the buffer has fewer than
        k members.
        """
        return self._candidate_slots[: self._size, : self.neighbour_count].copy()

    def mutual_neighbours(self) -> np.ndarray:
        """Return the mutual neighbours [size, k - 1] int32 of each member.

        j is kept in row i only when i is also among j's k - 1 nearest
        neighbours. Each row is compacted: the mutual neighbours come first,
        nearest first, and -1 fills the rest.
        """
        neighbours = self.neighbours()
        valid = neighbours >= 0
        lists_of_neighbours = neighbours[np.where(valid, neighbours, 0)]
        members = np.arange(self._size, dtype=np.int32)[:, None, None]
        is_mutual = valid & (lists_of_neighbours == members).any(axis=2)

        order = np.argsort(~is_mutual, axis=1, kind="stable")
        compacted = np.take_along_axis(np.where(is_mutual, neighbours, -1), order, axis=1)
        return compacted.astype(np.int32)

    def add(self, embeddings: np.ndarray) -> np.ndarray:
        """Append embeddings [u, dim], evict the oldest members past capacity, update all neighbour lists.

        Costs O(u * size * dim) for the similarities of the new rows, plus a
        full recomputation for the few members whose candidate list fell below
        k - 1 entries.

        Returns:
            [u] int64 slot of each row. When u > capacity, the first
            u - capacity rows are overwritten by later rows of the same call
            and get -1.
        """
        rows = self._check_embeddings(embeddings)
        count = rows.shape[0]
        stats = AddStats()
        slots_out = np.full(count, -1, dtype=np.int64)
        if count == 0:
            self.last_add_stats = stats
            return slots_out

        # Row t of the call goes to slot (next + t) % capacity, so only the
        # last `capacity` rows survive the call.
        first_kept = max(0, count - self.capacity)
        offsets = np.arange(first_kept, count)
        new_slots = (self._next_slot + offsets) % self.capacity
        slots_out[first_kept:] = new_slots
        stats.added = count - first_kept
        stats.dropped = first_kept

        old_size = self._size
        is_new = np.zeros(self.capacity, dtype=bool)
        is_new[new_slots] = True
        evicted = new_slots[new_slots < old_size]
        survivors = np.flatnonzero(~is_new[:old_size])
        stats.evicted = len(evicted)

        self._remove_evicted(evicted, survivors)

        self._raw[new_slots] = rows[first_kept:]
        self._unit[new_slots] = unit_vectors(rows[first_kept:])
        self._sequence[new_slots] = self._total_added + offsets
        self._clear_lists(new_slots)
        self._size = min(self.capacity, old_size + count)
        self._next_slot = int((self._next_slot + count) % self.capacity)
        self._total_added += count

        known_members = len(survivors)
        for block in self._row_blocks(new_slots):
            similarities = self._block_similarities(block)
            stats.merged_rows += self._merge_into_survivors(block, similarities, survivors, known_members, stats)
            known_members += len(block)
            self._rank_rows(block, similarities, stats)

        needed = min(self.neighbour_count, self._size - 1)
        short = survivors[self._candidate_counts[survivors] < needed]
        self._recompute_rows(short, stats)
        stats.recomputed_rows = len(short)

        self.last_add_stats = stats
        _LOGGER.debug("buffer add: %s, size %d", stats, self._size)
        return slots_out

    def rebuild(self) -> None:
        """Recompute every member's candidate list from scratch, O(size^2 * dim).

        The result equals the incrementally updated lists. This is the
        brute-force reference that ``add`` avoids.
        """
        stats = AddStats()
        members = np.arange(self._size)
        self._clear_lists(members)
        self._recompute_rows(members, stats)
        _LOGGER.debug("buffer rebuild: %d rows, %d exact pairs", self._size, stats.exact_pairs)

    def state(self) -> dict[str, np.ndarray]:
        """Return the buffer as a dict of numpy arrays, for ``from_state`` (e.g. through ``np.savez``)."""
        return {
            "capacity": np.asarray(self.capacity, dtype=np.int64),
            "dim": np.asarray(self.dim, dtype=np.int64),
            "k": np.asarray(self.k, dtype=np.int64),
            "reserve": np.asarray(self.reserve, dtype=np.int64),
            "next_slot": np.asarray(self._next_slot, dtype=np.int64),
            "total_added": np.asarray(self._total_added, dtype=np.int64),
            "embeddings": self._raw[: self._size].copy(),
            "sequence_numbers": self._sequence[: self._size].copy(),
            "candidate_slots": self._candidate_slots[: self._size].copy(),
            "candidate_similarities": self._candidate_similarities[: self._size].copy(),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> NeighbourBuffer:
        """Restore a buffer saved with ``state``, recomputing the unit vectors from the embeddings."""
        missing = [key for key in ("capacity", "dim", "k", "reserve", "next_slot", "total_added",
                                   "embeddings", "sequence_numbers", "candidate_slots",
                                   "candidate_similarities") if key not in state]
        if missing:
            raise KeyError(f"buffer state is missing {missing}; it must come from NeighbourBuffer.state()")
        buffer = cls(int(state["capacity"]), int(state["dim"]), int(state["k"]), int(state["reserve"]))

        embeddings = np.asarray(state["embeddings"], dtype=np.float32)
        size = embeddings.shape[0]
        list_shape = (size, buffer._list_length)
        if embeddings.ndim != 2 or embeddings.shape[1] != buffer.dim or size > buffer.capacity:
            raise ValueError(
                f"state embeddings have shape {embeddings.shape}, expected [at most {buffer.capacity}, {buffer.dim}]"
            )
        for key in ("candidate_slots", "candidate_similarities"):
            if np.shape(state[key]) != list_shape:
                raise ValueError(f"state {key} has shape {np.shape(state[key])}, expected {list_shape}")
        if np.shape(state["sequence_numbers"]) != (size,):
            raise ValueError(f"state sequence_numbers has shape {np.shape(state['sequence_numbers'])}, expected ({size},)")

        next_slot = int(state["next_slot"])
        if not 0 <= next_slot < buffer.capacity or (size < buffer.capacity and next_slot != size):
            raise ValueError(
                f"state next_slot {next_slot} is invalid for {size} members in {buffer.capacity} slots; "
                "it must come from NeighbourBuffer.state()"
            )

        buffer._raw[:size] = embeddings
        buffer._unit[:size] = unit_vectors(embeddings)
        buffer._sequence[:size] = state["sequence_numbers"]
        buffer._candidate_slots[:size] = state["candidate_slots"]
        buffer._candidate_similarities[:size] = state["candidate_similarities"]
        buffer._candidate_counts[:size] = (buffer._candidate_slots[:size] >= 0).sum(axis=1)
        buffer._size = size
        buffer._next_slot = next_slot
        buffer._total_added = int(state["total_added"])
        return buffer

    def _check_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        rows = np.asarray(embeddings, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected embeddings of shape [n, {self.dim}], got {rows.shape}")
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"embeddings contain NaN or infinity in rows {bad[:5].tolist()} ({len(bad)} in all)")
        return rows

    def _row_blocks(self, slots: np.ndarray) -> list[np.ndarray]:
        rows_per_block = max(1, _BLOCK_VALUES // max(1, self._size))
        return [slots[start : start + rows_per_block] for start in range(0, len(slots), rows_per_block)]

    def _clear_lists(self, slots: np.ndarray) -> None:
        self._candidate_slots[slots] = -1
        self._candidate_similarities[slots] = -np.inf
        self._candidate_counts[slots] = 0

    def _remove_evicted(self, evicted: np.ndarray, survivors: np.ndarray) -> None:
        """Drop evicted slots from the lists of the survivors, keeping each list's order."""
        if len(evicted) == 0 or len(survivors) == 0:
            return
        is_evicted = np.zeros(self.capacity, dtype=bool)
        is_evicted[evicted] = True
        lists = self._candidate_slots[survivors]
        valid = lists >= 0
        hit = valid & is_evicted[np.where(valid, lists, 0)]
        touched = np.flatnonzero(hit.any(axis=1))
        if len(touched) == 0:
            return

        rows = survivors[touched]
        keep = valid[touched] & ~hit[touched]
        order = np.argsort(~keep, axis=1, kind="stable")
        kept_sorted = np.take_along_axis(keep, order, axis=1)
        slots = np.take_along_axis(self._candidate_slots[rows], order, axis=1)
        similarities = np.take_along_axis(self._candidate_similarities[rows], order, axis=1)
        self._candidate_slots[rows] = np.where(kept_sorted, slots, -1)
        self._candidate_similarities[rows] = np.where(kept_sorted, similarities, -np.inf)
        self._candidate_counts[rows] = keep.sum(axis=1)

    def _block_similarities(self, rows: np.ndarray) -> np.ndarray:
        """Return the float32 products [rows, size] of the rows' unit vectors with every member's.

        The result lives in a reused work array, valid until the next call.
        """
        values = len(rows) * self._size
        if self._similarity_work.size < values:
            self._similarity_work = np.empty(values, dtype=np.float32)
        similarities = self._similarity_work[:values].reshape(len(rows), self._size)
        np.matmul(self._unit[rows], self._unit[: self._size].T, out=similarities)
        return similarities

    def _exact_similarities(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Return the defined similarity [pairs] float32 of slot pairs (first[p], second[p])."""
        result = np.empty(len(first), dtype=np.float32)
        for start in range(0, len(first), _PAIR_BLOCK):
            stop = min(start + _PAIR_BLOCK, len(first))
            a = np.take(self._unit, first[start:stop], axis=0, out=self._pair_work[0, : stop - start])
            b = np.take(self._unit, second[start:stop], axis=0, out=self._pair_work[1, : stop - start])
            result[start:stop] = np.einsum("ij,ij->i", a, b, dtype=np.float64)
        # Adding 0 turns -0.0 into 0.0, which _ranking_keys would order apart.
        result += 0.0
        return result

    def _write_ranked(self, owners: np.ndarray, slots: np.ndarray, similarities: np.ndarray) -> None:
        """Replace the list of every owner in ``owners`` by its best entries among those given.

        Args:
            owners, slots, similarities: [entries], one candidate (slot, similarity)
                for the list of member ``owner`` per entry.
        """
        if len(owners) == 0:
            return
        order = np.lexsort((_ranking_keys(similarities, slots), owners))
        owners = owners[order]
        slots = slots[order]
        similarities = similarities[order]

        starts = np.flatnonzero(np.concatenate(([True], owners[1:] != owners[:-1])))
        lengths = np.diff(np.concatenate((starts, [len(owners)])))
        rank = np.arange(len(owners)) - np.repeat(starts, lengths)
        kept = rank < self._list_length

        rows = owners[starts]
        self._clear_lists(rows)
        self._candidate_slots[owners[kept], rank[kept]] = slots[kept]
        self._candidate_similarities[owners[kept], rank[kept]] = similarities[kept]
        self._candidate_counts[rows] = np.minimum(lengths, self._list_length)

    def _rank_rows(self, rows: np.ndarray, similarities: np.ndarray, stats: AddStats) -> None:
        """Give each member in ``rows`` its full candidate list.

        Args:
            rows: [r] slots.
            similarities: [r, size] float32 products of their unit vectors with
                every member's; overwritten.
        """
        similarities[np.arange(len(rows)), rows] = -np.inf
        others = self._size - 1
        if others <= 0:
            return

        if others <= self._list_length:
            selected = np.isfinite(similarities)
        else:
            # The list_length-th largest float32 value bounds the selection:
            # everything in the exact top list lies within the margin of it.
            position = self._size - self._list_length
            threshold = np.partition(similarities, position, axis=1)[:, position]
            selected = similarities >= (threshold - self._margin)[:, None]
        selected[np.arange(len(rows)), rows] = False

        row_index, columns = _nonzero_2d(selected)
        owners = rows[row_index]
        exact = self._exact_similarities(owners, columns)
        stats.exact_pairs += len(exact)
        self._write_ranked(owners, columns, exact)

    def _merge_into_survivors(
        self,
        block: np.ndarray,
        similarities: np.ndarray,
        survivors: np.ndarray,
        known_members: int,
        stats: AddStats,
    ) -> int:
        """Insert the new members ``block`` into the survivors' lists where they rank high enough.

        Args:
            block: [r] slots of new members.
            similarities: [r, size] float32 products with every member.
            survivors: slots of the members kept from before this add.
            known_members: members that the survivors' lists were built from
                (the survivors and the new members of earlier blocks).

        Returns:
            The number of survivors whose list changed.
        """
        if len(survivors) == 0:
            return 0
        counts = self._candidate_counts[survivors]
        last = np.maximum(counts - 1, 0)
        last_similarity = self._candidate_similarities[survivors, last]
        last_slot = self._candidate_slots[survivors, last]

        # A complete list contains every other known member, so any new member
        # belongs in it. Otherwise a new member must rank above the last
        # candidate, and an empty incomplete list is recomputed later.
        complete = counts == known_members - 1
        thresholds = np.full(self._size, np.inf, dtype=np.float32)
        thresholds[survivors] = np.where(
            complete, -np.inf, np.where(counts > 0, last_similarity - self._margin, np.inf)
        )
        row_index, columns = _nonzero_2d(similarities >= thresholds[None, :])
        if len(columns) == 0:
            return 0

        new_slots = block[row_index]
        exact = self._exact_similarities(columns, new_slots)
        stats.exact_pairs += len(exact)

        position = np.zeros(self.capacity, dtype=np.int64)
        position[survivors] = np.arange(len(survivors))
        at = position[columns]
        beats_last = (exact > last_similarity[at]) | ((exact == last_similarity[at]) & (new_slots < last_slot[at]))
        accepted = complete[at] | beats_last
        owners = columns[accepted]
        if len(owners) == 0:
            return 0

        rows = np.unique(owners)
        current = self._candidate_slots[rows]
        valid = current >= 0
        all_owners = np.concatenate((np.repeat(rows, valid.sum(axis=1)), owners))
        all_slots = np.concatenate((current[valid], new_slots[accepted]))
        all_similarities = np.concatenate((self._candidate_similarities[rows][valid], exact[accepted]))
        self._write_ranked(all_owners, all_slots, all_similarities)
        return len(rows)

    def _recompute_rows(self, rows: np.ndarray, stats: AddStats) -> None:
        for block in self._row_blocks(rows):
            self._rank_rows(block, self._block_similarities(block), stats)
