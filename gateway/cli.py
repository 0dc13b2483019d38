"""The ``gateway`` command: run, check-config, demo, simulate, ack, resolve, status,
broker-acl, broker-users, operator.

Only this module exits the process; everything below raises typed errors.
Exit codes: 0 ok, 1 operation failed, 2 configuration or registry invalid,
3 cannot start (secrets missing, journal unwritable).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import http.client
import json
import os
import socket
import sys
import urllib.parse
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

import structlog

from gateway import __version__
from gateway.config import (
    Config,
    ConfigError,
    check_control_token,
    check_twilio_secrets,
    load_config,
    load_secrets,
    read_secret,
)
from gateway.logs import configure_logging

DEFAULT_CONFIG = Path(os.environ.get("GATEWAY_CONFIG", "/etc/alarm-gateway/gateway.toml"))
# The broker roles' template in the source tree (the installer passes its own copy).
DEFAULT_ACL_TEMPLATE = Path(__file__).resolve().parent.parent / "config" / "mosquitto.acl"

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_START = 3


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def _cannot_start(exc: BaseException, code: int, *, bug: bool = False) -> int:
    """The one line a failed start leaves (in journald: priority crit), then exit ``code``.

    Nothing else is printed: under systemd stderr lands in the same journal, and ops
    look for exactly one ``gateway.cannot_start`` per failed start."""
    reason = _reason(exc)
    structlog.get_logger("gateway").critical(
        "gateway.cannot_start", reason=reason, error_type=type(exc).__name__, exit_code=code,
        # A typed error says all; anything else is a bug, and its traceback is needed.
        exc_info=exc if bug else None)
    return code


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_reason(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.daemon import Gateway, StartupError, install_signal_handlers
    from gateway.journal import JournalError

    try:
        cfg = _config(args)
    except ConfigError as exc:
        configure_logging()  # the config could not say how: JSON, or journald's prefix
        return _cannot_start(exc, EXIT_CONFIG)
    configure_logging(cfg.model.logging.level, cfg.model.logging.format)
    gw: Gateway | None = None

    async def main(gw: Gateway) -> None:
        install_signal_handlers(gw)
        await gw.run()

    try:
        secrets = load_secrets(cfg)
        check_control_token(cfg, secrets)  # a TCP control port without a token: exit 2
        gw = Gateway(cfg, secrets)
        asyncio.run(main(gw))
    except ConfigError as exc:
        return _cannot_start(exc, EXIT_CONFIG)
    except Exception as exc:  # noqa: BLE001 - a failed start, whatever raised, is one line
        if gw is not None and gw.ready.is_set():
            # It ran, then died: not a start failure (systemd restarts it).
            structlog.get_logger("gateway").critical("gateway.crashed", exc_info=exc)
            return EXIT_FAILED
        # Every other failed start (registry, secrets, journal, a port in use, a bug).
        typed = isinstance(exc, (StartupError, JournalError, OSError))
        return _cannot_start(exc, EXIT_START, bug=not typed)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.escalation import silent_waves
    from gateway.geo import GeoError
    from gateway.registry import RegistryError, registry_summary
    from gateway.world import load_world

    cfg = _config(args)
    try:
        world = load_world(cfg)
    except (RegistryError, GeoError) as exc:
        print(f"registry {cfg.registry_dir}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    registry = world.registry
    district = _check_district_map(cfg)
    secrets = load_secrets(cfg)
    check_control_token(cfg, secrets)
    # A SID that passes here but not at Twilio would fail every SMS at the first press.
    check_twilio_secrets(cfg, secrets)
    console, console_warning = _check_console(cfg)
    summary: dict[str, Any] = {
        "config": str(cfg.source),
        "registry": str(cfg.registry_dir),
        "counts": registry_summary(registry),
        "mqtt": (f"{cfg.model.mqtt.host}:{cfg.model.mqtt.port}" if cfg.model.mqtt.enabled
                 else "disabled"),
        "serial": [f"{s.name}={s.port} ({s.protocol})" for s in cfg.model.serial],
        "journal": str(cfg.model.gateway.journal_path),
        "control": {"socket": str(cfg.model.control.socket_path(cfg.model.gateway.state_dir)),
                    "tcp": (None if cfg.model.control.port is None
                            else f"{cfg.model.control.host}:{cfg.model.control.port}")},
        "district_map": district,
        "console": console,
        "secrets": repr(secrets),
    }
    missing = [] if console_warning is None else [console_warning]
    waves = cfg.model.escalation.waves
    voice = cfg.model.voice.enabled
    for gap in silent_waves(waves, registry,
                            lambda where: world.geo.lookup(where, k=1).facilities, voice=voice):
        w = gap.wave
        roles = [r for r, on in (("family", w.family), (f"staff={w.staff}", w.staff),
                                 ("supervisor", w.supervisor), ("clinic", w.clinic),
                                 ("hospital", w.hospital)) if on]
        shown = "; ".join(gap.reasons[:3]) + ("; ..." if len(gap.reasons) > 3 else "")
        missing.append(
            f"{cfg.source}: escalation.waves[{gap.number - 1}]: wave {gap.number} "
            f"(after {w.after_s:g} s: {', '.join(roles) or 'nobody'}) reaches nobody "
            + ("at all" if voice else "who can read an SMS")
            + f" for {len(gap.elders)} of {gap.total_elders} elders ({shown}); "
            + ("add a role" if voice else
               "they are not texted: add a role, turn [voice] on to call landlines, or "
               "set voice_only = false in the registry for a number that does take SMS"))
    for port in cfg.model.serial:
        if "://" not in port.port and not Path(port.port).exists():
            missing.append(f"{cfg.source}: serial[{port.name}].port: {port.port} does not exist "
                           "(the link will keep retrying until it appears)")
    tls = cfg.model.mqtt.tls
    if cfg.model.mqtt.enabled and tls is not None:
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(tls, key)
            if path is not None and not Path(path).is_file():
                missing.append(f"{cfg.source}: mqtt.tls.{key}: {path} is not a readable file "
                               "(the MQTT link will keep retrying until it is)")
    print(json.dumps(summary, ensure_ascii=False, indent=2))
    for m in missing:
        print(f"warning: {m}", file=sys.stderr)
    return 0


def _check_district_map(cfg: Config) -> dict[str, Any] | None:
    """``[registry] district_map`` read and checked as the gateway will at start (a
    broken map stops the start); its features counted by kind. None when unset."""
    from gateway.mapdata import MapDataError, load_district_map

    path = cfg.district_map_path
    if path is None:
        return None
    try:
        collection = load_district_map(path, cfg.model.registry.bbox)
    except MapDataError as exc:
        raise ConfigError(cfg.source, "registry.district_map", str(exc)) from None
    kinds: dict[str, int] = {}
    for feature in collection["features"]:
        kind = feature["properties"]["kind"]
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"file": str(path), "features": kinds}


def _check_console(cfg: Config) -> tuple[dict[str, Any] | str, str | None]:
    """The console's summary and, when it is on but nobody can sign in, the warning.

    The accounts file is only read: check-config may run before the gateway ever
    started, or as another user, and must not create the gateway's files."""
    import sqlite3

    from gateway.console.accounts import OperatorAccounts, accounts_path

    m = cfg.model
    if not m.console.enabled:
        return "disabled", None
    if m.control.port is None:
        return "off (no control.port)", None
    path = accounts_path(m.gateway.state_dir)
    operators = []
    if path.is_file():
        try:
            with OperatorAccounts(path) as accounts:
                operators = accounts.list()
        except (OSError, sqlite3.Error) as exc:
            return ({"accounts": str(path), "operators": None},
                    f"{path}: cannot read the operator accounts ({exc}); run check-config "
                    "as the gateway's user")
    enabled = [o for o in operators if not o.disabled]
    summary = {"accounts": str(path), "operators": len(operators),
               "disabled": len(operators) - len(enabled)}
    if enabled:
        return summary, None
    return summary, (f"{path}: no operator can sign in: gateway operator add LOGIN --name "
                     f"NAME --config {cfg.source}"
                     + (f" (all {len(operators)} disabled: or gateway operator enable LOGIN)"
                        if operators else ""))


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    if args.every <= 0:
        print("demo: --every must be more than 0 seconds", file=sys.stderr)
        return EXIT_FAILED
    return asyncio.run(run_demo(presses=args.presses, out=Path(args.out) if args.out else None,
                                sound=args.sound, verbose=args.verbose, console=args.console,
                                every=args.every, port=args.port))


