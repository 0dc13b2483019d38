"""The escalation planner: who a wave of an alarm reaches, and what they are told.

Pure: no I/O, no clock, no asyncio. Given the elder, what the responder search found,
the supervisors with their distances, the configured waves and the phones already told,
:meth:`Planner.plan` returns the messages of one wave; :meth:`Planner.follow_up` the
"taken by ..." or "cancelled" messages to everyone already told. The dispatcher
journals the plans and hands them to the notifier.

The waves are the validated ``[[escalation.waves]]`` of the config
(:class:`gateway.config.WaveSection`; the defaults live there, once):

* ``family``: the elder's contacts, each in their own language;
* ``staff = N``: the next N nearest on-duty staff not in an earlier wave (wave 1 takes
  ranks 1..N1, wave 2 the N2 after those, ...). When nobody is on duty at all, the
  supervisors are told at once rather than a wave later;
* ``supervisor``: every supervisor, with their distance (from their phone's position
  or their registered base);
* ``clinic`` / ``hospital``: the nearest facility of that kind.

One message per phone number per alarm: a phone already told, or reached by an earlier
role in the same wave, is skipped (the first role wins).

Never an SMS to a number that cannot take one (a landline, or ``voice_only`` in the
registry: :attr:`gateway.model.Registry.no_sms`): :meth:`Planner.plan` returns those
recipients apart, in :attr:`WavePlan.skipped`, for the dispatcher to log (and, later,
to call). :func:`silent_waves` finds, for ``gateway check-config``, the waves that
would reach nobody who can read an SMS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from gateway.config import EscalationSection, GeoSection, RecipientKind, WaveSection
from gateway.geo import GeoResult, GeoService, Nearby
from gateway.journal import CallPlan, MessageKind, NotificationPlan, NotificationRecord
from gateway.lifecycle import UNTOLD_NOTIFICATION_STATES
from gateway.model import Elder, FacilityKind, LonLat, Registry, ResponderRole
from gateway.wording import AlarmFacts, Composer

__all__ = ["CallWave", "Planner", "SilentWave", "Situation", "WavePlan", "silent_waves",
           "supervisors_near"]


@dataclass(frozen=True, slots=True)
class Situation:
    """What the planner knows about one alarm, fixed once the alarm is located."""

    elder: Elder
    facts: AlarmFacts
    found: GeoResult  # on-duty staff, nearest first, and the nearest facilities
    supervisors: tuple[Nearby, ...] = ()
    map_url: str | None = None  # a map link for staff messages
    no_sms: Set[str] = frozenset()  # phones no SMS reaches (the registry's ``no_sms``)


class WavePlan(NamedTuple):
    """One wave: the messages to send, and the recipients no SMS can reach (not sent)."""

    messages: list[NotificationPlan]
    skipped: list[NotificationPlan]


class CallWave(NamedTuple):
    """One wave's calls: placed at once (``single``), and the call tree (``tree``: in
    turn, nearest first, until one accepts)."""

    single: list[CallPlan]
    tree: list[CallPlan]


class Planner:
    """Plans the waves of ``escalation`` with the texts of ``composer``."""

    def __init__(self, escalation: EscalationSection, geo: GeoSection,
                 composer: Composer, map_url_template: str | None = None) -> None:
        self._waves = escalation.waves
        self._offsets = tuple(sum(w.staff for w in self._waves[:i])
                              for i in range(len(self._waves)))
        self._composer = composer
        self._map_url_template = map_url_template
        self.responders_k = geo.responders_k
        #: Calls are placed ([voice] on): kinds a wave tells by "voice" only are not
        #: texted. Off, everyone is texted whatever the wave's channels say.
        self.voice = False

    @property
    def waves(self) -> tuple[WaveSection, ...]:
        return self._waves

    @property
    def staff_needed(self) -> int:
        """How many nearest staff one lookup must return for every wave (and the log)."""
        return max(self.responders_k, sum(w.staff for w in self._waves))

    @property
    def first_wave_staff(self) -> int:
        """Staff the first wave sends: held busy while the alarm is open."""
        return self._waves[0].staff

    def map_url(self, elder: Elder) -> str | None:
        t = self._map_url_template
        if not t:
            return None
        return t.format(lon=f"{elder.location.lon:.6f}", lat=f"{elder.location.lat:.6f}")

    def plan(self, number: int, situation: Situation, told: Set[str]) -> WavePlan:
        """The messages of wave ``number`` (1-based) for people not in ``told``, and
        apart the recipients whose phone is in ``situation.no_sms``."""
        wave = self._waves[number - 1]
        plans = [p for kind, p in self._recipients(number, situation)
                 if not (self.voice and wave.channel(kind) == "voice")]
        unique = _once_per_phone(plans, told)
        no_sms = situation.no_sms
        if not no_sms:
            return WavePlan(unique, [])
        return WavePlan([p for p in unique if p.phone not in no_sms],
                        [p for p in unique if p.phone in no_sms])

    def _recipients(self, number: int,
                    s: Situation) -> list[tuple[RecipientKind, NotificationPlan]]:
        """Everyone wave ``number`` names, each with their kind, in the wave's order."""
        wave = self._waves[number - 1]
        c = self._composer
        found: list[tuple[RecipientKind, NotificationPlan]] = []
        if wave.family:
            found += [("family", NotificationPlan("family", ct.name, ct.phone,
                                                  c.family(s.facts, ct.language)))
                      for ct in s.elder.contacts]
        if wave.staff:
            offset = self._offsets[number - 1]
            found += [("staff", NotificationPlan(
                "responder", r.name, r.phone,
                c.staff(s.facts, r.distance_m, map_url=s.map_url, from_base=r.stale)))
                for r in s.found.responders[offset: offset + wave.staff]]
            if not s.found.responders and not wave.supervisor:
                # nobody on duty: escalate at once
                found += [("supervisor", p) for p in self._supervisors(s)]
        if wave.supervisor:
            found += [("supervisor", p) for p in self._supervisors(s)]
        for wanted, kind in ((wave.clinic, FacilityKind.CLINIC),
                             (wave.hospital, FacilityKind.HOSPITAL)):
            fac = s.found.facilities.get(kind)
            if wanted and fac is not None:
                found.append((kind.value, NotificationPlan(
                    "facility", fac.name, fac.phone, c.facility(s.facts))))
        return found

    def calls(self, number: int, situation: Situation, skipped: Sequence[NotificationPlan],
              called: Set[str]) -> CallWave:
        """The calls of wave ``number`` for phones not in ``called``: every kind the
        wave tells by ``voice`` or ``both`` (family: the first ``call_family``
        contacts; staff: a call tree, nearest first), and everyone of the wave no SMS
        reaches (``skipped`` by :meth:`plan`: landlines). Said: the center's
        announcement (the same template)."""
        wave = self._waves[number - 1]
        s = situation
        text = self._composer.spoken(s.facts)
        single: list[CallPlan] = []
        tree: list[CallPlan] = []
        families = 0
        for kind, p in self._recipients(number, s):
            if wave.channel(kind) == "sms":
                continue
            if kind == "staff":
                tree.append(CallPlan(p.role, p.name, p.phone, text))
            elif kind != "family" or families < wave.call_family:
                families += kind == "family"
                single.append(CallPlan(p.role, p.name, p.phone, text))
        single = _once_per_phone(
            [*single, *(CallPlan(p.role, p.name, p.phone, text) for p in skipped)], called)
        return CallWave(single, _once_per_phone(tree, {*called, *(c.phone for c in single)}))

    def follow_up(self, kind: MessageKind, facts: AlarmFacts, told: Iterable[NotificationRecord],
                  *, by: str = "", skip: str | None = None) -> list[NotificationPlan]:
        """"Taken by ``by``" or "cancelled" to everyone an escalation wave reached with
        an SMS of its own (not to a supervisor who only read of it in a digest).

        ``skip`` is the phone of whoever took the alarm (they know)."""
        if kind is MessageKind.TAKEN:
            text = self._composer.taken(facts, by)
        elif kind is MessageKind.CANCELLED:
            text = self._composer.cancelled(facts)
        else:
            raise ValueError(f"{kind} is not a follow-up")
        people = {r.phone: r for r in told
                  if r.kind is MessageKind.ESCALATION and r.phone != skip
                  and r.state not in UNTOLD_NOTIFICATION_STATES}
        return [NotificationPlan(r.role, r.name, r.phone, text) for r in people.values()]

    def _supervisors(self, s: Situation) -> list[NotificationPlan]:
        return [NotificationPlan("supervisor", sup.name, sup.phone,
                                 self._composer.staff(s.facts, sup.distance_m,
                                                      map_url=s.map_url, from_base=sup.stale))
                for sup in s.supervisors]


