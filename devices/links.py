"""What a transport needs from the gateway: a sink for events and for bad input."""

from __future__ import annotations

from typing import Protocol

from devices.events import DeviceEvent, DeviceProtocolError


class EventSink(Protocol):
    async def handle(self, event: DeviceEvent, source: str) -> None:
        """Journal the event; return only after the commit, raise if it failed."""

    async def reject(self, source: str, error: DeviceProtocolError) -> None:
        """Record malformed input. Never raises."""
