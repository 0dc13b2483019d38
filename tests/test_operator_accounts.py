"""Operator accounts of the web console: passwords, lockout, sessions in SQLite, and
the ``gateway operator`` CLI."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from structlog.testing import capture_logs

from gateway import cli
from gateway.console.accounts import (
    AccountExists,
    InvalidAccount,
    OperatorAccounts,
    PasswordMismatch,
    SignInRefused,
    UnknownOperator,
    WeakPassword,
    accounts_path,
    read_password,
)
from tests.support.twilio_api import FakeClock

PASSWORD = "correct horse battery"
REMOTE = "192.0.2.7"


def fast_hasher() -> PasswordHasher:
    # The smallest argon2id parameters: the tests are about the logic, not the cost.
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def open_accounts(path: Path, clock: FakeClock) -> OperatorAccounts:
    return OperatorAccounts(path, clock=clock, hasher=fast_hasher())


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return accounts_path(tmp_path)


@pytest.fixture
def accounts(path: Path, clock: FakeClock) -> Iterator[OperatorAccounts]:
    with open_accounts(path, clock) as a:
        a.add("wang.li", "王丽", PASSWORD)
        yield a


async def refused(accounts: OperatorAccounts, login: str, password: str) -> str:
    with pytest.raises(SignInRefused) as info:
        await accounts.sign_in(login, password, remote=REMOTE)
    return info.value.reason


def test_accounts_file_is_in_the_state_dir(tmp_path: Path) -> None:
    assert accounts_path(tmp_path) == tmp_path / "operators.db"


def test_add_and_list(accounts: OperatorAccounts, clock: FakeClock) -> None:
    accounts.add("zhang-3", "  Zhang San ", "another long secret")
    (wang, zhang) = accounts.list()
    assert (wang.login, wang.display_name, wang.disabled) == ("wang.li", "王丽", False)
    assert (zhang.login, zhang.display_name) == ("zhang-3", "Zhang San")
    assert zhang.created_at == clock.now
    assert zhang.last_sign_in_at is None and zhang.locked_until is None


def test_add_refuses_a_duplicate_a_bad_login_and_weak_passwords(
    accounts: OperatorAccounts,
) -> None:
    with pytest.raises(AccountExists):
        accounts.add("wang.li", "Other", "yet another secret")
    for login in ("Wang", "1abc", "a", "a" * 33, "wang li", "wang/li"):
        with pytest.raises(InvalidAccount):
            accounts.add(login, "X", PASSWORD)
    with pytest.raises(InvalidAccount):
        accounts.add("chen", "   ", PASSWORD)
    with pytest.raises(WeakPassword, match="shorter than 10") as short:
        accounts.add("chen", "Chen", "123456789")
    assert isinstance(short.value, ValueError)
    with pytest.raises(WeakPassword, match="same as the login"):
        accounts.add("chen.jianguo", "Chen", "chen.jianguo")
    assert [o.login for o in accounts.list()] == ["wang.li"]


def test_unknown_operator(accounts: OperatorAccounts) -> None:
    for call in (accounts.disable, accounts.enable):
        with pytest.raises(UnknownOperator):
            call("nobody")
    with pytest.raises(UnknownOperator):
        accounts.set_password("nobody", PASSWORD)


async def test_sign_in_gives_a_session(accounts: OperatorAccounts, clock: FakeClock) -> None:
    with capture_logs() as logs:
        new = await accounts.sign_in("Wang.Li ", PASSWORD, remote=REMOTE)
    assert (new.login, new.display_name) == ("wang.li", "王丽")
    assert new.expires_at == clock.now + 8 * 3600
    assert len(new.token) >= 43 and new.csrf_token and new.csrf_token != new.token
    assert new.token not in repr(new)
    session = await accounts.session(new.token)
    assert session is not None
    assert (session.login, session.display_name) == ("wang.li", "王丽")
    assert session.csrf_token == new.csrf_token
    assert session.created_at == session.last_seen_at == clock.now
    assert accounts.list()[0].last_sign_in_at == clock.now
    assert logs == [{"event": "console.sign_in", "login": "wang.li", "remote": REMOTE,
                     "log_level": "info"}]
    assert await accounts.session("not-a-token") is None
    assert await accounts.session("") is None


async def test_wrong_password_and_unknown_login_are_the_same_refusal(
    accounts: OperatorAccounts,
) -> None:
    with capture_logs() as logs:
        assert await refused(accounts, "wang.li", "wrong password!") == "invalid"
        assert await refused(accounts, "nobody", PASSWORD) == "invalid"
        assert await refused(accounts, "NOT A LOGIN/", PASSWORD) == "invalid"
    assert [(e["event"], e["login"], e["reason"]) for e in logs] == [
        ("console.sign_in_refused", "wang.li", "invalid"),
        ("console.sign_in_refused", "nobody", "invalid"),
        ("console.sign_in_refused", "not a login/", "invalid")]
    assert all(e["remote"] == REMOTE for e in logs)
    assert PASSWORD not in repr(logs) and "wrong password!" not in repr(logs)


async def test_lockout_after_five_failures(accounts: OperatorAccounts, clock: FakeClock) -> None:
    with capture_logs() as logs:
        for _ in range(4):
            assert await refused(accounts, "wang.li", "wrong password!") == "invalid"
            clock.advance(10)
        assert await refused(accounts, "wang.li", "wrong password!") == "locked"
    assert [e for e in logs if e["event"] == "console.lockout"] == [
        {"event": "console.lockout", "login": "wang.li", "remote": REMOTE, "failures": 5,
         "log_level": "warning"}]
    locked_until = accounts.list()[0].locked_until
    assert locked_until == clock.now + 900
    # Even the right password, until the lockout ends.
    clock.advance(899)
    with pytest.raises(SignInRefused) as info:
        await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)
    assert info.value.reason == "locked" and info.value.until == locked_until
    clock.advance(1)
    assert (await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)).login == "wang.li"
    assert accounts.list()[0].locked_until is None
    # The success cleared the count: four more failures do not lock.
    for _ in range(4):
        assert await refused(accounts, "wang.li", "wrong password!") == "invalid"


async def test_failures_outside_the_window_do_not_add_up(
    accounts: OperatorAccounts, clock: FakeClock,
) -> None:
    for _ in range(4):
        assert await refused(accounts, "wang.li", "wrong password!") == "invalid"
    clock.advance(900)
    for _ in range(4):
        assert await refused(accounts, "wang.li", "wrong password!") == "invalid"
    assert await refused(accounts, "wang.li", "wrong password!") == "locked"


async def test_unknown_logins_lock_too(accounts: OperatorAccounts) -> None:
    # Otherwise the absence of a lockout would tell which logins exist.
    answers = [await refused(accounts, "nobody", PASSWORD) for _ in range(6)]
    assert answers == ["invalid"] * 4 + ["locked"] * 2


async def test_disable_ends_sessions_and_refuses_sign_in(accounts: OperatorAccounts) -> None:
    new = await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)
    accounts.disable("wang.li")
    assert await accounts.session(new.token) is None
    assert accounts.list()[0].disabled
    assert await refused(accounts, "wang.li", PASSWORD) == "disabled"
    # Only the right password learns that the account is disabled.
    assert await refused(accounts, "wang.li", "wrong password!") == "invalid"
    accounts.enable("wang.li")
    assert await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)


async def test_passwd_ends_sessions_and_lifts_a_lockout(accounts: OperatorAccounts) -> None:
    new = await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)
    for _ in range(5):
        await refused(accounts, "wang.li", "wrong password!")
    assert accounts.list()[0].locked_until is not None
    with pytest.raises(WeakPassword):
        accounts.set_password("wang.li", "short")
    accounts.set_password("wang.li", "a brand new secret")
    assert await accounts.session(new.token) is None
    assert accounts.list()[0].locked_until is None
    assert await refused(accounts, "wang.li", PASSWORD) == "invalid"
    assert await accounts.sign_in("wang.li", "a brand new secret", remote=REMOTE)


async def test_sign_out(accounts: OperatorAccounts) -> None:
    one = await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)
    two = await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)
    await accounts.sign_out(one.token)
    await accounts.sign_out("never issued")
    assert await accounts.session(one.token) is None
    assert await accounts.session(two.token) is not None


async def test_a_session_survives_reopening_the_file(
    accounts: OperatorAccounts, path: Path, clock: FakeClock,
) -> None:
    new = await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)
    accounts.close()
    with open_accounts(path, clock) as again:
        session = await again.session(new.token)
        assert session is not None
        assert (session.login, session.csrf_token) == ("wang.li", new.csrf_token)


async def test_idle_expiry_and_last_seen_written_at_most_once_a_minute(
    accounts: OperatorAccounts, path: Path, clock: FakeClock,
) -> None:
    new = await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)
    signed_in = clock.now

    def stored_last_seen() -> float:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return float(conn.execute("SELECT last_seen_at FROM sessions").fetchone()[0])

    clock.advance(30)
    assert (s := await accounts.session(new.token)) is not None and s.last_seen_at == signed_in
    assert stored_last_seen() == signed_in
    clock.advance(30)
    assert (s := await accounts.session(new.token)) is not None and s.last_seen_at == clock.now
    assert stored_last_seen() == clock.now
    clock.advance(8 * 3600)
    assert await accounts.session(new.token) is not None  # idle exactly 8 h: still in
    clock.advance(8 * 3600 + 1)
    assert await accounts.session(new.token) is None
    clock.advance(-(8 * 3600 + 1))
    assert await accounts.session(new.token) is None  # gone, not only hidden


async def test_max_age_expiry_despite_activity(
    accounts: OperatorAccounts, clock: FakeClock,
) -> None:
    new = await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)
    for _ in range(23):
        clock.advance(3600)
        session = await accounts.session(new.token)
        assert session is not None
    assert session is not None
    assert session.expires_at == session.created_at + 24 * 3600
    clock.advance(3601)
    assert await accounts.session(new.token) is None


def private_files(directory: Path, *, wal: bool = True) -> bytes:
    """The accounts file and its -wal/-shm, each checked to be 0600: their bytes."""
    files = [p for p in directory.iterdir() if p.name.startswith("operators.db")]
    assert {p.name for p in files} >= {"operators.db", *(["operators.db-wal"] if wal else [])}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    return b"".join(p.read_bytes() for p in files)


async def test_file_is_private_and_holds_no_secret_in_clear(
    tmp_path: Path, clock: FakeClock,
) -> None:
    path = accounts_path(tmp_path)
    old = os.umask(0)  # even a permissive umask gives 0600
    try:
        accounts = open_accounts(path, clock)
    finally:
        os.umask(old)
    with accounts:
        accounts.add("wang.li", "王丽", PASSWORD)
        new = await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)
        data = private_files(tmp_path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        (stored_hash,) = conn.execute("SELECT password_hash FROM operators").fetchone()
        (token_hash,) = conn.execute("SELECT token_sha256 FROM sessions").fetchone()
    data += private_files(tmp_path, wal=False)  # after the checkpoint on close, too
    assert stored_hash.startswith("$argon2id$")
    assert token_hash == hashlib.sha256(new.token.encode()).hexdigest()
    assert PASSWORD.encode() not in data and new.token.encode() not in data


def test_an_existing_file_is_made_private(path: Path, clock: FakeClock) -> None:
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    open_accounts(path, clock).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_sign_in_rehashes_with_new_parameters(path: Path, clock: FakeClock) -> None:
    with open_accounts(path, clock) as accounts:
        accounts.add("wang.li", "王丽", PASSWORD)
    stronger = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    with OperatorAccounts(path, clock=clock, hasher=stronger) as accounts:
        await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            (stored,) = conn.execute("SELECT password_hash FROM operators").fetchone()
        assert not stronger.check_needs_rehash(stored)
        assert await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)


def test_read_password_sources(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("  from the file  \nsecond line\n", encoding="utf-8")
    assert read_password(f) == "from the file"
    assert read_password(None, stdin=io.StringIO("piped secret\nmore\n")) == "piped secret"
    tty = TtyInput()
    answers = iter(["typed secret", "typed secret"])
    assert read_password(None, stdin=tty, prompt=lambda _: next(answers)) == "typed secret"
    answers = iter(["typed secret", "typo secret"])
    with pytest.raises(PasswordMismatch):
        read_password(None, stdin=tty, prompt=lambda _: next(answers))


class TtyInput(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- the CLI ------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(f"""
[gateway]
state_dir = "{tmp_path / "state"}"
timezone = "Asia/Shanghai"

