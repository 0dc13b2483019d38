"""Twilio outages: retries deliver everything after recovery; with a GSM modem configured,
the alarm SMS go out through it instead of waiting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.daemon import Gateway
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import Pty, eventually, gateway_config, running, secrets_for
from tests.support.gsm_modem_sim import SimulatedModem

pytestmark = pytest.mark.integration


async def press_first_contact_id(gw: Gateway, pty: Pty) -> str:
    assert gw.registry is not None and gw.journal is not None
    await eventually(gw.serial[0].connected.is_set)
    device = sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                    key=lambda d: d.device_id)[0]
    pty.write(encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001"))
    assert await pty.read() == ACK  # journaled: the outage does not hold up the receiver
    return (await eventually(gw.journal.open_alarms))[0].alarm_id


async def test_outage_then_recovery_delivers_every_message_once(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio, sms={"max_attempts": 12, "request_timeout_s": 0.5},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None
        await twilio.outage(True, refuse=True)
        alarm_id = await press_first_contact_id(gw, pty)
        await asyncio.sleep(1.5)
        assert twilio.messages == []
        await twilio.outage(False)
        await gw.dispatcher.wait_idle(timeout=60)
        notes = await gw.journal.notifications(alarm_id)
        assert notes and all(n.state == "accepted" and n.attempts > 1 for n in notes)
        assert sorted(m.to for m in twilio.messages) == sorted(n.phone for n in notes)


async def test_twilio_down_the_gsm_modem_carries_the_alarm(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    async with SimulatedModem() as modem:
        cfg = gateway_config(
            tmp_path, twilio, sms={"max_attempts": 2, "request_timeout_s": 0.5},
            gsm={"port": modem.port_path, "command_timeout_s": 2, "send_timeout_s": 10},
            serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
        gw = Gateway(cfg, secrets_for(twilio))
        async with running(gw):
            assert gw.journal is not None and gw.dispatcher is not None
            await twilio.outage(True)  # every request answered 503
            alarm_id = await press_first_contact_id(gw, pty)
            await gw.dispatcher.wait_idle(timeout=60)
            notes = await gw.journal.notifications(alarm_id)
            assert notes and all(n.state == "accepted" and (n.sid or "").startswith("gsm:")
                                 for n in notes)
            texts = dict(modem.reassembled())
            assert set(texts) == {n.phone for n in notes}
            assert all(alarm_id in t for t in texts.values())
            assert twilio.messages == []


async def test_a_sixty_second_outage_without_fallback_loses_nothing(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    """Twilio refuses connections for 60 s (on an injected clock): the gateway keeps the
    messages 'sending', tells the operator, and delivers each exactly once afterwards."""
    start = time.time()
    now = {"t": start}
    outage = {"on": True}

    async def sleep(seconds: float) -> None:
        now["t"] += seconds
        if outage["on"] and now["t"] - start >= 60:
            outage["on"] = False
            await twilio.outage(False)
        await asyncio.sleep(0)

    cfg = gateway_config(tmp_path, twilio,
                         sms={"max_attempts": 3, "request_timeout_s": 0.5, "retry_later_s": 30},
                         escalation={"waves": [{"after_s": 0, "family": True, "staff": 2}]},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    gw = Gateway(cfg, secrets_for(twilio), clock=lambda: now["t"], sleep=sleep)
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None
        await twilio.outage(True, refuse=True)
        alarm_id = await press_first_contact_id(gw, pty)
        await gw.dispatcher.wait_idle(timeout=60)
        assert now["t"] - start >= 60
        notes = await gw.journal.notifications(alarm_id)
        assert notes and all(n.state == "accepted" for n in notes)
        assert sorted(m.to for m in twilio.messages) == sorted(n.phone for n in notes)
        notices = await gw.journal.open_notices()
        assert {n["kind"] for n in notices} == {"sms.delayed"}
