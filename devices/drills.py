"""Drills over MQTT: a press that tests the whole gateway and says it is a drill.

A drill is published by the drill login (``gateway simulate press``; the broker lets
only that login write these topics) on

* ``alarm/drills/<device id>/event``:
  ``{"v": 1, "drill": "<drill id>", "event": "sos", "by": "<who runs it>",
  "notify": ["+8613800000001", "R0001"]}``

where ``<device id>`` is the registry's id of the device being drilled (of any make:
MQTT, Contact ID or alarm phone -- the drill tests the gateway from intake on, not the
device's own radio or line), ``drill`` is the drill's own id (the gateway journals one
alarm per drill id, so a redelivery joins it), ``event`` is ``sos`` or ``cancel``,
``by`` names the person, and ``notify`` lists the phone numbers (E.164) or responder
ids that the drill's SMS may reach; absent or empty, the drill is a **dry run**: the
gateway journals the plan and texts nobody.

After the alarm is committed the gateway publishes on ``alarm/drills/<device id>/confirm``
``{"v": 1, "drill": "<drill id>", "journaled": true}`` (QoS 1, not retained).

:meth:`DrillDecoder.decode` returns the press as a :class:`~devices.events.DeviceEvent`
carrying a :class:`~devices.events.Drill`, or raises
:class:`~devices.events.DeviceProtocolError` (``raw`` = payload), and nothing else.
Pure code: no I/O, no asyncio, no clock, no gateway imports.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

import orjson

from devices.events import (
    AddressScheme,
    DeviceAddress,
    DeviceEvent,
    DeviceProtocolError,
    Drill,
    EventKind,
    protocol_boundary,
)

__all__ = ["DRILL_BASE", "DRILL_SCHEMA_VERSION", "MAX_DRILL_PAYLOAD", "MAX_NOTIFY",
           "DrillDecoder", "encode_drill"]

DRILL_BASE: Final = "alarm/drills"
"""The drill topics' base (the shipped ACL grants the drill login exactly these)."""
DRILL_SCHEMA_VERSION: Final = 1
MAX_DRILL_PAYLOAD: Final = 2048
MAX_NOTIFY: Final = 10
"""A drill tells a handful of named people, never a whole district."""
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_PHONE = re.compile(r"\+[1-9][0-9]{6,14}")
_EVENTS: Final = {"sos": EventKind.EMERGENCY, "cancel": EventKind.CANCEL}
_KEYS: Final = frozenset({"v", "drill", "event", "by", "notify"})


def _text(doc: dict[str, object], name: str, raw: bytes, *, pattern: re.Pattern[str] | None,
          limit: int = 64) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise DeviceProtocolError(f"field {name!r} must be a non-empty string", raw)
    if len(value) > limit or not value.isprintable():
        raise DeviceProtocolError(
            f"field {name!r} must be at most {limit} printable characters", raw)
    if pattern is not None and not pattern.fullmatch(value):
        raise DeviceProtocolError(f"field {name!r} {value!r} is not a valid id", raw)
    return value


class DrillDecoder:
    """Decodes drill presses on ``<base>/<device id>/event``. Stateless and pure."""

    def __init__(self, base: str = DRILL_BASE) -> None:
        if not base or base.startswith("/") or base.endswith("/") or set(base) & set("+#"):
            raise ValueError(f"drill base must be a topic without wildcards or edge "
                             f"slashes: {base!r}")
        self._base = base

    def subscriptions(self) -> list[str]:
        return [f"{self._base}/+/event"]

    def decode(self, topic: str, payload: bytes) -> list[DeviceEvent]:
        """One drill event. Raises only :class:`DeviceProtocolError`."""
        with protocol_boundary("drill decoder", payload):
            return [self._decode(topic, payload)]

    def _decode(self, topic: str, raw: bytes) -> DeviceEvent:
        prefix = f"{self._base}/"
        rest = topic[len(prefix):] if topic.startswith(prefix) else ""
        device_id, _, leaf = rest.partition("/")
        if leaf != "event" or not _ID.fullmatch(device_id):
            raise DeviceProtocolError(f"not a drill topic: {topic!r}", raw)
        if len(raw) > MAX_DRILL_PAYLOAD:
            raise DeviceProtocolError(
                f"payload of {len(raw)} bytes exceeds {MAX_DRILL_PAYLOAD}", raw)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise DeviceProtocolError(f"not valid JSON: {exc}", raw) from None
        if not isinstance(doc, dict):
            raise DeviceProtocolError("expected a JSON object", raw)
        if doc.get("v") != DRILL_SCHEMA_VERSION or type(doc.get("v")) is not int:
            raise DeviceProtocolError(f"unknown drill schema version {doc.get('v')!r}", raw)
        unknown = sorted(set(doc) - _KEYS)
        if unknown:
            raise DeviceProtocolError(f"unknown fields {unknown}", raw)
        drill_id = _text(doc, "drill", raw, pattern=_ID)
        by = _text(doc, "by", raw, pattern=None)
        event = doc.get("event")
        if not isinstance(event, str) or event not in _EVENTS:
            raise DeviceProtocolError(
                f"field 'event' must be one of {sorted(_EVENTS)}, got {event!r}", raw)
        notify = doc.get("notify", [])
        if notify is None:
            notify = []
        if not isinstance(notify, list) or len(notify) > MAX_NOTIFY:
            raise DeviceProtocolError(
                f"field 'notify' must be a list of at most {MAX_NOTIFY} entries", raw)
        people: list[str] = []
        for who in notify:
            if not isinstance(who, str) or not (_PHONE.fullmatch(who) or (
                    _ID.fullmatch(who) and not who.isdigit())):  # digits: a local number
                raise DeviceProtocolError(
                    f"'notify' entry {who!r} is neither an E.164 number nor an id", raw)
            if who not in people:
                people.append(who)
        return DeviceEvent(
            kind=_EVENTS[event],
            address=DeviceAddress(AddressScheme.MQTT, f"{self._base}/{device_id}"),
            raw=raw, code=f"drill:{event}",
            drill=Drill(drill_id, device_id, by, tuple(people)))

    def confirmation(self, event: DeviceEvent) -> tuple[str, bytes] | None:
        """Published after ``event`` is committed: the drill tool waits for it."""
        if event.drill is None or event.kind is not EventKind.EMERGENCY:
            return None
        body = {"v": DRILL_SCHEMA_VERSION, "drill": event.drill.drill_id, "journaled": True}
        return (f"{self._base}/{event.drill.device_id}/confirm", orjson.dumps(body))


def encode_drill(drill_id: str, *, event: str = "sos", by: str,
                 notify: Sequence[str] = ()) -> bytes:
    """The payload ``gateway simulate press`` publishes. Raises ValueError if invalid."""
    body: dict[str, object] = {"v": DRILL_SCHEMA_VERSION, "drill": drill_id, "event": event,
                               "by": by, "notify": list(notify)}
    raw = orjson.dumps(body)
    try:
        DrillDecoder().decode(f"{DRILL_BASE}/X/event", raw)
    except DeviceProtocolError as exc:
        raise ValueError(exc.reason) from None
    return raw
