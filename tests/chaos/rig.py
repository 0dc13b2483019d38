"""The chaos rig: the gateway as deployed, its broker, the Twilio double, and press makers.

Everything runs as its own process and is driven only through the deployed surface:
``gateway run --config FILE``, MQTT through Mosquitto started as on a Debian server:
the stock main file with the SHIPPED drop-in ``config/mosquitto.conf`` and the ACL
rendered from the shipped template ``config/mosquitto.acl`` and the district (only
paths and ports moved, ``user root`` when run as root), a Sur-Gard line over a socat
pty pair, the journal file (read from a copy), the Twilio double's list API and the
control API's /health.

Each press carries a unique marker (a ``chaos`` field in the JSON payload; the zone of
a Contact ID frame), so the reconciliation can follow it from the broker's PUBACK to the
journal row to the family's SMS, which quotes the alarm reference.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import secrets
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tty
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.broker import render_acl
from gateway.model import Registry
from gateway.registry import load_registry
from tests.support.ports import free_port, wait_port
from tests.support.stock_broker import SHIPPED_TEMPLATE, StockBroker

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
GATEWAY_BIN = VENV_BIN / "gateway"
ACCOUNT_SID = "AC" + "c4" * 16
FROM_NUMBER = "+15005550006"
GATEWAY_USER = "gateway"
Z2M_USER = "zigbee2mqtt"
REF = re.compile(r"[0-9A-Z]{4}-[0-9A-Z]{4}")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:
    """Poll ``predicate`` until truthy (bounded); raise naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)


# ----------------------------------------------------------------------------- district


@dataclass(frozen=True)
class District:
    directory: Path
    registry: Registry

    @classmethod
    def generate(cls, directory: Path, elders: int, responders: int) -> District:
        subprocess.run([sys.executable, "-m", "gateway.district", "--out", str(directory),
                        "--elders", str(elders), "--responders", str(responders)],
                       check=True, capture_output=True, timeout=120)
        return cls(directory, load_registry(directory))

    def devices(self, prefix: str) -> list[Any]:
        return sorted((d for d in self.registry.devices.values()
                       if d.address.startswith(prefix)), key=lambda d: d.device_id)

    @property
    def z2m(self) -> list[Any]:
        return self.devices("zigbee2mqtt/")

    @property
    def own(self) -> list[Any]:
        return self.devices("alarm/buttons/")

    @property
    def contact_id(self) -> list[Any]:
        return sorted((d for d in self.registry.devices.values() if d.scheme == "contact_id"),
                      key=lambda d: d.device_id)

    def family_phones(self, device_id: str) -> set[str]:
        device = self.registry.devices[device_id]
        return {c.phone for c in self.registry.elders[device.elder_id].contacts}


# ----------------------------------------------------------------------------- broker


@dataclass
class Broker:
    """Mosquitto as on the server: Debian's stock main file, the shipped drop-in and the
    ACL ``gateway broker-acl`` renders from the shipped template and the district's
    registry (tests/support/stock_broker.py). ``overrides`` only for the benchmark."""

    workdir: Path
    users: Iterable[str]
    overrides: dict[str, str] = field(default_factory=dict)
    registry: Registry | None = None  # None: the static roles only (gateway, bridge, ...)
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    passwords: dict[str, str] = field(default_factory=dict)
    _mosquitto: StockBroker = field(init=False)

    def __post_init__(self) -> None:
        # No debug log: a storm of presses would be written line by line.
        self._mosquitto = StockBroker(self.workdir, self.port, self.tls_port, debug_log=False)

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self._mosquitto.proc

    @property
    def starts(self) -> int:
        return self._mosquitto.starts

    def prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        registry = self.registry or Registry.build({}, {}, {}, {})
        (self.workdir / "alarm.acl").write_text(
            render_acl(registry, SHIPPED_TEMPLATE.read_text(encoding="utf-8")),
            encoding="utf-8")
        self.passwords = {u: "pw-" + secrets.token_hex(6) for u in self.users}
        plain = self.workdir / "alarm.passwd"
        plain.write_text("".join(f"{u}:{p}\n" for u, p in self.passwords.items()),
                         encoding="utf-8")
        subprocess.run(["mosquitto_passwd", "-U", str(plain)], check=True,
                       capture_output=True, timeout=120)
        self.write_conf(self.overrides)

    def write_conf(self, overrides: dict[str, str]) -> None:
        """Main file and drop-in, paths and ports moved (and ``overrides``, bench only)."""
        self._mosquitto.lay_out(overrides)

    @property
    def conf_text(self) -> str:
        """The drop-in as started (where the shipped settings are)."""
        return self._mosquitto.dropin.read_text(encoding="utf-8")

    def start(self) -> None:
        self._mosquitto.start()

    def kill(self) -> None:
        """SIGKILL: nothing is saved beyond the last autosave."""
        self._mosquitto.kill()

    def stop(self) -> None:
        self._mosquitto.stop()

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self._mosquitto.log.splitlines()[-n:])


