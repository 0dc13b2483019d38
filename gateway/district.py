#!/usr/bin/env python3
"""Generate a fictional but plausible district registry (the CSV files gateway.registry loads).

Shaped like Kenli district, Dongying, Shandong (~118.55E 37.59N): communities
(社区) spread over a 5 km x 4.5 km area, elders clustered around their community
centres, family contacts with Chinese mobile numbers, one alarm device per elder,
grid leaders and community workers, a county hospital and a clinic per community.
Everything is drawn from one seeded ``random.Random``: the same arguments always
give byte-identical files. Next to the CSV files it writes ``district.geojson``, the
outlines the console's offline map draws: the district, one cell per community and a
few grid cells (网格) in each (see :func:`district_map`).

    python -m gateway.district --out config/sample
    python -m gateway.district --out /tmp/city --city     # 100k elders, 40 x 30 km

The people and numbers are invented. The phone numbers are valid for the
``phonenumbers`` library (mobiles in 138/139/150/186-0546-xxxx blocks, landlines
0546-29xxxxx) so that the loader accepts them; they are not anybody's on purpose.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

CENTRE_LON: Final = 118.55
CENTRE_LAT: Final = 37.59
M_PER_DEG_LAT: Final = 111_320.0

#: Share of each device scheme; the remainder are MQTT buttons.
CONTACT_ID_SHARE: Final = 0.20
PHONE_SHARE: Final = 0.10
#: Share of MQTT buttons that are our own make (``alarm/buttons/<device_id>``).
OWN_MAKE_SHARE: Final = 0.10
ON_DUTY_SHARE: Final = 0.75
COMMUNITY_WORKER_SHARE: Final = 0.20
ELDERS_PER_COMMUNITY: Final = 500
MIN_COMMUNITIES: Final = 10
COMMUNITIES_PER_SUPERVISOR: Final = 4
COMMUNITIES_PER_HOSPITAL: Final = 20

COMMUNITY_BASES: Final = (
    "胜利", "建设", "黄河", "新兴", "民丰", "和平", "兴隆", "永安", "垦东", "郝家",
    "文汇", "春晖", "锦华", "华苑", "金湖", "东城", "西城", "南苑", "北苑", "振兴",
    "幸福", "康宁", "福瑞", "广场", "友林", "胜采", "渤海", "新华", "济南", "淄博",
    "天鹅湖", "清风", "安泰", "宏达", "惠民", "河滨", "湿地", "海港", "育才", "丰收",
)
COMMUNITY_VARIANTS: Final = ("", "东", "西", "南", "北", "中", "新")

SURNAMES: Final = (
    "王", "李", "张", "刘", "陈", "杨", "赵", "孙", "徐", "马", "高", "郭", "于", "董",
    "宋", "韩", "田", "崔", "姜", "曹", "周", "吴", "胡", "朱", "林", "何", "郑", "梁",
    "谢", "唐", "许", "冯", "邓", "袁", "蒋", "蔡", "程", "魏", "吕", "丁", "任", "姚",
    "卢", "石", "贾", "薛", "侯", "郝", "邵", "孟", "秦", "尹", "毛", "段", "史", "范",
)
ELDER_GIVEN_FEMALE: Final = (
    "桂兰", "秀英", "玉兰", "淑珍", "凤英", "秀兰", "桂英", "玉珍", "兰英", "淑兰",
    "桂芳", "秀珍", "玉梅", "凤兰", "素芳", "翠花", "秀芝", "桂珍", "玉芬", "淑英",
)
ELDER_GIVEN_MALE: Final = (
    "建国", "国华", "德福", "长顺", "保国", "振华", "文斌", "永福", "树林", "福山",
    "德胜", "连生", "庆祥", "玉山", "家林", "明德", "春生", "忠义", "守义", "万福",
)
ADULT_GIVEN: Final = (
    "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "涛",
    "明", "超", "霞", "平", "刚", "海燕", "志强", "建军", "晓东", "丽娜", "红梅", "卫东",
    "晓燕", "海涛", "建华", "春燕", "学军", "玉洁", "文静", "晓明", "宏伟", "立新",
)
# (relation, weight, shares the elder's surname when the elder is a man)
RELATIONS: Final = (
    ("儿子", 35, True), ("女儿", 30, True), ("儿媳", 8, False), ("女婿", 5, False),
    ("孙子", 6, True), ("孙女", 6, True), ("侄子", 3, True), ("邻居", 7, False),
)
ELDER_NOTES: Final = (
    "高血压", "糖尿病", "心脏病史，随身携带速效救心丸", "独居", "行动不便，使用轮椅",
    "听力较差，请大声说话", "阿尔茨海默病早期", "慢阻肺，家中有制氧机", "老伴卧床",
)
HOSPITALS: Final = (
    "垦利区人民医院", "东营市人民医院", "东营市中医院", "胜利油田中心医院", "东营区人民医院",
    "河口区人民医院", "广饶县人民医院", "利津县人民医院", "东营市第二人民医院",
    "东营市妇幼保健院",
)
MOBILE_PREFIXES: Final = ("138", "139", "150", "186")

HEADERS: Final = {
    "elders.csv": ("elder_id", "name", "address", "community", "lon", "lat", "phone", "notes"),
    "devices.csv": ("device_id", "elder_id", "scheme", "address", "model", "test_interval_h"),
    "contacts.csv": ("elder_id", "name", "relation", "phone", "language"),
    "responders.csv": (
        "responder_id", "name", "phone", "community", "role", "on_duty", "lon", "lat",
    ),
    "facilities.csv": ("facility_id", "name", "kind", "duty_phone", "lon", "lat", "address"),
}
#: The map file written next to the CSV files (not part of the registry the loader reads).
MAP_FILE: Final = "district.geojson"
#: Each community's cell is cut into GRID_SPLIT x GRID_SPLIT grid cells (fewer at its edges).
GRID_SPLIT: Final = 2


@dataclass(frozen=True, slots=True)
class Preset:
    """Default size and extent of a generated registry."""

    elders: int
    responders: int
    width_km: float
    height_km: float
    area_name: str  # prefix of every postal address


DISTRICT: Final = Preset(88, 143, 5.0, 4.5, "垦利区")
CITY: Final = Preset(100_000, 5_000, 40.0, 30.0, "东营市")


class GenerationError(Exception):
    """The requested registry cannot be generated (e.g. more accounts than exist)."""


@dataclass(frozen=True, slots=True)
class Area:
    """A rectangle around the centre, with metre <-> degree conversion for offsets."""

    width_km: float
    height_km: float

    @property
    def m_per_deg_lon(self) -> float:
        return M_PER_DEG_LAT * math.cos(math.radians(CENTRE_LAT))

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(min_lon, min_lat, max_lon, max_lat) in degrees, rounded outwards to 1e-4.

        Every generated point lies inside it, even after coordinates are rounded
        to six decimals in the CSV files.
        """
        half_lon = self.width_km * 500.0 / self.m_per_deg_lon
        half_lat = self.height_km * 500.0 / M_PER_DEG_LAT
        return (math.floor((CENTRE_LON - half_lon) * 1e4) / 1e4,
                math.floor((CENTRE_LAT - half_lat) * 1e4) / 1e4,
                math.ceil((CENTRE_LON + half_lon) * 1e4) / 1e4,
                math.ceil((CENTRE_LAT + half_lat) * 1e4) / 1e4)

    def at(self, x_m: float, y_m: float) -> tuple[float, float]:
        """Lon/lat of a point x_m east and y_m north of the centre, clamped to the area."""
        half_w, half_h = self.width_km * 500.0, self.height_km * 500.0
        x = min(max(x_m, -half_w), half_w)
        y = min(max(y_m, -half_h), half_h)
        return CENTRE_LON + x / self.m_per_deg_lon, CENTRE_LAT + y / M_PER_DEG_LAT


