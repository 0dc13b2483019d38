"""The headline benchmark, as deployed: MQTT press -> first SMS request at the Twilio double.

Usage::

    .venv/bin/python bench/e2e.py --quick          # about 2 minutes, alert off
    .venv/bin/python bench/e2e.py                  # 10, 100, 1000/s, 10,000 storm, alert off+on
    .venv/bin/python bench/e2e.py --alert both     # also: on | off
    .venv/bin/python bench/e2e.py --profile        # cProfile of each gateway run beside the JSON
    .venv/bin/python bench/e2e.py --keep DIR       # keep registries, configs, journals, logs

Prints a table (figure | gateway | peer | ratio) and writes ``bench/results/e2e.json``.
Nothing is asserted.

What runs, each as its own process
----------------------------------
* A private Mosquitto (:class:`tests.helpers.Mosquitto`: ephemeral port, no silent drops,
  ``set_tcp_nodelay true``) with the shipped config/mosquitto.conf's queue and autosave
  settings added.
* The Twilio double (:mod:`gateway.sandbox.twilio_double`, started as bench/sms.py's
  ``--role double``): one for the whole run, its records (arrival time of every
  ``Messages.json`` POST, ``To``, ``Body``) dumped when it stops.
* ``gateway run --config <generated>`` (``sys.executable -m gateway.cli run``), with
  ``NOTIFY_SOCKET`` pointing at a datagram socket of this process: start -> ``READY=1`` is
  timed from the ``exec``. The config is config/gateway.example.toml (journal FULL, JSON
  logs, the console on a TCP port, the example's escalation waves) with the paths,
  ports, the double's URL and ``alert.backend`` changed and the serial ports removed.
  A fresh gateway (fresh journal) per run, so that every press opens a new alarm without
  resolving earlier ones; its broker session is cleared after it stops.
* The peer: a bare MQTT -> HTTP forward (bench/e2e_peer.py: aiomqtt subscribe, one
  aiohttp POST per message to the double's ``Messages.json`` with Basic auth), on the
  same broker, double and publisher, at the same rates, in the same run (once per rate,
  right after the first alert pass's gateway run at the same rate).
* The publisher (bench/sms.py's ``--role publish``: paho, QoS 1, open loop: press ``i``
  is due at ``start + i / rate`` whatever happened to earlier ones).

Registries
----------
* Rate runs and the storm: a registry from :func:`gateway.district.generate` with the
  district's area and shape but enough elders that every press of a run is a different
  MQTT button (70 % of elders have one), and twice as many responders as presses, all on
  duty: the example's first wave texts the family and the 2 nearest free staff, and busy
  staff are skipped, so with fewer staff than open alarms every later alarm would text
  all supervisors instead (issue 13's stock-city row, a separate figure). The 88-elder
  district has 61 buttons, too few for one new alarm per press at 100/s.
* Start to READY and RSS at READY: the generated city (``gateway.district --city``,
  100,000 elders, 5,000 responders); no presses.

Figures (publisher clock, ``CLOCK_MONOTONIC``, system-wide on Linux)
---------------------------------------------------------------------
* latency: a press's publish -> the double's arrival time of the first SMS request that
  carries its alarm's reference (gateway; references mapped to devices from the journal)
  or its topic (peer); p50/p99/p99.9/max per rate;
* storm drain: N presses published at once -> the last first SMS request;
* zero loss: every press has an alarm (journal) and a first SMS (double);
* heard in the center (alert on): the gateway's own ``gateway_press_to_alert_ms`` (from
  the press's stamp to the player starting the first tone, announcement or summary that
  covers the alarm), read from /metrics on its control socket before and after the run:
  the share within 1 s and the p99's bucket; the max is exact, from the ``alert.heard``
  log lines. Alert on plays with ``paplay`` to a private PulseAudio server's null sink
  (:mod:`tests.support.pulse`), which takes as long as each sound lasts, as a speaker
  does; where PulseAudio is not installed, to files (instant: the figures flatter);
* CPU per alarm: utime+stime (+ reaped children: espeak-ng, paplay) of the process from
  /proc/<pid>/stat over the run, until it is idle again, divided by the presses;
* RSS: VmRSS at READY and VmHWM (peak) at the end of the run, /proc/<pid>/status.

The gateway runs from ``git archive HEAD`` (unpacked in the work directory), not from
the working tree, unless ``--worktree``: the JSON's ``git_commit`` is what was measured.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sms import (
    _REF,
    DoubleInfo,
    Press,
    _press,
    _versions,
    all_on_duty,
    publish,
    twilio_double,
)
from devices.events import AddressScheme
from gateway.config import parse_config
from gateway.district import DISTRICT, generate, generate_district
from gateway.model import Device, Registry
from gateway.registry import load_registry
from tests.helpers import Mosquitto
from tests.support import pulse
from tests.support.ports import free_port

ROOT: Final = Path(__file__).resolve().parent.parent
PEER: Final = Path(__file__).resolve().parent / "e2e_peer.py"
RESULTS: Final = ROOT / "bench" / "results" / "e2e.json"
EXAMPLE: Final = ROOT / "config" / "gateway.example.toml"
WARMUP: Final = 10
NAME: Final = "bench"
CLIENT_ID: Final = "gw-bench-e2e"
STATUS_TOPIC: Final = f"alarm/gateway/{NAME}/status"
# config/mosquitto.conf's settings that tests.helpers.Mosquitto does not set itself.
SHIPPED_BROKER: Final = ("max_queued_bytes 67108864\nautosave_on_changes true\n"
                         "autosave_interval 10\n")
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark could not set up or complete a run."""


# ----------------------------------------------------------------------------- small tools