_Plan = TypeVar("_Plan", NotificationPlan, CallPlan)


def _once_per_phone(plans: Sequence[_Plan], told: Set[str]) -> list[_Plan]:
    seen = set(told)
    unique: list[_Plan] = []
    for p in plans:  # the first role wins
        if p.phone not in seen:
            seen.add(p.phone)
            unique.append(p)
    return unique


def supervisors_near(registry: Registry, geo: GeoService, elder: Elder) -> tuple[Nearby, ...]:
    """Every supervisor with their distance from ``elder``: from their phone's last
    position when it is fresh, else from their registered base (``stale``).

    Not pure: it reads the live positions of ``geo``; the planner gets the result."""
    found: list[Nearby] = []
    supervisors = geo.supervisors if geo.registry is registry else tuple(
        r for r in registry.responders.values() if r.role is ResponderRole.SUPERVISOR)
    for sup in supervisors:
        where, from_base = geo.position_of(sup.responder_id) or (sup.base, True)
        distance, bearing = geo.projector.geodesic(elder.location, where)
        found.append(Nearby(sup.responder_id, sup.name, sup.phone, where, distance, bearing,
                            stale=from_base, kind=sup.role.value))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class SilentWave:
    """A wave that reaches nobody who can read an SMS, for ``elders`` of the registry.

    ``number`` is 1-based; ``reasons`` say, per role of the wave, why nobody there
    takes an SMS (a few distinct ones, e.g. the nearest hospital's landline)."""

    number: int
    wave: WaveSection
    elders: tuple[str, ...]
    total_elders: int
    reasons: tuple[str, ...]


