"""Dispatch: turn a journaled alarm into an alert, a responder search and SMS waves.

Theory of operation
-------------------
One task per open alarm, all owned by the dispatcher's TaskGroup. An alarm task
never lets an exception escape (that would cancel every other alarm): failures
are logged with the alarm id and journaled, and the operator keeps hearing the
alert until someone acknowledges.

The parts, each in its own module:

* :mod:`gateway.escalation`, the pure planner: who wave N reaches, with what text;
* :mod:`gateway.notifier`, the chain for one message (Twilio -> retry later -> GSM
  fallback -> failed) and the backlog that reconciles rows a crash left ``sending``;
* this module: the alarm task (alert, locate, plan, journal, send, wait for the next
  wave) and what closes an alarm (acknowledgement, a cancel from the device,
  resolution), with SMS replies and carrier delivery reports.

An alarm is told in **waves** (config ``[[escalation.waves]]``): wave 1 at once, later
waves when nobody has acknowledged by ``received_at + after_s``. Each wave is journaled
(kind ``escalation``, its wave number) *before* its SMS leave, so after a restart the
waves already sent are known, rows left ``sending`` go to the notifier's backlog (which
reconciles them with Twilio, below the priority of new alarms), and the remaining timers
are rebuilt from the journal's ``received_at``. An alarm waiting for its next wave is
idle: a stop does not wait for it (the next start rebuilds the timer).

The first SMS is on the critical path, so nothing slow sits before it: the responder
search is an in-memory index query (microseconds), the alert only records the alarm (the
player renders what it is about to play, by itself), and the wave plan is one
group-committed journal write.

Acknowledgement and cancel live here rather than in a module of their own because they
*are* the other half of the alarm task: they set the event the task waits on, release
the responders it holds busy and stop its alert; the short "taken by ..." or
"cancelled" messages to those told are planned by the planner and sent by the notifier.
The callbacks to the outside (``on_state``, ``on_notice``) are synchronous and cheap:
whoever receives them queues the work in tasks of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from devices.events import Drill
from gateway.aio import first_of
from gateway.alert import AlertPlayer
from gateway.calling import CallDesk
from gateway.config import EscalationSection, GeoSection, SmsSection
from gateway.digest import SupervisorDigest
from gateway.escalation import CallWave, Planner, Situation, supervisors_near
from gateway.geo import GeoResult
from gateway.journal import (
    AlarmRecord,
    CallPlan,
    Journal,
    JournalError,
    MessageKind,
    NotificationPlan,
    NotificationRecord,
)
from gateway.lifecycle import (
    ALERTING_STATES,
    UNFINISHED_NOTIFICATION_STATES,
    AlarmState,
    IllegalTransition,
    NotificationState,
)
from gateway.metrics import Metrics
from gateway.model import Elder
from gateway.notices import Notice
from gateway.notifier import Backlog, Notifier, Sender, TwilioLike, memory_record
from gateway.redact import mask_phone
from gateway.replies import InboundReply, StatusUpdate
from gateway.wording import DRILL_SMS_PREFIX, DRILL_SPOKEN_PREFIX, AlarmFacts, Composer
from gateway.world import World, WorldRef

__all__ = ["ActiveAlarm", "Dispatcher", "ReplyIntent"]

log = structlog.get_logger(__name__)

ADOPT_RETRY_S = 1.0  # between attempts to journal SMS sent from memory


@dataclass(slots=True)
class ActiveAlarm:
    """In-memory companion of an open alarm (the journal row is the truth)."""

    alarm_id: str
    device_id: str
    elder: Elder | None  # None: unregistered device
    address_text: str  # what the operator hears for an unknown device
    received_at: float  # wall clock
    t0: float  # monotonic at receipt (or reconstructed on resume)
    # Before receipt, by the device's own time (gateway/intake.py): latencies and the SMS
    # budget count from the press, a wait at the broker included.
    waited_s: float = 0.0
    durable: bool = True
    task: asyncio.Task[None] | None = None
    geo: GeoResult | None = None
    sent: int = 0
    failed: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # acked/cancelled/resolved
    hurry: asyncio.Event = field(default_factory=asyncio.Event)  # a decline: next wave now
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # no wave being sent
    holds: tuple[str, ...] = ()  # responders this open alarm keeps busy (exclude_busy)
    drill: Drill | None = None  # a drill: texts only whom it names, holds nobody busy


ReplyIntent = Literal["ack", "decline", "unknown"]


class Dispatcher:
    """Owns one task per open alarm and the operator actions on them."""

    def __init__(
        self,
        *,
        journal: Journal,
        world: WorldRef,
        player: AlertPlayer,
        sender: TwilioLike,
        escalation: EscalationSection,
        sms: SmsSection,
        geo: GeoSection,
        metrics: Metrics,
        composer: Composer | None = None,
        fallback: Sender | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_state: Callable[[str, str, dict[str, Any]], None] | None = None,
        on_notice: Callable[[Notice], None] | None = None,
        reconcile_workers: int = 2,
    ) -> None:
        self._journal = journal
        self._world = world
        self._player = player
        self._geo_settings = geo
        self._metrics = metrics
        self._composer = composer or Composer(sms.merged_templates())
        self._planner = Planner(escalation, geo, self._composer, sms.map_url_template)
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._on_state = on_state
        self._on_notice = on_notice
        self._notifier = Notifier(journal=journal, sender=sender, sms=sms, metrics=metrics,
                                  fallback=fallback, clock=clock, monotonic=monotonic,
                                  sleep=sleep, on_notice=on_notice,
                                  on_unjournaled=self._remember)
        self._backlog = Backlog(self._notifier, workers=reconcile_workers)
        self._digest = SupervisorDigest(
            journal=journal, composer=self._composer, escalation=escalation,
            open_alarm=self._digestible, deliver=self._deliver_digest,
            on_digest=lambda n: metrics.supervisor_digests.inc(), clock=clock, sleep=sleep)
        self._tg: asyncio.TaskGroup | None = None
        self._backlog_task: asyncio.Task[None] | None = None
        self._digest_task: asyncio.Task[None] | None = None
        self._alert_starts: set[asyncio.Task[None]] = set()
        self.active: dict[str, ActiveAlarm] = {}
        # Responder id -> number of open, unacknowledged alarms whose first wave holds
        # them: kept up to date as alarms are located and closed, so that a new alarm
        # does not scan every open one (1,000 open alarms in a storm).
        self._busy: dict[str, int] = {}
        # SMS planned or sent while the journal could not record them, by alarm, the
        # latest per (kind, wave, phone): journaled with the press of an alarm alerted
        # from memory, or adopted into the journal once it can write again.
        self._unjournaled: dict[str, dict[tuple[MessageKind, int | None, str],
                                          NotificationRecord]] = {}
        self._adopting: set[str] = set()
        self._calls: CallDesk | None = None
        self._call_tasks: set[asyncio.Task[None]] = set()

    def attach_calls(self, desk: CallDesk) -> None:
        """Voice: waves place their calls through ``desk`` from now on."""
        self._calls = desk
        self._planner.voice = True

    async def call_accepted(self, alarm_id: str, by: str, phone: str) -> bool:
        """A callee pressed 1: they take the alarm, unless someone already did."""
        try:
            await self.acknowledge(alarm_id, by, phone=phone)
        except IllegalTransition:
            return False
        return True

    def call_declined(self, alarm_id: str) -> None:
        """A callee pressed 2: the next wave need not wait for its timer."""
        alarm = self.active.get(alarm_id)
        if alarm is not None:
            alarm.hurry.set()

    def _call_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a CallDesk coroutine in the TaskGroup; cancelled by :meth:`cancel_all`."""
        if self._tg is None:
            coro.close()
            return
        task = self._tg.create_task(coro, name=name)
        self._call_tasks.add(task)
        task.add_done_callback(self._call_tasks.discard)

    def _drill_phones(self, drill: Drill) -> set[str]:
        """The phones a drill may reach: the numbers it names and its responders'."""
        reg = self._world.registry
        return {w for w in drill.notify if w.startswith("+")} | {
            reg.responders[w].phone for w in drill.notify if w in reg.responders}

    def _drill_calls(self, alarm: ActiveAlarm, calls: CallWave) -> CallWave:
        """A drill calls only whom it names, and says it is a drill."""
        if alarm.drill is None:
            return calls
        allowed = self._drill_phones(alarm.drill)

        def drill(plans: list[CallPlan]) -> list[CallPlan]:
            return [dataclasses.replace(c, text=DRILL_SPOKEN_PREFIX + c.text)
                    for c in plans if c.phone in allowed]

        return CallWave(drill(calls.single), drill(calls.tree))

    @property
    def notifier(self) -> Notifier:
        return self._notifier

    @property
    def backlog(self) -> Backlog:
        """Rows left ``sending`` by a crash, being reconciled."""
        return self._backlog

    async def __aenter__(self) -> Dispatcher:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._backlog_task = self._tg.create_task(self._backlog.run(), name="sms-backlog")
        self._digest_task = self._tg.create_task(self._digest.run(), name="supervisor-digest")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        tg, self._tg = self._tg, None
        # A stopping gateway plays nothing (the player's close kills what plays), and the
        # next start resumes the alert of every open alarm from the journal.
        for task in self._alert_starts:
            task.cancel()
        # Rows still queued stay 'sending' in the journal: the next start reconciles them.
        if self._backlog_task is not None:
            self._backlog_task.cancel()
        if self._digest_task is not None:  # held rows stay held: the next start sends
            self._digest_task.cancel()
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
        reg = self._world.registry
        await self._digest.restore()  # before any wave: the supervisors' budgets
        for rec in await self._journal.open_alarms():
            device = reg.devices.get(rec.device_id)
            elder = reg.elders.get(rec.elder_id) if device else None
            age = max(0.0, self._clock() - rec.received_at)
            alarm = ActiveAlarm(
                alarm_id=rec.alarm_id, device_id=rec.device_id, elder=elder,
                address_text=rec.device_id, received_at=rec.received_at,
                t0=self._monotonic() - age,
                drill=await self._journal.drill_of(rec.alarm_id) if rec.drill else None,
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
            await self._start_alert(alarm, resumed=resume is not None)
        if alarm.elder is None:
            log.error("alarm.unregistered_device", address=alarm.address_text)
            return
        world = self._world.current  # an alarm in flight keeps the world it started with
        situation = self._locate(alarm, alarm.elder, world)
        existing = await self._journal.notifications(alarm.alarm_id) if resume else []
        told = {r.phone for r in existing}
        placed_calls = await self._journal.calls(alarm.alarm_id) \
            if resume and self._calls is not None else []
        called = {c.phone for c in placed_calls}
        if placed_calls and self._calls is not None and state in ALERTING_STATES:
            spoken = self._composer.spoken(situation.facts)
            self._call_task(self._calls.resume(
                alarm.alarm_id, placed_calls,
                DRILL_SPOKEN_PREFIX + spoken if alarm.drill is not None else spoken,
                t0=alarm.t0, closed=alarm.closed), f"calls-{alarm.alarm_id}-resume")
        unfinished = [r for r in existing if r.state in UNFINISHED_NOTIFICATION_STATES]
        if unfinished:
            # Rows left 'sending' by a crash may have reached Twilio: the backlog asks
            # before resending, at a lower priority than new alarms; the waves go on.
            queued = self._backlog.submit(
                alarm, unfinished, claimed=[r.sid for r in existing if r.sid],
                then=lambda: self._transition(alarm, AlarmState.NOTIFIED))
            log.info("sms.resuming", unfinished=len(unfinished), planned=len(existing),
                     backlog=self._backlog.queued, queued=queued)
        if state not in ALERTING_STATES:
            return  # acknowledged or cancelled before the restart: no more waves
        done_waves = {r.wave for r in existing if r.kind is MessageKind.ESCALATION}
        for number, wave in enumerate(self._planner.waves, 1):
            if number in done_waves:
                continue
            delay = alarm.received_at + wave.after_s - self._clock()
            if number > 1 and delay > 0 and await self._closed_within(alarm, delay):
                break
            if alarm.closed.is_set():
                break
            plans, skipped = self._planner.plan(number, situation, told)
            for p in skipped:  # a landline takes a call, not an SMS: never texted
                log.warning("sms.skipped_landline", wave=number, role=p.role, name=p.name,
                            to=mask_phone(p.phone), called=self._calls is not None)
            if self._calls is not None:
                calls = self._drill_calls(alarm, self._planner.calls(number, situation,
                                                                     skipped, called))
                called |= {c.phone for c in (*calls.single, *calls.tree)}
                if calls.single or calls.tree:
                    self._call_task(self._calls.wave(alarm.alarm_id, number, calls,
                                                     t0=alarm.t0 - alarm.waited_s,
                                                     closed=alarm.closed),
                                    f"calls-{alarm.alarm_id}-{number}")
            told |= {p.phone for p in skipped}  # logged once per alarm, not every wave
            if alarm.drill is not None:  # the withheld too: each is planned only once
                told |= {p.phone for p in plans}
                plans = await self._drill_plan(alarm, number, plans)
            if number > 1:
                log.warning("escalation.wave", wave=number, recipients=len(plans),
                            unacknowledged_s=round(self._clock() - alarm.received_at, 1))
            if not plans:
                continue
            told |= {p.phone for p in plans}
            alarm.idle.clear()
            started = self._monotonic()
            held: list[NotificationPlan] = []
            if alarm.drill is None:  # a storm: supervisors over their budget get a digest
                plans, held = self._digest.split(plans)
            records = await self._record_plan(alarm, MessageKind.ESCALATION, number, plans,
                                              held=held)
            await self._send_all(alarm, records, wave=number, started=started)
        log.info("alarm.escalation_done", sent=alarm.sent, failed=alarm.failed,
                 acknowledged=alarm.closed.is_set())

    async def _send_all(self, alarm: ActiveAlarm, records: Sequence[NotificationRecord], *,
                        wave: int, started: float) -> None:
        """Send one wave; ``started`` (monotonic) is the wave's start, for its latency."""
        alarm.idle.clear()
        try:
            # The state commit need not precede the requests: the rows are already
            # journaled 'sending', which is what a restart reconciles.
            await asyncio.gather(self._transition(alarm, AlarmState.NOTIFYING),
                                 *(self._notifier.deliver(alarm, r) for r in records
                                   if r.state in UNFINISHED_NOTIFICATION_STATES))
            await self._transition(alarm, AlarmState.NOTIFIED)
            log.info("alarm.notified", wave=wave, sent=alarm.sent, failed=alarm.failed,
                     latency_ms=self._since(alarm),
                     wave_latency_ms=round((self._monotonic() - started) * 1000, 2))
        finally:
            alarm.idle.set()

    async def _closed_within(self, alarm: ActiveAlarm, delay: float) -> bool:
        """Wait ``delay`` (or until a decline hurries it); True if the alarm closed.

        A waiting alarm is idle: a stop need not wait for its timer, which the next
        start rebuilds from the journal."""
        alarm.idle.set()
        await first_of(alarm.closed.wait(), alarm.hurry.wait(), self._sleep(delay))
        alarm.hurry.clear()
        return alarm.closed.is_set()

    def _locate(self, alarm: ActiveAlarm, elder: Elder, world: World) -> Situation:
        settings = self._geo_settings
        need = self._planner.staff_needed
        exclude = self._busy.keys() if settings.exclude_busy else ()
        geo = world.geo.lookup(elder.location, k=need, exclude=exclude)
        if exclude and len(geo.responders) < need:
            # More open alarms than free staff (a storm): the nearest busy staff carry
            # this alarm too, rather than every supervisor being texted for each alarm.
            have = {r.id for r in geo.responders}
            shared = tuple(r for r in world.geo.nearest_responders(elder.location, need)
                           if r.id not in have)[:need - len(geo.responders)]
            if shared:
                log.info("responders.shared", shared=[r.id for r in shared],
                         free=len(geo.responders))
                geo = GeoResult(geo.responders + shared, geo.facilities)
        alarm.geo = geo
        self._hold(alarm)
        log.info(
            "responders.found",
            latency_ms=self._since(alarm),
            responders=[{"id": r.id, "name": r.name, "distance_m": round(r.distance_m),
                         "bearing_deg": round(r.bearing_deg), "stale": r.stale}
                        for r in geo.responders[: settings.responders_k]],
            facilities={k.value: {"id": f.id, "name": f.name, "distance_m": round(f.distance_m)}
                        for k, f in geo.facilities.items()},
        )
        if not geo.responders:
            log.warning("responders.none_on_duty", escalate_to="supervisor")
        facts = AlarmFacts(
            ref=alarm.alarm_id, name=elder.name, community=elder.community,
            address=elder.address, received_at=alarm.received_at,
            responder=geo.responders[0].name if geo.responders else None,
        )
        return Situation(elder, facts, geo, supervisors_near(world.registry, world.geo, elder),
                         self._planner.map_url(elder), world.registry.no_sms)

    async def _drill_plan(self, alarm: ActiveAlarm, wave: int,
                          plans: Sequence[NotificationPlan]) -> list[NotificationPlan]:
        """What a drill's wave really sends: only to the people the drill names, each
        SMS marked as a drill; the rest of the plan is journaled, never sent."""
        drill = alarm.drill
        assert drill is not None
        allowed = self._drill_phones(drill)
        sent = [dataclasses.replace(p, body=DRILL_SMS_PREFIX + p.body)
                for p in plans if p.phone in allowed]
        withheld = [p for p in plans if p.phone not in allowed]
        await self._journal_quietly(self._journal.log_event(alarm.alarm_id, "drill.plan", {
            "wave": wave, "dry_run": drill.dry_run,
            "sent": [{"role": p.role, "name": p.name, "to": mask_phone(p.phone)}
                     for p in sent],
            "withheld": [{"role": p.role, "name": p.name, "to": mask_phone(p.phone)}
                         for p in withheld]}))
        log.info("drill.plan", wave=wave, dry_run=drill.dry_run, sent=len(sent),
                 withheld=len(withheld))
        return sent

    def _hold(self, alarm: ActiveAlarm) -> None:
        """Mark the first-wave staff of a located, open alarm busy (never for a drill)."""
        if not self._geo_settings.exclude_busy or alarm.geo is None or alarm.closed.is_set() \
                or alarm.holds or alarm.drill is not None:
            return
        alarm.holds = tuple(r.id for r in alarm.geo.responders[: self._planner.first_wave_staff])
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

    async def _record_plan(
        self, alarm: ActiveAlarm, kind: MessageKind, wave: int | None,
        plans: Sequence[NotificationPlan], *, held: Sequence[NotificationPlan] = (),
    ) -> list[NotificationRecord]:
        """Journal a wave's plans (``held``: supervisor messages for a digest)."""
        try:
            records = await self._journal.plan_notifications(alarm.alarm_id, wave, plans,
                                                             kind=kind, held=held)
        except JournalError as exc:
            # Sending matters more than the record of it: go on from memory, and a
            # digest cannot be built from the journal, so the held go one by one.
            log.critical("journal.write_failed", what="notification plan", error=str(exc))
            self._metrics.journal_errors.inc()
            self._digest.send_anyway(held)
            plans = [*plans, *held]
            now = self._clock()
            records = [memory_record(alarm.alarm_id, kind, wave, p, -(i + 1), now)
                       for i, p in enumerate(plans)]
            self._remember(*records)
            return records
        if held:
            self._metrics.supervisor_held.inc(len(held))
            log.info("supervisor.held", wave=wave, held=len(held),
                     waiting=len(self._digest.budgets.waiting | {p.phone for p in held}))
            self._digest.held(held)
        return records

    def _digestible(self, alarm_id: str) -> tuple[ActiveAlarm, AlarmFacts] | None:
        """An alarm a digest may still name: open and not acknowledged, with its facts."""
        alarm = self.active.get(alarm_id)
        if alarm is None or alarm.closed.is_set() or alarm.elder is None:
            return None
        e = alarm.elder
        return alarm, AlarmFacts(alarm_id, e.name, e.community, e.address, alarm.received_at)

    def _deliver_digest(self, alarm: Any, rec: NotificationRecord) -> None:
        self._spawn(self._notifier.deliver(alarm, rec), f"digest-{rec.id}")

    # -- what the journal could not record yet -------------------------------------

    def _remember(self, *records: NotificationRecord) -> None:
        """SMS planned or sent from memory (the journal could not record them).

        For an alarm whose press is not journaled yet they are held by the journal and
        written with the press; otherwise they are adopted as soon as it can write.
        Either way a restart reconciles or knows them instead of texting again."""
        for rec in records:
            held = self._unjournaled.setdefault(rec.alarm_id, {})
            held[(rec.kind, rec.wave, rec.phone)] = rec
            alarm = self.active.get(rec.alarm_id)
            if alarm is not None and not alarm.durable:
                self._journal.defer_notifications(rec.alarm_id, [rec])
            else:
                self._adopt_soon(rec.alarm_id)

    def adopted(self, alarm_id: str) -> None:
        """The press of an alarm alerted from memory is journaled under its id now."""
        alarm = self.active.get(alarm_id)
        if alarm is not None:
            alarm.durable = True
        if alarm_id in self._unjournaled:
            # Written with the press; adopting again (forwards only) covers any change
            # made while that commit was in flight.
            self._adopt_soon(alarm_id)

    def _adopt_soon(self, alarm_id: str) -> None:
        if alarm_id in self._adopting or self._tg is None:
            return
        self._adopting.add(alarm_id)
        self._spawn(self._adopt(alarm_id), f"adopt-{alarm_id}")

    async def _adopt(self, alarm_id: str) -> None:
        try:
            while held := self._unjournaled.get(alarm_id):
                await self._journal.wait_healthy()
                batch = list(held.items())
                try:
                    await self._journal.adopt_notifications(alarm_id, [r for _, r in batch])
                except JournalError as exc:
                    log.warning("journal.adopt_retry", alarm_id=alarm_id, error=str(exc))
                    await asyncio.sleep(ADOPT_RETRY_S)  # real time: the disk, not the alarm
                    continue
                for key, rec in batch:
                    if held.get(key) is rec:
                        del held[key]
                if not held:
                    del self._unjournaled[alarm_id]
                log.info("journal.adopted", alarm_id=alarm_id, notifications=len(batch))
        finally:
            self._adopting.discard(alarm_id)

    async def _change(self, alarm_id: str, wanted: AlarmState, *, by: str,
                      note: str | None = None) -> AlarmState:
        """A state change: journaled, or for an alarm alerted from memory held by the
        journal and written with its press (so acknowledging it never answers 404)."""
        alarm = self.active.get(alarm_id)
        if alarm is not None and not alarm.durable:
            return self._journal.defer_transition(alarm_id, wanted, by=by, note=note)
        return await self._journal.transition(alarm_id, wanted, by=by, note=note)

    # -- alert -----------------------------------------------------------------

    def announcement(self, alarm_id: str) -> str | None:
        """What the center's alert says for an alarm in flight (None: not in flight);
        the console plays the same words in the operators' browsers."""
        alarm = self.active.get(alarm_id)
        return None if alarm is None else self._spoken(alarm)

    def _spoken(self, alarm: ActiveAlarm) -> str:
        if alarm.elder is not None:
            e = alarm.elder
            facts = AlarmFacts(alarm.alarm_id, e.name, e.community, e.address,
                               alarm.received_at)
            text = self._composer.spoken(facts)
        else:
            text = self._composer.spoken(None, alarm.address_text)
        return DRILL_SPOKEN_PREFIX + text if alarm.drill is not None else text

    async def _start_alert(self, alarm: ActiveAlarm, *, resumed: bool) -> None:
        text = self._spoken(alarm)
        # In its own task: the SMS never wait for the player.
        if self._tg is None:
            raise RuntimeError("dispatcher is not running")
        # A new alarm's press-to-heard is measured; a resumed one was pressed before a restart.
        age_s = None if resumed else self._since(alarm) / 1000
        task = self._tg.create_task(self._alert(alarm, text, age_s),
                                    name=f"alert-{alarm.alarm_id}")
        self._alert_starts.add(task)
        task.add_done_callback(self._alert_starts.discard)

    async def _alert(self, alarm: ActiveAlarm, text: str, age_s: float | None) -> None:
        structlog.contextvars.bind_contextvars(alarm_id=alarm.alarm_id)
        try:
            await self._player.start(alarm.alarm_id, text, age_s=age_s)
        except Exception:
            log.exception("alert.failed")
            return
        self._metrics.alerting.set(self._player.active_count())
        log.info("alert.queued", latency_ms=self._since(alarm))

    def _spawn(self, coro: Coroutine[Any, Any, object], name: str) -> None:
        if self._tg is None:
            coro.close()
            raise RuntimeError("dispatcher is not running")
        self._tg.create_task(self._quiet(coro, name), name=name)

    async def _quiet(self, coro: Coroutine[Any, Any, object], name: str) -> None:
        try:
            await coro
        except Exception:  # side work must never cancel the alarms in the TaskGroup
            log.exception("dispatch.side_task_failed", task=name)

    # -- acknowledgement, cancel, resolve ---------------------------------------------

    async def acknowledge(self, alarm_id: str, by: str, *,
                          phone: str | None = None) -> AlarmState:
        """Someone takes the alarm: stop the alert and the escalation, tell the others.

        Raises IllegalTransition when it was already acknowledged (the first one wins)."""
        previous = await self._change(alarm_id, AlarmState.ACKNOWLEDGED, by=by)
        if previous is AlarmState.ACKNOWLEDGED:
            raise IllegalTransition(alarm_id, previous, AlarmState.ACKNOWLEDGED)
        await self._closed(alarm_id)
        if phone is not None:
            await self._journal_quietly(self._journal.mark_recipient_acknowledged(alarm_id,
                                                                                  phone))
        log.info("alarm.acknowledged", alarm_id=alarm_id, by=by, previous=previous.value)
        self._announce(alarm_id, AlarmState.ACKNOWLEDGED, by=by)
        self._spawn(self._inform(alarm_id, MessageKind.TAKEN, by, skip=phone),
                    f"taken-{alarm_id}")
        return previous

    async def cancel(self, alarm_id: str, by: str) -> AlarmState:
        """The elder (the device) cancelled: stop, and tell everyone already told."""
        previous = await self._change(alarm_id, AlarmState.CANCELLED, by=by)
        await self._closed(alarm_id)
        log.info("alarm.cancelled", alarm_id=alarm_id, by=by, previous=previous.value)
        self._announce(alarm_id, AlarmState.CANCELLED, by=by)
        if previous is not AlarmState.CANCELLED:
            self._spawn(self._inform(alarm_id, MessageKind.CANCELLED, by),
                        f"cancelled-{alarm_id}")
        return previous

    async def resolve(self, alarm_id: str, note: str | None, by: str = "operator") -> AlarmState:
        previous = await self._change(alarm_id, AlarmState.RESOLVED, by=by, note=note)
        await self._closed(alarm_id)
        alarm = self.active.pop(alarm_id, None)
        self._metrics.open_alarms.set(len(self.active))
        log.info("alarm.resolved", alarm_id=alarm_id, by=by, note=note,
                 previous=previous.value, was_active=alarm is not None)
        self._announce(alarm_id, AlarmState.RESOLVED, by=by)
        return previous

    async def _closed(self, alarm_id: str) -> None:
        await self._player.stop(alarm_id)
        self._metrics.alerting.set(self._player.active_count())
        alarm = self.active.get(alarm_id)
        if alarm is not None:
            alarm.closed.set()
            self._release(alarm)

    async def _inform(self, alarm_id: str, kind: MessageKind, by: str,
                      skip: str | None = None) -> None:
        """A short follow-up to everyone already told (taken by ..., cancelled)."""
        structlog.contextvars.bind_contextvars(alarm_id=alarm_id)
        told = [*await self._journal.notifications(alarm_id),
                *self._unjournaled.get(alarm_id, {}).values()]
        alarm = self.active.get(alarm_id)
        if alarm is None:
            record = await self._journal.get_alarm(alarm_id)
            elder = self._world.registry.elders.get(record.elder_id)
            alarm = ActiveAlarm(alarm_id, record.device_id, elder, record.device_id,
                                record.received_at, self._monotonic(),
                                drill=await self._journal.drill_of(alarm_id)
                                if record.drill else None)
        elder = alarm.elder
        facts = AlarmFacts(alarm_id, elder.name if elder else alarm.device_id,
                           elder.community if elder else "", elder.address if elder else "",
                           alarm.received_at)
        plans = self._planner.follow_up(kind, facts, told, by=by.split(":", 1)[-1], skip=skip)
        if alarm.drill is not None:  # only those the drill texted are in ``told``
            plans = [dataclasses.replace(p, body=DRILL_SMS_PREFIX + p.body) for p in plans]
        if not plans:
            return
        started = self._monotonic()
        records = await self._record_plan(alarm, kind, None, plans)
        outcomes = await asyncio.gather(*(self._notifier.deliver(alarm, r) for r in records
                                          if r.state in UNFINISHED_NOTIFICATION_STATES))
        log.info("alarm.informed", kind=kind.value, by=by, recipients=len(records),
                 sent=outcomes.count("accepted"), failed=outcomes.count("failed"),
                 wave_latency_ms=round((self._monotonic() - started) * 1000, 2))

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

    async def reply_received(self, reply: InboundReply) -> str:
        """An inbound SMS (webhook or poller); the answer to text back."""
        return await self.on_reply(reply.from_phone, reply.alarm_ref, reply.intent)

    async def status_received(self, update: StatusUpdate) -> None:
        """A delivery report (webhook or poller)."""
        await self.on_delivery(update.message_sid, update.status, update.error_code)

    async def on_delivery(self, sid: str, status: str, error_code: int | None) -> None:
        """A carrier status for one of our messages (webhook or polling)."""
        found = await self._journal.set_delivery_status(sid, status, error_code)
        if found is None:
            log.info("sms.status_unknown_sid", sid=sid, status=status)
            return
        rec, changed = found
        if not changed:
            return  # a repeated or late report
        self._metrics.deliveries.labels(rec.state.value).inc()
        bound = log.bind(alarm_id=rec.alarm_id, to=mask_phone(rec.phone), role=rec.role,
                         notification_id=rec.id, sid=sid)
        if rec.state is NotificationState.DELIVERED:
            bound.info("sms.delivered")
        elif rec.state in (NotificationState.UNDELIVERED, NotificationState.FAILED):
            bound.error("sms.undelivered", status=status, error_code=error_code,
                        recipient=rec.name)
            self._tell_operator(
                "sms.undelivered", rec.alarm_id,
                f"编号{rec.alarm_id}：发给{rec.name}（{mask_phone(rec.phone)}）的短信未送达"
                f"（{status}，代码 {error_code}），请电话联系")
            alarm = self.active.get(rec.alarm_id)
            if alarm is not None and rec.kind is MessageKind.ESCALATION \
                    and self._notifier.has_fallback:
                # In a task of its own: a GSM send takes seconds, and the carrier's report
                # (a webhook) is answered now.
                self._spawn(self._notifier.deliver_by_fallback(
                    alarm, rec, f"carrier reported {status}"), f"fallback-{rec.id}")

    # -- helpers -------------------------------------------------------------------

    def _tell_operator(self, kind: str, alarm_id: str, text: str) -> None:
        if self._on_notice is None:
            return
        try:
            self._on_notice(Notice(kind, alarm_id, text, self._clock()))
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
        try:
            if await self._change(alarm.alarm_id, state, by="gateway") is not state:
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
        return round((self._monotonic() - alarm.t0 + alarm.waited_s) * 1000, 2)

    def cancel_all(self) -> None:
        """Cancel unfinished alarm and call tasks (shutdown); the journal resumes them."""
        for task in list(self._call_tasks):
            task.cancel()
        for alarm in self.active.values():
            if alarm.task is not None and not alarm.task.done():
                alarm.task.cancel()

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no alarm is sending a wave and no reconciliation row is in hand.

        Alarms waiting for a later wave are idle, and so are rows still queued in the
        backlog: the backlog takes no new row meanwhile (and goes on afterwards), and
        both are rebuilt from the journal on the next start."""
        with self._backlog.paused():
            async with asyncio.timeout(timeout):
                while True:
                    if busy := [a for a in self.active.values() if not a.idle.is_set()]:
                        await asyncio.gather(*(a.idle.wait() for a in busy))
                    elif self._backlog.in_flight:
                        await self._backlog.wait_quiet()
                    else:
                        return
