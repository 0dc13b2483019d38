"""Benchmark device intake: presses through Mosquitto into the journal, and their latency.

Usage: .venv/bin/python bench/intake.py [--quick] [--out FILE]

Real parts only: a private Mosquitto (the shipped no-loss settings: persistence,
``max_queued_messages 0``), the real in-process ``Gateway`` (MQTT link, intake, SQLite
journal, dispatch with SMS to the Twilio double, alert backend ``none``), a registry
made by ``gateway.district.generate``. The gateway's process is pinned to one CPU; the
broker, the publishing devices (a paho process) and the Twilio double (its own process)
run on the other CPUs, so they do not take the gateway's core.

For each ``journal_synchronous`` (FULL, then NORMAL):

* **drain**: the gateway is stopped, N QoS 1 presses are published and confirmed by the
  broker (queued for the gateway's persistent session), then the gateway starts and
  drains them. Rate = presses / (last commit - first receipt). Two shapes: ``repeat``
  (50 buttons pressed again and again: almost all presses join an open alarm, so this
  is the intake path itself) and ``storm`` (a press on each of many buttons, ten times:
  every button opens an alarm, so dispatch -- alert rendering, SMS -- competes for the
  core). Zero loss is checked in the journal: messages, presses and sequence numbers
  against what the broker confirmed.
* **paced**: presses published live at 100/s (the latency target) and at 2,000/s (the
  throughput target). Latency receipt -> commit is each press's ``latency_ms`` in the
  gateway's own ``alarm.journaled`` / ``alarm.joined`` log events (captured by a
  structlog processor in front of the production JSON renderer); publish -> receipt
  comes from the publish time in the payload and ``device_messages.received_at``.

Targets from issue #3: >= 2,000 presses/s sustained, p99 receipt -> commit <= 5 ms at
100 presses/s. They are reported, never asserted. Prints a table; writes JSON to
bench/results/intake.json.

Internal modes (used by the benchmark itself): ``--publish SPEC`` (device side) and
``--serve-twilio`` (the Twilio double in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import Config, Secrets, parse_config
from gateway.daemon import Gateway
from gateway.district import generate
from gateway.journal import Journal
from gateway.logs import configure_logging
from gateway.registry import load_registry
from tests.support.ports import free_port, wait_port

RESULTS = Path(__file__).resolve().parent / "results" / "intake.json"
TARGET_PRESSES_PER_S = 2_000.0
TARGET_P99_MS = 5.0
LATENCY_RATE = 100.0
GATEWAY_NAME = "bench"
RUN_NAMES = ("drain-repeat", "drain-storm", "paced-100", "paced-100-new", "paced-2000",
             "journal-100")


# -- measurement helpers --------------------------------------------------------------


@dataclass(frozen=True)
class Percentiles:
    n: int
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles | None:
        if not values:
            return None
        ordered = sorted(values)

        def at(q: float) -> float:
            return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

        return cls(len(ordered), round(at(0.5), 3), round(at(0.9), 3), round(at(0.99), 3),
                   round(ordered[-1], 3))


class Tap:
    """A structlog processor that timestamps the intake events it sees, then passes them on.

    It runs in the event loop thread, before the JSON renderer, so the gateway still
    pays for production logging.
    """

    def __init__(self) -> None:
        self.received: list[float] = []
        self.committed: list[tuple[float, float, bool]] = []  # perf_counter, latency, new

    def reset(self) -> None:
        self.received.clear()
        self.committed.clear()

    def __call__(self, logger: Any, method: str,
                 event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event = event_dict.get("event")
        if event == "press.received":
            self.received.append(time.perf_counter())
        elif event in ("alarm.journaled", "alarm.joined"):
            self.committed.append((time.perf_counter(), float(event_dict["latency_ms"]),
                                   event == "alarm.journaled"))
        return event_dict


def pin(pid: int, cpus: set[int]) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(pid, cpus)


# -- the parts: broker, Twilio double, devices --------------------------------------------


class Broker:
    """A private Mosquitto with the shipped no-loss settings on an ephemeral port."""

    def __init__(self, workdir: Path, cpus: set[int]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self._cpus = cpus
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"  # as root it would drop privileges
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "max_queued_messages 0\n"
            "max_queued_bytes 0\n"
            "max_inflight_messages 100\n",
            encoding="utf-8")
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self._proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        pin(self._proc.pid, self._cpus)
        wait_port(self.port)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None


class TwilioProcess:
    """The Twilio double (``gateway.sandbox.twilio_double``) in a process of its own."""

    def __init__(self, cpus: set[int]) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-twilio"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE)
        pin(self._proc.pid, cpus)
        line = self._pipe().readline()
        if not line:
            raise RuntimeError("the Twilio double did not start")
        info = json.loads(line)
        self.base_url: str = info["base_url"]
        self.account_sid: str = info["account_sid"]
        self.auth_token: str = info["auth_token"]

    def _pipe(self) -> Any:
        if self._proc.stdout is None or self._proc.stdin is None:
            raise RuntimeError("the Twilio double has no pipes")
        return self._proc.stdout

    def stop(self) -> int:
        """Stop it; returns how many messages it accepted."""
        out = self._pipe()
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        line = out.readline()
        self._proc.wait(10)
        return int(json.loads(line)["messages"]) if line else -1


@dataclass(frozen=True)
class PublishSpec:
    """What the device process publishes: ``count`` presses over ``topics`` in turn."""

    host: str
    port: int
    topics: list[str]
    count: int
    first_seq: int
    rate: float | None  # presses/s; None = as fast as the window allows
    window: int = 200


def payload(topic: str, seq: int) -> bytes:
    """A press with its sequence number and publish time (extra fields are ignored)."""
    if topic.startswith("zigbee2mqtt/"):
        body: dict[str, Any] = {"action": "emergency"}
    else:
        body = {"v": 1, "event": "sos"}
    body |= {"seq": seq, "sent_at": time.time()}
    return json.dumps(body, separators=(",", ":")).encode()


def publish(spec: PublishSpec) -> dict[str, Any]:
    """The device side (runs in its own process): QoS 1 presses, waits for every PUBACK."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    confirmed = 0
    done = threading.Event()
    lock = threading.Lock()
    slots = threading.Semaphore(spec.window)

    def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        nonlocal confirmed
        slots.release()
        with lock:
            confirmed += 1
            if confirmed == spec.count:
                done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-devices-{os.getpid()}",
                         protocol=paho.MQTTv311)
    client.max_inflight_messages_set(spec.window)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect(spec.host, spec.port)
    client.loop_start()
    start = time.time()
    t0 = time.perf_counter()
    for i in range(spec.count):
        if spec.rate:
            delay = t0 + i / spec.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        slots.acquire()
        topic = spec.topics[i % len(spec.topics)]
        client.publish(topic, payload(topic, spec.first_seq + i), qos=1)
    published = time.time()
    ok = done.wait(120)
    finished = time.time()
    client.disconnect()
    client.loop_stop()
    return {"confirmed": confirmed, "complete": ok, "started_at": start,
            "published_at": published, "confirmed_at": finished,
            "offered_rate": round(spec.count / max(published - start, 1e-9), 1)}


