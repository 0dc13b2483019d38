"""Voice calls through Twilio Programmable Voice: what the callee hears, and placing it.

Theory of operation
-------------------
A call tells the same facts as the SMS and the center's announcement (the same
:class:`~gateway.wording.Composer`), spoken in Mandarin by Twilio's ``<Say>``
(``language="cmn-CN"``, voice configurable): an introduction, the announcement
**twice**, then a one-digit ``<Gather>``: **1** = "I accept / I am going" (the alarm is
acknowledged, like an SMS reply "1"), **2** = "I cannot" (the next person is called at
once), nothing = not accepted. Twilio POSTs the digit to the gather URL on the public
path prefix, signed like every webhook (:mod:`gateway.webhooks`); what the callee hears
next is :func:`digit_twiml`. Behind NAT, where Twilio cannot reach the gateway, a call
still delivers the message (:func:`alarm_twiml` without a gather URL: no ``<Gather>``)
and its status is polled; accepting by digit is what is lost.

The TwiML is inline (``Twiml=``): the call needs nothing from the gateway to speak, so a
webhook outage cannot turn a call silent. TwiML is built with twilio-python's
``VoiceResponse`` (escaping, attribute names), never by string concatenation.

:class:`Caller` places calls with the real twilio-python client through the
:class:`~gateway.sms.TwilioSender` (its timeout, semaphore and error classification):
one request per :meth:`Caller.place`. A throttled (429) or refused-connection request
was never processed and is retried inside ``place``; a timeout or 5xx may have placed
the call, so ``place`` first looks for it (:meth:`Caller.find_placed`, calls to the
number created since the attempt) and retries only when there is none: one ringing
phone per attempt, never two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import structlog
from twilio.twiml.voice_response import VoiceResponse

from gateway.redact import mask_phone
from gateway.sms import SmsSendError, TwilioSender

__all__ = [
    "CALL_EVENTS",
    "FINAL_CALL_STATUSES",
    "CallDigits",
    "CallStatus",
    "CallStatusHandler",
    "CallUpdate",
    "Caller",
    "DigitAnswer",
    "DigitHandler",
    "PlacedCall",
    "alarm_twiml",
    "digit_twiml",
]

log = structlog.get_logger(__name__)

INTRODUCTION: Final = "这里是一键通紧急呼叫中心。"
PROMPT: Final = "接受并前往，请按1。无法前往，请按2。"
NO_DIGIT: Final = "未收到按键。我们将联系其他人员。再见。"
ACCEPTED: Final = "已确认由您处理，谢谢。请尽快前往，家属和指挥中心已收到通知。"
DECLINED: Final = "已记录，我们马上联系下一位人员。再见。"
UNKNOWN_DIGIT: Final = "未识别的按键。"
TAKEN: Final = "此警情已由其他人员接单处理，谢谢。再见。"
#: Twilio's call progress events we ask for (``StatusCallbackEvent``).
CALL_EVENTS: Final = ("initiated", "ringing", "answered", "completed")
#: Statuses after which a call changes no more.
FINAL_CALL_STATUSES: Final = frozenset({"completed", "busy", "no-answer", "failed",
                                        "canceled"})
_MAX_PLACE_ATTEMPTS: Final = 3
_RETRY_DELAY_S: Final = 1.0
CallStatusName = Literal["queued", "initiated", "ringing", "in-progress", "completed",
                         "busy", "no-answer", "failed", "canceled"]


DigitAnswer = Literal["accepted", "taken", "declined", "none", "unknown"]


@dataclass(frozen=True, slots=True)
class CallDigits:
    """The callee's answer to the gather (``digits`` empty: pressed nothing)."""

    call_sid: str
    digits: str
    to: str
    answered_by: str | None  # human / machine_* when machine detection was asked


@dataclass(frozen=True, slots=True)
class CallUpdate:
    """One call progress event (Twilio's ``StatusCallback`` of a call)."""

    call_sid: str
    status: str
    to: str
    answered_by: str | None
    duration_s: int | None
    sequence: int | None  # SequenceNumber: events may arrive out of order

    @property
    def final(self) -> bool:
        return self.status in FINAL_CALL_STATUSES


DigitHandler = Callable[[CallDigits], Awaitable[DigitAnswer]]
CallStatusHandler = Callable[[CallUpdate], Awaitable[None]]


def alarm_twiml(announcement: str, *, gather_url: str | None, language: str = "cmn-CN",
                voice: str | None = None, gather_timeout_s: int = 8) -> str:
    """The TwiML of an alarm call: introduction, ``announcement`` twice, then the
    one-digit gather posting to ``gather_url`` (None: no gather, the message only)."""
    response = VoiceResponse()
    say: dict[str, Any] = {"language": language}
    if voice:
        say["voice"] = voice
    if gather_url is None:
        response.say(INTRODUCTION, **say)
        for _ in range(2):
            response.say(announcement, **say)
        response.hangup()
        return str(response)
    # actionOnEmptyResult: a callee who presses nothing is reported too (Digits="").
    gather = response.gather(num_digits=1, action=gather_url, method="POST",
                             timeout=gather_timeout_s, action_on_empty_result=True)
    gather.say(INTRODUCTION, **say)
    for _ in range(2):
        gather.say(announcement, **say)
    gather.say(PROMPT, **say)
    response.say(NO_DIGIT, **say)  # reached only if Twilio skips the action
    response.hangup()
    return str(response)


