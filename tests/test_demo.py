"""`gateway demo` as a new user runs it: exit 0, alarms flow end to end, artefacts are real."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import wave
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_the_pipeline_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "gateway.cli", "demo", "--presses", "2",
                          "--out", str(out)], capture_output=True, text=True, timeout=180,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout
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
