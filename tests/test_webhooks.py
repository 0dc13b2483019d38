"""Inbound Twilio webhooks and the polling fallback, over real HTTP.

The reply parser is pure and tested from tables and with hypothesis. The
webhook endpoints run on a real aiohttp server; signed requests come from
twilio-python's RequestValidator or from the Twilio test double. The pollers
use the real twilio-python client pointed at the double.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import socket
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from twilio.request_validator import RequestValidator

from gateway.config import SmsSection
from gateway.journal import new_alarm_id
from gateway.replies import MAX_REPLY_CHARS, InboundReply, StatusUpdate, parse_reply
from gateway.sandbox.twilio_double import TwilioDouble
from gateway.sms import SmsSendError, TwilioAccount, TwilioSender
from gateway.twilio_poll import InboundPoller, StatusPoller
from gateway.webhooks import INBOUND_PATH, TwilioWebhooks, twiml_response
from tests.support.twilio_faults import Fault, FaultyTwilioDouble

OUR_NUMBER = "+15005550006"
OTHER_NUMBER = "+15005550009"
LEADER = "+8613900000002"
WORKER = "+8613700000003"
TOKEN = "f" * 32
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# ----------------------------------------------------------------------------- parse_reply

REPLIES: list[tuple[str, str | None, str]] = [
    # the template's own suggestion, and how people actually type it
    ("K7QM-3XRD 1", "K7QM-3XRD", "ack"),
    ("k7qm-3xrd 1", "K7QM-3XRD", "ack"),
    ("K7QM3XRD 1", "K7QM-3XRD", "ack"),
    ("K7QM-3XRD1", "K7QM-3XRD", "ack"),
    ("k7qm3xrd1", "K7QM-3XRD", "ack"),
    ("K7QM 3XRD 1", "K7QM-3XRD", "ack"),
    ("K7QM - 3XRD  1", "K7QM-3XRD", "ack"),
    ("K7QM—3XRD 1", "K7QM-3XRD", "ack"),  # em dash from a Chinese IME
    ("K7QM——3XRD 1", "K7QM-3XRD", "ack"),
    ("K7QM_3XRD 1", "K7QM-3XRD", "ack"),
    ("ｋ７ｑｍ－３ｘｒｄ　１", "K7QM-3XRD", "ack"),  # full width throughout
    ("Ｋ７ＱＭ－３ＸＲＤ　好的", "K7QM-3XRD", "ack"),
    ('"K7QM-3XRD 1"', "K7QM-3XRD", "ack"),  # copied with the quotes
    ("“K7QM-3XRD 1”", "K7QM-3XRD", "ack"),
    ("回复K7QM-3XRD 1", "K7QM-3XRD", "ack"),
    ("编号K7QM-3XRD，收到", "K7QM-3XRD", "ack"),
    ("K7QM-3XRD 收到，马上到", "K7QM-3XRD", "ack"),
    ("K7QM-3XRD 2", "K7QM-3XRD", "decline"),
    ("K7QM-3XRD2", "K7QM-3XRD", "decline"),
    ("K7QM-3XRD 去不了", "K7QM-3XRD", "decline"),
    ("K7QM-3XRD", "K7QM-3XRD", "unknown"),
    ("K7QM-3XRD 是什么意思？", "K7QM-3XRD", "unknown"),
    # Crockford reading of look-alike letters
    ("KIQO-3XRL 1", "K1Q0-3XR1", "ack"),
    ("klqo-3xrd ok", "K1Q0-3XRD", "ack"),
    ("AB0O-1ILX y", "AB00-111X", "ack"),
    # intent alone
    ("1", None, "ack"),
    ("１", None, "ack"),
    ("①", None, "ack"),
    ("1。", None, "ack"),
    (" 1 ", None, "ack"),
    ("ok", None, "ack"),
    ("OK", None, "ack"),
    ("Ok!", None, "ack"),
    ("ＯＫ", None, "ack"),
    ("okay", None, "ack"),
    ("yes", None, "ack"),
    ("Yes, on my way", None, "ack"),
    ("y", None, "ack"),
    ("Y", None, "ack"),
    ("no problem", None, "ack"),
    ("好", None, "ack"),
    ("好的", None, "ack"),
    ("好的！", None, "ack"),
    ("好吧", None, "ack"),
    ("好嘞", None, "ack"),
    ("好好好", None, "ack"),
    ("收到", None, "ack"),
    ("收到收到", None, "ack"),
    ("收到，不过要二十分钟", None, "ack"),
    ("到", None, "ack"),
    ("到了", None, "ack"),
    ("我去", None, "ack"),
    ("我去吧", None, "ack"),
    ("我马上去", None, "ack"),
    ("接", None, "ack"),
    ("接单", None, "ack"),
    ("确认", None, "ack"),
    ("已确认", None, "ack"),
    ("嗯嗯", None, "ack"),
    ("行", None, "ack"),
    ("没问题", None, "ack"),
    ("在路上了", None, "ack"),
    ("王强，收到", None, "ack"),
    ("好的👍", None, "ack"),
    ("👍", None, "ack"),
    ("👍🏻", None, "ack"),  # skin-tone modifier
    ("👌️", None, "ack"),  # with an emoji variation selector
    ("1我去", None, "ack"),
    ("2", None, "decline"),
    ("２", None, "decline"),
    ("no", None, "decline"),
    ("No.", None, "decline"),
    ("n", None, "decline"),
    ("N", None, "decline"),
    ("sorry, can't make it", None, "decline"),
    ("cannot", None, "decline"),
    ("不", None, "decline"),
    ("不行", None, "decline"),
    ("不行，我在外地", None, "decline"),
    ("去不了", None, "decline"),
    ("我去不了", None, "decline"),
    ("来不了", None, "decline"),
    ("没空", None, "decline"),
    ("今天没空", None, "decline"),
    ("没时间", None, "decline"),
    ("不好意思，去不了", None, "decline"),
    ("❌", None, "decline"),
    # neither
    ("", None, "unknown"),
    ("   ", None, "unknown"),
    ("?", None, "unknown"),
    ("谁？", None, "unknown"),
    ("到时候再说", None, "unknown"),
    ("10分钟", None, "unknown"),
    ("11", None, "unknown"),
    ("thanks", None, "unknown"),
    ("是什么事", None, "unknown"),
    # look like references but are not
    ("GOOD NEWS", None, "unknown"),
    ("Coming tomorrow", None, "unknown"),
    ("0531-8888", None, "unknown"),  # a landline with its area code
    ("call 13812345678", None, "unknown"),
    ("K7QM-3XRD12", None, "unknown"),  # nine characters and a digit: not a reference
    ("UUUU-3XRD 1", None, "ack"),  # U is not Crockford
]


@pytest.mark.parametrize(("body", "ref", "intent"), REPLIES)
def test_parse_reply_real_world_variants(body: str, ref: str | None, intent: str) -> None:
    assert parse_reply(body) == (ref, intent)


def test_first_reference_wins_and_dashed_beats_spaced() -> None:
    assert parse_reply("K7QM-3XRD AB12-CD34 1") == ("K7QM-3XRD", "ack")
    # A dashed reference is preferred over a space-separated look-alike earlier on.
    assert parse_reply("A1B2 C3D4 then K7QM-3XRD 1") == ("K7QM-3XRD", "ack")


def test_reference_of_a_real_alarm_id_is_found_verbatim() -> None:
    for _ in range(200):
        alarm_id = new_alarm_id()
        assert parse_reply(f"{alarm_id} 1") == (alarm_id, "ack")
        assert parse_reply(f"收到{alarm_id.lower()}") == (alarm_id, "ack")


# Any code point, lone surrogates included (a broken client can send them).
@given(st.text(st.characters(exclude_categories=())) | st.text())
@settings(max_examples=400)
def test_parse_reply_never_raises(body: str) -> None:
    ref, intent = parse_reply(body)
    assert intent in ("ack", "decline", "unknown")
    if ref is not None:
        assert len(ref) == 9
        assert ref[4] == "-"
        assert all(c in CROCKFORD for c in ref.replace("-", ""))


_half = st.text(alphabet=CROCKFORD, min_size=4, max_size=4)
_chinese = st.text(alphabet="请速前往张大爷家社区编号谢谢", max_size=6)


def _full_width(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


@given(
    first=_half,
    second=_half,
    separator=st.sampled_from(["-", "－", "—", " - ", "_"]),
    before=_chinese,
    after=st.sampled_from([" 1", "１", " 收到", " 好的", "，我去"]),
    lower=st.booleans(),
    wide=st.booleans(),
)
def test_reference_found_in_any_typing(
    first: str, second: str, separator: str, before: str, after: str, lower: bool, wide: bool
) -> None:
    # An all-digit reference reads as a phone number or a date (see parse_reply).
    assume(any(c.isalpha() for c in first + second))
    ref = f"{first}-{second}"
    typed = f"{first}{separator}{second}"
    typed = typed.lower() if lower else typed
    typed = _full_width(typed) if wide else typed

    assert parse_reply(f"{before}{typed}{after}") == (ref, "ack")


@given(_half, _half)
def test_look_alike_letters_read_as_digits(first: str, second: str) -> None:
    typed = f"{first}-{second}".replace("1", "l").replace("0", "O")
    ref, _ = parse_reply(typed)
    # An all-digit reference is not distinguishable from a phone number.
    if any(c.isalpha() for c in typed):
        assert ref == f"{first}-{second}"


def test_twiml_escapes_and_bounds_the_reply() -> None:
    document = twiml_response('taken by 王强 <b>&"\x00\ud800')
    root = ET.fromstring(document)

    assert document.startswith('<?xml version="1.0" encoding="UTF-8"?><Response>')
    assert [m.text for m in root.iter("Message")] == ['taken by 王强 <b>&"']
    assert twiml_response(None) == '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
    assert twiml_response("") == twiml_response(None)
    long = ET.fromstring(twiml_response("长" * 2000))
    assert len(long.findtext("Message") or "") == MAX_REPLY_CHARS


# ----------------------------------------------------------------------------- webhooks


@dataclass
class Recorder:
    """The daemon's side of the webhooks: records what arrives, answers scripted text."""

    answer: str | None = "已确认，谢谢"
    fail: bool = False
    replies: list[InboundReply] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_reply(self, reply: InboundReply) -> str | None:
        if self.fail:
            raise RuntimeError("journal unavailable")
        self.replies.append(reply)
        self.arrived.set()
        return self.answer

    async def on_status(self, update: StatusUpdate) -> None:
        if self.fail:
            raise RuntimeError("journal unavailable")
        self.statuses.append(update)
        self.arrived.set()


