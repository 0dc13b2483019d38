"""scripts/install into a scratch root, then the installed gateway started as its unit would.

One installation serves the module (a venv install from the checkout takes about a
minute). The installed files are used as installed: the unit's ExecStartPre/ExecStart,
its LoadCredential= lines laid out as ``$CREDENTIALS_DIRECTORY``, the installed broker
drop-in, ACL and password file under Debian's stock ``mosquitto.conf``
(tests/support/debian-mosquitto.conf), and the provisioning CSV's passwords. Only host
paths move under the scratch root and ports become ephemeral; the installed config gets
the edits an operator of this test machine would make (each named where it is made).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.mqtt_payloads import encode_own_event
from gateway.registry import load_registry
from tests.support.ports import free_port, wait_port

pytestmark = pytest.mark.integration  # runs the installer, Mosquitto and the gateway

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "scripts" / "install"
DEBIAN_MAIN_CONF = REPO / "tests" / "support" / "debian-mosquitto.conf"
ANALYZE = shutil.which("systemd-analyze")
# Well-formed fakes: the SID matches ^AC[0-9a-fA-F]{32}$, as check-config demands.
ACCOUNT_SID = "AC" + "5e" * 16
AUTH_TOKEN = "fake-token-" + "7" * 21
CREDENTIAL_ENV = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN}
UNIT = "etc/systemd/system/alarm-gateway.service"


def run_install(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
    return subprocess.run([str(INSTALL), "--root", str(root)], env={**clean, **env},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=900, check=False)


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """(mode, sha256) of every installed file, the venv's packages left out (its stamp kept)."""
    venv = root / "opt/alarm-gateway/venv"
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and (
                not p.is_relative_to(venv) or p.name == ".installed-from"):
            out[str(p.relative_to(root))] = (stat.S_IMODE(p.stat().st_mode),
                                             hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@dataclass(frozen=True)
class Installed:
    root: Path
    first: subprocess.CompletedProcess[str]

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("install") / "root"
    root.mkdir()
    first = run_install(root, CREDENTIAL_ENV)
    assert first.returncode == 0, first.stdout + first.stderr
    return Installed(root, first)


# ----------------------------------------------------------------------------- the unit


@dataclass(frozen=True)
class Unit:
    """A unit file's [Service] settings; repeated keys (LoadCredential=) keep every value."""

    settings: dict[str, list[str]]

    @classmethod
    def parse(cls, path: Path) -> Unit:
        settings: dict[str, list[str]] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line[0] in "#;[":
                continue
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
        return cls(settings)

    def one(self, key: str) -> str:
        (value,) = self.settings[key]
        return value

    def all(self, key: str) -> list[str]:
        return self.settings.get(key, [])


def seconds(value: str) -> float:
    """A systemd time span as this unit writes them: plain seconds, or N[s|min]."""
    m = re.fullmatch(r"(\d+)\s*(s|min)?", value)
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


def under_root(root: Path, command: str) -> list[str]:
    """An Exec line's argv with each absolute path that the installation holds under ``root``."""
    argv = shlex.split(command)
    return [str(root / a.lstrip("/")) if a.startswith("/") and (root / a.lstrip("/")).exists()
            else a for a in argv]


@dataclass
class Service:
    """The gateway run as systemd runs the unit: credentials dir, clean env, notify socket."""

    installed: Installed
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    messages: list[str] | None = None

    def __post_init__(self) -> None:
        self.unit = Unit.parse(self.installed.at(UNIT))
        self.short = Path(tempfile.mkdtemp(prefix="gw-", dir="/tmp"))  # AF_UNIX paths <108

    def credentials(self) -> Path:
        # systemd copies each LoadCredential=ID:PATH source to $CREDENTIALS_DIRECTORY/ID,
        # readable by the service alone; a missing absolute source fails the start.
        cred = self.workdir / "credentials"
        cred.mkdir(mode=0o700)
        for line in self.unit.all("LoadCredential"):
            ident, _, source = line.partition(":")
            src = self.installed.at(source)
            assert src.is_file(), f"LoadCredential={line}: {src} is missing (the start fails)"
            shutil.copyfile(src, cred / ident)
            os.chmod(cred / ident, 0o400)
        return cred

    def env(self) -> dict[str, str]:
        state = self.installed.at("/var/lib") / self.unit.one("StateDirectory")
        state.mkdir(parents=True, exist_ok=True)
        os.chmod(state, int(self.unit.one("StateDirectoryMode"), 8))
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8",
               "CREDENTIALS_DIRECTORY": str(self.credentials()),
               "STATE_DIRECTORY": str(state),
               "NOTIFY_SOCKET": str(self.short / "notify"),
               "WATCHDOG_USEC": str(int(seconds(self.unit.one("WatchdogSec")) * 1_000_000))}
        for assignment in self.unit.all("Environment"):
            for item in shlex.split(assignment):
                key, _, value = item.partition("=")
                env[key] = value
        return env

    def start(self) -> None:
        env = self.env()
        umask = int(self.unit.one("UMask"), 8)
        pre = subprocess.run(under_root(self.installed.root, self.unit.one("ExecStartPre")),
                             env=env, cwd="/", umask=umask, capture_output=True, text=True,
                             timeout=120, check=False)
        assert pre.returncode == 0, f"ExecStartPre failed:\n{pre.stdout}{pre.stderr}"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(env["NOTIFY_SOCKET"])
        self.messages = []
        with (self.workdir / "gateway.log").open("ab") as log:
            self.proc = subprocess.Popen(
                under_root(self.installed.root, self.unit.one("ExecStart")), env=env, cwd="/",
                umask=umask, stdout=log, stderr=subprocess.STDOUT)
        self.wait_notify("READY=1", seconds(self.unit.one("TimeoutStartSec")))

    def wait_notify(self, wanted: str, timeout: float) -> None:
        assert self.notify is not None and self.messages is not None
        deadline = time.monotonic() + timeout
        while not any(wanted in m.split("\n") for m in self.messages):
            left = deadline - time.monotonic()
            assert self.proc is not None and self.proc.poll() is None, \
                f"the gateway exited ({self.proc.returncode if self.proc else None}):\n{self.log()}"
            assert left > 0, f"no {wanted} within {timeout} s:\n{self.log()}"
            self.notify.settimeout(min(left, 0.5))
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except TimeoutError:
                continue

    def stop(self) -> int | None:
        """KillSignal=, then wait at most TimeoutStopSec=; the exit status."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(getattr(signal, self.unit.one("KillSignal")))
                try:
                    code = self.proc.wait(seconds(self.unit.one("TimeoutStopSec")))
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            else:
                code = self.proc.returncode
        if self.notify is not None:
            self.notify.close()
        shutil.rmtree(self.short, ignore_errors=True)
        return code

    def log(self) -> str:
        path = self.workdir / "gateway.log"
        return path.read_text(encoding="utf-8", errors="replace")[-6000:] if path.exists() else ""


# ----------------------------------------------------------------------------- the broker


@dataclass
class Broker:
    """Mosquitto under Debian's stock main file, with the installed drop-in in its conf.d."""

    installed: Installed
    workdir: Path
    port: int = 0
    tls_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port, self.tls_port = free_port(), free_port()
        root = self.installed.root
        conf_d = self.workdir / "conf.d"
        conf_d.mkdir(parents=True)
        (self.workdir / "data").mkdir()
        moved = {"/run/mosquitto/": f"{self.workdir}/", "/var/lib/mosquitto/":
                 f"{self.workdir}/data/", "/var/log/mosquitto/": f"{self.workdir}/",
                 "/etc/mosquitto/conf.d": str(conf_d)}
        main = DEBIAN_MAIN_CONF.read_text(encoding="utf-8")
        for host_path, here in moved.items():
            main = main.replace(host_path, here)
        # Started as root, Mosquitto drops to user mosquitto, which cannot read pytest's
        # 0700 folders (FIELD-NOTES); a server's /etc/mosquitto is not 0700.
        (self.workdir / "mosquitto.conf").write_text("user root\n" + main, encoding="utf-8")
        drop_in = (root / "etc/mosquitto/conf.d/alarm.conf").read_text(encoding="utf-8")
        drop_in = drop_in.replace("/etc/mosquitto/", f"{root}/etc/mosquitto/")
        ports = iter([self.port, self.tls_port])
        drop_in = re.sub(r"(?m)^listener \d+( \S+)?$",
                         lambda _: f"listener {next(ports)} 127.0.0.1", drop_in)
        assert next(ports, None) is None, "the drop-in no longer has two listeners"
        (conf_d / "alarm.conf").write_text(drop_in, encoding="utf-8")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.workdir / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port, 15)
        except TimeoutError:
            raise AssertionError(f"mosquitto did not start:\n{self.log()}") from None

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(encoding="utf-8", errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Login:
    """A paho session with one of the broker roles' logins (from the provisioning CSV)."""

    def __init__(self, broker: Broker, user: str, password: str) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.changed = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{user}",
                                  protocol=paho.MQTTv311)
        self.client.username_pw_set(user, password)
        self.client.on_message = self._on_message
        rc = self.client.connect("127.0.0.1", broker.port, keepalive=10)
        assert rc == 0
        self.client.loop_start()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with self.changed:
            self.received.append((msg.topic, bytes(msg.payload)))
            self.changed.notify_all()

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(10), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published(), f"{topic}: no PUBACK"

    def wait_for(self, topic: str, needle: str, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for t, payload in self.received:
                    if t == topic and needle.encode() in payload:
                        return payload
                left = deadline - time.monotonic()
                assert left > 0, f"nothing with {needle!r} on {topic} within {timeout} s"
                self.changed.wait(left)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ----------------------------------------------------------------------------- Twilio


@dataclass
class Twilio:
    """The Twilio double in its own process, read back through Twilio's list API."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        with (self.workdir / "twilio.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.sandbox.twilio_double", "--port", str(self.port),
                 "--account-sid", ACCOUNT_SID, "--auth-token", AUTH_TOKEN],
                stdout=log, stderr=log, cwd=REPO)
        wait_port(self.port, 20)

    def messages(self) -> list[dict[str, str]]:
        import urllib.request

        auth = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
        req = urllib.request.Request(
            f"{self.base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json?PageSize=1000",
            headers={"Authorization": f"Basic {auth}"})
        with urllib.request.urlopen(req, timeout=10) as answer:
            return list(json.loads(answer.read())["messages"])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def edit_config(path: Path, edits: dict[tuple[str, str], object]) -> None:
    """Set ``[section] key = value`` for each edit, as an operator edits the file by hand:
    an existing line (commented out or not) of that key in its section is replaced."""
    lines = path.read_text(encoding="utf-8").splitlines()
    section = ""
    todo = dict(edits)
    for i, line in enumerate(lines):
        header = re.match(r"^\[([^\]]+)\]", line)
        if header:
            section = header.group(1)
            continue
        m = re.match(r"^#?\s*([A-Za-z_]+)\s*=", line)
        if m and (section, m.group(1)) in todo:
            lines[i] = f"{m.group(1)} = {json.dumps(todo.pop((section, m.group(1))))}"
    assert not todo, f"no line for {sorted(todo)} in {path}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    for (sect, key), value in edits.items():
        assert data[sect][key] == value


@pytest.fixture
def rig(installed: Installed, tmp_path: Path) -> Iterator[tuple[Broker, Twilio, Service]]:
    broker, twilio = Broker(installed, tmp_path / "broker"), Twilio(tmp_path)
    service = Service(installed, tmp_path)
    try:
        broker.start()
        twilio.start()
        config = installed.at("/etc/alarm-gateway/gateway.toml")
        original = config.read_bytes()
        # The operator's edits for this machine, and only these: Twilio is the local double;
        # the broker listens on an ephemeral port; the journal goes where StateDirectory=
        # puts it under the scratch root (systemd would make /var/lib/alarm-gateway).
        edit_config(config, {
            ("sms", "base_url"): twilio.base_url,
            ("mqtt", "port"): broker.port,
            ("control", "port"): free_port(),
            ("gateway", "state_dir"): str(installed.at("/var/lib")
                                          / service.unit.one("StateDirectory")),
        })
        try:
            service.start()
            yield broker, twilio, service
        finally:
            code = service.stop()
            config.write_bytes(original)  # the idempotency test below sees the install as made
        assert code == 0, f"the gateway's stop exited {code}:\n{service.log()}"
    finally:
        twilio.stop()
        broker.stop()


# ----------------------------------------------------------------------------- tests


def provisioned(installed: Installed) -> dict[str, str]:
    with installed.at("/etc/alarm-gateway/secrets/broker-logins.csv").open(
            encoding="utf-8", newline="") as f:
        return {row["login"]: row["password"] for row in csv.DictReader(f)}


def test_install_lays_out_the_readme_install_section(installed: Installed) -> None:
    def mode(path: str) -> int:
        return stat.S_IMODE(installed.at(path).stat().st_mode)

    assert mode("/etc/alarm-gateway/secrets") == 0o700
    for name in ("twilio_account_sid", "twilio_auth_token", "mqtt_password",
                 "control_token", "broker-logins.csv"):
        assert mode(f"/etc/alarm-gateway/secrets/{name}") == 0o600, name
    assert installed.at("/etc/alarm-gateway/secrets/twilio_account_sid").read_text() \
        == ACCOUNT_SID
    cfg = tomllib.loads(installed.at("/etc/alarm-gateway/gateway.toml").read_text("utf-8"))
    assert cfg["mqtt"]["username"] == "gateway"
    assert (installed.at("/etc/alarm-gateway") / cfg["registry"]["directory"]
            / "devices.csv").is_file()
    for name in ("alarm.acl", "alarm.passwd"):
        assert mode(f"/etc/mosquitto/{name}") == 0o640, name
    assert installed.at("/etc/mosquitto/conf.d/alarm.conf").read_bytes() \
        == (REPO / "config" / "mosquitto.conf").read_bytes()
    unit = Unit.parse(installed.at(UNIT))
    # The journal goes where systemd's StateDirectory= makes a folder the DynamicUser owns.
    assert cfg["gateway"]["state_dir"] == "/var/lib/" + unit.one("StateDirectory")
    # The unit's Documentation= names a file the installer put there.
    doc = unit.one("Documentation")
    assert doc.startswith("file://") and installed.at(doc.removeprefix("file://")).is_file()
    # Not PID 1 here (or a staging root): systemctl is only shown.
    assert "would run: systemctl enable --now alarm-gateway" in installed.first.stdout
    # Nothing secret on the installer's output.
    out = installed.first.stdout + installed.first.stderr
    secrets = [ACCOUNT_SID, AUTH_TOKEN, *provisioned(installed).values(),
               installed.at("/etc/alarm-gateway/secrets/mqtt_password").read_text().strip()]
    assert [s for s in secrets if s in out] == []


def console_board(installed: Installed, tmp_path: Path) -> dict[str, Any]:
    """``gateway operator add`` with the installed CLI, then sign in and read the board."""
    config = installed.at("/etc/alarm-gateway/gateway.toml")
    secret = tmp_path / "operator-password"
    secret.write_text("duty-desk-password-1\n", encoding="utf-8")
    added = subprocess.run(
        [str(installed.at("/opt/alarm-gateway/venv/bin/gateway")), "operator", "add", "ops",
         "--name", "值班员", "--password-file", str(secret), "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False)
    assert added.returncode == 0, added.stderr
    state = Path(tomllib.loads(config.read_text("utf-8"))["gateway"]["state_dir"])
    url = json.loads((state / "control.json").read_text("utf-8"))["url"]
    jar = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    request = urllib.request.Request(
        f"{url}/console/api/sign-in", method="POST",
        data=json.dumps({"login": "ops", "password": "duty-desk-password-1"}).encode(),
        headers={"Content-Type": "application/json"})
    with jar.open(request, timeout=10) as answer:
        assert answer.status == 200
    with jar.open(f"{url}/console/api/board", timeout=10) as answer:
        return dict(json.loads(answer.read()))


def test_installed_gateway_under_its_unit_takes_a_press_to_sms_and_tells_the_console(
        installed: Installed, rig: tuple[Broker, Twilio, Service], tmp_path: Path) -> None:
    broker, twilio, service = rig
    service.wait_notify("WATCHDOG=1", 10)  # the watchdog ping runs from the event loop
    passwords = provisioned(installed)
    registry = load_registry(installed.at("/etc/alarm-gateway/sample"))
    button = min((d for d in registry.devices.values() if d.address.startswith("alarm/buttons/")),
                 key=lambda d: d.device_id)
    sensor = min((d for d in registry.devices.values() if d.address.startswith("zigbee2mqtt/")),
                 key=lambda d: d.device_id)
    family = {c.phone for c in registry.elders[button.elder_id].contacts}
    assert family

    console = Login(broker, "console", passwords["console"])
    own = Login(broker, button.device_id, passwords[button.device_id])
    bridge = Login(broker, "zigbee2mqtt", passwords["zigbee2mqtt"])
    try:
        console.subscribe("alarm/notices")
        # The button's own login, on its own topic: the journal commits, the family is texted.
        own.publish(f"{button.address}/event", encode_own_event("sos", seq=1))
        deadline = time.monotonic() + 30
        while not family & {m["to"] for m in twilio.messages()}:
            assert time.monotonic() < deadline, f"no SMS to the family:\n{service.log()}"
            time.sleep(0.2)
        # The operator console, as the README sets it up: an operator made with the
        # installed CLI signs in on the control listener and sees the press on the board.
        board = console_board(installed, tmp_path)
        assert button.device_id in {a["device_id"] for a in board["alarms"]}
        # A notice: the bridge reports a Zigbee button unavailable; the console hears it.
        bridge.publish(f"{sensor.address}/availability", b'{"state":"offline"}')
        notice = json.loads(console.wait_for("alarm/notices", sensor.device_id, 30))
        assert "offline" in json.dumps(notice)
        # A drill, as the README runs it: the drill login's password from the installer's
        # broker-logins.csv, read back through the installed gateway's control socket.
        drill = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "simulate", "press", "--config",
             str(installed.at("/etc/alarm-gateway/gateway.toml")), "--device",
             button.device_id, "--by", "ops", "--password-file",
             str(installed.at("/etc/alarm-gateway/secrets/broker-logins.csv"))],
            capture_output=True, text=True, timeout=60, check=False)
        assert drill.returncode == 0, drill.stderr
        assert "journaled as alarm" in drill.stdout and "dry run" in drill.stdout
    finally:
        for login in (console, own, bridge):
            login.close()


def analyzable_unit(installed: Installed, tmp_path: Path) -> Path:
    """The installed unit with its paths under the scratch root (systemd-analyze checks them)."""
    text = installed.at(UNIT).read_text(encoding="utf-8")
    for prefix in ("/opt/alarm-gateway/", "/etc/alarm-gateway/"):
        text = text.replace(f" {prefix}", f" {installed.root}{prefix}") \
                   .replace(f"={prefix}", f"={installed.root}{prefix}")
    out = tmp_path / "alarm-gateway.service"
    out.write_text(text, encoding="utf-8")
    return out


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_installed_unit_verifies_and_is_hardened(installed: Installed, tmp_path: Path) -> None:
    unit = analyzable_unit(installed, tmp_path)
    res = subprocess.run([str(ANALYZE), "verify", str(unit)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert [line for line in (res.stdout + res.stderr).splitlines()
            if "alarm-gateway" in line] == []
    res = subprocess.run([str(ANALYZE), "security", "--offline=true", str(unit)],
                         capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout + res.stderr)
    assert match, res.stdout + res.stderr
    assert float(match.group(1)) <= 2.0


def test_second_install_changes_nothing_and_keeps_every_password(installed: Installed) -> None:
    before = snapshot(installed.root)
    again = run_install(installed.root, CREDENTIAL_ENV)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "done: nothing to change" in again.stdout
    assert snapshot(installed.root) == before


def test_a_malformed_or_missing_credential_fails_before_anything_slow(tmp_path: Path) -> None:
    bad_sid = "AC" + "z" * 32
    res = run_install(tmp_path, {"TWILIO_ACCOUNT_SID": bad_sid, "TWILIO_AUTH_TOKEN": "t"})
    assert res.returncode == 2
    assert "twilio_account_sid: does not match" in res.stderr
    assert bad_sid not in res.stdout + res.stderr
    assert not (tmp_path / "etc/alarm-gateway/secrets/twilio_account_sid").exists()
    assert not (tmp_path / "opt/alarm-gateway/venv").exists()
    # No terminal to ask on and nothing in the environment: say which variable to set.
    res = run_install(tmp_path, {})
    assert res.returncode == 2
    assert "set TWILIO_ACCOUNT_SID" in res.stderr


def test_credentials_are_asked_on_the_terminal_without_echo(tmp_path: Path) -> None:
    """No environment: the installer asks on its controlling terminal, echo off."""
    import fcntl
    import termios

    master, slave = os.openpty()

    def controlling_tty() -> None:  # getpass reads /dev/tty: make the pty this session's
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    clean = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
    proc = subprocess.Popen([str(INSTALL), "--root", str(tmp_path)], env=clean, stdin=slave,
                            stdout=slave, stderr=slave, preexec_fn=controlling_tty)
    os.close(slave)
    seen = b""
    secrets = tmp_path / "etc/alarm-gateway/secrets"
    try:
        for prompt, answer in ((b"Twilio account SID", ACCOUNT_SID),
                               (b"Twilio auth token", AUTH_TOKEN)):
            deadline = time.monotonic() + 30
            while prompt not in seen:
                assert time.monotonic() < deadline, seen.decode(errors="replace")
                seen += os.read(master, 4096)
            os.write(master, answer.encode() + b"\n")
        deadline = time.monotonic() + 30
        while not (secrets / "twilio_auth_token").exists():
            assert time.monotonic() < deadline and proc.poll() is None, \
                seen.decode(errors="replace")
            time.sleep(0.05)
        # Stopped in the venv step that follows (its pip too: the installer leads its own
        # session, so its process group): the credentials step is what is tested.
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        os.set_blocking(master, False)
        with contextlib.suppress(OSError):
            seen += os.read(master, 65536)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        os.close(master)
    assert ACCOUNT_SID.encode() not in seen and AUTH_TOKEN.encode() not in seen
    assert (secrets / "twilio_account_sid").read_text() == ACCOUNT_SID
    assert (secrets / "twilio_auth_token").read_text() == AUTH_TOKEN
    assert stat.S_IMODE((secrets / "twilio_auth_token").stat().st_mode) == 0o600
