"""The MQTT link against a real broker: no message can stall intake (issue 9).

A private Mosquitto (``max_inflight_messages 100``, as shipped) and the real aiomqtt/paho
path; the gateway is replaced by a small recording sink whose failures each test
chooses. The broker side is checked too: after a test the link's persistent session
is taken over by a plain client, which publishes a marker to itself; whatever the
broker still holds unacknowledged for the session is redelivered before the marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import aiomqtt
import orjson
import pytest
from structlog.testing import capture_logs

from devices.events import DeviceEvent, DeviceProtocolError, EventKind
from devices.links import CommitFailed
from devices.mqtt_link import MqttLink, MqttSettings
from devices.mqtt_payloads import MqttDecoder, encode_own_event
from devices.responder_app import AckCommand, ResponderAppDecoder, ResponderCommand
from tests.helpers import Mosquitto, eventually

pytestmark = pytest.mark.integration

CLIENT_ID = "gw-link-test"
# A reset clock in UTC+8: OverflowError in the decoder before issue 9's fix.
POISON = b'{"v": 1, "event": "status", "ts": "0001-01-01T00:00:00+08:00"}'
Failure = Callable[[DeviceEvent | ResponderCommand], BaseException | None]


@dataclass
class RecordingSink:
    """The gateway's side of the link, recording every call; ``failure`` chooses what
    a handle/command call raises (None: it commits)."""

    failure: Failure = lambda _: None
    handled: list[DeviceEvent] = field(default_factory=list)
    commands: list[ResponderCommand] = field(default_factory=list)
    rejected: list[tuple[str, DeviceProtocolError]] = field(default_factory=list)
    crashes: list[tuple[str, bytes, BaseException]] = field(default_factory=list)
    attempts: int = 0

    async def handle(self, event: DeviceEvent, source: str, *,
                     received: float | None = None) -> None:
        self.attempts += 1
        error = self.failure(event)
        if error is not None:
            raise error
        self.handled.append(event)

    async def command(self, command: ResponderCommand, source: str) -> None:
        self.attempts += 1
        error = self.failure(command)
        if error is not None:
            raise error
        self.commands.append(command)

    async def reject(self, source: str, error: DeviceProtocolError) -> None:
        self.rejected.append((source, error))

    def crashed(self, source: str, detail: str, raw: bytes, error: BaseException) -> None:
        self.crashes.append((source, raw, error))


@dataclass
class Running:
    link: MqttLink
    states: list[bool]
    stalls: list[bool]


def settings(broker: Mosquitto, max_inflight: int = 64) -> MqttSettings:
    return MqttSettings(host=broker.host, port=broker.port, client_id=CLIENT_ID,
                        status_topic="alarm/gateway/link-test/status",
                        reconnect_initial_s=0.05, reconnect_max_s=0.5,
                        max_inflight=max_inflight,
                        commit_retry_initial_s=0.01, commit_retry_max_s=0.05)


@contextlib.asynccontextmanager
async def running_link(broker: Mosquitto, sink: RecordingSink,
                       max_inflight: int = 64) -> AsyncIterator[Running]:
    states: list[bool] = []
    stalls: list[bool] = []
    link = MqttLink(settings(broker, max_inflight), [MqttDecoder(), ResponderAppDecoder()],
                    sink, on_state=states.append, on_stalled=stalls.append)
    task = asyncio.create_task(link.run(), name="mqtt-link-under-test")
    try:
        await asyncio.wait_for(link.connected.wait(), 10)
        yield Running(link, states, stalls)
    finally:
        # A graceful stop: the link's goodbye (a retained offline, awaited) also flushes
        # the PUBACKs paho still queues, which the broker-side checks rely on.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish_all(broker: Mosquitto, messages: Sequence[tuple[str, bytes]]) -> None:
    """Publish QoS 1 messages in order, each PUBACKed by the broker."""
    async with aiomqtt.Client(broker.host, broker.port, identifier="link-test-device") as dev:
        for topic, payload in messages:
            await dev.publish(topic, payload, qos=1)


async def unacknowledged(broker: Mosquitto) -> list[tuple[str, bytes]]:
    """What the broker still holds unacknowledged for the link's session (the link
    must be stopped): redelivered on takeover, before a marker published afterwards."""
    marker = "alarm/buttons/marker-9/event"
    held: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(broker.host, broker.port, identifier=CLIENT_ID,
                              clean_session=False,
                              protocol=aiomqtt.ProtocolVersion.V311) as session:
        await session.publish(marker, b"marker", qos=1)
        async with asyncio.timeout(10):
            async for message in session.messages:
                if message.topic.value == marker:
                    return held
                assert isinstance(message.payload, bytes)
                held.append((message.topic.value, message.payload))
    raise AssertionError("marker never arrived")


def press(device: str, seq: int) -> tuple[str, bytes]:
    return f"alarm/buttons/{device}/event", encode_own_event("sos", seq=seq)


def seqs(events: Sequence[DeviceEvent]) -> list[int]:
    return sorted(json.loads(e.raw)["seq"] for e in events)


async def test_poison_messages_are_rejected_and_acked_and_a_later_press_arrives(
    mosquitto: Mosquitto,
) -> None:
    """Fault 1: 150 messages that crashed the decoder, more than the broker's in-flight
    window; before the fix none was acked and the press after them never arrived."""
    sink = RecordingSink()
    async with running_link(mosquitto, sink) as run:
        topic = "alarm/buttons/kl-0042/event"
        await publish_all(mosquitto, [(topic, POISON)] * 150 + [press("kl-0042", 1)])
        await eventually(lambda: len(sink.handled) == 1 and len(sink.rejected) == 150,
                         timeout=20)
        assert run.link.acked == 151 and run.link.rejected == 150
        assert run.link.crashes == 0 and sink.crashes == []
        assert all(e.raw == POISON and e.reason == "invalid fields: ts"
                   and source == f"mqtt:{topic}" for source, e in sink.rejected)
        assert sink.handled[0].kind is EventKind.EMERGENCY
        assert run.states == [True]
    assert await unacknowledged(mosquitto) == []


async def test_a_crashing_handler_is_reported_journaled_and_acked(mosquitto: Mosquitto) -> None:
    """A handler bug on 120 messages in a row (more than the in-flight window): each is
    reported through crashed(), journaled as rejected and acked; a later press arrives."""
    left = {"crashes": 120}

    def failure(_: object) -> BaseException | None:
        if left["crashes"] == 0:
            return None
        left["crashes"] -= 1
        return RuntimeError("bug in the press path")

    sink = RecordingSink(failure)
    async with running_link(mosquitto, sink) as run:
        await publish_all(mosquitto, [press("kl-0042", i) for i in range(121)])
        await eventually(lambda: len(sink.handled) == 1 and len(sink.rejected) == 120,
                         timeout=20)
        assert run.link.crashes == len(sink.crashes) == 120
        assert all(isinstance(error, RuntimeError) for _, _, error in sink.crashes)
        assert {e.reason for _, e in sink.rejected} == {
            "handler crashed: RuntimeError('bug in the press path')"}
        # Each rejection carries its own message's bytes, for the journal.
        assert sorted(json.loads(e.raw)["seq"] for _, e in sink.rejected) \
            + seqs(sink.handled) == sorted(range(121))
        assert run.link.acked == 121 and run.link.healthy
    assert await unacknowledged(mosquitto) == []


async def test_a_full_disk_holds_messages_in_the_link_and_heals_without_a_reconnect(
    mosquitto: Mosquitto,
) -> None:
    """Fault 4: commits fail for as long as the broker's in-flight window (100) is full;
    before the fix the withheld acks waited for a reconnect that never came."""
    disk = {"full": True}

    def failure(_: object) -> BaseException | None:
        return CommitFailed("database or disk is full") if disk["full"] else None

    sink = RecordingSink(failure)
    with capture_logs() as logs:
        async with running_link(mosquitto, sink, max_inflight=200) as run:
            publisher = asyncio.create_task(
                publish_all(mosquitto, [press(f"kl-{i % 7}", i) for i in range(130)]))
            # The broker's whole window is held in the link, and the link says so.
            await eventually(lambda: run.link.stalled == 100, timeout=20)
            assert not run.link.healthy and run.stalls == [True]
            assert sink.handled == [] and run.link.acked == 0
            disk["full"] = False
            await eventually(lambda: len(sink.handled) == 130, timeout=20)
            await publisher
            assert seqs(sink.handled) == list(range(130))
            assert run.link.acked == 130 and run.link.stalled == 0 and run.link.healthy
            assert run.stalls == [True, False]
            assert run.states == [True]  # no reconnect
    retries = [e for e in logs if e["event"] == "mqtt.commit_retry"]
    recovered = [e for e in logs if e["event"] == "mqtt.commit_recovered"]
    assert len(retries) == len(recovered) == 100  # once per held message
    assert {e["reason"] for e in retries} == {"database or disk is full"}
    assert await unacknowledged(mosquitto) == []


async def test_a_command_whose_effect_failed_to_commit_is_not_acknowledged(
    mosquitto: Mosquitto,
) -> None:
    """Fault 2: a responder's ack whose journal write fails is retried, never acked."""
    sink = RecordingSink(lambda _: CommitFailed("disk I/O error"))
    body = orjson.dumps({"alarm_id": "A7K3-9QXM"})
    async with running_link(mosquitto, sink) as run:
        await publish_all(mosquitto, [("responders/R1/ack", body)])
        await eventually(lambda: sink.attempts >= 3)
        assert run.link.acked == 0 and run.link.stalled == 1 and sink.commands == []
    # Stopped while still failing: the broker kept it for the session.
    assert await unacknowledged(mosquitto) == [("responders/R1/ack", body)]


