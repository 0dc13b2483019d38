"""MQTT button messages: Zigbee2MQTT state and availability, and our own schema."""

from __future__ import annotations

import hashlib
import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.events import AddressScheme, DeviceAddress, DeviceEvent, DeviceProtocolError, EventKind
from devices.mqtt_payloads import OWN_EVENT_KINDS, MqttDecoder, encode_own_event

FUZZ = settings(max_examples=150, deadline=None)
SOS = DeviceAddress(AddressScheme.MQTT, "zigbee2mqtt/sos-0001")
BUTTON = DeviceAddress(AddressScheme.MQTT, "alarm/buttons/kl-0042")


def decode(topic: str, payload: object) -> list[DeviceEvent]:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return MqttDecoder().decode(topic, raw)


def kinds(events: list[DeviceEvent]) -> list[EventKind]:
    return [e.kind for e in events]


def test_subscriptions_leave_out_the_bridge() -> None:
    assert MqttDecoder().subscriptions() == [
        "zigbee2mqtt/+",
        "zigbee2mqtt/+/availability",
        "alarm/buttons/+/event",
    ]
    custom = MqttDecoder(z2m_base="z2m/kenli", own_base="kenli/buttons")
    assert custom.subscriptions() == [
        "z2m/kenli/+",
        "z2m/kenli/+/availability",
        "kenli/buttons/+/event",
    ]


def test_tuya_sos_button() -> None:
    payload = b'{"action":"emergency","battery":87,"voltage":2900,"linkquality":116}'
    assert decode("zigbee2mqtt/sos-0001", payload) == [
        DeviceEvent(
            kind=EventKind.EMERGENCY,
            address=SOS,
            raw=payload,
            code="emergency",
            battery_pct=87.0,
            voltage_mv=2900,
            link_quality=116,
        )
    ]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"action": "single", "battery": 100}, [(EventKind.EMERGENCY, "single")]),
        ({"action": "double"}, [(EventKind.EMERGENCY, "double")]),
        ({"action": "hold"}, [(EventKind.EMERGENCY, "hold")]),
        ({"action": "sos"}, [(EventKind.EMERGENCY, "sos")]),
        ({"action": "panic"}, [(EventKind.EMERGENCY, "panic")]),
        ({"action": "disarm"}, [(EventKind.CANCEL, "disarm")]),
        ({"action": "cancel"}, [(EventKind.CANCEL, "cancel")]),
        ({"action": "arm_all_zones"}, [(EventKind.STATUS, "arm_all_zones")]),
        ({"battery": 55, "linkquality": 30}, [(EventKind.STATUS, None)]),
        ({}, [(EventKind.STATUS, None)]),
        # Zigbee2MQTT clears the action with "" or null after publishing it.
        ({"action": "", "battery": 55}, [(EventKind.STATUS, None)]),
        ({"action": None, "battery": None}, [(EventKind.STATUS, None)]),
        ({"battery_low": False, "tamper": False}, [(EventKind.STATUS, None)]),
        ({"battery_low": True, "battery": 9}, [(EventKind.LOW_BATTERY, "battery_low")]),
        ({"tamper": True}, [(EventKind.TAMPER, "tamper")]),
        (
            {"action": "emergency", "battery_low": True, "tamper": True},
            [
                (EventKind.EMERGENCY, "emergency"),
                (EventKind.LOW_BATTERY, "battery_low"),
                (EventKind.TAMPER, "tamper"),
            ],
        ),
    ],
)
def test_zigbee2mqtt_state(
    payload: dict[str, object], expected: list[tuple[EventKind, str | None]]
) -> None:
    events = decode("zigbee2mqtt/sos-0001", payload)
    assert [(e.kind, e.code) for e in events] == expected
    assert all(e.address == SOS for e in events)


