"""What the console shows, as JSON-ready dicts, read from the journal and the world.

No I/O here but the journal's reads; no aiohttp. The server (``server.py``) turns
these into responses. Urgency orders the board: emergencies first, then inactivity,
then supervision notices (offline, battery, receivers), and within each the oldest.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.dispatch import Dispatcher
from gateway.geo.service import GeoResult, Nearby
from gateway.journal import AlarmDetail, AlarmRecord, Journal, NotificationRecord
from gateway.lifecycle import AlarmState
from gateway.model import LonLat, Registry, Responder
from gateway.world import WorldRef

#: Board ranks (lower first).
URGENCY: Final = {"emergency": 0, "inactivity": 1}
SUPERVISION_RANK: Final = 2
#: Open alarms sent with one board read; a storm beyond it shows the count.
BOARD_LIMIT: Final = 500
#: Homes drawn on the map for every elder up to this many (beyond: a city, too many dots).
MAP_ELDERS_MAX: Final = 5000
#: Log events of an alarm's timeline, with the label the console shows.
TIMELINE_EVENTS: Final = frozenset({
    "alarm.journaled", "press.joined", "alarm.notifying", "alarm.notified",
    "alarm.acknowledged", "alarm.cancelled", "alarm.resolved", "alarm.keep_open",
    "alarm.keep_open_ended", "sms.status", "sms.accepted", "sms.failed", "sms.fallback",
    "call.placed", "call.answered", "call.accepted", "call.declined", "call.ended",
    "alarm.false_alarm", "drill.plan", "dispatch.failed",
})


@dataclass(slots=True)
class Views:
    journal: Journal
    world: WorldRef
    dispatcher: Dispatcher
    # Responders by phone with their registry position, for the registry in use (built
    # on first use after a reload): an alarm's view must not scan a city's 30k staff.
    _by_phone: tuple[Registry, dict[str, list[tuple[int, Responder]]]] | None = field(
        default=None, repr=False)

    def _responders_by_phone(self) -> dict[str, list[tuple[int, Responder]]]:
        registry = self.world.registry
        if self._by_phone is None or self._by_phone[0] is not registry:
            index: dict[str, list[tuple[int, Responder]]] = {}
            for i, r in enumerate(registry.responders.values()):
                index.setdefault(r.phone, []).append((i, r))
            self._by_phone = (registry, index)
        return self._by_phone[1]

    # -- alarms ---------------------------------------------------------------------

    async def alarm(self, alarm_id: str) -> dict[str, Any]:
        """The full view of one alarm (raises UnknownAlarm)."""
        return self._alarm(await self.journal.alarm_detail(alarm_id))

    def _alarm(self, detail: AlarmDetail) -> dict[str, Any]:
        rec, notes, calls, logged = detail
        registry = self.world.registry
        elder = registry.elders.get(rec.elder_id)
        device = registry.devices.get(rec.device_id)
        active = self.dispatcher.active.get(rec.alarm_id)
        kind = _kind(rec.code)
        view: dict[str, Any] = {
            "alarm_id": rec.alarm_id, "state": rec.state.value, "code": rec.code,
            "kind": kind, "urgency": URGENCY[kind], "drill": rec.drill,
            "channel": rec.source, "device_id": rec.device_id,
            "device": None if device is None else {
                "scheme": device.scheme.value, "model": device.model,
                "address": device.address},
            "received_at": rec.received_at, "last_press_at": rec.last_press_at,
            "presses": rec.presses, "acknowledged_by": rec.acknowledged_by,
            "acknowledged_at": rec.acknowledged_at, "resolved_at": rec.resolved_at,
            "note": rec.note, "open": rec.state is not AlarmState.RESOLVED,
            "in_flight": active is not None,
            "elder": None if elder is None else {
                "elder_id": elder.elder_id, "name": elder.name, "address": elder.address,
                "community": elder.community, "lon": elder.location.lon,
                "lat": elder.location.lat, "phone": elder.phone, "notes": elder.notes,
                "contacts": [{"name": c.name, "relation": c.relation, "phone": c.phone}
                             for c in elder.contacts]},
            "notifications": [{
                "id": n.id, "role": n.role, "name": n.name, "phone": n.phone,
                "kind": n.kind.value, "wave": n.wave, "state": n.state.value,
                "attempts": n.attempts, "latency_ms": n.latency_ms,
                "error_code": n.error_code, "at": n.created_at} for n in notes],
            "calls": [{
                "id": c.id, "role": c.role, "name": c.name, "phone": c.phone, "wave": c.wave,
                "tree": c.tree, "state": c.state.value, "digits": c.digits,
                "answered_by": c.answered_by, "at": c.created_at} for c in calls],
            "timeline": _timeline(rec, logged, notes),
        }
        if elder is not None:
            geo = active.geo if active is not None and active.geo is not None else None
            view["nearby"] = self._nearby(elder.location, geo, notes)
        else:
            view["nearby"] = {"responders": [], "facilities": []}
        return view

    def _nearby(self, home: LonLat, geo: GeoResult | None,
                notes: Sequence[NotificationRecord]) -> dict[str, Any]:
        service = self.world.geo
        if geo is None:
            geo = service.lookup(home, k=3)
        phones = {n.phone for n in notes}
        by_phone = self._responders_by_phone()
        texted = [r for _, r in sorted(e for p in phones for e in by_phone.get(p, ()))]
        shown: dict[str, dict[str, Any]] = {}
        for near in geo.responders:
            shown[near.id] = _near(near, texted=near.phone in phones)
        for r in texted:  # staff texted in a later wave, or supervisors
            if r.responder_id in shown:
                continue
            at = service.position_of(r.responder_id)
            if at is None:
                continue
            location, stale = at
            found = round(service.projector.geodesic(home, location)[0])
            shown[r.responder_id] = {
                "id": r.responder_id, "name": r.name, "phone": r.phone,
                "lon": location.lon, "lat": location.lat, "distance_m": found,
                "stale": stale, "texted": True}
        return {
            "responders": list(shown.values()),
            "facilities": [dict(_near(f, texted=f.phone in phones), kind=kind.value)
                           for kind, f in geo.facilities.items()],
        }

    async def board(self) -> dict[str, Any]:
        open_alarms = await self.journal.open_alarms()
        shown = sorted(open_alarms, key=lambda a: (URGENCY[_kind(a.code)],
                                                    a.received_at))[:BOARD_LIMIT]
        details = await self.journal.alarm_details([a.alarm_id for a in shown])
        alarms = [self._alarm(d) for d in details if d is not None]
        return {"alarms": alarms, "open_total": len(open_alarms),
                "notices": await self.notices()}

    async def notices(self) -> list[dict[str, Any]]:
        return [dict(n, urgency=URGENCY.get(n["kind"], SUPERVISION_RANK))
                for n in await self.journal.open_notices()]

    async def history(self, *, elder: str | None, device: str | None,
                      start: float | None, end: float | None,
                      limit: int = 500) -> list[dict[str, Any]]:
        registry = self.world.registry
        elder_ids: list[str] | None = None
        if elder:
            needle = elder.strip()
            elder_ids = [e.elder_id for e in registry.elders.values()
                         if needle == e.elder_id or needle in e.name][:500]
        found = await self.journal.find_alarms(
            elder_ids=elder_ids, device_id=device.strip() if device else None,
            start=start, end=end, limit=limit)
        rows = []
        for a in found:
            e = registry.elders.get(a.elder_id)
            rows.append({
                "alarm_id": a.alarm_id, "received_at": a.received_at, "state": a.state.value,
                "code": a.code, "channel": a.source, "device_id": a.device_id,
                "elder_id": a.elder_id, "elder": e.name if e else None,
                "community": e.community if e else None, "drill": a.drill,
                "acknowledged_by": a.acknowledged_by,
                "ack_s": None if a.acknowledged_at is None
                else round(a.acknowledged_at - a.received_at, 1),
                "resolved_at": a.resolved_at, "note": a.note})
        return rows

    # -- people and devices --------------------------------------------------------------

    def responders(self, *, on_duty_only: bool = False) -> list[dict[str, Any]]:
        """Every responder (the responders page), or those on duty (the map's poll: a
        city has 30k staff, a shift a fraction of them)."""
        service = self.world.geo
        busy: dict[str, list[str]] = {}
        for alarm_id, alarm in self.dispatcher.active.items():
            for rid in alarm.holds:
                busy.setdefault(rid, []).append(alarm_id)
        rows = []
        for r in self.world.registry.responders.values():
            if on_duty_only and not service.is_on_duty(r.responder_id):
                continue
            at = service.position_of(r.responder_id)
            age = service.fix_age_s(r.responder_id)
            location, stale = at if at is not None else (r.base, True)
            rows.append({
                "id": r.responder_id, "name": r.name, "phone": r.phone,
                "community": r.community, "role": r.role.value,
                "on_duty": bool(service.is_on_duty(r.responder_id)),
                "lon": location.lon, "lat": location.lat, "stale": stale,
                "fix_age_s": None if age is None else round(age, 1),
                "busy_with": busy.get(r.responder_id, [])})
        return rows

    def map_points(self) -> dict[str, Any]:
        """Elders' homes (a city's are left out: only alarms' homes are drawn then) and
        the facilities."""
        registry = self.world.registry
        elders = registry.elders.values() if len(registry.elders) <= MAP_ELDERS_MAX else ()
        return {
            "elders_total": len(registry.elders),
            "elders": [{"id": e.elder_id, "name": e.name, "lon": e.location.lon,
                        "lat": e.location.lat, "community": e.community} for e in elders],
            "facilities": [{"id": f.facility_id, "name": f.name, "kind": f.kind.value,
                            "lon": f.location.lon, "lat": f.location.lat}
                           for f in registry.facilities.values()],
        }


def _kind(code: str) -> str:
    """An alarm's kind on the board (its urgency): inactivity, or an emergency."""
    return "inactivity" if code == "inactivity" else "emergency"


