"""TwilioSender against the local Twilio double: real HTTP, real twilio-python client.

Backoff sleeps are injected (recorded, not slept) and the jitter source is
seeded, so retries are instant and deterministic. Only the request timeout
tests wait on real time, with timeouts of a fraction of a second.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from pydantic import ValidationError
from structlog.testing import capture_logs
from twilio.request_validator import RequestValidator

from gateway.config import SmsSection
from gateway.redact import mask_phone
from gateway.sandbox.twilio_double import TwilioDouble
from gateway.sendgate import FIRST_WAVE, FOLLOW_UP
from gateway.sms import (
    Attempt,
    SendResult,
    SmsSendError,
    TwilioAccount,
    TwilioSender,
    segments,
)
from tests.helpers import eventually
from tests.support.twilio_faults import Fault, FaultyTwilioDouble

SENDER = "+15005550006"
ELDER_SON = "+8613800000001"
GRID_LEADER = "+8613900000002"
ALARM_TEXT = (
    "【紧急求助】张桂兰（82岁）按下了求助按钮，地址：垦利区胜坨镇胜利社区3号楼2单元301室。"
    "请网格员立即上门查看，家属已同时通知。编号A1042"
)

integration = pytest.mark.integration


class RecordingSleep:
    """Injected sleep: records each requested delay and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.sleep(0)


