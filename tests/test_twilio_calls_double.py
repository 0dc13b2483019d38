"""The Twilio double's Calls resource, exercised over real HTTP.

As in tests/test_twilio_double.py, most checks go through the real
twilio-python async client pointed at the double (through ``TwilioSender``,
whose ``client`` has ``api.base_url`` set to the double); raw aiohttp requests
show exact status codes, JSON bodies and repeated form fields. A small aiohttp
app stands in for the gateway's voice endpoints (status callback, TwiML Url,
``<Gather>`` action) and records what the double sent, so signatures are
checked with twilio's own ``RequestValidator``.

Nothing here sleeps: ``advance_call`` plays a call out, awaiting every
webhook, and the reported times come from a fake wall clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from gateway.config import SmsSection
from gateway.sandbox.twilio_calls import CALL_CREATE_PARAMETERS, CallsMixin, PlacedCall
from gateway.sandbox.twilio_double import TwilioDouble
from gateway.sms import TwilioAccount, TwilioSender
from tests.support.twilio_api import FakeClock, basic
from tests.support.twilio_faults import Fault, FaultyTwilioDouble

pytestmark = pytest.mark.integration

OUR_NUMBER = "+15005550006"
CALLEE = "+8613800000001"
OTHER_CALLEE = "+8613900000002"
SAY = '<?xml version="1.0" encoding="UTF-8"?><Response><Say>张大爷按下了求助按钮</Say></Response>'
HEARD_NEXT = '<?xml version="1.0" encoding="UTF-8"?><Response><Say>已确认</Say></Response>'

#: What every request about a call carries (status callbacks, Url, gather action).
CALL_PARAMS = {"AccountSid", "ApiVersion", "CallSid", "CallStatus", "Direction", "From", "To"}
#: What a status callback adds.
PROGRESS_PARAMS = CALL_PARAMS | {"CallbackSource", "SequenceNumber", "Timestamp"}
ALL_EVENTS = ["initiated", "ringing", "answered", "completed"]


def calls_url(d: TwilioDouble, account: str | None = None) -> str:
    return f"{d.base_url}/2010-04-01/Accounts/{account or d.account_sid}/Calls.json"


async def post_call(
    http: aiohttp.ClientSession,
    d: TwilioDouble,
    form: dict[str, str] | list[tuple[str, str]],
    **kw: Any,
) -> tuple[int, dict[str, Any]]:
    headers = kw.pop("headers", basic(d.account_sid, d.auth_token))
    url = kw.pop("url", calls_url(d))
    async with http.post(url, data=form, headers=headers, **kw) as resp:
        return resp.status, await resp.json()


def sender_for(d: TwilioDouble) -> TwilioSender:
    section = SmsSection.model_validate(
        {
            "from_number": OUR_NUMBER,
            "base_url": d.base_url,
            "request_timeout_s": 2.0,
            "max_attempts": 1,
        }
    )
    return TwilioSender(section, TwilioAccount(d.account_sid, d.auth_token))


@pytest.fixture
async def client(double: FaultyTwilioDouble) -> AsyncIterator[Any]:
    """The real twilio-python client, pointed at the double."""
    async with sender_for(double) as sender:
        yield sender.client


# ----------------------------------------------------------------------------- voice app


@dataclass(frozen=True)
class Seen:
    """One request the double made to the voice app."""

    method: str
    path: str
    url: str
    params: dict[str, str]  # the POST form, or the GET query
    signature: str


class VoiceApp:
    """Stands in for the gateway's voice endpoints: records, answers as told."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.answers: dict[str, tuple[int, str]] = {}
        self.base = ""

    def url(self, path: str) -> str:
        return self.base + path

    def at(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            params = {k: str(v) for k, v in (await request.post()).items()}
        else:
            params = dict(request.query)
        self.seen.append(
            Seen(
                request.method,
                request.path,
                str(request.url),
                params,
                request.headers.get("X-Twilio-Signature", ""),
            )
        )
        status, body = self.answers.get(request.path, (204, ""))
        if not body:
            return web.Response(status=status)
        return web.Response(status=status, text=body, content_type="text/xml")


@pytest.fixture
async def app() -> AsyncIterator[VoiceApp]:
    voice = VoiceApp()
    server = web.Application()
    server.router.add_route("*", "/{tail:.*}", voice.handle)
    runner = web.AppRunner(server, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    voice.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield voice
    finally:
        await runner.cleanup()


def signed(d: TwilioDouble, seen: Seen) -> bool:
    """Whether ``seen`` carries a valid Twilio signature for the double's token."""
    validator = RequestValidator(d.auth_token)
    if seen.method == "GET":
        return bool(validator.validate(seen.url, {}, seen.signature))
    return bool(validator.validate(seen.url, seen.params, seen.signature))


def gather_twiml(action: str | None, *, on_empty: bool = False, **attrs: Any) -> str:
    """A TwiML document with a one-digit gather, built as the gateway builds it."""
    response = VoiceResponse()
    if action is not None:
        attrs["action"] = action
    if on_empty:
        attrs["action_on_empty_result"] = True
    gather = response.gather(**attrs)
    gather.say("接受并前往，请按1。")
    response.say("未收到按键。")
    return str(response)


# ----------------------------------------------------------------------------- create


async def test_create_with_twiml_answers_201_with_twilio_shaped_json(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    status, payload = await post_call(
        http, double, {"To": CALLEE, "From": OUR_NUMBER, "Twiml": SAY}
    )

    assert status == 201
    sid = payload["sid"]
    assert sid.startswith("CA")
    assert len(sid) == 34
    assert int(sid[2:], 16) >= 0
    assert payload["account_sid"] == double.account_sid
    assert (payload["to"], payload["from"]) == (CALLEE, OUR_NUMBER)
    assert payload["status"] == "queued"
    assert payload["direction"] == "outbound-api"
    assert payload["api_version"] == "2010-04-01"
    assert parsedate_to_datetime(payload["date_created"]) == clock.moment
    for empty in ("start_time", "end_time", "duration", "answered_by", "price", "parent_call_sid"):
        assert payload[empty] is None, empty
    assert payload["uri"] == f"/2010-04-01/Accounts/{double.account_sid}/Calls/{sid}.json"
    assert payload["subresource_uris"]["recordings"] == (
        f"/2010-04-01/Accounts/{double.account_sid}/Calls/{sid}/Recordings.json"
    )
    [call] = double.calls
    assert call == double.call(sid)
    assert (call.to, call.from_, call.twiml, call.url) == (CALLEE, OUR_NUMBER, SAY, None)
    assert (call.status_callback, call.status_callback_method) == (None, "POST")
    assert call.status_callback_events == ("completed",)
    assert (call.timeout, call.machine_detection, call.digits_sent) == (60, None, None)
    assert (call.status, call.answered_by, call.duration) == ("queued", None, None)
    assert call.form == (("To", CALLEE), ("From", OUR_NUMBER), ("Twiml", SAY))


async def test_real_client_creates_a_url_call_and_fetches_it(
    double: FaultyTwilioDouble, client: Any, app: VoiceApp
) -> None:
    created = await client.calls.create_async(
        to=CALLEE,
        from_=OUR_NUMBER,
        url=app.url("/voice/answer"),
        method="GET",
        status_callback=app.url("/voice/status"),
        status_callback_event=["initiated", "answered"],
        status_callback_method="GET",
        timeout=20,
        machine_detection="DetectMessageEnd",
        send_digits="ww1",
    )
    fetched = await client.calls(created.sid).fetch_async()

    [call] = double.calls
    assert (created.sid, created.status) == (call.sid, "queued")
    assert (fetched.sid, fetched.status, fetched.to, fetched._from) == (
        call.sid,
        "queued",
        CALLEE,
        OUR_NUMBER,
    )
    assert fetched.direction == "outbound-api"
    assert fetched.date_created == call.date_created
    assert (call.url, call.twiml, call.method) == (app.url("/voice/answer"), None, "GET")
    assert call.status_callback == app.url("/voice/status")
    assert call.status_callback_method == "GET"
    assert call.status_callback_events == ("initiated", "answered")
    assert call.form_values("StatusCallbackEvent") == ("initiated", "answered")
    assert (call.timeout, call.machine_detection, call.digits_sent) == (
        20,
        "DetectMessageEnd",
        "ww1",
    )
    # What the real client sends is all documented.
    assert {name for name, _ in call.form} <= CALL_CREATE_PARAMETERS
    assert call.undocumented_parameters == frozenset()


async def test_url_wins_over_twiml_like_twilio(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession, app: VoiceApp
) -> None:
    app.answers["/voice/answer"] = (200, SAY)
    form = {
        "To": CALLEE,
        "From": OUR_NUMBER,
        "Twiml": gather_twiml("http://x/y"),
        "Url": app.url("/voice/answer"),
    }
    status, payload = await post_call(http, double, form)
    double.script_callee(CALLEE, digit="1")
    call = await double.advance_call(payload["sid"])

    assert status == 201
    assert [s.path for s in app.seen] == ["/voice/answer"]  # the Twiml's gather never ran
    assert call.url_answer == SAY
    assert call.gather_answers == ()


def form_with(**changes: str | None) -> dict[str, str]:
    form: dict[str, str | None] = {"To": CALLEE, "From": OUR_NUMBER, "Twiml": SAY, **changes}
    return {k: v for k, v in form.items() if v is not None}


@pytest.mark.parametrize(
    ("form", "code"),
    [
        (form_with(To=None), 21201),
        (form_with(To=""), 21201),
        (form_with(To="13800000001"), 21211),
        (form_with(To="+86 138 0000 0001"), 21211),
        (form_with(From=None), 21213),
        (form_with(From="not a number"), 21212),
        (form_with(Twiml=None), 21205),
        (form_with(Twiml=None, Url="/voice/answer"), 21205),
        (form_with(Twiml=None, Url="ftp://example.com/x"), 21205),
        (form_with(Twiml="<Response>" + "x" * 4000 + "</Response>"), 32018),
        (form_with(Twiml=None, ApplicationSid="AP" + "ab" * 16), 21218),
        (form_with(Method="PUT"), 21209),
        (form_with(FallbackMethod="DELETE"), 21209),
        (form_with(StatusCallbackMethod="PATCH"), 21209),
        (form_with(FallbackUrl="nowhere"), 21205),
        (form_with(StatusCallback="not a url"), 21609),
        (form_with(StatusCallback="http://cb/x", StatusCallbackEvent="hungup"), 21626),
        (form_with(Timeout="0"), 21208),
        (form_with(Timeout="601"), 21208),
        (form_with(Timeout="ten"), 21208),
        (form_with(Timeout="-5"), 21208),
        (form_with(MachineDetection="true"), 21234),
        (form_with(SendDigits="12a"), 21206),
    ],
)
async def test_validation_errors_like_twilio(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession, form: dict[str, str], code: int
) -> None:
    status, payload = await post_call(http, double, form)

    assert status == 400
    assert payload["code"] == code
    assert payload["status"] == 400
    assert payload["more_info"] == f"https://www.twilio.com/docs/errors/{code}"
    assert payload["message"]
    assert double.calls == []


async def test_validation_error_surfaces_in_the_real_client(
    double: FaultyTwilioDouble, client: Any
) -> None:
    with pytest.raises(TwilioRestException) as caught:
        await client.calls.create_async(to="12345", from_=OUR_NUMBER, twiml=SAY)

    assert (caught.value.status, caught.value.code) == (400, 21211)
    assert double.calls == []


@pytest.mark.parametrize(
    "form",
    [
        form_with(To="client:grid-leader_7"),
        form_with(To="sip:duty@pbx.example.com"),
        form_with(From="client:gateway"),
        form_with(Timeout="1"),
        form_with(Timeout="600"),
        form_with(Method="get", MachineDetection="Enable", SendDigits="1w#*"),
    ],
)
async def test_accepts_what_twilio_accepts(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession, form: dict[str, str]
) -> None:
    status, _ = await post_call(http, double, form)

    assert status == 201
    assert len(double.calls) == 1


async def test_unknown_parameters_are_ignored_but_recorded_with_repeats(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    form = [
        ("To", CALLEE),
        ("From", OUR_NUMBER),
        ("Twiml", SAY),
        ("StatusCallback", "http://127.0.0.1:9/cb"),
        ("StatusCallbackEvent", "ringing"),
        ("StatusCallbackEvent", "initiated answered"),  # space-separated works too
        ("StatusCallbackEvent", "ringing"),
        ("IfMachine", "Continue"),  # long retired: Twilio ignores it
    ]
    status, _ = await post_call(http, double, form)

    [call] = double.calls
    assert status == 201
    assert call.form == tuple(form)
    assert call.form_values("StatusCallbackEvent") == ("ringing", "initiated answered", "ringing")
    assert call.status_callback_events == ("ringing", "initiated", "answered")
    assert call.undocumented_parameters == frozenset({"IfMachine"})
    assert call.machine_detection is None


# ----------------------------------------------------------------------------- auth, fetch


@pytest.mark.parametrize(
    ("headers", "account", "status", "code"),
    [
        ({}, None, 401, 20003),
        (basic("AC" + "11" * 16, "whatever"), None, 401, 20003),
        (None, "AC" + "22" * 16, 404, 20404),
    ],
)
async def test_auth_and_account_are_checked_like_messages(
    double: FaultyTwilioDouble,
    http: aiohttp.ClientSession,
    headers: dict[str, str] | None,
    account: str | None,
    status: int,
    code: int,
) -> None:
    kw: dict[str, Any] = {"url": calls_url(double, account)}
    if headers is not None:
        kw["headers"] = headers
    answered, payload = await post_call(http, double, form_with(), **kw)

    assert (answered, payload["code"]) == (status, code)
    assert double.calls == []


async def test_fetch_unknown_call_is_404_20404(client: Any) -> None:
    with pytest.raises(TwilioRestException) as caught:
        await client.calls("CA" + "0" * 32).fetch_async()

    assert (caught.value.status, caught.value.code) == (404, 20404)


# ----------------------------------------------------------------------------- list


async def test_list_filters_by_to_from_status_and_times(
    double: FaultyTwilioDouble, client: Any, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    start = clock.moment
    early = await client.calls.create_async(to=CALLEE, from_=OUR_NUMBER, twiml=SAY)
    await double.advance_call(early.sid)  # starts now, ends 6 s later (1 s ring, 5 s talk)
    clock.advance(3600)
    middle = await client.calls.create_async(to=OTHER_CALLEE, from_=OUR_NUMBER, twiml=SAY)
    clock.advance(3600)
    status, late = await post_call(
        http, double, {"To": CALLEE, "From": "+15005550007", "Twiml": SAY}
    )
    assert status == 201

    to_callee = await client.calls.list_async(to=CALLEE)
    ours = await client.calls.list_async(from_=OUR_NUMBER)
    completed = await client.calls.list_async(status="completed")
    queued = await client.calls.list_async(status="queued")
    started_by = await client.calls.list_async(start_time_before=start)  # inclusive
    after = await client.calls.list_async(start_time_after=start + timedelta(minutes=30))
    # A date goes as a string: the client would send a date object as midnight.
    same_day = await client.calls.list_async(start_time=start.date().isoformat())
    next_day = await client.calls.list_async(
        start_time=(start + timedelta(days=1)).date().isoformat()
    )
    ended_by = await client.calls.list_async(end_time_before=start + timedelta(minutes=1))

    assert [c.sid for c in to_callee] == [late["sid"], early.sid]  # newest first
    assert [c.sid for c in ours] == [middle.sid, early.sid]
    assert [c.sid for c in completed] == [early.sid]
    assert completed[0].duration == "5"
    assert completed[0].start_time == start
    assert completed[0].end_time == start + timedelta(seconds=6)
    assert [c.sid for c in queued] == [late["sid"], middle.sid]
    assert [c.sid for c in started_by] == [early.sid]
    # Queued calls have no start_time: they are matched on their creation time.
    assert [c.sid for c in after] == [late["sid"], middle.sid]
    assert len(same_day) == 3
    assert next_day == []
    assert [c.sid for c in ended_by] == [early.sid]


async def test_list_pages_are_followed_by_the_client(
    double: FaultyTwilioDouble, client: Any
) -> None:
    for n in range(5):
        await client.calls.create_async(to=f"+861380000000{n}", from_=OUR_NUMBER, twiml=SAY)

    page = await client.calls.page_async(page_size=2)
    everything = await client.calls.list_async(page_size=2)

    assert page.next_page_url is not None
    assert [c.to for c in everything] == [f"+861380000000{n}" for n in (4, 3, 2, 1, 0)]


@pytest.mark.parametrize(
    "query", [{"Status": "hungup"}, {"StartTime>": "yesterday"}, {"PageSize": "many"}]
)
async def test_list_rejects_bad_filters_with_20001(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession, query: dict[str, str]
) -> None:
    async with http.get(
        calls_url(double), params=query, headers=basic(double.account_sid, double.auth_token)
    ) as resp:
        payload = await resp.json()

    assert (resp.status, payload["code"]) == (400, 20001)


# ----------------------------------------------------------------------------- outcomes

S = timedelta(seconds=1)


@pytest.mark.parametrize(
    ("outcome", "statuses", "offsets", "answered_by", "duration"),
    [
        (
            "answer",
            ["initiated", "ringing", "in-progress", "completed"],
            [0, 0, 3, 45],
            "human",
            42,
        ),
        (
            "machine",
            ["initiated", "ringing", "in-progress", "completed"],
            [0, 0, 3, 45],
            "machine_start",
            42,
        ),
        ("busy", ["initiated", "ringing", "busy"], [0, 0, 3], None, 0),
        ("no-answer", ["initiated", "ringing", "no-answer"], [0, 0, 20], None, 0),
        ("failed", ["initiated", "failed"], [0, 0], None, 0),
    ],
)
async def test_scripted_outcome_callback_sequence(
    double: FaultyTwilioDouble,
    client: Any,
    app: VoiceApp,
    clock: FakeClock,
    outcome: Any,
    statuses: list[str],
    offsets: list[int],
    answered_by: str | None,
    duration: int,
) -> None:
    created = await client.calls.create_async(
        to=CALLEE,
        from_=OUR_NUMBER,
        twiml=SAY,
        status_callback=app.url("/voice/status"),
        status_callback_event=ALL_EVENTS,
        timeout=20,
        machine_detection="Enable",
    )
    clock.advance(30)  # t0 is when the call is played out, not when it was created
    t0 = clock.moment
    double.script_callee(CALLEE, outcome, ring_s=3, talk_s=42)
    final = await double.advance_call(created.sid)

    seen = app.at("/voice/status")
    assert [s.params["CallStatus"] for s in seen] == statuses
    assert [s.params["SequenceNumber"] for s in seen] == [str(n) for n in range(len(seen))]
    assert [parsedate_to_datetime(s.params["Timestamp"]) for s in seen] == [
        t0 + n * S for n in offsets
    ]
    for n, s in enumerate(seen):
        expected = set(PROGRESS_PARAMS)
        answered = answered_by is not None and s.params["CallStatus"] in (
            "in-progress",
            "completed",
        )
        if answered:
            expected.add("AnsweredBy")
        if n == len(seen) - 1:
            expected |= {"CallDuration", "Duration"}
        assert set(s.params) == expected, s.params["CallStatus"]
        assert s.method == "POST"
        assert signed(double, s)
        assert s.params["CallSid"] == created.sid
        assert (s.params["From"], s.params["To"]) == (OUR_NUMBER, CALLEE)
        assert s.params["AccountSid"] == double.account_sid
        assert (s.params["Direction"], s.params["ApiVersion"]) == ("outbound-api", "2010-04-01")
        assert s.params["CallbackSource"] == "call-progress-events"
        if answered:
            assert s.params["AnsweredBy"] == answered_by
    last = seen[-1].params
    assert (last["CallDuration"], last["Duration"]) == (str(duration), "1" if duration else "0")
    assert [d.http_status for d in double.call_callbacks] == [204] * len(seen)
    # The final state is on the call, and in what fetch answers.
    fetched = await client.calls(created.sid).fetch_async()
    assert (final.status, fetched.status) == (statuses[-1], statuses[-1])
    assert fetched.duration == str(duration)
    assert fetched.answered_by == answered_by
    assert fetched.start_time == t0
    assert fetched.end_time == t0 + offsets[-1] * S
    assert final.duration == duration


@pytest.mark.parametrize(
    ("events", "statuses"),
    [
        (None, ["completed"]),
        (["ringing"], ["ringing", "completed"]),
        (["answered", "initiated"], ["initiated", "in-progress", "completed"]),
    ],
)
async def test_only_subscribed_events_are_sent_and_completed_always(
    double: FaultyTwilioDouble,
    client: Any,
    app: VoiceApp,
    events: list[str] | None,
    statuses: list[str],
) -> None:
    kwargs: dict[str, Any] = {"status_callback": app.url("/voice/status")}
    if events is not None:
        kwargs["status_callback_event"] = events
    created = await client.calls.create_async(to=CALLEE, from_=OUR_NUMBER, twiml=SAY, **kwargs)
    await double.advance_call(created.sid)

    seen = app.at("/voice/status")
    assert [s.params["CallStatus"] for s in seen] == statuses
    assert [s.params["SequenceNumber"] for s in seen] == [str(n) for n in range(len(seen))]
    # No machine detection asked: nobody says who answered.
    assert all("AnsweredBy" not in s.params for s in seen)


async def test_no_status_callback_means_no_callbacks_but_the_call_ends(
    double: FaultyTwilioDouble, client: Any
) -> None:
    created = await client.calls.create_async(
        to=CALLEE, from_=OUR_NUMBER, twiml=SAY, status_callback_event=ALL_EVENTS
    )
    final = await double.advance_call(created.sid)

    assert double.call_callbacks == []
    assert (final.status, final.duration, final.answered_by) == ("completed", 5, None)


@pytest.mark.parametrize(
    ("detection", "outcome", "answered_by"),
    [
        ("Enable", "answer", "human"),
        ("Enable", "machine", "machine_start"),
        ("DetectMessageEnd", "answer", "human"),
        ("DetectMessageEnd", "machine", "machine_end_beep"),
        (None, "machine", None),
    ],
)
async def test_answered_by_follows_machine_detection(
    double: FaultyTwilioDouble,
    http: aiohttp.ClientSession,
    app: VoiceApp,
    detection: str | None,
    outcome: Any,
    answered_by: str | None,
) -> None:
    form = form_with(StatusCallback=app.url("/voice/status"), MachineDetection=detection)
    _, payload = await post_call(http, double, form)
    double.script_callee(CALLEE, outcome)
    final = await double.advance_call(payload["sid"])

    [completed] = app.at("/voice/status")
    assert completed.params.get("AnsweredBy") == answered_by
    assert final.answered_by == answered_by


async def test_ringing_past_the_timeout_is_no_answer(
    double: FaultyTwilioDouble, client: Any, clock: FakeClock
) -> None:
    created = await client.calls.create_async(to=CALLEE, from_=OUR_NUMBER, twiml=SAY, timeout=10)
    double.script_callee(CALLEE, "answer", ring_s=15)
    final = await double.advance_call(created.sid)

    assert (final.status, final.duration) == ("no-answer", 0)
    assert final.end_time == clock.moment + 10 * S


async def test_status_callback_by_get_is_signed_over_the_query(
    double: FaultyTwilioDouble, client: Any, app: VoiceApp
) -> None:
    created = await client.calls.create_async(
        to=CALLEE,
        from_=OUR_NUMBER,
        twiml=SAY,
        status_callback=app.url("/voice/status?alarm=7"),
        status_callback_method="GET",
    )
    await double.advance_call(created.sid)

    [completed] = app.seen
    assert completed.method == "GET"
    assert completed.params["alarm"] == "7"  # the callback URL's own query is kept
    assert completed.params["CallStatus"] == "completed"
    assert completed.params["To"] == CALLEE  # "+" survives the query encoding
    assert signed(double, completed)
    assert double.call_callbacks[0].url == completed.url


async def test_unreachable_status_callback_is_recorded_and_the_call_ends(
    double: FaultyTwilioDouble, client: Any
) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    created = await client.calls.create_async(
        to=CALLEE,
        from_=OUR_NUMBER,
        twiml=SAY,
        status_callback=f"http://127.0.0.1:{port}/cb",
        status_callback_event=ALL_EVENTS,
    )
    final = await double.advance_call(created.sid)

    assert final.status == "completed"
    assert len(double.call_callbacks) == 4
    assert all(d.http_status is None and d.error for d in double.call_callbacks)


# ----------------------------------------------------------------------------- gather


async def test_gather_digit_on_inline_twiml_is_posted_signed(
    double: FaultyTwilioDouble, client: Any, app: VoiceApp
) -> None:
    app.answers["/voice/gather"] = (200, HEARD_NEXT)
    twiml = gather_twiml(app.url("/voice/gather"), num_digits=1, method="POST")
    created = await client.calls.create_async(
        to=CALLEE,
        from_=OUR_NUMBER,
        twiml=twiml,
        machine_detection="Enable",
        status_callback=app.url("/voice/status"),
        status_callback_event=ALL_EVENTS,
    )
    double.script_callee(CALLEE, digit="1")
    final = await double.advance_call(created.sid)

    # The key press lands between the answer and the hang-up.
    assert [(s.path, s.params["CallStatus"]) for s in app.seen] == [
        ("/voice/status", "initiated"),
        ("/voice/status", "ringing"),
        ("/voice/status", "in-progress"),
        ("/voice/gather", "in-progress"),
        ("/voice/status", "completed"),
    ]
    [gather] = app.at("/voice/gather")
    assert gather.method == "POST"
    assert signed(double, gather)
    assert set(gather.params) == CALL_PARAMS | {"AnsweredBy", "Digits", "FinishedOnKey"}
    assert (gather.params["Digits"], gather.params["FinishedOnKey"]) == ("1", "")
    assert gather.params["CallSid"] == created.sid
    assert gather.params["AnsweredBy"] == "human"
    assert final.gather_answers == (HEARD_NEXT,)
    assert final.url_answer is None
    [delivery] = double.voice_requests
    assert (delivery.url, delivery.http_status, delivery.answer) == (
        app.url("/voice/gather"),
        200,
        HEARD_NEXT,
    )


async def test_url_call_fetches_twiml_then_posts_the_relative_gather_action(
    double: FaultyTwilioDouble, client: Any, app: VoiceApp
) -> None:
    document = gather_twiml("gather?step=2")  # relative; finishOnKey "#" by default
    app.answers["/voice/answer"] = (200, document)
    app.answers["/voice/gather"] = (200, HEARD_NEXT)
    created = await client.calls.create_async(
        to=CALLEE, from_=OUR_NUMBER, url=app.url("/voice/answer?alarm=7")
    )
    double.script_callee(CALLEE, digit="12#")
    final = await double.advance_call(created.sid)

    fetch, gather = app.seen
    assert (fetch.method, fetch.path) == ("POST", "/voice/answer")
    assert signed(double, fetch)
    assert set(fetch.params) == CALL_PARAMS
    assert fetch.params["CallStatus"] == "in-progress"
    assert gather.url == app.url("/voice/gather?step=2")
    assert signed(double, gather)
    assert (gather.params["Digits"], gather.params["FinishedOnKey"]) == ("12", "#")
    assert (final.url_answer, final.gather_answers) == (document, (HEARD_NEXT,))


async def test_gather_without_action_goes_back_to_the_url_by_get(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession, app: VoiceApp
) -> None:
    app.answers["/voice/answer"] = (200, gather_twiml(None, num_digits=1, method="GET"))
    form = form_with(Twiml=None, Url=app.url("/voice/answer?alarm=7"), Method="GET")
    _, payload = await post_call(http, double, form)
    double.script_callee(CALLEE, digit="2")
    await double.advance_call(payload["sid"])

    fetch, gather = app.seen
    assert (fetch.method, gather.method) == ("GET", "GET")
    assert fetch.params["alarm"] == gather.params["alarm"] == "7"
    assert "Digits" not in fetch.params
    assert gather.params["Digits"] == "2"
    assert signed(double, fetch)
    assert signed(double, gather)


@pytest.mark.parametrize(
    ("outcome", "on_empty", "posted"),
    [
        ("answer", False, False),  # silence without actionOnEmptyResult: next verb
        ("answer", True, True),
        ("machine", True, True),  # a machine never presses, but the gather still ends
        ("machine", False, False),
    ],
)
async def test_no_keys_reach_the_action_only_with_action_on_empty_result(
    double: FaultyTwilioDouble,
    client: Any,
    app: VoiceApp,
    outcome: Any,
    on_empty: bool,
    posted: bool,
) -> None:
    twiml = gather_twiml(app.url("/voice/gather"), on_empty=on_empty, num_digits=1)
    created = await client.calls.create_async(
        to=CALLEE, from_=OUR_NUMBER, twiml=twiml, machine_detection="Enable"
    )
    double.script_callee(CALLEE, outcome)
    final = await double.advance_call(created.sid)

    seen = app.at("/voice/gather")
    assert len(seen) == int(posted)
    if posted:
        assert seen[0].params["Digits"] == ""
        assert seen[0].params["AnsweredBy"] == final.answered_by
    assert final.status == "completed"


@pytest.mark.parametrize("outcome", ["busy", "no-answer", "failed"])
async def test_unanswered_calls_never_fetch_twiml(
    double: FaultyTwilioDouble, client: Any, app: VoiceApp, outcome: Any
) -> None:
    created = await client.calls.create_async(
        to=CALLEE, from_=OUR_NUMBER, url=app.url("/voice/answer")
    )
    double.script_callee(CALLEE, outcome)
    final = await double.advance_call(created.sid)

    assert final.status == outcome
    assert app.seen == []
    assert double.voice_requests == []


async def test_failed_url_falls_back_and_hangup_stops_before_gather(
    double: FaultyTwilioDouble, client: Any, app: VoiceApp
) -> None:
    app.answers["/voice/answer"] = (500, "<html>oops</html>")
    hang_up_first = (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Hangup/>'
        f'<Gather action="{app.url("/voice/gather")}"/></Response>'
    )
    app.answers["/voice/fallback"] = (200, hang_up_first)
    created = await client.calls.create_async(
        to=CALLEE,
        from_=OUR_NUMBER,
        url=app.url("/voice/answer"),
        fallback_url=app.url("/voice/fallback"),
    )
    double.script_callee(CALLEE, digit="1")
    final = await double.advance_call(created.sid)

    assert [s.path for s in app.seen] == ["/voice/answer", "/voice/fallback"]
    assert [d.http_status for d in double.voice_requests] == [500, 200]
    assert final.url_answer == hang_up_first
    assert final.gather_answers == ()


# ----------------------------------------------------------------------------- helpers


async def test_advance_call_is_idempotent_and_unknown_sids_raise(
    double: FaultyTwilioDouble, client: Any, app: VoiceApp
) -> None:
    created = await client.calls.create_async(
        to=CALLEE, from_=OUR_NUMBER, twiml=SAY, status_callback=app.url("/voice/status")
    )
    first, second = await asyncio.gather(
        double.advance_call(created.sid), double.advance_call(created.sid)
    )
    again = await double.advance_call(created.sid)

    assert first == second == again
    assert len(app.seen) == 1
    with pytest.raises(KeyError):
        await double.advance_call("CA" + "0" * 32)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("hang-up",), {}, "outcome"),
        (("busy",), {"digit": "1"}, "presses"),
        (("machine",), {"digit": "1"}, "presses"),
        (("answer",), {"digit": "1a"}, "digit"),
        (("answer",), {"digit": ""}, "digit"),
        (("answer",), {"ring_s": -1}, "ring_s"),
        (("answer",), {"talk_s": float("inf")}, "talk_s"),
    ],
)
async def test_script_callee_rejects_nonsense(
    double: FaultyTwilioDouble, args: tuple[Any, ...], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        double.script_callee(CALLEE, *args, **kwargs)


async def test_wait_for_calls(double: FaultyTwilioDouble, client: Any) -> None:
    with pytest.raises(TimeoutError):
        await double.wait_for_calls(1, timeout=0.05)
    waiting = asyncio.create_task(double.wait_for_calls(2, timeout=5))
    for to in (CALLEE, OTHER_CALLEE):
        await client.calls.create_async(to=to, from_=OUR_NUMBER, twiml=SAY)

    calls = await waiting
    assert [c.to for c in calls] == [CALLEE, OTHER_CALLEE]
    assert all(isinstance(c, PlacedCall) for c in calls)


def test_the_calls_mixin_shadows_nothing_of_the_double() -> None:
    # Private helpers of both halves share one namespace: a clash would silently
    # replace one half's method with the other's.
    # (What the mixin uses of the host is declared for the type checker only.)
    mixin = {name for name in vars(CallsMixin) if not name.startswith("__")}
    assert mixin & set(vars(TwilioDouble)) == set()


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize(("status", "code"), [(429, 20429), (500, 20500), (503, 20503)])
async def test_injected_status_on_call_create_reaches_the_client(
    twilio: FaultyTwilioDouble, status: int, code: int
) -> None:
    twilio.inject(Fault.status(status, retry_after=2), target="call_create")
    async with sender_for(twilio) as sender:
        # A message create does not consume a fault queued for calls.
        await sender.client.messages.create_async(to=CALLEE, from_=OUR_NUMBER, body="x")
        with pytest.raises(TwilioRestException) as caught:
            await sender.client.calls.create_async(to=CALLEE, from_=OUR_NUMBER, twiml=SAY)
        retried = await sender.client.calls.create_async(to=CALLEE, from_=OUR_NUMBER, twiml=SAY)

    assert (caught.value.status, caught.value.code) == (status, code)
    assert [c.sid for c in twilio.calls] == [retried.sid]
    assert len(twilio.messages) == 1
    assert twilio.pending_faults == 0
    assert [r.status for r in twilio.requests] == [201, status, 201]


async def test_injected_429_on_call_create_carries_retry_after(
    twilio: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    twilio.inject(Fault.status(429, retry_after=2), to=OTHER_CALLEE, target="call_create")
    other, _ = await post_call(http, twilio, form_with())  # another number: not faulted
    async with http.post(
        calls_url(twilio),
        data=form_with(To=OTHER_CALLEE),
        headers=basic(twilio.account_sid, twilio.auth_token),
    ) as resp:
        payload = await resp.json()

    assert other == 201
    assert (resp.status, payload["code"], resp.headers["Retry-After"]) == (429, 20429, "2")
    assert [c.to for c in twilio.calls] == [CALLEE]


async def test_message_faults_leave_calls_alone(
    twilio: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    twilio.inject(Fault.status(500))  # target "create": message creation
    status, _ = await post_call(http, twilio, form_with())

    assert status == 201
    assert twilio.pending_faults == 1


async def test_call_create_timeout_leaves_the_call_placed(
    twilio: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    # The answer is held past the client's timeout: Twilio has the call, the
    # gateway does not know (what reconciliation by listing is for).
    twilio.inject(Fault.hang_after_receive(30), target="call_create")
    with pytest.raises(TimeoutError):
        await post_call(http, twilio, form_with(), timeout=aiohttp.ClientTimeout(total=0.3))

    [call] = await twilio.wait_for_calls(1, timeout=5)
    assert call.to == CALLEE


async def test_call_create_drop_after_receive(
    twilio: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    twilio.inject(Fault.drop_after_receive(), Fault.drop_after_receive(), target="call_create")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post_call(http, twilio, form_with())
    # A call Twilio refused was never created: the refusal is answered.
    refused, payload = await post_call(http, twilio, form_with(To="12345"))

    assert [c.to for c in twilio.calls] == [CALLEE]
    assert (refused, payload["code"]) == (400, 21211)
    assert [r.status for r in twilio.requests] == [None, 400]


async def test_fetch_and_list_faults_on_calls(
    twilio: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    _, created = await post_call(http, twilio, form_with())
    twilio.inject(Fault.status(503), to=CALLEE, target="call_fetch")
    twilio.inject(Fault.error(code=20001, status=400), target="call_list")
    auth = basic(twilio.account_sid, twilio.auth_token)
    fetch_url = f"{twilio.base_url}{created['uri']}"

    async with http.get(fetch_url, headers=auth) as faulted:
        assert faulted.status == 503
    async with http.get(fetch_url, headers=auth) as fetched:
        assert (fetched.status, (await fetched.json())["sid"]) == (200, created["sid"])
    async with http.get(calls_url(twilio), headers=auth) as listed:
        assert listed.status == 400
    assert twilio.pending_faults == 0
