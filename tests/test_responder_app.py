"""The responder phone protocol: positions, shifts and acknowledgements as typed commands."""

from __future__ import annotations

import pytest

from devices.events import DeviceProtocolError
from devices.responder_app import (
    AckCommand,
    DutyChange,
    PositionReport,
    ResponderAppDecoder,
    ResponderCommand,
)

R = "responders/R17"


def decode(topic: str, payload: bytes) -> ResponderCommand:
    return ResponderAppDecoder().decode(topic, payload)


def test_subscriptions() -> None:
    assert ResponderAppDecoder().subscriptions() == [
        "responders/+/location", "responders/+/duty", "responders/+/ack", "alarm/alarms/+/ack"]
    assert ResponderAppDecoder("kenli/staff", "kenli/alarms").subscriptions() == [
        "kenli/staff/+/location", "kenli/staff/+/duty", "kenli/staff/+/ack",
        "kenli/alarms/+/ack"]


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        # Positions: the rules of the former gateway.geo.parse_position.
        (f"{R}/location",
         b'{"lon": 118.55, "lat": 37.59, "accuracy": 12.5, "timestamp": 1800000000.5}',
         PositionReport("R17", 37.59, 118.55, 12.5, 1800000000.5)),
        (f"{R}/location", b'{"lon": 118, "lat": 37}', PositionReport("R17", 37.0, 118.0, None,
                                                                     None)),
        (f"{R}/location",
         b'{"lat": 37.59, "lon": 118.55, "accuracy": null, "timestamp": null, "x": 1}',
         PositionReport("R17", 37.59, 118.55, None, None)),
        (f"{R}/location", b'{"lon": -180, "lat": -90, "accuracy": 0, "timestamp": 0}',
         PositionReport("R17", -90.0, -180.0, 0.0, 0.0)),
        # Shifts.
        (f"{R}/duty", b'{"on_duty": true}', DutyChange("R17", True)),
        (f"{R}/duty", b'{"on_duty": false, "app": "2.1"}', DutyChange("R17", False)),
        # Acknowledgements: from the phone (who = the topic's id) or the console.
        (f"{R}/ack", b'{"alarm_id": "A7K3-9QXM"}', AckCommand("A7K3-9QXM", "R17", "phone")),
        ("alarm/alarms/A7K3-9QXM/ack", b'{"by": "R17"}',
         AckCommand("A7K3-9QXM", "R17", "console")),
    ],
)
def test_decodes(topic: str, payload: bytes, expected: ResponderCommand) -> None:
    assert decode(topic, payload) == expected


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (f"{R}/location", b'{"lon": 118.5, "lat": 37.5, "n": "\xff"}', "not valid JSON.*UTF-8"),
        (f"{R}/location", b"lon=118.5,lat=37.5", "not valid JSON"),
        (f"{R}/location", b'{"lon": NaN, "lat": 37.5}', "not valid JSON"),
        (f"{R}/location", b'{"lon": Infinity, "lat": 37.5}', "not valid JSON"),
        (f"{R}/location", b'{"lon": 1e400, "lat": 37.5}', "not valid JSON"),
        (f"{R}/location", b"[118.5, 37.5]", "expected a JSON object, got list"),
        (f"{R}/location", b'{"lat": 37.5}', "missing field 'lon'"),
        (f"{R}/location", b'{"lon": 118.5}', "missing field 'lat'"),
        (f"{R}/location", b'{"lon": "118.5", "lat": 37.5}', "field 'lon' must be a finite"),
        (f"{R}/location", b'{"lon": true, "lat": 37.5}', "field 'lon' must be a finite number"),
        (f"{R}/location", b'{"lon": 37.59, "lat": 118.55}', "swapped"),
        (f"{R}/location", b'{"lon": 181, "lat": 37.5}', r"longitude 181.0 is outside"),
        (f"{R}/location", b'{"lon": 118.5, "lat": 37.5, "accuracy": -1}', "'accuracy' must be"),
        (f"{R}/location", b'{"lon": 118.5, "lat": 37.5, "timestamp": 1800000000000}',
         "milliseconds"),
        (f"{R}/location", b'{"lon": 118.5, "lat": 37.5, "timestamp": -5}', "epoch seconds"),
        (f"{R}/location", b'{"lon": 118.5, "lat": 37.5, "timestamp": 1e300}', "milliseconds"),
        (f"{R}/location", b" " * 5000, "exceeds 4096"),
        (f"{R}/location", b"[" * 2000 + b"]" * 2000, "not valid JSON"),
        (f"{R}/duty", b'{"on_duty": "yes"}', "'on_duty' must be a bool, got str"),
        (f"{R}/duty", b'{"on_duty": 1}', "'on_duty' must be a bool, got int"),
        (f"{R}/duty", b"{}", "missing field 'on_duty'"),
        (f"{R}/duty", b"true", "expected a JSON object, got bool"),
        (f"{R}/ack", b"x" * 5000, "exceeds 256"),
        (f"{R}/ack", b'{"alarm_id": 17}', "'alarm_id' must be a str, got int"),
        (f"{R}/ack", b'{"alarm_id": ""}', "alarm id is empty"),
        (f"{R}/ack", b'{"alarm_id": "' + b"A" * 65 + b'"}', "alarm id of 65 characters"),
        (f"{R}/ack", b'{"alarm_id": "A\\u0000"}', "wildcard, NUL"),
        (f"{R}/ack", b'{"alarm_id": "A\\n"}', "control characters"),
        (f"{R}/ack", b'{"alarm_id": "\\ud800"}', "not valid JSON"),
        ("alarm/alarms/A1/ack", b"not json", "not valid JSON"),
        ("alarm/alarms/A1/ack", b'{"by": ["R17"]}', "'by' must be a str, got list"),
        ("alarm/alarms/A1/ack", b'{"by": "R/17"}', "slash"),
        ("alarm/alarms/A1/ack", b'{"who": "R17"}', "missing field 'by'"),
        ("responders/" + "r" * 65 + "/duty", b'{"on_duty": true}', "responder id of 65"),
        ("responders//duty", b'{"on_duty": true}', "responder id is empty"),
        ("responders/R+/duty", b'{"on_duty": true}', "wildcard"),
        (f"{R}/status", b"{}", "unknown responder app topic shape"),
        (f"{R}/duty/x", b"{}", "unknown responder app topic shape"),
        ("alarm/alarms/A1/resolve", b"{}", "unknown responder app topic shape"),
        ("alarm/buttons/kl-0042/event", b"{}", "unknown responder app topic shape"),
        ("responders", b"{}", "unknown responder app topic shape"),
    ],
)
def test_rejects(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(DeviceProtocolError, match=reason) as info:
        decode(topic, payload)
    assert info.value.raw == payload


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"responders_base": ""}, "responders_base"),
        ({"responders_base": "responders/"}, "responders_base"),
        ({"alarms_base": "alarm/+"}, "alarms_base"),
        ({"responders_base": "x", "alarms_base": "x"}, "must differ"),
    ],
)
def test_bad_configuration(kwargs: dict[str, str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        ResponderAppDecoder(**kwargs)


def test_any_other_exception_becomes_the_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import devices.responder_app as module

    def broken(*_: object) -> object:
        raise RecursionError("maximum recursion depth exceeded")

    # Stands in for a bug nobody has found yet: the boundary must still hold.
    monkeypatch.setattr(module, "_position", broken)
    payload = b'{"lon": 118.5, "lat": 37.5}'
    with pytest.raises(DeviceProtocolError, match="RecursionError") as info:
        decode(f"{R}/location", payload)
    assert info.value.raw == payload
