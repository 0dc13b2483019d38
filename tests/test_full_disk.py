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
from gateway.journal import JournalFull
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import Pty, eventually, gateway_config, running, secrets_for

pytestmark = pytest.mark.integration


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
        device = sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                        key=lambda d: d.device_id)[0]
        # The disk fills up: SQLite answers SQLITE_FULL for anything that needs a new page.
        await gw.journal._run(lambda c: c.execute(
            "PRAGMA max_page_count = " + str(c.execute("PRAGMA page_count").fetchone()[0])))
        frame = encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001")
        # Fill the last free pages (big rows, then small ones) so nothing more fits.
        for size in (3000, 300, 30, 1):
            for i in range(2000):
                try:
                    await gw.journal.record_device_message(
                        source="filler", address="x", raw=b"x" * size, received_at=float(i))
                except JournalFull:
                    break
            for _ in range(2000):
                try:
                    await gw.journal.log_event("filler", "x" * size)
                except JournalFull:
                    break
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
        await gw.journal._run(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
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
