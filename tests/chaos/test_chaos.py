"""Chaos: the gateway as deployed, under kills, broker crashes, power cuts, a full disk,
a pulled serial line and a Twilio outage. Each scenario ends with a reconciliation of
presses acknowledged to the device (broker PUBACK; Sur-Gard ACK), alarms journaled (the
journal file read after the gateway stopped) and first-wave SMS accepted by the Twilio
double (every family contact, quoting the alarm reference): zero missing; duplicates
are counted and printed (see the summary table at the end of the run).

``CHAOS_SCALE=long`` (``scripts/chaos``) runs the long version."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.conftest import TALLIES, Scale
from tests.chaos.rig import (
    HEADER,
    REPO,
    District,
    MqttPresser,
    Press,
    Rig,
    SurGardReceiver,
    Tally,
    wait_until,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SCHEMA = REPO / "devices" / "SCHEMA.md"


def confirmation_exists() -> bool:
    """Our own buttons get an end-to-end confirmation once the gateway publishes one
    (devices/SCHEMA.md documents the confirm topic); then the chaos buttons resend until
    confirmed, as ours do."""
    if os.environ.get("CHAOS_CONFIRM") == "0":  # measurement only: buttons without it
        return False
    return "/confirm" in SCHEMA.read_text(encoding="utf-8")


def evidence(rig: Rig) -> list[str]:
    """What the logs say: gateway warnings and errors by event, broker denials/drops."""
    events: Counter[str] = Counter()
    for line in (rig.gateway.workdir / "gateway.log").read_text(
            encoding="utf-8", errors="replace").splitlines():
        level = re.search(r'"level":"(\w+)"', line)
        event = re.search(r'"event":"([\w.]+)"', line)
        if level and event and level.group(1) in ("warning", "error", "critical"):
            events[f"{level.group(1)}:{event.group(1)}"] += 1
    broker_log = (rig.broker.workdir / "mosquitto.log").read_text(
        encoding="utf-8", errors="replace")
    gateway_drops = len(re.findall(r"(Socket error on client gw-chaos|"
                                   r"Client gw-chaos disconnected|"
                                   r"Client gw-chaos closed its connection)", broker_log))
    denied = len(re.findall(r"Denied PUBLISH", broker_log))
    autosave = ", ".join(line for line in rig.broker.conf_text.splitlines()
                         if line.startswith("autosave"))
    return [f"gateway log (warning+): {dict(events.most_common(8))}",
             f"broker: gateway connections ended {gateway_drops}x, denied publishes "
             f"logged {denied} (the shipped log_type does not log denials); {autosave}"]


def autosave_changes(rig: Rig) -> int:
    """The shipped broker's autosave window in changes (``autosave_interval`` with
    ``autosave_on_changes true``)."""
    conf = dict(line.split(None, 1) for line in rig.broker.conf_text.splitlines()
                if line.startswith("autosave"))
    assert conf.get("autosave_on_changes") == "true", conf
    return int(conf["autosave_interval"])


def finish(rig: Rig, name: str, presses: list[Press], started: float, scale: Scale,
           frames: dict[bytes, str] | None = None, *, residual_per_cut: int = 0,
           **counts: int) -> Tally:
    """Settle (bounded), stop the gateway, reconcile from the journal file, print, assert.

    ``residual_per_cut``: Zigbee2MQTT presses each power cut may lose (the README's
    residual risk: the broker acknowledged them and died before saving them; no Z2M
    button can resend). Those are counted apart and bounded; any other loss fails."""
    frames = frames or {}
    if rig.gateway.proc is None:
        rig.gateway.start()
    with contextlib.suppress(TimeoutError):
        rig.gateway.wait_ready(60)
    rig.settle(lambda: presses, name, scale.settle_s, lambda: frames)
    tally = rig.final(presses, name, frames, started)
    if residual_per_cut:
        tally.residual = [e for e in tally.lost if e.split(":", 2)[1] == "z2m"]
        tally.lost = [e for e in tally.lost if e not in tally.residual]
    for key, value in counts.items():
        setattr(tally, key, value)
    tally.resends = sum(p.resends for p in presses)
    tally.notes += evidence(rig)
    TALLIES.append(tally)
    print("\n" + HEADER + "\n" + tally.row() + "\n  " + tally.detail())
    assert tally.acked == tally.presses, f"presses never acknowledged\n{tally.detail()}"
    assert tally.missing == 0, tally.detail()
    bound = residual_per_cut * counts.get("broker_kills", 0)
    assert len(tally.residual) <= bound, tally.detail()
    return tally


def shuffled(rig: Rig, devices: list[object]) -> Iterator[object]:
    """The devices in random order, again and again: a long run presses some twice (a
    second press joins the open alarm, so it is reconciled by its alarm reference)."""
    return itertools.cycle(rig.rng.sample(devices, len(devices)))


def mqtt_devices(district: District) -> list[object]:
    return [*district.z2m, *district.own]


def test_gateway_sigkilled_during_a_storm(tmp_path: Path, district: District,
                                          scale: Scale) -> None:
    """a) presses from many devices while the gateway is SIGKILLed at random moments
    (during startup, recovery and intake alike) and restarted each time."""
    started = time.monotonic()
    with Rig(tmp_path, district, seed=1) as rig:
        presser = MqttPresser(rig.broker, district, confirm=confirmation_exists())
        devices = rig.rng.sample(mqtt_devices(district),
                                 min(scale.kill_presses, len(mqtt_devices(district))))
        per_kill = max(1, len(devices) // scale.gateway_kills)
        try:
            for kill in range(scale.gateway_kills):
                for device in devices[kill * per_kill:(kill + 1) * per_kill]:
                    presser.press(device)
                    time.sleep(rig.rng.uniform(0, 0.03))
                # A random moment: often before the restarted gateway is ready.
                time.sleep(rig.rng.uniform(0.1, 2.5))
                rig.gateway.kill()
                rig.gateway.start()
                if kill % 5 == 4:  # let it make progress now and then
                    rig.gateway.wait_ready(60)
            for device in devices[scale.gateway_kills * per_kill:]:
                presser.press(device)
            rig.gateway.wait_ready(60)
            wait_until(presser.all_acked, 60, "every press PUBACKed by the broker")
            finish(rig, "a gateway SIGKILL", presser.presses, started, scale)
        finally:
            presser.close()


def test_broker_sigkilled_during_a_storm(tmp_path: Path, district: District,
                                         scale: Scale) -> None:
    """b) the broker SIGKILLed and restarted during the storm (the gateway stays up)."""
    started = time.monotonic()
    with Rig(tmp_path, district, seed=2) as rig:
        presser = MqttPresser(rig.broker, district, confirm=confirmation_exists())
        devices = shuffled(rig, mqtt_devices(district))
        try:
            for _ in range(scale.broker_kills):
                for _ in range(scale.batch // 2):
                    presser.press(next(devices))
                    time.sleep(rig.rng.uniform(0, 0.02))
                time.sleep(rig.rng.uniform(0, 1.0))
                rig.broker.kill()
                for _ in range(scale.batch // 2):  # queued in paho until the broker is back
                    presser.press(next(devices))
                time.sleep(rig.rng.uniform(0.2, 1.5))
                rig.broker.start()
                wait_until(presser.all_acked, 60, "presses PUBACKed after the broker restart")
            finish(rig, "b broker SIGKILL", presser.presses, started, scale,
                   broker_kills=scale.broker_kills)
        finally:
            presser.close()


def test_power_cut_broker_and_gateway(tmp_path: Path, district: District,
                                      scale: Scale) -> None:
    """c) broker and gateway killed together (power cut). Each round: the gateway goes
    down first (a crash, an upgrade), presses queue in the broker and are PUBACKed to the
    buttons, then the power goes; or both die at once in the middle of a storm.

    With the broker's autosave window, PUBACKed presses that were not yet saved are
    lost; our own buttons resend until the gateway's end-to-end confirmation (fault 5),
    so none of theirs may be lost. Zigbee2MQTT buttons cannot: their losses are the
    README's residual risk, counted apart and bounded by the autosave window per cut."""
    started = time.monotonic()
    with Rig(tmp_path, district, seed=3) as rig:
        confirm = confirmation_exists()
        presser = MqttPresser(rig.broker, district, confirm=confirm)
        devices = shuffled(rig, mqtt_devices(district))
        try:
            for cut in range(scale.power_cuts):
                if cut % 2 == 0:
                    rig.gateway.kill()
                    for _ in range(scale.batch):
                        presser.press(next(devices))
                    wait_until(presser.all_acked, 30, "presses PUBACKed while the gateway is down")
                else:
                    for _ in range(scale.batch):
                        presser.press(next(devices))
                        time.sleep(rig.rng.uniform(0, 0.01))
                    time.sleep(rig.rng.uniform(0, 0.3))
                # The power cut: both processes die within microseconds.
                rig.broker.kill()
                rig.gateway.kill()
                time.sleep(0.5)
                rig.broker.start()
                rig.gateway.start()
                rig.gateway.wait_ready(60)
                wait_until(presser.all_acked, 60, "presses PUBACKed after the power returned")
            # At most the changes of one autosave window (config/mosquitto.conf:
            # autosave_on_changes, autosave_interval 10) are unsaved when the power goes.
            tally = finish(rig, "c power cut", presser.presses, started, scale,
                           residual_per_cut=autosave_changes(rig),
                           broker_kills=scale.power_cuts)
            tally.notes.append(f"end-to-end confirmation {'used' if confirm else 'absent'}")
        finally:
            presser.close()


