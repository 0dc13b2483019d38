"""TEST DOUBLE of a GSM modem (Hayes AT commands, 3GPP TS 27.005 SMS). Never a production path.

A simulated modem on the master side of a pseudo-terminal, so the gateway's
real pyserial code path opens :attr:`SimulatedModem.port_path` exactly as it
would open ``/dev/serial/by-id/usb-...``. Tests and drills use it; the gateway
only meets it when one of them starts it explicitly.

``port_path`` is a symbolic link to the pty's slave side, like the stable
``by-id`` links udev makes: :meth:`SimulatedModem.unplug` closes the master (the
gateway's reads fail as with a pulled USB modem) and :meth:`SimulatedModem.replug`
attaches a fresh pty behind the same path, freshly powered (echo on, PDU mode).

What it answers, like a real modem (echo of every input byte until ``ATE0``;
results framed by CR LF):

==================  =======================================================
``AT``, ``ATZ``     ``OK`` (``ATZ`` also turns echo back on)
``ATE0``/``ATE1``   echo off / on
``AT+CMGF=0|1``     PDU / text mode; ``AT+CMGF?`` reports it
``AT+CMEE=0|1|2``   error reporting (``+CME ERROR: n`` from 1, else ``ERROR``)
``AT+CSCS?``        ``+CSCS: "GSM"`` (``AT+CSCS=...`` sets it)
``AT+CPIN?``        ``+CPIN: READY`` (or ``+CME ERROR: 10``, SIM not inserted)
``AT+CREG?``        ``+CREG: <n>,<stat>`` (``AT+CREG=n`` sets n)
``AT+CSQ``          ``+CSQ: 20,99``
``AT+CMGS=<n>``     ``> `` prompt, then the PDU hex up to Ctrl-Z (ESC aborts);
                    answered ``+CMGS: <mr>`` ``OK``, or ``+CMS ERROR: 304``
                    when the PDU is malformed or its length is not ``n``,
                    ``+CMS ERROR: 331`` when not registered
``AT+CMGS="<da>"``  text mode: the text up to Ctrl-Z
``ATD<number>;``    a voice call: ``OK`` while it rings (``dialled``), ``ERROR``
                    when not registered; ``ATH`` hangs up (``hung_up``)
anything else       ``ERROR``
==================  =======================================================

Scripting: :meth:`fail_next` (the next submission gets ``+CMS ERROR: n``),
:meth:`lose_next_answer` (the next submission goes out but its answer never
comes), :meth:`no_answer` (swallow all input), :meth:`set_sim_ready`,
:meth:`set_registration`, :meth:`queue_urc` (unsolicited lines slipped in just
before the next answer) and :meth:`send_urc`.

Run it by hand with ``python -m tests.support.gsm_modem_sim`` and point a
terminal (``picocom``, ``screen``) or the gateway at the printed path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import tty
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import structlog

from devices.gsm_pdu import PduError, decode_submit
from gateway.redact import mask_phone

__all__ = ["SimSms", "SimulatedModem", "main"]

log = structlog.get_logger(__name__)

CTRL_Z: Final = 0x1A
ESC: Final = 0x1B
_OUT_LIMIT: Final = 1 << 16
_CMGS_PDU = re.compile(r"AT\+CMGS=(\d{1,3})")
_ATD = re.compile(r"ATD(\+?[0-9]{3,20});")
_CMGS_TEXT = re.compile(r'AT\+CMGS="([^"]*)"(?:,\d+)?', re.IGNORECASE)
_SETTING = re.compile(r"AT\+(CMGF|CMEE|CREG)=(\d)")

CMS_INVALID_PDU: Final = 304
CMS_NO_NETWORK: Final = 331
CME_SIM_NOT_INSERTED: Final = 10


@dataclass(frozen=True)
class SimSms:
    """One SMS the simulated modem accepted: destination, text, concatenation
    ``(reference, total, sequence)`` or ``None``, and the PDU as received
    (empty in text mode)."""

    to: str
    text: str
    udh: tuple[int, int, int] | None
    pdu_hex: str


class SimulatedModem:
    """A GSM modem answering on a pseudo-terminal. See the module docstring.

    ``async with SimulatedModem() as modem:`` then open ``modem.port_path``.
    ``received`` lists every accepted SMS part, ``commands`` every command line
    (without the CR, PDUs not included).
    """

    def __init__(self, *, signal: int = 20, link_name: str = "ttyGSM0") -> None:
        self.received: list[SimSms] = []
        self.commands: list[str] = []
        self._signal = signal
        self._link_name = link_name
        self._dir: Path | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out = bytearray()
        self._writing = False
        self._changed: asyncio.Event | None = None
        self._failures: deque[int] = deque()
        self._lose_answers = 0
        self._urcs: list[tuple[str, str | None]] = []
        self._current = ""
        self._silent = False
        self._sim_ready = True
        self._registration = 1
        self._mr = 0
        self._power_on()

    def _power_on(self) -> None:
        self._echo = True
        self._pdu_mode = True
        self._cmee = 0
        self._creg_n = 0
        self._charset = "GSM"
        self._line = bytearray()
        self._pending: tuple[int | None, str] | None = None  # (length, to) after AT+CMGS
        self.dialled: list[str] = []  # numbers rung with ATD<number>;
        self.hung_up = 0  # ATH commands
        self._body = bytearray()

    # ------------------------------------------------------------------ lifecycle

    @property
    def port_path(self) -> str:
        """The stable path to open (a symlink to the current pty's slave side)."""
        if self._dir is None:
            raise RuntimeError("SimulatedModem is not running")
        return str(self._dir / self._link_name)

    @property
    def plugged(self) -> bool:
        """True while a pty is attached behind :attr:`port_path`."""
        return self._master is not None

    async def __aenter__(self) -> Self:
        if self._dir is not None:
            raise RuntimeError("SimulatedModem is already running")
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._dir = Path(tempfile.mkdtemp(prefix="gsm-modem-sim-"))
        self.replug()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unplug()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def unplug(self) -> None:
        """Pull the modem: close the master side, so the port's reads and writes fail."""
        master, self._master = self._master, None
        slave, self._slave = self._slave, None
        if master is not None and self._loop is not None:
            self._loop.remove_reader(master)
            if self._writing:
                self._loop.remove_writer(master)
        self._writing = False
        self._out.clear()
        for fd in (master, slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if master is not None:
            log.info("gsm_sim.unplugged")

    def replug(self) -> None:
        """Attach a freshly powered modem (new pty) behind the same :attr:`port_path`."""
        if self._dir is None or self._loop is None:
            raise RuntimeError("SimulatedModem is not running")
        self.unplug()
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        # Keeping our own slave descriptor open stops the master from reporting
        # a hang-up (and spinning the loop) whenever the gateway closes the port.
        self._master, self._slave = master, slave
        self._power_on()
        link = self._dir / self._link_name
        staging = self._dir / f".{self._link_name}.new"
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        staging.symlink_to(os.ttyname(slave))
        staging.replace(link)  # atomic: an opener never sees the path missing
        self._loop.add_reader(master, self._readable)
        log.info("gsm_sim.plugged", port=str(link))

    # ------------------------------------------------------------------ scripting

    def fail_next(self, cms_error: int) -> None:
        """Answer the next submission with ``+CMS ERROR: <cms_error>`` (queued: call
        it several times to fail several)."""
        self._failures.append(cms_error)

    def lose_next_answer(self) -> None:
        """Accept (record) the next submission but never answer it: the SMS went
        out and the sender cannot know."""
        self._lose_answers += 1

    def no_answer(self, on: bool) -> None:
        """While on, swallow every input byte: no echo, no answer."""
        self._silent = on

    def set_sim_ready(self, ready: bool) -> None:
        """With ``False`` the modem reports no SIM (``+CPIN?`` fails, sends get 310)."""
        self._sim_ready = ready

    def set_registration(self, stat: int) -> None:
        """Network registration status for ``+CREG?`` (1 home, 5 roaming, 0/2/3/4 not
        registered); sends fail with ``+CMS ERROR: 331`` unless it is 1 or 5."""
        self._registration = stat

    def queue_urc(self, line: str, *, before: str | None = None) -> None:
        """Send ``line`` as an unsolicited result just before the next answer (or
        ``> `` prompt), or with ``before``, just before the answer to the next
        command starting with ``before`` (e.g. ``"AT+CREG?"``)."""
        self._urcs.append((line, before.upper() if before is not None else None))

    def send_urc(self, line: str) -> None:
        """Send ``line`` as an unsolicited result now."""
        self._emit(f"\r\n{line}\r\n".encode("ascii"))

    async def wait_for_sms(self, n: int, timeout: float = 5.0) -> list[SimSms]:
        """Wait until at least ``n`` SMS parts were received; return them all.
        Raises ``TimeoutError``."""
        changed = self._changed
        if changed is None:
            raise RuntimeError("SimulatedModem is not running")
        async with asyncio.timeout(timeout):
            while len(self.received) < n:
                changed.clear()
                await changed.wait()
        return list(self.received)

    def reassembled(self) -> list[tuple[str, str]]:
        """Complete messages as ``(to, text)``, concatenated parts joined in sequence
        order, in the order they were completed."""
        done: list[tuple[str, str]] = []
        groups: dict[tuple[str, int, int], dict[int, str]] = {}
        for sms in self.received:
            if sms.udh is None:
                done.append((sms.to, sms.text))
                continue
            ref, total, seq = sms.udh
            parts = groups.setdefault((sms.to, ref, total), {})
            parts[seq] = sms.text
            if len(parts) == total:
                done.append((sms.to, "".join(parts[i] for i in range(1, total + 1))))
                del groups[(sms.to, ref, total)]
        return done

    # ------------------------------------------------------------------ wire

    def _readable(self) -> None:
        master = self._master
        if master is None:
            return
        try:
            data = os.read(master, 4096)
        except BlockingIOError:
            return
        except OSError:
            # EIO: nobody holds the slave open. Cannot happen while we keep our
            # descriptor, but never spin on it.
            self.unplug()
            return
        if self._silent:
            return
        for byte in data:
            self._byte(byte)

    def _emit(self, data: bytes) -> None:
        if self._master is None:
            return
        if len(self._out) + len(data) > _OUT_LIMIT:
            # Nobody is reading the port; a real modem's buffer overflows too.
            return
        self._out += data
        self._flush()

    def _flush(self) -> None:
        master, loop = self._master, self._loop
        if master is None or loop is None:
            return
        while self._out:
            try:
                sent = os.write(master, self._out)
            except BlockingIOError:
                break
            except OSError:
                self.unplug()
                return
            del self._out[:sent]
        if self._out and not self._writing:
            loop.add_writer(master, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            loop.remove_writer(master)
            self._writing = False

    def _release_urcs(self) -> None:
        keep: list[tuple[str, str | None]] = []
        for line, before in self._urcs:
            if before is None or self._current.startswith(before):
                self._emit(f"\r\n{line}\r\n".encode("ascii"))
            else:
                keep.append((line, before))
        self._urcs = keep

    def _answer(self, *lines: str) -> None:
        self._release_urcs()
        for line in lines:
            self._emit(f"\r\n{line}\r\n".encode("ascii"))

    def _error(self, cme: int) -> str:
        return f"+CME ERROR: {cme}" if self._cmee else "ERROR"

    def _byte(self, byte: int) -> None:
        if self._echo:
            self._emit(bytes([byte]))
        if self._pending is not None:
            self._body_byte(byte)
            return
        if byte == ESC:
            self._line.clear()
        elif byte == 0x0D:
            line = self._line.decode("ascii", "replace").strip()
            self._line.clear()
            if line:
                self._command(line)
        elif byte not in (0x0A, 0x00):
            self._line.append(byte)

    def _body_byte(self, byte: int) -> None:
        if byte == ESC:
            self._pending = None
            self._body.clear()
            self._answer("OK")
        elif byte == CTRL_Z:
            pending, self._pending = self._pending, None
            body = self._body.decode("ascii", "replace")
            self._body.clear()
            if pending is not None:
                self._submit(pending, body)
        elif byte not in (0x0D, 0x0A):
            self._body.append(byte)

    # ------------------------------------------------------------------ commands

    def _command(self, line: str) -> None:
        self.commands.append(line)
        upper = line.upper()
        self._current = upper
        if upper in ("AT", "ATZ", "ATE", "ATE0", "ATE1"):
            if upper == "ATZ":
                self._power_on()
            elif upper != "AT":
                self._echo = upper == "ATE1"
            self._answer("OK")
        elif setting := _SETTING.fullmatch(upper):
            self._set(setting.group(1), int(setting.group(2)))
        elif upper == "AT+CMGF?":
            self._answer(f"+CMGF: {0 if self._pdu_mode else 1}", "OK")
        elif upper == "AT+CSCS?":
            self._answer(f'+CSCS: "{self._charset}"', "OK")
        elif upper.startswith('AT+CSCS="') and upper.endswith('"'):
            self._charset = line[9:-1]
            self._answer("OK")
        elif upper == "AT+CPIN?":
            if self._sim_ready:
                self._answer("+CPIN: READY", "OK")
            else:
                self._answer(self._error(CME_SIM_NOT_INSERTED))
        elif upper == "AT+CREG?":
            self._answer(f"+CREG: {self._creg_n},{self._registration}", "OK")
        elif upper == "AT+CSQ":
            self._answer(f"+CSQ: {self._signal},99", "OK")
        elif (dial := _ATD.fullmatch(upper)) is not None:
            if self._registration not in (1, 5):
                self._answer("NO CARRIER")
            else:
                self.dialled.append(dial.group(1))
                self._answer("OK")
        elif upper == "ATH":
            self.hung_up += 1
            self._answer("OK")
        elif (pdu := _CMGS_PDU.fullmatch(upper)) and self._pdu_mode:
            self._prompt(int(pdu.group(1)), "")
        elif (text := _CMGS_TEXT.fullmatch(line)) and not self._pdu_mode:
            self._prompt(None, text.group(1))
        else:
            self._answer("ERROR")

    def _set(self, name: str, value: int) -> None:
        if name == "CMGF" and value in (0, 1):
            self._pdu_mode = value == 0
        elif name == "CMEE" and value in (0, 1, 2):
            self._cmee = value
        elif name == "CREG" and value in (0, 1, 2):
            self._creg_n = value
        else:
            self._answer("ERROR")
            return
        self._answer("OK")

    def _prompt(self, length: int | None, to: str) -> None:
        if not self._sim_ready:
            self._answer("+CMS ERROR: 310")
            return
        self._pending = (length, to)
        self._body.clear()
        self._release_urcs()
        self._emit(b"\r\n> ")

    def _submit(self, pending: tuple[int | None, str], body: str) -> None:
        length, to = pending
        if length is None:
            sms = SimSms(to=to, text=body, udh=None, pdu_hex="")
        else:
            pdu = body.strip()
            try:
                to, text, udh = decode_submit(pdu)
            except PduError as exc:
                log.info("gsm_sim.bad_pdu", error=exc.reason)
                self._answer(f"+CMS ERROR: {CMS_INVALID_PDU}")
                return
            # A decodable PDU starts with its SMSC length octet.
            tpdu_length = len(pdu) // 2 - 1 - int(pdu[:2], 16)
            if tpdu_length != length:
                log.info("gsm_sim.bad_length", announced=length, actual=tpdu_length)
                self._answer(f"+CMS ERROR: {CMS_INVALID_PDU}")
                return
            sms = SimSms(to=to, text=text, udh=udh, pdu_hex=pdu.upper())
        if self._failures:
            self._answer(f"+CMS ERROR: {self._failures.popleft()}")
            return
        if self._registration not in (1, 5):
            self._answer(f"+CMS ERROR: {CMS_NO_NETWORK}")
            return
        self.received.append(sms)
        mr = self._mr
        self._mr = (self._mr + 1) % 256
        log.info("gsm_sim.sms", to=mask_phone(sms.to), mr=mr, udh=sms.udh)
        if self._changed is not None:
            self._changed.set()
        if self._lose_answers:
            self._lose_answers -= 1
            return
        self._answer(f"+CMGS: {mr}", "OK")


async def _serve(signal: int) -> None:
    async with SimulatedModem(signal=signal) as modem:
        print(f"simulated GSM modem on {modem.port_path} (Ctrl-C to stop)", flush=True)
        received = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await modem.wait_for_sms(received + 1, timeout=60)
            for sms in modem.received[received:]:
                print(f"SMS to {mask_phone(sms.to)} part {sms.udh}: {sms.text}", flush=True)
            received = len(modem.received)


def main(argv: list[str] | None = None) -> None:
    """Run a simulated modem until interrupted, printing what it receives."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--signal", type=int, default=20, help="RSSI reported by AT+CSQ (0-31)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.signal))


if __name__ == "__main__":
    main()
