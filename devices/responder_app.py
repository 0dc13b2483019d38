"""The responder phone protocol over MQTT, decoded into typed commands.

Staff phones (and the command center's console) tell the gateway four things:

* ``responders/<id>/location``: ``{"lon": .., "lat": .., "accuracy": .., "timestamp": ..}``
  -- a position fix (``lon``/``lat`` required degrees; ``accuracy`` metres >= 0 and
  ``timestamp`` Unix epoch seconds optional, ``null`` counts as absent);
* ``responders/<id>/duty``: ``{"on_duty": true}`` -- a shift starts or ends;
* ``responders/<id>/ack``: ``{"alarm_id": "A7K3-9QXM"}`` -- the phone's responder takes
  the alarm. Who acknowledges is the topic's id, which the broker's ACL ties to the
  phone's login (``pattern write responders/%u/ack``): a phone cannot ack as another;
* ``alarm/alarms/<alarm id>/ack``: ``{"by": "<responder id>"}`` -- a trusted console
  acknowledges for a responder (the shipped ACL lets only the gateway's user write it).

:meth:`ResponderAppDecoder.decode` returns one frozen command or raises
:class:`DeviceProtocolError` (``raw`` = payload) -- and nothing else, whatever the input.
Pure code: no I/O, no asyncio, no clock, no gateway imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

import orjson

from devices.events import DeviceProtocolError, protocol_boundary

__all__ = [
    "MAX_COMMAND_PAYLOAD",
    "MAX_ID_LENGTH",
    "MAX_POSITION_PAYLOAD",
    "AckCommand",
    "DutyChange",
    "PositionReport",
    "ResponderAppDecoder",
    "ResponderCommand",
]

MAX_POSITION_PAYLOAD: Final = 4096
"""A position is a few dozen bytes; anything this large is not one (and is not parsed)."""
MAX_COMMAND_PAYLOAD: Final = 256
"""An ack or a duty change is a few dozen bytes."""
MAX_ID_LENGTH: Final = 64
"""Longest responder or alarm id accepted (ids are logged and journaled)."""
# Unix seconds this large are year 5138: the phone sent milliseconds (or nonsense).
_MAX_EPOCH_SECONDS: Final = 1e11
_WILDCARDS_OR_NUL = frozenset("+#\x00")


@dataclass(frozen=True, slots=True)
class PositionReport:
    """A responder's phone reports where it is (WGS84 degrees)."""

    responder_id: str
    lat: float
    lon: float
    accuracy_m: float | None
    timestamp: float | None  # Unix epoch seconds as the phone measured it


@dataclass(frozen=True, slots=True)
class DutyChange:
    """A responder starts (``on_duty``) or ends a shift from the phone."""

    responder_id: str
    on_duty: bool


@dataclass(frozen=True, slots=True)
class AckCommand:
    """A responder takes an alarm, from the phone or through the console."""

    alarm_id: str
    responder_id: str
    via: Literal["phone", "console"]


ResponderCommand = PositionReport | DutyChange | AckCommand
"""Everything the responder app can ask of the gateway."""


def _check_base(base: str, what: str) -> str:
    if not base or base.startswith("/") or base.endswith("/") or set(base) & set("+#"):
        raise ValueError(f"{what} must be a topic without wildcards or edge slashes: {base!r}")
    return base


def _id(value: str, what: str, raw: bytes) -> str:
    if not value:
        raise DeviceProtocolError(f"{what} is empty", raw)
    if len(value) > MAX_ID_LENGTH:
        raise DeviceProtocolError(
            f"{what} of {len(value)} characters exceeds {MAX_ID_LENGTH}", raw)
    if set(value) & _WILDCARDS_OR_NUL or "/" in value:
        raise DeviceProtocolError(f"{what} {value!r} contains a wildcard, NUL or slash", raw)
    if not value.isprintable():
        raise DeviceProtocolError(f"{what} {value!r} contains control characters", raw)
    return value


def _object(payload: bytes, limit: int) -> dict[str, object]:
    if len(payload) > limit:
        raise DeviceProtocolError(f"payload of {len(payload)} bytes exceeds {limit}", payload)
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        # orjson rejects NaN/Infinity literals, overflowing numbers, lone surrogates,
        # nesting deeper than 1024 and invalid UTF-8.
        raise DeviceProtocolError(f"not valid JSON: {exc}", payload) from None
    if not isinstance(doc, dict):
        raise DeviceProtocolError(f"expected a JSON object, got {type(doc).__name__}", payload)
    return doc


def _number(doc: Mapping[str, object], name: str, raw: bytes) -> float | None:
    """A finite number, or None when the field is absent or null."""
    v = doc.get(name)
    if v is None:
        return None
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise DeviceProtocolError(f"field {name!r} must be a finite number, got {v!r}", raw)
    try:
        value = float(v)
    except OverflowError:  # an int beyond a double: orjson gives a float today, but
        value = math.inf  # a JSON library's choice must not become a crash here
    if not math.isfinite(value):
        raise DeviceProtocolError(f"field {name!r} must be a finite number, got {v!r}", raw)
    return value


