"""TEST DOUBLE of Twilio Programmable Voice's Calls resource. Never a production path.

The Calls half of :class:`gateway.sandbox.twilio_double.TwilioDouble`: this
module's :class:`CallsMixin` is mixed into it, so calls are served by the same
aiohttp server, under the same base path ``/2010-04-01/Accounts/{AccountSid}``,
behind the same Basic authentication and the same request hook
(``TwilioDouble._intercept``, through which the tests' ``FaultyTwilioDouble``
injects 429s, 5xx, held and dropped answers), with the same JSON error body.
The real twilio-python client (``client.calls.create_async(...)``,
``client.calls(sid).fetch_async()``, ``client.calls.list_async(...)``) works
against it unchanged. Nothing is dialled: no call leaves the machine.

Theory of operation
-------------------

*Creating* a call (``POST .../Calls.json``) validates the form as Twilio
documents it (``To`` and ``From`` required, E.164 or ``client:``; one of
``Url``/``Twiml``; ``Method``, ``StatusCallback*``, ``Timeout``,
``MachineDetection``, ``SendDigits``), answering Twilio's error codes (21201
no To, 21211 bad To, 21213 no From, 21212 bad From, 21205 no or bad Url, 21208
Timeout, 21209 a method, 21609 StatusCallback, 21626 StatusCallbackEvent, 21234
MachineDetection, 21206 SendDigits, 32018 Twiml over 4000 characters, 21218
ApplicationSid: the double has no applications). Unknown parameters are ignored,
as Twilio ignores them, but the whole form is kept on the :class:`PlacedCall`
(``form``, in order, repeated fields once per value) so that a test can check
what the gateway sent against :data:`CALL_CREATE_PARAMETERS`, the documented
list. When both ``Url`` and ``Twiml`` are given Twilio runs the Url and ignores
the Twiml (its warning 32019); so does the double. The answer is 201 with the
call's JSON, status ``queued``.

A call then *stays queued* until the test plays it out with
:meth:`CallsMixin.advance_call`, deterministically and without sleeping: the
callee of the call's ``To`` behaves as scripted with
:meth:`CallsMixin.script_callee` (unscripted numbers: a person answers after
one second, presses nothing and talks five seconds). The ring and talk times
only feed the reported times, computed from the double's injected clock at
the moment ``advance_call`` starts (``t0``):

=============  ===========================================  =====================
outcome        call progress (``CallStatus``)               ends at
=============  ===========================================  =====================
``answer``     initiated, ringing, in-progress, completed   t0 + ring_s + talk_s
``machine``    initiated, ringing, in-progress, completed   t0 + ring_s + talk_s
``busy``       initiated, ringing, busy                     t0 + ring_s
``no-answer``  initiated, ringing, no-answer                t0 + Timeout
``failed``     initiated, failed                            t0
=============  ===========================================  =====================

A callee who would answer after the call's ``Timeout`` does not: the call ends
``no-answer`` at t0 + Timeout, as Twilio gives up ringing. ``duration`` (and
``CallDuration``) counts from the answer, so an unanswered call ends with 0.

With a ``StatusCallback``, each step is POSTed (or GET, per
``StatusCallbackMethod``) there *if the call subscribed to its event* with
``StatusCallbackEvent`` (``initiated``, ``ringing``, ``answered``,
``completed``; none given means ``completed`` only; ``completed`` is sent in
any case), with Twilio's parameter names: ``CallSid``, ``AccountSid``,
``From``, ``To``, ``CallStatus``, ``Direction``, ``ApiVersion``,
``CallbackSource`` (``call-progress-events``), ``SequenceNumber`` (0, 1, ...
per call, over the callbacks sent), ``Timestamp`` (RFC 2822), on the final one
``CallDuration`` (seconds) and ``Duration`` (billed minutes, rounded up), and
``AnsweredBy`` once an answered call had ``MachineDetection``: ``human``, or
for a machine ``machine_start`` (``Enable``) or ``machine_end_beep``
(``DetectMessageEnd``, which waits for the greeting to end). Every request is
signed (``X-Twilio-Signature``) exactly like the message status callbacks.

*Answered* calls run their TwiML: the ``Twiml`` text, or for a ``Url`` call the
answer of a signed request to the Url (``Method``, default POST; on an HTTP
error or a document that is not TwiML, the ``FallbackUrl`` once) with the call's
parameters and ``CallStatus=in-progress``. The first top-level ``<Gather>``
(before any ``<Hangup>``, ``<Reject>`` or ``<Redirect>``, which the double does
not follow) collects the callee's keys: the scripted ``digit`` of a person
(``input`` must include ``dtmf``; ``finishOnKey``, default ``#``, and
``numDigits`` end it as Twilio does); a machine presses nothing. With keys, or
with none when the gather has ``actionOnEmptyResult="true"``, the double
requests its ``action`` (relative URLs resolved against the document's URL;
no action means the document's URL; an inline ``Twiml`` call needs an absolute
one) with ``method`` (default POST), the call's parameters, ``Digits`` and
``FinishedOnKey`` (empty unless ended by that key). The TwiML that answers it
(what the callee heard next) is kept in :attr:`PlacedCall.gather_answers`;
the double runs no further gather. Url and gather requests are recorded in
:attr:`CallsMixin.voice_requests`, status callbacks in
:attr:`CallsMixin.call_callbacks`, and the final status, times, ``answered_by``
and duration land on the call, where fetch and list show them.

Listing (``GET .../Calls.json``) filters on ``To``, ``From``, ``Status``,
``StartTime``/``StartTime>``/``StartTime<`` (a queued call, not started yet,
is matched on its creation time, as messages are on theirs) and
``EndTime``/``EndTime>``/``EndTime<``, newest first, paged exactly like the
Messages list (under ``calls``). Fetching an unknown call is 404, code 20404.

The request hook sees call requests as :class:`~gateway.sandbox.twilio_common.ApiCall`
targets ``call_create``, ``call_list`` and ``call_fetch``.
"""

