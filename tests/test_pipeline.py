"""End to end, in process: a press over real MQTT / a real pty becomes a journaled alarm,
an alert, nearest responders and SMS at the Twilio double (real twilio-python, real HTTP)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from structlog.testing import capture_logs

from devices.events import Qualifier
from devices.surgard import ACK, NAK, encode_mlr2
from gateway.daemon import Gateway
from gateway.lifecycle import AlarmState
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import (
    Mosquitto,
    Pty,
    control,
    eventually,
    gateway_config,
    running,
    secrets_for,
    z2m_devices,
)

pytestmark = pytest.mark.integration


def expected_recipients(gw: Gateway, alarm_id: str, elder_id: str, staff: int = 2) -> set[str]:
    assert gw.registry is not None and gw.dispatcher is not None
    elder = gw.registry.elders[elder_id]
    alarm = gw.dispatcher.active[alarm_id]
    assert alarm.geo is not None
    staff_phones = {r.phone for r in alarm.geo.responders[:staff]}
    return {c.phone for c in elder.contacts} | staff_phones


async def publish(broker: Mosquitto, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.publish(topic, payload, qos=1)


async def test_mqtt_press_becomes_journaled_alarm_alert_and_sms(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio, mqtt={"enabled": True, "port": mosquitto.port})
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.mqtt is not None and gw.journal is not None and gw.dispatcher is not None
        assert gw.player is not None and gw.control is not None
        await eventually(gw.mqtt.connected.is_set)
        device = z2m_devices(1)[0]
        await publish(
            mosquitto,
            device.address,
            json.dumps({"action": "emergency", "battery": 91, "linkquality": 120}).encode(),
        )
        alarms = await eventually(gw.journal.open_alarms)
        assert len(alarms) == 1
        alarm = alarms[0]
        assert alarm.device_id == device.device_id and alarm.elder_id == device.elder_id
        await gw.dispatcher.wait_idle(timeout=15)
        expected = expected_recipients(gw, alarm.alarm_id, device.elder_id)
        assert len(expected) >= 3
        sent = {m.to: m for m in twilio.messages}
        assert set(sent) == expected
        assert all(alarm.alarm_id in m.body for m in sent.values())
        notes = await gw.journal.notifications(alarm.alarm_id)
        assert {n.phone for n in notes} == expected
        assert all(n.state == "accepted" and n.sid and n.latency_ms is not None for n in notes)
        assert (await gw.journal.get_alarm(alarm.alarm_id)).state is AlarmState.NOTIFIED
        # The command center hears it, repeatedly, until acknowledged.
        await gw.player.wait_played(alarm.alarm_id, 2, timeout=20)
        wavs = list((tmp_path / "alerts").glob("*.wav"))
        assert wavs and wavs[0].stat().st_size > 20_000
        status, _ = await control(gw, "POST", f"/alarms/{alarm.alarm_id}/ack", json={"by": "li"})
        assert status == 200
        assert alarm.alarm_id not in gw.player.active()
        rec = await gw.journal.get_alarm(alarm.alarm_id)
        assert rec.state is AlarmState.ACKNOWLEDGED and rec.acknowledged_by == "operator:li"
        # Device state was journaled too (battery, link quality from the press).
        states = {s.device_id: s for s in await gw.journal.device_states()}
        assert device.device_id in states


async def test_second_press_joins_and_unknown_and_malformed_do_not_crash(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio, mqtt={"enabled": True, "port": mosquitto.port})
    gw = Gateway(cfg, secrets_for(twilio))
    with capture_logs() as logs:
        async with running(gw):
            assert gw.mqtt is not None and gw.journal is not None and gw.dispatcher is not None
            await eventually(gw.mqtt.connected.is_set)
            twice, junk, once = z2m_devices(3)
            await publish(mosquitto, twice.address, b'{"action":"emergency"}')
            await publish(mosquitto, twice.address, b'{"action":"emergency"}')
            await publish(mosquitto, "zigbee2mqtt/not-registered", b'{"action":"emergency"}')
            await publish(mosquitto, junk.address, b"\xff\xfe not json")
            await publish(mosquitto, junk.address, b"[1,2,3]")
            await publish(mosquitto, junk.address, b"x" * 100_000)
            await publish(mosquitto, once.address, b'{"action":"emergency"}')
            await eventually(lambda: gw.mqtt is not None and gw.mqtt.acked >= 7)
            await gw.dispatcher.wait_idle(timeout=15)
            alarms = {a.device_id: a for a in await gw.journal.open_alarms()}
            assert set(alarms) == {
                twice.device_id,
                once.device_id,
                "unregistered:mqtt:zigbee2mqtt/not-registered",
            }
            assert alarms[twice.device_id].presses == 2
            # The unknown button's press is heard in the center, but nobody's family is texted.
            unknown = alarms["unregistered:mqtt:zigbee2mqtt/not-registered"]
            assert unknown.alarm_id in gw.dispatcher.active
            assert await gw.journal.notifications(unknown.alarm_id) == []
    events = [e["event"] for e in logs]
    assert events.count("device.malformed") == 3
    assert "device.unknown" in events
    assert "alarm.joined" in events
    joined = next(e for e in logs if e["event"] == "alarm.joined")
    assert joined["alarm_id"] == alarms[twice.device_id].alarm_id


async def test_serial_surgard_press_is_acked_only_after_journal_commit(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(
        tmp_path,
        twilio,
        serial=[
            {"name": "rx1", "port": pty.path, "protocol": "surgard", "reconnect_initial_s": 0.05}
        ],
    )
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.registry is not None and gw.journal is not None and gw.dispatcher is not None
        await eventually(gw.serial[0].connected.is_set)
        device = next(
            d
            for d in sorted(gw.registry.devices.values(), key=lambda d: d.device_id)
            if d.scheme == "contact_id"
        )
        pty.write(b"\x00garbage\x14")
        assert await pty.read() == NAK
        pty.write(encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "003"))
        assert await pty.read() == ACK
        # At the moment the receiver got its ACK, the alarm was already durable on disk.
        with sqlite3.connect(cfg.model.gateway.journal_path) as conn:
            rows = conn.execute("SELECT alarm_id, device_id FROM alarms").fetchall()
        assert [r[1] for r in rows] == [device.device_id]
        alarm_id = rows[0][0]
        await gw.dispatcher.wait_idle(timeout=15)
        expected = expected_recipients(gw, alarm_id, device.elder_id)
        assert {m.to for m in twilio.messages} == expected
        assert all(alarm_id in m.body for m in twilio.messages)
        # A heartbeat is acknowledged and creates nothing.
        pty.write(b"1011           @    \x14")
        assert await pty.read() == ACK
        assert len(await gw.journal.open_alarms()) == 1


async def test_latency_counts_from_the_bridges_time_so_a_wait_at_the_broker_shows(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble
) -> None:
    """Issue 13: a press that waited at the broker before intake is late by the device's
    clock (Zigbee2MQTT's last_seen), and its SMS latency and budget say so; a stamp from a
    clock far ahead is not believed (counted, latency from receipt)."""
    cfg = gateway_config(tmp_path, twilio, mqtt={"enabled": True, "port": mosquitto.port})
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.mqtt is not None and gw.journal is not None and gw.dispatcher is not None
        await eventually(gw.mqtt.connected.is_set)
        late, ahead = z2m_devices(2)
        now_ms = gw.clock() * 1000
        await publish(mosquitto, late.address, json.dumps(
            {"action": "emergency", "last_seen": int(now_ms - 5000)}).encode())
        await publish(mosquitto, ahead.address, json.dumps(
            {"action": "emergency", "last_seen": int(now_ms + 3_600_000)}).encode())
        alarms = await eventually(
            lambda: _when(gw.journal.open_alarms(), lambda found: len(found) == 2))
        await gw.dispatcher.wait_idle(timeout=15)
        by_device = {a.device_id: a.alarm_id for a in alarms}
        sample = gw.metrics.registry.get_sample_value
        late_notes = [n for n in await gw.journal.notifications(by_device[late.device_id])
                      if n.wave == 1]
        assert late_notes and all(n.latency_ms is not None and n.latency_ms >= 5000
                                  for n in late_notes)
        assert sample("gateway_device_to_receipt_ms_count") == 1
        assert (sample("gateway_device_to_receipt_ms_sum") or 0) >= 5000
        assert sample("gateway_sms_budget_breaches_total") == len(late_notes)
        assert sample("gateway_device_clock_off_total") == 1
        ahead_notes = [n for n in await gw.journal.notifications(by_device[ahead.device_id])
                       if n.wave == 1]
        assert ahead_notes and all(n.latency_ms is not None and 0 <= n.latency_ms < 60_000
                                   for n in ahead_notes)


async def _when(value: Any, ok: Any) -> Any:
    found = await value
    return found if ok(found) else None
