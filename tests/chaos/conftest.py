"""Chaos suite fixtures: the scale (short for CI, long on demand), a generated district
shared by the session, one rig per scenario, and the summary table at the end.

The chaos tests run only when asked for by marker (``-m chaos``, as ``.ci/run`` and
``scripts/chaos`` do): a plain ``pytest`` run (the README's ``scripts/test``) deselects
them, so the main suite keeps its ~2 minutes."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chaos.rig import HEADER, District, Tally

TALLIES: list[Tally] = []


@dataclass(frozen=True)
class Scale:
    """How hard each scenario pushes. ``CHAOS_SCALE=long`` (scripts/chaos) for the long run."""

    name: str
    elders: int
    gateway_kills: int
    kill_presses: int
    broker_kills: int
    power_cuts: int
    batch: int
    line_pulls: int
    settle_s: float


SHORT = Scale("short", elders=400, gateway_kills=20, kill_presses=100, broker_kills=3,
              power_cuts=3, batch=40, line_pulls=3, settle_s=45)
LONG = Scale("long", elders=1500, gateway_kills=200, kill_presses=800, broker_kills=20,
             power_cuts=15, batch=60, line_pulls=20, settle_s=180)


@pytest.fixture(scope="session")
def scale() -> Scale:
    return LONG if os.environ.get("CHAOS_SCALE", "short") == "long" else SHORT


@pytest.fixture(scope="session")
def district(tmp_path_factory: pytest.TempPathFactory, scale: Scale) -> District:
    for tool in ("mosquitto", "mosquitto_passwd", "openssl", "socat"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.fail(f"{tool} is not installed (scripts/test installs it)")
    return District.generate(tmp_path_factory.mktemp("district"), scale.elders,
                             max(200, scale.elders // 2))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs for the gateway's state_dir (needs root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk scenario mounts a tmpfs and needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True,
                   timeout=30)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "chaos" in (config.option.markexpr or ""):
        return
    chaos = [item for item in items if item.get_closest_marker("chaos") is not None]
    if chaos:
        config.hook.pytest_deselected(items=chaos)
        items[:] = [item for item in items if item.get_closest_marker("chaos") is None]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLIES:
        return
    terminalreporter.section("chaos reconciliation")
    terminalreporter.write_line(HEADER)
    for tally in TALLIES:
        terminalreporter.write_line(tally.row())
    terminalreporter.write_line("dup r/a/sms: extra journal rows of one press / presses under "
                                "two alarm references / repeated SMS of one reference")
    for tally in TALLIES:
        terminalreporter.write_line("  " + tally.detail())
