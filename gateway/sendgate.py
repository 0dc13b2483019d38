"""Who sends next: Twilio requests handed out by priority, within the account's limits.

A Twilio account (and each sender number) accepts a limited rate of messages; past it,
Twilio answers 429 / 20429 and queues or refuses. In a storm the gateway has more
messages than it may send at once, and which go first matters: the first wave of a new
alarm (family and the nearest staff) before a later wave, a later wave before the
supervisors, and all of them before a "taken by" or "cancelled" message, which only
closes the loop for people already on their way.

:class:`SendGate` is a counting gate (at most ``concurrency`` requests in flight, the
``[sms] concurrency`` of old) that also starts at most ``rate_per_s`` requests per second
(a token bucket with one second of burst; ``None``: no rate limit), and hands each free
slot to the waiting request with the lowest priority number, then the oldest. A retry
after a 429 goes back through the gate at its own priority, so a new alarm's first SMS
overtakes a backlog of retries instead of queueing behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

#: Priorities (lower first); see gateway.notifier.priority_of.
FIRST_WAVE: Final = 0
LATER_WAVE: Final = 1
SUPERVISOR: Final = 2
FOLLOW_UP: Final = 3  # taken by / cancelled / fallback resends
BACKGROUND: Final = 4  # reconciliation after a restart


class SendGate:
    def __init__(self, concurrency: int, rate_per_s: float | None = None, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if rate_per_s is not None and not rate_per_s > 0:
            raise ValueError("rate_per_s must be positive")
        self._free = concurrency
        self._rate = rate_per_s
        self._burst = max(1.0, rate_per_s or 0.0)
        self._tokens = self._burst
        self._monotonic = monotonic
        self._filled_at = monotonic()
        self._waiting: list[tuple[int, int, bool, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self.granted = 0

    @property
    def waiting(self) -> int:
        return sum(1 for *_, fut in self._waiting if not fut.done())

    @contextlib.asynccontextmanager
    async def slot(self, priority: int, *, rated: bool = True) -> AsyncIterator[None]:
        """Hold one request slot for the block (waits for its turn). ``rated``: the
        request sends a message, so it counts against ``rate_per_s`` (status fetches,
        listings and calls share the concurrency only)."""
        await self._acquire(priority, rated)
        try:
            yield
        finally:
            self._free += 1
            self._grant()

    async def _acquire(self, priority: int, rated: bool) -> None:
        if not self._waiting and self._free > 0 and (not rated or self._take_token()):
            self._free -= 1
            self.granted += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._order), rated, fut))
        self._grant()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted as it was cancelled: give back
                self._free += 1
                self._grant()
            raise

    def _grant(self) -> None:
        waiting = self._waiting
        while waiting and self._free > 0:
            _, _, rated, fut = waiting[0]
            if fut.done():  # cancelled while waiting
                heapq.heappop(waiting)
                continue
            if rated and not self._take_token():
                self._wake_later()
                return
            heapq.heappop(waiting)
            self._free -= 1
            self.granted += 1
            fut.set_result(None)

    def _take_token(self) -> bool:
        if self._rate is None:
            return True
        now = self._monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._filled_at) * self._rate)
        self._filled_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _wake_later(self) -> None:
        if self._timer is not None or self._rate is None:
            return
        delay = (1.0 - self._tokens) / self._rate

        def wake() -> None:
            self._timer = None
            self._grant()

        self._timer = asyncio.get_running_loop().call_later(max(delay, 0.001), wake)