def test_telemetry_rides_on_every_event() -> None:
    events = decode(
        "zigbee2mqtt/sos-0001",
        {"action": "emergency", "battery_low": True, "battery": 12.5, "voltage": 2650.0},
    )
    assert [(e.battery_pct, e.voltage_mv) for e in events] == [(12.5, 2650), (12.5, 2650)]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"battery": "85"}, "battery"),
        ({"battery": 101}, "battery"),
        ({"battery": True}, "battery"),
        ({"voltage": -1}, "voltage"),
        ({"voltage": 2900.5}, "voltage"),
        ({"linkquality": 256}, "linkquality"),
        ({"linkquality": "good"}, "linkquality"),
        ({"battery_low": "yes"}, "battery_low"),
        ({"tamper": 1}, "tamper"),
        ({"action": "cancel", "battery": []}, "battery"),
    ],
)
def test_wrongly_typed_fields_are_rejected(payload: dict[str, object], field: str) -> None:
    raw = orjson.dumps(payload)
    with pytest.raises(DeviceProtocolError, match=f"invalid fields: {field}") as info:
        MqttDecoder().decode("zigbee2mqtt/sos-0001", raw)
    assert info.value.raw == raw


def test_emergency_survives_a_malformed_auxiliary_field() -> None:
    [event] = decode(
        "zigbee2mqtt/sos-0001", {"action": "emergency", "battery": "low", "linkquality": 90}
    )
    assert event.kind is EventKind.EMERGENCY
    assert (event.battery_pct, event.link_quality) == (None, 90)
    assert dict(event.extra) == {"invalid_fields": "battery"}


def test_action_of_the_wrong_type_is_rejected() -> None:
    with pytest.raises(DeviceProtocolError, match="action must be a string"):
        decode("zigbee2mqtt/sos-0001", {"action": 1})


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"online", EventKind.ONLINE),
        (b"offline", EventKind.OFFLINE),
        (b"online\n", EventKind.ONLINE),
        (b'{"state":"online"}', EventKind.ONLINE),
        (b'{"state": "offline"}', EventKind.OFFLINE),
    ],
)
def test_availability(payload: bytes, kind: EventKind) -> None:
    [event] = decode("zigbee2mqtt/sos-0001/availability", payload)
    assert event == DeviceEvent(kind=kind, address=SOS, raw=payload, code=kind.value)


@pytest.mark.parametrize("payload", [b"maybe", b'{"state": 1}', b'["online"]', b"", b"\xff"])
def test_bad_availability(payload: bytes) -> None:
    with pytest.raises(DeviceProtocolError) as info:
        decode("zigbee2mqtt/sos-0001/availability", payload)
    assert info.value.raw == payload


@pytest.mark.parametrize(
    "topic", ["zigbee2mqtt/bridge/state", "zigbee2mqtt/bridge/devices", "zigbee2mqtt/bridge"]
)
def test_bridge_topics_decode_to_nothing(topic: str) -> None:
    # Even when huge or not JSON: the bridge is not a button.
    assert decode(topic, b"x" * 10_000) == []


@pytest.mark.parametrize(
    ("event", "kind"), [(name, kind) for name, kind in OWN_EVENT_KINDS.items()]
)
def test_own_schema_events(event: str, kind: EventKind) -> None:
    payload = encode_own_event(event)
    assert decode("alarm/buttons/kl-0042/event", payload) == [
        DeviceEvent(kind=kind, address=BUTTON, raw=payload, code=event)
    ]


def test_own_schema_optional_fields() -> None:
    payload = {"v": 1, "event": "sos", "seq": 17, "ts": 1728995880, "battery": 64, "rssi": -71}
    [event] = decode("alarm/buttons/kl-0042/event", payload)
    assert event.kind is EventKind.EMERGENCY
    assert event.battery_pct == 64.0
    assert dict(event.extra) == {"seq": "17", "ts": "2024-10-15T12:38:00+00:00", "rssi": "-71"}


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2024-10-15T20:38:00+08:00", "2024-10-15T12:38:00+00:00"),
        ("2024-10-15T12:38:00Z", "2024-10-15T12:38:00+00:00"),
        (1728995880.5, "2024-10-15T12:38:00.500000+00:00"),
    ],
)
def test_own_schema_timestamps(ts: object, expected: str) -> None:
    [event] = decode("alarm/buttons/kl-0042/event", {"v": 1, "event": "status", "ts": ts})
    assert dict(event.extra)["ts"] == expected


