"""What a module drags in when imported: checked in a fresh interpreter, where
no other test has imported anything yet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def imported_by(module: str) -> set[str]:
    """Top-level packages in ``sys.modules`` after importing ``module`` alone."""
    code = (
        f"import json, sys, {module}; "
        "print(json.dumps(sorted({name.partition('.')[0] for name in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return set(json.loads(result.stdout))


@pytest.mark.parametrize("module", ["gateway.config", "gateway.replies"])
def test_imports_neither_twilio_nor_aiohttp(module: str) -> None:
    # Config (and the pure reply parser) must load on a host that validates a
    # config file without the SMS stack, and quickly.
    assert {"twilio", "aiohttp"}.isdisjoint(imported_by(module))


def test_demo_does_not_load_the_twilio_fault_injection() -> None:
    assert "tests" not in imported_by("gateway.demo")
