"""The daily report on a temporary journal with an injected clock: the figures of one
local day, drills apart, journaled and logged once, made after local midnight, and
printed by ``gateway report`` from the journal file while the journal is open."""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from gateway import cli
from gateway.config import ReportSection
from gateway.journal import Journal, NotificationPlan
from gateway.lifecycle import AlarmState, NotificationState
from gateway.report import (
    build_report,
    day_bounds,
    make_report,
    open_journal_readonly,
    percentile,
    report_daily,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
DAY = date(2026, 12, 6)
START, END = day_bounds(DAY, SHANGHAI)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
async def journal(tmp_path: Path, clock: Clock) -> AsyncIterator[Journal]:
    async with Journal(tmp_path / "journal.sqlite3", synchronous="NORMAL", clock=clock) as j:
        yield j


async def press(j: Journal, clock: Clock, device: str, at: float, *, code: str = "sos",
                kind: str = "emergency", first_sms_ms: float | None = 800.0,
                ack_after_s: float | None = 90.0, waves: int = 1) -> str:
    clock.now = at
    out = await j.record_press(device_id=device, elder_id="E1", code=code, source="mqtt",
                               address=device, raw=b"{}", received_at=at,
                               dedupe_window_s=60, kind=kind)
    for wave in range(1, waves + 1):
        rows = await j.plan_notifications(out.alarm_id, wave, [
            NotificationPlan("family", "家属", f"+86138000000{wave:02d}", "body")])
        if first_sms_ms is not None:
            await j.update_notification(rows[0].id, NotificationState.ACCEPTED, sid=f"SM{wave}",
                                        latency_ms=first_sms_ms * wave)
    if ack_after_s is not None:
        await j.transition(out.alarm_id, AlarmState.ACKNOWLEDGED, by="operator:wang",
                           at=at + ack_after_s)
    return out.alarm_id


def mark_drill(path: Path, alarm_id: str) -> None:
    """Mark an alarm as a drill the way the journal does (``alarms.drill``); on a
    journal written before drills had a column, add it as a migration would."""
    with sqlite3.connect(path) as conn:
        if "drill" not in {r[1] for r in conn.execute("PRAGMA table_info(alarms)")}:
            conn.execute("ALTER TABLE alarms ADD COLUMN drill INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE alarms SET drill = 1 WHERE alarm_id = ?", (alarm_id,))


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([], 0.5, None),
    ([7.0], 0.95, 7.0),
    ([3.0, 1.0, 2.0], 0.5, 2.0),
    ([3.0, 1.0, 2.0], 0.95, 3.0),  # nearest rank: a value that happened
    ([float(v) for v in range(1, 101)], 0.95, 95.0),
    ([float(v) for v in range(1, 101)], 0.5, 50.0),
])
def test_percentile_is_nearest_rank(values: list[float], q: float,
                                    expected: float | None) -> None:
    assert percentile(values, q) == expected


def test_local_days_follow_the_center_time_zone() -> None:
    # Shanghai's 6 December starts at 16:00 UTC on the 5th, and has 24 hours.
    start, end = day_bounds(DAY, SHANGHAI)
    assert datetime.fromtimestamp(start, ZoneInfo("UTC")).isoformat() == \
        "2026-12-05T16:00:00+00:00"
    assert end - start == 86400
    # A zone with summer time: the day it begins has 23 hours.
    berlin = day_bounds(date(2026, 3, 29), ZoneInfo("Europe/Berlin"))
    assert berlin[1] - berlin[0] == 23 * 3600


async def test_report_counts_one_local_day_with_drills_apart(
    journal: Journal, clock: Clock
) -> None:
    a1 = await press(journal, clock, "D1", START + 60, first_sms_ms=700, ack_after_s=30)
    a2 = await press(journal, clock, "D2", START + 3600, code="101", first_sms_ms=900,
                     ack_after_s=300, waves=2)
    a3 = await press(journal, clock, "D3", END - 10, kind="fall", first_sms_ms=None,
                     ack_after_s=None)
    drill = await press(journal, clock, "D4", START + 7200, first_sms_ms=50_000,
                        ack_after_s=5000, waves=3)
    await press(journal, clock, "D5", START - 1)  # the day before
    await press(journal, clock, "D6", END)  # the day after
    await journal.transition(a3, AlarmState.CANCELLED, by="device")
    for at, kind, subject in ((START + 10, "device.offline", "D7"),
                              (START + 20, "device.offline", "D7"),
                              (START + 30, "device.low_battery", "D8"),
                              (START - 5, "device.offline", "D9")):
        await journal.record_notice(at=at, kind=kind, subject=subject, severity="warning",
                                    text="x")
    mark_drill(journal.path, drill)

    conn = open_journal_readonly(journal.path)
    try:
        data = build_report(conn, DAY, SHANGHAI, generated_at=END + 300)
    finally:
        conn.close()

    assert data["day"] == "2026-12-06" and data["zone"] == "Asia/Shanghai"
    assert data["alarms"] == 3
    assert data["by_kind"] == {"emergency": 2, "fall": 1}
    assert data["by_code"] == {"101": 1, "sos": 2}
    assert data["by_source"] == {"mqtt": 3}
    assert data["first_sms_ms"] == {"count": 2, "p50": 700.0, "p95": 900.0, "max": 900.0}
    assert data["without_sms"] == [a3]
    assert data["acknowledgement_s"] == {"count": 2, "p50": 30.0, "p95": 300.0, "max": 300.0}
    assert data["unacknowledged"] == [{"alarm_id": a3, "device_id": "D3",
                                       "state": "cancelled"}]
    assert data["escalated"] == [a2]
    assert a1 not in data["escalated"]
    assert data["devices_offline"] == ["D7"]
    assert data["devices_low_battery"] == ["D8"]
    assert data["drills"] == {"count": 1, "by_kind": {"emergency": 1}}


