"""MQTT alarm-button messages (Zigbee2MQTT and our own schema) to device events.

Three topic shapes are understood (bases configurable):

* ``zigbee2mqtt/<name>``: Zigbee2MQTT device state (JSON object with ``action``,
  ``battery``, ``voltage``, ``linkquality``, ``battery_low``, ``tamper``, and
  ``last_seen`` when the bridge's ``advanced.last_seen`` is on...);
* ``zigbee2mqtt/<name>/availability``: ``online``/``offline`` or
  ``{"state": "online"}``;
* ``alarm/buttons/<device_id>/event``: our own schema, see ``devices/SCHEMA.md``.

``zigbee2mqtt/bridge/...`` is the bridge's own chatter and decodes to nothing.
Anything else raises :class:`DeviceProtocolError` carrying the payload.

One rule overrides strict validation: a message that reports an emergency is
never rejected because an auxiliary field (battery, sequence number, ...) is
malformed; the bad field is dropped and named in ``extra["invalid_fields"]``.
The same defect in any other message is an error.

Pure code: no I/O, no asyncio, no clock.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType

import orjson

from devices.events import (
    AddressScheme,
    DeviceAddress,
    DeviceEvent,
    DeviceProtocolError,
    EventKind,
    protocol_boundary,
)

__all__ = [
    "DEFAULT_CANCEL_ACTIONS",
    "DEFAULT_EMERGENCY_ACTIONS",
    "OWN_EVENT_KINDS",
    "OWN_SCHEMA_VERSION",
    "MqttDecoder",
    "encode_own_event",
]

DEFAULT_EMERGENCY_ACTIONS: frozenset[str] = frozenset(
    {"emergency", "sos", "single", "double", "hold", "panic"}
)
"""Zigbee2MQTT ``action`` values that mean the elder pressed for help."""
DEFAULT_CANCEL_ACTIONS: frozenset[str] = frozenset({"cancel", "disarm"})
"""Zigbee2MQTT ``action`` values that cancel an alarm."""

OWN_SCHEMA_VERSION = 1
"""The only ``v`` our own button schema has."""
OWN_EVENT_KINDS: Mapping[str, EventKind] = MappingProxyType(
    {
        "sos": EventKind.EMERGENCY,
        "cancel": EventKind.CANCEL,
        "test": EventKind.TEST,
        "low_battery": EventKind.LOW_BATTERY,
        "tamper": EventKind.TAMPER,
        "status": EventKind.STATUS,
    }
)
"""Our own schema's ``event`` values and the kinds they decode to."""

_AVAILABILITY = {"online": EventKind.ONLINE, "offline": EventKind.OFFLINE}
_WILDCARDS = frozenset("+#")


class _Fields:
    """Reads optional typed fields of a JSON object, collecting the invalid ones."""

    def __init__(self, obj: dict[str, object]) -> None:
        self._obj = obj
        self.invalid: list[str] = []

    def number(self, key: str, low: float, high: float) -> float | None:
        value = self._obj.get(key)
        if value is None:
            return None
        # bool is an int subclass; true is not a battery level.
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.invalid.append(key)
            return None
        if not low <= value <= high:
            self.invalid.append(key)
            return None
        return float(value)

    def integer(self, key: str, low: int, high: int) -> int | None:
        value = self._obj.get(key)
        if value is None:
            return None
        # Some firmware writes 12.0 for 12; accept integral floats, keep ints exact.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.invalid.append(key)
            return None
        return value

    def flag(self, key: str) -> bool | None:
        value = self._obj.get(key)
        if value is None or isinstance(value, bool):
            return value
        self.invalid.append(key)
        return None

    def unix(self, key: str, *, millis: bool = False) -> float | None:
        """A moment as unix seconds: a number (``millis``: in milliseconds, as
        Zigbee2MQTT's ``last_seen: epoch`` writes it) or ISO-8601 with an offset."""
        value = self._obj.get(key)
        if value is None:
            return None
        if millis and isinstance(value, int | float) and not isinstance(value, bool):
            value = value / 1000
        moment = _moment(value)
        if moment is None:
            self.invalid.append(key)
            return None
        return moment.timestamp()

    def timestamp(self, key: str) -> str | None:
        """A unix time or an ISO-8601 string with an offset, as ISO-8601 UTC."""
        value = self._obj.get(key)
        if value is None:
            return None
        moment = _moment(value)
        if moment is None:
            self.invalid.append(key)
            return None
        return moment.isoformat()