[sms]
from_number = "+15005550006"
""", encoding="utf-8")
    return p


def operator(config: Path, *args: str) -> int:
    action, *rest = args
    return cli.main(["operator", action, "--config", str(config), *rest])


async def test_cli_add_list_disable_enable_passwd(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n", encoding="utf-8")
    assert operator(config, "add", "wang.li", "--name", "王丽", "--password-file", str(pw)) == 0
    assert "wang.li" in capsys.readouterr().out
    path = accounts_path(tmp_path / "state")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    assert operator(config, "add", "wang.li", "--name", "X", "--password-file", str(pw)) == 1
    assert "already exists" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert operator(config, "add", "chen", "--name", "Chen") == 1
    assert "shorter than 10 characters" in capsys.readouterr().err

    assert operator(config, "disable", "wang.li") == 0
    assert capsys.readouterr().out == "operator disable: wang.li: done\n"
    assert operator(config, "list") == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["login"] == "wang.li" and shown["disabled"] is True
    assert shown["created_at"].endswith("+08:00") and shown["last_sign_in_at"] is None
    assert operator(config, "enable", "wang.li") == 0
    assert operator(config, "disable", "nobody") == 1
    assert "no operator 'nobody'" in capsys.readouterr().err

    with OperatorAccounts(path, hasher=fast_hasher()) as accounts:
        new = await accounts.sign_in("wang.li", PASSWORD, remote=REMOTE)
        # passwd from stdin while the "gateway" holds the file open.
        monkeypatch.setattr("sys.stdin", io.StringIO("a brand new secret\n"))
        assert operator(config, "passwd", "wang.li") == 0
        assert await accounts.session(new.token) is None
        assert await accounts.sign_in("wang.li", "a brand new secret", remote=REMOTE)
    assert operator(config, "passwd", "nobody", "--password-file", str(pw)) == 1


def test_cli_passwd_prompts_twice(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.stdin", TtyInput())
    answers = iter([PASSWORD, PASSWORD, "one new secret", "another secret"])
    monkeypatch.setattr("getpass.getpass", lambda _prompt: next(answers))
    assert operator(config, "add", "wang.li", "--name", "王丽") == 0
    assert operator(config, "passwd", "wang.li") == 1
    assert "did not match" in capsys.readouterr().err
