"""Issue #3: MQTT intake never drops an alarm.

Everything here runs against a real Mosquitto (persistence on, ``max_queued_messages 0``),
the real aiomqtt/paho path of ``devices/mqtt_link.py`` and the real SQLite journal; the
crash tests run ``python -m gateway.cli run`` as a subprocess and SIGKILL it.

The crash window between receipt and commit is made deterministic by holding SQLite's
write lock from the test (``BEGIN IMMEDIATE`` on the journal file): the gateway's
journal writer then waits on ``busy_timeout`` (5 s) and the press sits received but
not committed, hence not acknowledged, for as long as the test needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from structlog.testing import capture_logs

from devices.mqtt_link import deliver_lost_cancel
from devices.mqtt_payloads import encode_own_event
from gateway.daemon import Gateway
from gateway.district import generate
from gateway.model import Device
from gateway.registry import load_registry
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import (
    SAMPLE,
    Mosquitto,
    eventually,
    gateway_config,
    running,
    secrets_for,
)

pytestmark = pytest.mark.integration

DB_NAME = "journal.sqlite3"


# -- helpers ------------------------------------------------------------------------------


def mqtt_devices(directory: Path = SAMPLE) -> list[Device]:
    """Every MQTT button of a registry (Zigbee2MQTT and our own make), by device id."""
    registry = load_registry(directory)
    return sorted((d for d in registry.devices.values() if d.scheme == "mqtt"),
                  key=lambda d: d.device_id)


def press_topic(device: Device) -> str:
    """Where a device publishes a press: Z2M state topic, or ``<base>/event`` for ours."""
    if device.address.startswith("zigbee2mqtt/"):
        return device.address
    return f"{device.address}/event"


def press_payload(device: Device, seq: int) -> bytes:
    """A press carrying ``seq`` so that each one can be found in ``device_messages.raw``."""
    if device.address.startswith("zigbee2mqtt/"):
        return json.dumps({"action": "emergency", "seq": seq}).encode()
    return encode_own_event("sos", seq=seq)


def rows(db: Path, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Read the journal from outside the gateway (read-only; [] before it exists)."""
    if not db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        return []


def journaled_seqs(db: Path) -> list[int]:
    """The ``seq`` of every journaled press, duplicates included."""
    return [json.loads(raw)["seq"] for (raw,) in rows(
        db, "SELECT raw FROM device_messages WHERE kind = 'emergency'")]


class JournalLock:
    """Holds SQLite's write lock on the journal so the gateway's commit waits.

    WAL readers are not blocked, so the test can still look inside while it holds it.
    """

    def __init__(self, db: Path) -> None:
        self._conn = sqlite3.connect(db, isolation_level=None, timeout=5)
        self._conn.execute("BEGIN IMMEDIATE")

    def count(self, sql: str, args: Sequence[Any] = ()) -> int:
        return int(self._conn.execute(sql, args).fetchone()[0])

    def release(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        self._conn.close()


@contextlib.contextmanager
def journal_lock(db: Path) -> Iterator[JournalLock]:
    lock = JournalLock(db)
    try:
        yield lock
    finally:
        lock.release()


@contextlib.asynccontextmanager
async def broker(tmp_path: Path, extra_conf: str = "") -> AsyncIterator[Mosquitto]:
    """A private Mosquitto (the conftest one: persistence on) with extra configuration."""
    mq = Mosquitto(tmp_path / "mosquitto", extra_conf=extra_conf)
    await asyncio.to_thread(mq.start)
    try:
        yield mq
    finally:
        await asyncio.to_thread(mq.stop)


async def publish_all(mq: Mosquitto, messages: Sequence[tuple[str, bytes]],
                      *, window: int = 64) -> None:
    """Publish QoS 1 messages, up to ``window`` awaiting their PUBACK at once."""
    limit = asyncio.Semaphore(window)
    async with aiomqtt.Client(mq.host, mq.port, identifier="intake-test-publisher",
                              max_inflight_messages=window) as client:

        async def one(topic: str, payload: bytes) -> None:
            async with limit:
                await client.publish(topic, payload, qos=1, timeout=30)

        async with asyncio.TaskGroup() as tg:
            for topic, payload in messages:
                tg.create_task(one(topic, payload))


def gateway_task() -> asyncio.Task[None]:
    """The task ``running()`` runs the in-process gateway in."""
    return next(t for t in asyncio.all_tasks() if t.get_name() == "gateway-under-test")


async def while_alive(task: asyncio.Task[None], predicate: Callable[[], Any],
                      timeout: float = 10.0) -> Any:
    """``eventually(predicate)``, failing at once if the gateway's task has ended."""

    def check() -> Any:
        if task.done():
            error = None if task.cancelled() else task.exception()
            raise AssertionError(f"the gateway stopped: {error!r}")
        return predicate()

    return await eventually(check, timeout=timeout)


async def retained(mq: Mosquitto, topic: str, timeout: float = 5.0) -> bytes:
    """The retained message on ``topic``, read by a fresh subscriber."""
    async with aiomqtt.Client(mq.host, mq.port) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                return message.payload
    raise AssertionError("unreachable")


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a gateway config (flat sections of str/int/float/bool values)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v), ensure_ascii=False)

    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def daemon_config(tmp_path: Path, mq: Mosquitto, twilio: TwilioDouble, name: str) -> Path:
    """A config file for ``gateway run``: JSON logs, no sound, SMS to the double."""
    return write_toml(tmp_path / f"{name}.toml", {
        "gateway": {"name": name, "state_dir": str(tmp_path / "state"),
                    "shutdown_timeout_s": 3, "dedupe_window_s": 600},
        "registry": {"directory": str(SAMPLE)},
        "logging": {"format": "json"},
        "mqtt": {"port": mq.port, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.5},
        "alert": {"backend": "none"},
        "sms": {"from_number": "+15005550006", "base_url": twilio.base_url,
                "request_timeout_s": 2},
    })


