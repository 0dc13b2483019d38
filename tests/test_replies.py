"""Acknowledgement by SMS reply and delivery tracking through the running gateway: signed
Twilio webhooks (and forged ones refused), the polling mode for centers behind NAT, and a
message the carrier could not deliver resent through the GSM modem."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import aiomqtt
import pytest
from twilio.request_validator import RequestValidator

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.daemon import Gateway
from gateway.journal import MessageKind
from gateway.lifecycle import AlarmState, NotificationState
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import (
    Mosquitto,
    Pty,
    eventually,
    free_port,
    gateway_config,
    running,
    secrets_for,
)
from tests.support.gsm_modem_sim import SimulatedModem

pytestmark = pytest.mark.integration


async def start_alarm(gw: Gateway, pty: Pty) -> str:
    assert gw.registry is not None and gw.journal is not None and gw.dispatcher is not None
    await eventually(gw.serial[0].connected.is_set)
    device = sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                    key=lambda d: d.device_id)[0]
    pty.write(encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001"))
    assert await pty.read() == ACK
    alarm = (await eventually(gw.journal.open_alarms))[0]
    await gw.dispatcher.wait_idle(timeout=15)
    return alarm.alarm_id


async def test_signed_reply_acknowledges_and_delivery_reports_are_tracked(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    cfg = gateway_config(tmp_path, twilio, webhooks={"port": port},
                         sms={"public_url": public},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    twilio.inbound_webhook_url = public + "/twilio/inbound"
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None
        alarm_id = await start_alarm(gw, pty)
        notes = await gw.journal.notifications(alarm_id)
        assert all(m.status_callback == public + "/twilio/status" for m in twilio.messages)
        # The double reports sent -> delivered through signed StatusCallbacks.
        await eventually(lambda: _all_delivered(gw, alarm_id), timeout=15)
        # A forged reply (wrong signature) is refused and changes nothing.
        staff = next(n for n in notes if n.role == "responder")
        form = {"MessageSid": "SM" + "f" * 32, "AccountSid": twilio.account_sid,
                "From": staff.phone, "To": "+15005550006", "Body": f"{alarm_id} 1"}
        async with aiohttp.ClientSession() as http, http.post(
                public + "/twilio/inbound", data=form,
                headers={"X-Twilio-Signature": "forged"}) as resp:
            assert resp.status == 403
        assert (await gw.journal.get_alarm(alarm_id)).state is AlarmState.NOTIFIED
        # The real reply, signed by the double as Twilio would.
        await twilio.inject_inbound(staff.phone, f"{alarm_id.lower()} 好的", to="+15005550006")
        rec = await gw.journal.get_alarm(alarm_id)
        assert rec.state is AlarmState.ACKNOWLEDGED and rec.acknowledged_by == f"sms:{staff.name}"
        answer = twilio.inbound_deliveries[-1].answer
        assert answer is not None and "已确认由您接单" in answer
        states = {n.phone: n.state for n in await gw.journal.notifications(alarm_id)
                  if n.wave == 1}
        assert states[staff.phone] == "acknowledged"  # per recipient: who took it
        assert {v for p, v in states.items() if p != staff.phone} == {"delivered"}
        # The answer was signed-for and valid: recompute to be sure the double is honest.
        assert RequestValidator(twilio.auth_token).validate(
            public + "/twilio/inbound", twilio.inbound_deliveries[-1].params,
            twilio.inbound_deliveries[-1].signature)


async def _all_delivered(gw: Gateway, alarm_id: str) -> bool:
    assert gw.journal is not None
    notes = await gw.journal.notifications(alarm_id)
    return bool(notes) and all(n.state == "delivered" for n in notes)


async def test_polling_mode_picks_up_replies_and_statuses_without_webhooks(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio, sms={"poll_inbound_s": 0.2, "poll_status_s": 0.2},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None
        alarm_id = await start_alarm(gw, pty)
        await eventually(lambda: _all_delivered(gw, alarm_id), timeout=15)
        staff = next(n for n in await gw.journal.notifications(alarm_id)
                     if n.role == "responder")
        await twilio.inject_inbound(staff.phone, "1", to="+15005550006")
        await eventually(lambda: _acknowledged(gw, alarm_id), timeout=15)
        # The poller texts the answer back, as TwiML would have.
        await eventually(lambda: any(m.to == staff.phone and "已确认" in m.body
                                     for m in twilio.messages), timeout=10)


async def _acknowledged(gw: Gateway, alarm_id: str) -> bool:
    assert gw.journal is not None
    return (await gw.journal.get_alarm(alarm_id)).state is AlarmState.ACKNOWLEDGED


async def test_staff_app_acknowledges_over_mqtt(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble, mosquitto: Mosquitto
) -> None:
    cfg = gateway_config(tmp_path, twilio, mqtt={"enabled": True, "port": mosquitto.port},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None and gw.registry is not None and gw.mqtt is not None
        await eventually(gw.mqtt.connected.is_set)
        alarm_id = await start_alarm(gw, pty)
        staff = next(n for n in await gw.journal.notifications(alarm_id)
                     if n.role == "responder")
        responder = next(r for r in gw.registry.responders.values() if r.phone == staff.phone)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as app:
            await app.publish(f"alarm/alarms/{alarm_id}/ack", b"not json", qos=1)
            await app.publish(f"alarm/alarms/{alarm_id}/ack", b'{"by": "R9999"}', qos=1)
            await app.publish(f"alarm/alarms/{alarm_id}/ack",
                              json.dumps({"by": responder.responder_id}).encode(), qos=1)
        await eventually(lambda: _acknowledged(gw, alarm_id))
        rec = await gw.journal.get_alarm(alarm_id)
        assert rec.acknowledged_by == f"app:{responder.name}"


async def test_an_undelivered_sms_is_resent_by_the_gsm_modem_once_and_the_operator_told(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    async with SimulatedModem() as modem:
        cfg = gateway_config(
            tmp_path, twilio, webhooks={"port": port}, sms={"public_url": public},
            gsm={"port": modem.port_path, "command_timeout_s": 2, "send_timeout_s": 10},
            serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
        gw = Gateway(cfg, secrets_for(twilio))
        async with running(gw):
            assert gw.journal is not None and gw.registry is not None
            device = sorted((d for d in gw.registry.devices.values()
                             if d.scheme == "contact_id"), key=lambda d: d.device_id)[0]
            lost = gw.registry.elders[device.elder_id].contacts[0].phone
            twilio.set_final_status(lost, "undelivered", error_code=30003)
            alarm_id = await start_alarm(gw, pty)

            async def resent() -> list[object] | None:
                assert gw.journal is not None
                rows = [r for r in await gw.journal.notifications(alarm_id)
                        if r.kind is MessageKind.FALLBACK
                        and r.state is NotificationState.ACCEPTED]
                return rows or None  # type: ignore[return-value]

            rows = await eventually(resent, timeout=20)
            assert [r.phone for r in rows] == [lost]  # type: ignore[attr-defined]
            assert (rows[0].sid or "").startswith("gsm:")  # type: ignore[attr-defined]
            original = [r for r in await gw.journal.notifications(alarm_id)
                        if r.kind is MessageKind.ESCALATION and r.phone == lost]
            assert [r.state for r in original] == [NotificationState.UNDELIVERED]
            assert [phone for phone, _ in modem.reassembled()] == [lost]
            assert gw.notices is not None
            await gw.notices.wait_idle()
            kinds = [n["kind"] for n in await gw.journal.open_notices()]
            assert kinds == ["sms.undelivered"]
