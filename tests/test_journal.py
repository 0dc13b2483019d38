"""The journal: dedupe, lifecycle, notification plans, group commit, durability, full disk."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.journal import (
    RESERVE_BYTES,
    WAL_AUTOCHECKPOINT_PAGES,
    DutyOverride,
    Journal,
    JournalError,
    JournalFull,
    JournalState,
    MessageKind,
    NotificationPlan,
    NotificationRecord,
    NotificationState,
    PressOutcome,
    UnknownAlarm,
    new_alarm_id,
)
from gateway.lifecycle import AlarmState, IllegalTransition
from tests.helpers import eventually


class Clock:
    def __init__(self, t: float = 1_760_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def press(j: Journal, device: str = "d1", at: float = 1_760_000_000.0,
                window: float = 60.0) -> object:
    return await j.record_press(device_id=device, elder_id="e1", code="101", source="test",
                                address="contact_id:1234", raw=b"frame", received_at=at,
                                dedupe_window_s=window)


async def test_press_creates_alarm_and_second_press_within_window_joins(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db") as j:
        first = await press(j, at=1000.0)
        second = await press(j, at=1030.0)
        third = await press(j, at=1091.0)  # 61 s after the last press: a new alarm
        assert first.new and not second.new and third.new
        assert second.alarm_id == first.alarm_id and second.presses == 2
        assert third.alarm_id != first.alarm_id
        rec = await j.get_alarm(first.alarm_id)
        assert rec.presses == 2 and rec.last_press_at == 1030.0
        assert rec.state is AlarmState.JOURNALED
        assert await j.count("device_messages") == 3
        states = await j.device_states()
        assert [s.device_id for s in states] == ["d1"] and states[0].last_seen == 1091.0


async def test_other_device_never_joins(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db") as j:
        a = await press(j, "d1", 1000.0)
        b = await press(j, "d2", 1001.0)
        assert a.new and b.new and a.alarm_id != b.alarm_id


async def test_resolved_alarm_is_not_joined(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db", clock=Clock(1010.0)) as j:
        a = await press(j, at=1000.0)
        await j.transition(a.alarm_id, AlarmState.RESOLVED, note="false alarm")
        b = await press(j, at=1020.0)
        assert b.new


async def test_transitions_follow_the_table(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db", clock=Clock(2000.0)) as j:
        a = await press(j)
        assert await j.transition(a.alarm_id, AlarmState.NOTIFYING) is AlarmState.JOURNALED
        await j.transition(a.alarm_id, AlarmState.ACKNOWLEDGED, by="operator:li")
        rec = await j.get_alarm(a.alarm_id)
        assert rec.acknowledged_by == "operator:li" and rec.acknowledged_at == 2000.0
        with pytest.raises(IllegalTransition):
            await j.transition(a.alarm_id, AlarmState.NOTIFYING)
        await j.transition(a.alarm_id, AlarmState.RESOLVED)
        with pytest.raises(IllegalTransition):
            await j.transition(a.alarm_id, AlarmState.ACKNOWLEDGED)
        with pytest.raises(UnknownAlarm):
            await j.transition("NOPE-NOPE", AlarmState.RESOLVED)
        events = [ev for _, ev, _ in await j.alarm_log(a.alarm_id)]
        assert events == ["alarm.journaled", "alarm.notifying", "alarm.acknowledged",
                          "alarm.resolved"]
        assert await j.open_alarms() == []


async def test_notification_plan_is_idempotent_and_updatable(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db") as j:
        a = await press(j)
        plans = [NotificationPlan("family", "张丽", "+8613800000001", "body 1"),
                 NotificationPlan("responder", "王强", "+8613900000002", "body 2")]
        rows = await j.plan_notifications(a.alarm_id, 1, plans)
        again = await j.plan_notifications(a.alarm_id, 1, plans)
        assert [r.id for r in rows] == [r.id for r in again]
        assert all(r.state == NotificationState.SENDING for r in rows)
        await j.update_notification(rows[0].id, NotificationState.ACCEPTED, sid="SM1",
                                    attempts=1, latency_ms=12.5)
        got = {r.phone: r for r in await j.notifications(a.alarm_id)}
        assert got["+8613800000001"].state == "accepted"
        assert got["+8613800000001"].sid == "SM1"
        assert got["+8613800000001"].latency_ms == 12.5
        assert got["+8613900000002"].state == "sending"


async def test_concurrent_writes_share_commits(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db") as j:
        outcomes = await asyncio.gather(*(press(j, f"d{i}", 1000.0 + i) for i in range(300)))
        assert len({o.alarm_id for o in outcomes}) == 300
        assert j.jobs >= 300
        assert j.commits < j.jobs  # group commit: fewer fsyncs than writes


async def test_committed_alarm_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    async with Journal(path) as j:
        a = await press(j)
    async with Journal(path) as j:
        assert [r.alarm_id for r in await j.open_alarms()] == [a.alarm_id]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_duty_overrides_are_kept_until_equal_to_the_roster(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    async with Journal(path, clock=Clock(1000.0)) as j:
        await j.set_duty_override("r1", False, roster_on_duty=True, by="operator:wang")
        await j.set_duty_override("r2", True, roster_on_duty=False, by="app:r2")
        await j.set_duty_override("r3", True, roster_on_duty=True, by="operator:li")  # no-op
    async with Journal(path) as j:
        assert await j.duty_overrides() == [
            DutyOverride("r1", False, True, 1000.0, "operator:wang"),
            DutyOverride("r2", True, False, 1000.0, "app:r2"),
        ]
        await j.set_duty_override("r1", True, roster_on_duty=True, by="operator:wang")
        await j.drop_duty_override("r2")
        assert await j.duty_overrides() == []


async def test_failing_job_rolls_back_only_itself(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db") as j:
        a = await press(j)
        results = await asyncio.gather(
            j.transition("MISSING", AlarmState.RESOLVED),
            press(j, "d9", 5000.0),
            return_exceptions=True,
        )
        assert isinstance(results[0], UnknownAlarm)
        assert not isinstance(results[1], BaseException) and results[1].new
        assert len(await j.open_alarms()) == 2
        assert a.new


async def test_full_disk_is_a_typed_error_and_the_journal_recovers(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    async with Journal(path) as j:
        await press(j)
        # Cap the database at its current size: the next growing write hits SQLITE_FULL.
        await j._run(lambda c: c.execute(
            "PRAGMA max_page_count = " + str(c.execute("PRAGMA page_count").fetchone()[0])))
        async def fill() -> None:
            for i in range(200):
                await j.record_press(device_id=f"x{i}", elder_id="e", code="101",
                                     source="t", address="a", raw=b"x" * 3000,
                                     received_at=9000.0 + i, dedupe_window_s=1)

        with pytest.raises(JournalFull):
            await fill()
        await j._run(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
        assert (await press(j, "after", 20000.0)).new


async def test_unwritable_location_is_a_journal_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(JournalError):
        async with Journal(blocker / "j.db"):
            pass


def test_alarm_ids_are_short_unambiguous_and_distinct() -> None:
    ids = {new_alarm_id() for _ in range(2000)}
    assert len(ids) == 2000
    for i in ids:
        assert len(i) == 9 and i[4] == "-"
        assert not set(i) & set("ILOU")


def test_alarm_ids_always_contain_a_letter_so_replies_can_quote_them() -> None:
    from gateway.replies import parse_reply

    for _ in range(20_000):
        alarm_id = new_alarm_id()
        assert not alarm_id.replace("-", "").isdigit()
        assert parse_reply(f"{alarm_id} 1") == (alarm_id, "ack")


async def test_prune_removes_old_routine_traffic_but_keeps_open_alarms(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db") as j:
        for i in range(30):
            await j.record_device_message(source="mqtt", address="a", raw=b"t",
                                          received_at=100.0 + i, device_id="d1", kind="test")
        open_alarm = await press(j, "d2", at=110.0)
        await j.record_device_message(source="mqtt", address="a", raw=b"t", received_at=10_000.0,
                                      device_id="d1", kind="test")
        assert await j.prune(before=5_000.0, batch=7) == 30
        assert await j.count("device_messages") == 2  # the recent one and the open alarm's
        assert [a.alarm_id for a in await j.open_alarms()] == [open_alarm.alarm_id]


# -- space, health and alarms alerted from memory (issue 9, fault 4) --------------------


async def adopt(j: Journal, alarm_id: str, device: str = "d1", at: float = 2000.0,
                alerted_at: float | None = None) -> PressOutcome:
    return await j.record_press(device_id=device, elder_id="e1", code="101", source="test",
                                address="contact_id:1234", raw=b"frame", received_at=at,
                                dedupe_window_s=60.0, alarm_id=alarm_id, alerted_at=alerted_at)


async def test_space_pragmas_are_set_and_an_idle_journal_truncates_its_wal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.db"
    async with Journal(path, idle_checkpoint_s=0.01) as j:
        assert await j._run(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) \
            == WAL_AUTOCHECKPOINT_PAGES
        assert await j._run(lambda c: c.execute("PRAGMA journal_size_limit").fetchone()[0]) \
            == WAL_AUTOCHECKPOINT_PAGES * 4096
        assert j.reserve_path.stat().st_size == RESERVE_BYTES
        before = j.checkpoints
        await asyncio.gather(*(press(j, f"d{i}", 1000.0 + i) for i in range(50)))
        wal = path.with_name(path.name + "-wal")
        await eventually(lambda: j.checkpoints > before and wal.stat().st_size == 0)
    async with Journal(tmp_path / "none.db", reserve_bytes=0) as j:
        assert not j.reserve_path.exists() and j.state is JournalState.OK


async def test_reads_keep_working_while_writes_fail_for_space(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db", probe_interval_s=60.0) as j:
        a = await press(j, "d1", 1000.0)
        await j.plan_notifications(a.alarm_id, 1, [NotificationPlan("family", "n", "+86", "b")])
        assert j.healthy and j.last_error is None
        await j._run(lambda c: c.execute(
            "PRAGMA max_page_count = " + str(c.execute("PRAGMA page_count").fetchone()[0])))
        async def fill() -> None:
            for i in range(200):
                await j.record_device_message(source="t", address="a", raw=b"x" * 3000,
                                              received_at=1001.0 + i)

        with pytest.raises(JournalFull):
            await fill()
        assert j.state is JournalState.FULL and not j.healthy
        assert isinstance(j.last_error, JournalFull) and j.last_error.storage
        # The reads do not go through the failing writer.
        assert [r.alarm_id for r in await j.open_alarms()] == [a.alarm_id]
        assert (await j.get_alarm(a.alarm_id)).presses == 1
        assert [n.phone for n in await j.notifications(a.alarm_id)] == ["+86"]
        # A batch that commits nothing proves nothing: still full.
        with pytest.raises(UnknownAlarm):
            await j.transition("NOPE-NOPE", AlarmState.RESOLVED)
        assert j.state is JournalState.FULL
        await j._run(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
        assert (await press(j, "d2", 3000.0)).new  # the next batch just works again
        assert j.state is JournalState.OK
        await asyncio.wait_for(j.wait_healthy(), 1)


async def test_a_request_error_is_not_a_storage_failure(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db") as j:
        with pytest.raises(UnknownAlarm) as caught:
            await j.transition("NOPE-NOPE", AlarmState.RESOLVED)
        assert not caught.value.storage and j.healthy


async def test_a_press_alerted_from_memory_is_journaled_under_that_id(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db") as j:
        v = new_alarm_id()
        first = await adopt(j, v, at=2000.0, alerted_at=1990.0)
        assert (first.alarm_id, first.new, first.adopted) == (v, True, True)
        rec = await j.get_alarm(v)
        assert (rec.received_at, rec.last_press_at, rec.presses) == (1990.0, 2000.0, 1)
        again = await adopt(j, v, at=2010.0)  # the link's retry and the resend both land
        assert (again.alarm_id, again.new, again.adopted, again.presses) == (v, False, True, 2)
        # Never joined to another open alarm of the device: every texted reference exists.
        w = new_alarm_id()
        other = await adopt(j, w, at=2020.0)
        assert other.alarm_id == w and other.new
        assert {a.alarm_id for a in await j.open_alarms()} == {v, w}
        events = [e for _, e, d in await j.alarm_log(v)]
        assert events == ["alarm.journaled", "press.joined"]


async def test_transitions_held_for_an_alarm_in_memory_follow_the_table(
    tmp_path: Path,
) -> None:
    async with Journal(tmp_path / "j.db", clock=Clock(3000.0)) as j:
        v = new_alarm_id()
        assert j.deferred_state(v) is AlarmState.JOURNALED
        assert j.defer_transition(v, AlarmState.ACKNOWLEDGED, by="sms:王强") \
            is AlarmState.JOURNALED
        assert j.defer_transition(v, AlarmState.ACKNOWLEDGED, by="operator:li") \
            is AlarmState.ACKNOWLEDGED  # the first one wins, as in transition()
        with pytest.raises(IllegalTransition):
            j.defer_transition(v, AlarmState.NOTIFYING)
        j.defer_transition(v, AlarmState.RESOLVED, note="false alarm", at=3100.0)
        outcome = await adopt(j, v)
        assert outcome.state is AlarmState.RESOLVED
        rec = await j.get_alarm(v)
        assert (rec.acknowledged_by, rec.acknowledged_at) == ("sms:王强", 3000.0)
        assert (rec.resolved_at, rec.note) == (3100.0, "false alarm")
        assert j.deferred_state(v) is AlarmState.JOURNALED  # nothing held any more
        # Held for an alarm already journaled (its durable flag not flipped yet): the
        # next press under its id lands it.
        w = new_alarm_id()
        await adopt(j, w, device="d2")
        j.defer_transition(w, AlarmState.CANCELLED, by="device:d2")
        assert (await adopt(j, w, device="d2", at=2001.0)).state is AlarmState.CANCELLED
        assert (await j.get_alarm(w)).state is AlarmState.CANCELLED


async def test_an_acknowledgement_made_while_the_adopting_commit_is_in_flight_lands(
    tmp_path: Path,
) -> None:
    async with Journal(tmp_path / "j.db") as j:
        v = new_alarm_id()
        landing = asyncio.create_task(adopt(j, v))
        await asyncio.sleep(0)  # record_press has taken what was held and queued its write
        j.defer_transition(v, AlarmState.ACKNOWLEDGED, by="operator:li")
        outcome = await landing
        assert outcome.adopted
        assert (await j.get_alarm(v)).state is AlarmState.ACKNOWLEDGED


async def test_sms_sent_from_memory_are_adopted_forwards_only(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db", clock=Clock(4000.0)) as j:
        a = await press(j, "d1", 3990.0)
        [row] = await j.plan_notifications(a.alarm_id, 1,
                                           [NotificationPlan("family", "n", "+861", "b")])

        def mem(phone: str, state: NotificationState, sid: str | None) -> NotificationRecord:
            return NotificationRecord(-1, a.alarm_id, MessageKind.ESCALATION, 1, "family",
                                      "n", phone, "b", state, sid, 1, None, None, 9.0, 3995.0)

        rows = await j.adopt_notifications(a.alarm_id, [
            mem("+861", NotificationState.ACCEPTED, "SM1"),  # the row planned above
            mem("+862", NotificationState.SENDING, None)])  # planned only in memory
        got = {r.phone: r for r in rows}
        assert got["+861"].id == row.id and got["+861"].state is NotificationState.ACCEPTED
        assert got["+861"].sid == "SM1"
        assert got["+862"].id > 0 and got["+862"].state is NotificationState.SENDING
        # An older memory record never moves a row backwards.
        rows = await j.adopt_notifications(a.alarm_id,
                                           [mem("+861", NotificationState.SENDING, None)])
        assert {r.phone: r.state for r in rows}["+861"] is NotificationState.ACCEPTED


async def test_a_bug_in_the_writer_fails_its_batch_but_never_stops_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with Journal(tmp_path / "j.db", probe_interval_s=60.0) as j:
        real = Journal._attempt
        calls = {"n": 0}

        def once_broken(self: Journal, conn: sqlite3.Connection, batch: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected writer bug")
            return real(self, conn, batch)

        monkeypatch.setattr(Journal, "_attempt", once_broken)
        with pytest.raises(JournalError, match="injected writer bug"):
            await press(j, "d1", 1000.0)
        assert j.state is JournalState.FAILING and not j.healthy
        assert (await press(j, "d1", 1000.0)).new  # the same press, once more
        assert j.state is JournalState.OK