def test_own_schema_ignores_unknown_fields() -> None:
    [event] = decode("alarm/buttons/kl-0042/event", {"v": 1, "event": "test", "fw": "1.2"})
    assert event.kind is EventKind.TEST


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"event": "sos"}, "schema version None"),
        ({"v": 2, "event": "sos"}, "schema version 2"),
        ({"v": True, "event": "sos"}, "schema version True"),
        ({"v": "1", "event": "sos"}, "schema version '1'"),
        ({"v": 1}, "unknown button event None"),
        ({"v": 1, "event": "fire"}, "unknown button event 'fire'"),
        ({"v": 1, "event": ["sos"]}, "unknown button event"),
        ({"v": 1, "event": "status", "seq": -1}, "invalid fields: seq"),
        ({"v": 1, "event": "status", "seq": "7"}, "invalid fields: seq"),
        ({"v": 1, "event": "status", "ts": "2024-10-15T20:38:00"}, "invalid fields: ts"),
        ({"v": 1, "event": "status", "ts": "yesterday"}, "invalid fields: ts"),
        ({"v": 1, "event": "status", "ts": -5}, "invalid fields: ts"),
        ({"v": 1, "event": "status", "ts": 1e300}, "invalid fields: ts"),
        ({"v": 1, "event": "cancel", "battery": 120}, "invalid fields: battery"),
        ({"v": 1, "event": "test", "rssi": 1.5, "battery": "x"}, "invalid fields: battery,rssi"),
        ([1, "sos"], "must be a JSON object, got list"),
        ("sos", "must be a JSON object, got str"),
    ],
)
def test_own_schema_rejects(payload: object, reason: str) -> None:
    raw = orjson.dumps(payload)
    with pytest.raises(DeviceProtocolError, match=reason.replace("(", r"\(")) as info:
        MqttDecoder().decode("alarm/buttons/kl-0042/event", raw)
    assert info.value.raw == raw


def test_own_schema_sos_survives_malformed_auxiliary_fields() -> None:
    payload = {"v": 1, "event": "sos", "seq": "x", "ts": "2024-10-15T20:38:00", "battery": 64}
    [event] = decode("alarm/buttons/kl-0042/event", payload)
    assert event.kind is EventKind.EMERGENCY
    assert event.battery_pct == 64.0
    assert dict(event.extra) == {"invalid_fields": "seq,ts"}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b'{"action": NaN}', "not JSON"),
        (b"", "not JSON"),
        (b"42", "must be a JSON object, got int"),
        (b"null", "must be a JSON object, got NoneType"),
    ],
)
@pytest.mark.parametrize("topic", ["zigbee2mqtt/sos-0001", "alarm/buttons/kl-0042/event"])
def test_malformed_payloads(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(DeviceProtocolError, match=reason) as info:
        MqttDecoder().decode(topic, payload)
    assert info.value.raw == payload


@pytest.mark.parametrize(
    "topic",
    [
        "zigbee2mqtt/sos-0001",
        "zigbee2mqtt/sos-0001/availability",
        "alarm/buttons/kl-0042/event",
    ],
)
def test_oversized_payload(topic: str) -> None:
    # Valid for both schemas, so only the size can make it fail.
    payload = b'{"v":1,"event":"sos","action":"emergency","pad":"' + b"x" * 100 + b'"}'
    with pytest.raises(DeviceProtocolError, match="exceeds 64") as info:
        MqttDecoder(max_payload=64).decode(topic, payload)
    assert info.value.raw == payload
    state_topic = topic.removesuffix("/availability")
    [event] = MqttDecoder(max_payload=len(payload)).decode(state_topic, payload)
    assert event.kind is EventKind.EMERGENCY


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("zigbee2mqtt/", "unknown zigbee2mqtt topic shape"),
        ("zigbee2mqtt/kitchen/sos", "unknown zigbee2mqtt topic shape"),
        ("zigbee2mqtt/sos-0001/set", "unknown zigbee2mqtt topic shape"),
        ("zigbee2mqtt/sos-0001/availability/x", "unknown zigbee2mqtt topic shape"),
        ("alarm/buttons/kl-0042", "unknown button topic shape"),
        ("alarm/buttons/kl-0042/status", "unknown button topic shape"),
        ("alarm/buttons//event", "unknown button topic shape"),
        ("alarm/buttons/a/b/event", "unknown button topic shape"),
        ("zigbee2mqtt", "outside the configured bases"),
        ("homeassistant/sensor/x/config", "outside the configured bases"),
    ],
)
def test_unknown_topic_shapes(topic: str, reason: str) -> None:
    with pytest.raises(DeviceProtocolError, match=reason):
        decode(topic, {"action": "emergency"})