@dataclass
class Daemon:
    """``python -m gateway.cli run`` as a real process, JSON log lines in ``log``."""

    config: Path
    twilio: TwilioDouble
    log: Path
    proc: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        env = {**os.environ, "TWILIO_ACCOUNT_SID": self.twilio.account_sid,
               "TWILIO_AUTH_TOKEN": self.twilio.auth_token}
        argv = [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config)]
        # setpriv execs the gateway (same pid): if pytest is killed, so is the gateway.
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            argv = [setpriv, "--pdeathsig", "KILL", *argv]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{") and line.endswith("}"):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    found.append(event)
        return found

    async def wait_for(self, name: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        def match() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}: "
                                     f"{self.log.read_text(errors='replace')[-2000:]}")
            return next((e for e in self.events(name)
                         if all(e.get(k) == v for k, v in fields.items())), None)

        found: dict[str, Any] = await eventually(match, timeout=timeout)
        return found

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def broker_log(mq: Mosquitto) -> str:
    return (mq.workdir / "mosquitto.log").read_text(encoding="utf-8", errors="replace")


# -- QoS 1 from many devices --------------------------------------------------------------


async def test_presses_from_every_mqtt_device_are_journaled_exactly_once(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble
) -> None:
    devices = mqtt_devices()
    assert len(devices) >= 60 and any(d.address.startswith("alarm/buttons/") for d in devices)
    cfg = gateway_config(tmp_path, twilio, mqtt={"enabled": True, "port": mosquitto.port},
                         alert={"backend": "none"})
    db = cfg.model.gateway.journal_path
    gw = Gateway(cfg, secrets_for(twilio))
    with capture_logs() as logs:
        async with running(gw):
            assert gw.mqtt is not None and gw.dispatcher is not None
            await eventually(gw.mqtt.connected.is_set)
            await publish_all(mosquitto, [(press_topic(d), press_payload(d, i))
                                          for i, d in enumerate(devices)])
            await eventually(lambda: gw.mqtt is not None and gw.mqtt.acked >= len(devices))
            await gw.dispatcher.wait_idle(timeout=20)
            # Every message was received and acknowledged once. Nothing more can arrive:
            # the broker redelivers a QoS 1 message only on a new connection of the
            # session, and the link connected once and never dropped.
            assert gw.mqtt.received == gw.mqtt.acked == len(devices)
            events = [e["event"] for e in logs]
            assert events.count("mqtt.connected") == 1
            assert "mqtt.disconnected" not in events
    per_device = dict(rows(db, "SELECT device_id, COUNT(*) FROM alarms GROUP BY device_id"))
    assert per_device == {d.device_id: 1 for d in devices}
    assert rows(db, "SELECT SUM(presses) FROM alarms") == [(len(devices),)]
    messages = rows(db, "SELECT device_id, COUNT(*) FROM device_messages GROUP BY device_id")
    assert dict(messages) == {d.device_id: 1 for d in devices}
    assert sorted(journaled_seqs(db)) == list(range(len(devices)))


