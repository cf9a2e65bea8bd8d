"""Reconnect delays: exponential backoff with full jitter and a cap.

paho-mqtt 2.2's own reconnect (``reconnect_delay_set``) doubles a fixed delay
without jitter and resets it on every accepted connection. A fleet that lost
its broker then reconnects in lockstep, and a broker that accepts and drops
connections gets a reconnect every ``min_delay``. The recorder therefore
drives reconnects itself with the delays below.
"""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass
class Backoff:
    """Delays before successive reconnect attempts ("full jitter").

    The delay before attempt n (n = 0 after the first failure) is drawn
    uniformly from [0, min(max_delay_s, min_delay_s * 2**n)]. The attempt
    count goes back to 0 only after ``reset``, which the caller does once a
    connection has stayed up for ``max_delay_s``. A broker that accepts a
    connection and drops it at once therefore does not restart the sequence.

    Attributes:
        min_delay_s: upper bound of the first delay, in seconds.
        max_delay_s: cap on the upper bound, in seconds.
        rng: source of the jitter; pass a seeded ``random.Random`` to get a
            reproducible sequence.
    """

    min_delay_s: float = 1.0
    max_delay_s: float = 60.0
    rng: random.Random = dataclasses.field(default_factory=random.Random, repr=False)
    attempts: int = 0

    def __post_init__(self):
        if not self.min_delay_s > 0:
            raise ValueError(f"minimum reconnect delay {self.min_delay_s} s is invalid: use a value above 0")
        if self.max_delay_s < self.min_delay_s:
            raise ValueError(f"maximum reconnect delay {self.max_delay_s} s is below the minimum "
                             f"{self.min_delay_s} s: raise the maximum")

    def ceiling(self, attempt: int) -> float:
        """Return the upper bound of the delay before attempt ``attempt``, in seconds."""
        # 2**attempt overflows a float past about 1024 attempts, far beyond the cap.
        return min(self.max_delay_s, self.min_delay_s * 2.0 ** min(attempt, 64))

    def next_delay(self) -> float:
        """Draw the delay before the next attempt and count the attempt."""
        delay = self.rng.uniform(0.0, self.ceiling(self.attempts))
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0
