"""Twilio requests handed out by priority within the account's limits (gateway/sendgate.py,
issue 13): a storm's first waves before later waves, supervisors and follow-ups; never
more than ``concurrency`` in flight, nor more than ``rate_per_s`` messages started a
second. End to end through the real sender: tests/test_sms.py (a first-wave SMS
overtakes queued "taken by" messages)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.journal import MessageKind, NotificationRecord
from gateway.lifecycle import NotificationState
from gateway.notifier import priority_of
from gateway.sendgate import (
    BACKGROUND,
    FIRST_WAVE,
    FOLLOW_UP,
    LATER_WAVE,
    SUPERVISOR,
    SendGate,
)


async def _hold(gate: SendGate, priority: int, order: list[str], name: str,
                release: asyncio.Event, *, rated: bool = True) -> None:
    async with gate.slot(priority, rated=rated):
        order.append(name)
        await release.wait()


async def test_free_slots_go_to_the_most_urgent_then_the_oldest() -> None:
    gate = SendGate(1)
    order: list[str] = []
    release = asyncio.Event()
    release.set()
    held = asyncio.Event()
    first = asyncio.create_task(_hold(gate, FOLLOW_UP, order, "busy", held))
    await asyncio.sleep(0)
    assert order == ["busy"]
    tasks = [asyncio.create_task(_hold(gate, p, order, name, release))
             for p, name in ((FOLLOW_UP, "taken-1"), (LATER_WAVE, "wave2"),
                             (FIRST_WAVE, "new-1"), (SUPERVISOR, "sup"),
                             (FIRST_WAVE, "new-2"), (BACKGROUND, "reconcile"))]
    await asyncio.sleep(0)
    assert gate.waiting == 6
    held.set()
    await asyncio.gather(first, *tasks)
    assert order == ["busy", "new-1", "new-2", "wave2", "sup", "taken-1", "reconcile"]


async def test_never_more_in_flight_than_the_concurrency() -> None:
    gate = SendGate(3)
    inside = most = 0

    async def request() -> None:
        nonlocal inside, most
        async with gate.slot(FIRST_WAVE):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.001)
            inside -= 1

    await asyncio.gather(*(request() for _ in range(40)))
    assert most == 3 and gate.granted == 40


async def test_the_message_rate_is_never_exceeded() -> None:
    """20 messages at 50/s with one second of burst: the first 50 tokens cover a burst,
    so drain the bucket first; then starts are at least 1/rate apart on average (a lower
    bound: a slow machine only spaces them more)."""
    gate = SendGate(100, rate_per_s=50)
    async with asyncio.timeout(10):
        for _ in range(50):  # the burst
            async with gate.slot(FIRST_WAVE):
                pass
        starts: list[float] = []

        async def request() -> None:
            async with gate.slot(FIRST_WAVE):
                starts.append(time.monotonic())

        began = time.monotonic()
        await asyncio.gather(*(request() for _ in range(20)))
    assert len(starts) == 20
    assert starts[-1] - began >= 19 / 50 * 0.95


async def test_unrated_requests_share_the_concurrency_only() -> None:
    gate = SendGate(4, rate_per_s=1)
    async with gate.slot(FIRST_WAVE):  # the only token
        pass
    async with asyncio.timeout(5):  # status fetches do not wait for tokens
        for _ in range(10):
            async with gate.slot(BACKGROUND, rated=False):
                pass


async def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    gate = SendGate(1)
    held = asyncio.Event()
    order: list[str] = []
    busy = asyncio.create_task(_hold(gate, FIRST_WAVE, order, "busy", held))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(_hold(gate, FIRST_WAVE, order, "gone", held))
    await asyncio.sleep(0)
    waiter.cancel()
    held.set()
    await busy
    with pytest.raises(asyncio.CancelledError):
        await waiter
    async with asyncio.timeout(1), gate.slot(LATER_WAVE):
        order.append("next")
    assert order == ["busy", "next"]


def _rec(kind: MessageKind, wave: int | None, role: str) -> NotificationRecord:
    return NotificationRecord(1, "A", kind, wave, role, "n", "+8613800000000", "b",
                              NotificationState.SENDING, None, 0, None, None, None, 0.0)


def test_priorities_by_message() -> None:
    assert priority_of(_rec(MessageKind.ESCALATION, 1, "family")) == FIRST_WAVE
    assert priority_of(_rec(MessageKind.ESCALATION, 1, "responder")) == FIRST_WAVE
    assert priority_of(_rec(MessageKind.ESCALATION, 2, "responder")) == LATER_WAVE
    assert priority_of(_rec(MessageKind.ESCALATION, 1, "supervisor")) == SUPERVISOR
    assert priority_of(_rec(MessageKind.TAKEN, None, "family")) == FOLLOW_UP
    assert priority_of(_rec(MessageKind.CANCELLED, None, "family")) == FOLLOW_UP
    assert priority_of(_rec(MessageKind.ESCALATION, 1, "family"), background=True) \
        == BACKGROUND