# -- the MQTT connection drops while a press waits for its commit -------------------------


async def test_connection_lost_while_a_press_is_being_journaled_still_dispatches_it(
    tmp_path: Path, twilio: TwilioDouble
) -> None:
    """Regression: handlers used to live in a per-connection TaskGroup. A disconnect
    cancelled the press mid-intake (journaled, never dispatched; its redelivery only
    joined) and, on Python 3.11, the wrapped MqttError killed the whole gateway."""
    async with broker(tmp_path) as mq:
        cfg = gateway_config(tmp_path, twilio, mqtt={"enabled": True, "port": mq.port},
                             alert={"backend": "none"})
        db = cfg.model.gateway.journal_path
        gw = Gateway(cfg, secrets_for(twilio))
        device = mqtt_devices()[0]
        with capture_logs() as logs:
            async with running(gw):
                link, dispatcher = gw.mqtt, gw.dispatcher
                assert link is not None and dispatcher is not None
                await eventually(link.connected.is_set)
                task = gateway_task()
                with journal_lock(db):
                    await publish_all(mq, [(press_topic(device), press_payload(device, 1))])
                    await eventually(lambda: any(e["event"] == "press.received" for e in logs))
                    # The broker goes away while the commit waits for the lock.
                    await asyncio.to_thread(mq.stop)
                    await while_alive(task, lambda: not link.connected.is_set())
                await asyncio.to_thread(mq.start)
                # The first copy's PUBACK died with the connection: the restarted broker
                # redelivers it to the persistent session and it joins the alarm.
                await while_alive(task, lambda: rows(
                    db, "SELECT presses FROM alarms WHERE device_id = ?",
                    (device.device_id,)) == [(2,)])
                alarm_id = rows(db, "SELECT alarm_id FROM alarms")[0][0]
                # The alarm must be dispatched: alerting, SMS to the family.
                await while_alive(task, lambda: alarm_id in dispatcher.active, timeout=5)
                await dispatcher.wait_idle(timeout=15)
                assert twilio.messages and all(alarm_id in m.body for m in twilio.messages)


# -- kill -9 between receipt and commit ---------------------------------------------------


@pytest.mark.slow
async def test_sigkill_between_receipt_and_commit_is_redelivered_and_journaled_once(
    tmp_path: Path, twilio: TwilioDouble, daemons: list[Daemon]
) -> None:
    # log_type all: the broker's log shows every PUBACK it receives from the gateway.
    async with broker(tmp_path, extra_conf="log_type all\n") as mq:
        name = "intake-kill"
        client_id = f"gw-{name}"
        config = daemon_config(tmp_path, mq, twilio, name)
        db = tmp_path / "state" / DB_NAME
        device = mqtt_devices()[3]
        first = Daemon(config, twilio, tmp_path / "first.log")
        daemons.append(first)
        await first.wait_for("mqtt.connected")
        with journal_lock(db) as lock:
            await publish_all(mq, [(press_topic(device), press_payload(device, 7))])
            await first.wait_for("press.received", device_id=device.device_id)
            # Received, and its commit is waiting for our lock: kill it now.
            first.kill()
            assert first.events("alarm.journaled") == []
            assert first.events("journal.write_failed") == []
            assert lock.count("SELECT COUNT(*) FROM alarms") == 0
        log = broker_log(mq)
        assert f"Sending PUBLISH to {client_id} (d0, q1" in log
        assert f"Received PUBACK from {client_id}" not in log  # never acknowledged
        assert rows(db, "SELECT COUNT(*) FROM device_messages") == [(0,)]

        second = Daemon(config, twilio, tmp_path / "second.log")
        daemons.append(second)
        journaled = await second.wait_for("alarm.journaled", device_id=device.device_id)
        # The broker redelivered the un-acknowledged message to the same session (DUP set),
        # and got its PUBACK only now, after the commit.
        await eventually(lambda: f"Received PUBACK from {client_id}" in broker_log(mq))
        log = broker_log(mq)
        assert log.count(f"Sending PUBLISH to {client_id} (d1, q1") == 1
        # The broker has its PUBACK, and a redelivery needs a new connection of the
        # session: the second gateway connected once, so no second delivery can come.
        assert len(second.events("mqtt.connected")) == 1
        assert second.events("mqtt.disconnected") == []
        assert rows(db, "SELECT alarm_id, device_id, presses FROM alarms") == [
            (journaled["alarm_id"], device.device_id, 1)]
        assert journaled_seqs(db) == [7]
        assert second.events("alarm.joined") == []
        assert broker_log(mq).count(f"Received PUBACK from {client_id}") == 1


