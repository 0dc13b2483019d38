"""Fault injection for the Twilio double: test-only, never shipped with the package.

:class:`FaultyTwilioDouble` is :class:`gateway.sandbox.twilio_double.TwilioDouble`
plus the misbehaviours the gateway's retry, reconciliation and outage handling
are tested against. It plugs in through the double's one request hook
(``TwilioDouble._intercept``), so the double that ``gateway demo`` runs has no
way to misbehave. The public fault API, also what a process wrapper (the chaos
suite's) builds on:

* :class:`Fault` values, built with its class methods (``Fault.status(429,
  retry_after=2)``, ``Fault.error(code=21211)``, ``Fault.delay(s)``,
  ``Fault.hang_after_receive(s)``, ``Fault.drop_after_receive()``);
* :meth:`FaultyTwilioDouble.inject` queues them, each for one request of a
  :data:`FaultTarget` (``create`` by default, ``list`` or ``fetch`` of
  Messages; ``call_create``, ``call_list`` or ``call_fetch`` of Calls),
  optionally only for requests concerning one number;
  :attr:`~FaultyTwilioDouble.pending_faults` counts those not consumed yet;
* :meth:`FaultyTwilioDouble.outage` starts or ends a whole outage: every
  request answered 503, or the listening socket closed (connection refused).

Faults apply to authenticated requests only, as Twilio checks credentials
first; an outage applies to every request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog
from aiohttp import web

from gateway.sandbox.twilio_common import CREATE_TARGETS
from gateway.sandbox.twilio_double import ApiCall, ApiTarget, TwilioDouble, error_response

__all__ = ["Fault", "FaultKind", "FaultTarget", "FaultyTwilioDouble"]

log = structlog.get_logger(__name__)

FaultKind = Literal["status", "delay", "drop", "error", "hang"]
#: Which requests a queued fault applies to: message creation (the default),
#: the Messages list, or fetching one message; ``call_create``, ``call_list``
#: and ``call_fetch`` are the same for Calls.
FaultTarget = ApiTarget

_DEFAULT_CODE_FOR_STATUS: Final[Mapping[int, int]] = {
    429: 20429,
    500: 20500,
    502: 20502,
    503: 20503,
}


@dataclass(frozen=True, slots=True)
class Fault:
    """A misbehaviour applied to exactly one request (a message create unless
    queued for another target, see :meth:`FaultyTwilioDouble.inject`). What a
    class method says of a message holds for a call on the ``call_*`` targets.

    Build them with the class methods.
    """

    kind: FaultKind
    http_status: int = 0
    code: int | None = None
    retry_after: float | str | None = None
    seconds: float = 0.0

    @classmethod
    def status(
        cls, http_status: int, *, code: int | None = None, retry_after: float | str | None = None
    ) -> Fault:
        """Answer ``http_status`` with a Twilio error body; the message is not created.

        ``retry_after`` adds a ``Retry-After`` header: seconds, or a string sent
        verbatim (e.g. an HTTP date).
        """
        return cls(
            "status",
            http_status=http_status,
            code=code if code is not None else _DEFAULT_CODE_FOR_STATUS.get(http_status),
            retry_after=retry_after,
        )

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Hold the request ``seconds`` before handling it normally."""
        return cls("delay", seconds=seconds)

    @classmethod
    def hang_after_receive(cls, seconds: float) -> Fault:
        """Create the message, then hold the answer ``seconds``: Twilio has the message
        but the client does not know yet (the window a crash leaves unknown).
        On a list or fetch: the same as :meth:`delay`."""
        return cls("hang", seconds=seconds)

    @classmethod
    def drop_after_receive(cls) -> Fault:
        """Create the message, then close the connection without answering
        (on a list or fetch: close it without answering)."""
        return cls("drop")

    @classmethod
    def error(cls, *, code: int, status: int = 400) -> Fault:
        """Answer a Twilio API error such as 21211, 21610 or 21408; nothing is created."""
        return cls("error", http_status=status, code=code)