from __future__ import annotations

import asyncio
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

import structlog
from aiohttp import web
from yarl import URL

from gateway.redact import mask_phone
from gateway.sandbox.twilio_common import (
    API_VERSION,
    E164,
    ApiCall,
    CallbackDelivery,
    HttpMethod,
    error_response,
    invalid_query,
    list_page,
    matches_moment,
    moment_bounds,
    new_sid,
    parse_paging,
    parse_twiml,
    rfc2822,
)

__all__ = [
    "CALL_CREATE_PARAMETERS",
    "CALL_EVENTS",
    "CALL_STATUSES",
    "FINAL_CALL_STATUSES",
    "CalleeOutcome",
    "CalleeScript",
    "CallsMixin",
    "PlacedCall",
]

log = structlog.get_logger("gateway.sandbox.twilio_double")

#: The documented parameters of ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json``
#: (Twilio's Call resource API reference). The double accepts others, as Twilio
#: does, and records them: :attr:`PlacedCall.undocumented_parameters`.
CALL_CREATE_PARAMETERS: Final = frozenset(
    {
        "To",
        "From",
        "Url",
        "Twiml",
        "ApplicationSid",
        "Method",
        "FallbackUrl",
        "FallbackMethod",
        "StatusCallback",
        "StatusCallbackEvent",
        "StatusCallbackMethod",
        "SendDigits",
        "Timeout",
        "Record",
        "RecordingChannels",
        "RecordingStatusCallback",
        "RecordingStatusCallbackMethod",
        "SipAuthUsername",
        "SipAuthPassword",
        "MachineDetection",
        "MachineDetectionTimeout",
        "RecordingStatusCallbackEvent",
        "Trim",
        "CallerId",
        "MachineDetectionSpeechThreshold",
        "MachineDetectionSpeechEndThreshold",
        "MachineDetectionSilenceTimeout",
        "AsyncAmd",
        "AsyncAmdStatusCallback",
        "AsyncAmdStatusCallbackMethod",
        "Byoc",
        "CallReason",
        "CallToken",
        "RecordingTrack",
        "TimeLimit",
        "Transcribe",
        "TranscriptionConfiguration",
    }
)

