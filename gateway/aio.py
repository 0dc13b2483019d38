"""Small asyncio helpers shared by the long-running tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

__all__ = ["first_of"]


async def first_of(*awaitables: Awaitable[object]) -> None:
    """Wait until the first of ``awaitables`` finishes; cancel the others and wait for
    them to go.

    An error raised by the one that finished first (an injected sleep, a poll) is
    raised here; the others' ends are theirs to keep. Cancelled from outside, every
    one of them is cancelled too.
    """
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if not t.cancelled():
            t.result()
