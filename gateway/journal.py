"""The durable alarm journal (SQLite).

Theory of operation
-------------------
The journal is the gateway's memory: an alarm exists once, and only once, its row
is committed here. Devices and the MQTT broker are acknowledged only after that
commit, so a crash at any moment either leaves the alarm in the journal (and the
restarted gateway resumes it) or leaves it unacknowledged at the device (which
sends it again).

* One connection, owned by one dedicated writer thread. SQLite serialises writers
  anyway; one thread avoids lock contention and keeps every statement off the
  event loop.
* Group commit: callers submit small functions; the writer takes everything queued
  (up to ``MAX_BATCH``), runs each in its own SAVEPOINT inside one transaction and
  commits once. A single press costs one fsync; a storm of presses shares them.
  One function failing rolls back only its savepoint.
* WAL with ``synchronous=FULL`` by default: a committed alarm survives power loss
  (when the disk honours flushes). ``NORMAL`` survives process crashes only.
* Every error becomes a :class:`JournalError`; a full disk is :class:`JournalFull`
  so that intake can keep alarming the operator from memory while it refuses to
  acknowledge devices (they will send again once space is freed).
* Reads never share the writer's fate: they go through a second, read-only
  connection in a reader thread. WAL lets it read the last committed state while the
  writer's transaction fails on a full disk, so resumed alarms, ``/health`` and the
  console keep working.

Space discipline (issue 9, fault 4)
-----------------------------------
A checkpoint copies the WAL's committed pages into the database file, so it needs
free space for the pages the database grows by. With SQLite's defaults
(``wal_autocheckpoint`` 1000 pages = 4 MB, no ``journal_size_limit``) a 2 MB tmpfs
filled with a 2 MB WAL after 229 small rows and a 4 KB database file: the checkpoint
failed with SQLITE_FULL, every later write too, and so did a reopen, for ever
(measured on a real 2 MB tmpfs). Three rules keep the journal out of that corner:

* ``wal_autocheckpoint`` = :data:`WAL_AUTOCHECKPOINT_PAGES` (64 pages, 256 KB): the
  committed pages waiting for a checkpoint stay small, so what a checkpoint must add to
  the database file is bounded. ``journal_size_limit`` is the same size: a WAL that one
  large batch grew is cut back to it when it restarts, and steady traffic reuses it.
* A *reserve file* (``<journal>.reserve``, :data:`RESERVE_BYTES`, preallocated with
  ``posix_fallocate`` so the blocks are really taken) lives beside the database. On
  SQLITE_FULL the writer checkpoints with TRUNCATE (enough when someone else's data
  filled the disk: the WAL's own blocks come back); when that checkpoint has no room
  to grow the database into, the writer deletes the reserve, checkpoints, takes the
  reserve back out of what the truncated WAL returned, and retries the batch once. The
  reserve is twice the autocheckpoint size because the commit that crosses the
  threshold can add up to another threshold's worth. Measured on a 2 MB tmpfs: without
  a reserve the checkpoint failed for ever; with it the TRUNCATE checkpoint completed
  and returned the WAL (264-520 KB) plus the reserve. The reserve serves checkpoints
  only, never presses: when it was spent on presses the volume ended with 266 KB of
  committed WAL that no checkpoint could fold in, even after a prune. Missing (the
  volume has less than its size free), the state is ``low_space`` and it is recreated
  as soon as there is room. A journal that fills its volume with its *own* rows stays
  ``full`` until space is freed on the volume (rows deleted inside SQLite do not give
  the file system its blocks back, and the WAL needs blocks): retention must keep the
  journal well below its volume. On copy-on-write file systems (btrfs, ZFS)
  ``fallocate`` reserves nothing durable: keep the journal on ext4/xfs/tmpfs.
* A journal closed while its volume is full must reopen: recreating the ``-shm`` on a
  full tmpfs fails (SQLITE_IOERR_SHMSIZE, measured), so :meth:`Journal.close` lets the
  read-only reader close last, which leaves the (empty) ``-wal`` and the ``-shm`` in
  place; if they are gone anyway, opening lends itself the reserve.
* After a burst (the writer idle for ``idle_checkpoint_s``) the writer checkpoints
  with TRUNCATE by itself, so an idle journal's WAL is empty and a graceful stop (which
  checkpoints too) leaves nothing to replay.

Self-recovery: a failed batch does not stop the writer. Its state
(:attr:`Journal.state`, :attr:`Journal.healthy`) turns ``full`` or ``failing``; while
unhealthy the writer probes every ``probe_interval_s`` (checkpoint, then a one-row
write), and the first write that commits makes it ``ok`` again, with no restart.
A journal reopened on a full volume comes back the same way once space returns.

Alarm ids (from the first alert to the journal): an alarm alerted from memory while
the journal was down keeps its id. :meth:`Journal.record_press` takes that id
(``alarm_id=``) and creates the alarm under it; acknowledgements made meanwhile
(:meth:`Journal.defer_transition`) and SMS sent from memory
(:meth:`Journal.defer_notifications`) are written in the same commit, so a restart
neither texts the same people again nor sees a second alarm.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import structlog

from devices.events import Drill
from gateway.lifecycle import (
    NOTIFICATION_TRANSITIONS,
    UNTOLD_NOTIFICATION_STATES,
    AlarmState,
    IllegalTransition,
    NotificationState,
    check_notification_transition,
    check_transition,
    notification_may,
)
from gateway.redact import mask_phone

log = structlog.get_logger(__name__)
T = TypeVar("T")

MAX_BATCH = 512
SCHEMA_VERSION = 1
#: See "Space discipline" above: small enough that a checkpoint always fits in the
#: reserve, large enough that single presses share one checkpoint per ~64 commits
#: rather than paying one each. Measured (20,000 presses in bursts of 500, then 2,000
#: single ones, synchronous=FULL, on a loaded 2-vCPU VM): 3,200-3,700 presses/s and
#: single-press p50 3.4-4.0 ms, against 3,350-5,950/s and 3.4-3.9 ms with SQLite's
#: 1000-page default: within this machine's noise; a storm pays at most one more
#: database fsync per batch.
WAL_AUTOCHECKPOINT_PAGES = 64
#: Twice the autocheckpoint size at 4 KB pages (the threshold plus the commit crossing it).
RESERVE_BYTES = 512 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alarms(
    alarm_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    elder_id TEXT NOT NULL,
    code TEXT NOT NULL,
    state TEXT NOT NULL,
    source TEXT NOT NULL,
    received_at REAL NOT NULL,
    last_press_at REAL NOT NULL,
    presses INTEGER NOT NULL DEFAULT 1,
    acknowledged_by TEXT,
    acknowledged_at REAL,
    resolved_at REAL,
    note TEXT,
    raw BLOB,
    drill INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS alarms_device ON alarms(device_id, last_press_at);
CREATE INDEX IF NOT EXISTS alarms_open ON alarms(state) WHERE state != 'resolved';
CREATE TABLE IF NOT EXISTS alarm_log(
    id INTEGER PRIMARY KEY,
    alarm_id TEXT NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS alarm_log_alarm ON alarm_log(alarm_id, id);
CREATE TABLE IF NOT EXISTS device_messages(
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    source TEXT NOT NULL,
    address TEXT NOT NULL,
    device_id TEXT,
    kind TEXT,
    code TEXT,
    alarm_id TEXT,
    error TEXT,
    raw BLOB
);
CREATE TABLE IF NOT EXISTS notices(
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    severity TEXT NOT NULL,
    text TEXT NOT NULL,
    acknowledged_at REAL,
    acknowledged_by TEXT
);
CREATE INDEX IF NOT EXISTS device_messages_time ON device_messages(received_at);
CREATE TABLE IF NOT EXISTS duty_overrides(
    responder_id TEXT PRIMARY KEY,
    on_duty INTEGER NOT NULL,
    roster_on_duty INTEGER NOT NULL,  -- what the roster said when the override was made
    at REAL NOT NULL,
    by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS device_state(
    device_id TEXT PRIMARY KEY,
    last_seen REAL NOT NULL,
    last_kind TEXT NOT NULL,
    battery_pct REAL,
    voltage_mv INTEGER,
    link_quality INTEGER,
    online INTEGER
);
"""


class JournalError(Exception):
    """The journal could not record something. The alarm is NOT durable.

    ``code`` is SQLite's extended result code when SQLite raised the error."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code

    @property
    def storage(self) -> bool:
        """True when the storage failed (full, I/O, locked...), not the request."""
        return isinstance(self, JournalFull) or (
            self.code is not None and self.code & 0xFF in _STORAGE_CODES)


class JournalFull(JournalError):
    """The disk (or the database's size limit) is full."""


_STORAGE_CODES = frozenset({
    sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB,
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_PROTOCOL,
    sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_PERM,
})


class JournalState(StrEnum):
    """What the journal's last write said (``/health`` reads it)."""

    OK = "ok"
    LOW_SPACE = "low_space"  # writes commit, but the reserve could not be recreated
    FULL = "full"  # the last write failed for lack of space
    FAILING = "failing"  # the last write failed for another storage reason


class UnknownAlarm(JournalError):
    def __init__(self, alarm_id: str) -> None:
        super().__init__(f"no alarm {alarm_id!r} in the journal")
        self.alarm_id = alarm_id


class MessageKind(StrEnum):
    """What a notification is for. Only escalation messages have a wave number."""

    ESCALATION = "escalation"  # a wave of the alarm (``wave`` 1, 2, ...)
    TAKEN = "taken"  # "taken by ...", to those told, after an acknowledgement
    CANCELLED = "cancelled"  # "cancelled", to those told, after the device cancelled
    FALLBACK = "fallback"  # a resend through the GSM modem of an undelivered message


@dataclass(frozen=True, slots=True)
class AlarmRecord:
    alarm_id: str
    device_id: str
    elder_id: str
    code: str
    state: AlarmState
    source: str
    received_at: float
    last_press_at: float
    presses: int
    acknowledged_by: str | None
    acknowledged_at: float | None
    resolved_at: float | None
    note: str | None
    drill: bool = False  # a drill (``drills`` table): kept out of the daily figures


@dataclass(frozen=True, slots=True)
class PressOutcome:
    alarm_id: str
    new: bool  # False: joined an open alarm of the same device within the window
    presses: int
    state: AlarmState
    received_at: float
    adopted: bool = False  # journaled under the alarm_id it was alerted with from memory


@dataclass(frozen=True, slots=True)
class NotificationPlan:
    role: str  # family | responder | supervisor | facility
    name: str
    phone: str
    body: str


@dataclass(frozen=True, slots=True)
class NotificationRecord:
    id: int  # < 0: planned in memory only (the journal could not record it)
    alarm_id: str
    kind: MessageKind
    wave: int | None  # escalation messages only
    role: str
    name: str
    phone: str
    body: str
    state: NotificationState
    sid: str | None
    attempts: int
    error_code: int | None
    error: str | None
    latency_ms: float | None
    created_at: float


class CallState(StrEnum):
    """Where one call of an alarm stands (the ``calls`` table)."""

    PLANNED = "planned"  # in a call tree, not its turn yet
    PLACING = "placing"  # journaled, the request is leaving (a restart looks it up)
    PLACED = "placed"  # Twilio took it (queued / initiated / ringing)
    ANSWERED = "answered"  # a person (or a machine) picked up
    ACCEPTED = "accepted"  # pressed 1: takes the alarm
    DECLINED = "declined"  # pressed 2: cannot go
    UNANSWERED = "unanswered"  # answered, no digit (or hung up)
    MACHINE = "machine"  # an answering machine took it
    BUSY = "busy"
    NO_ANSWER = "no-answer"
    FAILED = "failed"
    RANG = "rang"  # Twilio could not place it: the GSM modem rang the number, no speech
    SKIPPED = "skipped"  # a tree whose alarm was taken (or timed out) before this turn

    @property
    def final(self) -> bool:
        return self not in (CallState.PLANNED, CallState.PLACING, CallState.PLACED,
                            CallState.ANSWERED)


@dataclass(frozen=True, slots=True)
class CallPlan:
    role: str
    name: str
    phone: str
    text: str  # what is said (the announcement)


@dataclass(frozen=True, slots=True)
class CallRecord:
    id: int
    alarm_id: str
    wave: int
    role: str
    name: str
    phone: str
    tree: bool
    position: int
    state: CallState
    sid: str | None
    status: str | None
    answered_by: str | None
    digits: str | None
    attempts: int
    error: str | None
    created_at: float


_CALL_COLS = ("id, alarm_id, wave, role, name, phone, tree, position, state, sid, status,"
              " answered_by, digits, attempts, error, created_at")


def _call(row: Sequence[Any]) -> CallRecord:
    return CallRecord(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), row[7],
                      CallState(row[8]), row[9], row[10], row[11], row[12], row[13], row[14],
                      row[15])