def percentiles(samples: Sequence[float]) -> dict[str, float | int]:
    """Nearest-rank p50/p99/p99.9 and max (ms, rounded to µs)."""
    s = sorted(samples)
    n = len(s)
    if not n:
        return {"n": 0}

    def at(q: float) -> float:
        return round(s[min(n - 1, int(q * n))], 3)

    return {"n": n, "p50": at(0.5), "p99": at(0.99), "p99.9": at(0.999), "max": round(s[-1], 3)}


def proc_cpu_s(pid: int) -> float:
    """utime + stime + cutime + cstime of a process (its reaped children: espeak-ng)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/<pid>/status, in kB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} for pid {pid}")


async def settle(pid: int, timeout_s: float = 10.0) -> None:
    """Wait until a process is idle (< 5 % of a core over 0.3 s): the last SMS of the
    run's alarms and their journal commits are done, so its CPU time is complete."""
    deadline = time.monotonic() + timeout_s
    last = proc_cpu_s(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        now = proc_cpu_s(pid)
        if now - last < 0.015:
            return
        last = now


async def wait_for(predicate: Any, timeout_s: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


# ----------------------------------------------------------------------------- registries


@dataclass(frozen=True)
class BenchRegistry:
    directory: Path
    buttons: tuple[Device, ...]
    counts: dict[str, int]


def build_registry(out: Path, buttons_needed: int, *, seed: int) -> BenchRegistry:
    """The district's area with enough elders for ``buttons_needed`` MQTT buttons and
    twice as many responders, all on duty (see the module docstring)."""
    elders = math.ceil(buttons_needed / 0.68) + 20
    responders = 2 * buttons_needed + 200
    generate(out, elders=elders, responders=responders, seed=seed,
             width_km=DISTRICT.width_km, height_km=DISTRICT.height_km,
             area_name=DISTRICT.area_name)
    all_on_duty(out)
    bench = _bench_registry(out, load_registry(out))
    if len(bench.buttons) < buttons_needed:
        raise BenchError(f"{len(bench.buttons)} MQTT buttons generated, need {buttons_needed}")
    return bench


def _bench_registry(directory: Path, registry: Registry) -> BenchRegistry:
    """Its MQTT buttons in device-id order, and its counts."""
    buttons = tuple(sorted((d for d in registry.devices.values()
                            if d.scheme is AddressScheme.MQTT), key=lambda d: d.device_id))
    counts = {"elders": len(registry.elders), "mqtt_buttons": len(buttons),
              "contacts": sum(len(e.contacts) for e in registry.elders.values()),
              "responders": len(registry.responders)}
    return BenchRegistry(directory, buttons, counts)


# ----------------------------------------------------------------------------- config


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise BenchError(f"cannot write {v!r} as TOML")


def dump_toml(data: dict[str, Any]) -> str:
    """Enough TOML for the example config: tables, arrays of tables, inline tables."""
    out: list[str] = []

    def table(prefix: str, values: dict[str, Any], header: str | None) -> None:
        if header is not None:
            out.append(header)
        nested = []
        for k, v in values.items():
            if isinstance(v, dict) or (
                    isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
                nested.append((k, v))
            else:
                out.append(f"{k} = {_toml_value(v)}")
        for k, v in nested:
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                table(name, v, f"\n[{name}]")
            else:
                for item in v:
                    table(name, item, f"\n[[{name}]]")

    table("", data, None)
    return "\n".join(out).lstrip() + "\n"


def write_config(path: Path, *, state: Path, registry: Path, broker_port: int,
                 double: DoubleInfo, alert: str, source: Path = ROOT) -> Path:
    """The example config of the tree the gateway runs from (``source``) with this run's
    paths, ports, double and alert backend; validated here when that tree is this one."""
    example = source / EXAMPLE.relative_to(ROOT)
    data = tomllib.loads(example.read_text(encoding="utf-8"))
    data.pop("serial", None)
    data.pop("gsm", None)
    data["gateway"].update(name=NAME, state_dir=str(state))
    data["registry"].update(directory=str(registry))
    data["registry"].pop("bbox", None)  # the city is larger than the district
    if not (registry / str(data["registry"].get("district_map", ""))).is_file():
        data["registry"].pop("district_map", None)
    data["registry"]["watch_interval_s"] = 0  # nothing changes the files during a run
    data["logging"].update(format="json")
    data["mqtt"].update(port=broker_port, client_id=CLIENT_ID)
    data["alert"] = {**data.get("alert", {}), "backend": alert,
                     **({"output_dir": str(state / "alert")} if alert == "file" else {})}
    data["sms"]["base_url"] = double.base_url
    data["control"]["port"] = free_port()
    data["webhooks"]["port"] = free_port()
    path.write_text(dump_toml(data), encoding="utf-8")
    if source == ROOT:  # else the gateway checks it with its own code, at its start
        parse_config(tomllib.loads(path.read_text(encoding="utf-8")), path)
    return path


# ----------------------------------------------------------------------------- processes


@dataclass
class GatewayProcess:
    """``gateway run`` as its own process; ``start`` returns once it sent READY=1."""

    config: Path
    workdir: Path
    double: DoubleInfo
    source: Path  # the tree it runs from (its working directory, first on sys.path)
    profile: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)  # the speaker's server
    proc: asyncio.subprocess.Process | None = None
    ready_s: float = float("nan")
    rss_ready_kb: int = 0
    stop_s: float = float("nan")
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("the gateway is not running")
        return self.proc.pid

    async def start(self, timeout_s: float = 180.0) -> None:
        sock_path = self.workdir / "notify.sock"
        with suppress(FileNotFoundError):
            sock_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.setblocking(False)
        env = {k: v for k, v in os.environ.items()
               if k not in ("TWILIO_EDGE", "TWILIO_REGION", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env.update(NOTIFY_SOCKET=str(sock_path), TWILIO_ACCOUNT_SID=self.double.account_sid,
                   TWILIO_AUTH_TOKEN=self.double.auth_token,
                   CONTROL_TOKEN=secrets.token_hex(32), PYTHONUNBUFFERED="1",
                   **self.extra_env)
        prof = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
        cmd = [sys.executable, *prof, "-m", "gateway.cli", "run", "--config", str(self.config)]
        loop = asyncio.get_running_loop()
        with (self.workdir / "gateway.log").open("ab") as log:
            t0 = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, cwd=self.source, env=env, stdout=log, stderr=log)
        try:
            exited = asyncio.ensure_future(self.proc.wait())
            while True:
                recv = asyncio.ensure_future(loop.sock_recv(sock, 4096))
                done, _ = await asyncio.wait({recv, exited}, timeout=timeout_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                    why = (f"exited with {self.proc.returncode}" if exited in done
                           else f"not READY within {timeout_s:.0f} s")
                    raise BenchError(f"gateway {why}; see {self.workdir}/gateway.log")
                if b"READY=1" in recv.result():
                    self.ready_s = time.monotonic() - t0
                    break
            exited.cancel()
            self.rss_ready_kb = proc_status_kb(self.proc.pid, "VmRSS")
        finally:
            sock.close()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = await asyncio.wait_for(self.proc.wait(), 90)
        except TimeoutError:
            self.proc.kill()
            self.exit_code = await self.proc.wait()
        self.stop_s = time.monotonic() - t


@asynccontextmanager
async def gateway_process(config: Path, workdir: Path, double: DoubleInfo, source: Path,
                          profile: Path | None = None, env: dict[str, str] | None = None
                          ) -> AsyncIterator[GatewayProcess]:
    gw = GatewayProcess(config, workdir, double, source, profile, dict(env or {}))
    try:
        await gw.start()
        yield gw
    finally:
        await gw.stop()
        if gw.proc is not None and gw.proc.returncode is None:
            gw.proc.kill()
            await gw.proc.wait()


def clear_session(port: int) -> None:
    """Drop the stopped gateway's persistent session, so that the peer's presses on the
    same topics are not queued for it (and redelivered to the next gateway)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=CLIENT_ID, clean_session=True,
                         protocol=MQTTProtocolVersion.MQTTv311)
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    time.sleep(0.2)
    client.disconnect()
    client.loop_stop()


@asynccontextmanager
async def peer_process(port: int, double: DoubleInfo, workdir: Path,
                       ) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[int]]]:
    """The bare forward; yields the process and a one-item list counting its 201s."""
    with (workdir / "peer.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(PEER), str(port), double.base_url, double.account_sid,
            double.auth_token, stdout=asyncio.subprocess.PIPE, stderr=log)
    if proc.stdout is None:
        raise BenchError("no pipe from the peer")
    stdout = proc.stdout
    line = await asyncio.wait_for(stdout.readline(), 30)
    if line.strip() != b"ready":
        raise BenchError(f"the peer did not start: {line!r}")
    count = [0]

    async def read() -> None:
        async for out in stdout:
            if out.startswith(b"201"):
                count[0] += 1

    reader = asyncio.create_task(read(), name="peer-reader")
    try:
        yield proc, count
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        reader.cancel()
        with suppress(asyncio.CancelledError):
            await reader


# ----------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    name: str
    rate: float  # presses per second; inf: a storm, all at once
    presses: int

    @property
    def slug(self) -> str:
        return self.name.replace("/s", "-per-s").replace(" ", "-")


@dataclass
class RunRecord:
    """What one run recorded, before the double's records are in."""

    spec: RunSpec
    side: str  # "gateway" or "peer"
    alert: str | None
    started: float
    ended: float
    published: dict[str, float]  # device id -> publish time
    topics: dict[str, str]  # topic -> device id
    cpu_s: float
    wall_s: float
    alarms: dict[str, str] = field(default_factory=dict)  # alarm id -> device id (gateway)
    extra: dict[str, Any] = field(default_factory=dict)


def profile_top(path: Path, n: int = 12) -> list[dict[str, Any]] | None:
    """The functions with the most own time in a cProfile file (the whole process life,
    start-up included; ``share`` of the time not spent waiting in epoll)."""
    import pstats

    if not path.exists():
        return None
    stats: Any = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    # The event loop's wait in epoll is idle time, not work: left out of the shares.
    busy = {k: v for k, v in stats.items() if "epoll" not in k[2]}
    total = sum(v[2] for v in busy.values()) or 1.0
    rows = sorted(busy.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [{"function": f"{name} ({Path(file).name}:{line})", "calls": v[1],
             "tottime_s": round(v[2], 3), "share": round(v[2] / total, 3),
             "cumtime_s": round(v[3], 3)} for (file, line, name), v in rows]


def _journal_query(journal: Path, sql: str) -> list[tuple[Any, ...]]:
    if not journal.exists():
        return []
    try:
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []  # not created yet


def _sent_alarms(journal: Path) -> int:
    rows = _journal_query(journal, "SELECT COUNT(DISTINCT alarm_id) FROM notifications "
                                   "WHERE sid IS NOT NULL")
    return int(rows[0][0]) if rows else 0


def _publish_rate(spec: RunSpec) -> float:
    return 1e9 if math.isinf(spec.rate) else spec.rate


class StatusWatch:
    """The gateway's status topic, non-retained ``online``: it has subscribed."""

    def __init__(self) -> None:
        self.online = asyncio.Event()

    async def run(self, port: int) -> None:
        import aiomqtt

        async with aiomqtt.Client("127.0.0.1", port) as client:
            await client.subscribe(STATUS_TOPIC, qos=1)
            async for message in client.messages:
                if not message.retain and message.payload == b"online":
                    self.online.set()


#: What runs beside a gateway run's presses (the reload run's edit and SIGHUP); what it
#: returns goes into the run's record.
During = Callable[["GatewayProcess", Path], Awaitable[dict[str, Any]]]


async def gateway_run(ctx: Context, spec: RunSpec, alert: str, *,
                      registry: BenchRegistry | None = None,
                      during: During | None = None,
                      check_config: bool = False) -> RunRecord:
    """A fresh gateway: warm-up presses, then the run's presses, until every one has a
    first SMS accepted (journal) and the process is idle again. With ``check_config``,
    ``gateway check-config`` runs first, as the unit's ``ExecStartPre`` does (it leaves
    the validated registry snapshot that the start then loads)."""
    registry = registry or ctx.registry
    workdir = ctx.workdir / f"gateway-{alert}-{spec.slug}"
    workdir.mkdir(parents=True)
    state = workdir / "state"
    config = write_config(workdir / "gateway.toml", state=state, registry=registry.directory,
                          broker_port=ctx.port, double=ctx.double,
                          alert=ctx.speaker.config(alert), source=ctx.source)
    state.mkdir()  # as StateDirectory= under the unit: the registry snapshot goes there
    if check_config:
        checked = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "check-config", "--config", str(config),
            cwd=ctx.source, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "TWILIO_ACCOUNT_SID": ctx.double.account_sid,
                 "TWILIO_AUTH_TOKEN": ctx.double.auth_token,
                 "CONTROL_TOKEN": secrets.token_hex(32)})
        if await checked.wait() != 0:
            raise BenchError(f"check-config of {config} exited {checked.returncode}")
    journal = state / "journal.sqlite3"
    warm, measured = presses(registry, spec)
    profile = (RESULTS.parent / f"e2e-{alert}-{spec.slug}.prof") if ctx.profile else None
    ctx.watch.online.clear()
    async with gateway_process(config, workdir, ctx.double, ctx.source, profile,
                               ctx.speaker.env) as gw:
        await asyncio.wait_for(ctx.watch.online.wait(), 60)
        await publish(workdir, "warmup", ctx.port, warm, 20.0)
        await wait_for(lambda: _sent_alarms(journal) >= WARMUP, 60, "the warm-up's SMS")
        await settle(gw.pid)
        heard0 = await heard_histogram(state) if alert == "on" else None
        log_mark = (workdir / "gateway.log").stat().st_size
        cpu0, wall0 = proc_cpu_s(gw.pid), time.monotonic()
        beside = asyncio.ensure_future(during(gw, workdir) if during else _nothing())
        try:
            recorded = await publish(workdir, "measured", ctx.port, measured,
                                     _publish_rate(spec))
            happened = await beside
        finally:
            beside.cancel()
        await wait_for(lambda: _sent_alarms(journal) >= WARMUP + spec.presses,
                       120 + spec.presses / 20, f"{spec.presses} alarms' first SMS", 0.2)
        ended = time.monotonic()
        heard = (await heard_in_center(state, heard0, spec.presses,
                                       workdir / "gateway.log", log_mark)
                 if heard0 is not None else {})
        await settle(gw.pid)
        cpu1, wall1 = proc_cpu_s(gw.pid), time.monotonic()
        hwm, rss_end = proc_status_kb(gw.pid, "VmHWM"), proc_status_kb(gw.pid, "VmRSS")
    await asyncio.to_thread(clear_session, ctx.port)
    alarms = dict(_journal_query(journal, "SELECT alarm_id, device_id FROM alarms"))
    top = profile_top(profile) if profile else None
    records = recorded["records"]
    return RunRecord(
        spec, "gateway", alert, min(r["published_at"] for r in records), ended,
        {r["device_id"]: r["published_at"] for r in records},
        {p.topic: p.device_id for p in measured}, cpu1 - cpu0, wall1 - wall0, alarms,
        {"ready_s": round(gw.ready_s, 3), "rss_ready_mb": round(gw.rss_ready_kb / 1024, 1),
         "rss_peak_mb": round(hwm / 1024, 1), "rss_end_mb": round(rss_end / 1024, 1),
         "stop_s": round(gw.stop_s, 3), "exit_code": gw.exit_code,
         "profile": str(profile) if profile else None, "profile_top_tottime": top,
         **({"heard": heard} if heard else {}), **happened})


HEARD_METRIC: Final = "gateway_press_to_alert_ms"


async def heard_histogram(state: Path) -> dict[float, float]:
    """``gateway_press_to_alert_ms``'s cumulative buckets (le -> count), read from the
    gateway's /metrics on its control socket (an operator's way in, no token)."""
    import aiohttp

    connector = aiohttp.UnixConnector(path=str(state / "control.sock"))
    async with aiohttp.ClientSession(connector=connector) as session, \
            session.get("http://localhost/metrics", timeout=aiohttp.ClientTimeout(10)) as answer:
        text = await answer.text()
        if answer.status != 200:
            raise BenchError(f"/metrics answered {answer.status}: {text[:200]}")
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(HEARD_METRIC + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[math.inf if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    if math.inf not in buckets:
        raise BenchError(f"no {HEARD_METRIC} in the gateway's /metrics")
    return buckets


async def heard_in_center(state: Path, before: dict[float, float], presses: int, log: Path,
                          mark: int, timeout_s: float = 60.0) -> dict[str, Any]:
    """How soon the center heard the run's alarms (the gateway's own measure, from the
    press's stamp): waits until every alarm was heard, or ``timeout_s``. Quantiles are
    bucket bounds (a histogram); the max is exact, from the ``alert.heard`` log lines."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = await heard_histogram(state)
        got = {le: after[le] - before.get(le, 0.0) for le in after}
        if got[math.inf] >= presses or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    n = got[math.inf]

    def bound(q: float) -> float | str | None:
        le = next((le for le in sorted(got) if n and got[le] >= q * n), None)
        return f"> {max(k for k in got if k < math.inf):.0f}" if le == math.inf else le

    worst = 0.0
    with log.open("rb") as f:
        f.seek(mark)
        for raw in f:
            if b'"alert.heard"' in raw:
                with suppress(ValueError):
                    worst = max(worst, json.loads(raw).get("press_to_heard_ms") or 0.0)
    return {"alarms": int(n), "of": presses,
            "within_1s": round(got.get(1000.0, 0.0) / n, 4) if n else None,
            "p50_le_ms": bound(0.5), "p99_le_ms": bound(0.99), "max_ms": round(worst, 1)}


async def _nothing() -> dict[str, Any]:
    return {}


def presses(registry: BenchRegistry, spec: RunSpec) -> tuple[list[Press], list[Press]]:
    """Warm-up presses (the last buttons) and the run's (the first), one per button."""
    b = registry.buttons
    if len(b) < spec.presses + WARMUP:
        raise BenchError(f"{len(b)} MQTT buttons, {spec.name} needs {spec.presses + WARMUP}")
    return [_press(d) for d in b[-WARMUP:]], [_press(d) for d in b[:spec.presses]]


# ----------------------------------------------------------------------------- reload


def city_copy(ctx: Context, name: str) -> BenchRegistry:
    """A copy of the city (100k elders, 5k responders, every one on duty), its MQTT
    buttons read with the bench's own snapshot cache."""
    out = ctx.workdir / name
    city = ctx.workdir / "city"
    if not city.exists():
        generate_district(city, city=True)
    shutil.copytree(city, out)
    all_on_duty(out)
    return _bench_registry(out, load_registry(out, cache_dir=ctx.workdir / "bench-registry-cache"))


def edit_one_elder(registry: BenchRegistry, spare: set[str]) -> str:
    """An operator's edit: one elder's notes changed (an elder none of the run's presses
    is about), written as editors do, to a new file renamed over the old one."""
    path = registry.directory / "elders.csv"
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or ())
        rows = list(reader)
    row = next(r for r in rows if r["elder_id"] not in spare)
    row["notes"] = (row["notes"] + " 已复核").strip()
    tmp = path.with_suffix(".csv.new")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return row["elder_id"]


def reloader(registry: BenchRegistry, spec: RunSpec, after_s: float) -> During:
    """``after_s`` into the run's presses: edit the registry, SIGHUP the gateway, and
    time it until the gateway logs ``registry.reloaded`` (bench clock)."""
    pressed = {d.elder_id for d in registry.buttons[:spec.presses]} | {
        d.elder_id for d in registry.buttons[-WARMUP:]}

    async def during(gw: GatewayProcess, workdir: Path) -> dict[str, Any]:
        log = workdir / "gateway.log"
        seen = log.stat().st_size
        await asyncio.sleep(after_s)
        elder = await asyncio.to_thread(edit_one_elder, registry, pressed)
        if gw.proc is None:
            raise BenchError("the gateway is not running")
        signalled = time.monotonic()
        gw.proc.send_signal(signal.SIGHUP)
        deadline = signalled + 120
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            with log.open("rb") as f:
                f.seek(seen)
                text = f.read()
            if b'"registry.reload_failed"' in text:
                raise BenchError(f"the reload failed; see {log}")
            if b'"registry.reloaded"' in text:
                done = time.monotonic()
                return {"reload": {"signalled_at": signalled, "reloaded_at": done,
                                   "reload_s": round(done - signalled, 3),
                                   "edited_elder": elder, "presses": spec.presses}}
        raise BenchError(f"no registry.reloaded within 120 s of SIGHUP; see {log}")

    return during


async def peer_run(ctx: Context, spec: RunSpec) -> RunRecord:
    workdir = ctx.workdir / f"peer-{spec.slug}"
    workdir.mkdir(parents=True)
    warm, measured = presses(ctx.registry, spec)
    async with peer_process(ctx.port, ctx.double, workdir) as (proc, count):
        await publish(workdir, "warmup", ctx.port, warm, 20.0)
        await wait_for(lambda: count[0] >= WARMUP, 60, "the peer's warm-up")
        await settle(proc.pid)
        cpu0, wall0 = proc_cpu_s(proc.pid), time.monotonic()
        recorded = await publish(workdir, "measured", ctx.port, measured, _publish_rate(spec))
        await wait_for(lambda: count[0] >= WARMUP + spec.presses, 120 + spec.presses / 20,
                       f"the peer's {spec.presses} posts", 0.05)
        ended = time.monotonic()
        await settle(proc.pid)
        cpu1, wall1 = proc_cpu_s(proc.pid), time.monotonic()
        hwm = proc_status_kb(proc.pid, "VmHWM")
    records = recorded["records"]
    return RunRecord(
        spec, "peer", None, min(r["published_at"] for r in records), ended,
        {r["device_id"]: r["published_at"] for r in records},
        {p.topic: p.device_id for p in measured}, cpu1 - cpu0, wall1 - wall0,
        extra={"rss_peak_mb": round(hwm / 1024, 1)})


async def city_start(ctx: Context, alert: str) -> dict[str, Any]:
    """Start to READY=1 and RSS at READY with the 100k city; no presses."""
    workdir = ctx.workdir / f"city-{alert}"
    workdir.mkdir(parents=True)
    registry = ctx.workdir / "city"
    if not registry.exists():
        await asyncio.to_thread(generate_district, registry, city=True)
    config = write_config(workdir / "gateway.toml", state=workdir / "state", registry=registry,
                          broker_port=ctx.port, double=ctx.double,
                          alert=ctx.speaker.config(alert), source=ctx.source)
    # As under the unit: StateDirectory= exists before the start. The first start finds
    # no validated snapshot (a changed registry: validated in full, snapshot written);
    # the second is a start after an unchanged registry (check-config in ExecStartPre
    # leaves the same snapshot for a changed one).
    (workdir / "state").mkdir(parents=True, exist_ok=True)
    async with gateway_process(config, workdir, ctx.double, ctx.source,
                               env=ctx.speaker.env) as cold:
        pass
    await asyncio.to_thread(clear_session, ctx.port)
    async with gateway_process(config, workdir, ctx.double, ctx.source,
                               env=ctx.speaker.env) as gw:
        pass
    await asyncio.to_thread(clear_session, ctx.port)
    return {"ready_s": round(gw.ready_s, 3), "rss_ready_mb": round(gw.rss_ready_kb / 1024, 1),
            "cold_ready_s": round(cold.ready_s, 3),
            "cold_rss_ready_mb": round(cold.rss_ready_kb / 1024, 1),
            "stop_s": round(gw.stop_s, 3), "exit_code": gw.exit_code}


@dataclass
class Context:
    workdir: Path
    port: int
    double: DoubleInfo
    registry: BenchRegistry
    watch: StatusWatch
    profile: bool
    source: Path
    speaker: Speaker


@dataclass
class Speaker:
    """The alert-on runs' backend: ``paplay`` on a private PulseAudio null sink, which
    plays in real time like the center's speaker (or ``file`` where PulseAudio is not
    installed: it plays instantly, so the heard figures would flatter)."""

    backend: str
    env: dict[str, str] = field(default_factory=dict)

    def config(self, alert: str) -> str:
        return "none" if alert == "off" else self.backend


# ----------------------------------------------------------------------------- analysis


def analyse(run: RunRecord, requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Publish -> first SMS request per press, loss, CPU per alarm."""
    window = [r for r in requests if run.started - 0.5 <= r["arrived_at"] <= run.ended + 0.5]
    first: dict[str, float] = {}  # device id -> first request's arrival
    if run.side == "gateway":
        for r in window:
            for ref in set(_REF.findall(r["body"] or "")):
                device = run.alarms.get(ref)
                if device in run.published:
                    first[device] = min(first.get(device, math.inf), r["arrived_at"])
        with_alarm = sum(1 for d in set(run.alarms.values()) if d in run.published)
    else:
        for r in window:
            topic = (r["body"] or "").removeprefix("SOS ")
            device = run.topics.get(topic)
            if device is not None:
                first[device] = min(first.get(device, math.inf), r["arrived_at"])
        with_alarm = len(first)
    latency = [(first[d] - t) * 1000 for d, t in run.published.items() if d in first]
    n = run.spec.presses
    out: dict[str, Any] = {
        "run": run.spec.name, "side": run.side, "alert": run.alert,
        "rate_per_s": None if math.isinf(run.spec.rate) else run.spec.rate,
        "presses": n, "published": len(run.published), "alarms": with_alarm,
        "first_sms": len(first),
        "zero_loss": len(run.published) == n and with_alarm == n and len(first) == n,
        "latency_ms": percentiles(latency),
        "cpu_s": round(run.cpu_s, 3), "wall_s": round(run.wall_s, 3),
        "cpu_ms_per_alarm": round(1000 * run.cpu_s / n, 3),
        **run.extra,
    }
    reload = run.extra.get("reload")
    if reload is not None:
        # Presses published from the SIGHUP until the reload was seen done, and the rest.
        began, done = reload["signalled_at"], reload["reloaded_at"]
        during = [(first[d] - t) * 1000 for d, t in run.published.items()
                  if d in first and began <= t <= done]
        outside = [(first[d] - t) * 1000 for d, t in run.published.items()
                   if d in first and not began <= t <= done]
        out["latency_during_reload_ms"] = percentiles(during)
        out["latency_outside_reload_ms"] = percentiles(outside)
    if first:
        pubs = sorted(run.published.values())
        out["drain_s"] = round(max(first.values()) - pubs[0], 3)
        out["publish_span_s"] = round(pubs[-1] - pubs[0], 3)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return round(a / b, 2)


def table_rows(results: list[dict[str, Any]], city: dict[str, dict[str, Any]],
               alert: str) -> list[dict[str, Any]]:
    """figure | gateway | peer | ratio, for one alert pass."""
    peers = {r["run"]: r for r in results if r["side"] == "peer"}
    rows: list[dict[str, Any]] = []

    def add(figure: str, gw: float | None, peer: float | None, unit: str) -> None:
        rows.append({"figure": figure, "unit": unit, "gateway": gw, "peer": peer,
                     "ratio": _ratio(gw, peer)})

    if alert in city:
        c = city[alert]
        add("start to READY=1, city 100k elders / 5k responders (snapshot)", c["ready_s"],
            None, "s")
        add("RSS at READY, city (snapshot)", c["rss_ready_mb"], None, "MB")
        if "cold_ready_s" in c:
            add("start to READY=1, city, registry changed (full validation)",
                c["cold_ready_s"], None, "s")
            add("RSS at READY, city, registry changed", c["cold_rss_ready_mb"], None, "MB")
    def sustained(side: str) -> float | None:
        """The highest rate run with zero loss and p99 under 1 s."""
        ok = [r["rate_per_s"] for r in results if r["side"] == side
              and r["rate_per_s"] is not None and (side == "peer" or r["alert"] == alert)
              and r["zero_loss"] and (r["latency_ms"].get("p99") or math.inf) < 1000]
        return max(ok) if ok else None

    add("highest rate run with zero loss and p99 < 1 s", sustained("gateway"),
        sustained("peer"), "/s")
    for g in (r for r in results if r["side"] == "gateway" and r["alert"] == alert):
        p = peers.get(g["run"], {})
        gl, pl = g["latency_ms"], p.get("latency_ms", {})
        label = g["run"]
        if "reload" in g:
            add(f"{label}: SIGHUP -> registry.reloaded", g["reload"]["reload_s"], None, "s")
            for q in ("p50", "p99", "max"):
                add(f"{label}: publish -> 1st SMS {q}, published during the reload",
                    g["latency_during_reload_ms"].get(q), None, "ms")
                add(f"{label}: publish -> 1st SMS {q}, the rest of the run",
                    g["latency_outside_reload_ms"].get(q), None, "ms")
        elif g["rate_per_s"] is not None:
            for q in ("p50", "p99", "p99.9", "max"):
                add(f"{label}: publish -> 1st SMS {q}", gl.get(q), pl.get(q), "ms")
        else:
            add(f"{label}: drain until every 1st SMS left", g.get("drain_s"),
                p.get("drain_s"), "s")
            add(f"{label}: publish -> 1st SMS p99", gl.get("p99"), pl.get("p99"), "ms")
        heard = g.get("heard")
        if heard:
            add(f"{label}: press -> heard in the center, share within 1 s",
                None if heard["within_1s"] is None else round(100 * heard["within_1s"], 1),
                None, "%")
            add(f"{label}: press -> heard p99 (histogram bucket, at most)", heard["p99_le_ms"],
                None, "ms")
            add(f"{label}: press -> heard max", heard["max_ms"], None, "ms")
            if heard["alarms"] < heard["of"]:
                add(f"{label}: alarms heard within a minute of the last 1st SMS",
                    heard["alarms"], heard["of"], "")
        add(f"{label}: CPU per alarm", g["cpu_ms_per_alarm"], p.get("cpu_ms_per_alarm"), "ms")
        add(f"{label}: zero loss (alarms, 1st SMS / presses)",
            None, None, f"{g['alarms']}, {g['first_sms']} / {g['presses']}"
            + (f" (peer {p['first_sms']})" if p else ""))
        rows[-1]["gateway"] = g["zero_loss"]
        rows[-1]["peer"] = p.get("zero_loss")
        add(f"{label}: RSS at READY", g["rss_ready_mb"], None, "MB")
        add(f"{label}: RSS peak", g["rss_peak_mb"], p.get("rss_peak_mb"), "MB")
        add(f"{label}: SIGTERM -> exit (unit: TimeoutStopSec=30)", g.get("stop_s"), None, "s")
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def print_table(rows: list[dict[str, Any]], alert: str, backend: str) -> None:
    print(f"\n== alert {alert} (backend {backend})")
    print(f"{'figure':<52} {'unit':<8} {'gateway':>14} {'peer':>9} {'ratio':>7}")
    print("-" * 94)
    for r in rows:
        gw = _fmt(r["gateway"])
        unit = r["unit"] if len(r["unit"]) <= 8 else ""
        print(f"{r['figure']:<52} {unit:<8} {gw:>14} {_fmt(r['peer']):>9} "
              f"{_fmt(r['ratio']):>7}" + ("" if unit or not r["unit"] else f"  {r['unit']}"))


#: Issue 13's "measured" column (before this benchmark's work), by figure, for the
#: README's table: the same shape (gateway run as deployed, 2 cores), an earlier commit.
BEFORE: Final[dict[str, str]] = {
    "start to READY=1, city 100k elders / 5k responders (snapshot)": "14 s (no snapshot)",
    "RSS at READY, city (snapshot)": "503 MB",
    "start to READY=1, city, registry changed (full validation)": "14 s",
    "RSS at READY, city, registry changed": "503 MB",
    "100/s: publish -> 1st SMS p50": "15-20 ms (alert on)",
    "100/s: publish -> 1st SMS p99": "35-78 ms (alert on)",
    "highest rate run with zero loss and p99 < 1 s": "~240/s (off), ~175/s (on)",
    "10/s: CPU per alarm": "4.6 (off) - 5.5 (on) ms",
    "100/s: CPU per alarm": "4.6 (off) - 5.5 (on) ms",
    "1000/s: publish -> 1st SMS p99": "not sustained: ~240/s (off), ~175/s (on)",
    "1000/s: zero loss (alarms, 1st SMS / presses)": "not sustained above ~240/s",
    "storm 10000: drain until every 1st SMS left": "44-58 s",
    "storm 10000: zero loss (alarms, 1st SMS / presses)": "yes",
    "storm 10000: RSS peak": "646 MB",
    "storm 10000: SIGTERM -> exit (unit: TimeoutStopSec=30)": "59 s",
    "reload at 100/s, city: publish -> 1st SMS p99, published during the reload":
        "16-17 s",
    "reload at 100/s, city: publish -> 1st SMS p99, the rest of the run": "<= 23 ms",
}


def markdown(report: dict[str, Any]) -> str:
    """The README's table from a report: figure | alert off (gateway, peer, ratio) |
    alert on (gateway, ratio), one row per figure, in the report's order."""
    tables: dict[str, list[dict[str, Any]]] = report["tables"]
    alerts = [a for a in ("off", "on") if a in tables]
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    for alert in alerts:
        for row in tables[alert]:
            figures.setdefault(row["figure"], {})[alert] = row
    head = ["figure", "unit", "before (issue 13)"]
    for alert in alerts:
        head += [f"alert {alert}: gateway", "peer", "ratio"] if alert == "off" \
            else [f"alert {alert}: gateway", "ratio"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for figure, by_alert in figures.items():
        unit = next(iter(by_alert.values()))["unit"]
        cells = [figure, unit if len(unit) <= 8 else "", BEFORE.get(figure, "-")]
        for alert in alerts:
            r = by_alert.get(alert)
            if r is None:
                cells += ["-"] * (3 if alert == "off" else 2)
            elif alert == "off":
                cells += [_fmt(r["gateway"]), _fmt(r["peer"]), _fmt(r["ratio"])]
            else:
                cells += [_fmt(r["gateway"]), _fmt(r["ratio"])]
        out.append("| " + " | ".join(cells) + " |")
    m = report["machine"]
    out.append("")
    out.append(f"(`bench/e2e.py{' --quick' if report.get('quick') else ''}`, commit "
               f"{(m.get('git_commit') or '?')[:7]}, {m['cpus']} CPUs, load "
               f"{m['load_avg_before'][0]} before / {m['load_avg_after'][0]} after)")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def snapshot(out: Path) -> Path:
    """The committed tree (``git archive HEAD``): the gateway runs from it, so that other
    people's edits in progress in the working tree are not what is measured."""
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True,
                             check=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True, timeout=60)
    return out


def _git_commit() -> str | None:
    with suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=5, check=True)
        return out.stdout.strip()
    return None


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    duration = 5.0 if args.quick else 20.0
    specs = [RunSpec("10/s", 10.0, int(10 * duration)),
             RunSpec("100/s", 100.0, int(100 * duration))]
    if not args.quick:
        specs.append(RunSpec("1000/s", 1000.0, 10_000))  # 10 s
    storm = 1_000 if args.quick else 10_000
    # The city at 100/s, its registry edited and reloaded (SIGHUP) a quarter in.
    reload = RunSpec("reload at 100/s, city", 100.0, int(100 * duration))
    specs.append(RunSpec(f"storm {storm}", math.inf, storm))
    alerts = {"both": ["off", "on"], "on": ["on"], "off": ["off"]}[args.alert]
    only = [o for o in (args.only or "").split(",") if o]

    def chosen(name: str) -> bool:
        return not only or any(o in name for o in only)

    specs = [spec for spec in specs if chosen(spec.name)]
    source = ROOT if args.worktree else await asyncio.to_thread(snapshot, workdir / "src")
    load_before = os.getloadavg()
    t_start = time.monotonic()
    needed = max((s.presses for s in specs), default=0) + WARMUP
    reg = await asyncio.to_thread(build_registry, workdir / "registry", needed, seed=args.seed)
    print(f"registry: {reg.counts}", file=sys.stderr, flush=True)
    broker = Mosquitto(workdir / "mosquitto", extra_conf=SHIPPED_BROKER)
    broker.start()
    results: list[dict[str, Any]] = []
    city: dict[str, dict[str, Any]] = {}
    try:
        async with AsyncExitStack() as stack:
            double, fetch = await stack.enter_async_context(twilio_double(workdir / "double.json"))
            watch = StatusWatch()
            watcher = asyncio.create_task(watch.run(broker.port), name="status-watch")
            speaker = Speaker("file")
            if "on" in alerts and pulse.AVAILABLE:
                server = pulse.PulseServer(workdir / "pulse")
                await asyncio.to_thread(server.start)
                stack.callback(server.stop)
                speaker = Speaker("paplay", server.env)
            elif "on" in alerts:
                print("PulseAudio is not installed: alert on plays to files, instantly "
                      "(apt-get install pulseaudio pulseaudio-utils)", file=sys.stderr)
            ctx = Context(workdir, broker.port, double, reg, watch, args.profile, source,
                          speaker)
            runs: list[RunRecord] = []
            try:
                for alert in alerts:
                    if chosen("city start"):
                        print(f"city start, alert {alert} ...", file=sys.stderr, flush=True)
                        city[alert] = await city_start(ctx, alert)
                    for spec in specs:
                        print(f"gateway {spec.name}, alert {alert} ...", file=sys.stderr,
                              flush=True)
                        runs.append(await gateway_run(ctx, spec, alert))
                        if alert == alerts[0]:
                            print(f"peer {spec.name} ...", file=sys.stderr, flush=True)
                            runs.append(await peer_run(ctx, spec))
                    if not chosen(reload.name):
                        continue
                    print(f"gateway {reload.name}, alert {alert} ...", file=sys.stderr,
                          flush=True)
                    city_reg = await asyncio.to_thread(city_copy, ctx, f"city-reload-{alert}")
                    runs.append(await gateway_run(
                        ctx, reload, alert, registry=city_reg,
                        during=reloader(city_reg, reload, after_s=duration / 4),
                        check_config=True))
            finally:
                watcher.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await watcher
            dumped = await fetch()
    finally:
        broker.stop()
    requests = dumped["requests"]
    results = [analyse(r, requests) for r in runs]
    tables = {alert: table_rows(results, city, alert) for alert in alerts}
    for alert in alerts:
        print_table(tables[alert], alert, speaker.config(alert))
    return {
        "benchmark": "as deployed: MQTT press -> first SMS request at the Twilio double, "
                     "gateway vs a bare MQTT->HTTP forward",
        "quick": args.quick,
        "seed": args.seed,
        "runtime_s": round(time.monotonic() - t_start, 1),
        "registry": {**reg.counts, "note": "generated, district area; every responder on duty"},
        "city": city,
        "alert_on_backend": speaker.config("on"),
        "tables": tables,
        "results": results,
        "double": {"requests": len(requests), "messages": dumped.get("messages"),
                   "cpu_s": dumped.get("cpu_s")},
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "git_commit": _git_commit(),
            "gateway_source": "working tree" if args.worktree else "git HEAD (archive)",
            "versions": _versions(),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="10 and 100/s for 5 s, a 1,000 storm, alert off (about 2 min)")
    parser.add_argument("--alert", choices=("on", "off", "both"),
                        help="alert backend none (off) and/or paplay on a private "
                             "PulseAudio null sink (on); default off with --quick, both "
                             "without")
    parser.add_argument("--profile", action="store_true",
                        help="run each gateway under cProfile; .prof files beside the JSON")
    parser.add_argument("--keep", type=Path, help="keep the work files in this directory")
    parser.add_argument("--worktree", action="store_true",
                        help="run the gateway from the working tree (default: git HEAD)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--only", metavar="NAMES",
                        help="only the runs whose names contain one of these (comma "
                             "separated: e.g. 'reload', '100/s,storm', 'city start')")
    parser.add_argument("--markdown", type=Path, metavar="JSON",
                        help="print the README's table from a report (e.g. "
                             "bench/results/e2e.json) and exit; runs nothing")
    args = parser.parse_args(argv)
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text(encoding="utf-8"))))
        return 0
    # Info logs of the registry's load in this process stay out of the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    args.alert = args.alert or "both"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(bench(args, args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
            report = asyncio.run(bench(args, Path(tmp)))
    RESULTS.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                       encoding="utf-8")
    print(f"\nwrote {RESULTS} ({report['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
