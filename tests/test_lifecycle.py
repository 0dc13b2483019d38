"""The daemon's lifecycle: one stop deadline bounds every phase, the journal's close too."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.daemon import Gateway
from gateway.registry import load_registry
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import SAMPLE, Pty, eventually, gateway_config, secrets_for

pytestmark = pytest.mark.integration


async def test_a_part_that_hangs_on_close_cannot_hold_the_stop_past_its_deadline(
    tmp_path: Path, twilio: TwilioDouble, pty: Pty
) -> None:
    """The alert player hangs while closing (a sound card that never returns): the stop
    gives it what is left of the deadline, logs it, and still closes the journal, whose
    last press is on disk."""
    timeout_s = 2.0
    cfg = gateway_config(tmp_path, twilio, alert={"backend": "none"},
                         gateway={"shutdown_timeout_s": timeout_s},
                         serial=[{"name": "rx", "port": pty.path, "protocol": "surgard"}])
    gw = Gateway(cfg, secrets_for(twilio))
    with capture_logs() as logs:
        task = asyncio.create_task(gw.run())
        await asyncio.wait_for(gw.ready.wait(), 20)
        assert gw.player is not None and gw.journal is not None
        await eventually(gw.serial[0].connected.is_set)
        device = sorted((d for d in load_registry(SAMPLE).devices.values()
                         if d.scheme == "contact_id"), key=lambda d: d.device_id)[0]
        pty.write(encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001"))
        assert await pty.read(1, timeout=5) == ACK
        journal = gw.journal

        async def hang(*_: object) -> None:
            await asyncio.Event().wait()

        gw.player.__aexit__ = hang  # type: ignore[method-assign]
        gw.request_stop()
        # Bounded by the deadline (plus the floor each close is granted), never by the
        # hanging part: the stop would otherwise never return.
        await asyncio.wait_for(task, timeout_s + 5)
    events = [e["event"] for e in logs]
    assert {"part": "alert"} in [{"part": e["part"]} for e in logs
                                 if e["event"] == "gateway.close_timeout"]
    assert events.index("gateway.close_timeout") < events.index("gateway.stopped")
    assert journal._thread is None  # the journal was closed after the hanging part
    assert len(await _open_alarms(cfg.model.gateway.journal_path)) == 1


async def _open_alarms(path: Path) -> list[tuple[str]]:
    import sqlite3

    def read() -> list[tuple[str]]:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT alarm_id FROM alarms").fetchall()

    return await asyncio.to_thread(read)
