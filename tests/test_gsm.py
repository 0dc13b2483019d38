"""The GSM-modem SMS fallback against the simulated modem, through real ptys and pyserial."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError
from serial_asyncio_fast import open_serial_connection

from devices.gsm_pdu import decode_submit, encode_submit
from gateway.config import GsmSection
from gateway.gsm import GsmModemError, GsmModemSender, cms_error_kind
from gateway.sms import Attempt, SmsSendError
from tests.helpers import eventually
from tests.support.gsm_modem_sim import SimulatedModem

pytestmark = pytest.mark.integration

TO = "+8613812345678"
INIT = ["AT", "ATE0", "AT+CMEE=1", "AT+CMGF=0", "AT+CPIN?", "AT+CREG?"]
# 134 characters: exactly two UCS-2 parts of 67.
ALARM_ZH = (
    "【一键通紧急报警】垦利区胜坨镇幸福社区3号楼2单元101室王秀英（86岁）于14:32按下紧急呼叫按钮，"
    "系统多次回拨无人接听。请网格员张建国立即上门查看并在指挥中心平台确认处置结果；最近医院："
    "垦利区人民医院，距离1.2公里。家属电话已同步通知，请勿重复拨打电话。谢谢！"
)


class Sleeps:
    """Injected sleep: records the backoff delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def gsm_settings(modem: SimulatedModem, **overrides: Any) -> GsmSection:
    # Generous timeouts unless a test is about a timeout: the machine is shared.
    fields: dict[str, Any] = {"command_timeout_s": 5.0, "send_timeout_s": 5.0, **overrides}
    return GsmSection(port=modem.port_path, **fields)


@pytest.fixture
async def modem() -> AsyncIterator[SimulatedModem]:
    async with SimulatedModem() as sim:
        yield sim


def cmgs(to: str, text: str) -> str:
    return f"AT+CMGS={encode_submit(to, text)[0].tpdu_length}"


def cmgs_commands(modem: SimulatedModem) -> list[str]:
    return [c for c in modem.commands if c.startswith("AT+CMGS")]


# ----------------------------------------------------------------------------- init


async def test_init_sequence_and_probe(modem: SimulatedModem) -> None:
    async with GsmModemSender(gsm_settings(modem)) as sender:
        assert sender.connected
        assert modem.commands == INIT
        status = await sender.probe()
    assert status.sim_ready
    assert status.registered
    assert status.registration == 1
    assert status.signal_rssi == 20
    assert not sender.connected


async def test_missing_modem_does_not_stop_start_and_is_opened_by_a_send(
    modem: SimulatedModem,
) -> None:
    path = modem.port_path
    modem.unplug()
    sleeps = Sleeps()
    settings = gsm_settings(modem, max_attempts=2)
    async with GsmModemSender(settings, sleep=sleeps) as sender:
        assert not sender.connected
        with pytest.raises(SmsSendError) as info:
            await sender.send(TO, "alarm")
        assert info.value.retryable
        assert not info.value.permanent
        assert not info.value.outcome_unknown
        assert [a.outcome for a in info.value.attempts] == ["retry", "failed"]
        assert all("modem not ready" in (a.error or "") for a in info.value.attempts)
        assert len(sleeps.delays) == 1

        modem.replug()
        assert modem.port_path == path
        result = await sender.send(TO, "alarm")
    assert result.sid == "gsm:0"
    assert modem.commands == [*INIT, cmgs(TO, "alarm")]


async def test_sim_not_ready_then_inserted(modem: SimulatedModem) -> None:
    modem.set_sim_ready(False)
    settings = gsm_settings(modem, max_attempts=1)
    async with GsmModemSender(settings, sleep=Sleeps()) as sender:
        assert not sender.connected
        with pytest.raises(SmsSendError) as info:
            await sender.send(TO, "alarm")
        assert info.value.retryable
        assert info.value.code == 10  # +CME ERROR: 10, SIM not inserted
        modem.set_sim_ready(True)
        await sender.send(TO, "alarm")
    assert len(modem.received) == 1


