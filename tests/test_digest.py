"""Supervisor digests (issue 13): in a storm a supervisor gets at most N SMS of their own
per interval; the alarms after those come as one digest SMS naming them, sent through
the Twilio double as soon as their budget allows, also after a restart; alarms closed
meanwhile are withdrawn, and a reply to a digest takes the alarm it names."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from devices.events import Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.daemon import Gateway
from gateway.digest import Budgets
from gateway.journal import NotificationRecord
from gateway.lifecycle import AlarmState, NotificationState
from gateway.model import Device, ResponderRole
from gateway.sandbox.twilio_double import TwilioDouble
from gateway.smstext import segments
from gateway.wording import MAX_SEGMENTS, AlarmFacts, Composer
from tests.helpers import Pty, eventually, gateway_config, running, secrets_for

# -- the budget, pure --------------------------------------------------------------------


def test_a_supervisor_gets_n_sms_per_interval_then_waits_for_the_digest() -> None:
    b = Budgets(after=2, interval_s=60)
    assert b.admit("+1", 0) and b.admit("+1", 10)
    assert not b.admit("+1", 20)  # over budget: held
    assert b.waiting == {"+1"}
    assert b.admit("+2", 20)  # every phone has its own budget
    # Once held, the phone waits for its digest even when its window has room again,
    # so that no later alarm overtakes the held ones.
    assert not b.admit("+1", 65)
    assert b.free_at("+1", 20) == 60  # the oldest of its two SMS leaves the window
    assert b.free_at("+1", 61) == 61
    b.waiting.discard("+1")
    b.sent("+1", 61)  # the digest counts against the budget
    assert b.free_at("+1", 62) == 70  # the SMS at 10 and the digest at 61
    b.forget_idle(200)
    assert b.free_at("+1", 200) == 200


def _facts(i: int) -> AlarmFacts:
    return AlarmFacts(f"REF{i:04d}", f"老人{i}", "胜利社区", "幸福路1号", 1_700_000_000.0)


def test_a_digest_names_the_newest_alarms_that_fit_and_counts_them_all() -> None:
    c = Composer()
    two = c.digest([_facts(2), _facts(1)], 120)
    assert "2分钟内另有2起" in two
    assert two.index("REF0002") < two.index("REF0001")  # newest first
    assert "等" not in two
    many = c.digest([_facts(i) for i in range(40, 0, -1)], 120)
    assert "另有40起" in many and "REF0040" in many and "等" in many
    assert "REF0001" not in many
    assert segments(many) <= MAX_SEGMENTS + 1


# -- through the gateway, with a clock the test moves ----------------------------------


class ManualTime:
    """Wall clock and sleep that move only when the test says so."""

    def __init__(self) -> None:
        self.t = time.time()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._n = itertools.count()

    def clock(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.t + seconds, next(self._n), fut))
        await fut

    def advance(self, seconds: float) -> None:
        self.t += seconds
        while self._sleepers and self._sleepers[0][0] <= self.t:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)


DIGEST = {"supervisor_digest_after": 2, "supervisor_digest_s": 60,
          "waves": [{"after_s": 0, "staff": 1, "supervisor": True}]}


def _gateway(tmp_path: Path, pty: Pty, twilio: TwilioDouble, t: ManualTime) -> Gateway:
    cfg = gateway_config(tmp_path, twilio, escalation=DIGEST, serial=[{
        "name": "rx", "port": pty.path, "protocol": "surgard", "reconnect_initial_s": 0.05}])
    return Gateway(cfg, secrets_for(twilio), clock=t.clock, sleep=t.sleep)


def _devices(gw: Gateway) -> list[Device]:
    assert gw.registry is not None
    return sorted((d for d in gw.registry.devices.values() if d.scheme == "contact_id"),
                  key=lambda d: d.device_id)


async def _press(gw: Gateway, pty: Pty, device: Device) -> str:
    """One new alarm, dispatched; its id."""
    assert gw.journal is not None and gw.dispatcher is not None
    before = {a.alarm_id for a in await gw.journal.open_alarms()}
    pty.write(encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001"))
    assert await pty.read() == ACK

    async def new() -> list[str]:
        assert gw.journal is not None
        return [a.alarm_id for a in await gw.journal.open_alarms()
                if a.alarm_id not in before]

    (alarm_id,) = await eventually(new)
    dispatcher = gw.dispatcher
    await eventually(lambda: alarm_id in dispatcher.active)
    await dispatcher.wait_idle(timeout=15)
    return str(alarm_id)


async def _supervisor_rows(gw: Gateway, alarm_id: str) -> list[NotificationRecord]:
    assert gw.journal is not None
    return [n for n in await gw.journal.notifications(alarm_id) if n.role == "supervisor"]


def _supervisor_phones(gw: Gateway) -> set[str]:
    assert gw.registry is not None
    return {r.phone for r in gw.registry.responders.values()
            if r.role is ResponderRole.SUPERVISOR}


@pytest.mark.integration
async def test_over_budget_alarms_reach_each_supervisor_in_one_digest(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    t = ManualTime()
    gw = _gateway(tmp_path, pty, twilio, t)
    async with running(gw):
        assert gw.journal is not None and gw.dispatcher is not None
        await eventually(gw.serial[0].connected.is_set)
        sups = _supervisor_phones(gw)
        assert len(sups) >= 2
        a, b, c, d, e = [await _press(gw, pty, dev) for dev in _devices(gw)[:5]]
        # The first two alarms text every supervisor; the next three are held.
        for alarm_id in (a, b):
            rows = await _supervisor_rows(gw, alarm_id)
            assert {r.phone for r in rows} == sups
            assert all(r.state is NotificationState.ACCEPTED for r in rows)
        for alarm_id in (c, d, e):
            rows = await _supervisor_rows(gw, alarm_id)
            assert {r.phone for r in rows} == sups
            assert all(r.state is NotificationState.HELD for r in rows)
        texted = [m for m in twilio.messages if m.to in sups]
        assert len(texted) == 2 * len(sups)
        # Staff and family of the held alarms were texted at once, as always.
        for alarm_id in (c, d, e):
            assert [n for n in await gw.journal.notifications(alarm_id)
                    if n.role != "supervisor" and n.state is NotificationState.ACCEPTED]
        # C is taken before the digest: its "taken by" goes to whom it texted, not to
        # the supervisors (they never heard of it), and the digest will not name it.
        await gw.dispatcher.acknowledge(c, "operator:wang")
        await eventually(lambda: any(c in m.body and "接单" in m.body
                                     for m in twilio.messages))
        await gw.dispatcher.wait_idle(timeout=15)
        assert not [m for m in twilio.messages if m.to in sups and c in m.body]

        t.advance(60)  # the supervisors' budgets allow one SMS again
        digests = await eventually(lambda: _digests(twilio, sups))
        for m in digests:
            assert "另有2起" in m.body
            assert m.body.index(e) < m.body.index(d)  # newest first
            assert c not in m.body
        rows_e = await eventually(lambda: _settled(gw, e))
        assert {r.state for r in rows_e} == {NotificationState.ACCEPTED}
        assert all("汇总" in r.body for r in rows_e)  # the journal holds what was sent
        assert {r.state for r in await _supervisor_rows(gw, d)} == {NotificationState.DIGESTED}
        assert {r.state for r in await _supervisor_rows(gw, c)} == {NotificationState.WITHDRAWN}
        log = [ev for _, ev, _ in await gw.journal.alarm_log(d)]
        assert log.count("supervisor.digested") == len(sups)

        # A supervisor who read the digest takes D by replying with its reference.
        sup = sorted(sups)[0]
        answer = await gw.dispatcher.on_reply(sup, d, "ack")
        assert "已确认" in answer
        assert (await gw.journal.get_alarm(d)).state is AlarmState.ACKNOWLEDGED
        # No more digests are owed.
        assert not gw.dispatcher._digest.budgets.waiting


def _digests(twilio: TwilioDouble, sups: set[str]) -> list[Any] | None:
    """The digest SMS in the double, once every supervisor has exactly one."""
    found = [m for m in twilio.messages if m.to in sups and "汇总" in m.body]
    return found if sorted(m.to for m in found) == sorted(sups) else None


async def _settled(gw: Gateway, alarm_id: str) -> list[NotificationRecord] | None:
    rows = await _supervisor_rows(gw, alarm_id)
    return rows if all(r.state is NotificationState.ACCEPTED for r in rows) else None


@pytest.mark.integration
async def test_a_digest_owed_when_the_gateway_stopped_is_sent_after_the_restart(
    tmp_path: Path, pty: Pty, twilio: TwilioDouble
) -> None:
    t = ManualTime()
    gw = _gateway(tmp_path, pty, twilio, t)
    async with running(gw):
        await eventually(gw.serial[0].connected.is_set)
        sups = _supervisor_phones(gw)
        ids = [await _press(gw, pty, dev) for dev in _devices(gw)[:3]]
        assert {r.state for r in await _supervisor_rows(gw, ids[2])} == {NotificationState.HELD}
    assert len([m for m in twilio.messages if m.to in sups]) == 2 * len(sups)

    again = _gateway(tmp_path, pty, twilio, t)
    async with running(again):
        assert again.dispatcher is not None
        # The budgets came back from the journal: nothing goes before the interval ends.
        assert again.dispatcher._digest.budgets.waiting == sups
        assert all(again.dispatcher._digest.budgets.free_at(p, t.t) > t.t for p in sups)
        t.advance(60)
        digests = await eventually(lambda: _digests(twilio, sups))
        assert all(ids[2] in m.body and "另有1起" in m.body for m in digests)
        await eventually(lambda: _settled(again, ids[2]))
