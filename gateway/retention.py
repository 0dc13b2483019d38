"""Retention: routine device traffic is pruned daily; alarms and their records stay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from gateway.journal import Journal, JournalError

log = structlog.get_logger(__name__)

DAY_S = 86400.0


async def prune_daily(journal: Journal, keep_days: float, *,
                      clock: Callable[[], float] = time.time) -> None:
    """Delete device messages older than ``keep_days`` now and then once a day."""
    while True:
        try:
            removed = await journal.prune(clock() - keep_days * DAY_S)
        except JournalError as exc:
            log.error("journal.prune_failed", error=str(exc))
        else:
            log.info("journal.pruned", device_messages=removed)
        await asyncio.sleep(DAY_S)
