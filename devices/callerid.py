"""Caller ID lines printed by a Hayes modem, turned into alarm-call events.

With caller ID enabled (``AT+VCID=1``; ``AT#CID=1`` on some chipsets) the modem
prints a block between the first and second ring::

    RING
    DATE = 1015
    TIME = 2038
    NMBR = 8475550001
    NAME = U.S.ROBOTICS
    RING

Every ``NMBR`` line is a call to the alarm line, so it becomes one EMERGENCY
event, including when the number is withheld (``P``) or unavailable (``O``):
the operator must hear about an unidentified call too. ``NAME`` usually comes
after ``NMBR``; the event is not held back waiting for it.

Pure code: no I/O, no asyncio, no clock.
"""

from __future__ import annotations

import re
from datetime import datetime

import phonenumbers

from devices.events import (
    AddressScheme,
    DeviceAddress,
    DeviceEvent,
    DeviceProtocolError,
    EventKind,
    Frame,
    protocol_boundary,
)

__all__ = [
    "CALL_CODE",
    "DEFAULT_INIT_COMMANDS",
    "PRIVATE",
    "UNAVAILABLE",
    "CallerIdDecoder",
    "encode_callerid_block",
    "normalise_number",
]

DEFAULT_INIT_COMMANDS: tuple[str, ...] = ("ATZ", "AT+VCID=1")
"""Commands the transport sends (each followed by CR) to enable caller ID."""

CALL_CODE = "call"
"""``DeviceEvent.code`` of an incoming call."""
PRIVATE = "private"
"""Address value of a call whose number the caller withheld (``NMBR = P``)."""
UNAVAILABLE = "unavailable"
"""Address value of a call whose number the network did not deliver (``NMBR = O``)."""

# Lines end with CR LF; a bare CR or LF also ends a line (the empty line between
# CR and LF is dropped), so a split between CR and LF changes nothing.
_TERMINATOR = re.compile(rb"[\r\n]")
_WITHHELD = {"P": PRIVATE, "PRIVATE": PRIVATE, "O": UNAVAILABLE, "OUT OF AREA": UNAVAILABLE}
# Caller ID block fields remembered until the NMBR line; their extra keys.
_BLOCK_FIELDS = {"DATE": "date", "TIME": "time", "NAME": "name"}


def normalise_number(number: str, region: str = "CN") -> str:
    """Return ``number`` in E.164 if it is a valid number in ``region``, else as given.

    The registry should store alarm-phone numbers normalised by this same
    function so that lookups by caller ID match.
    """
    stripped = number.strip()
    try:
        parsed = phonenumbers.parse(stripped, region)
    except phonenumbers.NumberParseException:
        return stripped
    if not phonenumbers.is_valid_number(parsed):
        return stripped
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _split_field(text: str) -> tuple[str, str] | None:
    """Split ``KEY = value`` or ``KEY=value``; None if the line is not a field."""
    key, sep, value = text.partition("=")
    if not sep:
        return None
    return key.strip().upper(), value.strip()


