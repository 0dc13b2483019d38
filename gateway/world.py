"""The current world: the registry and the geo indexes built from it, swapped as one.

Intake, dispatch, supervision and the responder-command handlers read what they need
from one :class:`WorldRef` that the lifecycle owns and a reload swaps. They never call
back up into the daemon. An alarm in flight keeps the :class:`World` it started with
(objects are immutable once built); the next read sees the new one.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import structlog

from gateway.config import Config
from gateway.geo import GeoError, GeoService, Projector
from gateway.model import Registry
from gateway.registry import RegistryError, RegistryFingerprint, load_registry, registry_fingerprint

log = structlog.get_logger(__name__)

#: The folder of ``gateway.state_dir`` that holds the registry's validated snapshot.
REGISTRY_CACHE = "registry-cache"
#: A reload whose validation takes longer than this is refused (the old registry stays).
VALIDATE_TIMEOUT_S = 300.0
#: Records of a replaced world freed per step of :func:`release_world` (about 1 ms).
RELEASE_STEP = 2000
#: The GIL's switch interval while a reload builds the new world in a worker thread.
#: Python's 5 ms would let each wake-up of the event loop wait that long for the GIL.
RELOAD_SWITCH_INTERVAL_S = 0.0005
#: The longest a reload's step waits for the event loop's turn (a stuck loop must not
#: hold the reload for ever; the watchdog deals with the loop).
PACE_WAIT_S = 1.0
#: How much longer than its last step a reload's load rests (2: a third of the CPU).
PACE_REST = 2.0


@dataclass(frozen=True, slots=True)
class World:
    registry: Registry
    geo: GeoService


class WorldRef:
    """A reference to the current :class:`World`, swapped atomically on the loop thread."""

    __slots__ = ("_world",)

    def __init__(self, world: World) -> None:
        self._world = world

    @property
    def current(self) -> World:
        return self._world

    @property
    def registry(self) -> Registry:
        return self._world.registry

    @property
    def geo(self) -> GeoService:
        return self._world.geo

    def swap(self, world: World) -> World:
        """Put ``world`` in use; returns the one it replaced."""
        old, self._world = self._world, world
        return old


def load_world(cfg: Config, pace: Callable[[], None] | None = None) -> World:
    """Registry and geo indexes, validated. Raises RegistryError / GeoError / OSError.
    ``pace``: see :func:`gateway.registry.load_registry`.

    The registry's validated snapshot lives in ``state_dir/registry-cache`` (see
    :data:`REGISTRY_CACHE`): ``check-config`` (the unit's ``ExecStartPre``) validates
    and writes it, ``run`` and reloads of unchanged files rebuild from it. It is only
    written into a state folder that exists and belongs to this process's user.
    """
    m = cfg.model
    state_dir = m.gateway.state_dir
    registry = load_registry(cfg.registry_dir, default_region=m.registry.default_region,
                             bbox=m.registry.bbox, cache_dir=state_dir / REGISTRY_CACHE,
                             write_cache=_owns(state_dir), pace=pace)
    projector = Projector(m.geo.crs, m.geo.source_crs, m.registry.bbox)
    return World(registry, GeoService(registry, projector, stale_after_s=m.geo.stale_after_s))


def _owns(state_dir: Path) -> bool:
    """Whether this process may write into the gateway's state: the folder exists and is
    ours. ``check-config`` may run before the gateway ever started, or as another user
    (an operator, root), and must not create the gateway's files; under the unit it runs
    as the gateway's user once systemd made ``StateDirectory=``."""
    try:
        return state_dir.is_dir() and state_dir.stat().st_uid == os.geteuid()
    except OSError:
        return False


@contextmanager
def _gil_shared_often() -> Iterator[None]:
    """A shorter GIL switch interval meanwhile (:data:`RELOAD_SWITCH_INTERVAL_S`)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, RELOAD_SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _loop_first(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """A ``pace`` for a load in a worker thread, called between its steps. It rests
    :data:`PACE_REST` times as long as the step took, then waits until the event loop
    has run what was ready (alarms first), at most :data:`PACE_WAIT_S`.

    Threads that want the GIL get about equal shares of it: a load running flat out
    took half of it from a loop that needs most of a core at 100 alarms/s, and alarms
    fell behind for as long as the load ran. Resting, the load takes at most a
    third, and the reload takes a few seconds longer."""
    last = time.perf_counter()

    def pace() -> None:
        nonlocal last
        step = time.perf_counter() - last
        time.sleep(min(step * PACE_REST, PACE_WAIT_S))
        turn = threading.Event()
        try:
            loop.call_soon_threadsafe(turn.set)
        except RuntimeError:  # the loop is closed: nothing to wait for
            return
        turn.wait(PACE_WAIT_S)
        last = time.perf_counter()

    return pace


async def release_world(box: list[World]) -> None:
    """Free the world in ``box`` (its only reference) on the loop thread, a step at a time.

    A city's registry is about a million objects. Dropped at once, they are freed in
    one uninterruptible call of about 100 ms, in whichever thread lets go last: a stall
    of intake and dispatch. Here its mappings go first, while a list still holds their
    entries, and then the entries, :data:`RELEASE_STEP` at a time, with the loop free to
    run between steps. Where something else still holds the world (an alarm in flight
    keeps its own records, not the world), whatever is left goes with it.
    """
    world = box.pop()
    held = await _entries(world.registry)
    del world  # the world, its indexes and mappings: what `held` holds lives on
    while held:
        del held[-1]
        await asyncio.sleep(0)


async def _entries(registry: Registry) -> list[list[object]]:
    """The keys and values of the registry's mappings, in lists of :data:`RELEASE_STEP`.
    (Its own frame, so that no variable of the caller's still holds a mapping.)"""
    held: list[list[object]] = []
    for mapping in registry.mappings():
        for view in (mapping.keys(), mapping.values()):
            entries = iter(view)
            while batch := list(islice(entries, RELEASE_STEP)):
                held.append(batch)
                await asyncio.sleep(0)
    return held


class WorldKeeper:
    """Loads the world at start and reloads it when asked or when its files change.

    A reload validates the changed files in a process of its own
    (:mod:`gateway.registry_worker`, which leaves the validated snapshot), so that
    seconds of validation never share the GIL with the event loop; then rebuilds from
    that snapshot and indexes in a worker thread, and swaps the result in on the loop
    thread: alarms in flight keep the objects they hold; live responder positions and
    duty overrides carry over; a broken registry is refused and the running one kept.
    Where no snapshot can be written (a state folder not ours) the worker thread
    validates. One reload at a time (SIGHUP, POST /reload and the file watch may
    coincide).
    """

    def __init__(self, config: Config,
                 on_reloaded: Callable[[], Awaitable[None]] | None = None) -> None:
        self._config = config
        self._on_reloaded = on_reloaded
        self._lock = asyncio.Lock()
        self._seen: RegistryFingerprint | None = None  # files of the registry in use
        self._failed: RegistryFingerprint | None = None  # files a reload refused
        self.ref: WorldRef | None = None
        self.looks = 0  # how often the file watch has looked (tests wait on it)

    def on_reloaded(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._on_reloaded = callback

    async def load(self) -> WorldRef:
        """The first load (raises RegistryError / GeoError)."""
        self._seen = registry_fingerprint(self._config.registry_dir)
        world = await asyncio.to_thread(load_world, self._config)
        gc.freeze()  # the registry and indexes live until a reload: keep them out of GC passes
        self.ref = WorldRef(world)
        return self.ref

    async def reload(self) -> bool:
        """Reload now; False (logged) when the new files were refused."""
        if self.ref is None:
            raise RuntimeError("world not loaded")
        ref = self.ref
        async with self._lock:
            # Taken before reading: a write during the load shows up as a change later.
            files = registry_fingerprint(self._config.registry_dir)
            if _owns(self._config.model.gateway.state_dir):
                problem = await self._validate_apart()
                if problem is not None:
                    self._failed = files
                    log.error("registry.reload_failed", error=problem,
                              action="kept the old registry")
                    return False
            try:
                with _gil_shared_often():
                    fresh = await asyncio.to_thread(load_world, self._config,
                                                    _loop_first(asyncio.get_running_loop()))
            except (RegistryError, GeoError, OSError) as exc:
                self._failed = files
                log.error("registry.reload_failed", error=str(exc),
                          action="kept the old registry")
                return False
            fresh.geo.adopt_live_state(ref.geo)  # on the loop thread: the old index is live
            replaced = [ref.swap(fresh)]
            self._seen, self._failed = files, None
            gc.freeze()
            registry = fresh.registry
            log.info("registry.reloaded", elders=len(registry.elders),
                     devices=len(registry.devices), responders=len(registry.responders))
            if self._on_reloaded is not None:
                await self._on_reloaded()
            await release_world(replaced)
            return True

    async def _validate_apart(self) -> str | None:
        """Validate the registry in a child process (it writes the snapshot the load
        then rebuilds from); None when valid, else the problems as the child said them."""
        m = self._config.model
        argv = [sys.executable, "-m", "gateway.registry_worker",
                str(self._config.registry_dir), "--region", m.registry.default_region,
                "--cache", str(m.gateway.state_dir / REGISTRY_CACHE)]
        if m.registry.bbox is not None:
            argv += ["--bbox", ",".join(repr(v) for v in m.registry.bbox)]
        began = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(VALIDATE_TIMEOUT_S):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return f"registry validation took longer than {VALIDATE_TIMEOUT_S:.0f} s"
        log.info("registry.validated_apart", pid=proc.pid, exit=proc.returncode,
                 ms=round((time.monotonic() - began) * 1000))
        if proc.returncode == 0:
            return None
        text = err.decode("utf-8", errors="replace").strip()
        # The child's stderr also carries its warning log lines (JSON): keep the report.
        lines = [ln for ln in text.splitlines() if not ln.startswith("{")]
        return "\n".join(lines) or f"registry validation exited {proc.returncode}"

    async def watch(self, interval_s: float) -> None:
        """Reload when the registry's files change, once they have stopped changing.

        Looks every ``interval_s``; a change is acted on when the next look finds the
        files as they were (an editor or a copy may take a while to finish), so a
        reload follows a save within one to two intervals. A version a reload refused
        is not tried again until the files change once more."""
        directory = self._config.registry_dir
        settling: RegistryFingerprint | None = None
        while True:
            # Real time, not an injected sleep: files change in real time, and a test
            # driving alarm timers with a fake clock must not see this loop spin it.
            await asyncio.sleep(interval_s)
            files = registry_fingerprint(directory)
            self.looks += 1
            if files in (self._seen, self._failed):
                settling = None
                continue
            if files != settling:
                if settling is None:
                    before = {f[0]: f for f in self._seen or ()}
                    log.info("registry.changed", directory=str(directory),
                             files=[f[0] for f in files if before.get(f[0]) != f])
                settling = files
                continue
            settling = None
            try:
                await self.reload()
            except Exception:  # a watcher must never take the gateway down
                self._failed = files
                log.exception("registry.reload_crashed", action="kept the old registry")
