"""Geolocation: where the elder lives and who can get there first.

- :mod:`gateway.geo.projection`: lon/lat validation, one metric CRS for the service
  area, geodesic distances and bearings.
- :mod:`gateway.geo.index`: rtree point trees called through libspatialindex directly,
  and the two-tier responder index (base tree + live grid) with its measured costs.
- :mod:`gateway.geo.service`: :class:`GeoService`, what the gateway asks (lookups, live
  positions, duty, counts, carrying live state over a registry reload).
"""

from gateway.geo.projection import DEFAULT_CRS, GeoError, Projector
from gateway.geo.service import GeoResult, GeoService, GeoStats, Nearby

__all__ = [
    "DEFAULT_CRS",
    "GeoError",
    "GeoResult",
    "GeoService",
    "GeoStats",
    "Nearby",
    "Projector",
]
