"""Tests for the command-center audible alert (gateway.alert).

Rendering runs the real espeak-ng and checks the WAVs with the ``wave`` module.
Playback runs real subprocesses: aplay on ALSA's ``null`` device or a bogus
device, and small shell scripts standing in for a player that hangs (so a cut
or a timeout can be observed by its pid). The pause between rounds is injected.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import time
import wave
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from gateway.alert import (
    AlertError,
    AlertPlayer,
    RenderInfo,
    remove_orphaned_render_dirs,
    render_alert_wav,
)
from gateway.config import AlertSection, ConfigError, parse_config
from tests.support import pulse

SENTENCE = "紧急呼叫。张秀英，建设社区，胜利路12号3单元。"
SHORT = "紧急呼叫。张秀英。"
TONE_S = 1.2
GAP_S = 0.3
RATE = 22050

ESPEAK = shutil.which("espeak-ng")
APLAY = shutil.which("aplay")
needs_espeak = pytest.mark.skipif(ESPEAK is None, reason="espeak-ng not installed")
needs_aplay = pytest.mark.skipif(APLAY is None, reason="aplay not installed")


# -- helpers ---------------------------------------------------------------------------


def read_wav(path: Path) -> tuple[Any, npt.NDArray[np.int16]]:
    with wave.open(str(path), "rb") as w:
        params = w.getparams()
        frames = w.readframes(params.nframes)
    return params, np.frombuffer(frames, dtype="<i2")


def rms(samples: npt.NDArray[np.int16]) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


def peak_hz(samples: npt.NDArray[np.int16], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    return float(np.argmax(spectrum) * rate / len(samples))


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def play_log(out: Path) -> list[dict[str, Any]]:
    path = out / "plays.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def wait_for(predicate: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Poll a condition that has no event to await (a file, a log line)."""
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - files and log lines cannot be awaited
            await asyncio.sleep(0.005)