@pytest.mark.parametrize("stat", [0, 2, 3, 4])
async def test_unregistered_modem_is_not_used(modem: SimulatedModem, stat: int) -> None:
    modem.set_registration(stat)
    async with GsmModemSender(gsm_settings(modem), sleep=Sleeps()) as sender:
        assert not sender.connected
        with pytest.raises(GsmModemError, match="not registered") as info:
            await sender.probe()
    assert info.value.command == "AT+CREG?"


async def test_roaming_counts_as_registered(modem: SimulatedModem) -> None:
    modem.set_registration(5)
    async with GsmModemSender(gsm_settings(modem)) as sender:
        assert sender.connected
        status = await sender.probe()
        await sender.send(TO, "alarm")
    assert status.registration == 5
    assert status.registered
    assert len(modem.received) == 1


# ----------------------------------------------------------------------------- sending


async def test_short_ascii_alarm_goes_as_one_gsm7_message(modem: SimulatedModem) -> None:
    seen: list[Attempt] = []

    async def on_attempt(attempt: Attempt) -> None:
        seen.append(attempt)

    body = "ALARM Wang Xiuying (86), Bldg 3-2-101: SOS pressed 14:32. Please visit now."
    async with GsmModemSender(gsm_settings(modem)) as sender:
        result = await sender.send(TO, body, on_attempt=on_attempt)
    assert result.sid == "gsm:0"
    assert result.status == "sent"
    assert result.num_segments == 1
    assert result.attempts == 1
    assert result.error_code is None
    assert [(a.number, a.outcome) for a in seen] == [(1, "accepted")]
    [sms] = modem.received
    assert (sms.to, sms.text, sms.udh) == (TO, body, None)
    assert sms.pdu_hex[26:28] == "00"  # TP-DCS: after SMSC, first, MR, 0D 91 + 7 octets, PID
    assert decode_submit(sms.pdu_hex) == (TO, body, None)
    assert cmgs_commands(modem) == [f"AT+CMGS={len(sms.pdu_hex) // 2 - 1}"]


async def test_chinese_alarm_goes_as_two_ucs2_parts_and_reassembles(
    modem: SimulatedModem,
) -> None:
    assert len(ALARM_ZH) == 134
    async with GsmModemSender(gsm_settings(modem)) as sender:
        result = await sender.send(TO, ALARM_ZH)
    assert result.num_segments == 2
    assert result.sid == "gsm:0,1"
    first, second = modem.received
    assert first.udh is not None
    assert second.udh is not None
    reference = first.udh[0]
    assert (first.udh, second.udh) == ((reference, 2, 1), (reference, 2, 2))
    assert (len(first.text), len(second.text)) == (67, 67)
    assert all(sms.pdu_hex[26:28] == "08" for sms in modem.received)  # UCS-2
    assert modem.reassembled() == [(TO, ALARM_ZH)]


async def test_long_messages_use_distinct_references(modem: SimulatedModem) -> None:
    async with GsmModemSender(gsm_settings(modem)) as sender:
        await sender.send(TO, ALARM_ZH)
        await sender.send(TO, ALARM_ZH)
    references = {sms.udh[0] for sms in modem.received if sms.udh is not None}
    assert len(references) == 2
    assert modem.reassembled() == [(TO, ALARM_ZH), (TO, ALARM_ZH)]


async def test_concurrent_sends_do_not_interleave_on_the_half_duplex_modem(
    modem: SimulatedModem,
) -> None:
    bodies = [f"{i}号 {ALARM_ZH}"[:134] for i in range(3)]
    async with GsmModemSender(gsm_settings(modem)) as sender:
        results = await asyncio.gather(*(sender.send(TO, b) for b in bodies))
    assert sorted(modem.reassembled()) == sorted((TO, b) for b in bodies)
    # A 304 (length mismatch) would show a PDU written into another exchange.
    assert [r.attempts for r in results] == [1, 1, 1]
    assert len(cmgs_commands(modem)) == 6
    sids = [mr for r in results for mr in r.sid.removeprefix("gsm:").split(",")]
    assert sorted(int(s) for s in sids) == list(range(6))


