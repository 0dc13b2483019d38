"""A call tree survives SIGKILL (issue 12): the gateway runs as deployed (``gateway run``
in its own process, config file, credentials from env), is killed while the tree's second
call rings, and the restarted gateway goes on from there without calling anyone twice."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.config import load_config
from gateway.registry import load_registry
from gateway.world import load_world
from tests.helpers import SAMPLE, Pty, eventually
from tests.support.ports import free_port
from tests.support.twilio_faults import FaultyTwilioDouble

REGISTRY = load_registry(SAMPLE)
DEVICE = sorted((d for d in REGISTRY.devices.values() if d.scheme == "contact_id"),
                key=lambda d: d.device_id)[0]


def _toml(tmp_path: Path, twilio: FaultyTwilioDouble, pty: Pty, port: int) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(f"""\
[gateway]
name = "kill"
state_dir = "{tmp_path / 'state'}"
shutdown_timeout_s = 5
[registry]
directory = "{SAMPLE}"
[mqtt]
enabled = false
[[serial]]
name = "rx"
port = "{pty.path}"
protocol = "surgard"
reconnect_initial_s = 0.05
[alert]
backend = "none"
[sms]
from_number = "+15005550006"
base_url = "{twilio.base_url}"
public_url = "http://127.0.0.1:{port}"
request_timeout_s = 2
[webhooks]
port = {port}
[voice]
enabled = true
[[escalation.waves]]
after_s = 0
staff = 3
channels = {{ staff = "both" }}
""", encoding="utf-8")
    return path


class Process:
    def __init__(self, config: Path, twilio: FaultyTwilioDouble, log: Path) -> None:
        self._config = config
        self._env = {**os.environ, "TWILIO_ACCOUNT_SID": twilio.account_sid,
                     "TWILIO_AUTH_TOKEN": twilio.auth_token}
        self._log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with self._log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", "--config", str(self._config)],
                env=self._env, stdout=out, stderr=subprocess.STDOUT)

    async def ready(self, timeout: float = 30) -> None:
        async def up() -> bool:  # this start's READY, not an earlier one's
            return self._log.read_bytes().count(b'"gateway.ready"') >= self.starts
        await eventually(up, timeout=timeout, interval=0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc = None


@pytest.fixture
def gateway_process(tmp_path: Path, twilio: FaultyTwilioDouble, pty: Pty) -> Iterator[Process]:
    process = Process(_toml(tmp_path, twilio, pty, free_port()), twilio, tmp_path / "gw.log")
    try:
        yield process
    finally:
        process.stop()


def _calls(db: Path) -> list[tuple[str, str | None]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return [(state, sid) for state, sid in conn.execute(
            "SELECT state, sid FROM calls ORDER BY position")]


@pytest.mark.integration
async def test_a_call_tree_killed_mid_way_resumes_without_calling_anyone_twice(
    tmp_path: Path, twilio: FaultyTwilioDouble, pty: Pty, gateway_process: Process,
) -> None:
    elder = REGISTRY.elders[DEVICE.elder_id]
    world = load_world(load_config(tmp_path / "gateway.toml"))  # as the gateway will see it
    nearest = [r.phone for r in world.geo.lookup(elder.location, k=3).responders]
    for phone, outcome, digit in zip(nearest, ("busy", "answer", "answer"),
                                     (None, "2", "1"), strict=True):
        twilio.script_callee(phone, outcome, digit=digit)  # type: ignore[arg-type]
    gateway_process.start()
    await gateway_process.ready()
    frame = encode_mlr2("01", "1", DEVICE.address, Qualifier.NEW, "101", "01", "001")
    assert await pty.send(frame, timeout=10) == ACK
    [first] = await twilio.wait_for_calls(1, timeout=15)
    await twilio.advance_call(first.sid)  # busy: the tree calls the next
    await twilio.wait_for_calls(2, timeout=15)
    gateway_process.kill()  # while the second call rings
    gateway_process.start()
    await gateway_process.ready()
    await twilio.advance_call(twilio.calls[1].sid)  # answered, presses 2: next one
    third = (await twilio.wait_for_calls(3, timeout=15))[2]
    await twilio.advance_call(third.sid)  # presses 1: takes the alarm
    db = tmp_path / "state" / "journal.sqlite3"
    await eventually(lambda: [s for s, _ in _calls(db)] == ["busy", "declined", "accepted"],
                     timeout=15)
    assert [c.to for c in twilio.calls] == nearest  # each called once
    assert [sid for _, sid in _calls(db)] == [c.sid for c in twilio.calls]
