"""A full disk: the press is still heard and texted from memory, the device is not
acknowledged, and its resend is journaled once space is back, under the id it was
alerted and texted with (no second alarm, no second reference).

The disk here is PRAGMA max_page_count on the writer's connection; the journal's own
behaviour on a real, small file system is in tests/test_journal_space.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.daemon import Gateway
from gateway.journal import Journal, JournalFull
from gateway.lifecycle import AlarmState, NotificationState
from gateway.model import Device
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import Pty, control, eventually, gateway_config, running, secrets_for

pytestmark = pytest.mark.integration


async def fill(journal: Journal) -> None:
    """The disk fills up: SQLite answers SQLITE_FULL for anything that needs a new page."""
    await journal._run(lambda c: c.execute(
        "PRAGMA max_page_count = " + str(c.execute("PRAGMA page_count").fetchone()[0])))
    # Fill the last free pages (big rows, then small ones) so nothing more fits.
    for size in (3000, 300, 30, 1):
        for i in range(2000):
            try:
                await journal.record_device_message(
                    source="filler", address="x", raw=b"x" * size, received_at=float(i))
            except JournalFull:
                break
        for _ in range(2000):
            try:
                await journal.log_event("filler", "x" * size)
            except JournalFull:
                break


async def free(journal: Journal) -> None:
    await journal._run(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))


def first_contact_id_device(gw: Gateway) -> Device:
    assert gw.registry is not None
    return sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                  key=lambda d: d.device_id)[0]


async def test_full_disk_alarms_from_memory_and_withholds_the_ack(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    cfg = gateway_config(tmp_path, twilio, serial=[{
        "name": "rx", "port": pty.path, "protocol": "surgard"}])
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None and gw.registry is not None
        assert gw.player is not None
        await eventually(gw.serial[0].connected.is_set)
        device = first_contact_id_device(gw)
        frame = encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001")
        await fill(gw.journal)
        pty.write(frame)
        with pytest.raises(TimeoutError):
            await pty.read(timeout=1.0)  # no ACK: the receiver will resend
        # ...but the center hears it and the family is texted, from memory.
        await eventually(lambda: gw.player is not None and len(gw.player.active()) == 1)
        elder = gw.registry.elders[device.elder_id]
        await eventually(lambda: {c.phone for c in elder.contacts}
                         <= {m.to for m in twilio.messages})
        assert await gw.journal.open_alarms() == []  # reads work on the full disk
        [alerted] = gw.dispatcher.active.values()
        assert not alerted.durable
        texted = len(twilio.messages)
        # Space is freed; the receiver's resend is journaled and acknowledged.
        await free(gw.journal)
        pty.write(frame)
        assert await pty.read() == ACK
        [alarm] = await gw.journal.open_alarms()
        assert alarm.device_id == device.device_id
        # The same alarm: the id it was alerted and texted under, its first time, and no
        # second dispatch (which would have started before the ACK).
        assert alarm.alarm_id == alerted.alarm_id
        assert alarm.received_at == alerted.received_at
        assert list(gw.dispatcher.active) == [alarm.alarm_id] and alerted.durable
        assert len(gw.player.active()) == 1
        assert all(alarm.alarm_id in m.body for m in twilio.messages[:texted])
        assert gw.journal.healthy


async def test_an_alarm_texted_from_memory_is_acked_then_journaled_whole_never_texted_twice(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    """Disk full: the press is alerted and texted from memory; an operator acknowledges it
    (no "unknown alarm"), and those told hear who took it. Space returns: the resend is
    journaled under the same id, acknowledged, with every SMS and its sid. A restart
    then sends nothing again."""
    cfg = gateway_config(tmp_path, twilio, serial=[{
        "name": "rx", "port": pty.path, "protocol": "surgard"}])
    gw = Gateway(cfg, secrets_for(twilio))
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None and gw.control is not None
        await eventually(gw.serial[0].connected.is_set)
        device = first_contact_id_device(gw)
        frame = encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001")
        await fill(gw.journal)
        pty.write(frame)
        [alerted] = await eventually(lambda: list(gw.dispatcher.active.values()))  # type: ignore[union-attr]
        await gw.dispatcher.wait_idle(timeout=10)  # wave 1 texted from memory
        first_wave = list(twilio.messages)
        assert first_wave and all(alerted.alarm_id in m.body for m in first_wave)
        status, answer = await control(gw, "POST", f"/alarms/{alerted.alarm_id}/ack",
                                       json={"by": "wang"})
        assert status == 200, answer
        # Everyone told hears who took it (from memory too).
        await twilio.wait_for_messages(2 * len(first_wave), timeout=10)
        assert {m.to for m in twilio.messages[len(first_wave):]} == {m.to for m in first_wave}
        with pytest.raises(TimeoutError):  # after all that, still no ACK to the receiver
            await pty.read(timeout=0.05)
        await free(gw.journal)
        pty.write(frame)
        assert await pty.read(timeout=5) == ACK
        alarm = await gw.journal.get_alarm(alerted.alarm_id)
        assert alarm.state is AlarmState.ACKNOWLEDGED
        assert alarm.acknowledged_by == "operator:wang"

        async def all_rows_journaled() -> bool:
            rows = await gw.journal.notifications(alerted.alarm_id)  # type: ignore[union-attr]
            return len(rows) == len(twilio.messages) and all(
                r.state is NotificationState.ACCEPTED for r in rows)

        await eventually(all_rows_journaled, timeout=10)
        rows = await gw.journal.notifications(alerted.alarm_id)
        assert sorted(r.sid or "" for r in rows) == sorted(m.sid for m in twilio.messages)
    sent = len(twilio.messages)
    again = Gateway(cfg, secrets_for(twilio))
    async with running(again):
        assert again.dispatcher is not None
        await eventually(lambda: alerted.alarm_id in again.dispatcher.active)  # type: ignore[union-attr]
        await again.dispatcher.wait_idle(timeout=10)
        assert len(twilio.messages) == sent  # nobody texted twice
