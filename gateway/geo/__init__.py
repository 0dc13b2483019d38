"""Geolocation: where the elder lives and who can get there first.

See :mod:`gateway.geo.service` for the theory of operation.
"""

from gateway.geo.service import (
    DEFAULT_CRS,
    POSITION_TOPIC_FILTER,
    GeoError,
    GeoResult,
    GeoService,
    GeoStats,
    Nearby,
    Projector,
    parse_position,
    responder_id_from_topic,
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
