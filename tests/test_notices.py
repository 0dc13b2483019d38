"""Operator notices: raised without waiting, then journaled, published and sounded by
their own task; a press is acknowledged right after its own commit (issue 9, fault 7);
a critical notice or an intake crash turns health degraded until acknowledged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.alert import AlertPlayer
from gateway.config import AlertSection
from gateway.daemon import Gateway
from gateway.journal import Journal, JournalError
from gateway.notices import NOTICE_TOPIC, Notice, NoticeBoard
from gateway.registry import load_registry
from gateway.sandbox.twilio_double import TwilioDouble
from tests.helpers import (
    SAMPLE,
    Pty,
    control,
    eventually,
    gateway_config,
    running,
    secrets_for,
)


class Published:
    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, object]]] = []

    async def __call__(self, topic: str, payload: bytes) -> bool:
        self.messages.append((topic, json.loads(payload)))
        return True


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    async with Journal(tmp_path / "journal.sqlite3", synchronous="NORMAL") as j:
        yield j


@pytest.fixture
async def player() -> AsyncIterator[AlertPlayer]:
    async with AlertPlayer(AlertSection(backend="none")) as p:
        yield p


async def _board(board: NoticeBoard) -> asyncio.Task[None]:
    return asyncio.create_task(board.run())


async def test_a_notice_is_journaled_published_and_a_critical_one_sounds_until_acked(
    journal: Journal, player: AlertPlayer
) -> None:
    published = Published()
    board = NoticeBoard(journal=journal, player=player, publish=published, clock=lambda: 5.0)
    task = await _board(board)
    try:
        board.notify("device.low_battery", "D0001", "电量低")
        board.notify("receiver.down", "serial:rx", "接收机断开", severity="critical")
        await board.wait_idle()
        notices = await journal.open_notices()
        assert [(n["kind"], n["severity"]) for n in notices] == [
            ("device.low_battery", "warning"), ("receiver.down", "critical")]
        assert [(t, m["kind"]) for t, m in published.messages] == [
            (NOTICE_TOPIC, "device.low_battery"), (NOTICE_TOPIC, "receiver.down")]
        down = next(n for n in notices if n["kind"] == "receiver.down")
        assert board.critical == {"serial:rx": f"notice-{down['id']}"}
        assert player.active() == (f"notice-{down['id']}",)
        assert await board.acknowledge(int(down["id"]), "operator:li")
        assert board.critical == {}
        assert player.active() == ()
    finally:
        task.cancel()


async def test_a_notice_that_a_condition_is_over_silences_its_critical_one(
    journal: Journal, player: AlertPlayer
) -> None:
    board = NoticeBoard(journal=journal, player=player)
    task = await _board(board)
    try:
        board.notify("receiver.down", "serial:rx", "断开", severity="critical")
        await board.wait_idle()
        assert list(board.critical) == ["serial:rx"]
        board.notify("receiver.up", "serial:rx", "恢复", severity="info")
        await board.wait_idle()
        assert board.critical == {}
        assert player.active() == ()
    finally:
        task.cancel()


class FullJournal:
    """A journal whose disk is full: every write fails."""

    async def record_notice(self, **_: object) -> int:
        raise JournalError("database or disk is full")


async def test_a_notice_the_journal_cannot_take_is_still_published_and_heard(
    player: AlertPlayer,
) -> None:
    published = Published()
    board = NoticeBoard(journal=FullJournal(), player=player,  # type: ignore[arg-type]
                        publish=published)
    task = await _board(board)
    try:
        with capture_logs() as logs:
            board.raise_notice(Notice("device.inactivity", "D0002", "长时间无活动", 1.0,
                                      "critical"))
            await board.wait_idle()
        assert any(e["event"] == "journal.write_failed" for e in logs)
        assert published.messages[0][1]["id"] is None
        assert board.critical == {"D0002": "notice-m1"}
        assert player.active() == ("notice-m1",)
    finally:
        task.cancel()


# -- through the running gateway -------------------------------------------------------


def _receiver(tmp_path: Path, twilio: TwilioDouble, pty: Pty) -> Gateway:
    cfg = gateway_config(tmp_path, twilio, alert={"backend": "none"},
                         serial=[{"name": "rx1", "port": pty.path, "protocol": "surgard"}])
    return Gateway(cfg, secrets_for(twilio))


def _contact_id_device() -> tuple[str, str]:
    registry = load_registry(SAMPLE)
    device = sorted((d for d in registry.devices.values() if d.scheme == "contact_id"),
                    key=lambda d: d.device_id)[0]
    return device.device_id, device.address


@pytest.mark.integration
async def test_the_receiver_gets_its_ack_before_the_notice_that_message_raised_is_handled(
    tmp_path: Path, twilio: TwilioDouble, pty: Pty
) -> None:
    """Fault 7: an inactivity report (Contact ID 641) raises a critical notice that is
    journaled, published and sounded. The ACK must not wait for any of that: here the
    alert player is held shut, and the receiver is acknowledged all the same."""
    gw = _receiver(tmp_path, twilio, pty)
    async with running(gw):
        assert gw.player is not None and gw.notices is not None
        await eventually(gw.serial[0].connected.is_set)
        gate = asyncio.Event()
        started: list[str] = []
        real_start = gw.player.start

        async def held_start(alert_id: str, text: str) -> None:
            started.append(alert_id)
            await gate.wait()  # a renderer that takes its time
            await real_start(alert_id, text)

        gw.player.start = held_start  # type: ignore[method-assign]
        device_id, account = _contact_id_device()
        pty.write(encode_mlr2("01", "1", account, Qualifier.NEW, "641", "01", "001"))
        assert await pty.read(1, timeout=5) == ACK
        # The notice is being handled (its sound is starting), after the ACK went out.
        await eventually(lambda: started)
        assert not gate.is_set()
        gate.set()
        await gw.notices.wait_idle()
        assert device_id in gw.notices.critical
        assert gw.health()["status"] == "degraded"


@pytest.mark.integration
async def test_a_critical_notice_degrades_health_until_an_operator_acknowledges_it(
    tmp_path: Path, twilio: TwilioDouble, pty: Pty
) -> None:
    gw = _receiver(tmp_path, twilio, pty)
    async with running(gw):
        assert gw.control is not None and gw.notices is not None and gw.journal is not None
        await eventually(gw.serial[0].connected.is_set)
        assert gw.health()["status"] == "ok"
        _, account = _contact_id_device()
        pty.write(encode_mlr2("01", "1", account, Qualifier.NEW, "641", "01", "001"))
        assert await pty.read(1, timeout=5) == ACK
        notices = await eventually(gw.journal.open_notices)
        _, health = await control(gw, "GET", "/health")
        assert health["status"] == "degraded"
        assert any("critical notice" in p for p in health["problems"])
        status, _ = await control(gw, "POST", f"/notices/{notices[0]['id']}/ack",
                                  json={"by": "li"})
        assert status == 200
        _, health = await control(gw, "GET", "/health")
        assert health["status"] == "ok"


@pytest.mark.integration
async def test_an_intake_crash_is_heard_journaled_and_does_not_stop_intake(
    tmp_path: Path, twilio: TwilioDouble, pty: Pty
) -> None:
    """A handler bug on one message: the receiver still gets an answer (the raw frame is
    journaled as rejected), the operator hears a critical notice, health is degraded,
    and the next press goes through as usual."""
    gw = _receiver(tmp_path, twilio, pty)
    async with running(gw):
        assert gw.intake is not None and gw.journal is not None and gw.notices is not None
        await eventually(gw.serial[0].connected.is_set)
        real_handle = gw.intake._handle
        calls = {"n": 0}

        async def buggy_once(*args: object, **kwargs: object) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyError("a bug")
            await real_handle(*args, **kwargs)  # type: ignore[arg-type]

        gw.intake._handle = buggy_once  # type: ignore[method-assign]
        _, account = _contact_id_device()
        frame = encode_mlr2("01", "1", account, Qualifier.NEW, "101", "01", "001")
        pty.write(frame)
        assert await pty.read(1, timeout=5) in (ACK, b"\x15")  # answered, never silent
        await gw.notices.wait_idle()
        assert [n["kind"] for n in await gw.journal.open_notices()] == ["intake.crashed"]
        assert gw.health()["status"] == "degraded"
        pty.write(frame)
        assert await pty.read(1, timeout=5) == ACK
        assert len(await eventually(gw.journal.open_alarms)) == 1