class CallerIdDecoder:
    """Incremental decoder for a caller-ID modem's output lines.

    Returns one :class:`Frame` per non-empty line: an ``NMBR`` line carries one
    EMERGENCY event; modem chatter (``RING``, ``OK``, echoes, other fields)
    carries none; an over-long line or one that is not UTF-8 is an error frame.
    ``feed`` never raises and chunk boundaries never change the result.
    """

    def __init__(self, default_region: str = "CN", max_line: int = 256) -> None:
        """``default_region`` (ISO 3166 code) reads numbers without a country code.

        Raises :class:`ValueError` for a region ``phonenumbers`` does not know
        (every number would silently stay un-normalised) or a non-positive ``max_line``.
        """
        if default_region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {default_region!r}")
        if max_line < 1:
            raise ValueError(f"max_line must be positive, got {max_line}")
        self._region = default_region
        self._max_line = max_line
        self._buffer = bytearray()
        self._discarding = False
        self._block: dict[str, str] = {}
        # After NMBR, a NAME belongs to the call already reported, not the next one.
        self._reported = False

    def feed(self, data: bytes) -> list[Frame]:
        """Consume ``data`` and return the frames of every line it completes.

        Never raises: should decoding fail in any unforeseen way, the frames completed
        so far are kept, the partial line and block are dropped and an error frame
        carrying ``data`` and naming the exception ends the list."""
        frames: list[Frame] = []
        try:
            with protocol_boundary("caller-id decoder", data):
                self._feed(data, frames)
        except DeviceProtocolError as exc:
            self._buffer.clear()
            self._discarding = False
            self._block.clear()
            self._reported = False
            frames.append(Frame(data, error=exc))
        return frames

    def _feed(self, data: bytes, frames: list[Frame]) -> None:
        i = 0
        end = len(data)
        while i < end:
            stop = _find_terminator(data, i)
            if self._discarding:
                if stop < 0:
                    break
                self._discarding = False
                i = stop + 1
                continue
            content_end = end if stop < 0 else stop
            room = self._max_line - len(self._buffer)
            if content_end - i > room:
                self._buffer += data[i : i + room + 1]
                i += room + 1
                frames.append(self._overlong())
                continue
            self._buffer += data[i:content_end]
            if stop < 0:
                break
            i = stop + 1
            line = bytes(self._buffer)
            self._buffer.clear()
            frame = self._line(line)
            if frame is not None:
                frames.append(frame)

    def _overlong(self) -> Frame:
        raw = bytes(self._buffer)
        self._buffer.clear()
        self._discarding = True
        error = DeviceProtocolError(f"modem line longer than {self._max_line} bytes", raw)
        return Frame(raw, error=error)

    def _line(self, raw: bytes) -> Frame | None:
        # CR LF gives an empty line between the two terminators; NULs are line noise.
        stripped = raw.strip(b" \t\x00")
        if not stripped:
            return None
        try:
            text = stripped.decode("utf-8")
        except UnicodeDecodeError as exc:
            if stripped[:4].upper() != b"NMBR":
                error = DeviceProtocolError(f"modem line is not UTF-8: {exc}", raw)
                return Frame(raw, error=error)
            # A call came in even if line noise garbled its number: alert anyway,
            # with the undecodable bytes escaped so the operator sees them.
            text = stripped.decode("utf-8", "backslashreplace")
        field = _split_field(text)
        if field is None:
            if text.upper() == "RING":
                self._block.clear()
                self._reported = False
            return Frame(raw)
        key, value = field
        if key == "NMBR":
            return Frame(raw, events=(self._call(value, raw),))
        extra_key = _BLOCK_FIELDS.get(key)
        if extra_key is not None:
            if key != "NAME" and self._reported:
                # DATE/TIME open the next call's block.
                self._block.clear()
                self._reported = False
            if not self._reported:
                self._block[extra_key] = value
        return Frame(raw)

    def _call(self, value: str, raw: bytes) -> DeviceEvent:
        withheld = _WITHHELD.get(value.upper())
        if withheld is not None:
            address = withheld
        elif value:
            address = normalise_number(value, self._region)
        else:
            address = UNAVAILABLE
        extra: tuple[tuple[str, str], ...] = tuple(
            (name, self._block[name]) for name in ("date", "time", "name") if name in self._block
        )
        if value and address != value:
            extra += (("number", value),)
        self._block.clear()
        self._reported = True
        return DeviceEvent(
            kind=EventKind.EMERGENCY,
            address=DeviceAddress(AddressScheme.PHONE, address),
            raw=raw,
            code=CALL_CODE,
            extra=extra,
        )


def _find_terminator(data: bytes, start: int) -> int:
    match = _TERMINATOR.search(data, start)
    return -1 if match is None else match.start()


def encode_callerid_block(number: str, name: str = "", when: datetime | None = None) -> bytes:
    """Encode what a modem prints for one call, CR LF terminated (for simulators).

    ``RING``, ``DATE``, ``TIME``, ``NMBR``, ``NAME`` (only if ``name``), ``RING``.
    ``when`` defaults to the local time now. Names are written as UTF-8.
    """
    # Naive local time on purpose: that is what a modem prints.
    moment = datetime.now() if when is None else when
    lines = [
        "RING",
        f"DATE = {moment:%m%d}",
        f"TIME = {moment:%H%M}",
        f"NMBR = {number}",
    ]
    if name:
        lines.append(f"NAME = {name}")
    lines.append("RING")
    return "".join(f"{line}\r\n" for line in lines).encode("utf-8")