@dataclass
class Server:
    url: str  # where this machine reaches the server
    webhooks: TwilioWebhooks
    recorder: Recorder


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    runners: list[web.AppRunner] = []

    async def start(public_url: str | None = None, **options: Any) -> Server:
        # Bind first: the public URL (which the signature covers) needs the port.
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        recorder = Recorder()
        webhooks = TwilioWebhooks(
            auth_token=options.pop("auth_token", TOKEN),
            public_url=public_url or url,
            on_reply=recorder.on_reply,
            on_status=recorder.on_status,
            clock=lambda: 1_700_000_000.0,
            **options,
        )
        # Like the control server: a small client_max_size, our routes added.
        app = web.Application(client_max_size=16 * 1024)
        app.add_routes(webhooks.routes())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.SockSite(runner, sock).start()
        return Server(url, webhooks, recorder)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def server(make_server: ServerFactory) -> Server:
    return await make_server()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def inbound_form(body: str = "K7QM-3XRD 1", sender: str = LEADER) -> dict[str, str]:
    sid = "SM" + "ab" * 16
    return {
        "MessageSid": sid,
        "SmsMessageSid": sid,
        "SmsSid": sid,
        "AccountSid": "AC" + "d0" * 16,
        "From": sender,
        "To": OUR_NUMBER,
        "Body": body,
        "NumMedia": "0",
        "NumSegments": "1",
        "ApiVersion": "2010-04-01",
    }