def test_custom_actions_and_nested_bases() -> None:
    decoder = MqttDecoder(
        z2m_base="site",
        own_base="site/buttons",
        emergency_actions=frozenset({"press"}),
        cancel_actions=frozenset({"release"}),
    )
    [sos] = decoder.decode("site/sos-1", b'{"action":"press"}')
    assert (sos.kind, sos.address.value) == (EventKind.EMERGENCY, "site/sos-1")
    [own] = decoder.decode("site/buttons/b1/event", encode_own_event("sos"))
    assert (own.kind, own.address.value) == (EventKind.EMERGENCY, "site/buttons/b1")
    [other] = decoder.decode("site/sos-1", b'{"action":"emergency"}')
    assert (other.kind, other.code) == (EventKind.STATUS, "emergency")


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"z2m_base": "zigbee2mqtt/#"}, "z2m_base"),
        ({"own_base": "alarm/buttons/"}, "own_base"),
        ({"own_base": ""}, "own_base"),
        ({"own_base": "zigbee2mqtt"}, "must differ"),
        ({"cancel_actions": frozenset({"sos"})}, "both emergency and cancel"),
        ({"max_payload": 0}, "max_payload"),
    ],
)
def test_bad_configuration(kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        MqttDecoder(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"event": "fire"}, "unknown button event"),
        ({"event": "sos", "seq": -1}, "seq"),
        ({"event": "sos", "battery": 101}, "battery"),
        ({"event": "sos", "ts": float("nan")}, "ts"),
    ],
)
def test_encode_rejects(kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        encode_own_event(**kwargs)  # type: ignore[arg-type]


@FUZZ
@given(
    event=st.sampled_from(sorted(OWN_EVENT_KINDS)),
    seq=st.none() | st.integers(0, 2**63 - 1),
    battery=st.none() | st.integers(0, 100),
    ts=st.none() | st.floats(0, 4e9),
    device=st.from_regex(r"[a-z0-9][a-z0-9_-]{0,15}", fullmatch=True),
)
def test_encode_decode_round_trip(
    event: str, seq: int | None, battery: int | None, ts: float | None, device: str
) -> None:
    payload = encode_own_event(event, seq=seq, battery=battery, ts=ts)
    [decoded] = MqttDecoder().decode(f"alarm/buttons/{device}/event", payload)
    assert decoded.kind is OWN_EVENT_KINDS[event]
    assert decoded.code == event
    assert decoded.address == DeviceAddress(AddressScheme.MQTT, f"alarm/buttons/{device}")
    assert decoded.battery_pct == (None if battery is None else float(battery))
    extra = dict(decoded.extra)
    assert extra.get("seq") == (None if seq is None else str(seq))
    assert ("ts" in extra) == (ts is not None)
    assert "invalid_fields" not in extra


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(
            ["v", "event", "seq", "ts", "battery", "rssi", "action", "voltage", "linkquality",
             "battery_low", "tamper", "state", "x"]
        ),
        children,
        max_size=6,
    ),
    max_leaves=12,
)  # fmt: skip
topics = st.one_of(
    st.sampled_from(
        [
            "zigbee2mqtt/sos-0001",
            "zigbee2mqtt/sos-0001/availability",
            "zigbee2mqtt/bridge/state",
            "alarm/buttons/kl-0042/event",
        ]
    ),
    st.text(max_size=40),
    st.from_regex(r"(zigbee2mqtt|alarm/buttons)(/[a-z+#]{0,4}){0,4}", fullmatch=True),
)
# orjson writes NaN and infinities as null, so every generated value serialises.
payloads = st.one_of(st.binary(max_size=64), json_values.map(orjson.dumps))


@FUZZ
@given(topic=topics, payload=payloads)
def test_arbitrary_messages_raise_only_protocol_errors(topic: str, payload: bytes) -> None:
    error: DeviceProtocolError | None = None
    events: list[DeviceEvent] = []
    try:
        events = MqttDecoder().decode(topic, payload)
    except DeviceProtocolError as exc:
        error = exc
    if error is not None:
        assert error.raw == payload
    for event in events:
        assert event.raw == payload
        assert event.address.scheme is AddressScheme.MQTT


