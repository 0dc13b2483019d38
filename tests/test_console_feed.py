"""The console's change feed (gateway/console/feed.py) and the journal's watch that feeds
it: every committed change of an alarm, a notice or a duty is announced once committed,
a reconnecting console resumes from its cursor, and a gap it cannot fill is a resync."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.console import feed as feed_module
from gateway.console.feed import ConsoleFeed
from gateway.journal import Journal, NotificationPlan
from gateway.lifecycle import AlarmState, NotificationState


async def test_journal_tells_its_watchers_what_each_commit_changed(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []
    async with Journal(tmp_path / "j.sqlite3", synchronous="NORMAL") as journal:
        journal.watch(lambda kind, key: seen.append((kind, key)))
        outcome = await journal.record_press(
            device_id="D1", elder_id="E1", code="101", source="test", address="a",
            raw=b"", received_at=1.0, dedupe_window_s=60)
        alarm_id = outcome.alarm_id
        assert seen == [("alarm", alarm_id)]
        await journal.transition(alarm_id, AlarmState.NOTIFYING, by="gateway")
        (note,) = await journal.plan_notifications(
            alarm_id, 1, [NotificationPlan("family", "张", "+8613800000000", "x")])
        await journal.update_notification(note.id, NotificationState.ACCEPTED, sid="SM1")
        notice_id = await journal.record_notice(at=2.0, kind="offline", subject="D1",
                                                severity="warning", text="t")
        assert await journal.ack_notice(notice_id, "wang")
        assert not await journal.ack_notice(notice_id, "wang")  # nothing changed: no news
        await journal.set_duty_override("R1", False, roster_on_duty=True, by="op")
        assert seen == [("alarm", alarm_id)] * 4 + [("notice", str(notice_id))] * 2 \
            + [("duty", "R1")]


async def test_a_failed_write_announces_nothing(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []
    async with Journal(tmp_path / "j.sqlite3", synchronous="NORMAL") as journal:
        journal.watch(lambda kind, key: seen.append((kind, key)))
        with pytest.raises(Exception, match="NOPE"):
            await journal.transition("NOPE", AlarmState.RESOLVED)
        await journal.log_event("A", "probe")  # a positive sign the watch is working
        assert seen == [("alarm", "A")]


async def test_feed_resumes_from_a_cursor_and_resyncs_a_gap(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feed_module, "RING", 8)
    feed = ConsoleFeed(clock=lambda: 0.0)
    start = feed.parse_cursor(feed.cursor)
    assert start == 0
    feed.changed("alarm", "A")
    feed.changed("notice", "1")
    changes = feed.since(start)
    assert [(c.kind, c.key) for c in changes or []] == [("alarm", "A"), ("notice", "1")]
    assert feed.since(2) == []
    # Another run's cursor, a cursor from the future, garbage: resync (None).
    assert feed.parse_cursor("cafe0000-1") is None
    assert feed.parse_cursor(f"{feed.boot}-99") is None
    assert feed.parse_cursor("junk") is None
    for i in range(20):  # more than the ring holds
        feed.changed("alarm", str(i))
    assert feed.since(1) is None
    assert len(feed.since(feed.parse_cursor(feed.cursor) - 3) or []) == 3  # type: ignore[operator]


async def test_waiters_wake_on_a_change_and_time_out_without_one() -> None:
    feed = ConsoleFeed(clock=lambda: 0.0)
    waiter = asyncio.ensure_future(feed.wait(0, timeout=30))
    await asyncio.sleep(0)
    assert not waiter.done()
    feed.changed("alarm", "A")
    await asyncio.wait_for(waiter, 1)
    await feed.wait(1, timeout=0.01)  # nothing new: returns after the timeout


async def test_presence_reports_sound_per_stream() -> None:
    feed = ConsoleFeed(clock=lambda: 5.0)
    p = feed.join("wang", "王值班")
    assert feed.consoles() == [{"stream_id": p.stream_id, "login": "wang", "name": "王值班",
                                "sound": "off", "since": 5.0}]
    assert not feed.set_sound(p.stream_id, "li", "on")  # only its own operator
    assert feed.set_sound(p.stream_id, "wang", "on")
    assert feed.consoles()[0]["sound"] == "on"
    feed.leave(p.stream_id)
    assert feed.consoles() == []
    kinds = [c.kind for c in feed.since(0) or []]
    assert kinds == ["consoles", "consoles", "consoles"]