@dataclass(frozen=True, slots=True)
class Community:
    name: str
    road: str
    x_m: float
    y_m: float


class NumberPool:
    """Hands out unique phone numbers drawn at random from fixed blocks.

    The blocks grow with ``need`` so the pool stays at most half full and drawing
    stays cheap; numbers are written the way people type them (``0546-2912345``).
    """

    def __init__(self, rng: random.Random, heads: Sequence[str], tail_digits: int) -> None:
        self._rng = rng
        self._heads = tuple(heads)
        self._tail_digits = tail_digits
        self._used: set[str] = set()

    @classmethod
    def mobiles(cls, rng: random.Random, need: int) -> NumberPool:
        blocks = max(1, math.ceil(2 * need / (len(MOBILE_PREFIXES) * 10_000)))
        heads = [f"{p}{546 + b:04d}" for b in range(blocks) for p in MOBILE_PREFIXES]
        return cls(rng, heads, 4)

    @classmethod
    def landlines(cls, rng: random.Random, need: int) -> NumberPool:
        blocks = max(1, math.ceil(2 * need / 100_000))
        if blocks > 8:
            raise GenerationError(f"{need} landlines do not fit the 0546-2x blocks")
        return cls(rng, [f"0546-{29 - b}" for b in range(blocks)], 5)

    def draw(self) -> str:
        digits = self._tail_digits
        while True:
            head = self._rng.choice(self._heads)
            number = f"{head}{self._rng.randrange(10**digits):0{digits}d}"
            if number not in self._used:
                self._used.add(number)
                return number