# -- issue 9, fault 1: calendar and numeric edges never escape as anything but the typed error

OWN = "alarm/buttons/kl-0042/event"

EDGE_TIMESTAMPS: list[object] = [
    "0001-01-01T00:00:00+08:00",  # a reset clock in UTC+8: before datetime.min in UTC
    "0001-01-01T00:00:00+23:59",
    "9999-12-31T23:59:59-08:00",  # after datetime.max in UTC
    "9999-12-31T23:59:59.999999-23:59",
    "2023-02-29T00:00:00+08:00",  # not a leap year
    "2016-12-31T23:59:60Z",  # a leap second: Python has none
    "2024-10-15T20:38:00+24:00",
    2**64,
    10**30,
    1.7976931348623157e308,
    253402300800,  # 10000-01-01 in unix seconds
    1728995880123,  # milliseconds
    1728995880123456789,  # nanoseconds
]


@pytest.mark.parametrize("ts", EDGE_TIMESTAMPS)
def test_calendar_edges_are_typed_errors(ts: object) -> None:
    raw = json.dumps({"v": 1, "event": "status", "ts": ts}).encode()
    with pytest.raises(DeviceProtocolError) as info:
        MqttDecoder().decode(OWN, raw)
    assert info.value.reason == "invalid fields: ts"
    assert info.value.raw == raw


def test_negative_zero_is_the_epoch() -> None:
    [event] = MqttDecoder().decode(OWN, b'{"v": 1, "event": "status", "ts": -0.0}')
    assert dict(event.extra)["ts"] == "1970-01-01T00:00:00+00:00"


@pytest.mark.parametrize("ts", EDGE_TIMESTAMPS)
def test_an_sos_with_a_calendar_edge_still_raises_the_alarm(ts: object) -> None:
    raw = json.dumps({"v": 1, "event": "sos", "seq": 3, "ts": ts}).encode()
    [event] = MqttDecoder().decode(OWN, raw)
    assert event.kind is EventKind.EMERGENCY
    extra = dict(event.extra)
    assert extra["seq"] == "3"
    assert "ts" in extra or extra["invalid_fields"] == "ts"


def test_the_reported_poison_payload_is_an_sos_without_its_time() -> None:
    raw = b'{"v": 1, "event": "sos", "seq": 9, "ts": "0001-01-01T00:00:00+08:00"}'
    [event] = MqttDecoder().decode(OWN, raw)
    assert event.kind is EventKind.EMERGENCY
    assert dict(event.extra) == {"seq": "9", "invalid_fields": "ts"}


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (OWN, b'{"v": 1, "event": "status", "ts": NaN}', "not JSON"),
        (OWN, b'{"v": 1, "event": "status", "ts": Infinity}', "not JSON"),
        (OWN, b'{"v": 1, "event": "status", "ts": -Infinity}', "not JSON"),
        (OWN, b'{"v": 1, "event": "status", "battery": 1e400}', "not JSON"),
        (OWN, b'{"v": 1, "event": "status", "seq": ' + b"9" * 400 + b"}", "not JSON"),
        (OWN, b"[" * 5000 + b"]" * 5000, "exceeds 4096"),
        (OWN, b"[" * 2000 + b"]" * 2000, "not JSON"),
        (OWN, b'{"v": 1, "event": "\\ud800"}', "not JSON"),
        (OWN, b'{"v": 1, "event": "sos\xed\xa0\x80"}', "not UTF-8"),
        (OWN, b'{"v": 1, "event": "\xc0\xaf"}', "not UTF-8"),
        ("zigbee2mqtt/sos-0001", b'{"action": "status", "battery": 1e308}', "invalid fields"),
        ("zigbee2mqtt/sos-0001", b'{"voltage": 1e308}', "invalid fields: voltage"),
        ("zigbee2mqtt/sos-0001/availability", b'{"state": "\\udfff"}', "not JSON"),
        ("zigbee2mqtt/sos-0001/availability", b"\xed\xa0\x80", "not UTF-8"),
    ],
)
def test_numeric_and_unicode_edges_are_typed_errors(topic: str, payload: bytes,
                                                    reason: str) -> None:
    with pytest.raises(DeviceProtocolError, match=reason) as info:
        MqttDecoder().decode(topic, payload)
    assert info.value.raw == payload


