"""Mosquitto as a Debian server runs it: the stock main file, the shipped drop-in, roles.

``mosquitto -c <workdir>/mosquitto.conf`` where that file is Debian 12's stock
``/etc/mosquitto/mosquitto.conf`` (tests/support/debian-mosquitto.conf) with its host
paths moved into ``workdir``, and its ``include_dir`` holds the shipped
``config/mosquitto.conf`` as ``alarm.conf`` with only its paths and listener ports
moved. Nothing else differs from a server, except two lines added to the stock file
(see :func:`stock_main_conf`).
"""

from __future__ import annotations

import csv
import os
import pwd
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.ports import free_port, wait_port
from tests.support.procs import end_process

REPO = Path(__file__).resolve().parents[2]
STOCK_CONF = Path(__file__).resolve().parent / "debian-mosquitto.conf"
SHIPPED_DROPIN = REPO / "config" / "mosquitto.conf"
SHIPPED_TEMPLATE = REPO / "config" / "mosquitto.acl"


def stock_main_conf(workdir: Path, *, debug_log: bool = True) -> str:
    """Debian's stock main file, its paths moved into ``workdir``.

    Two lines are added at its top. ``user <us>``: started as root, Mosquitto drops to
    user "mosquitto", which can neither write persistence into pytest's 0700 tmp
    folders nor read the password file there (FIELD-NOTES). ``log_type all`` (unless
    ``debug_log`` is false): the log then shows each "Denied PUBLISH" and each
    connection, the evidence tests read (the stock file logs no debug lines).
    """
    moved = {
        "/run/mosquitto/mosquitto.pid": str(workdir / "mosquitto.pid"),
        "/var/lib/mosquitto/": f"{workdir / 'data'}/",
        "/var/log/mosquitto/mosquitto.log": str(workdir / "mosquitto.log"),
        "/etc/mosquitto/conf.d": str(workdir / "conf.d"),
    }
    text = STOCK_CONF.read_text(encoding="utf-8")
    for old, new in moved.items():
        if old not in text:
            raise AssertionError(f"{STOCK_CONF} no longer names {old}")
        text = text.replace(old, new)
    added = [f"user {pwd.getpwuid(os.geteuid()).pw_name}"]
    if debug_log:
        added.append("log_type all")
    return "\n".join(added) + "\n" + text


def dropin_conf(workdir: Path, plain_port: int, tls_port: int,
                overrides: Mapping[str, str] | None = None) -> str:
    """The shipped drop-in with its paths in ``workdir`` and its listeners' ports moved
    (both on loopback). ``overrides`` (option -> value) replace shipped settings: for
    benchmarks comparing settings only, never in a test of the shipped file."""
    text = SHIPPED_DROPIN.read_text(encoding="utf-8")
    for old, new in {"/etc/mosquitto/alarm.passwd": str(workdir / "alarm.passwd"),
                     "/etc/mosquitto/alarm.acl": str(workdir / "alarm.acl"),
                     "/etc/mosquitto/certs/": f"{workdir / 'certs'}/"}.items():
        if old not in text:
            raise AssertionError(f"{SHIPPED_DROPIN} no longer names {old}")
        text = text.replace(old, new)
    text, plain = re.subn(r"(?m)^listener 1883 127\.0\.0\.1$", f"listener {plain_port} 127.0.0.1",
                          text)
    text, tls = re.subn(r"(?m)^listener 8883$", f"listener {tls_port} 127.0.0.1", text)
    if (plain, tls) != (1, 1):
        raise AssertionError(f"{SHIPPED_DROPIN}: expected one plain and one TLS listener")
    left = dict(overrides or {})
    lines = []
    for line in text.splitlines():
        option = line.split(" ", 1)[0]
        lines.append(f"{option} {left.pop(option)}" if option in left else line)
    lines += [f"{option} {value}" for option, value in left.items()]
    return "\n".join(lines) + "\n"


def make_certificates(certs: Path) -> None:
    """A throw-away CA and a broker certificate for 127.0.0.1 (EC keys: fast)."""
    certs.mkdir(parents=True, exist_ok=True)
    openssl = shutil.which("openssl")
    if openssl is None:
        raise AssertionError("openssl is not installed")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=certs,
                       timeout=30)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=alarm test CA")
    run("req", *ec, "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=127.0.0.1")
    (certs / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n",
                                   encoding="utf-8")
    run("x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "broker.crt", "-days", "1", "-extfile", "san.ext")


@dataclass
class StockBroker:
    """Mosquitto started on ``workdir`` laid out as a Debian server's /etc/mosquitto.

    The caller puts ``alarm.acl`` and ``alarm.passwd`` into ``workdir`` (e.g. with
    ``gateway broker-acl`` / ``broker-users``) before :meth:`start`.
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    debug_log: bool = True
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def main_conf(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def dropin(self) -> Path:
        return self.workdir / "conf.d" / "alarm.conf"

    @property
    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def lay_out(self, overrides: Mapping[str, str] | None = None) -> None:
        """Main file, drop-in and (once) certificates; rerun to change ``overrides``."""
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        (self.workdir / "conf.d").mkdir(exist_ok=True)
        if not (self.workdir / "certs" / "broker.crt").exists():
            make_certificates(self.workdir / "certs")
        self.main_conf.write_text(stock_main_conf(self.workdir, debug_log=self.debug_log),
                                  encoding="utf-8")
        self.dropin.write_text(dropin_conf(self.workdir, self.port, self.tls_port, overrides),
                               encoding="utf-8")

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        # Mosquitto logs to the file the main conf names; its own stderr only before that.
        with (self.workdir / "mosquitto.stderr").open("ab") as err:
            self.proc = subprocess.Popen([binary, "-c", str(self.main_conf)],
                                         stdout=err, stderr=err)
        self.starts += 1
        try:
            wait_port(self.port, 15)
            wait_port(self.tls_port, 15)
        except TimeoutError:
            self.stop()
            stderr = (self.workdir / "mosquitto.stderr").read_text(errors="replace")
            raise AssertionError(f"mosquitto did not start:\n{stderr}\n{self.log}") from None

    def kill(self) -> None:
        """SIGKILL: nothing is saved beyond the last autosave."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, 10)
            self.proc = None


# -- roles: the shipped commands, as the installer runs them ---------------------------


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, check=False)


