"""A log line per reason per interval, for refusals anybody can provoke.

A listener that answers strangers (the webhook port behind the public proxy, a
control port on the network) refuses them with 401/403; logging every refusal
would let anybody fill the journal and bury the lines that matter. The first
refusal of a kind is logged at once, later ones within ``interval_s`` are only
counted, and the next line that gets through says how many were left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["LogLimiter"]


class LogLimiter:
    """Decides whether a log line for ``key`` may be written now.

    ``allow(key)`` returns ``None`` to suppress, else the number of lines
    suppressed for ``key`` since the last one written (to log with it).
    """

    def __init__(self, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self._interval = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)
