"""first_of: the first to finish ends the wait; the others are cancelled and gone."""

from __future__ import annotations

import asyncio

import pytest

from gateway.aio import first_of


class Waiter:
    """An awaitable that records how it ended."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.ended: str | None = None

    async def wait(self) -> None:
        try:
            await self.event.wait()
            self.ended = "done"
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise


async def test_the_first_to_finish_ends_it_and_the_others_are_cancelled_and_gone() -> None:
    a, b, c = Waiter(), Waiter(), Waiter()
    wait = asyncio.ensure_future(first_of(a.wait(), b.wait(), c.wait()))
    await asyncio.sleep(0)
    b.event.set()
    await wait
    assert (a.ended, b.ended, c.ended) == ("cancelled", "done", "cancelled")


async def test_an_error_of_the_first_is_raised() -> None:
    async def broken() -> None:
        raise RuntimeError("injected sleep failed")

    a = Waiter()
    with pytest.raises(RuntimeError, match="injected sleep failed"):
        await first_of(a.wait(), broken())
    assert a.ended == "cancelled"


async def test_cancelled_from_outside_every_one_is_cancelled() -> None:
    a, b = Waiter(), Waiter()
    wait = asyncio.ensure_future(first_of(a.wait(), b.wait()))
    await asyncio.sleep(0)
    wait.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait
    assert (a.ended, b.ended) == ("cancelled", "cancelled")
