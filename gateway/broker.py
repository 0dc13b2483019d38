"""The broker's roles: the Mosquitto ACL and password file made from the registry.

Mosquitto 2.0 (Debian 12) with ``password_file`` and ``acl_file``. Each login gets its
own ``user`` block; there are no ``pattern`` lines, because a pattern applies to every
user and so cannot keep a staff phone off a button's topic (issue 10, fault 2).

Roles and logins:

- the gateway (``gateway``), the Zigbee2MQTT bridge (``zigbee2mqtt``), the read-only
  console (``console``) and drills (``drill``): static, in the template
  ``config/mosquitto.acl``;
- each of our own buttons (login = device id; its address must be
  ``alarm/buttons/<device id>``) and each staff phone (login = responder id):
  generated here from the registry by :func:`render_acl`.

Passwords are stored in the format ``mosquitto_passwd`` 2.0 writes (PBKDF2-SHA512,
101 iterations, 12-byte salt: ``$7$101$<salt b64>$<hash b64>``). They are hashed here
rather than through ``mosquitto_passwd -b``, which would put every password on a
command line that any local user can read in ``ps``. Nothing here prints a password.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gateway.config import MqttSection
from gateway.files import write_atomically
from gateway.model import Registry

OWN_BASE: Final = "alarm/buttons"
RESPONDERS_BASE: Final = "responders"
ALARM_STATE: Final = "alarm/alarms/+/state"
# The logins of the template's static roles, in the order the template declares them.
STATIC_LOGINS: Final = ("gateway", "zigbee2mqtt", "console", "drill")
GATEWAY_LOGIN: Final = "gateway"
# A login is a word Mosquitto's files and MQTT topics can carry as is: no blank (the ACL
# splits on it), no ':' (the password file's separator), no '/', '+' or '#' (a login
# ends up inside topic names).
_LOGIN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PBKDF2_ITERATIONS: Final = 101  # what mosquitto_passwd 2.0 writes
_SALT_BYTES: Final = 12
_HASH_BYTES: Final = 64


class BrokerRoleError(Exception):
    """The roles cannot be written: ``subject`` (a login, a file or a line) and why."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"{subject}: {reason}")
        self.subject = subject
        self.reason = reason


class Role(enum.Enum):
    GATEWAY = "gateway"
    BRIDGE = "zigbee2mqtt"
    CONSOLE = "console"
    DRILL = "drill"
    BUTTON = "button"
    RESPONDER = "responder"


@dataclass(frozen=True, slots=True)
class Login:
    name: str
    role: Role


_STATIC_ROLES: Final = {"gateway": Role.GATEWAY, "zigbee2mqtt": Role.BRIDGE,
                        "console": Role.CONSOLE, "drill": Role.DRILL}


def logins(registry: Registry) -> list[Login]:
    """Every login the broker needs: static roles, then own buttons, then staff phones.

    Raises :class:`BrokerRoleError` for an id that cannot be a login, an own button
    whose topic is not its own id, or two logins of the same name.
    """
    found = [Login(name, _STATIC_ROLES[name]) for name in STATIC_LOGINS]
    prefix = OWN_BASE + "/"
    for device in sorted(registry.devices.values(), key=lambda d: d.device_id):
        if not device.address.startswith(prefix):
            continue  # Zigbee buttons speak through the bridge; serial ones not via MQTT
        if device.address != prefix + device.device_id:
            raise BrokerRoleError(
                f"device {device.device_id}",
                f"address {device.address!r} must be {prefix}{device.device_id}: the "
                "button logs in as its device id and may publish only under it")
        found.append(Login(device.device_id, Role.BUTTON))
    found += [Login(rid, Role.RESPONDER) for rid in sorted(registry.responders)]
    seen: dict[str, Login] = {}
    for login in found:
        if not _LOGIN.fullmatch(login.name):
            raise BrokerRoleError(f"{login.role.value} {login.name!r}",
                                  "a login must be 1-64 letters, digits, '_', '.' or '-', "
                                  "starting with a letter or digit")
        if login.name in seen:
            raise BrokerRoleError(f"login {login.name}",
                                  f"used by a {seen[login.name].role.value} and a "
                                  f"{login.role.value}")
        seen[login.name] = login
    return found