def digit_twiml(answer: DigitAnswer, *,
                language: str = "cmn-CN", voice: str | None = None) -> str:
    """What the callee hears after pressing (or not pressing) a digit."""
    text = {"accepted": ACCEPTED, "taken": TAKEN, "declined": DECLINED, "none": NO_DIGIT,
            "unknown": UNKNOWN_DIGIT + NO_DIGIT}[answer]
    response = VoiceResponse()
    say: dict[str, Any] = {"language": language}
    if voice:
        say["voice"] = voice
    response.say(text, **say)
    response.hangup()
    return str(response)


@dataclass(frozen=True, slots=True)
class PlacedCall:
    sid: str
    status: str
    attempts: int
    found: bool = False  # an attempt of unknown outcome had placed it (no second call)


@dataclass(frozen=True, slots=True)
class CallStatus:
    sid: str
    status: str
    answered_by: str | None
    duration_s: int | None

    @property
    def final(self) -> bool:
        return self.status in FINAL_CALL_STATUSES


class Caller:
    """Places and looks up calls from ``from_number`` through ``sender``'s client.

    ``status_callback_url``: Twilio's call progress events go there (None: polled).
    ``ring_timeout_s``: how long a call rings before it counts as ``no-answer``.
    ``machine_detection``: ask Twilio to tell a person from an answering machine
    (``AnsweredBy``), so a voicemail is never taken for an accepted call."""

    def __init__(self, sender: TwilioSender, *, from_number: str,
                 status_callback_url: str | None = None, ring_timeout_s: int = 30,
                 machine_detection: bool = True,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if not 5 <= ring_timeout_s <= 600:
            raise ValueError(f"ring_timeout_s must be 5..600, got {ring_timeout_s}")
        self._sender = sender
        self._from = from_number
        self._callback = status_callback_url
        self._ring_s = ring_timeout_s
        self._amd = machine_detection
        self._clock = clock
        self._sleep = sleep

    def _create_kwargs(self, to: str, twiml: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"to": to, "from_": self._from, "twiml": twiml,
                                  "timeout": self._ring_s}
        if self._callback:
            kwargs["status_callback"] = self._callback
            kwargs["status_callback_method"] = "POST"
            kwargs["status_callback_event"] = list(CALL_EVENTS)
        if self._amd:
            kwargs["machine_detection"] = "Enable"
        return kwargs

    async def place(self, to: str, twiml: str) -> PlacedCall:
        """Place one call; return its sid. Raises :class:`SmsSendError` (the sender's
        typed error: ``permanent`` for an invalid or unreachable number)."""
        client = self._sender.client
        kwargs = self._create_kwargs(to, twiml)
        masked = mask_phone(to)
        for number in range(1, _MAX_PLACE_ATTEMPTS + 1):
            started = self._clock()
            try:
                call = await self._sender.query(
                    "call", lambda: client.calls.create_async(**kwargs), to)
            except SmsSendError as exc:
                if exc.permanent:
                    log.warning("call.refused", to=masked, status=exc.status, code=exc.code)
                    raise
                if exc.outcome_unknown or exc.timed_out or (exc.status or 0) >= 500:
                    # A timeout or 5xx may have placed it: ring once, never twice.
                    found = await self._find_quietly(to, started)
                    if found:
                        log.warning("call.found_after_unknown", to=masked, sid=found[0][0],
                                    attempt=number)
                        return PlacedCall(found[0][0], found[0][1], number, found=True)
                if number == _MAX_PLACE_ATTEMPTS:
                    log.warning("call.not_placed", to=masked, attempts=number,
                                status=exc.status, code=exc.code)
                    raise
                log.info("call.retry", to=masked, attempt=number, status=exc.status,
                         code=exc.code)
                await self._sleep(_RETRY_DELAY_S * number)
                continue
            placed = PlacedCall(str(call.sid), str(call.status), number)
            log.info("call.placed", to=masked, sid=placed.sid, attempts=number)
            return placed
        raise RuntimeError("unreachable: place loop ended without a result")

    async def _find_quietly(self, to: str, since: datetime) -> list[tuple[str, str]]:
        try:
            return await self.find_placed(to, since=since - timedelta(seconds=60))
        except SmsSendError as exc:
            log.warning("call.lookup_failed", to=mask_phone(to), error=str(exc))
            return []

    async def find_placed(self, to: str, *, since: datetime) -> list[tuple[str, str]]:
        """Calls from our number to ``to`` created since ``since`` (newest first), as
        ``(sid, status)``: what a crash or a lost answer may have placed."""
        client = self._sender.client
        calls: Sequence[Any] = await self._sender.query(
            "call list", lambda: client.calls.list_async(to=to, from_=self._from,
                                                         page_size=50, limit=50), to)
        found = []
        for call in calls:
            created = call.date_created
            if created is None or created >= since.replace(microsecond=0):
                found.append((str(call.sid), str(call.status)))
        return found

    async def fetch(self, sid: str) -> CallStatus:
        """The call's status now (for polling behind NAT, and after a restart)."""
        client = self._sender.client
        call = await self._sender.query("call fetch", lambda: client.calls(sid).fetch_async())
        duration = int(call.duration) if call.duration not in (None, "") else None
        return CallStatus(str(call.sid), str(call.status), call.answered_by, duration)
