"""Contact ID (SIA DC-05) parsing, checksum and encoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.contact_id import (
    DEFAULT_EVENT_KINDS,
    checksum_digit,
    encode_contact_id,
    parse_contact_id,
)
from devices.events import (
    AddressScheme,
    DeviceAddress,
    DeviceEvent,
    DeviceProtocolError,
    EventKind,
    Qualifier,
)

HEX = "0123456789ABCDEF"
FUZZ = settings(max_examples=150, deadline=None)


def hex_text(length: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=HEX, min_size=length, max_size=length)


def digit_value(char: str) -> int:
    value = int(char, 16)
    return 10 if value == 0 else value


def test_spandsp_vector() -> None:
    event = parse_contact_id("1234181131010158")
    assert event == DeviceEvent(
        kind=EventKind.TROUBLE,  # 131 (perimeter burglary) is not in our mapping
        address=DeviceAddress(AddressScheme.CONTACT_ID, "1234"),
        raw=b"1234181131010158",
        code="131",
        qualifier=Qualifier.NEW,
        group="01",
        zone="015",
    )


@pytest.mark.parametrize(
    ("message", "account", "kind", "qualifier", "code", "group", "zone"),
    [
        ("123418110101001B", "1234", EventKind.EMERGENCY, Qualifier.NEW, "101", "01", "001"),
        ("0572183101010038", "0572", EventKind.EMERGENCY, Qualifier.RESTORE, "101", "01", "003"),
        ("BEEF18664102000D", "BEEF", EventKind.INACTIVITY, Qualifier.PREVIOUS, "641", "02", "000"),
        ("1234981602000009", "1234", EventKind.TEST, Qualifier.NEW, "602", "00", "000"),
        ("1234181406010013", "1234", EventKind.CANCEL, Qualifier.NEW, "406", "01", "001"),
        # Lower case on the wire still addresses the upper-case account.
        ("beef18664102000d", "BEEF", EventKind.INACTIVITY, Qualifier.PREVIOUS, "641", "02", "000"),
    ],
)
def test_captured_messages(
    message: str,
    account: str,
    kind: EventKind,
    qualifier: Qualifier,
    code: str,
    group: str,
    zone: str,
) -> None:
    event = parse_contact_id(message)
    assert (event.address.value, event.kind, event.qualifier) == (account, kind, qualifier)
    assert (event.code, event.group, event.zone) == (code, group, zone)
    assert event.raw == message.encode()


def test_bytes_input_and_explicit_raw() -> None:
    assert parse_contact_id(b"1234181131010158").raw == b"1234181131010158"
    framed = b"\n1234181131010158\x14"
    assert parse_contact_id(b"1234181131010158", raw=framed).raw == framed


@pytest.mark.parametrize(
    ("digits15", "expected"),
    [
        ("123418113101015", "8"),  # the spandsp vector
        ("000000000000000", "F"),  # already a multiple of 15: fifteen, sent as F
        ("F00000000000000", "0"),  # ten is sent as DTMF 0
        ("123418110101001", "B"),
    ],
)
def test_checksum_digit(digits15: str, expected: str) -> None:
    assert checksum_digit(digits15) == expected


def test_checksum_a_counts_as_ten() -> None:
    # We send ten as "0"; a sender may use "A", which is worth ten as well.
    assert parse_contact_id("1234181101010020").zone == "002"
    assert parse_contact_id("123418110101002A").zone == "002"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("123418113101015", "16 hex digits, got 15"),
        ("12341811310101588", "16 hex digits, got 17"),
        ("", "got 0"),
        ("123418113101015G", "not hexadecimal"),
        ("1234 8113101015 ", "not hexadecimal"),
        ("123418113101015\N{LATIN SMALL LIGATURE FF}", "not hexadecimal"),
        ("1234181131010159", "checksum mismatch: expected 8, got 9"),
        ("1234171131010159", "message type must be 18 or 98, got 17"),
        ("1234182131010157", "qualifier must be 1, 3 or 6, got 2"),
    ],
)
def test_rejects(message: str, reason: str) -> None:
    with pytest.raises(DeviceProtocolError, match=reason) as info:
        parse_contact_id(message)
    assert info.value.raw == message.encode()


def test_rejects_non_ascii_bytes() -> None:
    raw = "12341811310101５8".encode()
    with pytest.raises(DeviceProtocolError, match="not ASCII") as info:
        parse_contact_id(raw)
    assert info.value.raw == raw


def test_checksum_digit_rejects_bad_input() -> None:
    with pytest.raises(DeviceProtocolError, match="15 hex digits"):
        checksum_digit("1234")
    with pytest.raises(DeviceProtocolError, match="not hexadecimal"):
        checksum_digit("12341811310101Z")


def test_default_mapping_matches_the_brief() -> None:
    expected = {
        EventKind.EMERGENCY: {"100", "101", "120", "121", "122", "110", "111"},
        EventKind.CANCEL: {"406"},
        EventKind.TEST: {"602", "603"},
        EventKind.LOW_BATTERY: {"302", "384", "309"},
        EventKind.TAMPER: {"137", "144", "145", "383"},
        EventKind.INACTIVITY: {"641"},
        EventKind.POWER_LOSS: {"301"},
    }
    flattened = {code: kind for kind, codes in expected.items() for code in codes}
    assert dict(DEFAULT_EVENT_KINDS) == flattened
    for code, kind in flattened.items():
        message = encode_contact_id("1234", Qualifier.NEW, code)
        assert parse_contact_id(message).kind is kind


def test_unknown_code_is_trouble_not_dropped() -> None:
    message = encode_contact_id("1234", Qualifier.NEW, "373")
    assert parse_contact_id(message).kind is EventKind.TROUBLE


def test_mapping_is_overridable() -> None:
    message = encode_contact_id("1234", Qualifier.NEW, "131")
    kinds = {"131": EventKind.EMERGENCY}
    assert parse_contact_id(message, kinds=kinds).kind is EventKind.EMERGENCY
    # With a configured mapping, codes it leaves out are TROUBLE.
    fall = encode_contact_id("1234", Qualifier.NEW, "101")
    assert parse_contact_id(fall, kinds=kinds).kind is EventKind.TROUBLE


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"account": "123"}, "account must be 4"),
        ({"account": "12G4"}, "account is not hexadecimal"),
        ({"code": "1011"}, "event code must be 3"),
        ({"group": "1"}, "group must be 2"),
        ({"zone": "0001"}, "zone must be 3"),
        ({"mt": "17"}, "message type must be 18 or 98"),
    ],
)
def test_encode_rejects_bad_fields(kwargs: dict[str, str], reason: str) -> None:
    args = {"account": "1234", "code": "101", "group": "01", "zone": "001", "mt": "18"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=reason):
        encode_contact_id(
            args["account"],
            Qualifier.NEW,
            args["code"],
            group=args["group"],
            zone=args["zone"],
            mt=args["mt"],
        )


@FUZZ
@given(
    account=hex_text(4),
    qualifier=st.sampled_from(Qualifier),
    code=hex_text(3),
    group=hex_text(2),
    zone=hex_text(3),
    mt=st.sampled_from(["18", "98"]),
)
def test_encode_parse_round_trip(
    account: str, qualifier: Qualifier, code: str, group: str, zone: str, mt: str
) -> None:
    message = encode_contact_id(account, qualifier, code, group, zone, mt)
    assert len(message) == 16
    assert sum(digit_value(c) for c in message) % 15 == 0
    event = parse_contact_id(message)
    assert event.address == DeviceAddress(AddressScheme.CONTACT_ID, account)
    assert (event.qualifier, event.code, event.group, event.zone) == (qualifier, code, group, zone)
    assert event.kind is DEFAULT_EVENT_KINDS.get(code, EventKind.TROUBLE)


@FUZZ
@given(
    body=hex_text(15).map(lambda s: s[:4] + "181" + s[7:]),
    position=st.integers(0, 15),
    replacement=st.sampled_from(HEX),
)
def test_any_single_digit_change_is_detected(body: str, position: int, replacement: str) -> None:
    message = body + checksum_digit(body)
    if digit_value(replacement) == digit_value(message[position]):
        return  # "0" and "A" are both ten: not a change the checksum can see
    corrupted = message[:position] + replacement + message[position + 1 :]
    with pytest.raises(DeviceProtocolError):
        parse_contact_id(corrupted)


@FUZZ
@given(st.one_of(st.binary(max_size=24), st.text(max_size=24), hex_text(16)))
def test_arbitrary_input_raises_only_protocol_errors(message: str | bytes) -> None:
    error: DeviceProtocolError | None = None
    try:
        event = parse_contact_id(message)
    except DeviceProtocolError as exc:
        error = exc
    if error is not None:
        assert error.reason
    else:
        assert event.address.scheme is AddressScheme.CONTACT_ID
        assert len(event.address.value) == 4


def test_any_other_exception_becomes_the_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9: the decoder's boundary holds even for a bug nobody has found yet."""
    import devices.contact_id as module

    def broken(**_: object) -> object:
        raise OverflowError("boom")

    monkeypatch.setattr(module, "event_from_fields", broken)
    message = encode_contact_id("1234", Qualifier.NEW, "101")
    with pytest.raises(DeviceProtocolError, match="OverflowError") as info:
        parse_contact_id(message.encode())
    assert info.value.raw == message.encode()
