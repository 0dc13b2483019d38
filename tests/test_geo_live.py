"""Geo inside the running gateway: live responder positions over MQTT change who is sent,
and a registry reload (SIGHUP) swaps indexes without touching alarms in flight."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path

import aiomqtt
import pytest
from structlog.testing import capture_logs

from gateway import registry_worker
from gateway.daemon import Gateway, install_signal_handlers
from gateway.model import ResponderRole
from gateway.registry import load_registry
from gateway.responders import UnknownResponder
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import (
    SAMPLE,
    Mosquitto,
    eventually,
    gateway_config,
    running,
    secrets_for,
    z2m_devices,
)

pytestmark = pytest.mark.integration


async def test_a_responder_reporting_a_position_next_door_is_sent_first(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio, mqtt={"enabled": True, "port": mosquitto.port})
    gw = Gateway(cfg, secrets_for(twilio))
    device = z2m_devices(1)[0]
    with capture_logs() as logs:
        async with running(gw), aiomqtt.Client(mosquitto.host, mosquitto.port) as phone:
            assert gw.mqtt is not None and gw.geo is not None and gw.registry is not None
            assert gw.journal is not None and gw.dispatcher is not None
            await eventually(gw.mqtt.connected.is_set)
            home = gw.registry.elders[device.elder_id].location
            before = gw.geo.lookup(home, k=5)
            near = {r.id for r in before.responders}
            far = next(r for r in sorted(gw.registry.responders.values(),
                                         key=lambda r: r.responder_id)
                       if r.on_duty and r.role is not ResponderRole.SUPERVISOR
                       and r.responder_id not in near)
            fix = {"lon": home.lon + 0.0001, "lat": home.lat, "accuracy": 8,
                   "timestamp": time.time()}
            await phone.publish(f"responders/{far.responder_id}/location",
                                json.dumps(fix).encode(), qos=1)
            await phone.publish("responders/NOBODY/location", json.dumps(fix).encode(), qos=1)
            await phone.publish(f"responders/{far.responder_id}/location", b"{not json", qos=1)
            await eventually(lambda: gw.geo is not None
                             and gw.geo.lookup(home, k=1).responders[0].id == far.responder_id)
            await phone.publish(device.address, b'{"action":"emergency"}', qos=1)
            alarm = (await eventually(gw.journal.open_alarms))[0]
            await gw.dispatcher.wait_idle(timeout=15)
            geo = gw.dispatcher.active[alarm.alarm_id].geo
            assert geo is not None
            first = geo.responders[0]
            assert first.id == far.responder_id and not first.stale
            assert first.distance_m < 20
            assert far.phone in {m.to for m in twilio.messages}
            # Staff SMS: a distance from a live fix is plain, one from a base says so.
            staff = {m.to: m.body for m in twilio.messages if "按下呼叫" in m.body}
            assert "登记地址" not in staff[far.phone]
            others = [geo_r for geo_r in geo.responders if geo_r.phone in staff
                      and geo_r.id != far.responder_id]
            assert others and all(r.stale and "（按您的登记地址估算）" in staff[r.phone]
                                  for r in others)
    events = [e["event"] for e in logs]
    assert "device.malformed" in events  # the malformed fix, journaled and acknowledged
    assert any(e["event"].startswith("geo.") and "unknown" in e["event"] for e in logs)


async def test_sighup_reloads_the_registry_without_touching_alarms_in_flight(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble
) -> None:
    reg = tmp_path / "registry"
    shutil.copytree(SAMPLE, reg)
    cfg = gateway_config(tmp_path, twilio, registry={"directory": str(reg)},
                         mqtt={"enabled": True, "port": mosquitto.port})
    gw = Gateway(cfg, secrets_for(twilio))
    device = z2m_devices(1)[0]
    async with running(gw):
        assert gw.mqtt is not None and gw.journal is not None and gw.dispatcher is not None
        install_signal_handlers(gw)
        await eventually(gw.mqtt.connected.is_set)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            await client.publish(device.address, b'{"action":"emergency"}', qos=1)
        alarm = (await eventually(gw.journal.open_alarms))[0]
        old = gw.registry
        assert old is not None
        # Ops take every grid leader of the elder's community off duty and send SIGHUP.
        community = old.elders[device.elder_id].community
        lines = (reg / "responders.csv").read_text(encoding="utf-8").splitlines()
        out = [lines[0]]
        for line in lines[1:]:
            cells = line.split(",")
            if cells[3] == community:
                cells[5] = "false"
            out.append(",".join(cells))
        (reg / "responders.csv").write_text("\n".join(out) + "\n", encoding="utf-8")
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: gw.registry is not old)
        assert gw.registry is not None and gw.geo is not None
        home = gw.registry.elders[device.elder_id].location
        assert all(gw.registry.responders[r.id].community != community
                   for r in gw.geo.lookup(home, k=5).responders)
        assert alarm.alarm_id in gw.dispatcher.active  # the alarm in flight is untouched
        await gw.dispatcher.wait_idle(timeout=15)
        assert {n.state for n in await gw.journal.notifications(alarm.alarm_id)} == {
            "accepted"}
        # A broken registry is refused and the running one kept.
        (reg / "elders.csv").write_text("elder_id,name\nE1,x\n", encoding="utf-8")
        current = gw.registry
        assert await gw.reload() is False
        assert gw.registry is current
    await asyncio.sleep(0)


def _set_roster_duty(reg: Path, responder_id: str, on_duty: bool) -> None:
    path = reg / "responders.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    rid_col, duty_col = header.index("responder_id"), header.index("on_duty")
    for i, line in enumerate(lines[1:], 1):
        cells = line.split(",")
        if cells[rid_col] == responder_id:
            cells[duty_col] = "true" if on_duty else "false"
            lines[i] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


async def test_a_changed_registry_file_is_reloaded_once_it_stops_changing(
    tmp_path: Path, twilio: TwilioDouble
) -> None:
    reg = tmp_path / "registry"
    shutil.copytree(SAMPLE, reg)
    cfg = gateway_config(tmp_path, twilio,
                         registry={"directory": str(reg), "watch_interval_s": 0.05})
    gw = Gateway(cfg, secrets_for(twilio))

    def events(name: str) -> list[dict[str, object]]:
        return [e for e in logs if e["event"] == name]

    with capture_logs() as logs:
        async with running(gw):
            old = gw.registry
            assert old is not None
            # Ops save responders.csv with one responder off duty; no signal is sent.
            rid = min(r.responder_id for r in old.responders.values() if r.on_duty)
            _set_roster_duty(reg, rid, False)
            await eventually(lambda: gw.registry is not old)
            assert gw.registry is not None and not gw.registry.responders[rid].on_duty
            assert [e["files"] for e in events("registry.changed")] == [["responders.csv"]]

            # A broken save is refused once and not retried while it stays as it is.
            current = gw.registry
            (reg / "elders.csv").write_text("elder_id,name\nE1,x\n", encoding="utf-8")
            await eventually(lambda: events("registry.reload_failed"))
            looked = gw.keeper.looks
            await eventually(lambda: gw.keeper.looks >= looked + 5)  # more looks, same files
            assert len(events("registry.reload_failed")) == 1
            assert gw.registry is current
            # Fixed: reloaded again.
            shutil.copy(SAMPLE / "elders.csv", reg / "elders.csv")
            await eventually(lambda: gw.registry is not current)
    assert len(events("registry.reloaded")) == 2


async def test_a_duty_change_outlives_a_restart_until_the_roster_changes_that_responder(
    tmp_path: Path, twilio: TwilioDouble
) -> None:
    reg = tmp_path / "registry"
    shutil.copytree(SAMPLE, reg)
    cfg = gateway_config(tmp_path, twilio,
                         registry={"directory": str(reg), "watch_interval_s": 0})
    leaders = sorted(r.responder_id for r in load_registry(reg).responders.values()
                     if r.on_duty and r.role is ResponderRole.GRID_LEADER)
    sick, away = leaders[:2]

    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.desk is not None
        await gw.desk.set_duty(sick, False, by="operator:wang")
        await gw.desk.set_duty(away, False, by="operator:wang")
        with pytest.raises(UnknownResponder):
            await gw.desk.set_duty("NOBODY", False, by="operator:wang")
    gw = Gateway(cfg, secrets_for(twilio))  # a restart: both still off duty
    async with running(gw):
        assert gw.geo is not None
        assert gw.geo.is_on_duty(sick) is False and gw.geo.is_on_duty(away) is False
        # The roster now says "sick" is off duty itself: that supersedes the override,
        # so when the roster later puts "sick" back on duty, that holds.
        _set_roster_duty(reg, sick, False)
        assert await gw.reload()
        _set_roster_duty(reg, sick, True)
        assert await gw.reload()
        assert gw.geo.is_on_duty(sick) is True and gw.geo.is_on_duty(away) is False
    gw = Gateway(cfg, secrets_for(twilio))  # and after another restart
    async with running(gw):
        assert gw.geo is not None and gw.journal is not None
        assert gw.geo.is_on_duty(sick) is True and gw.geo.is_on_duty(away) is False
        assert [o.responder_id for o in await gw.journal.duty_overrides()] == [away]


async def test_the_operator_is_told_when_nobody_is_left_on_duty(
    tmp_path: Path, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio)
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.registry is not None and gw.journal is not None and gw.geo is not None
        assert gw.desk is not None
        on_duty = sorted(r.responder_id for r in gw.registry.responders.values()
                         if r.on_duty and r.role is not ResponderRole.SUPERVISOR)
        for rid in on_duty:
            await gw.desk.set_duty(rid, False, by="operator:night")
        journal = gw.journal

        async def notices(at_least: int) -> list[tuple[str, str]] | None:
            found = [(n["kind"], n["severity"]) for n in await journal.open_notices()]
            return found if len(found) >= at_least else None

        assert gw.geo.stats().on_duty == 0
        # Notices are journaled in their own task: wait for them, then compare.
        assert await eventually(lambda: notices(1)) == [("responders.none_on_duty", "warning")]
        await gw.desk.set_duty(on_duty[0], True, by="operator:morning")
        assert await eventually(lambda: notices(2)) == [
            ("responders.none_on_duty", "warning"), ("responders.on_duty", "info")]


async def test_a_reload_validates_in_a_child_process_and_loads_its_snapshot(
    tmp_path: Path, twilio: TwilioDouble
) -> None:
    """Issue 13: a reload's validation (seconds for a city) runs in a process of its own,
    not in the gateway's, where it would share the GIL with the event loop; the gateway
    then rebuilds from the snapshot the child wrote. A broken file's problems come back."""
    reg = tmp_path / "registry"
    shutil.copytree(SAMPLE, reg)
    cfg = gateway_config(tmp_path, twilio,
                         registry={"directory": str(reg), "watch_interval_s": 0})
    gw = Gateway(cfg, secrets_for(twilio))
    with capture_logs() as logs:
        async with running(gw):
            old = gw.registry
            assert old is not None
            rid = min(r.responder_id for r in old.responders.values() if r.on_duty)
            _set_roster_duty(reg, rid, False)
            assert await gw.reload() is True
            assert gw.registry is not None and not gw.registry.responders[rid].on_duty
            (reg / "elders.csv").write_text("elder_id,name\nE1,x\n", encoding="utf-8")
            assert await gw.reload() is False
    apart = [e for e in logs if e["event"] == "registry.validated_apart"]
    assert [e["exit"] for e in apart] == [0, 1]
    assert all(e["pid"] != os.getpid() for e in apart)
    loads = [e for e in logs if e["event"] == "registry.loaded"]
    assert loads[-1].get("snapshot") is True  # the gateway rebuilt, it did not validate
    [failed] = [e for e in logs if e["event"] == "registry.reload_failed"]
    assert "elders.csv" in failed["error"]


def test_the_reload_validator_runs_below_the_gateways_cpu_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Seconds of validation for a city must not take a core from intake and dispatch.
    asked: list[int] = []
    monkeypatch.setattr(registry_worker.os, "nice", lambda inc: asked.append(inc) or inc)
    assert registry_worker.main([str(SAMPLE), "--cache", str(tmp_path / "cache")]) == 0
    assert asked == [registry_worker.NICE_INCREMENT] and registry_worker.NICE_INCREMENT >= 10
    assert json.loads(capsys.readouterr().out)["elders"] == 88
