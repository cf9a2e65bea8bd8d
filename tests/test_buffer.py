"""Tests for the rolling neighbour buffer against a brute-force search."""

from __future__ import annotations

import numpy as np
import pytest

from dawnchorus.server.buffer import NeighbourBuffer


def brute_force_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Return the k - 1 nearest neighbours [n, k - 1] of every row, -1 padded.

    Cosine similarity is the float64 dot product of float32 unit vectors,
    rounded to float32, and equal similarities go to the lower row index.
    """
    values = embeddings.astype(np.float64)
    norms = np.linalg.norm(values, axis=1)
    unit = (values / np.where(norms > 0, norms, 1.0)[:, None]).astype(np.float32).astype(np.float64)
    similarities = (unit @ unit.T).astype(np.float32)

    count = len(embeddings)
    neighbours = np.full((count, k - 1), -1, dtype=np.int32)
    for row in range(count):
        others = np.array([column for column in range(count) if column != row], dtype=np.int64)
        order = np.lexsort((others, -similarities[row, others]))
        nearest = others[order[: k - 1]]
        neighbours[row, : len(nearest)] = nearest
    return neighbours


def brute_force_mutual(neighbours: np.ndarray) -> np.ndarray:
    """Keep j in row i only if i is in row j, with the mutual ones first, in order, then -1."""
    mutual = np.full_like(neighbours, -1)
    for row, listed in enumerate(neighbours):
        kept = [int(column) for column in listed if column >= 0 and row in neighbours[column]]
        mutual[row, : len(kept)] = kept
    return mutual


def clustered_embeddings(rng: np.random.Generator, count: int, dim: int, history: list[np.ndarray]) -> np.ndarray:
    """Return non-negative embeddings [count, dim] in tight clusters, with exact duplicates.

    About a fifth of the rows copy another row of the same batch or of an
    earlier batch in ``history``.
    """
    centres = np.abs(rng.normal(1.0, 1.0, size=(6, dim)))
    labels = rng.integers(0, len(centres), size=count)
    rows = np.abs(centres[labels] + rng.normal(0.0, 0.05, size=(count, dim))).astype(np.float32)

    earlier = np.concatenate(history) if history else np.empty((0, dim), dtype=np.float32)
    for row in range(count):
        if rng.random() < 0.2:
            pool = np.concatenate((earlier, rows[:row]))
            if len(pool):
                rows[row] = pool[rng.integers(0, len(pool))]
    return rows


def run_sequence(
    buffer: NeighbourBuffer, batch_sizes: list[int], seed: int, history: list[np.ndarray] | None = None
) -> dict[str, list[str]]:
    """Add batches of the given sizes and compare the buffer with brute force after each one.

    Args:
        history: every batch added to the buffer so far, extended in place.
    Returns:
        For "contents", "neighbours" and "mutual", the steps where the buffer
        differed from the expected FIFO contents or from brute force.
    """
    rng = np.random.default_rng(seed)
    history = [] if history is None else history
    mismatches: dict[str, list[str]] = {"contents": [], "neighbours": [], "mutual": []}
    for step, batch_size in enumerate(batch_sizes):
        rows = clustered_embeddings(rng, batch_size, buffer.dim, history)
        history.append(rows)
        buffer.add(rows)

        added = np.concatenate(history)
        expected = brute_force_neighbours(buffer.embeddings, buffer.k)
        where = f"step {step} (batch of {batch_size})"
        if not np.array_equal(buffer.embeddings, added[buffer.sequence_numbers]):
            mismatches["contents"].append(where)
        if not np.array_equal(buffer.neighbours(), expected):
            mismatches["neighbours"].append(where)
        if not np.array_equal(buffer.mutual_neighbours(), brute_force_mutual(expected)):
            mismatches["mutual"].append(where)
    return mismatches


def test_add_mixed_sizes_matches_brute_force():
    buffer = NeighbourBuffer(capacity=50, dim=16, k=5, reserve=3)

    mismatches = run_sequence(buffer, [1, 1, 3, 7, 30, 1, 7, 25, 300, 1, 13, 49, 50, 51, 7, 7, 7], seed=1)

    assert mismatches["contents"] == []
    assert mismatches["neighbours"] == []
    assert mismatches["mutual"] == []


def test_add_without_reserve_matches_brute_force():
    buffer = NeighbourBuffer(capacity=40, dim=8, k=4, reserve=0)
    recomputed = 0
    rng = np.random.default_rng(2)
    history: list[np.ndarray] = []
    mismatched_steps = []

    for step in range(40):
        rows = clustered_embeddings(rng, int(rng.integers(1, 12)), buffer.dim, history)
        history.append(rows)
        buffer.add(rows)
        recomputed += buffer.last_add_stats.recomputed_rows
        if not np.array_equal(buffer.neighbours(), brute_force_neighbours(buffer.embeddings, buffer.k)):
            mismatched_steps.append(step)

    assert mismatched_steps == []
    assert recomputed > 0


def test_add_full_dimension_matches_brute_force():
    buffer = NeighbourBuffer(capacity=1200, dim=1024, k=5)

    mismatches = run_sequence(buffer, [1000, 256, 256, 1, 256], seed=3)

    assert mismatches["contents"] == []
    assert mismatches["neighbours"] == []
    assert mismatches["mutual"] == []


def test_add_near_ties_matches_brute_force():
    # Copies of a few rows with relative noise of 1e-6 have similarities that
    # differ by less than the rounding error of a float32 matrix product.
    rng = np.random.default_rng(11)
    bases = np.abs(rng.normal(0.4, 0.35, size=(4, 1024)))
    rows = bases[rng.integers(0, 4, size=600)] * (1.0 + rng.normal(0.0, 1e-6, size=(600, 1024)))
    rows = rows.astype(np.float32)
    buffer = NeighbourBuffer(capacity=300, dim=1024, k=5, reserve=2)
    mismatched_steps = []

    for step, start in enumerate(range(0, 600, 100)):
        buffer.add(rows[start : start + 100])
        if not np.array_equal(buffer.neighbours(), brute_force_neighbours(buffer.embeddings, buffer.k)):
            mismatched_steps.append(step)

    assert mismatched_steps == []


def test_add_large_k_matches_brute_force():
    buffer = NeighbourBuffer(capacity=120, dim=12, k=11, reserve=4)

    mismatches = run_sequence(buffer, [5, 11, 60, 33, 33, 200, 9], seed=4)

    assert mismatches["contents"] == []
    assert mismatches["neighbours"] == []
    assert mismatches["mutual"] == []


def test_add_keeps_fifo_order():
    buffer = NeighbourBuffer(capacity=10, dim=4, k=3)
    rows = np.abs(np.random.default_rng(5).normal(size=(27, 4))).astype(np.float32)

    buffer.add(rows[:6])
    buffer.add(rows[6:13])
    buffer.add(rows[13:27])

    assert buffer.size == 10
    assert buffer.total_added == 27
    assert np.array_equal(buffer.embeddings, rows[buffer.sequence_numbers])
    assert sorted(buffer.sequence_numbers.tolist()) == list(range(17, 27))


def test_add_returns_slots():
    buffer = NeighbourBuffer(capacity=5, dim=3, k=2)
    rows = np.ones((3, 3), dtype=np.float32)

    first = buffer.add(rows)
    second = buffer.add(rows)

    assert first.tolist() == [0, 1, 2]
    assert second.tolist() == [3, 4, 0]


def test_add_more_than_capacity_drops_first_rows():
    buffer = NeighbourBuffer(capacity=4, dim=3, k=2)
    buffer.add(np.ones((2, 3), dtype=np.float32))
    rows = np.abs(np.random.default_rng(6).normal(size=(7, 3))).astype(np.float32)

    slots = buffer.add(rows)

    assert slots.tolist() == [-1, -1, -1, 1, 2, 3, 0]
    assert buffer.last_add_stats.dropped == 3
    assert np.array_equal(buffer.embeddings[slots[3:]], rows[3:])


def test_neighbours_fewer_than_k_members_padded():
    buffer = NeighbourBuffer(capacity=10, dim=4, k=5)
    rows = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]], dtype=np.float32)

    buffer.add(rows)

    assert buffer.neighbours().tolist() == [[1, 2, -1, -1], [0, 2, -1, -1], [1, 0, -1, -1]]
    assert buffer.mutual_neighbours().tolist() == [[1, 2, -1, -1], [0, 2, -1, -1], [1, 0, -1, -1]]


def test_neighbours_single_member_empty():
    buffer = NeighbourBuffer(capacity=10, dim=4, k=5)

    buffer.add(np.ones((1, 4), dtype=np.float32))

    assert buffer.neighbours().tolist() == [[-1, -1, -1, -1]]
    assert buffer.mutual_neighbours().tolist() == [[-1, -1, -1, -1]]


def test_neighbours_capacity_one_empty():
    buffer = NeighbourBuffer(capacity=1, dim=3, k=3)

    slots = buffer.add(np.ones((2, 3), dtype=np.float32))

    assert slots.tolist() == [-1, 0]
    assert buffer.neighbours().tolist() == [[-1, -1]]
    assert buffer.mutual_neighbours().tolist() == [[-1, -1]]


def test_neighbours_empty_buffer():
    buffer = NeighbourBuffer(capacity=10, dim=4, k=5)

    assert buffer.neighbours().shape == (0, 4)
    assert buffer.mutual_neighbours().shape == (0, 4)
    assert buffer.embeddings.shape == (0, 4)


def test_mutual_neighbours_drops_one_sided():
    buffer = NeighbourBuffer(capacity=10, dim=2, k=2)
    # Slot 2 is nearest to slot 1, but slot 1 is nearer to slot 0.
    rows = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 0.5]], dtype=np.float32)

    buffer.add(rows)

    assert buffer.neighbours().tolist() == [[1], [0], [1]]
    assert buffer.mutual_neighbours().tolist() == [[1], [0], [-1]]


def test_zero_vector_matches_brute_force():
    buffer = NeighbourBuffer(capacity=20, dim=6, k=4)
    rows = np.abs(np.random.default_rng(7).normal(size=(12, 6))).astype(np.float32)
    rows[3] = 0.0
    rows[8] = 0.0

    buffer.add(rows[:5])
    buffer.add(rows[5:])

    assert np.array_equal(buffer.neighbours(), brute_force_neighbours(rows, 4))
    assert buffer.neighbours()[3].tolist() == [0, 1, 2]
    assert buffer.neighbours()[8].tolist() == [0, 1, 2]


def test_duplicates_tie_by_slot():
    buffer = NeighbourBuffer(capacity=10, dim=3, k=4)
    row = np.array([[0.2, 0.5, 0.9]], dtype=np.float32)

    buffer.add(np.repeat(row, 3, axis=0))
    buffer.add(np.repeat(row, 2, axis=0))

    assert buffer.neighbours().tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], [0, 1, 2]]


def test_rebuild_matches_incremental():
    buffer = NeighbourBuffer(capacity=80, dim=16, k=5, reserve=2)
    run_sequence(buffer, [30, 30, 30, 5], seed=8)
    incremental = buffer.neighbours()

    buffer.rebuild()

    assert np.array_equal(buffer.neighbours(), incremental)


def test_state_round_trip_continues_exactly():
    buffer = NeighbourBuffer(capacity=60, dim=16, k=5, reserve=2)
    history: list[np.ndarray] = []
    run_sequence(buffer, [40, 30], seed=9, history=history)

    restored = NeighbourBuffer.from_state(buffer.state())

    assert np.array_equal(restored.neighbours(), buffer.neighbours())
    assert np.array_equal(restored.embeddings, buffer.embeddings)
    assert restored.total_added == buffer.total_added
    mismatches = run_sequence(restored, [7, 25, 1], seed=10, history=history)

    assert mismatches["contents"] == []
    assert mismatches["neighbours"] == []
    assert mismatches["mutual"] == []


def test_state_missing_key_rejected():
    state = NeighbourBuffer(capacity=5, dim=3).state()
    del state["candidate_slots"]

    with pytest.raises(KeyError, match="candidate_slots"):
        NeighbourBuffer.from_state(state)


def test_embeddings_view_read_only():
    buffer = NeighbourBuffer(capacity=5, dim=3)
    buffer.add(np.ones((2, 3), dtype=np.float32))

    with pytest.raises(ValueError):
        buffer.embeddings[0, 0] = 5.0


def test_add_wrong_shape_rejected():
    buffer = NeighbourBuffer(capacity=5, dim=3)

    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        buffer.add(np.ones((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        buffer.add(np.ones(3, dtype=np.float32))


def test_add_nan_rejected():
    buffer = NeighbourBuffer(capacity=5, dim=3)
    rows = np.ones((3, 3), dtype=np.float32)
    rows[1, 2] = np.nan

    with pytest.raises(ValueError, match="rows \\[1\\]"):
        buffer.add(rows)
    assert buffer.size == 0


def test_add_empty_batch_no_change():
    buffer = NeighbourBuffer(capacity=5, dim=3)

    slots = buffer.add(np.empty((0, 3), dtype=np.float32))

    assert slots.shape == (0,)
    assert buffer.size == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": 5, "dim": 0}, "dim"),
        ({"capacity": 5, "k": 1}, "k counts"),
        ({"capacity": 5, "reserve": -1}, "reserve"),
    ],
)
def test_constructor_invalid_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        NeighbourBuffer(**arguments)
