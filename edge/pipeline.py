"""The recorder's inference loop: windows to embeddings (backbone) to logits (current head).

Audio decoding runs in a reader thread that fills a small bounded queue, so
it overlaps with inference, which releases the GIL while LiteRT runs. The
backbone and head are touched only by the thread that iterates
``InferencePipeline.run``, because LiteRT interpreters are not thread-safe.
A new head from another thread is handed over with ``swap_head`` and takes
effect between two batches.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from typing import Iterable, Iterator

import numpy as np

from dawnchorus.edge.audio import Window
from dawnchorus.models.backbone import Backbone
from dawnchorus.models.head import HeadRunner

_LOGGER = logging.getLogger(__name__)

# Over four runs of benchmarks/edge_throughput.py on a 2-core AMD EPYC with
# LiteRT 2.3, batches of 4 and 8 were 0-8 % faster than batch 1.
# A live recorder keeps batch 1 all the same, because a batch of 4 would
# hold the first window's detections back by 9 s.
DEFAULT_BATCH_SIZE = 1

# OpenBLAS worker threads busy-wait for new work between calls. With the head's
# matrix product every ~20 ms they never sleep, so they take CPU from XNNPACK.
# On a 2-core AMD EPYC (OpenBLAS 0.3.31, numpy 2.4), benchmarks/edge_throughput.py
# measured the pipeline at 0.80-0.85x of a raw invoke loop with OpenBLAS's
# default 2 threads. With 1 thread it reached 0.98-1.00x. The 6522-class head
# then takes about 0.8 ms per window instead of 0.5 ms.
_BLAS_THREADS = 1

# How long the reader thread waits on a full queue before it checks again
# whether the pipeline was stopped.
_PUT_TIMEOUT_S = 0.1

# How long closing the pipeline waits for the reader thread. A microphone
# read can block for one block (0.5 s by default).
_READER_JOIN_TIMEOUT_S = 5.0


@dataclasses.dataclass
class ScoredBatch:
    """Windows scored together by the backbone and one head.

    Attributes:
        windows: the n windows, in source order.
        embeddings: [n, 1024] float32 backbone outputs.
        logits: [n, K] float32 head outputs, K = len(head.labels).
        head: the head that computed ``logits`` (it has ``labels`` and
            ``version``).
    """

    windows: list[Window]
    embeddings: np.ndarray
    logits: np.ndarray
    head: HeadRunner


class _EndOfSource:
    """Queue marker: the source is exhausted, or failed with ``error``."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


_blas_limited = False


def limit_blas_threads(threads: int = _BLAS_THREADS) -> bool:
    """Limit the process's BLAS libraries to ``threads`` threads; return True if it worked.

    The limit is process-wide and stays in place, which suits a recorder
    process, where XNNPACK should have every core. It needs threadpoolctl.
    Without it, a warning explains how to set the limit instead.
    """
    global _blas_limited
    if _blas_limited:
        return True
    try:
        import threadpoolctl
    except ImportError:
        _LOGGER.warning(
            "threadpoolctl is not installed, so numpy's BLAS keeps its own threads, which "
            "slow LiteRT down on small machines: install threadpoolctl, or set "
            "OPENBLAS_NUM_THREADS=%d before starting the process", threads,
        )
        return False
    threadpoolctl.threadpool_limits(limits=threads, user_api="blas")
    _blas_limited = True
    _LOGGER.info("BLAS limited to %d thread(s) so that LiteRT has the cores", threads)
    return True


def _head_input_dim(head: HeadRunner) -> int | None:
    """Return the embedding size a head expects, where the head exposes it."""
    if hasattr(head, "embedding_dim"):
        return int(head.embedding_dim)
    weights = getattr(head, "weights", None)
    if weights is not None and np.ndim(weights) == 2:
        return int(np.shape(weights)[1])
    return None


