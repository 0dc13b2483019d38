"""The broker's roles (issue 10, faults 1 and 2): every allow and deny, on a real broker.

Mosquitto runs as on a Debian server: Debian's stock main file (paths moved), the
shipped drop-in ``config/mosquitto.conf`` in its include_dir, and the ACL and password
file written by the shipped commands ``gateway broker-acl`` / ``gateway broker-users``
from the sample registry (tests/support/stock_broker.py). The expected rights below are
the contract (README "The broker"), written out here independently of gateway/broker.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest
from paho.mqtt.client import topic_matches_sub

from devices.mqtt_payloads import encode_own_event
from gateway.broker import (
    BrokerRoleError,
    hash_password,
    logins,
    parse_passwd,
    password_matches,
    render_acl,
)
from gateway.config import Secrets
from gateway.daemon import Gateway
from gateway.model import Device, LonLat, Registry, Responder, ResponderRole
from gateway.registry import load_registry
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import SAMPLE, eventually, gateway_config, running
from tests.support.stock_broker import (
    SHIPPED_TEMPLATE,
    Roles,
    StockBroker,
    V5Session,
    gateway_cli,
    provision_roles,
    write_gateway_toml,
)

REGISTRY = load_registry(SAMPLE)
A, B = sorted(d.device_id for d in REGISTRY.devices.values()
              if d.address.startswith("alarm/buttons/"))[:2]
ME, COLLEAGUE = sorted(r.responder_id for r in REGISTRY.responders.values()
                       if r.on_duty and r.role is ResponderRole.GRID_LEADER)[:2]
Z2M = next(d for d in sorted(REGISTRY.devices.values(), key=lambda d: d.device_id)
           if d.address.startswith("zigbee2mqtt/"))
TAKEN = {0x00, 0x10}  # success; no matching subscribers (a success too)
DENIED = 0x87  # Not authorized

# The contract: what each login may publish and may read (topic filters).
MAY_PUBLISH: dict[str, list[str]] = {
    A: [f"alarm/buttons/{A}/event", f"alarm/buttons/{A}/status"],
    B: [f"alarm/buttons/{B}/event", f"alarm/buttons/{B}/status"],
    "zigbee2mqtt": ["zigbee2mqtt/#"],
    ME: [f"responders/{ME}/location", f"responders/{ME}/duty", f"responders/{ME}/ack"],
    COLLEAGUE: [f"responders/{COLLEAGUE}/location", f"responders/{COLLEAGUE}/duty",
                f"responders/{COLLEAGUE}/ack"],
    "gateway": ["alarm/buttons/+/confirm", "alarm/gateway/#", "alarm/alarms/+/state",
                "alarm/notices", "alarm/drills/+/confirm"],
    "console": [],
    "drill": ["alarm/drills/+/event"],
}
MAY_READ: dict[str, list[str]] = {
    A: [f"alarm/buttons/{A}/confirm"],
    B: [f"alarm/buttons/{B}/confirm"],
    "zigbee2mqtt": ["zigbee2mqtt/#"],
    ME: ["alarm/alarms/+/state"],
    COLLEAGUE: ["alarm/alarms/+/state"],
    "gateway": ["zigbee2mqtt/#", "alarm/buttons/+/event", "alarm/buttons/+/status",
                "responders/#", "alarm/drills/+/event", "alarm/alarms/+/ack",
                "alarm/gateway/#"],
    "console": ["alarm/alarms/+/state", "alarm/notices", "alarm/gateway/#"],
    "drill": ["alarm/drills/+/confirm"],
}
# Every login tries every one of these: its own topics, its neighbours', everyone else's.
TOPICS = [
    f"alarm/buttons/{A}/event", f"alarm/buttons/{A}/status", f"alarm/buttons/{A}/confirm",
    f"alarm/buttons/{B}/event", f"alarm/buttons/{B}/confirm",
    f"alarm/buttons/{ME}/event",  # a staff phone's id on a button topic (fault 2)
    Z2M.address, "zigbee2mqtt/bridge/request/permit_join",
    f"responders/{ME}/location", f"responders/{ME}/duty", f"responders/{ME}/ack",
    f"responders/{COLLEAGUE}/duty",
    "alarm/alarms/A-1/state", "alarm/alarms/A-1/ack",
    "alarm/notices", "alarm/gateway/test/status",
    f"alarm/drills/{A}/event", f"alarm/drills/{A}/confirm",
    "alarm/unassigned",
]
# Per reader: a topic it may read and the login that may publish it, sent last.
BARRIERS = {A: ("gateway", f"alarm/buttons/{A}/confirm"),
            B: ("gateway", f"alarm/buttons/{B}/confirm"),
            "zigbee2mqtt": ("zigbee2mqtt", "zigbee2mqtt/barrier"),
            ME: ("gateway", "alarm/alarms/barrier/state"),
            COLLEAGUE: ("gateway", "alarm/alarms/barrier/state"),
            "gateway": ("gateway", "alarm/gateway/barrier"),
            "console": ("gateway", "alarm/alarms/barrier/state"),
            "drill": ("gateway", "alarm/drills/barrier/confirm")}
BARRIER = b"barrier"


def may(rules: list[str], topic: str) -> bool:
    return any(topic_matches_sub(rule, topic) for rule in rules)


# -- the commands -------------------------------------------------------------------


@pytest.mark.integration
def test_broker_acl_writes_the_template_then_a_block_per_own_button_and_phone(
    tmp_path: Path,
) -> None:
    config = write_gateway_toml(tmp_path / "gateway.toml", SAMPLE)
    out = tmp_path / "etc" / "alarm.acl"
    done = gateway_cli("broker-acl", "--config", str(config), "--out", str(out),
                       "--template", str(SHIPPED_TEMPLATE))
    assert done.returncode == 0, done.stderr
    text = out.read_text(encoding="utf-8")
    assert text == render_acl(REGISTRY, SHIPPED_TEMPLATE.read_text(encoding="utf-8"))
    assert text.startswith(SHIPPED_TEMPLATE.read_text(encoding="utf-8").rstrip("\n"))
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    users = [line.split()[1] for line in text.splitlines() if line.startswith("user ")]
    own = {d.device_id for d in REGISTRY.devices.values()
           if d.address.startswith("alarm/buttons/")}
    assert sorted(users) == sorted({"gateway", "zigbee2mqtt", "console", "drill", *own,
                                    *REGISTRY.responders})
    assert "pattern" not in [line.split(" ")[0] for line in text.splitlines()]
    assert done.stdout.count("\n") == 1 and f"{len(users)} logins" in done.stdout
    assert not list(out.parent.glob(".alarm.acl.*"))  # the temp file was renamed


@pytest.mark.integration
def test_broker_users_keeps_passwords_adds_and_retires_logins_and_never_prints_one(
    tmp_path: Path,
) -> None:
    registry_dir = tmp_path / "registry"
    shutil.copytree(SAMPLE, registry_dir)
    roles = provision_roles(tmp_path / "first", registry_dir)
    entries = parse_passwd(roles.passwd.read_text(encoding="utf-8"))
    assert set(entries) == {login.name for login in logins(REGISTRY)}
    assert all(password_matches(roles.passwords[k], v) for k, v in entries.items())
    work = tmp_path / "first"
    for name, mode in (("alarm.passwd", 0o640), ("credentials.csv", 0o600),
                       ("mqtt_password", 0o600)):
        assert stat.S_IMODE((work / name).stat().st_mode) == mode, name
    csv_text = (work / "credentials.csv").read_text(encoding="utf-8")
    assert "\ngateway," not in csv_text  # the gateway's password has its own file

    # A responder leaves the registry; the phone of another is lost.
    gone = sorted(REGISTRY.responders)[-1]
    rows = (registry_dir / "responders.csv").read_text(encoding="utf-8").splitlines()
    (registry_dir / "responders.csv").write_text(
        "\n".join(r for r in rows if not r.startswith(f"{gone},")) + "\n", encoding="utf-8")
    args = ["broker-users", "--config", str(work / "gateway.toml"),
            "--passwd", str(roles.passwd), "--credentials-out", str(work / "credentials.csv"),
            "--gateway-password-out", str(work / "mqtt_password")]
    kept = gateway_cli(*args, "--only-missing")
    assert kept.returncode == 0, kept.stderr
    assert parse_passwd(roles.passwd.read_text(encoding="utf-8")) == entries  # nothing new
    assert (work / "credentials.csv").read_text(encoding="utf-8") == csv_text
    rotated = gateway_cli(*args, "--rotate", ME)
    assert rotated.returncode == 0, rotated.stderr
    after = parse_passwd(roles.passwd.read_text(encoding="utf-8"))
    assert gone not in after  # retired: its phone cannot log in any more
    assert after[ME] != entries[ME]
    assert {k: v for k, v in after.items() if k != ME} == {
        k: v for k, v in entries.items() if k not in (ME, gone)}
    new_row = (work / "credentials.csv").read_text(encoding="utf-8")[len(csv_text):]
    login, password = new_row.strip().split(",")
    assert login == ME and password_matches(password, after[ME])
    for done in (kept, rotated):
        assert all(p not in done.stdout + done.stderr for p in roles.passwords.values())
    assert "1 new, " in rotated.stdout and "1 removed" in rotated.stdout

    # The gateway login exists, but its password file went missing: refused, not
    # silently replaced (the running gateway would be locked out).
    (work / "mqtt_password").unlink()
    refused = gateway_cli(*args)
    assert refused.returncode == 2
    assert str(work / "mqtt_password") in refused.stderr and "--rotate" not in refused.stdout
    assert parse_passwd(roles.passwd.read_text(encoding="utf-8")) == after


@pytest.mark.integration
def test_our_hashes_are_mosquitto_passwd_hashes(tmp_path: Path) -> None:
    binary = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    passwd = tmp_path / "p"
    subprocess.run([binary, "-c", "-b", str(passwd), "u", "s3cret"], check=True,
                   capture_output=True)
    theirs = parse_passwd(passwd.read_text(encoding="utf-8"))["u"]
    assert password_matches("s3cret", theirs) and not password_matches("s3cret!", theirs)
    _, kind, rounds, salt, _ = theirs.split("$")
    assert hash_password("s3cret", salt=base64.b64decode(salt)) == theirs
    assert (kind, rounds) == ("7", "101")


def _registry(devices: list[Device], responders: list[Responder]) -> Registry:
    return Registry.build({}, {d.device_id: d for d in devices},
                          {r.responder_id: r for r in responders}, {})


def test_render_acl_refuses_what_would_blur_the_roles() -> None:
    template = SHIPPED_TEMPLATE.read_text(encoding="utf-8")
    phone = Responder("gateway", "x", "+8613900000000", "c", ResponderRole.GRID_LEADER, True,
                      LonLat(118.5, 37.5))
    with pytest.raises(BrokerRoleError, match="used by a gateway and a responder"):
        render_acl(_registry([], [phone]), template)
    stray = Device("D1", "E1", Z2M.scheme, "alarm/buttons/D2")
    with pytest.raises(BrokerRoleError, match="must be alarm/buttons/D1"):
        render_acl(_registry([stray], []), template)
    odd = Device("D 1", "E1", Z2M.scheme, "alarm/buttons/D 1")
    with pytest.raises(BrokerRoleError, match="a login must be"):
        render_acl(_registry([odd], []), template)
    with pytest.raises(BrokerRoleError, match="'pattern' applies to every user"):
        render_acl(REGISTRY, template + "pattern write alarm/buttons/%u/event\n")
    with pytest.raises(BrokerRoleError, match="anonymous"):
        render_acl(REGISTRY, "topic read #\n" + template)
    with pytest.raises(BrokerRoleError, match="expected exactly"):
        render_acl(REGISTRY, template.replace("user console", "user dashboard"))


# -- every allow and deny on the real broker ----------------------------------------


def _publish_once(broker: StockBroker, roles: Roles, login: str, topic: str,
                  payload: bytes) -> int:
    """One QoS 1 publish on a connection of its own: Mosquitto 2.0.11 closes the
    connection after answering a denied publish with 0x87, even over MQTT 5."""
    session = V5Session(broker.port, login, roles.passwords[login], f"p-{login}")
    try:
        return session.publish(topic, payload)
    finally:
        session.close()


@pytest.mark.integration
def test_every_login_publishes_and_reads_exactly_what_its_role_allows(
    broker: StockBroker, roles: Roles,
) -> None:
    # Readers only subscribe (to everything) and never publish, so they stay connected.
    readers = {login: V5Session(broker.port, login, roles.passwords[login], f"r-{login}")
               for login in MAY_READ}
    try:
        assert {k: s.connect_rc for k, s in readers.items()} == dict.fromkeys(readers, 0)
        for session in readers.values():
            # Mosquitto grants every subscription; read rules filter what is delivered.
            assert session.subscribe("#") == 1
        outcomes, expected = {}, {}
        for login in MAY_PUBLISH:
            for topic in TOPICS:
                rc = _publish_once(broker, roles, login, topic, login.encode())
                outcomes[login, topic] = "taken" if rc in TAKEN else hex(rc)
                expected[login, topic] = "taken" if may(MAY_PUBLISH[login], topic) \
                    else hex(DENIED)
        assert outcomes == expected
        # Each reader's last message: what arrived before it is all it will get.
        for publisher, topic in set(BARRIERS.values()):
            assert _publish_once(broker, roles, publisher, topic, BARRIER) in TAKEN
        got, want = {}, {}
        for reader, session in readers.items():
            _, barrier = BARRIERS[reader]
            seen: list[tuple[str, bytes]] = []
            while not seen or seen[-1] != (barrier, BARRIER):
                seen.append(session.received.get(timeout=10))
            got[reader] = sorted((t, p.decode()) for t, p in seen if p != BARRIER)
            want[reader] = sorted((t, publisher) for (publisher, t), o in outcomes.items()
                                  if o == "taken" and may(MAY_READ[reader], t))
        assert got == want
        assert all(s.disconnects == 0 for s in readers.values())
    finally:
        for session in readers.values():
            session.close()
    # The broker logged each refusal (the publisher's 0x87 above is the primary sign).
    assert f"Denied PUBLISH from p-{ME} " in broker.log


# -- the running gateway behind the roles ---------------------------------------------


def _alarm_devices(gw: Gateway) -> list[str]:
    db = gw.config.model.gateway.journal_path
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return [row[0] for row in conn.execute("SELECT device_id FROM alarms ORDER BY rowid")]


def _gateway(tmp_path: Path, twilio: TwilioDouble, broker: StockBroker, roles: Roles) -> Gateway:
    cfg = gateway_config(tmp_path, twilio, alert={"backend": "none"},
                         mqtt={"enabled": True, "port": broker.port, "username": "gateway"})
    return Gateway(cfg, Secrets(twilio.account_sid, twilio.auth_token,
                                roles.passwords["gateway"]))


@pytest.mark.integration
async def test_a_staff_phone_publishing_on_a_button_topic_is_denied_and_raises_no_alarm(
    tmp_path: Path, broker: StockBroker, roles: Roles, twilio: TwilioDouble,
) -> None:
    gw = _gateway(tmp_path, twilio, broker, roles)
    async with running(gw):
        assert gw.mqtt is not None
        await eventually(gw.mqtt.connected.is_set)
        # The broker refuses both (0x87: processed and denied) ...
        for topic in (f"alarm/buttons/{ME}/event", f"alarm/buttons/{A}/event"):
            assert await asyncio.to_thread(_publish_once, broker, roles, ME, topic,
                                           encode_own_event("sos")) == DENIED
        # ... while the button's own press, sent after them, is journaled: the gateway
        # was listening on those topics all along.
        assert await asyncio.to_thread(_publish_once, broker, roles, A,
                                       f"alarm/buttons/{A}/event",
                                       encode_own_event("sos", seq=3)) in TAKEN
        await eventually(lambda: _alarm_devices(gw), timeout=10)
        assert _alarm_devices(gw) == [A]
        assert gw.mqtt.connected.is_set()


@pytest.mark.integration
async def test_the_gateway_publishes_notices_states_and_confirmations_and_stays_connected(
    tmp_path: Path, broker: StockBroker, roles: Roles, twilio: TwilioDouble,
) -> None:
    console = V5Session(broker.port, "console", roles.passwords["console"], "dashboard")
    phone = V5Session(broker.port, ME, roles.passwords[ME], f"app-{ME}")
    button = V5Session(broker.port, A, roles.passwords[A], A)
    bridge = V5Session(broker.port, "zigbee2mqtt", roles.passwords["zigbee2mqtt"], "z2m")
    gw = _gateway(tmp_path, twilio, broker, roles)
    try:
        for topic in ("alarm/notices", "alarm/alarms/+/state", "alarm/gateway/#"):
            assert console.subscribe(topic) == 1
        assert phone.subscribe("alarm/alarms/+/state") == 1
        assert button.subscribe(f"alarm/buttons/{A}/confirm") == 1
        async with running(gw):
            assert gw.mqtt is not None
            # The sessions' waits run in threads: this loop runs the gateway too.
            status = (await asyncio.to_thread(console.until, "alarm/gateway/test/status"))[-1]
            assert status[1] == b"online"
            # An operator notice (fault 1: this publish used to cost the connection).
            assert await asyncio.to_thread(bridge.publish, Z2M.address,
                                           b'{"battery_low": true}') in TAKEN
            notice = json.loads((await asyncio.to_thread(console.until, "alarm/notices"))[-1][1])
            assert notice["kind"] == "device.low_battery" and notice["subject"] == Z2M.device_id
            # A press: the button's confirmation, then the alarm's state to phone and console.
            assert await asyncio.to_thread(button.publish, f"alarm/buttons/{A}/event",
                                           encode_own_event("sos", seq=11)) in TAKEN
            confirm = (await asyncio.to_thread(button.until, f"alarm/buttons/{A}/confirm"))[-1]
            assert json.loads(confirm[1])["seq"] == 11
            alarm_id = (await eventually(gw.journal.open_alarms))[0].alarm_id  # type: ignore[union-attr]
            state_topic = f"alarm/alarms/{alarm_id}/state"
            for reader in (phone, console):
                state = json.loads((await asyncio.to_thread(reader.until, state_topic))[-1][1])
                assert state["alarm_id"] == alarm_id
            assert gw.mqtt.connected.is_set() and gw.mqtt.reconnects == 0
    finally:
        for session in (console, phone, button, bridge):
            session.close()
    assert "Denied PUBLISH from gw-test" not in broker.log
    # One connection for the whole run: no publish was refused and cost it.
    assert broker.log.count(" as gw-test ") == 1, broker.log
