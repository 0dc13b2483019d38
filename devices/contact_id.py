"""Ademco Contact ID (SIA DC-05) messages: parse, validate and encode.

A Contact ID message is 16 hex digits ``ACCT MT Q XYZ GG CCC S`` with no
spaces on the wire. ``S`` makes the sum of all 16 digit values a multiple of 15,
where the digit ``0`` counts as 10 (it is DTMF "0", value ten) and ``B``..``F``
as 11..15. The receivers we read (Sur-Gard) strip the checksum and reformat the
fields, so :func:`event_from_fields` is shared with :mod:`devices.surgard`.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from devices.events import (
    AddressScheme,
    DeviceAddress,
    DeviceEvent,
    DeviceProtocolError,
    EventKind,
    Qualifier,
    protocol_boundary,
)

__all__ = [
    "DEFAULT_EVENT_KINDS",
    "MESSAGE_TYPES",
    "QUALIFIER_DIGITS",
    "checksum_digit",
    "encode_contact_id",
    "event_from_fields",
    "kind_for_code",
    "parse_contact_id",
]


def _kinds(kind: EventKind, *codes: str) -> dict[str, EventKind]:
    return dict.fromkeys(codes, kind)


DEFAULT_EVENT_KINDS: Mapping[str, EventKind] = MappingProxyType(
    {
        **_kinds(EventKind.EMERGENCY, "100", "101", "120", "121", "122", "110", "111"),
        **_kinds(EventKind.CANCEL, "406"),
        **_kinds(EventKind.TEST, "602", "603"),
        **_kinds(EventKind.LOW_BATTERY, "302", "384", "309"),
        **_kinds(EventKind.TAMPER, "137", "144", "145", "383"),
        **_kinds(EventKind.INACTIVITY, "641"),
        **_kinds(EventKind.POWER_LOSS, "301"),
    }
)
"""Contact ID event code -> kind. Codes not listed decode as ``EventKind.TROUBLE``.

