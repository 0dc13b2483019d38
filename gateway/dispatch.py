"""Dispatch: turn a journaled alarm into an alert, a responder search and SMS.

One task per open alarm, all owned by the dispatcher's TaskGroup. An alarm task
never lets an exception escape (that would cancel every other alarm): failures
are logged with the alarm id and journaled, and the operator keeps hearing the
alert until someone acknowledges.

The first SMS is on the critical path, so nothing slow sits before it: the
responder search is an in-memory R-tree query (microseconds), the alert renders
in a worker thread in parallel, and the notification plan is one group-committed
journal write, which must precede sending so that a crash can be reconciled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

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
    UnknownAlarm,
)
from gateway.lifecycle import ALERTING_STATES, AlarmState, IllegalTransition
from gateway.messages import AlarmFacts, Composer
from gateway.metrics import Metrics
from gateway.model import Elder, Registry, ResponderRole
from gateway.redact import mask_phone
from gateway.sms import Attempt, SendResult, SmsSendError

log = structlog.get_logger(__name__)


class Sender(Protocol):
    async def send(
        self, to: str, body: str, *,
        on_attempt: Callable[[Attempt], Awaitable[None]] | None = None,
    ) -> SendResult: ...

    async def find_sent(self, to: str, *, since: datetime,
                        marker: str) -> list[tuple[str, str]]: ...


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    staff_per_alarm: int = 2
    responders_k: int = 3
    notify_clinic: bool = False
    budget_ms: float = 2000.0


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


class Dispatcher:
    """Owns one task per open alarm and the operator actions on them."""

    def __init__(
        self,
        *,
        journal: Journal,
        registry: Callable[[], Registry],
        geo: Callable[[], GeoService],
        player: AlertPlayer,
        sender: Sender,
        settings: DispatchSettings,
        metrics: Metrics,
        composer: Composer | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_state: Callable[[str, str, dict[str, Any]], None] | None = None,
    ) -> None:
        self._on_state = on_state
        self._journal = journal
        self._registry = registry
        self._geo = geo
        self._player = player
        self._sender = sender
        self._settings = settings
        self._metrics = metrics
        self._composer = composer or Composer()
        self._clock = clock
        self._monotonic = monotonic
        self._tg: asyncio.TaskGroup | None = None
        self.active: dict[str, ActiveAlarm] = {}

    async def __aenter__(self) -> Dispatcher:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        tg, self._tg = self._tg, None
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

    # -- the pipeline for one alarm ----------------------------------------------

    async def _run(self, alarm: ActiveAlarm, resume: AlarmRecord | None) -> None:
        state = resume.state if resume else AlarmState.JOURNALED
        if state in ALERTING_STATES:
            await self._start_alert(alarm)
        if alarm.elder is None:
            log.error("alarm.unregistered_device", address=alarm.address_text)
            return
        if resume is not None and state not in (AlarmState.JOURNALED, AlarmState.NOTIFYING):
            return  # nothing left to send; the alert (if any) runs until acknowledged
        elder = alarm.elder
        geo = self._locate(alarm, elder)
        facts = AlarmFacts(
            ref=alarm.alarm_id, name=elder.name, community=elder.community,
            address=elder.address, received_at=alarm.received_at,
            responder=geo.responders[0].name if geo.responders else None,
        )
        existing: list[NotificationRecord] = []
        if resume is not None:
            existing = await self._journal.notifications(alarm.alarm_id)
        if not existing:
            plans = self._plan(elder, geo, facts)
            await self._transition(alarm, AlarmState.NOTIFYING)
            records = await self._record_plan(alarm, plans)
        else:
            await self._transition(alarm, AlarmState.NOTIFYING)
            records = [r for r in existing if r.state in NotificationState.UNFINISHED]
            log.info("sms.resuming", unfinished=len(records), planned=len(existing))
        # Rows found 'sending' after a restart may have reached Twilio before the crash.
        reconcile = bool(existing)
        await asyncio.gather(*(self._send_one(alarm, rec, reconcile=reconcile)
                               for rec in records))
        with contextlib.suppress(IllegalTransition, UnknownAlarm):
            await self._transition(alarm, AlarmState.NOTIFIED)
        log.info("alarm.notified", sent=alarm.sent, failed=alarm.failed,
                 latency_ms=self._since(alarm))

    def _locate(self, alarm: ActiveAlarm, elder: Elder) -> GeoResult:
        geo = self._geo().lookup(elder.location, k=self._settings.responders_k,
                                 exclude=self._busy_responders(alarm.alarm_id))
        alarm.geo = geo
        log.info(
            "responders.found",
            latency_ms=self._since(alarm),
            responders=[{"id": r.id, "name": r.name, "distance_m": round(r.distance_m),
                         "bearing_deg": round(r.bearing_deg), "stale": r.stale}
                        for r in geo.responders],
            facilities={k.value: {"id": f.id, "name": f.name, "distance_m": round(f.distance_m)}
                        for k, f in geo.facilities.items()},
        )
        if not geo.responders:
            log.warning("responders.none_on_duty", escalate_to="supervisor")
        return geo

    def _busy_responders(self, alarm_id: str) -> set[str]:
        busy: set[str] = set()
        for other in self.active.values():
            if other.alarm_id != alarm_id and other.geo is not None:
                busy.update(r.id for r in other.geo.responders[: self._settings.staff_per_alarm])
        return busy

    def _plan(self, elder: Elder, geo: GeoResult, facts: AlarmFacts) -> list[NotificationPlan]:
        c = self._composer
        plans = [NotificationPlan("family", ct.name, ct.phone, c.family(facts, ct.language))
                 for ct in elder.contacts]
        staff = geo.responders[: self._settings.staff_per_alarm]
        plans += [NotificationPlan("responder", r.name, r.phone, c.staff(facts, r.distance_m))
                  for r in staff]
        if not staff:
            reg = self._registry()
            for sup in reg.responders.values():
                if sup.role is ResponderRole.SUPERVISOR:
                    dist = self._geo().projector.geodesic(elder.location, sup.base)[0]
                    plans.append(NotificationPlan("supervisor", sup.name, sup.phone,
                                                  c.staff(facts, dist)))
        if self._settings.notify_clinic:
            for fac in geo.facilities.values():
                plans.append(NotificationPlan("facility", fac.name, fac.phone, c.facility(facts)))
        seen: set[str] = set()
        unique = []
        for p in plans:  # one SMS per phone number, first role wins
            if p.phone not in seen:
                seen.add(p.phone)
                unique.append(p)
        return unique

    async def _record_plan(
        self, alarm: ActiveAlarm, plans: Sequence[NotificationPlan]
    ) -> list[NotificationRecord]:
        try:
            return await self._journal.plan_notifications(alarm.alarm_id, 1, plans)
        except JournalError as exc:
            # Sending matters more than the record of it: go on from memory.
            log.critical("journal.write_failed", what="notification plan", error=str(exc))
            self._metrics.journal_errors.inc()
            now = self._clock()
            return [NotificationRecord(-(i + 1), alarm.alarm_id, 1, p.role, p.name, p.phone,
                                       p.body, NotificationState.SENDING, None, 0, None, None,
                                       None, now) for i, p in enumerate(plans)]

    async def _send_one(self, alarm: ActiveAlarm, rec: NotificationRecord, *,
                        reconcile: bool) -> None:
        masked = mask_phone(rec.phone)
        bound = log.bind(to=masked, role=rec.role, notification_id=rec.id)
        if reconcile and rec.state == NotificationState.SENDING:
            found = await self._reconcile(alarm, rec, bound)
            if found:
                return

        async def on_attempt(a: Attempt) -> None:
            bound.info("sms.attempt", attempt=a.number, outcome=a.outcome, status=a.status,
                       code=a.code, delay_s=a.delay_s)
            if rec.id > 0:
                await self._journal_quietly(self._journal.log_event(
                    alarm.alarm_id, "sms.attempt",
                    {"notification_id": rec.id, "attempt": a.number, "outcome": a.outcome,
                     "status": a.status, "code": a.code}))
                await self._journal_quietly(self._journal.update_notification(
                    rec.id, NotificationState.SENDING, attempts=a.number))

        try:
            result = await self._sender.send(rec.phone, rec.body, on_attempt=on_attempt)
        except SmsSendError as exc:
            alarm.failed += 1
            reason = "permanent" if exc.permanent else "gave_up"
            self._metrics.sms_failed.labels(rec.role, reason).inc()
            bound.error("sms.failed", status=exc.status, code=exc.code, permanent=exc.permanent,
                        error=str(exc), latency_ms=self._since(alarm))
            if rec.id > 0:
                await self._journal_quietly(self._journal.update_notification(
                    rec.id, NotificationState.FAILED, error_code=exc.code, error=str(exc)))
            return
        latency = self._since(alarm)
        alarm.sent += 1
        self._metrics.sms_sent.labels(rec.role).inc()
        self._metrics.sms_latency.observe(latency)
        budget = self._settings.budget_ms
        bound.info("sms.sent", sid=result.sid, attempts=result.attempts,
                   segments=result.num_segments, latency_ms=latency, budget_ms=budget)
        if latency > budget:
            self._metrics.sms_budget_breaches.inc()
            bound.warning("sms.budget_exceeded", latency_ms=latency, budget_ms=budget)
        if rec.id > 0:
            await self._journal_quietly(self._journal.update_notification(
                rec.id, NotificationState.ACCEPTED, sid=result.sid, attempts=result.attempts,
                latency_ms=latency))

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
        self._spawn(self._alert(alarm, text), f"alert-{alarm.alarm_id}")

    async def _alert(self, alarm: ActiveAlarm, text: str) -> None:
        structlog.contextvars.bind_contextvars(alarm_id=alarm.alarm_id)
        try:
            await self._player.start(alarm.alarm_id, text)
        except Exception:
            log.exception("alert.failed")
            return
        self._metrics.alerting.set(len(self._player.active()))
        log.info("alert.queued", latency_ms=self._since(alarm))

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        if self._tg is None:
            raise RuntimeError("dispatcher is not running")
        self._tg.create_task(coro, name=name)  # type: ignore[arg-type]

    # -- operator actions --------------------------------------------------------

    async def acknowledge(self, alarm_id: str, by: str) -> AlarmState:
        previous = await self._journal.transition(alarm_id, AlarmState.ACKNOWLEDGED, by=by)
        await self._player.stop(alarm_id)
        self._metrics.alerting.set(len(self._player.active()))
        log.info("alarm.acknowledged", alarm_id=alarm_id, by=by, previous=previous.value)
        self._announce(alarm_id, AlarmState.ACKNOWLEDGED, by=by)
        return previous

    async def cancel(self, alarm_id: str, by: str) -> AlarmState:
        previous = await self._journal.transition(alarm_id, AlarmState.CANCELLED, by=by)
        await self._player.stop(alarm_id)
        self._metrics.alerting.set(len(self._player.active()))
        log.info("alarm.cancelled", alarm_id=alarm_id, by=by, previous=previous.value)
        self._announce(alarm_id, AlarmState.CANCELLED, by=by)
        return previous

    async def resolve(self, alarm_id: str, note: str | None, by: str = "operator") -> AlarmState:
        previous = await self._journal.transition(alarm_id, AlarmState.RESOLVED, note=note,
                                                  by=by)
        await self._player.stop(alarm_id)
        alarm = self.active.pop(alarm_id, None)
        self._metrics.open_alarms.set(len(self.active))
        self._metrics.alerting.set(len(self._player.active()))
        log.info("alarm.resolved", alarm_id=alarm_id, previous=previous.value,
                 was_active=alarm is not None)
        self._announce(alarm_id, AlarmState.RESOLVED, by=by)
        return previous

    # -- helpers -------------------------------------------------------------------

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
        """Cancel unfinished alarm tasks (shutdown deadline); the journal resumes them."""
        for alarm in self.active.values():
            if alarm.task is not None and not alarm.task.done():
                alarm.task.cancel()

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every alarm task has finished its sending (shutdown, tests, demo)."""
        tasks = {a.task for a in self.active.values() if a.task is not None and not a.task.done()}
        if not tasks:
            return
        _, still = await asyncio.wait(tasks, timeout=timeout)
        if still:
            raise TimeoutError(f"{len(still)} alarm task(s) still running after {timeout} s")
