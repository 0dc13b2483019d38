"""Sur-Gard receiver automation output (MLR2 / System III) cut into frames.

The receiver writes one message per frame, terminated by DC4 (0x14), and waits
for ACK (0x06), or NAK (0x15) for a malformed message, which it resends. This
module only cuts and parses; the transport decides when to answer (after the
journal commit) and uses :attr:`Frame.ok` to choose ACK or NAK.

Frames understood:

* MLR2 Contact ID ``5RRL 18AAAAQXYZGGCCC`` and System III ``5RRLLL 18AAAAQXYZGGCCC``
  (also message type ``98``); ``Q`` is a letter: ``E`` new, ``R`` restore,
  ``P`` previous.
* Receiver heartbeat ``1RRL           @    `` (any line width, any run of spaces).

Everything else becomes an error frame, so the receiver is told NAK and resends;
a frame that does not match exactly is never half-parsed, because a shifted
field would silently name the wrong account.

Pure code: no I/O, no asyncio, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from devices.contact_id import DEFAULT_EVENT_KINDS, MESSAGE_TYPES, event_from_fields
from devices.events import (
    AddressScheme,
    DeviceAddress,
    DeviceEvent,
    DeviceProtocolError,
    EventKind,
    Frame,
    Qualifier,
    protocol_boundary,
)

__all__ = [
    "ACK",
    "DC4",
    "NAK",
    "SurGardDecoder",
    "encode_heartbeat",
    "encode_mlr2",
]

ACK = b"\x06"
"""Positive acknowledgement the automation software sends for a handled frame."""
NAK = b"\x15"
"""Negative acknowledgement for a malformed frame; the receiver resends it."""
DC4 = b"\x14"
"""Frame terminator."""

_DC4_BYTE = DC4[0]
# Line noise the receiver or a serial adapter may put between frames.
_NOISE = b"\r\n\x00"
_HEX = frozenset("0123456789ABCDEFabcdef")
_DIGITS = frozenset("0123456789")

_QUALIFIER_BY_LETTER: Mapping[str, Qualifier] = MappingProxyType(
    {"E": Qualifier.NEW, "R": Qualifier.RESTORE, "P": Qualifier.PREVIOUS}
)
_LETTER_BY_QUALIFIER: Mapping[Qualifier, str] = MappingProxyType(
    {qualifier: letter for letter, qualifier in _QUALIFIER_BY_LETTER.items()}
)
_HEARTBEAT = re.compile(r"1(?P<receiver>[0-9]{2})(?P<line>[0-9]{0,3}) *@ *")
# MLR2 puts the space after a 1-digit line, System III after a 3-digit line.
_LINE_WIDTHS = (1, 3)


class SurGardDecoder:
    """Incremental decoder for a Sur-Gard receiver's serial automation output.

    Feed it whatever the serial port delivered; it returns the complete frames
    in order. Chunk boundaries never change the result. ``feed`` never raises:
    a bad frame is returned as ``Frame(raw, error=...)`` so the caller can NAK it.
    """

    def __init__(
        self,
        kinds: Mapping[str, EventKind] = DEFAULT_EVENT_KINDS,
        max_frame: int = 128,
    ) -> None:
        """``kinds`` maps Contact ID codes to kinds (from configuration).

        ``max_frame`` bounds the bytes buffered before a DC4; a longer run is
        reported once as an error and skipped up to the next DC4.
        """
        if max_frame < 1:
            raise ValueError(f"max_frame must be positive, got {max_frame}")
        self._kinds: Mapping[str, EventKind] = MappingProxyType(dict(kinds))
        self._max_frame = max_frame
        self._buffer = bytearray()
        self._discarding = False

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held back until its DC4 arrives."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Consume ``data`` and return every frame it completes, in order.

        Never raises: should decoding fail in any unforeseen way, the frames completed
        so far are kept, the partial frame is dropped and an error frame carrying
        ``data`` and naming the exception ends the list (the receiver gets NAK and
        resends, the input is journaled)."""
        frames: list[Frame] = []
        try:
            with protocol_boundary("sur-gard decoder", data):
                self._feed(data, frames)
        except DeviceProtocolError as exc:
            self._buffer.clear()
            self._discarding = False
            frames.append(Frame(data, error=exc))
        return frames

    def _feed(self, data: bytes, frames: list[Frame]) -> None:
        i = 0
        end = len(data)
        while i < end:
            if self._discarding:
                stop = data.find(_DC4_BYTE, i)
                if stop < 0:
                    break
                self._discarding = False
                i = stop + 1
                continue
            if not self._buffer:
                while i < end and data[i] in _NOISE:
                    i += 1
                if i == end:
                    break
            stop = data.find(_DC4_BYTE, i)
            content_end = end if stop < 0 else stop
            room = self._max_frame - len(self._buffer)
            if content_end - i > room:
                # Cut at exactly max_frame + 1 bytes so every chunking reports
                # the same error frame.
                self._buffer += data[i : i + room + 1]
                i += room + 1
                frames.append(self._oversized())
                continue
            self._buffer += data[i:content_end]
            if stop < 0:
                break
            raw = bytes(self._buffer) + DC4
            self._buffer.clear()
            i = stop + 1
            frame = self._decode(raw)
            if frame is not None:
                frames.append(frame)

    def _oversized(self) -> Frame:
        raw = bytes(self._buffer)
        self._buffer.clear()
        self._discarding = True
        error = DeviceProtocolError(
            f"no DC4 within {self._max_frame} bytes; skipping to the next DC4", raw
        )
        return Frame(raw, error=error)

    def _decode(self, raw: bytes) -> Frame | None:
        body = raw[:-1].strip(_NOISE)
        if not body:
            # A bare terminator carries no message: nothing to acknowledge.
            return None
        try:
            return Frame(raw, events=(self._parse(body, raw),))
        except DeviceProtocolError as exc:
            return Frame(raw, error=exc)

    def _parse(self, body: bytes, raw: bytes) -> DeviceEvent:
        try:
            text = body.decode("ascii")
        except UnicodeDecodeError:
            raise DeviceProtocolError("sur-gard frame is not ASCII", raw) from None
        if text[0] == "5":
            return _parse_contact_id(text, raw, self._kinds)
        if text[0] == "1":
            return _parse_heartbeat(text, raw)
        raise DeviceProtocolError(f"unsupported sur-gard message type {text[0]!r}", raw)


