"""Geolocation: where the elder lives and who can get there first.

Theory of operation
===================

Coordinates
    Registry and live positions are geographic lon/lat (WGS84 or CGCS2000, EPSG:4490;
    the two agree to centimetres). :class:`Projector` projects them once into one metric
    CRS for the whole service area (default UTM 50N, EPSG:32650: Kenli sits at ~118.5E,
    exactly on the border of the CGCS2000 3-degree Gauss-Kruger zones 39/40, so a
    zone-per-point choice would split the district; UTM 50N spans 114-120E). The
    ``Transformer`` is built once with ``always_xy=True`` (EPSG:4490 is latitude-first
    otherwise) and bulk loads use its array form. Ranking uses projected (planar)
    distance, which differs from the geodesic by ~0.02 % here; distances and bearings
    shown to people come from ``pyproj.Geod``. Every point is range-checked (a swapped
    lat/lon shows up as a latitude outside [-90, 90] or a point outside the service area,
    and the error says "swapped?") before it can reach an index.

Static indexes (facilities, homes, responders' base locations)
    Bulk-loaded rtree indexes, built from numpy arrays through rtree's array stream
    (libspatialindex packs the tree in one pass: ~1 s for 1e6 points, 4-5x faster than
    a Python generator stream), with small nodes (16 entries), which made k=3 nearest
    queries ~30 % faster than the default 100 at 1e6 points. Nothing is ever deleted
    from them (a delete costs ~250 us at 1e6 entries, and needs the exact box).

    Queries call libspatialindex's ``Index_NearestNeighbors_id`` through the library
    rtree loaded, with reused buffers (:class:`_PointTree`): rtree's Python wrapper
    adds ~4 us per call to the ~10 us of C work at 1e6 points. Responder slots are
    numbered in Z order of base locations, so that the per-slot arrays a query reads
    for a few neighbours share cache lines instead of costing a miss each.

Moving responders: a two-tier index
    Moving a point in an rtree (delete + insert) for 5,000 responders every 30 s would
    spend most of the event loop's time in deletes. Rebuilding a tree periodically
    instead blocks the loop for the whole build and makes positions lag by the rebuild
    period. So:

    * tier 1, the base rtree: eligible (non-supervisor) responders at their *base*
      locations: those on duty when it was built, plus those who came on duty since
      (inserted, ~10 us). Those who go off duty stay in it and are skipped, until the
      next rebuild (a registry reload), so that off-duty crowds do not make every
      query wade through them.
    * tier 2, a uniform grid hash (``dict[cell, set[slot]]``, one int per cell key)
      holding only responders with a *fresh live* fix. A move is a validation and
      projection (~2 us) plus, when the cell changes, two set operations: O(1);
      ~150,000 updates/s measured.

    A responder is in exactly one tier at a time: while its live fix is fresh, its tier-1
    entry is masked (skipped) and tier 2 has it at the live position; when the fix goes
    stale it leaves tier 2 and its tier-1 entry counts again (base location,
    ``stale=True``). Staleness is exact: each fix pushes ``(deadline, slot)`` onto a heap
    and every query/update first pops the expired deadlines (O(log n) amortised per fix;
    the heap is compacted when superseded deadlines pile up).

    A query merges both tiers without losing exactness (tested against brute force):
    it asks tier 1 for a batch of nearest entries, sized from the share of on-duty,
    unmasked, unexcluded entries so that a second call is needed about once in 1,000
    (binomial tail), and skips masked, off-duty and excluded entries; everything in
    tier 1 closer than the batch's last entry has then been seen. Tier 2 is then probed
    only in the cells overlapping the square around the current k-th best, clipped to
    the occupied part of the grid (or, when tier 1 had fewer than k, ring by ring
    outwards until a ring's minimum distance exceeds the k-th best; either way it scans
    the occupied cells directly when that is cheaper). If the k-th best is still farther
    than what tier 1 has covered, tier 1 is asked again with a 4x larger batch. The grid
    cell size follows the responder density (about one responder per cell on average,
    over the service area), so tier 2 costs a handful of dictionary probes.

    When live responders make up half of tier 1 or more (every phone reporting: the
    design point of 5,000 moving responders), a batch of nearest base entries would be
    mostly masked, so the order flips: tier 2 first (ring by ring), then one rtree
    intersection for the base entries within the k-th best distance found there: ~24 us
    instead of ~38 us at the median for 5,000 responders all live.

    Measured (``bench/geo.py``, shared 2-vCPU VM, 5,000 of the responders live): a full
    k=3 query, results included, costs ~25 us at the median at 1e5 and 1e6 responders
    (p99 ~47-54 us, pooled over 100,000 calls), of which ~11 us is the C call and ~5 us
    the three results with their geodesics; numpy brute force costs ~0.2 ms at 1e5 and
    ~2 ms at 1e6 points.

Threading and reloads
    rtree is not thread-safe, and nothing here locks: a :class:`GeoService` is used from
    the event-loop thread only. A registry reload is split in two so that the expensive
    part stays off the hot path. :meth:`GeoService.prepare_rebuild` builds a complete new
    service from the new registry and reads only immutable configuration of the old one,
    so it may run in a worker thread (``asyncio.to_thread``): pyproj transformers are
    thread-safe since 3.1, and the new rtree objects are touched by that thread alone
    until handed over. The build still takes the GIL for its Python loops, so the loop
    may see a few ms of added latency while it runs. :meth:`GeoService.adopt_live_state`
    then copies live positions and duty overrides from the old service on the loop
    thread (O(live responders)), and the caller swaps its reference: an alarm in flight
    keeps the service object it started with, the next one gets the new service. If the
    new registry has a bad coordinate, the build raises and the old service stays.
    :meth:`GeoService.rebuilt` does both steps in one call.
"""

from __future__ import annotations

import ctypes
import heapq
import math
import time
from array import array
from bisect import insort
from collections.abc import (
    Callable,
    Collection,
    Container,
    Iterable,
    KeysView,
    Mapping,
    Sequence,
)
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final, NamedTuple, cast

import numpy as np
import numpy.typing as npt
import orjson
import structlog
from pyproj import CRS, Geod, Transformer
from pyproj.exceptions import CRSError
from rtree import core as rtree_core
from rtree import index as rtree_index

from gateway.model import (
    Elder,
    Facility,
    FacilityKind,
    LonLat,
    Registry,
    Responder,
    ResponderRole,
)

__all__ = [
    "DEFAULT_CRS",
    "POSITION_TOPIC_FILTER",
    "GeoError",
    "GeoResult",
    "GeoService",
    "GeoStats",
    "Nearby",
    "Projector",
    "parse_position",
    "responder_id_from_topic",
]

_log = structlog.get_logger(__name__)

DEFAULT_CRS: Final = "EPSG:32650"
"""UTM 50N: one metric CRS for the whole district (see the module docstring)."""

POSITION_TOPIC_FILTER: Final = "responders/+/location"
"""MQTT subscription for responders' phones: ``responders/<id>/location``."""

MAX_POSITION_PAYLOAD: Final = 4096
"""A position is a few dozen bytes; anything this large is not one (and is not parsed)."""

# Timestamps above this are milliseconds (1e11 s is the year 5138): reject rather than
# guess, or a phone app sending milliseconds would look fresh for centuries.
_MAX_EPOCH_SECONDS: Final = 1e11

# Small rtree nodes: fewer distance computations per visited leaf for point data.
_RTREE_CAPACITY: Final = 16
_RTREE_FILL: Final = 0.9

# Grid cell size bounds: below 20 m GPS noise alone moves people between cells on every
# fix; above 20 km a ring scan degenerates into a scan of everything.
# Up to this many excluded ids are converted to slots per query (see _excluded_slots).
_EXCLUDE_CONVERT_MAX: Final = 64

# When live (tier-2) responders are at least this share of the base tree's entries, a
# query asks tier 2 first (see GeoService._nearest_responders).
_LIVE_FIRST_SHARE = 0.5

