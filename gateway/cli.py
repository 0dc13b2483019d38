"""The ``gateway`` command: run, check-config, demo, simulate, ack, resolve, status.

Only this module exits the process; everything below raises typed errors.
Exit codes: 0 ok, 1 operation failed, 2 configuration or registry invalid,
3 cannot start (secrets missing, journal unwritable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import structlog

from gateway import __version__
from gateway.config import Config, ConfigError, load_config, load_secrets
from gateway.logs import configure_logging

DEFAULT_CONFIG = Path(os.environ.get("GATEWAY_CONFIG", "/etc/alarm-gateway/gateway.toml"))

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_START = 3


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.daemon import Gateway, StartupError, install_signal_handlers
    from gateway.journal import JournalError

    cfg = _config(args)
    configure_logging(cfg.model.logging.level, cfg.model.logging.format)
    gw = Gateway(cfg, load_secrets(cfg))

    async def main() -> None:
        install_signal_handlers(gw)
        await gw.run()

    try:
        asyncio.run(main())
    except (StartupError, JournalError) as exc:
        structlog.get_logger("gateway").critical("gateway.cannot_start", error=str(exc))
        print(f"gateway: cannot start: {exc}", file=sys.stderr)
        return EXIT_START
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.geo import GeoError
    from gateway.registry import RegistryError, registry_summary
    from gateway.world import load_world

    cfg = _config(args)
    try:
        registry = load_world(cfg).registry
    except (RegistryError, GeoError) as exc:
        print(f"registry {cfg.registry_dir}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    secrets = load_secrets(cfg)
    summary: dict[str, Any] = {
        "config": str(cfg.source),
        "registry": str(cfg.registry_dir),
        "counts": registry_summary(registry),
        "mqtt": (f"{cfg.model.mqtt.host}:{cfg.model.mqtt.port}" if cfg.model.mqtt.enabled
                 else "disabled"),
        "serial": [f"{s.name}={s.port} ({s.protocol})" for s in cfg.model.serial],
        "journal": str(cfg.model.gateway.journal_path),
        "secrets": repr(secrets),
    }
    missing = []
    if not secrets.twilio_account_sid or not secrets.twilio_auth_token:
        missing.append("Twilio credentials are not set (the gateway will refuse to start)")
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


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return asyncio.run(run_demo(presses=args.presses, out=Path(args.out) if args.out else None,
                                sound=args.sound, verbose=args.verbose))


def cmd_simulate(args: argparse.Namespace) -> int:
    from gateway.simulate import SimulationError, simulate_press

    cfg = _config(args)
    try:
        result = asyncio.run(simulate_press(cfg, args.device, port=args.port,
                                            kind=args.kind, timeout_s=args.timeout))
    except SimulationError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(result)
    return 0


def _control_url(cfg: Config) -> str:
    state = cfg.model.gateway.state_dir / "control.json"
    try:
        return str(json.loads(state.read_text(encoding="utf-8"))["url"])
    except (OSError, ValueError, KeyError):
        c = cfg.model.control
        return f"http://{c.host}:{c.port}"


def _call(cfg: Config, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    url = _control_url(cfg) + path
    if not url.startswith(("http://", "https://")):
        raise RuntimeError(f"control URL must be http(s): {url}")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,  # noqa: S310 - checked above
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - checked above
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        raise RuntimeError(f"{exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise RuntimeError(f"gateway not reachable at {url}: {exc.reason}") from None


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


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    try:
        health = _call(cfg, "GET", "/health")
        alarms = _call(cfg, "GET", "/alarms")
        devices = _call(cfg, "GET", "/devices")
    except RuntimeError as exc:
        print(f"status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps({"health": health, "open_alarms": alarms["alarms"],
                      "devices": devices["devices"]}, ensure_ascii=False, indent=2))
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
    sp.set_defaults(func=cmd_demo)
    sp = sub.add_parser("simulate", help="inject device messages into a running gateway")
    ssub = sp.add_subparsers(dest="what", required=True)
    press = ssub.add_parser("press", help="press a device's button (same path as the device)")
    with_config(press)
    press.add_argument("--device", required=True, help="device id from the registry")
    press.add_argument("--port", help="serial port wired to the gateway's serial line "
                                      "(for contact_id / phone devices)")
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
