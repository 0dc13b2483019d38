"""A private PulseAudio server whose speaker is a null sink: it plays in real time.

The center's speaker, as the ``paplay`` backend (and ``auto``'s probe) meets it: a real
sound server, a real ``paplay`` that takes as long as the sound lasts, and the sink's
monitor to record what the speaker got (``parecord``). Used by tests/test_alert.py and
by bench/e2e.py's alert-on runs. Nothing here is shared with the machine's own session:
its own runtime folder, socket and no cookie (anonymous on the private socket).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import end_process

SINK = "alarm_sink"
PULSEAUDIO = shutil.which("pulseaudio")
TOOLS = all(shutil.which(t) for t in ("paplay", "pactl", "parecord"))
AVAILABLE = PULSEAUDIO is not None and TOOLS


class PulseError(RuntimeError):
    pass


@dataclass
class PulseServer:
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.workdir / "run" / "native"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: this server, and no session server's config."""
        return {"PULSE_SERVER": f"unix:{self.socket}",
                "PULSE_RUNTIME_PATH": str(self.workdir / "run"),
                "PULSE_COOKIE": str(self.workdir / "cookie"),
                "HOME": str(self.workdir)}

    def start(self, timeout_s: float = 15.0) -> None:
        if PULSEAUDIO is None:
            raise PulseError("pulseaudio is not installed")
        (self.workdir / "run").mkdir(parents=True, exist_ok=True)
        script = self.workdir / "default.pa"
        script.write_text(
            f"load-module module-null-sink sink_name={SINK} rate=22050 channels=1\n"
            f"load-module module-native-protocol-unix socket={self.socket} auth-anonymous=1\n"
            f"set-default-sink {SINK}\n", encoding="utf-8")
        env = {**os.environ, **self.env, "XDG_RUNTIME_DIR": str(self.workdir / "run")}
        with (self.workdir / "pulse.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [PULSEAUDIO, "-n", "-F", str(script), "--daemonize=no", "--exit-idle-time=-1",
                 "--use-pid-file=no", "--disallow-exit", "--disable-shm=yes",
                 "--log-target=stderr"], stdout=log, stderr=log, env=env,
                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while self.run("pactl", "info").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PulseError(f"PulseAudio did not start; see {self.workdir}/pulse.log")
            time.sleep(0.1)

    def run(self, *argv: str, timeout_s: float = 10.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env={**os.environ, **self.env}, capture_output=True,
                              text=True, timeout=timeout_s, check=False)

    @contextmanager
    def recording(self, wav: Path) -> Iterator[Path]:
        """Record the speaker (the sink's monitor) into ``wav`` while the block runs."""
        log = (self.workdir / "parecord.log").open("ab")
        proc = subprocess.Popen(
            ["parecord", f"--device={SINK}.monitor", "--file-format=wav", "--channels=1",
             "--rate=22050", "--format=s16le", "--latency-msec=20", str(wav)],
            env={**os.environ, **self.env}, stdout=subprocess.DEVNULL, stderr=log)
        log.close()  # the child has its own copy
        try:
            # Recording once the server lists it: nothing played after this is missed.
            deadline = time.monotonic() + 10
            while not self.run("pactl", "list", "short", "source-outputs").stdout.strip():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise PulseError(f"parecord did not start; see {self.workdir}")
                time.sleep(0.05)
            yield wav
        finally:
            proc.send_signal(signal.SIGINT)  # parecord finishes the WAV header on SIGINT
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None