# -- retained gateway status --------------------------------------------------------------


@pytest.mark.slow
async def test_retained_status_is_online_while_running_and_offline_after_sigkill(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble, daemons: list[Daemon]
) -> None:
    name = "intake-status"
    topic = f"alarm/gateway/{name}/status"
    gw = Daemon(daemon_config(tmp_path, mosquitto, twilio, name), twilio, tmp_path / "gw.log")
    daemons.append(gw)
    await gw.wait_for("mqtt.connected")
    assert await retained(mosquitto, topic) == b"online"
    gw.kill()

    async def offline() -> bool:
        return await retained(mosquitto, topic, timeout=2) == b"offline"

    # No goodbye was sent: the broker publishes the will, retained, when the socket dies.
    assert await eventually(offline, timeout=10)


# -- broker restart mid-stream ------------------------------------------------------------


@dataclass
class Fleet:
    """The device side: QoS 1 presses, each retried on a new connection until PUBACKed."""

    mq: Mosquitto
    presses: list[tuple[int, str, bytes]]
    confirmed: list[int] = field(default_factory=list)
    reconnects: int = 0

    async def run(self, pace_s: float) -> None:
        i = 0
        while i < len(self.presses):
            try:
                async with aiomqtt.Client(self.mq.host, self.mq.port, identifier="fleet",
                                          timeout=1) as client:
                    while i < len(self.presses):
                        seq, topic, payload = self.presses[i]
                        await client.publish(topic, payload, qos=1, timeout=1)
                        self.confirmed.append(seq)
                        i += 1
                        await asyncio.sleep(pace_s)
            except aiomqtt.MqttError:
                self.reconnects += 1  # unconfirmed: the same press goes out again
                await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_broker_restart_mid_stream_loses_no_confirmed_press(
    tmp_path: Path, twilio: TwilioDouble
) -> None:
    """Every press the broker confirmed to a device is journaled, across a restart of
    the broker that finds confirmed presses still queued for the gateway."""
    devices = mqtt_devices()
    presses = [(seq, press_topic(d), press_payload(d, seq))
               for seq, d in enumerate(devices[i % len(devices)] for i in range(300))]
    async with broker(tmp_path) as mq:
        cfg = gateway_config(tmp_path, twilio, mqtt={"enabled": True, "port": mq.port},
                             alert={"backend": "none"}, gateway={"dedupe_window_s": 3600})
        db = cfg.model.gateway.journal_path
        gw = Gateway(cfg, secrets_for(twilio))
        fleet = Fleet(mq, presses)
        with capture_logs() as logs:
            async with running(gw):
                assert gw.mqtt is not None and gw.dispatcher is not None
                await eventually(gw.mqtt.connected.is_set)
                task = gateway_task()
                publishing = asyncio.create_task(fleet.run(pace_s=0.003))
                await eventually(lambda: len(fleet.confirmed) >= 100)
                # Hold the commits so that, when the broker stops, presses it confirmed
                # to the devices are still queued or unacknowledged for the gateway.
                with journal_lock(db) as lock:
                    held_at = len(fleet.confirmed)
                    await eventually(lambda: len(fleet.confirmed) >= held_at + 50)
                    await asyncio.to_thread(mq.restart)
                    backlog = len(fleet.confirmed) - lock.count(
                        "SELECT COUNT(*) FROM device_messages")
                await asyncio.wait_for(publishing, 60)
                await while_alive(task, lambda: set(fleet.confirmed) <= set(journaled_seqs(db)),
                                  timeout=20)
                await gw.dispatcher.wait_idle(timeout=20)
        log = broker_log(mq)
    assert fleet.reconnects >= 1  # the restart really hit the stream
    assert backlog >= 50  # ... with confirmed presses not yet journaled
    assert "Saving in-memory database" in log and "Error saving" not in log
    events = [e["event"] for e in logs]
    assert events.count("mqtt.connected") >= 2 and "mqtt.disconnected" in events
    seqs = journaled_seqs(db)
    assert sorted(set(fleet.confirmed)) == list(range(len(presses)))
    assert set(seqs) == set(fleet.confirmed)
    # Redelivery and device retries may bring a press twice; it then joins its alarm.
    assert rows(db, "SELECT SUM(presses) FROM alarms") == [(len(seqs),)]
    per_device = dict(rows(db, "SELECT device_id, COUNT(*) FROM alarms GROUP BY device_id"))
    assert per_device == {d.device_id: 1 for d in devices}


