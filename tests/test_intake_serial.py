"""Issue #3: serial intake (Sur-Gard receiver, caller-ID modem) never drops an alarm.

The gateway runs in process and opens a real pseudo-terminal through pyserial
(``serial_asyncio_fast``), exactly as it opens a USB adapter. The test plays the
device on the other side: ``os.openpty`` pairs, or a ``socat`` pty pair with stable
``link=`` paths when the line must be unplugged and come back under the same name.
The receiver's 4 s ACK timeout is injected (a short wait in the test), never slept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import time
import tty
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from devices.callerid import encode_callerid_block
from devices.events import Qualifier
from devices.surgard import ACK, NAK, encode_mlr2
from gateway.config import Config
from gateway.daemon import Gateway
from gateway.model import Device
from gateway.registry import load_registry
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import SAMPLE, Pty, eventually, gateway_config, running, secrets_for

pytestmark = pytest.mark.integration

# How long the simulated receiver waits for an ACK before it resends. The real one
# waits 4 s; the gateway's answer is either immediate or held back on purpose here.
RECEIVER_ACK_WAIT_S = 0.3


def devices_of(scheme: str) -> list[Device]:
    registry = load_registry(SAMPLE)
    return sorted((d for d in registry.devices.values() if d.scheme == scheme),
                  key=lambda d: d.device_id)


def press(device: Device, code: str = "101", zone: str = "001") -> bytes:
    """The Sur-Gard MLR2 frame of a new Contact ID event from the device's account."""
    return encode_mlr2("01", "1", device.address, Qualifier.NEW, code, "01", zone)


def rows(db: Path, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql, args).fetchall()