def _block(login: Login) -> list[str]:
    if login.role is Role.BUTTON:
        base = f"{OWN_BASE}/{login.name}"
        return [f"user {login.name}", f"topic write {base}/event",
                f"topic write {base}/status", f"topic read {base}/confirm"]
    base = f"{RESPONDERS_BASE}/{login.name}"
    return [f"user {login.name}", f"topic write {base}/location",
            f"topic write {base}/duty", f"topic write {base}/ack",
            f"topic read {ALARM_STATE}"]


def _template_users(template_text: str) -> list[str]:
    users = []
    for number, raw in enumerate(template_text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "pattern":
            raise BrokerRoleError(f"template line {number}",
                                  "'pattern' applies to every user and cannot separate roles")
        if word == "user":
            users.append(rest.strip())
        elif word != "topic":
            raise BrokerRoleError(f"template line {number}", f"unknown ACL keyword {word!r}")
        elif not users:
            raise BrokerRoleError(f"template line {number}",
                                  "a topic before any 'user' line would apply to anonymous "
                                  "clients")
    return users


def render_acl(registry: Registry, template_text: str) -> str:
    """The ACL: the template's static roles, then one block per own button and phone.

    The template must declare exactly the static logins (:data:`STATIC_LOGINS`) and no
    ``pattern`` lines. Pure; raises :class:`BrokerRoleError`.
    """
    declared = _template_users(template_text)
    if sorted(declared) != sorted(STATIC_LOGINS):
        raise BrokerRoleError("template", f"declares users {declared}; expected exactly "
                                          f"{list(STATIC_LOGINS)}")
    generated = [login for login in logins(registry)
                 if login.role in (Role.BUTTON, Role.RESPONDER)]
    buttons = sum(1 for login in generated if login.role is Role.BUTTON)
    lines = [template_text.rstrip("\n"), "",
             f"# ---- generated by `gateway broker-acl` from the registry: {buttons} own "
             f"buttons, {len(generated) - buttons} staff phones ----"]
    for login in generated:
        lines += ["", *_block(login)]
    return "\n".join(lines) + "\n"


# -- passwords --------------------------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``$7$101$<salt>$<hash>``: PBKDF2-SHA512 as ``mosquitto_passwd`` 2.0 writes it."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS,
                                 _HASH_BYTES)
    return (f"$7${_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(digest).decode()}")


def password_matches(password: str, hashed: str) -> bool:
    """Whether ``password`` is the one ``hashed`` was made from ($7$ or the older $6$)."""
    parts = hashed.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]),
                                      len(want))
        elif len(parts) == 4 and parts[1] == "6":
            salt, want = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            got = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except ValueError:  # binascii.Error is one
        return False
    return hmac.compare_digest(got, want)