async def test_report_without_a_drill_column_counts_everything(
    journal: Journal, clock: Clock
) -> None:
    await press(journal, clock, "D1", START + 60)
    data = await journal.read(lambda c: build_report(c, DAY, SHANGHAI, generated_at=0.0))
    assert data["alarms"] == 1 and data["drills"]["count"] == 0


async def test_make_report_journals_it_and_logs_one_event(
    journal: Journal, clock: Clock
) -> None:
    await press(journal, clock, "D1", START + 60)
    with capture_logs() as logs:
        data = await make_report(journal, DAY, SHANGHAI, clock=clock)
    assert [e for e in logs if e["event"] == "report.daily"] == [
        {"event": "report.daily", "log_level": "info", **data}]
    assert await journal.stored_report("2026-12-06") == data
    assert await journal.stored_report("2026-12-05") is None


async def test_report_daily_catches_up_then_reports_each_day_after_midnight(
    journal: Journal, clock: Clock
) -> None:
    # Started at 00:02 on 8 December, delay 5 min: the 6th is the last finished day
    # (the 7th's report is due at 00:05).
    _, end7 = day_bounds(date(2026, 12, 7), SHANGHAI)
    clock.now = end7 + 120
    await press(journal, clock, "D1", END + 60)  # on the 7th
    clock.now = end7 + 120
    wakes: list[float] = []

    class Stop(Exception):
        pass

    async def sleep(s: float) -> None:
        clock.now += s
        wakes.append(clock.now)
        if clock.now > end7 + 86400 + 600:
            raise Stop

    with capture_logs() as logs, pytest.raises(Stop):
        await report_daily(journal, ReportSection(after_midnight_min=5), SHANGHAI,
                           clock=clock, sleep=sleep)
    made = [(e["day"], e["generated_at"]) for e in logs if e["event"] == "report.daily"]
    assert made == [("2026-12-06", end7 + 120), ("2026-12-07", end7 + 300),
                    ("2026-12-08", end7 + 86400 + 300)]
    stored = await journal.stored_report("2026-12-07")
    assert stored is not None and stored["alarms"] == 1
    assert wakes[0] == end7 + 300  # slept until the report was due, no sooner
    # A wall clock that jumps is looked at again within 10 minutes.
    assert all(b - a <= 600 for a, b in itertools.pairwise(wakes))


async def test_cli_report_reads_the_journal_file_while_it_is_open(
    journal: Journal, clock: Clock, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alarm_id = await press(journal, clock, "D1", START + 60, first_sms_ms=650, waves=2)
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[gateway]
state_dir = "{tmp_path}"
journal_file = "journal.sqlite3"
timezone = "Asia/Shanghai"

[sms]
from_number = "+15005550006"
""", encoding="utf-8")
    assert cli.main(["report", "--config", str(config), "--day", "2026-12-06", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["alarms"] == 1 and data["escalated"] == [alarm_id]
    assert data["first_sms_ms"]["p50"] == 650.0
    assert cli.main(["report", "--config", str(config), "--day", "2026-12-06"]) == 0
    text = capsys.readouterr().out
    assert "Daily report 2026-12-06 (Asia/Shanghai)" in text
    assert "press -> first SMS accepted: p50 650.0 ms" in text
    # The journal still writes (the report took no lock).
    await press(journal, clock, "D2", START + 120)
    assert await journal.count("alarms") == 2
    assert cli.main(["report", "--config", str(config), "--day", "6 Dec"]) == 1
    assert "not a date" in capsys.readouterr().err
    assert cli.main(["report", "--config", str(config),
                     "--journal", str(tmp_path / "none.sqlite3")]) == 1
    assert "no journal there" in capsys.readouterr().err

