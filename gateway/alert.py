"""Command-center audible alert: alarm tone + Mandarin announcement, repeated until acknowledged.

Theory of operation
-------------------
An alarm's announcement is one WAV (:func:`render_alert_wav`): a two-tone alarm
sound, a short silence, then espeak-ng speaking the text. Rendering never depends
on the audio device, so a broken speaker cannot stop an alarm from being announced.

:meth:`AlertPlayer.start` only records the alarm (no render, no file, no task):
one playback loop task (owned by the player's TaskGroup) decides what the speaker
says next, one thing at a time so announcements never overlap:

* more alarms waiting than ``summary_over``: one summary, "紧急求助：共N起，最新：<the
  newest alarm's text>" (N open alarms), which covers all of them; this also
  replaces a round of reminders when that many alarms are open;
* else the newest alarm not yet heard; else the oldest of this round's reminders.
  After a round the loop pauses ``repeat_interval_s``; a new alarm cuts the pause.

Storms (issue 13): a new alarm cuts whatever is playing once it has sounded for
``_CUT_AFTER_S`` (the cut item waits again), so a press is heard within about a
second at any rate of alarms, never behind minutes of queued announcements. The
item to play is rendered just before it plays: espeak-ng runs as a child process
of the loop (killed when cancelled), the mixing and WAV writing in a worker thread
(a few ms). A render slower than ``_TONE_DEADLINE_S`` does not hold the alarm back:
the plain tone plays first. An alarm's WAV stays on disk for its repeats, but at
most ``max_wav_files`` of them (least recently played evicted, rendered again when
needed): 10,000 open alarms use a few MB, not gigabytes. Closing kills what runs
and removes that folder, in bounded time whatever the number of open alarms.

Acknowledging an alarm (:meth:`AlertPlayer.stop`) removes it from the rotation
and, if it is on the speaker right now, kills its playback subprocess.

Playback failures (missing binary, bad device, non-zero exit, timeout) are
logged as ``alert.playback_failed`` and retried on the next round: the alarm
keeps its place. Nothing the audio stack does raises out of the player.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import wave
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

import numpy as np
import numpy.typing as npt
import structlog

from gateway.aio import first_of
from gateway.config import AlertSection

__all__ = [
    "AlertError",
    "AlertPlayer",
    "RenderInfo",
    "render_alert_wav",
]

log = structlog.get_logger(__name__)

Backend = Literal["aplay", "paplay", "file", "none"]

# Alternating tone segments; ~2 switches per second is the classic "hi-lo" alarm cadence.
_TONE_SEGMENT_S: Final = 0.25
# Ramp each segment in and out so the switch between frequencies does not click.
_TONE_FADE_S: Final = 0.008
# Loud enough to cut through a room, with headroom so the DAC never clips.
_TONE_AMPLITUDE: Final = 0.6
_GAP_S: Final = 0.3  # silence between the tone and the speech
_TAIL_S: Final = 0.2  # some sound cards drop the last buffer; keep it silent
_MIN_RATE: Final = 8000
_MAX_RATE: Final = 192_000

_TONE_HZ: Final = (880.0, 660.0)
_TONE_S: Final = 1.2
_SAMPLE_RATE: Final = 22050
_SPEED_WPM: Final = 150

_PLAYS_LOG: Final = "plays.log"
_SUMMARY: Final = "紧急求助：共{count}起，最新：{newest}"
# Alarm WAVs are named by the alarm id, which never starts with "_" (see _file_stem).
_SUMMARY_WAV: Final = "_summary.wav"
_TONE_WAV: Final = "_tone.wav"
# A new alarm cuts what is on the speaker once that has sounded this long: its tone
# is then heard within about this long of the press, however many alarms arrive.
_CUT_AFTER_S: Final = 0.75
# A render not done by then (a loaded CPU, a slow espeak-ng): the tone plays first.
_TONE_DEADLINE_S: Final = 0.5
_THREAD_WAIT_S: Final = 2.0  # closing: longest wait for a render's CPU part (ms in practice)
_LOG_IDS: Final = 20  # alarm ids named in one log line; the count says the rest
_PROBE_TIMEOUT_S: Final = 3.0
_STOPPED_HISTORY: Final = 4096  # acknowledged alarms remembered for idempotent start/stop
_LOOP_ERROR_BACKOFF_S: Final = 1.0
_STDERR_KEEP: Final = 300

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class AlertError(Exception):
    """The audible alert could not do what was asked (bad settings, unwritable WAV, ...).

    ``alarm_id`` and ``path`` say which alarm or file it concerns, when known.
    """

    def __init__(
        self, reason: str, *, alarm_id: str | None = None, path: Path | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.alarm_id = alarm_id
        self.path = path

    def __str__(self) -> str:
        where = []
        if self.alarm_id is not None:
            where.append(f"alarm_id={self.alarm_id}")
        if self.path is not None:
            where.append(f"path={self.path}")
        return f"{self.reason} ({', '.join(where)})" if where else self.reason


@dataclass(frozen=True, slots=True)
class RenderInfo:
    """What :func:`render_alert_wav` wrote.

    ``has_speech`` is False when espeak-ng was unavailable or failed: the WAV then
    holds the alarm tone only (the failure is logged as ``alert.speech_unavailable``).
    """

    path: Path
    duration_s: float
    sample_rate: int
    has_speech: bool


class _SpeechUnavailableError(Exception):
    """espeak-ng could not produce speech; the caller falls back to tone only."""


FloatArray = npt.NDArray[np.float32]


def render_alert_wav(
    path: Path,
    text: str,
    *,
    voice: str = "cmn",
    tone_hz: tuple[float, float] = (880.0, 660.0),
    tone_s: float = 1.2,
    espeak: str = "espeak-ng",
    speed_wpm: int = 150,
    sample_rate: int = 22050,
    timeout_s: float = 10.0,
) -> RenderInfo:
    """Write a 16-bit mono WAV: two-tone alarm, short silence, then ``text`` spoken.

    The speech comes from ``espeak -v voice -s speed_wpm --stdin -w tmp.wav`` and is
    resampled to ``sample_rate`` if espeak-ng used another rate. If espeak-ng is
    missing, fails or exceeds ``timeout_s`` (or ``text`` is blank), the WAV holds
    the tone alone and ``has_speech`` is False: an alarm is never left silent.

    The file is replaced atomically, so a player never reads a half-written WAV.
    Blocking (runs a subprocess and writes a file): call it via ``asyncio.to_thread``.

    Raises:
        AlertError: invalid parameters, ``path.parent`` is not an existing
            directory, or the WAV cannot be written.
    """
    _check_render_args(path, tone_hz, tone_s, speed_wpm, sample_rate, timeout_s)
    # The directory is not created here: a player shutting down removes its work
    # directory, and a render still running in its thread must not resurrect it.
    if not path.parent.is_dir():
        raise AlertError("output directory does not exist", path=path)

    speech: FloatArray | None = None
    if text.strip():
        try:
            speech = _speak(path.parent, text, voice, espeak, speed_wpm, sample_rate, timeout_s)
        except _SpeechUnavailableError as exc:
            log.warning("alert.speech_unavailable", reason=str(exc), espeak=espeak, voice=voice)
    else:
        log.warning("alert.speech_unavailable", reason="blank text", espeak=espeak, voice=voice)
    return _mix_and_write(path, speech, tone_hz, tone_s, sample_rate)


def _mix_and_write(
    path: Path,
    speech: FloatArray | None,
    tone_hz: tuple[float, float],
    tone_s: float,
    sample_rate: int,
) -> RenderInfo:
    """Tone, gap, speech (if any), tail: mixed to 16-bit PCM and written atomically."""
    parts = [_two_tone(tone_hz, tone_s, sample_rate)]
    if speech is not None:
        parts += [_silence(_GAP_S, sample_rate), speech]
    parts.append(_silence(_TAIL_S, sample_rate))
    samples = np.concatenate(parts)
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2").tobytes()
    _write_wav_atomically(path, pcm, sample_rate)
    return RenderInfo(
        path=path,
        duration_s=len(samples) / sample_rate,
        sample_rate=sample_rate,
        has_speech=speech is not None,
    )


def _check_render_args(
    path: Path,
    tone_hz: tuple[float, float],
    tone_s: float,
    speed_wpm: int,
    sample_rate: int,
    timeout_s: float,
) -> None:
    if not _MIN_RATE <= sample_rate <= _MAX_RATE:
        raise AlertError(f"sample_rate {sample_rate} outside {_MIN_RATE}..{_MAX_RATE}", path=path)
    nyquist = sample_rate / 2
    if len(tone_hz) != 2 or not all(math.isfinite(f) and 0 < f < nyquist for f in tone_hz):
        raise AlertError(f"tone_hz {tone_hz} must be two frequencies in (0, {nyquist})", path=path)
    if not (math.isfinite(tone_s) and 0 < tone_s <= 60):
        raise AlertError(f"tone_s {tone_s} must be in (0, 60]", path=path)
    # espeak-ng's own accepted range for -s.
    if not 80 <= speed_wpm <= 450:
        raise AlertError(f"speed_wpm {speed_wpm} outside 80..450", path=path)
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise AlertError(f"timeout_s {timeout_s} must be positive", path=path)


def _two_tone(tone_hz: tuple[float, float], tone_s: float, rate: int) -> FloatArray:
    n = max(1, round(tone_s * rate))
    seg = max(1, round(_TONE_SEGMENT_S * rate))
    idx = np.arange(n)
    seg_no = idx // seg
    pos = idx - seg_no * seg
    seg_len = np.minimum(seg, n - seg_no * seg)
    freq = np.where(seg_no % 2 == 0, tone_hz[0], tone_hz[1])
    fade = max(1, round(_TONE_FADE_S * rate))
    envelope = np.clip(np.minimum(pos, seg_len - 1 - pos) / fade, 0.0, 1.0)
    tone: FloatArray = (
        _TONE_AMPLITUDE * envelope * np.sin(2.0 * np.pi * freq * pos / rate)
    ).astype(np.float32)
    return tone


def _silence(seconds: float, rate: int) -> FloatArray:
    return np.zeros(round(seconds * rate), dtype=np.float32)


def _speak(
    workdir: Path,
    text: str,
    voice: str,
    espeak: str,
    speed_wpm: int,
    rate: int,
    timeout_s: float,
) -> FloatArray:
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=".speech-", suffix=".wav", dir=workdir)
    except OSError as exc:
        raise AlertError(f"cannot create a temporary file: {exc}", path=workdir) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # Text goes in on stdin: it never becomes an argv word, so a text that starts
        # with "-" cannot be read as an option.
        argv = [espeak, "-v", voice, "-s", str(speed_wpm), "--stdin", "-w", str(tmp)]
        try:
            done = subprocess.run(  # noqa: S603 - fixed argv, no shell; binary from settings
                argv,
                input=text.encode("utf-8"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=timeout_s,
                check=False,
            )
        except FileNotFoundError as exc:
            raise _SpeechUnavailableError(f"{espeak} not found") from exc
        except subprocess.TimeoutExpired as exc:
            raise _SpeechUnavailableError(f"{espeak} timed out after {timeout_s}s") from exc
        except OSError as exc:
            raise _SpeechUnavailableError(f"{espeak} could not run: {exc}") from exc
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace").strip()[:_STDERR_KEEP]
            raise _SpeechUnavailableError(f"{espeak} exited {done.returncode}: {err}")
        return _speech_samples(tmp, rate, espeak)
    finally:
        tmp.unlink(missing_ok=True)


def _speech_samples(path: Path, rate: int, espeak: str) -> FloatArray:
    samples, src_rate = _read_mono(path)
    if samples.size == 0:
        raise _SpeechUnavailableError(f"{espeak} produced no audio")
    return _resample(samples, src_rate, rate)


def _read_mono(path: Path) -> tuple[FloatArray, int]:
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            # espeak-ng may leave a placeholder frame count when it cannot seek;
            # readframes stops at the real end of the data either way.
            frames = w.readframes(w.getnframes())
    except (OSError, EOFError, wave.Error) as exc:
        raise _SpeechUnavailableError(f"unreadable speech WAV: {exc}") from exc
    if width == 2:
        data = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 1:
        data = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 4:
        data = (np.frombuffer(frames, dtype="<i4").astype(np.float64) / 2**31).astype(np.float32)
    else:
        raise _SpeechUnavailableError(f"unsupported speech sample width {width}")
    usable = data.size - data.size % channels
    mono = data[:usable].reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return mono.astype(np.float32), rate


def _resample(samples: FloatArray, src_rate: int, dst_rate: int) -> FloatArray:
    if src_rate == dst_rate:
        return samples
    # Linear interpolation: plenty for synthetic speech over a loudspeaker, and
    # avoids a scipy dependency for a path only taken with a non-default rate.
    n_out = max(1, round(samples.size * dst_rate / src_rate))
    positions = np.arange(n_out, dtype=np.float64) * (src_rate / dst_rate)
    out = np.interp(positions, np.arange(samples.size, dtype=np.float64), samples)
    return out.astype(np.float32)


def _write_wav_atomically(path: Path, pcm: bytes, rate: int) -> None:
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm)
        tmp.replace(path)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise AlertError(f"cannot write alert WAV: {exc}", path=path) from exc


async def _espeak_to_file(
    out: Path, text: str, *, voice: str, espeak: str, speed_wpm: int, timeout_s: float
) -> None:
    """espeak-ng as a child of the event loop: cancelling the caller kills it at once
    (a ``subprocess.run`` in a thread cannot be cancelled and held shutdown up)."""
    argv = [espeak, "-v", voice, "-s", str(speed_wpm), "--stdin", "-w", str(out)]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise _SpeechUnavailableError(f"{espeak} not found") from exc
    except OSError as exc:
        raise _SpeechUnavailableError(f"{espeak} could not run: {exc}") from exc
    try:
        async with asyncio.timeout(timeout_s):
            _, err = await proc.communicate(text.encode("utf-8"))
    except TimeoutError as exc:
        raise _SpeechUnavailableError(f"{espeak} timed out after {timeout_s}s") from exc
    finally:
        await _reap(proc)
    if proc.returncode != 0:
        reason = err.decode("utf-8", "replace").strip()[:_STDERR_KEEP]
        raise _SpeechUnavailableError(f"{espeak} exited {proc.returncode}: {reason}")


def _finish_render(
    path: Path, speech_wav: Path | None, sample_rate: int, espeak: str, voice: str
) -> RenderInfo:
    """The CPU part of a render (read espeak's WAV, resample, mix, write): run in a
    worker thread. Measured at 2-6 ms for a 14-20 s announcement (espeak-ng itself,
    a child process, takes ~20-30 ms); in a 200-alarm burst the loop's ticks were
    late by at most 7 ms. Only the item about to play is rendered, so this runs at
    most about once per ``_CUT_AFTER_S``: a process pool would cost more than it saves."""
    speech: FloatArray | None = None
    if speech_wav is not None:
        try:
            speech = _speech_samples(speech_wav, sample_rate, espeak)
        except _SpeechUnavailableError as exc:
            log.warning("alert.speech_unavailable", reason=str(exc), espeak=espeak, voice=voice)
    return _mix_and_write(path, speech, _TONE_HZ, _TONE_S, sample_rate)


class _PlaybackError(Exception):
    def __init__(self, reason: str, *, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.returncode = returncode
        self.stderr = stderr


@dataclass(slots=True, eq=False)
class _Alert:
    alarm_id: str
    text: str
    seq: int
    path: Path  # where its WAV is rendered (just before it plays)
    info: RenderInfo | None = None  # its WAV on disk, None if not rendered or evicted
    plays: int = 0  # announced: on its own or in a summary
    announced: bool = False  # heard at least once (its first announcement is not owed)
    consecutive_failures: int = 0
    stopped: bool = False
    pressed_at: float | None = None  # time.monotonic() of the press; None: not measured
    heard: bool = False  # something that covers it has sounded (a tone counts)


@dataclass(slots=True, eq=False)
class _Item:
    """One thing on the speaker: an alarm's announcement, or a summary of many."""

    alerts: tuple[_Alert, ...]  # the alarm, or every alarm the summary covers
    text: str
    path: Path
    count: int = 0  # a summary: open alarms it announces; 0 for a single alarm
    sounding_at: float | None = None  # loop time the first sound started
    sounding: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def label(self) -> str:
        return "summary" if self.count else self.alerts[0].alarm_id


_RENDER_PREFIX: Final = "gateway-alert-"


def remove_orphaned_render_dirs(parent: Path | None = None) -> list[Path]:
    """Remove the render folders (``gateway-alert-<pid>-*`` in the temp folder) of
    gateway processes that no longer run; returns what was removed. Folders of live
    processes, of other users and of names without a pid are left alone."""
    root = Path(parent or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        candidates = list(root.glob(f"{_RENDER_PREFIX}*-*"))
    except OSError:
        return removed
    for folder in candidates:
        pid_text = folder.name[len(_RENDER_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            if folder.stat().st_uid != os.getuid() or not folder.is_dir():
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except (PermissionError, OSError):
            continue  # alive under another user, or unreadable: not ours to judge
    if removed:
        log.warning("alert.orphans_removed", folders=len(removed))
    return removed


class AlertPlayer:
    """Announces every open alarm until it is acknowledged, summarising in a storm.

    Use as ``async with AlertPlayer(settings) as player:`` with the validated
    ``[alert]`` section (:class:`gateway.config.AlertSection`: backend, device,
    pauses, espeak-ng, ``summary_over``, ``max_wav_files``). ``sleep`` is the pause
    between rounds (inject a fast one in tests). ``heard`` is called once per alarm
    started with ``age_s``, with the milliseconds from its press until the first sound
    that covers it (its tone, its announcement or a summary) began: the metric of "the
    center hears within a second". Single use: it cannot be re-entered.
    """

    def __init__(
        self,
        settings: AlertSection,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        heard: Callable[[float], None] | None = None,
    ) -> None:
        self._settings = settings
        self._sleep = sleep
        self._heard = heard
        self._backend: Backend = "none"
        self._wav_dir: Path | None = None
        self._owned_dir: Path | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._entered = False
        self._closed = False
        self._active: dict[str, _Alert] = {}  # insertion order == start order == seq order
        self._stopped: OrderedDict[str, _Alert] = OrderedDict()
        # Waiting to be announced. "fresh": never heard, newest first (a stack sorted by
        # seq); "queued": the rest of this round, oldest first. The dicts say who is
        # still waiting (an acknowledged alarm leaves them at once), the sequences give
        # the order; stale entries in a sequence are skipped when reached.
        self._fresh: dict[str, _Alert] = {}
        self._fresh_order: list[_Alert] = []
        self._queued: dict[str, _Alert] = {}
        self._queue_order: deque[_Alert] = deque()
        self._playing: tuple[_Item, asyncio.Task[None]] | None = None
        self._seq = itertools.count(1)
        self._round = 1
        self._wakeup = asyncio.Event()  # a new alarm became active (cuts the pause)
        self._arrived = asyncio.Event()  # a new alarm since the current item was picked
        self._changed = asyncio.Event()  # replaced on every play/stop; see _notify
        # Rendered WAVs on disk, least recently played first; at most max_wav_files.
        self._wavs: OrderedDict[Path, _Alert] = OrderedDict()
        self._tone: RenderInfo | None = None
        self._threads: set[asyncio.Future[RenderInfo]] = set()  # renders' CPU parts

    @property
    def backend(self) -> str:
        """The backend in use ("aplay", "paplay", "file" or "none"), resolved on enter."""
        return self._backend

    @property
    def output_dir(self) -> Path | None:
        """Where WAVs are rendered (and, for "file", plays logged); None before enter."""
        return self._wav_dir

    async def __aenter__(self) -> Self:
        if self._entered:
            raise AlertError("an AlertPlayer cannot be entered twice")
        self._entered = True
        backend, why = await self._resolve_backend()
        self._backend = backend
        if backend == "file" and self._settings.output_dir is not None:
            self._wav_dir = self._settings.output_dir
            try:
                self._wav_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise AlertError(f"cannot create output_dir: {exc}", path=self._wav_dir) from exc
        else:
            # Named by our pid, so a later start can tell a dead gateway's folder (killed,
            # or stopped before it could clean up) and remove it (issue 13).
            await asyncio.to_thread(remove_orphaned_render_dirs)
            self._owned_dir = Path(tempfile.mkdtemp(prefix=f"{_RENDER_PREFIX}{os.getpid()}-"))
            self._wav_dir = self._owned_dir
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._loop_task = self._tg.create_task(self._run(), name="alert-playback-loop")
        log.info(
            "alert.backend",
            backend=backend,
            reason=why,
            device=self._settings.device,
            output_dir=str(self._wav_dir),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close in bounded time, however many alarms are open: the loop is cancelled
        (which kills a running aplay/paplay or espeak-ng), an unfinished render's CPU
        part gets at most ``_THREAD_WAIT_S``, and the render folder (at most
        ``max_wav_files`` + 2 WAVs) is removed. Open alarms need no work here: none
        has a WAV or a task of its own."""
        self._closed = True
        began = time.monotonic()
        try:
            if self._loop_task is not None:
                self._loop_task.cancel()
            if self._tg is not None:
                # Not the body's exception: TaskGroup would re-raise it wrapped in an
                # ExceptionGroup. The loop never fails on its own, so this only waits.
                await self._tg.__aexit__(None, None, None)
        finally:
            if self._threads:
                # A render thread must not write into the folder while it is removed.
                await asyncio.wait(set(self._threads), timeout=_THREAD_WAIT_S)
            if self._owned_dir is not None:
                await asyncio.to_thread(shutil.rmtree, self._owned_dir, True)
            log_close = log.warning if self._active else log.info
            log_close(
                "alert.closed",
                unacknowledged=tuple(itertools.islice(self._active, _LOG_IDS)),
                open_alarms=len(self._active),
                close_ms=round((time.monotonic() - began) * 1000, 1),
            )
            self._notify()

    async def start(self, alarm_id: str, text: str, *, age_s: float | None = None) -> None:
        """Add the alarm to the rotation; it is announced next (newest first).

        ``age_s``: how long ago the alarm's press was (a new alarm; None for one resumed
        after a restart, or a notice): the time until the center hears it is measured.

        Nothing is rendered here: the announcement is rendered just before it
        plays, so a storm of alarms costs no espeak-ng runs and no files. Idempotent
        per ``alarm_id``: an alarm already active or acknowledged is not started again.

        Raises:
            AlertError: the player is not running, or ``alarm_id`` is empty.
        """
        if not self._entered or self._closed:
            raise AlertError("alert player is not running", alarm_id=alarm_id)
        if not alarm_id:
            raise AlertError("alarm_id must not be empty")
        if alarm_id in self._active or alarm_id in self._stopped:
            log.debug("alert.duplicate", alarm_id=alarm_id)
            return
        alert = _Alert(
            alarm_id=alarm_id,
            text=text,
            seq=next(self._seq),
            path=self._dir() / f"{_file_stem(alarm_id)}.wav",
            pressed_at=None if age_s is None else time.monotonic() - max(0.0, age_s),
        )
        self._active[alarm_id] = alert
        self._fresh[alarm_id] = alert
        self._fresh_order.append(alert)  # seq grows: the stack stays sorted
        log.info("alert.started", alarm_id=alarm_id, waiting=self.waiting_count())
        self._wakeup.set()
        self._arrived.set()
        self._notify()

    async def stop(self, alarm_id: str) -> bool:
        """Acknowledge: stop repeating the alarm, cutting its playback if it is on now.

        Returns False for an unknown ``alarm_id``; True otherwise (also when it was
        already acknowledged). A summary that counts it plays on for the others.
        """
        alert = self._active.pop(alarm_id, None)
        if alert is None:
            return alarm_id in self._stopped
        self._fresh.pop(alarm_id, None)
        self._queued.pop(alarm_id, None)
        # Retired before the first await, so a second acknowledgement arriving while
        # the cut is in progress sees a known alarm. A cancelled play is never counted,
        # so the plays logged here are final.
        self._retire(alert)
        self._notify()
        playing = self._playing
        # Still rendering into output_dir: its WAV is the record of the alarm, so the
        # render finishes in the loop's own time; it is not played (_perform checks).
        if (
            playing is not None
            and not playing[0].count
            and playing[0].alerts[0] is alert
            and not (self._keeps_wavs() and not playing[0].sounding.is_set())
        ):
            playing[1].cancel()
            await asyncio.wait({playing[1]})
        self._discard_wav(alert)
        return True

    def active_count(self) -> int:
        """How many alarms are in the rotation."""
        return len(self._active)

    def active(self) -> tuple[str, ...]:
        """Alarm ids in the rotation (not yet acknowledged), oldest first."""
        return tuple(self._active)

    def waiting_count(self) -> int:
        """Alarms waiting for their turn on the speaker (new ones and this round's)."""
        return len(self._fresh) + len(self._queued)

    def wav_count(self) -> int:
        """Rendered alarm WAVs on disk (at most ``max_wav_files``)."""
        return len(self._wavs)

    def plays(self, alarm_id: str) -> int:
        """How many times the alarm has been announced, on its own or in a summary
        (0 if unknown)."""
        alert = self._active.get(alarm_id) or self._stopped.get(alarm_id)
        return alert.plays if alert is not None else 0

    async def wait_played(
        self,
        alarm_id: str,
        times: int = 1,
        timeout: float = 5.0,
    ) -> None:
        """Wait until the alarm has been announced ``times`` times (see :meth:`plays`).

        Raises:
            TimeoutError: not played often enough within ``timeout`` seconds.
            AlertError: unknown alarm, or it was acknowledged (or the player
                closed) before reaching ``times`` plays.
        """
        async with asyncio.timeout(timeout):
            while True:
                changed = self._changed
                alert = self._active.get(alarm_id) or self._stopped.get(alarm_id)
                if alert is None:
                    raise AlertError("unknown alarm", alarm_id=alarm_id)
                if alert.plays >= times:
                    return
                if alert.stopped:
                    raise AlertError(
                        f"acknowledged after {alert.plays} of {times} plays", alarm_id=alarm_id
                    )
                if self._closed:
                    raise AlertError("alert player closed", alarm_id=alarm_id)
                await changed.wait()

    # -- internals ---------------------------------------------------------------------

    def _dir(self) -> Path:
        if self._wav_dir is None:
            raise AlertError("alert player is not running")
        return self._wav_dir

    def _notify(self) -> None:
        # Waiters hold the old event; swapping in a fresh one wakes all of them at once
        # without any of them having to clear it.
        self._changed.set()
        self._changed = asyncio.Event()

    def _retire(self, alert: _Alert) -> None:
        alert.stopped = True
        self._stopped[alert.alarm_id] = alert
        while len(self._stopped) > _STOPPED_HISTORY:
            self._stopped.popitem(last=False)
        log.info("alert.stopped", alarm_id=alert.alarm_id, plays=alert.plays)

    def _keeps_wavs(self) -> bool:
        # The "file" backend's WAVs in a configured output_dir are its observable
        # output and stay after acknowledgement (still at most max_wav_files of them).
        return self._backend == "file" and self._owned_dir is None

    def _discard_wav(self, alert: _Alert) -> None:
        if alert.info is None or self._keeps_wavs():
            return
        self._wavs.pop(alert.path, None)
        alert.path.unlink(missing_ok=True)
        alert.info = None

    def _remember_wav(self, alert: _Alert, info: RenderInfo) -> None:
        alert.info = info
        self._wavs[alert.path] = alert
        self._wavs.move_to_end(alert.path)
        while len(self._wavs) > self._settings.max_wav_files:
            path, evicted = self._wavs.popitem(last=False)
            path.unlink(missing_ok=True)
            evicted.info = None  # rendered again when its turn comes

    async def _resolve_backend(self) -> tuple[Backend, str]:
        wanted = self._settings.backend
        if wanted != "auto":
            return _as_backend(wanted), "configured"
        pactl = await _probe(["pactl", "info"])
        if pactl is not None and pactl[0] == 0 and shutil.which("paplay") is not None:
            return "paplay", "pactl info answered"
        aplay = await _probe(["aplay", "-l"])
        if aplay is not None and aplay[0] == 0 and re.search(r"^card \d+:", aplay[1], re.M):
            return "aplay", "aplay -l lists a card"
        return "file", "no PulseAudio server and no ALSA card"

    async def _run(self) -> None:
        while True:
            try:
                await self._cycle()
            except Exception:
                # A bug here must not silence every later alarm: log, back off, go on.
                log.exception("alert.loop_error")
                await self._sleep(_LOOP_ERROR_BACKOFF_S)

    async def _cycle(self) -> None:
        item = self._next_item()
        if item is not None:
            await self._play_once(item)
            return
        if not self._active:
            self._wakeup.clear()
            await self._wakeup.wait()
            self._start_round()
            return
        if not await self._pause(self._settings.repeat_interval_s):
            self._start_round()
        # Interrupted: keep the round going; the new alarm is announced first.

    def _start_round(self) -> None:
        self._round += 1
        self._queue_order = deque(a for a in self._active.values() if a.alarm_id not in self._fresh)
        self._queued = {a.alarm_id: a for a in self._queue_order}

    def _next_item(self) -> _Item | None:
        """What plays next: a summary when more alarms wait than ``summary_over``,
        else the newest alarm never heard, else the oldest of this round."""
        waiting = self.waiting_count()
        if waiting == 0:
            return None
        self._arrived.clear()  # what arrived so far is in this choice
        if waiting > self._settings.summary_over:
            covered = (*self._fresh.values(), *self._queued.values())
            self._fresh, self._fresh_order = {}, []
            self._queued, self._queue_order = {}, deque()
            newest = next(reversed(self._active.values()))
            count = len(self._active)
            return _Item(
                alerts=covered,
                text=_SUMMARY.format(count=count, newest=newest.text),
                path=self._dir() / _SUMMARY_WAV,
                count=count,
            )
        if self._fresh:
            while True:
                alert = self._fresh_order.pop()
                if self._fresh.get(alert.alarm_id) is alert:
                    del self._fresh[alert.alarm_id]
                    break
        else:
            while True:
                alert = self._queue_order.popleft()
                if self._queued.get(alert.alarm_id) is alert:
                    del self._queued[alert.alarm_id]
                    break
        return _Item(alerts=(alert,), text=alert.text, path=alert.path)

    def _requeue(self, item: _Item) -> None:
        """A cut item's alarms wait again: the unheard with the new ones (by seq), the
        heard at the head of this round."""
        unheard: list[_Alert] = []
        for alert in reversed(item.alerts):
            if self._active.get(alert.alarm_id) is not alert:
                continue  # acknowledged meanwhile
            if alert.announced:
                self._queued[alert.alarm_id] = alert
                self._queue_order.appendleft(alert)
            else:
                self._fresh[alert.alarm_id] = alert
                unheard.append(alert)
        if unheard:
            live = [a for a in self._fresh_order if self._fresh.get(a.alarm_id) is a]
            self._fresh_order = sorted([*live, *unheard], key=lambda a: a.seq)

    async def _pause(self, seconds: float) -> bool:
        """Sleep between rounds; True if a new alarm cut the pause short."""
        self._wakeup.clear()
        await first_of(self._sleep(seconds), self._wakeup.wait())
        return self._wakeup.is_set()

    async def _play_once(self, item: _Item) -> None:
        # A child task so that stop() or a new alarm can cut exactly this play.
        task = asyncio.create_task(self._perform(item), name=f"alert-play-{item.label}")
        self._playing = (item, task)
        try:
            cut = await self._until_done_or_cut(item, task)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
            self._playing = None
        if cut:
            self._requeue(item)
            log.info("alert.cut_for_new_alarm", cut=item.label, waiting=self.waiting_count())
            return
        if not task.cancelled():
            task.result()  # re-raise a bug (playback failures are handled inside)

    async def _until_done_or_cut(self, item: _Item, task: asyncio.Task[None]) -> bool:
        """Wait for the play; True if a new alarm should cut it. The cut comes once
        the play has sounded for ``_CUT_AFTER_S`` (so every alarm's tone is heard within
        about that long, whatever the load), and never for an alarm acknowledged
        meanwhile."""
        while True:
            if not await _first(task, self._arrived.wait()):
                return False
            if not item.sounding.is_set() and not await _first(task, item.sounding.wait()):
                return False
            sounded = asyncio.get_running_loop().time() - (item.sounding_at or 0.0)
            if sounded < _CUT_AFTER_S:
                await asyncio.wait({task}, timeout=_CUT_AFTER_S - sounded)
                if task.done():
                    return False
            if self._fresh:
                return True
            self._arrived.clear()  # the newcomer was acknowledged already

    async def _perform(self, item: _Item) -> None:
        """Render the item (just now, unless its WAV is still on disk) and play it.
        A render later than ``_TONE_DEADLINE_S`` does not hold the alarm: the plain
        tone plays first, the announcement as soon as it is rendered."""
        if self._backend == "none":
            self._mark_sounding(item)
            self._played(item, None)
            return
        alone = item.alerts[0] if not item.count else None
        info = alone.info if alone is not None else None
        if info is not None and alone is not None and info.path.exists():
            self._wavs.move_to_end(alone.path)
        else:
            render = asyncio.create_task(self._render(item), name=f"alert-render-{item.label}")
            try:
                done, _ = await asyncio.wait({render}, timeout=_TONE_DEADLINE_S)
                if not done and not (alone is not None and alone.stopped):
                    await self._sound_tone(item)
                info = await render
            except AlertError as exc:
                log.error("alert.render_failed", item=item.label, reason=str(exc))
                self._failed(item, _PlaybackError(f"render failed: {exc.reason}"))
                return
            finally:
                if not render.done():
                    render.cancel()
                    await asyncio.wait({render})
            if alone is not None:
                self._remember_wav(alone, info)
                if alone.stopped:
                    return  # acknowledged while rendering (see stop)
        self._mark_sounding(item)
        try:
            await self._sound(item, info)
        except _PlaybackError as exc:
            self._failed(item, exc)
            return
        self._played(item, info)

    async def _render(self, item: _Item) -> RenderInfo:
        began = time.monotonic()
        s = self._settings
        speech_wav: Path | None = None
        if item.text.strip():
            try:
                fd, name = tempfile.mkstemp(prefix=".speech-", suffix=".wav", dir=item.path.parent)
            except OSError as exc:
                raise AlertError(f"cannot create a temporary file: {exc}", path=item.path) from exc
            os.close(fd)
            speech_wav = Path(name)
        else:
            log.warning("alert.speech_unavailable", reason="blank text", espeak=s.espeak,
                        voice=s.voice)
        try:
            if speech_wav is not None:
                try:
                    await _espeak_to_file(speech_wav, item.text, voice=s.voice, espeak=s.espeak,
                                          speed_wpm=_SPEED_WPM, timeout_s=s.max_render_s)
                except _SpeechUnavailableError as exc:
                    log.warning("alert.speech_unavailable", reason=str(exc), espeak=s.espeak,
                                voice=s.voice)
                    speech_wav.unlink(missing_ok=True)
                    speech_wav = None
            info = await self._in_thread(item.path, speech_wav)
        finally:
            if speech_wav is not None:
                speech_wav.unlink(missing_ok=True)
        log.info(
            "alert.rendered",
            item=item.label,
            duration_s=round(info.duration_s, 3),
            has_speech=info.has_speech,
            render_ms=round((time.monotonic() - began) * 1000, 1),
        )
        return info

    async def _in_thread(self, path: Path, speech_wav: Path | None) -> RenderInfo:
        # Tracked, so that closing can wait for it before removing the folder it writes.
        fut = asyncio.get_running_loop().run_in_executor(
            None, _finish_render, path, speech_wav, _SAMPLE_RATE, self._settings.espeak,
            self._settings.voice,
        )
        self._threads.add(fut)
        fut.add_done_callback(self._thread_done)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # Cancelled (acknowledged or closing) while the thread still writes: what it
            # writes belongs to nobody, so it must not outlive it and escape the bound.
            fut.add_done_callback(lambda _: path.unlink(missing_ok=True))
            raise

    def _thread_done(self, fut: asyncio.Future[RenderInfo]) -> None:
        self._threads.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved: a cancelled render's error is not news

    async def _sound_tone(self, item: _Item) -> None:
        """The plain tone, while the announcement is still rendering."""
        if self._tone is None or not self._tone.path.exists():
            self._tone = await self._in_thread(self._dir() / _TONE_WAV, None)
        self._mark_sounding(item, "tone")
        try:
            await self._sound(item, self._tone, kind="tone")
        except _PlaybackError as exc:
            log.error("alert.playback_failed", item=item.label, backend=self._backend,
                      reason=exc.reason, returncode=exc.returncode, stderr=exc.stderr)
            return
        log.info("alert.tone_played", item=item.label, backend=self._backend)

    def _mark_sounding(self, item: _Item, kind: str | None = None) -> None:
        if item.sounding.is_set():
            return
        item.sounding_at = asyncio.get_running_loop().time()
        item.sounding.set()
        if self._backend != "none":
            self._first_heard(item, kind)

    def _first_heard(self, item: _Item, kind: str | None) -> None:
        """The alarms this sound is the first to cover: their press-to-heard time."""
        now = time.monotonic()
        heard, worst_ms = 0, None
        for alert in item.alerts:
            if alert.heard:
                continue
            alert.heard = True
            heard += 1
            if alert.pressed_at is not None:
                ms = (now - alert.pressed_at) * 1000
                worst_ms = ms if worst_ms is None else max(worst_ms, ms)
                if self._heard is not None:
                    self._heard(ms)
        if heard:
            log.info("alert.heard", item=item.label,
                     kind=kind or ("summary" if item.count else "alarm"), alarms=heard,
                     press_to_heard_ms=None if worst_ms is None else round(worst_ms, 1))

    async def _sound(self, item: _Item, info: RenderInfo, kind: str | None = None) -> None:
        if self._backend == "file":
            self._record_file_play(item, info, kind)
        elif self._backend in ("aplay", "paplay"):
            limit_s = info.duration_s + self._settings.playback_margin_s
            await _run_player(self._player_argv(info.path), limit_s)

    def _failed(self, item: _Item, failure: _PlaybackError) -> None:
        # An expected, recoverable condition: the reason and stderr say it all, a
        # traceback would only bury them. The alarms wait for the next round.
        for alert in item.alerts:
            alert.consecutive_failures += 1
        log.error(
            "alert.playback_failed",
            alarm_id=item.alerts[0].alarm_id if not item.count else None,
            item=item.label,
            backend=self._backend,
            reason=failure.reason,
            returncode=failure.returncode,
            stderr=failure.stderr,
            consecutive_failures=item.alerts[0].consecutive_failures,
        )

    def _played(self, item: _Item, info: RenderInfo | None) -> None:
        # No await since the file backend logged it: count and log agree.
        del info
        for alert in item.alerts:
            alert.plays += 1
            alert.announced = True
            alert.consecutive_failures = 0
        if item.count:
            log.info(
                "alert.summary_played",
                count=item.count,
                covered=len(item.alerts),
                round=self._round,
                backend=self._backend,
            )
        else:
            alert = item.alerts[0]
            log.info(
                "alert.played",
                alarm_id=alert.alarm_id,
                round=self._round,
                plays=alert.plays,
                backend=self._backend,
            )
        self._notify()

    def _record_file_play(self, item: _Item, info: RenderInfo, kind: str | None) -> None:
        # Synchronous on purpose: the count and the log line change together, with no
        # await in between, so a stop() can never fall between them. One short append.
        entry: dict[str, object] = {"ts": datetime.now(UTC).isoformat()}
        if kind is not None:
            entry["kind"] = kind
        elif item.count:
            entry |= {"kind": "summary", "count": item.count, "covered": len(item.alerts)}
        else:
            alert = item.alerts[0]
            entry |= {"kind": "alarm", "alarm_id": alert.alarm_id, "play": alert.plays + 1}
        entry |= {"round": self._round, "wav": info.path.name}
        try:
            with (self._dir() / _PLAYS_LOG).open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise _PlaybackError(f"cannot record play: {exc}") from exc

    def _player_argv(self, wav: Path) -> list[str]:
        device = self._settings.device
        if self._backend == "paplay":
            return ["paplay", *([f"--device={device}"] if device else []), str(wav)]
        return ["aplay", "-q", *(["-D", device] if device else []), str(wav)]


async def _first(task: asyncio.Task[None], signal: Coroutine[Any, Any, object]) -> bool:
    """Wait for ``task`` to end or ``signal`` to come; True if the signal came first."""
    waiter = asyncio.ensure_future(signal)
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
    return not task.done()


def _as_backend(name: str) -> Backend:
    if name == "aplay":
        return "aplay"
    if name == "paplay":
        return "paplay"
    if name == "file":
        return "file"
    return "none"


def _file_stem(alarm_id: str) -> str:
    """A file name for the alarm: the id itself when safe, else a sanitised id + hash."""
    if _SAFE_ID.fullmatch(alarm_id):
        return alarm_id
    digest = hashlib.sha256(alarm_id.encode("utf-8")).hexdigest()[:12]
    cleaned = _UNSAFE_CHARS.sub("_", alarm_id)[:60].lstrip(".")
    return f"{cleaned}-{digest}" if cleaned else digest


async def _probe(argv: list[str]) -> tuple[int, str] | None:
    """Run a short probe command; (returncode, stdout), or None if it could not run."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return None
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT_S):
            out, _ = await proc.communicate()
    except TimeoutError:
        return None
    finally:
        await _reap(proc)
    code = proc.returncode if proc.returncode is not None else -1
    return code, out.decode("utf-8", "replace")


async def _run_player(argv: list[str], limit_s: float) -> None:
    """Play one WAV with an external player; raise _PlaybackError on any failure."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise _PlaybackError(f"cannot run {argv[0]}: {exc}") from exc
    try:
        async with asyncio.timeout(limit_s):
            _, err = await proc.communicate()
    except TimeoutError as exc:
        raise _PlaybackError(f"{argv[0]} still playing after {limit_s:.1f}s") from exc
    finally:
        await _reap(proc)
    if proc.returncode != 0:
        raise _PlaybackError(
            f"{argv[0]} exited {proc.returncode}",
            returncode=proc.returncode,
            stderr=err.decode("utf-8", "replace").strip()[-_STDERR_KEEP:],
        )


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill the process if it still runs (timeout or cancellation) and wait for it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        # Shielded: a second cancellation must not leave a zombie behind.
        await asyncio.shield(proc.wait())
