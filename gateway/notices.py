"""Operator notices: what the operator must see that is not an alarm.

A notice (a device gone silent, a receiver down, a message the gateway could not
process, an SMS that cannot be delivered) is *raised* by whoever notices it --
supervision, intake, dispatch -- with a synchronous, non-blocking call. The
:class:`NoticeBoard` owns everything a notice then costs: the log line, the journal
row, the MQTT publish on ``alarm/notices`` and, for a critical one, the sound in the
center until an operator acknowledges it. It does that in its own task, so a notice
never sits in the path between a device's message and its acknowledgement (a press
is acknowledged right after its own commit).

While a critical notice sounds, :attr:`NoticeBoard.critical` is non-empty and the
gateway's health is degraded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from gateway.alert import AlertPlayer
from gateway.journal import Journal, JournalError

log = structlog.get_logger(__name__)

Severity = Literal["info", "warning", "critical"]
NOTICE_TOPIC = "alarm/notices"


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the operator must see that is not an alarm."""

    kind: str  # device.offline | receiver.down | intake.crashed | sms.outage | ...
    subject: str  # device id, channel name, alarm id
    text: str
    at: float
    severity: Severity = "warning"


Publish = Callable[[str, bytes], Awaitable[bool]]

# A notice that reports a condition is over silences the one that reported it.
_CLEARS = (".up", ".online", ".recovered", ".over")


class NoticeBoard:
    """Queues notices from anywhere and handles them, in order, in :meth:`run`."""

    def __init__(
        self,
        *,
        journal: Journal,
        player: AlertPlayer | None = None,
        publish: Publish | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._journal = journal
        self._player = player
        self._publish = publish
        self._clock = clock
        self._queue: deque[Notice] = deque()
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._memory_ids = 0
        # subject -> alert id of the critical notice sounding for it
        self._sounding: dict[str, str] = {}
        self.raised = 0
        self.raised_by_kind: dict[str, int] = {}  # the gateway_notices metric reads it

    def attach(self, *, player: AlertPlayer | None = None, publish: Publish | None = None) -> None:
        """Late wiring: the alert player and the MQTT link start after the board."""
        if player is not None:
            self._player = player
        if publish is not None:
            self._publish = publish

    # -- input: synchronous, never blocks, never raises ------------------------------

    def raise_notice(self, notice: Notice) -> None:
        """Queue ``notice``; it is logged, journaled, published and sounded by :meth:`run`."""
        self.raised += 1
        self.raised_by_kind[notice.kind] = self.raised_by_kind.get(notice.kind, 0) + 1
        self._queue.append(notice)
        self._idle.clear()
        self._ready.set()

    def notify(self, kind: str, subject: str, text: str,
               severity: Severity = "warning") -> None:
        self.raise_notice(Notice(kind, subject, text, self._clock(), severity))

    # -- state -----------------------------------------------------------------------

    @property
    def critical(self) -> dict[str, str]:
        """Critical notices sounding now: subject -> alert id."""
        return dict(self._sounding)

    async def wait_idle(self) -> None:
        """Until every queued notice has been handled (tests, shutdown)."""
        await self._idle.wait()

    # -- the owner task ----------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._queue:
                notice = self._queue.popleft()
                try:
                    await self._handle(notice)
                except Exception:  # a notice must never stop the next one
                    log.exception("notice.failed", kind=notice.kind, subject=notice.subject)
            self._idle.set()

    async def _handle(self, notice: Notice) -> None:
        level = {"critical": "critical", "info": "info"}.get(notice.severity, "warning")
        getattr(log, level)(f"notice.{notice.kind}", subject=notice.subject, text=notice.text)
        notice_id: int | None = None
        try:
            notice_id = await self._journal.record_notice(
                at=notice.at, kind=notice.kind, subject=notice.subject,
                severity=notice.severity, text=notice.text)
        except JournalError as exc:  # the operator still sees and hears it
            log.error("journal.write_failed", what="notice", kind=notice.kind, error=str(exc))
        if self._publish is not None:
            await self._publish(NOTICE_TOPIC, json.dumps(_payload(notice, notice_id),
                                                         ensure_ascii=False).encode())
        await self._sound(notice, notice_id)

    async def _sound(self, notice: Notice, notice_id: int | None) -> None:
        if notice.severity == "critical":
            if notice_id is None:
                self._memory_ids += 1
                alert_id = f"notice-m{self._memory_ids}"
            else:
                alert_id = f"notice-{notice_id}"
            previous = self._sounding.get(notice.subject)
            self._sounding[notice.subject] = alert_id
            if self._player is not None:
                if previous is not None:
                    await self._player.stop(previous)
                await self._player.start(alert_id, notice.text)
        elif notice.kind.endswith(_CLEARS):
            sounding = self._sounding.pop(notice.subject, None)
            if sounding is not None and self._player is not None:
                await self._player.stop(sounding)

    # -- operator action ---------------------------------------------------------------

    async def acknowledge(self, notice_id: int, by: str) -> bool:
        """An operator saw notice ``notice_id``: journaled, and its sound stops.

        Raises JournalError when the acknowledgement cannot be journaled (the notice
        keeps sounding: an acknowledgement nobody can prove is not one)."""
        done = await self._journal.ack_notice(notice_id, by)
        alert_id = f"notice-{notice_id}"
        for subject, sounding in list(self._sounding.items()):
            if sounding == alert_id:
                del self._sounding[subject]
        if self._player is not None:
            await self._player.stop(alert_id)
        log.info("notice.acknowledged", notice_id=notice_id, by=by, found=done)
        return done


def _payload(notice: Notice, notice_id: int | None) -> dict[str, Any]:
    return {"id": notice_id, "kind": notice.kind, "subject": notice.subject,
            "severity": notice.severity, "text": notice.text, "at": notice.at}