def silent_waves(
    waves: Sequence[WaveSection],
    registry: Registry,
    nearest_facilities: Callable[[LonLat], Mapping[FacilityKind, Nearby]],
    *,
    voice: bool = False,
) -> list[SilentWave]:
    """The waves that would reach nobody who can read an SMS, judged per elder; with
    ``voice`` (calls on), nobody at all: a landline is then called.

    Who is on duty changes while the gateway runs, so staff and supervisors count by
    role (someone of that role takes SMS); family and facilities per elder (their
    contacts; the nearest facility of the kind, from ``nearest_facilities``, which is
    only asked when the facilities of a kind disagree)."""
    staff_ok = any(r.sms_capable or voice for r in registry.responders.values()
                   if r.role is not ResponderRole.SUPERVISOR)
    supervisor_ok = any(r.sms_capable or voice for r in registry.responders.values()
                        if r.role is ResponderRole.SUPERVISOR)
    by_kind = {kind: [f for f in registry.facilities.values() if f.kind is kind]
               for kind in FacilityKind}
    nearest: dict[str, Mapping[FacilityKind, Nearby]] = {}

    def facility_ok(elder: Elder, kind: FacilityKind) -> tuple[bool, str]:
        facilities = by_kind[kind]
        if not facilities:
            return False, f"{kind.value}: none in the registry"
        able = {f.sms_capable or voice for f in facilities}
        if able == {True}:
            return True, ""
        if able == {False}:
            return False, f"{kind.value}: no {kind.value} duty phone takes SMS"
        if elder.elder_id not in nearest:
            nearest[elder.elder_id] = nearest_facilities(elder.location)
        found = nearest[elder.elder_id].get(kind)
        if found is None:
            return False, f"{kind.value}: none found near the elder"
        if found.phone in registry.no_sms:
            return False, f"{kind.value}: the nearest, {found.name} ({found.id}), has a landline"
        return True, ""

    silent: list[SilentWave] = []
    for number, wave in enumerate(waves, 1):
        if (wave.staff and staff_ok) or (wave.supervisor and supervisor_ok):
            continue
        if not (wave.family or wave.staff or wave.supervisor or wave.clinic or wave.hospital):
            silent.append(SilentWave(number, wave, tuple(registry.elders), len(registry.elders),
                                     ("the wave names nobody",)))
            continue
        fixed = [why for wanted, why in (
            (wave.staff, "staff: no grid leader or community worker takes SMS"),
            (wave.supervisor, "supervisor: no supervisor takes SMS")) if wanted]
        elders: list[str] = []
        reasons: dict[str, None] = dict.fromkeys(fixed)
        for elder in registry.elders.values():
            why_not: list[str] = []
            if wave.family:
                if any(c.sms_capable or voice for c in elder.contacts):
                    continue
                why_not.append("family: no contact takes SMS")
            reached = False
            for wanted, kind in ((wave.clinic, FacilityKind.CLINIC),
                                 (wave.hospital, FacilityKind.HOSPITAL)):
                if wanted:
                    ok, why = facility_ok(elder, kind)
                    reached |= ok
                    if not ok:
                        why_not.append(why)
            if reached:
                continue
            elders.append(elder.elder_id)
            reasons.update(dict.fromkeys(why_not))
        if elders:
            silent.append(SilentWave(number, wave, tuple(elders), len(registry.elders),
                                     tuple(reasons)))
    return silent
