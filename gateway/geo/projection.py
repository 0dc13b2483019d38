"""Coordinates: validation, one metric projection for the service area, geodesics.

Registry and live positions are geographic lon/lat (WGS84 or CGCS2000, EPSG:4490; the
two agree to centimetres). :class:`Projector` projects them once into one metric CRS
for the whole service area (default UTM 50N, EPSG:32650: Kenli sits at ~118.5E, exactly
on the border of the CGCS2000 3-degree Gauss-Kruger zones 39/40, so a zone-per-point
choice would split the district; UTM 50N spans 114-120E). The ``Transformer`` is built
once with ``always_xy=True`` (EPSG:4490 is latitude-first otherwise) and bulk loads use
its array form; pyproj transformers are thread-safe since 3.1, so one projector serves
the loop and a rebuild in a worker thread. Ranking uses projected (planar) distance,
which differs from the geodesic by ~0.02 % here; distances and bearings shown to people
come from ``pyproj.Geod`` (:func:`geodesic_xy`). Every point is range-checked (a swapped
lat/lon shows up as a latitude outside [-90, 90] or a point outside the service area,
and the error says "swapped?") before it can reach an index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
from pyproj import CRS, Geod, Transformer
from pyproj.exceptions import CRSError

from gateway.model import LonLat

DEFAULT_CRS: Final = "EPSG:32650"
"""UTM 50N: one metric CRS for the whole district (see the module docstring)."""

# A bounding box may extend slightly beyond the CRS area of use (UTM is usable a little
# past its zone edge), but not far: the planar distances would stop ranking correctly.
_AREA_MARGIN_DEG: Final = 1.0

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


def is_number(v: object) -> bool:
    """An int or float, but not a bool."""
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
        if len(bbox) != 4 or not all(is_number(v) and math.isfinite(v) for v in bbox):
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
        if not (is_number(lon) and is_number(lat)):
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
        return geodesic_xy(self._geod, a.lon, a.lat, b.lon, b.lat)


def geodesic_xy(
    geod: Geod, lon1: float, lat1: float, lon2: float, lat2: float
) -> tuple[float, float]:
    """Geodesic distance in metres and bearing in [0, 360) from point 1 to point 2.

    No checks: for positions that passed the projector's (registry records, fixes).
    """
    az, _back, dist = geod.inv(lon1, lat1, lon2, lat2)
    return float(dist), _bearing(az, dist)


def _bearing(azimuth: float, dist: float) -> float:
    """A forward azimuth as a bearing in [0, 360); 0 for equal points."""
    if dist == 0.0:
        return 0.0
    bearing = azimuth % 360.0
    # -1e-15 % 360.0 rounds to 360.0, which is outside [0, 360).
    return 0.0 if bearing >= 360.0 else float(bearing)

