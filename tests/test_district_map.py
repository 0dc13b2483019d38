"""The district map: the generator's GeoJSON, its loader, its config key, the vendored Leaflet."""

from __future__ import annotations

import csv
import itertools
import json
import random
import re
import tomllib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from gateway import district as gen
from gateway import mapdata
from gateway.config import load_config
from gateway.mapdata import MapDataError, load_district_map

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "config" / "sample"
EXAMPLE = REPO / "config" / "gateway.example.toml"
DISTRICT_BBOX = gen.Area(gen.DISTRICT.width_km, gen.DISTRICT.height_km).bbox
LEAFLET_FILES = (
    "leaflet.js", "leaflet.css", "LICENSE", "VENDORED.md",
    "images/layers.png", "images/layers-2x.png", "images/marker-icon.png",
    "images/marker-icon-2x.png", "images/marker-shadow.png",
)

Ring = Sequence[Sequence[float]]


def inside(point: Sequence[float], ring: Ring) -> bool:
    """Ray casting: is ``point`` strictly inside the closed ``ring``?"""
    x, y = point[0], point[1]
    hit = False
    for (x1, y1), (x2, y2) in itertools.pairwise(ring):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            hit = not hit
    return hit


def within_convex(point: Sequence[float], ring: Ring, eps: float = 2e-6) -> bool:
    """On or inside a convex counter-clockwise ring, give or take ``eps`` (the rounding)."""
    for (x1, y1), (x2, y2) in itertools.pairwise(ring):
        cross = (x2 - x1) * (point[1] - y1) - (y2 - y1) * (point[0] - x1)
        length = ((x2 - x1) ** 2 + (y2 - y1) ** 2) ** 0.5
        if cross < -eps * length:
            return False
    return True


def area(ring: Ring) -> float:
    return 0.5 * sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in itertools.pairwise(ring))


def centroid(ring: Ring) -> tuple[float, float]:
    pts = ring[:-1]
    return sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)


def by_kind(collection: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [f for f in collection["features"] if f["properties"]["kind"] == kind]


def outer(feature: dict[str, Any]) -> Ring:
    ring: Ring = feature["geometry"]["coordinates"][0]
    return ring


def generate(out: Path, *, seed: int = 2026) -> dict[str, int]:
    preset = gen.DISTRICT
    return gen.generate(out, elders=preset.elders, responders=preset.responders, seed=seed,
                        width_km=preset.width_km, height_km=preset.height_km,
                        area_name=preset.area_name)


def write(tmp_path: Path, content: str | bytes | dict[str, Any]) -> Path:
    path = tmp_path / "map.geojson"
    if isinstance(content, dict):
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# The generator


def test_generated_map_partitions_the_district_by_community(tmp_path: Path) -> None:
    counts = generate(tmp_path)
    fc = load_district_map(tmp_path / gen.MAP_FILE, DISTRICT_BBOX)
    [outline] = by_kind(fc, "district")
    assert outline["properties"]["name"] == "垦利区"
    communities = by_kind(fc, "community")
    assert len(communities) == counts["communities"] == 10

    # The centres as the generator lays them out: its first use of the seeded generator.
    area_ = gen.Area(gen.DISTRICT.width_km, gen.DISTRICT.height_km)
    centres = gen.layout_communities(random.Random(2026), area_, counts["communities"])
    assert [f["properties"]["name"] for f in communities] == [c.name for c in centres]
    for own, feature in zip(centres, communities, strict=True):
        point = area_.at(own.x_m, own.y_m)
        assert feature["properties"]["centre"] == pytest.approx(list(point), abs=1e-6)
        holders = [f["properties"]["name"] for f in communities if inside(point, outer(f))]
        assert holders == [own.name]
    for feature in fc["features"]:
        ring = outer(feature)
        assert ring[0] == ring[-1]
        assert area(ring) > 0, "outer rings are counter-clockwise (RFC 7946)"
        assert all(round(v, 6) == v for p in ring for v in p)
    # No gaps, no overlaps: the community cells add up to the district.
    assert sum(area(outer(f)) for f in communities) == pytest.approx(area(outer(outline)),
                                                                     rel=1e-6)


def test_grid_cells_lie_within_their_community_and_have_its_leaders(tmp_path: Path) -> None:
    generate(tmp_path)
    fc = load_district_map(tmp_path / gen.MAP_FILE, DISTRICT_BBOX)
    cell_of = {f["properties"]["name"]: outer(f) for f in by_kind(fc, "community")}
    with (tmp_path / "responders.csv").open(encoding="utf-8", newline="") as f:
        leaders = {(r["responder_id"], r["community"]) for r in csv.DictReader(f)
                   if r["role"] == "grid_leader"}
    grids = by_kind(fc, "grid")
    for community, ring in cell_of.items():
        own = [g for g in grids if g["properties"]["community"] == community]
        assert 1 <= len(own) <= gen.GRID_SPLIT ** 2
        assert [g["properties"]["name"] for g in own] == [
            f"{community}第{n}网格" for n in range(1, len(own) + 1)]
        for g in own:
            assert all(within_convex(p, ring) for p in outer(g))
            assert inside(centroid(outer(g)), ring)
            assert (g["properties"]["leader"], community) in leaders
        # Exact in metres; the rounding to six decimals moves each vertex up to ~5 cm.
        assert sum(area(outer(g)) for g in own) == pytest.approx(area(ring), rel=1e-4)


def test_city_sized_map_keeps_each_centre_in_its_own_cell() -> None:
    # The --city preset's 200 communities, without writing 100,000 elders.
    area_ = gen.Area(gen.CITY.width_km, gen.CITY.height_km)
    centres = gen.layout_communities(random.Random(2026), area_, 200)
    fc = gen.district_map(area_, gen.CITY.area_name, centres, {})
    communities = by_kind(fc, "community")
    for own, feature in zip(centres, communities, strict=True):
        assert inside(area_.at(own.x_m, own.y_m), outer(feature))
    assert all(g["properties"]["leader"] is None for g in by_kind(fc, "grid"))
    assert len(by_kind(fc, "grid")) > 600


def test_map_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    generate(tmp_path / "a", seed=7)
    generate(tmp_path / "b", seed=7)
    generate(tmp_path / "c", seed=8)
    a, b, c = ((tmp_path / d / gen.MAP_FILE).read_bytes() for d in "abc")
    assert a == b
    assert a != c


def test_shipped_sample_map_is_the_default_output_and_loads_with_the_example_bbox(
        tmp_path: Path) -> None:
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / gen.MAP_FILE).read_bytes() == (SAMPLE / gen.MAP_FILE).read_bytes()
    cfg = load_config(EXAMPLE)
    assert cfg.district_map_path == (SAMPLE / "district.geojson").resolve()
    fc = load_district_map(cfg.district_map_path, cfg.model.registry.bbox)
    assert [len(by_kind(fc, k)) for k in ("district", "community", "grid")] == [1, 10, 40]


