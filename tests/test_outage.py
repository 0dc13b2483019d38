"""Twilio outages and backlogs: retries deliver everything after recovery, with one operator
notice per outage (and one when it is over); with a GSM modem configured, the alarm SMS go
out through it instead of waiting; a restart with hundreds of rows left ``sending``
reconciles them at low priority, one lookup per row, after a new alarm's first wave."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.daemon import Gateway
from gateway.journal import Journal, NotificationPlan
from gateway.model import Device
from gateway.registry import load_registry
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import SAMPLE, Pty, eventually, gateway_config, running, secrets_for
from tests.support.gsm_modem_sim import SimulatedModem
from tests.support.twilio_faults import Fault, FaultyTwilioDouble

pytestmark = pytest.mark.integration


def contact_id_devices(gw: Gateway) -> list[Device]:
    assert gw.registry is not None
    return sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                  key=lambda d: d.device_id)


async def press(gw: Gateway, pty: Pty, device: Device) -> str:
    """Press ``device`` through the serial receiver; returns the new alarm's id."""
    assert gw.journal is not None
    await eventually(gw.serial[0].connected.is_set)
    before = {a.alarm_id for a in await gw.journal.open_alarms()}
    pty.write(encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001"))
    assert await pty.read() == ACK  # journaled: the outage does not hold up the receiver

    async def new_alarm() -> str | None:
        assert gw.journal is not None
        fresh = [a for a in await gw.journal.open_alarms() if a.alarm_id not in before]
        return fresh[0].alarm_id if fresh else None

    return str(await eventually(new_alarm))


async def press_first_contact_id(gw: Gateway, pty: Pty) -> str:
    return await press(gw, pty, contact_id_devices(gw)[0])


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

        async def refused_twice() -> bool:  # the gateway tried, and Twilio was down
            notes = await gw.journal.notifications(alarm_id)  # type: ignore[union-attr]
            return bool(notes) and all(n.attempts >= 2 for n in notes)

        await eventually(refused_twice, timeout=20)
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
        assert gw.notices is not None
        await gw.notices.wait_idle()
        notices = await gw.journal.open_notices()
        # One notice for the outage, one when it is over; none per message.
        assert [(n["kind"], n["severity"]) for n in notices] == [
            ("sms.outage", "warning"), ("sms.outage.over", "info")]


async def test_an_outage_over_many_recipients_is_one_notice_and_retries_not_failures(
    tmp_path: Path, pty: Pty, twilio: FaultyTwilioDouble
) -> None:
    """Several alarms, a dozen recipients, Twilio refusing connections until every message
    has failed a round (injected clock): each failed round is logged as a retry, the
    operator gets one notice for the outage and one when it is over, and every message
    goes out once."""
    now = {"t": time.time()}

    async def sleep(seconds: float) -> None:
        now["t"] += seconds
        await asyncio.sleep(0.05)

    cfg = gateway_config(tmp_path, twilio,
                         sms={"max_attempts": 2, "request_timeout_s": 0.5, "retry_later_s": 20},
                         escalation={"waves": [{"after_s": 0, "family": True, "staff": 2}]},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    gw = Gateway(cfg, secrets_for(twilio), clock=lambda: now["t"], sleep=sleep)
    with capture_logs() as logs:
        async with running(gw):
            assert gw.journal is not None and gw.dispatcher is not None
            assert gw.notices is not None
            await twilio.outage(True, refuse=True)
            alarms = [await press(gw, pty, d) for d in contact_id_devices(gw)[:4]]

            async def all_retrying() -> bool:
                assert gw.journal is not None
                ids = {n.id for a in alarms for n in await gw.journal.notifications(a)}
                retrying = {e.get("notification_id") for e in logs if e["event"] == "sms.retry"}
                return len(ids) >= 10 and ids <= retrying

            await eventually(all_retrying, timeout=20)
            await twilio.outage(False)
            await gw.dispatcher.wait_idle(timeout=60)
            notes = [n for a in alarms for n in await gw.journal.notifications(a)]
            assert len(notes) >= 10 and all(n.state == "accepted" for n in notes)
            assert sorted(m.to for m in twilio.messages) == sorted(n.phone for n in notes)
            await gw.notices.wait_idle()
            notices = await gw.journal.open_notices()
    assert [n["kind"] for n in notices] == ["sms.outage", "sms.outage.over"]
    retried = Counter(e["notification_id"] for e in logs if e["event"] == "sms.retry")
    assert set(retried) == {n.id for n in notes}  # every message retried, as a retry
    assert not [e for e in logs if e["event"] == "sms.failed"]  # not at any level
    assert len([e for e in logs if e["event"] == "sms.outage"]) == 1


async def test_a_restart_with_300_rows_left_sending_reconciles_after_a_new_alarm(
    tmp_path: Path, pty: Pty, twilio: FaultyTwilioDouble
) -> None:
    """Fault 6: a crash left 300 rows 'sending' (50 alarms). The restarted gateway asks
    Twilio once per row, a few rows at a time and after new work, so a new alarm's first
    wave is accepted while the backlog is still being reconciled, and nothing is sent
    twice."""
    cfg = gateway_config(tmp_path, twilio,
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    registry = load_registry(SAMPLE)
    old_devices = sorted((d for d in registry.devices.values() if d.scheme == "mqtt"),
                         key=lambda d: d.device_id)[:50]
    received = time.time() - 10
    async with Journal(cfg.model.gateway.journal_path) as journal:
        for i, device in enumerate(old_devices):
            outcome = await journal.record_press(
                device_id=device.device_id, elder_id=device.elder_id, code="emergency",
                source="mqtt", address=device.address, raw=b"{}", received_at=received,
                dedupe_window_s=60)
            await journal.plan_notifications(outcome.alarm_id, 1, [
                NotificationPlan("responder", f"R{i}-{j}", f"+861390{i:03d}{j:04d}",
                                 f"[{outcome.alarm_id}] help") for j in range(6)])
        backlog_rows = await journal.count("notifications")
    assert backlog_rows == 300
    # Each lookup takes Twilio 50 ms: the backlog takes seconds, a new alarm's SMS do not.
    twilio.inject(*(Fault.delay(0.05) for _ in range(backlog_rows)), target="list")

    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None
        new = await press(gw, pty, contact_id_devices(gw)[0])

        async def first_wave_accepted() -> bool:
            assert gw.journal is not None
            notes = await gw.journal.notifications(new)
            return bool(notes) and all(n.state == "accepted" for n in notes)

        await eventually(first_wave_accepted, timeout=10)
        left = gw.dispatcher.backlog.queued + gw.dispatcher.backlog.in_flight
        assert left > 100  # the new alarm did not wait for the backlog
        first_wave = len(await gw.journal.notifications(new))

        async def backlog_done() -> bool:
            assert gw.journal is not None
            states = [n.state for a in await gw.journal.open_alarms() if a.alarm_id != new
                      for n in await gw.journal.notifications(a.alarm_id)]
            return len(states) == backlog_rows and all(s == "accepted" for s in states)

        await eventually(backlog_done, timeout=60)
    lists = [r for r in twilio.requests if r.method == "GET" and r.path.endswith("Messages.json")]
    assert len(lists) <= backlog_rows  # one lookup per row, no more
    sent = Counter(m.to for m in twilio.messages)
    assert max(sent.values()) == 1  # nobody texted twice
    assert sum(sent.values()) == backlog_rows + first_wave
