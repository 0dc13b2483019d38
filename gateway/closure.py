"""Closure: an acknowledged alarm is not open forever.

Once someone has taken an alarm (acknowledged), the alert and the escalation stop, but
the alarm stays open until an operator resolves it, and in practice many are never
resolved. Config ``[lifecycle]`` (:class:`gateway.config.LifecycleSection`) decides:

* ``auto_resolve_after_min``: the gateway resolves it (``by="gateway"``, note
  "auto-resolved N min after acknowledgement") that long after the acknowledgement,
  unless someone asked to keep it open (:meth:`Closure.keep_open`, journaled);
* ``remind_every_min``: until then (and for ever for an alarm kept open), an operator
  notice ``alarm.still_open`` every M minutes.

Everything is computed from the journal (``acknowledged_at``, the keep-open flag, the
last ``alarm.still_open`` notice), never from timers alone, so a restart neither
forgets an alarm nor reminds twice in a row. An alarm acknowledged and then cancelled
by its device counts as acknowledged here (someone took it; it still needs closing);
one cancelled without an acknowledgement is left to the operator on purpose (see
:mod:`gateway.lifecycle`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from gateway.config import LifecycleSection
from gateway.dispatch import Dispatcher
from gateway.journal import AlarmRecord, Journal, JournalError, KeepOpen, UnknownAlarm
from gateway.lifecycle import AlarmState, IllegalTransition
from gateway.notices import NoticeBoard

log = structlog.get_logger(__name__)

STILL_OPEN = "alarm.still_open"
RESOLVED_BY = "gateway"
AUTO_RESOLVED = "auto-resolved"  # how the note of an alarm the gateway closed begins


class AlarmNotOpen(Exception):
    """A keep-open request for an alarm that is already resolved."""

    def __init__(self, alarm_id: str, state: AlarmState) -> None:
        super().__init__(f"alarm {alarm_id} is {state}: nothing to keep open")
        self.alarm_id = alarm_id
        self.state = state


@dataclass(frozen=True, slots=True)
class Pass:
    """What one look at the journal did (tests and the log read it)."""

    resolved: tuple[str, ...] = ()
    reminded: tuple[str, ...] = ()
    kept_open: tuple[str, ...] = ()  # due for auto-resolve, but someone keeps it open
    next_due: float | None = None  # the earliest next action, wall clock


@dataclass
class _Acc:
    resolved: list[str] = field(default_factory=list)
    reminded: list[str] = field(default_factory=list)
    kept_open: list[str] = field(default_factory=list)
    due: list[float] = field(default_factory=list)


def auto_resolve_note(minutes: float) -> str:
    return f"{AUTO_RESOLVED} {minutes:g} min after acknowledgement"


class Closure:
    """Resolves or reminds about acknowledged alarms; owns the keep-open requests."""

    def __init__(
        self,
        *,
        journal: Journal,
        dispatcher: Dispatcher,
        notices: NoticeBoard,
        settings: LifecycleSection,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._journal = journal
        self._dispatcher = dispatcher
        self._notices = notices
        self._settings = settings
        self._clock = clock
        self._sleep = sleep
        # One pass at a time, and never across a keep-open request: an alarm someone
        # keeps open between the pass's read and its resolve must stay open.
        self._lock = asyncio.Lock()
        self._last_reminder: dict[str, float] | None = None  # loaded on the first pass

    # -- operator action -----------------------------------------------------------

    async def keep_open(self, alarm_id: str, by: str, *, keep: bool = True,
                        note: str | None = None) -> AlarmState:
        """``keep``: the gateway must not resolve ``alarm_id`` by itself (reminders go
        on); ``keep=False`` lets it close by itself again. Journaled with ``by``.

        Returns the alarm's state. Raises :class:`gateway.journal.UnknownAlarm`,
        :class:`AlarmNotOpen` for a resolved alarm, JournalError when it cannot be
        journaled (then the request did not happen)."""
        async with self._lock:
            state = await self._journal.set_keep_open(alarm_id, keep, by=by, note=note)
        if state is AlarmState.RESOLVED:
            raise AlarmNotOpen(alarm_id, state)
        log.info("alarm.keep_open" if keep else "alarm.keep_open_ended", alarm_id=alarm_id,
                 by=by)
        return state

    # -- the owner task ------------------------------------------------------------

    async def run(self) -> None:
        """Look at the journal every ``check_every_s`` (sooner when an action is due)."""
        s = self._settings
        if not (s.auto_resolve_after_min or s.remind_every_min):
            log.info("closure.off", reason="lifecycle.auto_resolve_after_min and "
                     "remind_every_min are both 0")
            return
        while True:
            try:
                done = await self.check()
            except JournalError as exc:  # the journal recovers by itself: try again
                log.error("closure.check_failed", error=str(exc))
                done = Pass()
            wait = s.check_every_s
            if done.next_due is not None:
                wait = min(wait, max(0.05, done.next_due - self._clock()))
            await self._sleep(wait)

    async def check(self) -> Pass:
        """One pass: resolve what is due, remind about what is still open."""
        async with self._lock:
            return await self._check()

    async def _check(self) -> Pass:
        s = self._settings
        now = self._clock()
        alarms = await self._journal.acknowledged_alarms()
        if self._last_reminder is None:
            # After a restart the last reminders are the journal's notices.
            self._last_reminder = await self._journal.last_notices(STILL_OPEN) \
                if s.remind_every_min else {}
        acc = _Acc()
        for alarm, kept in alarms:
            if alarm.acknowledged_at is None:
                continue  # the query only returns acknowledged alarms
            if await self._resolve_if_due(alarm, kept, now, acc):
                continue
            if s.remind_every_min:
                self._remind_if_due(alarm, kept, now, acc)
        live = {a.alarm_id for a, _ in alarms}
        for alarm_id in [a for a in self._last_reminder if a not in live]:
            del self._last_reminder[alarm_id]
        return Pass(tuple(acc.resolved), tuple(acc.reminded), tuple(acc.kept_open),
                    min(acc.due) if acc.due else None)

    async def _resolve_if_due(self, alarm: AlarmRecord, kept: KeepOpen | None, now: float,
                              acc: _Acc) -> bool:
        minutes = self._settings.auto_resolve_after_min
        if not minutes or alarm.acknowledged_at is None:
            return False
        due = alarm.acknowledged_at + minutes * 60
        if kept is not None:
            if now >= due:
                acc.kept_open.append(alarm.alarm_id)
            return False
        if now < due:
            acc.due.append(due)
            return False
        try:
            previous = await self._dispatcher.resolve(alarm.alarm_id, auto_resolve_note(minutes),
                                                      by=RESOLVED_BY)
        except (UnknownAlarm, IllegalTransition):
            return True  # deleted or closed meanwhile: nothing left to do
        except JournalError as exc:
            log.error("closure.resolve_failed", alarm_id=alarm.alarm_id, error=str(exc))
            return False  # still open: reminded as usual, tried again next pass
        if previous is not AlarmState.RESOLVED:  # else an operator was a moment faster
            acc.resolved.append(alarm.alarm_id)
            log.info("closure.auto_resolved", alarm_id=alarm.alarm_id, after_min=minutes,
                     acknowledged_by=alarm.acknowledged_by)
        return True

    def _remind_if_due(self, alarm: AlarmRecord, kept: KeepOpen | None, now: float,
                       acc: _Acc) -> None:
        acked = alarm.acknowledged_at
        if acked is None or self._last_reminder is None:
            return
        every_s = self._settings.remind_every_min * 60
        last = max(acked, self._last_reminder.get(alarm.alarm_id, acked))
        if now < last + every_s:
            acc.due.append(last + every_s)
            return
        self._last_reminder[alarm.alarm_id] = now
        acc.due.append(now + every_s)
        acc.reminded.append(alarm.alarm_id)
        open_min = int((now - acked) // 60)
        why = f"（{kept.by}要求保持开启）" if kept is not None else ""
        self._notices.notify(
            STILL_OPEN, alarm.alarm_id,
            f"编号{alarm.alarm_id}：{alarm.acknowledged_by or '有人'}确认已{open_min}分钟，"
            f"报警仍未结案{why}，请处理后结案", "warning")
        log.info("closure.reminded", alarm_id=alarm.alarm_id, open_min=open_min,
                 kept_open=kept is not None)
