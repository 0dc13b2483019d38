"""SMS through a GSM modem on a serial port: the fallback when Twilio is down or slow.

Theory of operation
-------------------
:class:`GsmModemSender` owns the port for its lifetime (an async context
manager). A modem is half-duplex, so one lock serialises every exchange: one
command, or all remaining parts of one message, at a time.

Opening the port runs the init sequence: ESC (aborts an ``AT+CMGS`` a previous
session left half-finished), ``AT``, ``ATE0``, ``AT+CMEE=1``, ``AT+CMGF=0`` (PDU
mode, needed for Chinese), then checks ``AT+CPIN?`` is ``READY`` and ``AT+CREG?``
is registered (1 home or 5 roaming). A modem that is missing or not ready at
start does not stop the gateway: the failure is logged and every send tries
again. A port that failed (unplugged: a serial exception) or whose exchange
was left unfinished (timed out or cancelled: the modem may still sit in the
prompt or answer late) is closed and reopened, with the init sequence, by the
next attempt.

A background reader turns the byte stream into lines and the ``> `` prompt.
Unsolicited result codes (``RING``, ``+CMTI: ...``, ``+CREG: 1``, ...) and
echoes are skipped wherever they arrive; only the final result codes (``OK``,
``ERROR``, ``+CMS ERROR: n``, ``+CME ERROR: n``) and the information line a
command asked for count as answers. Lines left over from an earlier exchange
are discarded before each command.

One :meth:`GsmModemSender.send` is one logical SMS, encoded by
:mod:`devices.gsm_pdu` into one or more parts. Each part is ``AT+CMGS=<len>``,
the ``> `` prompt (``command_timeout_s``), the PDU and Ctrl-Z, then ``+CMGS: <mr>``
and ``OK`` (``send_timeout_s``: the network round trip). An attempt sends the
remaining parts; a failed attempt is reported, backed off (capped full jitter,
injected sleep) and the next attempt resumes at the part that failed, up to
``max_attempts`` attempts. Results and errors are the Twilio sender's types
(:mod:`gateway.sms`), so the dispatcher treats both channels alike: the sid is
``gsm:<mr>[,<mr>...]`` with the modem's message references.

What an attempt's failure means:

* before the PDU was written (no prompt, error instead of the prompt, port
  lost, modem not ready): nothing was sent -> ``retry``;
* after the PDU was written: a ``+CMS ERROR`` is classified by
  :func:`cms_error_kind`; a timeout, a lost port or ``OK`` without ``+CMGS`` ->
  ``unknown`` (the SMS may have gone: as with Twilio we retry anyway, because
  for an alarm one duplicate beats one missing message).

``SmsSendError.outcome_unknown`` is also set when some parts of a long message
went out before the send failed: the recipient already has part of it.

CMS error table (27.005 3.2.5; 0-127 are 24.011 RP causes, 128-255 23.040 TP
failure causes, 300-511 ME/network errors, 512+ manufacturer specific):

=========================================================  ==========
code                                                       kind
=========================================================  ==========
1 unassigned number, 8 operator barring, 10 call barred,    permanent
21 transfer rejected, 28/30 unknown subscriber, 29
facility rejected, 50 not subscribed, 69 not implemented,
95-99 invalid message / information element
27 destination out of service, 38 network out of order,     retry
41 temporary failure, 42 congestion, 47 resources
unavailable, 81, 111 protocol error, 127 interworking,
other 0-127
128-191 (PID, DCS, command, TPDU not supported), 193 no     permanent
SC subscription, 195 invalid SME address, 196 SME barred,
197 duplicate rejected, 198/199 VPF/VP not supported
192 SC busy, 194 SC system failure, 208-255 (SIM, ME,       retry
unspecified)
303 not supported, 304 invalid PDU parameter, 305 invalid   permanent
text parameter, 330 SMSC address unknown (set ``smsc``)
332 network timeout                                         unknown
300-302, 310-322 (ME failure, SIM missing, PIN, busy,       retry
memory), 331 no network service, 340, 500 unknown,
512+ manufacturer specific, anything else
=========================================================  ==========

``permanent`` means this message cannot go through this modem: the caller
falls back to another channel or person, exactly as for a Twilio 4xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, Self

import serial
import structlog
from serial_asyncio_fast import open_serial_connection

from devices.backoff import full_jitter
from devices.gsm_pdu import Pdu, PduError, encode_submit
from gateway.config import GsmSection
from gateway.redact import mask_phone
from gateway.sms import Attempt, AttemptOutcome, SendResult, SmsSendError

__all__ = [
    "CmsErrorKind",
    "GsmModemError",
    "GsmModemSender",
    "ModemStatus",
    "cms_error_kind",
]

log = structlog.get_logger(__name__)

CmsErrorKind = Literal["retry", "permanent", "unknown"]

_CTRL_Z: Final = b"\x1a"
_ESC: Final = b"\x1b"
_READ_CHUNK: Final = 4096
# A modem line is at most a few hundred characters; anything longer without a
# line end is noise (wrong baud rate) and is cut rather than buffered forever.
_MAX_LINE: Final = 1024
_REGISTERED: Final = frozenset({1, 5})
# V.250 final result codes (the call ones answer ATD: no line, busy, no answer).
_FINAL = re.compile(r"(OK|ERROR|\+CMS ERROR:\s*(.*)|\+CME ERROR:\s*(.*)"
                    r"|NO CARRIER|BUSY|NO ANSWER|NO DIALTONE)")
_CMGS = re.compile(r"\+CMGS:\s*(\d+)")

_PERMANENT_RP: Final = frozenset({1, 8, 10, 21, 28, 29, 30, 50, 69, 95, 96, 97, 98, 99})
_PERMANENT_TP: Final = frozenset({193, 195, 196, 197, 198, 199})
_PERMANENT_ME: Final = frozenset({303, 304, 305, 330})
_UNKNOWN_ME: Final = frozenset({332})


def cms_error_kind(code: int) -> CmsErrorKind:
    """How the sender treats ``+CMS ERROR: <code>`` after the PDU was written
    (the table in the module docstring)."""
    if code in _PERMANENT_RP or code in _PERMANENT_TP or code in _PERMANENT_ME:
        return "permanent"
    if 128 <= code <= 191:
        return "permanent"
    if code in _UNKNOWN_ME:
        return "unknown"
    return "retry"


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True)
class ModemStatus:
    """What :meth:`GsmModemSender.probe` found. ``registration`` is the ``+CREG``
    stat (1 home, 5 roaming); ``signal_rssi`` is 0-31 or ``None`` when unknown."""

    sim_ready: bool
    registration: int | None
    signal_rssi: int | None

    @property
    def registered(self) -> bool:
        """True when the modem can send (home network or roaming)."""
        return self.registration in _REGISTERED


class GsmModemError(Exception):
    """The modem could not be opened, initialised or queried.

    ``command`` is the AT command that failed (``None`` when opening the port
    failed), ``code`` the ``+CME``/``+CMS`` error code when the modem gave one,
    ``timed_out`` whether it did not answer at all.
    """

    def __init__(
        self,
        message: str,
        *,
        command: str | None = None,
        code: int | None = None,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.command = command
        self.code = code
        self.timed_out = timed_out


# ----------------------------------------------------------------------------- internals


class _Token(enum.Enum):
    PROMPT = "prompt"
    LOST = "lost"


class _PortLost(Exception):
    """The serial port failed (unplugged, I/O error)."""


class _AttemptFailed(Exception):
    def __init__(
        self, kind: CmsErrorKind, code: int | None, error: str, *, timed_out: bool = False
    ) -> None:
        super().__init__(error)
        self.kind = kind
        self.code = code
        self.error = error
        self.timed_out = timed_out


def _final_result(line: str) -> tuple[Literal["ok", "error"], int | None] | None:
    """``("ok", None)``, ``("error", code)`` for a final result code, else ``None``."""
    match = _FINAL.fullmatch(line)
    if match is None:
        return None
    if match.group(1) == "OK":
        return "ok", None
    detail = (match.group(2) or match.group(3) or "").strip()
    return "error", int(detail) if detail.isdigit() else None


def _fields(line: str) -> list[str]:
    return [f.strip() for f in line.split(":", 1)[1].split(",")]


def _creg_stat(lines: list[str]) -> int | None:
    # The answer to AT+CREG? is "+CREG: <n>,<stat>[,...]"; the unsolicited
    # "+CREG: <stat>[,"lac","ci"]" never has a bare number second.
    for line in reversed(lines):
        fields = _fields(line)
        if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
            return int(fields[1])
    return None


class _Port:
    """One open serial connection and the reader task that tokenises it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._buf = bytearray()
        self._tokens: asyncio.Queue[str | _Token] = asyncio.Queue()
        self.lost: BaseException | None = None
        # Set while a command awaits its final result code. Left set by a timeout
        # or a cancellation: the modem's state is then unknown (maybe still in
        # the '> ' prompt, maybe about to answer late), so the port is reopened
        # and re-initialised before any further use.
        self.unfinished = False
        self._task = asyncio.create_task(self._read_loop(), name=f"gsm-reader:{name}")

    @property
    def usable(self) -> bool:
        return self.lost is None and not self.unfinished

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(_READ_CHUNK)
                if not data:
                    self._fail(_PortLost("end of stream"))
                    return
                self._feed(data)
        except (serial.SerialException, OSError) as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        self._tokens.put_nowait(_Token.LOST)
        log.warning("gsm.disconnected", error=str(exc))

    def _feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while True:
            start = 0
            # Line ends, spaces, and the ESC / Ctrl-Z we wrote coming back as echo.
            while start < len(buf) and buf[start] in b"\r\n \x1a\x1b\x00":
                start += 1
            del buf[:start]
            if not buf:
                return
            if buf[0] == ord(">"):
                # The prompt has no line end: it is recognised at a line start.
                del buf[:1]
                self._tokens.put_nowait(_Token.PROMPT)
                continue
            ends = [i for i in (buf.find(b"\r"), buf.find(b"\n")) if i >= 0]
            if not ends:
                if len(buf) > _MAX_LINE:
                    self._tokens.put_nowait(buf.decode("ascii", "replace"))
                    buf.clear()
                return
            end = min(ends)
            line = buf[:end].decode("ascii", "replace").strip()
            del buf[:end]
            if line:
                self._tokens.put_nowait(line)

    def discard(self) -> None:
        """Drop tokens left over from earlier exchanges (late answers, URCs)."""
        while not self._tokens.empty():
            if self._tokens.get_nowait() is _Token.LOST:
                break

    async def next(self) -> str | None:
        """The next line, or ``None`` for the ``> `` prompt; raises :class:`_PortLost`
        once the port failed."""
        if self.lost is not None and self._tokens.empty():
            raise _PortLost(str(self.lost))
        token = await self._tokens.get()
        if token is _Token.LOST:
            raise _PortLost(str(self.lost))
        return None if token is _Token.PROMPT else token

    async def write(self, data: bytes) -> None:
        if self.lost is not None:
            raise _PortLost(str(self.lost))
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (serial.SerialException, OSError) as exc:
            raise _PortLost(f"{type(exc).__name__}: {exc}") from exc

    async def close(self, timeout_s: float) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._writer.close()
        # Waiting re-raises the error that closed the transport; it was logged.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout_s):
                await self._writer.wait_closed()


