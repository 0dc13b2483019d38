"""The calls of an alarm: placed, followed, and a pressed 1 turned into an acknowledgement.

Theory of operation
-------------------
The dispatcher hands each wave's :class:`~gateway.escalation.CallWave` to
:meth:`CallDesk.wave`, in a task of its own (a call takes a minute; the SMS of the wave
never wait for it):

* **single calls** (the first family contacts, anyone no SMS reaches: landlines) are
  journaled ``placing`` and placed at once, in parallel;
* a **call tree** (the wave's staff, nearest first) is journaled ``planned``; then one
  call at a time: ``placing``, placed, followed until it ends; pressed 1 ends the tree
  (the alarm is taken), anything else (2, busy, no answer, failed, a machine, no digit)
  moves on to the next at once. The tree stops when the alarm closes by any channel,
  and after ``voice.tree_max_s``; the calls it did not reach are ``skipped``.

Every call is journaled before its request leaves, so a restart never places a second
call for one attempt: a row left ``placing`` is looked up at Twilio first
(:meth:`gateway.voice.Caller.find_placed`) and placed only if Twilio has none. A tree
resumes at its first call that has not ended.

What happens on a call reaches the desk as Twilio's status callbacks and the gather's
digit (:mod:`gateway.webhooks`, signed), or, behind NAT, by polling each call every
``voice.poll_s``. Events are idempotent: a final state is never left, so a redelivered
or late callback changes nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import structlog

from gateway.aio import first_of
from gateway.config import VoiceSection
from gateway.escalation import CallWave
from gateway.journal import CallRecord, CallState, Journal, JournalError
from gateway.metrics import Metrics
from gateway.redact import mask_phone
from gateway.sms import SmsSendError
from gateway.voice import (
    CallDigits,
    Caller,
    CallUpdate,
    DigitAnswer,
    alarm_twiml,
)

__all__ = ["CallDesk"]

log = structlog.get_logger(__name__)

# After its ring timeout and the announcement, a call that said nothing more is over.
_TALK_MARGIN_S: Final = 120.0
# Longest wait of an early progress event for its call's sid to be journaled.
_SID_WAIT_S: Final = 10.0
_STATUS_STATES: Final = {
    "busy": CallState.BUSY, "no-answer": CallState.NO_ANSWER, "failed": CallState.FAILED,
    "canceled": CallState.FAILED,
}

class Ringer(Protocol):
    """Rings a number without speech (the GSM modem: ``gateway.gsm.GsmModemSender``)."""

    async def ring(self, to: str, ring_s: float) -> None: ...


#: ``acknowledge(alarm_id, by, phone)``: True if this call took the alarm, False if it
#: was already taken.
Acknowledge = Callable[[str, str, str], Awaitable[bool]]


class CallDesk:
    """Owns every call of every alarm (one task per wave's calls, in the dispatcher's
    TaskGroup)."""

    def __init__(self, *, journal: Journal, caller: Caller, settings: VoiceSection,
                 gather_url: str | None, callbacks: bool, acknowledge: Acknowledge,
                 decline: Callable[[str], None],
                 ringer: Ringer | None = None, ring_s: float = 0.0,
                 metrics: Metrics | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """``gather_url``: where Twilio posts the digit (None: no accept by digit).
        ``callbacks``: Twilio's status callbacks reach the gateway (else: polled).
        ``ringer``: when Twilio cannot place a call, ring the number this way for
        ``ring_s`` seconds (the GSM modem; no speech, no digit)."""
        self._journal = journal
        self._caller = caller
        self._s = settings
        self._gather_url = gather_url
        self._callbacks = callbacks
        self._acknowledge = acknowledge
        self._decline = decline
        self._ringer = ringer if ring_s > 0 else None
        self._ring_s = ring_s
        self._metrics = metrics
        self._monotonic = monotonic
        self._sleep = sleep
        self._ended: dict[str, asyncio.Event] = {}  # sid -> set when the call ended
        self._t0: dict[str, float] = {}  # sid -> the press (monotonic), for latencies
        # Placements whose sid is not journaled yet: Twilio's first progress events can
        # arrive before the answer to our request does.
        self._in_flight: set[asyncio.Future[None]] = set()
        self.placed = 0

    def _twiml(self, text: str) -> str:
        return alarm_twiml(text, gather_url=self._gather_url, language=self._s.language,
                           voice=self._s.voice, gather_timeout_s=self._s.gather_timeout_s)

    # -- a wave's calls ------------------------------------------------------------------

    async def wave(self, alarm_id: str, number: int, calls: CallWave, *, t0: float,
                   closed: asyncio.Event) -> None:
        """Place wave ``number``'s calls of ``alarm_id``; returns when its tree is done.

        ``t0`` (monotonic) is the press, for latencies; ``closed`` is set when the
        alarm is acknowledged, cancelled or resolved. Never raises but CancelledError."""
        structlog.contextvars.bind_contextvars(alarm_id=alarm_id)
        try:
            await self._wave(alarm_id, number, calls, t0, closed)
        except asyncio.CancelledError:
            raise
        except JournalError as exc:
            log.critical("journal.write_failed", what="calls", error=str(exc))
        except Exception:
            log.exception("call.wave_failed", wave=number)

    async def _wave(self, alarm_id: str, number: int, calls: CallWave, t0: float,
                    closed: asyncio.Event) -> None:
        texts = {c.phone: c.text for c in (*calls.single, *calls.tree)}
        if calls.single:
            rows = await self._journal.plan_calls(alarm_id, number, calls.single, tree=False)
            placed = await asyncio.gather(*(self._place(r, texts.get(r.phone, ""), t0)
                                            for r in rows if r.state is CallState.PLACING))
            if not self._callbacks:  # behind NAT: follow them by polling, in parallel
                await asyncio.gather(*(self._until_ended(r.sid, self._s.tree_max_s, closed)
                                       for r in placed if r.sid and not r.state.final))
        if calls.tree and not closed.is_set():
            rows = await self._journal.plan_calls(alarm_id, number, calls.tree, tree=True)
            await self._tree([r for r in rows if r.tree], texts, t0, closed)

    async def resume(self, alarm_id: str, rows: list[CallRecord], text: str, *,
                     t0: float, closed: asyncio.Event) -> None:
        """After a restart: calls left ``placing`` are looked up (placed only if Twilio
        has none), calls in progress followed again, and each tree goes on at its first
        call that has not ended. Never raises but CancelledError."""
        structlog.contextvars.bind_contextvars(alarm_id=alarm_id)
        texts = {row.phone: text for row in rows}  # every call of an alarm says the same
        try:
            for row in rows:
                if row.tree:
                    continue
                if row.state is CallState.PLACING:
                    await self._place(row, texts.get(row.phone, ""), t0, resumed=True)
                elif row.state in (CallState.PLACED, CallState.ANSWERED) and row.sid:
                    self._follow(row.sid)
                    await self._refresh(row)
            waves = sorted({r.wave for r in rows if r.tree})
            for wave in waves:
                tree = [r for r in rows if r.tree and r.wave == wave]
                await self._tree(tree, texts, t0, closed, resumed=True)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("call.resume_failed")

    async def _tree(self, rows: list[CallRecord], texts: dict[str, str], t0: float,
                    closed: asyncio.Event, *, resumed: bool = False) -> None:
        started = self._monotonic()
        for i, row in enumerate(rows):
            if row.state.final:
                if row.state is CallState.ACCEPTED:
                    return
                continue
            left = self._s.tree_max_s - (self._monotonic() - started)
            if closed.is_set() or left <= 0:
                await self._skip(rows[i:], "alarm closed" if closed.is_set() else
                                 f"call tree over its {self._s.tree_max_s:g} s")
                return
            if row.state in (CallState.PLANNED, CallState.PLACING):
                row = await self._place(row, texts.get(row.phone, ""), t0,
                                        resumed=resumed and row.state is CallState.PLACING)
            elif resumed and row.sid:
                self._follow(row.sid)
                row = await self._refresh(row)
            if row.state is CallState.ACCEPTED:
                return
            if row.sid is None or row.state.final:
                continue  # not placed (refused), or ended while we were down: the next
            ended = await self._until_ended(row.sid, left, closed)
            latest = await self._journal.call_by_sid(row.sid)
            if latest is not None and latest.state is CallState.ACCEPTED:
                return
            if not ended and not closed.is_set():
                log.warning("call.tree_moves_on", sid=row.sid, reason="no end reported")
        log.warning("call.tree_exhausted", calls=len(rows))

    async def _skip(self, rows: list[CallRecord], reason: str) -> None:
        for row in rows:
            if not row.state.final and row.state is CallState.PLANNED:
                await self._update(row, CallState.SKIPPED, error=reason)

    async def _place(self, row: CallRecord, text: str, t0: float, *,
                     resumed: bool = False) -> CallRecord:
        bound = log.bind(to=mask_phone(row.phone), role=row.role, wave=row.wave)
        if resumed:
            found = await self._lookup(row)
            if found is not None:
                return found
        if row.state is CallState.PLANNED:
            row = await self._update(row, CallState.PLACING)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_flight.add(done)
        try:
            return await self._placing(row, text, t0, bound)
        finally:
            self._in_flight.discard(done)
            done.set_result(None)

    async def _placing(self, row: CallRecord, text: str, t0: float,
                       bound: structlog.typing.FilteringBoundLogger) -> CallRecord:
        try:
            placed = await self._caller.place(row.phone, self._twiml(text))
        except SmsSendError as exc:
            bound.error("call.failed", status=exc.status, code=exc.code, error=str(exc),
                        permanent=exc.permanent, fallback=bool(self._ringer and
                                                               not exc.permanent),
                        latency_ms=round((self._monotonic() - t0) * 1000, 1))
            if self._ringer is not None and not exc.permanent:
                return await self._ring(row, str(exc), t0, bound)
            return await self._update(
                row, CallState.FAILED, error=str(exc)[:500],
                event=("call.failed", {"to": mask_phone(row.phone), "code": exc.code}))
        latency = round((self._monotonic() - t0) * 1000, 1)
        self.placed += 1
        bound.info("call.placed", sid=placed.sid, latency_ms=latency, attempts=placed.attempts)
        row = await self._update(
            row, CallState.PLACED, sid=placed.sid, status=placed.status,
            attempts=placed.attempts, latency_ms=latency,
            event=("call.placed", {"to": mask_phone(row.phone), "sid": placed.sid,
                                   "role": row.role}))
        self._follow(placed.sid)
        self._t0[placed.sid] = t0
        return row

    async def _ring(self, row: CallRecord, why: str, t0: float,
                    bound: structlog.typing.FilteringBoundLogger) -> CallRecord:
        """Twilio could not place the call: ring the number from the GSM modem."""
        assert self._ringer is not None
        try:
            await self._ringer.ring(row.phone, self._ring_s)
        except SmsSendError as exc:
            bound.error("call.ring_failed", error=str(exc))
            return await self._update(
                row, CallState.FAILED, error=f"{why}; GSM modem: {exc}"[:500],
                event=("call.failed", {"to": mask_phone(row.phone), "gsm": str(exc)[:200]}))
        latency = round((self._monotonic() - t0) * 1000, 1)
        bound.warning("call.rang_by_modem", ring_s=self._ring_s, latency_ms=latency)
        return await self._update(
            row, CallState.RANG, error=why[:500], latency_ms=latency,
            event=("call.rang_by_modem", {"to": mask_phone(row.phone),
                                          "ring_s": self._ring_s}))

    async def _lookup(self, row: CallRecord) -> CallRecord | None:
        """A call left ``placing`` by a crash: Twilio's, if it was placed."""
        since = datetime.fromtimestamp(row.created_at, UTC)
        try:
            found = await self._caller.find_placed(row.phone, since=since)
        except SmsSendError as exc:
            log.warning("call.lookup_failed", to=mask_phone(row.phone), error=str(exc))
            return None
        if not found:
            return None
        sid, status = found[-1]  # the oldest since the row: the one this row placed
        log.warning("call.found_after_restart", sid=sid, to=mask_phone(row.phone))
        updated = await self._update(row, CallState.PLACED, sid=sid, status=status)
        self._follow(sid)
        return await self._refresh(updated)

    async def _refresh(self, row: CallRecord) -> CallRecord:
        """After a restart: the call's status now (it may have ended while we were down,
        and its callbacks with it)."""
        if row.sid is None:
            return row
        try:
            status = await self._caller.fetch(row.sid)
        except SmsSendError as exc:
            log.warning("call.fetch_failed", sid=row.sid, error=str(exc))
            return row
        await self.status_received(CallUpdate(row.sid, status.status, row.phone,
                                              status.answered_by, status.duration_s, None))
        return await self._journal.call_by_sid(row.sid) or row

    def _follow(self, sid: str) -> None:
        self._ended.setdefault(sid, asyncio.Event())

    async def _until_ended(self, sid: str, limit_s: float, closed: asyncio.Event) -> bool:
        """Wait until the call ended (callback or polled), the alarm closed, or the
        call's longest plausible duration (bounded by ``limit_s``) passed."""
        ended = self._ended.setdefault(sid, asyncio.Event())
        bound = min(limit_s, self._s.ring_timeout_s + self._s.gather_timeout_s + _TALK_MARGIN_S)
        await first_of(ended.wait(), closed.wait(), self._sleep(bound),
                       # With callbacks too, now and then: a callback lost while the gateway
                       # was down (or a proxy hiccup) must not hold a call tree until its
                       # bound.
                       self._poll(sid, self._s.poll_s if not self._callbacks
                                  else max(6 * self._s.poll_s, 30.0)))
        return ended.is_set()

    async def _poll(self, sid: str, every_s: float) -> None:
        while True:
            await self._sleep(every_s)
            try:
                status = await self._caller.fetch(sid)
            except SmsSendError as exc:
                log.warning("call.poll_failed", sid=sid, error=str(exc))
                continue
            await self.status_received(CallUpdate(sid, status.status, "", status.answered_by,
                                                  status.duration_s, None))
            if status.final:
                return

    # -- what Twilio tells ---------------------------------------------------------------

    async def status_received(self, update: CallUpdate) -> None:
        """A call progress event (webhook or poll). Unknown sids are logged, not errors."""
        row = await self._row_for(update.call_sid)
        if row is None:
            log.warning("call.status_unknown_sid", sid=update.call_sid, status=update.status)
            return
        state = self._state_for(row, update)
        machine = (update.answered_by or "").startswith("machine")
        event = None
        ringing = update.status == "ringing" and row.status != "ringing"
        if (state is not row.state or ringing) and not row.state.final:
            name = {CallState.ANSWERED: "call.answered", CallState.MACHINE: "call.machine",
                    CallState.PLACED: "call.ringing"}.get(state, f"call.{state.value}")
            event = (name, {"to": mask_phone(row.phone), "sid": row.sid,
                            "status": update.status})
            log.info(name, sid=row.sid, to=mask_phone(row.phone), status=update.status,
                     answered_by=update.answered_by, latency_ms=self._latency(row.sid))
        updated = await self._update(row, state, status=update.status,
                                     answered_by=update.answered_by, event=event)
        if updated.state.final or update.final or machine:
            self._end(update.call_sid)

    async def _row_for(self, sid: str) -> CallRecord | None:
        """The call ``sid``, waiting (bounded) for placements still journaling theirs."""
        row = await self._journal.call_by_sid(sid)
        if row is None and self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=_SID_WAIT_S)
            row = await self._journal.call_by_sid(sid)
        return row

    @staticmethod
    def _state_for(row: CallRecord, update: CallUpdate) -> CallState:
        status = update.status
        if (update.answered_by or "").startswith("machine"):
            return CallState.MACHINE
        if status in _STATUS_STATES:
            return _STATUS_STATES[status]
        if status == "in-progress":
            return CallState.ANSWERED
        if status == "completed":
            return CallState.UNANSWERED if row.state in (CallState.PLACED,
                                                         CallState.ANSWERED) else row.state
        return CallState.PLACED if row.state is CallState.PLACING else row.state

    async def digits_received(self, digits: CallDigits) -> DigitAnswer:
        """The callee pressed ``digits.digits`` (or nothing); what they hear next."""
        row = await self._row_for(digits.call_sid)
        if row is None:
            log.warning("call.digits_unknown_sid", sid=digits.call_sid)
            return "none"
        bound = log.bind(sid=row.sid, to=mask_phone(row.phone), alarm_id=row.alarm_id)
        if row.state in (CallState.ACCEPTED, CallState.DECLINED):
            # Twilio retrying a webhook it thinks failed: the same answer, nothing done.
            bound.info("call.digits_repeated", state=row.state.value)
            return "accepted" if row.state is CallState.ACCEPTED else "declined"
        key = digits.digits[:1]
        if key == "1":
            taken = await self._acknowledge(row.alarm_id, f"call:{row.name}", row.phone)
            await self._update(
                row, CallState.ACCEPTED, digits="1",
                event=("call.accepted", {"to": mask_phone(row.phone), "by": row.name,
                                         "took_it": taken}))
            bound.warning("call.accepted", by=row.name, took_it=taken,
                          latency_ms=self._latency(row.sid))
            self._end(digits.call_sid)
            return "accepted" if taken else "taken"
        if key == "2":
            await self._update(
                row, CallState.DECLINED, digits="2",
                event=("call.declined", {"to": mask_phone(row.phone), "by": row.name}))
            bound.info("call.declined", by=row.name)
            self._decline(row.alarm_id)
            self._end(digits.call_sid)
            return "declined"
        await self._update(row, CallState.UNANSWERED, digits=key or None,
                           event=("call.no_digit", {"to": mask_phone(row.phone),
                                                    "digits": key}))
        bound.info("call.no_digit", digits=key)
        self._end(digits.call_sid)
        return "unknown" if key else "none"

    async def _update(self, row: CallRecord, state: CallState, **fields: Any) -> CallRecord:
        """Journal a move of the call ``row``; count it in the metrics when it ends here."""
        updated = await self._journal.update_call(row.id, state, **fields)
        if self._metrics is not None and updated.state.final and not row.state.final:
            self._metrics.calls.labels(updated.state.value).inc()
        return updated

    def _latency(self, sid: str | None) -> float | None:
        """ms since the press of the alarm the call ``sid`` is for (if placed here)."""
        t0 = self._t0.get(sid or "")
        return None if t0 is None else round((self._monotonic() - t0) * 1000, 1)

    def _end(self, sid: str) -> None:
        self._ended.setdefault(sid, asyncio.Event()).set()
        self._t0.pop(sid, None)

