"""The `gateway` command: check-config, simulate press (a drill over MQTT, a line test
on serial), ack, status."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.daemon import Gateway
from gateway.lifecycle import AlarmState
from gateway.model import LonLat
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import (
    REPO,
    SAMPLE,
    Mosquitto,
    control,
    eventually,
    gateway_config,
    running,
    secrets_for,
    z2m_devices,
)

KENLI_CENTRE = LonLat(118.55, 37.59)


def gateway_cmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})}, check=False)


async def gateway_cmd_async(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_toml(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(body, encoding="utf-8")
    return p


@pytest.mark.integration  # runs the gateway CLI as a subprocess
def test_check_config_on_the_example_prints_a_summary() -> None:
    res = gateway_cmd("check-config", "--config", str(REPO / "config/gateway.example.toml"),
                      env={"TWILIO_ACCOUNT_SID": "AC" + "1" * 32, "TWILIO_AUTH_TOKEN": "x",
                           "CONTROL_TOKEN": "c0ntrol-" + "5a" * 16})
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["counts"]["elders"] == 88
    assert summary["counts"]["responders"] == 143
    assert "x" not in summary["secrets"].replace("twilio", "").replace("mqtt", "")


@pytest.mark.integration  # runs the gateway CLI as a subprocess
def test_check_config_reports_file_key_and_reason(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, '[sms]\nfrom_number = "+15005550006"\n[gateway]\nnme = "x"\n')
    res = gateway_cmd("check-config", "--config", str(cfg))
    assert res.returncode == 2
    assert f"{cfg}: gateway.nme: unknown key" in res.stderr


@pytest.mark.integration  # runs the gateway CLI as a subprocess
def test_check_config_reports_registry_errors_with_file_line_field(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    shutil.copytree(SAMPLE, reg)
    contacts = (reg / "contacts.csv").read_text(encoding="utf-8").splitlines()
    fields = contacts[3].split(",")
    fields[3] = "12345"  # not a phone number
    contacts[3] = ",".join(fields)
    (reg / "contacts.csv").write_text("\n".join(contacts) + "\n", encoding="utf-8")
    cfg = write_toml(tmp_path, f'[sms]\nfrom_number = "+15005550006"\n'
                               f'[registry]\ndirectory = "{reg}"\n')
    res = gateway_cmd("check-config", "--config", str(cfg))
    assert res.returncode == 2
    assert "contacts.csv:4" in res.stderr and "phone" in res.stderr


@pytest.mark.integration  # runs the gateway CLI as a subprocess
def test_run_without_twilio_credentials_exits_3(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, f'[sms]\nfrom_number = "+15005550006"\n'
                               f'[registry]\ndirectory = "{SAMPLE}"\n'
                               f'[gateway]\nstate_dir = "{tmp_path}/state"\n'
                               '[mqtt]\nenabled = false\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWILIO_")}
    res = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, env=env, check=False)
    assert res.returncode == 3
    # One line, on stdout (journald gets stdout and stderr as one stream).
    assert res.stdout.count("gateway.cannot_start") == 1 and "TWILIO_ACCOUNT_SID" in res.stdout


@pytest.mark.integration
async def test_simulate_press_over_mqtt_then_ack_and_status(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio, mqtt={"enabled": True, "port": mosquitto.port})
    toml = write_toml(tmp_path, f"""