def _near(n: Nearby, *, texted: bool) -> dict[str, Any]:
    return {"id": n.id, "name": n.name, "phone": n.phone, "lon": n.location.lon,
            "lat": n.location.lat, "distance_m": round(n.distance_m),
            "stale": n.stale, "texted": texted}


def _timeline(rec: AlarmRecord, logged: Iterable[tuple[float, str, dict[str, Any]]],
              notes: Sequence[NotificationRecord]) -> list[dict[str, Any]]:
    """Press, journal, alert, each SMS, delivery, acknowledgement, resolution: times
    relative to the press (``t_s``); ``name`` and ``role`` say whom an SMS event is about."""
    by_id = {n.id: n for n in notes}
    rows: list[dict[str, Any]] = [
        {"at": rec.received_at, "t_s": 0.0, "event": "press", "detail": rec.source}]
    logged_notes: set[int] = set()
    for at, event, data in logged:
        if event not in TIMELINE_EVENTS and not event.startswith(("alarm.", "sms.", "call.")):
            continue
        row: dict[str, Any] = {
            "at": at, "t_s": round(at - rec.received_at, 3), "event": event,
            "detail": str(data.get("by") or data.get("status") or data.get("note") or "")}
        note = by_id.get(data.get("notification_id", -1))
        if note is not None:
            logged_notes.add(note.id)
            row.update(name=note.name, role=note.role, kind=note.kind.value)
        rows.append(row)
    for n in notes:  # SMS whose acceptance the log does not carry: from the row itself
        if n.latency_ms is not None and n.id not in logged_notes:
            rows.append({"at": rec.received_at + n.latency_ms / 1000,
                         "t_s": round(n.latency_ms / 1000, 3), "event": "sms.accepted",
                         "detail": n.state.value, "name": n.name, "role": n.role,
                         "kind": n.kind.value})
    rows.sort(key=lambda r: r["at"])
    return rows


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return "\ufeff" + out.getvalue()  # BOM: Excel opens UTF-8 Chinese text correctly
