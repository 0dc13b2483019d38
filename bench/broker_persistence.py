#!/usr/bin/env python3
"""What Mosquitto's persistence settings cost, and what they save in a power cut.

Mosquitto runs with the SHIPPED config/mosquitto.conf and ACL (paths and ports moved,
as the chaos suite does), with only the autosave settings varied:

* ``every change``: ``autosave_on_changes true``, ``autosave_interval 1``
* ``every 10`` / ``every 100``: ``autosave_on_changes true``, ``autosave_interval N``
* ``30 s``: ``autosave_on_changes false``, ``autosave_interval 30`` (the old shipped one)

Saving writes the whole database, so each setting is measured with a backlog queued
for an offline persistent session (depth 0 / 1,000 / 10,000 messages; a gateway that
is down, or a slow one): the cost of a save grows with the backlog.

Per setting and depth: QoS 1 throughput publisher -> broker -> online subscriber
(2,000 messages, 100 in flight) and latency (300 sequential round trips, p50/p99).
Then the power cut: the gateway's persistent session (MQTT 3.1.1, clean_session false,
QoS 1) is offline, 637 presses are PUBACKed to the publisher, the broker is SIGKILLed
0-2 s after the last PUBACK and restarted; the presses the session still receives are
counted (three trials per setting).

    .venv/bin/python bench/broker_persistence.py [--quick]

Prints a table and writes ``bench/results/broker_persistence.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chaos.rig import GATEWAY_USER, Z2M_USER, Broker

RESULTS = Path(__file__).resolve().parent / "results" / "broker_persistence.json"
SETTINGS: dict[str, dict[str, str]] = {
    "every change": {"autosave_on_changes": "true", "autosave_interval": "1"},
    "every 10": {"autosave_on_changes": "true", "autosave_interval": "10"},
    "every 100": {"autosave_on_changes": "true", "autosave_interval": "100"},
    "30 s": {"autosave_on_changes": "false", "autosave_interval": "30"},
}
BENCH_TOPIC = "zigbee2mqtt/bench"
BACKLOG_TOPIC = "zigbee2mqtt/backlog"
PRESS_TOPIC = "zigbee2mqtt/press"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.005)


class Client:
    """A paho client in its own thread that counts PUBACKs and received messages."""

    def __init__(self, broker: Broker, user: str, client_id: str, *,
                 subscribe: str | None = None, clean: bool = True) -> None:
        self.acked = 0
        self.received: dict[bytes, float] = {}
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv311, clean_session=clean)
        self.client.username_pw_set(user, broker.passwords[user])
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.subscribed = threading.Event()

        def on_connect(c: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if not rc.is_failure:
                self.connected.set()
                if subscribe:
                    c.subscribe(subscribe, qos=1)

        def on_subscribe(*_args: Any) -> None:
            self.subscribed.set()

        def on_publish(*_args: Any) -> None:
            with self._lock:
                self.acked += 1

        def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            self.received.setdefault(msg.payload, time.perf_counter())

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_publish = on_publish
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        wait_for(self.connected.is_set, 10, f"{client_id} connected")
        if subscribe:
            wait_for(self.subscribed.is_set, 10, f"{client_id} subscribed")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_broker(workdir: Path, setting: dict[str, str]) -> Broker:
    broker = Broker(workdir, [GATEWAY_USER, Z2M_USER], overrides=dict(setting))
    broker.prepare()
    return broker


def fill_backlog(broker: Broker, depth: int, setting: dict[str, str]) -> None:
    """Queue ``depth`` messages for an offline persistent session (with the cheap 30 s
    setting: filling under "every change" rewrites the growing database per message),
    then restart the broker cleanly with ``setting`` (it saves on SIGTERM), so the
    measured run starts with the backlog in its database."""
    broker.write_conf(SETTINGS["30 s"])
    broker.start()
    session = Client(broker, GATEWAY_USER, "gw-backlog", subscribe=f"{BACKLOG_TOPIC}/#",
                     clean=False)
    session.close()
    if depth:
        pub = Client(broker, Z2M_USER, "pub-backlog")
        payload = b'{"action":"emergency","pad":"' + b"x" * 100 + b'"}'
        for _ in range(depth):
            pub.client.publish(f"{BACKLOG_TOPIC}/x", payload, qos=1)
        wait_for(lambda: pub.acked >= depth, 600, "backlog PUBACKed")
        pub.close()
    broker.stop()
    broker.write_conf(setting)
    broker.start()


def measure(broker: Broker, n_rate: int, n_latency: int) -> dict[str, float]:
    sub = Client(broker, GATEWAY_USER, "gw-bench", subscribe=f"{BENCH_TOPIC}/#")
    pub = Client(broker, Z2M_USER, "pub-bench")
    try:
        t0 = time.perf_counter()
        for i in range(n_rate):
            pub.client.publish(f"{BENCH_TOPIC}/r", b"r%d" % i, qos=1)
        wait_for(lambda: len(sub.received) >= n_rate, 600, "throughput messages received")
        elapsed = time.perf_counter() - t0
        latencies = []
        for i in range(n_latency):
            payload = b"l%d" % i
            sent = time.perf_counter()
            pub.client.publish(f"{BENCH_TOPIC}/l", payload, qos=1)
            wait_for(lambda p=payload: p in sub.received, 30, "latency message received")
            latencies.append((sub.received[payload] - sent) * 1000)
        latencies.sort()
        return {"rate_msg_s": round(n_rate / elapsed, 1),
                "p50_ms": round(statistics.median(latencies), 3),
                "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 3),
                "db_bytes": db_size(broker)}
    finally:
        pub.close()
        sub.close()


def db_size(broker: Broker) -> int:
    db = broker.workdir / "data" / "mosquitto.db"
    return db.stat().st_size if db.exists() else 0


def power_cut(broker: Broker, presses: int, rng: random.Random) -> dict[str, Any]:
    """The gateway's session is offline; presses are PUBACKed; the broker dies."""
    gw = Client(broker, GATEWAY_USER, "gw-powercut", subscribe=f"{PRESS_TOPIC}/#", clean=False)
    gw.close()
    broker.stop()  # a broker that has run a while: the session itself is saved
    broker.start()
    pub = Client(broker, Z2M_USER, "pub-powercut")
    for i in range(presses):
        pub.client.publish(f"{PRESS_TOPIC}/x", b'{"action":"emergency","n":%d}' % i, qos=1)
    wait_for(lambda: pub.acked >= presses, 120, "presses PUBACKed")
    pub.close()
    delay = rng.uniform(0, 2)
    time.sleep(delay)
    broker.kill()
    broker.start()
    gw = Client(broker, GATEWAY_USER, "gw-powercut", subscribe=f"{PRESS_TOPIC}/#", clean=False)
    last, still = -1, 0.0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until nothing more arrives for 2 s
        count = len(gw.received)
        if count == last:
            if time.monotonic() - still > 2:
                break
        else:
            last, still = count, time.monotonic()
        time.sleep(0.05)
    kept = len(gw.received)
    gw.close()
    # Drop the session for the next trial: connect clean once.
    Client(broker, GATEWAY_USER, "gw-powercut", clean=True).close()
    return {"presses": presses, "kept": kept, "lost": presses - kept,
            "kill_after_s": round(delay, 2)}


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "load_avg": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="depths 0 and 1,000; 1 trial")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--power-cut-only", action="store_true",
                        help="skip the rate and latency runs")
    parser.add_argument("--presses", type=int, default=637,
                        help="presses per power cut (not a round number: a save boundary "
                        "at the last press would hide the window)")
    args = parser.parse_args(argv)
    depths = [0, 1000] if args.quick else [0, 1000, 10_000]
    trials = 1 if args.quick else 3
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    cuts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="broker-persistence-") as tmp:
        for name, setting in SETTINGS.items():
            for depth in [] if args.power_cut_only else depths:
                broker = make_broker(Path(tmp) / f"{name}-{depth}".replace(" ", "_"), setting)
                try:
                    fill_backlog(broker, depth, setting)
                    result = measure(broker, 2000, 300)
                finally:
                    broker.stop()
                rows.append({"setting": name, "backlog": depth, **result})
                print(f"{name:<13} backlog {depth:>6}: {result['rate_msg_s']:>8.1f} msg/s  "
                      f"p50 {result['p50_ms']:>7.3f} ms  p99 {result['p99_ms']:>8.3f} ms  "
                      f"db {result['db_bytes']:>9} B", flush=True)
            broker = make_broker(Path(tmp) / f"{name}-cut".replace(" ", "_"), setting)
            broker.start()
            try:
                for _ in range(trials):
                    cut = {"setting": name, **power_cut(broker, args.presses, rng)}
                    cuts.append(cut)
                    print(f"{name:<13} power cut: {cut['lost']:>4} of {cut['presses']} lost "
                          f"(killed {cut['kill_after_s']} s after the last PUBACK)", flush=True)
            finally:
                broker.stop()
    print()
    print(f"{'setting':<13} {'backlog':>7} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>9}")
    for row in rows:
        print(f"{row['setting']:<13} {row['backlog']:>7} {row['rate_msg_s']:>9.1f} "
              f"{row['p50_ms']:>8.3f} {row['p99_ms']:>9.3f}")
    print(f"\n{'setting':<13} power cut: lost of {args.presses} per trial")
    for name in SETTINGS:
        print(f"{name:<13} {[c['lost'] for c in cuts if c['setting'] == name]}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out = RESULTS.with_name("broker_persistence_power_cut.json") if args.power_cut_only \
        else RESULTS
    out.write_text(json.dumps({"machine": machine(), "runs": rows, "power_cuts": cuts},
                                  indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
