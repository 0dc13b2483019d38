"""Stopping a server the tests started: SIGTERM, then SIGKILL if it lingers."""

from __future__ import annotations

import subprocess


def end_process(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """Terminate ``proc`` and reap it; kill it if it is not gone within ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)