def _position(responder_id: str, payload: bytes) -> PositionReport:
    """The exact rules of the former ``gateway.geo.parse_position``."""
    doc = _object(payload, MAX_POSITION_PAYLOAD)
    lon = _number(doc, "lon", payload)
    lat = _number(doc, "lat", payload)
    if lon is None or lat is None:
        raise DeviceProtocolError(f"missing field {'lon' if lon is None else 'lat'!r}", payload)
    if not -90.0 <= lat <= 90.0:
        hint = (
            "; looks like latitude and longitude are swapped (give lon first)"
            if -90.0 <= lon <= 90.0 and -180.0 <= lat <= 180.0
            else ""
        )
        raise DeviceProtocolError(f"latitude {lat!r} is outside [-90, 90]{hint}", payload)
    if not -180.0 <= lon <= 180.0:
        raise DeviceProtocolError(f"longitude {lon!r} is outside [-180, 180]", payload)
    accuracy = _number(doc, "accuracy", payload)
    if accuracy is not None and accuracy < 0:
        raise DeviceProtocolError(f"field 'accuracy' must be >= 0, got {accuracy!r}", payload)
    timestamp = _number(doc, "timestamp", payload)
    if timestamp is not None and not 0 <= timestamp < _MAX_EPOCH_SECONDS:
        raise DeviceProtocolError(
            f"field 'timestamp' must be Unix epoch seconds, got {timestamp!r}"
            + (" (looks like milliseconds)" if timestamp >= _MAX_EPOCH_SECONDS else ""),
            payload,
        )
    return PositionReport(responder_id, lat, lon, accuracy, timestamp)


def _field(payload: bytes, name: str, kind: type[object]) -> object:
    doc = _object(payload, MAX_COMMAND_PAYLOAD)
    value = doc.get(name)
    if value is None:
        raise DeviceProtocolError(f"missing field {name!r}", payload)
    # bool is an int subclass, and neither is a string: compare the exact type.
    if type(value) is not kind:
        raise DeviceProtocolError(
            f"field {name!r} must be a {kind.__name__}, got {type(value).__name__}", payload)
    return value


class ResponderAppDecoder:
    """Decodes one responder-app MQTT message (topic and payload) into a command.

    Stateless and pure. :meth:`decode` raises only :class:`DeviceProtocolError`.
    """

    def __init__(self, responders_base: str = "responders",
                 alarms_base: str = "alarm/alarms") -> None:
        """Bases are topic prefixes without a trailing slash; ValueError if malformed."""
        self._responders = _check_base(responders_base, "responders_base")
        self._alarms = _check_base(alarms_base, "alarms_base")
        if self._responders == self._alarms:
            raise ValueError("responders_base and alarms_base must differ")

    def subscriptions(self) -> list[str]:
        """Topic filters to subscribe to (QoS 1)."""
        r = self._responders
        return [f"{r}/+/location", f"{r}/+/duty", f"{r}/+/ack", f"{self._alarms}/+/ack"]

    def decode(self, topic: str, payload: bytes) -> ResponderCommand:
        """Decode one message.

        Raises :class:`DeviceProtocolError` (``raw`` = payload) for an unknown topic
        shape, an empty, over-long or wildcard id, an oversized payload (4096 bytes
        for a position, 256 for a command), invalid UTF-8 or JSON, a JSON value that
        is not an object, a missing or wrongly typed field or a value out of range;
        and, naming the exception, for any other failure on this input.
        """
        with protocol_boundary("responder app decoder", payload):
            return self._decode(topic, payload)

    def _decode(self, topic: str, payload: bytes) -> ResponderCommand:
        for base, handler in ((self._responders, self._phone), (self._alarms, self._console)):
            prefix = f"{base}/"
            if topic.startswith(prefix):
                parts = topic[len(prefix):].split("/")
                if len(parts) == 2:
                    return handler(parts[0], parts[1], topic, payload)
        raise DeviceProtocolError(f"unknown responder app topic shape: {topic!r}", payload)

    def _phone(self, who: str, what: str, topic: str, payload: bytes) -> ResponderCommand:
        if what not in ("location", "duty", "ack"):
            raise DeviceProtocolError(f"unknown responder app topic shape: {topic!r}", payload)
        responder_id = _id(who, "responder id", payload)
        if what == "location":
            return _position(responder_id, payload)
        if what == "duty":
            on_duty = _field(payload, "on_duty", bool)
            return DutyChange(responder_id, on_duty is True)
        alarm_id = _field(payload, "alarm_id", str)
        return AckCommand(_id(str(alarm_id), "alarm id", payload), responder_id, "phone")

    def _console(self, which: str, what: str, topic: str, payload: bytes) -> ResponderCommand:
        if what != "ack":
            raise DeviceProtocolError(f"unknown responder app topic shape: {topic!r}", payload)
        alarm_id = _id(which, "alarm id", payload)
        by = _field(payload, "by", str)
        return AckCommand(alarm_id, _id(str(by), "responder id", payload), "console")