#: The call progress events a call can subscribe to (``StatusCallbackEvent``), in order.
CALL_EVENTS: Final = ("initiated", "ringing", "answered", "completed")
#: The values of a Call resource's ``status`` (and of the list's ``Status`` filter).
CALL_STATUSES: Final = frozenset(
    {"queued", "ringing", "in-progress", "canceled", "completed", "busy", "failed", "no-answer"}
)
#: Statuses a call does not leave.
FINAL_CALL_STATUSES: Final = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})

#: How a scripted callee reacts: a person answers (and may press a key), the
#: line is busy, nobody answers, the call fails, or an answering machine picks up.
CalleeOutcome = Literal["answer", "busy", "no-answer", "failed", "machine"]
_OUTCOMES: Final = frozenset(get_args(CalleeOutcome))

DEFAULT_TIMEOUT_S: Final = 60
MAX_TIMEOUT_S: Final = 600
MAX_TWIML_CHARS: Final = 4000
_CLIENT = re.compile(r"^client:[A-Za-z0-9_.\-]{1,256}$")
_SIP = re.compile(r"^sip:[^@\s]+@\S+$")
_SEND_DIGITS = re.compile(r"^[0-9*#wW]+$")
_KEYS = re.compile(r"^[0-9*#]+$")
_METHODS: Final[Mapping[str, HttpMethod]] = {"GET": "GET", "POST": "POST"}
_MACHINE_DETECTION: Final = frozenset({"Enable", "DetectMessageEnd"})
# Verbs after which Twilio would not reach a later <Gather> (or, <Redirect>,
# would run another document, which the double does not follow).
_STOPPING_VERBS: Final = frozenset({"Hangup", "Reject", "Redirect"})
_SUBRESOURCES: Final[Mapping[str, str]] = {
    "events": "Events",
    "feedback": "Feedback",
    "notifications": "Notifications",
    "payments": "Payments",
    "recordings": "Recordings",
    "siprec": "Siprec",
    "streams": "Streams",
    "transcriptions": "Transcriptions",
    "user_defined_message_subscriptions": "UserDefinedMessageSubscriptions",
    "user_defined_messages": "UserDefinedMessages",
}


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class PlacedCall:
    """One call the double accepted through ``POST .../Calls.json``.

    Replaced (not mutated) as :meth:`CallsMixin.advance_call` plays it out.

    ``form`` is the create request's whole form as ``(name, value)`` pairs in
    the order sent, a repeated field (``StatusCallbackEvent``) once per value;
    :meth:`form_values` picks one field, :attr:`undocumented_parameters` the
    names not in :data:`CALL_CREATE_PARAMETERS`. ``twiml`` and ``url`` are as
    sent (with both, the Url runs). ``status_callback_events`` are the events
    asked for, in the order sent, ``("completed",)`` when none was (Twilio sends
    ``completed`` to a StatusCallback in any case). ``timeout`` is the ring
    timeout in seconds, ``digits_sent`` the ``SendDigits``. ``url_answer`` is
    the TwiML the Url (or FallbackUrl) answered; ``gather_answers`` the TwiML
    answers to ``<Gather>`` action requests: what the callee heard next.
    """

    sid: str
    to: str
    from_: str
    twiml: str | None
    url: str | None
    method: HttpMethod
    fallback_url: str | None
    fallback_method: HttpMethod
    status_callback: str | None
    status_callback_method: HttpMethod
    status_callback_events: tuple[str, ...]
    timeout: int
    machine_detection: str | None
    form: tuple[tuple[str, str], ...]
    received_at: float  # event-loop (monotonic) time of creation
    date_created: datetime  # UTC, from the injected wall clock
    status: str = "queued"
    answered_by: str | None = None
    duration: int | None = None  # seconds from the answer; set when the call ends
    digits_sent: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    date_updated: datetime | None = None
    url_answer: str | None = None
    gather_answers: tuple[str, ...] = ()

    def form_values(self, name: str) -> tuple[str, ...]:
        """Every value the create form gave ``name``, in order (``()`` if none)."""
        return tuple(value for key, value in self.form if key == name)

    @property
    def undocumented_parameters(self) -> frozenset[str]:
        """Form field names that are not documented create parameters."""
        return frozenset(key for key, _ in self.form) - CALL_CREATE_PARAMETERS


