"""The district map: a GeoJSON file of outlines that the console's offline map draws.

``[registry] district_map`` names the file (``gateway.district`` writes one for a
generated district). It holds one FeatureCollection (RFC 7946: longitude first, WGS84)
of Polygon or MultiPolygon features, each with a ``properties.kind``:

* ``district``: the outline of the service area;
* ``community``: one community (社区), ``name`` its name as in the registry;
* ``grid``: one grid cell (网格), ``community`` the community it belongs to and
  optionally ``leader``, the ``responder_id`` of its grid leader.

Every feature needs a non-empty ``name``. The file is read and checked once, like the
config, and every problem is a :class:`MapDataError` that names the file, the feature
and the key. A file that was hand-edited in a GIS tool and then broken is refused
whole: a map that is missing part of the district without saying so is worse than no
map.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

__all__ = ["BBOX_TOLERANCE_DEG", "KINDS", "MAX_MAP_BYTES", "MapDataError", "load_district_map"]

#: The ``properties.kind`` values the console knows how to draw.
KINDS: Final = frozenset({"district", "community", "grid"})
#: Larger files are refused unread. The generated city (200 communities, 800 grid
#: cells) is about 0.3 MB; a browser would struggle long before 20 MB.
MAX_MAP_BYTES: Final = 20 * 1024 * 1024
#: How far (degrees, about 11 m) a vertex may lie outside ``[registry] bbox``. An
#: outline drawn along the edge of the service area would otherwise fail because of
#: rounding.
BBOX_TOLERANCE_DEG: Final = 1e-4

_GEOMETRIES: Final = ("Polygon", "MultiPolygon")


class MapDataError(Exception):
    """The district map cannot be used: which file, where in it (``key``), and why."""

    def __init__(self, path: Path | str, reason: str, key: str = "") -> None:
        super().__init__(f"{path}: {key}: {reason}" if key else f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.key = key


def _reject_constant(name: str) -> float:
    # json accepts NaN and Infinity by default; GeoJSON (like JSON) does not.
    raise ValueError(f"{name} is not a JSON number")


def load_district_map(path: Path,
                      bbox: tuple[float, float, float, float] | None = None) -> dict[str, Any]:
    """Read and check the GeoJSON district map at ``path``; return the parsed collection.

    ``bbox`` is the service area ``(min_lon, min_lat, max_lon, max_lat)``: every vertex
    must lie inside it, give or take :data:`BBOX_TOLERANCE_DEG`. Raises
    :class:`MapDataError` for a file that cannot be read, is larger than
    :data:`MAX_MAP_BYTES`, is not UTF-8 JSON, or is not a FeatureCollection as
    described in this module's docstring."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_MAP_BYTES + 1)
    except OSError as exc:
        raise MapDataError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_MAP_BYTES:
        raise MapDataError(path, f"larger than {MAX_MAP_BYTES // (1024 * 1024)} MB")
    try:
        # A byte-order mark is tolerated, as in the registry's CSV files.
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise MapDataError(path, f"not valid UTF-8 at byte {exc.start}") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise MapDataError(path, f"not JSON: {exc.msg} at line {exc.lineno} "
                                 f"column {exc.colno}") from None
    except ValueError as exc:
        raise MapDataError(path, f"not JSON: {exc}") from None
    except RecursionError:
        raise MapDataError(path, "not JSON that can be read: nested too deeply") from None
    return _check_collection(path, data, bbox)


def _check_collection(path: Path, data: Any,
                      bbox: tuple[float, float, float, float] | None) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise MapDataError(path, f"expected a GeoJSON object, found {_json_type(data)}")
    if data.get("type") != "FeatureCollection":
        raise MapDataError(path, f"expected 'FeatureCollection', found {data.get('type')!r}",
                           "type")
    features = data.get("features")
    if not isinstance(features, list):
        raise MapDataError(path, f"expected a list of features, found {_json_type(features)}",
                           "features")
    communities: set[str] = set()
    grids: list[tuple[int, str]] = []
    for i, feature in enumerate(features):
        key = f"features[{i}]"
        kind, name = _check_feature(path, key, feature, bbox)
        if kind == "community":
            communities.add(name)
        elif kind == "grid":
            grids.append((i, feature["properties"]["community"]))
    for i, community in grids:
        if community not in communities:
            raise MapDataError(path, f"{community!r} is not the name of a community feature "
                                     "in this file", f"features[{i}].properties.community")
    return data


