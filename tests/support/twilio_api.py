"""Shared pieces of the Twilio double's own tests (Messages and Calls): a wall clock that
moves only when told and Basic auth headers. The fixtures built on them (``clock``,
``double``, ``http``) are in tests/conftest.py."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

__all__ = ["FakeClock", "basic"]


class FakeClock:
    """Wall clock for the times the double reports that only moves when told."""

    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def moment(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}