async def test_unsolicited_result_codes_are_skipped(modem: SimulatedModem) -> None:
    modem.queue_urc("+CREG: 2", before="AT+CREG?")
    modem.queue_urc('+CREG: 3,"1A2B","00C3"', before="AT+CREG?")
    async with GsmModemSender(gsm_settings(modem)) as sender:
        assert sender.connected
        modem.queue_urc("RING")
        modem.queue_urc('+CMTI: "SM",3')
        modem.queue_urc("+CREG: 1")
        first = await sender.send(TO, "one")
        modem.queue_urc("RING", before="AT+CMGS")
        modem.queue_urc("NO CARRIER", before="AT+CMGS")
        modem.send_urc('+CMTI: "SM",4')
        second = await sender.send(TO, ALARM_ZH)
        status = await sender.probe()
    assert (first.sid, second.sid) == ("gsm:0", "gsm:1,2")
    assert status.registration == 1
    assert modem.reassembled() == [(TO, "one"), (TO, ALARM_ZH)]


async def test_echo_on_is_tolerated(modem: SimulatedModem) -> None:
    async with GsmModemSender(gsm_settings(modem)) as sender:
        await sender.send(TO, "one")
        # Echo turned back on behind our back (the port is ours alone, so
        # through the sender's own exchange): answers now follow the modem
        # repeating every byte we write, PDU included.
        async with sender._lock:
            await sender._command(await sender._ensure_port(), "ATE1")
        result = await sender.send(TO, ALARM_ZH)
    assert result.attempts == 1
    assert modem.reassembled() == [(TO, "one"), (TO, ALARM_ZH)]


# ----------------------------------------------------------------------------- errors


async def test_cms_500_is_retried_then_sent(modem: SimulatedModem) -> None:
    modem.fail_next(500)
    sleeps = Sleeps()
    seen: list[Attempt] = []

    async def on_attempt(attempt: Attempt) -> None:
        seen.append(attempt)

    async with GsmModemSender(gsm_settings(modem), sleep=sleeps) as sender:
        result = await sender.send(TO, "alarm", on_attempt=on_attempt)
    assert result.attempts == 2
    assert [(a.outcome, a.code) for a in seen] == [("retry", 500), ("accepted", None)]
    assert seen[0].delay_s == sleeps.delays[0]
    assert len(sleeps.delays) == 1
    assert len(modem.received) == 1
    assert len(cmgs_commands(modem)) == 2


async def test_retry_resumes_at_the_failed_part(modem: SimulatedModem) -> None:
    async with GsmModemSender(gsm_settings(modem), sleep=Sleeps()) as sender:
        sent = asyncio.create_task(sender.send(TO, ALARM_ZH))
        await modem.wait_for_sms(1)
        modem.fail_next(42)  # congestion on part 2
        result = await sent
    assert result.attempts == 2
    assert [s.udh[2] for s in modem.received if s.udh] == [1, 2]
    assert len(cmgs_commands(modem)) == 3
    assert modem.reassembled() == [(TO, ALARM_ZH)]


@pytest.mark.parametrize("code", [1, 21, 196, 304, 330])
async def test_permanent_cms_error_is_not_retried(modem: SimulatedModem, code: int) -> None:
    modem.fail_next(code)
    sleeps = Sleeps()
    async with GsmModemSender(gsm_settings(modem), sleep=sleeps) as sender:
        with pytest.raises(SmsSendError) as info:
            await sender.send(TO, "alarm")
    error = info.value
    assert error.permanent
    assert not error.retryable
    assert not error.outcome_unknown
    assert error.code == code
    assert [(a.outcome, a.code) for a in error.attempts] == [("failed", code)]
    assert sleeps.delays == []
    assert modem.received == []


