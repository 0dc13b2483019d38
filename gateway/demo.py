"""``gateway demo``: the whole pipeline on embedded defaults, no hardware, no accounts.

What is real: the daemon itself, the Sur-Gard serial protocol over a pseudo-terminal
(pyserial opens it like a USB receiver), the SQLite journal, the R-tree search, the
twilio-python client making real HTTP requests, espeak-ng rendering the alert.
What is simulated, and says so: the alarm receiver on the other end of the pty
(it writes the frames a receiver writes and waits for the ACK) and Twilio (a local
test double that speaks its REST API; no SMS leaves the machine, no phone rings). The
first alarm also calls the elder's first family contact (``[voice]``): the double's
scripted callee answers and presses 1, through the gateway's own signed webhooks, and
takes the alarm.

The operator console is real too: the control API listens on 127.0.0.1 (an ephemeral
port, or ``--port``) with a token the demo makes up, and a demo operator (login
``demo``, a new random password each run) is created in the demo's state folder; the
address and the login are printed before the presses. With ``--console`` the demo
then keeps the gateway running until Ctrl-C or SIGTERM and presses one more simulated
button every ``--every`` seconds, a different elder each time, which it leaves for
the operator to acknowledge in the browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TextIO, TypeVar

import aiohttp
import structlog

from devices.events import AddressScheme, Qualifier
from devices.surgard import ACK, encode_mlr2
from gateway.config import Secrets, parse_config
from gateway.console.accounts import AccountExists, OperatorAccounts, accounts_path
from gateway.daemon import Gateway
from gateway.district import generate_district
from gateway.logs import configure_logging
from gateway.model import Device, Elder
from gateway.redact import mask_phone
from gateway.sandbox.pty_device import PtyDevice
from gateway.sandbox.twilio_double import TwilioDouble

DEMO_FROM = "+15005550006"  # Twilio's documented magic test sender
DEMO_LOGIN = "demo"
DEMO_NAME = "演示值班员"
# No 0/O, 1/l/I: the password is read off a terminal and typed into a browser.
_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"

_T = TypeVar("_T")


def _free_port() -> int:
    """A loopback port for the demo's webhook listener (the double posts to it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _p(out: TextIO, text: str = "") -> None:
    out.write(text + "\n")
    out.flush()


def _demo_operator(state_dir: Path) -> str:
    """Create the demo operator in ``state_dir`` (a kept ``--out`` folder: give it a new
    password); return the password."""
    password = "-".join("".join(secrets.choice(_ALPHABET) for _ in range(4))
                        for _ in range(3))
    state_dir.mkdir(parents=True, exist_ok=True)
    with OperatorAccounts(accounts_path(state_dir)) as accounts:
        try:
            accounts.add(DEMO_LOGIN, DEMO_NAME, password)
        except AccountExists:
            accounts.set_password(DEMO_LOGIN, password)
            accounts.enable(DEMO_LOGIN)
    return password


