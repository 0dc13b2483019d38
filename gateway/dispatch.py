"""Dispatch: turn a journaled alarm into an alert, a responder search and SMS waves.

Theory of operation
-------------------
One task per open alarm, all owned by the dispatcher's TaskGroup. An alarm task
never lets an exception escape (that would cancel every other alarm): failures
are logged with the alarm id and journaled, and the operator keeps hearing the
alert until someone acknowledges.

An alarm is told in **waves** (config ``[[escalation.waves]]``): wave 1 at once
(family, the nearest on-duty staff), later waves when nobody has acknowledged by
``received_at + after_s`` (more staff, the supervisor, the hospital). Each wave is
journaled (``notifications.wave``) *before* its SMS leave, so after a restart the
waves already sent are known, rows left ``sending`` are reconciled with Twilio
before anything is resent, and the remaining timers are rebuilt from the
journal's ``received_at``.

The first SMS is on the critical path, so nothing slow sits before it: the
responder search is an in-memory index query (microseconds), the alert renders in
a worker thread in parallel, and the wave plan is one group-committed journal write.

Acknowledgement (operator, SMS reply, MQTT), a cancel from the device and
resolution all close the alarm for escalation: the waiting task wakes and ends,
the alert stops, and those already told get a short "taken by ..." or "cancelled"
message. A message that Twilio cannot take (or the carrier reports undelivered)
goes out through the fallback channel (a GSM modem) when one is configured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import structlog

from gateway.alert import AlertPlayer
from gateway.geo import GeoResult, GeoService
from gateway.journal import (
    AlarmRecord,
    Journal,
    JournalError,
    NotificationPlan,
    NotificationRecord,
    NotificationState,
)
from gateway.lifecycle import ALERTING_STATES, AlarmState, IllegalTransition
from gateway.metrics import Metrics
from gateway.model import Elder, FacilityKind, Registry, ResponderRole
from gateway.redact import mask_phone
from gateway.sms import Attempt, SendResult, SmsSendError
from gateway.supervision import Notice
from gateway.wording import AlarmFacts, Composer

log = structlog.get_logger(__name__)

#: Wave numbers of informational messages (not escalation waves).
WAVE_TAKEN = 900
WAVE_CANCELLED = 901
WAVE_FALLBACK = 902


class Sender(Protocol):
    async def send(
        self, to: str, body: str, *,
        on_attempt: Callable[[Attempt], Awaitable[None]] | None = None,
    ) -> SendResult: ...


class Reconciler(Protocol):
    async def find_sent(self, to: str, *, since: datetime,
                        marker: str) -> list[tuple[str, str]]: ...


class TwilioLike(Sender, Reconciler, Protocol):
    pass


@dataclass(frozen=True, slots=True)
class Wave:
    """Who is told, and when (seconds after the press) if nobody has acknowledged."""

    after_s: float = 0.0
    family: bool = False
    staff: int = 0  # the next N nearest on-duty staff not told yet
    supervisor: bool = False
    clinic: bool = False
    hospital: bool = False


DEFAULT_WAVES = (
    Wave(0, family=True, staff=2),
    Wave(120, staff=3, supervisor=True),
    Wave(300, hospital=True),
)


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    waves: tuple[Wave, ...] = DEFAULT_WAVES
    responders_k: int = 3
    budget_ms: float = 2000.0
    map_url_template: str | None = None  # e.g. "https://uri.amap.com/marker?position={lon},{lat}"
    exclude_busy: bool = True  # skip staff already sent to another open alarm
    retry_later_s: float = 30.0  # Twilio down, no fallback: pause between rounds of retries
    give_up_after_s: float = 1800.0  # ...until this long after the press

    @property
    def staff_needed(self) -> int:
        return max(self.responders_k, sum(w.staff for w in self.waves))


@dataclass(slots=True)
class ActiveAlarm:
    """In-memory companion of an open alarm (the journal row is the truth)."""

    alarm_id: str
    device_id: str
    elder: Elder | None  # None: unregistered device
    address_text: str  # what the operator hears for an unknown device
    received_at: float  # wall clock
    t0: float  # monotonic at receipt (or reconstructed on resume)
    durable: bool = True
    task: asyncio.Task[None] | None = None
    geo: GeoResult | None = None
    sent: int = 0
    failed: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # acked/cancelled/resolved
    hurry: asyncio.Event = field(default_factory=asyncio.Event)  # a decline: next wave now
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # no wave being sent
    holds: tuple[str, ...] = ()  # responders this open alarm keeps busy (exclude_busy)


ReplyIntent = Literal["ack", "decline", "unknown"]


class Dispatcher:
    """Owns one task per open alarm and the operator actions on them."""

    def __init__(
        self,
        *,
        journal: Journal,
        registry: Callable[[], Registry],
        geo: Callable[[], GeoService],
        player: AlertPlayer,
        sender: TwilioLike,
        settings: DispatchSettings,
        metrics: Metrics,
        composer: Composer | None = None,
        fallback: Sender | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_state: Callable[[str, str, dict[str, Any]], None] | None = None,
        on_notice: Callable[[Notice], Awaitable[None]] | None = None,
    ) -> None:
        self._on_notice = on_notice
        self._journal = journal
        self._registry = registry
        self._geo = geo
        self._player = player
        self._sender = sender
        self._fallback = fallback
        self._settings = settings
        self._metrics = metrics
        self._composer = composer or Composer()
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._on_state = on_state
        self._tg: asyncio.TaskGroup | None = None
        self._alert_starts: set[asyncio.Task[None]] = set()
        self.active: dict[str, ActiveAlarm] = {}
        # Responder id -> number of open, unacknowledged alarms whose first wave holds
        # them: kept up to date as alarms are located and closed, so that a new alarm
        # does not scan every open one (1,000 open alarms in a storm).
        self._busy: dict[str, int] = {}

    async def __aenter__(self) -> Dispatcher:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        tg, self._tg = self._tg, None
        # After a storm, alert renders queue two at a time (~30 ms each) and would hold
        # shutdown long past its deadline. A stopping gateway plays nothing, and the next
        # start resumes the alert of every open alarm from the journal.
        for task in self._alert_starts:
            task.cancel()
        if tg is not None:
            await tg.__aexit__(*exc_info)

    # -- starting work ------------------------------------------------------------

    def start(self, alarm: ActiveAlarm, *, resume: AlarmRecord | None = None) -> None:
        """Begin dispatching ``alarm`` in its own task."""
        if self._tg is None:
            raise RuntimeError("dispatcher is not running")
        self.active[alarm.alarm_id] = alarm
        self._metrics.open_alarms.set(len(self.active))
        if resume is None:
            self._announce(alarm.alarm_id, AlarmState.JOURNALED)
        elif resume.state not in ALERTING_STATES:
            alarm.closed.set()
        alarm.task = self._tg.create_task(self._guarded(alarm, resume),
                                          name=f"alarm-{alarm.alarm_id}")

    async def resume_from_journal(self) -> int:
        """Restart-safety: pick up every open alarm the journal knows about."""
        resumed = 0
        reg = self._registry()
        for rec in await self._journal.open_alarms():
            device = reg.devices.get(rec.device_id)
            elder = reg.elders.get(rec.elder_id) if device else None
            age = max(0.0, self._clock() - rec.received_at)
            alarm = ActiveAlarm(
                alarm_id=rec.alarm_id, device_id=rec.device_id, elder=elder,
                address_text=rec.device_id, received_at=rec.received_at,
                t0=self._monotonic() - age,
            )
            log.info("alarm.resumed", alarm_id=rec.alarm_id, device_id=rec.device_id,
                     state=rec.state.value, age_s=round(age, 1))
            self.start(alarm, resume=rec)
            resumed += 1
        return resumed

    async def _guarded(self, alarm: ActiveAlarm, resume: AlarmRecord | None) -> None:
        structlog.contextvars.bind_contextvars(alarm_id=alarm.alarm_id,
                                               device_id=alarm.device_id)
        try:
            await self._run(alarm, resume)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("alarm.dispatch_failed")
            await self._journal_quietly(self._journal.log_event(
                alarm.alarm_id, "dispatch.failed", {"error": "see logs"}))
        finally:
            alarm.idle.set()

    # -- the pipeline for one alarm ----------------------------------------------

    async def _run(self, alarm: ActiveAlarm, resume: AlarmRecord | None) -> None:
        state = resume.state if resume else AlarmState.JOURNALED
        if state in ALERTING_STATES:
            await self._start_alert(alarm)
        if alarm.elder is None:
            log.error("alarm.unregistered_device", address=alarm.address_text)
            return
        elder = alarm.elder
        geo = self._locate(alarm, elder)
        facts = AlarmFacts(
            ref=alarm.alarm_id, name=elder.name, community=elder.community,
            address=elder.address, received_at=alarm.received_at,
            responder=geo.responders[0].name if geo.responders else None,
        )
        existing = await self._journal.notifications(alarm.alarm_id) if resume else []
        told = {r.phone for r in existing}
        unfinished = [r for r in existing if r.state in NotificationState.UNFINISHED]
        if unfinished:
            # Rows left 'sending' by a crash may have reached Twilio: reconcile first.
            log.info("sms.resuming", unfinished=len(unfinished), planned=len(existing))
            await self._send_all(alarm, unfinished, reconcile=True)
        if state not in ALERTING_STATES:
            return  # acknowledged or cancelled before the restart: no more waves
        done_waves = {r.wave for r in existing}
        for number, wave in enumerate(self._settings.waves, 1):
            if number in done_waves:
                continue
            delay = alarm.received_at + wave.after_s - self._clock()
            if number > 1 and delay > 0 and await self._closed_within(alarm, delay):
                break
            if alarm.closed.is_set():
                break
            plans = self._plan_wave(number, wave, elder, geo, facts, told)
            if number > 1:
                log.warning("escalation.wave", wave=number, recipients=len(plans),
                            unacknowledged_s=round(self._clock() - alarm.received_at, 1))
            if not plans:
                continue
            told |= {p.phone for p in plans}
            records = await self._record_plan(alarm, number, plans)
            await self._send_all(alarm, records, reconcile=False)
        log.info("alarm.escalation_done", sent=alarm.sent, failed=alarm.failed,
                 acknowledged=alarm.closed.is_set())

    async def _send_all(self, alarm: ActiveAlarm, records: Sequence[NotificationRecord], *,
                        reconcile: bool) -> None:
        alarm.idle.clear()
        try:
            # The state commit need not precede the requests: the rows are already
            # journaled 'sending', which is what a restart reconciles.
            await asyncio.gather(self._transition(alarm, AlarmState.NOTIFYING),
                                 *(self._send_one(alarm, r, reconcile=reconcile)
                                   for r in records))
            await self._transition(alarm, AlarmState.NOTIFIED)
            log.info("alarm.notified", sent=alarm.sent, failed=alarm.failed,
                     latency_ms=self._since(alarm))
        finally:
            alarm.idle.set()

    async def _closed_within(self, alarm: ActiveAlarm, delay: float) -> bool:
        """Wait ``delay`` (or until a decline hurries it); True if the alarm closed."""
        waiters = {asyncio.ensure_future(alarm.closed.wait()),
                   asyncio.ensure_future(alarm.hurry.wait()),
                   asyncio.ensure_future(self._sleep(delay))}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        alarm.hurry.clear()
        return alarm.closed.is_set()

    def _locate(self, alarm: ActiveAlarm, elder: Elder) -> GeoResult:
        geo = self._geo().lookup(elder.location, k=self._settings.staff_needed,
                                 exclude=self._busy.keys() if self._settings.exclude_busy
                                 else ())
        alarm.geo = geo
        self._hold(alarm)
        log.info(
            "responders.found",
            latency_ms=self._since(alarm),
            responders=[{"id": r.id, "name": r.name, "distance_m": round(r.distance_m),
                         "bearing_deg": round(r.bearing_deg), "stale": r.stale}
                        for r in geo.responders[: self._settings.responders_k]],
            facilities={k.value: {"id": f.id, "name": f.name, "distance_m": round(f.distance_m)}
                        for k, f in geo.facilities.items()},
        )
        if not geo.responders:
            log.warning("responders.none_on_duty", escalate_to="supervisor")
        return geo

    def _hold(self, alarm: ActiveAlarm) -> None:
        """Mark the first-wave staff of a located, open alarm busy."""
        if not self._settings.exclude_busy or alarm.geo is None or alarm.closed.is_set() \
                or alarm.holds:
            return
        first = self._settings.waves[0].staff if self._settings.waves else 0
        alarm.holds = tuple(r.id for r in alarm.geo.responders[:first])
        busy = self._busy
        for rid in alarm.holds:
            busy[rid] = busy.get(rid, 0) + 1

    def _release(self, alarm: ActiveAlarm) -> None:
        holds, alarm.holds = alarm.holds, ()
        busy = self._busy
        for rid in holds:
            left = busy.get(rid, 0) - 1
            if left > 0:
                busy[rid] = left
            else:
                busy.pop(rid, None)

    def busy_responders(self) -> frozenset[str]:
        """Responders held by open, unacknowledged alarms (skipped for new ones)."""
        return frozenset(self._busy)

    def _plan_wave(self, number: int, wave: Wave, elder: Elder, geo: GeoResult,
                   facts: AlarmFacts, told: set[str]) -> list[NotificationPlan]:
        c = self._composer
        plans: list[NotificationPlan] = []
        if wave.family:
            plans += [NotificationPlan("family", ct.name, ct.phone, c.family(facts, ct.language))
                      for ct in elder.contacts]
        if wave.staff:
            offset = sum(w.staff for w in self._settings.waves[: number - 1])
            staff = geo.responders[offset: offset + wave.staff]
            plans += [NotificationPlan("responder", r.name, r.phone,
                                       c.staff(facts, r.distance_m, map_url=self._map(elder),
                                               from_base=r.stale))
                      for r in staff]
            if not geo.responders and not wave.supervisor:
                plans += self._supervisors(elder, facts)  # nobody on duty: escalate at once
        if wave.supervisor:
            plans += self._supervisors(elder, facts)
        for wanted, kind in ((wave.clinic, FacilityKind.CLINIC),
                             (wave.hospital, FacilityKind.HOSPITAL)):
            fac = geo.facilities.get(kind)
            if wanted and fac is not None:
                plans.append(NotificationPlan("facility", fac.name, fac.phone, c.facility(facts)))
        seen = set(told)
        unique: list[NotificationPlan] = []
        for p in plans:  # one SMS per phone number per alarm, first role wins
            if p.phone not in seen:
                seen.add(p.phone)
                unique.append(p)
        return unique

    def _supervisors(self, elder: Elder, facts: AlarmFacts) -> list[NotificationPlan]:
        geo = self._geo()
        plans = []
        for sup in self._registry().responders.values():
            if sup.role is not ResponderRole.SUPERVISOR:
                continue
            # A supervisor's phone may report positions too; else the registered base.
            where, from_base = geo.position_of(sup.responder_id) or (sup.base, True)
            distance = geo.projector.geodesic(elder.location, where)[0]
            plans.append(NotificationPlan(
                "supervisor", sup.name, sup.phone,
                self._composer.staff(facts, distance, map_url=self._map(elder),
                                     from_base=from_base)))
        return plans

    def _map(self, elder: Elder) -> str | None:
        t = self._settings.map_url_template
        if not t:
            return None
        return t.format(lon=f"{elder.location.lon:.6f}", lat=f"{elder.location.lat:.6f}")

    async def _record_plan(
        self, alarm: ActiveAlarm, wave: int, plans: Sequence[NotificationPlan]
    ) -> list[NotificationRecord]:
        try:
            return await self._journal.plan_notifications(alarm.alarm_id, wave, plans)
        except JournalError as exc:
            # Sending matters more than the record of it: go on from memory.
            log.critical("journal.write_failed", what="notification plan", error=str(exc))
            self._metrics.journal_errors.inc()
            now = self._clock()
            return [NotificationRecord(-(i + 1), alarm.alarm_id, wave, p.role, p.name, p.phone,
                                       p.body, NotificationState.SENDING, None, 0, None, None,
                                       None, now) for i, p in enumerate(plans)]

    # -- one SMS ----------------------------------------------------------------

    async def _send_one(self, alarm: ActiveAlarm, rec: NotificationRecord, *,
                        reconcile: bool) -> None:
        bound = log.bind(to=mask_phone(rec.phone), role=rec.role, notification_id=rec.id,
                         wave=rec.wave)
        if reconcile and rec.state == NotificationState.SENDING:
            found = await self._reconcile(alarm, rec, bound)
            if found:
                return

        async def on_attempt(a: Attempt) -> None:
            # (The sender logs each attempt.) An accepted attempt is journaled once, with
            # the ACCEPTED update after send(): two commits less in front of the next SMS.
            if rec.id > 0 and a.outcome != "accepted":
                await self._journal_quietly(self._journal.log_event(
                    alarm.alarm_id, "sms.attempt",
                    {"notification_id": rec.id, "attempt": a.number, "outcome": a.outcome,
                     "status": a.status, "code": a.code}))
                await self._journal_quietly(self._journal.update_notification(
                    rec.id, NotificationState.SENDING, attempts=a.number))

        told_operator = False
        while True:
            try:
                result = await self._sender.send(rec.phone, rec.body, on_attempt=on_attempt)
                break
            except SmsSendError as exc:
                if not exc.permanent and await self._via_fallback(alarm, rec, bound, str(exc)):
                    return
                deadline = alarm.received_at + self._settings.give_up_after_s
                if exc.permanent or self._clock() + self._settings.retry_later_s > deadline:
                    await self._failed(alarm, rec, exc, bound)
                    return
                # Twilio is down and there is no fallback: keep the row 'sending' and try
                # again later rather than lose the message; tell the operator once.
                bound.warning("sms.retry_later", error=str(exc),
                              retry_in_s=self._settings.retry_later_s)
                if not told_operator:
                    told_operator = True
                    await self._tell_operator(
                        "sms.delayed", alarm.alarm_id,
                        f"编号{alarm.alarm_id}：短信服务暂时不可用，发给{rec.name}"
                        f"（{mask_phone(rec.phone)}）的短信将继续重试，请先电话联系")
                await self._sleep(self._settings.retry_later_s)
        self._accepted(alarm, rec, result, bound)
        if rec.id > 0:
            await self._journal_quietly(self._journal.update_notification(
                rec.id, NotificationState.ACCEPTED, sid=result.sid, attempts=result.attempts,
                latency_ms=self._since(alarm),
                event=("sms.accepted", {"notification_id": rec.id, "sid": result.sid,
                                        "attempts": result.attempts, "channel": "twilio"})))

    async def _failed(self, alarm: ActiveAlarm, rec: NotificationRecord, exc: SmsSendError,
                      bound: Any) -> None:
        alarm.failed += 1
        reason = "permanent" if exc.permanent else "gave_up"
        self._metrics.sms_failed.labels(rec.role, reason).inc()
        bound.error("sms.failed", status=exc.status, code=exc.code, permanent=exc.permanent,
                    error=str(exc), recipient=rec.name, latency_ms=self._since(alarm))
        await self._tell_operator(
            "sms.failed", alarm.alarm_id,
            f"编号{alarm.alarm_id}：短信无法发送给{rec.name}（{mask_phone(rec.phone)}，"
            f"{'号码无效或已退订' if exc.permanent else '多次重试失败'}，代码 {exc.code}），"
            "请电话联系")
        if rec.id > 0:
            await self._journal_quietly(self._journal.update_notification(
                rec.id, NotificationState.FAILED, error_code=exc.code, error=str(exc),
                event=("sms.failed", {"notification_id": rec.id, "recipient": rec.name,
                                      "role": rec.role, "code": exc.code,
                                      "permanent": exc.permanent})))

    def _accepted(self, alarm: ActiveAlarm, rec: NotificationRecord, result: SendResult,
                  bound: Any, channel: str = "twilio") -> None:
        latency = self._since(alarm)
        alarm.sent += 1
        self._metrics.sms_sent.labels(rec.role).inc()
        budget = self._settings.budget_ms
        if rec.wave == 1:  # the budget is for the first wave; later waves wait on purpose
            self._metrics.sms_latency.observe(latency)
        bound.info("sms.sent", sid=result.sid, attempts=result.attempts, channel=channel,
                   segments=result.num_segments, latency_ms=latency, budget_ms=budget)
        if rec.wave == 1 and latency > budget:
            self._metrics.sms_budget_breaches.inc()
            bound.warning("sms.budget_exceeded", latency_ms=latency, budget_ms=budget)

    async def _via_fallback(self, alarm: ActiveAlarm, rec: NotificationRecord, bound: Any,
                            why: str) -> bool:
        if self._fallback is None:
            return False
        bound.warning("sms.fallback_used", reason=why)
        try:
            result = await self._fallback.send(rec.phone, rec.body)
        except SmsSendError as exc:
            bound.error("sms.fallback_failed", error=str(exc))
            return False
        self._accepted(alarm, rec, result, bound, channel="fallback")
        if rec.id > 0:
            await self._journal_quietly(self._journal.update_notification(
                rec.id, NotificationState.ACCEPTED, sid=result.sid, attempts=result.attempts,
                latency_ms=self._since(alarm),
                event=("sms.accepted", {"notification_id": rec.id, "sid": result.sid,
                                        "attempts": result.attempts, "channel": "fallback"})))
        return True

    async def _reconcile(self, alarm: ActiveAlarm, rec: NotificationRecord,
                         bound: Any) -> bool:
        """Did a send whose outcome is unknown reach Twilio? Ask before resending."""
        since = datetime.fromtimestamp(rec.created_at, UTC) - timedelta(minutes=5)
        try:
            found = await self._sender.find_sent(rec.phone, since=since, marker=alarm.alarm_id)
        except (SmsSendError, TimeoutError, OSError) as exc:
            bound.warning("sms.reconcile_failed", error=str(exc), action="resend")
            return False
        if not found:
            bound.info("sms.reconciled", found=False, action="resend")
            return False
        sid, status = found[0]
        bound.info("sms.reconciled", found=True, sid=sid, status=status)
        alarm.sent += 1
        await self._journal_quietly(self._journal.update_notification(
            rec.id, NotificationState.ACCEPTED, sid=sid))
        return True

    # -- alert -----------------------------------------------------------------

    async def _start_alert(self, alarm: ActiveAlarm) -> None:
        if alarm.elder is not None:
            e = alarm.elder
            facts = AlarmFacts(alarm.alarm_id, e.name, e.community, e.address,
                               alarm.received_at)
            text = self._composer.spoken(facts)
        else:
            text = self._composer.spoken(None, alarm.address_text)
        # Rendering runs in a thread; don't hold up the SMS behind it.
        if self._tg is None:
            raise RuntimeError("dispatcher is not running")
        task = self._tg.create_task(self._alert(alarm, text), name=f"alert-{alarm.alarm_id}")
        self._alert_starts.add(task)
        task.add_done_callback(self._alert_starts.discard)

    async def _alert(self, alarm: ActiveAlarm, text: str) -> None:
        structlog.contextvars.bind_contextvars(alarm_id=alarm.alarm_id)
        try:
            await self._player.start(alarm.alarm_id, text)
        except Exception:
            log.exception("alert.failed")
            return
        self._metrics.alerting.set(self._player.active_count())
        log.info("alert.queued", latency_ms=self._since(alarm))

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        if self._tg is None:
            raise RuntimeError("dispatcher is not running")
        self._tg.create_task(coro, name=name)  # type: ignore[arg-type]

    # -- acknowledgement, cancel, resolve ---------------------------------------------

    async def acknowledge(self, alarm_id: str, by: str, *,
                          phone: str | None = None) -> AlarmState:
        """Someone takes the alarm: stop the alert and the escalation, tell the others.

        Raises IllegalTransition when it was already acknowledged (the first one wins)."""
        previous = await self._journal.transition(alarm_id, AlarmState.ACKNOWLEDGED, by=by)
        if previous is AlarmState.ACKNOWLEDGED:
            raise IllegalTransition(alarm_id, previous, AlarmState.ACKNOWLEDGED)
        await self._closed(alarm_id)
        if phone is not None:
            await self._journal_quietly(self._journal.mark_recipient_acknowledged(alarm_id,
                                                                                  phone))
        log.info("alarm.acknowledged", alarm_id=alarm_id, by=by, previous=previous.value)
        self._announce(alarm_id, AlarmState.ACKNOWLEDGED, by=by)
        self._spawn(self._inform(alarm_id, WAVE_TAKEN, by, skip=phone), f"taken-{alarm_id}")
        return previous

    async def cancel(self, alarm_id: str, by: str) -> AlarmState:
        """The elder (the device) cancelled: stop, and tell everyone already told."""
        previous = await self._journal.transition(alarm_id, AlarmState.CANCELLED, by=by)
        await self._closed(alarm_id)
        log.info("alarm.cancelled", alarm_id=alarm_id, by=by, previous=previous.value)
        self._announce(alarm_id, AlarmState.CANCELLED, by=by)
        if previous is not AlarmState.CANCELLED:
            self._spawn(self._inform(alarm_id, WAVE_CANCELLED, by), f"cancelled-{alarm_id}")
        return previous

    async def resolve(self, alarm_id: str, note: str | None, by: str = "operator") -> AlarmState:
        previous = await self._journal.transition(alarm_id, AlarmState.RESOLVED, note=note,
                                                  by=by)
        await self._closed(alarm_id)
        alarm = self.active.pop(alarm_id, None)
        self._metrics.open_alarms.set(len(self.active))
        log.info("alarm.resolved", alarm_id=alarm_id, previous=previous.value,
                 was_active=alarm is not None)
        self._announce(alarm_id, AlarmState.RESOLVED, by=by)
        return previous

    async def _closed(self, alarm_id: str) -> None:
        await self._player.stop(alarm_id)
        self._metrics.alerting.set(self._player.active_count())
        alarm = self.active.get(alarm_id)
        if alarm is not None:
            alarm.closed.set()
            self._release(alarm)

    async def _inform(self, alarm_id: str, wave: int, by: str, skip: str | None = None) -> None:
        """A short follow-up to everyone already told (taken by ..., cancelled)."""
        structlog.contextvars.bind_contextvars(alarm_id=alarm_id)
        told = [r for r in await self._journal.notifications(alarm_id)
                if r.wave < WAVE_TAKEN and r.phone != skip]
        if not told:
            return
        record = await self._journal.get_alarm(alarm_id)
        elder = self._registry().elders.get(record.elder_id)
        facts = AlarmFacts(alarm_id, elder.name if elder else record.device_id,
                           elder.community if elder else "", elder.address if elder else "",
                           record.received_at)
        who = by.split(":", 1)[-1]
        c = self._composer
        plans = [NotificationPlan(
            r.role, r.name, r.phone,
            c.taken(facts, who) if wave == WAVE_TAKEN else c.cancelled(facts))
            for r in {r.phone: r for r in told}.values()]
        alarm = self.active.get(alarm_id) or ActiveAlarm(
            alarm_id, record.device_id, elder, record.device_id, record.received_at,
            self._monotonic())
        records = await self._record_plan(alarm, wave, plans)
        await asyncio.gather(*(self._send_one(alarm, r, reconcile=False) for r in records))

    async def on_reply(self, from_phone: str, alarm_ref: str | None,
                       intent: ReplyIntent) -> str:
        """An SMS reply from someone we texted. Returns the answer to text back."""
        ref = alarm_ref
        if ref is None:
            latest = await self._journal.latest_open_alarm_for_phone(from_phone)
            ref = latest.alarm_id if latest else None
        if ref is None:
            log.info("reply.no_alarm", from_=mask_phone(from_phone))
            return self._composer.reply("no_alarm")
        recipients = {r.phone: r for r in await self._journal.notifications(ref)}
        who = recipients.get(from_phone)
        if who is None:
            # Only people we told may take an alarm: a reply from anyone else is refused.
            log.warning("reply.not_a_recipient", alarm_id=ref, from_=mask_phone(from_phone))
            return self._composer.reply("not_recipient", ref=ref)
        if intent == "decline":
            log.info("reply.declined", alarm_id=ref, by=who.name)
            await self._journal_quietly(self._journal.log_event(
                ref, "reply.declined", {"by": who.name}))
            alarm = self.active.get(ref)
            if alarm is not None:
                alarm.hurry.set()  # do not wait for the next wave's timer
            return self._composer.reply("declined", ref=ref)
        if intent != "ack":
            return self._composer.reply("help", ref=ref)
        try:
            await self.acknowledge(ref, f"sms:{who.name}", phone=from_phone)
        except IllegalTransition:
            record = await self._journal.get_alarm(ref)
            taker = (record.acknowledged_by or "").split(":", 1)[-1]
            return self._composer.reply("already", ref=ref, who=taker or "他人")
        return self._composer.reply("thanks", ref=ref)

    async def on_delivery(self, sid: str, status: str, error_code: int | None) -> None:
        """A carrier status for one of our messages (webhook or polling)."""
        rec = await self._journal.set_delivery_status(sid, status, error_code)
        if rec is None:
            log.info("sms.status_unknown_sid", sid=sid, status=status)
            return
        bound = log.bind(alarm_id=rec.alarm_id, to=mask_phone(rec.phone), role=rec.role,
                         notification_id=rec.id, sid=sid)
        if status == "delivered":
            bound.info("sms.delivered")
        elif status in ("undelivered", "failed"):
            bound.error("sms.undelivered", status=status, error_code=error_code,
                        recipient=rec.name)
            await self._tell_operator(
                "sms.undelivered", rec.alarm_id,
                f"编号{rec.alarm_id}：发给{rec.name}（{mask_phone(rec.phone)}）的短信未送达"
                f"（{status}，代码 {error_code}），请电话联系")
            alarm = self.active.get(rec.alarm_id)
            if alarm is not None and rec.wave < WAVE_TAKEN:
                await self._via_fallback(alarm, rec, bound, f"carrier reported {status}")

    # -- helpers -------------------------------------------------------------------

    async def _tell_operator(self, kind: str, alarm_id: str, text: str) -> None:
        if self._on_notice is None:
            return
        try:
            await self._on_notice(Notice(kind, alarm_id, text, self._clock()))
        except Exception:  # a notice must never break sending
            log.exception("notice.failed", kind=kind)

    def _announce(self, alarm_id: str, state: AlarmState, **extra: Any) -> None:
        if self._on_state is None:
            return
        info: dict[str, Any] = {"at": self._clock(), **extra}
        alarm = self.active.get(alarm_id)
        if alarm is not None:
            info["device_id"] = alarm.device_id
            info["received_at"] = alarm.received_at
            if alarm.elder is not None:
                info["elder_id"] = alarm.elder.elder_id
                info["community"] = alarm.elder.community
        self._on_state(alarm_id, state.value, info)

    async def _transition(self, alarm: ActiveAlarm, state: AlarmState) -> None:
        if not alarm.durable:
            return
        try:
            if await self._journal.transition(alarm.alarm_id, state) is not state:
                self._announce(alarm.alarm_id, state)
        except IllegalTransition:
            pass  # acknowledged or cancelled meanwhile: keep sending what was planned
        except JournalError as exc:
            log.critical("journal.write_failed", what=f"transition to {state}", error=str(exc))
            self._metrics.journal_errors.inc()

    async def _journal_quietly(self, op: Awaitable[Any]) -> None:
        try:
            await op
        except JournalError as exc:
            self._metrics.journal_errors.inc()
            log.critical("journal.write_failed", error=str(exc))

    def _since(self, alarm: ActiveAlarm) -> float:
        return round((self._monotonic() - alarm.t0) * 1000, 2)

    def cancel_all(self) -> None:
        """Cancel unfinished alarm tasks (shutdown); the journal resumes them."""
        for alarm in self.active.values():
            if alarm.task is not None and not alarm.task.done():
                alarm.task.cancel()

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no alarm is sending a wave (escalation timers may still be pending)."""
        async with asyncio.timeout(timeout):
            while busy := [a for a in self.active.values() if not a.idle.is_set()]:
                await asyncio.gather(*(a.idle.wait() for a in busy))
