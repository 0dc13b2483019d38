"""The shipped broker configuration (config/mosquitto.conf, config/mosquitto.acl) works.

Mosquitto is started with the shipped files themselves, only host paths moved into
tmp and ports made ephemeral: first the whole file (both listeners, TLS with a CA
made here by openssl), then the shipped non-listener settings with one plain loopback
listener, against which devices, the gateway user and anonymous clients connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shutil
import sqlite3
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from structlog.testing import capture_logs

from devices.mqtt_payloads import MqttDecoder, encode_own_event
from gateway.broker import render_acl
from gateway.config import Secrets
from gateway.daemon import Gateway
from gateway.model import Device, ResponderRole
from gateway.registry import load_registry
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import REPO, SAMPLE, eventually, free_port, gateway_config, running, wait_port
from tests.support.procs import end_process

pytestmark = pytest.mark.integration

SHIPPED_CONF = REPO / "config" / "mosquitto.conf"
SHIPPED_ACL = REPO / "config" / "mosquitto.acl"
GATEWAY_USER = "gateway"
Z2M_USER = "zigbee2mqtt"
# Per-listener options: they belong to the listener line above them.
LISTENER_OPTIONS = {"cafile", "capath", "certfile", "keyfile", "tls_version",
                    "require_certificate", "use_identity_as_username", "ciphers", "protocol"}
PATH_OPTIONS = {"persistence_location", "password_file", "acl_file", "cafile", "certfile",
                "keyfile"}


def settings(text: str) -> list[tuple[str, str]]:
    """(option, value) pairs of a Mosquitto config, comments and blank lines dropped."""
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            option, _, value = line.partition(" ")
            pairs.append((option, value.strip()))
    return pairs


def denied_in_log(broker: Broker, topic: str) -> bool:
    """Mosquitto logged that it refused a publish on ``topic`` (needs log_type all)."""
    return re.search(rf"Denied PUBLISH from \S+ \(.*'{re.escape(topic)}'", broker.log) is not None


def phones() -> list[str]:
    """Two on-duty grid leaders of the sample district (their phones log in by id)."""
    registry = load_registry(SAMPLE)
    return sorted(r.responder_id for r in registry.responders.values()
                  if r.on_duty and r.role is ResponderRole.GRID_LEADER)[:2]


def own_buttons() -> list[Device]:
    registry = load_registry(SAMPLE)
    return sorted((d for d in registry.devices.values()
                   if d.address.startswith("alarm/buttons/")), key=lambda d: d.device_id)


@dataclass
class Broker:
    """Mosquitto running a config written into ``workdir``; credentials by user."""

    workdir: Path
    passwords: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        return (self.workdir / "mosquitto.log").read_text(encoding="utf-8", errors="replace")

    def start(self, conf: str, ports: list[int]) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        path = self.workdir / "mosquitto.conf"
        path.write_text(conf, encoding="utf-8")
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen([binary, "-c", str(path)], stdout=log, stderr=log)
        for port in ports:
            try:
                wait_port(port)
            except TimeoutError:
                self.stop()
                raise AssertionError(f"mosquitto did not start:\n{self.log}") from None

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None


def prepare(workdir: Path, devices: list[Device]) -> Broker:
    """The ACL as deployed (the shipped template of roles plus one block per own button
    and phone, `gateway broker-acl`), a password file for the gateway, the bridge and
    devices."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir()
    (workdir / "alarm.acl").write_text(
        render_acl(load_registry(SAMPLE), SHIPPED_ACL.read_text(encoding="utf-8")),
        encoding="utf-8")
    passwords = {GATEWAY_USER: "gw-secret", Z2M_USER: "z2m-secret"}
    passwords |= {d.device_id: f"pw-{d.device_id.lower()}" for d in devices}
    passwords |= {rid: f"pw-{rid.lower()}" for rid in phones()}
    binary = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    passwd = workdir / "alarm.passwd"
    for i, (user, password) in enumerate(passwords.items()):
        flags = ["-b", "-c"] if i == 0 else ["-b"]
        subprocess.run([binary, *flags, str(passwd), user, password], check=True,
                       capture_output=True)
    return Broker(workdir, passwords)