def _moment(value: object) -> datetime | None:
    """Read unix seconds or ISO-8601 with an offset; None if it is neither."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        # A naive time is ambiguous (device clock zone unknown): refuse to guess.
        if moment.tzinfo is None:
            return None
        try:
            return moment.astimezone(UTC)
        except OverflowError:
            # 0001-01-01T00:00+08:00 (a reset clock east of UTC) or 9999-12-31T23:59-08:00
            # is a valid local time whose UTC falls outside datetime's years 1..9999.
            return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _parse_json(payload: bytes, raw: bytes) -> object:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise DeviceProtocolError("payload is not UTF-8", raw) from None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise DeviceProtocolError(f"payload is not JSON: {exc}", raw) from None


def _parse_object(payload: bytes) -> dict[str, object]:
    value = _parse_json(payload, payload)
    if not isinstance(value, dict):
        raise DeviceProtocolError(
            f"payload must be a JSON object, got {type(value).__name__}", payload
        )
    return value


def _check_base(base: str, what: str) -> str:
    if not base or base.startswith("/") or base.endswith("/") or set(base) & _WILDCARDS:
        raise ValueError(f"{what} must be a topic without wildcards or edge slashes: {base!r}")
    return base


def _segment_ok(segment: str) -> bool:
    return bool(segment) and not set(segment) & _WILDCARDS


class MqttDecoder:
    """Decodes one MQTT message (topic and payload) into device events.

    Stateless and pure. :meth:`decode` raises only :class:`DeviceProtocolError`.
    """

    def __init__(
        self,
        z2m_base: str = "zigbee2mqtt",
        own_base: str = "alarm/buttons",
        emergency_actions: frozenset[str] = DEFAULT_EMERGENCY_ACTIONS,
        cancel_actions: frozenset[str] = DEFAULT_CANCEL_ACTIONS,
        max_payload: int = 4096,
    ) -> None:
        """Bases are topic prefixes without a trailing slash.

        Raises :class:`ValueError` for a malformed base, an action listed as
        both emergency and cancel, or a non-positive ``max_payload``.
        """
        self._z2m_base = _check_base(z2m_base, "z2m_base")
        self._own_base = _check_base(own_base, "own_base")
        if self._z2m_base == self._own_base:
            raise ValueError("z2m_base and own_base must differ")
        overlap = emergency_actions & cancel_actions
        if overlap:
            raise ValueError(f"actions both emergency and cancel: {sorted(overlap)}")
        if max_payload < 1:
            raise ValueError(f"max_payload must be positive, got {max_payload}")
        self._emergency_actions = frozenset(emergency_actions)
        self._cancel_actions = frozenset(cancel_actions)
        self._max_payload = max_payload

    def subscriptions(self) -> list[str]:
        """Topic filters to subscribe to (QoS 1). Excludes the Z2M bridge topics."""
        return [
            f"{self._z2m_base}/+",
            f"{self._z2m_base}/+/availability",
            f"{self._own_base}/+/event",
        ]

    def decode(self, topic: str, payload: bytes) -> list[DeviceEvent]:
        """Decode one message; ``[]`` for Z2M bridge topics.

        Raises :class:`DeviceProtocolError` (``raw`` = payload) for an oversized
        payload, invalid UTF-8, non-JSON or non-object JSON, wrongly typed
        fields, an unknown schema version or event, or an unknown topic shape;
        and, naming the exception, for any other failure on this input (nothing
        else ever escapes).
        """
        with protocol_boundary("button decoder", payload):
            return self._decode(topic, payload)

    def _decode(self, topic: str, payload: bytes) -> list[DeviceEvent]:
        own_prefix = f"{self._own_base}/"
        z2m_prefix = f"{self._z2m_base}/"
        is_own = topic.startswith(own_prefix)
        is_z2m = topic.startswith(z2m_prefix)
        if is_own and is_z2m:
            # One base is a prefix of the other: the longer, more specific one wins.
            is_own = len(own_prefix) > len(z2m_prefix)
            is_z2m = not is_own
        if is_own:
            return self._own_topic(topic, topic[len(own_prefix) :].split("/"), payload)
        if is_z2m:
            parts = topic[len(z2m_prefix) :].split("/")
            if parts[0] == "bridge":
                return []
            return self._z2m_topic(topic, parts, payload)
        raise DeviceProtocolError(f"topic {topic!r} is outside the configured bases", payload)

    def confirmation(self, event: DeviceEvent) -> tuple[str, bytes] | None:
        """The end-to-end confirmation of one of our own buttons' messages, or None.

        Published by the transport (QoS 1, not retained) only after ``event`` is
        committed to the journal, on ``<own_base>/<device_id>/confirm``: the button
        resends its message until it sees this (``devices/SCHEMA.md``). The payload
        echoes what the button can match on: ``seq`` and ``ts`` exactly as it sent
        them (when it sent them) and ``digest``, the first 16 hex digits of the
        SHA-256 of the message's bytes. Zigbee2MQTT devices get none (None): they
        cannot listen for it. Never raises.
        """
        prefix = f"{self._own_base}/"
        if event.drill is not None or event.address.scheme is not AddressScheme.MQTT or not (
                event.address.value.startswith(prefix)):
            return None
        device = event.address.value[len(prefix):]
        if not _segment_ok(device) or "/" in device:
            return None
        body: dict[str, object] = {"v": OWN_SCHEMA_VERSION}
        try:
            sent = orjson.loads(event.raw)
        except orjson.JSONDecodeError:
            sent = None
        if isinstance(sent, dict):
            seq, ts = sent.get("seq"), sent.get("ts")
            if type(seq) is int:
                body["seq"] = seq
            # Echoed as sent (a number or a string), so the button compares like with like.
            if type(ts) in (int, float, str):
                body["ts"] = ts
        body["digest"] = hashlib.sha256(event.raw).hexdigest()[:16]
        try:
            payload = orjson.dumps(body)
        except (orjson.JSONEncodeError, TypeError):  # e.g. seq beyond 64 bits
            payload = orjson.dumps({"v": OWN_SCHEMA_VERSION, "digest": body["digest"]})
        return f"{self._own_base}/{device}/confirm", payload

    def _check_size(self, payload: bytes) -> None:
        if len(payload) > self._max_payload:
            raise DeviceProtocolError(
                f"payload of {len(payload)} bytes exceeds {self._max_payload}", payload
            )

    def _z2m_topic(self, topic: str, parts: list[str], payload: bytes) -> list[DeviceEvent]:
        if _segment_ok(parts[0]):
            address = DeviceAddress(AddressScheme.MQTT, f"{self._z2m_base}/{parts[0]}")
            if len(parts) == 1:
                self._check_size(payload)
                return self._z2m_state(address, payload)
            if len(parts) == 2 and parts[1] == "availability":
                self._check_size(payload)
                return [_availability(address, payload)]
        raise DeviceProtocolError(f"unknown zigbee2mqtt topic shape: {topic!r}", payload)

    def _own_topic(self, topic: str, parts: list[str], payload: bytes) -> list[DeviceEvent]:
        if len(parts) == 2 and parts[1] == "event" and _segment_ok(parts[0]):
            self._check_size(payload)
            address = DeviceAddress(AddressScheme.MQTT, f"{self._own_base}/{parts[0]}")
            return [_own_event(address, payload)]
        raise DeviceProtocolError(f"unknown button topic shape: {topic!r}", payload)

    def _z2m_state(self, address: DeviceAddress, payload: bytes) -> list[DeviceEvent]:
        obj = _parse_object(payload)
        action = obj.get("action")
        if action is not None and not isinstance(action, str):
            raise DeviceProtocolError(
                f"zigbee2mqtt action must be a string, got {type(action).__name__}", payload
            )
        primary: EventKind | None = None
        if action:
            if action in self._emergency_actions:
                primary = EventKind.EMERGENCY
            elif action in self._cancel_actions:
                primary = EventKind.CANCEL
            else:
                primary = EventKind.STATUS
        fields = _Fields(obj)
        battery = fields.number("battery", 0, 100)
        voltage = fields.integer("voltage", 0, 100_000)
        link_quality = fields.integer("linkquality", 0, 255)
        battery_low = fields.flag("battery_low")
        tamper = fields.flag("tamper")
        # advanced.last_seen (epoch, ISO_8601 or ISO_8601_local): when the bridge heard it.
        sent_at = fields.unix("last_seen", millis=True)
        extra = _invalid_extra(fields, primary, payload)

        def event(kind: EventKind, code: str | None) -> DeviceEvent:
            return DeviceEvent(
                kind=kind,
                address=address,
                raw=payload,
                code=code,
                battery_pct=battery,
                voltage_mv=voltage,
                link_quality=link_quality,
                extra=extra,
                sent_at=sent_at,
            )

        events: list[DeviceEvent] = []
        if primary is not None:
            events.append(event(primary, action))
        if battery_low:
            events.append(event(EventKind.LOW_BATTERY, "battery_low"))
        if tamper:
            events.append(event(EventKind.TAMPER, "tamper"))
        if not events:
            events.append(event(EventKind.STATUS, None))
        return events


def _invalid_extra(
    fields: _Fields, kind: EventKind | None, payload: bytes
) -> tuple[tuple[str, str], ...]:
    if not fields.invalid:
        return ()
    names = ",".join(fields.invalid)
    if kind is not EventKind.EMERGENCY:
        raise DeviceProtocolError(f"invalid fields: {names}", payload)
    return (("invalid_fields", names),)


def _availability(address: DeviceAddress, payload: bytes) -> DeviceEvent:
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DeviceProtocolError("availability payload is not UTF-8", payload) from None
    kind = _AVAILABILITY.get(text)
    if kind is None:
        value = _parse_json(payload, payload)
        state = value.get("state") if isinstance(value, dict) else None
        kind = _AVAILABILITY.get(state) if isinstance(state, str) else None
        if kind is None:
            raise DeviceProtocolError(
                'availability must be "online", "offline" or {"state": ...}', payload
            )
    return DeviceEvent(kind=kind, address=address, raw=payload, code=kind.value)


def _own_event(address: DeviceAddress, payload: bytes) -> DeviceEvent:
    obj = _parse_object(payload)
    version = obj.get("v")
    if isinstance(version, bool) or version != OWN_SCHEMA_VERSION:
        raise DeviceProtocolError(f"unsupported button schema version {version!r}", payload)
    name = obj.get("event")
    if not isinstance(name, str) or name not in OWN_EVENT_KINDS:
        raise DeviceProtocolError(f"unknown button event {name!r}", payload)
    kind = OWN_EVENT_KINDS[name]
    fields = _Fields(obj)
    seq = fields.integer("seq", 0, 2**63 - 1)
    ts = fields.timestamp("ts")
    sent_at = datetime.fromisoformat(ts).timestamp() if ts is not None else None
    battery = fields.number("battery", 0, 100)
    rssi = fields.integer("rssi", -255, 255)
    extra: tuple[tuple[str, str], ...] = ()
    if seq is not None:
        extra += (("seq", str(seq)),)
    if ts is not None:
        extra += (("ts", ts),)
    if rssi is not None:
        extra += (("rssi", str(rssi)),)
    extra += _invalid_extra(fields, kind, payload)
    return DeviceEvent(
        kind=kind,
        address=address,
        raw=payload,
        code=name,
        battery_pct=battery,
        extra=extra,
        sent_at=sent_at,
    )


def encode_own_event(
    event: str,
    *,
    seq: int | None = None,
    battery: int | None = None,
    ts: float | None = None,
) -> bytes:
    """Encode one message of our own button schema (for simulators and tests).

    Raises :class:`ValueError` for an unknown event, a negative ``seq``, a
    battery outside 0..100 or a non-finite ``ts``.
    """
    if event not in OWN_EVENT_KINDS:
        raise ValueError(
            f"unknown button event {event!r}; expected one of {sorted(OWN_EVENT_KINDS)}"
        )
    message: dict[str, object] = {"v": OWN_SCHEMA_VERSION, "event": event}
    if seq is not None:
        if seq < 0:
            raise ValueError(f"seq must not be negative, got {seq}")
        message["seq"] = seq
    if ts is not None:
        if not math.isfinite(ts):
            raise ValueError(f"ts must be finite, got {ts}")
        message["ts"] = ts
    if battery is not None:
        if not 0 <= battery <= 100:
            raise ValueError(f"battery must be 0..100, got {battery}")
        message["battery"] = battery
    return orjson.dumps(message)
