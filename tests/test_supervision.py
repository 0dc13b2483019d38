"""Supervision: missed check-ins, availability, batteries, receiver heartbeats; and the
notices reaching the operator through the running gateway (journal, MQTT, sound)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import pytest

from devices.events import AddressScheme, DeviceAddress, DeviceEvent, EventKind
from gateway.daemon import Gateway
from gateway.geo import GeoService, Projector
from gateway.registry import load_registry
from gateway.sandbox.twilio_double import TwilioDouble
from gateway.supervision import Notice, Supervisor
from gateway.world import World, WorldRef
from tests.helpers import (
    SAMPLE,
    Mosquitto,
    Pty,
    eventually,
    gateway_config,
    running,
    secrets_for,
    z2m_devices,
)

REGISTRY = load_registry(SAMPLE)
WORLD = WorldRef(World(REGISTRY, GeoService(REGISTRY, Projector("EPSG:32650"))))


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def event(kind: EventKind, battery: float | None = None) -> DeviceEvent:
    return DeviceEvent(kind, DeviceAddress(AddressScheme.MQTT, "x"), b"", battery_pct=battery)


def _sink(_n: Notice) -> None:
    return None


def make(clock: Clock) -> Supervisor:
    return Supervisor(world=WORLD, on_notice=_sink, clock=clock)


def test_a_device_missing_its_check_in_is_reported_once_and_back_online() -> None:
    clock = Clock()
    sup = make(clock)
    device = z2m_devices(1)[0]
    assert device.test_interval_h == 24
    sup.observe("mqtt", event(EventKind.TEST), device.device_id, clock.t)
    clock.t += 24 * 3600 * 1.4
    assert [n for n in sup.check() if n.subject == device.device_id] == []
    clock.t += 24 * 3600 * 0.2
    overdue = [n for n in sup.check() if n.subject == device.device_id]
    assert [n.kind for n in overdue] == ["device.offline"]
    assert "未报到" in overdue[0].text
    assert [n for n in sup.check() if n.subject == device.device_id] == []  # once per outage
    health = {h.device_id: h for h in sup.health()}
    assert health[device.device_id].overdue
    back = sup.observe("mqtt", event(EventKind.TEST), device.device_id, clock.t)
    assert [n.kind for n in back] == ["device.online"]
    assert not {h.device_id: h for h in sup.health()}[device.device_id].overdue


def test_counts_for_the_metrics_agree_with_health() -> None:
    """counts() walks the devices without sorting or records (a /metrics scrape of a city)
    and must say what health() says: offline devices, and overdue ones including them."""
    clock = Clock()
    sup = make(clock)
    quiet, offline, fresh = z2m_devices(3)
    for d in (quiet, offline, fresh):
        sup.observe("mqtt", event(EventKind.TEST), d.device_id, clock.t)
    clock.t += 24 * 3600 * 1.6  # past every 24 h device's check-in, the unheard ones too
    sup.observe("mqtt", event(EventKind.TEST), fresh.device_id, clock.t)
    sup.observe("mqtt", event(EventKind.OFFLINE), offline.device_id, clock.t)
    health = sup.health()
    overdue = sum(h.overdue for h in health)
    assert sup.counts() == (1, overdue)
    by_id = {h.device_id: h.overdue for h in health}
    assert by_id[quiet.device_id] and by_id[offline.device_id] and not by_id[fresh.device_id]


def test_devices_never_heard_count_from_start_and_restore_from_journal() -> None:
    clock = Clock()
    sup = make(clock)
    one, two = z2m_devices(2)
    sup.restore({one.device_id: (clock.t - 40 * 3600, 80.0)})
    notices = {n.subject for n in sup.check()}
    assert one.device_id in notices  # silent for 40 h before the restart
    assert two.device_id not in notices  # never heard: counted from the gateway's start
    # Phones have no periodic test: never overdue.
    phone = next(d for d in REGISTRY.devices.values() if d.scheme is AddressScheme.PHONE)
    clock.t += 30 * 24 * 3600
    assert phone.device_id not in {n.subject for n in sup.check()}


def test_availability_and_battery_notices() -> None:
    clock = Clock()
    sup = make(clock)
    d = z2m_devices(1)[0].device_id
    assert [n.kind for n in sup.observe("mqtt", event(EventKind.OFFLINE), d, clock.t)] == [
        "device.offline"]
    assert sup.observe("mqtt", event(EventKind.OFFLINE), d, clock.t) == []
    assert [n.kind for n in sup.observe("mqtt", event(EventKind.ONLINE), d, clock.t)] == [
        "device.online"]
    low = sup.observe("mqtt", event(EventKind.STATUS, battery=12), d, clock.t)
    assert [n.kind for n in low] == ["device.low_battery"] and "12%" in low[0].text
    assert sup.observe("mqtt", event(EventKind.STATUS, battery=11), d, clock.t) == []
    assert sup.observe("mqtt", event(EventKind.STATUS, battery=95), d, clock.t) == []
    again = sup.observe("mqtt", event(EventKind.LOW_BATTERY), d, clock.t)
    assert [n.kind for n in again] == ["device.low_battery"]


def test_receiver_heartbeats_and_link_state() -> None:
    clock = Clock()
    sup = make(clock)
    sup.watch_channel("serial:rx", interval_s=30, missed=3)
    hb = DeviceEvent(EventKind.HEARTBEAT, DeviceAddress(AddressScheme.RECEIVER, "surgard:01"),
                     b"")
    clock.t += 85
    sup.observe("serial:rx", hb, None, clock.t)
    clock.t += 89
    assert not [n for n in sup.check() if n.subject == "serial:rx"]
    clock.t += 2
    down = [n for n in sup.check() if n.subject == "serial:rx"]
    assert [(n.kind, n.severity) for n in down] == [("receiver.down", "critical")]
    up = sup.observe("serial:rx", hb, None, clock.t)
    assert [n.kind for n in up] == ["receiver.up"]
    assert [n.kind for n in sup.link_state("serial:rx", False)] == ["receiver.down"]
    assert [n.kind for n in sup.link_state("serial:rx", True)] == ["receiver.up"]
    assert sup.link_state("serial:unknown", False) == []


@pytest.mark.integration
async def test_unplugged_receiver_sounds_a_notice_until_it_is_back(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio, serial=[{
        "name": "rx", "port": pty.path, "protocol": "surgard", "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.1}])
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None and gw.player is not None
        await eventually(gw.serial[0].connected.is_set)
        pty.close()  # the USB cable is pulled
        notices = await eventually(gw.journal.open_notices)
        assert notices[0]["kind"] == "receiver.down"
        assert notices[0]["severity"] == "critical"
        await eventually(lambda: gw.player is not None
                         and f"notice-{notices[0]['id']}" in gw.player.active())
        assert gw.notices is not None
        assert await gw.notices.acknowledge(int(notices[0]["id"]), "operator")
        assert f"notice-{notices[0]['id']}" not in gw.player.active()
        assert await gw.journal.open_notices() == []


@pytest.mark.integration
async def test_mqtt_availability_battery_and_alarm_states_are_published(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio, mqtt={"enabled": True, "port": mosquitto.port})
    gw = Gateway(cfg, secrets_for(twilio))
    offline_dev, low_dev = z2m_devices(2)
    async with running(gw), aiomqtt.Client(mosquitto.host, mosquitto.port) as watcher:
        assert gw.mqtt is not None and gw.journal is not None and gw.dispatcher is not None
        await eventually(gw.mqtt.connected.is_set)
        await watcher.subscribe("alarm/#", qos=1)
        await watcher.publish(f"{offline_dev.address}/availability", b"offline", qos=1)
        await watcher.publish(low_dev.address, b'{"battery": 9, "linkquality": 80}', qos=1)
        await watcher.publish(low_dev.address, b'{"action": "emergency"}', qos=1)
        seen: dict[str, list[dict[str, object]]] = {}
        async with asyncio.timeout(15):
            async for msg in watcher.messages:
                topic = msg.topic.value
                if topic == "alarm/gateway/test/status":
                    continue
                assert isinstance(msg.payload, bytes)
                seen.setdefault(topic, []).append(json.loads(msg.payload))
                kinds = {n["kind"] for n in seen.get("alarm/notices", [])}
                states = [s["state"] for t, v in seen.items() if t.startswith("alarm/alarms/")
                          for s in v]
                if {"device.offline", "device.low_battery"} <= kinds and "notified" in states:
                    break
        notices = {(n["kind"], n["subject"]) for n in seen["alarm/notices"]}
        assert ("device.offline", offline_dev.device_id) in notices
        assert ("device.low_battery", low_dev.device_id) in notices
        alarm_topic = next(t for t in seen if t.startswith("alarm/alarms/"))
        states = [s["state"] for s in seen[alarm_topic]]
        # In lifecycle order, ending with the latest (intermediate ones may be coalesced).
        order = ["journaled", "notifying", "notified"]
        assert states == sorted(states, key=order.index) and states[-1] == "notified"
        assert len(states) == len(set(states))
        assert seen[alarm_topic][0]["device_id"] == low_dev.device_id
        health = {h["device_id"]: h for h in gw.device_health()}
        assert health[offline_dev.device_id]["overdue"]
        assert health[low_dev.device_id]["low_battery"]
        assert health[low_dev.device_id]["battery_pct"] == 9


def test_inactivity_tamper_and_power_loss_are_operator_notices() -> None:
    clock = Clock()
    sup = make(clock)
    device = z2m_devices(1)[0]
    elder = REGISTRY.elders[device.elder_id]
    inactive = sup.observe("mqtt", event(EventKind.INACTIVITY), device.device_id, clock.t)
    assert [(n.kind, n.severity) for n in inactive] == [("device.inactivity", "critical")]
    assert elder.name in inactive[0].text
    assert [n.kind for n in sup.observe("mqtt", event(EventKind.TAMPER), device.device_id,
                                        clock.t)] == ["device.tamper"]
    assert [n.kind for n in sup.observe("mqtt", event(EventKind.POWER_LOSS), device.device_id,
                                        clock.t)] == ["device.power_loss"]
    assert sup.observe("mqtt", event(EventKind.TEST), device.device_id, clock.t) == []


@pytest.mark.integration
async def test_contact_id_inactivity_sounds_in_the_center(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    from devices.events import Qualifier
    from devices.surgard import ACK, encode_mlr2

    cfg = gateway_config(tmp_path, twilio, serial=[{
        "name": "rx", "port": pty.path, "protocol": "surgard"}])
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None and gw.player is not None and gw.registry is not None
        await eventually(gw.serial[0].connected.is_set)
        device = sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                        key=lambda d: d.device_id)[0]
        pty.write(encode_mlr2("01", "1", device.address, Qualifier.NEW, "641", "01", "001"))
        assert await pty.read() == ACK
        notice = (await eventually(gw.journal.open_notices))[0]
        assert notice["kind"] == "device.inactivity" and notice["subject"] == device.device_id
        await eventually(lambda: gw.player is not None
                         and f"notice-{notice['id']}" in gw.player.active())
        assert await gw.journal.open_alarms() == []  # an operator call, not a family SMS
        assert twilio.messages == []