def rewritten(workdir: Path, ports: Iterator[int], *, listeners: bool) -> tuple[str, list[int]]:
    """The shipped config with paths in ``workdir``; ``listeners`` keeps the shipped ones
    (ephemeral ports, loopback) or replaces them by a single plain loopback listener."""
    paths = {
        "persistence_location": f"{workdir / 'data'}/",
        "password_file": str(workdir / "alarm.passwd"),
        "acl_file": str(workdir / "alarm.acl"),
        "cafile": str(workdir / "ca.crt"),
        "certfile": str(workdir / "broker.crt"),
        "keyfile": str(workdir / "broker.key"),
    }
    # Started as root, Mosquitto would drop to its own user and could not read tmp.
    lines = [f"user {pwd.getpwuid(os.geteuid()).pw_name}"]
    used: list[int] = []
    for option, value in settings(SHIPPED_CONF.read_text(encoding="utf-8")):
        if option == "listener":
            if not listeners:
                continue
            used.append(next(ports))
            lines.append(f"listener {used[-1]} 127.0.0.1")
            continue
        if option in LISTENER_OPTIONS and not listeners:
            continue
        lines.append(f"{option} {paths[option] if option in PATH_OPTIONS else value}")
    if not listeners:
        # Debug logging shows every denial, so tests can tell "denied" from "lost".
        lines += ["log_type all", f"listener {next(ports)} 127.0.0.1"]
        used.append(int(lines[-1].split()[1]))
    return "\n".join(lines) + "\n", used


