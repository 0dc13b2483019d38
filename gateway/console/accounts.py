"""Operator accounts and sessions of the web console (issue 11).

Theory of operation
-------------------
One SQLite file (``state_dir/operators.db``, 0600, WAL, ``synchronous=FULL``) holds
the operators, their sign-in failures and their sessions, so a session survives a
gateway restart. Two kinds of callers share it:

* the ``gateway operator`` CLI, synchronously, possibly while the gateway runs (hence
  ``busy_timeout`` and ``BEGIN IMMEDIATE`` for every read-modify-write);
* the console's web server, through the ``async`` methods, which run the SQLite and
  argon2 work in worker threads (``asyncio.to_thread``) so the event loop never blocks.

One connection serves both, guarded by one ``threading.Lock``. Argon2 runs *outside*
that lock (a verification takes tens of milliseconds and 64 MiB): a burst of sign-in
attempts must not stall the session look-up of every request. A semaphore bounds how
many verifications run at once, for the same memory's sake.

Sign-in answers one of three refusals. ``invalid`` is the same for an unknown login and
a wrong password, and takes about as long (an unknown login is verified against a
dummy hash). Failures are counted per login *string*, whether or not the account
exists, so a lockout does not tell which logins exist either. ``disabled`` is told only
to whoever gave the right password. Only the SHA-256 of a session token is stored; the
CSRF token is stored as is (it is no credential on its own) so it survives a restart.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import getpass
import hashlib
import os
import re
import secrets
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

log = structlog.get_logger(__name__)

LOGIN_PATTERN = re.compile(r"[a-z][a-z0-9._-]{1,31}")
MIN_PASSWORD_LENGTH = 10
# argon2 hashes all of it: a megabyte "password" is work, not security.
MAX_PASSWORD_LENGTH = 1024
MAX_DISPLAY_NAME = 64
# A session's last_seen is written at most this often (not once per request); idle
# expiry is therefore exact to within this much.
TOUCH_INTERVAL_S = 60.0
# Concurrent argon2 verifications (each takes memory_cost, 64 MiB by default).
MAX_CONCURRENT_HASHES = 2
BUSY_TIMEOUT_MS = 5000

RefusalReason = Literal["invalid", "locked", "disabled"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS operators (
    login TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    password_changed_at REAL NOT NULL,
    last_sign_in_at REAL
);
-- Keyed by the login as typed (normalised), not by account: unknown logins lock too.
CREATE TABLE IF NOT EXISTS sign_in_failures (
    login TEXT PRIMARY KEY,
    failures INTEGER NOT NULL,
    first_failure_at REAL NOT NULL,
    locked_until REAL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_sha256 TEXT PRIMARY KEY,
    login TEXT NOT NULL REFERENCES operators(login) ON DELETE CASCADE,
    csrf_token TEXT NOT NULL,
    remote TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_seen_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_login ON sessions(login);
"""


def accounts_path(state_dir: Path) -> Path:
    """The accounts file of a gateway whose state lives in ``state_dir``."""
    return state_dir / "operators.db"


class AccountError(Exception):
    """Base of the errors of operator accounts."""