def wav_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.wav"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class FastSleep:
    """Injected pause between rounds: records the request and just yields."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self._changed = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self._changed.set()
        self._changed = asyncio.Event()
        await asyncio.sleep(0)

    async def wait_calls(self, n: int, limit_s: float = 5.0) -> None:
        async with asyncio.timeout(limit_s):
            while len(self.calls) < n:
                await self._changed.wait()


class BlockingSleep:
    """Injected pause that never ends by itself: only a new alarm can cut it short."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, seconds: float) -> None:
        self.calls += 1
        await asyncio.Event().wait()


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(0o755)
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def hanging_aplay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put an ``aplay`` first on PATH that logs its pid and then plays 'forever'."""
    pidfile = tmp_path / "aplay.pids"
    bindir = tmp_path / "bin"
    write_script(bindir / "aplay", f'echo $$ >> "{pidfile}"\nexec sleep 30\n')
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return pidfile


def pids(pidfile: Path) -> list[int]:
    if not pidfile.exists():
        return []
    return [int(x) for x in pidfile.read_text().split()]


# -- rendering -------------------------------------------------------------------------


@pytest.mark.integration
@needs_espeak
def test_render_chinese_announcement_is_tone_then_speech(tmp_path: Path) -> None:
    path = tmp_path / "alarm.wav"
    with capture_logs() as logs:
        info = render_alert_wav(path, SENTENCE)

    params, pcm = read_wav(path)
    assert (params.nchannels, params.sampwidth, params.framerate) == (1, 2, RATE)
    assert params.comptype == "NONE"
    duration = params.nframes / params.framerate
    assert info == RenderInfo(path=path, duration_s=info.duration_s, sample_rate=RATE,
                              has_speech=True)
    assert info.duration_s == pytest.approx(duration, abs=1e-3)
    # A 20-syllable Chinese sentence takes seconds to say, not a blip.
    assert TONE_S + 2.0 < duration < 60.0

    tone = pcm[: int(TONE_S * RATE)]
    gap = pcm[int(TONE_S * RATE) + 1 : int((TONE_S + GAP_S) * RATE) - 1]
    speech = pcm[int((TONE_S + GAP_S) * RATE) :]
    assert rms(tone) > 8000  # a 0.6 full-scale sine is ~13,900 RMS
    assert not gap.any()
    assert rms(speech) > 300
    assert events(logs, "alert.speech_unavailable") == []


@pytest.mark.integration
@needs_espeak
def test_render_tone_alternates_between_the_two_frequencies(tmp_path: Path) -> None:
    info = render_alert_wav(tmp_path / "a.wav", SHORT, tone_hz=(1000.0, 500.0))
    _, pcm = read_wav(info.path)
    segment = int(0.25 * RATE)
    first, second, third = (pcm[i * segment : (i + 1) * segment] for i in range(3))
    assert peak_hz(first, RATE) == pytest.approx(1000.0, abs=10)
    assert peak_hz(second, RATE) == pytest.approx(500.0, abs=10)
    assert peak_hz(third, RATE) == pytest.approx(1000.0, abs=10)


@pytest.mark.integration
@needs_espeak
def test_render_resamples_speech_to_the_requested_rate(tmp_path: Path) -> None:
    native = render_alert_wav(tmp_path / "native.wav", SHORT)
    low = render_alert_wav(tmp_path / "low.wav", SHORT, sample_rate=16000)

    params, pcm = read_wav(low.path)
    assert (params.nchannels, params.sampwidth, params.framerate) == (1, 2, 16000)
    assert low.sample_rate == 16000
    assert low.has_speech
    # Same speech, different rate: same length in seconds.
    assert low.duration_s == pytest.approx(native.duration_s, rel=0.01)
    assert rms(pcm[int((TONE_S + GAP_S) * 16000) :]) > 300


@pytest.mark.integration
def test_render_without_espeak_is_a_valid_tone_only_wav(tmp_path: Path) -> None:
    with capture_logs() as logs:
        info = render_alert_wav(tmp_path / "a.wav", SENTENCE, espeak="/nonexistent/espeak-ng")

    assert not info.has_speech
    params, pcm = read_wav(info.path)
    assert (params.nchannels, params.sampwidth, params.framerate) == (1, 2, RATE)
    assert TONE_S <= info.duration_s < TONE_S + 0.5
    assert rms(pcm[: int(TONE_S * RATE)]) > 8000
    [warning] = events(logs, "alert.speech_unavailable")
    assert warning["log_level"] == "warning"
    assert "not found" in warning["reason"]


@pytest.mark.integration
@needs_espeak
def test_render_with_failing_espeak_falls_back_to_tone(tmp_path: Path) -> None:
    with capture_logs() as logs:
        info = render_alert_wav(tmp_path / "a.wav", SHORT, voice="nosuchvoice")
    assert not info.has_speech
    assert info.path.exists()
    [warning] = events(logs, "alert.speech_unavailable")
    assert "exited 1" in warning["reason"]


@pytest.mark.integration
@needs_espeak
def test_render_text_is_never_parsed_as_espeak_options(tmp_path: Path) -> None:
    info = render_alert_wav(tmp_path / "a.wav", "-v en 紧急呼叫")
    assert info.has_speech


@pytest.mark.integration
def test_render_blank_text_is_tone_only(tmp_path: Path) -> None:
    with capture_logs() as logs:
        info = render_alert_wav(tmp_path / "a.wav", "   ")
    assert not info.has_speech
    assert events(logs, "alert.speech_unavailable")[0]["reason"] == "blank text"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sample_rate": 1000},
        {"tone_hz": (880.0, 20000.0)},
        {"tone_hz": (0.0, 660.0)},
        {"tone_s": 0.0},
        {"tone_s": float("nan")},
        {"speed_wpm": 10},
        {"timeout_s": 0.0},
    ],
)
def test_render_rejects_invalid_parameters(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    path = tmp_path / "a.wav"
    with pytest.raises(AlertError) as caught:
        render_alert_wav(path, SHORT, **kwargs)
    assert caught.value.path == path
    assert not path.exists()


@pytest.mark.parametrize("parent", ["not-a-dir", "missing"])
def test_render_needs_an_existing_directory(tmp_path: Path, parent: str) -> None:
    (tmp_path / "not-a-dir").write_text("x")
    path = tmp_path / parent / "a.wav"
    with pytest.raises(AlertError, match="does not exist") as caught:
        render_alert_wav(path, SHORT, espeak="/nonexistent/espeak-ng")
    assert caught.value.path == path


def test_render_that_cannot_replace_the_target_is_an_alert_error(tmp_path: Path) -> None:
    target = tmp_path / "a.wav"
    (target / "occupied").mkdir(parents=True)  # a non-empty directory where the WAV goes
    with pytest.raises(AlertError, match="cannot write alert WAV") as caught:
        render_alert_wav(target, SHORT, espeak="/nonexistent/espeak-ng")
    assert caught.value.path == target
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]  # no temp file left behind


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backend": "alsa"},
        {"repeat_interval_s": -1.0},
        {"max_render_s": 0.0},
        {"playback_margin_s": float("inf")},
        {"voice": ""},
        {"device": ""},
        {"summary_over": -1},
        {"max_wav_files": 0},
    ],
)
def test_settings_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=next(iter(kwargs))):
        AlertSection(**kwargs)


def test_settings_come_from_the_config_file(tmp_path: Path) -> None:
    data = {
        "sms": {"from_number": "+15005550006"},
        "alert": {"repeat_interval_s": 0, "max_render_s": 4, "playback_margin_s": 1.5,
                  "espeak": "/opt/espeak-ng/bin/espeak-ng", "device": "plughw:1,0",
                  "summary_over": 5, "max_wav_files": 8},
    }
    alert = parse_config(data, tmp_path / "gateway.toml").model.alert
    assert alert == AlertSection(repeat_interval_s=0.0, max_render_s=4.0, playback_margin_s=1.5,
                                 espeak="/opt/espeak-ng/bin/espeak-ng", device="plughw:1,0",
                                 summary_over=5, max_wav_files=8)
    assert (alert.backend, alert.voice) == ("auto", "cmn")
    with pytest.raises(ConfigError) as caught:
        parse_config({**data, "alert": {"max_render_s": 0}}, tmp_path / "gateway.toml")
    assert caught.value.key == "alert.max_render_s"


# -- player: rotation --------------------------------------------------------------------


@pytest.mark.integration
@needs_espeak
async def test_file_backend_repeats_an_alarm_until_it_is_stopped(out: Path) -> None:
    settings = AlertSection(backend="file", output_dir=out, repeat_interval_s=0.5)
    sleep = FastSleep()
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=sleep) as player:
            assert player.backend == "file"
            await player.start("A1", SHORT)
            assert player.active() == ("A1",)
            await player.wait_played("A1", 3)
            assert await player.stop("A1") is True
            plays = player.plays("A1")
            assert player.active() == ()

    assert plays >= 3
    assert player.plays("A1") == plays
    assert set(sleep.calls) == {0.5}
    params, _ = read_wav(out / "A1.wav")
    assert (params.nchannels, params.sampwidth) == (1, 2)
    entries = play_log(out)
    assert [e["play"] for e in entries] == list(range(1, plays + 1))
    assert {e["alarm_id"] for e in entries} == {"A1"}

    [started] = events(logs, "alert.started")
    assert started["alarm_id"] == "A1"
    [rendered] = events(logs, "alert.rendered")  # once: the repeats reuse the WAV
    assert rendered["item"] == "A1"
    assert rendered["has_speech"] is True
    assert rendered["duration_s"] > TONE_S + 0.5
    played = events(logs, "alert.played")
    assert len(played) == plays
    assert {(e["alarm_id"], e["backend"]) for e in played} == {("A1", "file")}
    assert [e["plays"] for e in played] == list(range(1, plays + 1))
    [stopped] = events(logs, "alert.stopped")
    assert (stopped["alarm_id"], stopped["plays"]) == ("A1", plays)
    assert events(logs, "alert.backend")[0]["backend"] == "file"


@pytest.mark.integration
@needs_espeak
async def test_two_alarms_alternate_and_stopping_one_leaves_the_other(out: Path) -> None:
    settings = AlertSection(backend="file", output_dir=out, repeat_interval_s=0.0)
    async with AlertPlayer(settings, sleep=FastSleep()) as player:
        await player.start("A", SHORT)
        await player.wait_played("A", 1)
        await player.start("B", "紧急呼叫。王建国。")
        await player.wait_played("B", 4)
        assert player.active() == ("A", "B")

        ids = [e["alarm_id"] for e in play_log(out)]
        first_b = ids.index("B")
        together = ids[first_b:]
        assert all(x != y for x, y in itertools.pairwise(together))

        assert await player.stop("A") is True
        mark = len(play_log(out))
        a_plays = player.plays("A")
        await player.wait_played("B", player.plays("B") + 3)
        assert player.active() == ("B",)

    later = [e["alarm_id"] for e in play_log(out)[mark:]]
    assert len(later) >= 3
    assert set(later) == {"B"}
    assert player.plays("A") == a_plays


@pytest.mark.integration
@needs_espeak
async def test_each_round_plays_every_alarm_in_the_rotation_once_oldest_first(
    out: Path,
) -> None:
    """Reminder rounds go oldest first; an alarm not yet heard goes before them, the
    newest first (issue 13: the center hears the latest press at once)."""
    settings = AlertSection(backend="file", output_dir=out, repeat_interval_s=0.0,
                            summary_over=10)
    order = ["A", "B", "C", "D", "E"]
    async with AlertPlayer(settings, sleep=FastSleep()) as player:
        for alarm in order[:4]:
            await player.start(alarm, SHORT)
        await player.wait_played("D", 2)  # the last of the first reminder round
        await player.stop("B")  # acknowledged in the middle of the rotation
        mark = len(play_log(out))
        await player.start("E", SHORT)  # a new alarm joins
        await player.wait_played("E", 3)
        assert "E" in [e["alarm_id"] for e in play_log(out)[mark:mark + 2]]  # next, or so
        await player.stop("C")
        await player.wait_played("E", player.plays("E") + 2)
        assert player.active() == ("A", "D", "E")
        assert player.active_count() == 3

    entries = play_log(out)
    firsts = [e["alarm_id"] for e in entries if e["play"] == 1]
    assert firsts == ["D", "C", "B", "A", "E"]
    rounds: dict[int, list[str]] = {}
    for entry in entries:
        rounds.setdefault(entry["round"], []).append(entry["alarm_id"])
    for played in rounds.values():
        assert len(played) == len(set(played))  # once each
    # A reminder round, oldest first (E, started at its end, may join it).
    assert any(r[:4] == ["A", "B", "C", "D"] for r in rounds.values())
    assert ["A", "C", "D", "E"] in rounds.values()  # B gone, E joined
    assert ["A", "D", "E"] in rounds.values()
    last = rounds[max(rounds)]
    assert "B" not in last and "C" not in last


@pytest.mark.integration
@needs_espeak
async def test_a_new_alarm_cuts_the_pause_between_rounds_short(out: Path) -> None:
    settings = AlertSection(backend="file", output_dir=out, repeat_interval_s=600.0)
    sleep = BlockingSleep()
    async with AlertPlayer(settings, sleep=sleep) as player:
        await player.start("A", SHORT)
        await player.wait_played("A", 1)
        await wait_for(lambda: sleep.calls == 1)  # now in the 600 s pause

        await player.start("B", SHORT)
        await player.wait_played("B", 1)
        # The new alarm was played at once; the old one waits for the next round.
        assert player.plays("A") == 1
        assert [e["alarm_id"] for e in play_log(out)] == ["A", "B"]


@pytest.mark.integration
@needs_espeak
async def test_start_is_idempotent_per_alarm_id(out: Path) -> None:
    settings = AlertSection(backend="file", output_dir=out, repeat_interval_s=600.0)
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=BlockingSleep()) as player:
            await asyncio.gather(player.start("A", SHORT), player.start("A", SHORT))
            await player.start("A", "another text")
            assert player.active() == ("A",)
            await player.stop("A")
            await player.start("A", SHORT)  # an acknowledged alarm does not come back
            assert player.active() == ()
    assert len(events(logs, "alert.started")) == 1


@pytest.mark.integration
async def test_stop_reports_unknown_alarms_and_is_idempotent(out: Path) -> None:
    settings = AlertSection(backend="file", output_dir=out, espeak="/nonexistent/espeak-ng")
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=BlockingSleep()) as player:
            assert await player.stop("nope") is False
            await player.start("A", SHORT)
            assert await player.stop("A") is True
            assert await player.stop("A") is True
            assert player.plays("nope") == 0
    assert len(events(logs, "alert.stopped")) == 1


@pytest.mark.integration
async def test_wait_played_errors_are_typed(out: Path) -> None:
    settings = AlertSection(backend="file", output_dir=out, espeak="/nonexistent/espeak-ng")
    async with AlertPlayer(settings, sleep=BlockingSleep()) as player:
        with pytest.raises(AlertError) as unknown:
            await player.wait_played("nope")
        assert unknown.value.alarm_id == "nope"

        await player.start("A", SHORT)
        await player.wait_played("A", 1)
        # The pause never ends, so a second play cannot come.
        with pytest.raises(TimeoutError):
            await player.wait_played("A", 2, timeout=0.05)

        waiter = asyncio.create_task(player.wait_played("A", 2))
        await asyncio.sleep(0)
        await player.stop("A")
        with pytest.raises(AlertError, match="acknowledged after 1 of 2 plays"):
            await waiter


@pytest.mark.integration
async def test_stop_while_rendering_means_it_never_plays(tmp_path: Path, out: Path) -> None:
    started = tmp_path / "espeak.started"
    release = tmp_path / "espeak.release"
    slow_espeak = write_script(
        tmp_path / "bin" / "slow-espeak",
        f'touch "{started}"\nwhile [ ! -e "{release}" ]; do sleep 0.01; done\nexit 1\n',
    )
    settings = AlertSection(backend="file", output_dir=out, espeak=str(slow_espeak))
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=BlockingSleep()) as player:
            starting = asyncio.create_task(player.start("A", SHORT))
            await wait_for(started.exists)
            assert await player.stop("A") is True
            release.touch()
            await starting
            assert player.active() == ()
            assert player.plays("A") == 0
    assert play_log(out) == []
    [stopped] = events(logs, "alert.stopped")
    assert stopped["plays"] == 0


async def test_start_needs_a_running_player(out: Path) -> None:
    player = AlertPlayer(AlertSection(backend="none"))
    with pytest.raises(AlertError, match="not running"):
        await player.start("A", SHORT)
    async with player:
        pass
    with pytest.raises(AlertError, match="not running"):
        await player.start("A", SHORT)
    with pytest.raises(AlertError, match="entered twice"):
        await player.__aenter__()


@pytest.mark.integration
async def test_alarm_ids_cannot_escape_the_output_dir(out: Path) -> None:
    settings = AlertSection(backend="file", output_dir=out, espeak="/nonexistent/espeak-ng")
    async with AlertPlayer(settings, sleep=BlockingSleep()) as player:
        await player.start("../../evil/x", SHORT)
        await player.wait_played("../../evil/x", 1)
    wavs = wav_files(out)
    assert len(wavs) == 1
    assert wavs[0].parent == out
    assert not (out.parent.parent / "evil").exists()
    assert play_log(out)[0]["alarm_id"] == "../../evil/x"


@pytest.mark.integration
async def test_none_backend_only_logs(tmp_path: Path) -> None:
    settings = AlertSection(backend="none", espeak="/nonexistent/espeak-ng")
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=FastSleep()) as player:
            await player.start("A", SHORT)
            await player.wait_played("A", 2)
            workdir = player.output_dir
    assert {e["backend"] for e in events(logs, "alert.played")} == {"none"}
    assert workdir is not None
    assert not workdir.exists()  # its private render dir is removed on exit


@pytest.mark.integration
async def test_loop_survives_an_unexpected_error(out: Path) -> None:
    calls = 0

    async def flaky_sleep(seconds: float) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("clock broke")
        await asyncio.sleep(0)

    settings = AlertSection(backend="file", output_dir=out, espeak="/nonexistent/espeak-ng")
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=flaky_sleep) as player:
            await player.start("A", SHORT)
            await player.wait_played("A", 3)
    [error] = events(logs, "alert.loop_error")
    assert error["log_level"] == "error"


# -- player: real subprocesses -----------------------------------------------------------


@pytest.mark.integration
@needs_aplay
async def test_aplay_backend_plays_through_a_working_device(out: Path) -> None:
    settings = AlertSection(backend="aplay", device="null", repeat_interval_s=0.0,
                             espeak="/nonexistent/espeak-ng")
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=FastSleep()) as player:
            await player.start("A", SHORT)
            await player.wait_played("A", 2)
    assert events(logs, "alert.playback_failed") == []
    assert {e["backend"] for e in events(logs, "alert.played")} == {"aplay"}


@pytest.mark.integration
@needs_aplay
async def test_failing_audio_device_is_logged_retried_and_never_raises(out: Path) -> None:
    settings = AlertSection(backend="aplay", device="no_such_device", repeat_interval_s=0.0,
                             espeak="/nonexistent/espeak-ng")
    sleep = FastSleep()
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=sleep) as player:
            await player.start("A", SHORT)
            await sleep.wait_calls(3)  # three rounds went by
            failures = events(logs, "alert.playback_failed")
            assert len(failures) >= 2
            assert player.active() == ("A",)
            assert player.plays("A") == 0
            assert await player.stop("A") is True

    first = failures[0]
    assert first["log_level"] == "error"
    assert (first["alarm_id"], first["backend"]) == ("A", "aplay")
    assert first["returncode"] not in (0, None)
    assert "no_such_device" in first["stderr"]
    assert [f["consecutive_failures"] for f in failures[:2]] == [1, 2]
    assert events(logs, "alert.played") == []


@pytest.mark.integration
@needs_espeak
async def test_missing_player_binary_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert ESPEAK is not None
    settings = AlertSection(backend="aplay", repeat_interval_s=0.0, espeak=ESPEAK)
    sleep = FastSleep()
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=sleep) as player:
            await player.start("A", SHORT)
            await sleep.wait_calls(2)
            assert player.active() == ("A",)
    failures = events(logs, "alert.playback_failed")
    assert failures
    assert "cannot run aplay" in failures[0]["reason"]
    assert events(logs, "alert.rendered")[0]["has_speech"] is True


@pytest.mark.integration
async def test_stop_cuts_the_alarm_on_the_speaker_and_the_next_one_plays(
    hanging_aplay: Path,
) -> None:
    settings = AlertSection(backend="aplay", playback_margin_s=60.0,
                             espeak="/nonexistent/espeak-ng")
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=FastSleep()) as player:
            await player.start("A", SHORT)
            await player.start("B", SHORT)
            await wait_for(lambda: len(pids(hanging_aplay)) == 1)
            [b_pid] = pids(hanging_aplay)  # the newest is announced first
            assert pid_alive(b_pid)

            assert await player.stop("B") is True
            assert not pid_alive(b_pid)
            await wait_for(lambda: len(pids(hanging_aplay)) == 2)  # A is on the speaker
            assert player.active() == ("A",)
    assert events(logs, "alert.playback_failed") == []
    assert [(e["alarm_id"], e["plays"]) for e in events(logs, "alert.stopped")] == [("B", 0)]


@pytest.mark.integration
async def test_concurrent_acknowledgements_of_a_playing_alarm_both_succeed(
    hanging_aplay: Path,
) -> None:
    settings = AlertSection(backend="aplay", playback_margin_s=60.0,
                             espeak="/nonexistent/espeak-ng")
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=FastSleep()) as player:
            await player.start("A", SHORT)
            await wait_for(lambda: len(pids(hanging_aplay)) == 1)
            wav = player.output_dir / "A.wav" if player.output_dir else None
            assert wav is not None
            assert wav.exists()
            assert list(await asyncio.gather(player.stop("A"), player.stop("A"))) == [True, True]
            assert not pid_alive(pids(hanging_aplay)[0])
            assert not wav.exists()  # private render files are removed once cut
    assert len(events(logs, "alert.stopped")) == 1


@pytest.mark.integration
async def test_exit_kills_playback_and_leaves_no_task_behind(hanging_aplay: Path) -> None:
    settings = AlertSection(backend="aplay", playback_margin_s=60.0,
                             espeak="/nonexistent/espeak-ng")
    with capture_logs() as logs:
        async with AlertPlayer(settings) as player:
            await player.start("A", SHORT)
            await wait_for(lambda: len(pids(hanging_aplay)) == 1)
            workdir = player.output_dir
    [pid] = pids(hanging_aplay)
    assert not pid_alive(pid)
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert workdir is not None
    assert not workdir.exists()
    [closed] = events(logs, "alert.closed")
    assert closed["unacknowledged"] == ("A",)


@pytest.mark.integration
async def test_a_player_that_hangs_is_timed_out_and_retried(hanging_aplay: Path) -> None:
    # Tone-only WAV (~1.4 s) and no margin: the timeout is the WAV's own length.
    settings = AlertSection(backend="aplay", playback_margin_s=0.0, repeat_interval_s=0.0,
                             espeak="/nonexistent/espeak-ng")
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=FastSleep()) as player:
            await player.start("A", SHORT)
            await wait_for(lambda: bool(events(logs, "alert.playback_failed")), limit_s=10.0)
            await wait_for(lambda: len(pids(hanging_aplay)) == 2)  # retried
    [failure, *_] = events(logs, "alert.playback_failed")
    assert "still playing after" in failure["reason"]
    assert not any(pid_alive(p) for p in pids(hanging_aplay))


@pytest.mark.integration
@pytest.mark.parametrize(
    ("backend", "device", "expected_args"),
    [
        ("aplay", None, ["-q"]),
        ("aplay", "plughw:1,0", ["-q", "-D", "plughw:1,0"]),
        ("paplay", None, []),
        ("paplay", "alarm_sink", ["--device=alarm_sink"]),
    ],
)
async def test_player_command_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
    device: str | None,
    expected_args: list[str],
) -> None:
    argsfile = tmp_path / "args"
    bindir = tmp_path / "bin"
    write_script(bindir / backend, f'for a in "$@"; do echo "$a" >> "{argsfile}"; done\n')
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    settings = AlertSection(backend=backend, device=device, espeak="/nonexistent/espeak-ng")
    async with AlertPlayer(settings, sleep=BlockingSleep()) as player:
        await player.start("A", SHORT)
        await player.wait_played("A", 1)
        workdir = player.output_dir
        assert workdir is not None
    assert argsfile.read_text().splitlines() == [*expected_args, str(workdir / "A.wav")]


# -- backend selection ----------------------------------------------------------------


@pytest.mark.integration
async def test_auto_falls_back_to_file_without_sound_system(
    tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    settings = AlertSection(output_dir=out, espeak="/nonexistent/espeak-ng")
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=BlockingSleep()) as player:
            assert player.backend == "file"
            await player.start("A", SHORT)
            await player.wait_played("A", 1)
    assert (out / "A.wav").exists()
    assert [e["alarm_id"] for e in play_log(out)] == ["A"]
    [chosen] = events(logs, "alert.backend")
    assert chosen["backend"] == "file"
    assert chosen["output_dir"] == str(out)


@pytest.mark.integration
async def test_auto_without_output_dir_uses_a_private_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    settings = AlertSection(espeak="/nonexistent/espeak-ng")
    async with AlertPlayer(settings, sleep=BlockingSleep()) as player:
        await player.start("A", SHORT)
        await player.wait_played("A", 1)
        workdir = player.output_dir
        assert workdir is not None
        assert play_log(workdir)[0]["alarm_id"] == "A"
    assert not workdir.exists()


CARD = "echo 'card 0: PCH [HDA Intel PCH], device 0: ALC897 Analog [ALC897 Analog]'\n"
NO_CARD = "echo 'aplay: device_list:274: no soundcards found...' >&2\n"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("pactl", "paplay", "aplay", "expected"),
    [
        ("exit 0\n", True, CARD, "paplay"),
        ("exit 0\n", True, None, "paplay"),
        ("exit 0\n", False, CARD, "aplay"),  # a server but no paplay binary
        ("exit 1\n", True, CARD, "aplay"),
        (None, False, CARD, "aplay"),
        ("exit 1\n", True, NO_CARD, "file"),
        (None, False, None, "file"),
    ],
)
async def test_auto_probes_pulseaudio_then_alsa(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pactl: str | None,
    paplay: bool,
    aplay: str | None,
    expected: str,
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if pactl is not None:
        write_script(bindir / "pactl", pactl)
    if paplay:
        write_script(bindir / "paplay", "exit 0\n")
    if aplay is not None:
        write_script(bindir / "aplay", aplay)
    # Only the fakes: the machine's own sound tools must not decide the outcome.
    monkeypatch.setenv("PATH", str(bindir))
    with capture_logs() as logs:
        async with AlertPlayer(AlertSection(output_dir=tmp_path / "out")) as player:
            assert player.backend == expected
    [chosen] = events(logs, "alert.backend")
    assert chosen["backend"] == expected
    assert chosen["reason"]


def test_render_folders_of_dead_gateways_are_removed_at_start(tmp_path: Path) -> None:
    """A gateway killed (or stopped past its deadline) leaves its render folder behind;
    the next start removes it, and only it (issue 13: orphaned temp folders)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / f"gateway-alert-{dead.pid}-x1"
    alive = tmp_path / f"gateway-alert-{os.getpid()}-x2"
    other = tmp_path / "gateway-alert-notapid"
    for folder in (orphan, alive, other):
        folder.mkdir()
        (folder / "A1.wav").write_bytes(b"RIFF")
    assert remove_orphaned_render_dirs(tmp_path) == [orphan]
    assert not orphan.exists() and alive.exists() and other.exists()