def make_certificates(workdir: Path) -> None:
    """A throw-away CA and a broker certificate for 127.0.0.1 (EC keys: fast)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=workdir)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=alarm test CA")
    run("req", *ec, "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=127.0.0.1")
    (workdir / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "broker.crt", "-days", "1", "-extfile", "san.ext")


def ports() -> Iterator[int]:
    while True:
        yield free_port()


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[tuple[Broker, int]]:
    """The shipped settings and ACL behind one plain loopback listener."""
    broker = prepare(tmp_path / "broker", own_buttons()[:2])
    conf, used = rewritten(broker.workdir, ports(), listeners=False)
    broker.start(conf, used)
    try:
        yield broker, used[0]
    finally:
        broker.stop()


# -- the shipped file -----------------------------------------------------------------


def test_shipped_config_keeps_the_settings_that_make_intake_lossless() -> None:
    shipped = settings(SHIPPED_CONF.read_text(encoding="utf-8"))
    options = dict(shipped)
    assert options["persistence"] == "true"
    assert options["max_queued_messages"] == "0"  # the default 1000 drops QoS 1 alarms
    assert int(options["max_queued_bytes"]) > 0  # memory per client is bounded
    assert options["allow_anonymous"] == "false"
    assert options["password_file"] and options["acl_file"]
    listeners = [value for option, value in shipped if option == "listener"]
    assert listeners == ["1883 127.0.0.1", "8883"]
    # Every option after the network listener is TLS for that listener.
    tail = [option for option, _ in shipped[shipped.index(("listener", "8883")) + 1:]]
    assert {"cafile", "certfile", "keyfile"} <= set(tail) <= LISTENER_OPTIONS


@pytest.mark.slow
async def test_shipped_config_starts_as_is_with_both_listeners_and_tls(
    tmp_path: Path,
) -> None:
    device = own_buttons()[0]
    broker = prepare(tmp_path / "broker", [device])
    make_certificates(broker.workdir)
    conf, (plain, tls) = rewritten(broker.workdir, ports(), listeners=True)
    # Nothing but paths and ports differ from the shipped file.
    assert len(settings(conf)) == len(settings(SHIPPED_CONF.read_text(encoding="utf-8"))) + 1
    broker.start(conf, [plain, tls])
    try:
        assert "Error" not in broker.log
        assert re.search(rf"Opening ipv4 listen socket on port {tls}", broker.log)
        context = ssl.create_default_context(cafile=str(broker.workdir / "ca.crt"))
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # what the listener pins
        received: list[bytes] = []
        async with (
            aiomqtt.Client("127.0.0.1", plain, identifier="gw", username=GATEWAY_USER,
                           password=broker.passwords[GATEWAY_USER]) as gateway,
            aiomqtt.Client("127.0.0.1", tls, identifier=device.device_id,
                           username=device.device_id,
                           password=broker.passwords[device.device_id],
                           tls_context=context) as button,
        ):
            await gateway.subscribe("alarm/buttons/+/event", qos=1)
            await button.publish(f"{device.address}/event", encode_own_event("sos", seq=1),
                                 qos=1)
            async with asyncio.timeout(5):
                async for message in gateway.messages:
                    assert isinstance(message.payload, bytes)
                    received.append(message.payload)
                    break
        assert received == [encode_own_event("sos", seq=1)]
        # The network listener is TLS only: a plain MQTT client gets nowhere.
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", tls, username=device.device_id,
                                      password=broker.passwords[device.device_id], timeout=2):
                pass
    finally:
        broker.stop()


# -- the ACL ------------------------------------------------------------------------------


async def test_a_device_reaches_the_gateway_on_its_own_topic_only_mqtt311(
    acl_broker: tuple[Broker, int],
) -> None:
    broker, port = acl_broker
    mine, other = own_buttons()[:2]
    received: list[tuple[str, bytes]] = []
    async with aiomqtt.Client("127.0.0.1", port, identifier="gw", username=GATEWAY_USER,
                              password=broker.passwords[GATEWAY_USER]) as gateway:
        await gateway.subscribe("alarm/buttons/+/event", qos=1)
        await denied_publish(port, mine, broker.passwords[mine.device_id],
                             f"{other.address}/event", encode_own_event("sos", seq=1))
        async with aiomqtt.Client("127.0.0.1", port, username=mine.device_id,
                                  password=broker.passwords[mine.device_id]) as button:
            await button.publish(f"{mine.address}/event", encode_own_event("sos", seq=2), qos=1)
        async with asyncio.timeout(5):
            async for message in gateway.messages:
                assert isinstance(message.payload, bytes)
                received.append((message.topic.value, message.payload))
                break
        # The second publish came through; the first, published before it, never will:
        # the broker logged that it refused it (and refusals are final).
        await eventually(lambda: denied_in_log(broker, f"{other.address}/event"), timeout=5)
        assert len(gateway.messages) == 0
    assert received == [(f"{mine.address}/event", encode_own_event("sos", seq=2))]


async def denied_publish(port: int, device: Device, password: str, topic: str,
                         payload: bytes) -> None:
    """A QoS 1 publish the ACL refuses, on a connection of its own.

    MQTT 3.1.1 cannot say "denied". Mosquitto 2.0.11 answers with a PUBACK that
    carries reason code 0x87 anyway (a 3.1.1 PUBACK has no such byte) and the
    connection then drops (paho: "Unspecified error"); the message is discarded.
    """
    with contextlib.suppress(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", port, username=device.device_id,
                                  password=password, timeout=5) as button:
            await button.publish(topic, payload, qos=1)


def test_a_device_publishing_on_another_devices_topic_gets_0x87_with_mqtt5(
    acl_broker: tuple[Broker, int],
) -> None:
    broker, port = acl_broker
    mine, other = own_buttons()[:2]
    outcomes: dict[int, int] = {}
    done = threading.Event()

    def on_publish(client: paho.Client, userdata: object, mid: int,
                   reason: ReasonCode, properties: object) -> None:
        outcomes[mid] = reason.value
        if len(outcomes) == 2:
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=mine.device_id,
                         protocol=paho.MQTTv5)
    client.username_pw_set(mine.device_id, broker.passwords[mine.device_id])
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        denied = client.publish(f"{other.address}/event", encode_own_event("sos"), qos=1)
        allowed = client.publish(f"{mine.address}/event", encode_own_event("sos"), qos=1)
        assert done.wait(5), f"no PUBACKs: {outcomes}"
    finally:
        client.disconnect()
        client.loop_stop()
    # 0x87 Not authorized; the connection survives it, and the next publish is taken
    # (0x10 No matching subscribers: nobody listens in this test).
    assert outcomes[denied.mid] == 0x87
    assert outcomes[allowed.mid] in (0x00, 0x10)  # taken (0x10: nobody subscribed yet)
    assert denied_in_log(broker, f"{other.address}/event")


@pytest.mark.parametrize(("username", "password"), [
    (None, None), (GATEWAY_USER, "wrong"), ("D9999", "pw-d9999"),
])
async def test_anonymous_and_unknown_credentials_are_refused(
    acl_broker: tuple[Broker, int], username: str | None, password: str | None
) -> None:
    _, port = acl_broker
    with pytest.raises(aiomqtt.MqttError, match=r"[Nn]ot authori[sz]ed|code:(5|135)"):
        async with aiomqtt.Client("127.0.0.1", port, username=username, password=password,
                                  timeout=5):
            pass


# -- the gateway itself behind the shipped ACL --------------------------------------------


async def test_the_gateway_user_may_do_what_the_gateway_does(
    tmp_path: Path, acl_broker: tuple[Broker, int], twilio: TwilioDouble
) -> None:
    broker, port = acl_broker
    mine, other = own_buttons()[:2]
    z2m = next(d for d in load_registry(SAMPLE).devices.values()
               if d.address.startswith("zigbee2mqtt/"))
    cfg = gateway_config(tmp_path, twilio, alert={"backend": "none"},
                         mqtt={"enabled": True, "port": port, "username": GATEWAY_USER})
    secrets = Secrets(twilio.account_sid, twilio.auth_token, broker.passwords[GATEWAY_USER])
    gw = Gateway(cfg, secrets)
    async with running(gw):
        assert gw.mqtt is not None and gw.journal is not None
        await eventually(gw.mqtt.connected.is_set)
        await denied_publish(port, mine, broker.passwords[mine.device_id],
                             f"{other.address}/event", encode_own_event("sos"))
        async with (
            aiomqtt.Client("127.0.0.1", port, username=mine.device_id,
                           password=broker.passwords[mine.device_id]) as button,
            aiomqtt.Client("127.0.0.1", port, username=Z2M_USER,
                           password=broker.passwords[Z2M_USER]) as bridge,
        ):
            # Our own button sees the gateway's confirmation of its press (end to end:
            # journaled), on its own confirmation topic, which the ACL lets it read.
            await button.subscribe(f"{mine.address}/confirm", qos=1)
            await button.publish(f"{mine.address}/event", encode_own_event("sos", seq=7),
                                 qos=1)
            await bridge.publish(z2m.address, b'{"action":"emergency"}', qos=1)
            async with asyncio.timeout(10):
                async for message in button.messages:
                    assert message.topic.value == f"{mine.address}/confirm"
                    confirm = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                    assert confirm["digest"]
                    if confirm.get("seq") == 7:  # an earlier press's confirm may come first
                        break
        alarms = await eventually(lambda: _alarm_devices(gw), timeout=10)
        # Both allowed presses are journaled and the broker logged its refusal of the one
        # on another device's topic: the press on it can never make a third alarm.
        await eventually(lambda: denied_in_log(broker, f"{other.address}/event"), timeout=5)
        assert _alarm_devices(gw) == alarms == {mine.device_id, z2m.device_id}
        # Every subscription was granted QoS 1 (a refused one shows 128 in the log and
        # would leave the gateway deaf to those devices) and its status was allowed.
        granted = re.findall(r"^\d+: gw-test (\d+) (\S+)$", broker.log, re.M)
        expected = {*MqttDecoder().subscriptions(), "responders/+/location",
                    "responders/+/duty", "responders/+/ack"}
        assert expected <= {topic for _, topic in granted}
        assert {qos for qos, _ in granted} == {"1"}
        assert "Denied PUBLISH from gw-test" not in broker.log
        async with aiomqtt.Client("127.0.0.1", port, username=GATEWAY_USER,
                                  password=broker.passwords[GATEWAY_USER]) as watcher:
            await watcher.subscribe("alarm/gateway/test/status", qos=1)
            async with asyncio.timeout(5):
                async for message in watcher.messages:
                    assert message.payload == b"online"
                    break


def _alarm_devices(gw: Gateway) -> set[str] | None:
    """Devices with an alarm in the journal, once two exist; None before."""
    db = gw.config.model.gateway.journal_path
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        found = {row[0] for row in conn.execute("SELECT device_id FROM alarms")}
    return found if len(found) >= 2 else None


async def test_a_staff_phone_changes_its_own_shift_and_acks_as_itself_only(
    tmp_path: Path, acl_broker: tuple[Broker, int], twilio: TwilioDouble
) -> None:
    broker, port = acl_broker
    me, colleague = phones()
    button = own_buttons()[0]
    cfg = gateway_config(tmp_path, twilio, alert={"backend": "none"},
                         mqtt={"enabled": True, "port": port, "username": GATEWAY_USER})
    secrets = Secrets(twilio.account_sid, twilio.auth_token, broker.passwords[GATEWAY_USER])
    gw = Gateway(cfg, secrets)
    with capture_logs() as logs:
        async with running(gw):
            await _shift_and_ack(gw, broker, port, me, colleague, button)
    # The malformed commands were rejected like any malformed device input: logged and
    # journaled with the topic they came on (and acknowledged, so they never stall intake).
    malformed = {e["source"] for e in logs if e["event"] == "device.malformed"}
    assert {f"mqtt:responders/{me}/duty", f"mqtt:responders/{me}/ack"} <= malformed


async def _shift_and_ack(gw: Gateway, broker: Broker, port: int, me: str, colleague: str,
                         button: Device) -> None:
    assert gw.mqtt is not None and gw.journal is not None and gw.registry is not None
    journal = gw.journal
    await eventually(gw.mqtt.connected.is_set)
    async with aiomqtt.Client("127.0.0.1", port, username=me,
                              password=broker.passwords[me]) as phone:
        # Ending a shift, retained (a restarted gateway gets it again) ...
        await phone.publish(f"responders/{me}/duty", b'{"on_duty": false}', qos=1,
                            retain=True)
        await eventually(lambda: not on_duty(gw, me))
        # ... and malformed or oversized commands are logged and ignored.
        await phone.publish(f"responders/{me}/duty", b'{"on_duty": "yes"}', qos=1)
        await phone.publish(f"responders/{me}/ack", b"x" * 5000, qos=1)
    # Speaking for a colleague is refused by the broker.
    with contextlib.suppress(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", port, username=me,
                                  password=broker.passwords[me], timeout=5) as phone:
            await phone.publish(f"responders/{colleague}/duty", b'{"on_duty": false}',
                                qos=1)
    assert denied_in_log(broker, f"responders/{colleague}/duty")
    assert on_duty(gw, colleague)

    async with aiomqtt.Client("127.0.0.1", port, username=button.device_id,
                              password=broker.passwords[button.device_id]) as device:
        await device.publish(f"{button.address}/event", encode_own_event("sos"), qos=1)
    alarm = (await eventually(journal.open_alarms))[0]
    async with aiomqtt.Client("127.0.0.1", port, username=me,
                              password=broker.passwords[me]) as phone:
        body = json.dumps({"alarm_id": alarm.alarm_id}).encode()
        await phone.publish(f"responders/{me}/ack", body, qos=1)

    async def acknowledged_by() -> str | None:
        return (await journal.get_alarm(alarm.alarm_id)).acknowledged_by

    assert await eventually(acknowledged_by) == f"app:{gw.registry.responders[me].name}"


def on_duty(gw: Gateway, responder_id: str) -> bool:
    """Whether the gateway's geo index counts the responder as on duty."""
    assert gw.geo is not None
    return gw.geo.is_on_duty(responder_id) is True