async def run_demo(presses: int = 3, out: Path | None = None, sound: bool = False,
                   verbose: bool = False, stdout: TextIO | None = None, *,
                   console: bool = False, every: float = 30.0, port: int = 0) -> int:
    """Run the demo; returns the process exit code.

    ``console``: after the scripted presses, keep running until SIGINT or SIGTERM
    (then 0), with one more press every ``every`` seconds. ``port``: the control
    API's (and the console's) TCP port on 127.0.0.1, 0 for any free one."""
    screen = stdout or sys.stdout
    keep = out is not None
    root = out or Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    registry_dir = root / "registry"
    generate_district(registry_dir)
    log_path = root / "gateway.log.jsonl"
    log_file = log_path.open("w", encoding="utf-8")
    configure_logging("info", "json", sys.stderr if verbose else log_file)
    receiver = PtyDevice()  # the simulated Sur-Gard receiver
    try:
        password = await asyncio.to_thread(_demo_operator, root / "state")
        async with TwilioDouble() as double:
            hooks = _free_port()
            cfg = parse_config({
                "gateway": {"name": "demo", "state_dir": str(root / "state"),
                            "shutdown_timeout_s": 5},
                # generate_district wrote the map next to the CSV files.
                "registry": {"directory": str(registry_dir), "district_map": "district.geojson"},
                "mqtt": {"enabled": False},
                "serial": [{"name": "demo-receiver", "port": receiver.path,
                            "protocol": "surgard", "reconnect_initial_s": 0.2}],
                "alert": {"backend": "auto" if sound else "file",
                          "output_dir": str(root / "alerts"), "repeat_interval_s": 3},
                "sms": {"from_number": DEMO_FROM, "base_url": double.base_url,
                        "public_url": f"http://127.0.0.1:{hooks}"},
                "webhooks": {"port": hooks},
                # The operator console, on the control API's TCP listener (loopback only).
                "control": {"port": port},
                "voice": {"enabled": True},
                # The demo's waves: texts at once and a call to the first family contact.
                "escalation": {"waves": [{"after_s": 0, "family": True, "staff": 2,
                                          "channels": {"family": "both"}}]},
            }, root / "demo.toml")
            gw = Gateway(cfg, Secrets(double.account_sid, double.auth_token, None,
                                      control_token=secrets.token_hex(32)))
            runner = asyncio.create_task(gw.run(), name="gateway")
            stop = asyncio.Event()
            try:
                await _wait_ready(gw, runner)
                _banner(gw, receiver, double, password, screen)
                if not console:
                    code = await _presses(gw, receiver, double, presses, screen)
                else:
                    _on_signals(stop)
                    scripted = await _unless(stop, _presses(gw, receiver, double, presses,
                                                            screen))
                    code = 0 if scripted is None else scripted
                    if code == 0 and not stop.is_set():
                        await _live(gw, receiver, runner, stop, presses, every, screen)
            finally:
                gw.request_stop()
                try:
                    await runner
                finally:
                    if console:
                        _off_signals()
    finally:
        receiver.close()
        structlog.reset_defaults()  # the log file is about to close
        log_file.close()
    if keep or code != 0:
        _p(screen, f"\nJournal: {root / 'state' / 'journal.sqlite3'}")
        _p(screen, f"Alert WAVs: {root / 'alerts'}   Logs (JSON lines): {log_path}")
    else:
        shutil.rmtree(root, ignore_errors=True)
        _p(screen, "\n(use --out DIR to keep the journal, the alert WAVs and the JSON logs)")
    return code


async def _wait_ready(gw: Gateway, runner: asyncio.Task[None]) -> None:
    ready = asyncio.ensure_future(gw.ready.wait())
    done, _ = await asyncio.wait({ready, runner}, timeout=30,
                                 return_when=asyncio.FIRST_COMPLETED)
    if runner in done:
        ready.cancel()
        runner.result()  # raises the start-up error
    if ready not in done:
        raise RuntimeError("gateway did not become ready within 30 s")
    async with asyncio.timeout(10):
        await gw.serial[0].connected.wait()


def _contact_id_devices(gw: Gateway) -> list[Device]:
    if gw.registry is None:
        raise RuntimeError("gateway not ready")
    return sorted((d for d in gw.registry.devices.values()
                   if d.scheme is AddressScheme.CONTACT_ID), key=lambda d: d.device_id)


def _banner(gw: Gateway, receiver: PtyDevice, double: TwilioDouble, password: str,
            screen: TextIO) -> None:
    if not (gw.registry and gw.control):
        raise RuntimeError("gateway not ready")
    _p(screen, "一键通 alarm gateway demo — simulated Sur-Gard receiver on "
               f"{receiver.path}, Twilio test double at {double.base_url} (no SMS leaves "
               "this machine)")
    _p(screen, f"District: {len(gw.registry.elders)} elders, {len(gw.registry.responders)} "
               f"responders, {len(gw.registry.facilities)} medical facilities")
    _p(screen, f"Operator console: {gw.control.url}/console/ (open it in a browser while "
               "the demo runs)")
    _p(screen, f"    login: {DEMO_LOGIN}   password: {password}   ({DEMO_NAME}; a new "
               "password each run)\n")


def _on_signals(stop: asyncio.Event) -> None:
    """SIGINT and SIGTERM ask the demo to stop; a second SIGINT forces, as in ``gateway run``."""
    loop = asyncio.get_running_loop()

    def on_int() -> None:
        if stop.is_set():
            raise SystemExit(130)
        stop.set()

    loop.add_signal_handler(signal.SIGINT, on_int)
    loop.add_signal_handler(signal.SIGTERM, stop.set)


