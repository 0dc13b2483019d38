"""Responders: who is on duty, and what their phones tell the gateway.

A staff phone reports its position, starts and ends a shift and acknowledges alarms
over MQTT; ``devices/responder_app.py`` decodes those messages into typed commands,
and :meth:`ResponderDesk.apply` carries them out. A command is acknowledged to the
broker only after its effect is committed, like a press: when the journal cannot
take it, :class:`devices.links.CommitFailed` goes back to the link, which keeps the
message and tries again.

Duty changes (phone, ``gateway duty``, ``POST /responders/{id}/duty``) are journaled
so that they outlive a restart; each one lasts until it is changed again or until
the roster changes that responder's own ``on_duty`` flag.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from devices.links import CommitFailed
from devices.responder_app import AckCommand, DutyChange, PositionReport, ResponderCommand
from gateway.dispatch import Dispatcher
from gateway.geo import GeoError
from gateway.journal import Journal, JournalError, UnknownAlarm
from gateway.lifecycle import IllegalTransition
from gateway.notices import NoticeBoard
from gateway.world import WorldRef

log = structlog.get_logger(__name__)


class UnknownResponder(LookupError):
    def __init__(self, responder_id: str) -> None:
        super().__init__(f"unknown responder {responder_id!r}")
        self.responder_id = responder_id


class ResponderDesk:
    def __init__(
        self,
        *,
        world: WorldRef,
        journal: Journal,
        dispatcher: Dispatcher,
        notices: NoticeBoard,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._world = world
        self._journal = journal
        self._dispatcher = dispatcher
        self._notices = notices
        self._clock = clock

    # -- commands from phones and consoles --------------------------------------------

    async def apply(self, command: ResponderCommand, source: str) -> None:
        """Carry out one decoded command; returns once its effect is committed.

        Raises CommitFailed when the journal could not take it (the link retries).
        Anything that is merely not applicable (an unknown responder or alarm, an
        alarm already taken) is logged and counts as handled."""
        try:
            if isinstance(command, PositionReport):
                self._position(command)
            elif isinstance(command, DutyChange):
                await self.set_duty(command.responder_id, command.on_duty,
                                    by=f"app:{command.responder_id}")
            elif isinstance(command, AckCommand):
                await self._acknowledge(command)
        except UnknownResponder as exc:
            log.warning("responder.unknown", responder_id=exc.responder_id[:64],
                        command=type(command).__name__, source=source)
        except JournalError as exc:
            raise CommitFailed(str(exc)) from exc

    def _position(self, report: PositionReport) -> None:
        try:
            self._world.geo.update_position(
                report.responder_id, (report.lon, report.lat),
                accuracy_m=report.accuracy_m, timestamp=report.timestamp)
        except GeoError as exc:
            log.warning("responder.bad_position", responder_id=report.responder_id,
                        error=str(exc))

    async def _acknowledge(self, command: AckCommand) -> None:
        responder = self._world.registry.responders.get(command.responder_id)
        if responder is None:
            raise UnknownResponder(command.responder_id)
        try:
            await self._dispatcher.acknowledge(command.alarm_id, f"app:{responder.name}",
                                               phone=responder.phone)
        except (UnknownAlarm, IllegalTransition) as exc:
            log.info("responder.ack_ignored", alarm_id=command.alarm_id,
                     responder_id=command.responder_id, via=command.via, reason=str(exc))

    # -- duty -----------------------------------------------------------------------------

    async def set_duty(self, responder_id: str, on_duty: bool, *, by: str) -> None:
        """Put a responder on or off duty over the roster.

        Raises UnknownResponder, or JournalError when the change cannot be journaled
        (then it is not applied either: a change that a restart would forget is one
        the operator must hear about now, not later)."""
        responder = self._world.registry.responders.get(responder_id)
        if responder is None:
            raise UnknownResponder(responder_id)
        await self._journal.set_duty_override(responder_id, on_duty,
                                              roster_on_duty=responder.on_duty, by=by)
        geo = self._world.geo
        before = geo.stats().on_duty
        geo.set_on_duty(responder_id, on_duty)
        log.info("responder.duty_set", responder_id=responder_id, on_duty=on_duty, by=by)
        after = geo.stats().on_duty
        if before > 0 and after == 0:
            self._notices.notify(
                "responders.none_on_duty", "responders",
                "当前没有在岗的社区人员：新的紧急呼叫将直接通知督导员。")
        elif before == 0 and after > 0:
            self._notices.notify(
                "responders.on_duty", "responders", f"社区人员已恢复在岗（{after}人）。",
                severity="info")

    async def sync_duty(self, *, apply: bool) -> None:
        """Drop the journaled duty overrides the current roster superseded (it changed
        that responder's own flag since); with ``apply``, put the others into effect
        (at start; a reload carries them over in memory)."""
        registry, geo = self._world.registry, self._world.geo
        try:
            for o in await self._journal.duty_overrides():
                responder = registry.responders.get(o.responder_id)
                if responder is None or responder.on_duty != o.roster_on_duty:
                    await self._journal.drop_duty_override(o.responder_id)
                    log.info("responder.duty_override_superseded",
                             responder_id=o.responder_id,
                             roster_on_duty=None if responder is None else responder.on_duty)
                elif apply:
                    geo.set_on_duty(o.responder_id, o.on_duty)
                    log.info("responder.duty_restored", responder_id=o.responder_id,
                             on_duty=o.on_duty, by=o.by)
        except JournalError as exc:  # the roster's flags stand; alarms come first
            log.error("journal.write_failed", what="duty overrides", error=str(exc))
