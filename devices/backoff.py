"""Capped exponential backoff with full jitter, for reconnect loops.

Full jitter (a uniform draw in [0, min(cap, base * 2**n)]) spreads the reconnects
of many gateways or devices after a shared outage (AWS architecture blog,
"Exponential Backoff And Jitter"). A successful connection calls ``reset``.
"""

from __future__ import annotations

import random


def full_jitter(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """The delay before retry number ``attempt`` (1-based): uniform in [0, capped ceiling]."""
    ceiling = min(max_s, initial_s * (2 ** min(attempt - 1, 30)))
    return rng.uniform(0.0, ceiling)


class Backoff:
    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError("need 0 < initial_s <= max_s")
        self.initial_s = initial_s
        self.max_s = max_s
        self._rng = rng or random.Random()
        self.failures = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; grows with each call until ``reset``."""
        self.failures += 1
        # Never below a tenth of the initial delay: a tight loop would spin the CPU.
        return max(self.initial_s / 10,
                   full_jitter(self.failures, self.initial_s, self.max_s, self._rng))

    def reset(self) -> None:
        self.failures = 0
