"""Drills and line tests: presses made on purpose, checked by reading them back.

A **drill** (:func:`run_drill`, ``gateway simulate press --device D``) is published by
the broker's drill login on ``alarm/drills/<device>/event`` (``devices/drills.py``), for
a device of any make. The gateway journals it as an alarm marked as a drill: it sounds
in the center (announced as a drill), is kept out of the daily figures and texts only
the people the drill names (``--notify``), or nobody (a dry run, the default). The drill
succeeds only when the gateway says it journaled it: its confirmation on
``alarm/drills/<device>/confirm``, then the alarm read back through the control API
(``GET /drills/<drill id>``). Anything less is a failure with its reason: the broker
refused the login, or took the publish and the gateway never journaled it (the ACL
denies it: Mosquitto answers a denied MQTT 3.1.1 publish like an accepted one), or the
gateway is not reachable.

A **line test** (:func:`line_test`, ``--port TTY --live``) writes what the device itself
sends to a serial line wired to the gateway's (a Sur-Gard receiver line, waiting for the
gateway's ACK; or the modem's caller-ID block): it tests the cable and the receiver
path, and what it raises is a **real** alarm (a Contact ID frame cannot say "drill"), read
back as the device's open alarm.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import serial
from serial_asyncio_fast import open_serial_connection

from devices.callerid import encode_callerid_block
from devices.contact_id import DEFAULT_EVENT_KINDS
from devices.drills import DRILL_BASE, DRILL_SCHEMA_VERSION, encode_drill
from devices.events import AddressScheme, Qualifier
from devices.mqtt_payloads import encode_own_event
from devices.surgard import ACK, NAK, encode_mlr2
from gateway.config import Config, read_secret
from gateway.model import Device
from gateway.registry import RegistryError, load_registry
from gateway.world import REGISTRY_CACHE

_CONTACT_ID_CODE = {"sos": "101", "cancel": "406", "test": "602"}
_Z2M_ACTION = {"sos": "emergency", "cancel": "cancel"}


class SimulationError(Exception):
    pass


def mqtt_message(device: Device, kind: str, own_base: str) -> tuple[str, bytes]:
    """Topic and payload a real button of this device's make would publish."""
    if device.address.startswith(own_base.rstrip("/") + "/"):
        return f"{device.address}/event", encode_own_event(kind, battery=87)
    body: dict[str, object] = {"battery": 87, "linkquality": 120}
    if kind in _Z2M_ACTION:
        body["action"] = _Z2M_ACTION[kind]
    return device.address, json.dumps(body).encode()


def surgard_frame(device: Device, kind: str) -> bytes:
    code = _CONTACT_ID_CODE[kind]
    if DEFAULT_EVENT_KINDS.get(code) is None:
        raise SimulationError(f"no Contact ID code for {kind}")
    return encode_mlr2("01", "1", device.address, Qualifier.NEW, code, "01", "001")


DRILL_LOGIN = "drill"
DRILL_PASSWORD_SECRET = "drill_password"  # noqa: S105 - a credential name


