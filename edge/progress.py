"""Progress bars for long command-line jobs (``analyze`` on folders, ``bench build`` and ``bench run``).

Bars go to stderr and only to a terminal, so logs, pipes and CI output stay
clean. tqdm is part of the edge extra. On a system without it, jobs run
without a bar.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable


class _NoBar:
    """Stands in for a tqdm bar that is turned off."""

    def __init__(self, iterable: Iterable | None = None):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable or ())

    def update(self, count: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        pass


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, unit: str = "it",
                 description: str | None = None, enabled: bool = True):
    """Return a tqdm bar on stderr, or an object with the same methods that shows nothing.

    The bar is shown only if ``enabled``, stderr is a terminal and tqdm is installed.
    """
    if not enabled or not sys.stderr.isatty():
        return _NoBar(iterable)
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar(iterable)
    return tqdm(iterable, total=total, unit=unit, desc=description, file=sys.stderr)


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--no-progress`` (alias ``--quiet``), which sets ``progress`` to False."""
    parser.add_argument("--no-progress", "--quiet", dest="progress", action="store_false",
                        help="show no progress bar (none is shown anyway when stderr is not a terminal)")