def community_names(count: int) -> list[str]:
    """``count`` distinct community names: the base names, then directional variants."""
    names = [f"{base}{variant}" for variant in COMMUNITY_VARIANTS for base in COMMUNITY_BASES]
    extra = 2
    while len(names) < count:
        names.extend(f"{base}{extra}" for base in COMMUNITY_BASES)
        extra += 1
    return names[:count]


def layout_communities(rng: random.Random, area: Area, count: int) -> list[Community]:
    """Community centres on a jittered grid, so clusters do not pile up on each other."""
    aspect = area.width_km / area.height_km
    cols = max(1, math.ceil(math.sqrt(count * aspect)))
    rows = math.ceil(count / cols)
    cell_w = area.width_km * 1000.0 / cols
    cell_h = area.height_km * 1000.0 / rows
    cells = [(c, r) for r in range(rows) for c in range(cols)]
    chosen = rng.sample(cells, count)
    out: list[Community] = []
    for base, (c, r) in zip(community_names(count), chosen, strict=True):
        x = (c + 0.5) * cell_w - area.width_km * 500.0 + rng.uniform(-0.2, 0.2) * cell_w
        y = (r + 0.5) * cell_h - area.height_km * 500.0 + rng.uniform(-0.2, 0.2) * cell_h
        road = f"{base}{'街' if rng.random() < 0.3 else '路'}"
        out.append(Community(f"{base}社区", road, x, y))
    return out


def _fmt(value: float) -> str:
    return f"{value:.6f}"


def _ident(prefix: str, index: int, total: int) -> str:
    return f"{prefix}{index:0{max(4, len(str(total)))}d}"


def _contact_id_accounts(rng: random.Random, count: int) -> list[str]:
    # Hex 'A' is avoided: in Contact ID a transmitted 0 has the value 10, and some
    # receivers print an 'A' digit as 0, which would make two accounts look alike.
    candidates = [a for a in range(0x1000, 0x10000) if "A" not in f"{a:04X}"]
    if count > len(candidates):
        raise GenerationError(f"{count} Contact ID accounts requested, {len(candidates)} exist")
    return [f"{a:04X}" for a in rng.sample(candidates, count)]


def _positioned(area: Area, rng: random.Random, community: Community, sigma_m: float) -> list[str]:
    lon, lat = area.at(community.x_m + rng.gauss(0.0, sigma_m),
                       community.y_m + rng.gauss(0.0, sigma_m))
    return [_fmt(lon), _fmt(lat)]


