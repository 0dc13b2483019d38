"""Command-center audible alert: alarm tone + Mandarin announcement, repeated until acknowledged.

Theory of operation
-------------------
Each alarm is rendered once (:func:`render_alert_wav`, in a worker thread) into
a single WAV: a two-tone alarm sound, a short silence, then espeak-ng speaking
the announcement. Rendering never depends on the audio device, so a broken
speaker cannot stop an alarm from being queued.

One playback loop task (owned by the player's TaskGroup) plays the active
alarms round robin, oldest first, one at a time so announcements never overlap
on the speaker. After each round it pauses ``repeat_interval_s``; a newly
started alarm cuts that pause short and is played at once. Acknowledging an
alarm (:meth:`AlertPlayer.stop`) removes it from the rotation and, if it is on
the speaker right now, kills its playback subprocess.

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
import wave
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

import numpy as np
import numpy.typing as npt
import structlog

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

_PLAYS_LOG: Final = "plays.log"
_PROBE_TIMEOUT_S: Final = 3.0
_MAX_CONCURRENT_RENDERS: Final = 2  # an alarm storm must not starve the default executor
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

    parts = [_two_tone(tone_hz, tone_s, sample_rate)]
    has_speech = False
    if text.strip():
        try:
            speech = _speak(path.parent, text, voice, espeak, speed_wpm, sample_rate, timeout_s)
        except _SpeechUnavailableError as exc:
            log.warning("alert.speech_unavailable", reason=str(exc), espeak=espeak, voice=voice)
        else:
            parts += [_silence(_GAP_S, sample_rate), speech]
            has_speech = True
    else:
        log.warning("alert.speech_unavailable", reason="blank text", espeak=espeak, voice=voice)
    parts.append(_silence(_TAIL_S, sample_rate))

    samples = np.concatenate(parts)
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2").tobytes()
    _write_wav_atomically(path, pcm, sample_rate)
    return RenderInfo(
        path=path,
        duration_s=len(samples) / sample_rate,
        sample_rate=sample_rate,
        has_speech=has_speech,
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
        samples, src_rate = _read_mono(tmp)
    finally:
        tmp.unlink(missing_ok=True)
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


class _PlaybackError(Exception):
    def __init__(self, reason: str, *, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.returncode = returncode
        self.stderr = stderr


@dataclass(slots=True)
class _Alert:
    alarm_id: str
    info: RenderInfo
    seq: int
    plays: int = 0
    consecutive_failures: int = 0
    stopped: bool = False


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
    """Plays every active alarm's WAV round robin until each one is acknowledged.

    Use as ``async with AlertPlayer(settings) as player:`` with the validated
    ``[alert]`` section (:class:`gateway.config.AlertSection`: backend, device,
    pauses, espeak-ng). ``sleep`` is the pause between rounds (inject a fast one in
    tests). Single use: it cannot be re-entered.
    """

    def __init__(
        self,
        settings: AlertSection,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._sleep = sleep
        self._backend: Backend = "none"
        self._wav_dir: Path | None = None
        self._owned_dir: Path | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._entered = False
        self._closed = False
        self._active: dict[str, _Alert] = {}  # insertion order == start order == seq order
        self._stopped: OrderedDict[str, _Alert] = OrderedDict()
        self._pending: dict[str, asyncio.Event] = {}  # alarm_id -> set when its render ends
        self._stop_requested: set[str] = set()  # acknowledged while still rendering
        self._playing: tuple[_Alert, asyncio.Task[None]] | None = None
        self._seq = itertools.count(1)
        self._last_seq = 0  # seq of the alarm played last in the current round
        self._round = 1
        # What is left to play in this round, oldest first; alarms that start during the
        # round join at the end. Finding the next alarm costs O(1), not a scan of the
        # rotation (a storm leaves hundreds of alarms in it).
        self._queue: deque[_Alert] = deque()
        self._wakeup = asyncio.Event()  # a new alarm became active
        self._changed = asyncio.Event()  # replaced on every play/stop; see _notify
        self._render_slots = asyncio.Semaphore(_MAX_CONCURRENT_RENDERS)

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
        self._closed = True
        try:
            if self._loop_task is not None:
                self._loop_task.cancel()
            if self._tg is not None:
                # Not the body's exception: TaskGroup would re-raise it wrapped in an
                # ExceptionGroup. The loop never fails on its own, so this only waits.
                await self._tg.__aexit__(None, None, None)
        finally:
            if self._active:
                log.warning("alert.closed", unacknowledged=tuple(self._active))
            else:
                log.info("alert.closed", unacknowledged=())
            if self._owned_dir is not None:
                await asyncio.to_thread(shutil.rmtree, self._owned_dir, True)
            self._notify()

    async def start(self, alarm_id: str, text: str) -> None:
        """Render the alarm's WAV (in a thread) and add it to the rotation.

        Idempotent per ``alarm_id``: an alarm already active, rendering or
        acknowledged is not started again.

        Raises:
            AlertError: the player is not running, ``alarm_id`` is empty, or the
                WAV could not be written.
        """
        if not self._entered or self._closed:
            raise AlertError("alert player is not running", alarm_id=alarm_id)
        if not alarm_id:
            raise AlertError("alarm_id must not be empty")
        if alarm_id in self._active or alarm_id in self._stopped:
            log.debug("alert.duplicate", alarm_id=alarm_id)
            return
        pending = self._pending.get(alarm_id)
        if pending is not None:
            await pending.wait()
            if alarm_id not in self._active and alarm_id not in self._stopped:
                raise AlertError("concurrent start of this alarm failed", alarm_id=alarm_id)
            return

        done = asyncio.Event()
        self._pending[alarm_id] = done
        try:
            path = self._dir() / f"{_file_stem(alarm_id)}.wav"
            if self._backend == "none":
                # Nothing will play it: no espeak-ng run, no WAV (about 30 ms of CPU per
                # alarm, which an alarm storm on a small machine cannot spare).
                info = RenderInfo(path=path, duration_s=0.0, sample_rate=0, has_speech=False)
            else:
                async with self._render_slots:
                    info = await asyncio.to_thread(
                        render_alert_wav,
                        path,
                        text,
                        voice=self._settings.voice,
                        espeak=self._settings.espeak,
                        timeout_s=self._settings.max_render_s,
                    )
            if self._closed:
                raise AlertError("alert player closed while rendering", alarm_id=alarm_id)
            alert = _Alert(alarm_id=alarm_id, info=info, seq=next(self._seq))
            log.info(
                "alert.started",
                alarm_id=alarm_id,
                duration_s=round(info.duration_s, 3),
                has_speech=info.has_speech,
            )
            if alarm_id in self._stop_requested:
                self._retire(alert)
                self._discard_wav(alert)
            else:
                self._active[alarm_id] = alert
                self._queue.append(alert)
                self._wakeup.set()
        finally:
            del self._pending[alarm_id]
            self._stop_requested.discard(alarm_id)
            done.set()
            self._notify()

    async def stop(self, alarm_id: str) -> bool:
        """Acknowledge: stop repeating the alarm, cutting its playback if it is on now.

        Returns False for an unknown ``alarm_id``; True otherwise (also when it was
        already acknowledged, or is still rendering: it will then never play).
        """
        if alarm_id in self._pending:
            self._stop_requested.add(alarm_id)
            return True
        alert = self._active.pop(alarm_id, None)
        if alert is None:
            return alarm_id in self._stopped
        # Retired before the first await, so a second acknowledgement arriving while
        # the cut is in progress sees a known alarm. A cancelled play is never counted,
        # so the plays logged here are final.
        self._retire(alert)
        self._notify()
        playing = self._playing
        if playing is not None and playing[0] is alert:
            playing[1].cancel()
            await asyncio.wait({playing[1]})
        self._discard_wav(alert)
        return True

    def active_count(self) -> int:
        """How many alarms are in the rotation."""
        return len(self._active)

    def active(self) -> tuple[str, ...]:
        """Alarm ids in the rotation (rendered, not yet acknowledged), oldest first."""
        return tuple(self._active)

    def plays(self, alarm_id: str) -> int:
        """How many times the alarm has been played successfully (0 if unknown)."""
        alert = self._active.get(alarm_id) or self._stopped.get(alarm_id)
        return alert.plays if alert is not None else 0

    async def wait_played(
        self,
        alarm_id: str,
        times: int = 1,
        timeout: float = 5.0,
    ) -> None:
        """Wait until the alarm has been played ``times`` times.

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
                    pending = self._pending.get(alarm_id)
                    if pending is None:
                        raise AlertError("unknown alarm", alarm_id=alarm_id)
                    await pending.wait()
                    continue
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

    def _discard_wav(self, alert: _Alert) -> None:
        # The "file" backend's WAVs in a configured output_dir are its observable
        # output and stay; private render files would otherwise pile up.
        if self._backend != "file" or self._owned_dir is not None:
            alert.info.path.unlink(missing_ok=True)

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
        alert = self._next_alert()
        if alert is not None:
            self._last_seq = alert.seq
            await self._play_once(alert)
            return
        if not self._active:
            self._wakeup.clear()
            await self._wakeup.wait()
            self._start_round()
            return
        if not await self._pause(self._settings.repeat_interval_s):
            self._start_round()
        # Interrupted: keep the round going, so the new alarm (highest seq) plays next.

    def _start_round(self) -> None:
        self._last_seq = 0
        self._round += 1
        self._queue = deque(self._active.values())

    def _next_alert(self) -> _Alert | None:
        queue = self._queue
        while queue:
            alert = queue.popleft()
            # Skip alarms acknowledged since they were queued.
            if alert.seq > self._last_seq and self._active.get(alert.alarm_id) is alert:
                return alert
        return None

    async def _pause(self, seconds: float) -> bool:
        """Sleep between rounds; True if a new alarm cut the pause short."""
        self._wakeup.clear()
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        waker = asyncio.ensure_future(self._wakeup.wait())
        try:
            done, _ = await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)
        if sleeper in done and not sleeper.cancelled():
            sleeper.result()  # surface an error from an injected sleep to the loop
        return waker in done and not waker.cancelled()

    async def _play_once(self, alert: _Alert) -> None:
        # A child task so that stop() can cut exactly this play without touching the loop.
        task = asyncio.create_task(self._play(alert), name=f"alert-play-{alert.alarm_id}")
        self._playing = (alert, task)
        try:
            await asyncio.wait({task})
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
            self._playing = None
        if not task.cancelled():
            task.result()  # re-raise a bug (playback failures are handled inside)

    async def _play(self, alert: _Alert) -> None:
        backend = self._backend
        failure: _PlaybackError | None = None
        try:
            if backend == "file":
                self._record_file_play(alert)
            elif backend in ("aplay", "paplay"):
                limit_s = alert.info.duration_s + self._settings.playback_margin_s
                await _run_player(self._player_argv(alert.info.path), limit_s)
        except _PlaybackError as exc:
            failure = exc
        if failure is not None:
            # An expected, recoverable condition: the reason and stderr say it all,
            # a traceback would only bury them.
            alert.consecutive_failures += 1
            log.error(
                "alert.playback_failed",
                alarm_id=alert.alarm_id,
                backend=backend,
                reason=failure.reason,
                returncode=failure.returncode,
                stderr=failure.stderr,
                consecutive_failures=alert.consecutive_failures,
            )
            return
        alert.plays += 1  # no await since the file backend logged it: count and log agree
        alert.consecutive_failures = 0
        log.info(
            "alert.played",
            alarm_id=alert.alarm_id,
            round=self._round,
            plays=alert.plays,
            backend=backend,
        )
        self._notify()

    def _record_file_play(self, alert: _Alert) -> None:
        # Synchronous on purpose: the count and the log line change together, with no
        # await in between, so a stop() can never fall between them. One short append.
        entry = {
            "ts": datetime.now(UTC).isoformat(),
            "alarm_id": alert.alarm_id,
            "play": alert.plays + 1,
            "round": self._round,
            "wav": alert.info.path.name,
        }
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
