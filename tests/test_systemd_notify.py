"""sd_notify: READY=1 once the gateway can take alarms, WATCHDOG=1 from the loop, STOPPING=1."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from gateway import systemd
from gateway.daemon import Gateway
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import eventually, gateway_config, running, secrets_for


def test_no_notify_socket_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval_s() is None  # meant for another process


@pytest.mark.integration
async def test_gateway_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, twilio: TwilioDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    received: list[str] = []
    loop = asyncio.get_running_loop()
    loop.add_reader(sock, lambda: received.append(sock.recv(256).decode()))
    try:
        gw = Gateway(gateway_config(tmp_path, twilio), secrets_for(twilio))
        async with running(gw):
            await eventually(lambda: "READY=1" in received)
            await eventually(lambda: received.count("WATCHDOG=1") >= 3)
        await eventually(lambda: "STOPPING=1" in received)
    finally:
        loop.remove_reader(sock)
        sock.close()
