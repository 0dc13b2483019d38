"""The journal on a real, small file system (issue 9, fault 4): filled while presses are
journaled, then freed, it recovers by itself; a full disk never costs an alarm its id.

The volume is a 2 MB tmpfs (the size of the issue's report), or a loop-mounted ext4
image where tmpfs cannot be mounted; both need root. PRAGMA max_page_count is not used
here: it caps the database file only, while a real full disk also refuses the WAL and the
-shm file, which is where SQLite's defaults deadlocked."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.journal import (
    RESERVE_BYTES,
    Journal,
    JournalFull,
    JournalState,
    MessageKind,
    NotificationRecord,
    PressOutcome,
    new_alarm_id,
)
from gateway.lifecycle import AlarmState, IllegalTransition, NotificationState
from tests.helpers import eventually

pytestmark = pytest.mark.integration  # mounts a file system (mount/umount subprocesses)

RAW = b"\x01" * 2000  # a large frame, so that a few dozen presses fill what is left


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MB file system mounted at a fresh directory, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    vol = tmp_path / "vol"
    vol.mkdir()
    done = _run("mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(vol))
    if done.returncode != 0:
        img = tmp_path / "vol.img"
        with img.open("wb") as f:
            f.truncate(4 << 20)
        loop = _run("mkfs.ext4", "-q", str(img))
        if loop.returncode == 0:
            loop = _run("mount", "-o", "loop", str(img), str(vol))
        if loop.returncode != 0:
            pytest.skip(f"cannot mount a small file system: {done.stderr} {loop.stderr}")
    try:
        yield vol
    finally:
        if _run("umount", str(vol)).returncode != 0:
            _run("umount", "-l", str(vol))


def fill(vol: Path) -> Path:
    """Take every free byte of ``vol``, as another program's data would."""
    path = vol / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return path


def free_bytes(vol: Path) -> int:
    st = os.statvfs(vol)
    return st.f_bavail * st.f_frsize