Configuration may pass its own mapping to the decoders; keys are 3 upper-case
hex characters.
"""

MESSAGE_TYPES: frozenset[str] = frozenset({"18", "98"})
"""Accepted Contact ID message types (``18`` standard, ``98`` the optional form)."""

QUALIFIER_DIGITS: Mapping[Qualifier, str] = MappingProxyType(
    {Qualifier.NEW: "1", Qualifier.RESTORE: "3", Qualifier.PREVIOUS: "6"}
)
"""Qualifier -> its Contact ID digit."""

_QUALIFIER_BY_DIGIT: Mapping[str, Qualifier] = MappingProxyType(
    {digit: qualifier for qualifier, digit in QUALIFIER_DIGITS.items()}
)
_HEX = frozenset("0123456789ABCDEFabcdef")
# DTMF "0" carries the value ten in Contact ID, so a checksum of ten is sent as "0";
# a checksum of zero is impossible (fifteen is sent as "F" instead).
_CHECKSUM_CHARS = "-1234567890BCDEF"  # indexed by the needed value 1..15


def _digit_value(char: str) -> int:
    value = int(char, 16)
    return 10 if value == 0 else value


def _require_hex(text: str, what: str, length: int, raw: bytes) -> str:
    if len(text) != length:
        raise DeviceProtocolError(
            f"contact id {what} must be {length} hex digits, got {len(text)}", raw
        )
    # Check before upper-casing: some characters (e.g. the ligature "ﬀ") upper-case
    # to several hex letters and would shift every field.
    if not set(text) <= _HEX:
        raise DeviceProtocolError(f"contact id {what} is not hexadecimal: {text!r}", raw)
    return text.upper()


def checksum_digit(digits15: str) -> str:
    """Return the checksum digit that completes 15 hex digits to a valid message.

    Raises :class:`DeviceProtocolError` if ``digits15`` is not 15 hex digits.
    """
    raw = digits15.encode("utf-8", "backslashreplace")
    with protocol_boundary("contact id checksum", raw):
        digits = _require_hex(digits15, "message without checksum", 15, raw)
        remainder = sum(_digit_value(c) for c in digits) % 15
        return _CHECKSUM_CHARS[15 - remainder]


def kind_for_code(code: str, kinds: Mapping[str, EventKind] = DEFAULT_EVENT_KINDS) -> EventKind:
    """Map a Contact ID event code to a kind; unknown codes are ``TROUBLE``.

    Unknown codes still become events (never dropped) so an operator sees them.
    """
    return kinds.get(code.upper(), EventKind.TROUBLE)


def event_from_fields(
    *,
    account: str,
    qualifier: Qualifier,
    code: str,
    group: str,
    zone: str,
    raw: bytes,
    kinds: Mapping[str, EventKind] = DEFAULT_EVENT_KINDS,
    extra: tuple[tuple[str, str], ...] = (),
) -> DeviceEvent:
    """Build the :class:`DeviceEvent` for already-validated Contact ID fields.

    Fields are upper-cased so that ``abcd`` and ``ABCD`` address the same account.
    """
    upper_code = code.upper()
    return DeviceEvent(
        kind=kind_for_code(upper_code, kinds),
        address=DeviceAddress(AddressScheme.CONTACT_ID, account.upper()),
        raw=raw,
        code=upper_code,
        qualifier=qualifier,
        group=group.upper(),
        zone=zone.upper(),
        extra=extra,
    )


def parse_contact_id(
    message: str | bytes,
    *,
    kinds: Mapping[str, EventKind] = DEFAULT_EVENT_KINDS,
    raw: bytes | None = None,
) -> DeviceEvent:
    """Parse one 16-digit Contact ID message into a :class:`DeviceEvent`.

    ``raw`` is what the journal keeps; it defaults to ``message`` as bytes.
    Raises :class:`DeviceProtocolError` (and nothing else) for a wrong length,
    non-hex digits, a bad checksum, an unknown message type or qualifier, and,
    naming the exception, for any other failure on this input.
    """
    if raw is not None:
        shown = raw
    elif isinstance(message, bytes):
        shown = message
    else:
        shown = message.encode("utf-8", "backslashreplace")
    with protocol_boundary("contact id decoder", shown):
        return _parse_contact_id(message, kinds, raw)


def _parse_contact_id(
    message: str | bytes, kinds: Mapping[str, EventKind], raw: bytes | None
) -> DeviceEvent:
    if isinstance(message, bytes):
        kept = message if raw is None else raw
        try:
            text = message.decode("ascii")
        except UnicodeDecodeError:
            raise DeviceProtocolError("contact id message is not ASCII", kept) from None
    else:
        text = message
        kept = message.encode("utf-8", "backslashreplace") if raw is None else raw

    digits = _require_hex(text, "message", 16, kept)
    # Verified by the sum rule, not by comparing with checksum_digit(): "A" also has
    # the value ten, so a sender may use it where we would send "0".
    if sum(_digit_value(c) for c in digits) % 15 != 0:
        raise DeviceProtocolError(
            f"contact id checksum mismatch: expected {checksum_digit(digits[:15])}, "
            f"got {digits[15]}",
            kept,
        )
    mt = digits[4:6]
    if mt not in MESSAGE_TYPES:
        raise DeviceProtocolError(f"contact id message type must be 18 or 98, got {mt}", kept)
    qualifier = _QUALIFIER_BY_DIGIT.get(digits[6])
    if qualifier is None:
        raise DeviceProtocolError(f"contact id qualifier must be 1, 3 or 6, got {digits[6]}", kept)
    return event_from_fields(
        account=digits[0:4],
        qualifier=qualifier,
        code=digits[7:10],
        group=digits[10:12],
        zone=digits[12:15],
        raw=kept,
        kinds=kinds,
    )


def encode_contact_id(
    account: str,
    qualifier: Qualifier,
    code: str,
    group: str = "01",
    zone: str = "001",
    mt: str = "18",
) -> str:
    """Encode a Contact ID message with its checksum (for simulators and tests).

    Raises :class:`ValueError` for fields of the wrong length or alphabet.
    """
    if mt not in MESSAGE_TYPES:
        raise ValueError(f"message type must be 18 or 98, got {mt!r}")
    try:
        fields = (
            _require_hex(account, "account", 4, b""),
            mt,
            QUALIFIER_DIGITS[qualifier],
            _require_hex(code, "event code", 3, b""),
            _require_hex(group, "group", 2, b""),
            _require_hex(zone, "zone", 3, b""),
        )
    except DeviceProtocolError as exc:
        raise ValueError(exc.reason) from None
    body = "".join(fields)
    return body + checksum_digit(body)
