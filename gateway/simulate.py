"""Drills: inject a button press into a running gateway through the device's own path.

An MQTT button is simulated by publishing what the button publishes, on its
topic, through the broker; a Contact ID unit by writing a Sur-Gard receiver line
to a serial port wired to the gateway's (a null-modem cable, or one end of a
``socat`` pty pair), waiting for the gateway's ACK; an alarm phone by writing the
modem's caller-ID block. Nothing bypasses the transports, the journal or the ACK.
"""

from __future__ import annotations

import asyncio
import json

import aiomqtt
import serial
from serial_asyncio_fast import open_serial_connection

from devices.callerid import encode_callerid_block
from devices.contact_id import DEFAULT_EVENT_KINDS
from devices.events import AddressScheme, Qualifier
from devices.mqtt_payloads import encode_own_event
from devices.surgard import ACK, NAK, encode_mlr2
from gateway.config import Config, load_secrets
from gateway.model import Device
from gateway.registry import RegistryError, load_registry

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


async def simulate_press(cfg: Config, device_id: str, *, port: str | None = None,
                         kind: str = "sos", timeout_s: float = 10.0) -> str:
    m = cfg.model
    try:
        registry = load_registry(cfg.registry_dir, default_region=m.registry.default_region,
                                 bbox=m.registry.bbox)
    except RegistryError as exc:
        raise SimulationError(f"registry: {exc}") from exc
    device = registry.devices.get(device_id)
    if device is None:
        raise SimulationError(f"unknown device {device_id!r} (not in {cfg.registry_dir})")
    if device.scheme is AddressScheme.MQTT:
        topic, payload = mqtt_message(device, kind, m.mqtt.own_base)
        secrets = load_secrets(cfg)
        try:
            async with asyncio.timeout(timeout_s), aiomqtt.Client(
                m.mqtt.host, m.mqtt.port, username=m.mqtt.username,
                password=secrets.mqtt_password,
            ) as client:
                await client.publish(topic, payload, qos=1)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            raise SimulationError(f"MQTT {m.mqtt.host}:{m.mqtt.port}: {exc}") from exc
        return f"published {kind} for {device_id} on {topic} (QoS 1, broker acknowledged)"
    if port is None:
        raise SimulationError(
            f"device {device_id} is a {device.scheme} device: give --port, the serial port "
            "wired to the gateway's receiver/modem line")
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
            return f"caller-ID block for {device_id} written to {port}"
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
        return f"{kind} for {device_id} acknowledged by the gateway (journaled)"
    raise SimulationError(f"gateway answered {answer!r} (NAK or closed)")