@dataclass(frozen=True, slots=True)
class CalleeScript:
    """How the callee of a number behaves (see :meth:`CallsMixin.script_callee`)."""

    outcome: CalleeOutcome = "answer"
    ring_s: float = 1.0
    digit: str | None = None
    talk_s: float = 5.0


# ----------------------------------------------------------------------------- helpers


def _valid_url(text: str) -> bool:
    try:
        url = URL(text)
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.host)


def _stamp(moment: datetime) -> str:
    return format_datetime(moment.replace(microsecond=0))


def _first_gather(root: ET.Element) -> ET.Element | None:
    for verb in root:
        if verb.tag in _STOPPING_VERBS:
            return None
        if verb.tag == "Gather":
            return verb
    return None


def _gathered(gather: ET.Element, pressed: str | None) -> tuple[str, str]:
    """``(Digits, FinishedOnKey)`` of ``pressed`` keys on ``gather``."""
    if not pressed or "dtmf" not in gather.get("input", "dtmf").split():
        return "", ""
    finish = gather.get("finishOnKey", "#")
    wanted = gather.get("numDigits", "")
    limit = int(wanted) if wanted.isdigit() and int(wanted) > 0 else None
    digits = ""
    for key in pressed:
        if finish and key == finish:
            return digits, key
        digits += key
        if limit is not None and len(digits) >= limit:
            break
    return digits, ""


def _delivered(delivery: CallbackDelivery) -> str | None:
    """The answer of a webhook that answered 2xx, else ``None``."""
    status = delivery.http_status
    if status is None or not 200 <= status < 300:
        return None
    return delivery.answer


# ----------------------------------------------------------------------------- the mixin