# ----------------------------------------------------------------------------- Twilio


@dataclass
class TwilioProc:
    """The Twilio double in its own process (tests/chaos/twilio_chaos.py)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    auth_token: str = field(default_factory=lambda: secrets.token_hex(16))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "twilio.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.chaos.twilio_chaos", "--port", str(self.port),
                 "--control-port", str(self.control_port), "--account-sid", ACCOUNT_SID,
                 "--auth-token", self.auth_token], stdout=log, stderr=log, cwd=REPO)
        wait_port(self.control_port, 20)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.control_port}{path}", data=data,
                                     method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as answer:
            return json.loads(answer.read())

    def accepted(self) -> list[tuple[str, str]]:
        """(to, body) of every message the double accepted, read through Twilio's list API."""
        auth = base64.b64encode(f"{ACCOUNT_SID}:{self.auth_token}".encode()).decode()
        out: list[tuple[str, str]] = []
        uri: str | None = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json?PageSize=1000"
        for _ in range(10_000):  # bounded paging
            if uri is None:
                break
            req = urllib.request.Request(self.base_url + uri,
                                         headers={"Authorization": f"Basic {auth}"})
            with urllib.request.urlopen(req, timeout=30) as answer:
                page = json.loads(answer.read())
            out += [(m["to"], m["body"]) for m in page["messages"]
                    if m["direction"] == "outbound-api"]
            uri = page["next_page_uri"]
        return out


# ----------------------------------------------------------------------------- gateway


def gateway_command() -> list[str]:
    """The deployed entry point; ``CHAOS_GATEWAY_TREE=DIR`` runs another checkout's code
    (e.g. ``git archive`` of a commit) with this venv, to compare trees."""
    if os.environ.get("CHAOS_GATEWAY_TREE"):
        return [sys.executable, "-m", "gateway.cli"]
    return [str(GATEWAY_BIN)]