class ReadBackError(Exception):
    """The control API did not answer with the alarm: ``status`` 404 (not journaled),
    another HTTP status, or None (the gateway is not reachable)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status


ReadBack = Callable[[str], Any]
"""GET one control-API path, return its JSON or raise :class:`ReadBackError`."""


@dataclass(frozen=True, slots=True)
class DrillResult:
    drill_id: str
    alarm: dict[str, Any]  # the control API's view: alarm, drill, notifications, log

    def summary(self) -> str:
        a = self.alarm["alarm"]
        d = self.alarm.get("drill") or {}
        told = list(self.alarm.get("notifications", ()))
        who = "dry run: nobody texted" if d.get("dry_run") else \
            f"texting only {', '.join(d.get('notify', ()))}"
        return (f"drill {self.drill_id}: journaled as alarm {a['alarm_id']} "
                f"(device {a['device_id']}, state {a['state']}; {who}; "
                f"{len(told)} SMS planned). Acknowledge it on the console or with "
                f"`gateway ack {a['alarm_id']}`.")


def _registry_device(cfg: Config, device_id: str) -> Device:
    m = cfg.model
    try:
        # The gateway's validated snapshot when the files are unchanged (a city: about a
        # second instead of a full validation); never written from here.
        registry = load_registry(cfg.registry_dir, default_region=m.registry.default_region,
                                 bbox=m.registry.bbox,
                                 cache_dir=m.gateway.state_dir / REGISTRY_CACHE,
                                 write_cache=False)
    except RegistryError as exc:
        raise SimulationError(f"registry: {exc}") from exc
    device = registry.devices.get(device_id)
    if device is None:
        raise SimulationError(f"unknown device {device_id!r} (not in {cfg.registry_dir})")
    return device


def drill_password(password_file: Path | None, env: dict[str, str] | None = None) -> str | None:
    """The drill login's password: ``password_file`` (the password alone, or the
    installer's ``broker-logins.csv`` with its ``drill,<password>`` row), else the
    credential / env variable ``DRILL_PASSWORD``; None if neither is there."""
    if password_file is None:
        return read_secret(DRILL_PASSWORD_SECRET, env)
    try:
        text = password_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise SimulationError(f"cannot read {password_file}: {exc.strerror or exc}") from exc
    rows = [line.strip() for line in text.splitlines() if line.strip()]
    for row in rows:
        login, sep, password = row.partition(",")
        if sep and login == DRILL_LOGIN:
            return password
    if len(rows) == 1 and "," not in rows[0]:
        return rows[0]
    raise SimulationError(f"{password_file}: no password for the login {DRILL_LOGIN!r}")


def _tls(cfg: Config) -> ssl.SSLContext | None:
    tls = cfg.model.mqtt.tls
    if tls is None:
        return None
    # The CA only: the gateway's client certificate is the gateway's identity, not a drill's.
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def run_drill(cfg: Config, device_id: str, read_back: ReadBack, *, by: str,
                    notify: Sequence[str] = (), kind: str = "sos",
                    password: str | None = None, drill_id: str | None = None,
                    timeout_s: float = 10.0) -> DrillResult:
    """Publish one drill with the drill login and read it back. Raises SimulationError
    with the reason whenever the gateway cannot be shown to have journaled it."""
    device = _registry_device(cfg, device_id)
    m = cfg.model
    drill_id = drill_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    try:
        payload = encode_drill(drill_id, event=kind, by=by, notify=notify)
    except ValueError as exc:
        raise SimulationError(f"drill: {exc}") from exc
    base = f"{DRILL_BASE}/{device.device_id}"
    where = f"MQTT {m.mqtt.host}:{m.mqtt.port} as {DRILL_LOGIN!r}"
    confirmed = False
    step = "connecting"
    try:
        async with aiomqtt.Client(
            m.mqtt.host, m.mqtt.port, username=DRILL_LOGIN, password=password,
            identifier=f"drill-{secrets.token_hex(4)}", tls_context=_tls(cfg),
            protocol=aiomqtt.ProtocolVersion.V311, timeout=timeout_s,
        ) as client:
            step = "subscribing"
            await client.subscribe(f"{base}/confirm", qos=1)
            step = "publishing"
            await client.publish(f"{base}/event", payload, qos=1)
            step = "waiting"
            if kind == "sos":
                confirmed = await _await_confirmation(client, drill_id, timeout_s)
    except aiomqtt.MqttCodeError as exc:
        if step == "connecting":
            raise SimulationError(
                f"{where}: the broker refused the drill login ({exc}); is the password "
                f"right and does `{DRILL_LOGIN}` exist in the broker's password file?") from exc
        raise SimulationError(f"{where}: {step} failed: {exc}") from exc
    except (aiomqtt.MqttError, OSError) as exc:
        if step == "publishing":
            # Mosquitto 2 disconnects an MQTT 3.1.1 client whose publish its ACL denies.
            raise SimulationError(
                f"{where}: the broker dropped the connection on the publish to "
                f"{base}/event ({exc}): its ACL does not let `{DRILL_LOGIN}` write there "
                "(see config/mosquitto.acl)") from exc
        raise SimulationError(f"{where}: {step} failed: {exc}") from exc
    if kind != "sos":
        return DrillResult(drill_id, {"alarm": {"alarm_id": "", "device_id": device_id,
                                                "state": "cancel sent"}})
    try:
        view = read_back(f"/drills/{drill_id}")
    except ReadBackError as exc:
        if exc.status == 404:
            why = ("the gateway confirmed it, yet has no such alarm" if confirmed else
                   f"no confirmation within {timeout_s:g} s: the broker took the publish "
                   "but the gateway never journaled it (an ACL that denies the drill login "
                   f"{base}/event looks exactly like this), or the gateway is not connected "
                   "to this broker")
            raise SimulationError(f"drill {drill_id} FAILED: {why}") from exc
        raise SimulationError(f"drill {drill_id}: cannot read it back from the gateway: "
                              f"{exc}") from exc
    return DrillResult(drill_id, view)


async def _await_confirmation(client: aiomqtt.Client, drill_id: str, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                try:
                    body = json.loads(bytes(message.payload))  # type: ignore[arg-type,unused-ignore]
                except (TypeError, ValueError):
                    continue
                if isinstance(body, dict) and body.get("drill") == drill_id and \
                        body.get("v") == DRILL_SCHEMA_VERSION and body.get("journaled"):
                    return True
    except TimeoutError:
        return False
    return False


async def line_test(cfg: Config, device_id: str, port: str, read_back: ReadBack, *,
                    kind: str = "sos", timeout_s: float = 10.0) -> str:
    """Write the device's own frame to ``port`` and read the alarm back (a real alarm)."""
    device = _registry_device(cfg, device_id)
    if device.scheme is AddressScheme.MQTT:
        raise SimulationError(f"device {device_id} is an MQTT button: a line test is for "
                              "serial devices; run a drill instead (no --port)")
    started = time.time()
    answer = await _write_frame(device, port, kind, timeout_s)
    if kind != "sos":
        return f"{kind} for {device_id} {answer}"
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                alarms = read_back("/alarms").get("alarms", [])
                mine = [a for a in alarms if a.get("device_id") == device_id and
                        not a.get("drill") and a.get("last_press_at", 0) >= started - 1]
                if mine:
                    a = mine[0]
                    return (f"line test {device_id} on {port}: {answer}; journaled as REAL "
                            f"alarm {a['alarm_id']} (state {a['state']}): acknowledge and "
                            "resolve it")
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise SimulationError(f"line test {device_id} on {port}: {answer}, but the gateway "
                              f"has no open alarm for {device_id} after {timeout_s:g} s") \
            from None
    except ReadBackError as exc:
        raise SimulationError(f"line test {device_id}: {answer}; cannot read it back: "
                              f"{exc}") from exc


async def _write_frame(device: Device, port: str, kind: str, timeout_s: float) -> str:
    if device.scheme is AddressScheme.CONTACT_ID:
        frame = surgard_frame(device, kind)
    else:
        if kind != "sos":
            raise SimulationError("an alarm phone can only call (kind sos)")
        frame = encode_callerid_block(device.address)
    try:
        reader, writer = await open_serial_connection(url=port, baudrate=9600)
    except (serial.SerialException, OSError) as exc:
        raise SimulationError(f"cannot open {port}: {exc}") from exc
    try:
        writer.write(frame)
        await writer.drain()
        if device.scheme is not AddressScheme.CONTACT_ID:
            return "caller-ID block written"
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    answer = await reader.read(1)
                    if answer in (ACK, NAK) or not answer:
                        break
        except TimeoutError:
            raise SimulationError(f"no ACK from the gateway within {timeout_s:g} s") from None
    finally:
        writer.close()
    if answer == ACK:
        return "ACK from the gateway"
    raise SimulationError(f"gateway answered {answer!r} (NAK or closed)")