def cmd_simulate(args: argparse.Namespace) -> int:
    from gateway.simulate import (
        ReadBackError,
        SimulationError,
        drill_password,
        line_test,
        run_drill,
    )

    cfg = _config(args)

    def read_back(path: str) -> Any:
        try:
            return _call(cfg, "GET", path)
        except ControlCallError as exc:
            raise ReadBackError(exc.status, str(exc)) from exc

    if args.port is not None and not args.live:
        print("simulate: --port writes the device's own frame to the serial line: the "
              "gateway raises a REAL alarm (a Contact ID frame cannot say 'drill') and texts "
              "the real recipients; add --live to do that, or leave --port out for a drill",
              file=sys.stderr)
        return EXIT_FAILED
    if args.port is None and args.kind not in ("sos", "cancel"):
        print("simulate: a drill is an sos or its cancel", file=sys.stderr)
        return EXIT_FAILED
    try:
        if args.port is not None:
            print(asyncio.run(line_test(cfg, args.device, args.port, read_back,
                                        kind=args.kind, timeout_s=args.timeout)))
            return 0
        password = drill_password(Path(args.password_file) if args.password_file else None)
        result = asyncio.run(run_drill(
            cfg, args.device, read_back, by=args.by, notify=args.notify or (),
            kind=args.kind, password=password, drill_id=args.drill_id,
            timeout_s=args.timeout))
    except SimulationError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(result.summary() if args.kind == "sos" else
          f"drill {result.drill_id}: cancel published for {args.device}")
    return 0


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the gateway's unix socket (the Host header still says localhost)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _control_tcp(cfg: Config) -> tuple[str, int] | None:
    """(host, port) of the TCP listener, from control.json (ephemeral ports) or the config."""
    c = cfg.model.control
    if c.port is None:
        return None
    state = cfg.model.gateway.state_dir / "control.json"
    try:
        url = json.loads(state.read_text(encoding="utf-8")).get("url")
    except (OSError, ValueError, AttributeError):
        url = None
    host, port = c.host, c.port
    if isinstance(url, str) and url.startswith("http://"):
        parts = urllib.parse.urlsplit(url)
        if parts.hostname and parts.port:
            host, port = parts.hostname, parts.port
    # A listener on every address is reached (and names itself) on loopback here.
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port  # noqa: S104


