"""The notifier chain for one message against a scripted sender and a real, temporary
journal: accepted at once; retried later and accepted; Twilio gives up and the GSM
fallback takes it; a permanent error fails it with a notice; the fallback failing too
fails it. Also reconciliation (one lookup per row), the backlog's priority, the
notification transition table and the migration of journals written with wave numbers
900-902."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.config import SmsSection
from gateway.journal import Journal, MessageKind, NotificationPlan, NotificationRecord
from gateway.lifecycle import IllegalNotificationTransition, NotificationState
from gateway.metrics import Metrics
from gateway.notices import Notice
from gateway.notifier import Backlog, Notifier
from gateway.sms import Attempt, SendResult, SmsSendError
from tests.helpers import eventually

PHONE = "+8613800000001"
T0 = 1_765_000_000.0

Script = SendResult | SmsSendError


class FakeTime:
    def __init__(self) -> None:
        self.t = T0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t - T0

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds
        await asyncio.sleep(0)


class FakeSender:
    """Answers each send with the next scripted result (or error); lookups likewise."""

    def __init__(self, *script: Script, found: list[list[tuple[str, str]]] | None = None,
                 name: str = "twilio") -> None:
        self.script = deque(script)
        self.found = deque(found or [])
        self.name = name
        self.sent: list[tuple[str, str]] = []
        self.lookups: list[tuple[str, str]] = []
        self.entered = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.priorities: list[int] = []

    async def send(self, to: str, body: str, *,
                   on_attempt: Callable[[Attempt], Awaitable[None]] | None = None,
                   priority: int = 0) -> SendResult:
        self.sent.append((to, body))
        self.priorities.append(priority)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        outcome = self.script.popleft()
        if isinstance(outcome, SmsSendError):
            if on_attempt is not None:
                await on_attempt(Attempt(1, "failed", outcome.status, outcome.code, None,
                                         str(outcome)))
            raise outcome
        return outcome

    async def find_sent(self, to: str, *, since: datetime,
                        marker: str) -> list[tuple[str, str]]:
        assert since.tzinfo is not None
        self.lookups.append((to, marker))
        return self.found.popleft() if self.found else []


@dataclass
class Alarm:
    alarm_id: str
    received_at: float = T0
    t0: float = 0.0
    waited_s: float = 0.0
    sent: int = 0
    failed: int = 0


def ok(sid: str = "SM1", attempts: int = 1) -> SendResult:
    return SendResult(sid, "queued", 1, attempts, None)


def down() -> SmsSendError:
    return SmsSendError("SMS not accepted after retries", status=503, code=20503,
                        retryable=True)


def refused(code: int = 21211) -> SmsSendError:
    return SmsSendError("SMS refused by Twilio", status=400, code=code, permanent=True)


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


@pytest.fixture
async def journal(tmp_path: Path, fake: FakeTime) -> AsyncIterator[Journal]:
    async with Journal(tmp_path / "j.db", synchronous="NORMAL", clock=fake.clock) as j:
        yield j


async def planned(journal: Journal, n: int = 1,
                  wave: int = 1) -> tuple[Alarm, list[NotificationRecord]]:
    press = await journal.record_press(
        device_id="D1", elder_id="E1", code="emergency", source="test", address="a",
        raw=b"", received_at=T0, dedupe_window_s=60)
    plans = [NotificationPlan("family", f"家属{i}", f"+861380000000{i}",
                              f"[{press.alarm_id}] 请速来") for i in range(1, n + 1)]
    rows = await journal.plan_notifications(press.alarm_id, wave, plans)
    return Alarm(press.alarm_id), rows


def notifier(journal: Journal, fake: FakeTime, sender: FakeSender, notices: list[Notice], *,
             fallback: FakeSender | None = None, **sms: float) -> Notifier:
    settings = SmsSection(from_number="+15005550006", **sms)  # type: ignore[arg-type]
    return Notifier(journal=journal, sender=sender, sms=settings, metrics=Metrics(),
                    fallback=fallback, clock=fake.clock, monotonic=fake.monotonic,
                    sleep=fake.sleep, on_notice=notices.append)


async def only_row(journal: Journal, alarm: Alarm) -> NotificationRecord:
    rows = await journal.notifications(alarm.alarm_id)
    assert len(rows) == 1
    return rows[0]


async def events(journal: Journal, alarm: Alarm) -> list[tuple[str, dict[str, object]]]:
    return [(ev, data) for _, ev, data in await journal.alarm_log(alarm.alarm_id)
            if ev.startswith("sms.")]


async def test_accepted_at_the_first_try_is_written_once(journal: Journal,
                                                         fake: FakeTime) -> None:
    alarm, [rec] = await planned(journal)
    sender, notices = FakeSender(ok("SMa")), []
    assert await notifier(journal, fake, sender, notices).deliver(alarm, rec) == "accepted"
    row = await only_row(journal, alarm)
    assert (row.state, row.sid, row.attempts) == (NotificationState.ACCEPTED, "SMa", 1)
    assert await events(journal, alarm) == [
        ("sms.accepted", {"notification_id": rec.id, "sid": "SMa", "attempts": 1,
                          "channel": "twilio"})]
    assert (alarm.sent, alarm.failed, notices, fake.slept) == (1, 0, [], [])


async def test_twilio_down_retries_later_then_accepted_with_one_outage_notice(
    journal: Journal, fake: FakeTime
) -> None:
    alarm, [rec] = await planned(journal)
    sender, notices = FakeSender(down(), down(), ok("SMb", attempts=1)), []
    with capture_logs() as logs:
        outcome = await notifier(journal, fake, sender, notices,
                                 retry_later_s=30).deliver(alarm, rec)
    assert outcome == "accepted"
    assert fake.slept == [30, 30]
    assert (await only_row(journal, alarm)).state is NotificationState.ACCEPTED
    assert [n.kind for n in notices] == ["sms.outage", "sms.outage.over"]
    assert [n.severity for n in notices] == ["warning", "info"]
    assert [e["event"] for e in logs if e["event"].startswith("sms.")] == [
        "sms.outage", "sms.retry", "sms.retry", "sms.outage_over", "sms.sent",
        "sms.budget_exceeded"]  # a first-wave SMS a minute late
    assert [ev for ev, _ in await events(journal, alarm)] == [
        "sms.attempt", "sms.attempt", "sms.accepted"]


async def test_twilio_gives_up_and_the_gsm_fallback_takes_it(journal: Journal,
                                                             fake: FakeTime) -> None:
    alarm, [rec] = await planned(journal)
    gsm = FakeSender(ok("gsm:7"), name="gsm")
    sender, notices = FakeSender(down()), []
    outcome = await notifier(journal, fake, sender, notices, fallback=gsm).deliver(alarm, rec)
    assert outcome == "accepted"
    assert gsm.sent == [(rec.phone, rec.body)] and fake.slept == []
    row = await only_row(journal, alarm)
    assert (row.state, row.sid) == (NotificationState.ACCEPTED, "gsm:7")
    accepted = [data for ev, data in await events(journal, alarm) if ev == "sms.accepted"]
    assert accepted == [{"notification_id": rec.id, "sid": "gsm:7", "attempts": 1,
                         "channel": "fallback"}]
    assert [n.kind for n in notices] == ["sms.outage"]  # Twilio is still down


async def test_a_permanent_error_fails_at_once_with_a_notice(journal: Journal,
                                                             fake: FakeTime) -> None:
    alarm, [rec] = await planned(journal)
    gsm = FakeSender(name="gsm")
    sender, notices = FakeSender(refused(21610)), []
    outcome = await notifier(journal, fake, sender, notices, fallback=gsm).deliver(alarm, rec)
    assert outcome == "failed"
    row = await only_row(journal, alarm)
    assert (row.state, row.error_code) == (NotificationState.FAILED, 21610)
    assert len(sender.sent) == 1 and gsm.sent == []  # neither retried nor sent elsewhere
    assert [(n.kind, n.subject) for n in notices] == [("sms.failed", alarm.alarm_id)]
    assert "家属1" in notices[0].text and rec.phone not in notices[0].text  # masked
    assert (alarm.sent, alarm.failed) == (0, 1)


async def test_the_fallback_failing_too_ends_failed_after_the_give_up_time(
    journal: Journal, fake: FakeTime
) -> None:
    alarm, [rec] = await planned(journal)
    gsm = FakeSender(SmsSendError("modem: no network"), SmsSendError("modem: no network"),
                     name="gsm")
    sender, notices = FakeSender(down(), down()), []
    outcome = await notifier(journal, fake, sender, notices, fallback=gsm, retry_later_s=30,
                             give_up_after_s=50).deliver(alarm, rec)
    assert outcome == "failed"
    assert fake.slept == [30]  # one later round; the next would pass the give-up time
    assert len(gsm.sent) == 2
    assert (await only_row(journal, alarm)).state is NotificationState.FAILED
    assert [n.kind for n in notices] == ["sms.outage", "sms.failed"]


async def test_reconciliation_is_one_lookup_per_row_and_matches_each_sid_once(
    journal: Journal, fake: FakeTime
) -> None:
    alarm, rows = await planned(journal, n=3)
    # Twilio has a message for the first two rows; the third was never sent.
    sender = FakeSender(ok("SMnew"), found=[[("SMx", "delivered")],
                                            [("SMx", "delivered"), ("SMy", "sent")], []])
    n = notifier(journal, fake, sender, [])
    claimed: set[str] = set()
    assert [await n.reconcile(alarm, r, claimed) for r in rows] == ["accepted"] * 3
    assert sender.lookups == [(r.phone, alarm.alarm_id) for r in rows]
    assert sender.sent == [(rows[2].phone, rows[2].body)]  # only the missing one resent
    got = {r.phone: r.sid for r in await journal.notifications(alarm.alarm_id)}
    assert got == {rows[0].phone: "SMx", rows[1].phone: "SMy", rows[2].phone: "SMnew"}
    assert alarm.sent == 3


async def test_the_backlog_lets_new_alarms_go_first_and_drains_with_its_workers(
    journal: Journal, fake: FakeTime
) -> None:
    old, backlog_rows = await planned(journal, n=5)
    new, [first] = await _second_alarm(journal)
    sender = FakeSender(ok("SMnew"), *(ok(f"SM{i}") for i in range(5)))
    sender.gate = asyncio.Event()
    n = notifier(journal, fake, sender, [])
    backlog = Backlog(n, workers=2)
    foreground = asyncio.create_task(n.deliver(new, first))
    await sender.entered.wait()  # the new alarm's SMS is inside its Twilio request
    assert backlog.submit(old, backlog_rows, claimed=[]) == 5
    runner = asyncio.create_task(backlog.run())
    waiting = asyncio.create_task(n.yield_to_foreground(max_wait_s=30))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiting.done() and sender.lookups == []  # nothing of the backlog yet
    sender.gate.set()
    assert await foreground == "accepted"
    await waiting
    await eventually(lambda: backlog.done == 5, timeout=5)
    assert backlog.queued == backlog.in_flight == 0
    assert len(sender.lookups) == 5 and sender.sent[0] == (first.phone, first.body)
    assert {r.state for r in await journal.notifications(old.alarm_id)} == {
        NotificationState.ACCEPTED}
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner


async def _second_alarm(journal: Journal) -> tuple[Alarm, list[NotificationRecord]]:
    press = await journal.record_press(
        device_id="D2", elder_id="E2", code="emergency", source="test", address="b",
        raw=b"", received_at=T0, dedupe_window_s=60)
    rows = await journal.plan_notifications(press.alarm_id, 1, [
        NotificationPlan("responder", "员1", "+8613900000001", f"[{press.alarm_id}] 请速去")])
    return Alarm(press.alarm_id), rows


async def test_a_paused_backlog_takes_no_row(journal: Journal, fake: FakeTime) -> None:
    old, rows = await planned(journal, n=2)
    sender = FakeSender(ok("SM1"), ok("SM2"))
    backlog = Backlog(notifier(journal, fake, sender, []), workers=1)
    runner = asyncio.create_task(backlog.run())
    with backlog.paused():
        backlog.submit(old, rows)
        await backlog.wait_quiet()
        for _ in range(20):
            await asyncio.sleep(0)
        assert backlog.queued == 2 and sender.lookups == []
    await eventually(lambda: backlog.done == 2, timeout=5)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner


async def test_an_undelivered_message_is_resent_by_gsm_as_a_row_of_its_own(
    journal: Journal, fake: FakeTime
) -> None:
    alarm, [rec] = await planned(journal)
    n = notifier(journal, fake, FakeSender(ok("SM1")), [],
                 fallback=FakeSender(ok("gsm:1"), name="gsm"))
    assert await n.deliver(alarm, rec) == "accepted"
    found = await journal.set_delivery_status("SM1", "undelivered", 30003)
    assert found is not None and found[1] and found[0].state is NotificationState.UNDELIVERED
    assert await n.deliver_by_fallback(alarm, found[0], "carrier reported undelivered") \
        == "accepted"
    # The same report again (webhook and poller): no second resend.
    assert await n.deliver_by_fallback(alarm, found[0], "again") is None
    rows = await journal.notifications(alarm.alarm_id)
    assert [(r.kind, r.wave, r.state, r.sid) for r in rows] == [
        (MessageKind.ESCALATION, 1, NotificationState.UNDELIVERED, "SM1"),
        (MessageKind.FALLBACK, None, NotificationState.ACCEPTED, "gsm:1")]


async def test_notification_states_follow_their_table(journal: Journal) -> None:
    alarm, [rec] = await planned(journal)
    await journal.update_notification(rec.id, NotificationState.ACCEPTED, sid="SM1")
    await journal.mark_recipient_acknowledged(alarm.alarm_id, rec.phone)
    with pytest.raises(IllegalNotificationTransition) as err:
        await journal.update_notification(rec.id, NotificationState.ACCEPTED, sid="SM2")
    assert (err.value.current, err.value.wanted) == (NotificationState.ACKNOWLEDGED,
                                                     NotificationState.ACCEPTED)
    # A carrier report never moves a message backwards.
    found = await journal.set_delivery_status("SM1", "delivered", None)
    assert found is not None and found[1] is False
    assert (await only_row(journal, alarm)).state is NotificationState.ACKNOWLEDGED


async def test_a_late_answer_after_an_acknowledgement_keeps_the_acknowledgement(
    journal: Journal, fake: FakeTime
) -> None:
    alarm, [rec] = await planned(journal)
    sender = FakeSender(ok("SM1"))
    sender.gate = asyncio.Event()
    delivery = asyncio.create_task(notifier(journal, fake, sender, []).deliver(alarm, rec))
    await sender.entered.wait()
    await journal.mark_recipient_acknowledged(alarm.alarm_id, rec.phone)  # they replied
    sender.gate.set()
    assert await delivery == "accepted"
    assert (await only_row(journal, alarm)).state is NotificationState.ACKNOWLEDGED


_OLD_SCHEMA = """
CREATE TABLE notifications(
    id INTEGER PRIMARY KEY, alarm_id TEXT NOT NULL, wave INTEGER NOT NULL,
    role TEXT NOT NULL, name TEXT NOT NULL, phone TEXT NOT NULL, body TEXT NOT NULL,
    state TEXT NOT NULL, sid TEXT, attempts INTEGER NOT NULL DEFAULT 0, error_code INTEGER,
    error TEXT, latency_ms REAL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    UNIQUE(alarm_id, wave, phone));
