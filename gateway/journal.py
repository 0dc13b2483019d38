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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import structlog

from gateway.lifecycle import (
    NOTIFICATION_TRANSITIONS,
    AlarmState,
    NotificationState,
    check_notification_transition,
    check_transition,
    notification_may,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")

MAX_BATCH = 512
SCHEMA_VERSION = 1

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
    raw BLOB
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
    """The journal could not record something. The alarm is NOT durable."""


class JournalFull(JournalError):
    """The disk (or the database's size limit) is full."""


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


@dataclass(frozen=True, slots=True)
class PressOutcome:
    alarm_id: str
    new: bool  # False: joined an open alarm of the same device within the window
    presses: int
    state: AlarmState
    received_at: float


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
    " acknowledged_by, acknowledged_at, resolved_at, note"
)
_NOTE_COLS = (
    "id, alarm_id, kind, wave, role, name, phone, body, state, sid, attempts, error_code,"
    " error, latency_ms, created_at"
)


def _alarm(row: Sequence[Any]) -> AlarmRecord:
    return AlarmRecord(
        row[0], row[1], row[2], row[3], AlarmState(row[4]), row[5], row[6], row[7], row[8],
        row[9], row[10], row[11], row[12],
    )


def _notification(row: Sequence[Any]) -> NotificationRecord:
    return NotificationRecord(
        row[0], row[1], MessageKind(row[2]), row[3], row[4], row[5], row[6], row[7],
        NotificationState(row[8]), row[9], row[10], row[11], row[12], row[13], row[14],
    )


_Job = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
_STOP = object()


