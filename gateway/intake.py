"""Intake: the gateway's sink for every transport (``devices.links.EventSink``).

:meth:`Intake.handle` returns only after the event is committed to the journal;
transports acknowledge the device (Sur-Gard ACK, MQTT PUBACK) only after it
returns. If the journal cannot commit, an emergency is still dispatched from
memory (the operator hears it and SMS go out) and :class:`CommitFailed` is raised
so that the device is *not* acknowledged: the receiver resends, the MQTT link
retries, and the press is journaled under the id it was alerted with.

Responder-app commands go to the responder desk (:meth:`command`), malformed input is
journaled (:meth:`reject`), and a handler bug is reported to the operator
(:meth:`crashed`). What follows a commit (supervision's notices, the alarm's own
dispatch task) is queued, never awaited here: the device is acknowledged right after
its own commit.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from devices.events import DeviceEvent, DeviceProtocolError, Drill, EventKind, Qualifier
from devices.links import CommitFailed
from devices.responder_app import ResponderCommand
from gateway.dispatch import ActiveAlarm, Dispatcher
from gateway.journal import AlarmRecord, Journal, JournalError, new_alarm_id
from gateway.lifecycle import IllegalTransition
from gateway.metrics import Metrics
from gateway.model import Device, Registry
from gateway.notices import NoticeBoard
from gateway.redact import mask_phone
from gateway.supervision import Supervisor
from gateway.world import WorldRef

log = structlog.get_logger(__name__)

#: A device's stamp (``DeviceEvent.sent_at``) is believed up to this far ahead of the
#: gateway's clock (NTP on both ends: well under a second), and up to a day old (a
#: message queued at the broker while the gateway was down is that late, truly).
CLOCK_AHEAD_S = 2.0
MAX_WAIT_S = 86_400.0


@dataclass(frozen=True, slots=True)
class _Volatile:
    alarm_id: str
    last_press: float


def _shown_address(event: DeviceEvent) -> str:
    if event.address.scheme == "phone":
        return f"phone:{mask_phone(event.address.value)}"
    return str(event.address)


class Intake:
    def __init__(
        self,
        *,
        world: WorldRef,
        journal: Journal,
        dispatcher: Dispatcher,
        metrics: Metrics,
        dedupe_window_s: float,
        notices: NoticeBoard,
        commands: Callable[[ResponderCommand, str], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._journal = journal
        self._world = world
        self._notices = notices
        self._commands = commands
        self.crashes = 0
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._window = dedupe_window_s
        self._clock = clock
        self._monotonic = monotonic
        self._supervisor = supervisor
        # Alarms that could not be journaled (disk full), by device: avoids a new
        # in-memory alarm for every resend while the journal is down.
        self._volatile: dict[str, _Volatile] = {}

    async def handle(self, event: DeviceEvent, source: str, *,
                     received: float | None = None) -> None:
        """Journal one event and start what it calls for. Returns after the commit.

        ``received`` (monotonic, from the transport) starts the alarm's latency clock."""
        t0 = self._monotonic() if received is None else received
        now = self._clock()
        self._metrics.device_messages.labels(source, event.kind.value).inc()
        waited = self._waited(event, source, now)
        reg = self._world.registry
        if event.drill is not None:
            try:
                await self._drill(event, event.drill, source, reg, now, t0)
            except JournalError as exc:
                raise CommitFailed(str(exc)) from exc
            return
        device = reg.device_by_address(event.address)
        try:
            await self._handle(event, source, device, reg, now, t0, waited)
        except JournalError as exc:
            raise CommitFailed(str(exc)) from exc
        finally:
            # After the journal: supervision never delays an alarm.
            if self._supervisor is not None:
                self._supervisor.publish(self._supervisor.observe(
                    source, event, device.device_id if device else None, now))

    def _waited(self, event: DeviceEvent, source: str, now: float) -> float:
        """Seconds between the device's (or its bridge's) stamp and receipt: 0 when it
        has none, or an implausible one (a device clock ahead by more than
        ``CLOCK_AHEAD_S`` or a day behind: counted and logged, receipt is then the
        press)."""
        if event.sent_at is None:
            return 0.0
        waited = now - event.sent_at
        if -CLOCK_AHEAD_S <= waited <= MAX_WAIT_S:
            waited = max(0.0, waited)
            self._metrics.device_wait.observe(waited * 1000)
            return waited
        self._metrics.device_clock_off.inc()
        log.warning("device.clock_off", source=source, address=_shown_address(event),
                    offset_s=round(-waited, 1))
        return 0.0

    async def _handle(self, event: DeviceEvent, source: str, device: Device | None,
                      reg: Registry, now: float, t0: float, waited: float) -> None:
        if event.kind is EventKind.HEARTBEAT:
            return  # receiver liveness only: supervision sees it
        shown = _shown_address(event)
        if device is None:
            await self._unknown(event, source, shown, now, t0, reg, waited)
            return
        bound = log.bind(device_id=device.device_id, source=source)
        if event.kind is EventKind.EMERGENCY and event.qualifier is not Qualifier.RESTORE:
            await self._press(event, source, device.device_id, device.elder_id, shown, now, t0,
                              reg, waited)
            return
        if event.kind is EventKind.CANCEL or (
            event.kind is EventKind.EMERGENCY and event.qualifier is Qualifier.RESTORE
        ):
            await self._journal.record_device_message(
                source=source, address=str(event.address), raw=event.raw, received_at=now,
                device_id=device.device_id, kind="cancel", code=event.code)
            await self._cancel(await self._journal.open_alarm_for_device(device.device_id),
                               f"device:{device.device_id}", bound, "device", code=event.code)
            return
        online = {EventKind.ONLINE: True, EventKind.OFFLINE: False}.get(event.kind)
        await self._journal.record_device_message(
            source=source, address=str(event.address), raw=event.raw, received_at=now,
            device_id=device.device_id, kind=event.kind.value, code=event.code,
            battery_pct=event.battery_pct, voltage_mv=event.voltage_mv,
            link_quality=event.link_quality, online=online)
        level = "warning" if event.kind in (EventKind.LOW_BATTERY, EventKind.TAMPER,
                                            EventKind.POWER_LOSS, EventKind.TROUBLE,
                                            EventKind.INACTIVITY) else "info"
        getattr(bound, level)(f"device.{event.kind.value}", code=event.code,
                              battery_pct=event.battery_pct)

    async def _drill(self, event: DeviceEvent, drill: Drill, source: str, reg: Registry,
                     now: float, t0: float) -> None:
        """A drill press (or its cancel) for a registered device; never a real alarm.

        A drill is journaled before it is acknowledged, like a press, and needs the
        journal: it is never alerted from memory (CommitFailed: the link retries)."""
        bound = log.bind(device_id=drill.device_id, drill=drill.drill_id, by=drill.by,
                         source=source)
        device = reg.devices.get(drill.device_id)
        if device is None:
            bound.error("drill.unknown_device")
            await self._journal.record_device_message(
                source=source, address=str(event.address), raw=event.raw, received_at=now,
                kind="drill", code=event.code, error=f"drill for unknown device "
                                                     f"{drill.device_id!r}")
            return
        if event.kind is EventKind.CANCEL:
            await self._cancel(await self._journal.alarm_for_drill(drill.drill_id),
                               f"drill:{drill.by}", bound, "drill")
            return
        bound.info("drill.received", notify=len(drill.notify), dry_run=drill.dry_run)
        outcome = await self._journal.record_press(
            device_id=device.device_id, elder_id=device.elder_id, code=event.code or "drill",
            source=source, address=str(event.address), raw=event.raw, received_at=now,
            dedupe_window_s=self._window, drill=drill)
        latency = round((self._monotonic() - t0) * 1000, 3)
        if not outcome.new:
            bound.info("drill.joined", alarm_id=outcome.alarm_id, presses=outcome.presses)
            return
        self._metrics.drills.inc()
        bound.warning("drill.journaled", alarm_id=outcome.alarm_id, latency_ms=latency,
                      dry_run=drill.dry_run)
        self._dispatcher.start(ActiveAlarm(
            alarm_id=outcome.alarm_id, device_id=device.device_id,
            elder=reg.elders.get(device.elder_id), address_text=_shown_address(event),
            received_at=now, t0=t0, drill=drill))

    async def _cancel(self, alarm: AlarmRecord | None, by: str, bound: Any, what: str,
                      **fields: Any) -> None:
        """Cancel ``alarm`` (the device's open one, or a drill's); logged as ``what``."""
        if alarm is None:
            bound.info(f"{what}.cancel_without_alarm", **fields)
            return
        try:
            await self._dispatcher.cancel(alarm.alarm_id, by=by)
        except IllegalTransition as exc:
            bound.info(f"{what}.cancel_ignored", alarm_id=alarm.alarm_id, reason=str(exc))

    async def _press(self, event: DeviceEvent, source: str, device_id: str, elder_id: str,
                     shown: str, now: float, t0: float, reg: Registry,
                     waited: float = 0.0) -> None:
        bound = log.bind(device_id=device_id, source=source)
        # Two lines per press: ``press.received`` now (proof that the gateway has it, even
        # if the commit hangs or the process dies before it), and ``alarm.received`` once
        # the journal has said which alarm it is, a new one or an open one it joined
        # (that is only known after the commit), so ``select(.alarm_id == X)`` finds it.
        bound.info("press.received", code=event.code, address=shown)
        # A press alerted from memory (the journal could not commit) keeps that id: its
        # resend, or the link's retry, is journaled under it, with what happened meanwhile.
        volatile = self._volatile.get(device_id)
        if volatile is not None and now - volatile.last_press > self._window:
            volatile = None
        alerted = self._dispatcher.active.get(volatile.alarm_id) if volatile else None
        try:
            outcome = await self._journal.record_press(
                device_id=device_id, elder_id=elder_id, code=event.code or "emergency",
                source=source, address=str(event.address), raw=event.raw, received_at=now,
                dedupe_window_s=self._window,
                alarm_id=volatile.alarm_id if volatile else None,
                alerted_at=alerted.received_at if alerted else None)
        except JournalError as exc:
            self._metrics.journal_errors.inc()
            bound.critical("journal.write_failed", what="press", error=str(exc),
                           action="alarming from memory; device not acknowledged")
            alarm_id = await self._volatile_alarm(device_id, reg, now, t0, shown, waited)
            bound.info("alarm.received", alarm_id=alarm_id, code=event.code, address=shown,
                       journaled=False)
            raise
        latency = round((self._monotonic() - t0) * 1000, 3)
        self._metrics.journal_latency.observe(latency)
        bound.info("alarm.received", alarm_id=outcome.alarm_id, code=event.code, address=shown,
                   journaled=True, new=outcome.new, presses=outcome.presses)
        if outcome.adopted:
            # Already alerted and dispatched under this id: no second start. From now
            # on the dispatcher journals what it does for it.
            self._volatile.pop(device_id, None)
            self._dispatcher.adopted(outcome.alarm_id)
            if outcome.new:
                self._metrics.alarms.labels(source).inc()
            bound.warning("alarm.adopted", alarm_id=outcome.alarm_id, presses=outcome.presses,
                          state=outcome.state.value, latency_ms=latency)
            return
        if not outcome.new:
            self._metrics.presses_joined.inc()
            bound.info("alarm.joined", alarm_id=outcome.alarm_id, presses=outcome.presses,
                       state=outcome.state.value, latency_ms=latency)
            return
        self._metrics.alarms.labels(source).inc()
        bound.info("alarm.journaled", alarm_id=outcome.alarm_id, latency_ms=latency,
                   **({"device_wait_ms": round(waited * 1000, 1)} if waited else {}))
        elder = reg.elders.get(elder_id)
        self._dispatcher.start(ActiveAlarm(
            alarm_id=outcome.alarm_id, device_id=device_id, elder=elder, address_text=shown,
            received_at=now, t0=t0, waited_s=waited))

    async def _volatile_alarm(self, device_id: str, reg: Registry, now: float, t0: float,
                              shown: str, waited: float = 0.0) -> str:
        """Alert a press the journal could not take from memory; returns its alarm id."""
        prev = self._volatile.get(device_id)
        if prev is not None and now - prev.last_press <= self._window:
            self._volatile[device_id] = _Volatile(prev.alarm_id, now)
            return prev.alarm_id
        # Reads work on a full disk: a press that would have joined the device's open,
        # journaled alarm is already being alerted; it is no new alarm.
        try:
            open_alarm = await self._journal.open_alarm_for_device(device_id)
        except JournalError:
            open_alarm = None
        if open_alarm is not None and now - open_alarm.last_press_at <= self._window:
            log.warning("alarm.joined_from_memory", alarm_id=open_alarm.alarm_id,
                        device_id=device_id)
            return open_alarm.alarm_id
        prev = self._volatile.get(device_id)  # a concurrent resend may have alerted it
        if prev is not None and now - prev.last_press <= self._window:
            self._volatile[device_id] = _Volatile(prev.alarm_id, max(now, prev.last_press))
            return prev.alarm_id
        alarm_id = new_alarm_id()
        self._volatile[device_id] = _Volatile(alarm_id, now)
        device = reg.devices.get(device_id)
        elder = reg.elders.get(device.elder_id) if device else None
        self._dispatcher.start(ActiveAlarm(
            alarm_id=alarm_id, device_id=device_id, elder=elder, address_text=shown,
            received_at=now, t0=t0, waited_s=waited, durable=False))
        return alarm_id

    async def _unknown(self, event: DeviceEvent, source: str, shown: str, now: float,
                       t0: float, reg: Registry, waited: float) -> None:
        self._metrics.unknown_devices.inc()
        log.error("device.unknown", source=source, address=shown, kind=event.kind.value,
                  code=event.code)
        if event.kind is EventKind.EMERGENCY and event.qualifier is not Qualifier.RESTORE:
            # Someone pressed a button we do not know: the operator must still hear it,
            # and the alarm is journaled like any other (under a pseudo device id).
            await self._press(event, source, f"unregistered:{event.address}", "", shown, now,
                              t0, reg, waited)
            return
        await self._journal.record_device_message(
            source=source, address=str(event.address), raw=event.raw, received_at=now,
            kind=event.kind.value, code=event.code, error="unknown device")

    async def reject(self, source: str, error: DeviceProtocolError) -> None:
        """Journal malformed input so ops can see what a device sent.

        Raises CommitFailed when the journal cannot take it (the transport keeps it)."""
        self._metrics.protocol_errors.labels(source).inc()
        log.warning("device.malformed", source=source, reason=error.reason,
                    raw=error.raw[:64].hex(), size=len(error.raw))
        try:
            await self._journal.record_device_message(
                source=source, address="?", raw=error.raw, received_at=self._clock(),
                error=error.reason)
        except JournalError as exc:
            log.error("journal.write_failed", what="malformed input", error=str(exc))
            raise CommitFailed(str(exc)) from exc

    async def command(self, command: ResponderCommand, source: str) -> None:
        """A responder-app command; returns once its effect is committed."""
        if self._commands is None:
            log.warning("intake.command_ignored", command=type(command).__name__,
                        source=source)
            return
        await self._commands(command, source)

    def crashed(self, source: str, detail: str, raw: bytes, error: BaseException) -> None:
        """A handler bug on ``raw``: the operator hears it (a critical notice, health
        degraded until acknowledged); the transport journals the message as rejected."""
        self.crashes += 1
        self._metrics.intake_crashes.inc()
        log.critical("intake.crashed", source=source, detail=detail, error=repr(error),
                     raw=raw[:64].hex(), size=len(raw), exc_info=error)
        self._notices.notify(
            "intake.crashed", source,
            f"网关无法处理来自 {source} 的一条消息（{type(error).__name__}），"
            "原始数据已记录。若为紧急呼叫，请立即核实。", severity="critical")
