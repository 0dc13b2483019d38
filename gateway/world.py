"""The current world: the registry and the geo indexes built from it, swapped as one.

Intake, dispatch, supervision and the responder-command handlers read what they need
from one :class:`WorldRef` that the lifecycle owns and a reload swaps. They never call
back up into the daemon. An alarm in flight keeps the :class:`World` it started with
(objects are immutable once built); the next read sees the new one.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.geo import GeoService
from gateway.model import Registry


@dataclass(frozen=True, slots=True)
class World:
    registry: Registry
    geo: GeoService


class WorldRef:
    """A reference to the current :class:`World`, swapped atomically on the loop thread."""

    __slots__ = ("_world",)

    def __init__(self, world: World) -> None:
        self._world = world

    @property
    def current(self) -> World:
        return self._world

    @property
    def registry(self) -> Registry:
        return self._world.registry

    @property
    def geo(self) -> GeoService:
        return self._world.geo

    def swap(self, world: World) -> World:
        """Put ``world`` in use; returns the one it replaced."""
        old, self._world = self._world, world
        return old