async def run_publisher(spec: PublishSpec, cpus: set[int]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--publish", json.dumps(asdict(spec)),
        stdout=asyncio.subprocess.PIPE)
    pin(proc.pid, cpus)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"publisher failed with {proc.returncode}")
    result: dict[str, Any] = json.loads(out)
    return result


async def serve_twilio() -> None:
    from gateway.sandbox.twilio_double import TwilioDouble

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    # No status progression: the gateway needs the 201 answer only.
    async with TwilioDouble(sent_delay=None, delivered_delay=None) as double:
        print(json.dumps({"base_url": double.base_url, "account_sid": double.account_sid,
                          "auth_token": double.auth_token}), flush=True)
        await asyncio.to_thread(sys.stdin.read)
        print(json.dumps({"messages": len(double.messages)}), flush=True)


# -- the gateway under test -----------------------------------------------------------


@dataclass
class Bench:
    workdir: Path
    registry_dir: Path
    broker: Broker
    twilio: TwilioProcess
    tap: Tap
    other_cpus: set[int]
    topics: list[str]
    seq: int = 0
    runs: int = 0

    def config(self, synchronous: str, state_dir: Path) -> Config:
        return parse_config({
            "gateway": {"name": GATEWAY_NAME, "state_dir": str(state_dir),
                        "journal_synchronous": synchronous, "dedupe_window_s": 3600,
                        "shutdown_timeout_s": 5},
            "registry": {"directory": str(self.registry_dir)},
            "mqtt": {"port": self.broker.port, "reconnect_initial_s": 0.05,
                     "reconnect_max_s": 0.5},
            "alert": {"backend": "none", "repeat_interval_s": 600},
            "sms": {"from_number": "+15005550006", "base_url": self.twilio.base_url,
                    "request_timeout_s": 10, "concurrency": 64},
        }, self.workdir / "bench.toml")

    def secrets(self) -> Secrets:
        return Secrets(self.twilio.account_sid, self.twilio.auth_token, None)

    def fresh_state(self, name: str) -> Path:
        self.runs += 1
        return self.workdir / f"state-{self.runs:02d}-{name}"

    @contextlib.asynccontextmanager
    async def gateway(self, cfg: Config) -> AsyncIterator[Gateway]:
        gw = Gateway(cfg, self.secrets())
        task = asyncio.create_task(gw.run(), name="gateway")
        ready = asyncio.ensure_future(gw.ready.wait())
        await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()
        try:
            if gw.mqtt is None:
                raise RuntimeError("the gateway has no MQTT link")
            await asyncio.wait_for(gw.mqtt.connected.wait(), 30)
            yield gw
        finally:
            gw.request_stop()
            await asyncio.wait_for(task, 120)

    def spec(self, topics: list[str], count: int, rate: float | None) -> PublishSpec:
        spec = PublishSpec("127.0.0.1", self.broker.port, topics, count, self.seq, rate)
        self.seq += count
        return spec

    async def wait_committed(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.tap.committed) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.tap.committed)} of {n} presses journaled")
            await asyncio.sleep(0.02)


