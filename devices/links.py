"""What a transport needs from the gateway: one sink for events, commands and bad input.

The contract every transport relies on:

* each ``async`` method returns only once what it was given is committed to the
  journal (and, for a command, its effect applied); only then does the transport
  acknowledge the device or the broker;
* :class:`CommitFailed` means "not committed, try again later": the transport keeps
  the message and does not acknowledge it (a Sur-Gard receiver resends; the MQTT
  link retries the call itself, because MQTT 3.1.1 redelivers only on reconnect);
* any other exception is a bug in the gateway: the transport reports it through
  :meth:`EventSink.crashed`, journals the message as rejected and acknowledges it,
  so that one poison message can never stall intake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from devices.events import DeviceEvent, DeviceProtocolError
from devices.responder_app import ResponderCommand


class CommitFailed(Exception):
    """The sink could not commit (journal full or unwritable); the message is kept.

    ``reason`` says why, for the transport's log line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EventSink(Protocol):
    async def handle(self, event: DeviceEvent, source: str, *,
                     received: float | None = None) -> None:
        """Journal the event; return only after the commit.

        ``received`` is ``time.monotonic()`` when the transport got the bytes, so that
        latencies include any queueing in front of the gateway.

        Raises :class:`CommitFailed` when the journal could not commit."""

    async def command(self, command: ResponderCommand, source: str) -> None:
        """Apply a responder-app command; return after its effect is applied and committed.

        Raises :class:`CommitFailed` when the journal could not commit."""

    async def reject(self, source: str, error: DeviceProtocolError) -> None:
        """Journal malformed input. Raises :class:`CommitFailed` if that could not be
        committed."""

    def crashed(self, source: str, detail: str, raw: bytes, error: BaseException) -> None:
        """A handler failed with ``error`` (a bug) on ``raw``: raise an operator notice and
        turn health red. Synchronous, and never raises."""


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