def generate(
    out: Path,
    *,
    elders: int,
    responders: int,
    seed: int,
    width_km: float,
    height_km: float,
    area_name: str,
) -> dict[str, int]:
    """Write the five registry CSV files and the map (:data:`MAP_FILE`) into ``out``;
    return the registry's counts.

    The counts use the keys of :func:`gateway.registry.registry_summary` so a test
    can compare what was generated with what was loaded.
    """
    if elders < 1 or responders < 3:
        raise GenerationError("need at least 1 elder and 3 responders")
    rng = random.Random(seed)
    area = Area(width_km, height_km)
    n_communities = max(MIN_COMMUNITIES, math.ceil(elders / ELDERS_PER_COMMUNITY))
    communities = layout_communities(rng, area, n_communities)
    cell_m = math.sqrt(width_km * height_km * 1e6 / n_communities)
    mobiles = NumberPool.mobiles(rng, 3 * elders + responders)
    landlines = NumberPool.landlines(rng, elders + n_communities + 10)

    # ---- elders, devices, contacts
    n_cid = round(elders * CONTACT_ID_SHARE)
    n_phone = round(elders * PHONE_SHARE)
    schemes = ["contact_id"] * n_cid + ["phone"] * n_phone + ["mqtt"] * (elders - n_cid - n_phone)
    rng.shuffle(schemes)
    mqtt_indices = [i for i, s in enumerate(schemes) if s == "mqtt"]
    own_make = set(rng.sample(mqtt_indices, round(len(mqtt_indices) * OWN_MAKE_SHARE)))
    accounts = iter(_contact_id_accounts(rng, n_cid))
    relations = [r[0] for r in RELATIONS]
    relation_weights = [r[1] for r in RELATIONS]
    shares_surname = {r[0]: r[2] for r in RELATIONS}

    elder_rows: list[list[str]] = []
    device_rows: list[list[str]] = []
    contact_rows: list[list[str]] = []
    for i in range(elders):
        # The first elders go round-robin so that every community has at least one.
        community = communities[i] if i < n_communities else rng.choice(communities)
        elder_id = _ident("E", i + 1, elders)
        device_id = _ident("D", i + 1, elders)
        male = rng.random() < 0.45
        surname = rng.choice(SURNAMES)
        given = rng.choice(ELDER_GIVEN_MALE if male else ELDER_GIVEN_FEMALE)
        address = (f"{area_name}{community.name}{community.road}{rng.randint(1, 199)}号"
                   f"{rng.randint(1, 6)}单元{rng.randint(1, 6)}{rng.randint(1, 2):02d}")
        scheme = schemes[i]
        home_phone = landlines.draw() if scheme == "phone" or rng.random() < 0.4 else ""
        notes = rng.choice(ELDER_NOTES) if rng.random() < 0.35 else ""
        elder_rows.append([elder_id, surname + given, address, community.name,
                           *_positioned(area, rng, community, cell_m * 0.15),
                           home_phone, notes])

        if scheme == "mqtt" and i in own_make:
            device = ["mqtt", f"alarm/buttons/{device_id}", "KL-SOS v1", "24"]
        elif scheme == "mqtt":
            model = "TS0215A_sos" if rng.random() < 0.7 else "HS1EB"
            device = ["mqtt", f"zigbee2mqtt/sos-{elder_id}", model, "24"]
        elif scheme == "contact_id":
            device = ["contact_id", next(accounts), "CID dialer + pendant", "24"]
        else:
            device = ["phone", home_phone, "SOS phone", ""]
        device_rows.append([device_id, elder_id, *device])

        for k in range(rng.choice((1, 1, 2, 2, 2, 3))):
            relation = (rng.choice(("儿子", "女儿")) if k == 0
                        else rng.choices(relations, relation_weights)[0])
            c_surname = surname if male and shares_surname[relation] else rng.choice(SURNAMES)
            language = "en" if rng.random() < 0.03 else "zh"
            contact_rows.append([elder_id, c_surname + rng.choice(ADULT_GIVEN), relation,
                                 mobiles.draw(), language])

    # ---- responders: a few supervisors, some community workers, grid leaders for the rest
    n_supervisors = min(responders - 2, math.ceil(n_communities / COMMUNITIES_PER_SUPERVISOR))
    n_workers = max(1, round(responders * COMMUNITY_WORKER_SHARE))
    n_grid = responders - n_supervisors - n_workers
    if n_grid < 1:
        raise GenerationError(f"{responders} responders leave no grid leaders")
    responder_rows: list[list[str]] = []
    roles = (["supervisor"] * n_supervisors + ["community_worker"] * n_workers
             + ["grid_leader"] * n_grid)
    for i, role in enumerate(roles):
        if role == "supervisor":
            community = communities[(i * COMMUNITIES_PER_SUPERVISOR) % n_communities]
            sigma = cell_m * 0.05
        elif role == "community_worker":
            community = communities[(i - n_supervisors) % n_communities]
            sigma = cell_m * 0.03
        else:
            community = communities[(i - n_supervisors - n_workers) % n_communities]
            sigma = cell_m * 0.25
        # Each community keeps at least one grid leader on duty, as a real roster would.
        first_of_community = role == "grid_leader" and i - n_supervisors - n_workers < n_communities
        on_duty = first_of_community or rng.random() < ON_DUTY_SHARE
        responder_rows.append([
            _ident("R", i + 1, responders), rng.choice(SURNAMES) + rng.choice(ADULT_GIVEN),
            mobiles.draw(), community.name, role, "true" if on_duty else "false",
            *_positioned(area, rng, community, sigma),
        ])

    # ---- facilities: hospitals near some community centres, a clinic in every community
    n_hospitals = max(1, math.ceil(n_communities / COMMUNITIES_PER_HOSPITAL))
    total_facilities = n_hospitals + n_communities
    facility_rows: list[list[str]] = []
    hospital_sites = [communities[0], *rng.sample(communities[1:], n_hospitals - 1)]
    for h, site in enumerate(hospital_sites):
        name = HOSPITALS[h] if h < len(HOSPITALS) else f"东营市第{h}医院"
        facility_rows.append([
            _ident("F", h + 1, total_facilities), name, "hospital", landlines.draw(),
            *_positioned(area, rng, site, cell_m * 0.1),
            f"{area_name}{site.road}{rng.randint(1, 99)}号",
        ])
    for c, community in enumerate(communities):
        facility_rows.append([
            _ident("F", n_hospitals + c + 1, total_facilities), f"{community.name}卫生服务站",
            "clinic", landlines.draw(), *_positioned(area, rng, community, cell_m * 0.05),
            f"{area_name}{community.name}{community.road}{rng.randint(1, 99)}号",
        ])

    out.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list[list[str]]] = {
        "elders.csv": elder_rows,
        "devices.csv": device_rows,
        "contacts.csv": contact_rows,
        "responders.csv": responder_rows,
        "facilities.csv": facility_rows,
    }
    for name, rows in tables.items():
        _write_csv(out / name, HEADERS[name], rows)
    leaders: dict[str, list[str]] = {}
    for row in responder_rows:
        if row[4] == "grid_leader":
            leaders.setdefault(row[3], []).append(row[0])
    _write_geojson(out / MAP_FILE, district_map(area, area_name, communities, leaders))

    return {
        "elders": elders,
        "communities": n_communities,
        "contacts": len(contact_rows),
        "devices": elders,
        "devices_mqtt": len(mqtt_indices),
        "devices_contact_id": n_cid,
        "devices_phone": n_phone,
        "responders": responders,
        "responders_on_duty": sum(1 for r in responder_rows if r[5] == "true"),
        "responders_grid_leader": n_grid,
        "responders_community_worker": n_workers,
        "responders_supervisor": n_supervisors,
        "facilities": total_facilities,
        "facilities_hospital": n_hospitals,
        "facilities_clinic": n_communities,
    }


