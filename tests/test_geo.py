"""Tests for gateway.geo: projection checks, geodesics, the two-tier responder index.

The index is checked against an independent brute force (its own pyproj transformer,
plain Python distances) on random data, including duplicates, exact ties and points on
the 118.5E Gauss-Kruger zone border. Time is a fake clock everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyproj import Transformer
from structlog.testing import capture_logs

from gateway.geo import GeoError, GeoService, Nearby, Projector
from gateway.geo import index as geo_index
from gateway.geo.index import _batch_for, _cell_key, _cell_xy, _ring, _z_order, point_tree
from gateway.model import (
    Elder,
    Facility,
    FacilityKind,
    LonLat,
    Registry,
    Responder,
    ResponderRole,
)

KENLI = LonLat(118.55, 37.59)
KENLI_BBOX = (118.0, 37.2, 119.3, 38.2)
T0 = 1_800_000_000.0  # fake epoch seconds

PROJ = Projector()  # default EPSG:32650, limited to its area of use
PROJ_BOX = Projector(bbox=KENLI_BBOX)
# Reference projection for the brute force: a transformer of its own, not the Projector's.
REF = Transformer.from_crs("EPSG:4326", "EPSG:32650", always_xy=True)

HYPOTHESIS = settings(
    max_examples=250,
    deadline=None,  # the machine is shared and noisy; speed is the benchmark's business
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def responder(
    rid: str,
    lon: float,
    lat: float,
    *,
    on_duty: bool = True,
    role: ResponderRole = ResponderRole.GRID_LEADER,
) -> Responder:
    return Responder(
        responder_id=rid,
        name=f"name-{rid}",
        phone="+8613800000000",
        community="kenli",
        role=role,
        on_duty=on_duty,
        base=LonLat(lon, lat),
    )


def facility(fid: str, kind: FacilityKind, lon: float, lat: float) -> Facility:
    return Facility(fid, f"fac-{fid}", kind, "+865468888888", LonLat(lon, lat))


def elder(eid: str, lon: float, lat: float) -> Elder:
    return Elder(eid, f"elder-{eid}", "addr", "kenli", LonLat(lon, lat), phone="+8613900000000")


def registry(
    responders: Iterable[Responder] = (),
    facilities: Iterable[Facility] = (),
    elders: Iterable[Elder] = (),
) -> Registry:
    return Registry.build(
        {e.elder_id: e for e in elders},
        {},
        {r.responder_id: r for r in responders},
        {f.facility_id: f for f in facilities},
    )


def service(
    reg: Registry,
    clock: FakeClock | None = None,
    *,
    projector: Projector = PROJ,
    stale_after_s: float = 600.0,
    cell_m: float | None = None,
) -> GeoService:
    return GeoService(
        reg,
        projector,
        stale_after_s=stale_after_s,
        clock=clock or FakeClock(),
        cell_m=cell_m,
    )


def reloaded(old: GeoService, reg: Registry) -> GeoService:
    """A registry reload as the gateway does it: a new service, then the old live state."""
    new = GeoService(reg, old.projector, stale_after_s=old.stale_after_s, clock=old._clock)
    new.adopt_live_state(old)
    return new


def planar(a: LonLat, b: LonLat) -> float:
    ax, ay = REF.transform(a.lon, a.lat)
    bx, by = REF.transform(b.lon, b.lat)
    return math.hypot(ax - bx, ay - by)


def assert_same_distances(got: Sequence[float], want: Sequence[float]) -> None:
    # Ties may be broken differently; the multiset of distances must agree.
    assert len(got) == len(want)
    for g, w in zip(sorted(got), sorted(want), strict=True):
        assert g == pytest.approx(w, rel=1e-9, abs=1e-6)


# ----------------------------------------------------------------------------------------
# Projector
# ----------------------------------------------------------------------------------------


def test_project_matches_reference_and_cgcs2000_takes_lon_first() -> None:
    x, y = PROJ.project(KENLI)
    rx, ry = REF.transform(KENLI.lon, KENLI.lat)
    assert (x, y) == pytest.approx((rx, ry), abs=1e-6)
    # EPSG:4490 is latitude-first by definition; the projector still takes lon, lat.
    cgcs = Projector(source_crs="EPSG:4490")
    assert cgcs.project(KENLI) == pytest.approx((x, y), abs=0.01)
    assert 500_000 < x < 700_000  # east of the UTM 50N central meridian (117E)
    assert 4_100_000 < y < 4_200_000


def test_swapped_lat_lon_is_rejected_by_the_latitude_range() -> None:
    swapped = LonLat(KENLI.lat, KENLI.lon)  # (37.59, 118.55)
    with pytest.raises(GeoError, match=r"latitude 118\.55 is outside \[-90, 90\].*swapped") as e:
        PROJ.project(swapped)
    assert e.value.point == swapped


@pytest.mark.parametrize(
    ("point", "message"),
    [
        (LonLat(float("nan"), 37.5), "finite"),
        (LonLat(118.5, float("inf")), "finite"),
        (LonLat(181.0, 37.5), r"longitude 181\.0 is outside"),
        (LonLat(118.5, -91.0), r"latitude -91\.0 is outside"),
        (LonLat("118.5", 37.5), "must be numbers"),  # type: ignore[arg-type]
        (LonLat(True, 37.5), "must be numbers"),
    ],
)
def test_check_range_rejects(point: LonLat, message: str) -> None:
    with pytest.raises(GeoError, match=message):
        Projector.check_range(point)


def test_bbox_rejects_points_outside_the_service_area() -> None:
    PROJ_BOX.check(KENLI)
    with pytest.raises(GeoError, match=r"outside the service area bbox \(118\.0, 37\.2"):
        PROJ_BOX.check(LonLat(116.9, 36.7))  # Jinan: valid, but not our district


def test_bbox_catches_swaps_that_the_range_check_cannot() -> None:
    # Near Baghdad both orders are valid lon/lat; only the service area tells them apart.
    baghdad = Projector("EPSG:32638", bbox=(44.0, 33.0, 45.0, 34.0))
    baghdad.check(LonLat(44.4, 33.3))
    with pytest.raises(GeoError, match="swapped"):
        baghdad.check(LonLat(33.3, 44.4))


def test_without_bbox_the_crs_area_of_use_is_the_limit() -> None:
    assert PROJ.area == (114.0, 0.0, 120.0, 84.0)
    with pytest.raises(GeoError, match="area of use of EPSG:32650"):
        PROJ.project(LonLat(-70.0, 40.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"crs": "EPSG:999999"}, "unknown CRS"),
        ({"crs": "EPSG:4326"}, "not a projected CRS in metres"),
        ({"source_crs": "EPSG:32650"}, "not geographic"),
        ({"bbox": (119.0, 37.0, 118.0, 38.0)}, "min < max"),
        ({"bbox": (118.0, 37.0, 119.0)}, "four finite numbers"),
        ({"bbox": (118.0, float("nan"), 119.0, 38.0)}, "four finite numbers"),
        ({"bbox": (100.0, 37.0, 101.0, 38.0)}, "outside the area of use"),
    ],
)
def test_bad_projector_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(GeoError, match=message):
        Projector(**kwargs)  # type: ignore[arg-type]


def test_project_many_matches_scalar_and_names_the_bad_element() -> None:
    lons = [118.3, 118.5, 118.8]
    lats = [37.4, 37.6, 37.8]
    xs, ys = PROJ.project_many(lons, lats)
    for lon, lat, x, y in zip(lons, lats, xs, ys, strict=True):
        assert PROJ.project(LonLat(lon, lat)) == pytest.approx((x, y), abs=1e-6)
    with pytest.raises(GeoError, match=r"element 2: latitude 118\.8") as e:
        PROJ.project_many([118.3, 118.5, 37.8], [37.4, 37.6, 118.8])
    assert e.value.index == 2
    with pytest.raises(GeoError, match="equal length"):
        PROJ.project_many([118.3], [37.4, 37.5])


def test_no_discontinuity_at_the_118_5_zone_border() -> None:
    # 118.5E is the border of CGCS2000 GK zones 39/40; one CRS for the district means
    # distances across it are as smooth as anywhere else.
    west, east = LonLat(118.4999, 37.6), LonLat(118.5001, 37.6)
    geodesic_m, _ = PROJ.geodesic(west, east)
    xw, yw = PROJ.project(west)
    xe, ye = PROJ.project(east)
    assert math.hypot(xe - xw, ye - yw) == pytest.approx(geodesic_m, rel=1e-3)


# ----------------------------------------------------------------------------------------
# Geodesics
# ----------------------------------------------------------------------------------------


def vincenty_inverse(a: LonLat, b: LonLat) -> tuple[float, float]:
    """Vincenty (1975) inverse on WGS84: (metres, initial azimuth in degrees).

    Written out here as an independent cross-check of pyproj.Geod (Karney's algorithm).
    Vincenty's iteration is accurate to about 0.5 mm for points that are not nearly
    antipodal, i.e. 1e-8 relative over tens of km, far inside the 0.1 % required.
    """
    major, flat = 6378137.0, 1 / 298.257223563
    minor = (1 - flat) * major
    big_l = math.radians(b.lon - a.lon)
    u1 = math.atan((1 - flat) * math.tan(math.radians(a.lat)))
    u2 = math.atan((1 - flat) * math.tan(math.radians(b.lat)))
    su1, cu1, su2, cu2 = math.sin(u1), math.cos(u1), math.sin(u2), math.cos(u2)
    lam = big_l
    for _ in range(200):
        sl, cl = math.sin(lam), math.cos(lam)
        sin_s = math.hypot(cu2 * sl, cu1 * su2 - su1 * cu2 * cl)
        cos_s = su1 * su2 + cu1 * cu2 * cl
        sigma = math.atan2(sin_s, cos_s)
        sin_a = cu1 * cu2 * sl / sin_s
        cos2_a = 1 - sin_a * sin_a
        cos_2sm = cos_s - 2 * su1 * su2 / cos2_a
        c = flat / 16 * cos2_a * (4 + flat * (4 - 3 * cos2_a))
        previous = lam
        lam = big_l + (1 - c) * flat * sin_a * (
            sigma + c * sin_s * (cos_2sm + c * cos_s * (-1 + 2 * cos_2sm**2))
        )
        if abs(lam - previous) < 1e-13:
            break
    u_sq = cos2_a * (major**2 - minor**2) / minor**2
    big_a = 1 + u_sq / 16384 * (4096 + u_sq * (-768 + u_sq * (320 - 175 * u_sq)))
    big_b = u_sq / 1024 * (256 + u_sq * (-128 + u_sq * (74 - 47 * u_sq)))
    d_sigma = (
        big_b
        * sin_s
        * (
            cos_2sm
            + big_b
            / 4
            * (
                cos_s * (-1 + 2 * cos_2sm**2)
                - big_b / 6 * cos_2sm * (-3 + 4 * sin_s**2) * (-3 + 4 * cos_2sm**2)
            )
        )
    )
    distance = minor * big_a * (sigma - d_sigma)
    azimuth = math.degrees(math.atan2(cu2 * sl, cu1 * su2 - su1 * cu2 * cl)) % 360.0
    return distance, azimuth


def dms(d: int, m: int, s: float) -> float:
    sign = -1.0 if d < 0 else 1.0
    return sign * (abs(d) + m / 60 + s / 3600)


def test_geodesic_matches_the_published_flinders_peak_buninyong_line() -> None:
    # Geoscience Australia's worked example (GDA/GRS80, whose ellipsoid differs from
    # WGS84 by 0.1 mm in the semi-minor axis): 54 972.271 m, azimuth 306 52' 05.37".
    flinders = LonLat(dms(144, 25, 29.52440), dms(-37, 57, 3.72030))
    buninyong = LonLat(dms(143, 55, 35.38390), dms(-37, 39, 10.15610))
    distance, azimuth = PROJ.geodesic(flinders, buninyong)
    assert distance == pytest.approx(54_972.271, rel=1e-3)
    assert distance == pytest.approx(54_972.271, abs=0.01)  # what it really achieves
    assert azimuth == pytest.approx(dms(306, 52, 5.37), abs=1e-4)


def test_geodesic_in_kenli_matches_vincenty_and_projection_is_close() -> None:
    a, b = LonLat(118.45, 37.50), LonLat(118.62, 37.71)
    distance, azimuth = PROJ.geodesic(a, b)
    ref_distance, ref_azimuth = vincenty_inverse(a, b)
    assert distance == pytest.approx(ref_distance, rel=1e-3)
    assert distance == pytest.approx(ref_distance, abs=0.001)
    assert azimuth == pytest.approx(ref_azimuth, abs=1e-6)
    # Planar UTM distance, used for ranking, is within 0.1 % here (scale ~0.9998).
    assert planar(a, b) == pytest.approx(distance, rel=1e-3)


def test_geodesic_of_a_point_to_itself_and_bearing_range() -> None:
    assert PROJ.geodesic(KENLI, KENLI) == (0.0, 0.0)
    for lon, lat in [(118.55, 37.70), (118.65, 37.59), (118.55, 37.48), (118.45, 37.59)]:
        _, bearing = PROJ.geodesic(KENLI, LonLat(lon, lat))
        assert 0.0 <= bearing < 360.0
    assert PROJ.geodesic(KENLI, LonLat(118.45, 37.59))[1] == pytest.approx(270.0, abs=0.1)
    with pytest.raises(GeoError, match="swapped"):
        PROJ.geodesic(KENLI, LonLat(37.59, 118.55))


# ----------------------------------------------------------------------------------------
# Nearest responders against brute force
# ----------------------------------------------------------------------------------------

LON = st.one_of(
    st.floats(118.30, 118.80, allow_nan=False),
    st.just(118.5),  # the zone border
    st.sampled_from([118.4999999, 118.5000001]),
)
LAT = st.floats(37.40, 37.80, allow_nan=False)


@dataclass
class Scenario:
    responders: list[Responder]
    moves: dict[str, tuple[LonLat, float]]  # id -> (position, age in seconds)
    duty: dict[str, bool] = field(default_factory=dict)
    exclude: set[str] = field(default_factory=set)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(0, 40))
    points = [LonLat(draw(LON), draw(LAT)) for _ in range(n)]
    for _ in range(draw(st.integers(0, n))):  # duplicates: people sharing an office
        points.append(draw(st.sampled_from(points)))
    responders = [
        responder(
            f"r{i:03d}",
            p.lon,
            p.lat,
            on_duty=draw(st.booleans()) or draw(st.booleans()),
            role=draw(
                st.sampled_from(
                    [ResponderRole.GRID_LEADER] * 4
                    + [ResponderRole.COMMUNITY_WORKER, ResponderRole.SUPERVISOR]
                )
            ),
        )
        for i, p in enumerate(points)
    ]
    moves: dict[str, tuple[LonLat, float]] = {}
    duty: dict[str, bool] = {}
    exclude: set[str] = set()
    for r in responders:
        if draw(st.integers(0, 2)) == 0:
            target = draw(st.one_of(st.builds(LonLat, LON, LAT), st.sampled_from(points)))
            age = draw(st.sampled_from([0.0, 30.0, 599.0, 600.0, 900.0]))
            moves[r.responder_id] = (target, age)
        if draw(st.integers(0, 5)) == 0:
            duty[r.responder_id] = draw(st.booleans())
        if draw(st.integers(0, 6)) == 0:
            exclude.add(r.responder_id)
    return Scenario(responders, moves, duty, exclude)


def brute_force(
    scenario: Scenario, query: LonLat, k: int, stale_after: float
) -> list[tuple[float, str, LonLat, bool]]:
    rows = []
    for r in scenario.responders:
        on_duty = scenario.duty.get(r.responder_id, r.on_duty)
        if r.role is ResponderRole.SUPERVISOR or not on_duty:
            continue
        if r.responder_id in scenario.exclude:
            continue
        move = scenario.moves.get(r.responder_id)
        live = move is not None and move[1] < stale_after
        where = move[0] if live and move is not None else r.base
        rows.append((planar(query, where), r.responder_id, where, not live))
    rows.sort(key=lambda row: row[0])
    return rows[:k]


def apply(scenario: Scenario, svc: GeoService, clock: FakeClock) -> None:
    for rid, (where, age) in scenario.moves.items():
        assert svc.update_position(rid, where, accuracy_m=5.0, timestamp=clock.now - age)
    for rid, on_duty in scenario.duty.items():
        assert svc.set_on_duty(rid, on_duty)


@contextlib.contextmanager
def live_first(share: float) -> Iterator[None]:
    """Make queries ask tier 2 first from this live share on (0: always; inf: never)."""
    saved = geo_index._LIVE_FIRST_SHARE
    geo_index._LIVE_FIRST_SHARE = share
    try:
        yield
    finally:
        geo_index._LIVE_FIRST_SHARE = saved


@pytest.mark.parametrize("first", [math.inf, 0.0], ids=["tier1-first", "tier2-first"])
@HYPOTHESIS
@given(
    scenario=scenarios(),
    query=st.one_of(st.builds(LonLat, LON, LAT), st.just(LonLat(118.5, 37.6))),
    query_at_a_responder=st.booleans(),
    k=st.integers(1, 6),
    cell_m=st.sampled_from([None, 30.0, 400.0, 5000.0]),
)
def test_nearest_responders_equal_brute_force(
    first: float,
    scenario: Scenario,
    query: LonLat,
    query_at_a_responder: bool,
    k: int,
    cell_m: float | None,
) -> None:
    if query_at_a_responder and scenario.responders:
        query = scenario.responders[len(scenario.responders) // 2].base  # exact zero ties
    clock = FakeClock()
    svc = service(registry(scenario.responders), clock, cell_m=cell_m)
    apply(scenario, svc, clock)

    with live_first(first):
        got = svc.nearest_responders(query, k, exclude=scenario.exclude)
    want = brute_force(scenario, query, k, svc.stale_after_s)

    assert_same_distances([planar(query, n.location) for n in got], [w[0] for w in want])
    truth = {w[1]: w for w in brute_force(scenario, query, 10_000, svc.stale_after_s)}
    for n in got:
        assert n.id in truth  # eligible, on duty, not excluded
        _, _, where, stale = truth[n.id]
        assert n.location == where
        assert n.stale is stale
        assert n.distance_m == pytest.approx(PROJ.geodesic(query, n.location)[0], abs=1e-6)
    ranked = [planar(query, n.location) for n in got]
    assert all(b >= a - 1e-6 for a, b in itertools.pairwise(ranked))  # nearest first
    # Exact ties (people at one spot) are broken by id, across both tiers: within the
    # answer, and at its edge, where nobody with a smaller id may be left out.
    for a, b in itertools.pairwise(got):
        if a.location == b.location:
            assert a.id < b.id
    if got:
        last = got[-1]
        tied = {rid for rid, row in truth.items() if row[2] == last.location}
        assert {rid for rid in tied if rid < last.id} <= {n.id for n in got}


@pytest.mark.parametrize("first", [math.inf, 0.0], ids=["tier1-first", "tier2-first"])
@pytest.mark.parametrize("excluded", [50, 800])  # converted to slots / checked by id
def test_nearest_responders_at_scale_equal_brute_force(excluded: int, first: float) -> None:
    # Enough responders that tier 1 must fetch more than one batch and tier 2 spans
    # many cells; positions clustered like villages to make the density uneven.
    rng = random.Random(4)
    centres = [(rng.uniform(118.3, 118.8), rng.uniform(37.4, 37.8)) for _ in range(12)]
    people = []
    for i in range(2500):
        cx, cy = rng.choice(centres)
        people.append(
            responder(
                f"r{i:05d}",
                cx + rng.gauss(0, 0.01),
                cy + rng.gauss(0, 0.01),
                on_duty=rng.random() < 0.6,
            )
        )
    moves = {
        r.responder_id: (
            LonLat(rng.uniform(118.3, 118.8), rng.uniform(37.4, 37.8)),
            rng.choice([0.0, 100.0, 700.0]),
        )
        for r in rng.sample(people, 1200)
    }
    busy = {r.responder_id for r in rng.sample(people, excluded)}
    scenario = Scenario(people, moves, exclude=busy)
    clock = FakeClock()
    svc = service(registry(people), clock)
    apply(scenario, svc, clock)
    for _ in range(150):
        query = LonLat(rng.uniform(118.3, 118.8), rng.uniform(37.4, 37.8))
        k = rng.choice([1, 3, 10])
        with live_first(first):
            got = svc.nearest_responders(query, k, exclude=scenario.exclude)
        want = brute_force(scenario, query, k, svc.stale_after_s)
        assert_same_distances([planar(query, n.location) for n in got], [w[0] for w in want])


def test_a_crowd_of_unavailable_responders_does_not_hide_the_available_ones() -> None:
    # Around the home: an office of 300 off-duty workers, 300 on-duty workers whose live
    # fixes put them 20 km away, and 100 assigned to other alarms. The answer lies
    # beyond all of them in tier 1, so tier 1 must be asked again with larger batches.
    clock = FakeClock()
    rng = random.Random(7)
    people, moves, exclude = [], {}, set()
    for i in range(700):
        lon, lat = KENLI.lon + rng.uniform(-0.002, 0.002), KENLI.lat + rng.uniform(-0.002, 0.002)
        people.append(responder(f"crowd{i:03d}", lon, lat, on_duty=i >= 300))
        if 300 <= i < 600:
            moves[f"crowd{i:03d}"] = (LonLat(118.75, 37.75), 0.0)
        elif i >= 600:
            exclude.add(f"crowd{i:03d}")
    people += [responder(f"ok{i}", 118.55 + 0.01 * (i + 1), 37.59) for i in range(4)]
    scenario = Scenario(people, moves, exclude=exclude)
    svc = service(registry(people), clock)
    apply(scenario, svc, clock)
    got = svc.nearest_responders(KENLI, 3, exclude=exclude)
    assert [n.id for n in got] == ["ok0", "ok1", "ok2"]
    want = brute_force(scenario, KENLI, 3, svc.stale_after_s)
    assert_same_distances([planar(KENLI, n.location) for n in got], [w[0] for w in want])


@HYPOTHESIS
@given(
    places=st.lists(
        st.tuples(st.sampled_from(list(FacilityKind)), LON, LAT), min_size=0, max_size=25
    ),
    query=st.builds(LonLat, LON, LAT),
)
def test_nearest_facility_of_each_kind_equals_brute_force(
    places: list[tuple[FacilityKind, float, float]], query: LonLat
) -> None:
    facilities = [
        facility(f"f{i:02d}", kind, lon, lat) for i, (kind, lon, lat) in enumerate(places)
    ]
    svc = service(registry(facilities=facilities))
    got = svc.lookup(query).facilities
    assert set(got) == {f.kind for f in facilities}
    for kind, nearest in got.items():
        best = min(planar(query, f.location) for f in facilities if f.kind is kind)
        assert planar(query, nearest.location) == pytest.approx(best, abs=1e-6)
        assert nearest.kind == kind.value


# ----------------------------------------------------------------------------------------
# Query behaviour
# ----------------------------------------------------------------------------------------


def test_ties_are_broken_by_id_and_results_carry_distance_and_bearing() -> None:
    office = LonLat(118.60, 37.60)
    people = [responder(rid, office.lon, office.lat) for rid in ("r5", "r2", "r9", "r1")]
    svc = service(registry(people))
    got = svc.nearest_responders(KENLI, 3)
    assert [n.id for n in got] == ["r1", "r2", "r5"]
    distance, bearing = PROJ.geodesic(KENLI, office)
    assert all(n.distance_m == pytest.approx(distance) for n in got)
    assert all(n.bearing_deg == pytest.approx(bearing) for n in got)
    assert 0 < bearing < 90  # north-east of the query
    assert got[0].name == "name-r1"
    assert got[0].kind == "grid_leader"
    assert got[0].stale


def test_nobody_on_duty_gives_an_empty_result() -> None:
    people = [responder(f"r{i}", 118.5 + i / 100, 37.6, on_duty=False) for i in range(5)]
    svc = service(registry(people))
    assert svc.nearest_responders(KENLI, 3) == ()
    assert service(registry()).nearest_responders(KENLI, 3) == ()
    assert svc.stats().indexed == 0  # the tree holds only who is on duty
    assert svc.set_on_duty("r3", True)
    assert [n.id for n in svc.nearest_responders(KENLI, 3)] == ["r3"]
    assert svc.nearest_responders(KENLI, 3, exclude={"r3"}) == ()
    assert svc.set_on_duty("r1", True)
    assert svc.set_on_duty("r3", False)  # stays in the tree, skipped
    assert svc.set_on_duty("r3", True)  # not inserted twice
    assert svc.stats().indexed == 2
    assert (svc.is_on_duty("r3"), svc.is_on_duty("r2"), svc.is_on_duty("nobody")) == (
        True,
        False,
        None,
    )
    assert [n.id for n in svc.nearest_responders(KENLI, 3)] == ["r3", "r1"]
    assert reloaded(svc, svc.registry).stats().indexed == 2  # overrides carried over


def test_excluding_everyone_on_duty_gives_an_empty_result() -> None:
    people = [
        responder(f"r{i:03d}", 118.5 + i / 1000, 37.6, on_duty=i % 2 == 0) for i in range(200)
    ]
    svc = service(registry(people))
    on_duty = {r.responder_id for r in people if r.on_duty}
    busy = dict.fromkeys(on_duty | {"gone"}, 1)  # a dispatcher's counts; one unknown id
    assert svc.nearest_responders(KENLI, 3, exclude=busy.keys()) == ()
    del busy["r100"]
    assert [n.id for n in svc.nearest_responders(KENLI, 3, exclude=busy.keys())] == ["r100"]


def test_exclude_skips_assigned_responders_and_fills_up_with_the_next() -> None:
    people = [responder(f"r{i}", 118.55 + i / 1000, 37.59) for i in range(6)]
    svc = service(registry(people))
    assert [n.id for n in svc.nearest_responders(KENLI, 3)] == ["r0", "r1", "r2"]
    got = svc.nearest_responders(KENLI, 3, exclude=["r0", "r2", "nobody"])
    assert [n.id for n in got] == ["r1", "r3", "r4"]
    # A bare string is one id, not a collection of one-letter ids.
    assert [n.id for n in svc.nearest_responders(KENLI, 1, exclude="r0")] == ["r1"]


def test_supervisors_are_escalation_targets_not_nearest_responders() -> None:
    people = [
        responder("boss-b", 118.55, 37.59, role=ResponderRole.SUPERVISOR, on_duty=False),
        responder("boss-a", 118.55, 37.59, role=ResponderRole.SUPERVISOR),
        responder("w1", 118.70, 37.70),
    ]
    svc = service(registry(people))
    assert [n.id for n in svc.nearest_responders(KENLI, 3)] == ["w1"]
    assert svc.set_on_duty("boss-b", True)
    assert svc.set_on_duty("boss-a", False)
    assert (svc.is_on_duty("boss-b"), svc.is_on_duty("boss-a")) == (True, False)
    assert svc.stats().on_duty == 1  # supervisors do not count among those who may be sent
    # A supervisor's phone may report positions; they still are not dispatched.
    assert svc.update_position("boss-a", KENLI)
    assert [n.id for n in svc.nearest_responders(KENLI, 3)] == ["w1"]


def test_lookup_combines_responders_and_facilities_of_the_kinds_that_exist() -> None:
    reg = registry(
        [responder("w1", 118.56, 37.60)],
        [
            facility("clinic-far", FacilityKind.CLINIC, 118.70, 37.70),
            facility("clinic-near", FacilityKind.CLINIC, 118.56, 37.59),
        ],
    )
    result = service(reg).lookup(KENLI, k=2)
    assert [n.id for n in result.responders] == ["w1"]
    assert list(result.facilities) == [FacilityKind.CLINIC]  # no hospital registered
    near = result.facilities[FacilityKind.CLINIC]
    assert near.id == "clinic-near"
    assert near.phone == "+865468888888"
    assert not near.stale
    with pytest.raises(TypeError):
        result.facilities[FacilityKind.HOSPITAL] = near  # type: ignore[index]


def test_query_arguments_are_validated() -> None:
    svc = service(registry([responder("w1", 118.56, 37.60)]))
    with pytest.raises(GeoError, match="k must be >= 1"):
        svc.nearest_responders(KENLI, 0)
    with pytest.raises(GeoError, match="swapped"):
        svc.lookup(LonLat(37.59, 118.55))


def test_homes_are_checked_when_the_service_is_built() -> None:
    # Not indexed, but a bad home must fail the build, not its alarm's lookup later.
    homes = [elder("e1", 118.55, 37.59), elder("e2", 37.59, 118.56)]
    with pytest.raises(GeoError, match=r"elder e2: latitude 118\.56.*swapped"):
        service(registry(elders=homes))
    with pytest.raises(GeoError, match="elder e3: outside the service area"):
        service(registry(elders=[elder("e3", 116.9, 36.7)]), projector=PROJ_BOX)
    assert service(registry(elders=homes[:1])).lookup(KENLI).responders == ()


# ----------------------------------------------------------------------------------------
# Live positions
# ----------------------------------------------------------------------------------------


def two_workers(clock: FakeClock, **kwargs: object) -> GeoService:
    people = [responder("near", 118.551, 37.59), responder("far", 118.70, 37.70)]
    return service(registry(people), clock, **kwargs)  # type: ignore[arg-type]


def test_a_move_is_reflected_in_the_next_query() -> None:
    clock = FakeClock()
    svc = two_workers(clock)
    assert [n.id for n in svc.nearest_responders(KENLI, 1)] == ["near"]
    assert svc.update_position("far", LonLat(118.5501, 37.5901), accuracy_m=8.0)
    clock.now += 20
    first = svc.nearest_responders(KENLI, 1)[0]
    assert first.id == "far"
    assert first.location == LonLat(118.5501, 37.5901)
    assert not first.stale
    assert first.accuracy_m == 8.0
    assert first.fix_age_s == 20.0
    # Moving away again (same responder, newer fix) puts it back behind "near".
    assert svc.update_position("far", LonLat(118.80, 37.80))
    assert [n.id for n in svc.nearest_responders(KENLI, 2)] == ["near", "far"]


def test_a_position_may_be_given_as_a_plain_lon_lat_pair() -> None:
    # As a decoded position report carries it: plain numbers, longitude first.
    clock = FakeClock()
    svc = two_workers(clock, projector=PROJ_BOX)
    assert svc.update_position("far", (118.5501, 37.5901), accuracy_m=3.0, timestamp=clock.now)
    assert svc.position_of("far") == (LonLat(118.5501, 37.5901), False)
    with pytest.raises(GeoError, match="swapped"):
        svc.update_position("far", (37.59, 118.55))


def test_unknown_responder_update_is_logged_and_ignored() -> None:
    clock = FakeClock()
    svc = two_workers(clock)
    with capture_logs() as logs:
        assert svc.update_position("ghost", KENLI) is False
        assert svc.set_on_duty("ghost", True) is False
    assert [entry["event"] for entry in logs] == [
        "geo.position.unknown_responder",
        "geo.duty.unknown_responder",
    ]
    assert logs[0]["responder_id"] == "ghost"
    assert logs[0]["log_level"] == "warning"
    assert svc.position_of("ghost") is None
    assert svc.stats().live == 0


def test_stale_position_falls_back_to_base_and_says_so() -> None:
    clock = FakeClock()
    svc = two_workers(clock, stale_after_s=600.0)
    assert svc.update_position("far", LonLat(118.5501, 37.5901), timestamp=clock.now)
    clock.now += 599.0
    assert svc.nearest_responders(KENLI, 1)[0].id == "far"
    clock.now += 1.0  # exactly stale_after_s old: no longer counts
    first, second = svc.nearest_responders(KENLI, 2)
    assert first.id == "near"
    assert second.id == "far"
    assert second.stale
    assert second.location == LonLat(118.70, 37.70)
    assert second.accuracy_m is None
    assert second.fix_age_s is None
    assert svc.position_of("far") == (LonLat(118.70, 37.70), True)
    assert svc.stats().live == 0


def test_a_newer_fix_outlives_the_deadline_of_the_one_it_replaced() -> None:
    clock = FakeClock()
    svc = two_workers(clock, stale_after_s=600.0)
    assert svc.update_position("far", LonLat(118.60, 37.60))
    clock.now += 300
    assert svc.update_position("far", LonLat(118.5501, 37.5901))
    clock.now += 400  # the first fix's deadline has passed, the second's has not
    assert svc.position_of("far") == (LonLat(118.5501, 37.5901), False)
    assert svc.nearest_responders(KENLI, 1)[0].id == "far"
    clock.now += 200
    assert svc.position_of("far") == (LonLat(118.70, 37.70), True)


def test_out_of_order_and_too_old_fixes_are_ignored() -> None:
    clock = FakeClock()
    svc = two_workers(clock)
    assert svc.update_position("far", LonLat(118.60, 37.60), timestamp=clock.now - 10)
    # A redelivered older fix must not move the responder back.
    assert svc.update_position("far", LonLat(118.551, 37.59), timestamp=clock.now - 20)
    assert svc.position_of("far") == (LonLat(118.60, 37.60), False)
    # A fix already older than stale_after_s on arrival changes nothing.
    assert svc.update_position("near", LonLat(118.60, 37.60), timestamp=clock.now - 601)
    assert svc.position_of("near") == (LonLat(118.551, 37.59), True)


def test_future_timestamps_are_clamped_to_now() -> None:
    clock = FakeClock()
    svc = two_workers(clock, stale_after_s=60.0)
    assert svc.update_position("far", LonLat(118.5501, 37.5901), timestamp=clock.now + 1e6)
    clock.now += 61
    assert svc.position_of("far") == (LonLat(118.70, 37.70), True)


def test_bad_updates_raise_and_change_nothing() -> None:
    clock = FakeClock()
    svc = two_workers(clock, projector=PROJ_BOX)
    with pytest.raises(GeoError, match="swapped"):
        svc.update_position("far", LonLat(37.59, 118.55))
    with pytest.raises(GeoError, match="outside the service area"):
        svc.update_position("far", LonLat(116.9, 36.7))
    with pytest.raises(GeoError, match="accuracy"):
        svc.update_position("far", KENLI, accuracy_m=-3.0)
    with pytest.raises(GeoError, match="timestamp"):
        svc.update_position("far", KENLI, timestamp=float("nan"))
    assert svc.position_of("far") == (LonLat(118.70, 37.70), True)


def test_frequent_fixes_do_not_grow_the_expiry_heap_without_bound() -> None:
    clock = FakeClock()
    svc = two_workers(clock)
    for i in range(20_000):
        clock.now += 0.01
        svc.update_position("far", LonLat(118.6 + (i % 7) / 1000, 37.6))
    # One responder is live; superseded deadlines are compacted away.
    assert svc.stats().live == 1
    assert len(svc._index._heap) <= 4 * 1 + 1024


# ----------------------------------------------------------------------------------------
# Reloads
# ----------------------------------------------------------------------------------------


def test_rebuilt_keeps_live_positions_and_duty_overrides_of_remaining_responders() -> None:
    clock = FakeClock()
    old_reg = registry(
        [responder("a", 118.70, 37.70), responder("b", 118.71, 37.71), responder("c", 118.56, 37.6)]
    )
    old = service(old_reg, clock)
    assert old.update_position("a", LonLat(118.5502, 37.5902), accuracy_m=4.0)
    assert old.update_position("b", LonLat(118.5501, 37.5901))
    assert old.set_on_duty("c", False)

    new_reg = registry(
        [responder("a", 118.70, 37.70), responder("c", 118.56, 37.6), responder("d", 118.6, 37.6)]
    )
    with capture_logs() as logs:
        new = reloaded(old, new_reg)
    adopted = next(e for e in logs if e["event"] == "geo.state.adopted")
    assert adopted["positions"] == 1
    assert adopted["dropped"] == 1
    assert new.position_of("a") == (LonLat(118.5502, 37.5902), False)
    assert new.position_of("b") is None
    assert [n.id for n in new.nearest_responders(KENLI, 3)] == ["a", "d"]  # c still off
    assert new.nearest_responders(KENLI, 1)[0].accuracy_m == 4.0
    # The old service is untouched and still answers (alarms in flight keep it).
    assert [n.id for n in old.nearest_responders(KENLI, 3)] == ["b", "a"]
    # Carried fixes expire on their original schedule.
    clock.now += 600
    assert new.position_of("a") == (LonLat(118.70, 37.70), True)


def test_a_roster_that_changed_a_responders_flag_supersedes_the_override() -> None:
    old = service(registry([responder("a", 118.56, 37.6), responder("b", 118.57, 37.6)]))
    assert old.set_on_duty("a", False)
    assert old.set_on_duty("b", False)
    # The new roster takes "a" off duty itself and leaves "b" as it was.
    new_reg = registry([responder("a", 118.56, 37.6, on_duty=False), responder("b", 118.57, 37.6)])
    with capture_logs() as logs:
        new = reloaded(old, new_reg)
    assert [e["responder_id"] for e in logs if e["event"] == "geo.duty.override_superseded"] == [
        "a"
    ]
    assert new.is_on_duty("a") is False and new.is_on_duty("b") is False
    assert new.set_on_duty("a", True)  # a later override wins over the new roster again
    assert reloaded(new, new_reg).is_on_duty("a") is True


def test_adopting_into_a_narrower_service_area_drops_fixes_outside_it() -> None:
    clock = FakeClock()
    people = [responder("in", 118.6, 37.6), responder("out", 118.7, 37.7)]
    old = service(registry(people), clock)  # whole UTM zone
    assert old.update_position("in", LonLat(118.5501, 37.5901))
    assert old.update_position("out", LonLat(116.9, 36.7))  # in the zone, not in Kenli
    new = service(registry(people), clock, projector=PROJ_BOX)
    new.adopt_live_state(old)
    assert new.position_of("in") == (LonLat(118.5501, 37.5901), False)
    assert new.position_of("out") == (LonLat(118.7, 37.7), True)
    assert new.nearest_responders(KENLI, 1)[0].id == "in"


async def test_rebuild_off_the_loop_then_adopt_loses_no_update() -> None:
    clock = FakeClock()
    reg = registry([responder(f"r{i}", 118.5 + i / 100, 37.6) for i in range(50)])
    old = service(reg, clock)
    build = asyncio.create_task(asyncio.to_thread(service, reg, clock))
    # Positions keep arriving on the loop while the new indexes are being built.
    for i in range(50):
        old.update_position(f"r{i}", LonLat(118.55, 37.59 + i / 10_000))
        await asyncio.sleep(0)
    new = await build
    new.adopt_live_state(old)
    for i in range(50):
        assert new.position_of(f"r{i}") == (LonLat(118.55, 37.59 + i / 10_000), False)
    assert new.nearest_responders(KENLI, 1)[0].id == "r0"


def test_a_bad_registry_fails_the_rebuild_and_names_the_record() -> None:
    good = service(registry([responder("a", 118.6, 37.6)]))
    bad = registry([responder("a", 118.6, 37.6), responder("swapped", 37.6, 118.6)])
    with pytest.raises(GeoError, match=r"responder swapped: latitude 118\.6.*swapped"):
        reloaded(good, bad)
    assert [n.id for n in good.nearest_responders(KENLI, 1)] == ["a"]


def test_service_configuration_is_validated() -> None:
    with pytest.raises(GeoError, match="stale_after_s"):
        service(registry(), stale_after_s=0.0)
    with pytest.raises(GeoError, match="cell_m"):
        service(registry(), cell_m=-1.0)


def test_logs_never_carry_phone_numbers() -> None:
    clock = FakeClock()
    with capture_logs() as logs:
        svc = two_workers(clock)
        svc.update_position("far", KENLI)
        svc.set_on_duty("near", False)
        reloaded(svc, svc.registry)
        svc.nearest_responders(KENLI, 2)
    assert logs
    assert not any("+86" in str(value) for entry in logs for value in entry.values())


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


def test_nearby_is_frozen() -> None:
    n = Nearby("a", "b", "c", KENLI, 1.0, 2.0)
    with pytest.raises(AttributeError):
        n.distance_m = 3.0  # type: ignore[misc]


# ----------------------------------------------------------------------------------------
# Index internals
# ----------------------------------------------------------------------------------------

COORD = st.floats(0.0, 1000.0, allow_nan=False).map(lambda v: round(v, 1))


@HYPOTHESIS
@given(
    points=st.lists(st.tuples(COORD, COORD), min_size=1, max_size=60),
    duplicates=st.integers(0, 20),
    query=st.tuples(COORD, COORD),
    n=st.integers(1, 25),
)
def test_lean_nearest_call_equals_rtree_index_nearest(
    points: list[tuple[float, float]],
    duplicates: int,
    query: tuple[float, float],
    n: int,
) -> None:
    points += [points[i % len(points)] for i in range(duplicates)]  # exact ties
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    tree = point_tree(xs, ys)
    assert tree is not None
    assert tree._fast is not None  # the lean call is in use, not the fallback
    want = list(tree.index.nearest(query, n))
    assert tree.nearest(query[0], query[1], n) == want
    assert len(want) >= min(n, len(points))  # ties at the n-th distance are included
    r = float(n * 10)  # a window with points on its edges now and then (coords to 0.1)
    window = (query[0] - r, query[1] - r, query[0] + r, query[1] + r)
    assert sorted(tree.intersection(window)) == sorted(tree.index.intersection(window))


def test_lean_nearest_call_falls_back_when_the_library_lacks_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A future rtree that loads libspatialindex differently: the C symbols are not there.
    monkeypatch.setattr(geo_index, "rtree_core", SimpleNamespace(rt=object()))
    with capture_logs() as logs:
        tree = point_tree(np.array([1.0, 2.0, 3.0, 3.0]), np.zeros(4))
    assert tree is not None and tree._fast is None
    assert [e["event"] for e in logs] == ["geo.rtree.lean_call_unavailable"]
    got = tree.nearest(0.0, 0.0, 3)
    assert got[:2] == [0, 1] and sorted(got[2:]) == [2, 3]  # the tie at the 3rd is kept
    assert sorted(tree.intersection((1.5, -1.0, 3.0, 1.0))) == [1, 2, 3]


@HYPOTHESIS
@given(st.lists(st.tuples(COORD, COORD), min_size=0, max_size=80))
def test_z_order_is_a_stable_permutation_along_the_curve(points: list[tuple[float, float]]) -> None:
    xs = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.array([p[1] for p in points], dtype=np.float64)
    order = _z_order(xs, ys).tolist()
    assert sorted(order) == list(range(len(points)))
    for a, b in itertools.pairwise(order):
        if points[a] == points[b]:
            assert a < b  # equal points keep their input (id) order


def test_z_order_keeps_neighbours_close() -> None:
    # A 64 x 64 lattice: in Z order, 4 x 4 blocks are contiguous runs of 16.
    xs, ys = np.meshgrid(np.arange(64.0), np.arange(64.0))
    order = _z_order(xs.ravel(), ys.ravel())
    first = {(int(xs.ravel()[i]), int(ys.ravel()[i])) for i in order[:16].tolist()}
    assert first == {(x, y) for x in range(4) for y in range(4)}


@pytest.mark.parametrize(("k", "valid"), [(1, 0.5), (3, 0.78), (3, 0.2), (10, 0.95)])
def test_batch_size_makes_a_second_rtree_call_rare(k: int, valid: float) -> None:
    def shortfall(n: int) -> float:  # P(fewer than k valid among n)
        return sum(math.comb(n, i) * valid**i * (1 - valid) ** (n - i) for i in range(k))

    n = _batch_for(k, valid, cap=1000)
    assert shortfall(n) <= 1e-3 < shortfall(n - 1)
    assert _batch_for(k, valid, cap=5) == min(n, 5)
    assert _batch_for(k, 0.0, cap=64) == 64
    assert _batch_for(k, 1.0, cap=64) == k


@HYPOTHESIS
@given(
    st.integers(-(2**40), 2**40),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**40), 2**40),
    st.integers(-(2**31), 2**31 - 1),
)
def test_grid_cell_keys_are_unique_and_decode(gx: int, gy: int, hx: int, hy: int) -> None:
    assert _cell_xy(_cell_key(gx, gy)) == (gx, gy)
    assert (_cell_key(gx, gy) == _cell_key(hx, hy)) == ((gx, gy) == (hx, hy))
    assert _cell_key(gx, gy) + 1 == _cell_key(gx, gy + 1)  # a row is a run of ints


@pytest.mark.parametrize("r", [0, 1, 2, 5])
def test_a_ring_is_the_cells_at_exactly_that_chebyshev_distance(r: int) -> None:
    cx, cy = 7, -3
    cells = _ring(cx, cy, r)
    want = {
        _cell_key(cx + dx, cy + dy)
        for dx in range(-r, r + 1)
        for dy in range(-r, r + 1)
        if max(abs(dx), abs(dy)) == r
    }
    assert len(cells) == len(want) == (8 * r if r else 1)
    assert set(cells) == want
