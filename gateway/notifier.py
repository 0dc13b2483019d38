"""The notifier: one journaled message, from its planned row to accepted or failed.

Theory of operation
-------------------
:meth:`Notifier.deliver` runs the chain for one message:

1. **Twilio**, through the sender's own retries (``sms.max_attempts`` per round);
2. on a retryable failure, the **GSM fallback** when one is configured;
3. otherwise **retry later**: the row stays ``sending`` and another round starts after
   ``sms.retry_later_s``, until ``sms.give_up_after_s`` after the press;
4. **failed**: refused for good (21211 invalid number, 21610 unsubscribed...) or given
   up; the operator gets a notice naming the person to phone.

Whatever the channel, an accepted message is written once, by :meth:`_accepted`.

A Twilio outage is one condition, not one per message: the first round that fails
retryably raises one ``sms.outage`` notice, the rounds after it log ``sms.retry``, and
the first message Twilio accepts again raises ``sms.outage.over``.

**Reconciliation.** Rows a crash left ``sending`` may have reached Twilio. They are not
reconciled by the alarms that own them but queued in the :class:`Backlog`, which a few
workers drain at low priority: one lookup per row (``find_sent``), then a resend when
Twilio has no such message. A worker waits (a bounded while) for the SMS of new alarms to
leave first, and never holds more than one request at a time, so a backlog of thousands
of rows costs a bounded number of requests in flight and never delays a new alarm's
first wave; rows are marked as they are done, so the next restart after a crash starts
where this one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import structlog

from gateway.config import SmsSection
from gateway.journal import (
    Journal,
    JournalError,
    MessageKind,
    NotificationPlan,
    NotificationRecord,
)
from gateway.lifecycle import (
    UNFINISHED_NOTIFICATION_STATES,
    IllegalNotificationTransition,
    NotificationState,
)
from gateway.metrics import Metrics
from gateway.notices import Notice
from gateway.redact import mask_phone
from gateway.sendgate import BACKGROUND, FIRST_WAVE, FOLLOW_UP, LATER_WAVE, SUPERVISOR
from gateway.sms import Attempt, SendResult, SmsSendError

__all__ = [
    "Backlog",
    "Finder",
    "Notifier",
    "Origin",
    "Outcome",
    "Sender",
    "TwilioLike",
]

log = structlog.get_logger(__name__)

Outcome = Literal["accepted", "failed"]
Channel = Literal["twilio", "fallback"]

#: How long a reconciliation worker lets the SMS of new alarms go first before it takes
#: its next row anyway (real time: a storm of new alarms must not starve the backlog).
MAX_YIELD_S = 1.0
#: Slack before a row's creation time when asking Twilio for it (its clock is not ours).
RECONCILE_SLACK = timedelta(minutes=5)


class Sender(Protocol):
    async def send(
        self, to: str, body: str, *,
        on_attempt: Callable[[Attempt], Awaitable[None]] | None = None,
    ) -> SendResult: ...


class Finder(Protocol):
    async def find_sent(self, to: str, *, since: datetime,
                        marker: str) -> list[tuple[str, str]]: ...


class TwilioLike(Finder, Protocol):
    async def send(
        self, to: str, body: str, *,
        on_attempt: Callable[[Attempt], Awaitable[None]] | None = None,
        priority: int = FIRST_WAVE,
    ) -> SendResult: ...


def priority_of(rec: NotificationRecord, *, background: bool = False) -> int:
    """Where a message stands when Twilio requests queue (:mod:`gateway.sendgate`): a
    new alarm's first wave, then later waves, the supervisors, the follow-ups ("taken
    by", "cancelled"), and reconciliation after a restart last."""
    if background:
        return BACKGROUND
    if rec.kind is not MessageKind.ESCALATION:
        return FOLLOW_UP
    if rec.role == "supervisor":
        return SUPERVISOR
    return FIRST_WAVE if rec.wave == 1 else LATER_WAVE


class Origin(Protocol):
    """The alarm a message belongs to, as the notifier needs it (an ActiveAlarm)."""

    alarm_id: str
    received_at: float  # wall clock: the give-up deadline counts from the press
    t0: float  # monotonic at receipt: latencies
    waited_s: float  # before receipt: at the device, its bridge and the broker
    sent: int
    failed: int