def wal_size(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


class Button:
    """A device that resends until acknowledged, plus what intake does for it: the id
    its press was alerted under from memory when the journal could not commit."""

    def __init__(self, journal: Journal, device_id: str, at: float) -> None:
        self.journal = journal
        self.device_id = device_id
        self.at = at
        self.alerted_as: str | None = None
        self.failures = 0

    async def press(self) -> PressOutcome:
        while True:
            try:
                return await self.journal.record_press(
                    device_id=self.device_id, elder_id="e1", code="101", source="test",
                    address=f"contact_id:{self.device_id}", raw=RAW, received_at=self.at,
                    dedupe_window_s=60.0, alarm_id=self.alerted_as, alerted_at=self.at)
            except JournalFull:
                self.failures += 1
                if self.alerted_as is None:
                    self.alerted_as = new_alarm_id()  # alerted (and texted) from memory
                await asyncio.sleep(0.02)  # the receiver's resend interval


class Storm:
    """Buttons pressing at once; whatever the test's outcome, none outlives it."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[PressOutcome]] = []

    def start(self, button: Button) -> None:
        self.tasks.append(asyncio.create_task(button.press()))

    async def results(self) -> list[PressOutcome]:
        return await asyncio.wait_for(asyncio.gather(*self.tasks), 20)

    async def __aenter__(self) -> Storm:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def journal_on(vol: Path) -> Journal:
    return Journal(vol / "journal.sqlite3", idle_checkpoint_s=0.05, probe_interval_s=0.05)


async def test_a_volume_filled_under_presses_recovers_by_itself_and_keeps_every_id(
    small_volume: Path,
) -> None:
    async with journal_on(small_volume) as j:
        assert j.state is JournalState.OK and j.reserve_path.stat().st_size == RESERVE_BYTES
        early = [await Button(j, f"early{i}", 1000.0 + i).press() for i in range(3)]
        buttons: list[Button] = []
        async with Storm() as storm:
            filler = fill(small_volume)
            # A storm of presses on the filled volume: the room the WAL gives back takes
            # some of them; the rest wait, alerted from memory, resending.
            while j.state is not JournalState.FULL or sum(b.failures > 0 for b in buttons) < 5:
                b = Button(j, f"d{len(buttons)}", 2000.0 + len(buttons))
                buttons.append(b)
                storm.start(b)
                await asyncio.sleep(0.005)
                assert len(buttons) < 2000, "the volume never filled"
            assert not j.healthy and isinstance(j.last_error, JournalFull)
            # Checkpoints needed the reserve's room, and it is back for the next one.
            assert j.reserve_lent > 0 and j.reserve_path.exists()
            # Reads do not share the failing writes.
            open_ids = {a.alarm_id for a in await j.open_alarms()}
            assert {o.alarm_id for o in early} <= open_ids
            assert (await j.get_alarm(early[0].alarm_id)).device_id == "early0"
            assert await j.notifications(early[0].alarm_id) == []
            # Space returns: the journal is healthy again by itself, with no restart.
            filler.unlink()
            await asyncio.wait_for(j.wait_healthy(), 10)
            outcomes = await storm.results()
        # After the burst the WAL is truncated and the reserve is back.
        await eventually(lambda: wal_size(j.path) == 0 and j.reserve_path.exists())
        await eventually(lambda: j.state is JournalState.OK)
        waited = [b for b in buttons if b.alerted_as is not None]
        assert len(waited) >= 5
        for b, o in zip(buttons, outcomes, strict=True):
            if b.alerted_as is not None:  # journaled under the id it was alerted with
                assert o.alarm_id == b.alerted_as and o.adopted and o.new
            rec = await j.get_alarm(o.alarm_id)
            assert rec.device_id == b.device_id and rec.presses == 1
            assert rec.received_at == b.at
        # Every press journaled exactly once.
        alarms = await j.recent_alarms(limit=10_000)
        assert sorted(a.device_id for a in alarms) == sorted(
            [f"early{i}" for i in range(3)] + [b.device_id for b in buttons])
        assert await j.count("device_messages") == len(alarms)


async def test_a_graceful_restart_on_a_full_volume_comes_back_once_space_returns(
    small_volume: Path,
) -> None:
    async with journal_on(small_volume) as j:
        first = await Button(j, "d1", 1000.0).press()
        filler = fill(small_volume)
        for i in range(10_000):  # routine traffic eats the WAL's room, then the reserve
            try:
                await j.record_device_message(source="t", address="a", raw=RAW,
                                              received_at=1001.0 + i)
            except JournalFull:
                break
        assert j.state is JournalState.FULL
    # Stopping folded the WAL in and gave its blocks back; the other program takes them.
    fill(small_volume)
    assert free_bytes(small_volume) == 0
    async with journal_on(small_volume) as j:
        # The reopened journal knows at once that it cannot write, and still reads.
        assert j.state is JournalState.FULL and not j.healthy
        assert [a.alarm_id for a in await j.open_alarms()] == [first.alarm_id]
        with pytest.raises(JournalFull):
            await j.record_press(device_id="d2", elder_id="e1", code="101", source="t",
                                 address="a", raw=b"f", received_at=2000.0,
                                 dedupe_window_s=60.0)
        filler.unlink()
        await asyncio.wait_for(j.wait_healthy(), 10)
        second = await Button(j, "d2", 2000.0).press()
        assert second.new and second.alarm_id != first.alarm_id
        await eventually(lambda: wal_size(j.path) == 0 and j.reserve_path.exists())


async def test_a_journal_filling_its_volume_alone_keeps_its_wal_small_and_comes_back(
    small_volume: Path,
) -> None:
    # SQLite's defaults on this volume: a 2 MB WAL over a 4 KB database, and no write
    # (nor checkpoint, nor reopen) ever again. Here the rows go into the database.
    other = small_volume / "other-data"
    other.write_bytes(b"\0" * (256 * 1024))
    async with journal_on(small_volume) as j:
        rows = 0
        while True:
            try:
                await j.record_device_message(source="t", address="a", raw=RAW,
                                              received_at=100.0 + rows)
            except JournalFull:
                break
            rows += 1
        assert rows > 300 and j.state is JournalState.FULL
        assert wal_size(j.path) <= 2 * 64 * 4096 and j.path.stat().st_size > 1 << 20
        assert j.reserve_path.exists()
        assert await j.count("device_messages") == rows
        async with Storm() as storm:
            button = Button(j, "d1", 5000.0)
            storm.start(button)
            await eventually(lambda: button.failures > 0)
            other.unlink()  # someone frees space on the volume
            [outcome] = await storm.results()
        assert outcome.alarm_id == button.alerted_as and j.healthy
        await eventually(lambda: wal_size(j.path) == 0)


def memory_sms(alarm_id: str, phone: str, state: NotificationState,
               sid: str | None, at: float) -> NotificationRecord:
    """What the dispatcher holds for an SMS it sent while the journal was down."""
    return NotificationRecord(-1, alarm_id, MessageKind.ESCALATION, 1, "family", "张丽",
                              phone, "body", state, sid, 1, None, None, 12.0, at)


async def test_an_alarm_acknowledged_from_memory_is_journaled_with_its_id_and_sms(
    small_volume: Path,
) -> None:
    path = small_volume / "journal.sqlite3"
    async with journal_on(small_volume) as j:
        button = Button(j, "d1", 1000.0)
        filler = fill(small_volume)
        for i in range(10_000):
            try:
                await j.record_device_message(source="t", address="a", raw=RAW,
                                              received_at=900.0 + i)
            except JournalFull:
                break
        pressing = asyncio.create_task(button.press())
        await eventually(lambda: button.alerted_as is not None)
        alarm_id = button.alerted_as
        assert alarm_id is not None
        # While the press is only in memory: SMS went out, an operator takes it.
        j.defer_notifications(alarm_id, [
            memory_sms(alarm_id, "+8613800000001", NotificationState.SENDING, None, 1000.5),
            memory_sms(alarm_id, "+8613800000002", NotificationState.SENDING, None, 1000.5)])
        j.defer_notifications(alarm_id, [  # the answer to the first send came back
            memory_sms(alarm_id, "+8613800000001", NotificationState.ACCEPTED, "SM1", 1000.5)])
        assert j.defer_transition(alarm_id, AlarmState.ACKNOWLEDGED, by="operator:li",
                                  at=1010.0) is AlarmState.JOURNALED
        with pytest.raises(IllegalTransition):
            j.defer_transition(alarm_id, AlarmState.NOTIFYING)
        assert j.deferred_state(alarm_id) is AlarmState.ACKNOWLEDGED
        filler.unlink()
        outcome = await asyncio.wait_for(pressing, 10)
        assert outcome.alarm_id == alarm_id and outcome.adopted
        assert outcome.state is AlarmState.ACKNOWLEDGED
    async with Journal(path) as j:  # after a restart: one alarm, its SMS known
        [rec] = await j.open_alarms()
        assert rec.alarm_id == alarm_id and rec.state is AlarmState.ACKNOWLEDGED
        assert (rec.acknowledged_by, rec.acknowledged_at) == ("operator:li", 1010.0)
        sms = {n.phone: n for n in await j.notifications(alarm_id)}
        assert sms["+8613800000001"].state is NotificationState.ACCEPTED
        assert sms["+8613800000001"].sid == "SM1"
        assert sms["+8613800000002"].state is NotificationState.SENDING  # reconciled
        events = [e for _, e, _ in await j.alarm_log(alarm_id)]
        assert events[:2] == ["alarm.journaled", "alarm.acknowledged"]
        assert events.count("sms.adopted") == 2
