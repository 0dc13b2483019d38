"""Test helpers (not fixtures): a private Mosquitto, ptys, a gateway config factory, waiting.

Fixtures live in ``conftest.py``; tests import helpers from here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import Config, Secrets, parse_config
from gateway.daemon import Gateway
from gateway.model import Device
from gateway.registry import load_registry
from gateway.sandbox.pty_device import PtyDevice
from gateway.sandbox.twilio_double import TwilioDouble
from tests.support.ports import free_port, wait_port
from tests.support.procs import end_process

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "config" / "sample"


def z2m_devices(n: int) -> list[Device]:
    """The first ``n`` Zigbee2MQTT buttons of the sample district."""
    registry = load_registry(SAMPLE)
    found = sorted((d for d in registry.devices.values()
                    if d.address.startswith("zigbee2mqtt/")), key=lambda d: d.device_id)
    return found[:n]


@dataclass
class Mosquitto:
    """A private broker: ephemeral port, persistence in tmp, no silent drops."""

    workdir: Path
    extra_conf: str = ""
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"

    @property
    def conf(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            ("user root\n" if os.geteuid() == 0 else "")  # else it drops to "mosquitto",
            # which cannot write its persistence file into pytest's 0700 tmp folders
            + f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 100\n"
            "set_tcp_nodelay true\n" + self.extra_conf,
            encoding="utf-8",
        )
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


Pty = PtyDevice


def open_pty() -> Pty:
    return PtyDevice()


def gateway_config(tmp_path: Path, twilio: TwilioDouble, **sections: Any) -> Config:
    """A gateway config for tests: sample registry, tmp state, the double, fast timings."""
    data: dict[str, Any] = {
        "gateway": {
            "name": "test",
            "state_dir": str(tmp_path / "state"),
            "dedupe_window_s": 60,
            "shutdown_timeout_s": 5,
            "journal_synchronous": "NORMAL",
        },
        "registry": {"directory": str(SAMPLE)},
        "mqtt": {"enabled": False, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.5},
        "alert": {
            "backend": "file",
            "output_dir": str(tmp_path / "alerts"),
            "repeat_interval_s": 0.2,
        },
        "sms": {
            "from_number": "+15005550006",
            "base_url": twilio.base_url,
            "request_timeout_s": 2,
            "max_attempts": 3,
        },
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            data[name] = {**data.get(name, {}), **values}
        else:
            data[name] = values
    return parse_config(data, tmp_path / "test.toml")


def secrets_for(twilio: TwilioDouble) -> Secrets:
    return Secrets(twilio.account_sid, twilio.auth_token, None)


@contextlib.asynccontextmanager
async def running(gw: Gateway) -> AsyncIterator[Gateway]:
    """Run a gateway in this loop until the block exits."""
    task = asyncio.create_task(gw.run(), name="gateway-under-test")
    ready = asyncio.ensure_future(gw.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()
    assert ready in done, "gateway did not become ready"
    try:
        yield gw
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 20)


async def eventually(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def control(gw: Gateway, method: str, path: str,
                  json: dict[str, Any] | None = None, *, tcp: bool = False,
                  headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """Call the running gateway's control API as an operator's tool would: (status, body),
    the body decoded from JSON, or text for other answers (``/metrics``).

    Over its unix socket (as ``gateway ack`` does), or with ``tcp=True`` over its TCP
    listener with the gateway's own bearer token. Tests go through this helper, so
    that the API's transport and credentials are decided in one place."""
    import aiohttp

    assert gw.control is not None, "gateway not running"
    sent = dict(headers or {})
    if tcp:
        assert gw.control.url, "the gateway has no TCP control listener (control.port)"
        assert gw.secrets.control_token, "the gateway has no control token"
        sent.setdefault("Authorization", f"Bearer {gw.secrets.control_token}")
        base, connector = gw.control.url, None
    else:
        base = "http://localhost"
        connector = aiohttp.UnixConnector(path=str(gw.control.socket_path))
    async with aiohttp.ClientSession(connector=connector) as http, http.request(
            method, f"{base}{path}", json=json, headers=sent) as r:
        # JSON answers decoded; /metrics (Prometheus text) and plain errors as text.
        if r.content_length == 0:
            return r.status, None
        if r.content_type == "application/json":
            return r.status, await r.json()
        return r.status, await r.text()