@dataclass(frozen=True, slots=True)
class DeviceStateRecord:
    device_id: str
    last_seen: float
    last_kind: str
    battery_pct: float | None
    voltage_mv: int | None
    link_quality: int | None
    online: bool | None


@dataclass(frozen=True, slots=True)
class DutyOverride:
    """An on-duty flag set over the roster's (by an operator or the responder's phone)."""

    responder_id: str
    on_duty: bool
    roster_on_duty: bool  # the roster's flag when it was set: a roster that changed wins
    at: float
    by: str


_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U


def new_alarm_id() -> str:
    """Short, unambiguous, random alarm reference, e.g. ``A7K3-9QXM``; quoted in SMS.

    Never all digits: a reply parser must not confuse a reference with a phone number
    or a time, so it only accepts references with at least one letter."""
    while True:
        chars = "".join(secrets.choice(_ALPHABET) for _ in range(8))
        if not chars.isdigit():
            return f"{chars[:4]}-{chars[4:]}"


_ALARM_COLS = (
    "alarm_id, device_id, elder_id, code, state, source, received_at, last_press_at, presses,"
    " acknowledged_by, acknowledged_at, resolved_at, note, drill"
)
_NOTICE_COLS = "id, at, kind, subject, severity, text, acknowledged_at, acknowledged_by"
_NOTICE_KEYS = tuple(c.strip() for c in _NOTICE_COLS.split(","))
_NOTE_COLS = (
    "id, alarm_id, kind, wave, role, name, phone, body, state, sid, attempts, error_code,"
    " error, latency_ms, created_at"
)


def _alarm(row: Sequence[Any]) -> AlarmRecord:
    return AlarmRecord(
        row[0], row[1], row[2], row[3], AlarmState(row[4]), row[5], row[6], row[7], row[8],
        row[9], row[10], row[11], row[12], bool(row[13]),
    )


def _notification(row: Sequence[Any]) -> NotificationRecord:
    return NotificationRecord(
        row[0], row[1], MessageKind(row[2]), row[3], row[4], row[5], row[6], row[7],
        NotificationState(row[8]), row[9], row[10], row[11], row[12], row[13], row[14],
    )


_Job = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
_Outcome = tuple[Any, BaseException | None]  # (value, error) of one job
_STOP = object()


@dataclass(frozen=True, slots=True)
class _Deferred:
    """A transition of an alarm known only in memory, applied when it is journaled."""

    wanted: AlarmState
    by: str | None
    note: str | None
    at: float


def _note_key(rec: NotificationRecord) -> tuple[str, int | None, str]:
    return (rec.kind, rec.wave, rec.phone)


#: An alarm, its notifications, its calls and its log (``at, event, data``).
AlarmDetail = tuple[AlarmRecord, list[NotificationRecord], list[CallRecord],
                    list[tuple[float, str, dict[str, Any]]]]


def _alarm_detail(conn: sqlite3.Connection, alarm_id: str) -> AlarmDetail | None:
    row = conn.execute(f"SELECT {_ALARM_COLS} FROM alarms WHERE alarm_id = ?",
                       (alarm_id,)).fetchone()
    if row is None:
        return None
    notes = conn.execute(f"SELECT {_NOTE_COLS} FROM notifications WHERE alarm_id = ?"
                         " ORDER BY id", (alarm_id,)).fetchall()
    calls = conn.execute(f"SELECT {_CALL_COLS} FROM calls WHERE alarm_id = ?"
                         " ORDER BY wave, position, id", (alarm_id,)).fetchall()
    logged = conn.execute("SELECT at, event, data FROM alarm_log WHERE alarm_id = ?"
                          " ORDER BY id", (alarm_id,)).fetchall()
    return (_alarm(row), [_notification(n) for n in notes], [_call(c) for c in calls],
            [(at, ev, json.loads(data) if data else {}) for at, ev, data in logged])