def parse_passwd(text: str, source: str = "password file") -> dict[str, str]:
    """``login -> hash`` of a Mosquitto password file, in file order."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        login, sep, hashed = line.partition(":")
        if not sep or not login or not hashed:
            raise BrokerRoleError(f"{source} line {number}", "not 'login:hash'")
        if login in entries:
            raise BrokerRoleError(f"{source} line {number}", f"login {login} appears twice")
        entries[login] = hashed
    return entries


def new_password() -> str:
    """24 URL-safe characters (144 bits): no ':' or ',' to quote in either file."""
    return secrets.token_urlsafe(18)


@dataclass(frozen=True, slots=True)
class UsersPlan:
    """What :func:`plan_users` decided: the new file and the passwords made for it."""

    entries: dict[str, str]  # login -> hash, the whole new password file
    created: dict[str, str]  # login -> clear password, new (or rotated) logins only
    kept: tuple[str, ...]
    removed: tuple[str, ...]


def plan_users(existing: Mapping[str, str], wanted: Iterable[str], *, only_missing: bool,
               rotate: Iterable[str] = ()) -> UsersPlan:
    """Keep the password of every wanted login that has one, make one for the others.

    ``only_missing`` only adds: logins not wanted stay (an operator's own). Otherwise
    they are removed, so a phone or button taken out of the registry loses its access.
    ``rotate`` names wanted logins that get a new password even though they have one.
    """
    wanted = list(wanted)
    rotate = set(rotate)
    unknown = rotate.difference(wanted)
    if unknown:
        raise BrokerRoleError(f"--rotate {', '.join(sorted(unknown))}",
                              "not a login of the registry's roles")
    entries: dict[str, str] = {}
    created: dict[str, str] = {}
    kept: list[str] = []
    for login in wanted:
        if login in existing and login not in rotate:
            entries[login] = existing[login]
            kept.append(login)
        else:
            created[login] = new_password()
            entries[login] = hash_password(created[login])
    others = [login for login in existing if login not in entries]
    if only_missing:
        entries |= {login: existing[login] for login in others}
        others = []
    return UsersPlan(entries, created, tuple(kept), tuple(others))


def render_passwd(entries: Mapping[str, str]) -> str:
    return "".join(f"{login}:{hashed}\n" for login, hashed in entries.items())


# -- files ------------------------------------------------------------------------------


def append_credentials(path: Path, created: Mapping[str, str]) -> None:
    """Append ``login,password`` rows to a root-only (0600) CSV, header if new.

    Appended, not replaced: a password from an earlier run that nobody has put on its
    device yet exists only in this file (the password file keeps a hash).
    """
    fresh = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        os.fchmod(out.fileno(), 0o600)  # an existing file may have been made wider
        if fresh:
            out.write("login,password\n")
        out.writelines(f"{login},{password}\n" for login, password in created.items())
        out.flush()
        os.fsync(out.fileno())


def config_mismatches(mqtt: MqttSection) -> list[tuple[str, str]]:
    """``(key, reason)`` for each ``[mqtt]`` setting the roles' topics do not cover.

    The ACL grants fixed topics; a gateway configured for others would be denied
    (and, over MQTT 3.1.1, disconnected) on its first publish there.
    """
    wrong: list[tuple[str, str]] = []
    expected = {"own_base": OWN_BASE, "z2m_base": "zigbee2mqtt",
                "alarm_topic": "alarm/alarms/{alarm_id}/state"}
    for key, value in expected.items():
        if getattr(mqtt, key) != value:
            wrong.append((f"mqtt.{key}", f"must be {value!r} for the broker roles "
                                         f"(config/mosquitto.acl), not {getattr(mqtt, key)!r}"))
    if not mqtt.status_topic.startswith("alarm/gateway/"):
        wrong.append(("mqtt.status_topic", "must be under 'alarm/gateway/' for the broker "
                                           f"roles, not {mqtt.status_topic!r}"))
    if mqtt.username is not None and mqtt.username != GATEWAY_LOGIN:
        wrong.append(("mqtt.username", f"must be {GATEWAY_LOGIN!r}, the gateway's login in "
                                       f"the broker roles, not {mqtt.username!r}"))
    return wrong


@dataclass(frozen=True, slots=True)
class UsersResult:
    plan: UsersPlan
    group_note: str
    gateway_written: bool  # the gateway's password went to its file (new or rotated)
    csv_rows: int  # new device / phone passwords appended to the credentials CSV


def provision_users(registry: Registry, passwd: Path, credentials_out: Path,
                    gateway_password_out: Path, *, only_missing: bool,
                    rotate: Iterable[str] = (), group: str | None = "mosquitto") -> UsersResult:
    """Make ``passwd`` hold a password for every login of the roles (see :func:`plan_users`).

    New passwords: the gateway's to ``gateway_password_out`` (0600, the ``mqtt_password``
    credential), the others appended to ``credentials_out`` (0600 CSV). An existing
    gateway login needs its password in ``gateway_password_out`` already (only a hash is
    kept: a lost one can be rotated, not recovered). Raises :class:`BrokerRoleError`
    or :class:`OSError`; nothing is written on a BrokerRoleError.
    """
    existing = parse_passwd(passwd.read_text(encoding="utf-8"), str(passwd)) \
        if passwd.exists() else {}
    plan = plan_users(existing, [login.name for login in logins(registry)],
                      only_missing=only_missing, rotate=rotate)
    gateway_new = GATEWAY_LOGIN in plan.created
    if not gateway_new and not (gateway_password_out.is_file() and password_matches(
            gateway_password_out.read_text(encoding="utf-8").strip(),
            plan.entries[GATEWAY_LOGIN])):
        raise BrokerRoleError(str(gateway_password_out),
                              f"does not hold the password of the existing login "
                              f"{GATEWAY_LOGIN!r} in {passwd}; rotate {GATEWAY_LOGIN!r} "
                              "to make a new one")
    # Clear passwords are saved before the hashes: a crash in between leaves logins a
    # rerun makes again, never a hash whose password nobody has.
    if gateway_new:
        write_atomically(gateway_password_out, plan.created[GATEWAY_LOGIN], 0o600)
    rows = {k: v for k, v in plan.created.items() if k != GATEWAY_LOGIN}
    if rows:
        append_credentials(credentials_out, rows)
    note = write_atomically(passwd, render_passwd(plan.entries), 0o640, group)
    return UsersResult(plan, note, gateway_new, len(rows))
