"""Restart safety with a real process: SIGKILL after the journal commit and before the SMS
went out; a new gateway resumes the alarm and sends every missing SMS exactly once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from gateway.registry import load_registry
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import SAMPLE, Mosquitto, eventually, z2m_devices

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def write_config(tmp_path: Path, broker: Mosquitto, twilio: TwilioDouble,
                 request_timeout_s: float = 1) -> Path:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
name = "restart-test"
state_dir = "{tmp_path / 'state'}"
shutdown_timeout_s = 3

[registry]
directory = "{SAMPLE}"

[logging]
format = "json"

[mqtt]
port = {broker.port}
reconnect_initial_s = 0.1
reconnect_max_s = 0.5

[alert]
backend = "file"
output_dir = "{tmp_path / 'alerts'}"
repeat_interval_s = 0.5

[sms]
from_number = "+15005550006"
base_url = "{twilio.base_url}"
request_timeout_s = {request_timeout_s}
max_attempts = 20
""", encoding="utf-8")
    return cfg


class Daemon:
    def __init__(self, config: Path, twilio: TwilioDouble, log: Path) -> None:
        env = {**os.environ, "TWILIO_ACCOUNT_SID": twilio.account_sid,
               "TWILIO_AUTH_TOKEN": twilio.auth_token}
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, env=env)

    def events(self) -> list[dict[str, object]]:
        lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        out = []
        for line in lines:
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def journal_rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []


async def test_sigkill_between_journal_and_sms_then_restart_sends_missing_sms(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble, daemons: list[Daemon]
) -> None:
    config = write_config(tmp_path, mosquitto, twilio)
    db = tmp_path / "state" / "journal.sqlite3"
    log = tmp_path / "gateway.log"
    first = Daemon(config, twilio, log)
    daemons.append(first)
    await eventually(lambda: any(e.get("event") == "gateway.ready" for e in first.events()),
                     timeout=30)
    await eventually(lambda: any(e.get("event") == "mqtt.connected" for e in first.events()),
                     timeout=30)
    # Twilio is unreachable: the alarm is journaled, the SMS cannot go out yet.
    await twilio.outage(True, refuse=True)
    device = z2m_devices(5)[4]
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        await client.publish(device.address, b'{"action":"emergency"}', qos=1)
    rows = await eventually(lambda: journal_rows(
        db, f"SELECT alarm_id FROM alarms WHERE device_id = '{device.device_id}'"), timeout=20)
    alarm_id = str(rows[0][0])
    planned = await eventually(lambda: journal_rows(
        db, f"SELECT phone, state FROM notifications WHERE alarm_id = '{alarm_id}'"),
        timeout=20)
    assert all(state == "sending" for _, state in planned)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert twilio.messages == []

    await twilio.outage(False)
    second = Daemon(config, twilio, tmp_path / "gateway2.log")
    daemons.append(second)
    expected = {str(phone) for phone, _ in planned}
    await twilio.wait_for_messages(len(expected), timeout=30)
    # The rows left 'sending' are all worked off (looked up, then resent): any duplicate
    # would have been sent by now.
    await eventually(lambda: any(e.get("event") == "sms.backlog_done"
                                 for e in second.events()), timeout=30)
    sent = [m.to for m in twilio.messages]
    assert sorted(sent) == sorted(expected)  # each recipient exactly once
    assert all(alarm_id in m.body for m in twilio.messages)
    registry = load_registry(SAMPLE)
    family = {c.phone for c in registry.elders[device.elder_id].contacts}
    assert family <= expected
    events = second.events()
    assert any(e.get("event") == "alarm.resumed" and e.get("alarm_id") == alarm_id
               for e in events)
    final = await eventually(lambda: [r for r in journal_rows(
        db, f"SELECT state FROM notifications WHERE alarm_id = '{alarm_id}'")
        if r[0] == "accepted"] if len(journal_rows(
        db, f"SELECT state FROM notifications WHERE alarm_id = '{alarm_id}' "
            "AND state != 'accepted'")) == 0 else [], timeout=20)
    assert len(final) == len(expected)
    # Graceful stop: SIGTERM ends the daemon with exit code 0.
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(20) == 0
    assert any(e.get("event") == "gateway.stopped" for e in second.events())


async def test_sigkill_after_twilio_took_the_request_reconciles_without_a_second_sms(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble, daemons: list[Daemon]
) -> None:
    from tests.support.twilio_faults import Fault

    config = write_config(tmp_path, mosquitto, twilio, request_timeout_s=60)
    db = tmp_path / "state" / "journal.sqlite3"
    first = Daemon(config, twilio, tmp_path / "gateway.log")
    daemons.append(first)
    await eventually(lambda: any(e.get("event") == "mqtt.connected" for e in first.events()),
                     timeout=30)
    device = z2m_devices(6)[5]
    registry = load_registry(SAMPLE)
    expected = len(registry.elders[device.elder_id].contacts) + 2
    # Twilio creates each message, but its answers are slow to come back...
    twilio.inject(*(Fault.hang_after_receive(60) for _ in range(expected)))
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        await client.publish(device.address, b'{"action":"emergency"}', qos=1)
    await twilio.wait_for_messages(expected, timeout=20)
    # ...and the gateway dies before any answer reached its journal.
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    rows = journal_rows(db, "SELECT state FROM notifications")
    assert len(rows) == expected and {r[0] for r in rows} == {"sending"}
    sent_before = sorted(m.sid for m in twilio.messages)

    second = Daemon(config, twilio, tmp_path / "gateway2.log")
    daemons.append(second)
    await eventually(lambda: len([e for e in second.events()
                                  if e.get("event") == "sms.reconciled"]) == expected,
                     timeout=30)
    await eventually(lambda: any(e.get("event") == "sms.backlog_done"
                                 for e in second.events()), timeout=30)
    assert sorted(m.sid for m in twilio.messages) == sent_before  # nothing sent twice
    assert all(e.get("found") for e in second.events() if e.get("event") == "sms.reconciled")
    final = journal_rows(db, "SELECT state, sid FROM notifications")
    assert {r[0] for r in final} == {"accepted"}
    assert sorted(str(r[1]) for r in final) == sent_before
