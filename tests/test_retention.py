"""Retention on a temporary journal with an injected clock: old resolved alarms go with
their rows, open ones stay; SMS records lose their personal data but keep the figures;
each writer job handles one batch."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.config import RetentionSection
from gateway.journal import Journal, MessageKind, NotificationPlan
from gateway.lifecycle import AlarmState, NotificationState
from gateway.retention import DAY_S, YEAR_S, prune_daily, prune_once

NOW = 2_000_000_000.0  # 2033-05-18


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
async def journal(tmp_path: Path, clock: Clock) -> AsyncIterator[Journal]:
    async with Journal(tmp_path / "j.sqlite3", synchronous="NORMAL", clock=clock) as j:
        yield j


async def alarm(j: Journal, device: str, at: float, *, resolve: bool = True,
                phones: tuple[str, ...] = ("+8613812345678",)) -> str:
    """An alarm pressed at ``at``, texted, acknowledged (and resolved) within minutes,
    written with the journal's clock at those times."""
    clock = j._clock
    assert isinstance(clock, Clock)
    saved, clock.now = clock.now, at
    out = await j.record_press(device_id=device, elder_id="E1", code="sos", source="mqtt",
                               address=device, raw=b"{}", received_at=at, dedupe_window_s=60)
    rows = await j.plan_notifications(
        out.alarm_id, 1, [NotificationPlan("family", f"家属{i}", p, f"您的家人按下紧急呼叫 {p}")
                          for i, p in enumerate(phones)])
    for r in rows:
        await j.update_notification(r.id, NotificationState.FAILED, error_code=21211,
                                    error=f"The 'To' number {r.phone} is not valid",
                                    latency_ms=120.0)
    await j.transition(out.alarm_id, AlarmState.ACKNOWLEDGED, by="operator:wang", at=at + 60)
    if resolve:
        await j.transition(out.alarm_id, AlarmState.RESOLVED, by="operator:wang", at=at + 120)
    clock.now = saved
    return out.alarm_id


def rows_of(path: Path, alarm_id: str) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t} WHERE alarm_id = ?",
                                (alarm_id,)).fetchone()[0]
                for t in ("alarms", "alarm_log", "notifications", "device_messages",
                          "alarm_keep_open")}


async def test_old_resolved_alarms_go_with_their_rows_open_and_recent_ones_stay(
    journal: Journal
) -> None:
    old_at = NOW - 5 * YEAR_S - DAY_S
    old = await alarm(journal, "D1", old_at, resolve=False)
    await journal.set_keep_open(old, True, by="operator:li")
    await journal.transition(old, AlarmState.RESOLVED, by="operator:li", at=old_at + 600)
    still_open = await alarm(journal, "D2", old_at, resolve=False)
    recent = await alarm(journal, "D3", NOW - 5 * YEAR_S + DAY_S)
    assert rows_of(journal.path, old)["alarm_keep_open"] == 1

    done = await prune_once(journal, 90, RetentionSection(), NOW)

    assert done.alarms == 1
    assert rows_of(journal.path, old) == dict.fromkeys(
        ("alarms", "alarm_log", "notifications", "device_messages", "alarm_keep_open"), 0)
    assert done.alarm_rows is not None and done.alarm_rows >= 4  # log lines, the SMS row
    assert (await journal.get_alarm(still_open)).state is AlarmState.ACKNOWLEDGED
    assert rows_of(journal.path, still_open)["notifications"] == 1
    assert (await journal.get_alarm(recent)).state is AlarmState.RESOLVED


async def test_sms_records_lose_personal_data_and_keep_role_state_and_latency(
    journal: Journal
) -> None:
    # Two numbers of one wave that mask alike: the unique (alarm, kind, wave, phone)
    # index must still hold.
    old = await alarm(journal, "D1", NOW - 91 * DAY_S,
                      phones=("+8613812345678", "+8613899995678"))
    recent = await alarm(journal, "D2", NOW - 89 * DAY_S)

    done = await prune_once(journal, 90, RetentionSection(), NOW)

    assert done.sms_redacted == 2
    redacted = await journal.notifications(old)
    assert sorted(n.phone for n in redacted) == sorted(
        ["+86138****5678", f"+86138****5678#{redacted[1].id}"])
    for n in redacted:
        assert (n.name, n.body) == ("", "")
        assert n.error is not None and "+8613812345678" not in n.error \
            and "+8613899995678" not in n.error and "+86138****5678" in n.error
        assert (n.role, n.kind, n.wave, n.state, n.latency_ms, n.error_code) == (
            "family", MessageKind.ESCALATION, 1, NotificationState.FAILED, 120.0, 21211)
    kept = await journal.notifications(recent)
    assert [(n.phone, n.name) for n in kept] == [("+8613812345678", "家属0")]
    assert kept[0].body.startswith("您的家人")
    # Nothing is redacted twice: a second run finds nothing left.
    again = await prune_once(journal, 90, RetentionSection(), NOW)
    assert again.sms_redacted == 0
    assert sorted(n.phone for n in await journal.notifications(old)) == sorted(
        n.phone for n in redacted)


async def test_each_writer_job_handles_one_batch(journal: Journal) -> None:
    old_at = NOW - 6 * YEAR_S
    ids = [await alarm(journal, f"D{i}", old_at + i) for i in range(5)]
    # One job: two alarms, the oldest first.
    assert (await journal.delete_old_alarms(NOW - 5 * YEAR_S, 2))[0] == 2
    left = [a for a in ids if rows_of(journal.path, a)["alarms"]]
    assert left == ids[2:]
    jobs = journal.jobs
    done = await prune_once(journal, 90, RetentionSection(batch_rows=2), NOW)
    assert done.alarms == 3
    assert done.sms_redacted == 0  # their SMS records went with the alarms
    # One job per batch of at most 2 rows, and an empty one that says "done": device
    # messages 2 + 1 + 0, alarms 2 + 1 + 0, redaction 0.
    assert journal.jobs - jobs == 7
    assert await journal.count("alarms") == 0


async def test_device_messages_keep_their_own_window(journal: Journal) -> None:
    await journal.record_device_message(source="mqtt", address="D9", raw=b"{}",
                                        received_at=NOW - 31 * DAY_S, device_id="D9",
                                        kind="checkin")
    await journal.record_device_message(source="mqtt", address="D9", raw=b"{}",
                                        received_at=NOW - 29 * DAY_S, device_id="D9",
                                        kind="checkin")
    done = await prune_once(journal, 30, RetentionSection(), NOW)
    assert done.device_messages == 1
    assert await journal.count("device_messages") == 1


async def test_prune_daily_runs_at_once_then_every_day(journal: Journal,
                                                       clock: Clock) -> None:
    old = await alarm(journal, "D1", NOW - 5 * YEAR_S - 3 * DAY_S)
    slept: list[float] = []

    class Stop(Exception):
        pass

    async def sleep(s: float) -> None:
        slept.append(s)
        if len(slept) == 2:
            raise Stop
        clock.now += s

    with capture_logs() as logs, pytest.raises(Stop):
        await prune_daily(journal, 90, RetentionSection(), clock=clock, sleep=sleep)
    assert slept == [DAY_S, DAY_S]
    pruned = [e for e in logs if e["event"] == "journal.pruned"]
    assert [e["alarms"] for e in pruned] == [1, 0]
    assert rows_of(journal.path, old)["alarms"] == 0