class ControlCallError(RuntimeError):
    """A control-API request failed: ``status`` is the HTTP status, None when the
    gateway could not be reached at all."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status


def _call(cfg: Config, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One request to the running gateway's control API; its JSON answer, or
    :class:`ControlCallError`.

    Over the unix socket (``control.socket`` in the state dir) when it is there:
    its file permissions make the caller an operator. Otherwise over TCP, when
    ``control.port`` is set, with the bearer token from the same credential or
    env variable the gateway reads (``CONTROL_TOKEN``)."""
    sock_path = cfg.model.control.socket_path(cfg.model.gateway.state_dir)
    tcp = _control_tcp(cfg)
    headers = {"Host": "localhost", "Accept": "application/json"}
    conn: http.client.HTTPConnection
    if sock_path.exists() or tcp is None:
        conn, where = _UnixHTTPConnection(sock_path, timeout=10), str(sock_path)
    else:
        host, port = tcp
        token = read_secret(cfg.model.control.token_secret)
        if token is None:
            raise ControlCallError(None,
                f"no control socket at {sock_path} and no token for {host}:{port} (set "
                f"{cfg.model.control.token_secret.upper()} or run this on the gateway's host)")
        headers["Authorization"] = f"Bearer {token}"
        # Host as the listener knows itself (a loopback name or the bound address).
        headers["Host"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        conn, where = http.client.HTTPConnection(host, port, timeout=10), f"{host}:{port}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except PermissionError:
        raise ControlCallError(None, f"not allowed to use {where}: run as the gateway's "
                                     "user or a member of its group (or with sudo)") from None
    except (OSError, http.client.HTTPException) as exc:
        raise ControlCallError(None, f"gateway not reachable at {where}: {exc}") from None
    finally:
        conn.close()
    if resp.status >= 400:
        raise ControlCallError(resp.status, f"{resp.status}: {raw.decode('utf-8', 'replace')}")
    try:
        return json.loads(raw)
    except ValueError:
        raise ControlCallError(resp.status, f"{resp.status}: not JSON: {raw[:200]!r}") from None


def _post(args: argparse.Namespace, command: str, path: str, body: dict[str, Any]) -> int:
    """POST to the running gateway's control API; print its JSON answer or the error."""
    cfg = _config(args)
    try:
        print(json.dumps(_call(cfg, "POST", path, body), ensure_ascii=False))
    except RuntimeError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_ack(args: argparse.Namespace) -> int:
    return _post(args, "ack", f"/alarms/{args.alarm_id}/ack", {"by": args.by})


def cmd_resolve(args: argparse.Namespace) -> int:
    return _post(args, "resolve", f"/alarms/{args.alarm_id}/resolve",
                 {"by": args.by, "note": args.note})


def cmd_duty(args: argparse.Namespace) -> int:
    return _post(args, "duty", f"/responders/{args.responder_id}/duty",
                 {"on_duty": args.state == "on", "by": args.by})


_TIME_KEYS = ("at", "last_seen", "locked_until")  # besides every key ending in "_at"


def local_times(data: Any, zone: tzinfo) -> Any:
    """``data`` with its epoch times as local ISO times with their offset
    (``2026-12-07T11:12:00+08:00``); a device never heard from is ``"never seen"``."""
    if isinstance(data, list):
        return [local_times(v, zone) for v in data]
    if not isinstance(data, dict):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _TIME_KEYS or key.endswith("_at"):
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = datetime.fromtimestamp(value, zone).isoformat(timespec="seconds")
            elif value is None and key == "last_seen":
                value = "never seen"
        out[key] = local_times(value, zone)
    return out


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    try:
        health = _call(cfg, "GET", "/health")
        alarms = _call(cfg, "GET", "/alarms")
        devices = _call(cfg, "GET", "/devices")
    except RuntimeError as exc:
        print(f"status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    shown = {"health": health, "open_alarms": alarms["alarms"], "devices": devices["devices"]}
    print(json.dumps(local_times(shown, cfg.model.gateway.zone), ensure_ascii=False, indent=2))
    return 0


def cmd_notices(args: argparse.Namespace) -> int:
    cfg = _config(args)
    try:
        notices = _call(cfg, "GET", "/notices")["notices"]
    except RuntimeError as exc:
        print(f"notices: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(local_times(notices, cfg.model.gateway.zone), ensure_ascii=False,
                     indent=2))
    return 0


def cmd_notice_ack(args: argparse.Namespace) -> int:
    return _post(args, "notice-ack", f"/notices/{args.notice_id}/ack", {"by": args.by})


def _broker_registry(args: argparse.Namespace) -> tuple[Config, Any]:
    """The config (its [mqtt] topics checked against the roles) and its registry."""
    from gateway.broker import config_mismatches
    from gateway.registry import load_registry

    cfg = _config(args)
    for key, reason in config_mismatches(cfg.model.mqtt):
        raise ConfigError(cfg.source, key, reason)
    registry = load_registry(cfg.registry_dir,
                             default_region=cfg.model.registry.default_region)
    return cfg, registry


def cmd_broker_acl(args: argparse.Namespace) -> int:
    from gateway.broker import BrokerRoleError, render_acl
    from gateway.files import write_atomically
    from gateway.registry import RegistryError

    try:
        _, registry = _broker_registry(args)
    except RegistryError as exc:
        print(f"broker-acl: registry: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    template, out = Path(args.template), Path(args.out)
    try:
        text = render_acl(registry, template.read_text(encoding="utf-8"))
        note = write_atomically(out, text, 0o640, args.group)
    except OSError as exc:
        print(f"broker-acl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokerRoleError as exc:
        print(f"broker-acl: {template}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    users = sum(1 for line in text.splitlines() if line.startswith("user "))
    print(f"broker-acl: wrote {out} (0640, {note}): {users} logins; "
          "reload mosquitto to apply")
    return 0


def cmd_broker_users(args: argparse.Namespace) -> int:
    from gateway.broker import BrokerRoleError, provision_users
    from gateway.registry import RegistryError

    try:
        _, registry = _broker_registry(args)
    except RegistryError as exc:
        print(f"broker-users: registry: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    passwd, csv_out = Path(args.passwd), Path(args.credentials_out)
    gw_out = Path(args.gateway_password_out)
    try:
        done = provision_users(registry, passwd, csv_out, gw_out,
                               only_missing=args.only_missing, rotate=args.rotate,
                               group=args.group)
    except OSError as exc:
        print(f"broker-users: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokerRoleError as exc:
        print(f"broker-users: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    plan = done.plan
    print(f"broker-users: wrote {passwd} (0640, {done.group_note}): {len(plan.entries)} "
          f"logins, {len(plan.created)} new, {len(plan.kept)} kept, {len(plan.removed)} "
          "removed" + (f"; {done.csv_rows} new passwords appended to {csv_out}"
                       if done.csv_rows else "")
          + (f"; gateway password in {gw_out}" if done.gateway_written else "")
          + "; reload mosquitto to apply")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """The daily report of a local day, read from the journal file (read-only)."""
    import datetime as dt
    import sqlite3
    import time

    from gateway.report import (
        ReportError,
        build_report,
        format_report,
        local_day,
        open_journal_readonly,
    )

    cfg = _config(args)
    zone = cfg.model.gateway.zone
    try:
        day = (dt.date.fromisoformat(args.day) if args.day
               else local_day(time.time(), zone) - dt.timedelta(days=1))
    except ValueError:
        print(f"report: --day {args.day!r}: not a date (YYYY-MM-DD)", file=sys.stderr)
        return EXIT_FAILED
    path = Path(args.journal) if args.journal else cfg.model.gateway.journal_path
    try:
        conn = open_journal_readonly(path)
        try:
            data = build_report(conn, day, zone, generated_at=time.time())
        finally:
            conn.close()
    except (ReportError, sqlite3.Error) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(data, ensure_ascii=False, indent=2) if args.json else format_report(data))
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    """The web console's operator accounts (``state_dir/operators.db``); works while the
    gateway runs."""
    import dataclasses
    import sqlite3

    from gateway.console.accounts import (
        AccountError,
        OperatorAccounts,
        accounts_path,
        read_password,
    )

    cfg = _config(args)
    path = accounts_path(cfg.model.gateway.state_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with OperatorAccounts(path) as accounts:
            if args.action == "list":
                shown = [dataclasses.asdict(o) for o in accounts.list()]
                print(json.dumps(local_times(shown, cfg.model.gateway.zone),
                                 ensure_ascii=False, indent=2))
                return 0
            if args.action in ("add", "passwd"):
                password = read_password(Path(args.password_file) if args.password_file
                                         else None)
                if args.action == "add":
                    accounts.add(args.login, args.name, password)
                else:
                    accounts.set_password(args.login, password)  # also ends its sessions
            else:
                getattr(accounts, args.action)(args.login)  # disable / enable
    except (AccountError, OSError, sqlite3.Error) as exc:
        print(f"operator {args.action}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"operator {args.action}: {args.login}: done")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help=f"TOML config file (default {DEFAULT_CONFIG}, or $GATEWAY_CONFIG)")

    sp = sub.add_parser("run", help="run the gateway daemon")
    with_config(sp)
    sp.set_defaults(func=cmd_run)
    sp = sub.add_parser("check-config", help="validate config and registry, print a summary")
    with_config(sp)
    sp.set_defaults(func=cmd_check_config)
    sp = sub.add_parser("demo", help="run the whole pipeline on embedded defaults")
    sp.add_argument("--presses", type=int, default=3, help="button presses to simulate")
    sp.add_argument("--out", help="keep the journal, WAVs and logs here (default: temp dir)")
    sp.add_argument("--sound", action="store_true", help="play the alert on the sound card")
    sp.add_argument("--verbose", action="store_true", help="print the JSON log lines too")
    sp.add_argument("--console", action="store_true",
                    help="then keep running for the operator console (until Ctrl-C or "
                         "SIGTERM) with one more press every --every seconds, left for "
                         "the operator to acknowledge in the browser")
    sp.add_argument("--every", type=float, default=30.0,
                    help="with --console: seconds between presses (default 30)")
    sp.add_argument("--port", type=int, default=0,
                    help="the console's port on 127.0.0.1 (default: any free port)")
    sp.set_defaults(func=cmd_demo)
    sp = sub.add_parser("simulate", help="inject device messages into a running gateway")
    ssub = sp.add_subparsers(dest="what", required=True)
    press = ssub.add_parser(
        "press", help="a drill: a press marked as a drill, read back from the gateway "
                      "(exit 1 with the reason unless it was journaled)")
    with_config(press)
    press.add_argument("--device", required=True, help="device id from the registry")
    press.add_argument("--by", default=getpass.getuser(),
                       help="who runs the drill (journaled; default: your login)")
    press.add_argument("--notify", action="append", metavar="PHONE_OR_RESPONDER_ID",
                       help="who the drill may text (repeat; E.164 numbers or responder ids);"
                            " none: a dry run that texts nobody")
    press.add_argument("--drill-id", help="the drill's id (default: time and random)")
    press.add_argument("--password-file",
                       help="the drill login's password: a file holding it, or the "
                            "installer's broker-logins.csv (default: credential or env "
                            "DRILL_PASSWORD)")
    press.add_argument("--port", help="line test instead of a drill: write the device's own "
                                      "frame to this serial port wired to the gateway's line "
                                      "(contact_id / phone devices; needs --live)")
    press.add_argument("--live", action="store_true",
                       help="with --port: yes, raise a real alarm")
    press.add_argument("--kind", choices=["sos", "cancel", "test"], default="sos")
    press.add_argument("--timeout", type=float, default=10.0)
    press.set_defaults(func=cmd_simulate)
    for name, func, helptext in (("ack", cmd_ack, "acknowledge an alarm (stops the alert)"),
                                 ("resolve", cmd_resolve, "close an alarm")):
        sp = sub.add_parser(name, help=helptext)
        with_config(sp)
        sp.add_argument("alarm_id")
        sp.add_argument("--by", default=os.environ.get("USER", "operator"))
        if name == "resolve":
            sp.add_argument("--note", default=None)
        sp.set_defaults(func=func)
    sp = sub.add_parser("duty", help="put a responder on or off duty over the roster's "
                                     "on_duty column (until changed again, or until the "
                                     "roster changes that responder's flag)")
    with_config(sp)
    sp.add_argument("responder_id")
    sp.add_argument("state", choices=["on", "off"])
    sp.add_argument("--by", default=os.environ.get("USER", "operator"))
    sp.set_defaults(func=cmd_duty)
    sp = sub.add_parser("status", help="health, open alarms and devices of a running gateway")
    with_config(sp)
    sp.set_defaults(func=cmd_status)
    sp = sub.add_parser("notices", help="open operator notices of a running gateway "
                                        "(local times)")
    with_config(sp)
    sp.set_defaults(func=cmd_notices)
    sp = sub.add_parser("notice-ack", help="acknowledge an operator notice (stops its sound)")
    with_config(sp)
    sp.add_argument("notice_id", type=int)
    sp.add_argument("--by", default=os.environ.get("USER", "operator"))
    sp.set_defaults(func=cmd_notice_ack)
    sp = sub.add_parser("broker-acl", help="write the broker's ACL: the static roles of the "
                                           "template plus one block per own button and "
                                           "staff phone in the registry")
    with_config(sp)
    sp.add_argument("--template", default=str(DEFAULT_ACL_TEMPLATE),
                    help=f"static roles (default {DEFAULT_ACL_TEMPLATE})")
    sp.add_argument("--out", default="/etc/mosquitto/alarm.acl",
                    help="ACL to write, 0640 (default /etc/mosquitto/alarm.acl)")
    sp.add_argument("--group", default="mosquitto",
                    help="group of the file when it exists (Mosquitto reads it after "
                         "dropping root; default mosquitto)")
    sp.set_defaults(func=cmd_broker_acl)
    sp = sub.add_parser("broker-users", help="create a broker password for every login of "
                                             "the roles; new ones go to a 0600 CSV")
    with_config(sp)
    sp.add_argument("--passwd", required=True, help="Mosquitto password file (kept, 0640)")
    sp.add_argument("--credentials-out", required=True,
                    help="0600 CSV the new logins' passwords are appended to (login,password)")
    sp.add_argument("--gateway-password-out", required=True,
                    help="0600 file with the gateway's own password (the mqtt_password "
                         "credential); must hold it when the gateway login exists")
    sp.add_argument("--only-missing", action="store_true",
                    help="only add logins; keep those the registry no longer has (default: "
                         "remove them, so a retired phone or button loses its access)")
    sp.add_argument("--rotate", action="append", default=[], metavar="LOGIN",
                    help="give LOGIN a new password (repeatable), e.g. a lost phone")
    sp.add_argument("--group", default="mosquitto",
                    help="group of the password file when it exists (default mosquitto)")
    sp.set_defaults(func=cmd_broker_users)
    sp = sub.add_parser("report", help="the daily report of a local day (gateway.timezone), "
                                       "read from the journal; works while the gateway runs")
    with_config(sp)
    sp.add_argument("--day", help="local day YYYY-MM-DD (default: yesterday)")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.add_argument("--journal", help="journal file (default: the config's state_dir/"
                                      "journal_file)")
    sp.set_defaults(func=cmd_report)
    sp = sub.add_parser("operator", help="the web console's operator accounts (exit 1 "
                                         "with the reason when refused)")
    ssub = sp.add_subparsers(dest="action", required=True)
    from_file = ("the password: first line of this file (default: the first line of "
                 "stdin when it is not a terminal, else typed twice)")
    for action, helptext in (("add", "add an operator"),
                             ("passwd", "set a new password (ends the operator's sessions, "
                                        "lifts a lockout)"),
                             ("disable", "refuse the operator's sign-ins, end the sessions"),
                             ("enable", "allow a disabled operator again"),
                             ("list", "every operator as JSON (local times)")):
        op = ssub.add_parser(action, help=helptext)
        with_config(op)
        if action != "list":
            op.add_argument("login")
        if action == "add":
            op.add_argument("--name", required=True, help="display name shown in the console")
        if action in ("add", "passwd"):
            op.add_argument("--password-file", help=from_file)
        op.set_defaults(func=cmd_operator)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("run", "demo"):
        # Tools print their results on stdout; only warnings go to stderr.
        configure_logging("warning", "auto", sys.stderr)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
