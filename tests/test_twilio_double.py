"""The local Twilio double, exercised over real HTTP.

Most checks go through the real twilio-python async client (that is the
double's whole point); a few use raw aiohttp requests to see the exact status
codes, headers and JSON bodies Twilio would answer.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.request_validator import RequestValidator

from gateway.config import SmsSection
from gateway.sandbox.twilio_double import DEFAULT_ACCOUNT_SID, TwilioDouble
from gateway.sms import TwilioAccount, TwilioSender
from tests.support.twilio_api import FakeClock, basic
from tests.support.twilio_faults import Fault, FaultyTwilioDouble

pytestmark = pytest.mark.integration

SENDER = "+15005550006"
ELDER_SON = "+8613800000001"
GRID_LEADER = "+8613900000002"
REPO = Path(__file__).resolve().parents[1]


def messages_url(d: TwilioDouble, account: str | None = None) -> str:
    return f"{d.base_url}/2010-04-01/Accounts/{account or d.account_sid}/Messages.json"


async def post_message(
    http: aiohttp.ClientSession, d: TwilioDouble, form: dict[str, str], **kw: Any
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    headers = kw.pop("headers", basic(d.account_sid, d.auth_token))
    url = kw.pop("url", messages_url(d))
    async with http.post(url, data=form, headers=headers) as resp:
        return resp.status, await resp.json(), resp


def sender_for(d: TwilioDouble, **sms: object) -> TwilioSender:
    section = SmsSection.model_validate({"from_number": SENDER, "base_url": d.base_url, **sms})
    return TwilioSender(section, TwilioAccount(d.account_sid, d.auth_token))


@pytest.fixture
async def sender(double: FaultyTwilioDouble) -> AsyncIterator[TwilioSender]:
    async with sender_for(double, request_timeout_s=2.0, max_attempts=1) as s:
        yield s


def twilio_client(sender: TwilioSender) -> Any:
    """The real twilio-python client inside the sender (for list/fetch calls)."""
    return sender.client


# ----------------------------------------------------------------------------- create


async def test_create_answers_201_with_twilio_shaped_json(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    body = "张大爷按下了求助按钮" * 8  # 80 Chinese characters: UCS-2, 2 segments
    status, payload, _ = await post_message(
        http,
        double,
        {"To": ELDER_SON, "From": SENDER, "Body": body, "StatusCallback": "http://cb/x"},
    )

    assert status == 201
    assert re.fullmatch(r"SM[0-9a-f]{32}", payload["sid"])
    assert payload["account_sid"] == double.account_sid
    assert payload["to"] == ELDER_SON
    assert payload["from"] == SENDER
    assert payload["body"] == body
    assert payload["status"] == "queued"
    assert payload["num_segments"] == "2"
    assert payload["error_code"] is None
    assert payload["direction"] == "outbound-api"
    assert payload["date_sent"] is None
    assert parsedate_to_datetime(payload["date_created"]) == datetime.fromtimestamp(clock.now, UTC)
    assert payload["uri"] == (
        f"/2010-04-01/Accounts/{double.account_sid}/Messages/{payload['sid']}.json"
    )
    [message] = double.messages
    assert message.sid == payload["sid"]
    assert message.status_callback == "http://cb/x"
    assert message.num_segments == 2


async def test_real_twilio_client_creates_and_fetches(
    double: FaultyTwilioDouble, sender: TwilioSender
) -> None:
    client = twilio_client(sender)
    created = await client.messages.create_async(to=ELDER_SON, from_=SENDER, body="hello")
    fetched = await client.messages(created.sid).fetch_async()

    assert fetched.sid == created.sid
    assert fetched.status == "queued"
    assert fetched.num_segments == "1"
    assert fetched.date_created == double.messages[0].date_created.replace(microsecond=0)


async def test_messaging_service_instead_of_from(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    service = "MG" + "ab" * 16
    status, payload, _ = await post_message(
        http, double, {"To": ELDER_SON, "MessagingServiceSid": service, "Body": "hi"}
    )

    assert status == 201
    assert payload["messaging_service_sid"] == service
    assert payload["from"] is None
    assert double.messages[0].messaging_service_sid == service


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"From": SENDER, "Body": "x"}, 21604),
        ({"To": "13800000001", "From": SENDER, "Body": "x"}, 21211),
        ({"To": "+86 138 0000 0001", "From": SENDER, "Body": "x"}, 21211),
        ({"To": ELDER_SON, "Body": "x"}, 21603),
        ({"To": ELDER_SON, "From": "not a number!", "Body": "x"}, 21606),
        ({"To": ELDER_SON, "MessagingServiceSid": "MG123", "Body": "x"}, 21701),
        ({"To": ELDER_SON, "From": SENDER}, 21602),
        ({"To": ELDER_SON, "From": SENDER, "Body": ""}, 21602),
        ({"To": ELDER_SON, "From": SENDER, "Body": "x" * 1601}, 21617),
        ({"To": ELDER_SON, "From": SENDER, "Body": "x", "ValidityPeriod": "0"}, 21624),
        ({"To": ELDER_SON, "From": SENDER, "Body": "x", "ValidityPeriod": "36001"}, 21624),
    ],
)
async def test_validation_errors_like_twilio(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession, form: dict[str, str], code: int
) -> None:
    status, payload, _ = await post_message(http, double, form)

    assert status == 400
    assert payload["code"] == code
    assert payload["status"] == 400
    assert payload["more_info"] == f"https://www.twilio.com/docs/errors/{code}"
    assert payload["message"]
    assert double.messages == []


async def test_body_of_exactly_1600_chars_is_accepted(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    status, payload, _ = await post_message(
        http, double, {"To": ELDER_SON, "From": SENDER, "Body": "中" * 1600}
    )

    assert status == 201
    assert payload["num_segments"] == str(-(-1600 // 67))


async def test_validity_period_is_recorded(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    form = {"To": ELDER_SON, "From": SENDER, "Body": "x", "ValidityPeriod": "600"}
    status, _, _ = await post_message(http, double, form)

    assert status == 201
    assert double.messages[0].validity_period == 600


# ----------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic(DEFAULT_ACCOUNT_SID, "wrong-token"),
        basic("AC" + "11" * 16, "whatever"),
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic !!!not-base64"},
    ],
)
async def test_basic_auth_is_enforced(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    status, payload, resp = await post_message(
        http, double, {"To": ELDER_SON, "From": SENDER, "Body": "x"}, headers=headers
    )

    assert status == 401
    assert payload["code"] == 20003
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    assert double.messages == []
    assert len(double.requests) == 1


async def test_wrong_account_in_path_is_404(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    other = "AC" + "22" * 16
    status, payload, _ = await post_message(
        http,
        double,
        {"To": ELDER_SON, "From": SENDER, "Body": "x"},
        url=messages_url(double, other),
    )

    assert status == 404
    assert payload["code"] == 20404
    assert double.messages == []


async def test_fetch_unknown_message_is_404_20404(sender: TwilioSender) -> None:
    client = twilio_client(sender)
    with pytest.raises(TwilioRestException) as caught:
        await client.messages("SM" + "0" * 32).fetch_async()

    assert caught.value.status == 404
    assert caught.value.code == 20404


# ----------------------------------------------------------------------------- list


async def test_list_filters_by_to_from_and_date_sent(
    double: FaultyTwilioDouble, sender: TwilioSender, clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    client = twilio_client(sender)
    start = datetime.fromtimestamp(clock.now, UTC)
    early = await client.messages.create_async(to=ELDER_SON, from_=SENDER, body="early")
    clock.advance(3600)
    other = await client.messages.create_async(to=GRID_LEADER, from_=SENDER, body="leader")
    clock.advance(3600)
    late = await client.messages.create_async(to=ELDER_SON, from_=SENDER, body="late")
    # Another sender, only visible without a From filter.
    status, _, _ = await post_message(
        http, double, {"To": ELDER_SON, "From": "+15005550007", "Body": "other sender"}
    )
    assert status == 201

    to_son = await client.messages.list_async(to=ELDER_SON, from_=SENDER)
    inclusive = await client.messages.list_async(to=ELDER_SON, date_sent_before=start)
    after = await client.messages.list_async(
        to=ELDER_SON, date_sent_after=start + timedelta(minutes=30)
    )
    before = await client.messages.list_async(date_sent_before=start + timedelta(minutes=90))
    same_day = await client.messages.list_async(date_sent=start.date().isoformat())
    next_day = await client.messages.list_async(date_sent=(start.date() + timedelta(days=1)))

    assert [m.sid for m in to_son] == [late.sid, early.sid]  # newest first
    assert [m.sid for m in inclusive] == [early.sid]  # bounds are inclusive
    assert {m.body for m in after} == {"late", "other sender"}
    assert [m.sid for m in before] == [other.sid, early.sid]
    assert len(same_day) == 4
    assert next_day == []


async def test_date_sent_filter_uses_date_sent_once_sent(
    double: FaultyTwilioDouble, sender: TwilioSender, clock: FakeClock
) -> None:
    client = twilio_client(sender)
    created = await client.messages.create_async(to=ELDER_SON, from_=SENDER, body="x")
    clock.advance(7200)
    await double.advance()  # sent (and delivered) two hours after creation
    sent_at = datetime.fromtimestamp(clock.now, UTC)

    later = await client.messages.list_async(date_sent_after=sent_at - timedelta(minutes=1))
    fetched = await client.messages(created.sid).fetch_async()

    assert [m.sid for m in later] == [created.sid]
    assert fetched.date_sent == sent_at


async def test_list_pages_are_followed_by_the_client(sender: TwilioSender) -> None:
    client = twilio_client(sender)
    for n in range(5):
        await client.messages.create_async(to=ELDER_SON, from_=SENDER, body=f"m{n}")

    page = await client.messages.page_async(page_size=2)
    everything = await client.messages.list_async(page_size=2)

    assert page.next_page_url is not None
    assert [m.body for m in everything] == ["m4", "m3", "m2", "m1", "m0"]


async def test_list_rejects_a_bad_date_filter(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    async with http.get(
        messages_url(double),
        params={"DateSent>": "yesterday"},
        headers=basic(double.account_sid, double.auth_token),
    ) as resp:
        payload = await resp.json()

    assert resp.status == 400
    assert payload["code"] == 20001


# ----------------------------------------------------------------------------- status


class CallbackReceiver:
    """A small webhook server standing in for the gateway's status endpoint."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], str]] = []
        self.arrived = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.received.append((str(request.url), form, request.headers["X-Twilio-Signature"]))
        self.arrived.set()
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[CallbackReceiver]:
    rec = CallbackReceiver()
    app = web.Application()
    app.router.add_post("/sms/status", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/sms/status"
    try:
        yield rec
    finally:
        await runner.cleanup()


async def test_advance_walks_statuses_and_posts_signed_callbacks(
    double: FaultyTwilioDouble, sender: TwilioSender, receiver: CallbackReceiver
) -> None:
    client = twilio_client(sender)
    created = await client.messages.create_async(
        to=ELDER_SON, from_=SENDER, body="x", status_callback=receiver.url
    )
    await double.advance(created.sid)

    validator = RequestValidator(double.auth_token)
    assert [form["MessageStatus"] for _, form, _ in receiver.received] == ["sent", "delivered"]
    for url, form, signature in receiver.received:
        assert url == receiver.url
        assert validator.validate(url, form, signature)
        assert form["MessageSid"] == created.sid
        assert form["To"] == ELDER_SON
        assert form["From"] == SENDER
        assert form["AccountSid"] == double.account_sid
        assert "ErrorCode" not in form
    # A tampered form does not validate: the signature really covers the params.
    url, form, signature = receiver.received[-1]
    assert not validator.validate(url, {**form, "MessageStatus": "failed"}, signature)
    assert double.message(created.sid).status == "delivered"
    assert [c.http_status for c in double.callbacks] == [204, 204]


@pytest.mark.parametrize(
    ("final", "code", "seen"),
    [
        ("undelivered", 30003, ["sent", "undelivered"]),
        ("failed", 30008, ["failed"]),
        ("sent", None, ["sent"]),
    ],
)
async def test_scripted_final_status_per_number(
    double: FaultyTwilioDouble,
    sender: TwilioSender,
    receiver: CallbackReceiver,
    final: str,
    code: int | None,
    seen: list[str],
) -> None:
    client = twilio_client(sender)
    double.set_final_status(ELDER_SON, final, error_code=code)
    scripted = await client.messages.create_async(
        to=ELDER_SON, from_=SENDER, body="x", status_callback=receiver.url
    )
    normal = await client.messages.create_async(to=GRID_LEADER, from_=SENDER, body="y")
    await double.advance()

    assert [form["MessageStatus"] for _, form, _ in receiver.received] == seen
    last_form = receiver.received[-1][1]
    assert last_form.get("ErrorCode") == (str(code) if code is not None else None)
    fetched = await client.messages(scripted.sid).fetch_async()
    assert (fetched.status, fetched.error_code) == (final, code)
    assert double.message(normal.sid).status == "delivered"


async def test_set_final_status_rejects_unknown_status(double: FaultyTwilioDouble) -> None:
    with pytest.raises(ValueError, match="final status"):
        double.set_final_status(ELDER_SON, "teleported")


async def test_automatic_progression_after_delays(
    receiver: CallbackReceiver, clock: FakeClock
) -> None:
    async with (
        TwilioDouble(clock=clock, sent_delay=0.01, delivered_delay=0.01) as d,
        sender_for(d) as s,
    ):
        result = await s.send(ELDER_SON, "x", status_callback=receiver.url)
        async with asyncio.timeout(5):
            while len(receiver.received) < 2:
                receiver.arrived.clear()
                await receiver.arrived.wait()

    assert [form["MessageStatus"] for _, form, _ in receiver.received] == ["sent", "delivered"]
    assert d.message(result.sid).status == "delivered"


async def test_unreachable_callback_is_recorded_not_raised(
    double: FaultyTwilioDouble, sender: TwilioSender
) -> None:
    client = twilio_client(sender)
    # A port nobody listens on: bind one, then close it.
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    created = await client.messages.create_async(
        to=ELDER_SON, from_=SENDER, body="x", status_callback=f"http://127.0.0.1:{port}/cb"
    )
    await double.advance(created.sid)

    assert double.message(created.sid).status == "delivered"
    assert len(double.callbacks) == 2
    assert all(c.http_status is None and c.error for c in double.callbacks)


# ----------------------------------------------------------------------------- faults


async def test_faults_are_fifo_and_can_be_scoped_to_a_number(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    double.inject(Fault.status(500), to=GRID_LEADER)
    double.inject(Fault.status(429, code=20429, retry_after=1), Fault.error(code=21610))

    first, p1, r1 = await post_message(http, double, {"To": ELDER_SON, "From": SENDER, "Body": "a"})
    second, p2, _ = await post_message(http, double, {"To": ELDER_SON, "From": SENDER, "Body": "b"})
    third, p3, _ = await post_message(
        http, double, {"To": GRID_LEADER, "From": SENDER, "Body": "c"}
    )
    fourth, _, _ = await post_message(
        http, double, {"To": GRID_LEADER, "From": SENDER, "Body": "d"}
    )

    assert (first, p1["code"], r1.headers["Retry-After"]) == (429, 20429, "1")
    assert (second, p2["code"]) == (400, 21610)
    assert (third, p3["code"]) == (500, 20500)
    assert fourth == 201
    assert [m.body for m in double.messages] == ["d"]
    assert double.pending_faults == 0
    assert [r.status for r in double.requests] == [429, 400, 500, 201]


async def test_delay_holds_the_answer_then_answers_normally(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    double.inject(Fault.delay(0.2))
    status, _, _ = await post_message(http, double, {"To": ELDER_SON, "From": SENDER, "Body": "x"})

    [request] = double.requests
    assert status == 201
    assert request.answered_at is not None
    # The hold is a lower bound (timers may fire a hair early, hence the margin).
    assert request.answered_at - request.arrived_at >= 0.19


async def test_drop_after_receive_creates_the_message_but_never_answers(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    double.inject(Fault.drop_after_receive())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post_message(http, double, {"To": ELDER_SON, "From": SENDER, "Body": "lost answer"})

    [message] = await double.wait_for_messages(1, timeout=1.0)
    [request] = double.requests
    assert message.body == "lost answer"
    assert request.status is None
    assert request.answered_at is None


async def test_outage_503_then_recovery(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    await double.outage(True)
    down, payload, _ = await post_message(
        http, double, {"To": ELDER_SON, "From": SENDER, "Body": "x"}
    )
    await double.outage(False)
    up, _, _ = await post_message(http, double, {"To": ELDER_SON, "From": SENDER, "Body": "y"})

    assert (down, payload["code"]) == (503, 20503)
    assert up == 201
    assert [m.body for m in double.messages] == ["y"]


async def test_outage_refusing_connections_then_recovery(double: FaultyTwilioDouble) -> None:
    port = double.port
    await double.outage(True, refuse=True)
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ClientConnectorError):
            await post_message(fresh, double, {"To": ELDER_SON, "From": SENDER, "Body": "x"})
    await double.outage(False)
    async with aiohttp.ClientSession() as fresh:
        status, _, _ = await post_message(
            fresh, double, {"To": ELDER_SON, "From": SENDER, "Body": "y"}
        )

    assert double.port == port
    assert status == 201
    assert [m.body for m in double.messages] == ["y"]


async def test_switching_from_refusing_to_503_listens_again(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    await double.outage(True, refuse=True)
    await double.outage(True)
    status, payload, _ = await post_message(
        http, double, {"To": ELDER_SON, "From": SENDER, "Body": "x"}
    )

    assert (status, payload["code"]) == (503, 20503)


async def test_wait_for_messages_times_out(double: FaultyTwilioDouble) -> None:
    with pytest.raises(TimeoutError):
        await double.wait_for_messages(1, timeout=0.05)


async def test_unknown_route_answers_twilio_json_404(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    # Calls.json is served too now (tests/test_twilio_calls_double.py); Queues are not.
    async with http.get(
        f"{double.base_url}/2010-04-01/Accounts/{double.account_sid}/Queues.json",
        headers=basic(double.account_sid, double.auth_token),
    ) as resp:
        payload = await resp.json()

    assert resp.status == 404
    assert payload["code"] == 20404


async def test_start_on_a_taken_port_fails_cleanly(double: FaultyTwilioDouble) -> None:
    # filterwarnings=error would turn a leaked callback session into a failure.
    with pytest.raises(OSError):
        async with TwilioDouble(port=double.port):
            pass


async def test_rejects_malformed_account_sid() -> None:
    with pytest.raises(ValueError, match="account_sid"):
        TwilioDouble(account_sid="ACnothex")


async def test_list_error_surfaces_as_twilio_exception(
    double: FaultyTwilioDouble, sender: TwilioSender
) -> None:
    await double.outage(True)
    with pytest.raises(TwilioException):
        await twilio_client(sender).messages.list_async(to=ELDER_SON)
    await double.outage(False)


# ----------------------------------------------------------------------------- CLI


async def test_module_runs_as_a_program_and_prints_credentials() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.sandbox.twilio_double",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    assert proc.stdout is not None
    text = ""
    try:
        async with asyncio.timeout(30):
            while "Ctrl-C" not in text:
                line = await proc.stdout.readline()
                if not line:
                    break
                text += line.decode()
        base_url = re.search(r"base_url:\s+(\S+)", text)
        token = re.search(r"auth_token:\s+(\S+)", text)
        assert "TEST DOUBLE" in text
        assert base_url is not None
        assert token is not None
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{base_url[1]}/2010-04-01/Accounts/{DEFAULT_ACCOUNT_SID}/Messages.json",
                data={"To": ELDER_SON, "From": SENDER, "Body": "hi"},
                headers=basic(DEFAULT_ACCOUNT_SID, token[1]),
            ) as resp,
        ):
            assert resp.status == 201
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            code = await proc.wait()
    assert code == 0


# ----------------------------------------------------------------------------- inbound

OUR_NUMBER = SENDER


class InboundReceiver:
    """A stand-in for the gateway's inbound webhook: records forms, answers TwiML."""

    def __init__(self, answer: str, status: int = 200) -> None:
        self.answer = answer
        self.status = status
        self.received: list[tuple[str, dict[str, str], str]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.received.append((str(request.url), form, request.headers["X-Twilio-Signature"]))
        return web.Response(text=self.answer, status=self.status, content_type="text/xml")


@pytest.fixture
async def inbound_server() -> AsyncIterator[InboundReceiver]:
    rec = InboundReceiver("")
    app = web.Application()
    app.router.add_post("/twilio/inbound", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}/twilio/inbound"
    try:
        yield rec
    finally:
        await runner.cleanup()


async def test_inbound_message_is_listed_and_fetched_with_direction_inbound(
    double: FaultyTwilioDouble, sender: TwilioSender, clock: FakeClock
) -> None:
    client = twilio_client(sender)
    outgoing = await client.messages.create_async(to=GRID_LEADER, from_=OUR_NUMBER, body="alarm")
    clock.advance(30)
    inbound = await double.inject_inbound(GRID_LEADER, "K7QM-3XRD 1")

    to_us = await client.messages.list_async(to=OUR_NUMBER)
    everything = await client.messages.list_async()
    fetched = await client.messages(inbound.sid).fetch_async()

    assert re.fullmatch(r"SM[0-9a-f]{32}", inbound.sid)
    assert inbound.to == OUR_NUMBER  # the number that texted the grid leader
    assert [m.sid for m in to_us] == [inbound.sid]
    assert to_us[0].direction == "inbound"
    assert to_us[0].status == "received"
    assert to_us[0].from_ == GRID_LEADER
    assert to_us[0].body == "K7QM-3XRD 1"
    assert to_us[0].date_sent == datetime.fromtimestamp(clock.now, UTC)
    assert [m.sid for m in everything] == [inbound.sid, outgoing.sid]  # newest first
    assert everything[1].direction == "outbound-api"
    assert fetched.direction == "inbound"
    assert double.message(inbound.sid) == inbound
    # Outgoing bookkeeping is untouched: inbound messages live apart.
    assert [m.sid for m in double.messages] == [outgoing.sid]
    assert double.inbound == [inbound]


async def test_inbound_date_filter_and_explicit_to(
    double: FaultyTwilioDouble, sender: TwilioSender, clock: FakeClock
) -> None:
    client = twilio_client(sender)
    early = await double.inject_inbound(GRID_LEADER, "早", to=OUR_NUMBER)
    clock.advance(600)
    cut = datetime.fromtimestamp(clock.now, UTC)
    late = await double.inject_inbound(ELDER_SON, "晚", to=OUR_NUMBER)

    after = await client.messages.list_async(to=OUR_NUMBER, date_sent_after=cut)
    from_leader = await client.messages.list_async(to=OUR_NUMBER, from_=GRID_LEADER)

    assert [m.sid for m in after] == [late.sid]
    assert [m.sid for m in from_leader] == [early.sid]


async def test_inbound_needs_a_known_or_explicit_number(double: FaultyTwilioDouble) -> None:
    with pytest.raises(ValueError, match="pass to="):
        await double.inject_inbound(GRID_LEADER, "1")
    assert double.inbound == []


async def test_inbound_webhook_is_signed_and_twiml_reply_is_sent(
    double: FaultyTwilioDouble, inbound_server: InboundReceiver
) -> None:
    inbound_server.answer = (
        '<?xml version="1.0" encoding="UTF-8"?><Response>'
        "<Message>已确认，谢谢 &lt;王强&gt;</Message></Response>"
    )
    double.inbound_webhook_url = inbound_server.url
    message = await double.inject_inbound(GRID_LEADER, "收到", to=OUR_NUMBER)

    [(url, form, signature)] = inbound_server.received
    assert RequestValidator(double.auth_token).validate(url, form, signature)
    assert form["MessageSid"] == message.sid
    assert form["From"] == GRID_LEADER
    assert form["To"] == OUR_NUMBER
    assert form["Body"] == "收到"
    assert form["AccountSid"] == double.account_sid
    assert form["NumMedia"] == "0"
    [delivery] = double.inbound_deliveries
    assert (delivery.http_status, delivery.error) == (200, None)
    assert delivery.answer == inbound_server.answer
    assert double.callbacks == []
    # Twilio texts the <Message> back, from the number that was written to.
    [reply] = double.messages
    assert (reply.to, reply.from_, reply.body) == (GRID_LEADER, OUR_NUMBER, "已确认，谢谢 <王强>")
    assert reply.direction == "outbound-reply"
    assert reply.status == "queued"


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        ('<?xml version="1.0" encoding="UTF-8"?><Response></Response>', 200),
        ("<Response><Message>not sent</Message>", 200),  # not well-formed
        ("<Other><Message>not TwiML</Message></Other>", 200),
        ("<Response><Message>error page</Message></Response>", 500),
    ],
)
async def test_inbound_webhook_without_a_usable_reply_sends_nothing(
    double: FaultyTwilioDouble, inbound_server: InboundReceiver, answer: str, status: int
) -> None:
    inbound_server.answer = answer
    inbound_server.status = status
    double.inbound_webhook_url = inbound_server.url
    await double.inject_inbound(GRID_LEADER, "1", to=OUR_NUMBER)

    assert len(inbound_server.received) == 1
    assert double.inbound_deliveries[0].http_status == status
    assert double.messages == []


async def test_unreachable_inbound_webhook_is_recorded_and_the_message_kept(
    double: FaultyTwilioDouble, sender: TwilioSender
) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    double.inbound_webhook_url = f"http://127.0.0.1:{port}/twilio/inbound"
    message = await double.inject_inbound(GRID_LEADER, "1", to=OUR_NUMBER)

    [delivery] = double.inbound_deliveries
    assert delivery.http_status is None
    assert delivery.error
    listed = await twilio_client(sender).messages.list_async(to=OUR_NUMBER)
    assert [m.sid for m in listed] == [message.sid]


async def test_faults_wait_for_an_authenticated_request(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    double.inject(Fault.status(500))
    form = {"To": ELDER_SON, "From": SENDER, "Body": "x"}

    refused, refusal, _ = await post_message(http, double, form, headers=basic("ACx", "nope"))
    faulted, _, _ = await post_message(http, double, form)
    created, _, _ = await post_message(http, double, form)

    assert (refused, refusal["code"]) == (401, 20003)
    assert (faulted, created) == (500, 201)


async def test_drop_of_a_refused_create_answers_the_refusal(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    # Twilio never created the message, so there is no answer to lose.
    double.inject(Fault.drop_after_receive())
    form = {"To": "12345", "From": SENDER, "Body": "x"}
    status, payload, _ = await post_message(http, double, form)

    assert (status, payload["code"]) == (400, 21211)
    assert double.messages == []


async def test_stopping_wakes_a_held_request(http: aiohttp.ClientSession) -> None:
    double = FaultyTwilioDouble(sent_delay=None, delivered_delay=None)
    await double.start()
    double.inject(Fault.hang_after_receive(60))
    form = {"To": ELDER_SON, "From": SENDER, "Body": "x"}
    held = asyncio.create_task(post_message(http, double, form))
    await double.wait_for_messages(1)

    async with asyncio.timeout(5):
        await double.stop()
        with pytest.raises(aiohttp.ClientError):
            await held


def test_the_shipped_double_has_no_fault_api() -> None:
    # gateway demo runs TwilioDouble: nothing there can make it misbehave.
    for name in ("inject", "outage", "pending_faults"):
        assert not hasattr(TwilioDouble, name)
        assert hasattr(FaultyTwilioDouble, name)


# ----------------------------------------------------------------------------- read faults


async def test_list_fault_applies_once_and_leaves_creates_alone(
    double: FaultyTwilioDouble, sender: TwilioSender
) -> None:
    client = twilio_client(sender)
    double.inject(Fault.status(500), target="list")
    created = await client.messages.create_async(to=ELDER_SON, from_=SENDER, body="x")

    with pytest.raises(TwilioException):
        await client.messages.list_async(to=ELDER_SON)
    listed = await client.messages.list_async(to=ELDER_SON)

    assert [m.sid for m in listed] == [created.sid]
    assert [(r.method, r.status) for r in double.requests] == [
        ("POST", 201),
        ("GET", 500),
        ("GET", 200),
    ]
    assert double.pending_faults == 0


async def test_list_fault_scoped_to_a_number(
    double: FaultyTwilioDouble, http: aiohttp.ClientSession
) -> None:
    double.inject(Fault.error(code=20001, status=400), to=GRID_LEADER, target="list")
    auth = basic(double.account_sid, double.auth_token)
    async with http.get(messages_url(double), params={"To": ELDER_SON}, headers=auth) as other:
        assert other.status == 200
    async with http.get(messages_url(double), params={"To": GRID_LEADER}, headers=auth) as hit:
        payload = await hit.json()

    assert (hit.status, payload["code"]) == (400, 20001)


async def test_fetch_fault_and_dropped_list(
    double: FaultyTwilioDouble, sender: TwilioSender, http: aiohttp.ClientSession
) -> None:
    client = twilio_client(sender)
    created = await client.messages.create_async(to=ELDER_SON, from_=SENDER, body="x")
    double.inject(Fault.status(503), target="fetch")
    # aiohttp repeats an idempotent request once when the connection drops
    # before an answer, so only a second drop reaches the caller.
    double.inject(Fault.drop_after_receive(), Fault.drop_after_receive(), target="list")

    with pytest.raises(TwilioRestException) as caught:
        await client.messages(created.sid).fetch_async()
    fetched = await client.messages(created.sid).fetch_async()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with http.get(
            messages_url(double), headers=basic(double.account_sid, double.auth_token)
        ):
            pass

    assert caught.value.status == 503
    assert fetched.sid == created.sid
    assert [(r.method, r.status) for r in double.requests if r.path.endswith("Messages.json")] == [
        ("POST", 201),
        ("GET", None),
        ("GET", None),
    ]
    assert len(double.messages) == 1
