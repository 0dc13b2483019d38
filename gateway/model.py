"""Immutable domain records: who the elders are, their devices, contacts, responders, facilities.

Loaded and validated once by :mod:`gateway.registry`; everything downstream reads
these frozen values and never re-validates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from devices.events import AddressScheme, DeviceAddress


@dataclass(frozen=True, slots=True)
class LonLat:
    """A geographic position in degrees (WGS84 / CGCS2000, which agree to centimetres)."""

    lon: float
    lat: float


class ResponderRole(StrEnum):
    GRID_LEADER = "grid_leader"
    COMMUNITY_WORKER = "community_worker"
    SUPERVISOR = "supervisor"


class FacilityKind(StrEnum):
    HOSPITAL = "hospital"
    CLINIC = "clinic"


class LineType(StrEnum):
    """What kind of line a number is, as ``phonenumbers.number_type`` tells from its prefix.

    Only :data:`SMS_LINE_TYPES` are texted unless the registry's ``voice_only`` column
    says otherwise; a landline can take a call, not an SMS.
    """

    MOBILE = "mobile"
    FIXED_LINE = "fixed_line"
    FIXED_LINE_OR_MOBILE = "fixed_line_or_mobile"  # the plan cannot tell (US, CA, ...)
    VOIP = "voip"
    PERSONAL_NUMBER = "personal_number"
    PAGER = "pager"
    TOLL_FREE = "toll_free"
    PREMIUM_RATE = "premium_rate"
    SHARED_COST = "shared_cost"
    UAN = "uan"
    VOICEMAIL = "voicemail"
    UNKNOWN = "unknown"  # valid, but the numbering plan does not say what it is


#: Line types an SMS may reach. Ambiguous types count as able: a missed text to a
#: mobile costs more than a useless one to a landline (``voice_only`` settles a case).
SMS_LINE_TYPES: frozenset[LineType] = frozenset({
    LineType.MOBILE, LineType.FIXED_LINE_OR_MOBILE, LineType.VOIP,
    LineType.PERSONAL_NUMBER, LineType.UNKNOWN,
})


@dataclass(frozen=True, slots=True)
class Contact:
    """A family member (or neighbour) told when the elder presses the button."""

    name: str
    phone: str  # E.164, e.g. "+8613800000000"
    relation: str = ""
    language: str = "zh"  # "zh" or "en": which SMS template they get
    line_type: LineType = LineType.MOBILE
    sms_capable: bool = True  # False: never texted (a landline, or voice_only = true)


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    elder_id: str
    scheme: AddressScheme
    address: str  # account, E.164 phone or base MQTT topic, as the channel identifies it
    model: str = ""
    test_interval_h: float | None = None  # expected periodic test/check-in interval

    @property
    def device_address(self) -> DeviceAddress:
        return DeviceAddress(self.scheme, self.address)


@dataclass(frozen=True, slots=True)
class Elder:
    elder_id: str
    name: str
    address: str  # postal address, read out and sent by SMS
    community: str
    location: LonLat
    phone: str | None = None  # E.164 home / alarm phone, if any
    contacts: tuple[Contact, ...] = ()
    notes: str = ""  # medical notes for responders (kept out of logs)


@dataclass(frozen=True, slots=True)
class Responder:
    responder_id: str
    name: str
    phone: str  # E.164
    community: str
    role: ResponderRole
    on_duty: bool
    base: LonLat  # where they are when no live position is known
    line_type: LineType = LineType.MOBILE
    sms_capable: bool = True  # False: never texted (a landline, or voice_only = true)


@dataclass(frozen=True, slots=True)
class Facility:
    facility_id: str
    name: str
    kind: FacilityKind
    duty_phone: str  # E.164
    location: LonLat
    address: str = ""
    line_type: LineType = LineType.MOBILE
    sms_capable: bool = True  # False: never texted (a landline, or voice_only = true)


@dataclass(frozen=True, slots=True)
class Registry:
    """Everything the gateway knows about the district, indexed for lookups."""

    elders: Mapping[str, Elder]
    devices: Mapping[str, Device]
    responders: Mapping[str, Responder]
    facilities: Mapping[str, Facility]
    _by_address: Mapping[DeviceAddress, Device] = field(default_factory=dict, repr=False)
    #: Phones (E.164) of contacts, responders and facilities that no SMS can reach.
    no_sms: frozenset[str] = field(default_factory=frozenset, repr=False)

    @classmethod
    def build(
        cls,
        elders: Mapping[str, Elder],
        devices: Mapping[str, Device],
        responders: Mapping[str, Responder],
        facilities: Mapping[str, Facility],
    ) -> Registry:
        by_address = {d.device_address: d for d in devices.values()}
        # One set for the planner, so that it checks a phone, not which record it came from.
        no_sms = frozenset(
            [c.phone for e in elders.values() for c in e.contacts if not c.sms_capable]
            + [r.phone for r in responders.values() if not r.sms_capable]
            + [f.duty_phone for f in facilities.values() if not f.sms_capable])
        return cls(elders, devices, responders, facilities, by_address, no_sms)

    def mappings(self) -> tuple[Mapping[Any, object], ...]:
        """Its mappings, the registry's bulk (see :func:`gateway.world.release_world`)."""
        return (self.elders, self.devices, self.responders, self.facilities,
                self._by_address)

    def device_by_address(self, address: DeviceAddress) -> Device | None:
        return self._by_address.get(address)

    def elder_of(self, device: Device) -> Elder:
        return self.elders[device.elder_id]