def _off_signals() -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


async def _unless(stop: asyncio.Event, work: Coroutine[Any, Any, _T]) -> _T | None:
    """``work``'s result; None if ``stop`` is set first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return None if task.cancelled() else task.result()


async def _live(gw: Gateway, receiver: PtyDevice, runner: asyncio.Task[None],
                stop: asyncio.Event, scripted: int, every: float, screen: TextIO) -> None:
    """``--console``: one press every ``every`` s until ``stop``, each from the next elder
    after the scripted ones (round the district and again), none acknowledged here."""
    if not (gw.registry and gw.journal):
        raise RuntimeError("gateway not ready")
    devices = _contact_id_devices(gw)
    pressed = {d.elder_id for d in devices[: max(1, scripted)]}
    by_elder: dict[str, Device] = {}
    for d in devices:
        by_elder.setdefault(d.elder_id, d)
    # The elders the scripted presses did not use first, then those (their alarms are
    # acknowledged by then).
    rotation = sorted(by_elder.values(), key=lambda d: d.elder_id in pressed)
    _p(screen, f"\nThe gateway keeps running for the console: a simulated press every "
               f"{every:g} s, left for the operator to acknowledge in the browser "
               "(Ctrl-C stops the demo).\n")
    alarm_ids: list[str] = []
    number = max(1, scripted)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            await asyncio.wait({stopped, runner}, timeout=every,
                               return_when=asyncio.FIRST_COMPLETED)
            if runner.done():
                return  # the gateway stopped by itself: run_demo raises its error
            if stopped.done():
                break
            device = rotation[(number - max(1, scripted)) % len(rotation)]
            number += 1
            elder = gw.registry.elders[device.elder_id]
            await _press(receiver, device, elder, number, screen)
            # The receiver got its ACK after the journal's commit: the alarm is there.
            found = await gw.journal.find_alarms(device_id=device.device_id, limit=1)
            if not found:
                continue
            rec = found[0]
            if rec.presses > 1:  # round the district again: the elder's alarm is open
                _p(screen, f"    joins the open alarm {rec.alarm_id} ({rec.state}, "
                           f"presses {rec.presses})")
            else:
                alarm_ids.append(rec.alarm_id)
                _p(screen, f"    alarm {rec.alarm_id}: {elder.name}, {elder.address} — on "
                           "the console now, waiting for an operator")
    finally:
        stopped.cancel()
    taken = 0
    for alarm_id in alarm_ids:
        by = (await gw.journal.get_alarm(alarm_id)).acknowledged_by or ""
        taken += by.startswith("operator:")
    _p(screen, f"\nStopped. Alarms raised for the console: {len(alarm_ids)}; acknowledged "
               f"on the console: {taken}.")


def _sos_frame(device: Device) -> bytes:
    """The Sur-Gard receiver's line for a new personal emergency (Contact ID 101)."""
    return encode_mlr2("01", "1", device.address, Qualifier.NEW, "101", "01", "001")


async def _press(receiver: PtyDevice, device: Device, elder: Elder, number: int,
                 screen: TextIO) -> None:
    """One press on the simulated receiver, and its line: who, and the receiver's ACK."""
    t0 = time.monotonic()
    answer = await receiver.send(_sos_frame(device))
    ack_ms = (time.monotonic() - t0) * 1000
    _p(screen, f"[{number}] {elder.name} pressed the button (device {device.device_id}, "
               f"Contact ID account {device.address}) -> receiver got "
               f"{'ACK' if answer == ACK else repr(answer)} in {ack_ms:.1f} ms")


