"""Voice calls (issue 12): the TwiML a callee hears, and calls through the running
gateway against the Twilio double's Calls resource: a press calls the first family
contact, who presses 1 and takes the alarm; a landline facility is called, never
texted; a call tree moves on past busy and no answer; a forged digit is 403."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devices.drills import DrillDecoder, encode_drill
from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.daemon import Gateway
from gateway.journal import CallState, MessageKind
from gateway.lifecycle import AlarmState
from gateway.model import Device
from gateway.sandbox.twilio_calls import CALL_CREATE_PARAMETERS
from gateway.voice import (
    ACCEPTED,
    INTRODUCTION,
    NO_DIGIT,
    PROMPT,
    CallDigits,
    CallUpdate,
    alarm_twiml,
    digit_twiml,
)
from gateway.wording import DRILL_SPOKEN_PREFIX
from tests.helpers import Pty, control, eventually, gateway_config, running, secrets_for
from tests.support.gsm_modem_sim import SimulatedModem
from tests.support.ports import free_port
from tests.support.twilio_faults import Fault, FaultyTwilioDouble

ANNOUNCEMENT = "紧急呼叫。垦利街道，张桂兰，胜利路12号。"
GATHER = "https://gw.example.org/twilio/voice/gather"


def test_the_alarm_call_says_it_twice_in_mandarin_then_asks_for_one_digit() -> None:
    root = ET.fromstring(alarm_twiml(ANNOUNCEMENT, gather_url=GATHER, voice="Polly.Zhiyu"))
    [gather] = root.findall("Gather")
    assert gather.attrib == {"action": GATHER, "method": "POST", "numDigits": "1",
                             "timeout": "8", "actionOnEmptyResult": "true"}
    said = [(s.text, s.attrib["language"], s.attrib["voice"]) for s in gather.findall("Say")]
    assert [t for t, _, _ in said] == [INTRODUCTION, ANNOUNCEMENT, ANNOUNCEMENT, PROMPT]
    assert {(lang, voice) for _, lang, voice in said} == {("cmn-CN", "Polly.Zhiyu")}
    # After the gather (reached only if Twilio skips the action): a goodbye, hang up.
    assert [e.tag for e in root] == ["Gather", "Say", "Hangup"]
    assert root.find("Say").text == NO_DIGIT  # type: ignore[union-attr]


def test_behind_nat_the_call_delivers_the_message_without_a_gather() -> None:
    root = ET.fromstring(alarm_twiml(ANNOUNCEMENT, gather_url=None))
    assert root.find("Gather") is None
    assert [s.text for s in root.findall("Say")] == [INTRODUCTION, ANNOUNCEMENT, ANNOUNCEMENT]
    assert "voice" not in root.find("Say").attrib  # type: ignore[union-attr]


def test_text_is_escaped_by_the_twiml_builder() -> None:
    root = ET.fromstring(alarm_twiml("a <b> & c", gather_url=GATHER + "?x=1&y=2"))
    assert root.find("Gather").attrib["action"] == GATHER + "?x=1&y=2"  # type: ignore[union-attr]
    assert "a <b> & c" in [s.text for s in root.iter("Say")]


def test_what_the_callee_hears_after_the_digit() -> None:
    root = ET.fromstring(digit_twiml("accepted"))
    assert [e.tag for e in root] == ["Say", "Hangup"]
    assert root.find("Say").text == ACCEPTED  # type: ignore[union-attr]
    for answer in ("taken", "declined", "none", "unknown"):
        assert ET.fromstring(digit_twiml(answer)).find("Say") is not None  # type: ignore[arg-type]


# -- through the running gateway, against the double's Calls resource --------------------



def voice_gateway(tmp_path: Path, twilio: FaultyTwilioDouble, pty: Pty, *,
                  port: int | None = None, voice: dict[str, Any] | None = None,
                  monotonic: Callable[[], float] = time.monotonic,
                  **sections: Any) -> Gateway:
    """A gateway with calls on, its webhook listener on ``port`` (default: a free one)
    as its public URL, and a serial receiver on ``pty``."""
    port = port or free_port()
    cfg = gateway_config(tmp_path, twilio, webhooks={"port": port},
                         sms={"public_url": f"http://127.0.0.1:{port}"},
                         alert={"backend": "none"},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}],
                         voice={"enabled": True, **(voice or {})}, **sections)
    return Gateway(cfg, secrets_for(twilio), monotonic=monotonic)


def contact_id_device(gw: Gateway, index: int = 0) -> Device:
    assert gw.registry is not None
    return sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                  key=lambda d: d.device_id)[index]


async def press(gw: Gateway, pty: Pty, device: Device) -> str:
    assert gw.journal is not None
    await eventually(gw.serial[0].connected.is_set)
    pty.write(encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001"))
    assert await pty.read(1, timeout=5) == ACK
    alarms = await eventually(gw.journal.open_alarms)
    return str(alarms[0].alarm_id)


@pytest.mark.integration
async def test_the_first_family_contact_is_called_presses_1_and_takes_the_alarm(
    tmp_path: Path, pty: Pty, twilio: FaultyTwilioDouble
) -> None:
    gw = voice_gateway(tmp_path, twilio, pty)
    async with running(gw):
        assert gw.journal is not None and gw.registry is not None and gw.webhooks is not None
        device = contact_id_device(gw)
        elder = gw.registry.elders[device.elder_id]
        first = elder.contacts[0]
        twilio.script_callee(first.phone, "answer", digit="1")
        alarm_id = await press(gw, pty, device)
        [call] = await twilio.wait_for_calls(1)
        # What the gateway asked of Twilio: documented parameters only, Mandarin TwiML.
        assert call.undocumented_parameters == frozenset()
        assert call.to == first.phone and call.from_ == "+15005550006"
        assert call.machine_detection == "Enable" and call.timeout == 30
        assert call.status_callback == f"{gw.webhooks.url}/twilio/voice/status"
        assert set(call.status_callback_events) == {"initiated", "ringing", "answered",
                                                    "completed"}
        said = ET.fromstring(call.twiml or "")
        assert {s.attrib["language"] for s in said.iter("Say")} == {"cmn-CN"}
        assert elder.name in ET.tostring(said, encoding="unicode")
        # Everyone wave 1 texts got their SMS; the callee answers and presses 1.
        await gw.dispatcher.wait_idle(timeout=15)  # type: ignore[union-attr]
        done = await twilio.advance_call(call.sid)
        assert done.status == "completed"
        assert [ET.fromstring(a).find("Say").text  # type: ignore[union-attr]
                for a in done.gather_answers] == [ACCEPTED]
        record = await gw.journal.get_alarm(alarm_id)
        assert record.state is AlarmState.ACKNOWLEDGED
        assert record.acknowledged_by == f"call:{first.name}"
        [row] = await gw.journal.calls(alarm_id)
        assert row.state is CallState.ACCEPTED and row.digits == "1" and row.sid == call.sid
        # Everyone told gets "taken by" (not the one who took it).
        taken = await eventually(lambda: _taken(gw, alarm_id))
        assert first.phone not in {n.phone for n in taken}
        assert all(first.name in n.body for n in taken)
        events = [ev for _, ev, _ in await gw.journal.alarm_log(alarm_id)]
        assert [e for e in events if e.startswith("call.")] == [
            "call.placed", "call.ringing", "call.answered", "call.accepted"]
        status, metrics = await control(gw, "GET", "/metrics")
        assert status == 200 and 'gateway_calls_total{state="accepted"} 1.0' in metrics
        # A forged digit (no valid X-Twilio-Signature) is refused before anything runs.
        async with aiohttp.ClientSession() as http, http.post(
                f"{gw.webhooks.url}/twilio/voice/gather",
                data={"CallSid": call.sid, "To": first.phone, "Digits": "1"},
                headers={"X-Twilio-Signature": "forged"}) as resp:
            assert resp.status == 403


async def _taken(gw: Gateway, alarm_id: str) -> list[Any]:
    assert gw.journal is not None
    return [n for n in await gw.journal.notifications(alarm_id)
            if n.kind is MessageKind.TAKEN]


@pytest.mark.integration
async def test_a_landline_facility_is_called_and_never_texted(
    tmp_path: Path, pty: Pty, twilio: FaultyTwilioDouble
) -> None:
    gw = voice_gateway(tmp_path, twilio, pty,
                       escalation={"waves": [{"after_s": 0, "hospital": True}]})
    async with running(gw):
        assert gw.journal is not None and gw.registry is not None
        device = contact_id_device(gw)
        hospital = next(f for f in gw.registry.facilities.values()
                        if f.kind.value == "hospital")
        assert hospital.duty_phone in gw.registry.no_sms  # the sample's duty line is a landline
        alarm_id = await press(gw, pty, device)
        [call] = await twilio.wait_for_calls(1)
        assert call.to == hospital.duty_phone
        await twilio.advance_call(call.sid)  # answered, nobody presses anything
        [row] = await eventually(lambda: _calls_ended(gw, alarm_id))
        assert row.state is CallState.UNANSWERED and row.role == "facility"
        await gw.dispatcher.wait_idle(timeout=15)  # type: ignore[union-attr]
        assert twilio.messages == [] and await gw.journal.notifications(alarm_id) == []


async def _calls_ended(gw: Gateway, alarm_id: str) -> list[Any] | None:
    assert gw.journal is not None
    rows = await gw.journal.calls(alarm_id)
    return rows if rows and all(r.state.final for r in rows) else None


@pytest.mark.integration
async def test_a_call_tree_moves_past_busy_and_no_answer_until_one_accepts(
    tmp_path: Path, pty: Pty, twilio: FaultyTwilioDouble
) -> None:
    gw = voice_gateway(tmp_path, twilio, pty, escalation={
        "waves": [{"after_s": 0, "staff": 3, "channels": {"staff": "both"}}]})
    async with running(gw):
        assert gw.journal is not None and gw.registry is not None and gw.geo is not None
        device = contact_id_device(gw)
        elder = gw.registry.elders[device.elder_id]
        nearest = [r.phone for r in gw.geo.lookup(elder.location, k=3).responders]
        for phone, outcome, digit in zip(nearest, ("busy", "no-answer", "answer"),
                                         (None, None, "1"), strict=True):
            twilio.script_callee(phone, outcome, digit=digit)  # type: ignore[arg-type]
        alarm_id = await press(gw, pty, device)
        for n in (1, 2, 3):
            calls = await twilio.wait_for_calls(n)
            assert len(calls) == n  # one at a time: the next only after this one ended
            await twilio.advance_call(calls[-1].sid)
        assert [c.to for c in twilio.calls] == nearest  # nearest first
        record = await eventually(lambda: _acknowledged(gw, alarm_id))
        taker = next(r for r in gw.registry.responders.values() if r.phone == nearest[2])
        assert record.acknowledged_by == f"call:{taker.name}"
        rows = await gw.journal.calls(alarm_id)
        assert [r.state for r in rows] == [CallState.BUSY, CallState.NO_ANSWER,
                                           CallState.ACCEPTED]
        assert all(r.tree for r in rows)


async def _acknowledged(gw: Gateway, alarm_id: str) -> Any:
    assert gw.journal is not None
    rec = await gw.journal.get_alarm(alarm_id)
    return rec if rec.state is AlarmState.ACKNOWLEDGED else None


def test_the_gateway_sends_only_documented_call_parameters() -> None:
    # What gateway.voice.Caller sends, by twilio-python's names for them.
    sent = {"To", "From", "Twiml", "Timeout", "StatusCallback", "StatusCallbackMethod",
            "StatusCallbackEvent", "MachineDetection"}
    assert sent <= CALL_CREATE_PARAMETERS


@pytest.mark.integration
async def test_a_call_tree_stopped_mid_way_resumes_without_calling_anyone_twice(
    tmp_path: Path, pty: Pty, twilio: FaultyTwilioDouble
) -> None:
    port = free_port()  # the same after the restart: Twilio's callbacks go there

    def gateway() -> Gateway:
        return voice_gateway(tmp_path, twilio, pty, port=port, escalation={
            "waves": [{"after_s": 0, "staff": 3, "channels": {"staff": "both"}}]})

    gw = gateway()
    async with running(gw):
        assert gw.registry is not None and gw.geo is not None
        device = contact_id_device(gw)
        elder = gw.registry.elders[device.elder_id]
        nearest = [r.phone for r in gw.geo.lookup(elder.location, k=3).responders]
        for phone, outcome, digit in zip(nearest, ("busy", "no-answer", "answer"),
                                         (None, None, "1"), strict=True):
            twilio.script_callee(phone, outcome, digit=digit)  # type: ignore[arg-type]
        alarm_id = await press(gw, pty, device)
        [first] = await twilio.wait_for_calls(1)
        await twilio.advance_call(first.sid)
        await twilio.wait_for_calls(2)  # the second is ringing when the gateway stops
    gw = gateway()
    async with running(gw):
        assert gw.journal is not None
        second = twilio.calls[1]
        await twilio.advance_call(second.sid)  # its end reaches the restarted gateway
        calls = await twilio.wait_for_calls(3)
        await twilio.advance_call(calls[2].sid)
        await eventually(lambda: _acknowledged(gw, alarm_id))
        assert [c.to for c in twilio.calls] == nearest  # nobody called twice
        rows = await gw.journal.calls(alarm_id)
        assert [r.state for r in rows] == [CallState.BUSY, CallState.NO_ANSWER,
                                           CallState.ACCEPTED]


@pytest.mark.integration
async def test_behind_nat_a_call_still_delivers_the_message_and_is_polled(
    tmp_path: Path, pty: Pty, twilio: FaultyTwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio, alert={"backend": "none"},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}],
                         voice={"enabled": True, "poll_s": 0.05})
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None and gw.registry is not None and gw.webhooks is None
        device = contact_id_device(gw)
        alarm_id = await press(gw, pty, device)
        [call] = await twilio.wait_for_calls(1)
        assert call.status_callback is None  # nothing can reach us
        said = ET.fromstring(call.twiml or "")
        assert said.find("Gather") is None  # nobody can accept by digit
        # The default voice speaks Mandarin (Twilio's own default, "man", does not).
        assert {(x.get("language"), x.get("voice")) for x in said.iter("Say")} == {
            ("cmn-CN", "Polly.Zhiyu")}
        assert [s.text for s in said.findall("Say")][1] == [s.text for s in said.findall(
            "Say")][2]  # the announcement, twice
        await twilio.advance_call(call.sid)
        [row] = await eventually(lambda: _calls_ended(gw, alarm_id))
        assert row.state is CallState.UNANSWERED and row.status == "completed"
        assert twilio.call_callbacks == []
        assert (await gw.journal.get_alarm(alarm_id)).state is not AlarmState.ACKNOWLEDGED


@pytest.mark.integration
async def test_a_redelivered_digit_or_late_status_changes_nothing(
    tmp_path: Path, pty: Pty, twilio: FaultyTwilioDouble
) -> None:
    gw = voice_gateway(tmp_path, twilio, pty)
    async with running(gw):
        assert gw.journal is not None and gw.registry is not None and gw.calls is not None
        device = contact_id_device(gw)
        first = gw.registry.elders[device.elder_id].contacts[0]
        twilio.script_callee(first.phone, "answer", digit="1")
        alarm_id = await press(gw, pty, device)
        [call] = await twilio.wait_for_calls(1)
        await twilio.advance_call(call.sid)
        before = await gw.journal.calls(alarm_id)
        # Twilio retries a webhook it thinks failed; events may come late and out of order.
        assert await gw.calls.digits_received(CallDigits(call.sid, "1", first.phone,
                                                         None)) == "accepted"
        await gw.calls.status_received(CallUpdate(call.sid, "ringing", first.phone, None,
                                                  None, 1))
        after = await gw.journal.calls(alarm_id)
        log = [ev for _, ev, _ in await gw.journal.alarm_log(alarm_id)]
        assert log.count("call.accepted") == 1
        assert [r.state for r in after] == [r.state for r in before] == [CallState.ACCEPTED]
        assert (await gw.journal.get_alarm(alarm_id)).acknowledged_by == f"call:{first.name}"


@pytest.mark.integration
@pytest.mark.parametrize("fault", [Fault.drop_after_receive(), Fault.status(500)],
                         ids=["dropped", "500"])
async def test_a_call_whose_answer_was_lost_is_found_not_placed_twice(
    tmp_path: Path, pty: Pty, twilio: FaultyTwilioDouble, fault: Fault
) -> None:
    gw = voice_gateway(tmp_path, twilio, pty)
    async with running(gw):
        assert gw.journal is not None and gw.registry is not None
        device = contact_id_device(gw)
        first = gw.registry.elders[device.elder_id].contacts[0]
        twilio.inject(fault, target="call_create")
        alarm_id = await press(gw, pty, device)
        rows = await eventually(lambda: _placed(gw, alarm_id))
        calls_to_first = [c for c in twilio.calls if c.to == first.phone]
        if fault.kind == "drop":  # Twilio had it: found, adopted, not placed again
            assert len(calls_to_first) == 1 and rows[0].sid == calls_to_first[0].sid
        else:  # a 500 created nothing here: looked up, none found, placed once more
            assert len(calls_to_first) == 1 and rows[0].attempts == 2


async def _placed(gw: Gateway, alarm_id: str) -> list[Any] | None:
    assert gw.journal is not None
    rows = await gw.journal.calls(alarm_id)
    return rows if rows and rows[0].sid else None


@pytest.mark.integration
async def test_when_twilio_cannot_place_a_call_the_gsm_modem_rings_the_number(
    tmp_path: Path, pty: Pty, twilio: FaultyTwilioDouble
) -> None:
    async with SimulatedModem() as modem:
        gw = voice_gateway(tmp_path, twilio, pty, gsm={
            "port": modem.port_path, "command_timeout_s": 2, "send_timeout_s": 5,
            "ring_s": 0.2})
        async with running(gw):
            assert gw.journal is not None and gw.registry is not None
            device = contact_id_device(gw)
            first = gw.registry.elders[device.elder_id].contacts[0]
            await twilio.outage(True, refuse=True)  # Twilio unreachable: nothing placed
            alarm_id = await press(gw, pty, device)
            [row] = await eventually(lambda: _calls_ended(gw, alarm_id), timeout=30)
            assert row.state is CallState.RANG and row.phone == first.phone
            assert modem.dialled == [first.phone] and modem.hung_up == 1
            assert twilio.calls == []
            events = [ev for _, ev, _ in await gw.journal.alarm_log(alarm_id)]
            assert "call.rang_by_modem" in events


@pytest.mark.integration
async def test_a_call_tree_stops_at_its_bound_and_skips_whom_it_did_not_reach(
    tmp_path: Path, pty: Pty, twilio: FaultyTwilioDouble
) -> None:
    shift = [0.0]

    def monotonic() -> float:  # the gateway's clock for the tree's bound, moved by the test
        return time.monotonic() + shift[0]

    gw = voice_gateway(tmp_path, twilio, pty, voice={"tree_max_s": 60}, monotonic=monotonic,
                       escalation={"waves": [{"after_s": 0, "staff": 3,
                                              "channels": {"staff": "voice"}}]})
    async with running(gw):
        assert gw.journal is not None
        device = contact_id_device(gw)
        alarm_id = await press(gw, pty, device)
        [first] = await twilio.wait_for_calls(1)
        twilio.script_callee(first.to, "no-answer")
        shift[0] += 61  # the first call rang past the tree's bound
        await twilio.advance_call(first.sid)
        rows = await eventually(lambda: _calls_ended(gw, alarm_id))
        assert [r.state for r in rows] == [CallState.NO_ANSWER, CallState.SKIPPED,
                                           CallState.SKIPPED]
        assert len(twilio.calls) == 1
        assert twilio.messages == []  # staff by voice only: not texted


@pytest.mark.integration
async def test_a_drill_calls_only_whom_it_names_and_says_it_is_a_drill(
    tmp_path: Path, pty: Pty, twilio: FaultyTwilioDouble
) -> None:
    gw = voice_gateway(tmp_path, twilio, pty)
    async with running(gw):
        assert gw.intake is not None and gw.registry is not None and gw.journal is not None
        device = contact_id_device(gw)
        first = gw.registry.elders[device.elder_id].contacts[0]  # wave 1 calls them
        # The drill decoder's event, through the gateway's own intake (as the MQTT link
        # hands it over): the drill names the first family contact only.
        [event] = DrillDecoder().decode(
            f"alarm/drills/{device.device_id}/event",
            encode_drill("d-voice", by="li", notify=[first.phone]))
        await gw.intake.handle(event, "mqtt")
        [call] = await twilio.wait_for_calls(1)
        assert call.to == first.phone
        said = [s.text or "" for s in ET.fromstring(call.twiml or "").iter("Say")]
        assert said[1].startswith(DRILL_SPOKEN_PREFIX)  # the announcement, as a drill
        assert said[1] == said[2]
        await gw.dispatcher.wait_idle(timeout=15)  # type: ignore[union-attr]
        assert [m.to for m in twilio.messages] == [first.phone]  # nobody else told