class InferencePipeline:
    """Runs the backbone on batches of windows and the current head on their embeddings.

    Args:
        backbone: embeds windows [n, 144000] float32 to [n, 1024] float32.
        head: maps embeddings to logits; it must have ``labels``, ``version``
            and ``logits``.
        batch_size: windows per backbone call. The last batch of a finite
            source may be smaller. With a live microphone a batch is scored
            only when it is full, so a batch size above 1 adds up to
            ``batch_size - 1`` window hops of latency.
        queue_windows: decoded windows the reader thread may hold ahead of
            inference (about 0.6 MB each); default ``2 * batch_size + 2``.
        limit_blas: limit numpy's BLAS to one thread, process-wide, when
            ``run`` starts (see ``limit_blas_threads``).
    """

    def __init__(
        self,
        backbone: Backbone,
        head: HeadRunner,
        batch_size: int = DEFAULT_BATCH_SIZE,
        queue_windows: int | None = None,
        limit_blas: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: use 1 or more windows")
        if queue_windows is not None and queue_windows < 1:
            raise ValueError(f"queue_windows={queue_windows} is invalid: use 1 or more")
        self._backbone = backbone
        self.batch_size = int(batch_size)
        self.queue_windows = queue_windows or 2 * self.batch_size + 2
        self.limit_blas = limit_blas
        self._check_head(head)
        self._head = head
        self._pending_head: HeadRunner | None = None
        self._swap_lock = threading.Lock()
        self.windows_scored = 0
        self.batches_scored = 0

    @property
    def head(self) -> HeadRunner:
        """The head that scores the next batch (a pending swap is not applied yet)."""
        return self._head

    def swap_head(self, new_head: HeadRunner) -> None:
        """Schedule ``new_head`` for the next batch; callable from any thread.

        The head must be fully loaded when it is passed in. The batch in
        progress finishes with the old head, and only the pipeline thread
        calls the new one. A later swap before the next batch replaces an
        earlier one that was not applied yet.

        Raises:
            ValueError: the head lacks ``labels``, ``version`` or ``logits``,
                or expects another embedding size than the backbone's.
        """
        self._check_head(new_head)
        with self._swap_lock:
            replaced = self._pending_head
            self._pending_head = new_head
        if replaced is not None:
            _LOGGER.info(
                "head version %s replaced by version %s before it was applied",
                replaced.version, new_head.version,
            )

    def run(self, windows: Iterable[Window]) -> Iterator[ScoredBatch]:
        """Score ``windows`` batch by batch.

        The source is iterated in a reader thread. An error raised by the
        source is re-raised here after the windows read before it are
        scored. Closing the generator early stops the reader thread after
        the window it is reading, and closes the source's iterator.
        """
        if self.limit_blas:
            limit_blas_threads()
        windows_queue: queue.Queue[Window | _EndOfSource] = queue.Queue(maxsize=self.queue_windows)
        stop = threading.Event()
        reader = threading.Thread(
            target=_read_windows,
            args=(windows, windows_queue, stop),
            name="dawnchorus-window-reader",
            daemon=True,
        )
        reader.start()

        try:
            end: _EndOfSource | None = None
            while end is None:
                batch: list[Window] = []
                while len(batch) < self.batch_size:
                    item = windows_queue.get()
                    if isinstance(item, _EndOfSource):
                        end = item
                        break
                    batch.append(item)
                if batch:
                    yield self._score(batch)
            if end.error is not None:
                raise end.error
        finally:
            stop.set()
            _drain(windows_queue)
            reader.join(timeout=_READER_JOIN_TIMEOUT_S)
            if reader.is_alive():
                _LOGGER.warning(
                    "the window reader thread did not stop within %.0f s", _READER_JOIN_TIMEOUT_S
                )

    def _score(self, batch: list[Window]) -> ScoredBatch:
        self.apply_pending_head()
        head = self._head

        samples = np.stack([window.samples for window in batch])
        embeddings = self._backbone.embed(samples)
        logits = np.asarray(head.logits(embeddings), dtype=np.float32)

        self.windows_scored += len(batch)
        self.batches_scored += 1
        return ScoredBatch(windows=batch, embeddings=embeddings, logits=logits, head=head)

    def apply_pending_head(self) -> None:
        """Apply a scheduled swap now; only the thread that iterates ``run`` may call it, between batches."""
        with self._swap_lock:
            new_head, self._pending_head = self._pending_head, None
        if new_head is None:
            return
        old_head, self._head = self._head, new_head
        _LOGGER.info(
            "head swapped from version %s (%d classes) to version %s (%d classes) after %d windows",
            old_head.version, len(old_head.labels), new_head.version, len(new_head.labels),
            self.windows_scored,
        )

    def _check_head(self, head: HeadRunner) -> None:
        missing = [name for name in ("labels", "version", "logits") if not hasattr(head, name)]
        if missing:
            raise ValueError(f"{type(head).__name__} is not a head: it has no {', '.join(missing)}")
        expected = getattr(self._backbone, "embedding_dim", None)
        actual = _head_input_dim(head)
        if expected is not None and actual is not None and actual != expected:
            raise ValueError(
                f"head version {head.version} takes {actual}-d embeddings but the backbone "
                f"produces {expected}-d ones: export the head for this backbone"
            )


def _read_windows(
    windows: Iterable[Window], windows_queue: queue.Queue, stop: threading.Event
) -> None:
    """Reader thread: move windows from the source into the queue until the end or ``stop``."""
    iterator = iter(windows)
    end = _EndOfSource()
    try:
        for window in iterator:
            if not _put(windows_queue, window, stop):
                return
    except Exception as error:  # handed to the pipeline thread, which re-raises it
        _LOGGER.error("window source failed: %s", error)
        end = _EndOfSource(error)
    finally:
        # Closing the source's generator here, in the thread that runs it,
        # releases its file or sound device as soon as the pipeline stops.
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    _put(windows_queue, end, stop)


def _put(windows_queue: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put ``item``, waiting for room; return False if the pipeline stopped first."""
    while not stop.is_set():
        try:
            windows_queue.put(item, timeout=_PUT_TIMEOUT_S)
            return True
        except queue.Full:
            continue
    return False


def _drain(windows_queue: queue.Queue) -> None:
    while True:
        try:
            windows_queue.get_nowait()
        except queue.Empty:
            return
