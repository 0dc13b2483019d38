"""`gateway demo` as a new user runs it: exit 0, alarms flow end to end, artefacts are real."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import subprocess
import sys
import wave
from pathlib import Path

import aiohttp
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_the_pipeline_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "gateway.cli", "demo", "--presses", "2",
                          "--out", str(out)], capture_output=True, text=True, timeout=180,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout
    # The console's address and the demo login come before the presses.
    console = re.search(r"Operator console: (http://127\.0\.0\.1:\d+/console/)", text)
    assert console and "login: demo   password: " in text
    assert text.index("password: ") < text.index("receiver got ACK")
    assert "receiver got ACK" in text
    assert "joins the open alarm" in text
    assert "nearest on duty:" in text and "nearest hospital:" in text
    assert text.count("accepted (SM") >= 6
    assert "ms after the press" in text
    assert "Alarms: 2;" in text
    # The first alarm's call: placed, answered, 1 pressed, the alarm taken on the phone.
    assert "call to the family" in text and "pressed 1 -> call accepted" in text
    assert "alarm acknowledged by call:" in text
    with sqlite3.connect(out / "state" / "journal.sqlite3") as conn:
        alarms = conn.execute("SELECT state, presses FROM alarms ORDER BY received_at").fetchall()
        notes = conn.execute("SELECT state FROM notifications").fetchall()
        calls = conn.execute("SELECT state, digits FROM calls ORDER BY id").fetchall()
    assert [a[0] for a in alarms] == ["acknowledged", "acknowledged"]
    assert alarms[0][1] == 2  # the second press joined the first alarm
    # Accepted or further (the double reports delivery to the demo's webhook listener);
    # the SMS row of the family member who took the alarm by phone says so.
    states = [n[0] for n in notes]
    assert notes and set(states) <= {"accepted", "sent", "delivered", "acknowledged"}
    assert states.count("acknowledged") == 1
    assert calls[0] == ("accepted", "1")
    wavs = sorted((out / "alerts").glob("*.wav"))
    assert len(wavs) == 2
    with wave.open(str(wavs[0])) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        assert w.getnframes() / w.getframerate() > 2.0
    log_lines = (out / "gateway.log.jsonl").read_text(encoding="utf-8").splitlines()
    assert any('"event":"sms.sent"' in line for line in log_lines)
    # Phone numbers appear only masked in the logs.
    assert not [line for line in log_lines if re.search(r"\+86\d{11}", line)]
    assert any(re.search(r"\+86\d{3}\*{4}\d{4}", line) for line in log_lines)


async def _line(stream: asyncio.StreamReader, pattern: str, seen: list[str],
                timeout: float = 120) -> re.Match[str]:
    """Read the demo's output until a line matches ``pattern``."""
    async with asyncio.timeout(timeout):
        while True:
            raw = await stream.readline()
            if not raw:
                raise AssertionError(f"the demo ended before {pattern!r}:\n" + "".join(seen))
            seen.append(raw.decode())
            found = re.search(pattern, seen[-1])
            if found:
                return found


async def test_demo_console_signs_in_and_shows_live_presses(tmp_path: Path) -> None:
    with (tmp_path / "stderr.txt").open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "demo", "--console", "--every", "1",
            "--presses", "1", "--out", str(tmp_path / "demo"),
            stdout=asyncio.subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        url = (await _line(proc.stdout, r"Operator console: (http://127\.0\.0\.1:\d+)/console/ ",
                           seen)).group(1)
        login, password = (await _line(proc.stdout, r"login: (\S+)   password: (\S+) ",
                                       seen)).groups()
        assert login == "demo"
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for a bare IP address
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            async with http.get(f"{url}/console/") as r:
                assert r.status == 200 and "text/html" in r.content_type
            async with http.post(f"{url}/console/api/sign-in",
                                 json={"login": login, "password": password + "x"}) as r:
                assert r.status == 401
            async with http.post(f"{url}/console/api/sign-in",
                                 json={"login": login, "password": password}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["name"] == "演示值班员"
            # A press of the --console loop, after the scripted one: open on the board.
            alarm_id = (await _line(proc.stdout, r"alarm (\S+): .* on the console now",
                                    seen)).group(1)
            async with http.get(f"{url}/console/api/board") as r:
                assert r.status == 200
                board = await r.json()
            shown = {a["alarm_id"]: a for a in board["alarms"]}
            assert alarm_id in shown, board
            assert shown[alarm_id]["state"] != "acknowledged"  # left for the operator
        # Interrupted there: the next press, or the wait for it.
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            rest, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = "".join(seen) + rest.decode()
    assert proc.returncode == 0, text + (tmp_path / "stderr.txt").read_text(encoding="utf-8")
    assert "Stopped. Alarms raised for the console: " in text