class _Outage:
    """One Twilio outage at a time: a notice when it starts and one when it is over."""

    def __init__(self, notify: Callable[[Notice], None], clock: Callable[[], float]) -> None:
        self._notify = notify
        self._clock = clock
        self.since: float | None = None
        self.delayed = 0  # rounds that failed during this outage
        self._over_at: float | None = None  # when the last outage was seen to be over

    def failed(self, exc: SmsSendError | None, error: str, *, started: float) -> None:
        """A round of attempts that began at ``started`` failed retryably."""
        self.delayed += 1
        if self.since is not None:
            return
        if self._over_at is not None and started < self._over_at:
            # A straggler: its round began before Twilio was seen to accept again, so
            # it belongs to the outage already reported over, not to a new one.
            return
        self.since = self._clock()
        log.warning("sms.outage", status=exc.status if exc else None,
                    code=exc.code if exc else None, error=error)
        self._notify(Notice(
            "sms.outage", "twilio",
            "短信服务（Twilio）暂时不可用：报警短信会持续重试，恢复后自动发出；"
            "在此之前请电话联系家属和网格员", self._clock()))

    def recovered(self) -> None:
        if self.since is None:
            return
        lasted = round(self._clock() - self.since, 1)
        log.info("sms.outage_over", lasted_s=lasted, delayed_rounds=self.delayed)
        self._notify(Notice(
            "sms.outage.over", "twilio",
            f"短信服务（Twilio）已恢复（中断约 {lasted:.0f} 秒），延迟的短信正在发出",
            self._clock(), "info"))
        self.since = None
        self.delayed = 0
        self._over_at = self._clock()