def write_gateway_toml(path: Path, registry_dir: Path) -> Path:
    """The smallest gateway config the broker commands read (registry, [mqtt] login)."""
    path.write_text(f"""\
[gateway]
name = "test"
state_dir = "{path.parent / 'state'}"

[registry]
directory = "{registry_dir}"

[mqtt]
username = "gateway"

[sms]
from_number = "+15005550006"
""", encoding="utf-8")
    return path


@dataclass(frozen=True)
class Roles:
    """What ``gateway broker-acl`` and ``broker-users`` wrote, and the passwords made."""

    acl: Path
    passwd: Path
    passwords: dict[str, str]

    def install(self, workdir: Path) -> None:
        """Copy the ACL and password file to where the drop-in (moved) names them."""
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.acl, workdir / "alarm.acl")
        shutil.copy(self.passwd, workdir / "alarm.passwd")


def provision_roles(workdir: Path, registry_dir: Path) -> Roles:
    """Run ``gateway broker-acl`` and ``broker-users`` on ``registry_dir`` into ``workdir``;
    the passwords are read back from the credentials CSV and the gateway's file."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_gateway_toml(workdir / "gateway.toml", registry_dir)
    acl, passwd = workdir / "alarm.acl", workdir / "alarm.passwd"
    for args in (["broker-acl", "--out", str(acl), "--template", str(SHIPPED_TEMPLATE)],
                 ["broker-users", "--passwd", str(passwd),
                  "--credentials-out", str(workdir / "credentials.csv"),
                  "--gateway-password-out", str(workdir / "mqtt_password")]):
        done = gateway_cli(*args, "--config", str(config))
        if done.returncode != 0:
            raise AssertionError(f"gateway {args[0]} failed ({done.returncode}): {done.stderr}")
    with (workdir / "credentials.csv").open(encoding="utf-8", newline="") as f:
        passwords = {row["login"]: row["password"] for row in csv.DictReader(f)}
    passwords["gateway"] = (workdir / "mqtt_password").read_text(encoding="utf-8").strip()
    return Roles(acl, passwd, passwords)


# -- an MQTT 5 client that reports the broker's reason codes ---------------------------


class V5Session:
    """A paho MQTT 5 client in its own thread: PUBACK reason codes and what it received.

    MQTT 5 is used because a denied publish then gets reason code 0x87 on a connection
    that survives (MQTT 3.1.1 clients are disconnected instead): a positive sign that
    the broker processed, and refused, each publish.
    """

    def __init__(self, port: int, login: str, password: str, client_id: str) -> None:
        self.login = login
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._acks: dict[int, int] = {}
        self._cond = threading.Condition()
        self.connect_rc: int | None = None
        self.disconnects = 0
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=paho.MQTTv5)
        c.username_pw_set(login, password)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = lambda _c, _u, m: self.received.put((m.topic, bytes(m.payload)))
        self.client = c
        c.connect("127.0.0.1", port, keepalive=30)
        c.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self.connect_rc is not None, 10):
                self.close()
                raise AssertionError(f"{login}: no CONNACK")

    def _on_connect(self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode,
                    _p: object) -> None:
        with self._cond:
            self.connect_rc = rc.value
            self._cond.notify_all()

    def _on_disconnect(self, _c: paho.Client, _u: object, _f: object, _rc: object,
                       _p: object) -> None:
        with self._cond:
            self.disconnects += 1
            self._cond.notify_all()

    def _on_publish(self, _c: paho.Client, _u: object, mid: int, rc: ReasonCode,
                    _p: object) -> None:
        with self._cond:
            self._acks[mid] = rc.value
            self._cond.notify_all()

    def _on_subscribe(self, _c: paho.Client, _u: object, mid: int, rcs: list[ReasonCode],
                      _p: object) -> None:
        with self._cond:
            self._acks[mid] = rcs[0].value
            self._cond.notify_all()

    def _wait(self, mid: int, what: str) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acks, 10):
                raise AssertionError(f"{self.login}: no answer to {what}")
            return self._acks.pop(mid)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """QoS 1 publish; the PUBACK's reason code (0 or 0x10 taken, 0x87 refused)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._wait(info.mid, f"PUBLISH {topic}")

    def subscribe(self, topic: str) -> int:
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        return self._wait(mid, f"SUBSCRIBE {topic}")

    def until(self, topic: str, timeout: float = 10) -> list[tuple[str, bytes]]:
        """Every message received up to and including the first on ``topic``."""
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                message = self.received.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(f"{self.login}: nothing on {topic} within {timeout} s; "
                                     f"got {got}") from None
            got.append(message)
            if message[0] == topic:
                return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
