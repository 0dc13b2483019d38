"""The alarm-state feed: each alarm's state, retained on MQTT, for dashboards and phones.

Dispatch announces a state change with a synchronous call that only records it; one
publisher task sends the changes in order. While it is behind (a storm, a slow or
absent broker) only each alarm's latest state is kept: a retained topic only needs
to converge, and a storm must not queue one publish per transition.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol


class Publish(Protocol):
    async def __call__(self, topic: str, payload: bytes, *, retain: bool = False) -> bool: ...


class AlarmStateFeed:
    def __init__(self, topic: str) -> None:
        """``topic`` has an ``{alarm_id}`` field (config ``mqtt.alarm_topic``)."""
        self._topic = topic
        self._latest: dict[str, bytes] = {}  # alarm id -> latest payload, oldest first
        self._ready = asyncio.Event()

    def announce(self, alarm_id: str, state: str, info: dict[str, Any]) -> None:
        payload = json.dumps({"alarm_id": alarm_id, "state": state, **info},
                             ensure_ascii=False).encode()
        self._latest.pop(alarm_id, None)  # re-queued at the end: changes stay in order
        self._latest[alarm_id] = payload
        self._ready.set()

    @property
    def pending(self) -> int:
        return len(self._latest)

    async def run(self, publish: Publish) -> None:
        """Publish until cancelled (``publish`` never raises: MqttLink.publish)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._latest:
                alarm_id = next(iter(self._latest))
                payload = self._latest.pop(alarm_id)
                await publish(self._topic.format(alarm_id=alarm_id), payload, retain=True)
