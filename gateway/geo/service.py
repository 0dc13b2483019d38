"""The geo service: the nearest responders and facilities for an alarm, live positions.

:class:`GeoService` is what the gateway asks: it validates and projects positions
(:mod:`gateway.geo.projection`), keeps responders in the two-tier index and facilities
in point trees (:mod:`gateway.geo.index`, whose docstring explains the index and its
measured costs), applies live fixes and duty changes, and answers with geodesic
distances and bearings that people are told.

Threading and reloads
    rtree is not thread-safe, and nothing here locks: a :class:`GeoService` is used from
    the event-loop thread only, except while it is being built. A registry reload is
    split in two so that the expensive part stays off the hot path. The new service is
    built from the new registry in a worker thread (``asyncio.to_thread``): pyproj
    transformers are thread-safe since 3.1, and the new rtree objects are touched by
    that thread alone until handed over. The build still takes the GIL for its Python
    loops, so the loop may see a few ms of added latency while it runs. If the new
    registry has a bad coordinate, the build raises and the old service stays.
    :meth:`GeoService.adopt_live_state` then copies live positions and duty overrides
    from the old service on the loop thread (O(live responders)), and the caller swaps
    its reference: an alarm in flight keeps the service object it started with, the
    next one gets the new service.
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import structlog

from gateway.geo.index import Fix, PointTree, ResponderIndex, point_tree
from gateway.geo.projection import GeoError, Projector, geodesic_xy, is_number
from gateway.model import Facility, FacilityKind, LonLat, Registry, Responder, ResponderRole

_log = structlog.get_logger(__name__)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


class Nearby(NamedTuple):
    """A responder or facility near the query location.

    ``distance_m`` is geodesic (what people are told); ranking used projected distance.
    ``bearing_deg`` is the forward azimuth from the query location to ``location``.
    ``stale`` is True when ``location`` is a responder's base location because no live
    fix younger than the service's ``stale_after_s`` exists (never reported, or too old).
    ``accuracy_m`` and ``fix_age_s`` describe the live fix used, when one was used.

    A named tuple rather than a frozen dataclass: just as immutable, and built in a
    third of the time (a k=3 query builds three).
    """

    id: str
    name: str
    phone: str
    location: LonLat
    distance_m: float
    bearing_deg: float
    stale: bool = False
    kind: str = ""
    accuracy_m: float | None = None
    fix_age_s: float | None = None


@dataclass(frozen=True, slots=True)
class GeoResult:
    """Everything the command center needs for one location."""

    responders: tuple[Nearby, ...]
    facilities: Mapping[FacilityKind, Nearby]


@dataclass(frozen=True, slots=True)
class GeoStats:
    """Counts for metrics and health checks."""

    responders: int
    eligible: int  # non-supervisors, the ones nearest_responders may return
    on_duty: int  # eligible and on duty
    live: int  # responders (any role) with a fresh live fix
    facilities: int
    cell_m: float
    indexed: int = 0  # entries in the base tree: on duty at build, or came on duty since


# --------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------


class GeoService:
    """Nearest on-duty responders and medical facilities, with live positions.

    Built from a registry; use it from the event-loop thread only (see the module
    docstring). Queries never block: they cost one rtree query plus a few grid cells.

    Args:
        registry: elders, responders and facilities (coordinates in the projector's
            source CRS).
        projector: validation and projection; shared, immutable.
        stale_after_s: a live fix older than this no longer counts; the responder's base
            location is used and results say ``stale=True``.
        clock: wall-clock seconds (epoch), comparable with fix timestamps.
        cell_m: grid cell size for live positions; default from responder density.

    Raises:
        GeoError: a registry coordinate fails the projector's checks (the message names
            the record), or a bad ``stale_after_s`` / ``cell_m``.
    """

    def __init__(
        self,
        registry: Registry,
        projector: Projector,
        *,
        stale_after_s: float = 600.0,
        clock: Callable[[], float] = time.time,
        cell_m: float | None = None,
    ) -> None:
        if not (math.isfinite(stale_after_s) and stale_after_s > 0):
            raise GeoError(f"stale_after_s must be a positive number, got {stale_after_s!r}")
        if cell_m is not None and not (math.isfinite(cell_m) and cell_m > 0):
            raise GeoError(f"cell_m must be a positive number, got {cell_m!r}")
        started = time.perf_counter()
        self._registry = registry
        #: The supervisors, found once (an alarm asks for them; a city has 30k staff).
        self.supervisors: tuple[Responder, ...] = tuple(
            r for r in registry.responders.values() if r.role is ResponderRole.SUPERVISOR)
        self._projector = projector
        self._geod = projector.geod
        self._stale_after = float(stale_after_s)
        self._clock = clock

        # Responders: one slot each, in Z order of their base locations (ties by id, so
        # slots are reproducible).
        responders = sorted(registry.responders.values(), key=lambda r: r.responder_id)
        bx, by = self._project_records(
            [r.base for r in responders], "responder", [r.responder_id for r in responders]
        )
        index = ResponderIndex(responders, bx, by, cell_m=cell_m, area_m=self._area_m())
        self._index = index
        slotted = index.responders
        self._kinds: list[str] = [r.role.value for r in slotted]
        # Base lon/lat by slot, for geodesics without touching the registry objects.
        self._base_lon = array("d", [r.base.lon for r in slotted])
        self._base_lat = array("d", [r.base.lat for r in slotted])
        self._duty_override: dict[str, bool] = {}

        # Facilities: one tree per kind.
        facilities = sorted(registry.facilities.values(), key=lambda f: f.facility_id)
        self._facilities: dict[FacilityKind, list[Facility]] = {}
        self._facility_trees: dict[FacilityKind, PointTree] = {}
        self._facility_xy: dict[FacilityKind, tuple[array[float], array[float]]] = {}
        for kind in FacilityKind:
            members = [f for f in facilities if f.kind is kind]
            if not members:
                continue
            fx, fy = self._project_records(
                [f.location for f in members], "facility", [f.facility_id for f in members]
            )
            tree = point_tree(fx, fy)
            if tree is not None:
                self._facilities[kind] = members
                self._facility_trees[kind] = tree
                self._facility_xy[kind] = (array("d", fx.tolist()), array("d", fy.tolist()))

        # Homes: not indexed (nothing queries them), but checked like everything else,
        # so that a bad one fails the build here rather than its alarm's lookup later.
        elders = sorted(registry.elders.values(), key=lambda e: e.elder_id)
        self._project_records([e.location for e in elders], "elder", [e.elder_id for e in elders])

        _log.info(
            "geo.index.built",
            responders=len(responders),
            eligible=index.eligible_count,
            facilities=len(facilities),
            elders=len(elders),
            cell_m=round(index.cell_m, 1),
            crs=projector.crs,
            build_ms=round((time.perf_counter() - started) * 1000.0, 1),
        )

    # ---- construction helpers ----------------------------------------------------------

    def _project_records(
        self, points: Sequence[LonLat], what: str, ids: Sequence[str]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Project registry positions; an error names the record, e.g. "elder e-17"."""
        try:
            return self._projector.project_many([p.lon for p in points], [p.lat for p in points])
        except GeoError as exc:
            subject = f"{what} {ids[exc.index]}" if exc.index is not None else None
            raise GeoError(exc.reason, point=exc.point, subject=subject) from None


    def _area_m(self) -> tuple[float, float] | None:
        """The configured service area's projected width and height, if there is one."""
        area = self._projector.bbox
        if area is None:
            return None
        cx, cy = self._projector.project_many(
            [area[0], area[2], area[0], area[2]], [area[1], area[1], area[3], area[3]]
        )
        return float(cx.max() - cx.min()), float(cy.max() - cy.min())

    # ---- properties ----------------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        """The registry this service was built from."""
        return self._registry

    @property
    def projector(self) -> Projector:
        """The projector used for every position."""
        return self._projector

    @property
    def stale_after_s(self) -> float:
        """Age in seconds after which a live fix no longer counts."""
        return self._stale_after

    def stats(self) -> GeoStats:
        """Current counts (expires stale fixes first)."""
        index = self._index
        index.expire(self._clock())
        return GeoStats(
            responders=len(index.ids),
            eligible=index.eligible_count,
            on_duty=index.duty_count,
            live=len(index.live),
            facilities=sum(len(v) for v in self._facilities.values()),
            cell_m=index.cell_m,
            indexed=index.tree_size,
        )

    # ---- live updates ----------------------------------------------------------------------

    def update_position(
        self,
        responder_id: str,
        position: LonLat | tuple[float, float],
        *,
        accuracy_m: float | None = None,
        timestamp: float | None = None,
    ) -> bool:
        """Record a responder's live position.

        ``position`` is a :class:`LonLat` or a plain ``(lon, lat)`` pair in degrees
        (longitude first, as everywhere here), e.g. from a decoded position report.
        ``accuracy_m`` is in metres; ``timestamp`` is epoch seconds of the fix (default:
        now); a timestamp in the future is clamped to now, so clock skew cannot keep a
        fix fresh forever. A fix older than the current one for the same responder
        (redelivery, reordering) or already stale on arrival is ignored.

        Returns:
            False for an unknown responder (logged and ignored), True otherwise (also
            when the fix is ignored as older).

        Raises:
            GeoError: bad coordinates (range / service area), accuracy or timestamp.
        """
        index = self._index
        slot = index.slot_of.get(responder_id)
        if slot is None:
            _log.warning("geo.position.unknown_responder", responder_id=responder_id)
            return False
        if not isinstance(position, LonLat):
            lon, lat = position
            position = LonLat(lon, lat)
        self._projector.check(position)
        if accuracy_m is not None and not (
            is_number(accuracy_m) and math.isfinite(accuracy_m) and accuracy_m >= 0
        ):
            raise GeoError(
                f"accuracy must be a finite number >= 0, got {accuracy_m!r}",
                subject=f"responder {responder_id}",
            )
        if timestamp is not None and not (is_number(timestamp) and math.isfinite(timestamp)):
            raise GeoError(
                f"timestamp must be a finite number, got {timestamp!r}",
                subject=f"responder {responder_id}",
            )
        now = self._clock()
        index.expire(now)
        ts = now if timestamp is None else min(float(timestamp), now)
        current = index.fix[slot]
        if current is not None and ts < current.timestamp:
            _log.debug("geo.position.out_of_order", responder_id=responder_id, age_s=now - ts)
            return True
        deadline = ts + self._stale_after
        if deadline <= now:
            _log.debug("geo.position.too_old", responder_id=responder_id, age_s=now - ts)
            return True
        x, y = self._projector.project(position)
        acc = None if accuracy_m is None else float(accuracy_m)
        index.apply_fix(slot, Fix(position, x, y, ts, acc), deadline)
        return True

    def set_on_duty(self, responder_id: str, on_duty: bool) -> bool:
        """Override a responder's on-duty flag (carried by :meth:`adopt_live_state`).

        Returns:
            False for an unknown responder (logged and ignored), True otherwise.
        """
        index = self._index
        slot = index.slot_of.get(responder_id)
        if slot is None:
            _log.warning("geo.duty.unknown_responder", responder_id=responder_id)
            return False
        was = index.set_on_duty(slot, on_duty)
        if on_duty == index.responders[slot].on_duty:
            self._duty_override.pop(responder_id, None)
        else:
            self._duty_override[responder_id] = on_duty
        if was != on_duty:
            _log.info("geo.duty.changed", responder_id=responder_id, on_duty=on_duty)
        return True

    def is_on_duty(self, responder_id: str) -> bool | None:
        """Whether a responder counts as on duty now (overrides included); None if unknown."""
        slot = self._index.slot_of.get(responder_id)
        return None if slot is None else bool(self._index.on_duty[slot])

    def position_of(self, responder_id: str) -> tuple[LonLat, bool] | None:
        """Where a responder is taken to be: ``(location, stale)``, None if unknown."""
        index = self._index
        slot = index.slot_of.get(responder_id)
        if slot is None:
            return None
        index.expire(self._clock())
        fix = index.fresh_fix(slot)
        if fix is not None:
            return fix.lonlat, False
        return index.responders[slot].base, True

    def fix_age_s(self, responder_id: str) -> float | None:
        """Seconds since a responder's last live fix, stale or not; None: never reported."""
        slot = self._index.slot_of.get(responder_id)
        fix = None if slot is None else self._index.fix[slot]
        return None if fix is None else max(0.0, self._clock() - fix.timestamp)

    # ---- reloads ---------------------------------------------------------------------------

    def adopt_live_state(self, previous: GeoService) -> None:
        """Copy fresh live fixes and duty overrides of responders that still exist.

        A duty override is not carried when the new registry changed that responder's
        own on-duty flag: the roster then says something newer than the override.

        Call on the loop thread, before this service answers queries. Responders that are
        gone are dropped; a fix is re-projected if the projectors differ.
        """
        now = self._clock()
        index, old = self._index, previous._index
        old.expire(now)
        index.expire(now)
        carried = dropped = 0
        same_projection = previous._projector is self._projector
        for responder_id, old_fix in old.fresh_fixes():
            slot = index.slot_of.get(responder_id)
            if slot is None:
                dropped += 1
                continue
            current = index.fix[slot]
            if current is not None and current.timestamp > old_fix.timestamp:
                continue
            fix = old_fix
            if not same_projection:
                try:
                    x, y = self._projector.project(fix.lonlat)
                except GeoError:
                    dropped += 1
                    continue
                fix = Fix(fix.lonlat, x, y, fix.timestamp, fix.accuracy_m)
            deadline = fix.timestamp + self._stale_after
            if deadline <= now:
                continue
            index.apply_fix(slot, fix, deadline)
            carried += 1
        overrides = superseded = 0
        for responder_id, on_duty in previous._duty_override.items():
            responder = self._registry.responders.get(responder_id)
            if responder is None:
                continue
            roster_then = previous._registry.responders[responder_id].on_duty
            if responder.on_duty != roster_then:
                # The new roster changed this responder's flag after the override was
                # made: the newer statement wins.
                superseded += 1
                _log.info(
                    "geo.duty.override_superseded",
                    responder_id=responder_id,
                    on_duty=responder.on_duty,
                )
                continue
            self.set_on_duty(responder_id, on_duty)
            overrides += 1
        _log.info(
            "geo.state.adopted",
            positions=carried,
            dropped=dropped,
            duty_overrides=overrides,
            duty_overrides_superseded=superseded,
        )

    # ---- queries ---------------------------------------------------------------------------

    def lookup(self, location: LonLat, *, k: int = 3, exclude: Collection[str] = ()) -> GeoResult:
        """The k nearest on-duty responders and the nearest facility of each kind.

        Raises:
            GeoError: ``location`` fails the projector's checks, or ``k < 1``.
        """
        qx, qy = self._projector.project(location)
        return GeoResult(
            responders=self._nearest_responders(location, qx, qy, k, exclude),
            facilities=self._nearest_facilities(location, qx, qy),
        )

    def nearest_responders(
        self, location: LonLat, k: int, exclude: Collection[str] = ()
    ) -> tuple[Nearby, ...]:
        """The k nearest on-duty, non-supervisor responders, nearest first.

        Ranked by projected distance from each responder's live position (or base
        location when its fix is stale or missing); ties broken by id. Responders whose
        id is in ``exclude`` (e.g. assigned to another open alarm) are skipped. Empty
        when nobody qualifies: the caller escalates to the supervisors.

        Raises:
            GeoError: ``location`` fails the projector's checks, or ``k < 1``.
        """
        qx, qy = self._projector.project(location)
        return self._nearest_responders(location, qx, qy, k, exclude)

    def _nearest_facilities(
        self, origin: LonLat, qx: float, qy: float
    ) -> Mapping[FacilityKind, Nearby]:
        found: dict[FacilityKind, Nearby] = {}
        geod = self._geod
        for kind, tree in self._facility_trees.items():
            members = self._facilities[kind]
            fx, fy = self._facility_xy[kind]
            _, _, i = min(
                ((fx[i] - qx) ** 2 + (fy[i] - qy) ** 2, members[i].facility_id, i)
                for i in tree.nearest(qx, qy, 1)
            )
            f = members[i]
            where = f.location
            dist, bearing = geodesic_xy(geod, origin.lon, origin.lat, where.lon, where.lat)
            found[kind] = Nearby(
                id=f.facility_id,
                name=f.name,
                phone=f.duty_phone,
                location=f.location,
                distance_m=dist,
                bearing_deg=bearing,
                kind=kind.value,
            )
        return MappingProxyType(found)

    def _nearest_responders(
        self, origin: LonLat, qx: float, qy: float, k: int, exclude: Collection[str]
    ) -> tuple[Nearby, ...]:
        if k < 1:
            raise GeoError(f"k must be >= 1, got {k!r}")
        now = self._clock()
        return self._responders_nearby(origin, self._index.nearest(qx, qy, k, exclude, now), now)

    def _responders_nearby(
        self, origin: LonLat, slots: Sequence[int], now: float
    ) -> tuple[Nearby, ...]:
        """The answer for ``slots``: geodesic distance and bearing from ``origin``."""
        geod = self._geod
        olon, olat = origin.lon, origin.lat
        index = self._index
        responders, fixes, deadline = index.responders, index.fix, index.deadline
        kinds = self._kinds
        found = []
        for slot in slots:
            r = responders[slot]
            fix = None if deadline[slot] == -math.inf else fixes[slot]
            if fix is None:  # the base location (lon/lat kept in arrays: no object to load)
                dist, bearing = geodesic_xy(
                    geod, olon, olat, self._base_lon[slot], self._base_lat[slot]
                )
                found.append(
                    Nearby(
                        r.responder_id, r.name, r.phone, r.base, dist, bearing, True, kinds[slot]
                    )
                )
                continue
            location = fix.lonlat
            dist, bearing = geodesic_xy(geod, olon, olat, location.lon, location.lat)
            found.append(
                Nearby(
                    r.responder_id,
                    r.name,
                    r.phone,
                    location,
                    dist,
                    bearing,
                    False,
                    kinds[slot],
                    fix.accuracy_m,
                    max(now - fix.timestamp, 0.0),
                )
            )
        return tuple(found)
