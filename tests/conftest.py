"""Shared fixtures: a real Mosquitto per test, ptys, the Twilio double.

Helpers that are not fixtures live in ``tests/helpers.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import SAMPLE, Mosquitto, Pty, open_pty
from tests.support.stock_broker import Roles, StockBroker, provision_roles
from tests.support.twilio_api import FakeClock
from tests.support.twilio_faults import FaultyTwilioDouble


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory) -> Roles:
    """The broker's ACL and password file for the sample registry, made once per module
    by the shipped commands (``gateway broker-acl`` / ``broker-users``)."""
    return provision_roles(tmp_path_factory.mktemp("roles"), SAMPLE)


@pytest.fixture
def broker(tmp_path: Path, roles: Roles) -> Iterator[StockBroker]:
    """Mosquitto as on a Debian server: the stock main file, the shipped drop-in, and
    ``roles`` installed where the drop-in names them."""
    broker = StockBroker(tmp_path / "mosquitto")
    roles.install(broker.workdir)
    broker.lay_out()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def clock() -> FakeClock:
    """A wall clock at 2025-03-01 08:00 UTC that moves only when told (the double's)."""
    return FakeClock(datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC))


@pytest.fixture
async def double(clock: FakeClock) -> AsyncIterator[FaultyTwilioDouble]:
    # No automatic progression: tests move statuses with advance() / advance_call().
    async with FaultyTwilioDouble(clock=clock, sent_delay=None, delivered_delay=None) as d:
        yield d


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


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


# Fixtures that start a broker, open ptys or run the Twilio double: a test that uses one
# (directly or through another fixture) is an integration test and must say so.
INTEGRATION_FIXTURES = frozenset({"mosquitto", "broker", "pty", "twilio", "double"})


def unmarked_integration_tests(items: list[pytest.Item]) -> list[str]:
    """Node ids of the items that use an integration fixture without the mark."""
    found = []
    for item in items:
        used = INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if used and item.get_closest_marker("integration") is None:
            found.append(f"{item.nodeid} (uses {', '.join(sorted(used))})")
    return found


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # tryfirst: checked before -m/-k deselect anything, so `-m "not integration"`
    # cannot hide an unmarked test that would start a broker in the unit run.
    unmarked = unmarked_integration_tests(items)
    if unmarked:
        raise pytest.UsageError(
            "tests using the mosquitto, broker, pty, twilio or double fixtures must be marked "
            "@pytest.mark.integration:\n  " + "\n  ".join(unmarked)
        )


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Put logging back as it was after each test.

    A test that runs ``gateway.cli.main`` in-process configures structlog and stdlib
    logging onto the streams of that moment; under ``capsys`` those are pytest's capture
    buffers, closed when the test ends, and every later test's log line would then fail
    with "I/O operation on closed file"."""
    import logging

    import structlog

    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        structlog.configure(**saved)
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