class Journal:
    """Async facade over a single-writer, group-committing SQLite journal.

    ``reserve_bytes`` (0: none) is the space kept aside so that a checkpoint can always
    run; ``idle_checkpoint_s`` is how long the writer waits after a burst before it
    truncates the WAL; ``probe_interval_s`` how often an unhealthy journal tries again
    by itself."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        clock: Callable[[], float] = time.time,
        reserve_bytes: int = RESERVE_BYTES,
        idle_checkpoint_s: float = 0.2,
        probe_interval_s: float = 1.0,
    ) -> None:
        self.path = path
        self.reserve_path = path.with_name(path.name + ".reserve")
        self._synchronous = synchronous
        self._clock = clock
        self._reserve_bytes = reserve_bytes
        self._idle_s = idle_checkpoint_s
        self._probe_s = probe_interval_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._reads: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[None] | None = None
        self.commits = 0  # number of transactions committed (group commits)
        self.jobs = 0
        self.checkpoints = 0  # TRUNCATE checkpoints that emptied the WAL
        self.reserve_lent = 0  # checkpoints that needed the reserve's room
        # Loop-thread view of the writer's health (set with each batch's outcomes).
        self._state = JournalState.OK
        self._state_error: JournalError | None = None
        self._healthy = asyncio.Event()
        self._healthy.set()
        # Writer-thread-only state.
        self._w_state = JournalState.OK
        self._dirty = False  # commits since the WAL was last truncated
        # Alarms alerted from memory: what happened to them before their press lands.
        self._deferred: dict[str, list[_Deferred]] = {}
        self._held: dict[str, dict[tuple[str, int | None, str], NotificationRecord]] = {}
        self._watchers: list[Callable[[str, str], None]] = []

    # -- health ----------------------------------------------------------------------

    @property
    def state(self) -> JournalState:
        """The outcome of the last write (or probe): ok, low_space, full or failing."""
        return self._state

    @property
    def healthy(self) -> bool:
        """True while writes commit (``ok`` or ``low_space``)."""
        return self._state in (JournalState.OK, JournalState.LOW_SPACE)

    @property
    def last_error(self) -> JournalError | None:
        """The storage error that made the journal unhealthy (None when healthy)."""
        return self._state_error

    async def wait_healthy(self) -> None:
        """Return once writes commit again (at once when they do)."""
        await self._healthy.wait()

    def _set_state(self, state: JournalState, error: JournalError | None) -> None:
        # Runs in the loop thread, before the batch's futures are settled: a caller
        # woken by a failed write already sees the journal unhealthy.
        previous, self._state = self._state, state
        self._state_error = error if state in (JournalState.FULL, JournalState.FAILING) \
            else None
        if self.healthy:
            self._healthy.set()
        else:
            self._healthy.clear()
        if state is previous:
            return
        if not self.healthy:
            log.critical("journal.unhealthy", state=state.value, error=str(error),
                         path=str(self.path))
        elif previous in (JournalState.FULL, JournalState.FAILING):
            log.warning("journal.recovered", state=state.value, previous=previous.value)
        if state is JournalState.LOW_SPACE:
            log.warning("journal.low_space", reserve=str(self.reserve_path),
                        reserve_bytes=self._reserve_bytes,
                        action="writing without the checkpoint reserve; free space")

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Journal:
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create {self.path.parent}: {exc}") from exc
        self._thread = threading.Thread(target=self._writer, name="journal-writer", daemon=True)
        self._thread.start()
        try:
            await self._ready
        except BaseException:
            thread, self._thread = self._thread, None
            await asyncio.to_thread(thread.join)
            raise
        # The reader opens once the writer has created the schema.
        self._ready = self._loop.create_future()
        self._reader = threading.Thread(target=self._read_loop, name="journal-reader",
                                        daemon=True)
        self._reader.start()
        try:
            await self._ready
        except BaseException:
            self._reader = None
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        # The writer goes first (its last act is a TRUNCATE checkpoint), the read-only
        # reader last: a read-only connection closing last leaves the (empty) -wal and
        # the -shm in place, so a restart on a volume that is full by then needs no new
        # space to open and read (measured: recreating the -shm on a full tmpfs fails
        # with SQLITE_IOERR_SHMSIZE; with the files kept, reads work and writes say
        # SQLITE_FULL until space returns).
        if self._thread is not None:
            self._queue.put(_STOP)
            thread, self._thread = self._thread, None
            await asyncio.to_thread(thread.join)
        if self._reader is not None:
            self._reads.put(_STOP)
            reader, self._reader = self._reader, None
            await asyncio.to_thread(reader.join)

    def _open(self) -> sqlite3.Connection:
        # Created 0600 here, not by sqlite3 (0644 less the umask: every local user could
        # read the elders' addresses and phones). SQLite gives its -wal and -shm the
        # main file's mode, so they follow. An existing file keeps the mode it has.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            page = int(conn.execute("PRAGMA page_size").fetchone()[0])
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={WAL_AUTOCHECKPOINT_PAGES * page}")
            try:
                self._prepare(conn)
            except sqlite3.Error as exc:
                # A restart on a full volume: make room as a failed batch would, once.
                if not isinstance(_map_error(exc, "schema"), JournalFull):
                    raise
                self._make_room(conn, use_reserve=True)
                self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.executescript(_SCHEMA)
        if "drill" not in {r[1] for r in conn.execute("PRAGMA table_info(alarms)")}:
            # Journals from before drills: a constant default, so no table rewrite.
            conn.execute("ALTER TABLE alarms ADD COLUMN drill INTEGER NOT NULL DEFAULT 0")
        _prepare_notifications(conn)
        conn.executescript(_CLOSURE_SCHEMA)
        conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )

    def _writer(self) -> None:
        loop, ready = self._loop, self._ready
        if loop is None or ready is None:
            raise JournalError("writer started outside __aenter__")
        try:
            conn = self._open()
        except (sqlite3.Error, OSError) as exc:
            err = _map_error(exc, f"cannot open journal {self.path}")
            # No room for the -shm/-wal files on a full volume (SQLITE_IOERR_SHMSIZE):
            # that is what the reserve is for.
            if not (isinstance(err, JournalFull) and self._release_reserve()):
                loop.call_soon_threadsafe(_settle, ready, None, err)
                return
            try:
                conn = self._open()
            except (sqlite3.Error, OSError) as exc2:
                err = _map_error(exc2, f"cannot open journal {self.path}")
                loop.call_soon_threadsafe(_settle, ready, None, err)
                return
        # Learn the truth before the first press: a journal reopened on a full volume
        # starts unhealthy (and probing), not green.
        self._ensure_reserve()
        self._probe(conn, loop)
        loop.call_soon_threadsafe(_settle, ready, None, None)
        stopping = False
        try:
            while not stopping:
                try:
                    first = self._queue.get(timeout=self._wait_s())
                except queue.Empty:
                    try:
                        self._idle(conn, loop)
                    except Exception as exc:  # noqa: BLE001 - reported as the state
                        self._post_state(loop, JournalState.FAILING,
                                         JournalError(f"journal writer: {exc!r}"))
                    continue
                if first is _STOP:
                    break
                batch: list[_Job] = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    batch.append(item)
                try:
                    self._run_batch(conn, batch, loop)
                except Exception as exc:  # noqa: BLE001 - delivered to every caller
                    # A bug here must not leave callers waiting for ever, nor stop the
                    # writer: this batch fails loudly, the next one is tried.
                    err = JournalError(f"journal writer: {exc!r}")
                    self._w_state = JournalState.FAILING
                    failed: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = [
                        (f, None, err) for _, f in batch]
                    loop.call_soon_threadsafe(self._finish, failed, JournalState.FAILING, err)
        finally:
            # A graceful stop folds the WAL into the database (making room if it must),
            # so a restart on a nearly full volume has nothing to replay.
            if not self._checkpoint(conn):
                self._make_room(conn, use_reserve=True)
            conn.close()

    def _wait_s(self) -> float | None:
        if self._w_state in (JournalState.FULL, JournalState.FAILING):
            return self._probe_s
        if self._dirty:
            return self._idle_s
        if self._w_state is JournalState.LOW_SPACE:
            return self._probe_s
        return None

    def _idle(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        """The queue stayed empty: truncate the WAL, probe, or recreate the reserve."""
        if self._w_state in (JournalState.FULL, JournalState.FAILING):
            self._probe(conn, loop)
            return
        if self._dirty:
            # Failing for space is no emergency here (the data is committed): the next
            # write that hits SQLITE_FULL makes room.
            self._checkpoint(conn)
        if self._w_state is JournalState.LOW_SPACE and self._ensure_reserve():
            self._post_state(loop, JournalState.OK, None)

    def _probe(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        """Is the journal writable? Its state says: a TRUNCATE checkpoint must complete
        (the WAL's committed pages fit into the database) and a one-row write commit."""
        error: BaseException | None
        if not self._make_room(conn, use_reserve=True):
            error = JournalFull(f"cannot checkpoint {self.path}: no room for the WAL's pages",
                                code=sqlite3.SQLITE_FULL)
        else:
            results, _ = self._attempt(conn, [(_probe_write(self._clock()), None)])
            error = results[0][1]
        if isinstance(error, JournalError):
            self._post_state(loop, JournalState.FULL if isinstance(error, JournalFull)
                             else JournalState.FAILING, error)
        elif error is None:
            self._dirty = True
            self._ensure_reserve()
            self._post_state(loop, self._space_state(), None)

    def _post_state(self, loop: asyncio.AbstractEventLoop, state: JournalState,
                    error: JournalError | None) -> None:
        self._w_state = state
        loop.call_soon_threadsafe(self._set_state, state, error)

    def _space_state(self) -> JournalState:
        if self._reserve_bytes and not self.reserve_path.exists():
            return JournalState.LOW_SPACE
        return JournalState.OK

    # -- space -----------------------------------------------------------------------

    def _checkpoint(self, conn: sqlite3.Connection) -> bool:
        """Fold the WAL into the database and truncate it; True when it completed."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error:
            return False  # no space to grow the database into: the caller makes room
        if busy:
            return False  # a reader held an old snapshot past busy_timeout: next idle
        self._dirty = False
        self.checkpoints += 1
        return True

    def _make_room(self, conn: sqlite3.Connection, *, use_reserve: bool) -> bool:
        """After SQLITE_FULL: truncate the WAL. When the checkpoint has no room to grow
        the database into and ``use_reserve``, lend it the reserve, then take the
        reserve back out of what the truncated WAL gave back: the reserve serves
        checkpoints only, so that the next one can run too (measured: a reserve spent on
        presses left 266 KB of WAL that could never be checkpointed, and prune could not
        run either). True when the WAL is empty now, so that a retry may fit."""
        if self._checkpoint(conn):
            return True
        if not use_reserve or not self._release_reserve():
            return False
        self.reserve_lent += 1
        done = self._checkpoint(conn)
        self._ensure_reserve()
        return done

    def _release_reserve(self) -> bool:
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        except OSError:
            return False  # not ours to delete (permissions): nothing freed
        return True

    def _ensure_reserve(self) -> bool:
        """Recreate the reserve when the volume has room for it; True if it exists."""
        if not self._reserve_bytes or self.reserve_path.exists():
            return True
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return False
        if st.f_bavail * st.f_frsize < self._reserve_bytes:
            return False
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return False
        try:
            try:
                os.posix_fallocate(fd, 0, self._reserve_bytes)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                self.reserve_path.unlink()
            return False
        return True

    # -- batches -----------------------------------------------------------------------

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[_Job], loop: asyncio.AbstractEventLoop
    ) -> None:
        # Outcomes wait for the commit: nobody hears "journaled" before it is durable.
        results, committed = self._attempt(conn, batch)
        # SQLITE_FULL: make room (truncate the WAL, lending it the reserve if it must)
        # and retry what failed once, so that our own WAL never costs an alarm.
        if any(isinstance(e, JournalFull) for _, e in results) and \
                self._make_room(conn, use_reserve=True):
            retry = [i for i, (_, e) in enumerate(results) if isinstance(e, JournalFull)]
            again, ok = self._attempt(conn, [batch[i] for i in retry])
            committed = committed or ok
            for i, outcome in zip(retry, again, strict=True):
                results[i] = outcome
        failed = next((e for _, e in results if isinstance(e, JournalError) and e.storage),
                      None)
        state: JournalState | None = None
        if isinstance(failed, JournalError):
            state = JournalState.FULL if isinstance(failed, JournalFull) \
                else JournalState.FAILING
        elif committed:
            self._dirty = True
            if self._w_state is not JournalState.OK:
                self._ensure_reserve()
            state = self._space_state()
        if state is not None:
            self._w_state = state
        outcomes = [(fut, value, error) for (_, fut), (value, error)
                    in zip(batch, results, strict=True)]
        # One wake-up of the loop for the whole batch, not one per job.
        loop.call_soon_threadsafe(self._finish, outcomes, state, failed)

    def _finish(self, outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]],
                state: JournalState | None, failed: JournalError | None) -> None:
        if state is not None:
            self._set_state(state, failed)
        _settle_all(outcomes)

    def _attempt(self, conn: sqlite3.Connection,
                 batch: Sequence[tuple[Callable[[sqlite3.Connection], Any], object]],
                 ) -> tuple[list[_Outcome], bool]:
        """Run ``batch`` in one transaction; each job's (value, error), and whether it
        committed a change (an empty commit succeeds on a full disk too, so it says
        nothing about health). Nothing here touches the loop: the caller settles."""
        results: list[_Outcome] = [(None, None)] * len(batch)
        done: list[int] = []  # jobs whose savepoint was released, waiting for COMMIT

        def begin() -> JournalError | None:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                return _map_error(exc, "cannot begin transaction")
            return None

        if (err := begin()) is not None:
            return [(None, err)] * len(batch), False
        changes = conn.total_changes
        for i, (fn, _) in enumerate(batch):
            try:
                conn.execute("SAVEPOINT job")
                value = fn(conn)
                conn.execute("RELEASE job")
                results[i] = (value, None)
                done.append(i)
                continue
            except Exception as exc:  # noqa: BLE001 - delivered to the caller
                failure: Exception = (_map_error(exc, "write") if isinstance(exc, sqlite3.Error)
                                      else exc)
            results[i] = (None, failure)
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                continue
            # SQLite rolled the whole transaction back (e.g. SQLITE_FULL): the jobs
            # before this one are lost as well and must not report success.
            kind = JournalFull if isinstance(failure, JournalFull) else JournalError
            lost = kind(f"rolled back with a failing neighbour: {failure}",
                        code=getattr(failure, "code", None))
            for k in done:
                results[k] = (None, lost)
            done = []
            if (berr := begin()) is not None:
                for k in range(i + 1, len(batch)):
                    results[k] = (None, berr)
                return results, False
            changes = conn.total_changes
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            err = _map_error(exc, "commit failed")
            for k in done:
                results[k] = (None, err)
            return results, False
        self.commits += 1
        self.jobs += len(batch)
        return results, conn.total_changes > changes

    async def _run(self, fn: Callable[[sqlite3.Connection], T],
                   touch: tuple[str, str] | Callable[[T], _Touched] | None = None,
                   ) -> T:
        """Run ``fn`` in the writer thread inside a (group-committed) transaction;
        once committed, tell the watchers what changed: ``touch`` is the (kind, key), or
        a function of ``fn``'s result that gives it (None: nothing changed)."""
        if self._thread is None or self._loop is None:
            raise JournalError("journal is not open")
        fut: asyncio.Future[T] = self._loop.create_future()
        if touch is not None:
            # On the future, not after the await: told even if the caller was cancelled
            # while the commit was on its way.
            fut.add_done_callback(lambda f: self._committed(f, touch))
        self._queue.put((fn, fut))
        return await fut

    def _committed(self, fut: asyncio.Future[T],
                   touch: tuple[str, str] | Callable[[T], _Touched]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        changed = touch if isinstance(touch, tuple) else touch(fut.result())
        if isinstance(changed, tuple):
            self._changed(*changed)
        elif changed is not None:  # several
            for kind, key in changed:
                self._changed(kind, key)

    # -- watchers -------------------------------------------------------------------------

    def watch(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(kind, key)`` in the loop thread after each commit that changed
        an alarm (``"alarm"``, its id: its row, log, SMS or calls), a notice (``"notice"``,
        its id) or a duty override (``"duty"``, the responder id). For live views (the
        operator console): what changed is then read back from the journal, so a watcher
        that falls behind loses nothing. A callback must not block or raise."""
        self._watchers.append(callback)

    def _changed(self, kind: str, key: str) -> None:
        for callback in self._watchers:
            try:
                callback(kind, key)
            except Exception:  # a broken view must not fail the write that succeeded
                log.exception("journal.watcher_failed", kind=kind)

    # -- the reader --------------------------------------------------------------------

    def _read_loop(self) -> None:
        loop, ready = self._loop, self._ready
        if loop is None or ready is None:
            raise JournalError("reader started outside __aenter__")
        try:
            # Read-only (mode=ro): a bug here can never take the writer's lock, and this
            # connection never checkpoints or deletes the WAL when it closes (see close).
            conn = sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=ro",
                                   uri=True, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            # One read maps the -shm: from then on the writer knows it is not the last
            # connection, and does not delete the -wal and -shm when it closes.
            conn.execute("SELECT COUNT(*) FROM meta").fetchone()
        except sqlite3.Error as exc:
            loop.call_soon_threadsafe(_settle, ready, None,
                                      _map_error(exc, f"cannot open reader {self.path}"))
            return
        loop.call_soon_threadsafe(_settle, ready, None, None)
        stopping = False
        try:
            while not stopping:
                first = self._reads.get()
                if first is _STOP:
                    break
                batch: list[_Job] = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._reads.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    batch.append(item)
                outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
                for fn, fut in batch:
                    try:
                        outcomes.append((fut, fn(conn), None))
                    except Exception as exc:  # noqa: BLE001 - delivered to the caller
                        outcomes.append((fut, None, _map_error(exc, "read")
                                         if isinstance(exc, sqlite3.Error) else exc))
                loop.call_soon_threadsafe(_settle_all, outcomes)
        finally:
            conn.close()

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the read-only connection: the last committed state, even while
        the writer's transactions fail."""
        if self._reader is None or self._loop is None:
            raise JournalError("journal is not open")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._reads.put((fn, fut))
        return await fut

    # -- writes ----------------------------------------------------------------------

    async def record_press(
        self,
        *,
        device_id: str,
        elder_id: str,
        code: str,
        source: str,
        address: str,
        raw: bytes,
        received_at: float,
        dedupe_window_s: float,
        kind: str = "emergency",
        alarm_id: str | None = None,
        alerted_at: float | None = None,
        drill: Drill | None = None,
    ) -> PressOutcome:
        """Journal an emergency press: a new alarm, or joined to the device's open one.

        ``alarm_id``: the id an alarm was already alerted (and texted) under from memory
        while the journal could not commit. The press is journaled under that id: joined
        to it if it is already here and open, else a new alarm with that id (never joined
        to another alarm, so every reference someone was texted exists), with
        ``alerted_at`` as its received time and, in the same commit, the transitions
        and SMS held for it (:meth:`defer_transition`, :meth:`defer_notifications`).

        ``drill``: the press is a drill. It joins only the alarm of the same drill id
        (a redelivery), never a real alarm, and a real press never joins a drill's."""
        held_transitions = tuple(self._deferred.get(alarm_id, ())) if alarm_id else ()
        held_notes = tuple(self._held.get(alarm_id, {}).values()) if alarm_id else ()

        def op(conn: sqlite3.Connection) -> PressOutcome:
            row = None
            if alarm_id is not None:
                row = conn.execute(
                    "SELECT alarm_id, presses, state, received_at FROM alarms"
                    " WHERE alarm_id = ? AND state != 'resolved'", (alarm_id,)).fetchone()
            if row is None and alarm_id is None and drill is not None:
                row = conn.execute(
                    "SELECT a.alarm_id, a.presses, a.state, a.received_at FROM drills d"
                    " JOIN alarms a ON a.alarm_id = d.alarm_id WHERE d.drill_id = ?",
                    (drill.drill_id,)).fetchone()
            elif row is None and alarm_id is None:
                row = conn.execute(
                    "SELECT alarm_id, presses, state, received_at FROM alarms"
                    " WHERE device_id = ? AND state != 'resolved' AND last_press_at >= ?"
                    " AND drill = 0 ORDER BY last_press_at DESC LIMIT 1",
                    (device_id, received_at - dedupe_window_s),
                ).fetchone()
            if row is not None:
                joined, presses, state, first_at = row
                conn.execute(
                    "UPDATE alarms SET presses = presses + 1, last_press_at = MAX(last_press_at, ?)"
                    " WHERE alarm_id = ?",
                    (received_at, joined),
                )
                _log(conn, joined, received_at, "press.joined", {"source": source})
                state = AlarmState(state)
                if joined == alarm_id:  # anything still held for it lands now
                    state = _land_held(conn, joined, state, held_transitions, held_notes,
                                       received_at)
                outcome = PressOutcome(joined, False, presses + 1, state, first_at,
                                       adopted=joined == alarm_id)
            else:
                new_id = alarm_id or new_alarm_id()
                first = alerted_at if alarm_id is not None and alerted_at is not None \
                    else received_at
                conn.execute(
                    f"INSERT INTO alarms({_ALARM_COLS}, raw) VALUES"
                    " (?, ?, ?, ?, ?, ?, ?, ?, 1, NULL, NULL, NULL, NULL, ?, ?)",
                    (new_id, device_id, elder_id, code, AlarmState.JOURNALED, source,
                     first, received_at, int(drill is not None), raw),
                )
                data: dict[str, Any] = {"source": source}
                if drill is not None:
                    conn.execute(
                        "INSERT INTO drills(drill_id, alarm_id, device_id, by, notify, at)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (drill.drill_id, new_id, device_id, drill.by,
                         json.dumps(list(drill.notify)), received_at))
                    data["drill"] = drill.drill_id
                if alarm_id is not None:
                    data["alerted_from_memory_at"] = first
                _log(conn, new_id, received_at, "alarm.journaled", data)
                state = _land_held(conn, new_id, AlarmState.JOURNALED, held_transitions,
                                   held_notes, received_at)
                outcome = PressOutcome(new_id, True, 1, state, first,
                                       adopted=alarm_id is not None)
            _insert_message(conn, received_at, source, address, device_id, kind, code,
                            outcome.alarm_id, None, raw)
            _touch_device(conn, device_id, received_at, kind, None, None, None, None)
            return outcome

        outcome = await self._run(op, lambda o: ("alarm", o.alarm_id))
        if alarm_id is not None and outcome.adopted:
            await self._settle_held(alarm_id, held_transitions, held_notes)
        return outcome

    async def _settle_held(self, alarm_id: str, applied: Sequence[_Deferred],
                           written: Sequence[NotificationRecord]) -> None:
        """After the adopting commit: forget what it wrote; write what was held for
        ``alarm_id`` while that commit was in flight (the alarm exists now)."""
        late = [d for d in self._deferred.pop(alarm_id, []) if d not in applied]
        notes = self._held.pop(alarm_id, {})
        late_notes = [r for r in notes.values() if r not in written]
        try:
            for d in late:
                with contextlib.suppress(IllegalTransition):
                    await self.transition(alarm_id, d.wanted, by=d.by, note=d.note, at=d.at)
            if late_notes:
                await self.adopt_notifications(alarm_id, late_notes)
        except JournalError as exc:
            # The press is committed; only this late record is lost. Say so loudly.
            log.critical("journal.write_failed", what="deferred alarm record",
                         alarm_id=alarm_id, error=str(exc))

    async def record_device_message(
        self,
        *,
        source: str,
        address: str,
        raw: bytes,
        received_at: float,
        device_id: str | None = None,
        kind: str | None = None,
        code: str | None = None,
        error: str | None = None,
        battery_pct: float | None = None,
        voltage_mv: int | None = None,
        link_quality: int | None = None,
        online: bool | None = None,
        alarm_id: str | None = None,
    ) -> None:
        """Journal any device message that is not a new press (tests, batteries, junk)."""

        def op(conn: sqlite3.Connection) -> None:
            _insert_message(conn, received_at, source, address, device_id, kind, code,
                            alarm_id, error, raw)
            if device_id is not None and kind is not None and error is None:
                _touch_device(conn, device_id, received_at, kind, battery_pct, voltage_mv,
                              link_quality, online)

        await self._run(op)

    async def log_event(self, alarm_id: str, event: str, data: dict[str, Any] | None = None,
                        at: float | None = None) -> None:
        when = self._clock() if at is None else at
        await self._run(lambda conn: _log(conn, alarm_id, when, event, data),
                        ("alarm", alarm_id))

    async def transition(
        self,
        alarm_id: str,
        wanted: AlarmState,
        *,
        by: str | None = None,
        note: str | None = None,
        at: float | None = None,
    ) -> AlarmState:
        """Move an alarm to ``wanted``; returns the previous state.

        Raises :class:`UnknownAlarm` or :class:`gateway.lifecycle.IllegalTransition`.
        For an alarm alerted from memory and not journaled yet, see
        :meth:`defer_transition`.
        """
        when = self._clock() if at is None else at

        def op(conn: sqlite3.Connection) -> AlarmState:
            row = conn.execute("SELECT state FROM alarms WHERE alarm_id = ?",
                               (alarm_id,)).fetchone()
            if row is None:
                raise UnknownAlarm(alarm_id)
            current = AlarmState(row[0])
            if current == wanted:
                return current
            _transition(conn, alarm_id, current, wanted, by, note, when)
            return current

        return await self._run(op, ("alarm", alarm_id))

    # -- alarms alerted from memory ------------------------------------------------------

    def defer_transition(
        self,
        alarm_id: str,
        wanted: AlarmState,
        *,
        by: str | None = None,
        note: str | None = None,
        at: float | None = None,
    ) -> AlarmState:
        """:meth:`transition` for an alarm alerted from memory whose press is not
        journaled yet (e.g. acknowledged while the disk was full).

        Checked against the lifecycle from the state it will have, held in memory, and
        written (with ``by`` and ``at``, the time it happened) in the commit that
        journals the press under ``alarm_id`` (:meth:`record_press` ``alarm_id=``).
        Returns the previous state; raises :class:`gateway.lifecycle.IllegalTransition`.
        Never touches the disk, so it cannot fail for lack of space."""
        current = self.deferred_state(alarm_id)
        if current == wanted:
            return current
        check_transition(alarm_id, current, wanted)
        when = self._clock() if at is None else at
        self._deferred.setdefault(alarm_id, []).append(_Deferred(wanted, by, note, when))
        return current

    def deferred_state(self, alarm_id: str) -> AlarmState:
        """The state an alarm alerted from memory will have once journaled."""
        state = AlarmState.JOURNALED
        for d in self._deferred.get(alarm_id, ()):
            state = d.wanted
        return state

    def defer_notifications(self, alarm_id: str,
                            records: Iterable[NotificationRecord]) -> None:
        """Hold SMS sent from memory for an alarm not journaled yet; the latest record
        per (kind, wave, phone) wins. Written with the alarm when its press lands, so
        that a restart reconciles them (``sending``) or knows them (``accepted``, with
        their sid) instead of texting the same people again. Never touches the disk."""
        held = self._held.setdefault(alarm_id, {})
        for rec in records:
            held[_note_key(rec)] = rec

    async def adopt_notifications(self, alarm_id: str,
                                  records: Iterable[NotificationRecord],
                                  ) -> list[NotificationRecord]:
        """Journal SMS sent from memory (records with ids < 0) for ``alarm_id`` now.

        One row per (kind, wave, phone): a row already there moves forward only (the
        notification table decides), a missing one is inserted with the record's state,
        sid and attempts. Returns the alarm's notification rows, with their journal ids,
        so that later updates can name them. Use it for an alarm that is journaled
        already; before that, :meth:`defer_notifications`."""
        records = list(records)
        now = self._clock()

        def op(conn: sqlite3.Connection) -> list[NotificationRecord]:
            for rec in records:
                _adopt_notification(conn, alarm_id, rec, now)
            rows = conn.execute(
                f"SELECT {_NOTE_COLS} FROM notifications WHERE alarm_id = ? ORDER BY id",
                (alarm_id,)).fetchall()
            return [_notification(r) for r in rows]

        return await self._run(op, ("alarm", alarm_id))

    async def plan_notifications(
        self,
        alarm_id: str,
        wave: int | None,
        plans: Iterable[NotificationPlan],
        state: NotificationState = NotificationState.SENDING,
        *,
        kind: MessageKind = MessageKind.ESCALATION,
        held: Iterable[NotificationPlan] = (),
    ) -> list[NotificationRecord]:
        """Record who must be told; returns every row of this (alarm, kind, wave).

        Idempotent per (alarm, kind, wave, phone). ``wave`` is the escalation wave and
        must be None for the other kinds. Rows start as ``sending`` because the requests
        leave right after this commit: after a crash, a ``sending`` row is reconciled
        with Twilio before resending. ``held``: supervisor messages of the same wave
        that wait for a digest (:mod:`gateway.digest`), recorded ``held``.
        """
        if (kind is MessageKind.ESCALATION) != (wave is not None):
            raise ValueError(f"{kind} messages {'need' if wave is None else 'have no'} wave")
        rows_in = [(p, state) for p in plans] + [(p, NotificationState.HELD) for p in held]
        now = self._clock()

        def op(conn: sqlite3.Connection) -> list[NotificationRecord]:
            conn.executemany(
                "INSERT OR IGNORE INTO notifications(alarm_id, kind, wave, role, name, phone,"
                " body, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(alarm_id, kind, wave, p.role, p.name, p.phone, p.body, st, now, now)
                 for p, st in rows_in],
            )
            rows = conn.execute(
                f"SELECT {_NOTE_COLS} FROM notifications WHERE alarm_id = ? AND kind = ?"
                " AND wave IS ? ORDER BY id",
                (alarm_id, kind, wave),
            ).fetchall()
            return [_notification(r) for r in rows]

        return await self._run(op, ("alarm", alarm_id))

    async def update_notification(
        self,
        notification_id: int,
        state: NotificationState,
        *,
        sid: str | None = None,
        attempts: int | None = None,
        error_code: int | None = None,
        error: str | None = None,
        latency_ms: float | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        """Update one notification; ``event`` also goes to its alarm's log, same commit.

        Raises :class:`gateway.lifecycle.IllegalNotificationTransition` (nothing is
        written) when the table does not allow the move, e.g. ``acknowledged`` ->
        ``accepted`` when a reply overtook the answer to the send."""
        now = self._clock()

        def op(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT alarm_id, state FROM notifications WHERE id = ?",
                               (notification_id,)).fetchone()
            if row is None:
                raise JournalError(f"no notification {notification_id}")
            check_notification_transition(notification_id, NotificationState(row[1]), state)
            conn.execute(
                "UPDATE notifications SET state = ?, sid = COALESCE(?, sid),"
                " attempts = COALESCE(?, attempts), error_code = ?, error = ?,"
                " latency_ms = COALESCE(?, latency_ms), updated_at = ? WHERE id = ?",
                (state, sid, attempts, error_code, error, latency_ms, now, notification_id),
            )
            if event is not None:
                _log(conn, row[0], now, event[0], event[1])
            return str(row[0])

        await self._run(op, lambda changed: ("alarm", changed))

    async def record_notice(self, *, at: float, kind: str, subject: str, severity: str,
                            text: str) -> int:
        """Journal an operator notice (device offline, receiver down...); returns its id."""

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO notices(at, kind, subject, severity, text) VALUES (?, ?, ?, ?, ?)",
                (at, kind, subject, severity, text))
            return int(cur.lastrowid or 0)

        return await self._run(op, lambda notice_id: ("notice", str(notice_id)))

    async def ack_notice(self, notice_id: int, by: str) -> bool:
        now = self._clock()

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE notices SET acknowledged_at = ?, acknowledged_by = ?"
                " WHERE id = ? AND acknowledged_at IS NULL", (now, by, notice_id))
            return cur.rowcount > 0

        return await self._run(op, lambda done: ("notice", str(notice_id)) if done else None)

    async def set_delivery_status(
        self, sid: str, status: str, error_code: int | None
    ) -> tuple[NotificationRecord, bool] | None:
        """A carrier status for message ``sid`` (StatusCallback or polling).

        Returns the row and whether it changed, or None for a sid we never sent. A
        status moves a message only forwards along the notification table (a late
        'sent' after 'delivered', or a repeated report, changes nothing)."""
        wanted = _CARRIER_STATUS.get(status)
        now = self._clock()

        def op(conn: sqlite3.Connection) -> tuple[NotificationRecord, bool] | None:
            row = conn.execute(f"SELECT {_NOTE_COLS} FROM notifications WHERE sid = ?",
                               (sid,)).fetchone()
            if row is None:
                return None
            rec = _notification(row)
            if wanted is None or wanted is rec.state or not notification_may(rec.state, wanted):
                return rec, False
            conn.execute(
                "UPDATE notifications SET state = ?, error_code = ?, updated_at = ?"
                " WHERE id = ?", (wanted, error_code, now, rec.id))
            _log(conn, rec.alarm_id, now, "sms.status",
                 {"notification_id": rec.id, "status": status, "error_code": error_code})
            row = conn.execute(f"SELECT {_NOTE_COLS} FROM notifications WHERE id = ?",
                               (rec.id,)).fetchone()
            return _notification(row), True

        return await self._run(
            op, lambda found: ("alarm", found[0].alarm_id) if found and found[1] else None)

    async def prune(self, before: float, batch: int = 5000) -> int:
        """Delete device messages older than ``before`` that belong to no open alarm.

        Alarms, their logs and notifications are kept (they are the record of what was
        done); routine traffic (check-ins, batteries) is what grows without bound. Works in
        batches so that one prune never holds the writer for long."""

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM device_messages WHERE id IN (SELECT id FROM device_messages"
                " WHERE received_at < ? AND (alarm_id IS NULL OR alarm_id IN"
                " (SELECT alarm_id FROM alarms WHERE state = 'resolved')) LIMIT ?)",
                (before, batch))
            return cur.rowcount

        total = 0
        while (deleted := await self._run(op)) > 0:
            total += deleted
        return total

    async def mark_recipient_acknowledged(self, alarm_id: str, phone: str) -> None:
        """The recipient who took the alarm: their notifications show 'acknowledged'."""
        now = self._clock()
        await self._run(lambda conn: conn.execute(
            f"UPDATE notifications SET state = ?, updated_at = ?"
            f" WHERE alarm_id = ? AND phone = ? AND state IN ({_ACKNOWLEDGEABLE})",
            (NotificationState.ACKNOWLEDGED, now, alarm_id, phone)), ("alarm", alarm_id))

    # -- reads -----------------------------------------------------------------------

    async def latest_open_alarm_for_phone(self, phone: str) -> AlarmRecord | None:
        """The newest open alarm whose SMS went to ``phone`` (for replies without a ref)."""

        def op(conn: sqlite3.Connection) -> AlarmRecord | None:
            row = conn.execute(
                f"SELECT {', '.join('a.' + c.strip() for c in _ALARM_COLS.split(','))}"
                " FROM alarms a JOIN notifications n ON n.alarm_id = a.alarm_id"
                " WHERE n.phone = ? AND a.state != 'resolved'"
                " AND n.state NOT IN ('held', 'withdrawn')"
                " ORDER BY a.received_at DESC LIMIT 1", (phone,)).fetchone()
            return None if row is None else _alarm(row)

        return await self._read(op)

    async def held_notifications(self) -> list[NotificationRecord]:
        """Supervisor messages held for a digest (gateway/digest.py), oldest first."""

        def op(conn: sqlite3.Connection) -> list[NotificationRecord]:
            rows = conn.execute(
                f"SELECT {_NOTE_COLS} FROM notifications WHERE state = ? ORDER BY id",
                (NotificationState.HELD,)).fetchall()
            return [_notification(r) for r in rows]

        return await self._read(op)

    async def supervisor_sends_since(self, since: float) -> list[tuple[str, float]]:
        """(phone, created_at) of the supervisor SMS of their own planned since ``since``
        (not held, named by a digest or withdrawn), oldest first: a restart's digest
        windows."""
        untold = ", ".join(f"'{s}'" for s in UNTOLD_NOTIFICATION_STATES)

        def op(conn: sqlite3.Connection) -> list[tuple[str, float]]:
            return [(str(p), float(t)) for p, t in conn.execute(
                "SELECT phone, created_at FROM notifications WHERE role = 'supervisor'"
                f" AND created_at >= ? AND state NOT IN ({untold}) ORDER BY created_at",
                (since,))]

        return await self._read(op)

    async def carry_digest(self, carrier: int, body: str, named: Sequence[int],
                           withdrawn: Sequence[int]) -> NotificationRecord:
        """One supervisor's digest, in one commit: the held row ``carrier`` becomes the
        digest SMS itself (``body``, ``sending``: the request leaves after this commit,
        and a restart reconciles it like any other), the held rows ``named`` are
        ``digested``, and ``withdrawn`` (their alarm closed meanwhile) never go. Each
        alarm's log says which digest told its supervisor. Returns the carrier's row."""
        now = self._clock()
        held = NotificationState.HELD

        def op(conn: sqlite3.Connection) -> tuple[NotificationRecord, list[str]]:
            row = conn.execute(f"SELECT {_NOTE_COLS} FROM notifications WHERE id = ?",
                               (carrier,)).fetchone()
            if row is None:
                raise JournalError(f"no notification {carrier}")
            rec = _notification(row)
            check_notification_transition(carrier, rec.state, NotificationState.SENDING)
            conn.execute("UPDATE notifications SET state = ?, body = ?, updated_at = ?"
                         " WHERE id = ?", (NotificationState.SENDING, body, now, carrier))
            touched = {rec.alarm_id}
            for ids, state in ((named, NotificationState.DIGESTED),
                               (withdrawn, NotificationState.WITHDRAWN)):
                for nid in ids:
                    found = conn.execute(
                        "UPDATE notifications SET state = ?, updated_at = ?"
                        " WHERE id = ? AND state = ? RETURNING alarm_id",
                        (state, now, nid, held)).fetchone()
                    if found is None:
                        continue  # acknowledged by its supervisor meanwhile
                    touched.add(str(found[0]))
                    if state is NotificationState.DIGESTED:
                        _log(conn, str(found[0]), now, "supervisor.digested",
                             {"to": rec.name, "digest": carrier, "carrier": rec.alarm_id})
            _log(conn, rec.alarm_id, now, "supervisor.digest",
                 {"to": rec.name, "digest": carrier, "alarms": len(named) + 1})
            return replace(rec, state=NotificationState.SENDING, body=body), sorted(touched)

        carried, _ = await self._run(op, lambda r: [("alarm", a) for a in r[1]])
        return carried

    async def withdraw_held(self, ids: Sequence[int]) -> None:
        """Held rows whose alarms closed before their digest: they never go."""
        now = self._clock()

        def op(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            touched = set()
            for nid in ids:
                found = conn.execute(
                    "UPDATE notifications SET state = ?, updated_at = ?"
                    " WHERE id = ? AND state = ? RETURNING alarm_id",
                    (NotificationState.WITHDRAWN, now, nid, NotificationState.HELD)).fetchone()
                if found is not None:
                    touched.add(("alarm", str(found[0])))
            return sorted(touched)

        await self._run(op, lambda touched: touched)

    async def unfinished_deliveries(self, older_than: float) -> list[NotificationRecord]:
        """Accepted/sent messages without a final carrier status (for status polling)."""

        def op(conn: sqlite3.Connection) -> list[NotificationRecord]:
            rows = conn.execute(
                f"SELECT {_NOTE_COLS} FROM notifications WHERE state IN"
                f" ('{NotificationState.ACCEPTED}', '{NotificationState.SENT}')"
                " AND sid IS NOT NULL AND sid NOT LIKE 'gsm:%' AND updated_at < ?"
                " ORDER BY id LIMIT 500", (older_than,)).fetchall()
            return [_notification(r) for r in rows]

        return await self._read(op)

    async def open_notices(self) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT id, at, kind, subject, severity, text FROM notices"
                " WHERE acknowledged_at IS NULL ORDER BY id").fetchall()
            keys = ("id", "at", "kind", "subject", "severity", "text")
            return [dict(zip(keys, r, strict=True)) for r in rows]

        return await self._read(op)

    async def notice(self, notice_id: int) -> dict[str, Any] | None:
        """One notice, acknowledged or not (the console's live view of it)."""
        def op(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(f"SELECT {_NOTICE_COLS} FROM notices WHERE id = ?",
                               (notice_id,)).fetchone()
            return None if row is None else dict(zip(_NOTICE_KEYS, row, strict=True))

        return await self._read(op)

    async def notices_between(self, start: float, end: float,
                              limit: int = 500) -> list[dict[str, Any]]:
        """Notices raised in [start, end), newest first (the console's history)."""
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                f"SELECT {_NOTICE_COLS} FROM notices WHERE at >= ? AND at < ?"
                " ORDER BY id DESC LIMIT ?", (start, end, limit)).fetchall()
            return [dict(zip(_NOTICE_KEYS, r, strict=True)) for r in rows]

        return await self._read(op)

    async def alarm_detail(self, alarm_id: str) -> AlarmDetail:
        """An alarm with its SMS, calls and log, read in one go (one snapshot).

        Raises :class:`UnknownAlarm`."""
        (detail,) = await self.alarm_details([alarm_id])
        if detail is None:
            raise UnknownAlarm(alarm_id)
        return detail

    async def alarm_details(self, alarm_ids: Sequence[str]) -> list[AlarmDetail | None]:
        """:meth:`alarm_detail` of each of ``alarm_ids`` in one read (one snapshot; the
        console's board); None for an id the journal does not have."""
        def op(conn: sqlite3.Connection) -> list[AlarmDetail | None]:
            return [_alarm_detail(conn, alarm_id) for alarm_id in alarm_ids]

        return await self._read(op)

    async def find_alarms(self, *, elder_ids: Sequence[str] | None = None,
                          device_id: str | None = None, start: float | None = None,
                          end: float | None = None, limit: int = 500) -> list[AlarmRecord]:
        """Alarms by elder(s), device and press time in [start, end), newest first."""
        where: list[str] = []
        args: list[Any] = []
        if elder_ids is not None:
            if not elder_ids:
                return []
            where.append(f"elder_id IN ({', '.join('?' * len(elder_ids))})")
            args.extend(elder_ids)
        if device_id is not None:
            where.append("device_id = ?")
            args.append(device_id)
        if start is not None:
            where.append("received_at >= ?")
            args.append(start)
        if end is not None:
            where.append("received_at < ?")
            args.append(end)
        sql = (f"SELECT {_ALARM_COLS} FROM alarms"
               + (f" WHERE {' AND '.join(where)}" if where else "")
               + " ORDER BY received_at DESC LIMIT ?")
        args.append(limit)

        def op(conn: sqlite3.Connection) -> list[AlarmRecord]:
            return [_alarm(r) for r in conn.execute(sql, args).fetchall()]

        return await self._read(op)

    async def get_alarm(self, alarm_id: str) -> AlarmRecord:
        def op(conn: sqlite3.Connection) -> AlarmRecord:
            row = conn.execute(f"SELECT {_ALARM_COLS} FROM alarms WHERE alarm_id = ?",
                               (alarm_id,)).fetchone()
            if row is None:
                raise UnknownAlarm(alarm_id)
            return _alarm(row)

        return await self._read(op)

    async def drill_of(self, alarm_id: str) -> Drill | None:
        """The drill an alarm is, or None for a real alarm."""

        def op(conn: sqlite3.Connection) -> Drill | None:
            row = conn.execute("SELECT drill_id, device_id, by, notify FROM drills"
                               " WHERE alarm_id = ?", (alarm_id,)).fetchone()
            return None if row is None else Drill(row[0], row[1], row[2],
                                                  tuple(json.loads(row[3])))

        return await self._read(op)

    async def alarm_for_drill(self, drill_id: str) -> AlarmRecord | None:
        """The alarm journaled for a drill id (what ``gateway simulate`` reads back)."""

        def op(conn: sqlite3.Connection) -> AlarmRecord | None:
            cols = ", ".join("a." + c.strip() for c in _ALARM_COLS.split(","))
            row = conn.execute(f"SELECT {cols} FROM drills d JOIN alarms a"
                               " ON a.alarm_id = d.alarm_id WHERE d.drill_id = ?",
                               (drill_id,)).fetchone()
            return None if row is None else _alarm(row)

        return await self._read(op)

    async def open_alarms(self) -> list[AlarmRecord]:
        def op(conn: sqlite3.Connection) -> list[AlarmRecord]:
            rows = conn.execute(
                f"SELECT {_ALARM_COLS} FROM alarms WHERE state != 'resolved'"
                " ORDER BY received_at"
            ).fetchall()
            return [_alarm(r) for r in rows]

        return await self._read(op)

    async def open_alarm_for_device(self, device_id: str) -> AlarmRecord | None:
        def op(conn: sqlite3.Connection) -> AlarmRecord | None:
            row = conn.execute(
                f"SELECT {_ALARM_COLS} FROM alarms WHERE device_id = ? AND state != 'resolved'"
                " AND drill = 0 ORDER BY last_press_at DESC LIMIT 1",
                (device_id,),
            ).fetchone()
            return None if row is None else _alarm(row)

        return await self._read(op)

    async def recent_alarms(self, limit: int = 50) -> list[AlarmRecord]:
        def op(conn: sqlite3.Connection) -> list[AlarmRecord]:
            rows = conn.execute(
                f"SELECT {_ALARM_COLS} FROM alarms ORDER BY received_at DESC LIMIT ?", (limit,)
            ).fetchall()
            return [_alarm(r) for r in rows]

        return await self._read(op)

    async def notifications(self, alarm_id: str) -> list[NotificationRecord]:
        def op(conn: sqlite3.Connection) -> list[NotificationRecord]:
            rows = conn.execute(
                f"SELECT {_NOTE_COLS} FROM notifications WHERE alarm_id = ? ORDER BY id",
                (alarm_id,),
            ).fetchall()
            return [_notification(r) for r in rows]

        return await self._read(op)

    # -- calls ------------------------------------------------------------------------

    async def plan_calls(self, alarm_id: str, wave: int, plans: Sequence[CallPlan], *,
                         tree: bool) -> list[CallRecord]:
        """Record the calls of one wave (idempotent per alarm, wave and phone); returns
        every call of that wave. Single calls start ``placing`` (their requests leave
        right after this commit); a tree's start ``planned`` and go ``placing`` in turn."""
        now = self._clock()
        state = CallState.PLANNED if tree else CallState.PLACING

        def op(conn: sqlite3.Connection) -> list[CallRecord]:
            conn.executemany(
                "INSERT OR IGNORE INTO calls(alarm_id, wave, role, name, phone, tree,"
                " position, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(alarm_id, wave, p.role, p.name, p.phone, int(tree), i, state, now, now)
                 for i, p in enumerate(plans)])
            rows = conn.execute(f"SELECT {_CALL_COLS} FROM calls WHERE alarm_id = ? AND"
                                " wave = ? ORDER BY position, id", (alarm_id, wave)).fetchall()
            return [_call(r) for r in rows]

        return await self._run(op, ("alarm", alarm_id))

    async def update_call(self, call_id: int, state: CallState, *, sid: str | None = None,
                          status: str | None = None, answered_by: str | None = None,
                          digits: str | None = None, attempts: int | None = None,
                          error: str | None = None, latency_ms: float | None = None,
                          event: tuple[str, dict[str, Any]] | None = None) -> CallRecord:
        """Move a call on. A final state is never left (a late progress event after the
        digit, or events out of order, change nothing but ``status``). Returns the row."""
        now = self._clock()

        def op(conn: sqlite3.Connection) -> CallRecord:
            row = conn.execute(f"SELECT {_CALL_COLS} FROM calls WHERE id = ?",
                               (call_id,)).fetchone()
            if row is None:
                raise JournalError(f"no call {call_id}")
            current = _call(row)
            wanted = current.state if current.state.final and state is not current.state \
                else state
            conn.execute(
                "UPDATE calls SET state = ?, sid = COALESCE(?, sid), status = COALESCE(?, status),"
                " answered_by = COALESCE(?, answered_by), digits = COALESCE(?, digits),"
                " attempts = COALESCE(?, attempts), error = COALESCE(?, error),"
                " latency_ms = COALESCE(?, latency_ms), updated_at = ? WHERE id = ?",
                (wanted, sid, status, answered_by, digits, attempts, error, latency_ms, now,
                 call_id))
            if event is not None:
                _log(conn, current.alarm_id, now, event[0], event[1])
            return _call(conn.execute(f"SELECT {_CALL_COLS} FROM calls WHERE id = ?",
                                      (call_id,)).fetchone())

        return await self._run(op, lambda record: ("alarm", record.alarm_id))

    async def call_by_sid(self, sid: str) -> CallRecord | None:
        def op(conn: sqlite3.Connection) -> CallRecord | None:
            row = conn.execute(f"SELECT {_CALL_COLS} FROM calls WHERE sid = ?",
                               (sid,)).fetchone()
            return None if row is None else _call(row)

        return await self._read(op)

    async def calls(self, alarm_id: str) -> list[CallRecord]:
        def op(conn: sqlite3.Connection) -> list[CallRecord]:
            rows = conn.execute(f"SELECT {_CALL_COLS} FROM calls WHERE alarm_id = ?"
                                " ORDER BY wave, position, id", (alarm_id,)).fetchall()
            return [_call(r) for r in rows]

        return await self._read(op)

    async def alarm_log(self, alarm_id: str) -> list[tuple[float, str, dict[str, Any]]]:
        def op(conn: sqlite3.Connection) -> list[tuple[float, str, dict[str, Any]]]:
            rows = conn.execute(
                "SELECT at, event, data FROM alarm_log WHERE alarm_id = ? ORDER BY id",
                (alarm_id,),
            ).fetchall()
            return [(at, ev, json.loads(data) if data else {}) for at, ev, data in rows]

        return await self._read(op)

    async def set_duty_override(self, responder_id: str, on_duty: bool, *,
                                roster_on_duty: bool, by: str) -> None:
        """Record a responder's on-duty flag over the roster's; one equal to the roster's
        is no override and removes any."""
        at = self._clock()

        def op(conn: sqlite3.Connection) -> None:
            if on_duty == roster_on_duty:
                conn.execute("DELETE FROM duty_overrides WHERE responder_id = ?",
                             (responder_id,))
                return
            conn.execute(
                "INSERT OR REPLACE INTO duty_overrides(responder_id, on_duty, roster_on_duty,"
                " at, by) VALUES (?, ?, ?, ?, ?)",
                (responder_id, int(on_duty), int(roster_on_duty), at, by))

        await self._run(op, ("duty", responder_id))

    async def drop_duty_override(self, responder_id: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM duty_overrides WHERE responder_id = ?", (responder_id,))

        await self._run(op, ("duty", responder_id))

    async def duty_overrides(self) -> list[DutyOverride]:
        def op(conn: sqlite3.Connection) -> list[DutyOverride]:
            rows = conn.execute(
                "SELECT responder_id, on_duty, roster_on_duty, at, by FROM duty_overrides"
                " ORDER BY responder_id"
            ).fetchall()
            return [DutyOverride(r[0], bool(r[1]), bool(r[2]), r[3], r[4]) for r in rows]

        return await self._read(op)

    async def device_states(self) -> list[DeviceStateRecord]:
        def op(conn: sqlite3.Connection) -> list[DeviceStateRecord]:
            rows = conn.execute(
                "SELECT device_id, last_seen, last_kind, battery_pct, voltage_mv, link_quality,"
                " online FROM device_state ORDER BY device_id"
            ).fetchall()
            return [
                DeviceStateRecord(r[0], r[1], r[2], r[3], r[4], r[5],
                                  None if r[6] is None else bool(r[6]))
                for r in rows
            ]

        return await self._read(op)

    async def count(self, table: str) -> int:
        if table not in {"alarms", "notifications", "device_messages", "alarm_log"}:
            raise ValueError(f"unknown table {table!r}")
        return await self._read(
            lambda conn: int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        )

    # -- closure, reports and retention (issue 10) -----------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the read-only connection (the daily report's queries): the last
        committed state, off the writer, so a long read never holds up a press."""
        return await self._read(fn)

    async def acknowledged_alarms(self) -> list[tuple[AlarmRecord, KeepOpen | None]]:
        """Alarms acknowledged and not resolved yet (also those cancelled after their
        acknowledgement), oldest acknowledgement first, each with its "keep open" flag
        (None: nobody asked to keep it open)."""

        def op(conn: sqlite3.Connection) -> list[tuple[AlarmRecord, KeepOpen | None]]:
            cols = ", ".join("a." + c.strip() for c in _ALARM_COLS.split(","))
            rows = conn.execute(
                f"SELECT {cols}, k.at, k.by, k.note FROM alarms a"
                " LEFT JOIN alarm_keep_open k ON k.alarm_id = a.alarm_id"
                " WHERE a.state = 'acknowledged' OR (a.state = 'cancelled'"
                " AND a.acknowledged_at IS NOT NULL) ORDER BY a.acknowledged_at").fetchall()
            n = len(_ALARM_COLS.split(","))
            return [(_alarm(r[:n]), None if r[n] is None else KeepOpen(r[n], r[n + 1],
                                                                       r[n + 2]))
                    for r in rows]

        return await self._read(op)

    async def last_notices(self, kind: str) -> dict[str, float]:
        """subject -> time of the latest notice of ``kind`` about it."""

        def op(conn: sqlite3.Connection) -> dict[str, float]:
            return {subject: at for subject, at in conn.execute(
                "SELECT subject, MAX(at) FROM notices WHERE kind = ? GROUP BY subject",
                (kind,))}

        return await self._read(op)

    async def set_keep_open(self, alarm_id: str, keep: bool, *, by: str,
                            note: str | None = None) -> AlarmState:
        """Ask that ``alarm_id`` stays open (``keep``) or may close by itself again.

        Journaled with who and why (``alarm.keep_open`` / ``alarm.keep_open_ended`` in the
        alarm's log). Returns the alarm's state; a resolved alarm is left as it is (the
        caller says so). Raises :class:`UnknownAlarm`."""
        when = self._clock()

        def op(conn: sqlite3.Connection) -> AlarmState:
            row = conn.execute("SELECT state FROM alarms WHERE alarm_id = ?",
                               (alarm_id,)).fetchone()
            if row is None:
                raise UnknownAlarm(alarm_id)
            state = AlarmState(row[0])
            if state is AlarmState.RESOLVED:
                return state
            data: dict[str, Any] = {"by": by}
            if note:
                data["note"] = note
            if keep:
                conn.execute("INSERT OR REPLACE INTO alarm_keep_open(alarm_id, at, by, note)"
                             " VALUES (?, ?, ?, ?)", (alarm_id, when, by, note))
                _log(conn, alarm_id, when, "alarm.keep_open", data)
            elif conn.execute("DELETE FROM alarm_keep_open WHERE alarm_id = ?",
                              (alarm_id,)).rowcount:
                _log(conn, alarm_id, when, "alarm.keep_open_ended", data)
            return state

        return await self._run(op, ("alarm", alarm_id))

    async def save_report(self, day: str, zone: str, data: dict[str, Any]) -> None:
        """Journal the report of local day ``day`` (YYYY-MM-DD); a newer one replaces it."""
        at = self._clock()
        text = json.dumps(data, ensure_ascii=False, sort_keys=True)
        await self._run(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO reports(day, zone, created_at, data) VALUES (?, ?, ?, ?)",
            (day, zone, at, text)))

    async def stored_report(self, day: str) -> dict[str, Any] | None:
        """The journaled report of ``day``, or None when none was made."""

        def op(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute("SELECT data FROM reports WHERE day = ?", (day,)).fetchone()
            return None if row is None else dict(json.loads(row[0]))

        return await self._read(op)

    async def delete_old_alarms(self, before: float, batch: int) -> tuple[int, int]:
        """One batch: delete up to ``batch`` *resolved* alarms received before ``before``
        with their log, notifications, device messages and keep-open flag. Returns
        (alarms, other rows) deleted; (0, 0) when none is left. An open alarm is never
        deleted, however old."""

        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            ids = [(r[0],) for r in conn.execute(
                "SELECT alarm_id FROM alarms WHERE state = 'resolved' AND received_at < ?"
                " ORDER BY received_at LIMIT ?", (before, batch))]
            rows = 0
            for table in ("alarm_log", "notifications", "device_messages", "alarm_keep_open",
                          "drills", "calls"):
                before_changes = conn.total_changes
                conn.executemany(f"DELETE FROM {table} WHERE alarm_id = ?", ids)
                rows += conn.total_changes - before_changes
            conn.executemany("DELETE FROM alarms WHERE alarm_id = ?", ids)
            return len(ids), rows

        return await self._run(op)

    async def redact_notifications(self, before: float, batch: int) -> int:
        """One batch: up to ``batch`` SMS records created before ``before`` lose their
        personal data. The phone number is kept masked (``+86138****5678``, as in the
        logs), the recipient's name and the text are emptied (the empty text marks a
        redacted row), the number is masked in the error text too; role, kind, wave,
        state, sid, attempts and latency stay. Returns the rows redacted (0: done)."""

        def op(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT id, alarm_id, kind, wave, phone, error FROM notifications"
                " WHERE body != '' AND created_at < ? ORDER BY created_at LIMIT ?",
                (before, batch)).fetchall()
            for nid, alarm_id, kind, wave, phone, error in rows:
                masked = mask_phone(phone) if "*" not in phone else phone
                # One row per (alarm, kind, wave, phone): two numbers of one wave may
                # mask alike, and the unique index must still hold.
                if conn.execute(
                        "SELECT 1 FROM notifications WHERE alarm_id = ? AND kind = ?"
                        " AND IFNULL(wave, 0) = IFNULL(?, 0) AND phone = ? AND id != ?",
                        (alarm_id, kind, wave, masked, nid)).fetchone():
                    masked = f"{masked}#{nid}"
                conn.execute(
                    "UPDATE notifications SET phone = ?, name = '', body = '', error = ?"
                    " WHERE id = ?",
                    (masked, error.replace(phone, masked) if error else error, nid))
            return len(rows)

        return await self._run(op)


@dataclass(frozen=True, slots=True)
class KeepOpen:
    """Someone asked that an alarm is not closed by the gateway (auto-resolve)."""

    at: float
    by: str
    note: str | None


# Closure, reports, retention (issue 10). The indexes keep retention's batches and the
# report's day queries from scanning whole tables while they hold the writer.
_CLOSURE_SCHEMA = """
CREATE TABLE IF NOT EXISTS alarm_keep_open(
    alarm_id TEXT PRIMARY KEY,
    at REAL NOT NULL,
    by TEXT NOT NULL,
    note TEXT
);
CREATE TABLE IF NOT EXISTS reports(
    day TEXT PRIMARY KEY,  -- local day YYYY-MM-DD in ``zone``
    zone TEXT NOT NULL,
    created_at REAL NOT NULL,
    data TEXT NOT NULL  -- JSON
);
CREATE INDEX IF NOT EXISTS alarms_received ON alarms(received_at);
CREATE INDEX IF NOT EXISTS device_messages_alarm ON device_messages(alarm_id)
    WHERE alarm_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS notifications_unredacted ON notifications(created_at)
    WHERE body != '';
CREATE TABLE IF NOT EXISTS calls(
    id INTEGER PRIMARY KEY,
    alarm_id TEXT NOT NULL,
    wave INTEGER NOT NULL,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    phone TEXT NOT NULL,
    tree INTEGER NOT NULL DEFAULT 0,  -- called in turn until one accepts
    position INTEGER NOT NULL DEFAULT 0,  -- order in the wave (the tree's distance order)
    state TEXT NOT NULL,  -- CallState
    sid TEXT,
    status TEXT,  -- Twilio's CallStatus, as last heard
    answered_by TEXT,
    digits TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error_code INTEGER,
    error TEXT,
    latency_ms REAL,  -- press -> call placed
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE(alarm_id, wave, phone)
);
CREATE INDEX IF NOT EXISTS calls_sid ON calls(sid) WHERE sid IS NOT NULL;
CREATE TABLE IF NOT EXISTS drills(
    drill_id TEXT PRIMARY KEY,
    alarm_id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL,
    by TEXT NOT NULL,
    notify TEXT NOT NULL,  -- JSON list of E.164 numbers / responder ids; [] = dry run
    at REAL NOT NULL
);
"""


# -- the notifications table -------------------------------------------------------------

_NOTIFICATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS notifications(
    id INTEGER PRIMARY KEY,
    alarm_id TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'escalation',  -- MessageKind
    wave INTEGER,  -- escalation messages only
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    phone TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,  -- NotificationState
    sid TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error_code INTEGER,
    error TEXT,
    latency_ms REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)"""
# One message per person per (alarm, kind, wave); a wave-less kind counts as wave 0 here
# because a UNIQUE constraint would treat every NULL wave as different.
_NOTIFICATIONS_UNIQUE = """
CREATE UNIQUE INDEX IF NOT EXISTS notifications_once
    ON notifications(alarm_id, kind, IFNULL(wave, 0), phone)"""
_NOTIFICATIONS_INDEXES = _NOTIFICATIONS_UNIQUE + """;
CREATE INDEX IF NOT EXISTS notifications_alarm ON notifications(alarm_id);
CREATE INDEX IF NOT EXISTS notifications_phone ON notifications(phone);
CREATE INDEX IF NOT EXISTS notifications_sid ON notifications(sid) WHERE sid IS NOT NULL;
CREATE INDEX IF NOT EXISTS notifications_held ON notifications(id) WHERE state = 'held';
CREATE INDEX IF NOT EXISTS notifications_supervisor ON notifications(created_at)
    WHERE role = 'supervisor';
"""
#: What a commit changed, for the watchers: a (kind, key), several, or nothing.
_Touched = tuple[str, str] | list[tuple[str, str]] | None
#: Wave numbers that journals written before message kinds used for follow-ups.
_OLD_KIND_WAVES = {900: MessageKind.TAKEN, 901: MessageKind.CANCELLED,
                   902: MessageKind.FALLBACK}

#: Twilio message statuses -> our states (queued, sending... say no more than accepted).
_CARRIER_STATUS: dict[str, NotificationState] = {
    "accepted": NotificationState.ACCEPTED,
    "scheduled": NotificationState.ACCEPTED,
    "queued": NotificationState.ACCEPTED,
    "sending": NotificationState.ACCEPTED,
    "sent": NotificationState.SENT,
    "delivered": NotificationState.DELIVERED,
    "read": NotificationState.DELIVERED,
    "undelivered": NotificationState.UNDELIVERED,
    "failed": NotificationState.FAILED,
}
_ACKNOWLEDGEABLE = ", ".join(
    f"'{s}'" for s, nxt in NOTIFICATION_TRANSITIONS.items()
    if NotificationState.ACKNOWLEDGED in nxt)


def _prepare_notifications(conn: sqlite3.Connection) -> None:
    """Create the notifications table, or migrate one written before message kinds.

    The old table keyed rows by UNIQUE(alarm_id, wave, phone) and told follow-ups
    apart by magic wave numbers (900 taken, 901 cancelled, 902 fallback). SQLite
    cannot change a table's constraints in place, so the old table is rebuilt, in one
    transaction: ``kind`` from the old wave number (``escalation`` otherwise), and the
    wave kept for escalation messages only."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(notifications)")}
    if columns and "kind" not in columns:
        kinds = " ".join(f"WHEN {w} THEN '{k}'" for w, k in _OLD_KIND_WAVES.items())
        waves = ", ".join(str(w) for w in _OLD_KIND_WAVES)
        cols = ("role, name, phone, body, state, sid, attempts, error_code, error,"
                " latency_ms, created_at, updated_at")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("ALTER TABLE notifications RENAME TO notifications_v1")
            conn.execute(_NOTIFICATIONS_TABLE)
            moved = conn.execute(
                f"INSERT INTO notifications(id, alarm_id, kind, wave, {cols})"
                f" SELECT id, alarm_id, CASE wave {kinds} ELSE '{MessageKind.ESCALATION}' END,"
                f" CASE WHEN wave IN ({waves}) THEN NULL ELSE wave END, {cols}"
                " FROM notifications_v1").rowcount
            conn.execute("DROP TABLE notifications_v1")
            conn.execute(_NOTIFICATIONS_UNIQUE)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.executescript(_NOTIFICATIONS_INDEXES)
        log.info("journal.migrated", table="notifications", rows=moved,
                 change="message kinds instead of wave numbers 900-902")
        return
    conn.execute(_NOTIFICATIONS_TABLE)
    conn.executescript(_NOTIFICATIONS_INDEXES)


# -- helpers run in the writer thread ---------------------------------------------------


def _settle_all(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, value, error in outcomes:
        _settle(fut, value, error)


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


def _map_error(exc: BaseException, what: str) -> JournalError:
    code = getattr(exc, "sqlite_errorcode", None)
    full = code is not None and (code & 0xFF == sqlite3.SQLITE_FULL
                                 or code == sqlite3.SQLITE_IOERR_SHMSIZE)
    if full or "full" in str(exc).lower():
        return JournalFull(f"{what}: {exc}", code=code)
    return JournalError(f"{what}: {exc}", code=code)


def _probe_write(now: float) -> Callable[[sqlite3.Connection], None]:
    """The smallest real write: one meta row (a new WAL frame, so it needs space)."""

    def op(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('probed_at', ?)",
                     (repr(now),))

    return op


def _transition(conn: sqlite3.Connection, alarm_id: str, current: AlarmState,
                wanted: AlarmState, by: str | None, note: str | None, when: float) -> None:
    check_transition(alarm_id, current, wanted)
    sets = ["state = ?"]
    args: list[Any] = [wanted]
    if wanted is AlarmState.ACKNOWLEDGED:
        sets += ["acknowledged_by = ?", "acknowledged_at = ?"]
        args += [by, when]
    if wanted is AlarmState.RESOLVED:
        sets += ["resolved_at = ?"]
        args += [when]
    if note is not None:
        sets += ["note = ?"]
        args += [note]
    conn.execute(f"UPDATE alarms SET {', '.join(sets)} WHERE alarm_id = ?", (*args, alarm_id))
    data: dict[str, Any] = {"from": current.value, "to": wanted.value}
    if by:
        data["by"] = by
    if note:
        data["note"] = note
    _log(conn, alarm_id, when, f"alarm.{wanted.value}", data)


def _apply_deferred(conn: sqlite3.Connection, alarm_id: str, state: AlarmState,
                    d: _Deferred) -> AlarmState:
    """A transition held in memory, applied in the commit that journals the alarm."""
    if d.wanted == state:
        return state
    try:
        _transition(conn, alarm_id, state, d.wanted, d.by, d.note, d.at)
    except IllegalTransition as exc:  # defer_transition checked the chain: a bug if here
        _log(conn, alarm_id, d.at, "alarm.deferred_refused",
             {"from": exc.current.value, "to": exc.wanted.value, "by": d.by})
        return state
    return d.wanted


def _land_held(conn: sqlite3.Connection, alarm_id: str, state: AlarmState,
               transitions: Iterable[_Deferred], notes: Iterable[NotificationRecord],
               now: float) -> AlarmState:
    for d in transitions:
        state = _apply_deferred(conn, alarm_id, state, d)
    for rec in notes:
        _adopt_notification(conn, alarm_id, rec, now)
    return state


def _adopt_notification(conn: sqlite3.Connection, alarm_id: str, rec: NotificationRecord,
                        now: float) -> None:
    """Journal one SMS sent from memory: insert it, or move the row there forward."""
    row = conn.execute(
        "SELECT id, state FROM notifications WHERE alarm_id = ? AND kind = ?"
        " AND IFNULL(wave, 0) = IFNULL(?, 0) AND phone = ?",
        (alarm_id, rec.kind, rec.wave, rec.phone)).fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO notifications(alarm_id, kind, wave, role, name, phone, body, state,"
            " sid, attempts, error_code, error, latency_ms, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (alarm_id, rec.kind, rec.wave, rec.role, rec.name, rec.phone, rec.body, rec.state,
             rec.sid, rec.attempts, rec.error_code, rec.error, rec.latency_ms, rec.created_at,
             now))
        _log(conn, alarm_id, now, "sms.adopted",
             {"kind": rec.kind, "wave": rec.wave, "state": rec.state, "sid": rec.sid})
        return
    current = NotificationState(row[1])
    state = rec.state if notification_may(current, rec.state) else current
    conn.execute(
        "UPDATE notifications SET state = ?, sid = COALESCE(sid, ?),"
        " attempts = MAX(attempts, ?), error_code = COALESCE(error_code, ?),"
        " error = COALESCE(error, ?), latency_ms = COALESCE(latency_ms, ?), updated_at = ?"
        " WHERE id = ?",
        (state, rec.sid, rec.attempts, rec.error_code, rec.error, rec.latency_ms, now, row[0]))


def _log(conn: sqlite3.Connection, alarm_id: str, at: float, event: str,
         data: dict[str, Any] | None) -> None:
    conn.execute(
        "INSERT INTO alarm_log(alarm_id, at, event, data) VALUES (?, ?, ?, ?)",
        (alarm_id, at, event, json.dumps(data, ensure_ascii=False) if data else None),
    )


def _insert_message(conn: sqlite3.Connection, at: float, source: str, address: str,
                    device_id: str | None, kind: str | None, code: str | None,
                    alarm_id: str | None, error: str | None, raw: bytes) -> None:
    conn.execute(
        "INSERT INTO device_messages(received_at, source, address, device_id, kind, code,"
        " alarm_id, error, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (at, source, address, device_id, kind, code, alarm_id, error, raw[:4096]),
    )


def _touch_device(conn: sqlite3.Connection, device_id: str, at: float, kind: str,
                  battery_pct: float | None, voltage_mv: int | None,
                  link_quality: int | None, online: bool | None) -> None:
    conn.execute(
        "INSERT INTO device_state(device_id, last_seen, last_kind, battery_pct, voltage_mv,"
        " link_quality, online) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(device_id) DO UPDATE SET"
        " last_seen = MAX(last_seen, excluded.last_seen), last_kind = excluded.last_kind,"
        " battery_pct = COALESCE(excluded.battery_pct, battery_pct),"
        " voltage_mv = COALESCE(excluded.voltage_mv, voltage_mv),"
        " link_quality = COALESCE(excluded.link_quality, link_quality),"
        " online = COALESCE(excluded.online, online)",
        (device_id, at, kind, battery_pct, voltage_mv, link_quality,
         None if online is None else int(online)),
    )