class InvalidAccount(AccountError, ValueError):
    """A login or display name that cannot be used."""

    def __init__(self, field: str, value: str, reason: str) -> None:
        super().__init__(f"{field} {value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class WeakPassword(AccountError, ValueError):
    """A password the policy refuses; ``reason`` says why (never the password)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"password refused: {reason}")
        self.reason = reason


class AccountExists(AccountError):
    def __init__(self, login: str) -> None:
        super().__init__(f"operator {login!r} already exists")
        self.login = login


class UnknownOperator(AccountError):
    def __init__(self, login: str) -> None:
        super().__init__(f"no operator {login!r}")
        self.login = login


class PasswordMismatch(AccountError):
    """The password typed twice differed."""

    def __init__(self) -> None:
        super().__init__("the passwords did not match")


class SignInRefused(AccountError):
    """A refused sign-in. ``reason``: ``invalid`` (unknown login or wrong password),
    ``locked`` (too many failures; ``until`` says when it ends) or ``disabled``."""

    def __init__(self, reason: RefusalReason, until: float | None = None) -> None:
        super().__init__(f"sign-in refused: {reason}")
        self.reason: RefusalReason = reason
        self.until = until


@dataclass(frozen=True, slots=True)
class OperatorInfo:
    login: str
    display_name: str
    disabled: bool
    created_at: float
    last_sign_in_at: float | None
    locked_until: float | None  # None unless locked now


@dataclass(frozen=True, slots=True)
class NewSession:
    """What a sign-in hands to the browser. ``token`` exists only here and in the
    cookie (the file holds its SHA-256)."""

    token: str = field(repr=False)
    csrf_token: str = field(repr=False)
    login: str
    display_name: str
    expires_at: float  # by idle time, unless the maximum age comes first


@dataclass(frozen=True, slots=True)
class Session:
    login: str
    display_name: str
    csrf_token: str = field(repr=False)
    created_at: float
    last_seen_at: float
    expires_at: float  # by idle time or maximum age, whichever comes first


def check_password(login: str, password: str) -> None:
    """Raise :class:`WeakPassword` unless ``password`` meets the policy."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPassword(f"shorter than {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPassword(f"longer than {MAX_PASSWORD_LENGTH} characters")
    if password.strip().casefold() == login.casefold():
        raise WeakPassword("the same as the login")


def check_login(login: str) -> None:
    if not LOGIN_PATTERN.fullmatch(login):
        raise InvalidAccount("login", login, "must be 2-32 characters: a lowercase letter, "
                                             "then lowercase letters, digits, '.', '_' or '-'")


def _check_display_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_DISPLAY_NAME or not name.isprintable():
        raise InvalidAccount("display name", name, f"must be 1-{MAX_DISPLAY_NAME} printable "
                                                   "characters")
    return name


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_password(path: Path | None, *, stdin: TextIO | None = None,
                  prompt: Callable[[str], str] | None = None) -> str:
    """A new password for the CLI: the first line of ``path`` (stripped); else the
    first line of stdin when it is not a terminal; else typed twice at a prompt
    (:class:`PasswordMismatch` when the two differ)."""
    if path is not None:
        with path.open(encoding="utf-8") as f:
            return f.readline().strip()
    stdin = sys.stdin if stdin is None else stdin
    if not stdin.isatty():
        return stdin.readline().strip()
    ask = getpass.getpass if prompt is None else prompt
    first = ask("New password: ")
    if ask("Again: ") != first:
        raise PasswordMismatch
    return first


class OperatorAccounts:
    """The console's operators and their sessions, in their own SQLite file.

    The synchronous methods (``add``, ``set_password``, ``disable``, ``enable``,
    ``list``) are for the CLI; the web server uses only the ``async`` ones. Use as a
    context manager, or call :meth:`close`."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        max_failures: int = 5,
        failure_window_s: float = 900.0,
        lockout_s: float = 900.0,
        session_idle_s: float = 8 * 3600,
        session_max_s: float = 24 * 3600,
        hasher: PasswordHasher | None = None,
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        self.path = path
        self._clock = clock
        self._max_failures = max_failures
        self._failure_window_s = failure_window_s
        self._lockout_s = lockout_s
        self._idle_s = session_idle_s
        self._max_s = session_max_s
        self._hasher = hasher if hasher is not None else PasswordHasher()
        self._dummy_hash: str | None = None
        self._lock = threading.Lock()
        self._hashing = asyncio.Semaphore(MAX_CONCURRENT_HASHES)
        self._conn = self._open(path)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        # Created 0600 here, not by sqlite3 (0644 less the umask); SQLite gives its
        # -wal and -shm the main file's mode. An existing file is put back to 0600.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
            # Root (``gateway operator add`` on the server) keeps the file the service's:
            # the owner of the state folder (systemd's DynamicUser), or the service could
            # not open it. SQLite gives its -wal and -shm the database file's owner.
            folder = path.parent.stat()
            if os.geteuid() == 0 and folder.st_uid != 0:
                os.fchown(fd, folder.st_uid, folder.st_gid)
        finally:
            os.close(fd)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> OperatorAccounts:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (a read upgraded later can fail
        with SQLITE_BUSY in WAL mode, which busy_timeout does not wait out)."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- management (CLI) -------------------------------------------------------

    def add(self, login: str, display_name: str, password: str) -> None:
        """Create an operator; :class:`AccountExists`, :class:`InvalidAccount`,
        :class:`WeakPassword`."""
        check_login(login)
        name = _check_display_name(display_name)
        check_password(login, password)
        password_hash = self._hasher.hash(password)
        now = self._clock()
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO operators(login, display_name, password_hash, created_at,"
                    " password_changed_at) VALUES (?, ?, ?, ?, ?)",
                    (login, name, password_hash, now, now))
            except sqlite3.IntegrityError:
                raise AccountExists(login) from None
        log.info("console.operator_added", login=login)

    def set_password(self, login: str, password: str) -> None:
        """A new password: ends the operator's sessions and lifts a lockout."""
        check_password(login, password)
        password_hash = self._hasher.hash(password)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE operators SET password_hash = ?, password_changed_at = ?"
                " WHERE login = ?", (password_hash, self._clock(), login))
            if cur.rowcount == 0:
                raise UnknownOperator(login)
            conn.execute("DELETE FROM sessions WHERE login = ?", (login,))
            conn.execute("DELETE FROM sign_in_failures WHERE login = ?", (login,))
        log.info("console.password_set", login=login)

    def disable(self, login: str) -> None:
        """Refuse the operator's sign-ins from now on and end their sessions."""
        with self._write() as conn:
            if conn.execute("UPDATE operators SET disabled = 1 WHERE login = ?",
                            (login,)).rowcount == 0:
                raise UnknownOperator(login)
            conn.execute("DELETE FROM sessions WHERE login = ?", (login,))
        log.info("console.operator_disabled", login=login)

    def enable(self, login: str) -> None:
        with self._write() as conn:
            if conn.execute("UPDATE operators SET disabled = 0 WHERE login = ?",
                            (login,)).rowcount == 0:
                raise UnknownOperator(login)
        log.info("console.operator_enabled", login=login)

    def list(self) -> builtins.list[OperatorInfo]:
        """Every operator, by login."""
        now = self._clock()
        with self._lock:
            rows = self._conn.execute(
                "SELECT o.login, o.display_name, o.disabled, o.created_at,"
                " o.last_sign_in_at, f.locked_until FROM operators o"
                " LEFT JOIN sign_in_failures f USING (login) ORDER BY o.login").fetchall()
        return [OperatorInfo(login, name, bool(disabled), created, last,
                             locked if locked is not None and locked > now else None)
                for login, name, disabled, created, last, locked in rows]

    # -- the web server (async) ------------------------------------------------------

    async def sign_in(self, login: str, password: str, *, remote: str) -> NewSession:
        """A new session for ``login``, or :class:`SignInRefused`."""
        async with self._hashing:
            return await asyncio.to_thread(self._sign_in, login, password, remote)

    async def session(self, token: str) -> Session | None:
        """The live session of ``token``; None when unknown, expired (idle or too
        old) or its operator disabled."""
        if not token or len(token) > 256:
            return None
        return await asyncio.to_thread(self._session, token)

    async def sign_out(self, token: str) -> None:
        """End the session of ``token`` (nothing when there is none)."""
        await asyncio.to_thread(self._sign_out, token)

    def _sign_in(self, login: str, password: str, remote: str) -> NewSession:
        login = login.strip().lower()
        shown = login[:64]  # what was typed goes to the log; keep it bounded
        now = self._clock()
        with self._lock:
            row = self._conn.execute(
                "SELECT password_hash FROM operators WHERE login = ?", (login,)).fetchone()
            locked = self._locked_until(login, now)
        if locked is not None:
            self._refused(shown, remote, "locked")
            raise SignInRefused("locked", locked)
        stored = row[0] if row is not None else None
        ok = self._verify(stored if stored is not None else self._dummy(), password)
        ok = ok and stored is not None
        rehashed = None
        if ok and stored is not None and self._hasher.check_needs_rehash(stored):
            rehashed = self._hasher.hash(password)
        if not ok:
            # No account can have a login off the pattern: nothing to count for it.
            failures, until = ((0, None) if not LOGIN_PATTERN.fullmatch(login)
                               else self._record_failure(login, now))
            if until is not None:
                log.warning("console.lockout", login=shown, remote=remote, failures=failures)
                self._refused(shown, remote, "locked")
                raise SignInRefused("locked", until)
            self._refused(shown, remote, "invalid")
            raise SignInRefused("invalid")
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._write() as conn:
            # Checked again: a lockout, a disable or a new password may have come
            # while the password was being verified.
            locked = self._locked_until(login, now)
            current = conn.execute(
                "SELECT password_hash, disabled, display_name FROM operators"
                " WHERE login = ?", (login,)).fetchone()
            reason: RefusalReason | None
            if locked is not None:
                reason = "locked"
            elif current is None or current[0] != stored:
                reason = "invalid"  # its password changed: the one given is no longer it
            elif current[1]:
                reason = "disabled"
            else:
                reason, display_name = None, current[2]
                conn.execute("DELETE FROM sign_in_failures WHERE login = ?", (login,))
                conn.execute("UPDATE operators SET last_sign_in_at = ?,"
                             " password_hash = coalesce(?, password_hash) WHERE login = ?",
                             (now, rehashed, login))
                conn.execute(
                    "INSERT INTO sessions(token_sha256, login, csrf_token, remote,"
                    " created_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (_token_hash(token), login, csrf, remote, now, now))
                self._prune(conn, now)
        if reason is not None:
            self._refused(shown, remote, reason)
            raise SignInRefused(reason, locked if reason == "locked" else None)
        log.info("console.sign_in", login=login, remote=remote)
        return NewSession(token=token, csrf_token=csrf, login=login,
                          display_name=display_name,
                          expires_at=now + min(self._idle_s, self._max_s))

    def _refused(self, login: str, remote: str, reason: RefusalReason) -> None:
        log.warning("console.sign_in_refused", login=login, remote=remote, reason=reason)

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    def _dummy(self) -> str:
        # Made on first need with the same parameters as real hashes, so an unknown
        # login costs what a wrong password does. A race only makes two; both work.
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        return self._dummy_hash

    def _locked_until(self, login: str, now: float) -> float | None:
        """Caller holds the lock."""
        row = self._conn.execute(
            "SELECT locked_until FROM sign_in_failures WHERE login = ?", (login,)).fetchone()
        if row is None or row[0] is None or row[0] <= now:
            return None
        return float(row[0])

    def _record_failure(self, login: str, now: float) -> tuple[int, float | None]:
        """Count a failure; (failures in the window, end of the lockout it started)."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT failures, first_failure_at, locked_until FROM sign_in_failures"
                " WHERE login = ?", (login,)).fetchone()
            if row is not None and row[2] is not None and row[2] > now:
                return row[0], None  # locked meanwhile by a concurrent attempt
            if (row is None or row[2] is not None
                    or now - row[1] >= self._failure_window_s):
                failures, first = 1, now  # a new window (also after a lockout ended)
            else:
                failures, first = row[0] + 1, row[1]
            until = now + self._lockout_s if failures >= self._max_failures else None
            conn.execute(
                "INSERT OR REPLACE INTO sign_in_failures(login, failures, first_failure_at,"
                " locked_until) VALUES (?, ?, ?, ?)", (login, failures, first, until))
            self._prune(conn, now)
        return failures, until

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        """Drop expired sessions and failures that no longer count (in a transaction)."""
        conn.execute("DELETE FROM sessions WHERE last_seen_at <= ? OR created_at <= ?",
                     (now - self._idle_s, now - self._max_s))
        conn.execute("DELETE FROM sign_in_failures WHERE (locked_until IS NULL OR"
                     " locked_until <= ?) AND first_failure_at <= ?",
                     (now, now - self._failure_window_s))

    def _session(self, token: str) -> Session | None:
        key = _token_hash(token)
        now = self._clock()
        with self._lock:
            conn = self._conn
            row = conn.execute(
                "SELECT s.login, o.display_name, s.csrf_token, s.created_at, s.last_seen_at,"
                " o.disabled FROM sessions s JOIN operators o USING (login)"
                " WHERE s.token_sha256 = ?", (key,)).fetchone()
            if row is None:
                return None
            login, name, csrf, created, seen, disabled = row
            if disabled or now - seen > self._idle_s or now - created > self._max_s:
                conn.execute("DELETE FROM sessions WHERE token_sha256 = ?", (key,))
                return None
            if now - seen >= TOUCH_INTERVAL_S:
                conn.execute("UPDATE sessions SET last_seen_at = ? WHERE token_sha256 = ?",
                             (now, key))
                seen = now
        return Session(login, name, csrf, created, seen,
                       min(seen + self._idle_s, created + self._max_s))

    def _sign_out(self, token: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM sessions WHERE token_sha256 = ?",
                               (_token_hash(token),))