_MIN_CELL_M: Final = 20.0
_MAX_CELL_M: Final = 20_000.0
_MIN_EXTENT_M: Final = 1_000.0

# A bounding box may extend slightly beyond the CRS area of use (UTM is usable a little
# past its zone edge), but not far: the planar distances would stop ranking correctly.
_AREA_MARGIN_DEG: Final = 1.0

_SUPERVISOR: Final = ResponderRole.SUPERVISOR


class GeoError(ValueError):
    """Bad coordinates or position data; the message says which value and why.

    Attributes:
        reason: what is wrong, in words.
        point: the offending position, when there is one.
        subject: what the position belongs to (``"responder r-17"``, ``"payload"``).
        index: position of the offending element in a bulk call.
    """

    def __init__(
        self,
        reason: str,
        *,
        point: LonLat | None = None,
        subject: str | None = None,
        index: int | None = None,
    ) -> None:
        self.reason = reason
        self.point = point
        self.subject = subject
        self.index = index
        super().__init__(self._message())

    def _message(self) -> str:
        parts = []
        if self.subject:
            parts.append(f"{self.subject}: ")
        if self.index is not None:
            parts.append(f"element {self.index}: ")
        parts.append(self.reason)
        if self.point is not None:
            parts.append(f" (got lon={self.point.lon!r}, lat={self.point.lat!r})")
        return "".join(parts)

    def __str__(self) -> str:
        return self._message()


# --------------------------------------------------------------------------------------
# Coordinates
# --------------------------------------------------------------------------------------


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _in_box(lon: float, lat: float, box: tuple[float, float, float, float]) -> bool:
    return box[0] <= lon <= box[2] and box[1] <= lat <= box[3]