class Journal:
    """Async facade over a single-writer, group-committing SQLite journal."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._clock = clock
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[None] | None = None
        self.commits = 0  # number of transactions committed (group commits)
        self.jobs = 0

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
        await self._ready
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join)

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        _prepare_notifications(conn)
        conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        return conn

    def _writer(self) -> None:
        loop, ready = self._loop, self._ready
        if loop is None or ready is None:
            raise JournalError("writer started outside __aenter__")
        try:
            conn = self._open()
        except (sqlite3.Error, OSError) as exc:
            err = _map_error(exc, f"cannot open journal {self.path}")
            loop.call_soon_threadsafe(_settle, ready, None, err)
            return
        loop.call_soon_threadsafe(_settle, ready, None, None)
        stopping = False
        try:
            while not stopping:
                first = self._queue.get()
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
                self._run_batch(conn, batch, loop)
        finally:
            conn.close()

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[_Job], loop: asyncio.AbstractEventLoop
    ) -> None:
        # Outcomes wait for the commit: nobody hears "journaled" before it is durable.
        pending: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []

        def settle(items: Iterable[tuple[asyncio.Future[Any], Any, BaseException | None]],
                   ) -> None:
            # One wake-up of the loop for the whole batch, not one per job.
            outcomes = list(items)
            if outcomes:
                loop.call_soon_threadsafe(_settle_all, outcomes)

        def begin() -> JournalError | None:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                return _map_error(exc, "cannot begin transaction")
            return None

        if (err := begin()) is not None:
            settle((f, None, err) for _, f in batch)
            return
        for i, (fn, fut) in enumerate(batch):
            try:
                conn.execute("SAVEPOINT job")
                value = fn(conn)
                conn.execute("RELEASE job")
                pending.append((fut, value, None))
                continue
            except Exception as exc:  # noqa: BLE001 - delivered to the caller
                failure: Exception = (_map_error(exc, "write") if isinstance(exc, sqlite3.Error)
                                      else exc)
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                pending.append((fut, None, failure))
                continue
            # SQLite rolled the whole transaction back (e.g. SQLITE_FULL): the jobs
            # before this one are lost as well and must not report success.
            kind = JournalFull if isinstance(failure, JournalFull) else JournalError
            lost = kind(f"rolled back with a failing neighbour: {failure}")
            settle([(f, None, e or lost) for f, _, e in pending] + [(fut, None, failure)])
            pending = []
            if (berr := begin()) is not None:
                settle((f, None, berr) for _, f in batch[i + 1:])
                return
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            err = _map_error(exc, "commit failed")
            pending = [(f, None, err) for f, _, _ in pending]
        else:
            self.commits += 1
            self.jobs += len(batch)
        settle(pending)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the writer thread inside a (group-committed) transaction."""
        if self._thread is None or self._loop is None:
            raise JournalError("journal is not open")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((fn, fut))
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
    ) -> PressOutcome:
        """Journal an emergency press: a new alarm, or joined to the device's open one."""

        def op(conn: sqlite3.Connection) -> PressOutcome:
            row = conn.execute(
                "SELECT alarm_id, presses, state, received_at FROM alarms"
                " WHERE device_id = ? AND state != 'resolved' AND last_press_at >= ?"
                " ORDER BY last_press_at DESC LIMIT 1",
                (device_id, received_at - dedupe_window_s),
            ).fetchone()
            if row is not None:
                alarm_id, presses, state, first_at = row
                conn.execute(
                    "UPDATE alarms SET presses = presses + 1, last_press_at = MAX(last_press_at, ?)"
                    " WHERE alarm_id = ?",
                    (received_at, alarm_id),
                )
                outcome = PressOutcome(alarm_id, False, presses + 1, AlarmState(state), first_at)
                _log(conn, alarm_id, received_at, "press.joined", {"source": source})
            else:
                alarm_id = new_alarm_id()
                conn.execute(
                    f"INSERT INTO alarms({_ALARM_COLS}, raw) VALUES"
                    " (?, ?, ?, ?, ?, ?, ?, ?, 1, NULL, NULL, NULL, NULL, ?)",
                    (alarm_id, device_id, elder_id, code, AlarmState.JOURNALED, source,
                     received_at, received_at, raw),
                )
                outcome = PressOutcome(alarm_id, True, 1, AlarmState.JOURNALED, received_at)
                _log(conn, alarm_id, received_at, "alarm.journaled", {"source": source})
            _insert_message(conn, received_at, source, address, device_id, kind, code,
                            outcome.alarm_id, None, raw)
            _touch_device(conn, device_id, received_at, kind, None, None, None, None)
            return outcome

        return await self._run(op)

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
        await self._run(lambda conn: _log(conn, alarm_id, when, event, data))

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
            conn.execute(f"UPDATE alarms SET {', '.join(sets)} WHERE alarm_id = ?",
                         (*args, alarm_id))
            data: dict[str, Any] = {"from": current.value, "to": wanted.value}
            if by:
                data["by"] = by
            if note:
                data["note"] = note
            _log(conn, alarm_id, when, f"alarm.{wanted.value}", data)
            return current

        return await self._run(op)

    async def plan_notifications(
        self,
        alarm_id: str,
        wave: int | None,
        plans: Iterable[NotificationPlan],
        state: NotificationState = NotificationState.SENDING,
        *,
        kind: MessageKind = MessageKind.ESCALATION,
    ) -> list[NotificationRecord]:
        """Record who must be told; returns every row of this (alarm, kind, wave).

        Idempotent per (alarm, kind, wave, phone). ``wave`` is the escalation wave and
        must be None for the other kinds. Rows start as ``sending`` because the requests
        leave right after this commit: after a crash, a ``sending`` row is reconciled
        with Twilio before resending.
        """
        if (kind is MessageKind.ESCALATION) != (wave is not None):
            raise ValueError(f"{kind} messages {'need' if wave is None else 'have no'} wave")
        plans = list(plans)
        now = self._clock()

        def op(conn: sqlite3.Connection) -> list[NotificationRecord]:
            conn.executemany(
                "INSERT OR IGNORE INTO notifications(alarm_id, kind, wave, role, name, phone,"
                " body, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(alarm_id, kind, wave, p.role, p.name, p.phone, p.body, state, now, now)
                 for p in plans],
            )
            rows = conn.execute(
                f"SELECT {_NOTE_COLS} FROM notifications WHERE alarm_id = ? AND kind = ?"
                " AND wave IS ? ORDER BY id",
                (alarm_id, kind, wave),
            ).fetchall()
            return [_notification(r) for r in rows]

        return await self._run(op)

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

        def op(conn: sqlite3.Connection) -> None:
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

        await self._run(op)

    async def record_notice(self, *, at: float, kind: str, subject: str, severity: str,
                            text: str) -> int:
        """Journal an operator notice (device offline, receiver down...); returns its id."""

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO notices(at, kind, subject, severity, text) VALUES (?, ?, ?, ?, ?)",
                (at, kind, subject, severity, text))
            return int(cur.lastrowid or 0)

        return await self._run(op)

    async def ack_notice(self, notice_id: int, by: str) -> bool:
        now = self._clock()

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE notices SET acknowledged_at = ?, acknowledged_by = ?"
                " WHERE id = ? AND acknowledged_at IS NULL", (now, by, notice_id))
            return cur.rowcount > 0

        return await self._run(op)

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

        return await self._run(op)

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
            (NotificationState.ACKNOWLEDGED, now, alarm_id, phone)))

    # -- reads -----------------------------------------------------------------------

    async def latest_open_alarm_for_phone(self, phone: str) -> AlarmRecord | None:
        """The newest open alarm whose SMS went to ``phone`` (for replies without a ref)."""

        def op(conn: sqlite3.Connection) -> AlarmRecord | None:
            row = conn.execute(
                f"SELECT {', '.join('a.' + c.strip() for c in _ALARM_COLS.split(','))}"
                " FROM alarms a JOIN notifications n ON n.alarm_id = a.alarm_id"
                " WHERE n.phone = ? AND a.state != 'resolved'"
                " ORDER BY a.received_at DESC LIMIT 1", (phone,)).fetchone()
            return None if row is None else _alarm(row)

        return await self._run(op)

    async def unfinished_deliveries(self, older_than: float) -> list[NotificationRecord]:
        """Accepted/sent messages without a final carrier status (for status polling)."""

        def op(conn: sqlite3.Connection) -> list[NotificationRecord]:
            rows = conn.execute(
                f"SELECT {_NOTE_COLS} FROM notifications WHERE state IN"
                f" ('{NotificationState.ACCEPTED}', '{NotificationState.SENT}')"
                " AND sid IS NOT NULL AND sid NOT LIKE 'gsm:%' AND updated_at < ?"
                " ORDER BY id LIMIT 500", (older_than,)).fetchall()
            return [_notification(r) for r in rows]

        return await self._run(op)

    async def open_notices(self) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT id, at, kind, subject, severity, text FROM notices"
                " WHERE acknowledged_at IS NULL ORDER BY id").fetchall()
            keys = ("id", "at", "kind", "subject", "severity", "text")
            return [dict(zip(keys, r, strict=True)) for r in rows]

        return await self._run(op)

    async def get_alarm(self, alarm_id: str) -> AlarmRecord:
        def op(conn: sqlite3.Connection) -> AlarmRecord:
            row = conn.execute(f"SELECT {_ALARM_COLS} FROM alarms WHERE alarm_id = ?",
                               (alarm_id,)).fetchone()
            if row is None:
                raise UnknownAlarm(alarm_id)
            return _alarm(row)

        return await self._run(op)

    async def open_alarms(self) -> list[AlarmRecord]:
        def op(conn: sqlite3.Connection) -> list[AlarmRecord]:
            rows = conn.execute(
                f"SELECT {_ALARM_COLS} FROM alarms WHERE state != 'resolved'"
                " ORDER BY received_at"
            ).fetchall()
            return [_alarm(r) for r in rows]

        return await self._run(op)

    async def open_alarm_for_device(self, device_id: str) -> AlarmRecord | None:
        def op(conn: sqlite3.Connection) -> AlarmRecord | None:
            row = conn.execute(
                f"SELECT {_ALARM_COLS} FROM alarms WHERE device_id = ? AND state != 'resolved'"
                " ORDER BY last_press_at DESC LIMIT 1",
                (device_id,),
            ).fetchone()
            return None if row is None else _alarm(row)

        return await self._run(op)

    async def recent_alarms(self, limit: int = 50) -> list[AlarmRecord]:
        def op(conn: sqlite3.Connection) -> list[AlarmRecord]:
            rows = conn.execute(
                f"SELECT {_ALARM_COLS} FROM alarms ORDER BY received_at DESC LIMIT ?", (limit,)
            ).fetchall()
            return [_alarm(r) for r in rows]

        return await self._run(op)

    async def notifications(self, alarm_id: str) -> list[NotificationRecord]:
        def op(conn: sqlite3.Connection) -> list[NotificationRecord]:
            rows = conn.execute(
                f"SELECT {_NOTE_COLS} FROM notifications WHERE alarm_id = ? ORDER BY id",
                (alarm_id,),
            ).fetchall()
            return [_notification(r) for r in rows]

        return await self._run(op)

    async def alarm_log(self, alarm_id: str) -> list[tuple[float, str, dict[str, Any]]]:
        def op(conn: sqlite3.Connection) -> list[tuple[float, str, dict[str, Any]]]:
            rows = conn.execute(
                "SELECT at, event, data FROM alarm_log WHERE alarm_id = ? ORDER BY id",
                (alarm_id,),
            ).fetchall()
            return [(at, ev, json.loads(data) if data else {}) for at, ev, data in rows]

        return await self._run(op)

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

        await self._run(op)

    async def drop_duty_override(self, responder_id: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM duty_overrides WHERE responder_id = ?", (responder_id,))

        await self._run(op)

    async def duty_overrides(self) -> list[DutyOverride]:
        def op(conn: sqlite3.Connection) -> list[DutyOverride]:
            rows = conn.execute(
                "SELECT responder_id, on_duty, roster_on_duty, at, by FROM duty_overrides"
                " ORDER BY responder_id"
            ).fetchall()
            return [DutyOverride(r[0], bool(r[1]), bool(r[2]), r[3], r[4]) for r in rows]

        return await self._run(op)

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

        return await self._run(op)

    async def count(self, table: str) -> int:
        if table not in {"alarms", "notifications", "device_messages", "alarm_log"}:
            raise ValueError(f"unknown table {table!r}")
        return await self._run(
            lambda conn: int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        )


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
"""
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
    if code == sqlite3.SQLITE_FULL or "full" in str(exc).lower():
        return JournalFull(f"{what}: {exc}")
    return JournalError(f"{what}: {exc}")


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