async def test_transient_errors_exhaust_the_attempts(modem: SimulatedModem) -> None:
    for code in (38, 331, 500):
        modem.fail_next(code)
    sleeps = Sleeps()
    async with GsmModemSender(gsm_settings(modem), sleep=sleeps) as sender:
        with pytest.raises(SmsSendError) as info:
            await sender.send(TO, "alarm")
        assert sender.connected  # an answered error leaves the modem usable
    error = info.value
    assert error.retryable
    assert not error.permanent
    assert not error.outcome_unknown
    assert [(a.outcome, a.code) for a in error.attempts] == [
        ("retry", 38),
        ("retry", 331),
        ("failed", 500),
    ]
    assert len(sleeps.delays) == 2
    assert all(0 <= d <= 5.0 for d in sleeps.delays)


async def test_partial_delivery_is_reported_as_outcome_unknown(modem: SimulatedModem) -> None:
    settings = gsm_settings(modem, max_attempts=1)
    async with GsmModemSender(settings, sleep=Sleeps()) as sender:
        sent = asyncio.create_task(sender.send(TO, ALARM_ZH))
        await modem.wait_for_sms(1)
        modem.fail_next(21)
        with pytest.raises(SmsSendError) as info:
            await sent
    assert info.value.permanent
    assert info.value.outcome_unknown  # part 1 reached the phone
    assert len(modem.received) == 1


async def test_no_answer_times_out_without_sending(modem: SimulatedModem) -> None:
    modem.no_answer(True)
    sleeps = Sleeps()
    settings = gsm_settings(modem, command_timeout_s=0.2, max_attempts=2)
    async with GsmModemSender(settings, sleep=sleeps) as sender:
        assert not sender.connected
        with pytest.raises(SmsSendError) as info:
            await sender.send(TO, "alarm")
    error = info.value
    assert error.timed_out
    assert error.retryable
    assert not error.outcome_unknown  # the PDU was never written
    assert [a.outcome for a in error.attempts] == ["retry", "failed"]
    assert modem.received == []


async def test_lost_answer_after_the_pdu_is_outcome_unknown(modem: SimulatedModem) -> None:
    modem.lose_next_answer()
    settings = gsm_settings(modem, send_timeout_s=0.2, max_attempts=1)
    async with GsmModemSender(settings, sleep=Sleeps()) as sender:
        with pytest.raises(SmsSendError) as info:
            await sender.send(TO, "alarm")
        assert not sender.connected  # state unknown: reopened before reuse
    error = info.value
    assert error.timed_out
    assert error.outcome_unknown
    assert error.retryable
    assert [a.outcome for a in error.attempts] == ["unknown"]
    # It did go out: the reason the caller must not assume it did not.
    assert [s.text for s in modem.received] == ["alarm"]


async def test_lost_answer_is_retried_duplicate_rather_than_missing(
    modem: SimulatedModem,
) -> None:
    modem.lose_next_answer()
    settings = gsm_settings(modem, send_timeout_s=0.2)
    async with GsmModemSender(settings, sleep=Sleeps()) as sender:
        result = await sender.send(TO, "alarm")
        assert sender.opens == 2  # reopened and re-initialised after the timeout
    assert result.attempts == 2
    assert result.sid == "gsm:1"
    assert [s.text for s in modem.received] == ["alarm", "alarm"]
    assert modem.commands.count("ATE0") == 2


async def test_cancelled_send_leaves_no_half_exchange_behind(modem: SimulatedModem) -> None:
    modem.lose_next_answer()
    async with GsmModemSender(gsm_settings(modem, send_timeout_s=60.0)) as sender:
        pending = asyncio.create_task(sender.send(TO, "first"))
        await modem.wait_for_sms(1)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert not sender.connected
        result = await sender.send(TO, "second")
        assert sender.opens == 2
    assert result.attempts == 1
    assert [s.text for s in modem.received] == ["first", "second"]