# ---------------------------------------------------------------------------
# The loader refuses, naming the file


def _collection(*features: dict[str, Any]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}


def _feature(ring: list[list[float]], **props: Any) -> dict[str, Any]:
    return {"type": "Feature", "properties": {"kind": "district", "name": "垦利区", **props},
            "geometry": {"type": "Polygon", "coordinates": [ring]}}


SQUARE = [[118.53, 37.58], [118.57, 37.58], [118.57, 37.60], [118.53, 37.60], [118.53, 37.58]]


@pytest.mark.parametrize(("content", "key", "reason"), [
    ("{\"type\": ", "", "not JSON"),
    (b"\xef\xbb\xbf{\"type\": \"Feature\xff\"}", "", "not valid UTF-8 at byte 20"),
    ("[1, 2]", "", "expected a GeoJSON object"),
    ({"type": "Feature", "geometry": None, "properties": {}}, "type", "FeatureCollection"),
    ({"type": "FeatureCollection"}, "features", "list of features"),
    (_collection(_feature(SQUARE, kind="road")), "features[0].properties.kind", "'road'"),
    (_collection(_feature(SQUARE, name="")), "features[0].properties.name", "non-empty"),
    (_collection({**_feature(SQUARE), "geometry": {"type": "Point",
                                                   "coordinates": [118.55, 37.59]}}),
     "features[0].geometry.type", "'Point'"),
    (_collection(_feature(SQUARE), _feature([*SQUARE[:2], [118.57, 37.9], *SQUARE[3:]])),
     "features[1].geometry.coordinates[0][2]", "outside the service area"),
    (_collection(_feature([[37.58, 118.53], *SQUARE[1:4], [37.58, 118.53]])),
     "features[0].geometry.coordinates[0][0]", "lon/lat swapped?"),
    (_collection(_feature(SQUARE[:4])), "features[0].geometry.coordinates[0]", "not closed"),
    (_collection(_feature(SQUARE[:3])), "features[0].geometry.coordinates[0]", "at least 4"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": '
     '{"kind": "district", "name": "x"}, "geometry": {"type": "Polygon", "coordinates": '
     '[[[NaN, 37.58]]]}}]}', "", "NaN is not a JSON number"),
    (json.dumps(_collection(_feature([[1.5, 37.58], *SQUARE[1:4], [1.5, 37.58]])))
     .replace("1.5", "1e400"), "features[0].geometry.coordinates[0][0]", "not finite"),
    (_collection(_feature(SQUARE, kind="grid")), "features[0].properties.community",
     "needs the name of its community"),
    (_collection(_feature(SQUARE, kind="grid", community="胜利社区")),
     "features[0].properties.community", "not the name of a community feature"),
    ("[" * 100_000 + "]" * 100_000, "", "nested too deeply"),
])
def test_bad_files_are_refused_naming_file_and_feature(
        tmp_path: Path, content: str | bytes | dict[str, Any], key: str, reason: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(MapDataError) as info:
        load_district_map(path, (118.5, 37.5, 118.6, 37.7))
    err = info.value
    assert err.path == str(path)
    assert err.key == key
    assert reason in err.reason
    assert str(err).startswith(f"{path}: ")


def test_too_large_and_missing_files_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.geojson"
    with big.open("wb") as f:
        f.write(b" " * (mapdata.MAX_MAP_BYTES + 1))
    with pytest.raises(MapDataError, match="larger than 20 MB") as info:
        load_district_map(big, None)
    assert info.value.path == str(big)
    missing = tmp_path / "missing.geojson"
    with pytest.raises(MapDataError, match="cannot read") as info:
        load_district_map(missing, None)
    assert info.value.path == str(missing)


def test_multipolygons_and_a_vertex_just_on_the_bbox_edge_load(tmp_path: Path) -> None:
    edge = [[118.5, 37.5], [118.60005, 37.5], [118.6, 37.7], [118.5, 37.7], [118.5, 37.5]]
    feature = {"type": "Feature", "properties": {"kind": "community", "name": "胜利社区"},
               "geometry": {"type": "MultiPolygon", "coordinates": [[SQUARE], [edge]]}}
    path = write(tmp_path, _collection(feature))
    fc = load_district_map(path, (118.5, 37.5, 118.6, 37.7))
    assert fc["features"][0]["properties"]["name"] == "胜利社区"


# ---------------------------------------------------------------------------
# The config key


def test_district_map_path_is_inside_the_registry_directory(tmp_path: Path) -> None:
    base = '[sms]\nfrom_number = "+15005550006"\n[registry]\ndirectory = "reg"\n'
    cfg_file = tmp_path / "gateway.toml"
    cfg_file.write_text(base, encoding="utf-8")
    assert load_config(cfg_file).district_map_path is None
    cfg_file.write_text(base + 'district_map = "maps/kenli.geojson"\n', encoding="utf-8")
    assert load_config(cfg_file).district_map_path == tmp_path.resolve() / "reg/maps/kenli.geojson"
    cfg_file.write_text(base + 'district_map = "/srv/kenli.geojson"\n', encoding="utf-8")
    assert load_config(cfg_file).district_map_path == Path("/srv/kenli.geojson")


# ---------------------------------------------------------------------------
# Vendored Leaflet: in the package, and shipped by the package-data patterns


def test_vendored_leaflet_is_package_data() -> None:
    leaflet = resources.files("gateway.console") / "static" / "vendor" / "leaflet"
    for name in LEAFLET_FILES:
        assert leaflet.joinpath(name).is_file(), name
    assert "Leaflet 1.9.4" in leaflet.joinpath("leaflet.js").read_text(encoding="utf-8")[:200]
    assert "BSD 2-Clause" in leaflet.joinpath("LICENSE").read_text(encoding="utf-8")
    vendored = leaflet.joinpath("VENDORED.md").read_text(encoding="utf-8")
    assert "sha512-" in vendored
    assert "1.9.4" in vendored
    # Every image the stylesheet asks for is here: relative URLs, nothing remote.
    css = leaflet.joinpath("leaflet.css").read_text(encoding="utf-8")
    urls = set(re.findall(r"url\(([^)]*)\)", css)) - {"#default#VML"}
    assert urls == {"images/layers.png", "images/layers-2x.png", "images/marker-icon.png"}
    assert all(leaflet.joinpath(url).is_file() for url in urls)

    # An editable install reads the source tree, so also check the package-data globs
    # that a wheel is built from.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    package = REPO / "gateway"
    shipped = {p.relative_to(package).as_posix()
               for pattern in pyproject["tool"]["setuptools"]["package-data"]["gateway"]
               for p in package.glob(pattern) if p.is_file()}
    assert {f"console/static/vendor/leaflet/{name}" for name in LEAFLET_FILES} <= shipped
