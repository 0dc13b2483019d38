"""Typed device events and protocol errors shared by every decoder.

Decoders in this package are pure: they turn bytes (or an MQTT topic and
payload) into these frozen values and never do I/O. Transports move bytes and
hand the decoded events to the gateway's intake.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum


class EventKind(StrEnum):
    """What a device is telling us, independent of the protocol that carried it."""

    EMERGENCY = "emergency"  # medical, personal emergency (pendant), panic, duress, fire, SOS
    CANCEL = "cancel"  # the elder or the unit cancelled / restored the condition
    TEST = "test"  # periodic test report (supervision)
    LOW_BATTERY = "low_battery"
    TAMPER = "tamper"
    INACTIVITY = "inactivity"  # senior watch trouble: no movement for too long
    POWER_LOSS = "power_loss"
    TROUBLE = "trouble"  # any other fault the unit reports
    HEARTBEAT = "heartbeat"  # receiver / link alive, carries no device
    STATUS = "status"  # battery / link quality report without an alarm
    ONLINE = "online"  # availability: device reachable again
    OFFLINE = "offline"  # availability: device unreachable


class Qualifier(StrEnum):
    """Contact ID event qualifier (also used for MLR2's E/R/P letters)."""

    NEW = "new"  # Contact ID 1, Sur-Gard 'E'
    RESTORE = "restore"  # Contact ID 3, Sur-Gard 'R'
    PREVIOUS = "previous"  # Contact ID 6, Sur-Gard 'P'


class AddressScheme(StrEnum):
    """How a device is identified on its channel; the registry maps it to a device."""

    CONTACT_ID = "contact_id"  # Contact ID account number (4 hex digits)
    PHONE = "phone"  # caller ID of the elder's alarm phone (E.164 after normalisation)
    MQTT = "mqtt"  # the device's base MQTT topic, e.g. "zigbee2mqtt/sos-0001"
    RECEIVER = "receiver"  # an alarm receiver itself (heartbeats), e.g. "surgard:01"


@dataclass(frozen=True, slots=True)
class DeviceAddress:
    scheme: AddressScheme
    value: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.value}"


@dataclass(frozen=True, slots=True)
class Drill:
    """A press that is a drill (``devices/drills.py``): who runs it and who may be told.

    ``notify``: phone numbers (E.164) or responder ids that the drill's SMS may reach;
    empty means a dry run, where the plan is journaled and nobody is texted."""

    drill_id: str
    device_id: str
    by: str
    notify: tuple[str, ...] = ()

    @property
    def dry_run(self) -> bool:
        return not self.notify


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """One thing a device said. ``raw`` is the frame as received, for the journal."""

    kind: EventKind
    address: DeviceAddress
    raw: bytes
    code: str | None = None  # protocol event code: Contact ID "101", Z2M action "emergency"
    qualifier: Qualifier | None = None
    group: str | None = None
    zone: str | None = None
    battery_pct: float | None = None
    voltage_mv: int | None = None
    link_quality: int | None = None
    extra: tuple[tuple[str, str], ...] = field(default=())
    drill: Drill | None = None  # set only by the drill decoder
    # Unix seconds at which the device (or its bridge) says it sent this: our schema's
    # ``ts``, Zigbee2MQTT's ``last_seen``. The gateway's latency clock starts there, so a
    # wait at the broker counts (gateway/intake.py checks it is plausible first).
    sent_at: float | None = None


class DeviceProtocolError(Exception):
    """Input that does not follow the device protocol. Carries the offending bytes."""

    def __init__(self, reason: str, raw: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw

    def __str__(self) -> str:
        shown = self.raw[:64]
        more = "..." if len(self.raw) > 64 else ""
        return f"{self.reason} (raw={shown!r}{more})" if self.raw else self.reason


@contextmanager
def protocol_boundary(what: str, raw: bytes) -> Iterator[None]:
    """Let only :class:`DeviceProtocolError` out of a decoder's public entry point.

    A decoder bug on some input (an ``OverflowError`` from a calendar edge, a
    ``RecursionError``...) would otherwise escape to the transport as an unexpected
    exception: the message is neither journaled nor acknowledged, and a broker
    redelivers it forever. Here it becomes a malformed-message error that names the
    exception and carries the raw bytes, so it is journaled, answered and visible.
    """
    try:
        yield
    except DeviceProtocolError:
        raise
    except Exception as exc:  # the boundary itself: nothing else may escape
        raise DeviceProtocolError(f"{what} failed on this input: {exc!r}", raw) from exc


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete message cut from a byte stream.

    Exactly one of ``events`` (possibly empty, e.g. a modem's ``OK``) or ``error``
    is meaningful. Stream decoders return frames rather than raising so that one
    malformed message (answered with NAK) never stops the stream.
    """

    raw: bytes
    events: tuple[DeviceEvent, ...] = ()
    error: DeviceProtocolError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
