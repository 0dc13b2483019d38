"""What a transport needs from the gateway: a sink for events and for bad input."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from devices.events import DeviceEvent, DeviceProtocolError


class EventSink(Protocol):
    async def handle(self, event: DeviceEvent, source: str, *,
                     received: float | None = None) -> None:
        """Journal the event; return only after the commit, raise if it failed.

        ``received`` is ``time.monotonic()`` when the transport got the bytes, so that
        latencies include any queueing in front of the gateway."""

    async def reject(self, source: str, error: DeviceProtocolError) -> None:
        """Record malformed input. Never raises."""


class LinkState:
    """Whether a link is up: an event to await, and a callback for metrics/supervision."""

    def __init__(self, on_state: Callable[[bool], None] | None = None) -> None:
        self.connected = asyncio.Event()
        self._on_state = on_state

    def set(self, up: bool, *, notify: bool = True) -> None:
        if up:
            self.connected.set()
        else:
            self.connected.clear()
        if notify and self._on_state is not None:
            self._on_state(up)