# -- burst: 5,000 presses from 500 devices ------------------------------------------------


@pytest.mark.slow
async def test_burst_of_5000_presses_from_500_devices_is_journaled_without_loss(
    tmp_path: Path, mosquitto: Mosquitto, twilio: TwilioDouble
) -> None:
    registry_dir = tmp_path / "registry"
    # 720 elders: 20 % Contact ID, 10 % phones, the remaining 504 are MQTT buttons.
    generate(registry_dir, elders=720, responders=300, seed=3, width_km=5.0,
             height_km=4.5, area_name="垦利区")
    devices = mqtt_devices(registry_dir)[:500]
    assert len(devices) == 500
    per_device = 10
    messages = [(press_topic(d), press_payload(d, seq))
                for seq, d in enumerate(d for d in devices for _ in range(per_device))]
    # Interleaved, so that presses of one device are in flight together.
    messages = messages[0::2] + messages[1::2]
    cfg = gateway_config(
        tmp_path, twilio,
        gateway={"dedupe_window_s": 3600},  # the ten presses of a device join one alarm
        registry={"directory": str(registry_dir)},
        mqtt={"enabled": True, "port": mosquitto.port},
        alert={"backend": "none", "repeat_interval_s": 600},
        sms={"concurrency": 64},
    )
    db = cfg.model.gateway.journal_path
    gw = Gateway(cfg, secrets_for(twilio))
    # Log events are kept as dicts, not rendered: ~30,000 console lines would dominate.
    with capture_logs() as logs:
        async with running(gw):
            assert gw.mqtt is not None and gw.dispatcher is not None and gw.journal is not None
            await eventually(gw.mqtt.connected.is_set)
            await publish_all(mosquitto, messages, window=200)
            await eventually(lambda: gw.mqtt is not None and gw.mqtt.acked >= len(messages),
                             timeout=60)
            await gw.dispatcher.wait_idle(timeout=60)
            assert gw.mqtt.received == gw.mqtt.acked == len(messages)
            group_commits = gw.journal.commits
    events = [e["event"] for e in logs]
    assert events.count("alarm.journaled") == 500
    assert events.count("alarm.joined") == len(messages) - 500
    assert rows(db, "SELECT COUNT(*) FROM device_messages WHERE kind = 'emergency'") == [
        (len(messages),)]
    assert sorted(journaled_seqs(db)) == list(range(len(messages)))
    assert rows(db, "SELECT COUNT(*), SUM(presses) FROM alarms") == [(500, len(messages))]
    assert dict(rows(db, "SELECT device_id, presses FROM alarms")) == {
        d.device_id: per_device for d in devices}
    # Not one alarm ignored: every one reached the family and staff.
    assert rows(db, "SELECT state, COUNT(*) FROM alarms GROUP BY state") == [("notified", 500)]
    assert group_commits < len(messages)  # the storm shared commits


async def test_a_cancel_that_wait_for_swallowed_is_delivered() -> None:
    """aiomqtt's publish and subscribe await the broker's ack with asyncio.wait_for; on
    Python 3.11 an ack landing in the loop iteration of a cancel loses the cancel
    (gh-86296), and the gateway's state publisher went on waiting: a stop that hung."""
    acked = asyncio.Event()
    went_on = asyncio.Event()  # a round finished: the publisher did not stop
    rounds = 0

    async def publisher(check: bool) -> None:
        nonlocal rounds
        while True:
            await asyncio.wait_for(acked.wait(), timeout=5)  # as aiomqtt waits for PUBACK
            if check:
                deliver_lost_cancel()
            rounds += 1
            went_on.set()
            acked.clear()

    for check in (False, True):
        rounds = 0
        task = asyncio.create_task(publisher(check))
        await asyncio.sleep(0)  # now waiting for the ack
        acked.set()
        task.cancel()  # the ack and the stop in one loop iteration
        if check:
            await asyncio.wait({task}, timeout=5)
            assert task.cancelled() and rounds == 0
        else:
            # Without the check, Python 3.11 loses the cancel (later versions do not).
            if sys.version_info < (3, 12):
                # The lost cancel shows as a finished round: the publisher went on to
                # wait for an ack that never comes instead of stopping.
                await asyncio.wait_for(went_on.wait(), timeout=5)
                assert rounds == 1
                assert not task.done()
            task.cancel()
            await asyncio.wait({task}, timeout=1)
            assert task.done()
