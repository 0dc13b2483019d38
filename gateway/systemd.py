"""sd_notify without libsystemd: READY, STOPPING, STATUS and the watchdog ping.

It is one datagram to ``$NOTIFY_SOCKET``; outside systemd every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket

import structlog

log = structlog.get_logger(__name__)


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("systemd.notify_failed", error=str(exc))
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half of ``$WATCHDOG_USEC`` when the watchdog is on for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


async def watchdog_loop(interval_s: float) -> None:
    """Ping from the event loop itself, so a stalled loop is caught by systemd."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)
