"""Supervisor digests: in a storm, a supervisor's phone does not get one SMS per alarm.

Supervisors are told of every alarm a wave with ``supervisor = true`` reaches, or at
once when nobody is on duty. In a storm that is one SMS per alarm per supervisor (a
city's 50 supervisors and 10,000 alarms: half a million messages, and a phone nobody
can read). So each supervisor has a budget: at most ``supervisor_digest_after`` SMS
per ``supervisor_digest_s`` (config ``[escalation]``). A supervisor message over the
budget is journaled ``held`` with its alarm's wave instead of being sent; as soon as
the supervisor's budget allows, one **digest** SMS names every alarm held for them
that is still open, newest first ("另有12起紧急呼叫未获接单：…"), and counts against
the budget like any other.

Durability: a held row is journaled in the same commit as the rest of its wave. The
digest is the newest held row itself, whose body becomes the digest text and whose
state goes ``held -> sending`` in the commit that marks the others ``digested``: a
crash after that commit leaves an ordinary ``sending`` row, reconciled with Twilio on
restart like any other; a crash before it leaves the rows held, and the restarted
gateway (:meth:`SupervisorDigest.restore`) rebuilds each supervisor's budget from the
journal and sends the digest. Held rows of alarms that closed before their digest are
``withdrawn``, never sent. A supervisor who replies "<ref> 1" to a digest takes that
alarm (their row of it is a notification like any other); digested supervisors get
no "taken by" follow-up for each alarm: the next digest simply no longer names it.

:class:`Budgets` is the policy, pure (the clock is passed in); :class:`SupervisorDigest`
is the one task that sends the digests, owned by the dispatcher's TaskGroup.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

import structlog

from gateway.aio import first_of
from gateway.config import EscalationSection
from gateway.journal import Journal, JournalError, NotificationPlan, NotificationRecord
from gateway.redact import mask_phone
from gateway.wording import AlarmFacts, Composer

__all__ = ["Budgets", "SupervisorDigest"]

log = structlog.get_logger(__name__)


class Budgets:
    """How many SMS of their own each supervisor phone had in the last ``interval_s``:
    at most ``after``; a phone with messages held waits for its digest."""

    def __init__(self, after: int, interval_s: float) -> None:
        self.after = after
        self.interval_s = interval_s
        self._sent: dict[str, deque[float]] = {}
        self.waiting: set[str] = set()  # phones with held messages

    def _window(self, phone: str, now: float) -> deque[float]:
        sent = self._sent.setdefault(phone, deque())
        while sent and sent[0] <= now - self.interval_s:
            sent.popleft()
        return sent

    def admit(self, phone: str, now: float) -> bool:
        """True: send this supervisor message now (counted). False: hold it."""
        if phone in self.waiting:
            return False
        sent = self._window(phone, now)
        if len(sent) < self.after:
            sent.append(now)
            return True
        self.waiting.add(phone)
        return False

    def sent(self, phone: str, at: float) -> None:
        """A supervisor SMS left at ``at`` (a digest, or one found on restart)."""
        self._window(phone, at).append(at)

    def free_at(self, phone: str, now: float) -> float:
        """When ``phone`` may have its next SMS (``now`` or later)."""
        sent = self._window(phone, now)
        return now if len(sent) < self.after else sent[0] + self.interval_s

    def forget_idle(self, now: float) -> None:
        """Drop phones with nothing in their window (a city's supervisors change)."""
        for phone in [p for p in self._sent if p not in self.waiting
                      and not self._window(p, now)]:
            del self._sent[phone]


class OpenAlarm(Protocol):
    """What a digest needs of an open alarm (the dispatcher's ActiveAlarm)."""

    alarm_id: str
    received_at: float
    t0: float
    waited_s: float
    sent: int
    failed: int


class SupervisorDigest:
    """Splits supervisor messages into sent and held, and sends the digests."""

    def __init__(self, *, journal: Journal, composer: Composer,
                 escalation: EscalationSection,
                 open_alarm: Callable[[str], tuple[OpenAlarm, AlarmFacts] | None],
                 deliver: Callable[[OpenAlarm, NotificationRecord], None],
                 on_digest: Callable[[int], None] = lambda alarms: None,
                 clock: Callable[[], float],
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._journal = journal
        self._composer = composer
        self._open_alarm = open_alarm  # None: closed (acknowledged, cancelled, resolved)
        self._deliver = deliver  # starts the send in a task of the dispatcher's
        self._on_digest = on_digest
        self._clock = clock
        self._sleep = sleep
        self.budgets = Budgets(escalation.supervisor_digest_after,
                               escalation.supervisor_digest_s)
        self._wake = asyncio.Event()

    def split(self, plans: Iterable[NotificationPlan]) -> tuple[list[NotificationPlan],
                                                                list[NotificationPlan]]:
        """A wave's plans: those to send now, and the supervisor messages to hold."""
        now: list[NotificationPlan] = []
        held: list[NotificationPlan] = []
        at = self._clock()
        for p in plans:
            (now if p.role != "supervisor" or self.budgets.admit(p.phone, at)
             else held).append(p)
        return now, held

    def held(self, plans: Sequence[NotificationPlan]) -> None:
        """``plans`` are journaled ``held``: a digest will name them."""
        if plans:
            self.budgets.waiting.update(p.phone for p in plans)
            self._wake.set()

    def send_anyway(self, plans: Sequence[NotificationPlan]) -> None:
        """Held plans the journal could not record go now, one SMS each (sending
        matters more than the budget); they no longer wait for a digest."""
        at = self._clock()
        for p in plans:
            self.budgets.sent(p.phone, at)

    async def restore(self) -> int:
        """After a restart: the budgets from the journal, and the digests still owed."""
        now = self._clock()
        for phone, at in await self._journal.supervisor_sends_since(
                now - self.budgets.interval_s):
            self.budgets.sent(phone, at)
        held = await self._journal.held_notifications()
        self.budgets.waiting.update(r.phone for r in held)
        if held:
            log.info("supervisor.digests_owed", supervisors=len(self.budgets.waiting),
                     held=len(held))
            self._wake.set()
        return len(held)

    async def run(self) -> None:
        """Send each waiting supervisor's digest as soon as their budget allows."""
        while True:
            if not self.budgets.waiting:
                await self._wake.wait()
            self._wake.clear()
            now = self._clock()
            due = min(self.budgets.free_at(p, now) for p in self.budgets.waiting)
            if due > now:
                await self._until(due - now)
                continue
            try:
                await self.send_due()
            except JournalError as exc:
                log.critical("journal.write_failed", what="supervisor digest", error=str(exc))
                await self._until(1.0)  # the rows stay held: tried again

    async def _until(self, delay: float) -> None:
        """Sleep ``delay``, or less if more messages are held meanwhile."""
        await first_of(self._wake.wait(), self._sleep(delay))

    async def send_due(self) -> int:
        """The digests of every supervisor whose budget allows one now; how many."""
        now = self._clock()
        due = {p for p in self.budgets.waiting if self.budgets.free_at(p, now) <= now}
        if not due:
            return 0
        by_phone: dict[str, list[NotificationRecord]] = {}
        for rec in await self._journal.held_notifications():
            if rec.phone in due:
                by_phone.setdefault(rec.phone, []).append(rec)
        sent = 0
        for phone in due:
            rows = by_phone.get(phone, [])
            open_rows = [(r, found) for r in rows
                         if (found := self._open_alarm(r.alarm_id)) is not None]
            still_open = {o.alarm_id for o, _ in open_rows}
            gone = [r.id for r in rows if r.alarm_id not in still_open]
            if not open_rows:
                if gone:
                    await self._journal.withdraw_held(gone)
                self.budgets.waiting.discard(phone)
                continue
            open_rows.sort(key=lambda o: o[0].id, reverse=True)  # newest first
            carrier, (alarm, _) = open_rows[0]
            body = self._composer.digest([facts for _, (_, facts) in open_rows],
                                         self.budgets.interval_s)
            rec = await self._journal.carry_digest(
                carrier.id, body, [r.id for r, _ in open_rows[1:]], gone)
            self.budgets.waiting.discard(phone)
            self.budgets.sent(phone, now)
            self._on_digest(len(open_rows))
            log.warning("supervisor.digest", to=mask_phone(phone), name=carrier.name,
                        alarms=len(open_rows), withdrawn=len(gone), carrier=alarm.alarm_id)
            self._deliver(alarm, rec)
            sent += 1
        self.budgets.forget_idle(now)
        return sent