def _check_feature(path: Path, key: str, feature: Any,
                   bbox: tuple[float, float, float, float] | None) -> tuple[str, str]:
    """Check one feature; return its kind and name."""
    if not isinstance(feature, dict):
        raise MapDataError(path, f"expected a Feature object, found {_json_type(feature)}", key)
    if feature.get("type") != "Feature":
        raise MapDataError(path, f"expected 'Feature', found {feature.get('type')!r}",
                           f"{key}.type")
    props = feature.get("properties")
    if not isinstance(props, dict):
        raise MapDataError(path, f"expected an object, found {_json_type(props)}",
                           f"{key}.properties")
    kind = props.get("kind")
    if kind not in KINDS:
        raise MapDataError(path, f"{kind!r} is not one of {', '.join(sorted(KINDS))}",
                           f"{key}.properties.kind")
    name = props.get("name")
    if not isinstance(name, str) or not name.strip():
        raise MapDataError(path, f"expected a non-empty string, found {_json_type(name)}",
                           f"{key}.properties.name")
    if kind == "grid":
        community = props.get("community")
        if not isinstance(community, str) or not community.strip():
            raise MapDataError(path, "a grid cell needs the name of its community, found "
                                     f"{_json_type(community)}", f"{key}.properties.community")
        leader = props.get("leader")
        if leader is not None and not isinstance(leader, str):
            raise MapDataError(path, f"expected a responder_id or null, found "
                                     f"{_json_type(leader)}", f"{key}.properties.leader")
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict):
        raise MapDataError(path, f"expected a Polygon or MultiPolygon, found "
                                 f"{_json_type(geometry)}", f"{key}.geometry")
    gtype = geometry.get("type")
    if gtype not in _GEOMETRIES:
        raise MapDataError(path, f"expected 'Polygon' or 'MultiPolygon', found {gtype!r}",
                           f"{key}.geometry.type")
    coords: Any = geometry.get("coordinates")
    ckey = f"{key}.geometry.coordinates"
    if gtype == "Polygon":
        _check_polygon(path, ckey, coords, bbox)
    else:
        _check_list(path, ckey, coords, 1, "polygons")
        for j, polygon in enumerate(coords):
            _check_polygon(path, f"{ckey}[{j}]", polygon, bbox)
    return kind, name


def _check_list(path: Path, key: str, value: Any, least: int, what: str) -> None:
    if not isinstance(value, list):
        raise MapDataError(path, f"expected a list of {what}, found {_json_type(value)}", key)
    if len(value) < least:
        raise MapDataError(path, f"expected at least {least} {what}, found {len(value)}", key)


def _check_polygon(path: Path, key: str, rings: Any,
                   bbox: tuple[float, float, float, float] | None) -> None:
    _check_list(path, key, rings, 1, "rings")
    for r, ring in enumerate(rings):
        rkey = f"{key}[{r}]"
        _check_list(path, rkey, ring, 4, "positions (a closed ring)")
        for p, position in enumerate(ring):
            _check_position(path, f"{rkey}[{p}]", position, bbox)
        if ring[0] != ring[-1]:
            raise MapDataError(path, "the ring is not closed (its last position must repeat "
                                     "the first)", rkey)


def _check_position(path: Path, key: str, position: Any,
                    bbox: tuple[float, float, float, float] | None) -> None:
    if (not isinstance(position, list) or len(position) not in (2, 3)
            or not all(_is_number(v) for v in position)):
        raise MapDataError(path, f"expected [lon, lat] numbers, found {_short(position)}", key)
    try:
        values = [float(v) for v in position]
    except OverflowError:  # an integer beyond any float
        values = [math.inf]
    if not all(math.isfinite(v) for v in values):
        raise MapDataError(path, f"{_short(position)} is not finite", key)
    lon, lat = values[0], values[1]
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        hint = "; lon/lat swapped?" if -90 <= lon <= 90 and -180 <= lat <= 180 else ""
        raise MapDataError(path, f"{_short(position)} is not [lon, lat] in degrees{hint}", key)
    if bbox is not None and not _inside(lon, lat, bbox):
        raise MapDataError(path, f"{_short(position)} lies outside the service area "
                                 f"[registry] bbox {list(bbox)}", key)


def _inside(lon: float, lat: float, bbox: Sequence[float]) -> bool:
    min_lon, min_lat, max_lon, max_lat = bbox
    tol = BBOX_TOLERANCE_DEG
    return (min_lon - tol <= lon <= max_lon + tol) and (min_lat - tol <= lat <= max_lat + tol)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
