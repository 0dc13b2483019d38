"""Closure through the running gateway (serial receiver, Twilio double, its journal): an
acknowledged alarm is resolved N minutes after its acknowledgement unless someone keeps
it open, or the operator is reminded every M minutes; both computed from the journal,
so they survive a restart. The wall clock is injected and moved by the tests."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.closure import STILL_OPEN, AlarmNotOpen, auto_resolve_note
from gateway.config import ConfigError, parse_config
from gateway.daemon import Gateway
from gateway.journal import UnknownAlarm
from gateway.lifecycle import AlarmState
from gateway.report import day_bounds, local_day
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import Pty, control, eventually, gateway_config, running, secrets_for


class Clock:
    """The wall clock, shifted by what the test moved it."""

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift

    def __call__(self) -> float:
        return time.time() + self.shift

    def advance(self, seconds: float) -> None:
        self.shift += seconds


def closure_gateway(tmp_path: Path, twilio: TwilioDouble, pty: Pty, clock: Clock,
                    **lifecycle: Any) -> Gateway:
    cfg = gateway_config(tmp_path, twilio, alert={"backend": "none"},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}],
                         lifecycle={"check_every_s": 3600, **lifecycle})
    return Gateway(cfg, secrets_for(twilio), clock=clock)


async def press(gw: Gateway, pty: Pty, index: int = 0) -> str:
    """Press the ``index``-th Contact ID device through the receiver; the new alarm's id."""
    assert gw.journal is not None and gw.registry is not None
    device = sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                    key=lambda d: d.device_id)[index]
    await eventually(gw.serial[0].connected.is_set)
    before = {a.alarm_id for a in await gw.journal.open_alarms()}
    pty.write(encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001"))
    assert await pty.read(1, timeout=5) == ACK

    async def new_alarm() -> str | None:
        assert gw.journal is not None
        fresh = [a for a in await gw.journal.open_alarms() if a.alarm_id not in before]
        return fresh[0].alarm_id if fresh else None

    return str(await eventually(new_alarm))


async def ack(gw: Gateway, alarm_id: str, by: str = "wang") -> None:
    status, body = await control(gw, "POST", f"/alarms/{alarm_id}/ack", json={"by": by})
    assert status == 200, body


@pytest.mark.integration
async def test_resolved_n_minutes_after_acknowledgement_unless_kept_open(
    tmp_path: Path, twilio: TwilioDouble, pty: Pty
) -> None:
    clock = Clock()
    gw = closure_gateway(tmp_path, twilio, pty, clock, auto_resolve_after_min=60,
                         remind_every_min=0)
    async with running(gw):
        assert gw.closure is not None and gw.journal is not None
        assert gw.dispatcher is not None
        first, second = await press(gw, pty, 0), await press(gw, pty, 1)
        await ack(gw, first)
        await ack(gw, second)
        acked_at = (await gw.journal.get_alarm(first)).acknowledged_at
        assert acked_at is not None
        # Through the control route operators use (the README's `POST .../keep-open`).
        status, body = await control(gw, "POST", f"/alarms/{second}/keep-open",
                                     json={"by": "li", "note": "家属要求回访"})
        assert (status, body) == (200, {"alarm_id": second, "state": "acknowledged",
                                        "keep_open": True})

        clock.advance(59 * 60)
        early = await gw.closure.check()
        assert early.resolved == ()
        assert early.next_due is not None and abs(early.next_due - (acked_at + 3600)) < 1

        clock.advance(2 * 60)
        with capture_logs() as logs:
            due = await gw.closure.check()
        assert due.resolved == (first,) and due.kept_open == (second,)
        closed = await gw.journal.get_alarm(first)
        assert closed.state is AlarmState.RESOLVED
        assert closed.note == auto_resolve_note(60) == "auto-resolved 60 min after acknowledgement"
        resolved = [d for _, ev, d in await gw.journal.alarm_log(first) if ev == "alarm.resolved"]
        assert resolved == [{"from": "acknowledged", "to": "resolved", "by": "gateway",
                             "note": "auto-resolved 60 min after acknowledgement"}]
        assert first not in gw.dispatcher.active
        assert [e["alarm_id"] for e in logs if e["event"] == "closure.auto_resolved"] == [first]
        kept = await gw.journal.get_alarm(second)
        assert kept.state is AlarmState.ACKNOWLEDGED
        assert [d for _, ev, d in await gw.journal.alarm_log(second)
                if ev == "alarm.keep_open"] == [{"by": "operator:li", "note": "家属要求回访"}]

        with pytest.raises(AlarmNotOpen):
            await gw.closure.keep_open(first, "operator:li")
        with pytest.raises(UnknownAlarm):
            await gw.closure.keep_open("ZZZZ-ZZZZ", "operator:li")
        for alarm_id, body, expected in ((first, {"by": "li"}, 409),
                                         ("ZZZZ-ZZZZ", {"by": "li"}, 404),
                                         (second, {"by": "li", "keep": "no"}, 400),
                                         (second, {"keep": False}, 400)):
            status, _ = await control(gw, "POST", f"/alarms/{alarm_id}/keep-open",
                                      json=body)
            assert status == expected, (alarm_id, body)
        # Released, it closes at the next look.
        status, body = await control(gw, "POST", f"/alarms/{second}/keep-open",
                                     json={"by": "li", "keep": False})
        assert status == 200 and body["keep_open"] is False
        assert (await gw.closure.check()).resolved == (second,)
        assert (await gw.journal.get_alarm(second)).state is AlarmState.RESOLVED


@pytest.mark.integration
async def test_reminders_every_m_minutes_and_closure_survive_a_restart(
    tmp_path: Path, twilio: TwilioDouble, pty: Pty
) -> None:
    clock = Clock()
    gw = closure_gateway(tmp_path, twilio, pty, clock, auto_resolve_after_min=0,
                         remind_every_min=10)
    async with running(gw):
        assert gw.closure is not None and gw.notices is not None
        alarm_id = await press(gw, pty)
        await ack(gw, alarm_id)
        clock.advance(9 * 60)
        assert (await gw.closure.check()).reminded == ()
        clock.advance(60)
        assert (await gw.closure.check()).reminded == (alarm_id,)
        await gw.notices.wait_idle()
        status, body = await control(gw, "GET", "/notices")
        assert status == 200
        reminders = [n for n in body["notices"] if n["kind"] == STILL_OPEN]
        assert [n["subject"] for n in reminders] == [alarm_id]
        assert "wang" in reminders[0]["text"] and "10分钟" in reminders[0]["text"]
        clock.advance(5 * 60)
        assert (await gw.closure.check()).reminded == ()

    # Down for 2 minutes; 7 minutes after the last reminder the new process knows it.
    clock.advance(2 * 60)
    gw = closure_gateway(tmp_path, twilio, pty, clock, auto_resolve_after_min=0,
                         remind_every_min=10)
    async with running(gw):
        assert gw.closure is not None
        assert (await gw.closure.check()).reminded == ()
        clock.advance(3 * 60)
        assert (await gw.closure.check()).reminded == (alarm_id,)

    # Restarted with auto-resolve on, long past it: the first look resolves it.
    clock.advance(20 * 60)
    gw = closure_gateway(tmp_path, twilio, pty, clock, auto_resolve_after_min=30,
                         remind_every_min=10)
    async with running(gw):
        assert gw.journal is not None

        async def resolved() -> bool:
            assert gw.journal is not None
            return (await gw.journal.get_alarm(alarm_id)).state is AlarmState.RESOLVED

        await eventually(resolved)
        assert (await gw.journal.get_alarm(alarm_id)).note == auto_resolve_note(30)


@pytest.mark.integration
async def test_the_running_gateway_auto_resolves_and_reports_the_press_and_its_sms(
    tmp_path: Path, twilio: TwilioDouble, pty: Pty
) -> None:
    """Real timings: started 12 s before the center's midnight, a press is texted,
    acknowledged, resolved by the gateway ~1 s later, and the report made at midnight
    counts it."""
    real_now = time.time()
    cfg_probe = gateway_config(tmp_path, twilio)
    zone = cfg_probe.model.gateway.zone
    day = local_day(real_now, zone)
    _, midnight = day_bounds(day, zone)
    clock = Clock(midnight - 12 - real_now)
    cfg = gateway_config(tmp_path, twilio, alert={"backend": "none"},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}],
                         lifecycle={"auto_resolve_after_min": 0.02, "remind_every_min": 0,
                                    "check_every_s": 0.1},
                         report={"after_midnight_min": 0})
    gw = Gateway(cfg, secrets_for(twilio), clock=clock)
    with capture_logs() as logs:
        async with running(gw):
            assert gw.journal is not None
            alarm_id = await press(gw, pty)
            await eventually(lambda: twilio.messages)
            await ack(gw, alarm_id)

            async def resolved() -> bool:
                assert gw.journal is not None
                return (await gw.journal.get_alarm(alarm_id)).state is AlarmState.RESOLVED

            await eventually(resolved, timeout=10)
            record = await gw.journal.get_alarm(alarm_id)
            assert record.received_at < midnight, "the press landed after midnight: too slow"
            assert record.note == auto_resolve_note(0.02)
            journal = gw.journal
            stored = await eventually(lambda: journal.stored_report(day.isoformat()),
                                      timeout=25)
    assert stored["alarms"] == 1
    assert stored["first_sms_ms"]["count"] == 1 and stored["without_sms"] == []
    assert stored["acknowledgement_s"]["count"] == 1
    assert stored["auto_resolved"] == 1 and stored["unacknowledged"] == []
    days = [e["day"] for e in logs if e["event"] == "report.daily"]
    assert days == [(day - timedelta(days=1)).isoformat(), day.isoformat()]


@pytest.mark.parametrize(("section", "values", "key"), [
    ("lifecycle", {"auto_resolve_after_min": -1}, "lifecycle.auto_resolve_after_min"),
    ("lifecycle", {"check_every_s": 0}, "lifecycle.check_every_s"),
    ("lifecycle", {"remind_every_s": 5}, "lifecycle.remind_every_s"),
    ("report", {"after_midnight_min": 800}, "report.after_midnight_min"),
    ("retention", {"alarms_years": 0}, "retention.alarms_years"),
    ("retention", {"batch_rows": 0}, "retention.batch_rows"),
    ("gateway", {"timezone": "Asia/Peking"}, "gateway.timezone"),
])
def test_closure_settings_are_validated_with_file_and_key(
    tmp_path: Path, section: str, values: dict[str, Any], key: str
) -> None:
    data: dict[str, Any] = {"sms": {"from_number": "+15005550006"}, section: values}
    with pytest.raises(ConfigError) as err:
        parse_config(data, tmp_path / "gateway.toml")
    assert err.value.key == key and err.value.file == str(tmp_path / "gateway.toml")
    if section == "gateway":
        assert "unknown time zone 'Asia/Peking'" in err.value.reason