async def test_a_command_is_acknowledged_once_its_effect_is_committed(
    mosquitto: Mosquitto,
) -> None:
    left = {"failures": 5}

    def failure(_: object) -> BaseException | None:
        if left["failures"] == 0:
            return None
        left["failures"] -= 1
        return CommitFailed("disk I/O error")

    sink = RecordingSink(failure)
    async with running_link(mosquitto, sink) as run:
        await publish_all(mosquitto, [("responders/R1/ack", b'{"alarm_id": "A7K3-9QXM"}')])
        await eventually(lambda: run.link.acked == 1)
        assert sink.commands == [AckCommand("A7K3-9QXM", "R1", "phone")]
        assert sink.attempts == 6 and run.stalls == [True, False]
    assert await unacknowledged(mosquitto) == []


async def test_own_buttons_are_confirmed_after_the_commit_only(mosquitto: Mosquitto) -> None:
    """Fault 5: our own buttons hear back once their message is committed; a Zigbee2MQTT
    device never does, nor a message whose commit keeps failing."""

    def failure(item: object) -> BaseException | None:
        failing = isinstance(item, DeviceEvent) and item.address.value.endswith("kl-0043")
        return CommitFailed("database or disk is full") if failing else None

    sink = RecordingSink(failure)
    confirmations: list[tuple[str, dict[str, object], set[bytes]]] = []
    async with (
        running_link(mosquitto, sink) as run,
        aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="link-test-watcher") as w,
    ):
        await w.subscribe("#", qos=1)

        async def watch() -> None:
            async for message in w.messages:
                if message.topic.value.endswith("/confirm"):
                    assert isinstance(message.payload, bytes)
                    # What the link had committed when the confirmation went out.
                    confirmations.append((message.topic.value, json.loads(message.payload),
                                          {e.raw for e in sink.handled}))

        watcher = asyncio.create_task(watch())
        sos = press("kl-0042", 7)
        await publish_all(mosquitto, [("zigbee2mqtt/sos-0001", b'{"action": "emergency"}'),
                                      press("kl-0043", 8), sos])
        await eventually(lambda: len(confirmations) == 1 and len(sink.handled) == 2)
        # A barrier: once its confirmation is in, any for the earlier ones would be too.
        await publish_all(mosquitto, [press("kl-0044", 9)])
        await eventually(lambda: len(confirmations) == 2)
        watcher.cancel()
        first, barrier = confirmations
        assert first[0] == "alarm/buttons/kl-0042/confirm"
        assert first[1]["seq"] == 7 and first[1]["v"] == 1
        assert isinstance(first[1]["digest"], str) and len(first[1]["digest"]) == 16
        assert sos[1] in first[2]  # committed before it was confirmed
        assert barrier[0] == "alarm/buttons/kl-0044/confirm" and barrier[1]["seq"] == 9
        assert run.link.confirmed == 2 and run.link.stalled == 1  # kl-0043 still held
        assert sorted(e.address.value for e in sink.handled) == [
            "alarm/buttons/kl-0042", "alarm/buttons/kl-0044", "zigbee2mqtt/sos-0001"]


async def test_a_graceful_stop_leaves_a_retained_offline(mosquitto: Mosquitto) -> None:
    """A clean disconnect sends no will: the link says goodbye itself."""
    status = "alarm/gateway/link-test/status"
    async with running_link(mosquitto, RecordingSink()):
        pass
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="link-test-dash") as d:
        await d.subscribe(status, qos=1)
        async with asyncio.timeout(5):
            async for message in d.messages:
                assert message.retain and message.payload == b"offline"
                break