def generate_district(out: Path, *, city: bool = False, seed: int = 2026) -> dict[str, int]:
    """The committed sample district (or, with ``city``, the 100k-elder city) into ``out``."""
    preset = CITY if city else DISTRICT
    return generate(out, elders=preset.elders, responders=preset.responders, seed=seed,
                    width_km=preset.width_km, height_km=preset.height_km,
                    area_name=preset.area_name)


# ---- the map: district outline, community cells, grid cells

Point = tuple[float, float]  # metres east, north of the centre


def _clip(ring: Sequence[Point], a: float, b: float, c: float) -> list[Point]:
    """The part of a convex ring where ``a*x + b*y <= c`` (Sutherland-Hodgman, one edge).

    The ring is open (first vertex not repeated) and keeps its orientation."""
    out: list[Point] = []
    for i, p in enumerate(ring):
        q = ring[(i + 1) % len(ring)]
        fp, fq = a * p[0] + b * p[1] - c, a * q[0] + b * q[1] - c
        if fp <= 0:
            out.append(p)
        if (fp < 0 < fq) or (fq < 0 < fp):
            t = fp / (fp - fq)
            out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def _ring_area(ring: Sequence[Point]) -> float:
    """Signed area (shoelace): positive for a counter-clockwise ring."""
    return 0.5 * sum(p[0] * q[1] - q[0] * p[1]
                     for p, q in zip(ring, [*ring[1:], ring[0]], strict=True))