def sign(url: str, form: dict[str, str], token: str = TOKEN) -> dict[str, str]:
    return {"X-Twilio-Signature": RequestValidator(token).compute_signature(url, form)}


async def post(
    http: aiohttp.ClientSession, url: str, form: dict[str, str], headers: dict[str, str]
) -> tuple[int, str, str]:
    async with http.post(url, data=form, headers=headers) as resp:
        return resp.status, resp.content_type, await resp.text()


async def test_signed_inbound_reaches_on_reply_and_twiml_carries_the_answer(
    server: Server, http: aiohttp.ClientSession
) -> None:
    server.recorder.answer = "taken by 王强 <已确认> & thanks"
    url = server.webhooks.inbound_url
    form = inbound_form("ｋ７ｑｍ－３ｘｒｄ　好的")

    status, content_type, text = await post(http, url, form, sign(url, form))

    assert (status, content_type) == (200, "text/xml")
    root = ET.fromstring(text)
    assert root.tag == "Response"
    assert root.findtext("Message") == "taken by 王强 <已确认> & thanks"
    [reply] = server.recorder.replies
    assert reply == InboundReply(
        message_sid=form["MessageSid"],
        from_phone=LEADER,
        to_phone=OUR_NUMBER,
        body="ｋ７ｑｍ－３ｘｒｄ　好的",
        alarm_ref="K7QM-3XRD",
        intent="ack",
        received_at=1_700_000_000.0,
    )


async def test_no_answer_gives_an_empty_response(
    server: Server, http: aiohttp.ClientSession
) -> None:
    server.recorder.answer = None
    url = server.webhooks.inbound_url
    form = inbound_form("2")

    status, _, text = await post(http, url, form, sign(url, form))

    assert status == 200
    assert text == '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
    assert server.recorder.replies[0].intent == "decline"


