"""Drills (issue 10, fault 3): their own login and topic, marked as drills, SMS only to
the people they name (or nobody), and a drill tool that reports success only when the
gateway has journaled the alarm, read back through the control API."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from pathlib import Path

import pytest

from devices.drills import DrillDecoder, encode_drill
from devices.events import DeviceProtocolError, Drill, EventKind
from gateway.config import Secrets
from gateway.daemon import Gateway
from gateway.journal import Journal
from gateway.registry import load_registry
from gateway.sandbox.twilio_double import TwilioDouble
from gateway.wording import DRILL_SMS_PREFIX
from tests.helpers import SAMPLE, control, eventually, gateway_config, running
from tests.support.stock_broker import Roles, StockBroker

REGISTRY = load_registry(SAMPLE)
# A Contact ID device: a drill tests the gateway from intake on, whatever the device's make.
CID = sorted(d.device_id for d in REGISTRY.devices.values() if d.scheme == "contact_id")[0]
TOPIC = f"alarm/drills/{CID}/event"


# -- the protocol -------------------------------------------------------------------------


def test_a_drill_decodes_to_a_press_that_carries_the_drill() -> None:
    raw = encode_drill("d-1", by="li", notify=["+8613800000001", "R0001"])
    [event] = DrillDecoder().decode(TOPIC, raw)
    assert event.kind is EventKind.EMERGENCY and event.raw == raw
    assert event.drill == Drill("d-1", CID, "li", ("+8613800000001", "R0001"))
    assert not event.drill.dry_run
    [cancel] = DrillDecoder().decode(TOPIC, encode_drill("d-1", event="cancel", by="li"))
    assert cancel.kind is EventKind.CANCEL and cancel.drill is not None
    assert cancel.drill.dry_run  # nobody named: a dry run
    topic, body = DrillDecoder().confirmation(event)  # type: ignore[misc]
    assert topic == f"alarm/drills/{CID}/confirm"
    assert json.loads(body) == {"v": 1, "drill": "d-1", "journaled": True}
    assert DrillDecoder().confirmation(cancel) is None


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    (TOPIC, b"\xff\xfe", "not valid JSON"),
    (TOPIC, b"[]", "JSON object"),
    (TOPIC, b'{"v": 2, "drill": "x", "event": "sos", "by": "li"}', "schema version"),
    (TOPIC, b'{"v": true, "drill": "x", "event": "sos", "by": "li"}', "schema version"),
    (TOPIC, b'{"v": 1, "drill": "x/y", "event": "sos", "by": "li"}', "not a valid id"),
    (TOPIC, b'{"v": 1, "drill": "x", "event": "test", "by": "li"}', "'event'"),
    (TOPIC, b'{"v": 1, "drill": "x", "event": "sos"}', "'by'"),
    (TOPIC, b'{"v": 1, "drill": "x", "event": "sos", "by": "li", "notify": ["12"]}',
     "neither"),
    (TOPIC, b'{"v": 1, "drill": "x", "event": "sos", "by": "li", "notify": "R1"}', "list"),
    (TOPIC, json.dumps({"v": 1, "drill": "x", "event": "sos", "by": "li",
                        "notify": [f"R{i}" for i in range(11)]}).encode(), "at most 10"),
    (TOPIC, b'{"v": 1, "drill": "x", "event": "sos", "by": "li", "dry": 1}', "unknown"),
    (TOPIC, b"{" * 3000, "exceeds"),
    ("alarm/drills/+/event", encode_drill("x", by="li"), "not a drill topic"),
    ("alarm/drills/D1/confirm", encode_drill("x", by="li"), "not a drill topic"),
])
def test_malformed_drills_are_protocol_errors_with_the_raw_bytes(
    topic: str, payload: bytes, reason: str
) -> None:
    with pytest.raises(DeviceProtocolError) as err:
        DrillDecoder().decode(topic, payload)
    assert reason in err.value.reason and err.value.raw == payload


# -- the journal ------------------------------------------------------------------------


async def test_drills_and_real_presses_never_join_each_other(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db") as journal:
        drill = Drill("d-7", CID, "li", ())
        common = {"device_id": CID, "elder_id": "E1", "code": "drill:sos", "source": "mqtt",
                  "address": "mqtt:alarm/drills/x", "raw": b"{}", "dedupe_window_s": 300}
        first = await journal.record_press(received_at=100.0, drill=drill, **common)
        again = await journal.record_press(received_at=101.0, drill=drill, **common)
        assert first.new and not again.new and again.alarm_id == first.alarm_id
        real = await journal.record_press(received_at=102.0, **common)
        assert real.new and real.alarm_id != first.alarm_id  # not absorbed by the drill
        later = await journal.record_press(received_at=103.0, **common)
        assert later.alarm_id == real.alarm_id  # real presses still join each other
        other = await journal.record_press(received_at=104.0, drill=Drill("d-8", CID, "li"),
                                           **common)
        assert other.new and other.alarm_id not in (first.alarm_id, real.alarm_id)
        assert (await journal.get_alarm(first.alarm_id)).drill is True
        assert (await journal.get_alarm(real.alarm_id)).drill is False
        assert await journal.drill_of(first.alarm_id) == drill
        assert await journal.drill_of(real.alarm_id) is None
        rec = await journal.alarm_for_drill("d-7")
        assert rec is not None and rec.alarm_id == first.alarm_id
        assert await journal.alarm_for_drill("nope") is None
        # A device's cancel (and a press alerted from memory) looks at real alarms only.
        mine = await journal.open_alarm_for_device(CID)
        assert mine is not None and mine.alarm_id == real.alarm_id


async def test_a_journal_from_before_drills_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    async with Journal(path) as journal:
        old = await journal.record_press(
            device_id=CID, elder_id="E1", code="101", source="serial", address="cid:1",
            raw=b"", received_at=1.0, dedupe_window_s=300)
    with sqlite3.connect(path) as conn:  # as a journal of the previous version was
        conn.execute("ALTER TABLE alarms DROP COLUMN drill")
        conn.execute("DROP TABLE drills")
    async with Journal(path) as journal:
        assert (await journal.get_alarm(old.alarm_id)).drill is False
        new = await journal.record_press(
            device_id=CID, elder_id="E1", code="drill:sos", source="mqtt", address="x",
            raw=b"", received_at=2.0, dedupe_window_s=300, drill=Drill("d", CID, "li"))
        assert new.new and (await journal.get_alarm(new.alarm_id)).drill is True


# -- on the shipped broker roles, through the CLI ----------------------------------------


def _gateway(tmp_path: Path, twilio: TwilioDouble, broker: StockBroker, roles: Roles,
             *, mqtt: bool = True) -> Gateway:
    cfg = gateway_config(tmp_path, twilio, alert={"backend": "none"},
                         mqtt={"enabled": mqtt, "port": broker.port, "username": "gateway"})
    return Gateway(cfg, Secrets(twilio.account_sid, twilio.auth_token,
                                roles.passwords["gateway"]))


def _toml(tmp_path: Path, broker: StockBroker) -> Path:
    """The config an operator's ``gateway`` command reads: the same state dir (control
    socket) and broker as the running gateway."""
    path = tmp_path / "gateway.toml"
    path.write_text(f"""\