async def test_invalid_number_is_permanent_without_touching_the_modem(
    modem: SimulatedModem,
) -> None:
    async with GsmModemSender(gsm_settings(modem)) as sender:
        with pytest.raises(SmsSendError) as info:
            await sender.send("13812345678", "alarm")
    assert info.value.permanent
    assert info.value.attempts == ()
    assert cmgs_commands(modem) == []


# ----------------------------------------------------------------------------- unplug


async def test_unplug_between_sends_reopens_and_sends(modem: SimulatedModem) -> None:
    async with GsmModemSender(gsm_settings(modem), sleep=Sleeps()) as sender:
        first = await sender.send(TO, "before")
        modem.unplug()
        await eventually(lambda: not sender.connected, timeout=5)
        modem.replug()
        second = await sender.send(TO, "after")
        assert sender.connected
        assert sender.opens == 2
    assert (first.attempts, second.attempts) == (1, 1)
    assert [s.text for s in modem.received] == ["before", "after"]
    assert modem.commands == [*INIT, cmgs(TO, "before"), *INIT, cmgs(TO, "after")]


async def test_replug_before_the_sender_noticed(modem: SimulatedModem) -> None:
    async with GsmModemSender(gsm_settings(modem), sleep=Sleeps()) as sender:
        await sender.send(TO, "before")
        modem.unplug()
        modem.replug()
        result = await sender.send(TO, "after")
    # Either the reader saw the hang-up first or the first attempt failed on
    # the dead port; both end with one copy of the message.
    assert result.attempts in (1, 2)
    assert [s.text for s in modem.received] == ["before", "after"]


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (1, "permanent"),
        (21, "permanent"),
        (27, "retry"),
        (38, "retry"),
        (42, "retry"),
        (144, "permanent"),
        (192, "retry"),
        (195, "permanent"),
        (255, "retry"),
        (304, "permanent"),
        (310, "retry"),
        (330, "permanent"),
        (331, "retry"),
        (332, "unknown"),
        (500, "retry"),
        (530, "retry"),
    ],
)
def test_cms_error_table(code: int, kind: str) -> None:
    assert cms_error_kind(code) == kind


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"smsc": "13800000000"}, "smsc"),
        ({"send_timeout_s": 0}, "send_timeout_s"),
        ({"command_timeout_s": float("nan")}, "command_timeout_s"),
        ({"validity_minutes": 0}, "validity_minutes"),
        ({"backoff_initial_s": -1.0}, "backoff_initial_s"),
        ({"backoff_initial_s": 6.0, "backoff_max_s": 5.0}, "backoff_initial_s <= backoff_max_s"),
        ({"port": ""}, "port"),
    ],
)
def test_settings_are_validated(fields: dict[str, Any], key: str) -> None:
    fields = {"port": "/dev/null", **fields}
    with pytest.raises(ValidationError, match=re.escape(key)):
        GsmSection(**fields)


def test_settings_defaults_and_optional_validity() -> None:
    section = GsmSection(port="/dev/null", smsc="+8613800100500", validity_minutes=None)
    assert (section.baudrate, section.max_attempts, section.validity_minutes) == (115200, 3, None)
    assert (section.backoff_initial_s, section.backoff_max_s) == (0.5, 5.0)
    assert GsmSection(port="/dev/null").validity_minutes == 1440


# ----------------------------------------------------------------------------- the simulator