@dataclass(frozen=True, slots=True)
class _QueuedFault:
    fault: Fault
    to: str | None
    target: FaultTarget


class FaultyTwilioDouble(TwilioDouble):
    """The Twilio double with injectable faults and outages (see the module doc).

    Takes the same arguments as :class:`TwilioDouble`; without faults queued
    and no outage it behaves exactly like it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._faults: list[_QueuedFault] = []
        self._outage: Literal["503", "refuse"] | None = None

    def inject(self, *faults: Fault, to: str | None = None, target: FaultTarget = "create") -> None:
        """Queue faults (FIFO per target). Each is consumed by one request of
        ``target`` (message create by default; ``list``, ``fetch``, or a
        ``call_*`` target), only by one concerning ``to`` when given (the ``To``
        field or filter, or the fetched message's or call's recipient)."""
        self._faults.extend(_QueuedFault(f, to, target) for f in faults)

    @property
    def pending_faults(self) -> int:
        """Faults not consumed yet."""
        return len(self._faults)

    async def outage(self, on: bool, *, refuse: bool = False) -> None:
        """Start or end an outage.

        By default every request is answered 503 (error 20503). With
        ``refuse=True`` the listening socket is closed and open connections are
        cut, so clients see "connection refused" until the outage ends (the same
        port is bound again).
        """
        refusing = self._outage == "refuse"
        if on and refuse:
            if not refusing:
                if self._site is not None:
                    await self._site.stop()
                    self._site = None
                if self._runner is not None and self._runner.server is not None:
                    for connection in self._runner.server.connections:
                        connection.force_close()
        elif refusing and self._runner is not None:
            # Leaving the refusing mode (ending the outage or switching to 503s).
            await self._bind(self.port)
        self._outage = ("refuse" if refuse else "503") if on else None
        log.info("twilio_double.outage", on=on, refuse=refuse)

    # -- the request hook ---------------------------------------------------------------

    async def _intercept(
        self, call: ApiCall, proceed: Callable[[], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse | None:
        if self._outage == "refuse":
            # A keep-alive connection that outlived the listening socket.
            return None
        if self._outage == "503":
            return error_response(20503, 503)
        fault = self._take(call) if call.authorized else None
        if fault is None:
            return await proceed()
        log.info("twilio_double.fault", kind=fault.kind, status=fault.http_status,
                 target=call.target)
        if fault.kind in ("status", "error"):
            return self._answer(fault, call.to)
        creates = call.target in CREATE_TARGETS
        if fault.kind == "drop":
            if not creates:
                return None
            created = await proceed()
            # A message (or call) Twilio refused (400) was never created: nothing to lose.
            return None if created.status == 201 else created
        if fault.kind == "hang" and creates:
            created = await proceed()
            if created.status == 201 and not await self._hold(fault.seconds):
                return None
            return created
        # A delay (or a hang on a list or fetch): hold, then answer normally.
        if not await self._hold(fault.seconds):
            return None
        return await proceed()

    def _take(self, call: ApiCall) -> Fault | None:
        for position, queued in enumerate(self._faults):
            if queued.target == call.target and queued.to in (None, call.to):
                del self._faults[position]
                return queued.fault
        return None

    @staticmethod
    def _answer(fault: Fault, to: str | None) -> web.Response:
        code = fault.code if fault.code is not None else fault.http_status
        if fault.kind == "error":
            return error_response(code, fault.http_status, to=to or "")
        headers: dict[str, str] | None = None
        if isinstance(fault.retry_after, str):
            headers = {"Retry-After": fault.retry_after}
        elif fault.retry_after is not None:
            headers = {"Retry-After": f"{fault.retry_after:g}"}
        return error_response(code, fault.http_status, headers=headers)

    async def _hold(self, seconds: float) -> bool:
        """Wait ``seconds``; False when the double stopped meanwhile (the held
        request is then dropped, so that stopping never waits for it)."""
        closing = self._started(self._closing)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), seconds)
        return not closing.is_set()