@pytest.mark.parametrize("forgery", ["missing", "empty", "garbage", "wrong-token"])
async def test_forged_inbound_is_403_and_never_reaches_on_reply(
    server: Server, http: aiohttp.ClientSession, forgery: str
) -> None:
    url = server.webhooks.inbound_url
    form = inbound_form()
    headers = {
        "missing": {},
        "empty": {"X-Twilio-Signature": ""},
        "garbage": {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"},
        "wrong-token": sign(url, form, token="another-accounts-token"),
    }[forgery]

    with capture_logs() as logs:
        status, _, _ = await post(http, url, form, headers)

    assert status == 403
    assert server.recorder.replies == []
    forged = [e for e in logs if e["event"] == "webhook.forged"]
    assert len(forged) == 1
    assert forged[0]["log_level"] == "warning"
    assert LEADER not in str(logs)  # no phone number in the logs


async def test_tampered_form_is_403(server: Server, http: aiohttp.ClientSession) -> None:
    url = server.webhooks.inbound_url
    form = inbound_form("2")
    headers = sign(url, form)

    status, _, _ = await post(http, url, {**form, "Body": "1"}, headers)

    assert status == 403
    assert server.recorder.replies == []


@pytest.mark.parametrize(
    "signed_url",
    [
        "https://gateway.example.org/twilio/inbound",  # another host
        "{base}/twilio/status",  # the other endpoint
        "{base}/twilio/inbound?center=2",  # a query the request does not carry
        "{base}/other/twilio/inbound",
    ],
)
async def test_signature_for_another_url_is_403(
    server: Server, http: aiohttp.ClientSession, signed_url: str
) -> None:
    form = inbound_form()
    headers = sign(signed_url.format(base=server.url), form)

    status, _, _ = await post(http, server.webhooks.inbound_url, form, headers)

    assert status == 403
    assert server.recorder.replies == []


async def test_public_url_behind_a_proxy_and_query_strings_are_signed_as_twilio_sees_them(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    # Twilio calls https://center.example.org/gw/...; a proxy strips /gw.
    proxied = await make_server(public_url="https://center.example.org/gw/")
    public = "https://center.example.org/gw/twilio/inbound?center=k%C3%A9nli&x=1"
    form = inbound_form()

    ok, _, _ = await post(
        http, f"{proxied.url}{INBOUND_PATH}?center=k%C3%A9nli&x=1", form, sign(public, form)
    )
    local_signature, _, _ = await post(
        http,
        f"{proxied.url}{INBOUND_PATH}?center=k%C3%A9nli&x=1",
        form,
        sign(f"{proxied.url}{INBOUND_PATH}?center=k%C3%A9nli&x=1", form),
    )

    assert proxied.webhooks.inbound_url == "https://center.example.org/gw/twilio/inbound"
    assert ok == 200
    assert local_signature == 403
    assert len(proxied.recorder.replies) == 1


async def test_signed_status_callback_reaches_on_status(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = server.webhooks.status_url
    failed = {
        "MessageSid": "SM" + "12" * 16,
        "MessageStatus": "undelivered",
        "ErrorCode": "30003",
        "To": LEADER,
        "From": OUR_NUMBER,
        "AccountSid": "AC" + "d0" * 16,
    }
    delivered = {**failed, "MessageStatus": "delivered"}
    del delivered["ErrorCode"]

    first, _, body = await post(http, url, failed, sign(url, failed))
    second, _, _ = await post(http, url, delivered, sign(url, delivered))

    assert (first, body, second) == (204, "", 204)
    assert server.recorder.statuses == [
        StatusUpdate("SM" + "12" * 16, "undelivered", 30003, LEADER),
        StatusUpdate("SM" + "12" * 16, "delivered", None, LEADER),
    ]


async def test_forged_status_callback_is_403(server: Server, http: aiohttp.ClientSession) -> None:
    url = server.webhooks.status_url
    form = {"MessageSid": "SM" + "12" * 16, "MessageStatus": "delivered"}

    status, _, _ = await post(http, url, form, sign(server.webhooks.inbound_url, form))

    assert status == 403
    assert server.recorder.statuses == []


async def test_bad_bodies_are_400_or_413(server: Server, http: aiohttp.ClientSession) -> None:
    url = server.webhooks.inbound_url
    form = inbound_form()
    headers = sign(url, form)

    async with http.post(url, json=form, headers=headers) as as_json:
        json_status = as_json.status
    async with http.post(
        url,
        data=b"Body=%FF%FE&From=x",
        headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
    ) as not_utf8:
        utf8_status = not_utf8.status
    big = {**form, "Body": "长" * 20_000}  # ~180 KB form-encoded
    async with http.post(url, data=big, headers=sign(url, big)) as too_big:
        big_status = too_big.status

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the limit holds on the bytes actually read.
        for _ in range(100):
            yield b"Body=" + b"a" * 1000 + b"&"

    async with http.post(
        url,
        data=chunks(),
        headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
    ) as streamed:
        streamed_status = streamed.status
    async with http.get(url) as get:
        get_status = get.status

    assert (json_status, utf8_status, big_status, streamed_status) == (400, 400, 413, 413)
    assert get_status == 405
    assert server.recorder.replies == []


async def test_the_host_apps_smaller_body_limit_does_not_apply(
    server: Server, http: aiohttp.ClientSession
) -> None:
    # ~22 KB form-encoded: over the host application's 16 KiB client_max_size
    # (the control server's), under the webhook's own limit.
    url = server.webhooks.inbound_url
    form = inbound_form("收到" * 1200)

    status, _, _ = await post(http, url, form, sign(url, form))

    assert status == 200
    assert server.recorder.replies[0].body == "收到" * 1200


async def test_signed_but_incomplete_forms_are_400(
    server: Server, http: aiohttp.ClientSession
) -> None:
    inbound = {"MessageSid": "SM" + "ab" * 16, "Body": "1"}
    status_form = {"MessageSid": "SM" + "ab" * 16}

    no_from, _, _ = await post(
        http, server.webhooks.inbound_url, inbound, sign(server.webhooks.inbound_url, inbound)
    )
    no_status, _, _ = await post(
        http, server.webhooks.status_url, status_form, sign(server.webhooks.status_url, status_form)
    )

    assert (no_from, no_status) == (400, 400)
    assert server.recorder.replies == []
    assert server.recorder.statuses == []


async def test_sender_that_is_not_a_phone_number_is_not_a_reply(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = server.webhooks.inbound_url
    form = inbound_form("1", sender="CHINAMOBILE")

    status, _, text = await post(http, url, form, sign(url, form))

    assert status == 200
    assert "<Message>" not in text
    assert server.recorder.replies == []


async def test_failing_handlers_answer_500_and_log(
    server: Server, http: aiohttp.ClientSession
) -> None:
    server.recorder.fail = True
    inbound = inbound_form()
    status_form = {"MessageSid": "SM" + "12" * 16, "MessageStatus": "failed", "ErrorCode": "x"}

    with capture_logs() as logs:
        reply_status, _, _ = await post(
            http, server.webhooks.inbound_url, inbound, sign(server.webhooks.inbound_url, inbound)
        )
        status_status, _, _ = await post(
            http,
            server.webhooks.status_url,
            status_form,
            sign(server.webhooks.status_url, status_form),
        )

    assert (reply_status, status_status) == (500, 500)
    events = {e["event"]: e for e in logs}
    assert events["webhook.reply_handler_failed"]["log_level"] == "error"
    assert events["webhook.status_handler_failed"]["log_level"] == "error"


def _sha256_signature(secret: str, url: str, form: dict[str, str]) -> str:
    payload = url + "".join(k + form[k] for k in sorted(form))
    mac = hmac.new(secret.encode(), payload.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


async def test_shared_key_signatures(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    with_key = await make_server(shared_key_secret="shared-secret")
    without_key = await make_server()
    form = inbound_form()
    settings_header = {"X-Twilio-Webhooks-Signature-Settings": "key=k1,algorithm=HMAC_SHA256"}

    def headers(target: Server, secret: str) -> dict[str, str]:
        signature = _sha256_signature(secret, target.webhooks.inbound_url, form)
        return {**settings_header, "X-Twilio-Signature": signature}

    good, _, _ = await post(
        http, with_key.webhooks.inbound_url, form, headers(with_key, "shared-secret")
    )
    token_signed, _, _ = await post(
        http, with_key.webhooks.inbound_url, form, headers(with_key, TOKEN)
    )
    unknown_algorithm, _, _ = await post(
        http,
        with_key.webhooks.inbound_url,
        form,
        {
            **headers(with_key, "shared-secret"),
            "X-Twilio-Webhooks-Signature-Settings": "key=k1,algorithm=HMAC_MD5",
        },
    )
    unconfigured, _, _ = await post(
        http, without_key.webhooks.inbound_url, form, headers(without_key, "shared-secret")
    )

    # Unconfigured: refused like a forgery, never a 500 (see test_control_security).
    assert (good, token_signed, unknown_algorithm, unconfigured) == (200, 403, 403, 403)
    assert len(with_key.recorder.replies) == 1
    assert without_key.recorder.replies == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"auth_token": ""}, "auth_token"),
        ({"public_url": "gateway.example.org"}, "absolute"),
        ({"public_url": "ftp://gateway.example.org"}, "absolute"),
        ({"public_url": "https://gateway.example.org/?x=1"}, "query"),
        ({"max_body": 0}, "max_body"),
    ],
)
def test_constructor_validates(kwargs: dict[str, Any], match: str) -> None:
    async def reply(_: InboundReply) -> str | None:
        return None

    async def status(_: StatusUpdate) -> None:
        return None

    arguments: dict[str, Any] = {
        "auth_token": TOKEN,
        "public_url": "https://gateway.example.org",
        "on_reply": reply,
        "on_status": status,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        TwilioWebhooks(**arguments)


# ----------------------------------------------------------------------------- with the double


@pytest.fixture
async def double() -> AsyncIterator[TwilioDouble]:
    async with TwilioDouble(sent_delay=None, delivered_delay=None) as d:
        yield d


def sender_for(d: TwilioDouble, *, request_timeout_s: float = 2.0) -> TwilioSender:
    section = SmsSection(
        from_number=OUR_NUMBER,
        base_url=d.base_url,
        request_timeout_s=request_timeout_s,
        max_attempts=1,
    )
    return TwilioSender(section, TwilioAccount(d.account_sid, d.auth_token))


@pytest.fixture
async def sender(double: TwilioDouble) -> AsyncIterator[TwilioSender]:
    async with sender_for(double) as s:
        yield s


@pytest.mark.integration  # runs the Twilio double's HTTP server
async def test_double_inbound_webhook_end_to_end(
    double: TwilioDouble, sender: TwilioSender, make_server: ServerFactory
) -> None:
    server = await make_server(auth_token=double.auth_token)
    server.recorder.answer = "已确认，谢谢。K7QM-3XRD 由您负责"
    double.inbound_webhook_url = server.webhooks.inbound_url
    await sender.send(LEADER, "【紧急】张大爷按下了求助按钮，回复“K7QM-3XRD 1”确认。")

    message = await double.inject_inbound(LEADER, "k7qm-3xrd 1")

    [reply] = server.recorder.replies
    assert (reply.message_sid, reply.alarm_ref, reply.intent) == (message.sid, "K7QM-3XRD", "ack")
    assert (reply.from_phone, reply.to_phone) == (LEADER, OUR_NUMBER)
    assert double.inbound_deliveries[0].http_status == 200
    # Twilio turned our TwiML answer into an SMS back to the grid leader.
    [alarm, confirmation] = double.messages
    assert alarm.direction == "outbound-api"
    assert confirmation.direction == "outbound-reply"
    assert (confirmation.to, confirmation.from_) == (LEADER, OUR_NUMBER)
    assert confirmation.body == "已确认，谢谢。K7QM-3XRD 由您负责"


@pytest.mark.integration  # runs the Twilio double's HTTP server
async def test_double_status_callbacks_end_to_end(
    double: TwilioDouble, sender: TwilioSender, make_server: ServerFactory
) -> None:
    server = await make_server(auth_token=double.auth_token)
    double.set_final_status(WORKER, "undelivered", error_code=30003)
    ok = await sender.send(LEADER, "x", status_callback=server.webhooks.status_url)
    lost = await sender.send(WORKER, "y", status_callback=server.webhooks.status_url)

    await double.advance()

    assert [(u.message_sid, u.status, u.error_code) for u in server.recorder.statuses] == [
        (ok.sid, "sent", None),
        (ok.sid, "delivered", None),
        (lost.sid, "sent", None),
        (lost.sid, "undelivered", 30003),
    ]
    assert all(c.http_status == 204 for c in double.callbacks)


# ----------------------------------------------------------------------------- polling


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingSleep:
    """Records the poller's pauses and yields to the loop instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.called = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.called.set()
        await asyncio.sleep(0.005)

    async def wait_for_calls(self, n: int) -> None:
        async with asyncio.timeout(10):
            while len(self.delays) < n:
                self.called.clear()
                await self.called.wait()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def polled(clock: FakeClock) -> AsyncIterator[FaultyTwilioDouble]:
    async with FaultyTwilioDouble(clock=clock, sent_delay=None, delivered_delay=None) as d:
        yield d


@pytest.fixture
async def poll_sender(polled: FaultyTwilioDouble) -> AsyncIterator[TwilioSender]:
    async with sender_for(polled) as s:
        yield s


def make_poller(
    sender: TwilioSender, recorder: Recorder, clock: FakeClock, **kwargs: Any
) -> InboundPoller:
    options: dict[str, Any] = {
        "our_numbers": [OUR_NUMBER, OTHER_NUMBER],
        "on_reply": recorder.on_reply,
        "clock": clock,
        **kwargs,
    }
    return InboundPoller(sender, **options)


async def test_poller_hands_each_inbound_message_over_exactly_once(
    polled: FaultyTwilioDouble, poll_sender: TwilioSender, clock: FakeClock
) -> None:
    recorder = Recorder(answer=None)
    poller = make_poller(poll_sender, recorder, clock)
    clock.advance(5)
    first = await polled.inject_inbound(LEADER, "K7QM-3XRD 1", to=OUR_NUMBER)
    clock.advance(1)
    second = await polled.inject_inbound(WORKER, "去不了", to=OTHER_NUMBER)
    # Neither to one of our numbers nor inbound: never handed over.
    await poll_sender.send(LEADER, "alarm text")

    got = await poller.poll_once()
    again = await poller.poll_once()
    clock.advance(30)
    third = await polled.inject_inbound(LEADER, "好的", to=OUR_NUMBER)
    later = await poller.poll_once()

    assert [(r.message_sid, r.alarm_ref, r.intent) for r in got] == [
        (first.sid, "K7QM-3XRD", "ack"),  # oldest first
        (second.sid, None, "decline"),
    ]
    assert got[1].to_phone == OTHER_NUMBER
    assert first.date_sent is not None
    assert got[0].received_at == first.date_sent.timestamp()
    assert again == []
    assert [r.message_sid for r in later] == [third.sid]
    assert [r.message_sid for r in recorder.replies] == [first.sid, second.sid, third.sid]
    assert poller.since == datetime.fromtimestamp(clock.now, UTC)


async def test_poller_state_survives_a_restart_without_replays(
    polled: FaultyTwilioDouble, poll_sender: TwilioSender, clock: FakeClock
) -> None:
    recorder = Recorder(answer=None)
    before = make_poller(poll_sender, recorder, clock)
    clock.advance(1)
    handled = await polled.inject_inbound(LEADER, "1", to=OUR_NUMBER)
    await before.poll_once()
    clock.advance(1)
    missed = await polled.inject_inbound(WORKER, "1", to=OUR_NUMBER)  # while "down"

    after = make_poller(poll_sender, recorder, clock, since=before.since, seen=before.seen)
    got = await after.poll_once()

    assert handled.sid in before.seen
    assert [r.message_sid for r in got] == [missed.sid]
    assert [r.message_sid for r in recorder.replies] == [handled.sid, missed.sid]


async def test_poller_ignores_messages_from_before_its_start(
    polled: FaultyTwilioDouble, poll_sender: TwilioSender, clock: FakeClock
) -> None:
    await polled.inject_inbound(LEADER, "1", to=OUR_NUMBER)
    clock.advance(3600)
    recorder = Recorder(answer=None)
    poller = make_poller(poll_sender, recorder, clock)

    assert await poller.poll_once() == []


async def test_poller_forgets_sids_that_no_listing_can_return(
    polled: FaultyTwilioDouble, poll_sender: TwilioSender, clock: FakeClock
) -> None:
    recorder = Recorder(answer=None)
    poller = make_poller(poll_sender, recorder, clock, overlap_s=60, seen={"SMrestored"})
    clock.advance(1)
    old = await polled.inject_inbound(LEADER, "1", to=OUR_NUMBER)
    await poller.poll_once()
    clock.advance(600)
    new = await polled.inject_inbound(LEADER, "好", to=OUR_NUMBER)
    await poller.poll_once()

    assert poller.seen == {new.sid}
    assert old.sid not in poller.seen
    assert len(recorder.replies) == 2


async def test_poller_follows_pages(
    polled: FaultyTwilioDouble, poll_sender: TwilioSender, clock: FakeClock
) -> None:
    recorder = Recorder(answer=None)
    poller = make_poller(poll_sender, recorder, clock)
    for n in range(130):  # more than one page of 100
        await polled.inject_inbound(LEADER, f"{n}", to=OUR_NUMBER)

    got = await poller.poll_once()

    assert len(got) == 130
    assert [r.body for r in got] == [str(n) for n in range(130)]  # oldest first


async def test_poller_texts_the_answer_back(
    polled: FaultyTwilioDouble, poll_sender: TwilioSender, clock: FakeClock
) -> None:
    recorder = Recorder(answer="已确认，谢谢")
    poller = make_poller(poll_sender, recorder, clock)
    silent = make_poller(poll_sender, Recorder(answer="x"), clock, send_replies=False)
    await polled.inject_inbound(LEADER, "1", to=OTHER_NUMBER)

    await poller.poll_once()
    await silent.poll_once()

    [answer] = polled.messages
    assert (answer.to, answer.from_, answer.body) == (LEADER, OTHER_NUMBER, "已确认，谢谢")


async def test_poller_survives_api_errors_and_backs_off(
    polled: FaultyTwilioDouble, poll_sender: TwilioSender, clock: FakeClock
) -> None:
    recorder = Recorder(answer=None)
    sleep = RecordingSleep()
    poller = make_poller(poll_sender, recorder, clock, sleep=sleep, interval_s=5.0)
    await polled.inject_inbound(LEADER, "K7QM-3XRD 1", to=OUR_NUMBER)
    polled.inject(Fault.status(500), Fault.status(500), Fault.status(429), target="list")

    with capture_logs() as logs:
        task = asyncio.create_task(poller.run())
        await asyncio.wait_for(recorder.arrived.wait(), 10)
        await sleep.wait_for_calls(5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert len(recorder.replies) == 1  # once, despite many polls
    failures = [e for e in logs if e["event"] == "inbound_poll.failed"]
    assert len(failures) == 3
    assert "500" in failures[0]["error"]
    # Three backoff pauses (jittered, capped), then the normal interval.
    assert all(0 < d <= 60 for d in sleep.delays[:3])
    assert sleep.delays[3:5] == [5.0, 5.0]
    assert task.cancelled()


async def test_poller_times_out_a_hanging_api(
    polled: FaultyTwilioDouble, clock: FakeClock
) -> None:
    recorder = Recorder(answer=None)
    await polled.inject_inbound(LEADER, "1", to=OUR_NUMBER)
    polled.inject(Fault.delay(30), target="list")

    # The sender's request timeout bounds every call the poller makes.
    async with sender_for(polled, request_timeout_s=0.2) as quick:
        poller = make_poller(quick, recorder, clock)
        with pytest.raises(SmsSendError) as caught:
            await poller.poll_once()
        since = poller.since
        got = await poller.poll_once()

    assert caught.value.timed_out

    assert len(got) == 1
    assert poller.since >= since


async def test_poller_survives_bad_messages_and_failing_handlers(
    polled: FaultyTwilioDouble, poll_sender: TwilioSender, clock: FakeClock
) -> None:
    calls: list[str] = []

    async def flaky(reply: InboundReply) -> str | None:
        calls.append(reply.body)
        if reply.body in ("boom", "always"):
            if reply.body == "boom" and calls.count("boom") >= 2:
                return None
            raise RuntimeError("handler bug")
        return None

    poller = InboundPoller(
        poll_sender,
        our_numbers=[OUR_NUMBER],
        on_reply=flaky,
        clock=clock,
        max_handler_attempts=3,
    )
    clock.advance(1)
    await polled.inject_inbound("CHINAMOBILE", "流量提醒", to=OUR_NUMBER)
    await polled.inject_inbound(LEADER, "boom", to=OUR_NUMBER)
    await polled.inject_inbound(WORKER, "always", to=OUR_NUMBER)
    await polled.inject_inbound(LEADER, "1", to=OUR_NUMBER)

    with capture_logs() as logs:
        first = [r.body for r in await poller.poll_once()]
        second = [r.body for r in await poller.poll_once()]
        third = [r.body for r in await poller.poll_once()]
        fourth = [r.body for r in await poller.poll_once()]

    assert first == ["1"]  # the others failed or are not replies
    assert second == ["boom"]  # succeeded on its second call
    assert third == []
    assert fourth == []
    assert calls.count("always") == 3  # given up after max_handler_attempts
    assert "流量提醒" not in calls
    events = [e["event"] for e in logs]
    assert events.count("inbound_poll.handler_gave_up") == 1
    assert "inbound_poll.sender_not_e164" in events


async def test_poller_validates_arguments(poll_sender: TwilioSender) -> None:
    recorder = Recorder()
    with pytest.raises(ValueError, match="our_numbers"):
        InboundPoller(poll_sender, our_numbers=[], on_reply=recorder.on_reply)
    with pytest.raises(ValueError, match="timezone"):
        InboundPoller(
            poll_sender,
            our_numbers=[OUR_NUMBER],
            on_reply=recorder.on_reply,
            since=datetime(2025, 1, 1),
        )


async def test_status_poller_returns_current_statuses(
    polled: FaultyTwilioDouble, poll_sender: TwilioSender
) -> None:
    polled.set_final_status(WORKER, "undelivered", error_code=30003)
    delivered = await poll_sender.send(LEADER, "x")
    undelivered = await poll_sender.send(WORKER, "y")
    queued = await poll_sender.send(LEADER, "z")
    await polled.advance(delivered.sid)
    await polled.advance(undelivered.sid)
    unknown = "SM" + "0" * 32
    poller = StatusPoller(poll_sender)

    with capture_logs() as logs:
        updates = await poller.poll_once(
            [delivered.sid, unknown, undelivered.sid, queued.sid, delivered.sid]
        )

    # A fetched status names no recipient: the one status fetch returns
    # (status, error code), as the dispatcher's reconciliation reads it.
    assert updates == [
        StatusUpdate(delivered.sid, "delivered", None, None),
        StatusUpdate(undelivered.sid, "undelivered", 30003, None),
        StatusUpdate(queued.sid, "queued", None, None),
    ]
    assert [e["sid"] for e in logs if e["event"] == "status_poll.fetch_failed"] == [unknown]


async def test_status_poller_skips_a_failed_fetch_until_the_next_round(
    polled: FaultyTwilioDouble, poll_sender: TwilioSender
) -> None:
    sent = await poll_sender.send(LEADER, "x")
    polled.inject(Fault.status(500), target="fetch")
    poller = StatusPoller(poll_sender)

    first = await poller.poll_once([sent.sid])
    second = await poller.poll_once([sent.sid])

    assert first == []
    assert second == [StatusUpdate(sent.sid, "queued", None, None)]


def test_full_width_helper_matches_nfkc() -> None:
    # Guards the hypothesis strategy above: NFKC undoes _full_width.
    assert _full_width("K7QM-3XRD") == "Ｋ７ＱＭ－３ＸＲＤ"
    assert unicodedata.normalize("NFKC", _full_width("K7QM-3XRD")) == "K7QM-3XRD"