class CallsMixin:
    """The Calls resource of :class:`~gateway.sandbox.twilio_double.TwilioDouble`
    (see the module doc). Not usable alone: the double provides the server, the
    clock, the account and the signed webhook client."""

    # Provided by the host double.
    account_sid: str
    _clock: Callable[[], float]

    #: Calls accepted, oldest first.
    calls: list[PlacedCall]
    #: Call status callbacks sent (message status callbacks are in ``callbacks``).
    call_callbacks: list[CallbackDelivery]
    #: TwiML requests of calls: Url (and FallbackUrl) fetches and ``<Gather>`` actions.
    voice_requests: list[CallbackDelivery]

    if TYPE_CHECKING:  # provided by the host double; declared here for the type checker
        async def _send_signed(
            self, method: HttpMethod, url: str, params: dict[str, str], sid: str
        ) -> CallbackDelivery: ...

        def _wrong_account(self, request: web.Request) -> web.Response | None: ...

    # -- wiring (called by the host) ----------------------------------------------

    def _init_calls(self) -> None:
        self.calls = []
        self.call_callbacks = []
        self.voice_requests = []
        self._call_index: dict[str, int] = {}
        self._callees: dict[str, CalleeScript] = {}
        self._call_locks: dict[str, asyncio.Lock] = {}
        self._call_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._call_sequence: dict[str, int] = {}

    def _add_call_routes(self, router: web.UrlDispatcher, base: str) -> None:
        router.add_post(f"{base}/Calls.json", self._create_call, name="call_create")
        router.add_get(f"{base}/Calls.json", self._list_calls, name="call_list")
        router.add_get(f"{base}/Calls/{{call_sid}}.json", self._fetch_call, name="call_fetch")

    def _call_api_call(
        self, request: web.Request, form: Mapping[str, str], authorized: bool
    ) -> ApiCall | None:
        """The :class:`ApiCall` of a Calls request; ``None`` for any other request."""
        target = request.match_info.route.name
        if target == "call_create":
            return ApiCall("call_create", form.get("To"), authorized)
        if target == "call_list":
            return ApiCall("call_list", request.query.get("To"), authorized)
        if target == "call_fetch":
            position = self._call_index.get(request.match_info.get("call_sid", ""))
            to = self.calls[position].to if position is not None else None
            return ApiCall("call_fetch", to, authorized)
        return None

    def _close_calls(self) -> None:
        for _, waiter in self._call_waiters:
            if not waiter.done():
                waiter.set_exception(RuntimeError("TwilioDouble stopped"))
        self._call_waiters.clear()

    # -- scripting -----------------------------------------------------------------

    def script_callee(
        self,
        to: str,
        outcome: CalleeOutcome = "answer",
        *,
        ring_s: float = 1.0,
        digit: str | None = None,
        talk_s: float = 5.0,
    ) -> None:
        """Script the callee of ``to`` for the calls :meth:`advance_call` plays out.

        ``ring_s`` seconds of ringing before a (person's or machine's) answer or
        a busy signal; ``talk_s`` seconds from the answer to the hang-up;
        ``digit``: the keys a person (``answer`` only) presses at a ``<Gather>``,
        e.g. ``"1"`` (``None``: none). Unscripted numbers: a person answers
        after 1 s, presses nothing, talks 5 s.
        """
        if outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(_OUTCOMES)}, got {outcome!r}")
        if not (math.isfinite(ring_s) and ring_s >= 0 and math.isfinite(talk_s) and talk_s >= 0):
            raise ValueError("ring_s and talk_s must be finite and not negative")
        if digit is not None:
            if outcome != "answer":
                raise ValueError("only a person who answers (outcome 'answer') presses keys")
            if not _KEYS.fullmatch(digit):
                raise ValueError(f"digit must be keys 0-9, * or #, got {digit!r}")
        self._callees[to] = CalleeScript(outcome, ring_s, digit, talk_s)

    # The timeout parameter is the documented test-helper API (a bounded wait
    # that reports a clear failure), not a substitute for asyncio.timeout.
    async def wait_for_calls(self, n: int, timeout: float = 5.0) -> list[PlacedCall]:
        """Wait until at least ``n`` calls exist; return all of them.

        Raises ``TimeoutError`` when fewer were created within ``timeout`` seconds.
        """
        if len(self.calls) < n:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (n, waiter)
            self._call_waiters.append(entry)
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            finally:
                if entry in self._call_waiters:
                    self._call_waiters.remove(entry)
        return list(self.calls)

    def call(self, sid: str) -> PlacedCall:
        """The current state of call ``sid`` (``KeyError`` if unknown)."""
        return self.calls[self._call_index[sid]]

    async def advance_call(self, sid: str) -> PlacedCall:
        """Play call ``sid`` out to its end now, as its callee is scripted; return
        its final state.

        Sends the status callbacks it subscribed to and, once answered, its TwiML
        and ``<Gather>`` requests, in order, each awaited (see the module doc).
        A call that is no longer queued is left as it is. ``KeyError`` for an
        unknown sid.
        """
        lock = self._call_locks.setdefault(sid, asyncio.Lock())
        # The lock keeps two concurrent advances from playing one call twice.
        async with lock:
            call = self.call(sid)
            if call.status == "queued":
                await self._play_call(call, self._callees.get(call.to, CalleeScript()))
            return self.call(sid)

    # -- playing a call out --------------------------------------------------------------

    async def _play_call(self, call: PlacedCall, script: CalleeScript) -> None:
        sid = call.sid
        t0 = datetime.fromtimestamp(self._clock(), UTC)
        call = self._update_call(sid, start_time=t0, date_updated=t0)
        await self._call_progress(call, "initiated", "initiated", t0)
        if script.outcome == "failed":
            await self._finish_call(sid, "failed", t0)
            return
        call = self._update_call(sid, status="ringing", date_updated=t0)
        await self._call_progress(call, "ringing", "ringing", t0)
        if script.outcome == "busy":
            await self._finish_call(sid, "busy", t0 + timedelta(seconds=script.ring_s))
            return
        if script.outcome == "no-answer" or script.ring_s > call.timeout:
            await self._finish_call(sid, "no-answer", t0 + timedelta(seconds=call.timeout))
            return
        answered_at = t0 + timedelta(seconds=script.ring_s)
        call = self._update_call(
            sid,
            status="in-progress",
            answered_by=self._answered_by(call, script),
            date_updated=answered_at,
        )
        await self._call_progress(call, "answered", "in-progress", answered_at)
        await self._run_call_twiml(call, script)
        await self._finish_call(
            sid,
            "completed",
            answered_at + timedelta(seconds=script.talk_s),
            duration=round(script.talk_s),
        )

    @staticmethod
    def _answered_by(call: PlacedCall, script: CalleeScript) -> str | None:
        # Twilio reports who answered only when machine detection was asked for.
        if call.machine_detection is None:
            return None
        if script.outcome != "machine":
            return "human"
        return "machine_start" if call.machine_detection == "Enable" else "machine_end_beep"

    async def _finish_call(
        self, sid: str, status: str, end: datetime, *, duration: int = 0
    ) -> None:
        call = self._update_call(
            sid, status=status, end_time=end, duration=duration, date_updated=end
        )
        log.info("twilio_double.call_ended", sid=sid, status=status, to=mask_phone(call.to))
        await self._call_progress(call, "completed", status, end, duration=duration)

    def _update_call(self, sid: str, **changes: Any) -> PlacedCall:
        position = self._call_index[sid]
        updated = replace(self.calls[position], **changes)
        self.calls[position] = updated
        return updated

    def _call_params(self, call: PlacedCall, call_status: str) -> dict[str, str]:
        """The parameters of every request Twilio makes about a call."""
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call.sid,
            "CallStatus": call_status,
            "Direction": "outbound-api",
            "From": call.from_,
            "To": call.to,
        }
        if call.answered_by is not None:
            params["AnsweredBy"] = call.answered_by
        return params

    async def _call_progress(
        self,
        call: PlacedCall,
        event: str,
        call_status: str,
        at: datetime,
        *,
        duration: int | None = None,
    ) -> None:
        """Send the ``event`` status callback, if the call asked for it."""
        url = call.status_callback
        if url is None or (event != "completed" and event not in call.status_callback_events):
            return
        sequence = self._call_sequence.get(call.sid, 0)
        self._call_sequence[call.sid] = sequence + 1
        params = self._call_params(call, call_status)
        params["CallbackSource"] = "call-progress-events"
        params["SequenceNumber"] = str(sequence)
        params["Timestamp"] = _stamp(at)
        if duration is not None:
            params["CallDuration"] = str(duration)
            params["Duration"] = str(math.ceil(duration / 60))
        delivery = await self._send_signed(call.status_callback_method, url, params, call.sid)
        self.call_callbacks.append(delivery)

    async def _run_call_twiml(self, call: PlacedCall, script: CalleeScript) -> None:
        if call.url is not None:
            document, base = await self._fetch_call_twiml(call)
        else:
            document, base = call.twiml, None
        root = parse_twiml(document, call.sid) if document is not None else None
        gather = _first_gather(root) if root is not None else None
        if gather is None:
            return
        pressed = script.digit if script.outcome == "answer" else None
        digits, finished_on = _gathered(gather, pressed)
        if not digits and gather.get("actionOnEmptyResult", "false").lower() != "true":
            return  # Twilio goes on to the next verb without calling the action
        action = gather.get("action")
        if action is None:
            target = base
        elif base is not None:
            target = str(URL(base).join(URL(action)))
        else:
            target = action if _valid_url(action) else None
        if target is None:
            log.warning("twilio_double.gather_without_url", sid=call.sid, action=action)
            return
        method = _METHODS.get(gather.get("method", "POST").upper(), "POST")
        params = {
            **self._call_params(call, "in-progress"),
            "Digits": digits,
            "FinishedOnKey": finished_on,
        }
        delivery = await self._send_signed(method, target, params, call.sid)
        self.voice_requests.append(delivery)
        answer = _delivered(delivery)
        if answer is not None:
            current = self.call(call.sid)
            self._update_call(call.sid, gather_answers=(*current.gather_answers, answer))

    async def _fetch_call_twiml(self, call: PlacedCall) -> tuple[str | None, str | None]:
        """``(TwiML, the URL it came from)`` of a Url call, falling back once to the
        FallbackUrl; ``(None, None)`` when neither gave a TwiML document."""
        params = self._call_params(call, "in-progress")
        for url, method in ((call.url, call.method), (call.fallback_url, call.fallback_method)):
            if url is None:
                continue
            delivery = await self._send_signed(method, url, params, call.sid)
            self.voice_requests.append(delivery)
            answer = _delivered(delivery)
            if answer is not None and parse_twiml(answer, call.sid) is not None:
                self._update_call(call.sid, url_answer=answer)
                return answer, url
        return None, None

    # -- HTTP ------------------------------------------------------------------------

    async def _create_call(self, request: web.Request) -> web.StreamResponse:
        if (wrong := self._wrong_account(request)) is not None:
            return wrong
        posted = await request.post()
        pairs = tuple((key, value) for key, value in posted.items() if isinstance(value, str))
        first: dict[str, str] = {}
        for key, value in pairs:
            first.setdefault(key, value)
        # Empty optional fields count as absent.
        form = {key: value for key, value in first.items() if value}
        events = tuple(
            event for key, value in pairs if key == "StatusCallbackEvent" for event in value.split()
        )
        invalid = self._validate_call(form, events)
        if invalid is not None:
            return invalid
        call = self._record_call(form, events, pairs)
        return web.json_response(self._call_json(call), status=201)

    @staticmethod
    def _validate_call(form: Mapping[str, str], events: tuple[str, ...]) -> web.Response | None:
        to = form.get("To")
        sender = form.get("From")
        if not to:
            return error_response(21201, 400)
        if not (E164.fullmatch(to) or _CLIENT.fullmatch(to) or _SIP.fullmatch(to)):
            return error_response(21211, 400, to=to)
        if not sender:
            return error_response(21213, 400)
        if not (E164.fullmatch(sender) or _CLIENT.fullmatch(sender)):
            return error_response(21212, 400, value=sender)
        url, twiml, application = form.get("Url"), form.get("Twiml"), form.get("ApplicationSid")
        if url is not None and not _valid_url(url):
            return error_response(21205, 400, url=url)
        if twiml is not None and len(twiml) > MAX_TWIML_CHARS:
            return error_response(32018, 400)
        if url is None and twiml is None:
            if application is not None:
                # The double has no applications to look the VoiceUrl up in.
                return error_response(21218, 400, value=application)
            return error_response(21205, 400, url="none given (Url, Twiml or ApplicationSid)")
        for name in ("Method", "FallbackMethod", "StatusCallbackMethod"):
            value = form.get(name)
            if value is not None and value.upper() not in _METHODS:
                return error_response(21209, 400, name=name, value=value)
        fallback = form.get("FallbackUrl")
        if fallback is not None and not _valid_url(fallback):
            return error_response(21205, 400, url=fallback)
        callback = form.get("StatusCallback")
        if callback is not None and not _valid_url(callback):
            return error_response(21609, 400, url=callback)
        unknown = [event for event in events if event not in CALL_EVENTS]
        if unknown:
            return error_response(21626, 400, value=" ".join(unknown))
        timeout = form.get("Timeout")
        if timeout is not None and not (timeout.isdigit() and 1 <= int(timeout) <= MAX_TIMEOUT_S):
            return error_response(21208, 400, value=timeout)
        detection = form.get("MachineDetection")
        if detection is not None and detection not in _MACHINE_DETECTION:
            return error_response(21234, 400, value=detection)
        digits = form.get("SendDigits")
        if digits is not None and not _SEND_DIGITS.fullmatch(digits):
            return error_response(21206, 400, value=digits)
        return None

    def _record_call(
        self,
        form: Mapping[str, str],
        events: tuple[str, ...],
        pairs: tuple[tuple[str, str], ...],
    ) -> PlacedCall:
        now = datetime.fromtimestamp(self._clock(), UTC)
        url, twiml = form.get("Url"), form.get("Twiml")
        if url is not None and twiml is not None:
            log.warning("twilio_double.call_url_and_twiml", note="warning 32019: using Url")
        timeout = form.get("Timeout")
        call = PlacedCall(
            sid=new_sid("CA"),
            to=form["To"],
            from_=form["From"],
            twiml=twiml,
            url=url,
            method=_METHODS[form.get("Method", "POST").upper()],
            fallback_url=form.get("FallbackUrl"),
            fallback_method=_METHODS[form.get("FallbackMethod", "POST").upper()],
            status_callback=form.get("StatusCallback"),
            status_callback_method=_METHODS[form.get("StatusCallbackMethod", "POST").upper()],
            status_callback_events=tuple(dict.fromkeys(events)) or ("completed",),
            timeout=int(timeout) if timeout is not None else DEFAULT_TIMEOUT_S,
            machine_detection=form.get("MachineDetection"),
            form=pairs,
            received_at=asyncio.get_running_loop().time(),
            date_created=now,
            date_updated=now,
            digits_sent=form.get("SendDigits"),
        )
        self._call_index[call.sid] = len(self.calls)
        self.calls.append(call)
        log.info("twilio_double.call_created", sid=call.sid, to=mask_phone(call.to))
        for wanted, waiter in list(self._call_waiters):
            if len(self.calls) >= wanted and not waiter.done():
                waiter.set_result(None)
        return call

    def _call_json(self, call: PlacedCall) -> dict[str, Any]:
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{call.sid}"
        return {
            "account_sid": self.account_sid,
            "annotation": None,
            "answered_by": call.answered_by,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": rfc2822(call.date_created),
            "date_updated": rfc2822(call.date_updated),
            "direction": "outbound-api",
            "duration": None if call.duration is None else str(call.duration),
            "end_time": rfc2822(call.end_time),
            "forwarded_from": None,
            "from": call.from_,
            "from_formatted": call.from_,
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": None,
            "price": None,
            "price_unit": "USD",
            "queue_time": "0",
            "sid": call.sid,
            "start_time": rfc2822(call.start_time),
            "status": call.status,
            "subresource_uris": {key: f"{uri}/{name}.json" for key, name in _SUBRESOURCES.items()},
            "to": call.to,
            "to_formatted": call.to,
            "trunk_sid": None,
            "uri": f"{uri}.json",
        }

    async def _fetch_call(self, request: web.Request) -> web.StreamResponse:
        if (wrong := self._wrong_account(request)) is not None:
            return wrong
        position = self._call_index.get(request.match_info["call_sid"])
        if position is None:
            return error_response(20404, 404, path=request.path)
        return web.json_response(self._call_json(self.calls[position]))

    async def _list_calls(self, request: web.Request) -> web.StreamResponse:
        if (wrong := self._wrong_account(request)) is not None:
            return wrong
        query = request.query
        try:
            page, page_size = parse_paging(query)
            started = moment_bounds(query, "StartTime")
            ended = moment_bounds(query, "EndTime")
        except ValueError:
            return invalid_query("Invalid paging, StartTime or EndTime filter")
        status = query.get("Status")
        if status is not None and status not in CALL_STATUSES:
            return invalid_query(f"Invalid Status: {status}")

        def keep(call: PlacedCall) -> bool:
            if "To" in query and call.to != query["To"]:
                return False
            if "From" in query and call.from_ != query["From"]:
                return False
            if status is not None and call.status != status:
                return False
            if "ParentCallSid" in query:
                return False  # the double places no child calls
            when = call.start_time or call.date_created
            if not all(matches_moment(when, bound, rel) for bound, rel in started):
                return False
            end = call.end_time
            if end is None:
                return not ended
            return all(matches_moment(end, bound, rel) for bound, rel in ended)

        return web.json_response(
            list_page(
                query,
                [call for call in reversed(self.calls) if keep(call)],  # newest first
                self._call_json,
                key="calls",
                path=f"/{API_VERSION}/Accounts/{self.account_sid}/Calls.json",
                page=page,
                page_size=page_size,
            )
        )