class Projector:
    """Validates lon/lat positions and projects them into one metric CRS.

    Args:
        crs: the projected, metre-based CRS used for indexing and ranking.
        source_crs: the geographic CRS of the input (EPSG:4326 WGS84 or EPSG:4490
            CGCS2000); input is always (lon, lat), whatever the CRS's axis order.
        bbox: the service area as ``(min_lon, min_lat, max_lon, max_lat)``; points
            outside it are rejected. Without it, the CRS's area of use is the limit.

    Raises:
        GeoError: an unknown CRS, a source that is not geographic, a target that is not
            projected in metres, or a bbox that is malformed or far outside the CRS's
            area of use.
    """

    __slots__ = ("_area", "_fwd", "_geod", "bbox", "crs", "source_crs")

    def __init__(
        self,
        crs: str = DEFAULT_CRS,
        source_crs: str = "EPSG:4326",
        bbox: tuple[float, float, float, float] | None = None,
    ) -> None:
        try:
            target = CRS.from_user_input(crs)
            source = CRS.from_user_input(source_crs)
        except CRSError as exc:
            raise GeoError(f"unknown CRS: {exc}") from exc
        if not source.is_geographic:
            raise GeoError(f"source CRS {source_crs} is not geographic (lon/lat degrees)")
        if not target.is_projected or any(
            a.unit_name not in ("metre", "meter") for a in target.axis_info
        ):
            raise GeoError(f"CRS {crs} is not a projected CRS in metres")
        area_of_use = target.area_of_use
        use_box = (
            (area_of_use.west, area_of_use.south, area_of_use.east, area_of_use.north)
            # An area across the antimeridian (west > east) is not a box we can test.
            if area_of_use is not None and area_of_use.west < area_of_use.east
            else None
        )
        if bbox is not None:
            bbox = self._validated_bbox(bbox, crs, use_box)
        self.crs = crs
        self.source_crs = source_crs
        self.bbox = bbox
        self._area = bbox if bbox is not None else use_box
        self._fwd = Transformer.from_crs(source, target, always_xy=True)
        self._geod: Geod = source.get_geod() or Geod(ellps="WGS84")

    @staticmethod
    def _validated_bbox(
        bbox: tuple[float, float, float, float],
        crs: str,
        use_box: tuple[float, float, float, float] | None,
    ) -> tuple[float, float, float, float]:
        if len(bbox) != 4 or not all(_is_number(v) and math.isfinite(v) for v in bbox):
            raise GeoError(f"bbox must be four finite numbers, got {bbox!r}")
        min_lon, min_lat, max_lon, max_lat = (float(v) for v in bbox)
        if not (-180.0 <= min_lon < max_lon <= 180.0 and -90.0 <= min_lat < max_lat <= 90.0):
            raise GeoError(
                f"bbox must be (min_lon, min_lat, max_lon, max_lat) within lon [-180, 180] "
                f"and lat [-90, 90] with min < max, got {bbox!r}"
            )
        if use_box is not None:
            m = _AREA_MARGIN_DEG
            if not (
                min_lon >= use_box[0] - m
                and min_lat >= use_box[1] - m
                and max_lon <= use_box[2] + m
                and max_lat <= use_box[3] + m
            ):
                raise GeoError(
                    f"bbox {bbox!r} lies outside the area of use of {crs} {use_box!r}: "
                    "choose a CRS that covers the service area"
                )
        return (min_lon, min_lat, max_lon, max_lat)

    @property
    def area(self) -> tuple[float, float, float, float] | None:
        """The box points must fall in: the bbox, else the CRS's area of use."""
        return self._area

    @property
    def geod(self) -> Geod:
        """The ellipsoid of the source CRS, for geodesic distances."""
        return self._geod

    @staticmethod
    def check_range(p: LonLat) -> None:
        """Check that ``p`` is a finite lon/lat within the valid ranges.

        Raises:
            GeoError: not numbers, not finite, or out of range (with a hint when the
                values look like latitude and longitude swapped).
        """
        lon, lat = p.lon, p.lat
        if not (_is_number(lon) and _is_number(lat)):
            raise GeoError("lon and lat must be numbers", point=p)
        if not (math.isfinite(lon) and math.isfinite(lat)):
            raise GeoError("lon and lat must be finite", point=p)
        if not -90.0 <= lat <= 90.0:
            hint = (
                "; looks like latitude and longitude are swapped (give lon first)"
                if -90.0 <= lon <= 90.0 and -180.0 <= lat <= 180.0
                else ""
            )
            raise GeoError(f"latitude {lat!r} is outside [-90, 90]{hint}", point=p)
        if not -180.0 <= lon <= 180.0:
            raise GeoError(f"longitude {lon!r} is outside [-180, 180]", point=p)

    def check(self, p: LonLat) -> None:
        """Check ranges and that ``p`` lies in the service area.

        Raises:
            GeoError: see :meth:`check_range`; or outside the service area, with a
                "swapped?" hint when the swapped point would be inside.
        """
        self.check_range(p)
        area = self._area
        if area is not None and not _in_box(p.lon, p.lat, area):
            hint = (
                "; looks like latitude and longitude are swapped (give lon first)"
                if _in_box(p.lat, p.lon, area)
                else ""
            )
            which = "service area bbox" if self.bbox is not None else f"area of use of {self.crs}"
            raise GeoError(f"outside the {which} {area!r}{hint}", point=p)

    def project(self, p: LonLat) -> tuple[float, float]:
        """Check ``p`` and return its projected ``(x, y)`` in metres.

        Raises:
            GeoError: see :meth:`check`, or the projection is not finite.
        """
        lon, lat = p.lon, p.lat
        area = self._area
        # Fast path for the common case: a float inside the area (which lies within the
        # valid ranges, and NaN fails every comparison) needs no further checks.
        if not (
            area is not None
            and type(lon) is float
            and type(lat) is float
            and area[0] <= lon <= area[2]
            and area[1] <= lat <= area[3]
        ):
            self.check(p)
        x, y = self._fwd.transform(lon, lat)
        if not (math.isfinite(x) and math.isfinite(y)):
            raise GeoError(f"cannot be projected into {self.crs}", point=p)
        return float(x), float(y)

    def project_many(
        self,
        lons: Sequence[float] | npt.NDArray[np.float64],
        lats: Sequence[float] | npt.NDArray[np.float64],
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Check and project many points in one array transform.

        Raises:
            GeoError: mismatched inputs, or the first bad point with its ``index``.
        """
        try:
            lo = np.asarray(lons, dtype=np.float64)
            la = np.asarray(lats, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise GeoError(f"lons and lats must be numbers: {exc}") from exc
        if lo.ndim != 1 or lo.shape != la.shape:
            raise GeoError(
                f"lons and lats must be 1-D and of equal length, got shapes {lo.shape} "
                f"and {la.shape}"
            )
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(lo) & np.isfinite(la)
            ok &= (la >= -90.0) & (la <= 90.0) & (lo >= -180.0) & (lo <= 180.0)
            area = self._area
            if area is not None:
                ok &= (lo >= area[0]) & (lo <= area[2]) & (la >= area[1]) & (la <= area[3])
        if not ok.all():
            i = int(np.argmin(ok))
            try:
                self.check(LonLat(float(lo[i]), float(la[i])))
            except GeoError as exc:
                raise GeoError(exc.reason, point=exc.point, index=i) from None
            raise GeoError("rejected by the range check", index=i)  # pragma: no cover
        x, y = self._fwd.transform(lo, la)
        xs = np.asarray(x, dtype=np.float64)
        ys = np.asarray(y, dtype=np.float64)
        finite = np.isfinite(xs) & np.isfinite(ys)
        if not finite.all():
            i = int(np.argmin(finite))
            raise GeoError(
                f"cannot be projected into {self.crs}",
                point=LonLat(float(lo[i]), float(la[i])),
                index=i,
            )
        return xs, ys

    def geodesic(self, a: LonLat, b: LonLat) -> tuple[float, float]:
        """Geodesic distance in metres and forward azimuth from ``a`` to ``b``.

        The azimuth is in degrees clockwise from north, in [0, 360); 0 for equal points.

        Raises:
            GeoError: either point fails :meth:`check_range`.
        """
        self.check_range(a)
        self.check_range(b)
        return _geodesic(self._geod, a, b)


def _geodesic(geod: Geod, a: LonLat, b: LonLat) -> tuple[float, float]:
    return _geodesic_xy(geod, a.lon, a.lat, b.lon, b.lat)


def _geodesic_xy(
    geod: Geod, lon1: float, lat1: float, lon2: float, lat2: float
) -> tuple[float, float]:
    az, _back, dist = geod.inv(lon1, lat1, lon2, lat2)
    return float(dist), _bearing(az, dist)


def _bearing(azimuth: float, dist: float) -> float:
    """A forward azimuth as a bearing in [0, 360); 0 for equal points."""
    if dist == 0.0:
        return 0.0
    bearing = azimuth % 360.0
    # -1e-15 % 360.0 rounds to 360.0, which is outside [0, 360).
    return 0.0 if bearing >= 360.0 else float(bearing)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


class Nearby(NamedTuple):
    """A responder, facility or home near the query location.

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
    homes: int
    cell_m: float
    indexed: int = 0  # entries in the base tree: on duty at build, or came on duty since


# --------------------------------------------------------------------------------------
# Indexes
# --------------------------------------------------------------------------------------


def _z_order(xs: npt.NDArray[np.float64], ys: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
    """A stable permutation sorting points along a Z-order (Morton) curve.

    Coordinates are quantised to 16 bits over their bounding box and their bits
    interleaved; points near each other mostly end up near each other in the order.
    """
    if len(xs) == 0:
        return np.arange(0, dtype=np.intp)

    def quantised(v: npt.NDArray[np.float64]) -> npt.NDArray[np.uint64]:
        lo, hi = float(v.min()), float(v.max())
        scale = 65535.0 / (hi - lo) if hi > lo else 0.0
        return ((v - lo) * scale).astype(np.uint64)

    def spread(v: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        # 16 bits -> the even bits of 32 ("part 1 by 1").
        v = (v | (v << np.uint64(8))) & np.uint64(0x00FF00FF)
        v = (v | (v << np.uint64(4))) & np.uint64(0x0F0F0F0F)
        v = (v | (v << np.uint64(2))) & np.uint64(0x33333333)
        return (v | (v << np.uint64(1))) & np.uint64(0x55555555)

    codes = spread(quantised(xs)) | (spread(quantised(ys)) << np.uint64(1))
    return np.argsort(codes, kind="stable")


# Prototypes for libspatialindex's C API as rtree loads it, with plain addresses for
# pointers: the call converts six integers and runs no errcheck hook.
_NEAREST_PROTO: Final = ctypes.CFUNCTYPE(
    ctypes.c_int,  # RTError: 0 when all is well
    ctypes.c_void_p,  # IndexH
    ctypes.c_void_p,  # double* pdMin
    ctypes.c_void_p,  # double* pdMax
    ctypes.c_uint32,  # nDimension
    ctypes.c_void_p,  # int64_t** ids (out, freed with Index_Free)
    ctypes.c_void_p,  # uint64_t* nResults (in: wanted; out: found, ties included)
)
_FREE_PROTO: Final = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _free_nothing(_address: int | None) -> None:
    """Stands in for Index_Free until the lean call is bound (never called then)."""


class _PointTree:
    """A bulk-loaded rtree of points with a lean k-nearest call.

    ``rtree.Index.nearest`` spends ~4 us per call in Python around the C work (two
    property reads that are ctypes calls themselves, fresh ctypes buffers, a generator,
    casts, an errcheck hook), on top of ~11 us in libspatialindex for k=3 at 1e6 points.
    This calls the same C functions, ``Index_NearestNeighbors_id`` and
    ``Index_Intersects_id``, from the library rtree loaded (``rtree.core.rt``), with
    buffers reused across calls, and frees the result array with ``Index_Free`` as rtree
    does. If the library lacks these symbols, or an answer differs from rtree's on
    probes at construction, it falls back to ``Index.nearest`` / ``Index.intersection``.
    The buffers are shared: use one instance from one thread at a time (a GeoService is
    used from the event-loop thread only; a rebuild in a worker thread builds its own
    trees).
    """

    __slots__ = (
        "_args",
        "_box",
        "_box_args",
        "_count",
        "_fast",
        "_free",
        "_ids",
        "_intersects",
        "_out",
        "_point",
        "index",
    )

    def __init__(self, tree: rtree_index.Index, probe: tuple[float, float]) -> None:
        self.index = tree  # keeps the C index alive as long as its address is used
        self._point = (ctypes.c_double * 2)()
        self._count = ctypes.c_uint64(0)
        # Where the C call stores the address of the id array it allocates: one buffer
        # seen as an int64 pointer (to read the ids) and as an address (to free them).
        self._ids = ctypes.POINTER(ctypes.c_int64)()
        self._out = ctypes.c_void_p.from_buffer(self._ids)
        self._fast: Callable[..., int] | None = None
        self._free: Callable[[int | None], None] = _free_nothing
        self._args: tuple[int, int, int, int, int, int] = (0, 0, 0, 2, 0, 0)
        self._box = (ctypes.c_double * 4)()  # min x, min y, max x, max y
        self._box_args: tuple[int, int, int, int, int, int] = (0, 0, 0, 2, 0, 0)
        self._intersects: Callable[..., int] | None = None
        problem = self._bind(tree, probe)
        if problem is not None:
            _log.warning("geo.rtree.lean_call_unavailable", reason=problem)
            self._fast = self._intersects = None

    def _bind(self, tree: rtree_index.Index, probe: tuple[float, float]) -> str | None:
        """Set up the lean call; the reason it cannot be used, or None."""
        try:
            handle = ctypes.cast(tree.handle, ctypes.c_void_p).value
            self._fast = _NEAREST_PROTO(("Index_NearestNeighbors_id", rtree_core.rt))
            self._intersects = _NEAREST_PROTO(("Index_Intersects_id", rtree_core.rt))
            self._free = _FREE_PROTO(("Index_Free", rtree_core.rt))
        except (AttributeError, TypeError, ValueError, OSError, ctypes.ArgumentError) as exc:
            return f"{type(exc).__name__}: {exc}"
        if not handle:
            return "the index has no C handle"
        point = ctypes.addressof(self._point)
        self._args = (
            handle,
            point,
            point,
            2,
            ctypes.addressof(self._out),
            ctypes.addressof(self._count),
        )
        box = ctypes.addressof(self._box)
        self._box_args = (
            handle,
            box,
            box + 2 * ctypes.sizeof(ctypes.c_double),
            2,
            ctypes.addressof(self._out),
            ctypes.addressof(self._count),
        )
        for n in (1, 3, 16):
            if self.nearest(probe[0], probe[1], n) != list(tree.nearest(probe, n)):
                return f"the lean call disagrees with Index.nearest for k={n}"
        for r in (0.0, 1.0, 1e3, 1e6):
            window = (probe[0] - r, probe[1] - r, probe[0] + r, probe[1] + r)
            if sorted(self.intersection(window)) != sorted(tree.intersection(window)):
                return f"the lean call disagrees with Index.intersection at {r} m"
        return None

    def nearest(self, x: float, y: float, n: int) -> list[int]:
        """Ids of the ``n`` entries nearest ``(x, y)``, nearest first.

        Like ``Index.nearest``, all entries tied at the n-th distance are included, so
        this may return more than ``n`` (and returns everything when there are fewer).

        Raises:
            rtree.exceptions.RTreeError: libspatialindex reported an error.
        """
        fast = self._fast
        if fast is None:
            return cast(list[int], list(self.index.nearest((x, y), n)))
        point = self._point
        point[0] = x
        point[1] = y
        self._count.value = n
        if fast(*self._args):
            # What rtree's errcheck would raise, with libspatialindex's message.
            return cast(list[int], list(self.index.nearest((x, y), n)))
        try:
            return self._ids[: self._count.value]
        finally:
            self._free(self._out.value)

    def insert(self, entry: int, x: float, y: float) -> None:
        """Add a point (~10 us; deleting one would cost ~250 us at 1e6 entries)."""
        self.index.insert(entry, (x, y, x, y))

    def intersection(self, box: tuple[float, float, float, float]) -> list[int]:
        """Ids of the entries in ``(min x, min y, max x, max y)``, edges included."""
        intersects = self._intersects
        if intersects is None:
            return cast(list[int], list(self.index.intersection(box)))
        window = self._box
        window[0], window[1], window[2], window[3] = box
        if intersects(*self._box_args):
            return cast(list[int], list(self.index.intersection(box)))  # raises its error
        try:
            return self._ids[: self._count.value]
        finally:
            self._free(self._out.value)


def _point_tree(
    xs: npt.NDArray[np.float64],
    ys: npt.NDArray[np.float64],
    ids: npt.NDArray[np.int64] | None = None,
) -> _PointTree | None:
    """Bulk-load points through rtree's array stream.

    ``ids[i]`` is the id of point ``(xs[i], ys[i])``; ids default to array positions.
    """
    if ids is None:
        ids = np.arange(len(xs), dtype=np.int64)
    if len(ids) == 0:
        return None
    props = rtree_index.Property()
    props.dimension = 2
    props.leaf_capacity = _RTREE_CAPACITY
    props.index_capacity = _RTREE_CAPACITY
    props.fill_factor = _RTREE_FILL
    coords = np.ascontiguousarray(np.column_stack((xs, ys)), dtype=np.float64)
    tree = rtree_index.Index(
        (np.ascontiguousarray(ids, dtype=np.int64), coords, coords), properties=props
    )
    return _PointTree(tree, (float(xs[0]), float(ys[0])))


def _batch_for(k: int, valid: float, *, cap: int, miss: float = 1e-3) -> int:
    """The smallest n with P(fewer than k valid among n) <= ``miss``, at most ``cap``.

    Entries are valid independently with probability ``valid`` (binomial): e.g. k=3 at
    78 % valid gives 8, where a second rtree call would follow about once in 1,000.
    """
    if valid <= 0.0:
        return cap
    if valid >= 1.0:
        return k
    for n in range(k, cap):
        below = sum(math.comb(n, i) * valid**i * (1.0 - valid) ** (n - i) for i in range(k))
        if below <= miss:
            return n
    return cap


class _KBest:
    """Collects ``(d2, slot)`` candidates and tracks the k-th smallest ``d2`` seen.

    Ids are looked up only for the answer and for ties: each lookup touches a string
    object somewhere in a million, which costs a cache miss.
    """

    __slots__ = ("_best", "bound", "items", "k")

    def __init__(self, k: int) -> None:
        self.k = k
        self.bound = math.inf
        self._best: list[float] = []
        self.items: list[tuple[float, int]] = []

    def offer(self, d2: float, slot: int) -> None:
        if d2 > self.bound:
            return
        self.items.append((d2, slot))
        best = self._best
        insort(best, d2)
        if len(best) > self.k:
            best.pop()
        if len(best) == self.k:
            self.bound = best[-1]

    def seed_sorted(self) -> None:
        """Take ``items``, appended directly in nondecreasing distance, as the state."""
        best = [d2 for d2, _ in self.items[: self.k]]
        self._best = best
        if len(best) == self.k:
            self.bound = best[-1]

    def top(self, ids: Sequence[str]) -> list[int]:
        """The slots of the k best, nearest first; equal distances ordered by id."""
        items = self.items
        items.sort()
        k = self.k
        if len(items) > k:
            # Keep everything tied with the k-th: which of them make the cut is decided
            # by id below.
            last = items[k - 1][0]
            end = k
            while end < len(items) and items[end][0] == last:
                end += 1
            items = items[:end]
        for i in range(1, len(items)):
            if items[i][0] == items[i - 1][0]:
                items.sort(key=lambda item: (item[0], ids[item[1]]))
                break
        return [slot for _, slot in items[:k]]


class _ExcludedById:
    """Slots whose responder id is in a set of ids (see ``_excluded_slots``)."""

    __slots__ = ("_exclude", "_ids")

    def __init__(self, ids: Sequence[str], exclude: AbstractSet[str] | KeysView[str]) -> None:
        self._ids = ids
        self._exclude = exclude

    def __contains__(self, slot: object) -> bool:
        return isinstance(slot, int) and self._ids[slot] in self._exclude


# Grid cells are keyed by one int, gx * 2**32 + gy: probing a cell then costs an int
# addition and a dict lookup, no tuple to build and hash. Unique while |gy| < 2**31,
# which cells of at least _MIN_CELL_M metres guarantee for any projected coordinate.
_Cell = int
_GRID_SPAN: Final = 1 << 32
_HALF_SPAN: Final = 1 << 31


def _cell_key(gx: int, gy: int) -> _Cell:
    return gx * _GRID_SPAN + gy


def _cell_xy(key: _Cell) -> tuple[int, int]:
    gy = (key + _HALF_SPAN) % _GRID_SPAN - _HALF_SPAN
    return (key - gy) // _GRID_SPAN, gy


def _ring(cx: int, cy: int, r: int) -> list[_Cell]:
    """Cells at Chebyshev distance exactly ``r`` from ``(cx, cy)``."""
    span = _GRID_SPAN
    if r == 0:
        return [cx * span + cy]
    low, high = cy - r, cy + r
    cells = []
    for gx in range(cx - r, cx + r + 1):
        row = gx * span
        cells.append(row + low)
        cells.append(row + high)
    left, right = (cx - r) * span, (cx + r) * span
    for gy in range(low + 1, high):
        cells.append(left + gy)
        cells.append(right + gy)
    return cells


@dataclass(frozen=True, slots=True)
class _Fix:
    """A live position report as accepted."""

    lonlat: LonLat
    x: float
    y: float
    timestamp: float
    accuracy_m: float | None


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
        self._projector = projector
        self._geod = projector.geod
        self._stale_after = float(stale_after_s)
        self._clock = clock
        self._cell_m_config = cell_m

        # Responders: one slot each, in Z order of their base locations (ties by id, so
        # slots are reproducible). A query touches the per-slot arrays of a few
        # neighbours; in Z order they share cache lines and pages instead of costing a
        # cache miss each (measured: ~4 us of a k=3 query at 1e6 responders).
        responders = sorted(registry.responders.values(), key=lambda r: r.responder_id)
        bx, by = self._project_records(
            [r.base for r in responders], "responder", [r.responder_id for r in responders]
        )
        order = _z_order(bx, by)
        bx, by = bx[order], by[order]
        responders = [responders[i] for i in order.tolist()]
        self._responders: list[Responder] = responders
        self._ids: list[str] = [r.responder_id for r in responders]
        self._kinds: list[str] = [r.role.value for r in responders]
        self._slot_of: dict[str, int] = {rid: i for i, rid in enumerate(self._ids)}
        n = len(responders)
        # Base lon/lat by slot, for geodesics without touching the registry objects.
        self._base_lon = array("d", [r.base.lon for r in responders])
        self._base_lat = array("d", [r.base.lat for r in responders])
        self._base_x = array("d", bx.tolist())
        self._base_y = array("d", by.tolist())
        self._eligible = bytearray(r.role is not _SUPERVISOR for r in responders)
        self._on_duty = bytearray(r.on_duty for r in responders)
        self._duty_override: dict[str, bool] = {}
        self._duty_count = sum(
            1 for e, d in zip(self._eligible, self._on_duty, strict=True) if e and d
        )
        eligible_slots = np.flatnonzero(np.frombuffer(bytes(self._eligible), dtype=np.uint8))
        self._eligible_slots = eligible_slots.astype(np.int64)
        # The tree is keyed by slot and holds the eligible responders on duty when it was
        # built, plus those who came on duty since (inserted; cheap). Those who went off
        # duty stay in it, skipped like masked entries (deleting is what is expensive),
        # until the next rebuild: a reload of the registry.
        self._in_tree = bytearray(
            e and d for e, d in zip(self._eligible, self._on_duty, strict=True)
        )
        tree_slots = np.flatnonzero(np.frombuffer(bytes(self._in_tree), dtype=np.uint8))
        self._tree_size = len(tree_slots)
        self._base_tree = _point_tree(bx[tree_slots], by[tree_slots], tree_slots.astype(np.int64))

        # Live tier.
        self._fix: list[_Fix | None] = [None] * n
        self._deadline = array("d", [-math.inf]) * n
        self._heap: list[tuple[float, int]] = []
        self._live: set[int] = set()  # slots with a fresh fix, any role
        self._cells: dict[_Cell, set[int]] = {}
        self._cell_of: dict[int, _Cell] = {}
        self._grid_box: list[int] = [0, -1, 0, -1]  # min cx, max cx, min cy, max cy
        self._cell_m = self._choose_cell_m(bx[eligible_slots], by[eligible_slots])
        self._batch_sizes: dict[tuple[int, int], int] = {}

        # Facilities: one tree per kind.
        facilities = sorted(registry.facilities.values(), key=lambda f: f.facility_id)
        self._facilities: dict[FacilityKind, list[Facility]] = {}
        self._facility_trees: dict[FacilityKind, _PointTree] = {}
        self._facility_xy: dict[FacilityKind, tuple[array[float], array[float]]] = {}
        for kind in FacilityKind:
            members = [f for f in facilities if f.kind is kind]
            if not members:
                continue
            fx, fy = self._project_records(
                [f.location for f in members], "facility", [f.facility_id for f in members]
            )
            tree = _point_tree(fx, fy)
            if tree is not None:
                self._facilities[kind] = members
                self._facility_trees[kind] = tree
                self._facility_xy[kind] = (array("d", fx.tolist()), array("d", fy.tolist()))

        # Homes.
        elders = sorted(registry.elders.values(), key=lambda e: e.elder_id)
        self._elders: list[Elder] = elders
        hx, hy = self._project_records(
            [e.location for e in elders], "elder", [e.elder_id for e in elders]
        )
        self._home_x = array("d", hx.tolist())
        self._home_y = array("d", hy.tolist())
        self._home_tree = _point_tree(hx, hy)

        _log.info(
            "geo.index.built",
            responders=n,
            eligible=len(eligible_slots),
            facilities=len(facilities),
            homes=len(elders),
            cell_m=round(self._cell_m, 1),
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

    def _choose_cell_m(self, xs: npt.NDArray[np.float64], ys: npt.NDArray[np.float64]) -> float:
        if self._cell_m_config is not None:
            return self._cell_m_config
        area = self._projector.bbox
        if area is not None:
            # The configured service area is where responders will move.
            cx, cy = self._projector.project_many(
                [area[0], area[2], area[0], area[2]], [area[1], area[1], area[3], area[3]]
            )
            width = float(cx.max() - cx.min())
            height = float(cy.max() - cy.min())
        elif len(xs):
            width = float(xs.max() - xs.min())
            height = float(ys.max() - ys.min())
        else:
            width = height = _MIN_EXTENT_M
        width = max(width, _MIN_EXTENT_M)
        height = max(height, _MIN_EXTENT_M)
        per_cell = math.sqrt(width * height / max(len(xs), 1))
        return min(max(per_cell, _MIN_CELL_M), _MAX_CELL_M)

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
        self._expire(self._clock())
        return GeoStats(
            responders=len(self._ids),
            eligible=len(self._eligible_slots),
            on_duty=self._duty_count,
            live=len(self._live),
            facilities=sum(len(v) for v in self._facilities.values()),
            homes=len(self._elders),
            cell_m=self._cell_m,
            indexed=self._tree_size,
        )

    # ---- live updates ----------------------------------------------------------------------

    def update_position(
        self,
        responder_id: str,
        position: LonLat,
        *,
        accuracy_m: float | None = None,
        timestamp: float | None = None,
    ) -> bool:
        """Record a responder's live position.

        ``timestamp`` is epoch seconds of the fix (default: now); a timestamp in the
        future is clamped to now, so clock skew cannot keep a fix fresh forever. A fix
        older than the current one for the same responder (redelivery, reordering) or
        already stale on arrival is ignored.

        Returns:
            False for an unknown responder (logged and ignored), True otherwise (also
            when the fix is ignored as older).

        Raises:
            GeoError: bad coordinates (range / service area), accuracy or timestamp.
        """
        slot = self._slot_of.get(responder_id)
        if slot is None:
            _log.warning("geo.position.unknown_responder", responder_id=responder_id)
            return False
        self._projector.check(position)
        if accuracy_m is not None and not (
            _is_number(accuracy_m) and math.isfinite(accuracy_m) and accuracy_m >= 0
        ):
            raise GeoError(
                f"accuracy must be a finite number >= 0, got {accuracy_m!r}",
                subject=f"responder {responder_id}",
            )
        if timestamp is not None and not (_is_number(timestamp) and math.isfinite(timestamp)):
            raise GeoError(
                f"timestamp must be a finite number, got {timestamp!r}",
                subject=f"responder {responder_id}",
            )
        now = self._clock()
        self._expire(now)
        ts = now if timestamp is None else min(float(timestamp), now)
        current = self._fix[slot]
        if current is not None and ts < current.timestamp:
            _log.debug("geo.position.out_of_order", responder_id=responder_id, age_s=now - ts)
            return True
        deadline = ts + self._stale_after
        if deadline <= now:
            _log.debug("geo.position.too_old", responder_id=responder_id, age_s=now - ts)
            return True
        x, y = self._projector.project(position)
        acc = None if accuracy_m is None else float(accuracy_m)
        self._apply_fix(slot, _Fix(position, x, y, ts, acc), deadline)
        return True

    def _apply_fix(self, slot: int, fix: _Fix, deadline: float) -> None:
        self._live.add(slot)
        self._fix[slot] = fix
        self._deadline[slot] = deadline
        heap = self._heap
        heapq.heappush(heap, (deadline, slot))
        if len(heap) > 4 * len(self._live) + 1024:
            # Superseded deadlines pile up with frequent fixes; keep one per live slot.
            self._heap = [(self._deadline[s], s) for s in self._live]
            heapq.heapify(self._heap)
        if self._eligible[slot]:
            self._grid_move(slot, fix.x, fix.y)

    def _grid_move(self, slot: int, x: float, y: float) -> None:
        c = self._cell_m
        gx, gy = math.floor(x / c), math.floor(y / c)
        key = _cell_key(gx, gy)
        old = self._cell_of.get(slot)
        if old == key:
            return
        if old is not None:
            self._grid_discard(slot, old)
        self._cells.setdefault(key, set()).add(slot)
        self._cell_of[slot] = key
        box = self._grid_box
        if box[0] > box[1]:
            box[:] = [gx, gx, gy, gy]
        else:
            box[0] = min(box[0], gx)
            box[1] = max(box[1], gx)
            box[2] = min(box[2], gy)
            box[3] = max(box[3], gy)

    def _grid_discard(self, slot: int, key: _Cell) -> None:
        members = self._cells[key]
        members.discard(slot)
        if not members:
            del self._cells[key]
            if not self._cells:
                self._grid_box[:] = [0, -1, 0, -1]

    def _expire(self, now: float) -> None:
        heap = self._heap
        deadline = self._deadline
        while heap and heap[0][0] <= now:
            d, slot = heapq.heappop(heap)
            if deadline[slot] != d:
                continue  # superseded by a newer fix, or already expired
            deadline[slot] = -math.inf
            self._live.discard(slot)
            key = self._cell_of.pop(slot, None)
            if key is not None:
                self._grid_discard(slot, key)
            _log.debug("geo.position.stale", responder_id=self._ids[slot])

    def set_on_duty(self, responder_id: str, on_duty: bool) -> bool:
        """Override a responder's on-duty flag (kept across :meth:`rebuilt`).

        Returns:
            False for an unknown responder (logged and ignored), True otherwise.
        """
        slot = self._slot_of.get(responder_id)
        if slot is None:
            _log.warning("geo.duty.unknown_responder", responder_id=responder_id)
            return False
        was = bool(self._on_duty[slot])
        self._on_duty[slot] = on_duty
        if self._eligible[slot] and was != on_duty:
            self._duty_count += 1 if on_duty else -1
        if on_duty and self._eligible[slot] and not self._in_tree[slot]:
            self._tree_insert(slot)
        if on_duty == self._responders[slot].on_duty:
            self._duty_override.pop(responder_id, None)
        else:
            self._duty_override[responder_id] = on_duty
        if was != on_duty:
            _log.info("geo.duty.changed", responder_id=responder_id, on_duty=on_duty)
        return True

    def _tree_insert(self, slot: int) -> None:
        x, y = self._base_x[slot], self._base_y[slot]
        if self._base_tree is None:
            self._base_tree = _point_tree(
                np.array([x]), np.array([y]), np.array([slot], dtype=np.int64)
            )
        else:
            self._base_tree.insert(slot, x, y)
        self._in_tree[slot] = 1
        self._tree_size += 1

    def is_on_duty(self, responder_id: str) -> bool | None:
        """Whether a responder counts as on duty now (overrides included); None if unknown."""
        slot = self._slot_of.get(responder_id)
        return None if slot is None else bool(self._on_duty[slot])

    def position_of(self, responder_id: str) -> tuple[LonLat, bool] | None:
        """Where a responder is taken to be: ``(location, stale)``, None if unknown."""
        slot = self._slot_of.get(responder_id)
        if slot is None:
            return None
        self._expire(self._clock())
        fix = self._fix[slot]
        if fix is not None and self._deadline[slot] != -math.inf:
            return fix.lonlat, False
        return self._responders[slot].base, True

    def supervisors(self) -> tuple[Responder, ...]:
        """Escalation targets: supervisors, on duty first, then by id.

        ``on_duty`` reflects :meth:`set_on_duty` overrides.
        """
        result = [
            r if bool(self._on_duty[i]) == r.on_duty else replace(r, on_duty=bool(self._on_duty[i]))
            for i, r in enumerate(self._responders)
            if not self._eligible[i]
        ]
        result.sort(key=lambda r: (not r.on_duty, r.responder_id))
        return tuple(result)

    # ---- reloads ---------------------------------------------------------------------------

    def prepare_rebuild(self, registry: Registry) -> GeoService:
        """Build a new service for ``registry`` with this one's configuration.

        Reads no mutable state of this service, so it may run in a worker thread while
        this service keeps serving the loop. Follow with :meth:`adopt_live_state` on the
        loop thread before using the result.
        """
        return GeoService(
            registry,
            self._projector,
            stale_after_s=self._stale_after,
            clock=self._clock,
            cell_m=self._cell_m_config,
        )

    def adopt_live_state(self, previous: GeoService) -> None:
        """Copy fresh live fixes and duty overrides of responders that still exist.

        A duty override is not carried when the new registry changed that responder's
        own on-duty flag: the roster then says something newer than the override.

        Call on the loop thread, before this service answers queries. Responders that are
        gone are dropped; a fix is re-projected if the projectors differ.
        """
        now = self._clock()
        previous._expire(now)
        self._expire(now)
        carried = dropped = 0
        same_projection = previous._projector is self._projector
        for old_slot, fix in enumerate(previous._fix):
            if fix is None or previous._deadline[old_slot] == -math.inf:
                continue
            slot = self._slot_of.get(previous._ids[old_slot])
            if slot is None:
                dropped += 1
                continue
            current = self._fix[slot]
            if current is not None and current.timestamp > fix.timestamp:
                continue
            if not same_projection:
                try:
                    x, y = self._projector.project(fix.lonlat)
                except GeoError:
                    dropped += 1
                    continue
                fix = _Fix(fix.lonlat, x, y, fix.timestamp, fix.accuracy_m)
            deadline = fix.timestamp + self._stale_after
            if deadline <= now:
                continue
            self._apply_fix(slot, fix, deadline)
            carried += 1
        overrides = superseded = 0
        for responder_id, on_duty in previous._duty_override.items():
            slot = self._slot_of.get(responder_id)
            if slot is None:
                continue
            roster_then = previous._responders[previous._slot_of[responder_id]].on_duty
            if self._responders[slot].on_duty != roster_then:
                # The new roster changed this responder's flag after the override was
                # made: the newer statement wins.
                superseded += 1
                _log.info(
                    "geo.duty.override_superseded",
                    responder_id=responder_id,
                    on_duty=self._responders[slot].on_duty,
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

    def rebuilt(self, registry: Registry) -> GeoService:
        """A new service for ``registry`` carrying over live positions and duty overrides.

        This service keeps working as before (alarms in flight may go on using it);
        swap the caller's reference to the result.
        """
        new = self.prepare_rebuild(registry)
        new.adopt_live_state(self)
        return new

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
        when nobody qualifies: the caller escalates to :meth:`supervisors`.

        Raises:
            GeoError: ``location`` fails the projector's checks, or ``k < 1``.
        """
        qx, qy = self._projector.project(location)
        return self._nearest_responders(location, qx, qy, k, exclude)

    def nearest_facilities(self, location: LonLat) -> Mapping[FacilityKind, Nearby]:
        """The nearest facility of each kind that exists (ties broken by id).

        Raises:
            GeoError: ``location`` fails the projector's checks.
        """
        qx, qy = self._projector.project(location)
        return self._nearest_facilities(location, qx, qy)

    def nearest_elders(self, location: LonLat, k: int) -> tuple[Nearby, ...]:
        """The k elders whose homes are nearest to ``location`` (kind ``"elder"``).

        Raises:
            GeoError: ``location`` fails the projector's checks, or ``k < 1``.
        """
        if k < 1:
            raise GeoError(f"k must be >= 1, got {k!r}")
        qx, qy = self._projector.project(location)
        tree = self._home_tree
        if tree is None:
            return ()
        hx, hy = self._home_x, self._home_y
        found = sorted(
            ((hx[i] - qx) ** 2 + (hy[i] - qy) ** 2, self._elders[i].elder_id, i)
            for i in tree.nearest(qx, qy, k)
        )
        return tuple(self._elder_nearby(location, self._elders[i]) for _, _, i in found[:k])

    def elders_within(self, location: LonLat, radius_m: float) -> tuple[Nearby, ...]:
        """Elders whose homes are within ``radius_m`` (geodesic) of ``location``, nearest first.

        Raises:
            GeoError: ``location`` fails the projector's checks, or a bad radius.
        """
        if not (_is_number(radius_m) and math.isfinite(radius_m) and radius_m >= 0):
            raise GeoError(f"radius_m must be a finite number >= 0, got {radius_m!r}")
        qx, qy = self._projector.project(location)
        tree = self._home_tree
        if tree is None:
            return ()
        # Planar and geodesic distance differ by well under 1 % inside a UTM zone; search
        # a slightly larger box and decide on the geodesic distance people are told.
        r = radius_m * 1.01 + 10.0
        hits = tree.intersection((qx - r, qy - r, qx + r, qy + r))
        result = []
        for i in hits:
            item = self._elder_nearby(location, self._elders[i])
            if item.distance_m <= radius_m:
                result.append(item)
        result.sort(key=lambda n: (n.distance_m, n.id))
        return tuple(result)

    def _elder_nearby(self, origin: LonLat, elder: Elder) -> Nearby:
        dist, bearing = _geodesic(self._geod, origin, elder.location)
        return Nearby(
            id=elder.elder_id,
            name=elder.name,
            phone=elder.phone or "",
            location=elder.location,
            distance_m=dist,
            bearing_deg=bearing,
            kind="elder",
        )

    def _nearest_facilities(
        self, origin: LonLat, qx: float, qy: float
    ) -> Mapping[FacilityKind, Nearby]:
        found: dict[FacilityKind, Nearby] = {}
        for kind, tree in self._facility_trees.items():
            members = self._facilities[kind]
            fx, fy = self._facility_xy[kind]
            _, _, i = min(
                ((fx[i] - qx) ** 2 + (fy[i] - qy) ** 2, members[i].facility_id, i)
                for i in tree.nearest(qx, qy, 1)
            )
            f = members[i]
            dist, bearing = _geodesic(self._geod, origin, f.location)
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
        self._expire(now)
        excluded: Container[int] = ()
        if exclude:
            # A bare string is a Collection[str] too; it means one id, not its letters.
            ids = (exclude,) if isinstance(exclude, str) else exclude
            excluded = self._excluded_slots(ids)
        if self._duty_count <= 0 or self._base_tree is None:
            return ()
        if exclude and len(exclude) >= self._duty_count and not self._anyone_left(excluded):
            return ()

        if self._cells and len(self._cell_of) >= _LIVE_FIRST_SHARE * self._tree_size:
            # Most of tier 1 is masked by live fixes: a batch of nearest base entries
            # would be mostly skipped. Ask tier 2 first, then tier 1 only for the base
            # entries within the k-th best distance found there.
            best = _KBest(k)
            self._scan_live(qx, qy, best, excluded)
            if best.bound != math.inf:
                # Padded: an entry exactly at the k-th distance must be seen (ties are
                # decided by id); anything farther is turned away by the bound.
                r = math.sqrt(best.bound) * (1.0 + 1e-9) + 1e-6
                hits = self._base_tree.intersection((qx - r, qy - r, qx + r, qy + r))
                self._offer_any_order(hits, qx, qy, best, excluded)
                return self._responders_nearby(origin, best.top(self._ids), now)
            # Fewer than k live ones qualify: tier 1 first, as usual.

        best = _KBest(k)
        tree = self._base_tree
        total = self._tree_size
        batch = self._first_batch(k, total, len(exclude))
        got = tree.nearest(qx, qy, batch)
        self._offer_base(got, qx, qy, best, excluded)
        if self._cells:
            self._scan_live(qx, qy, best, excluded)
        # rtree returns at least `batch` entries (all of them if fewer), nearest first and
        # with ties at the last distance included, so every entry not returned yet is
        # farther than the last one: stop once the k-th best is not farther than that.
        while len(got) < total:
            last = got[-1]
            dx = self._base_x[last] - qx
            dy = self._base_y[last] - qy
            if best.bound <= dx * dx + dy * dy:
                break
            seen = set(got)
            batch = min(batch * 4, total)
            got = tree.nearest(qx, qy, batch)
            self._offer_base([s for s in got if s not in seen], qx, qy, best, excluded)
        return self._responders_nearby(origin, best.top(self._ids), now)

    def _excluded_slots(self, ids: Collection[str]) -> Container[int]:
        """``ids`` as something that answers ``slot in ...``.

        A few ids become a set of slots. Many (a storm: every open alarm holds its
        responders) are not converted, which would cost O(ids) per query: a slot is
        looked up by its id instead, at the price of touching that id per candidate.
        """
        if len(ids) <= _EXCLUDE_CONVERT_MAX:
            slot_of = self._slot_of
            return {slot_of[r] for r in ids if r in slot_of}
        as_set = ids if isinstance(ids, (set, frozenset, KeysView)) else frozenset(ids)
        return _ExcludedById(self._ids, as_set)

    def _anyone_left(self, excluded: Container[int]) -> bool:
        """Whether an eligible, on-duty responder is not ``excluded`` (O(responders))."""
        on_duty = self._on_duty
        return any(on_duty[s] and s not in excluded for s in self._eligible_slots.tolist())

    def _first_batch(self, k: int, total: int, excluded: int = 0) -> int:
        # Ask for enough entries that k of them are almost surely valid (on duty, not
        # masked by a live fix): a second rtree call costs ~15 us, an extra entry in the
        # first ~0.7 us (entries past the k-th valid one are not even examined). Capped:
        # when nearly everyone is live, tier 2 supplies the answer and tier 1 only has to
        # confirm that nothing is closer.
        valid = (
            (self._duty_count / total)
            * (1.0 - len(self._cell_of) / total)
            * max(0.0, 1.0 - excluded / total)
        )
        # Round the share down (a larger batch), so that the cache stays small.
        key = (k, math.floor(valid * 100.0))
        size = self._batch_sizes.get(key)
        if size is None:
            size = _batch_for(k, key[1] / 100.0, cap=max(8 * k, 64))
            self._batch_sizes[key] = size
        return min(size, total)

    def _offer_base(
        self, slots: Sequence[int], qx: float, qy: float, best: _KBest, excluded: Container[int]
    ) -> None:
        """Offer tier-1 entries, given in rtree order (nearest first), to ``best``."""
        deadline = self._deadline
        on_duty = self._on_duty
        bx, by = self._base_x, self._base_y
        no_fix = -math.inf
        if not best.items:
            # The first batch (the common case): slots come nearest first, so the k-th
            # valid one sets the bound and only ties with it may follow.
            k = best.k
            items = best.items
            bound = math.inf
            for slot in slots:
                # A fresh fix masks the base entry: tier 2 has this responder.
                if deadline[slot] != no_fix or not on_duty[slot] or slot in excluded:
                    continue
                dx = bx[slot] - qx
                dy = by[slot] - qy
                d2 = dx * dx + dy * dy
                if d2 > bound:
                    break
                items.append((d2, slot))
                if len(items) == k:
                    bound = d2
            best.seed_sorted()
            return
        offer = best.offer
        for slot in slots:
            if deadline[slot] != no_fix or not on_duty[slot] or slot in excluded:
                continue
            dx = bx[slot] - qx
            dy = by[slot] - qy
            d2 = dx * dx + dy * dy
            if d2 > best.bound:
                break  # slots come nearest first: none of the rest can do better
            offer(d2, slot)

    def _offer_any_order(
        self, slots: Iterable[int], qx: float, qy: float, best: _KBest, excluded: Container[int]
    ) -> None:
        """Offer tier-1 entries in no particular order to ``best``."""
        deadline = self._deadline
        on_duty = self._on_duty
        bx, by = self._base_x, self._base_y
        no_fix = -math.inf
        for slot in slots:
            if deadline[slot] != no_fix or not on_duty[slot] or slot in excluded:
                continue
            dx = bx[slot] - qx
            dy = by[slot] - qy
            best.offer(dx * dx + dy * dy, slot)

    def _scan_live(self, qx: float, qy: float, best: _KBest, excluded: Container[int]) -> None:
        cells = self._cells
        c = self._cell_m
        box = self._grid_box
        bound = best.bound
        if bound != math.inf:
            # Only cells overlapping the square around the current k-th best can hold a
            # better candidate; clip it to the cells that are occupied at all.
            r = math.sqrt(bound)
            x0 = max(math.floor((qx - r) / c), box[0])
            x1 = min(math.floor((qx + r) / c), box[1])
            y0 = max(math.floor((qy - r) / c), box[2])
            y1 = min(math.floor((qy + r) / c), box[3])
            if x0 > x1 or y0 > y1:
                return
            if (x1 - x0 + 1) * (y1 - y0 + 1) <= len(cells):
                get = cells.get
                groups = [
                    found
                    for gx in range(x0, x1 + 1)
                    for key in range(gx * _GRID_SPAN + y0, gx * _GRID_SPAN + y1 + 1)
                    if (found := get(key))
                ]
                if groups:  # usually none when few responders are live
                    self._offer_live(groups, qx, qy, best, excluded)
                return
            self._offer_live(
                [
                    members
                    for key, members in cells.items()
                    if x0 <= (xy := _cell_xy(key))[0] <= x1 and y0 <= xy[1] <= y1
                ],
                qx,
                qy,
                best,
                excluded,
            )
            return
        # Tier 1 found fewer than k: search outwards ring by ring.
        cx = math.floor(qx / c)
        cy = math.floor(qy / c)
        fx = qx - cx * c
        fy = qy - cy * c
        # Distance from the query to the edge of its own cell: ring r is at least
        # (r - 1) * c + edge away.
        edge = min(fx, c - fx, fy, c - fy)
        max_r = max(cx - box[0], box[1] - cx, cy - box[2], box[3] - cy, 0)
        visited = 0
        occupied = len(cells)
        ring = 0
        while ring <= max_r:
            if ring:
                gap = (ring - 1) * c + edge
                if gap * gap > best.bound:
                    return
            ring_cells = 8 * ring if ring else 1
            if visited + ring_cells > occupied:
                # Fewer occupied cells than cells left to probe: scan them directly.
                groups = []
                for key, members in cells.items():
                    gx, gy = _cell_xy(key)
                    if max(abs(gx - cx), abs(gy - cy)) >= ring:
                        groups.append(members)
                self._offer_live(groups, qx, qy, best, excluded)
                return
            get = cells.get
            self._offer_live(
                [found for key in _ring(cx, cy, ring) if (found := get(key))],
                qx,
                qy,
                best,
                excluded,
            )
            visited += ring_cells
            ring += 1

    def _offer_live(
        self,
        groups: list[set[int]],
        qx: float,
        qy: float,
        best: _KBest,
        excluded: Container[int],
    ) -> None:
        """Offer the members of some grid cells to ``best``."""
        fixes = self._fix
        on_duty = self._on_duty
        offer = best.offer
        for members in groups:
            for slot in members:
                if not on_duty[slot] or slot in excluded:
                    continue
                fix = fixes[slot]
                if fix is None:  # pragma: no cover - grid members always have a fix
                    continue
                dx = fix.x - qx
                dy = fix.y - qy
                offer(dx * dx + dy * dy, slot)

    def _responders_nearby(
        self, origin: LonLat, slots: Sequence[int], now: float
    ) -> tuple[Nearby, ...]:
        """The answer for ``slots``: geodesic distance and bearing from ``origin``."""
        geod = self._geod
        olon, olat = origin.lon, origin.lat
        responders, kinds, deadline = self._responders, self._kinds, self._deadline
        found = []
        for slot in slots:
            r = responders[slot]
            fix = None if deadline[slot] == -math.inf else self._fix[slot]
            if fix is None:  # the base location (lon/lat kept in arrays: no object to load)
                dist, bearing = _geodesic_xy(
                    geod, olon, olat, self._base_lon[slot], self._base_lat[slot]
                )
                found.append(
                    Nearby(
                        r.responder_id, r.name, r.phone, r.base, dist, bearing, True, kinds[slot]
                    )
                )
                continue
            location = fix.lonlat
            dist, bearing = _geodesic_xy(geod, olon, olat, location.lon, location.lat)
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


# --------------------------------------------------------------------------------------
# MQTT payloads
# --------------------------------------------------------------------------------------


def responder_id_from_topic(topic: str) -> str:
    """The responder id in a ``responders/<id>/location`` topic.

    Raises:
        GeoError: the topic does not have that shape.
    """
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "responders" or parts[2] != "location" or not parts[1]:
        raise GeoError(f"not a responders/<id>/location topic: {topic!r}")
    if any(ch in parts[1] for ch in "+#\x00"):
        raise GeoError(f"responder id in topic {topic!r} contains a wildcard or NUL")
    return parts[1]


def parse_position(payload: bytes) -> tuple[LonLat, float | None, float | None]:
    """Decode ``{"lon": .., "lat": .., "accuracy": .., "timestamp": ..}``.

    ``lon`` and ``lat`` are required degrees; ``accuracy`` (metres, >= 0) and
    ``timestamp`` (Unix epoch seconds) are optional and may be null.

    Returns:
        ``(position, accuracy_m, timestamp)``.

    Raises:
        GeoError: too large, invalid UTF-8, not JSON, not an object, a missing or
            non-numeric field, a value out of range, or a timestamp in milliseconds.
    """
    if len(payload) > MAX_POSITION_PAYLOAD:
        raise GeoError(
            f"payload of {len(payload)} bytes exceeds {MAX_POSITION_PAYLOAD}", subject="payload"
        )
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        # orjson rejects NaN/Infinity literals, overflowing numbers and invalid UTF-8.
        raise GeoError(f"not valid JSON: {exc}", subject="payload") from None
    if not isinstance(doc, dict):
        raise GeoError(f"expected a JSON object, got {type(doc).__name__}", subject="payload")
    lon = _payload_number(doc, "lon")
    lat = _payload_number(doc, "lat")
    if lon is None or lat is None:
        raise GeoError(f"missing field {'lon' if lon is None else 'lat'!r}", subject="payload")
    position = LonLat(lon, lat)
    try:
        Projector.check_range(position)
    except GeoError as exc:
        raise GeoError(exc.reason, point=position, subject="payload") from None
    accuracy = _payload_number(doc, "accuracy")
    if accuracy is not None and accuracy < 0:
        raise GeoError(f"field 'accuracy' must be >= 0, got {accuracy!r}", subject="payload")
    timestamp = _payload_number(doc, "timestamp")
    if timestamp is not None and not 0 <= timestamp < _MAX_EPOCH_SECONDS:
        raise GeoError(
            f"field 'timestamp' must be Unix epoch seconds, got {timestamp!r}"
            + (" (looks like milliseconds)" if timestamp >= _MAX_EPOCH_SECONDS else ""),
            subject="payload",
        )
    return position, accuracy, timestamp


def _payload_number(doc: Mapping[str, object], name: str) -> float | None:
    """A finite number, or None when the field is absent or null."""
    v = doc.get(name)
    if v is None:
        return None
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise GeoError(f"field {name!r} must be a finite number, got {v!r}", subject="payload")
    return float(v)
