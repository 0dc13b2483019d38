"""Shared fixtures: a real Mosquitto per test, ptys, the Twilio double.

Helpers that are not fixtures live in ``tests/helpers.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.helpers import Mosquitto, Pty, open_pty
from tests.support.twilio_faults import FaultyTwilioDouble


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def pty() -> Iterator[Pty]:
    p = open_pty()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
async def twilio() -> AsyncIterator[FaultyTwilioDouble]:
    async with FaultyTwilioDouble() as double:
        yield double