def _rectangle(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]  # counter-clockwise


def community_cells(area: Area, communities: Sequence[Community]) -> list[list[Point]]:
    """The Voronoi cell of each community centre, clipped to the area (open rings, metres).

    Every point of a cell is at least as close to its own centre as to any other, so
    the cells partition the area and each centre lies inside its own cell. Each cell is
    the area's rectangle cut by one half-plane per other centre: O(n²) clips, a few
    hundred milliseconds for the city's 200 communities."""
    half_w, half_h = area.width_km * 500.0, area.height_km * 500.0
    cells: list[list[Point]] = []
    for own in communities:
        ring = _rectangle(-half_w, -half_h, half_w, half_h)
        for other in communities:
            if other is own:
                continue
            # Keep the side of the perpendicular bisector that holds `own`.
            a, b = other.x_m - own.x_m, other.y_m - own.y_m
            c = (a * (other.x_m + own.x_m) + b * (other.y_m + own.y_m)) / 2.0
            ring = _clip(ring, a, b, c)
        cells.append(ring)
    return cells


def grid_cells(cell: Sequence[Point], split: int = GRID_SPLIT) -> list[list[Point]]:
    """A convex cell cut into the ``split`` x ``split`` parts of its bounding box, north
    to south and west to east; parts that miss the cell are left out."""
    xs, ys = [p[0] for p in cell], [p[1] for p in cell]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    parts: list[list[Point]] = []
    for row in range(split):
        top = y1 - (y1 - y0) * row / split
        bottom = y1 - (y1 - y0) * (row + 1) / split
        for col in range(split):
            left = x0 + (x1 - x0) * col / split
            right = x0 + (x1 - x0) * (col + 1) / split
            part = _rectangle(left, bottom, right, top)
            # Clip by every edge of the (counter-clockwise, convex) cell: keep the left side.
            for i, p in enumerate(cell):
                q = cell[(i + 1) % len(cell)]
                a, b = q[1] - p[1], p[0] - q[0]
                part = _clip(part, a, b, a * p[0] + b * p[1])
                if not part:
                    break
            if len(part) >= 3 and _ring_area(part) > 1.0:  # m²: empty, or a rounding sliver
                parts.append(part)
    return parts