CREATE INDEX notifications_alarm ON notifications(alarm_id);
"""


async def test_a_journal_with_wave_numbers_900_to_902_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(_OLD_SCHEMA)
        conn.executemany(
            "INSERT INTO notifications(alarm_id, wave, role, name, phone, body, state, sid,"
            " created_at, updated_at) VALUES ('A1', ?, 'family', 'x', ?, 'b', ?, ?, 1, 1)",
            [(1, PHONE, "delivered", "SM1"), (2, "+8613900000002", "accepted", "SM2"),
             (900, "+8613900000002", "accepted", "SM3"), (901, PHONE, "sending", None),
             (902, PHONE, "accepted", "gsm:1")])
    conn.close()
    async with Journal(db) as j:
        rows = await j.notifications("A1")
        assert [(r.id, r.kind, r.wave, r.state) for r in rows] == [
            (1, MessageKind.ESCALATION, 1, NotificationState.DELIVERED),
            (2, MessageKind.ESCALATION, 2, NotificationState.ACCEPTED),
            (3, MessageKind.TAKEN, None, NotificationState.ACCEPTED),
            (4, MessageKind.CANCELLED, None, NotificationState.SENDING),
            (5, MessageKind.FALLBACK, None, NotificationState.ACCEPTED)]
        # Still one message per person per (alarm, kind, wave), wave-less kinds included.
        again = await j.plan_notifications("A1", None, [NotificationPlan("family", "x", PHONE,
                                                                         "b")],
                                           kind=MessageKind.CANCELLED)
        assert [r.id for r in again] == [4]
        taken = await j.plan_notifications("A1", None, [NotificationPlan("family", "x", PHONE,
                                                                         "t")],
                                           kind=MessageKind.TAKEN)
        assert sorted(r.phone for r in taken) == sorted([PHONE, "+8613900000002"])
        found = await j.set_delivery_status("SM2", "delivered", None)
        assert found is not None and found[0].state is NotificationState.DELIVERED
    async with Journal(db) as j:  # a second open migrates nothing
        assert len(await j.notifications("A1")) == 6