class Terminal:
    """A raw pyserial-asyncio-fast connection to the simulator, as a person at a terminal."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def say(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until(self, marker: bytes) -> bytes:
        async with asyncio.timeout(5):
            return await self.reader.readuntil(marker)


@pytest.fixture
async def terminal(modem: SimulatedModem) -> AsyncIterator[Terminal]:
    reader, writer = await open_serial_connection(url=modem.port_path, baudrate=115200)
    try:
        yield Terminal(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_simulator_echoes_until_ate0(terminal: Terminal) -> None:
    await terminal.say(b"AT\r")
    assert await terminal.until(b"OK\r\n") == b"AT\r\r\nOK\r\n"
    await terminal.say(b"ATE0\r")
    assert await terminal.until(b"OK\r\n") == b"ATE0\r\r\nOK\r\n"
    await terminal.say(b"AT+CSQ\r")
    assert await terminal.until(b"OK\r\n") == b"\r\n+CSQ: 20,99\r\n\r\nOK\r\n"
    await terminal.say(b"AT+CSCS?\r")
    assert await terminal.until(b"OK\r\n") == b'\r\n+CSCS: "GSM"\r\n\r\nOK\r\n'
    await terminal.say(b"AT+BOGUS\r")
    assert await terminal.until(b"ERROR\r\n") == b"\r\nERROR\r\n"


async def test_simulator_checks_the_announced_length(
    terminal: Terminal, modem: SimulatedModem
) -> None:
    pdu = encode_submit(TO, "hi")[0]
    await terminal.say(b"ATE0\r")
    await terminal.until(b"OK\r\n")
    await terminal.say(f"AT+CMGS={pdu.tpdu_length + 1}\r".encode())
    assert await terminal.until(b"> ") == b"\r\n> "
    await terminal.say(pdu.hex.encode() + b"\x1a")
    assert await terminal.until(b"\r\n+CMS ERROR: 304\r\n") == b"\r\n+CMS ERROR: 304\r\n"
    await terminal.say(f"AT+CMGS={pdu.tpdu_length}\r".encode())
    await terminal.until(b"> ")
    await terminal.say(b"00FF\x1b")  # ESC aborts
    assert await terminal.until(b"OK\r\n") == b"\r\nOK\r\n"
    await terminal.say(f"AT+CMGS={pdu.tpdu_length}\r".encode())
    await terminal.until(b"> ")
    await terminal.say(pdu.hex.encode() + b"\x1a")
    assert await terminal.until(b"OK\r\n") == b"\r\n+CMGS: 0\r\n\r\nOK\r\n"
    assert [(s.to, s.text) for s in modem.received] == [(TO, "hi")]


async def test_simulator_text_mode(terminal: Terminal, modem: SimulatedModem) -> None:
    await terminal.say(b"ATE0\rAT+CMGF=1\r")
    await terminal.until(b"OK\r\n\r\nOK\r\n")
    await terminal.say(f'AT+CMGS="{TO}"\r'.encode())
    await terminal.until(b"> ")
    await terminal.say(b"plain text\x1a")
    assert await terminal.until(b"OK\r\n") == b"\r\n+CMGS: 0\r\n\r\nOK\r\n"
    assert [(s.to, s.text, s.pdu_hex) for s in modem.received] == [(TO, "plain text", "")]


# ----------------------------------------------------------------------------- ringing


async def test_ring_dials_the_number_waits_and_hangs_up(modem: SimulatedModem) -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    async with GsmModemSender(gsm_settings(modem), sleep=sleep) as sender:
        await sender.ring("+8613800000001", 20)
        assert modem.dialled == ["+8613800000001"] and modem.hung_up == 1
        assert slept == [20]
        assert modem.commands[-2:] == ["ATD+8613800000001;", "ATH"]
        modem.set_registration(0)  # no network: the modem answers NO CARRIER
        with pytest.raises(SmsSendError) as err:
            await sender.ring("+8613800000002", 20)
        assert err.value.retryable and "could not ring" in str(err.value)
        with pytest.raises(SmsSendError) as bad:
            await sender.ring("+86 138; ATH", 20)
        assert bad.value.permanent