class Notifier:
    """Delivers journaled messages: Twilio, retry later, GSM fallback, failed."""

    def __init__(
        self,
        *,
        journal: Journal,
        sender: TwilioLike,
        sms: SmsSection,
        metrics: Metrics,
        fallback: Sender | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_notice: Callable[[Notice], None] | None = None,
        on_unjournaled: Callable[[NotificationRecord], None] | None = None,
    ) -> None:
        """``on_unjournaled`` hears of every outcome of a message the journal has no row
        for (planned from memory on a full disk), so that it can be journaled later."""
        self._journal = journal
        self._on_unjournaled = on_unjournaled
        self._sender = sender
        self._fallback = fallback
        self._sms = sms
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._on_notice = on_notice
        self._outage = _Outage(self._notify, clock)
        # Sends for new work (not reconciliation) inside a Twilio request right now: the
        # backlog waits for none to be left before its next row.
        self._foreground = 0
        self._no_foreground = asyncio.Event()
        self._no_foreground.set()

    @property
    def twilio_down(self) -> bool:
        """True from a failed round until Twilio accepts a message again."""
        return self._outage.since is not None

    @property
    def has_fallback(self) -> bool:
        return self._fallback is not None

    # -- the chain -------------------------------------------------------------------

    async def deliver(self, origin: Origin, rec: NotificationRecord, *,
                      background: bool = False) -> Outcome:
        """Send ``rec`` until it is accepted (by Twilio or the fallback) or failed.

        Never raises for a send that did not work (that is the ``failed`` outcome);
        ``background`` sends (reconciliation) leave Twilio to new alarms first."""
        bound = _bind(rec)
        sms = self._sms
        while True:
            started = self._clock()
            try:
                result = await self._twilio(origin, rec, background=background)
            except SmsSendError as exc:
                if exc.permanent:
                    await self._failed(origin, rec, exc, bound)
                    return "failed"
                self._outage.failed(exc, str(exc), started=started)
                if self._fallback is not None:
                    via = await self._via_fallback(rec, bound, str(exc))
                    if via is not None:
                        await self._accepted(origin, rec, via, bound, channel="fallback")
                        return "accepted"
                deadline = origin.received_at + sms.give_up_after_s
                if self._clock() + sms.retry_later_s > deadline:
                    await self._failed(origin, rec, exc, bound)
                    return "failed"
                # The row stays 'sending' (a restart reconciles it); the outage notice
                # told the operator; each round is a retry, not a failure.
                bound.info("sms.retry", error=str(exc), code=exc.code,
                           retry_in_s=sms.retry_later_s)
                await self._sleep(sms.retry_later_s)
                continue
            self._outage.recovered()
            await self._accepted(origin, rec, result, bound, channel="twilio")
            return "accepted"

    async def deliver_by_fallback(self, origin: Origin, undelivered: NotificationRecord,
                                  why: str) -> Outcome | None:
        """Resend an escalation message the carrier could not deliver through the GSM
        modem, as a row of its own (kind ``fallback``). None: no fallback configured,
        or this message was already resent."""
        if self._fallback is None:
            return None
        plan = NotificationPlan(undelivered.role, undelivered.name, undelivered.phone,
                                undelivered.body)
        try:
            rows = await self._journal.plan_notifications(
                origin.alarm_id, None, [plan], kind=MessageKind.FALLBACK)
        except JournalError as exc:
            self._journal_failed(exc, "fallback plan")
            rows = [memory_record(origin.alarm_id, MessageKind.FALLBACK, None, plan, -1,
                                  self._clock())]
        rec = next((r for r in rows if r.phone == plan.phone), None)
        if rec is None or rec.state not in UNFINISHED_NOTIFICATION_STATES:
            return None  # a repeated carrier report: resent already
        bound = _bind(rec)
        result = await self._via_fallback(rec, bound, why)
        if result is None:
            await self._failed(origin, rec, SmsSendError("fallback failed"), bound)
            return "failed"
        await self._accepted(origin, rec, result, bound, channel="fallback")
        return "accepted"

    async def reconcile(self, origin: Origin, rec: NotificationRecord,
                        claimed: set[str]) -> Outcome:
        """A row whose send may have reached Twilio: look once, resend if not found.

        ``claimed`` holds the sids already matched to rows of this alarm, so two rows
        to one phone (a wave and a follow-up) are not matched to the same message."""
        bound = _bind(rec)
        since = datetime.fromtimestamp(rec.created_at, UTC) - RECONCILE_SLACK
        started = self._clock()
        try:
            async with self._in_twilio(background=True):
                found = await self._sender.find_sent(rec.phone, since=since,
                                                     marker=origin.alarm_id)
        except (SmsSendError, TimeoutError, OSError) as exc:
            # For an alarm, one duplicate SMS is better than one missing SMS.
            bound.warning("sms.reconcile_failed", error=str(exc), action="resend")
            if isinstance(exc, SmsSendError) and not exc.permanent:
                self._outage.failed(exc, str(exc), started=started)
            return await self.deliver(origin, rec, background=True)
        match = next(((sid, status) for sid, status in found if sid not in claimed), None)
        if match is None:
            bound.info("sms.reconciled", found=False, action="resend")
            return await self.deliver(origin, rec, background=True)
        sid, status = match
        claimed.add(sid)
        bound.info("sms.reconciled", found=True, sid=sid, status=status)
        await self._accepted(origin, rec, SendResult(sid, status, 0, rec.attempts, None),
                             bound, channel="twilio", reconciled=True)
        return "accepted"

    # -- priority --------------------------------------------------------------------

    async def yield_to_foreground(self, max_wait_s: float = MAX_YIELD_S) -> None:
        """Wait until no new alarm's SMS is inside a Twilio request (at most
        ``max_wait_s`` of real time, so that a storm cannot starve the backlog)."""
        if self._no_foreground.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait_s):
                await self._no_foreground.wait()

    @contextlib.asynccontextmanager
    async def _in_twilio(self, *, background: bool) -> AsyncIterator[None]:
        if background:
            yield
            return
        self._foreground += 1
        self._no_foreground.clear()
        try:
            yield
        finally:
            self._foreground -= 1
            if self._foreground == 0:
                self._no_foreground.set()

    # -- steps -------------------------------------------------------------------------

    async def _twilio(self, origin: Origin, rec: NotificationRecord, *,
                      background: bool) -> SendResult:
        async def on_attempt(a: Attempt) -> None:
            # (The sender logs each attempt.) An accepted attempt is journaled once, with
            # the accepted update: two commits less in front of the next SMS.
            if rec.id > 0 and a.outcome != "accepted":
                await self._quietly(self._journal.log_event(
                    origin.alarm_id, "sms.attempt",
                    {"notification_id": rec.id, "attempt": a.number, "outcome": a.outcome,
                     "status": a.status, "code": a.code}))
                await self._quietly(self._journal.update_notification(
                    rec.id, NotificationState.SENDING, attempts=a.number))

        async with self._in_twilio(background=background):
            return await self._sender.send(rec.phone, rec.body, on_attempt=on_attempt,
                                           priority=priority_of(rec, background=background))

    async def _via_fallback(self, rec: NotificationRecord, bound: Any,
                            why: str) -> SendResult | None:
        if self._fallback is None:
            return None
        bound.warning("sms.fallback_used", reason=why)
        try:
            return await self._fallback.send(rec.phone, rec.body)
        except SmsSendError as exc:
            bound.error("sms.fallback_failed", error=str(exc))
            return None

    async def _accepted(self, origin: Origin, rec: NotificationRecord, result: SendResult,
                        bound: Any, *, channel: Channel, reconciled: bool = False) -> None:
        """The one place an accepted message is counted, logged and journaled."""
        latency = _since(self._monotonic, origin)
        origin.sent += 1
        self._metrics.sms_sent.labels(rec.role).inc()
        first_wave = rec.kind is MessageKind.ESCALATION and rec.wave == 1 and not reconciled
        budget = self._sms.budget_ms
        if not reconciled:
            # latency_ms counts from the press (the first wave's budget); wave_latency_ms
            # from this message's own wave (a later wave or a "taken by" waits on purpose).
            bound.info("sms.sent", sid=result.sid, attempts=result.attempts, channel=channel,
                       segments=result.num_segments, latency_ms=latency, budget_ms=budget,
                       wave_latency_ms=self._wave_latency(rec))
        if first_wave:  # the budget is for the first wave; later waves wait on purpose
            self._metrics.sms_latency.observe(latency - origin.waited_s * 1000)
            self._metrics.press_to_sms.observe(latency)
            if latency > budget:
                self._metrics.sms_budget_breaches.inc()
                bound.warning("sms.budget_exceeded", latency_ms=latency, budget_ms=budget)
        # A message the journal has no row for, or whose row it cannot update now (a
        # full disk): handed on, to be journaled once it can write, so that a restart
        # knows it left (its sid) instead of texting the same person again.
        unjournaled = replace(rec, state=NotificationState.ACCEPTED, sid=result.sid,
                              attempts=result.attempts, latency_ms=latency)
        if rec.id <= 0:
            self._unjournaled(unjournaled)
            return
        event = {"notification_id": rec.id, "sid": result.sid, "attempts": result.attempts,
                 "channel": channel}
        if reconciled:
            event["reconciled"] = True
        if not await self._quietly(self._journal.update_notification(
                rec.id, NotificationState.ACCEPTED, sid=result.sid, attempts=result.attempts,
                latency_ms=None if reconciled else latency, event=("sms.accepted", event))):
            self._unjournaled(unjournaled)

    def _wave_latency(self, rec: NotificationRecord) -> float:
        """Since the message's wave began: its row is planned (``created_at``) then."""
        return round(max(0.0, self._clock() - rec.created_at) * 1000, 2)

    async def _failed(self, origin: Origin, rec: NotificationRecord, exc: SmsSendError,
                      bound: Any) -> None:
        origin.failed += 1
        reason = "permanent" if exc.permanent else "gave_up"
        self._metrics.sms_failed.labels(rec.role, reason).inc()
        bound.error("sms.failed", status=exc.status, code=exc.code, permanent=exc.permanent,
                    error=str(exc), recipient=rec.name,
                    latency_ms=_since(self._monotonic, origin),
                    wave_latency_ms=self._wave_latency(rec))
        # Per recipient: the operator must phone this person.
        self._notify(Notice(
            "sms.failed", origin.alarm_id,
            f"编号{origin.alarm_id}：短信无法发送给{rec.name}（{mask_phone(rec.phone)}，"
            f"{'号码无效或已退订' if exc.permanent else '多次重试失败'}，代码 {exc.code}），"
            "请电话联系", self._clock()))
        unjournaled = replace(rec, state=NotificationState.FAILED, error_code=exc.code,
                              error=str(exc))
        if rec.id <= 0 or not await self._quietly(self._journal.update_notification(
                rec.id, NotificationState.FAILED, error_code=exc.code, error=str(exc),
                event=("sms.failed", {"notification_id": rec.id, "recipient": rec.name,
                                      "role": rec.role, "code": exc.code,
                                      "permanent": exc.permanent}))):
            self._unjournaled(unjournaled)

    # -- helpers -----------------------------------------------------------------------

    def _unjournaled(self, rec: NotificationRecord) -> None:
        if self._on_unjournaled is not None:
            self._on_unjournaled(rec)

    def _notify(self, notice: Notice) -> None:
        if self._on_notice is None:
            return
        try:
            self._on_notice(notice)
        except Exception:  # a notice must never break sending
            log.exception("notice.failed", kind=notice.kind)

    async def _quietly(self, op: Awaitable[Any]) -> bool:
        """Run a journal write; False when the journal could not take it."""
        try:
            await op
        except IllegalNotificationTransition as exc:
            # E.g. the recipient's reply (acknowledged) overtook the answer to the send:
            # the row keeps the state that happened later.
            log.info("sms.state_kept", notification_id=exc.notification_id,
                     state=exc.current.value, wanted=exc.wanted.value)
        except JournalError as exc:
            self._journal_failed(exc, "notification")
            return False
        return True

    def _journal_failed(self, exc: JournalError, what: str) -> None:
        self._metrics.journal_errors.inc()
        log.critical("journal.write_failed", what=what, error=str(exc))


