"""Escalation waves with an injected clock, acknowledgement by SMS reply, cancel from the
device, wave timers rebuilt from the journal after a restart, and a prompt stop while a
resumed alarm waits for its next wave."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.daemon import Gateway
from gateway.journal import MessageKind
from gateway.lifecycle import AlarmState
from gateway.model import Device, FacilityKind, ResponderRole
from gateway.redact import mask_phone
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import Pty, eventually, gateway_config, running, secrets_for

pytestmark = pytest.mark.integration


class FakeTime:
    """Wall clock that only moves when the dispatcher 'sleeps' (escalation timers)."""

    def __init__(self) -> None:
        self.t = time.time()
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 3))
        self.t += seconds
        await asyncio.sleep(0)


def serial_cfg(tmp_path: Path, pty: Pty, twilio: TwilioDouble) -> object:
    return gateway_config(tmp_path, twilio, serial=[{
        "name": "rx", "port": pty.path, "protocol": "surgard", "reconnect_initial_s": 0.05}])


def first_contact_id_device(gw: Gateway) -> Device:
    assert gw.registry is not None
    return sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                  key=lambda d: d.device_id)[0]


async def press(pty: Pty, device: Device, code: str = "101") -> None:
    pty.write(encode_mlr2("01", "1", device.address, Qualifier.NEW, code, "01", "001"))
    assert await pty.read() == ACK


async def test_waves_fire_at_their_times_and_the_landline_hospital_is_not_texted(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    fake = FakeTime()
    gw = Gateway(serial_cfg(tmp_path, pty, twilio), secrets_for(twilio),  # type: ignore[arg-type]
                 clock=fake.clock, sleep=fake.sleep)
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None and gw.registry is not None
        await eventually(gw.serial[0].connected.is_set)
        device = first_contact_id_device(gw)
        await press(pty, device)
        alarm = (await eventually(gw.journal.open_alarms))[0]
        task = gw.dispatcher.active[alarm.alarm_id].task
        assert task is not None
        with capture_logs() as logs:
            await asyncio.wait_for(task, 20)  # all three waves, no acknowledgement
        notes = await gw.journal.notifications(alarm.alarm_id)
        by_wave: dict[int, list[str]] = {}
        for n in notes:
            by_wave.setdefault(n.wave, []).append(n.role)
            assert n.state == "accepted"
        elder = gw.registry.elders[device.elder_id]
        supervisors = [r for r in gw.registry.responders.values()
                       if r.role is ResponderRole.SUPERVISOR]
        assert sorted(by_wave[1]) == sorted(["family"] * len(elder.contacts) + ["responder"] * 2)
        assert by_wave[2].count("responder") == 3
        assert by_wave[2].count("supervisor") == len(supervisors)
        # Wave 3 is the hospital alone, and the sample's duty desk is a landline: it is
        # not texted (issue 10, fault 7), but logged once, at the wave's time.
        assert 3 not in by_wave
        created = {n.wave: n.created_at - alarm.received_at for n in notes}
        assert created[1] == pytest.approx(0, abs=1)
        assert created[2] == pytest.approx(120, abs=1)
        found = gw.dispatcher.active[alarm.alarm_id].geo
        assert found is not None
        hospital = found.facilities[FacilityKind.HOSPITAL]
        assert hospital.phone in gw.registry.no_sms
        skipped = [e for e in logs if e["event"] == "sms.skipped_landline"]
        assert [(e["wave"], e["role"], e["name"], e["to"]) for e in skipped] == [
            (3, "facility", hospital.name, mask_phone(hospital.phone))]
        # Nobody is told twice, and every message quotes the alarm reference.
        assert len({m.to for m in twilio.messages}) == len(twilio.messages) == len(notes)
        assert all(alarm.alarm_id in m.body for m in twilio.messages)
        log = [ev for _, ev, _ in await gw.journal.alarm_log(alarm.alarm_id)]
        assert log.count("alarm.notifying") == 2


async def test_sms_reply_acknowledges_stops_escalation_and_tells_the_others(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    gw = Gateway(serial_cfg(tmp_path, pty, twilio), secrets_for(twilio))  # type: ignore[arg-type]
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None and gw.player is not None
        await eventually(gw.serial[0].connected.is_set)
        await press(pty, first_contact_id_device(gw))
        alarm = (await eventually(gw.journal.open_alarms))[0]
        await gw.dispatcher.wait_idle(timeout=15)
        wave1 = await gw.journal.notifications(alarm.alarm_id)
        staff = next(n for n in wave1 if n.role == "responder")
        # A stranger cannot take the alarm.
        answer = await gw.dispatcher.on_reply("+8613900000000", alarm.alarm_id, "ack")
        assert "不是" in answer
        assert (await gw.journal.get_alarm(alarm.alarm_id)).state is AlarmState.NOTIFIED
        # The staff member replies "1" without the reference: the latest alarm is found.
        answer = await gw.dispatcher.on_reply(staff.phone, None, "ack")
        assert alarm.alarm_id in answer and "确认" in answer
        rec = await gw.journal.get_alarm(alarm.alarm_id)
        assert rec.state is AlarmState.ACKNOWLEDGED
        assert rec.acknowledged_by == f"sms:{staff.name}"
        assert alarm.alarm_id not in gw.player.active()
        task = gw.dispatcher.active[alarm.alarm_id].task
        assert task is not None
        await asyncio.wait_for(task, 10)  # the wave-2 timer ended with the acknowledgement
        others = {n.phone for n in wave1} - {staff.phone}
        taken = await eventually(lambda: _kind(gw, alarm.alarm_id, MessageKind.TAKEN,
                                               len(others)))
        assert {n.phone for n in taken} == others
        assert all(staff.name in n.body for n in taken)
        assert {(n.kind, n.wave) for n in await gw.journal.notifications(alarm.alarm_id)} == {
            (MessageKind.ESCALATION, 1), (MessageKind.TAKEN, None)}
        second = await gw.dispatcher.on_reply(next(iter(others)), alarm.alarm_id, "ack")
        assert staff.name in second and "已由" in second


async def _wave(gw: Gateway, alarm_id: str, wave: int, n: int) -> list[object] | None:
    assert gw.journal is not None
    rows = [r for r in await gw.journal.notifications(alarm_id)
            if r.kind is MessageKind.ESCALATION and r.wave == wave and r.state == "accepted"]
    return rows if len(rows) == n else None  # type: ignore[return-value]


async def _kind(gw: Gateway, alarm_id: str, kind: MessageKind, n: int) -> list[object] | None:
    assert gw.journal is not None
    rows = [r for r in await gw.journal.notifications(alarm_id)
            if r.kind is kind and r.wave is None and r.state == "accepted"]
    return rows if len(rows) == n else None  # type: ignore[return-value]


async def test_cancel_from_the_device_stops_the_alert_and_tells_those_told(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    gw = Gateway(serial_cfg(tmp_path, pty, twilio), secrets_for(twilio))  # type: ignore[arg-type]
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None and gw.player is not None
        await eventually(gw.serial[0].connected.is_set)
        device = first_contact_id_device(gw)
        await press(pty, device)
        alarm = (await eventually(gw.journal.open_alarms))[0]
        await gw.dispatcher.wait_idle(timeout=15)
        told = {n.phone for n in await gw.journal.notifications(alarm.alarm_id)}
        await press(pty, device, code="406")  # the elder presses cancel
        await eventually(lambda: _state(gw, alarm.alarm_id, AlarmState.CANCELLED))
        assert alarm.alarm_id not in gw.player.active()
        cancelled = await eventually(lambda: _kind(gw, alarm.alarm_id, MessageKind.CANCELLED,
                                                   len(told)))
        assert all("取消" in n.body for n in cancelled)  # type: ignore[attr-defined]


async def _state(gw: Gateway, alarm_id: str, state: AlarmState) -> bool:
    assert gw.journal is not None
    return (await gw.journal.get_alarm(alarm_id)).state is state


async def test_restart_rebuilds_the_escalation_timer_from_the_journal(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    cfg = serial_cfg(tmp_path, pty, twilio)
    gw = Gateway(cfg, secrets_for(twilio))  # type: ignore[arg-type]
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None
        await eventually(gw.serial[0].connected.is_set)
        await press(pty, first_contact_id_device(gw))
        alarm = (await eventually(gw.journal.open_alarms))[0]
        await gw.dispatcher.wait_idle(timeout=15)
    first_wave = len(twilio.messages)
    # The gateway comes back 130 s after the press: wave 2 is overdue and goes out at once;
    # wave 1 is not sent again.
    fake = FakeTime()
    fake.t = alarm.received_at + 130
    gw2 = Gateway(cfg, secrets_for(twilio), clock=fake.clock,  # type: ignore[arg-type]
                  sleep=fake.sleep)
    async with running(gw2):
        assert gw2.journal is not None
        rows = await eventually(lambda: _wave(gw2, alarm.alarm_id, 2, 3 + 3))
        assert rows
        notes = await gw2.journal.notifications(alarm.alarm_id)
        assert [n.wave for n in notes].count(1) == first_wave
        await eventually(lambda: fake.slept)  # the wave-3 timer starts after wave 2's sends
        assert fake.slept[0] == pytest.approx(300 - 130, abs=1)


async def test_stop_after_a_restart_does_not_wait_for_a_resumed_alarms_next_wave(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    """Fault 3: a resumed alarm waiting for a later wave is idle, so stopping the gateway
    returns at once instead of waiting out ``shutdown_timeout_s``."""
    cfg = gateway_config(tmp_path, twilio, gateway={"shutdown_timeout_s": 15}, serial=[{
        "name": "rx", "port": pty.path, "protocol": "surgard", "reconnect_initial_s": 0.05}])
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None
        await eventually(gw.serial[0].connected.is_set)
        await press(pty, first_contact_id_device(gw))
        alarm = (await eventually(gw.journal.open_alarms))[0]
        await gw.dispatcher.wait_idle(timeout=15)
    # The next start: wave 2 is due ~120 s after the press, and the timer really waits.
    timers: list[float] = []

    async def sleep(seconds: float) -> None:
        timers.append(seconds)
        await asyncio.sleep(seconds)

    gw2 = Gateway(cfg, secrets_for(twilio), sleep=sleep)
    async with running(gw2):
        assert gw2.dispatcher is not None
        await eventually(lambda: timers)  # the resumed alarm's wave-2 timer is running
        assert timers[0] > 60
        assert alarm.alarm_id in gw2.dispatcher.active
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5  # the drain budget would be ~11 s


async def test_a_permanent_twilio_error_is_not_retried_and_the_operator_is_told(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    from tests.support.twilio_faults import Fault

    gw = Gateway(serial_cfg(tmp_path, pty, twilio), secrets_for(twilio))  # type: ignore[arg-type]
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None and gw.registry is not None
        await eventually(gw.serial[0].connected.is_set)
        device = first_contact_id_device(gw)
        bad = gw.registry.elders[device.elder_id].contacts[0]
        twilio.inject(Fault.error(code=21211), to=bad.phone)
        await press(pty, device)
        alarm = (await eventually(gw.journal.open_alarms))[0]
        await gw.dispatcher.wait_idle(timeout=15)
        notes = {n.phone: n for n in await gw.journal.notifications(alarm.alarm_id)}
        assert notes[bad.phone].state == "failed" and notes[bad.phone].error_code == 21211
        assert all(n.state == "accepted" for p, n in notes.items() if p != bad.phone)
        attempts = [r for r in twilio.requests
                    if r.method == "POST" and r.form.get("To") == bad.phone]
        assert len(attempts) == 1  # permanent: never retried
        notice = (await eventually(gw.journal.open_notices))[0]
        assert notice["kind"] == "sms.failed" and bad.name in notice["text"]
        assert bad.phone not in notice["text"]  # masked


async def test_staff_already_sent_to_an_open_alarm_are_not_sent_to_the_next(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    gw = Gateway(serial_cfg(tmp_path, pty, twilio), secrets_for(twilio))  # type: ignore[arg-type]
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None
        assert gw.registry is not None and gw.geo is not None
        await eventually(gw.serial[0].connected.is_set)
        devices = sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                         key=lambda d: d.device_id)

        def nearest2(d: Device) -> set[str]:
            assert gw.geo is not None and gw.registry is not None
            home = gw.registry.elders[d.elder_id].location
            return {r.id for r in gw.geo.lookup(home, k=2).responders}

        # Two neighbours whose nearest two staff overlap when nobody is busy.
        a, b = next((x, y) for x in devices for y in devices
                    if x.device_id < y.device_id and nearest2(x) & nearest2(y))
        await press(pty, a)
        await eventually(lambda: _count_alarms(gw, 1))
        await gw.dispatcher.wait_idle(timeout=15)
        await press(pty, b)
        await eventually(lambda: _count_alarms(gw, 2))
        await gw.dispatcher.wait_idle(timeout=15)
        staff = {}
        for alarm in await gw.journal.open_alarms():
            staff[alarm.device_id] = {n.phone for n in await gw.journal.notifications(
                alarm.alarm_id) if n.role == "responder"}
        assert len(staff[a.device_id]) == len(staff[b.device_id]) == 2
        assert not staff[a.device_id] & staff[b.device_id]

        # Busy means held by an open, unacknowledged alarm: an acknowledgement frees them.
        held = {x.device_id: set(x.holds) for x in gw.dispatcher.active.values()}
        assert gw.dispatcher.busy_responders() == held[a.device_id] | held[b.device_id]
        first = next(x for x in gw.dispatcher.active.values() if x.device_id == a.device_id)
        await gw.dispatcher.acknowledge(first.alarm_id, "operator")
        assert gw.dispatcher.busy_responders() == held[b.device_id]


async def _count_alarms(gw: Gateway, n: int) -> bool:
    assert gw.journal is not None
    return len(await gw.journal.open_alarms()) == n


async def test_when_free_staff_run_out_the_nearest_busy_staff_carry_the_next_alarm(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    """More open alarms than free staff (issue 13's stock city): the next alarm goes to the
    nearest staff even though they hold another alarm, not to every supervisor."""
    gw = Gateway(serial_cfg(tmp_path, pty, twilio), secrets_for(twilio))  # type: ignore[arg-type]
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None
        assert gw.registry is not None and gw.geo is not None
        await eventually(gw.serial[0].connected.is_set)
        devices = sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                         key=lambda d: d.device_id)
        a, b = devices[0], devices[1]
        # One grid leader on duty in the whole district (supervisors stay as they are).
        staff = [r for r in gw.registry.responders.values() if r.role.value != "supervisor"]
        keep = min(staff, key=lambda r: r.responder_id)
        for r in staff:
            gw.geo.set_on_duty(r.responder_id, r.responder_id == keep.responder_id)
        await press(pty, a)
        await eventually(lambda: _count_alarms(gw, 1))
        await gw.dispatcher.wait_idle(timeout=15)
        assert gw.dispatcher.busy_responders() == {keep.responder_id}
        await press(pty, b)
        await eventually(lambda: _count_alarms(gw, 2))
        await gw.dispatcher.wait_idle(timeout=15)
        second = next(x for x in await gw.journal.open_alarms() if x.device_id == b.device_id)
        wave1 = [n for n in await gw.journal.notifications(second.alarm_id) if n.wave == 1]
        assert {n.phone for n in wave1 if n.role == "responder"} == {keep.phone}
        assert not [n for n in wave1 if n.role == "supervisor"]
