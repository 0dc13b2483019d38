"""The device end of a pseudo-terminal: a simulated receiver or modem for the demo and tests.

The gateway opens ``path`` with pyserial exactly as it opens a USB serial adapter; the
simulator reads and writes the master side. Never a production path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty


class PtyDevice:
    """A pty pair; the gateway opens :attr:`path`, the simulator owns the master."""

    def __init__(self, master: int | None = None, slave: int | None = None,
                 path: str | None = None) -> None:
        """A new pty pair, or (for e.g. a socat link) the given descriptors and path."""
        if master is None or slave is None:
            master, slave = os.openpty()
            tty.setraw(slave)  # no line discipline: bytes pass as they are
        self.master, self.slave = master, slave
        self.path = path or os.ttyname(slave)
        os.set_blocking(self.master, False)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    async def read(self, n: int = 1, timeout: float = 5.0) -> bytes:
        """The next bytes the gateway wrote (at most ``n``)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            with contextlib.suppress(BlockingIOError):
                data = os.read(self.master, n)
                if data and not fut.done():
                    fut.set_result(data)

        loop.add_reader(self.master, readable)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            loop.remove_reader(self.master)

    async def send(self, frame: bytes, timeout: float = 5.0) -> bytes:
        """Write a frame and return the gateway's answer (e.g. ACK)."""
        self.write(frame)
        return await self.read(64, timeout)

    def close(self) -> None:
        """Close both ends: to the gateway this is the cable being pulled."""
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