def _parse_heartbeat(text: str, raw: bytes) -> DeviceEvent:
    match = _HEARTBEAT.fullmatch(text)
    if match is None:
        raise DeviceProtocolError("malformed sur-gard heartbeat", raw)
    receiver = match["receiver"]
    extra: tuple[tuple[str, str], ...] = (("receiver", receiver),)
    if match["line"]:
        extra += (("line", match["line"]),)
    return DeviceEvent(
        kind=EventKind.HEARTBEAT,
        address=DeviceAddress(AddressScheme.RECEIVER, f"surgard:{receiver}"),
        raw=raw,
        extra=extra,
    )


def _field(text: str, alphabet: frozenset[str], what: str, raw: bytes) -> str:
    if not text or not set(text) <= alphabet:
        raise DeviceProtocolError(f"sur-gard {what} is malformed: {text!r}", raw)
    return text


def _parse_contact_id(text: str, raw: bytes, kinds: Mapping[str, EventKind]) -> DeviceEvent:
    space = text.find(" ")
    if space - 3 not in _LINE_WIDTHS:
        raise DeviceProtocolError(
            "sur-gard contact id frame must be 5RRL 18... (MLR2) or 5RRLLL 18... (System III)",
            raw,
        )
    receiver = _field(text[1:3], _DIGITS, "receiver number", raw)
    line = _field(text[3:space], _DIGITS, "line number", raw)
    message = text[space + 1 :]
    if len(message) != 15:
        raise DeviceProtocolError(
            f"sur-gard contact id message must be 15 characters after the space, "
            f"got {len(message)}",
            raw,
        )
    mt = message[0:2]
    if mt not in MESSAGE_TYPES:
        raise DeviceProtocolError(f"sur-gard message type must be 18 or 98, got {mt!r}", raw)
    qualifier = _QUALIFIER_BY_LETTER.get(message[6])
    if qualifier is None:
        raise DeviceProtocolError(f"sur-gard qualifier must be E, R or P, got {message[6]!r}", raw)
    return event_from_fields(
        account=_field(message[2:6], _HEX, "account", raw),
        qualifier=qualifier,
        code=_field(message[7:10], _HEX, "event code", raw),
        group=_field(message[10:12], _HEX, "group", raw),
        zone=_field(message[12:15], _HEX, "zone", raw),
        raw=raw,
        kinds=kinds,
        extra=(("receiver", receiver), ("line", line)),
    )


def _check(value: str, alphabet: frozenset[str], widths: tuple[int, ...], what: str) -> str:
    if len(value) not in widths or not set(value) <= alphabet:
        shown = " or ".join(str(w) for w in widths)
        raise ValueError(f"{what} must be {shown} characters from {sorted(alphabet)}: {value!r}")
    return value


def encode_mlr2(
    receiver: str,
    line: str,
    account: str,
    qualifier: Qualifier,
    code: str,
    group: str = "01",
    zone: str = "001",
    *,
    mt: str = "18",
) -> bytes:
    """Encode a Contact ID frame as the receiver prints it, DC4 included.

    A 1-digit ``line`` gives the MLR2 layout, a 3-digit one the System III
    layout. For simulators and tests; raises :class:`ValueError` on bad fields.
    """
    if mt not in MESSAGE_TYPES:
        raise ValueError(f"message type must be 18 or 98, got {mt!r}")
    text = "".join(
        (
            "5",
            _check(receiver, _DIGITS, (2,), "receiver"),
            _check(line, _DIGITS, _LINE_WIDTHS, "line"),
            " ",
            mt,
            _check(account, _HEX, (4,), "account").upper(),
            _LETTER_BY_QUALIFIER[qualifier],
            _check(code, _HEX, (3,), "event code").upper(),
            _check(group, _HEX, (2,), "group").upper(),
            _check(zone, _HEX, (3,), "zone").upper(),
        )
    )
    return text.encode("ascii") + DC4


def encode_heartbeat(receiver: str = "01") -> bytes:
    """Encode the MLR2 idle heartbeat ``1RR1           @    `` with its DC4."""
    _check(receiver, _DIGITS, (2,), "receiver")
    return f"1{receiver}1{' ' * 11}@{' ' * 4}".encode("ascii") + DC4