async def _presses(gw: Gateway, receiver: PtyDevice, double: TwilioDouble, presses: int,
                   screen: TextIO) -> int:
    if not (gw.registry and gw.dispatcher and gw.journal and gw.player and gw.control):
        raise RuntimeError("gateway not ready")
    devices = _contact_id_devices(gw)[: max(1, presses)]
    alarm_ids: list[str] = []
    for i, device in enumerate(devices, 1):
        elder = gw.registry.elders[device.elder_id]
        await _press(receiver, device, elder, i, screen)
        if i == 1:
            # The first family contact will answer the alarm call and press 1.
            double.script_callee(elder.contacts[0].phone, "answer", digit="1", ring_s=4)
            again = await receiver.send(_sos_frame(device))
            _p(screen, f"    pressed again -> {'ACK' if again == ACK else repr(again)}; "
                       "joins the open alarm (no second alarm)")
        await gw.dispatcher.wait_idle(timeout=30)
        rec = next(a for a in await gw.journal.recent_alarms(limit=presses + 5)
                   if a.device_id == device.device_id)
        alarm_ids.append(rec.alarm_id)
        await _report(gw, rec.alarm_id, screen)
        if i == 1:
            await _call(gw, double, rec.alarm_id, screen)
    ok = True
    # The operator's way in: the control API's unix socket, as `gateway ack` uses it.
    connector = aiohttp.UnixConnector(path=str(gw.control.socket_path))
    async with aiohttp.ClientSession(connector=connector) as http:
        for alarm_id in alarm_ids:
            if (await gw.journal.get_alarm(alarm_id)).acknowledged_at is not None:
                continue  # taken on the phone
            await gw.player.wait_played(alarm_id, 1, timeout=30)
            plays = gw.player.plays(alarm_id)
            async with http.post(f"http://localhost/alarms/{alarm_id}/ack",
                                 json={"by": "demo-operator"}) as resp:
                ok = ok and resp.status == 200
            _p(screen, f"Operator acknowledged {alarm_id} via the control API -> alert "
                       f"stopped after {plays} play(s)")
    total = len(double.messages)
    _p(screen, f"\nAlarms: {len(alarm_ids)}; SMS accepted by the Twilio double: {total}; "
               f"calls: {len(double.calls)}.")
    return 0 if ok and alarm_ids and total and double.calls else 1


async def _call(gw: Gateway, double: TwilioDouble, alarm_id: str, screen: TextIO) -> None:
    """The first alarm's call: placed, answered, 1 pressed (through the signed webhooks)."""
    if not (gw.journal and gw.registry):
        raise RuntimeError("gateway not ready")
    [call] = await double.wait_for_calls(1, timeout=30)
    _p(screen, f"    call to the family {mask_phone(call.to)} placed ({call.sid}): Mandarin "
               "TwiML, said twice, then 'press 1 to accept, 2 if you cannot'")
    done = await double.advance_call(call.sid)
    rec = await gw.journal.get_alarm(alarm_id)
    [row] = [c for c in await gw.journal.calls(alarm_id) if c.sid == call.sid]
    _p(screen, f"    the callee answered, talked {done.duration or 0} s and pressed "
               f"{row.digits or 'nothing'} -> call {row.state}; alarm {rec.state} by "
               f"{rec.acknowledged_by}")
    _p(screen)


async def _report(gw: Gateway, alarm_id: str, screen: TextIO) -> None:
    if not (gw.dispatcher and gw.journal and gw.registry):
        raise RuntimeError("gateway not ready")
    alarm = gw.dispatcher.active.get(alarm_id)
    rec = await gw.journal.get_alarm(alarm_id)
    elder = gw.registry.elders[rec.elder_id]
    _p(screen, f"    alarm {alarm_id}: {elder.name}, {elder.address} — state {rec.state}, "
               f"presses {rec.presses}")
    if alarm is not None and alarm.geo is not None:
        for r in alarm.geo.responders:
            stale = " (base location)" if r.stale else ""
            _p(screen, f"    nearest on duty: {r.name} ({r.kind}) {r.distance_m:,.0f} m "
                       f"bearing {r.bearing_deg:.0f}°{stale}")
        for kind, f in alarm.geo.facilities.items():
            _p(screen, f"    nearest {kind}: {f.name} {f.distance_m:,.0f} m")
    notes = await gw.journal.notifications(alarm_id)
    if notes:
        _p(screen, f"    family SMS text: {notes[0].body}")
    for n in notes:
        lat = f"{n.latency_ms:.1f} ms after the press" if n.latency_ms is not None else "-"
        _p(screen, f"    SMS {n.role:<9} {n.name} {mask_phone(n.phone)}: {n.state} "
                   f"({n.sid or 'no sid'}), {lat}")
    _p(screen)

