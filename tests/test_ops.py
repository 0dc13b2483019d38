"""The ops surface: journald priorities, the log fields ops read, one line per failed
start, /healthz, metrics, the notices commands, local times in ``gateway status``, the
journal's file mode, and the README's jq recipes run on a real gateway's output."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import traceback
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.daemon import Gateway
from gateway.logs import configure_logging
from gateway.metrics import build_version
from gateway.model import Device
from gateway.registry import load_registry
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import (
    REPO,
    SAMPLE,
    Mosquitto,
    Pty,
    control,
    eventually,
    gateway_config,
    running,
    secrets_for,
)

PREFIX = re.compile(rb"^<([0-7])>")
README = REPO / "README.md"
RECIPE_HEAD = "journalctl -u alarm-gateway -o cat"
EXAMPLE_ID = "K7QM-3XRD"


def contact_id_devices() -> list[Device]:
    reg = load_registry(SAMPLE)
    return [d for d in reg.devices.values() if d.scheme == "contact_id"]


def press_frame(device: Device) -> bytes:
    return encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001")


def lines_of(raw: bytes) -> list[tuple[int | None, dict[str, Any] | None, bytes]]:
    """(priority, JSON event, raw line) per line; None where there is none."""
    out = []
    for line in raw.splitlines():
        m = PREFIX.match(line)
        body = line[m.end():] if m else line
        try:
            event = json.loads(body)
        except ValueError:
            event = None
        out.append((int(m.group(1)) if m else None, event if isinstance(event, dict) else None,
                    line))
    return out


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


# -- (1) journald priorities -------------------------------------------------------------


def _log_every_level(path: Path, fmt: Any) -> bytes:
    with path.open("w", encoding="utf-8") as out:
        configure_logging("debug", fmt, out)
        log = structlog.get_logger("ops-test")
        log.debug("d.event")
        log.info("i.event")
        log.warning("w.event")
        log.error("e.event")
        log.critical("c.event")
        out.flush()
    return path.read_bytes()


@pytest.mark.usefixtures("restore_logging")
def test_journald_format_prefixes_each_json_line_with_its_syslog_priority(
    tmp_path: Path
) -> None:
    raw = _log_every_level(tmp_path / "out.log", "journald")
    got = [(prio, ev["event"] if ev else None) for prio, ev, _ in lines_of(raw)]
    assert got == [(7, "d.event"), (6, "i.event"), (4, "w.event"), (3, "e.event"),
                   (2, "c.event")]


@pytest.mark.usefixtures("restore_logging")
def test_stdout_that_is_the_journal_stream_gets_priorities_and_other_streams_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = tmp_path / "journal-stream"
    journal.touch()
    st = journal.stat()
    # What systemd sets for a unit whose stdout is the journal: "<device>:<inode>".
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    for fmt in ("auto", "json"):
        raw = _log_every_level(journal, fmt)
        assert [p for p, _, _ in lines_of(raw)] == [7, 6, 4, 3, 2], fmt
    # A child whose stdout was redirected elsewhere inherits the variable, not the stream.
    raw = _log_every_level(tmp_path / "elsewhere.log", "json")
    parsed = lines_of(raw)
    assert [p for p, _, _ in parsed] == [None] * 5
    assert all(line.startswith(b"{") for _, _, line in parsed)
    # The console format is for people: never a prefix.
    raw = _log_every_level(journal, "console")
    assert raw and not any(PREFIX.match(line) for line in raw.splitlines())


# -- (3) one line per failed start -------------------------------------------------------


def _toml(data: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v), ensure_ascii=False)

    out: list[str] = []
    for section, values in data.items():
        if isinstance(values, list):
            for table in values:
                out.append(f"[[{section}]]")
                out += [f"{k} = {value(v)}" for k, v in table.items()]
            continue
        out.append(f"[{section}]")
        out += [f"{k} = {value(v)}" for k, v in values.items()]
    return "\n".join(out) + "\n"


def daemon_config(tmp_path: Path, *, base_url: str = "http://127.0.0.1:9",
                  **sections: dict[str, Any] | list[dict[str, Any]]) -> Path:
    data: dict[str, Any] = {
        "gateway": {"name": "ops", "state_dir": str(tmp_path / "state"),
                    "shutdown_timeout_s": 3},
        "registry": {"directory": str(SAMPLE), "watch_interval_s": 0},
        "logging": {"format": "journald"},
        "mqtt": {"enabled": False},
        "alert": {"backend": "none"},
        "sms": {"from_number": "+15005550006", "base_url": base_url,
                "request_timeout_s": 2},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            data[name] = {**data.get(name, {}), **values}
        else:
            data[name] = values
    path = tmp_path / "gateway.toml"
    path.write_text(_toml(data), encoding="utf-8")
    return path


def gateway_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TWILIO_", "MQTT_", "CONTROL_", "CREDENTIALS_DIRECTORY",
                                "JOURNAL_STREAM"))}
    return {**env, **extra}


FAKE_TWILIO = {"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "t" * 32}


def run_gateway(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """``gateway run`` with stdout and stderr on a stream it is told is the journal's,
    as systemd does (``$JOURNAL_STREAM`` = the stream's device:inode)."""
    out = config.with_name("journal-stream.log")
    with out.open("wb") as stream:
        st = os.fstat(stream.fileno())
        proc = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
            env={**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stdout=stream,
            stderr=subprocess.STDOUT, timeout=90, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_bytes())


def the_cannot_start_line(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    """The failed start's output must hold exactly one gateway.cannot_start line."""
    parsed = lines_of(proc.stdout)
    found = [(p, ev) for p, ev, _ in parsed if ev and ev.get("event") == "gateway.cannot_start"]
    assert len(found) == 1, proc.stdout.decode(errors="replace")
    (prio, event), = found
    assert prio == 2  # critical: journalctl -p err shows it
    assert b"Traceback" not in proc.stdout  # a typed error: the reason says it all
    # Nothing after it: the start stopped there.
    assert parsed[-1][1] == event
    return event


@pytest.mark.integration
def test_a_broken_registry_is_one_cannot_start_line_and_exit_3(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(SAMPLE, registry)
    devices = registry / "devices.csv"
    devices.write_text(devices.read_text(encoding="utf-8") + "D9999,E-NOBODY,mqtt,x\n",
                       encoding="utf-8")
    config = daemon_config(tmp_path, registry={"directory": str(registry)})
    proc = run_gateway(config, gateway_env(**FAKE_TWILIO))
    assert proc.returncode == 3
    event = the_cannot_start_line(proc)
    assert "devices.csv" in event["reason"] and event["exit_code"] == 3


@pytest.mark.integration
def test_missing_twilio_secrets_are_one_cannot_start_line_and_exit_3(tmp_path: Path) -> None:
    proc = run_gateway(daemon_config(tmp_path), gateway_env())
    assert proc.returncode == 3
    event = the_cannot_start_line(proc)
    assert "TWILIO_AUTH_TOKEN" in event["reason"]
    assert event["error_type"] == "StartupError"


@pytest.mark.integration
def test_a_journal_that_cannot_open_is_one_cannot_start_line_and_exit_3(
    tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.write_text("a file where the state folder should be\n", encoding="utf-8")
    proc = run_gateway(daemon_config(tmp_path), gateway_env(**FAKE_TWILIO))
    assert proc.returncode == 3
    event = the_cannot_start_line(proc)
    assert str(state) in event["reason"]


@pytest.mark.integration
def test_a_control_port_in_use_is_one_cannot_start_line_and_exit_3(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = daemon_config(tmp_path, control={"port": port})
        proc = run_gateway(config, gateway_env(**FAKE_TWILIO, CONTROL_TOKEN="c" * 40))
    assert proc.returncode == 3
    event = the_cannot_start_line(proc)
    assert str(port) in event["reason"] and event["error_type"] == "StartupError"


@pytest.mark.integration
def test_an_invalid_config_file_is_one_cannot_start_line_and_exit_2(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, gateway={"dedupe_window_s": -1})
    proc = run_gateway(config, gateway_env(**FAKE_TWILIO))
    assert proc.returncode == 2
    event = the_cannot_start_line(proc)
    assert str(config) in event["reason"] and "gateway.dedupe_window_s" in event["reason"]


# -- (4) /healthz, (5) metrics -------------------------------------------------------------


def metric(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


@pytest.mark.integration
async def test_healthz_is_503_with_the_reason_while_a_receiver_is_down_then_200(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio, serial=[{
        "name": "rx", "port": pty.path, "protocol": "surgard", "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.1}], alert={"backend": "none"})
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None and gw.notices is not None
        await eventually(gw.serial[0].connected.is_set)
        assert await control(gw, "GET", "/healthz") == (200, {"status": "ok"})
        pty.close()  # the receiver's cable is pulled: receiver.down, critical
        notices = await eventually(gw.journal.open_notices)
        await eventually(lambda: gw.notices is not None and gw.notices.critical)
        status, body = await control(gw, "GET", "/healthz")
        assert status == 503 and body["status"] == "degraded"
        assert any("critical notice sounding: serial:rx" in p for p in body["problems"])
        _, text = await _metrics(gw)
        assert metric(text, "gateway_notices_total", '{kind="receiver.down"}') == 1
        assert await gw.notices.acknowledge(int(notices[0]["id"]), "operator")
        assert await control(gw, "GET", "/healthz") == (200, {"status": "ok"})


async def _metrics(gw: Gateway) -> tuple[int, str]:
    status, text = await control(gw, "GET", "/metrics")
    assert isinstance(text, str)
    return status, text


@pytest.mark.integration
async def test_metrics_count_devices_deliveries_reconnects_and_build(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio, mqtt={"enabled": True, "port": mosquitto.port},
                         alert={"backend": "none"})
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.mqtt is not None and gw.supervisor is not None and gw.dispatcher is not None
        await eventually(gw.mqtt.connected.is_set)
        status, text = await _metrics(gw)
        assert status == 200
        assert metric(text, "gateway_build_info", f'{{version="{build_version()}"}}') == 1
        assert metric(text, "gateway_mqtt_reconnects_total") == 0
        offline, overdue = gw.supervisor.counts()
        assert metric(text, "gateway_devices_offline") == offline
        assert metric(text, "gateway_devices_overdue") == overdue
        assert metric(text, "gateway_intake_crashes_total") == 0
        # A Zigbee2MQTT bridge reports one button unavailable: offline and overdue.
        z2m = next(d for d in load_registry(SAMPLE).devices.values()
                   if d.address.startswith("zigbee2mqtt/"))
        await asyncio.to_thread(mosquitto_publish, mosquitto, f"{z2m.address}/availability",
                                "offline")
        await eventually(lambda: gw.supervisor is not None and gw.supervisor.counts()[0] == 1)
        _, text = await _metrics(gw)
        assert metric(text, "gateway_devices_offline") == 1
        assert metric(text, "gateway_devices_overdue") == overdue + 1
        assert metric(text, "gateway_notices_total", '{kind="device.offline"}') == 1
        # The broker restarts: one reconnect.
        await asyncio.to_thread(mosquitto.restart)
        await eventually(lambda: gw.mqtt is not None and gw.mqtt.reconnects == 1, timeout=20)
        await eventually(gw.mqtt.connected.is_set)
        _, text = await _metrics(gw)
        assert metric(text, "gateway_mqtt_reconnects_total") == 1
        # A press, its SMS, then the carrier's report for one of them.
        await asyncio.to_thread(mosquitto_publish, mosquitto, z2m.address,
                                json.dumps({"action": "emergency"}))
        await eventually(lambda: twilio.messages)
        await gw.dispatcher.wait_idle(timeout=15)
        await gw.dispatcher.on_delivery(twilio.messages[0].sid, "delivered", None)
        await gw.dispatcher.on_delivery(twilio.messages[0].sid, "delivered", None)  # a repeat
        _, text = await _metrics(gw)
        assert metric(text, "gateway_sms_deliveries_total", '{status="delivered"}') == 1



@pytest.mark.integration
async def test_press_to_heard_in_the_center_is_a_metric_for_new_alarms(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble
) -> None:
    """A press over MQTT: the alert player (file backend) announces it and
    ``gateway_press_to_alert_ms`` counts it once, however often it repeats."""
    cfg = gateway_config(tmp_path, twilio, mqtt={"enabled": True, "port": mosquitto.port})
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.mqtt is not None and gw.player is not None
        await eventually(gw.mqtt.connected.is_set)
        _, text = await _metrics(gw)
        assert metric(text, "gateway_press_to_alert_ms_count") == 0
        z2m = next(d for d in load_registry(SAMPLE).devices.values()
                   if d.address.startswith("zigbee2mqtt/"))
        await asyncio.to_thread(mosquitto_publish, mosquitto, z2m.address,
                                json.dumps({"action": "emergency"}))
        [alarm_id] = await eventually(lambda: gw.player is not None and gw.player.active())
        await gw.player.wait_played(alarm_id, 2)  # heard, then repeated
        _, text = await _metrics(gw)
        assert metric(text, "gateway_press_to_alert_ms_count") == 1
        assert (metric(text, "gateway_press_to_alert_ms_bucket", '{le="30000.0"}') or 0) == 1


def mosquitto_publish(mq: Mosquitto, topic: str, payload: str) -> None:
    subprocess.run(["mosquitto_pub", "-h", mq.host, "-p", str(mq.port), "-q", "1",
                    "-t", topic, "-m", payload], check=True, timeout=10)


# -- the whole ops surface on a real gateway's output --------------------------------------


class GatewayProcess:
    """``gateway run`` as systemd would run it, its stdout+stderr in ``log``."""

    def __init__(self, config: Path, env: dict[str, str], log: Path) -> None:
        self.config, self.env, self.log = config, env, log
        argv = [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)]
        setpriv = shutil.which("setpriv")  # if pytest dies, so does the gateway
        if setpriv is not None:
            argv = [setpriv, "--pdeathsig", "KILL", *argv]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [ev for _, ev, _ in lines_of(self.log.read_bytes())
                if ev and (name is None or ev.get("event") == name)]

    async def wait_for(self, name: str, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        def match() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}: "
                                     f"{self.log.read_text(errors='replace')[-3000:]}")
            return next((e for e in self.events(name)
                         if all(e.get(k) == v for k, v in fields.items())), None)

        found: dict[str, Any] = await eventually(match, timeout=timeout)
        return found

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway.cli", *args,
                             "--config", str(self.config)],
            env=self.env, capture_output=True, text=True, timeout=30, check=False)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def readme_recipes() -> list[str]:
    """The README's jq recipes, each without its ``journalctl ...`` head."""
    text = README.read_text(encoding="utf-8")
    recipes = [line[len(RECIPE_HEAD):] for line in text.splitlines()
               if line.startswith(RECIPE_HEAD + " | jq ")]
    assert len(recipes) >= 3
    return recipes


def run_recipe(recipe: str, log: Path, alarm_id: str) -> str:
    """A recipe on ``log`` in place of the journal (the path and the alarm id substituted)."""
    command = f"cat {shlex.quote(str(log))}" + recipe.replace(EXAMPLE_ID, alarm_id)
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def a_traceback() -> str:
    try:
        json.loads("{not json")
    except ValueError:
        return traceback.format_exc()
    raise AssertionError("unreachable")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is installed by scripts/test")
async def test_a_real_gateways_output_serves_journalctl_the_cli_and_the_readme_recipes(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    devices = contact_id_devices()
    first, second = devices[0], devices[1]
    config = daemon_config(
        tmp_path, base_url=twilio.base_url,
        serial=[{"name": "rx1", "port": pty.path, "protocol": "surgard",
                 "heartbeat_interval_s": 1, "heartbeat_missed": 2,
                 "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2}],
        supervision={"check_every_s": 0.2})
    log = tmp_path / "stdout.log"
    env = gateway_env(TWILIO_ACCOUNT_SID=twilio.account_sid,
                      TWILIO_AUTH_TOKEN=twilio.auth_token)
    gw = GatewayProcess(config, env, log)
    try:
        await gw.wait_for("gateway.ready")
        db = tmp_path / "state" / "journal.sqlite3"  # gateway.journal_file's default
        # (7) a manual run creates the journal 0600, and SQLite its -wal and -shm alike.
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            assert mode(path) == 0o600, path

        # A press: received, journaled, texted.
        assert await pty.send(press_frame(first)) == ACK
        received = await gw.wait_for("alarm.received", device_id=first.device_id)
        alarm_id = received["alarm_id"]
        assert received["journaled"] is True and received["new"] is True
        await gw.wait_for("alarm.notified", alarm_id=alarm_id, wave=1)
        # A second press of the same button joins the alarm: the same id, not new.
        assert await pty.send(press_frame(first)) == ACK
        joined = await gw.wait_for("alarm.received", device_id=first.device_id, new=False)
        assert joined["alarm_id"] == alarm_id and joined["presses"] == 2

        # Something that is not JSON reaches the same stream (a library's traceback).
        with log.open("a", encoding="utf-8") as out:
            out.write(a_traceback())

        # No heartbeat from the receiver: receiver.down, critical, sounding.
        down = await gw.wait_for("notice.receiver.down")
        listed = await gw.cli("notices")
        assert listed.returncode == 0, listed.stderr
        notices = json.loads(listed.stdout)
        notice = next(n for n in notices if n["kind"] == "receiver.down")
        at = datetime.fromisoformat(notice["at"])
        assert at.utcoffset() is not None and notice["at"].endswith("+08:00")  # Asia/Shanghai
        assert abs(at.timestamp() - datetime.fromisoformat(
            down["timestamp"].replace("Z", "+00:00")).timestamp()) < 2
        acked = await gw.cli("notice-ack", str(notice["id"]), "--by", "王值班")
        assert acked.returncode == 0, acked.stderr
        assert json.loads(acked.stdout) == {"notice_id": notice["id"],
                                            "acknowledged_by": "王值班"}
        left = json.loads((await gw.cli("notices")).stdout)
        assert notice["id"] not in [n["id"] for n in left]
        assert (await gw.cli("notice-ack", str(notice["id"]))).returncode == 1

        # gateway status: local ISO times, "never seen" for a device not heard from.
        status = await gw.cli("status")
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        alarm = next(a for a in shown["open_alarms"] if a["alarm_id"] == alarm_id)
        assert datetime.fromisoformat(alarm["received_at"]).utcoffset() is not None
        by_id = {d["device_id"]: d for d in shown["devices"]}
        assert by_id[first.device_id]["last_seen"].endswith("+08:00")
        assert by_id[devices[-1].device_id]["last_seen"] == "never seen"

        # Acknowledged: "taken by" to everyone texted, with its own wave's latency.
        ack = await gw.cli("ack", alarm_id, "--by", "张三")
        assert ack.returncode == 0, ack.stderr
        informed = await gw.wait_for("alarm.informed", alarm_id=alarm_id, kind="taken")
        assert informed["sent"] >= 1
        resolved = await gw.cli("resolve", alarm_id, "--by", "张三", "--note", "家属已到场")
        assert resolved.returncode == 0, resolved.stderr
        done = await gw.wait_for("alarm.resolved", alarm_id=alarm_id)
        assert done["by"] == "operator:张三" and done["note"] == "家属已到场"

        # The journal cannot commit (locked past busy_timeout): journal.write_failed,
        # and the press is alarmed from memory under an id of its own.
        lock = JournalLockInThread(db)
        try:
            pty.write(press_frame(second))
            await gw.wait_for("journal.write_failed", timeout=30)
            memory = await gw.wait_for("alarm.received", device_id=second.device_id)
            assert memory["journaled"] is False and memory["alarm_id"]
        finally:
            lock.release()
        # The receiver resends; now it commits and is acknowledged.
        assert await pty.send(press_frame(second), timeout=15) == ACK
        await gw.wait_for("alarm.received", device_id=second.device_id, journaled=True)
    finally:
        rc = gw.stop()
    assert rc == 0

    raw = log.read_bytes()
    parsed = lines_of(raw)
    # (1) every JSON line has its priority; the traceback is there, unparsed.
    json_lines = [(p, ev) for p, ev, _ in parsed if ev is not None]
    assert json_lines and all(p is not None for p, _ in json_lines)
    assert any(line.startswith(b"Traceback") for _, _, line in parsed)
    priority = {ev["event"]: p for p, ev in json_lines if p is not None}
    # journalctl -p err (priority <= 3) shows these:
    assert priority["journal.write_failed"] <= 3
    assert priority["notice.receiver.down"] <= 3
    assert priority["sms.sent"] == 6 and priority["alarm.received"] == 6
    # (2) sms.sent: latency from the press and from its own wave, and the kind.
    sent = [ev for _, ev in json_lines if ev["event"] == "sms.sent"]
    kinds = {ev["kind"] for ev in sent if ev.get("alarm_id") == alarm_id}
    assert {"escalation", "taken"} <= kinds
    for ev in sent:
        assert ev["wave_latency_ms"] >= 0
        if ev["kind"] == "taken":
            # Sent after the acknowledgement: long after the press, not after its wave.
            assert ev["latency_ms"] > ev["wave_latency_ms"]

    # (8) the README's recipes on this very output.
    timeline, table, summary, errors = (run_recipe(r, log, alarm_id) for r in readme_recipes())
    events = [json.loads(line)["event"] for line in timeline.splitlines()]
    assert events[0] == "alarm.received" and "alarm.journaled" in events
    assert events.index("alarm.acknowledged") < events.index("alarm.resolved")
    assert events.count("alarm.received") == 2 and "sms.sent" in events
    rows = [line.split("\t") for line in table.splitlines()]
    assert len(rows) == len(sent) and {r[2] for r in rows} >= {"escalation", "taken"}
    first_wave = sorted(ev["latency_ms"] for ev in sent
                        if ev["kind"] == "escalation" and ev["wave"] == 1)
    figures = json.loads(summary)
    assert figures["n"] == len(first_wave) and figures["max"] == first_wave[-1]
    assert figures["p50"] == first_wave[len(first_wave) // 2]
    error_events = {json.loads(line)["event"] for line in errors.splitlines()}
    assert {"journal.write_failed", "notice.receiver.down"} <= error_events


class JournalLockInThread:
    """Holds SQLite's write lock on the journal (WAL readers still read)."""

    def __init__(self, db: Path) -> None:
        import sqlite3

        self._conn = sqlite3.connect(db, isolation_level=None, timeout=5,
                                     check_same_thread=False)
        self._conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        self._conn.close()