def journal_check(db: Path, first_seq: int, count: int) -> dict[str, Any]:
    """Zero-loss accounting from the journal itself."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        seqs = [json.loads(raw)["seq"] for (raw,) in conn.execute(
            "SELECT raw FROM device_messages WHERE kind = 'emergency'")]
        alarms, presses = conn.execute("SELECT COUNT(*), SUM(presses) FROM alarms").fetchone()
        delays = [(received_at - json.loads(raw)["sent_at"]) * 1000 for raw, received_at in
                  conn.execute("SELECT raw, received_at FROM device_messages")]
    expected = set(range(first_seq, first_seq + count))
    # Presses of an earlier run: the broker redelivering what an earlier gateway with
    # the same client id did not acknowledge before it stopped.
    stale = sorted(set(seqs) - expected)
    return {
        "journaled_messages": len(seqs),
        "distinct_presses": len(set(seqs)),
        "missing": len(expected - set(seqs)),
        "redelivered_from_earlier_runs": len(stale),
        "redelivered_seq_range": [stale[0], stale[-1]] if stale else None,
        "alarms": alarms,
        "presses_summed": presses,
        "zero_loss": expected <= set(seqs) and presses == len(seqs),
        "publish_to_receipt_ms": asdict(p) if (p := Percentiles.of(delays)) else None,
    }


async def drain(bench: Bench, synchronous: str, shape: str, devices: int,
                count: int) -> dict[str, Any]:
    """Backlog queued at the broker while the gateway is down, then drained."""
    cfg = bench.config(synchronous, bench.fresh_state(f"drain-{shape}-{synchronous}"))
    topics = bench.topics[:devices]
    async with bench.gateway(cfg):
        pass  # creates the persistent session the backlog is queued for
    spec = bench.spec(topics, count, None)
    published = await run_publisher(spec, bench.other_cpus)
    bench.tap.reset()
    async with bench.gateway(cfg) as gw:
        await bench.wait_committed(published["confirmed"], timeout=600)
        first, last = bench.tap.received[0], bench.tap.committed[-1][0]
        journal, dispatcher = gw.journal, gw.dispatcher
        if journal is None or dispatcher is None:
            raise RuntimeError("the gateway is not running")
        commits, jobs = journal.commits, journal.jobs
        t_idle = time.perf_counter()
        await dispatcher.wait_idle(timeout=600)
        idle_after = time.perf_counter() - t_idle
    stats = Percentiles.of([lat for _, lat, _ in bench.tap.committed])
    if stats is None:
        raise RuntimeError("no press was journaled")
    check = journal_check(cfg.model.gateway.journal_path, spec.first_seq, spec.count)
    return {
        "kind": "drain", "shape": shape, "journal_synchronous": synchronous,
        "devices": devices, "presses": count, "confirmed_by_broker": published["confirmed"],
        "seconds": round(last - first, 3),
        "presses_per_s": round(len(bench.tap.committed) / (last - first), 1),
        "receipt_to_commit_ms": asdict(stats),
        "group_commits": commits, "journal_jobs": jobs,
        "dispatch_still_busy_s": round(idle_after, 3),
        **check,
    }


async def paced(bench: Bench, synchronous: str, rate: float, seconds: float,
                devices: int) -> dict[str, Any]:
    """Presses published live at ``rate``/s while the gateway runs."""
    cfg = bench.config(synchronous, bench.fresh_state(f"paced-{int(rate)}-{synchronous}"))
    topics = bench.topics[:devices]
    count = int(rate * seconds)
    bench.tap.reset()
    async with bench.gateway(cfg) as gw:
        spec = bench.spec(topics, count, rate)
        published = await run_publisher(spec, bench.other_cpus)
        await bench.wait_committed(published["confirmed"], timeout=600)
        last_commit_wall = time.time()
        first, last = bench.tap.received[0], bench.tap.committed[-1][0]
        if gw.dispatcher is None:
            raise RuntimeError("the gateway is not running")
        await gw.dispatcher.wait_idle(timeout=600)
        histogram = {sample.labels.get("le"): sample.value
                     for metric in gw.metrics.journal_latency.collect()
                     for sample in metric.samples if sample.name.endswith("_bucket")}
    latencies = [lat for _, lat, _ in bench.tap.committed]
    joined = [lat for _, lat, new in bench.tap.committed if not new]
    new = [lat for _, lat, is_new in bench.tap.committed if is_new]
    stats = Percentiles.of(latencies)
    if stats is None:
        raise RuntimeError("no press was journaled")
    check = journal_check(cfg.model.gateway.journal_path, spec.first_seq, spec.count)
    within_5 = histogram.get("5.0", 0.0) / max(histogram.get("+Inf", 1.0), 1.0)
    return {
        "kind": "paced", "journal_synchronous": synchronous, "offered_rate": rate,
        "publisher_rate": published["offered_rate"], "devices": devices, "presses": count,
        "confirmed_by_broker": published["confirmed"],
        "achieved_presses_per_s": round(len(latencies) / max(last - first, 1e-9), 1),
        "lag_after_last_publish_s": round(last_commit_wall - published["published_at"], 3),
        "receipt_to_commit_ms": asdict(stats),
        "receipt_to_commit_ms_new_alarm": asdict(p) if (p := Percentiles.of(new)) else None,
        "receipt_to_commit_ms_joined": asdict(p) if (p := Percentiles.of(joined)) else None,
        "histogram_share_le_5ms": round(within_5, 4),
        **check,
    }


async def journal_only(bench: Bench, synchronous: str, rate: float, seconds: float,
                       devices: int) -> dict[str, Any]:
    """The journal alone (no MQTT, no logging, no dispatch): ``record_press`` at ``rate``/s.

    The share of receipt -> commit that SQLite and the writer thread account for.
    """
    path = bench.fresh_state(f"journal-{synchronous}") / "journal.sqlite3"
    count = int(rate * seconds)
    latencies: list[float] = []
    async with Journal(path, synchronous=synchronous) as journal:
        t0 = time.perf_counter()
        for i in range(count):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            start = time.perf_counter()
            await journal.record_press(
                device_id=f"D{i % devices:04d}", elder_id=f"E{i % devices:04d}",
                code="emergency", source="bench", address="bench", raw=b"{}",
                received_at=time.time(), dedupe_window_s=3600)
            latencies.append((time.perf_counter() - start) * 1000)
        elapsed = time.perf_counter() - t0
        alarms = await journal.count("alarms")
        messages = await journal.count("device_messages")
    stats = Percentiles.of(latencies)
    if stats is None:
        raise RuntimeError("no press was journaled")
    return {
        "kind": "journal", "journal_synchronous": synchronous, "offered_rate": rate,
        "devices": devices, "presses": count, "alarms": alarms,
        "journaled_messages": messages, "missing": count - messages,
        "zero_loss": messages == count,
        "achieved_presses_per_s": round(count / elapsed, 1),
        "receipt_to_commit_ms": asdict(stats),
    }


# -- main -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import aiomqtt
    import paho.mqtt

    version = subprocess.run([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"],
                             capture_output=True, text=True, check=False).stdout.split("\n")[0]
    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "sqlite": sqlite3.sqlite_version,
        "mosquitto": version.strip(), "aiomqtt": aiomqtt.__version__,
        "paho_mqtt": paho.mqtt.__version__,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'run':<16}{'sync':<8}{'devices':>8}{'alarms':>8}{'presses':>8}{'rate/s':>9}"
          f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'lost':>6}")
    for r in results:
        rate = r.get("presses_per_s") or r["achieved_presses_per_s"]
        lat = r["receipt_to_commit_ms"]
        print(f"{r['run']:<16}{r['journal_synchronous']:<8}{r['devices']:>8}{r['alarms']:>8}"
              f"{r['presses']:>8}{rate:>9.0f}{lat['p50']:>9.2f}{lat['p99']:>9.2f}"
              f"{lat['max']:>9.1f}{r['missing']:>6}")


async def bench_main(args: argparse.Namespace) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    gateway_cpu = {cpus[0]}
    other_cpus = set(cpus[1:]) or gateway_cpu
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp:
        workdir = Path(tmp)
        broker = Broker(workdir / "mosquitto", other_cpus)
        broker.start()
        twilio = TwilioProcess(other_cpus)
        # Pin only now: the helpers above inherit nothing from the gateway's CPU.
        pin(0, gateway_cpu)
        try:
            registry_dir = workdir / "registry"
            generate(registry_dir, elders=720, responders=300, seed=11, width_km=5.0,
                     height_km=4.5, area_name="垦利区")
            registry = load_registry(registry_dir)
            topics = []
            for d in sorted(registry.devices.values(), key=lambda d: d.device_id):
                if d.scheme == "mqtt":
                    own = d.address.startswith("alarm/buttons/")
                    topics.append(f"{d.address}/event" if own else d.address)
            tap = Tap()
            log_file = (workdir / "gateway.log").open("w", encoding="utf-8")
            configure_logging("info", "json", stream=log_file)
            # aiomqtt warns on stderr whenever >10 of the gateway's own publishes (alarm
            # state announcements) await their PUBACK; expected in a storm, noise here.
            logging.getLogger("mqtt").setLevel(logging.ERROR)
            processors = structlog.get_config()["processors"]
            structlog.configure(processors=[tap, *processors])
            bench = Bench(workdir, registry_dir, broker, twilio, tap, other_cpus, topics)
            quick = args.quick
            runs: dict[str, Callable[[str], Awaitable[dict[str, Any]]]] = {
                "drain-repeat": lambda sync: drain(bench, sync, "repeat", 50,
                                                   5_000 if quick else 20_000),
                "drain-storm": lambda sync: drain(bench, sync, "storm", 200 if quick else 500,
                                                  2_000 if quick else 5_000),
                # 50 buttons: the first press of each opens an alarm, the rest join.
                "paced-100": lambda sync: paced(bench, sync, LATENCY_RATE,
                                                5 if quick else 20, 50),
                # Every press a new alarm: 100 alarms/s, each dispatched (SMS, alert).
                "paced-100-new": lambda sync: paced(bench, sync, LATENCY_RATE,
                                                    3 if quick else 5, 500),
                "paced-2000": lambda sync: paced(bench, sync, TARGET_PRESSES_PER_S,
                                                 3 if quick else 10, 50),
                "journal-100": lambda sync: journal_only(bench, sync, LATENCY_RATE,
                                                         5 if quick else 20, 50),
            }
            results: list[dict[str, Any]] = []
            for sync in args.sync:
                for name, run in runs.items():
                    if not args.only or name in args.only:
                        print(f"... {name} {sync}", file=sys.stderr, flush=True)
                        results.append({"run": name, **await run(sync)})
            log_file.close()
        finally:
            sms = twilio.stop()
            broker.stop()
    latency_runs = [r for r in results if r["run"] == "paced-100"]
    sustained = [r for r in results if r["run"] == "drain-repeat"]
    return {
        "benchmark": "gateway intake (MQTT -> journal)",
        "quick": quick,
        "gateway_cpus": sorted(gateway_cpu), "helper_cpus": sorted(other_cpus),
        "targets": {
            "presses_per_s": TARGET_PRESSES_PER_S,
            "p99_receipt_to_commit_ms_at_100_per_s": TARGET_P99_MS,
            "presses_per_s_met": {r["journal_synchronous"]: r["presses_per_s"]
                                  >= TARGET_PRESSES_PER_S for r in sustained},
            "p99_met": {r["journal_synchronous"]: r["receipt_to_commit_ms"]["p99"]
                        <= TARGET_P99_MS for r in latency_runs},
            "zero_loss": all(r["zero_loss"] for r in results),
        },
        "sms_accepted_by_double": sms,
        "machine": machine(),
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter runs (about a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default {RESULTS}")
    parser.add_argument("--only", action="append", metavar="RUN",
                        choices=RUN_NAMES, help="run only these (repeatable): "
                        + ", ".join(RUN_NAMES))
    parser.add_argument("--sync", action="append", choices=("FULL", "NORMAL"),
                        help="journal_synchronous modes (default both)")
    parser.add_argument("--publish", help=argparse.SUPPRESS)
    parser.add_argument("--serve-twilio", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sync = args.sync or ["FULL", "NORMAL"]
    if args.publish:
        print(json.dumps(publish(PublishSpec(**json.loads(args.publish)))))
        return 0
    if args.serve_twilio:
        asyncio.run(serve_twilio())
        return 0
    report = asyncio.run(bench_main(args))
    print_table(report["results"])
    t = report["targets"]
    print(f"targets: >= {TARGET_PRESSES_PER_S:,.0f} presses/s sustained (drain repeat): "
          f"{t['presses_per_s_met']}; p99 <= {TARGET_P99_MS} ms at {LATENCY_RATE:g}/s: "
          f"{t['p99_met']}; zero loss: {t['zero_loss']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                        encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
