"""The serial link's answers to a Sur-Gard receiver when the sink fails (issue 9).

A real pty, the real SerialLink and decoder; the gateway is a small recording sink."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from structlog.testing import capture_logs

from devices.events import DeviceEvent, DeviceProtocolError, Qualifier
from devices.links import CommitFailed
from devices.serial_link import SerialLink
from devices.surgard import ACK, NAK, SurGardDecoder, encode_mlr2
from tests.helpers import Pty, eventually

pytestmark = pytest.mark.integration

PRESS = encode_mlr2("01", "1", "1234", Qualifier.NEW, "101")


@dataclass
class Sink:
    handle_error: BaseException | None = None
    reject_error: BaseException | None = None
    handled: list[DeviceEvent] = field(default_factory=list)
    rejected: list[DeviceProtocolError] = field(default_factory=list)
    crashes: list[tuple[str, bytes, BaseException]] = field(default_factory=list)
    attempts: int = 0

    async def handle(self, event: DeviceEvent, source: str, *,
                     received: float | None = None) -> None:
        self.attempts += 1
        if self.handle_error is not None:
            raise self.handle_error
        self.handled.append(event)

    async def command(self, command: object, source: str) -> None:
        raise AssertionError("a serial link sends no commands")

    async def reject(self, source: str, error: DeviceProtocolError) -> None:
        if self.reject_error is not None:
            raise self.reject_error
        self.rejected.append(error)

    def crashed(self, source: str, detail: str, raw: bytes, error: BaseException) -> None:
        self.crashes.append((source, raw, error))


@contextlib.asynccontextmanager
async def serving(pty: Pty, sink: Sink) -> AsyncIterator[SerialLink]:
    link = SerialLink(name="rx", url=pty.path, protocol="surgard",
                      decoder_factory=SurGardDecoder, sink=sink)  # type: ignore[arg-type]
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.connected.wait(), 10)
        yield link
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def nothing_written(pty: Pty) -> bool:
    try:
        return os.read(pty.master, 64) == b""
    except BlockingIOError:
        return True


async def test_a_failed_commit_is_not_acknowledged_and_the_resend_is(pty: Pty) -> None:
    sink = Sink(handle_error=CommitFailed("database or disk is full"))
    with capture_logs() as logs:
        async with serving(pty, sink):
            pty.write(PRESS)
            # The link has decided about this frame (logged after the failed commit).
            await eventually(lambda: any(e["event"] == "serial.not_acknowledged"
                                         for e in logs))
            assert nothing_written(pty)
            sink.handle_error = None
            assert await pty.send(PRESS) == ACK  # the receiver's resend
    assert len(sink.handled) == 1 and sink.attempts == 2
    assert next(e for e in logs if e["event"] == "serial.not_acknowledged")["error"] == \
        "database or disk is full"


async def test_a_crashing_handler_is_reported_journaled_and_acked(pty: Pty) -> None:
    """Left unanswered, the receiver would resend the frame forever and every later
    alarm would queue behind it."""
    sink = Sink(handle_error=RuntimeError("bug in the press path"))
    async with serving(pty, sink) as link:
        assert await pty.send(PRESS) == ACK
        assert link.crashes == 1
    [(source, raw, error)] = sink.crashes
    assert source == "serial:rx" and raw == PRESS and isinstance(error, RuntimeError)
    [rejected] = sink.rejected
    assert rejected.raw == PRESS
    assert rejected.reason == "handler crashed: RuntimeError('bug in the press path')"


async def test_a_malformed_frame_is_naked_even_when_it_cannot_be_journaled(pty: Pty) -> None:
    sink = Sink(reject_error=CommitFailed("database or disk is full"))
    async with serving(pty, sink):
        assert await pty.send(b"garbage\x14") == NAK
        sink.reject_error = None
        assert await pty.send(b"garbage\x14") == NAK
    assert [e.raw for e in sink.rejected] == [b"garbage\x14"]