@dataclass(slots=True)
class _Batch:
    """The rows of one alarm submitted together."""

    left: int
    claimed: set[str]  # sids matched to this alarm's rows
    then: Callable[[], Awaitable[None]] | None


@dataclass(slots=True)
class _Row:
    origin: Origin
    rec: NotificationRecord
    batch: _Batch


class Backlog:
    """Rows a crash left ``sending``, reconciled by ``workers`` tasks at low priority.

    :meth:`run` is owned by the dispatcher's TaskGroup. Submitting never blocks; the
    queue holds small records, not tasks, whatever its length."""

    def __init__(self, notifier: Notifier, *, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError("need at least one reconciliation worker")
        self._notifier = notifier
        self._workers = workers
        self._rows: deque[_Row] = deque()
        self._ready = asyncio.Event()
        self._paused = 0
        self._busy = 0
        self._quiet = asyncio.Event()  # no row in a worker's hands
        self._quiet.set()
        self.done = 0

    @property
    def queued(self) -> int:
        return len(self._rows)

    @property
    def in_flight(self) -> int:
        return self._busy

    def submit(self, origin: Origin, rows: Iterable[NotificationRecord], *,
               claimed: Sequence[str] = (),
               then: Callable[[], Awaitable[None]] | None = None) -> int:
        """Queue the unfinished ``rows`` of ``origin``; returns how many.

        ``claimed``: sids already recorded for the alarm. ``then`` is awaited once the
        last of these rows is done (the alarm's state may move on)."""
        todo = [r for r in rows if r.state in UNFINISHED_NOTIFICATION_STATES]
        if todo:
            batch = _Batch(len(todo), set(claimed), then)
            self._rows.extend(_Row(origin, r, batch) for r in todo)
            self._update()
        return len(todo)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No new row is taken inside this block (rows in a worker's hands go on)."""
        self._paused += 1
        self._update()
        try:
            yield
        finally:
            self._paused -= 1
            self._update()

    async def wait_quiet(self) -> None:
        """Until no row is in a worker's hands."""
        await self._quiet.wait()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for n in range(self._workers):
                tg.create_task(self._worker(), name=f"reconcile-{n}")

    def _update(self) -> None:
        if self._rows and not self._paused:
            self._ready.set()
        else:
            self._ready.clear()

    async def _worker(self) -> None:
        while True:
            await self._ready.wait()
            if not self._rows or self._paused:
                self._update()
                continue
            row = self._rows.popleft()
            self._update()
            self._busy += 1
            self._quiet.clear()
            try:
                structlog.contextvars.bind_contextvars(alarm_id=row.origin.alarm_id)
                await self._notifier.yield_to_foreground()
                await self._notifier.reconcile(row.origin, row.rec, row.batch.claimed)
                row.batch.left -= 1
                if row.batch.left == 0 and row.batch.then is not None:
                    await row.batch.then()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad row must not stop the backlog
                log.exception("sms.reconcile_crashed", notification_id=row.rec.id)
            finally:
                structlog.contextvars.unbind_contextvars("alarm_id")
                self.done += 1
                self._busy -= 1
                if self._busy == 0:
                    self._quiet.set()
            if not self._rows and self._busy == 0:
                log.info("sms.backlog_done", reconciled=self.done)


def memory_record(alarm_id: str, kind: MessageKind, wave: int | None, plan: NotificationPlan,
                  index: int, now: float) -> NotificationRecord:
    """A row the journal could not record: sending matters more than the record of it.

    Its id is negative (``index`` < 0), so nothing is written for it later."""
    return NotificationRecord(
        id=index, alarm_id=alarm_id, kind=kind, wave=wave, role=plan.role, name=plan.name,
        phone=plan.phone, body=plan.body, state=NotificationState.SENDING, sid=None,
        attempts=0, error_code=None, error=None, latency_ms=None, created_at=now)


def _bind(rec: NotificationRecord) -> Any:
    return log.bind(to=mask_phone(rec.phone), role=rec.role, notification_id=rec.id,
                    kind=rec.kind.value, wave=rec.wave)


def _since(monotonic: Callable[[], float], origin: Origin) -> float:
    """Milliseconds since the press: the wait before receipt included."""
    return round((monotonic() - origin.t0 + origin.waited_s) * 1000, 2)