def _geo_ring(area: Area, ring: Sequence[Point]) -> list[list[float]]:
    """A closed GeoJSON ring in lon/lat, six decimals, without repeated vertices."""
    out: list[list[float]] = []
    for x, y in ring:
        lon, lat = area.at(x, y)
        point = [round(lon, 6), round(lat, 6)]
        if not out or out[-1] != point:
            out.append(point)
    if len(out) > 1 and out[0] == out[-1]:
        out.pop()
    return [*out, out[0]]


def _polygon(area: Area, ring: Sequence[Point], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "properties": properties,
            "geometry": {"type": "Polygon", "coordinates": [_geo_ring(area, ring)]}}


def district_map(area: Area, area_name: str, communities: Sequence[Community],
                 leaders: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The GeoJSON FeatureCollection (RFC 7946: lon/lat, counter-clockwise outer rings)
    of the district's outline, its communities and their grid cells.

    Features, in this order, by ``properties.kind``:

    * ``district``: the area's rectangle; ``name`` is the area's name (垦利区).
    * ``community``: one per community, its cell of the Voronoi partition of the area
      by the community centres; ``name``, and ``centre`` ([lon, lat], for a label).
    * ``grid``: each community cell cut in up to 2 x 2 grid cells; ``community``,
      ``name`` (胜利社区第1网格) and ``leader``, the ``responder_id`` of one of the
      community's grid leaders (taken in turn), or null if it has none.

    Derived from the community centres only, without drawing from the random
    generator: adding the map did not change a byte of the CSV files."""
    half_w, half_h = area.width_km * 500.0, area.height_km * 500.0
    features = [_polygon(area, _rectangle(-half_w, -half_h, half_w, half_h),
                         {"kind": "district", "name": area_name})]
    cells = community_cells(area, communities)
    for community, cell in zip(communities, cells, strict=True):
        lon, lat = area.at(community.x_m, community.y_m)
        features.append(_polygon(area, cell, {
            "kind": "community", "name": community.name,
            "centre": [round(lon, 6), round(lat, 6)],
        }))
    for community, cell in zip(communities, cells, strict=True):
        own = leaders.get(community.name, ())
        for n, part in enumerate(grid_cells(cell), 1):
            features.append(_polygon(area, part, {
                "kind": "grid", "community": community.name,
                "name": f"{community.name}第{n}网格",
                "leader": own[(n - 1) % len(own)] if own else None,
            }))
    return {"type": "FeatureCollection", "features": features}


def _write_geojson(path: Path, collection: Mapping[str, Any]) -> None:
    # UTF-8 names as they are, one line, "\n" at the end: stable bytes like the CSV files.
    with path.open("w", encoding="utf-8", newline="") as f:
        json.dump(collection, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    # "\n" line ends and no BOM: stable bytes in git on every platform.
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="directory for the CSV files and "
                        f"{MAP_FILE}")
    parser.add_argument("--elders", type=int, help=f"default {DISTRICT.elders} ({CITY.elders} "
                        "with --city)")
    parser.add_argument("--responders", type=int, help=f"default {DISTRICT.responders} "
                        f"({CITY.responders} with --city)")
    parser.add_argument("--seed", type=int, default=2026, help="random seed (default 2026)")
    parser.add_argument("--city", action="store_true",
                        help=f"city preset: {CITY.width_km:g} x {CITY.height_km:g} km")
    args = parser.parse_args(argv)
    preset = CITY if args.city else DISTRICT
    try:
        counts = generate(
            args.out,
            elders=args.elders if args.elders is not None else preset.elders,
            responders=args.responders if args.responders is not None else preset.responders,
            seed=args.seed,
            width_km=preset.width_km,
            height_km=preset.height_km,
            area_name=preset.area_name,
        )
    except GenerationError as exc:
        print(f"gateway.district: {exc}", file=sys.stderr)
        return 2
    bbox = Area(preset.width_km, preset.height_km).bbox
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    print("service area bbox: [" + ", ".join(f"{v:.4f}" for v in bbox) + "]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