# ----------------------------------------------------------------------------- sender


class GsmModemSender:
    """Sends SMS through a GSM modem, with the same results and errors as
    :class:`gateway.sms.TwilioSender`. See the module docstring.

    ``sleep`` and ``rng`` are injected for the backoff between attempts (and
    ``rng`` picks the first concatenation reference). ``opens`` counts the
    successful port openings (each runs the init sequence).
    """

    def __init__(
        self,
        settings: GsmSection,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._lock = asyncio.Lock()
        self._port: _Port | None = None
        self._active = False
        self._reference = self._rng.randrange(256)
        self.opens = 0

    @property
    def settings(self) -> GsmSection:
        """The validated ``[gsm]`` section this sender was built with."""
        return self._settings

    @property
    def connected(self) -> bool:
        """True while the port is open, initialised and has not failed."""
        port = self._port
        if port is None or port.lost is not None:
            return False
        # An exchange in progress holds the lock; one left unfinished does not.
        return not port.unfinished or self._lock.locked()

    async def __aenter__(self) -> Self:
        if self._active:
            raise RuntimeError("GsmModemSender is already open")
        self._active = True
        async with self._lock:
            try:
                await self._ensure_port()
            except GsmModemError as exc:
                # The fallback channel must not stop the gateway from starting;
                # every send tries to open the modem again.
                log.warning("gsm.unavailable", port=self._settings.port, error=str(exc))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._active = False
        async with self._lock:
            await self._close_port()

    # ------------------------------------------------------------------ port

    async def _close_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            await port.close(self._settings.command_timeout_s)

    async def _ensure_port(self) -> _Port:
        """The open, initialised port; (re)opens it when needed. Call with the lock held."""
        if not self._active:
            raise RuntimeError("GsmModemSender used outside 'async with'")
        if self._port is not None and self._port.usable:
            return self._port
        await self._close_port()
        settings = self._settings
        try:
            reader, writer = await open_serial_connection(
                url=settings.port, baudrate=settings.baudrate, exclusive=True
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            log.warning("gsm.open_failed", port=settings.port, error=str(exc))
            raise GsmModemError(f"cannot open {settings.port}: {exc}") from exc
        # Whatever the modem said before we were listening is not ours.
        serial_port = writer.transport.get_extra_info("serial")
        if isinstance(serial_port, serial.Serial):
            with contextlib.suppress(serial.SerialException, OSError):
                serial_port.reset_input_buffer()
        port = _Port(reader, writer, settings.port)
        self.opens += 1
        try:
            await self._initialise(port)
        except GsmModemError as exc:
            log.warning("gsm.init_failed", port=settings.port, error=str(exc), code=exc.code)
            await port.close(settings.command_timeout_s)
            raise
        except BaseException:
            # Cancelled mid-init: do not leak the descriptor and the reader task.
            await port.close(settings.command_timeout_s)
            raise
        self._port = port
        return port

    async def _initialise(self, port: _Port) -> None:
        try:
            await port.write(_ESC)
        except _PortLost as exc:
            raise GsmModemError(f"port lost: {exc}") from exc
        for command in ("AT", "ATE0", "AT+CMEE=1", "AT+CMGF=0"):
            await self._command(port, command)
        cpin = await self._command(port, "AT+CPIN?", "+CPIN:")
        if not cpin or _fields(cpin[-1])[0].upper() != "READY":
            raise GsmModemError(
                f"SIM not ready: {cpin[-1] if cpin else 'no +CPIN'}", command="AT+CPIN?"
            )
        stat = _creg_stat(await self._command(port, "AT+CREG?", "+CREG:"))
        if stat not in _REGISTERED:
            raise GsmModemError(
                f"not registered on the network (+CREG stat {stat})", command="AT+CREG?"
            )
        log.info("gsm.ready", port=self._settings.port, registration=stat, opens=self.opens)

    async def _command(self, port: _Port, command: str, info: str | None = None) -> list[str]:
        """Run one command; return its information lines starting with ``info``.

        Raises :class:`GsmModemError` on an error answer, a timeout (the port is
        then marked for reopening) or a lost port.
        """
        port.discard()
        port.unfinished = True
        lines: list[str] = []
        try:
            async with asyncio.timeout(self._settings.command_timeout_s):
                await port.write(command.encode("ascii") + b"\r")
                while True:
                    token = await port.next()
                    if token is None:
                        continue
                    final = _final_result(token)
                    if final is not None:
                        port.unfinished = False
                        result, code = final
                        if result == "ok":
                            return lines
                        raise GsmModemError(
                            f"{command} answered {token}", command=command, code=code
                        )
                    if info is not None and token.startswith(info):
                        lines.append(token)
                    elif token != command:
                        _unsolicited(token)
        except TimeoutError as exc:
            raise GsmModemError(
                f"{command}: no answer within {self._settings.command_timeout_s:g} s",
                command=command,
                timed_out=True,
            ) from exc
        except _PortLost as exc:
            raise GsmModemError(f"{command}: port lost: {exc}", command=command) from exc

    async def _abort(self, port: _Port) -> None:
        # ESC cancels a pending prompt; in command mode the modem ignores it.
        with contextlib.suppress(_PortLost, TimeoutError):
            async with asyncio.timeout(self._settings.command_timeout_s):
                await port.write(_ESC)

    async def _submit(self, port: _Port, pdu: Pdu) -> int:
        """Send one part; return the modem's message reference."""
        settings = self._settings
        command = f"AT+CMGS={pdu.tpdu_length}"
        port.discard()
        port.unfinished = True
        try:
            async with asyncio.timeout(settings.command_timeout_s):
                await port.write(command.encode("ascii") + b"\r")
                while True:
                    token = await port.next()
                    if token is None:
                        break
                    final = _final_result(token)
                    if final is not None:
                        # Refused before the PDU: nothing went out whatever the code.
                        port.unfinished = False
                        _, code = final
                        cms = token.startswith("+CMS") and code is not None
                        kind = cms_error_kind(code) if cms and code is not None else "retry"
                        raise _AttemptFailed(
                            "permanent" if kind == "permanent" else "retry",
                            code,
                            f"{command} answered {token}",
                        )
                    if token != command:
                        _unsolicited(token)
        except TimeoutError as exc:
            await self._abort(port)
            raise _AttemptFailed(
                "retry",
                None,
                f"no '> ' prompt within {settings.command_timeout_s:g} s",
                timed_out=True,
            ) from exc
        except _PortLost as exc:
            raise _AttemptFailed("retry", None, f"port lost before the PDU: {exc}") from exc

        reference: int | None = None
        try:
            async with asyncio.timeout(settings.send_timeout_s):
                await port.write(pdu.hex.encode("ascii") + _CTRL_Z)
                while True:
                    token = await port.next()
                    if token is None:
                        continue
                    if match := _CMGS.fullmatch(token):
                        reference = int(match.group(1))
                        continue
                    final = _final_result(token)
                    if final is None:
                        if not token.startswith(pdu.hex[:8]):
                            _unsolicited(token)
                        continue
                    port.unfinished = False
                    result, code = final
                    if result == "ok":
                        if reference is None:
                            raise _AttemptFailed("unknown", None, "OK without +CMGS")
                        return reference
                    if token.startswith("+CMS") and code is not None:
                        raise _AttemptFailed(cms_error_kind(code), code, token)
                    # A bare ERROR here is the modem refusing the PDU itself.
                    raise _AttemptFailed("retry", code, token)
        except TimeoutError as exc:
            await self._abort(port)
            raise _AttemptFailed(
                "unknown",
                None,
                f"no +CMGS within {settings.send_timeout_s:g} s after the PDU",
                timed_out=True,
            ) from exc
        except _PortLost as exc:
            raise _AttemptFailed("unknown", None, f"port lost after the PDU: {exc}") from exc

    # ------------------------------------------------------------------ public

    async def probe(self) -> ModemStatus:
        """Open the modem if needed and read SIM, registration and signal, for health
        checks. Raises :class:`GsmModemError` when the modem cannot be reached."""
        async with self._lock:
            port = await self._ensure_port()
            try:
                cpin = await self._command(port, "AT+CPIN?", "+CPIN:")
                sim_ready = bool(cpin) and _fields(cpin[-1])[0].upper() == "READY"
            except GsmModemError as exc:
                if exc.timed_out or exc.code is None:
                    raise
                sim_ready = False
            stat = _creg_stat(await self._command(port, "AT+CREG?", "+CREG:"))
            csq = await self._command(port, "AT+CSQ", "+CSQ:")
        rssi: int | None = None
        if csq:
            first = _fields(csq[-1])[0]
            if first.isdigit() and int(first) != 99:
                rssi = int(first)
        return ModemStatus(sim_ready=sim_ready, registration=stat, signal_rssi=rssi)

    async def ring(self, to: str, ring_s: float) -> None:
        """Ring ``to`` for ``ring_s`` seconds (``ATD<to>;``, then ``ATH``): a voice call
        with no speech, for when Twilio cannot place one. The callee sees the center's
        number ring; nothing tells whether anyone picked up. Holds the modem (and every
        SMS waiting for it) for ``ring_s``. Raises :class:`gateway.sms.SmsSendError`
        (retryable) when the modem refuses or cannot be reached."""
        if not self._active:
            raise RuntimeError("GsmModemSender used outside 'async with'")
        if not re.fullmatch(r"\+?[0-9]{3,20}", to):
            raise SmsSendError(f"not a number the modem can dial: {mask_phone(to)}",
                               permanent=True)
        masked = mask_phone(to)
        async with self._lock:
            try:
                port = await self._ensure_port()
                await self._command(port, f"ATD{to};")
                log.info("gsm.ringing", to=masked, ring_s=ring_s)
                try:
                    await self._sleep(ring_s)
                finally:
                    with contextlib.suppress(GsmModemError):
                        await self._command(port, "ATH")
            except GsmModemError as exc:
                log.warning("gsm.ring_failed", to=masked, error=str(exc), code=exc.code)
                raise SmsSendError(f"the GSM modem could not ring: {exc}", code=exc.code,
                                   retryable=True, timed_out=exc.timed_out) from exc
        log.info("gsm.rang", to=masked, ring_s=ring_s)

    def _next_reference(self) -> int:
        reference = self._reference
        self._reference = (reference + 1) % 256
        return reference

    def _backoff(self, number: int) -> float:
        settings = self._settings
        return full_jitter(number, settings.backoff_initial_s, settings.backoff_max_s, self._rng)

    async def _attempt(self, pdus: list[Pdu], references: list[int]) -> None:
        async with self._lock:
            try:
                port = await self._ensure_port()
            except GsmModemError as exc:
                raise _AttemptFailed(
                    "retry", exc.code, f"modem not ready: {exc}", timed_out=exc.timed_out
                ) from exc
            while len(references) < len(pdus):
                references.append(await self._submit(port, pdus[len(references)]))

    async def send(
        self,
        to: str,
        body: str,
        *,
        on_attempt: Callable[[Attempt], Awaitable[None]] | None = None,
    ) -> SendResult:
        """Send one SMS (as many parts as it needs), retrying transient failures.

        ``on_attempt`` is awaited after every attempt, before any backoff. Returns
        once the network accepted every part (``status`` ``"sent"``). Raises
        :class:`gateway.sms.SmsSendError`: ``permanent`` (the number or message is
        refused, or cannot be encoded), else ``retryable``; ``outcome_unknown``
        when the SMS or some of its parts may already have gone out.
        """
        if not self._active:
            raise RuntimeError("GsmModemSender used outside 'async with'")
        settings = self._settings
        masked = mask_phone(to)
        try:
            pdus = encode_submit(
                to,
                body,
                reference=self._next_reference(),
                validity_minutes=settings.validity_minutes,
                smsc=settings.smsc,
            )
        except PduError as exc:
            log.warning(
                "sms.failed", channel="gsm", to=masked, attempts=0, permanent=True, error=exc.reason
            )
            raise SmsSendError(f"SMS cannot be encoded: {exc.reason}", permanent=True) from exc

        references: list[int] = []
        attempts: list[Attempt] = []

        async def report(attempt: Attempt) -> None:
            attempts.append(attempt)
            log.info(
                "sms.attempt",
                channel="gsm",
                to=masked,
                attempt=attempt.number,
                outcome=attempt.outcome,
                code=attempt.code,
                delay_s=attempt.delay_s,
                error=attempt.error,
                parts_sent=len(references),
                parts=len(pdus),
            )
            if on_attempt is not None:
                await on_attempt(attempt)

        for number in range(1, settings.max_attempts + 1):
            try:
                await self._attempt(pdus, references)
            except _AttemptFailed as failure:
                last = failure.kind == "permanent" or number == settings.max_attempts
                outcome: AttemptOutcome = (
                    "unknown" if failure.kind == "unknown" else "failed" if last else "retry"
                )
                delay = None if last else self._backoff(number)
                await report(Attempt(number, outcome, None, failure.code, delay, failure.error))
                if delay is not None:
                    await self._sleep(delay)
                    continue
                permanent = failure.kind == "permanent"
                error = SmsSendError(
                    "SMS refused by the GSM network"
                    if permanent
                    else "SMS not sent through the GSM modem after retries",
                    code=failure.code,
                    retryable=not permanent,
                    permanent=permanent,
                    outcome_unknown=bool(references)
                    or any(a.outcome == "unknown" for a in attempts),
                    timed_out=failure.timed_out,
                    attempts=tuple(attempts),
                )
                log.warning(
                    "sms.failed",
                    channel="gsm",
                    to=masked,
                    attempts=number,
                    code=failure.code,
                    permanent=permanent,
                    outcome_unknown=error.outcome_unknown,
                    parts_sent=len(references),
                    parts=len(pdus),
                )
                raise error from failure
            await report(Attempt(number, "accepted", None, None, None, None))
            result = SendResult(
                sid="gsm:" + ",".join(str(r) for r in references),
                status="sent",
                num_segments=len(pdus),
                attempts=number,
                error_code=None,
            )
            log.info(
                "sms.accepted",
                channel="gsm",
                to=masked,
                sid=result.sid,
                attempts=number,
                segments=result.num_segments,
            )
            return result
        # max_attempts >= 1 is validated, so the loop always returns or raises.
        raise RuntimeError("unreachable: send loop ended without a result")


def _unsolicited(line: str) -> None:
    # Only the result code's name: some URCs (+CLIP, +CMT) carry phone numbers.
    log.debug("gsm.unsolicited", code=line.split(":", 1)[0][:16])
