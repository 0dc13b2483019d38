"""The shipped systemd unit: valid for systemd-analyze, hardened, consistent with the config."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config
from tests.helpers import REPO

UNIT = REPO / "systemd" / "alarm-gateway.service"
ANALYZE = shutil.which("systemd-analyze")


def installed_unit(tmp_path: Path) -> Path:
    """The unit with its ExecStart paths pointed at this checkout's real executable."""
    gateway = Path(sys.executable).with_name("gateway")
    text = UNIT.read_text(encoding="utf-8").replace("/opt/alarm-gateway/venv/bin/gateway",
                                                    str(gateway))
    out = tmp_path / "alarm-gateway.service"
    out.write_text(text, encoding="utf-8")
    return out


@pytest.mark.integration  # runs systemd-analyze
@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    res = subprocess.run([str(ANALYZE), "verify", str(installed_unit(tmp_path))],
                         capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in (res.stdout + res.stderr).splitlines()
                if "alarm-gateway" in line]
    assert problems == []


@pytest.mark.integration  # runs systemd-analyze
@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_unit_exposure_is_low(tmp_path: Path) -> None:
    res = subprocess.run([str(ANALYZE), "security", "--offline=true",
                          str(installed_unit(tmp_path))],
                         capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout + res.stderr)
    assert match, res.stdout + res.stderr
    assert float(match.group(1)) <= 2.0


def test_stop_timeout_leaves_room_for_the_phased_shutdown() -> None:
    text = UNIT.read_text(encoding="utf-8")
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    cfg = load_config(REPO / "config" / "gateway.example.toml")
    assert cfg.model.gateway.shutdown_timeout_s + 5 <= stop
    for secret in ("twilio_account_sid", "twilio_auth_token", "mqtt_password", "control_token"):
        assert f"LoadCredential={secret}:" in text
    assert "Type=notify" in text and "WatchdogSec=" in text


def setting(text: str, key: str) -> str:
    match = re.search(rf"^{key}=(.*)$", text, re.M)
    assert match, f"{key}= is missing"
    return match.group(1).strip()


def test_a_failing_start_is_retried_forever_but_not_in_a_spin() -> None:
    """Fault 4: StartLimitIntervalSec=0 with RestartSec=2 ran a failing ExecStartPre every
    2 s forever. Now the retries are slower, and their steady rate stays under the start
    limit (more than Burst starts within Interval puts the unit in "failed" for good)."""
    text = UNIT.read_text(encoding="utf-8")
    assert setting(text, "Restart") == "always"
    restart = int(setting(text, "RestartSec"))
    interval, burst = int(setting(text, "StartLimitIntervalSec")), int(
        setting(text, "StartLimitBurst"))
    assert restart >= 10
    assert interval > 0
    # Starts one RestartSec apart: at most interval // restart + 1 within any interval.
    assert interval // restart + 1 < burst


def test_devices_cover_builtin_serial_ports_and_nothing_else() -> None:
    text = UNIT.read_text(encoding="utf-8")
    assert setting(text, "DevicePolicy") == "closed"
    allowed = re.findall(r"^DeviceAllow=(\S+) (\S+)$", text, re.M)
    assert ("char-ttyS", "rw") in allowed  # RS-232 on the industrial PC's board
    assert {name for name, _ in allowed} == {"char-ttyS", "char-ttyUSB", "char-ttyACM",
                                             "char-usb_device", "char-alsa"}

