"""What changed, for the consoles' event streams, and which consoles are listening.

The journal tells the feed, after each commit, which alarm, notice or duty override
changed (:meth:`gateway.journal.Journal.watch`); the feed numbers those changes and
keeps the latest ones in a ring. A console's event stream sends the numbers and keys;
the console then reads what changed back from the journal, so a slow or sleeping tab
never makes the gateway queue views for it, and nothing it missed is lost:

* a console that reconnects names the last change it saw (``Last-Event-ID``, which
  browsers send by themselves): it gets every change since, from the ring;
* a change older than the ring, or a cursor of an earlier gateway run (another
  ``boot``), gets a ``resync``: the console reloads the whole board from the journal.

Consoles also report whether they can sound the alert (``presence``): a console that
is silent or muted is shown as a warning on every other console.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

#: Changes kept for consoles that reconnect; older cursors get a resync.
RING: Final = 4096
#: A batch with more alarm changes than this is sent as a resync (a storm): one board
#: read instead of one read per alarm.
MAX_BATCH: Final = 200

Sound = Literal["on", "muted", "off"]


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    kind: str  # alarm | notice | duty | consoles
    key: str


@dataclass(slots=True)
class Presence:
    """One console tab's event stream, and what it said about its sound."""

    stream_id: str
    login: str
    display_name: str
    sound: Sound = "off"
    connected: bool = True
    since: float = 0.0


class ConsoleFeed:
    def __init__(self, *, clock: Callable[[], float]) -> None:
        self.boot = secrets.token_hex(4)
        self._clock = clock
        self._seq = 0
        self._ring: deque[Change] = deque(maxlen=RING)
        self._wake = asyncio.Event()
        self._presence: dict[str, Presence] = {}

    # -- changes ----------------------------------------------------------------------

    def changed(self, kind: str, key: str) -> None:
        """A journal watcher: ``kind`` and ``key`` were committed (loop thread)."""
        self._seq += 1
        self._ring.append(Change(self._seq, kind, key))
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    @property
    def cursor(self) -> str:
        """The position of the latest change: a board read now covers everything up to it."""
        return f"{self.boot}-{self._seq}"

    def parse_cursor(self, value: str | None) -> int | None:
        """The sequence number of a cursor of this run; None: unknown, resync."""
        if not value:
            return None
        boot, _, seq = value.strip().rpartition("-")
        if boot != self.boot or not seq.isdigit():
            return None
        n = int(seq)
        return n if n <= self._seq else None

    def since(self, seq: int) -> list[Change] | None:
        """Changes after ``seq``, oldest first; None when some were dropped (resync)."""
        if seq >= self._seq:
            return []
        ring = self._ring
        if not ring or ring[0].seq > seq + 1:
            return None
        start = seq + 1 - ring[0].seq
        return [ring[i] for i in range(start, len(ring))]

    async def wait(self, seq: int, timeout: float) -> None:
        """Return once there is a change after ``seq``, or after ``timeout`` seconds."""
        if self._seq > seq:
            return
        wake = self._wake
        try:
            async with asyncio.timeout(timeout):
                await wake.wait()
        except TimeoutError:
            return

    # -- consoles -----------------------------------------------------------------------

    def join(self, login: str, display_name: str) -> Presence:
        stream_id = secrets.token_hex(6)
        p = Presence(stream_id, login, display_name, since=self._clock())
        self._presence[stream_id] = p
        self.changed("consoles", stream_id)
        return p

    def leave(self, stream_id: str) -> None:
        if self._presence.pop(stream_id, None) is not None:
            self.changed("consoles", stream_id)

    def set_sound(self, stream_id: str, login: str, sound: Sound) -> bool:
        p = self._presence.get(stream_id)
        if p is None or p.login != login:
            return False
        if p.sound != sound:
            p.sound = sound
            self.changed("consoles", stream_id)
        return True

    def consoles(self) -> list[dict[str, object]]:
        return [{"stream_id": p.stream_id, "login": p.login, "name": p.display_name,
                 "sound": p.sound, "since": p.since} for p in self._presence.values()]