# -- storms (issue 13) -------------------------------------------------------------------


def speaker_log(path: Path) -> list[tuple[float, int, str]]:
    """(time, pid, WAV name) of every play the ``speaker`` fixture started."""
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(float(t), int(pid), name) for t, pid, name in rows]


@pytest.fixture
def speaker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``aplay`` first on PATH that logs when it starts which WAV, then plays
    'forever' (a speaker busy with a long announcement)."""
    logfile = tmp_path / "speaker.log"
    bindir = tmp_path / "bin"
    stamp = f"{shutil.which('date') or 'date'} +%s.%N"
    write_script(bindir / "aplay", f'for last in "$@"; do :; done\n'
                 f'echo "$({stamp}) $$ $(basename "$last")" >> "{logfile}"\nexec sleep 30\n')
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return logfile


def summary_entries(out: Path) -> list[dict[str, Any]]:
    return [e for e in play_log(out) if e.get("kind") == "summary"]


@pytest.mark.integration
@needs_espeak
async def test_a_backlog_is_announced_as_one_summary_naming_the_newest(
    tmp_path: Path, out: Path
) -> None:
    settings = AlertSection(backend="file", output_dir=out, repeat_interval_s=0.0,
                            summary_over=3)
    ids = [f"S{i}" for i in range(10)]
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=FastSleep()) as player:
            for alarm_id in ids:
                await player.start(alarm_id, SENTENCE)
            await player.wait_played(ids[0], 1)  # heard in the summary
            [first, *_] = summary_entries(out)
            assert first["count"] == first["covered"] == 10
            assert first["wav"] == "_summary.wav"
            assert all(player.plays(a) >= 1 for a in ids)
            assert wav_files(out) == [out / "_summary.wav"]  # no per-alarm WAV rendered

            # The backlog shrinks to summary_over: each alarm is announced again.
            for alarm_id in ids[:7]:
                await player.stop(alarm_id)
            mark = len(play_log(out))
            await player.wait_played("S9", player.plays("S9") + 2)
            await player.wait_played("S7", player.plays("S7") + 1)

    later = play_log(out)[mark:]
    assert {e.get("alarm_id") for e in later if e["kind"] == "alarm"} == {"S7", "S8", "S9"}
    assert all(e["kind"] == "alarm" for e in later[1:])  # a summary at most just after
    summary = next(e for e in events(logs, "alert.rendered") if e["item"] == "summary")
    assert summary["has_speech"] is True
    # "紧急求助：共10起，最新：" + the newest alarm's text: longer than that text alone.
    alone = render_alert_wav(tmp_path / "alone.wav", SENTENCE)
    params, samples = read_wav(out / "_summary.wav")
    duration = params.nframes / params.framerate
    assert duration > alone.duration_s + 1.0
    assert rms(samples[int((TONE_S + GAP_S) * RATE):]) > 300  # speech, not silence


@pytest.mark.integration
@needs_espeak
async def test_a_new_alarm_is_heard_within_a_second_while_another_plays(speaker: Path) -> None:
    """The speaker is busy with a long announcement (it never ends): a new alarm cuts
    it after _CUT_AFTER_S, and the cut one is announced again after it."""
    settings = AlertSection(backend="aplay", playback_margin_s=60.0, espeak=ESPEAK or "")
    async with AlertPlayer(settings, sleep=BlockingSleep()) as player:
        await player.start("A", SENTENCE)
        await wait_for(lambda: len(speaker_log(speaker)) == 1)
        await asyncio.sleep(1.0)  # A has been on the speaker for a while
        await player.start("B", SENTENCE)
        # A never ends by itself: B on the speaker means A was cut for it (how soon is
        # measured by bench/, not asserted here: shared machines are noisy).
        await wait_for(lambda: len(speaker_log(speaker)) == 2)
        [(_, a_pid, a_wav), (_, _, b_wav)] = speaker_log(speaker)
        assert (a_wav, b_wav) == ("A.wav", "B.wav")
        assert not pid_alive(a_pid)
        await player.stop("B")
        await wait_for(lambda: len(speaker_log(speaker)) == 3)
        assert speaker_log(speaker)[2][2] == "A.wav"  # cut, so announced again
        assert player.plays("A") == 0  # a cut play is not a play


@pytest.mark.integration
@needs_espeak
async def test_in_a_burst_of_200_alarms_each_is_heard_within_a_second(speaker: Path) -> None:
    """100 alarms/s while the speaker is busy: every alarm's arrival is followed by a
    new sound (a tone) within ~1 s; after the first, the sounds are summaries."""
    settings = AlertSection(backend="aplay", playback_margin_s=60.0, espeak=ESPEAK or "",
                            summary_over=3)
    pressed: list[float] = []
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=BlockingSleep()) as player:
            for i in range(200):
                pressed.append(time.time())
                await player.start(f"B{i:03d}", SENTENCE)
                await asyncio.sleep(0.01)
            # Every alarm is followed by a new sound: wait for one after the last press.
            await wait_for(lambda: any(t >= pressed[-1] for t, _, _ in speaker_log(speaker)))
            sounds = speaker_log(speaker)
            assert player.wav_count() <= 1  # only the first alarm was rendered on its own
    delays = [min(t for t, _, _ in sounds if t >= at) - at
              for at in pressed if any(t >= at for t, _, _ in sounds)]
    assert len(delays) == len(pressed)
    print(f"press -> next sound, 200 alarms at 100/s: max {max(delays):.2f} s")
    assert {name for _, _, name in sounds[1:]} == {"_summary.wav"}
    assert events(logs, "alert.cut_for_new_alarm")


@pytest.mark.integration
@needs_espeak
async def test_wavs_on_disk_are_bounded_and_rendered_again_when_needed(tmp_path: Path) -> None:
    settings = AlertSection(backend="file", repeat_interval_s=0.0, summary_over=100,
                            max_wav_files=4)
    ids = [f"W{i:02d}" for i in range(12)]
    most = 0
    async with AlertPlayer(settings, sleep=FastSleep()) as player:
        workdir = player.output_dir
        assert workdir is not None
        for alarm_id in ids:
            await player.start(alarm_id, SHORT)
        for round_no in (1, 2):
            for alarm_id in ids:
                await player.wait_played(alarm_id, round_no, timeout=20)
                most = max(most, len([w for w in wav_files(workdir) if w.name[0] != "_"]))
        assert player.wav_count() == 4
        kept = [w for w in wav_files(workdir) if w.name[0] != "_"]
        params, samples = read_wav(kept[0])
        assert params.nframes / params.framerate > TONE_S + GAP_S + 0.3
        assert rms(samples) > 300
        entries = play_log(workdir)
    assert most <= 4
    assert len({e["alarm_id"] for e in entries}) == 12
    assert not workdir.exists()


@pytest.mark.integration
@needs_espeak
async def test_a_slow_render_does_not_hold_back_the_tone(tmp_path: Path, out: Path) -> None:
    assert ESPEAK is not None
    slow = write_script(tmp_path / "bin" / "slow-espeak", f'sleep 3\nexec "{ESPEAK}" "$@"\n')
    settings = AlertSection(backend="file", output_dir=out, espeak=str(slow))
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=BlockingSleep()) as player:
            await player.start("A", SHORT)
            await player.wait_played("A", 1)
            rendered_at = time.time()
    tone, alarm = play_log(out)
    assert tone["kind"] == "tone"
    # The tone played before the slow speech was rendered (order, not a time limit).
    assert any(e["item"] != "tone" and e["has_speech"]
               for e in events(logs, "alert.rendered"))
    assert datetime.fromisoformat(tone["ts"]).timestamp() < \
        datetime.fromisoformat(alarm["ts"]).timestamp() <= rendered_at
    assert (alarm["kind"], alarm["alarm_id"]) == ("alarm", "A")
    params, samples = read_wav(out / "A.wav")
    assert params.nframes / params.framerate > TONE_S + GAP_S + 0.3  # speech made it in
    assert rms(samples[int((TONE_S + GAP_S) * RATE):]) > 300
    _, tone_samples = read_wav(out / "_tone.wav")
    assert abs(peak_hz(tone_samples[: int(0.25 * RATE)], RATE) - 880) < 20


@pytest.mark.integration
@needs_espeak
@pytest.mark.parametrize("slow", ["speaker", "espeak"])
async def test_closing_with_500_open_alarms_and_a_slow_backend_is_quick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: str
) -> None:
    """Issue 13: after a storm, closing took 37 s, past TimeoutStopSec=30. Closing now
    kills the player or espeak-ng on the speaker and removes the folder at once."""
    pidfile = tmp_path / "slow.pids"
    hang = write_script(tmp_path / "bin" / "hang", f'echo $$ >> "{pidfile}"\nexec sleep 300\n')
    if slow == "speaker":
        (tmp_path / "bin" / "aplay").symlink_to(hang)
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
        settings = AlertSection(backend="aplay", playback_margin_s=60.0, espeak=ESPEAK or "")
    else:
        settings = AlertSection(backend="file", espeak=str(hang))
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=BlockingSleep()) as player:
            for i in range(500):
                await player.start(f"C{i:03d}", SENTENCE)
            await wait_for(lambda: len(pids(pidfile)) >= 1)
            workdir = player.output_dir
            assert workdir is not None
            assert len(list(workdir.iterdir())) <= 4
            closing = time.monotonic()
        closed_s = time.monotonic() - closing
    assert closed_s < 60  # did not wait for the hung process (300 s): it was killed
    assert not any(pid_alive(p) for p in pids(pidfile))
    assert not workdir.exists()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    [closed] = events(logs, "alert.closed")
    assert closed["open_alarms"] == 500
    assert len(closed["unacknowledged"]) == 20


# -- how soon the center hears an alarm ---------------------------------------------------


@pytest.mark.integration
@needs_espeak
async def test_press_to_heard_is_measured_once_per_new_alarm(out: Path) -> None:
    """``heard`` gets each new alarm's press-to-first-sound once; an alarm started
    without ``age_s`` (resumed after a restart, a notice) is not measured."""
    heard: list[float] = []
    settings = AlertSection(backend="file", output_dir=out, repeat_interval_s=0.0)
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=FastSleep(), heard=heard.append) as player:
            await player.start("A", SHORT, age_s=0.25)
            await player.start("R", SHORT)  # resumed: pressed before the restart
            await player.wait_played("A", 3)
            await player.wait_played("R", 2)
    assert len(heard) == 1
    assert heard[0] >= 250  # the press was 0.25 s before the player saw it
    first = events(logs, "alert.heard")
    assert [(e["item"], e["alarms"]) for e in first] == [("R", 1), ("A", 1)]  # newest first
    assert first[0]["press_to_heard_ms"] is None
    assert first[1]["press_to_heard_ms"] == pytest.approx(heard[0], abs=0.1)


@pytest.mark.integration
@needs_espeak
async def test_a_summary_is_the_first_sound_of_every_alarm_it_covers(out: Path) -> None:
    heard: list[float] = []
    settings = AlertSection(backend="file", output_dir=out, repeat_interval_s=0.0,
                            summary_over=3)
    ids = [f"S{i}" for i in range(10)]
    with capture_logs() as logs:
        async with AlertPlayer(settings, sleep=FastSleep(), heard=heard.append) as player:
            for alarm_id in ids:
                await player.start(alarm_id, SENTENCE, age_s=0.0)
            await player.wait_played(ids[0], 2)
    assert len(heard) == len(ids)
    [summary] = events(logs, "alert.heard")
    assert (summary["kind"], summary["alarms"]) == ("summary", 10)
    assert summary["press_to_heard_ms"] == pytest.approx(max(heard), abs=0.1)


async def test_nothing_is_heard_with_the_none_backend(tmp_path: Path) -> None:
    heard: list[float] = []
    async with AlertPlayer(AlertSection(backend="none"), sleep=FastSleep(),
                           heard=heard.append) as player:
        await player.start("A", SHORT, age_s=0.0)
        await player.wait_played("A", 2)  # processed: played twice, silently
    assert heard == []


# -- a real sound server: PulseAudio with a null sink, which plays in real time -------


needs_pulse = pytest.mark.skipif(not pulse.AVAILABLE, reason="pulseaudio is not installed")


@pytest.fixture
def pulse_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pulse.PulseServer]:
    server = pulse.PulseServer(tmp_path / "pulse")
    server.start()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        server.stop()


def sounding_span_s(samples: npt.NDArray[np.int16], rate: int) -> float:
    """Seconds from the first to the last 10 ms frame with sound in it."""
    frame = rate // 100
    frames = samples[: len(samples) // frame * frame].reshape(-1, frame).astype(np.float64)
    loud = np.flatnonzero(np.sqrt(np.mean(frames ** 2, axis=1)) > 200)
    return 0.0 if len(loud) == 0 else (loud[-1] - loud[0] + 1) / 100


@pytest.mark.integration
@needs_espeak
@needs_pulse
async def test_auto_finds_pulseaudio_and_the_speaker_gets_the_whole_alarm_in_real_time(
    pulse_server: pulse.PulseServer, tmp_path: Path
) -> None:
    """``auto`` finds the server (pactl), paplay plays the alarm for as long as it lasts,
    and what the sink got, recorded from its monitor, is the tone and the speech."""
    heard: list[float] = []
    settings = AlertSection(backend="auto", espeak=ESPEAK or "", repeat_interval_s=60.0)
    recording = tmp_path / "speaker.wav"
    with capture_logs() as logs, pulse_server.recording(recording):
        async with AlertPlayer(settings, sleep=BlockingSleep(), heard=heard.append) as player:
            assert player.backend == "paplay"
            began = time.monotonic()
            await player.start("A", SENTENCE, age_s=0.0)
            await player.wait_played("A", 1, timeout=60)
            took = time.monotonic() - began
            assert player.output_dir is not None
            params, source = read_wav(player.output_dir / "A.wav")
            duration = params.nframes / params.framerate
            source_span = sounding_span_s(source, params.framerate)
    assert events(logs, "alert.playback_failed") == []
    assert len(heard) == 1
    # Real time: a player cannot finish a sound faster than it lasts.
    assert took >= duration * 0.95
    params, samples = read_wav(recording)
    span = sounding_span_s(samples, params.framerate)
    assert span == pytest.approx(source_span, abs=1.0)
    tone = samples[np.flatnonzero(np.abs(samples) > 1000)[0]:][: int(0.2 * params.framerate)]
    assert peak_hz(tone, params.framerate) == pytest.approx(880, abs=30)


@pytest.mark.integration
@needs_espeak
@needs_pulse
async def test_acknowledging_cuts_the_sound_on_the_pulseaudio_speaker(
    pulse_server: pulse.PulseServer, tmp_path: Path
) -> None:
    settings = AlertSection(backend="paplay", espeak=ESPEAK or "", repeat_interval_s=60.0)
    recording = tmp_path / "speaker.wav"
    with capture_logs() as logs, pulse_server.recording(recording):
        async with AlertPlayer(settings, sleep=BlockingSleep()) as player:
            await player.start("A", SENTENCE, age_s=0.0)
            await wait_for(lambda: bool(events(logs, "alert.heard")), 30)
            assert player.output_dir is not None
            params, _ = read_wav(player.output_dir / "A.wav")  # rendered, on the speaker
            duration = params.nframes / params.framerate
            await asyncio.sleep(2.0)  # on the speaker for a while (paplay starts in ~0.5 s)
            assert await player.stop("A")
            assert player.plays("A") == 0  # cut: not a whole play
            # Processed: after the stop the speaker stays quiet while the player idles.
            await asyncio.sleep(1.0)
    assert events(logs, "alert.played") == []
    params, samples = read_wav(recording)
    span = sounding_span_s(samples, params.framerate)
    assert 0 < span < duration - 1.0