@dataclass
class GatewayProc:
    """``gateway run --config FILE`` as its own process, restarted after every kill."""

    workdir: Path
    state_dir: Path
    district: District
    broker: Broker
    twilio: TwilioProc
    serial: list[dict[str, str]] = field(default_factory=list)
    control_port: int = field(default_factory=free_port)
    # The control API's TCP listener needs a bearer token (CONTROL_TOKEN).
    control_token: str = field(default_factory=lambda: secrets.token_hex(32))
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    exits: list[int] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.workdir / "gateway.toml"

    @property
    def journal(self) -> Path:
        return self.state_dir / "journal.sqlite3"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        serial = "".join(
            f'\n[[serial]]\nname = "{s["name"]}"\nport = "{s["port"]}"\nprotocol = "surgard"\n'
            for s in self.serial)
        self.config.write_text(f"""\
[gateway]
name = "chaos"
state_dir = "{self.state_dir}"
journal_synchronous = "FULL"
shutdown_timeout_s = 10

[registry]
directory = "{self.district.directory}"
watch_interval_s = 0

[logging]
level = "info"
format = "json"

[mqtt]
enabled = true
host = "127.0.0.1"
port = {self.broker.port}
username = "{GATEWAY_USER}"
reconnect_initial_s = 0.2
reconnect_max_s = 2

[alert]
backend = "none"

[sms]
from_number = "{FROM_NUMBER}"
base_url = "{self.twilio.base_url}"
request_timeout_s = 3
retry_later_s = 5
{serial}
[control]
host = "127.0.0.1"
port = {self.control_port}
""", encoding="utf-8")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TWILIO_", "MQTT_", "CREDENTIALS_DIRECTORY"))}
        if tree := os.environ.get("CHAOS_GATEWAY_TREE"):
            env["PYTHONPATH"] = tree
        env |= {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": self.twilio.auth_token,
                "MQTT_PASSWORD": self.broker.passwords[GATEWAY_USER],
                "CONTROL_TOKEN": self.control_token}
        return env

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with (self.workdir / "gateway.log").open("ab") as log:
            log.write(f'{{"chaos":"start {self.starts}"}}\n'.encode())
            log.flush()
            self.proc = subprocess.Popen([*gateway_command(), "run", "--config", str(self.config)],
                                         stdout=log, stderr=log, env=self.env(), cwd=self.workdir)

    def health(self) -> dict[str, Any] | None:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{self.control_port}/health",
                                         headers={"Authorization": f"Bearer {self.control_token}"})
            with urllib.request.urlopen(req, timeout=2) as answer:
                return json.loads(answer.read())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def ready(self) -> bool:
        health = self.health()
        return bool(health and health.get("status") == "ok" and all(health["links"].values()))

    def wait_ready(self, timeout: float = 60) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.log_tail()}")
            return self.ready()
        wait_until(up, timeout, "gateway ready (health ok, links up)", 0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.exits.append(self.proc.wait(10))
            self.kills += 1
            self.proc = None

    def stop(self, timeout: float = 40) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self.exits.append(code)
        self.proc = None
        return code

    def log_lines(self, event: str) -> list[str]:
        path = self.workdir / "gateway.log"
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        return [line for line in text.splitlines() if f'"{event}"' in line]

    def log_count(self, prefix: str, levels: tuple[str, ...]) -> int:
        """Log lines whose event starts with ``prefix``, at one of ``levels``."""
        wanted = {f'"level":"{level}"' for level in levels}
        return sum(1 for line in self.log_lines_all()
                   if f'"event":"{prefix}' in line and any(w in line for w in wanted))

    def log_lines_all(self) -> list[str]:
        path = self.workdir / "gateway.log"
        return path.read_text(encoding="utf-8", errors="replace").splitlines() \
            if path.exists() else []

    def log_tail(self, n: int = 30) -> str:
        path = self.workdir / "gateway.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])


# ----------------------------------------------------------------------------- presses


@dataclass
class Press:
    marker: str
    device_id: str
    topic: str  # MQTT topic, or "serial" for a Contact ID frame
    payload: bytes
    sent_at: float = 0.0
    acked_at: float | None = None  # broker PUBACK (MQTT) or receiver ACK (serial)
    confirmed_at: float | None = None  # the gateway's end-to-end confirmation (own buttons)
    resends: int = 0


class MqttPresser:
    """Buttons pressing through the broker: one session for the Zigbee2MQTT bridge, one per
    button of our own make (username = device id, as the shipped ACL wants).

    paho keeps every unacknowledged QoS 1 publish and sends it again after a reconnect,
    as a button does until it gets its PUBACK. With ``confirm`` the own buttons also
    resend until the gateway's per-device confirmation arrives."""

    def __init__(self, broker: Broker, district: District, *, confirm: bool = False,
                 resend_s: float = 2.0, resend_cap_s: float = 60.0) -> None:
        self.broker, self.district = broker, district
        self.confirm = confirm
        self.resend_s, self.resend_cap_s = resend_s, resend_cap_s
        self.presses: list[Press] = []
        self._lock = threading.Lock()
        self._clients: dict[str, paho.Client] = {}
        self._inflight: dict[tuple[str, int], Press] = {}
        self._early: set[tuple[str, int]] = set()
        self._by_seq: dict[tuple[str, int], Press] = {}
        self._seq = 0
        self._stop = threading.Event()
        self._resender: threading.Thread | None = None

    def _client(self, user: str) -> paho.Client:
        if user in self._clients:
            return self._clients[user]
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"chaos-{user}",
                             protocol=paho.MQTTv311, clean_session=False)
        client.username_pw_set(user, self.broker.passwords[user])
        client.reconnect_delay_set(0.1, 1)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)

        # paho calls this holding its own message lock; publish() takes that lock too,
        # so publish() is never called with self._lock held (lock order).
        def on_publish(_c: paho.Client, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
            with self._lock:
                press = self._inflight.pop((user, mid), None)
                if press is None:
                    self._early.add((user, mid))  # PUBACK before publish() returned
                elif press.acked_at is None:
                    press.acked_at = time.monotonic()

        def on_connect(c: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if self.confirm and user != Z2M_USER and not rc.is_failure:
                c.subscribe(f"alarm/buttons/{user}/confirm", qos=1)

        def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                seq = json.loads(msg.payload).get("seq")
                with self._lock:
                    press = self._by_seq.get((user, int(seq)))
                    if press is not None and press.confirmed_at is None:
                        press.confirmed_at = time.monotonic()

        client.on_publish = on_publish
        client.on_connect = on_connect
        client.on_message = on_message
        client.connect_async("127.0.0.1", self.broker.port, keepalive=10)
        client.loop_start()
        self._clients[user] = client
        return client

    def press(self, device: Any) -> Press:
        with self._lock:
            self._seq += 1
            seq = self._seq
        marker = f"m{seq:06d}-{secrets.token_hex(3)}"
        if device.address.startswith("zigbee2mqtt/"):
            user, topic = Z2M_USER, device.address
            body: dict[str, Any] = {"action": "emergency", "battery": 80, "linkquality": 120,
                                    "chaos": marker}
        else:
            user, topic = device.device_id, f"{device.address}/event"
            body = {"v": 1, "event": "sos", "seq": seq, "chaos": marker}
        press = Press(marker, device.device_id, topic, json.dumps(body).encode())
        client = self._client(user)
        with self._lock:
            press.sent_at = time.monotonic()
            self.presses.append(press)
            self._by_seq[(user, seq)] = press
        self._publish(user, client, press)
        if self.confirm and user != Z2M_USER and self._resender is None:
            self._resender = threading.Thread(target=self._resend_loop, name="chaos-resend",
                                              daemon=True)
            self._resender.start()
        return press

    def _resend_loop(self) -> None:
        """Resend each unconfirmed press of our own buttons, the same bytes, with capped
        jittered exponential backoff (devices/SCHEMA.md: 2 s doubling to 60 s, each
        delay drawn uniformly below the ceiling)."""
        rng = random.Random(7)
        due_at: dict[str, float] = {}
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                waiting = [p for p in self.presses if p.topic.startswith("alarm/buttons/")
                           and p.confirmed_at is None]
            for press in waiting:
                ceiling = min(self.resend_cap_s, self.resend_s * 2 ** press.resends)
                when = due_at.setdefault(press.marker,
                                         press.sent_at + rng.uniform(0.5, 1) * ceiling)
                if now < when:
                    continue
                with self._lock:
                    press.resends += 1
                del due_at[press.marker]
                self._publish(press.device_id, self._clients[press.device_id], press)

    def _publish(self, user: str, client: paho.Client, press: Press) -> None:
        press.sent_at = time.monotonic()
        info = client.publish(press.topic, press.payload, qos=1)
        with self._lock:
            if (user, info.mid) in self._early:
                self._early.discard((user, info.mid))
                if press.acked_at is None:
                    press.acked_at = time.monotonic()
            else:
                self._inflight[(user, info.mid)] = press

    def all_acked(self) -> bool:
        with self._lock:
            return all(p.acked_at is not None for p in self.presses)

    def unconfirmed(self) -> list[Press]:
        with self._lock:
            return [p for p in self.presses
                    if p.topic.startswith("alarm/buttons/") and p.confirmed_at is None]

    def close(self) -> None:
        self._stop.set()
        if self._resender is not None:
            self._resender.join(5)
        for client in self._clients.values():
            client.disconnect()
            client.loop_stop()
        self._clients.clear()


class SerialLine:
    """A socat pty pair: the gateway opens ``gateway_path``, the receiver ``device_path``.
    Killing socat is the cable pulled; starting it again (same links) plugs it back."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.gateway_path = str(workdir / "rx-gw")
        self.device_path = str(workdir / "rx-dev")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pulls = 0

    def plug(self) -> None:
        self.proc = subprocess.Popen(
            ["socat", f"pty,raw,echo=0,link={self.gateway_path}",
             f"pty,raw,echo=0,link={self.device_path}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: os.path.exists(self.gateway_path) and os.path.exists(self.device_path),
                   10, "socat links")

    def pull(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # socat closes both ptys and removes its links
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
            self.pulls += 1
        for link in (self.gateway_path, self.device_path):
            if os.path.lexists(link) and not os.path.exists(link):
                os.unlink(link)


class SurGardReceiver(threading.Thread):
    """A Sur-Gard receiver: sends each Contact ID frame, resending every ``ack_timeout``
    until the gateway answers ACK (which it may only do after the journal commit)."""

    def __init__(self, line: SerialLine, ack_timeout: float = 2.0) -> None:
        super().__init__(name="chaos-surgard", daemon=True)
        self.line = line
        self.ack_timeout = ack_timeout
        self.presses: list[Press] = []
        self._pending: list[Press] = []
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._zone = 0

    def press(self, device: Any) -> Press:
        with self._lock:
            self._zone += 1
            zone = f"{self._zone % 1000:03d}"
        frame = encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", zone)
        press = Press(f"{device.address}/{zone}", device.device_id, "serial", frame,
                      sent_at=time.monotonic())
        with self._lock:
            self.presses.append(press)
            self._pending.append(press)
        return press

    def _open(self) -> int | None:
        try:
            fd = os.open(self.line.device_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            return None
        tty.setraw(fd)
        return fd

    def run(self) -> None:
        fd: int | None = None
        while not self._halt.is_set():
            if fd is None:
                fd = self._open()
                if fd is None:
                    self._halt.wait(0.1)
                    continue
            with self._lock:
                press = self._pending[0] if self._pending else None
            if press is None:
                self._halt.wait(0.05)
                continue
            try:
                os.write(fd, press.payload)
                deadline = time.monotonic() + self.ack_timeout
                got = b""
                while ACK not in got and time.monotonic() < deadline:
                    ready, _, _ = select.select([fd], [], [], 0.1)
                    if ready:
                        chunk = os.read(fd, 64)
                        if not chunk:
                            break  # the line closed: resend once it is back
                        got += chunk
                if ACK in got:
                    press.acked_at = time.monotonic()
                    with self._lock:
                        self._pending.pop(0)
                else:
                    press.resends += 1
            except OSError:
                with contextlib.suppress(OSError):
                    os.close(fd)
                fd = None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def all_acked(self) -> bool:
        with self._lock:
            return not self._pending

    def close(self) -> None:
        self._halt.set()
        self.join(10)


# ----------------------------------------------------------------------------- reconciling


def snapshot_journal(journal: Path, into: Path) -> Path:
    """A consistent copy of the journal (with its WAL) that can be opened read-write."""
    into.mkdir(parents=True, exist_ok=True)
    for old in into.glob("journal.sqlite3*"):
        old.unlink()
    for suffix in ("", "-wal"):
        src = Path(str(journal) + suffix)
        if src.exists():
            shutil.copyfile(src, into / ("journal.sqlite3" + suffix))
    return into / "journal.sqlite3"


@dataclass
class JournalView:
    #: marker -> (kind, alarm id) of each journal row carrying it. A Zigbee2MQTT state
    #: message is journaled once per event it holds (the press, its battery, its link
    #: quality), so only rows of kind ``emergency`` count as the press's journal rows.
    by_marker: dict[str, list[tuple[str | None, str | None]]]
    alarms: dict[str, str]  # alarm id -> device id

    @classmethod
    def read(cls, journal: Path, into: Path, serial_frames: dict[bytes, str]) -> JournalView:
        by_marker: dict[str, list[tuple[str | None, str | None]]] = defaultdict(list)
        alarms: dict[str, str] = {}
        if not journal.exists():
            return cls(by_marker, alarms)
        copy = snapshot_journal(journal, into)
        conn = sqlite3.connect(copy, timeout=10)
        try:
            for raw, kind, alarm_id in conn.execute(
                    "SELECT raw, kind, alarm_id FROM device_messages WHERE raw IS NOT NULL"):
                marker = _marker_of(bytes(raw), serial_frames)
                if marker is not None:
                    by_marker[marker].append((kind, alarm_id))
            alarms = dict(conn.execute("SELECT alarm_id, device_id FROM alarms"))
        except sqlite3.DatabaseError:
            pass  # a journal not yet created: nothing journaled
        finally:
            conn.close()
        return cls(by_marker, alarms)


def _marker_of(raw: bytes, serial_frames: dict[bytes, str]) -> str | None:
    if raw.startswith(b"{"):
        with contextlib.suppress(ValueError, AttributeError):
            marker = json.loads(raw).get("chaos")
            return marker if isinstance(marker, str) else None
        return None
    for frame, marker in serial_frames.items():
        if frame in raw:
            return marker
    return None


@dataclass
class Tally:
    scenario: str
    presses: int = 0
    acked: int = 0
    journaled: int = 0
    first_sms: int = 0
    lost: list[str] = field(default_factory=list)  # acked, never journaled
    # Lost the way the README's failure table says they can be (Zigbee2MQTT presses the
    # broker acknowledged and lost in a power cut before its autosave): counted apart.
    residual: list[str] = field(default_factory=list)
    no_alarm: list[str] = field(default_factory=list)  # journaled without an alarm
    no_sms: list[str] = field(default_factory=list)  # alarm whose family got no SMS
    dup_rows: int = 0  # extra journal rows of one press (redeliveries)
    dup_alarms: int = 0  # presses journaled under more than one alarm reference
    dup_sms: int = 0  # extra SMS with the same reference to the same phone
    kills: int = 0
    broker_kills: int = 0
    line_pulls: int = 0
    resends: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return len(self.lost) + len(self.no_alarm) + len(self.no_sms)

    @property
    def duplicates(self) -> int:
        return self.dup_rows + self.dup_alarms + self.dup_sms

    def row(self) -> str:
        return (f"{self.scenario:<22} {self.presses:>7} {self.acked:>6} {self.journaled:>9} "
                f"{self.first_sms:>9} {self.missing:>7} "
                f"{self.dup_rows:>4}/{self.dup_alarms}/{self.dup_sms:<5} "
                f"{self.kills:>5} {self.broker_kills:>6} {self.line_pulls:>5} "
                f"{self.resends:>7} {self.seconds:>6.1f}")

    def detail(self) -> str:
        kinds = Counter(entry.split(":", 2)[1] for entry in self.lost)
        parts = [f"lost (acked, not journaled): {len(self.lost)} by kind {dict(kinds)} "
                 f"{self.lost[:12]}",
                 f"lost as the README's residual risk (Zigbee2MQTT, unsaved at the power "
                 f"cut): {len(self.residual)} {self.residual[:12]}",
                 f"journaled without alarm: {len(self.no_alarm)} {self.no_alarm[:5]}",
                 f"alarm without family SMS: {len(self.no_sms)} {self.no_sms[:5]}",
                 *self.notes]
        return "\n    ".join([f"{self.scenario}:", *parts])


HEADER = (f"{'scenario':<22} {'presses':>7} {'acked':>6} {'journaled':>9} {'first SMS':>9} "
          f"{'missing':>7} {'dup r/a/sms':<11} {'kills':>5} {'broker':>6} {'pulls':>5} "
          f"{'resends':>7} {'secs':>6}")


def _kind(press: Press) -> str:
    if press.topic == "serial":
        return "contact_id"
    return "own" if press.topic.startswith("alarm/buttons/") else "z2m"


def reconcile(name: str, presses: list[Press], district: District, view: JournalView,
              sms: list[tuple[str, str]]) -> Tally:
    tally = Tally(name, presses=len(presses))
    by_phone_ref: Counter[tuple[str, str]] = Counter()
    for to, body in sms:
        for ref in set(REF.findall(body)):
            by_phone_ref[(to, ref)] += 1
    tally.dup_sms = sum(n - 1 for n in by_phone_ref.values() if n > 1)
    for press in presses:
        rows = view.by_marker.get(press.marker, [])
        if press.acked_at is not None:
            tally.acked += 1
        if not rows:
            if press.acked_at is not None:
                tally.lost.append(f"{press.device_id}:{_kind(press)}:{press.marker}")
            continue
        tally.journaled += 1
        presses_rows = [alarm_id for kind, alarm_id in rows if kind == "emergency"]
        tally.dup_rows += max(0, len(presses_rows) - 1)
        refs = {r for r in presses_rows if r is not None and r in view.alarms}
        if not refs:
            tally.no_alarm.append(f"{press.device_id}:{press.marker}")
            continue
        tally.dup_alarms += len(refs) - 1
        family = district.family_phones(press.device_id)
        if any(all(by_phone_ref[(phone, ref)] for phone in family) for ref in refs):
            tally.first_sms += 1
        else:
            tally.no_sms.append(f"{press.device_id}:{sorted(refs)}")
    return tally


# ----------------------------------------------------------------------------- rig


@dataclass
class Rig:
    """One scenario's world: broker, Twilio double, gateway, district (shared)."""

    workdir: Path
    district: District
    serial: bool = False
    state_dir: Path | None = None
    seed: int = 0
    broker: Broker = field(init=False)
    twilio: TwilioProc = field(init=False)
    gateway: GatewayProc = field(init=False)
    line: SerialLine | None = field(init=False, default=None)
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        users = [GATEWAY_USER, Z2M_USER, *(d.device_id for d in self.district.own)]
        self.broker = Broker(self.workdir / "broker", users, overrides=broker_overrides(),
                             registry=self.district.registry)
        self.twilio = TwilioProc(self.workdir / "twilio")
        serial: list[dict[str, str]] = []
        if self.serial:
            self.line = SerialLine(self.workdir / "serial")
            serial = [{"name": "rx1", "port": self.line.gateway_path}]
        self.gateway = GatewayProc(self.workdir / "gateway",
                                   self.state_dir or self.workdir / "state", self.district,
                                   self.broker, self.twilio, serial)

    def __enter__(self) -> Rig:
        try:
            self.broker.prepare()
            self.broker.start()
            self.twilio.start()
            if self.line is not None:
                self.line.plug()
            self.gateway.write_config()
            self.gateway.start()
            self.gateway.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.gateway.stop(15)
        if self.line is not None:
            with contextlib.suppress(Exception):
                self.line.pull()
        self.twilio.stop()
        self.broker.stop()

    def settle(self, presses: Callable[[], list[Press]], name: str, timeout: float,
               frames: Callable[[], dict[bytes, str]] = dict) -> Tally:
        """Wait (bounded) until every acknowledged press is journaled and its family texted,
        reading the live journal from a copy; return the last tally."""
        deadline = time.monotonic() + timeout
        while True:
            view = JournalView.read(self.gateway.journal, self.workdir / "snap", frames())
            tally = reconcile(name, presses(), self.district, view, self.twilio.accepted())
            if (tally.missing == 0 and tally.acked == tally.presses) \
                    or time.monotonic() > deadline:
                return tally
            time.sleep(1.0)

    def final(self, presses: list[Press], name: str, frames: dict[bytes, str],
              started: float) -> Tally:
        """Stop the gateway, read its journal file directly, reconcile."""
        code = self.gateway.stop()
        view = JournalView.read(self.gateway.journal, self.workdir / "snap", frames)
        tally = reconcile(name, presses, self.district, view, self.twilio.accepted())
        tally.kills = self.gateway.kills
        tally.seconds = time.monotonic() - started
        tally.notes.append(f"gateway exit code after SIGTERM: {code}; "
                           f"starts {self.gateway.starts}")
        return tally


def broker_overrides() -> dict[str, str]:
    """Measurement only: ``CHAOS_BROKER_SET="autosave_on_changes=false,autosave_interval=30"``
    runs the scenarios against another broker setting (e.g. the old shipped one, to compare
    a power cut before and after). Unset (CI, scripts/chaos): the shipped config as is."""
    spec = os.environ.get("CHAOS_BROKER_SET", "")
    return dict(item.split("=", 1) for item in spec.split(",") if "=" in item)


def storm(rng: random.Random, devices: list[Any], count: int) -> Iterator[Any]:
    """``count`` distinct devices in random order (one press each)."""
    chosen = rng.sample(devices, min(count, len(devices)))
    yield from chosen
