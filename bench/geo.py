"""Benchmark gateway.geo: bulk load, k=3 nearest-responder queries, live updates, memory.

Usage: .venv/bin/python bench/geo.py [--quick] [--seed N]

For each size N (5,000, 1e4, 1e5, 1e6; ``--quick``: up to 1e5) a registry of N
responders spread over a Kenli-sized area (~60 x 66 km; 2 % supervisors, 80 % on duty)
and 1,000 facilities is indexed, then (5,000 is the issue's design point: every
responder moving and live; at 1e4 about half are live, at 1e6 one in 200):

* build: ``GeoService(...)`` construction (array projection + rtree bulk loads);
* RSS delta of that construction (the registry itself is built beforehand);
* updates/s: ``update_position`` for 5,000 moving responders, 10 rounds 30 s apart on a
  fake clock (also with the responder-app decoder of the MQTT message in front);
* query: ``nearest_responders(q, 3)`` end to end (validation, projection, both tiers,
  geodesic distance and bearing, result objects) with those 5,000 responders live, for
  20,000 random points, 5 passes pooled (100,000 calls: the p99 of one pass swings
  +-30 % from pass to pass on a shared VM; the per-pass p99s are printed and kept);
* rtree floor: a bare ``rtree.Index.nearest(q, 3)`` on the same N points (all of them,
  on duty or not), i.e. what a design that calls rtree's Python API pays before doing
  anything else;
* brute force: the same answer from numpy (project the query, squared distances to every
  eligible on-duty position, argpartition, geodesics for the k results), and the ratio
  of medians. The two answers are compared on a sample of queries.

Prints a table and writes bench/results/geo.json. Timings are per call with
``perf_counter_ns``; p99 on a shared VM is noisy, so the JSON keeps p50, p90, p99, max.
As a long-running daemon would after loading its registry, the benchmark calls
``gc.freeze()`` after building, so that collections of the young generation do not
traverse the million registry objects.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyproj
import rtree
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devices.responder_app import PositionReport, ResponderAppDecoder
from gateway.geo import GeoService, Projector
from gateway.model import (
    Facility,
    FacilityKind,
    LonLat,
    Registry,
    Responder,
    ResponderRole,
)

AREA = (118.20, 37.30, 118.90, 37.90)  # min_lon, min_lat, max_lon, max_lat
MOVERS = 5_000
ROUNDS = 10
PASSES = 5  # query passes over the same points, pooled
K = 3
TARGET_P99_US = 50.0
TARGET_UPDATES_PER_S = 20_000.0
RESULTS = Path(__file__).resolve().parent / "results" / "geo.json"


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Percentiles:
    p50: float
    p90: float
    p99: float
    max: float
    n: int
    samples_ns: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def pooled(cls, parts: Sequence[Percentiles]) -> Percentiles:
        return cls.of([x for p in parts for x in p.samples_ns])

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Percentiles:
        s = sorted(samples_ns)
        n = len(s)

        def at(q: float) -> float:
            return s[min(n - 1, int(q * n))] / 1000.0

        return cls(at(0.50), at(0.90), at(0.99), s[-1] / 1000.0, n, list(samples_ns))

    def summary(self) -> dict[str, float]:
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max, "n": self.n}


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def time_calls(fn: Callable[[Any], object], args: Sequence[Any]) -> Percentiles:
    clock = time.perf_counter_ns
    samples = []
    for a in args:
        t0 = clock()
        fn(a)
        samples.append(clock() - t0)
    return Percentiles.of(samples)


def random_points(rng: random.Random, n: int) -> list[LonLat]:
    return [LonLat(rng.uniform(AREA[0], AREA[2]), rng.uniform(AREA[1], AREA[3])) for _ in range(n)]


def make_registry(rng: random.Random, n: int) -> Registry:
    responders = {}
    for i, base in enumerate(random_points(rng, n)):
        rid = f"r{i:07d}"
        responders[rid] = Responder(
            responder_id=rid,
            name=f"worker {i}",
            phone="+8613800000000",
            community=f"c{i % 500}",
            role=ResponderRole.SUPERVISOR if i % 50 == 0 else ResponderRole.GRID_LEADER,
            on_duty=rng.random() < 0.8,
            base=base,
        )
    facilities = {
        f"f{i:04d}": Facility(
            f"f{i:04d}",
            f"facility {i}",
            FacilityKind.HOSPITAL if i % 10 == 0 else FacilityKind.CLINIC,
            "+865460000000",
            p,
        )
        for i, p in enumerate(random_points(rng, 1000))
    }
    return Registry.build({}, {}, responders, facilities)


def moved(rng: random.Random, p: LonLat) -> LonLat:
    # Within ~1 km of where they were: walking or cycling around their grid.
    lon = min(max(p.lon + rng.uniform(-0.01, 0.01), AREA[0]), AREA[2])
    lat = min(max(p.lat + rng.uniform(-0.01, 0.01), AREA[1]), AREA[3])
    return LonLat(lon, lat)


class BruteForce:
    """The k nearest eligible on-duty responders by scanning every position in numpy."""

    def __init__(
        self, projector: Projector, reg: Registry, live: dict[str, LonLat], on_duty: set[str]
    ) -> None:
        people = [
            r
            for r in sorted(reg.responders.values(), key=lambda r: r.responder_id)
            if r.role is not ResponderRole.SUPERVISOR and r.responder_id in on_duty
        ]
        where = [live.get(r.responder_id, r.base) for r in people]
        xs, ys = projector.project_many([p.lon for p in where], [p.lat for p in where])
        self.xs: npt.NDArray[np.float64] = xs
        self.ys: npt.NDArray[np.float64] = ys
        self.ids = [r.responder_id for r in people]
        self.where = where
        self.projector = projector

    def nearest(self, q: LonLat) -> list[tuple[float, str, float]]:
        qx, qy = self.projector.project(q)
        d2 = (self.xs - qx) ** 2 + (self.ys - qy) ** 2
        k = min(K, len(d2))
        part = np.argpartition(d2, k - 1)[:k]
        order = part[np.argsort(d2[part])]
        out = []
        for i in order.tolist():
            metres, _bearing = self.projector.geodesic(q, self.where[i])
            out.append((float(np.sqrt(d2[i])), self.ids[i], metres))
        return out


def bare_rtree(projector: Projector, reg: Registry) -> rtree.index.Index:
    bases = [r.base for r in reg.responders.values()]
    xs, ys = projector.project_many([p.lon for p in bases], [p.lat for p in bases])
    props = rtree.index.Property()
    props.leaf_capacity = props.index_capacity = 16
    props.fill_factor = 0.9
    coords = np.ascontiguousarray(np.column_stack((xs, ys)))
    return rtree.index.Index((np.arange(len(xs), dtype=np.int64), coords, coords), properties=props)


def run_size(n: int, seed: int, queries: int, brute_queries: int) -> dict[str, Any]:
    rng = random.Random(seed + n)
    projector = Projector(bbox=AREA)
    reg = make_registry(rng, n)
    clock = FakeClock(1_800_000_000.0)

    gc.collect()
    rss_before = rss_mb()
    t0 = time.perf_counter()
    svc = GeoService(reg, projector, clock=clock)
    build_s = time.perf_counter() - t0
    gc.collect()
    rss_delta = rss_mb() - rss_before

    eligible = [r for r in reg.responders.values() if r.role is not ResponderRole.SUPERVISOR]
    movers = rng.sample(eligible, min(MOVERS, len(eligible)))
    positions = {r.responder_id: r.base for r in movers}
    gc.freeze()

    # Position updates, 10 rounds 30 s apart: every responder in every round.
    plan = []
    for _ in range(ROUNDS):
        batch = []
        for r in movers:
            p = moved(rng, positions[r.responder_id])
            positions[r.responder_id] = p
            batch.append((r.responder_id, p))
        plan.append(batch)
    started = time.perf_counter()
    for batch in plan:
        clock.now += 30.0
        for rid, p in batch:
            svc.update_position(rid, p, accuracy_m=10.0)
    updates_per_s = ROUNDS * len(movers) / (time.perf_counter() - started)

    decoder = ResponderAppDecoder()
    messages = [
        (
            f"responders/{rid}/location",
            json.dumps({"lon": p.lon, "lat": p.lat, "accuracy": 10.0}).encode(),
        )
        for rid, p in plan[-1]
    ]
    started = time.perf_counter()
    for topic, payload in messages:
        report = decoder.decode(topic, payload)
        if not isinstance(report, PositionReport):
            raise TypeError(f"{topic} decoded to {report!r}")
        svc.update_position(
            report.responder_id,
            (report.lon, report.lat),
            accuracy_m=report.accuracy_m,
            timestamp=report.timestamp,
        )
    parsed_updates_per_s = len(messages) / (time.perf_counter() - started)

    points = random_points(rng, queries)
    for q in points[:1000]:  # warm caches and the allocator
        svc.nearest_responders(q, K)
    # Several passes, pooled: one pass's p99 rests on its 200 slowest calls, which on a
    # shared VM are mostly other tenants' doing and swing +-30 % from pass to pass.
    passes = [time_calls(lambda q: svc.nearest_responders(q, K), points) for _ in range(PASSES)]
    query = Percentiles.pooled(passes)
    lookup = time_calls(lambda q: svc.lookup(q, k=K), points[: queries // 4])

    tree = bare_rtree(projector, reg)
    xy = [projector.project(q) for q in points]
    rtree_floor = time_calls(lambda p: list(tree.nearest(p, K)), xy)

    on_duty = {r.responder_id for r in reg.responders.values() if r.on_duty}
    brute = BruteForce(projector, reg, positions, on_duty)
    brute_points = points[:brute_queries]
    brute_t = time_calls(brute.nearest, brute_points)
    agree = True
    for q in brute_points[:200]:
        got = sorted(_planar(projector, q, svc, K))
        want = sorted(d for d, _, _ in brute.nearest(q))
        agree &= len(got) == len(want) and all(
            abs(g - w) <= 1e-6 for g, w in zip(got, want, strict=True)
        )

    gc.unfreeze()
    return {
        "points": n,
        "build_s": build_s,
        "rss_delta_mb": rss_delta,
        "updates_per_s": updates_per_s,
        "parse_and_update_per_s": parsed_updates_per_s,
        "movers": len(movers),
        "query_us": query.summary(),
        "query_passes_p99_us": [p.p99 for p in passes],
        "lookup_us": lookup.summary(),
        "rtree_floor_us": rtree_floor.summary(),
        "brute_force_us": brute_t.summary(),
        "speedup_p50": brute_t.p50 / query.p50,
        "agrees_with_brute_force": agree,
        "cell_m": svc.stats().cell_m,
    }


def _planar(projector: Projector, q: LonLat, svc: GeoService, k: int) -> list[float]:
    qx, qy = projector.project(q)
    out = []
    for n in svc.nearest_responders(q, k):
        x, y = projector.project(n.location)
        out.append(float(np.hypot(x - qx, y - qy)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only 1e4 and 1e5 points")
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args(argv)
    # Keep info logs (index built, ...) out of the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))

    sizes = [5_000, 10_000, 100_000] if args.quick else [5_000, 10_000, 100_000, 1_000_000]
    rows = []
    for n in sizes:
        brute_queries = max(100, min(2000, 20_000_000 // n))
        rows.append(run_size(n, args.seed, queries=20_000, brute_queries=brute_queries))
        print(f"  done {n:>9,} points", file=sys.stderr, flush=True)

    header = (
        f"{'points':>9} {'build s':>8} {'RSS MB':>7} {'upd/s':>8} {'parse+upd/s':>11} "
        f"{'k=3 p50':>8} {'p99 us':>7} {'rtree p50':>9} {'p99':>6} "
        f"{'brute p50':>10} {'p99':>8} {'speedup':>8} {'agree':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        q, f, b = r["query_us"], r["rtree_floor_us"], r["brute_force_us"]
        print(
            f"{r['points']:>9,} {r['build_s']:>8.2f} {r['rss_delta_mb']:>7.1f} "
            f"{r['updates_per_s']:>8,.0f} {r['parse_and_update_per_s']:>11,.0f} "
            f"{q['p50']:>8.1f} {q['p99']:>7.1f} {f['p50']:>9.1f} {f['p99']:>6.1f} "
            f"{b['p50']:>10.1f} {b['p99']:>8.1f} {r['speedup_p50']:>7.1f}x "
            f"{'yes' if r['agrees_with_brute_force'] else 'NO':>5}"
        )
    for r in rows:
        spread = ", ".join(f"{v:.1f}" for v in r["query_passes_p99_us"])
        print(f"{r['points']:>9,}: k=3 p99 per pass (us): {spread}")
    largest = rows[-1]
    p99_ok = largest["query_us"]["p99"] <= TARGET_P99_US
    updates_ok = min(r["updates_per_s"] for r in rows) >= TARGET_UPDATES_PER_S
    print(
        f"\ntarget k=3 p99 <= {TARGET_P99_US:.0f} us at {largest['points']:,} points: "
        f"{'met' if p99_ok else 'MISSED'} ({largest['query_us']['p99']:.1f} us; "
        f"bare rtree p99 {largest['rtree_floor_us']['p99']:.1f} us)"
    )
    print(
        f"target >= {TARGET_UPDATES_PER_S:,.0f} updates/s for {MOVERS:,} responders: "
        f"{'met' if updates_ok else 'MISSED'} "
        f"(min {min(r['updates_per_s'] for r in rows):,.0f}/s)"
    )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "gateway.geo",
        "quick": args.quick,
        "seed": args.seed,
        "k": K,
        "targets": {
            "query_p99_us_at_largest": TARGET_P99_US,
            "updates_per_s": TARGET_UPDATES_PER_S,
            "query_p99_met": p99_ok,
            "updates_met": updates_ok,
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "rtree": rtree.__version__,
            "libspatialindex": str(rtree.index.__c_api_version__.decode()),
            "pyproj": pyproj.__version__,
            "proj": pyproj.proj_version_str,
            "numpy": np.__version__,
        },
        "results": rows,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
