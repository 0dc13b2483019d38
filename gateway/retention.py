"""Retention: what the journal keeps, and for how long. Run once at start, then daily.

* Routine device traffic (check-ins, batteries) older than
  ``gateway.retain_device_messages_days`` is deleted, unless it belongs to an open alarm.
* Resolved alarms older than ``retention.alarms_years`` are deleted with their log, SMS
  records, device messages and keep-open flag. An open alarm is never deleted.
* SMS records older than ``retention.sms_personal_data_days`` lose their personal data:
  the phone number is kept masked (``+86138****5678``, as in the logs), the name and the
  text are emptied; role, kind, wave, state, sid, attempts and latency stay, so the daily
  figures and the record of who was told when survive.

Every step runs in batches of ``retention.batch_rows`` through the journal's writer, one
job per batch: a press queued meanwhile waits for one batch at most (it shares that
batch's commit). There is no VACUUM: it would rewrite the whole file under the writer's
lock and need as much free space again; deleted pages are reused by new rows instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from gateway.config import RetentionSection
from gateway.journal import Journal, JournalError

log = structlog.get_logger(__name__)

DAY_S = 86400.0
YEAR_S = 365.25 * DAY_S


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one retention run removed (None: that step failed, see the log)."""

    device_messages: int | None
    sms_redacted: int | None
    alarms: int | None
    alarm_rows: int | None  # log lines, SMS records, device messages of those alarms


async def prune_once(journal: Journal, keep_device_days: float,
                     retention: RetentionSection, now: float) -> Pruned:
    """One retention run at ``now``; each step goes on even if another one failed."""
    batch = retention.batch_rows
    device: int | None = None
    redacted: int | None = None
    alarms: int | None = None
    rows: int | None = None
    try:
        device = await journal.prune(now - keep_device_days * DAY_S, batch=batch)
    except JournalError as exc:
        log.error("journal.prune_failed", what="device messages", error=str(exc))
    try:
        alarms = rows = 0
        cutoff = now - retention.alarms_years * YEAR_S
        while True:
            n, r = await journal.delete_old_alarms(cutoff, batch)
            if not n:
                break
            alarms += n
            rows += r
    except JournalError as exc:
        log.error("journal.prune_failed", what="old alarms", error=str(exc), done=alarms)
        alarms = rows = None
    try:
        redacted = 0
        cutoff = now - retention.sms_personal_data_days * DAY_S
        while n := await journal.redact_notifications(cutoff, batch):
            redacted += n
    except JournalError as exc:
        log.error("journal.prune_failed", what="sms personal data", error=str(exc),
                  done=redacted)
        redacted = None
    return Pruned(device, redacted, alarms, rows)


async def prune_daily(journal: Journal, keep_device_days: float,
                      retention: RetentionSection, *,
                      clock: Callable[[], float] = time.time,
                      sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """:func:`prune_once` now and then once a day."""
    while True:
        done = await prune_once(journal, keep_device_days, retention, clock())
        log.info("journal.pruned", device_messages=done.device_messages,
                 sms_redacted=done.sms_redacted, alarms=done.alarms,
                 alarm_rows=done.alarm_rows)
        await sleep(DAY_S)