[gateway]
name = "test"
state_dir = "{tmp_path / 'state'}"
[registry]
directory = "{SAMPLE}"
[mqtt]
port = {broker.port}
username = "gateway"
[sms]
from_number = "+15005550006"
""", encoding="utf-8")
    return path


async def _drill(toml: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "simulate", "press", "--config", str(toml),
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _credentials(roles: Roles) -> str:
    return str(roles.acl.parent / "credentials.csv")  # the installer's broker-logins.csv


@pytest.mark.integration
async def test_a_drill_texts_only_whom_it_names_and_is_read_back(
    tmp_path: Path, broker: StockBroker, roles: Roles, twilio: TwilioDouble,
) -> None:
    elder = REGISTRY.elders[REGISTRY.devices[CID].elder_id]
    family = next(c for c in elder.contacts if c.sms_capable)
    gw = _gateway(tmp_path, twilio, broker, roles)
    async with running(gw):
        assert gw.mqtt is not None and gw.journal is not None and gw.dispatcher is not None
        assert gw.geo is not None
        await eventually(gw.mqtt.connected.is_set)
        # Named: one family member (by number) and the nearest grid leader (by id), both
        # in wave 1; everyone else wave 1 would text is withheld.
        nearest = gw.geo.lookup(elder.location, k=1).responders[0]
        code, out, err = await _drill(_toml(tmp_path, broker), "--device", CID, "--by", "li",
                                      "--notify", family.phone, "--notify", nearest.id,
                                      "--drill-id", "d-2026-12-07",
                                      "--password-file", _credentials(roles))
        assert code == 0, err
        [alarm] = await gw.journal.open_alarms()
        assert alarm.drill and alarm.device_id == CID
        assert f"journaled as alarm {alarm.alarm_id}" in out and "texting only" in out
        await gw.dispatcher.wait_idle(timeout=15)
        # Only the named responder, marked as a drill; the rest of the plan journaled.
        sent = list(twilio.messages)
        assert sorted(m.to for m in sent) == sorted([family.phone,
                                                     REGISTRY.responders[nearest.id].phone])
        assert all(m.body.startswith(DRILL_SMS_PREFIX) for m in sent)
        plan = [d for _, ev, d in await gw.journal.alarm_log(alarm.alarm_id)
                if ev == "drill.plan"]
        assert plan and plan[0]["withheld"] and len(plan[0]["sent"]) == 2
        status, view = await control(gw, "GET", f"/alarms/{alarm.alarm_id}")
        assert status == 200 and view["drill"]["drill_id"] == "d-2026-12-07"
        assert view["drill"]["by"] == "li" and view["drill"]["dry_run"] is False
        # A drill holds nobody busy: a real alarm may need the same grid leader.
        assert gw.dispatcher.busy_responders() == frozenset()
        # Kept out of the figures that count real alarms.
        status, metrics = await control(gw, "GET", "/metrics")
        assert "gateway_drills_total 1.0" in metrics
        assert "gateway_alarms_total{" not in metrics


@pytest.mark.integration
async def test_a_dry_run_drill_texts_nobody(
    tmp_path: Path, broker: StockBroker, roles: Roles, twilio: TwilioDouble,
) -> None:
    gw = _gateway(tmp_path, twilio, broker, roles)
    async with running(gw):
        assert gw.mqtt is not None and gw.journal is not None and gw.dispatcher is not None
        await eventually(gw.mqtt.connected.is_set)
        code, out, err = await _drill(_toml(tmp_path, broker), "--device", CID,
                                      "--drill-id", "dry-1",
                                      "--password-file", _credentials(roles))
        assert code == 0, err
        assert "dry run: nobody texted" in out
        [alarm] = await gw.journal.open_alarms()
        # The positive sign that the waves were planned: the withheld plan is journaled.
        entries = await eventually(
            lambda: _drill_plans(gw.config.model.gateway.journal_path, alarm.alarm_id))
        assert entries[0]["dry_run"] is True and entries[0]["withheld"]
        assert entries[0]["sent"] == []
        await gw.dispatcher.wait_idle(timeout=15)
        assert twilio.messages == []
        # The drill's cancel closes the drill, never the device's real alarm.
        code, _, err = await _drill(_toml(tmp_path, broker), "--device", CID, "--kind",
                                    "cancel", "--drill-id", "dry-1",
                                    "--password-file", _credentials(roles))
        assert code == 0, err
        await eventually(lambda: _state(gw.config.model.gateway.journal_path,
                                        alarm.alarm_id) == "cancelled")


def _drill_plans(db: Path, alarm_id: str) -> list[dict[str, object]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [json.loads(d) for (d,) in conn.execute(
            "SELECT data FROM alarm_log WHERE alarm_id = ? AND event = 'drill.plan'",
            (alarm_id,))]


def _state(db: Path, alarm_id: str) -> str:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return str(conn.execute("SELECT state FROM alarms WHERE alarm_id = ?",
                                (alarm_id,)).fetchone()[0])


@pytest.mark.integration
async def test_a_drill_fails_with_its_reason_unless_the_gateway_journaled_it(
    tmp_path: Path, broker: StockBroker, roles: Roles, twilio: TwilioDouble,
) -> None:
    toml = _toml(tmp_path, broker)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n", encoding="utf-8")
    # The gateway runs (its control API answers) but is not on this broker: the broker
    # takes the drill's publish, and nobody journals it.
    gw = _gateway(tmp_path, twilio, broker, roles, mqtt=False)
    async with running(gw):
        assert gw.journal is not None
        code, out, err = await _drill(toml, "--device", CID, "--timeout", "2",
                                      "--password-file", _credentials(roles))
        assert code == 1 and out == ""
        assert "FAILED" in err and "never journaled" in err
        code, _, err = await _drill(toml, "--device", CID, "--password-file", str(wrong))
        assert code == 1 and "refused the drill login" in err
        code, _, err = await _drill(toml, "--device", "NOPE", "--password-file",
                                    _credentials(roles))
        assert code == 1 and "unknown device 'NOPE'" in err
        # A line test raises a real alarm: refused without --live.
        code, _, err = await _drill(toml, "--device", CID, "--port", "/dev/null")
        assert code == 1 and "REAL alarm" in err
        assert await gw.journal.open_alarms() == []
    # No gateway at all: the control API is not there to read it back from.
    code, _, err = await _drill(toml, "--device", CID, "--timeout", "1",
                                "--password-file", _credentials(roles))
    assert code == 1 and "cannot read it back" in err and "not reachable" in err