def test_journal_disk_filled_and_freed(tmp_path: Path, district: District, scale: Scale,
                                       small_disk: Path) -> None:
    """d) the journal's file system (an 8 MB tmpfs) filled, presses made, then freed:
    every press PUBACKed by the broker is journaled and texted once space returns."""
    started = time.monotonic()
    with Rig(tmp_path, district, seed=4, state_dir=small_disk / "state") as rig:
        presser = MqttPresser(rig.broker, district, confirm=confirmation_exists())
        devices = shuffled(rig, mqtt_devices(district))
        try:
            for _ in range(scale.batch // 2):
                presser.press(next(devices))
            wait_until(presser.all_acked, 30, "presses before the disk fills")
            filler = small_disk / "filler"
            with filler.open("wb") as out, contextlib.suppress(OSError):
                for _ in range(64):  # 8 MB in 128 kB blocks, and then ENOSPC
                    out.write(b"\0" * 131072)
                    out.flush()
                    os.fsync(out.fileno())
            assert os.statvfs(small_disk).f_bavail == 0, "the disk did not fill"
            # Press until the journal meets the full disk (its WAL may still have room for
            # a few commits): the positive sign is the gateway's journal.write_failed.
            for _ in range(scale.batch * 4):
                presser.press(next(devices))
                time.sleep(0.05)
                if rig.gateway.log_lines("journal.write_failed"):
                    break
            assert rig.gateway.log_lines("journal.write_failed"), "the journal never filled"
            for _ in range(scale.batch // 2):  # presses while the disk stays full
                presser.press(next(devices))
            wait_until(lambda: len(rig.gateway.log_lines("journal.write_failed")) > 1, 30,
                       "presses met the full disk")
            filler.unlink()
            for _ in range(scale.batch // 2):
                presser.press(next(devices))
            with contextlib.suppress(TimeoutError):
                wait_until(presser.all_acked, scale.settle_s,
                           "presses PUBACKed after space returned")
            finish(rig, "d disk full, freed", presser.presses, started, scale)
        finally:
            presser.close()


def test_serial_line_pulled(tmp_path: Path, district: District, scale: Scale) -> None:
    """e) the Sur-Gard receiver's serial line pulled (socat killed) and plugged back,
    while Contact ID frames and MQTT presses keep coming; the receiver resends every
    frame until the gateway ACKs it."""
    started = time.monotonic()
    with Rig(tmp_path, district, seed=5, serial=True) as rig:
        assert rig.line is not None
        receiver = SurGardReceiver(rig.line)
        receiver.start()
        presser = MqttPresser(rig.broker, district, confirm=confirmation_exists())
        panels = shuffled(rig, district.contact_id)
        buttons = shuffled(rig, mqtt_devices(district))
        per_pull = max(1, min(len(district.contact_id) // (scale.line_pulls + 1), 15))
        try:
            for _ in range(scale.line_pulls):
                for _ in range(per_pull):
                    receiver.press(next(panels))
                    presser.press(next(buttons))
                time.sleep(rig.rng.uniform(0.2, 1.0))
                rig.line.pull()
                time.sleep(rig.rng.uniform(0.5, 2.0))
                rig.line.plug()
                wait_until(receiver.all_acked, 60, "frames ACKed after the line came back")
            frames = {p.payload.rstrip(b"\x14"): p.marker for p in receiver.presses}
            wait_until(presser.all_acked, 30, "MQTT presses PUBACKed")
            finish(rig, "e serial pulled", [*receiver.presses, *presser.presses], started,
                   scale, frames, line_pulls=rig.line.pulls)
        finally:
            receiver.close()
            presser.close()


def test_twilio_down_then_429_then_healthy(tmp_path: Path, district: District,
                                           scale: Scale) -> None:
    """f) Twilio refuses connections, then answers 429 (Retry-After 1 s), then is
    healthy: every family is texted once it can be, and nobody twice."""
    started = time.monotonic()
    with Rig(tmp_path, district, seed=6) as rig:
        presser = MqttPresser(rig.broker, district, confirm=confirmation_exists())
        devices = shuffled(rig, mqtt_devices(district))
        try:
            rig.twilio.control("/outage", {"on": True, "refuse": True})
            down = [presser.press(next(devices)) for _ in range(scale.batch)]
            wait_until(lambda: all(p.acked_at for p in down), 30, "presses during the outage")
            # Positive sign that the gateway met the outage: it logged a failed or
            # retried SMS attempt. Then the outage lasts a few seconds more.
            wait_until(lambda: rig.gateway.log_count("sms.", ("warning", "error")),
                       30, "an SMS attempt failed during the outage", interval=0.5)
            time.sleep(3)
            rig.twilio.control("/outage", {"on": False})
            rig.twilio.control("/inject", {"status": 429, "count": 3 * scale.batch,
                                           "retry_after": 1})
            limited = [presser.press(next(devices)) for _ in range(scale.batch)]
            wait_until(lambda: all(p.acked_at for p in limited), 30, "presses during 429s")
            wait_until(lambda: rig.twilio.control("/state")["pending_faults"] == 0,
                       scale.settle_s, "every injected 429 answered")
            for _ in range(scale.batch // 2):
                presser.press(next(devices))
            finish(rig, "f twilio down, 429", presser.presses, started, scale)
        finally:
            presser.close()
