"""Supervision: is every device and receiver still able to raise an alarm?

A button that has gone silent is an elder who cannot call for help, so telecare
centers watch for the periodic test ("check-in") each device sends. This module
keeps, per device, when it was last heard from and its battery, and per serial
receiver, its heartbeat. A periodic check raises *operator notices* (never an
emergency SMS to the family):

* ``device.offline``  a device missed its expected check-in (``test_interval_h`` x
  ``grace``) or its bridge reported it unavailable; ``device.online`` when it is back;
* ``device.low_battery``  a low-battery event or a battery level under the threshold
  (once per device until the battery is above it again);
* ``receiver.down``  a receiver missed ``heartbeat_missed`` heartbeats or its port is
  disconnected; ``receiver.up`` when it is back;
* ``device.inactivity`` (critical: the elder may be unable to press; it sounds in the
  center until acknowledged), ``device.tamper``, ``device.power_loss``  reported by the
  unit itself (Contact ID 641, 137/144/145/383, 301).

Everything is in memory and O(1) per event; the daemon restores the last-seen times
from the journal at start so a restart does not forget a device that was already
silent, and devices never heard from count from the gateway's start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from devices.events import DeviceEvent, EventKind
from gateway.config import SupervisionSection
from gateway.notices import Notice
from gateway.world import WorldRef

__all__ = ["DeviceHealth", "Notice", "Supervisor"]


@dataclass(slots=True)
class _DeviceState:
    last_seen: float | None  # None: never heard from (an offline notice may still be out)
    battery_pct: float | None = None
    offline: bool = False  # an offline notice is outstanding
    low_battery: bool = False


@dataclass(slots=True)
class _Channel:
    interval_s: float
    missed: int
    last_seen: float
    connected: bool = True
    down: bool = False


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    device_id: str
    elder_id: str
    last_seen: float | None
    battery_pct: float | None
    expected_every_h: float | None
    overdue: bool
    low_battery: bool


@dataclass(slots=True)
class Supervisor:
    """Watches devices and receivers; hands notices to ``on_notice`` (synchronous and
    cheap: the notice board queues them), never in the way of an alarm."""

    world: WorldRef
    on_notice: Callable[[Notice], None]
    settings: SupervisionSection = field(default_factory=SupervisionSection)
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    _devices: dict[str, _DeviceState] = field(default_factory=dict)
    _channels: dict[str, _Channel] = field(default_factory=dict)
    _started: float = 0.0

    def __post_init__(self) -> None:
        self._started = self.clock()

    # -- inputs (synchronous, cheap: called from intake for every message) -------------

    def restore(self, last_seen: Mapping[str, tuple[float, float | None]]) -> None:
        """Last-seen times and batteries from the journal, before any traffic."""
        for device_id, (seen, battery) in last_seen.items():
            self._devices[device_id] = _DeviceState(seen, battery)

    def watch_channel(self, channel: str, interval_s: float, missed: int) -> None:
        self._channels[channel] = _Channel(interval_s, missed, self.clock())

    def observe(self, source: str, event: DeviceEvent, device_id: str | None,
                at: float) -> list[Notice]:
        """Record a message; returns notices that are due right away (availability,
        battery), which the caller hands to :meth:`publish`."""
        notices: list[Notice] = []
        channel = self._channels.get(source)
        if channel is not None:
            channel.last_seen = at
            if channel.down and channel.connected:
                channel.down = False
                notices.append(Notice("receiver.up", source, f"接收机 {source} 已恢复", at,
                                      "info"))
        if device_id is None:
            return notices
        state = self._devices.get(device_id)
        if state is None:
            state = self._devices[device_id] = _DeviceState(at)
        if event.kind is EventKind.OFFLINE:
            if not state.offline:
                state.offline = True
                notices.append(Notice("device.offline", device_id,
                                      f"设备 {device_id} 离线（网关报告不可用）", at))
            return notices
        state.last_seen = at if state.last_seen is None else max(state.last_seen, at)
        notices += self._condition(event, device_id, at)
        if state.offline:
            state.offline = False
            notices.append(Notice("device.online", device_id, f"设备 {device_id} 已恢复在线",
                                  at, "info"))
        if event.battery_pct is not None:
            state.battery_pct = event.battery_pct
        low = event.kind is EventKind.LOW_BATTERY or (
            event.battery_pct is not None and event.battery_pct < self.settings.low_battery_pct)
        if low and not state.low_battery:
            state.low_battery = True
            level = f"{event.battery_pct:.0f}%" if event.battery_pct is not None else "低"
            notices.append(Notice("device.low_battery", device_id,
                                  f"设备 {device_id} 电量{level}，请安排更换电池", at))
        elif (not low and event.battery_pct is not None
              and event.battery_pct >= self.settings.low_battery_pct):
            state.low_battery = False
        return notices

    def _condition(self, event: DeviceEvent, device_id: str, at: float) -> list[Notice]:
        """Unit conditions an operator must act on that are not button presses."""
        kind = event.kind
        if kind not in (EventKind.INACTIVITY, EventKind.TAMPER, EventKind.POWER_LOSS):
            return []
        device = self.world.registry.devices.get(device_id)
        elder = self.world.registry.elders.get(device.elder_id) if device else None
        who = f"{elder.name}（{elder.address}）" if elder else f"设备 {device_id}"
        if kind is EventKind.INACTIVITY:
            # The elder may have fallen and be unable to press: call now, and it sounds.
            return [Notice("device.inactivity", device_id,
                           f"{who}长时间无活动，请立即电话确认老人安全", at, "critical")]
        if kind is EventKind.TAMPER:
            return [Notice("device.tamper", device_id, f"{who}的报警设备被拆动或外壳打开", at)]
        return [Notice("device.power_loss", device_id, f"{who}的报警主机断电，正在使用电池", at)]

    def link_state(self, channel: str, up: bool) -> list[Notice]:
        """A serial port opened or failed: a disconnected receiver is down at once."""
        ch = self._channels.get(channel)
        if ch is None:
            return []
        ch.connected = up
        now = self.clock()
        if not up and not ch.down:
            ch.down = True
            return [Notice("receiver.down", channel,
                           f"接收机 {channel} 连接断开，报警可能无法接收", now, "critical")]
        if up:
            ch.last_seen = now
            if ch.down:
                ch.down = False
                return [Notice("receiver.up", channel, f"接收机 {channel} 已恢复", now, "info")]
        return []

    # -- the periodic check ---------------------------------------------------------------

    def check(self) -> list[Notice]:
        """Overdue devices and silent receivers, each reported once per outage."""
        now = self.clock()
        notices: list[Notice] = []
        for ch_name, ch in self._channels.items():
            if not ch.down and now - ch.last_seen > ch.interval_s * ch.missed:
                ch.down = True
                notices.append(Notice(
                    "receiver.down", ch_name,
                    f"接收机 {ch_name} 已 {now - ch.last_seen:.0f} 秒无心跳，报警可能无法接收",
                    now, "critical"))
        reg = self.world.registry
        for device in reg.devices.values():
            if device.test_interval_h is None:
                continue
            state = self._devices.get(device.device_id)
            seen = state.last_seen if state is not None else None
            last = seen if seen is not None else self._started
            if now - last > device.test_interval_h * 3600 * self.settings.grace:
                if state is None:
                    state = self._devices[device.device_id] = _DeviceState(None)
                if not state.offline:
                    state.offline = True
                    hours = (now - last) / 3600
                    notices.append(Notice(
                        "device.offline", device.device_id,
                        f"设备 {device.device_id} 已 {hours:.1f} 小时未报到"
                        f"（应每 {device.test_interval_h:g} 小时）", now))
        return notices

    def publish(self, notices: Iterable[Notice]) -> None:
        for notice in notices:
            self.on_notice(notice)

    def link_changed(self, channel: str, up: bool) -> None:
        """A transport's state callback: a receiver's port opened or failed."""
        self.publish(self.link_state(channel, up))

    async def run(self) -> None:
        """Check periodically until cancelled."""
        while True:
            await self.sleep(self.settings.check_every_s)
            self.publish(self.check())

    def counts(self) -> tuple[int, int]:
        """(offline, overdue) devices now, for the metrics, as :meth:`health` counts them
        but without sorting or a record per device (each /metrics scrape pays it: a
        city has 100k devices)."""
        offline = overdue = 0
        now, states = self.clock(), self._devices
        for device in self.world.registry.devices.values():
            state = states.get(device.device_id)
            if state is not None and state.offline:
                offline += 1
                overdue += 1
            elif self._overdue(device.test_interval_h, state, now):
                overdue += 1
        return offline, overdue

    def _overdue(self, interval_h: float | None, state: _DeviceState | None,
                 now: float) -> bool:
        if interval_h is None:
            return False
        last = state.last_seen if state is not None else None
        basis = last if last is not None else self._started
        return now - basis > interval_h * 3600 * self.settings.grace

    def health(self) -> list[DeviceHealth]:
        now = self.clock()
        out = []
        for device in sorted(self.world.registry.devices.values(), key=lambda d: d.device_id):
            state = self._devices.get(device.device_id)
            last = state.last_seen if state is not None else None
            overdue = bool(state is not None and state.offline) or self._overdue(
                device.test_interval_h, state, now)
            out.append(DeviceHealth(
                device.device_id, device.elder_id, last,
                state.battery_pct if state else None, device.test_interval_h, overdue,
                bool(state and state.low_battery)))
        return out
