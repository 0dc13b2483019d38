"""SMS-SUBMIT PDUs for a GSM modem in PDU mode (3GPP TS 23.040, 23.038, 27.005).

Pure code: no I/O, no asyncio, no clock. :func:`encode_submit` turns a number and
a text into the hex strings ``AT+CMGS`` wants; :func:`decode_submit` reads them
back (the modem simulator and the tests use it to check round trips).

Layout of one PDU as this module writes it::

    SCA        00 (the SIM's default SMSC) or len 91 <semi-octets>
    first      TP-MTI=01 SUBMIT | TP-VPF=10 relative | TP-SRR | TP-UDHI
    TP-MR      00 (the modem assigns the real reference and reports it in +CMGS)
    TP-DA      <digit count> 91 <semi-octets, F-padded>
    TP-PID     00
    TP-DCS     00 (GSM 7-bit default alphabet) or 08 (UCS-2)
    TP-VP      relative, one octet (only when a validity is given)
    TP-UDL     septets (7-bit) or octets (UCS-2), the header included
    TP-UD      [05 00 03 ref total seq] + text

Text that fits the GSM 7-bit default alphabet and its extension table (an
extension character costs two septets: ESC + code) goes as 7-bit; anything
else, which includes every Chinese character, goes as UCS-2, written as UTF-16
so characters outside the BMP survive as surrogate pairs (what phones do). One
message carries 160 septets or 70 UTF-16 units; a longer text is split into
parts of 153 septets or 67 units behind a concatenation header with an 8-bit
reference, never splitting an escape pair or a surrogate pair. In a 7-bit part
the six header octets are followed by one fill bit so the text starts on a
septet boundary (23.040 9.2.3.24).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "GSM7_ALPHABET",
    "GSM7_EXTENSION",
    "MAX_PARTS",
    "Pdu",
    "PduError",
    "decode_submit",
    "encode_submit",
    "segments_needed",
]

# 3GPP TS 23.038 6.2.1: the default alphabet, indexed by septet value. 0x1B is
# the escape to the extension table, not a character (a space stands in for it).
GSM7_ALPHABET: Final = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ ÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# 23.038 6.2.1.1: the basic extension table, reached by ESC (0x1B).
GSM7_EXTENSION: Final = {
    "\f": 0x0A,
    "^": 0x14,
    "{": 0x28,
    "}": 0x29,
    "\\": 0x2F,
    "[": 0x3C,
    "~": 0x3D,
    "]": 0x3E,
    "|": 0x40,
    "€": 0x65,
}
#: The concatenation header counts parts in one octet.
MAX_PARTS: Final = 255

_ESC: Final = 0x1B
_GSM7_CODE: Final = {ch: i for i, ch in enumerate(GSM7_ALPHABET) if i != _ESC}
_GSM7_EXT_CHAR: Final = {code: ch for ch, code in GSM7_EXTENSION.items()}

_SEPTETS_SINGLE: Final = 160
_SEPTETS_PART: Final = 153
_UNITS_SINGLE: Final = 70
_UNITS_PART: Final = 67

_FIRST_MTI_SUBMIT: Final = 0x01
_FIRST_VPF_RELATIVE: Final = 0x10
_FIRST_SRR: Final = 0x20
_FIRST_UDHI: Final = 0x40
_TYPE_INTERNATIONAL: Final = 0x91
_DCS_GSM7: Final = 0x00
_DCS_UCS2: Final = 0x08
_IEI_CONCAT_8BIT: Final = 0x00
_IEI_CONCAT_16BIT: Final = 0x08
# 23.040 9.2.3.3: an address value holds at most 20 digits (10 octets).
_NUMBER = re.compile(r"\+([0-9]{1,20})")
_SEMI_OCTET_CHARS: Final = "0123456789*#abc"


class PduError(ValueError):
    """A PDU that cannot be built or read. ``reason`` says why, ``pdu`` is the input hex
    (empty when encoding)."""

    def __init__(self, reason: str, pdu: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.pdu = pdu


@dataclass(frozen=True)
class Pdu:
    """One SMS-SUBMIT ready for ``AT+CMGS=<tpdu_length>``.

    ``hex`` is the whole PDU in upper-case hex, starting with the SMSC field
    (``00``: the SIM's default SMSC). ``tpdu_length`` is the octet count after
    the SMSC field, the number ``AT+CMGS`` expects.
    """

    hex: str
    tpdu_length: int


# ----------------------------------------------------------------------------- encoding


def _gsm7_units(text: str) -> list[tuple[int, ...]] | None:
    """Septets per character (an escape pair stays one unit), or ``None`` when a
    character is outside the default alphabet and its extension table."""
    units: list[tuple[int, ...]] = []
    for ch in text:
        code = _GSM7_CODE.get(ch)
        if code is not None:
            units.append((code,))
            continue
        ext = GSM7_EXTENSION.get(ch)
        if ext is None:
            return None
        units.append((_ESC, ext))
    return units


def _ucs2_units(text: str) -> list[bytes]:
    """UTF-16BE bytes per character: two octets, or four for a surrogate pair."""
    units: list[bytes] = []
    for ch in text:
        try:
            units.append(ch.encode("utf-16-be"))
        except UnicodeEncodeError as exc:
            raise PduError(f"text contains a lone surrogate U+{ord(ch):04X}") from exc
    return units


def _split(costs: list[int], single: int, part: int) -> list[tuple[int, int]]:
    """Index ranges of the parts: one range when everything fits a single message,
    else greedy parts of at most ``part`` (a unit that does not fit starts the next)."""
    if sum(costs) <= single:
        return [(0, len(costs))]
    ranges: list[tuple[int, int]] = []
    start = 0
    used = 0
    for i, cost in enumerate(costs):
        if used + cost > part:
            ranges.append((start, i))
            start, used = i, 0
        used += cost
    ranges.append((start, len(costs)))
    return ranges


def _pack_septets(septets: list[int]) -> bytes:
    """Septets packed LSB first (23.038 6.1.2.1.1)."""
    value = 0
    for i, septet in enumerate(septets):
        value |= septet << (7 * i)
    return value.to_bytes((7 * len(septets) + 7) // 8, "little")


def _unpack_septets(data: bytes, count: int) -> list[int]:
    value = int.from_bytes(data, "little")
    return [(value >> (7 * i)) & 0x7F for i in range(count)]


def _semi_octets(digits: str) -> bytes:
    padded = digits + "F" if len(digits) % 2 else digits
    return bytes(int(padded[i + 1] + padded[i], 16) for i in range(0, len(padded), 2))


def _international(number: str, what: str) -> str:
    match = _NUMBER.fullmatch(number)
    if match is None:
        raise PduError(f"{what} must be an international number '+' and 1 to 20 digits")
    return match.group(1)


def _relative_validity(minutes: int) -> int:
    """TP-VP relative format (23.040 9.2.3.12.1), rounded up so the message is never
    discarded earlier than asked; capped at the longest period it can express
    (63 weeks)."""
    if minutes <= 720:
        return max(0, math.ceil(minutes / 5) - 1)
    if minutes <= 1440:
        return 143 + math.ceil((minutes - 720) / 30)
    days = math.ceil(minutes / 1440)
    if days <= 30:
        return 166 + days
    weeks = math.ceil(minutes / 10080)
    return min(192 + weeks, 255)


def segments_needed(text: str) -> int:
    """How many SMS parts :func:`encode_submit` makes of ``text`` (an empty text is one)."""
    units = _gsm7_units(text)
    if units is not None:
        return len(_split([len(u) for u in units], _SEPTETS_SINGLE, _SEPTETS_PART))
    ucs2 = _ucs2_units(text)
    return len(_split([len(u) // 2 for u in ucs2], _UNITS_SINGLE, _UNITS_PART))


def encode_submit(
    to: str,
    text: str,
    *,
    reference: int = 0,
    validity_minutes: int | None = 1440,
    request_status_report: bool = False,
    smsc: str | None = None,
) -> list[Pdu]:
    """SMS-SUBMIT PDUs carrying ``text`` to ``to`` (``+`` and digits), one per part.

    ``reference`` (0-255) identifies the parts of one concatenated message to
    the phone; use a different one for each long message to the same number.
    ``validity_minutes`` ``None`` leaves the validity to the SMSC. ``smsc``
    (``+`` and digits) overrides the SIM's default service centre.
    Raises :class:`PduError` for a number that is not international, a
    reference out of range, a non-positive validity, a lone surrogate, or a
    text longer than :data:`MAX_PARTS` parts.
    """
    digits = _international(to, "destination")
    if not 0 <= reference <= 255:
        raise PduError(f"concatenation reference {reference} is not in 0..255")
    if validity_minutes is not None and validity_minutes < 1:
        raise PduError(f"validity_minutes {validity_minutes} must be >= 1")
    if smsc is None:
        sca = b"\x00"
    else:
        smsc_octets = _semi_octets(_international(smsc, "smsc"))
        sca = bytes([len(smsc_octets) + 1, _TYPE_INTERNATIONAL]) + smsc_octets

    septet_units = _gsm7_units(text)
    if septet_units is not None:
        dcs = _DCS_GSM7
        ranges = _split([len(u) for u in septet_units], _SEPTETS_SINGLE, _SEPTETS_PART)
    else:
        dcs = _DCS_UCS2
        octet_units = _ucs2_units(text)
        ranges = _split([len(u) // 2 for u in octet_units], _UNITS_SINGLE, _UNITS_PART)
    total = len(ranges)
    if total > MAX_PARTS:
        raise PduError(f"text needs {total} parts, more than {MAX_PARTS}")

    first = _FIRST_MTI_SUBMIT
    if validity_minutes is not None:
        first |= _FIRST_VPF_RELATIVE
    if request_status_report:
        first |= _FIRST_SRR
    if total > 1:
        first |= _FIRST_UDHI
    head = bytearray([first, 0x00, len(digits), _TYPE_INTERNATIONAL])
    head += _semi_octets(digits)
    head += bytes([0x00, dcs])
    if validity_minutes is not None:
        head.append(_relative_validity(validity_minutes))

    pdus: list[Pdu] = []
    for seq, (start, end) in enumerate(ranges, start=1):
        udh = bytes([5, _IEI_CONCAT_8BIT, 3, reference, total, seq]) if total > 1 else b""
        if septet_units is not None:
            septets = [s for unit in septet_units[start:end] for s in unit]
            # The header occupies whole septets (with fill bits): pack zero
            # septets in its place, then lay the header octets over them.
            header_septets = (len(udh) * 8 + 6) // 7
            packed = bytearray(_pack_septets([0] * header_septets + septets))
            packed[: len(udh)] = udh
            udl = header_septets + len(septets)
            user_data = bytes(packed)
        else:
            user_data = udh + b"".join(octet_units[start:end])
            udl = len(user_data)
        tpdu = bytes(head) + bytes([udl]) + user_data
        pdus.append(Pdu(hex=(sca + tpdu).hex().upper(), tpdu_length=len(tpdu)))
    return pdus


# ----------------------------------------------------------------------------- decoding


class _Reader:
    """Bounds-checked reading of PDU octets."""

    def __init__(self, data: bytes, source: str) -> None:
        self._data = data
        self._source = source
        self.pos = 0

    def fail(self, reason: str) -> PduError:
        return PduError(reason, self._source)

    def octet(self, what: str) -> int:
        return self.take(1, what)[0]

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self._data):
            raise self.fail(f"PDU ends inside {what}")
        chunk = self._data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def rest(self) -> bytes:
        chunk = self._data[self.pos :]
        self.pos = len(self._data)
        return chunk


def _gsm7_text(septets: list[int]) -> str:
    out: list[str] = []
    escaped = False
    for septet in septets:
        if escaped:
            # 23.038 6.2.1.1: an escape to an unknown code shows the main-table
            # character instead.
            out.append(_GSM7_EXT_CHAR.get(septet) or GSM7_ALPHABET[septet])
            escaped = False
        elif septet == _ESC:
            escaped = True
        else:
            out.append(GSM7_ALPHABET[septet])
    if escaped:
        out.append(" ")
    return "".join(out)


def _read_address(reader: _Reader) -> str:
    length = reader.octet("the destination address length")
    kind = reader.octet("the destination address type")
    octets = reader.take((length + 1) // 2, "the destination address")
    if (kind >> 4) & 0x07 == 0x05:
        # Alphanumeric (23.040 9.1.2.5): 7-bit packed, length in semi-octets.
        return _gsm7_text(_unpack_septets(octets, length * 4 // 7))
    digits: list[str] = []
    for i in range(length):
        nibble = (octets[i // 2] >> (4 * (i % 2))) & 0x0F
        if nibble == 0x0F:
            raise reader.fail("filler nibble inside the destination address")
        digits.append(_SEMI_OCTET_CHARS[nibble])
    number = "".join(digits)
    return "+" + number if kind == _TYPE_INTERNATIONAL else number


def _alphabet(dcs: int, reader: _Reader) -> Literal["gsm7", "ucs2"]:
    """The character set of a TP-DCS (23.038 4), or an error for data that is not text."""
    group = dcs >> 4
    if group <= 0x3:  # general data coding
        if dcs & 0x20:
            raise reader.fail(f"compressed text (DCS {dcs:02X}) is not supported")
        alphabet = (dcs >> 2) & 0x03
    elif group == 0xF:  # data coding / message class
        alphabet = 1 if dcs & 0x04 else 0
    elif group in (0xC, 0xD):  # message waiting, 7-bit
        alphabet = 0
    elif group == 0xE:  # message waiting, UCS-2
        alphabet = 2
    else:
        raise reader.fail(f"reserved DCS {dcs:02X}")
    if alphabet == 0:
        return "gsm7"
    if alphabet == 2:
        return "ucs2"
    raise reader.fail(f"DCS {dcs:02X} is 8-bit data, not text")


def _concatenation(header: bytes, reader: _Reader) -> tuple[int, int, int] | None:
    found: tuple[int, int, int] | None = None
    i = 0
    while i < len(header):
        if i + 2 > len(header):
            raise reader.fail("truncated user data header element")
        iei, size = header[i], header[i + 1]
        value = header[i + 2 : i + 2 + size]
        if len(value) != size:
            raise reader.fail("truncated user data header element")
        if iei == _IEI_CONCAT_8BIT and size == 3:
            found = (value[0], value[1], value[2])
        elif iei == _IEI_CONCAT_16BIT and size == 4:
            found = (value[0] << 8 | value[1], value[2], value[3])
        i += 2 + size
    if found is not None and not 1 <= found[2] <= found[1]:
        raise reader.fail(f"part {found[2]} of {found[1]} is out of range")
    return found


def decode_submit(hex: str) -> tuple[str, str, tuple[int, int, int] | None]:
    """Read an SMS-SUBMIT PDU (SMSC field first, as given to ``AT+CMGS``).

    Returns the destination (``+digits`` for an international number), the
    text, and ``(reference, total, sequence)`` when the PDU is one part of a
    concatenated message. Raises :class:`PduError` for anything malformed,
    truncated, followed by extra octets, not an SMS-SUBMIT, or not text.
    """
    try:
        data = bytes.fromhex(hex)
    except ValueError as exc:
        raise PduError("PDU is not hexadecimal", hex) from exc
    reader = _Reader(data, hex)
    reader.take(reader.octet("the SMSC length"), "the SMSC address")
    first = reader.octet("the first octet")
    if first & 0x03 != _FIRST_MTI_SUBMIT:
        raise reader.fail(f"first octet {first:02X} is not an SMS-SUBMIT")
    reader.octet("TP-MR")
    to = _read_address(reader)
    reader.octet("TP-PID")
    alphabet = _alphabet(reader.octet("TP-DCS"), reader)
    vpf = (first >> 3) & 0x03
    if vpf == 0x02:
        reader.octet("TP-VP")
    elif vpf != 0x00:  # enhanced or absolute: seven octets
        reader.take(7, "TP-VP")
    udl = reader.octet("TP-UDL")
    udhi = bool(first & _FIRST_UDHI)

    if alphabet == "gsm7":
        if udl > _SEPTETS_SINGLE:
            raise reader.fail(f"TP-UDL {udl} exceeds {_SEPTETS_SINGLE} septets")
        user_data = reader.take((udl * 7 + 7) // 8, "the user data")
    else:
        if udl > 140:
            raise reader.fail(f"TP-UDL {udl} exceeds 140 octets")
        user_data = reader.take(udl, "the user data")
    if reader.rest():
        raise reader.fail("extra octets after the user data")

    concat: tuple[int, int, int] | None = None
    header_octets = 0
    if udhi:
        if not user_data:
            raise reader.fail("user data header flagged but no user data")
        header_octets = 1 + user_data[0]
        if header_octets > len(user_data):
            raise reader.fail("user data header longer than the user data")
        concat = _concatenation(user_data[1:header_octets], reader)

    if alphabet == "gsm7":
        skip = (header_octets * 8 + 6) // 7
        if skip > udl:
            raise reader.fail("user data header longer than the user data")
        text = _gsm7_text(_unpack_septets(user_data, udl)[skip:])
    else:
        body = user_data[header_octets:]
        if len(body) % 2:
            raise reader.fail("UCS-2 text has an odd number of octets")
        try:
            text = body.decode("utf-16-be")
        except UnicodeDecodeError as exc:
            raise reader.fail(f"UCS-2 text is not valid UTF-16: {exc.reason}") from exc
    return to, text, concat