def test_any_other_exception_becomes_the_typed_error_at_the_boundary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import devices.mqtt_payloads as module

    def broken(*_: object) -> object:
        raise OverflowError("date value out of range")

    # Stands in for a bug nobody has found yet: the boundary must still hold.
    monkeypatch.setattr(module, "_own_event", broken)
    raw = encode_own_event("sos", seq=1)
    with pytest.raises(DeviceProtocolError, match="OverflowError") as info:
        MqttDecoder().decode(OWN, raw)
    assert info.value.raw == raw
    assert isinstance(info.value.__cause__, OverflowError)


# -- issue 9, fault 5: the end-to-end confirmation of our own buttons


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"v": 1, "event": "sos", "seq": 1017, "ts": 1728995880}',
         {"v": 1, "seq": 1017, "ts": 1728995880}),
        (b'{"v": 1, "event": "sos", "ts": "2024-10-15T20:38:00+08:00"}',
         {"v": 1, "ts": "2024-10-15T20:38:00+08:00"}),  # echoed as sent, not as stored
        (b'{"v": 1, "event": "test"}', {"v": 1}),
        # Only what decoded: a bad seq is not echoed (the sos still raised the alarm).
        (b'{"v": 1, "event": "sos", "seq": "x", "ts": 1.5}', {"v": 1, "ts": 1.5}),
    ],
)
def test_own_button_confirmation(payload: bytes, expected: dict[str, object]) -> None:
    decoder = MqttDecoder()
    [event] = decoder.decode(OWN, payload)
    confirmation = decoder.confirmation(event)
    assert confirmation is not None
    topic, body = confirmation
    assert topic == "alarm/buttons/kl-0042/confirm"
    assert orjson.loads(body) == {**expected, "digest": hashlib.sha256(payload).hexdigest()[:16]}


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("zigbee2mqtt/sos-0001", b'{"action": "emergency"}'),
        ("zigbee2mqtt/sos-0001/availability", b"online"),
    ],
)
def test_zigbee2mqtt_devices_get_no_confirmation(topic: str, payload: bytes) -> None:
    decoder = MqttDecoder()
    for event in decoder.decode(topic, payload):
        assert decoder.confirmation(event) is None


def test_confirmation_follows_a_custom_base() -> None:
    decoder = MqttDecoder(own_base="kenli/buttons")
    [event] = decoder.decode("kenli/buttons/b-1/event", encode_own_event("sos", seq=2))
    assert decoder.confirmation(event) is not None
    assert decoder.confirmation(event)[0] == "kenli/buttons/b-1/confirm"  # type: ignore[index]
    # An event of another decoder's base is not this decoder's to confirm.
    assert MqttDecoder().confirmation(event) is None


@pytest.mark.parametrize(
    ("last_seen", "expected"),
    [
        (1728995880500, 1728995880.5),  # advanced.last_seen: epoch (milliseconds)
        ("2024-10-15T12:38:00.500+0000", 1728995880.5),  # ISO_8601 as Zigbee2MQTT writes it
        ("2024-10-15T20:38:00.500+08:00", 1728995880.5),  # ISO_8601_local
    ],
)
def test_zigbee2mqtt_last_seen_is_the_time_the_bridge_heard_it(
    last_seen: object, expected: float
) -> None:
    [event] = decode("zigbee2mqtt/sos-0001", {"action": "emergency", "last_seen": last_seen})
    assert event.sent_at == pytest.approx(expected)
    [plain] = decode("zigbee2mqtt/sos-0001", {"action": "emergency"})
    assert plain.sent_at is None


def test_a_bad_last_seen_never_costs_the_alarm() -> None:
    [event] = decode("zigbee2mqtt/sos-0001",
                     {"action": "emergency", "last_seen": "2024-10-15 12:38"})  # no offset
    assert event.kind is EventKind.EMERGENCY and event.sent_at is None
    assert dict(event.extra) == {"invalid_fields": "last_seen"}


def test_own_schema_ts_is_the_time_the_device_sent_it() -> None:
    [event] = decode("alarm/buttons/kl-0042/event",
                     {"v": 1, "event": "sos", "ts": "2024-10-15T20:38:00+08:00"})
    assert event.sent_at == 1728995880.0
