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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass

from gateway.config import EscalationSection, GeoSection, WaveSection
from gateway.geo import GeoResult, GeoService, Nearby
from gateway.journal import MessageKind, NotificationPlan, NotificationRecord
from gateway.model import Elder, FacilityKind, Registry, ResponderRole
from gateway.wording import AlarmFacts, Composer

__all__ = ["Planner", "Situation", "supervisors_near"]


@dataclass(frozen=True, slots=True)
class Situation:
    """What the planner knows about one alarm, fixed once the alarm is located."""

    elder: Elder
    facts: AlarmFacts
    found: GeoResult  # on-duty staff, nearest first, and the nearest facilities
    supervisors: tuple[Nearby, ...] = ()
    map_url: str | None = None  # a map link for staff messages


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

    def plan(self, number: int, situation: Situation,
             told: Set[str]) -> list[NotificationPlan]:
        """The messages of wave ``number`` (1-based) for people not in ``told``."""
        wave = self._waves[number - 1]
        s, c = situation, self._composer
        plans: list[NotificationPlan] = []
        if wave.family:
            plans += [NotificationPlan("family", ct.name, ct.phone,
                                       c.family(s.facts, ct.language))
                      for ct in s.elder.contacts]
        if wave.staff:
            offset = self._offsets[number - 1]
            plans += [NotificationPlan("responder", r.name, r.phone,
                                       c.staff(s.facts, r.distance_m, map_url=s.map_url,
                                               from_base=r.stale))
                      for r in s.found.responders[offset: offset + wave.staff]]
            if not s.found.responders and not wave.supervisor:
                plans += self._supervisors(s)  # nobody on duty: escalate at once
        if wave.supervisor:
            plans += self._supervisors(s)
        for wanted, kind in ((wave.clinic, FacilityKind.CLINIC),
                             (wave.hospital, FacilityKind.HOSPITAL)):
            fac = s.found.facilities.get(kind)
            if wanted and fac is not None:
                plans.append(NotificationPlan("facility", fac.name, fac.phone,
                                              c.facility(s.facts)))
        return _once_per_phone(plans, told)

    def follow_up(self, kind: MessageKind, facts: AlarmFacts, told: Iterable[NotificationRecord],
                  *, by: str = "", skip: str | None = None) -> list[NotificationPlan]:
        """"Taken by ``by``" or "cancelled" to everyone an escalation wave reached.

        ``skip`` is the phone of whoever took the alarm (they know)."""
        if kind is MessageKind.TAKEN:
            text = self._composer.taken(facts, by)
        elif kind is MessageKind.CANCELLED:
            text = self._composer.cancelled(facts)
        else:
            raise ValueError(f"{kind} is not a follow-up")
        people = {r.phone: r for r in told
                  if r.kind is MessageKind.ESCALATION and r.phone != skip}
        return [NotificationPlan(r.role, r.name, r.phone, text) for r in people.values()]

    def _supervisors(self, s: Situation) -> list[NotificationPlan]:
        return [NotificationPlan("supervisor", sup.name, sup.phone,
                                 self._composer.staff(s.facts, sup.distance_m,
                                                      map_url=s.map_url, from_base=sup.stale))
                for sup in s.supervisors]


def _once_per_phone(plans: Sequence[NotificationPlan], told: Set[str]) -> list[NotificationPlan]:
    seen = set(told)
    unique: list[NotificationPlan] = []
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
    for sup in registry.responders.values():
        if sup.role is not ResponderRole.SUPERVISOR:
            continue
        where, from_base = geo.position_of(sup.responder_id) or (sup.base, True)
        distance, bearing = geo.projector.geodesic(elder.location, where)
        found.append(Nearby(sup.responder_id, sup.name, sup.phone, where, distance, bearing,
                            stale=from_base, kind=sup.role.value))
    return tuple(found)