[gateway]
state_dir = "{tmp_path / 'state'}"
[registry]
directory = "{SAMPLE}"
[mqtt]
port = {mosquitto.port}
[sms]
from_number = "+15005550006"
""")
    device = z2m_devices(1)[0]
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.mqtt is not None and gw.journal is not None and gw.dispatcher is not None
        await eventually(gw.mqtt.connected.is_set)
        code, out, err = await gateway_cmd_async("simulate", "press", "--device",
                                                 device.device_id, "--config", str(toml))
        assert code == 0, err
        # A drill, read back from the gateway: journaled when the command returns.
        alarms = await gw.journal.open_alarms()
        assert f"journaled as alarm {alarms[0].alarm_id}" in out and "dry run" in out
        assert alarms[0].device_id == device.device_id and alarms[0].drill
        await gw.dispatcher.wait_idle(timeout=15)
        assert twilio.messages == []  # a dry run texts nobody
        code, out, err = await gateway_cmd_async("status", "--config", str(toml))
        assert code == 0, err
        status = json.loads(out)
        assert [a["alarm_id"] for a in status["open_alarms"]] == [alarms[0].alarm_id]
        assert status["health"]["links"]
        code, out, err = await gateway_cmd_async("ack", alarms[0].alarm_id, "--by", "wang",
                                                 "--config", str(toml))
        assert code == 0, err
        assert (await gw.journal.get_alarm(alarms[0].alarm_id)).state \
            is AlarmState.ACKNOWLEDGED
        code, out, err = await gateway_cmd_async("resolve", alarms[0].alarm_id, "--note",
                                                 "家属已到达", "--config", str(toml))
        assert code == 0, err
        assert await gw.journal.open_alarms() == []
        code, out, err = await gateway_cmd_async("ack", "NOPE-NOPE", "--config", str(toml))
        assert code == 1 and "404" in err
        # Shifts: an operator puts a grid leader off duty and back on.
        assert gw.geo is not None
        rid = next(r.id for r in gw.geo.lookup(KENLI_CENTRE, k=1).responders)
        before = gw.health()["responders"]["on_duty"]
        code, out, err = await gateway_cmd_async("duty", rid, "off", "--config", str(toml))
        assert code == 0, err
        assert json.loads(out) == {"responder_id": rid, "on_duty": False}
        assert gw.geo.is_on_duty(rid) is False
        code, out, err = await gateway_cmd_async("status", "--config", str(toml))
        assert json.loads(out)["health"]["responders"]["on_duty"] == before - 1
        status, metrics = await control(gw, "GET", "/metrics")
        assert status == 200
        assert f"gateway_responders_on_duty {before - 1:.1f}" in metrics
        assert "gateway_responders_live 0.0" in metrics
        assert rid not in {r.id for r in gw.geo.lookup(KENLI_CENTRE, k=3).responders}
        code, out, err = await gateway_cmd_async("duty", rid, "on", "--config", str(toml))
        assert code == 0 and gw.geo.is_on_duty(rid) is True, err
        code, out, err = await gateway_cmd_async("duty", "NOBODY", "on", "--config", str(toml))
        assert code == 1 and "404" in err
        code, out, err = await gateway_cmd_async("simulate", "press", "--device", "nope",
                                                 "--config", str(toml))
        assert code == 1 and "unknown device" in err


@pytest.fixture
def socat_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    a, b = str(tmp_path / "ttyA"), str(tmp_path / "ttyB")
    proc = subprocess.Popen(["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = 50
        while not (os.path.exists(a) and os.path.exists(b)) and deadline:
            subprocess.run(["sleep", "0.1"], check=True)
            deadline -= 1
        yield a, b
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.mark.integration
async def test_simulate_press_over_a_serial_line(
    tmp_path: Path, twilio: TwilioDouble, socat_pair: tuple[str, str]
) -> None:
    gw_end, sim_end = socat_pair
    cfg = gateway_config(tmp_path, twilio, serial=[{
        "name": "rx", "port": gw_end, "protocol": "surgard", "reconnect_initial_s": 0.05}])
    toml = write_toml(tmp_path, f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n'
                                f'[registry]\ndirectory = "{SAMPLE}"\n'
                                '[sms]\nfrom_number = "+15005550006"\n')
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.registry is not None and gw.journal is not None and gw.dispatcher is not None
        await eventually(gw.serial[0].connected.is_set)
        device = sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                        key=lambda d: d.device_id)[0]
        code, out, err = await gateway_cmd_async("simulate", "press", "--device",
                                                 device.device_id, "--port", sim_end,
                                                 "--live", "--config", str(toml))
        assert code == 0, err
        alarms = await gw.journal.open_alarms()  # read back before the command returned
        assert alarms[0].device_id == device.device_id and not alarms[0].drill
        assert "ACK from the gateway" in out and f"REAL alarm {alarms[0].alarm_id}" in out
        await gw.dispatcher.wait_idle(timeout=15)
        assert twilio.messages