def surgard_config(tmp_path: Path, twilio: TwilioDouble, port: str,
                   protocol: str = "surgard") -> Config:
    return gateway_config(
        tmp_path, twilio,
        serial=[{"name": "rx1", "port": port, "protocol": protocol,
                 "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2}],
        alert={"backend": "none"},
    )


async def no_answer(line: Pty, wait: float = RECEIVER_ACK_WAIT_S) -> bool:
    """True when nothing comes back within ``wait`` (what a receiver sees as no ACK).

    Only meaningful after a positive sign that the gateway has the input (a log event, a
    journal row). Where answers are expected, prefer the link's order instead: the
    gateway answers each decoded frame exactly once, in order, so reading the answer to
    a later frame first and then ``link.frames`` equal to the answers read proves that
    nothing else is owed.
    """
    try:
        await line.read(1, timeout=wait)
    except TimeoutError:
        return True
    return False


class SocatLine:
    """A pty pair from socat with stable paths: ``gateway_path`` for the gateway,
    ``device_path`` for the test. ``unplug`` kills socat (both masters close);
    ``plug`` starts a new pair under the same names."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.gateway_path = str(directory / "ttyRX")
        self.device_path = str(directory / "ttyDEV")
        self._log = directory / "socat.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.device: Pty | None = None

    def _spawn(self) -> None:
        binary = shutil.which("socat")
        if binary is None:
            pytest.fail("socat is not installed")
        argv = [binary, "-d", "-d", f"pty,raw,echo=0,link={self.gateway_path}",
                f"pty,raw,echo=0,link={self.device_path}"]
        # If pytest itself is killed mid-test, socat goes with it instead of lingering.
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            argv = [setpriv, "--pdeathsig", "TERM", *argv]
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=log)

    async def plug(self) -> Pty:
        self._spawn()
        await eventually(lambda: os.path.exists(self.gateway_path)
                         and os.path.exists(self.device_path))
        fd = os.open(self.device_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(fd)
        # Pty.close closes both fds; the second is a duplicate so each closes once.
        self.device = Pty(fd, os.dup(fd), self.device_path)
        return self.device

    def unplug(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)
            self._proc = None


@contextlib.asynccontextmanager
async def socat_line(directory: Path) -> AsyncIterator[SocatLine]:
    line = SocatLine(directory)
    await line.plug()
    try:
        yield line
    finally:
        line.unplug()


class JournalLock:
    """Holds SQLite's write lock so the gateway's next commit waits (busy_timeout 5 s)."""

    def __init__(self, db: Path) -> None:
        self._conn = sqlite3.connect(db, isolation_level=None, timeout=5)
        self._conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        self._conn.close()


@contextlib.contextmanager
def journal_lock(db: Path) -> Iterator[JournalLock]:
    lock = JournalLock(db)
    try:
        yield lock
    finally:
        lock.release()


# -- unplug / replug ----------------------------------------------------------------------


async def test_unplug_and_replug_on_the_same_path_reopens_and_processes_new_frames(
    tmp_path: Path, twilio: TwilioDouble
) -> None:
    first, second = devices_of("contact_id")[:2]
    async with socat_line(tmp_path / "line") as line:
        cfg = surgard_config(tmp_path, twilio, line.gateway_path)
        db = cfg.model.gateway.journal_path
        gw = Gateway(cfg, secrets_for(twilio))
        with capture_logs() as logs:
            async with running(gw):
                link = gw.serial[0]
                await eventually(link.connected.is_set)
                assert line.device is not None
                line.device.write(press(first))
                assert await line.device.read() == ACK
                # Half a frame is on the wire when the cable comes out.
                frame = press(second)
                line.device.write(frame[:9])
                await asyncio.sleep(0.05)
                line.unplug()
                await eventually(lambda: not link.connected.is_set())
                device = await line.plug()
                await eventually(link.connected.is_set)
                device.write(frame)
                # The stale half was not glued to the new frame: an ACK, not a NAK.
                assert await device.read() == ACK
                # Two frames decoded, two answers read: none other is owed (the half
                # frame went with the old connection's decoder).
                assert link.frames == 2
    events = [e["event"] for e in logs]
    assert events.count("serial.disconnected") == 1
    connected = [e for e in logs if e["event"] == "serial.connected"]
    assert [e["reconnects"] for e in connected] == [0, 1]
    assert all(e["port"] == line.gateway_path for e in connected)
    assert "device.malformed" not in events
    assert rows(db, "SELECT device_id, presses FROM alarms ORDER BY received_at") == [
        (first.device_id, 1), (second.device_id, 1)]


# -- garbage, noise and frames split across writes ---------------------------------------


async def test_garbage_noise_and_split_frames_decode_with_the_right_answers(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    a, b = devices_of("contact_id")[2:4]
    cfg = surgard_config(tmp_path, twilio, pty.path)
    db = cfg.model.gateway.journal_path
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        await eventually(gw.serial[0].connected.is_set)
        link = gw.serial[0]
        # Line noise between frames is skipped and answered with nothing: the first
        # byte back is the answer to the junk frame after it (answers come in order).
        pty.write(b"\r\n\x00\r\n\x00")
        # Binary junk up to a DC4 is one malformed frame: NAK.
        pty.write(b"\xff\xfe\x80junk\x14")
        assert await pty.read() == NAK
        assert link.frames == 1
        # A frame dribbled out in pieces: no answer until its DC4, then one ACK.
        frame = press(a)
        for piece in (frame[:1], frame[1:6], frame[6:15], frame[15:-1]):
            pty.write(piece)
        pty.write(frame[-1:])
        assert await pty.read() == ACK
        assert link.frames == 2  # the pieces made one frame, answered once
        # A run longer than any frame (no DC4 in 200 bytes) is reported once, skipped to
        # the next DC4, and the frame after it still decodes.
        pty.write(b"A" * 200)
        assert await pty.read() == NAK
        pty.write(b"tail of the junk\x14" + press(b))
        assert await pty.read() == ACK
        assert link.frames == 4  # four frames, four answers read: none other is owed
    assert rows(db, "SELECT device_id FROM alarms ORDER BY received_at") == [
        (a.device_id,), (b.device_id,)]
    errors = rows(db, "SELECT error FROM device_messages WHERE error IS NOT NULL")
    assert len(errors) == 2


async def test_malformed_frames_are_naked_and_journaled_not_alarmed(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    device = devices_of("contact_id")[0]
    cfg = surgard_config(tmp_path, twilio, pty.path)
    db = cfg.model.gateway.journal_path
    gw = Gateway(cfg, secrets_for(twilio))
    good = press(device).decode("ascii")
    malformed = [
        good.replace(device.address, "12G4").encode("ascii"),  # account not hex
        good.replace("E101", "X101").encode("ascii"),  # unknown qualifier letter
        good[:-4].encode("ascii") + b"\x14",  # truncated zone
        b"9011 181234E12101001\x14",  # unsupported message type
    ]
    with capture_logs() as logs:
        async with running(gw):
            await eventually(gw.serial[0].connected.is_set)
            for frame in malformed:
                pty.write(frame)
                assert await pty.read() == NAK
            assert gw.serial[0].frames == len(malformed)  # one answer each, none owed
    assert rows(db, "SELECT COUNT(*) FROM alarms") == [(0,)]
    stored = rows(db, "SELECT raw, error FROM device_messages ORDER BY id")
    assert [raw for raw, _ in stored] == malformed
    assert all(error for _, error in stored)
    assert [e["event"] for e in logs].count("device.malformed") == len(malformed)


# -- the receiver resends what it did not see acknowledged --------------------------------


async def test_receiver_resending_an_unacked_frame_three_times_makes_one_alarm(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    device = devices_of("contact_id")[5]
    cfg = surgard_config(tmp_path, twilio, pty.path)
    db = cfg.model.gateway.journal_path
    gw = Gateway(cfg, secrets_for(twilio))
    frame = press(device, code="121")

    def received() -> int:
        return [e["event"] for e in logs].count("press.received")

    with capture_logs() as logs:
        async with running(gw):
            assert gw.dispatcher is not None
            link = gw.serial[0]
            await eventually(link.connected.is_set)
            # The journal cannot commit yet, so the gateway must not ACK; the receiver
            # times out and resends, three times, as Sur-Gard receivers do.
            with journal_lock(db):
                pty.write(frame)
                # The gateway has the frame and its commit waits on our lock: from here
                # on, silence on the line is the gateway withholding the ACK.
                await eventually(lambda: received() == 1)
                for _ in range(3):
                    assert await no_answer(pty)
                    pty.write(frame)
                assert await no_answer(pty)
                assert received() == 1  # still in the first commit: the copies wait
                assert rows(db, "SELECT COUNT(*) FROM alarms") == [(0,)]
            # Commit possible again: every copy is journaled and acknowledged, one by one.
            answers = b""
            while len(answers) < 4:
                answers += await pty.read(4 - len(answers))
            assert answers == ACK * 4
            assert link.frames == 4  # four copies, four answers: none other is owed
            await gw.dispatcher.wait_idle(timeout=15)
    assert rows(db, "SELECT device_id, presses, code FROM alarms") == [
        (device.device_id, 4, "121")]
    assert rows(db, "SELECT COUNT(DISTINCT alarm_id), COUNT(*) FROM device_messages") == [
        (1, 4)]
    # One alarm, so one round of SMS: each recipient exactly once.
    recipients = [m.to for m in twilio.messages]
    assert recipients and len(recipients) == len(set(recipients))


# -- caller-ID modem ----------------------------------------------------------------------


async def read_exactly(line: Pty, n: int, timeout: float = 5.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < n:
        data += await line.read(n - len(data), timeout=max(0.01, deadline - time.monotonic()))
    return data


async def test_callerid_modem_is_initialised_and_a_call_becomes_the_elders_alarm(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    phone = devices_of("phone")[0]
    registry = load_registry(SAMPLE)
    elder = registry.elders[phone.elder_id]
    # The registry keeps E.164 (+86 546 ...); the modem prints the national number.
    assert phone.address.startswith("+86546")
    national = "0" + phone.address.removeprefix("+86")
    cfg = surgard_config(tmp_path, twilio, pty.path, protocol="callerid")
    db = cfg.model.gateway.journal_path
    gw = Gateway(cfg, secrets_for(twilio))
    with capture_logs() as logs:
        async with running(gw):
            assert gw.dispatcher is not None
            init = b"ATZ\rAT+VCID=1\r"
            assert await read_exactly(pty, len(init)) == init
            pty.write(b"OK\r\nOK\r\n")  # the modem's answers to the two commands
            pty.write(encode_callerid_block(national))
            alarms = await eventually(lambda: rows(
                db, "SELECT device_id, elder_id, code, source FROM alarms"))
            assert alarms == [(phone.device_id, elder.elder_id, "call", "serial:rx1")]
            await gw.dispatcher.wait_idle(timeout=15)
            # A modem line is never answered: ACK/NAK belong to the Sur-Gard protocol.
            assert await no_answer(pty)
    family = {c.phone for c in elder.contacts}
    assert family and family <= {m.to for m in twilio.messages}
    received = next(e for e in logs if e["event"] == "alarm.received")
    assert received["device_id"] == phone.device_id
    # The caller's number is masked in the log.
    assert phone.address not in repr(logs) and national not in repr(logs)