class AttemptLog:
    """The ``on_attempt`` hook, as the daemon's journal would use it."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    async def __call__(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)

    @property
    def outcomes(self) -> list[str]:
        return [a.outcome for a in self.attempts]


@pytest.fixture
async def double() -> AsyncIterator[FaultyTwilioDouble]:
    async with FaultyTwilioDouble(sent_delay=None, delivered_delay=None) as d:
        yield d


def sender_for(
    double: FaultyTwilioDouble,
    *,
    auth_token: str | None = None,
    status_callback_url: str | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
    **sms: Any,
) -> TwilioSender:
    """A sender for ``double`` from an ``[sms]`` section as the config validates it."""
    section = SmsSection.model_validate(
        {
            "from_number": SENDER,
            "base_url": double.base_url,
            "request_timeout_s": 2.0,
            "max_attempts": 5,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 5.0,
            **sms,
        }
    )
    account = TwilioAccount(double.account_sid, auth_token or double.auth_token)
    return TwilioSender(
        section, account, status_callback_url=status_callback_url, sleep=sleep, rng=rng
    )


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def log() -> AttemptLog:
    return AttemptLog()


@pytest.fixture
async def sender(double: FaultyTwilioDouble, sleep: RecordingSleep) -> AsyncIterator[TwilioSender]:
    async with sender_for(double, sleep=sleep, rng=random.Random(7)) as s:
        yield s


# ----------------------------------------------------------------------------- happy path


@integration
async def test_send_returns_the_accepted_message(
    double: FaultyTwilioDouble, sender: TwilioSender, log: AttemptLog, sleep: RecordingSleep
) -> None:
    result = await sender.send(ELDER_SON, ALARM_TEXT, on_attempt=log)

    [message] = double.messages
    assert result == SendResult(
        sid=message.sid,
        status="queued",
        num_segments=segments(ALARM_TEXT),
        attempts=1,
        error_code=None,
    )
    assert result.num_segments == 2  # more than 70 characters, not GSM-7: two UCS-2 parts
    assert (message.to, message.from_, message.body) == (ELDER_SON, SENDER, ALARM_TEXT)
    assert log.attempts == [Attempt(1, "accepted", 201, None, None, None)]
    assert sleep.calls == []


@integration
async def test_send_through_a_messaging_service(double: FaultyTwilioDouble) -> None:
    service = "MG" + "ab" * 16
    async with sender_for(double, from_number=None, messaging_service_sid=service) as s:
        await s.send(ELDER_SON, "hi")

    [message] = double.messages
    assert message.messaging_service_sid == service
    assert message.from_ is None


@integration
async def test_wrong_auth_token_is_a_permanent_failure(
    double: FaultyTwilioDouble, sleep: RecordingSleep, log: AttemptLog
) -> None:
    async with sender_for(double, auth_token="not-the-token", sleep=sleep) as s:
        with pytest.raises(SmsSendError) as caught:
            await s.send(ELDER_SON, "x", on_attempt=log)

    error = caught.value
    assert (error.status, error.code) == (401, 20003)
    assert error.permanent
    assert not error.retryable
    assert not error.outcome_unknown
    assert log.outcomes == ["failed"]
    assert len(double.requests) == 1
    assert sleep.calls == []
    assert double.messages == []


# ----------------------------------------------------------------------------- concurrency


@integration
async def test_concurrent_sends_overlap_at_twilio(
    double: FaultyTwilioDouble, sender: TwilioSender
) -> None:
    # Each answer is held, so every request must have arrived before any answer
    # if (and only if) the sends really run concurrently.
    double.inject(*[Fault.delay(0.5)] * 4)
    results = await asyncio.gather(*(sender.send(ELDER_SON, f"alarm {n}") for n in range(4)))

    arrivals = [r.arrived_at for r in double.requests]
    answers = [r.answered_at for r in double.requests]
    assert len(arrivals) == 4
    assert all(a is not None for a in answers)
    assert max(arrivals) < min(a for a in answers if a is not None)
    assert len({r.sid for r in results}) == 4


@integration
async def test_concurrency_is_bounded_by_the_semaphore(double: FaultyTwilioDouble) -> None:
    double.inject(*[Fault.delay(0.3)] * 4)
    async with sender_for(double, concurrency=2) as s:
        await asyncio.gather(*(s.send(ELDER_SON, f"alarm {n}") for n in range(4)))

    spans = [(r.arrived_at, r.answered_at) for r in double.requests]
    assert len(spans) == 4
    # Requests open at the moment each one arrived (itself included).
    in_flight = [sum(1 for a, b in spans if b is not None and a <= t < b) for t, _ in spans]
    assert max(in_flight) == 2


# ----------------------------------------------------------------------------- retries


@integration
async def test_429_with_retry_after_then_success(
    double: FaultyTwilioDouble, sender: TwilioSender, sleep: RecordingSleep, log: AttemptLog
) -> None:
    double.inject(Fault.status(429, code=20429, retry_after=1))
    result = await sender.send(ELDER_SON, "x", on_attempt=log)

    assert sleep.calls == [1.0]
    assert log.outcomes == ["retry", "accepted"]
    first = log.attempts[0]
    assert (first.status, first.code, first.delay_s) == (429, 20429, 1.0)
    assert result.attempts == 2
    assert len(double.messages) == 1


@integration
async def test_retry_after_as_http_date_and_its_cap(
    double: FaultyTwilioDouble, sender: TwilioSender, sleep: RecordingSleep
) -> None:
    in_30s = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    double.inject(Fault.status(429, retry_after=in_30s), Fault.status(429, retry_after=600))
    result = await sender.send(ELDER_SON, "x")

    # An HTTP date is relative to now (1 s resolution); a huge value is capped at 60 s.
    assert 20.0 < sleep.calls[0] <= 30.0
    assert sleep.calls[1] == 60.0
    assert result.attempts == 3


@integration
async def test_429_without_retry_after_uses_backoff(
    double: FaultyTwilioDouble, sender: TwilioSender, sleep: RecordingSleep
) -> None:
    double.inject(Fault.status(429))
    await sender.send(ELDER_SON, "x")

    expected = random.Random(7).uniform(0.0, 0.2)
    assert sleep.calls == [pytest.approx(expected)]


@integration
async def test_500_then_success_sends_one_message(
    double: FaultyTwilioDouble, sender: TwilioSender, sleep: RecordingSleep, log: AttemptLog
) -> None:
    double.inject(Fault.status(500))
    result = await sender.send(ELDER_SON, "x", on_attempt=log)

    assert result.attempts == 2
    assert len(log.attempts) == 2
    first = log.attempts[0]
    # A 500 may follow processing at Twilio, so the outcome is not known.
    assert (first.outcome, first.status, first.code) == ("unknown", 500, 20500)
    assert first.delay_s == sleep.calls[0]
    assert 0.0 <= sleep.calls[0] <= 0.2
    assert len(double.messages) == 1
    assert len(double.requests) == 2


@integration
@pytest.mark.parametrize("code", [21211, 21610, 21408, 21614, 21612])
async def test_permanent_errors_are_not_retried(
    double: FaultyTwilioDouble,
    sender: TwilioSender,
    sleep: RecordingSleep,
    log: AttemptLog,
    code: int,
) -> None:
    double.inject(Fault.error(code=code))
    with pytest.raises(SmsSendError) as caught:
        await sender.send(ELDER_SON, "x", on_attempt=log)

    error = caught.value
    assert (error.status, error.code) == (400, code)
    assert error.permanent
    assert not error.retryable
    assert log.outcomes == ["failed"]
    assert len(double.requests) == 1
    assert sleep.calls == []


@integration
async def test_invalid_number_rejected_by_twilio_is_permanent_and_not_logged_in_full(
    double: FaultyTwilioDouble, sender: TwilioSender, log: AttemptLog
) -> None:
    bad = "8613800000001"  # missing '+': Twilio answers 21211 and echoes the number
    with capture_logs() as logs, pytest.raises(SmsSendError) as caught:
        await sender.send(bad, "x", on_attempt=log)

    assert caught.value.code == 21211
    assert caught.value.permanent
    assert log.attempts[0].error is not None
    assert bad not in log.attempts[0].error
    assert all(bad not in str(entry) for entry in logs)


@integration
async def test_dropped_answer_is_unknown_then_retried_and_found_by_marker(
    double: FaultyTwilioDouble, sender: TwilioSender, log: AttemptLog
) -> None:
    since = datetime.now(UTC) - timedelta(minutes=1)
    double.inject(Fault.drop_after_receive())
    result = await sender.send(ELDER_SON, ALARM_TEXT, on_attempt=log)

    assert log.outcomes == ["unknown", "accepted"]
    assert log.attempts[0].error is not None
    assert "Disconnected" in log.attempts[0].error
    # The documented duplicate: the first request was processed, its answer lost.
    assert [m.body for m in double.messages] == [ALARM_TEXT, ALARM_TEXT]
    found = await sender.find_sent(ELDER_SON, since=since, marker="A1042")
    assert found == [(result.sid, "queued"), (double.messages[0].sid, "queued")]


@integration
async def test_slow_answer_beyond_timeout_is_an_unknown_attempt(
    double: FaultyTwilioDouble, sleep: RecordingSleep, log: AttemptLog
) -> None:
    double.inject(Fault.delay(5.0))
    async with sender_for(double, request_timeout_s=0.2, sleep=sleep, rng=random.Random(1)) as s:
        result = await s.send(ELDER_SON, "x", on_attempt=log)

    assert log.outcomes == ["unknown", "accepted"]
    first = log.attempts[0]
    assert first.status is None
    assert first.error is not None
    assert first.error.startswith("TimeoutError")
    assert result.attempts == 2


@integration
async def test_timeout_on_last_attempt_sets_timed_out_and_outcome_unknown(
    double: FaultyTwilioDouble, sleep: RecordingSleep
) -> None:
    double.inject(Fault.delay(5.0))
    async with sender_for(double, request_timeout_s=0.2, max_attempts=1, sleep=sleep) as s:
        with pytest.raises(SmsSendError) as caught:
            await s.send(ELDER_SON, "x")

    error = caught.value
    assert error.timed_out
    assert error.outcome_unknown
    assert error.retryable
    assert not error.permanent
    assert [a.outcome for a in error.attempts] == ["unknown"]


@integration
async def test_outage_gives_up_after_max_attempts(
    double: FaultyTwilioDouble, sleep: RecordingSleep, log: AttemptLog
) -> None:
    await double.outage(True)
    async with sender_for(
        double,
        max_attempts=6,
        backoff_initial_s=0.1,
        backoff_max_s=0.5,
        sleep=sleep,
        rng=random.Random(3),
    ) as s:
        with pytest.raises(SmsSendError) as caught:
            await s.send(ELDER_SON, "x", on_attempt=log)

    error = caught.value
    assert error.retryable
    assert not error.permanent
    assert error.outcome_unknown  # 503s: Twilio may have seen them
    assert (error.status, error.code) == (503, 20503)
    assert len(double.requests) == 6
    assert log.outcomes == ["unknown"] * 6
    assert log.attempts[-1].delay_s is None
    # Capped full jitter: the k-th pause is uniform in [0, min(cap, initial * 2**(k-1))].
    reference = random.Random(3)
    expected = [reference.uniform(0.0, min(0.5, 0.1 * 2**k)) for k in range(5)]
    assert sleep.calls == pytest.approx(expected)
    assert double.messages == []


@integration
async def test_refused_connections_are_clean_retries(
    double: FaultyTwilioDouble, sleep: RecordingSleep, log: AttemptLog
) -> None:
    await double.outage(True, refuse=True)
    async with sender_for(double, max_attempts=3, sleep=sleep) as s:
        with pytest.raises(SmsSendError) as caught:
            await s.send(ELDER_SON, "x", on_attempt=log)

    # Nothing was ever sent, so no duplicate is possible.
    assert not caught.value.outcome_unknown
    assert caught.value.retryable
    assert log.outcomes == ["retry", "retry", "failed"]
    assert len(sleep.calls) == 2


@integration
async def test_recovers_when_outage_ends_during_backoff(
    double: FaultyTwilioDouble, log: AttemptLog
) -> None:
    await double.outage(True)

    async def end_outage_while_sleeping(seconds: float) -> None:
        await double.outage(False)

    async with sender_for(double, max_attempts=3, sleep=end_outage_while_sleeping) as s:
        result = await s.send(ELDER_SON, "x", on_attempt=log)

    assert log.outcomes == ["unknown", "accepted"]
    assert result.sid == double.messages[0].sid


# ----------------------------------------------------------------------------- status


@integration
async def test_status_progression_reaches_a_signed_callback(double: FaultyTwilioDouble) -> None:
    received: list[tuple[str, dict[str, str], str]] = []

    async def status_hook(request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        received.append((str(request.url), form, request.headers["X-Twilio-Signature"]))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/twilio/status", status_hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    callback_url = f"http://127.0.0.1:{runner.addresses[0][1]}/twilio/status"
    try:
        double.set_final_status(GRID_LEADER, "undelivered", error_code=30003)
        async with sender_for(double, status_callback_url=callback_url) as s:
            ok = await s.send(ELDER_SON, "x")
            bad = await s.send(GRID_LEADER, "y")
            await double.advance()
            ok_status = await s.fetch_status(ok.sid)
            bad_status = await s.fetch_status(bad.sid)
    finally:
        await runner.cleanup()

    validator = RequestValidator(double.auth_token)
    assert all(validator.validate(url, form, sig) for url, form, sig in received)
    by_sid: dict[str, list[str]] = {}
    for _, form, _ in received:
        by_sid.setdefault(form["MessageSid"], []).append(form["MessageStatus"])
    assert by_sid == {ok.sid: ["sent", "delivered"], bad.sid: ["sent", "undelivered"]}
    assert ok_status == ("delivered", None)
    assert bad_status == ("undelivered", 30003)


@integration
async def test_per_send_status_callback_overrides_settings(
    double: FaultyTwilioDouble, sender: TwilioSender
) -> None:
    await sender.send(ELDER_SON, "x", status_callback="http://127.0.0.1:9/override")

    assert double.messages[0].status_callback == "http://127.0.0.1:9/override"


@integration
async def test_fetch_status_of_unknown_sid_is_permanent(sender: TwilioSender) -> None:
    with pytest.raises(SmsSendError) as caught:
        await sender.fetch_status("SM" + "0" * 32)

    assert (caught.value.status, caught.value.code) == (404, 20404)
    assert caught.value.permanent


# ----------------------------------------------------------------------------- reconcile


@integration
async def test_find_sent_filters_by_number_time_and_marker() -> None:
    now = [datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC).timestamp()]
    async with (
        TwilioDouble(clock=lambda: now[0], sent_delay=None, delivered_delay=None) as d,
        sender_for(d) as s,
    ):
        old = await s.send(ELDER_SON, "alarm A1001 old")
        now[0] += 3600
        recent = await s.send(ELDER_SON, "alarm A1001 recent")
        await s.send(ELDER_SON, "alarm A2002 other alarm")
        await s.send(GRID_LEADER, "alarm A1001 other person")
        since = datetime.fromtimestamp(now[0], UTC) - timedelta(minutes=5)
        # A non-UTC 'since' must be converted, not sent with a wrong 'Z'.
        since_beijing = since.astimezone(ZoneInfo("Asia/Shanghai"))
        found = await s.find_sent(ELDER_SON, since=since, marker="A1001")
        found_beijing = await s.find_sent(ELDER_SON, since=since_beijing, marker="A1001")
        everything = await s.find_sent(ELDER_SON, since=since - timedelta(days=1), marker="A1001")

    assert found == [(recent.sid, "queued")]
    assert found_beijing == found
    assert [sid for sid, _ in everything] == [recent.sid, old.sid]


@integration
async def test_find_sent_follows_pages(double: FaultyTwilioDouble, sender: TwilioSender) -> None:
    since = datetime.now(UTC) - timedelta(minutes=1)
    for n in range(105):  # more than one page of 100
        await sender.send(ELDER_SON, f"A{n:04d}")

    found = await sender.find_sent(ELDER_SON, since=since, marker="A0")

    assert len(found) == 105
    assert len([r for r in double.requests if r.method == "GET"]) == 2


@integration
async def test_list_messages_filters_by_sender_and_stops_at_max_pages(
    double: FaultyTwilioDouble, sender: TwilioSender
) -> None:
    since = datetime.now(UTC) - timedelta(minutes=1)
    for n in range(250):
        await sender.send(ELDER_SON, f"alarm {n}")
    reply = await double.inject_inbound(ELDER_SON, "收到", to=SENDER)

    with capture_logs() as logs:
        from_son = await sender.list_messages(since=since, from_=ELDER_SON)
        capped = await sender.list_messages(since=since, to=ELDER_SON, max_pages=2)
        found = await sender.find_sent(ELDER_SON, since=since, marker="alarm 1")

    assert [(m.sid, m.direction, m.from_, m.to) for m in from_son.messages] == [
        (reply.sid, "inbound", ELDER_SON, SENDER)
    ]
    assert (from_son.pages, from_son.truncated) == (1, False)
    assert (len(capped.messages), capped.pages, capped.truncated) == (200, 2, True)
    assert capped.messages[0].body == "alarm 249"  # newest first
    assert all(m.when is not None for m in capped.messages)
    # find_sent reads the same listing: every page here, three of 100.
    assert len(found) == 1 + 10 + 100  # "alarm 1", "alarm 1x", "alarm 1xx"
    assert "sms.find_sent_truncated" not in [e["event"] for e in logs]


@integration
async def test_list_messages_rejects_naive_since_and_no_pages(sender: TwilioSender) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await sender.list_messages(since=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="max_pages"):
        await sender.list_messages(since=datetime.now(UTC), max_pages=0)


@integration
async def test_send_reply_is_one_attempt_from_the_given_number(
    double: FaultyTwilioDouble, sender: TwilioSender, sleep: RecordingSleep
) -> None:
    other = "+15005550009"
    sid = await sender.send_reply(ELDER_SON, "已确认", from_number=other)
    double.inject(Fault.status(500))

    with pytest.raises(SmsSendError) as caught:
        await sender.send_reply(ELDER_SON, "again", from_number=other)

    [message] = double.messages
    assert (message.sid, message.to, message.from_, message.body) == (
        sid, ELDER_SON, other, "已确认"
    )
    assert caught.value.status == 500
    assert len([r for r in double.requests if r.method == "POST"]) == 2
    assert sleep.calls == []


@integration
async def test_find_sent_requires_an_aware_datetime(sender: TwilioSender) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await sender.find_sent(ELDER_SON, since=datetime(2025, 1, 1), marker="x")


@integration
async def test_find_sent_during_outage_raises_retryable(
    double: FaultyTwilioDouble, sender: TwilioSender
) -> None:
    await double.outage(True)
    with pytest.raises(SmsSendError) as caught:
        await sender.find_sent(ELDER_SON, since=datetime.now(UTC), marker="x")

    assert caught.value.retryable
    assert caught.value.status == 503


# ----------------------------------------------------------------------------- lifecycle


async def test_sender_must_be_opened_first() -> None:
    sender = TwilioSender(SmsSection(from_number=SENDER), TwilioAccount("AC" + "0" * 32, "token"))
    with pytest.raises(RuntimeError, match="async with"):
        await sender.send(ELDER_SON, "x")


@integration
async def test_sender_closes_its_http_session(double: FaultyTwilioDouble) -> None:
    # filterwarnings=error turns an unclosed aiohttp session into a failure;
    # this checks the session is closed explicitly, not just garbage collected.
    async with sender_for(double) as s:
        await s.send(ELDER_SON, "x")
        session = s.client.http_client.session
    assert session.closed


def test_repr_masks_the_token() -> None:
    account = TwilioAccount("AC" + "0" * 32, "s3cr3t-token")
    sender = TwilioSender(SmsSection(from_number=SENDER), account)

    for shown in (repr(account), repr(sender)):
        assert "s3cr3t-token" not in shown
        assert "auth_token='***'" in shown
    assert "AC" + "0" * 32 in repr(sender)


@pytest.mark.parametrize(
    ("account_sid", "auth_token", "problem"),
    [
        ("XX123", "token", "account_sid"),
        ("AC" + "0" * 31, "token", "account_sid"),
        ("AC" + "g" * 32, "token", "account_sid"),
        ("AC" + "0" * 32, "", "auth_token"),
    ],
)
def test_account_is_validated(account_sid: str, auth_token: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        TwilioAccount(account_sid, auth_token)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"from_number": None}, "from_number or messaging_service_sid"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"concurrency": 0}, "concurrency"),
        ({"backoff_initial_s": 2.0, "backoff_max_s": 1.0}, "backoff"),
    ],
)
def test_sms_section_is_validated_once_for_the_sender(
    overrides: dict[str, Any], problem: str
) -> None:
    # The sender keeps no copy of these fields: the config's validation is the only one.
    with pytest.raises(ValidationError, match=problem):
        SmsSection.model_validate({"from_number": SENDER, **overrides})


def test_error_str_carries_the_data() -> None:
    error = SmsSendError("SMS refused", status=400, code=21610, permanent=True)

    assert str(error) == "SMS refused (status=400, code=21610, attempts=0, permanent)"


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("", 1),
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),  # 2 x 153
        ("a" * 307, 3),
        ("{" * 80, 1),  # extension characters cost two septets: 160
        ("{" * 81, 2),
        ("a" * 158 + "€", 1),  # 160 septets
        ("a" * 159 + "€", 2),  # 161 septets
        ("中" * 70, 1),
        ("中" * 71, 2),
        ("中" * 134, 2),  # 2 x 67
        ("中" * 135, 3),
        ("a" * 69 + "中", 1),  # one non-GSM character makes it all UCS-2
        ("a" * 70 + "中", 2),
        ("😀" * 35, 1),  # surrogate pairs: 70 UTF-16 units
        ("😀" * 36, 2),
        ("a" * 66 + "😀" + "b" * 3, 2),
    ],
)
def test_segments(body: str, expected: int) -> None:
    assert segments(body) == expected


def test_segments_of_a_long_gsm_body_with_escape_at_the_part_boundary() -> None:
    # 152 plain + one escape pair would be 154 septets: the pair moves to part 2.
    body = "a" * 152 + "^" + "b" * 151
    assert segments(body) == 2
    assert segments(body + "b") == 3


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+8613812345678", "+86138****5678"),
        ("+15551234567", "+1555****4567"),
        ("+442071234567", "+44207****4567"),
        ("+861234", "+86****34"),
        ("P", "****"),
        ("8475550001", "****01"),
        ("", "****"),
    ],
)
def test_mask_phone(number: str, masked: str) -> None:
    assert mask_phone(number) == masked


@integration
async def test_a_first_wave_sms_overtakes_queued_follow_ups(double: FaultyTwilioDouble) -> None:
    """One request at a time, five "taken by" messages queued behind a slow one: a new
    alarm's first SMS, asked for last, is the next to reach Twilio (gateway/sendgate.py)."""
    double.inject(Fault.delay(0.3))
    async with sender_for(double, concurrency=1) as s:
        follow_ups = [asyncio.create_task(s.send(ELDER_SON, f"taken {n}", priority=FOLLOW_UP))
                      for n in range(6)]
        await eventually(lambda: len(double.requests) == 1)  # the slow one is in flight
        urgent = asyncio.create_task(s.send(ELDER_SON, "new alarm", priority=FIRST_WAVE))
        await asyncio.gather(*follow_ups, urgent)
    bodies = [m.body for m in double.messages]
    assert bodies[0] == "taken 0" and bodies[1] == "new alarm"
    assert sorted(bodies[2:]) == [f"taken {n}" for n in range(1, 6)]
