"""Serial transport: a Sur-Gard receiver's automation port or a caller-ID modem.

Thin by design: it opens the port, moves bytes into the (pure) decoder, hands each
decoded event to the gateway and answers the receiver. A Sur-Gard message is
ACKed only after every event in it is journaled, NAKed when malformed, and left
unanswered when the journal failed (``CommitFailed``: the receiver resends it). A
handler bug is reported (``sink.crashed``), the frame journaled as rejected and
ACKed, so one poison frame cannot hold back every later alarm. On unplug or any
read error the port is closed and reopened with capped, jittered backoff, forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, Protocol

import serial
import structlog
from serial_asyncio_fast import open_serial_connection

from devices.backoff import Backoff
from devices.events import DeviceProtocolError, Frame
from devices.links import CommitFailed, EventSink, LinkState
from devices.surgard import ACK, NAK

log = structlog.get_logger(__name__)

READ_CHUNK = 4096


class StreamDecoder(Protocol):
    def feed(self, data: bytes) -> list[Frame]: ...


class SerialLink:
    """Owns one serial port for the life of the gateway."""

    def __init__(
        self,
        *,
        name: str,
        url: str,
        protocol: Literal["surgard", "callerid"],
        decoder_factory: Callable[[], StreamDecoder],
        sink: EventSink,
        baudrate: int = 9600,
        init_commands: Sequence[str] = (),
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        on_state: Callable[[bool], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.source = f"serial:{name}"
        self._url = url
        self._protocol = protocol
        self._decoder_factory = decoder_factory
        self._sink = sink
        self._baudrate = baudrate
        self._init = tuple(init_commands)
        self._backoff = Backoff(reconnect_initial_s, reconnect_max_s, rng)
        self._state = LinkState(on_state)
        self._sleep = sleep
        self.connected = self._state.connected
        self.frames = 0
        self.reconnects = 0
        self.crashes = 0

    async def run(self) -> None:
        """Serve the port until cancelled, reopening it whenever it fails."""
        bound = log.bind(channel=self.source, port=self._url)
        while True:
            try:
                reader, writer = await open_serial_connection(
                    url=self._url, baudrate=self._baudrate, exclusive=True)
            except (serial.SerialException, OSError, ValueError) as exc:
                delay = self._backoff.next_delay()
                bound.warning("serial.open_failed", error=str(exc), retry_in_s=round(delay, 2))
                await self._sleep(delay)
                continue
            bound.info("serial.connected", reconnects=self.reconnects)
            self._backoff.reset()
            self._state.set(True)
            try:
                await self._serve(reader, writer)
                bound.warning("serial.closed", reason="end of stream")
                self._state.set(False)
            except (serial.SerialException, OSError) as exc:
                bound.warning("serial.disconnected", error=str(exc))
                self._state.set(False)
            except asyncio.CancelledError:
                self._state.set(False, notify=False)  # our own shutdown: not a failure
                raise
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            self.reconnects += 1
            delay = self._backoff.next_delay()
            bound.info("serial.reconnecting", retry_in_s=round(delay, 2))
            await self._sleep(delay)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = self._decoder_factory()  # fresh state: never glue bytes across a replug
        for command in self._init:
            writer.write(command.encode("ascii") + b"\r")
            await writer.drain()
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                return
            received = time.monotonic()
            for frame in decoder.feed(data):
                await self._frame(frame, writer, received)

    async def _frame(self, frame: Frame, writer: asyncio.StreamWriter,
                     received: float) -> None:
        self.frames += 1
        answer = self._protocol == "surgard"
        try:
            if frame.error is not None:
                await self._reject(frame.error)
                if answer:
                    writer.write(NAK)
                    await writer.drain()
                return
            for event in frame.events:
                try:
                    await self._sink.handle(event, self.source, received=received)
                except CommitFailed as exc:  # no ACK: the receiver resends
                    log.error("serial.not_acknowledged", channel=self.source,
                              error=exc.reason, kind=event.kind.value)
                    return
        except (serial.SerialException, OSError, asyncio.CancelledError):
            raise  # the port failed (reopened by run) or we are stopping
        except Exception as exc:  # noqa: BLE001 - a handler bug, see _crashed
            await self._crashed(frame, exc)
        if answer:
            writer.write(ACK)
            await writer.drain()

    async def _reject(self, error: DeviceProtocolError) -> None:
        try:
            await self._sink.reject(self.source, error)
        except CommitFailed as exc:
            # NAK anyway: the receiver resends the frame, which is rejected again and
            # journaled once the journal takes writes again.
            log.error("serial.reject_not_journaled", channel=self.source, error=exc.reason)

    async def _crashed(self, frame: Frame, exc: Exception) -> None:
        """A handler bug: report it (notice, health red), journal the frame, ACK it.

        Left unanswered, the receiver would resend the same frame forever and every
        later alarm would queue behind it."""
        self.crashes += 1
        log.error("serial.handler_crashed", channel=self.source, error=repr(exc),
                  action="journaled as rejected and acknowledged")
        try:
            self._sink.crashed(self.source, "handling a frame", frame.raw, exc)
        except Exception:  # the sink promised not to raise; the port must go on anyway
            log.exception("serial.crash_report_failed", channel=self.source)
        error = DeviceProtocolError(f"handler crashed: {exc!r}", frame.raw)
        try:
            await self._sink.reject(self.source, error)
        except CommitFailed as failed:  # acknowledged anyway: health is already red
            log.error("serial.reject_not_journaled", channel=self.source, error=failed.reason)
        except (serial.SerialException, OSError, asyncio.CancelledError):
            raise
        except Exception:  # acknowledged anyway: health is already red
            log.exception("serial.reject_crashed", channel=self.source)
