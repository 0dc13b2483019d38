"""MQTT transport: IoT SOS buttons (Zigbee2MQTT and our own make) and live positions.

Theory of operation
-------------------
* **Acknowledge after commit.** aiomqtt 2.x lets paho PUBACK a QoS 1 message
  before our code sees it (aiomqtt #345). We switch the wrapped paho client to
  manual acknowledgement and PUBACK each message only after the gateway's sink
  returned, i.e. after the journal commit. A crash before that leaves the message
  unacknowledged at the broker, which redelivers it to our persistent session.
* **Persistent session.** Fixed client id and MQTT 3.1.1 ``clean_session=False``:
  messages published while the gateway is down or restarting are queued by the
  broker (measured in FIELD-NOTES: MQTT 5 with the default clean start loses them).
* **Reconnect** with capped, jittered backoff around ``async with client``; aiomqtt
  has no reconnect of its own and the client is created inside the running loop.
* **Status**: a retained ``online`` on connect and a retained ``offline`` will, so
  dashboards see a dead gateway.
* Messages are handled concurrently (bounded by ``max_inflight``) so a storm of
  presses shares journal group commits; PUBACKs may go out of order, which MQTT
  allows.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import structlog

from devices.backoff import Backoff
from devices.events import DeviceProtocolError
from devices.links import EventSink, LinkState
from devices.mqtt_payloads import MqttDecoder

log = structlog.get_logger(__name__)

RawHandler = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class MqttSettings:
    host: str
    port: int
    client_id: str
    status_topic: str
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    use_tls: bool = False
    keepalive_s: int = 30
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    max_inflight: int = 64


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails.

    paho-mqtt 2.2 (``Client._ssl_wrap_socket``) drops the socket without closing it when
    ``do_handshake`` raises (untrusted CA, wrong host name, refused client certificate):
    every reconnect attempt then leaves a descriptor to the garbage collector and a
    ResourceWarning.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


class MqttLink:
    """Owns the gateway's MQTT session for the life of the gateway."""

    def __init__(
        self,
        settings: MqttSettings,
        decoder: MqttDecoder,
        sink: EventSink,
        *,
        extra: Sequence[tuple[str, RawHandler]] = (),
        on_state: Callable[[bool], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._s = settings
        self._decoder = decoder
        self._sink = sink
        self._extra = list(extra)  # (topic filter, handler) e.g. responder positions
        self._state = LinkState(on_state)
        self._sleep = sleep
        self._backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s, rng)
        self._client: aiomqtt.Client | None = None
        self.connected = self._state.connected
        self.source = f"mqtt:{settings.host}:{settings.port}"
        self.received = 0
        self.acked = 0

    def _tls(self) -> ssl.SSLContext | None:
        s = self._s
        if not (s.use_tls or s.ca_file):
            return None
        ctx = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        if s.cert_file:
            ctx.load_cert_chain(str(s.cert_file), str(s.key_file) if s.key_file else None)
        if s.tls_insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.sslsocket_class = _ClosingSSLSocket
        return ctx

    def _make_client(self) -> aiomqtt.Client:
        s = self._s
        tls = self._tls()
        client = aiomqtt.Client(
            hostname=s.host,
            port=s.port,
            identifier=s.client_id,
            username=s.username,
            password=s.password,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=False,
            keepalive=s.keepalive_s,
            will=aiomqtt.Will(s.status_topic, b"offline", qos=1, retain=True),
            tls_context=tls,
            tls_insecure=s.tls_insecure if tls else None,
        )
        # The wrapped paho client: PUBACK only when we say so (after the journal commit).
        client._client.manual_ack_set(True)  # noqa: SLF001 - see module docstring
        return client

    async def run(self) -> None:
        """Keep a session up until cancelled.

        Message handlers belong to the link, not to one connection: a disconnect while
        a press is being journaled must not cancel it half-way (the commit would land
        but nobody would be alerted). The handler finishes; its PUBACK goes nowhere,
        so the broker redelivers and the redelivery joins the now-dispatched alarm.
        """
        bound = log.bind(channel=self.source, client_id=self._s.client_id)
        limit = asyncio.Semaphore(self._s.max_inflight)
        async with asyncio.TaskGroup() as handlers:
            while True:
                try:
                    # Inside the try: a CA, certificate or key file that is missing or
                    # unreadable (say, half-way through a renewal) is a link failure to
                    # retry, never a reason to stop the gateway and its serial receivers.
                    client = self._make_client()
                    async with client:
                        self._client = client
                        self._backoff.reset()
                        topics = [*self._decoder.subscriptions(), *(t for t, _ in self._extra)]
                        for topic in topics:
                            await client.subscribe(topic, qos=1)
                            deliver_lost_cancel()
                        await client.publish(self._s.status_topic, b"online", qos=1,
                                             retain=True)
                        deliver_lost_cancel()
                        self._state.set(True)
                        bound.info("mqtt.connected")
                        await self._consume(client, handlers, limit)
                except (aiomqtt.MqttError, OSError) as exc:  # ssl.SSLError is an OSError
                    bound.warning("mqtt.disconnected", error=str(exc))
                finally:
                    self._client = None
                    self._state.set(False)
                delay = self._backoff.next_delay()
                bound.info("mqtt.reconnecting", retry_in_s=round(delay, 2))
                await self._sleep(delay)

    async def _consume(self, client: aiomqtt.Client, handlers: asyncio.TaskGroup,
                       limit: asyncio.Semaphore) -> None:
        async for message in client.messages:
            self.received += 1
            stamp = time.monotonic()
            await limit.acquire()
            handlers.create_task(self._one(client, message, limit, stamp))

    async def _one(self, client: aiomqtt.Client, message: aiomqtt.Message,
                   limit: asyncio.Semaphore, received: float) -> None:
        topic = message.topic.value
        try:
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else (
                str(message.payload).encode() if message.payload is not None else b"")
            if await self._handled(topic, bytes(payload), received):
                # On the connection that delivered it; after a reconnect this is a no-op
                # and the broker redelivers (the journal dedupes the press).
                client._client.ack(message.mid, message.qos)  # noqa: SLF001
                self.acked += 1
        except Exception:  # a handler bug must not take the link (and the gateway) down
            log.exception("mqtt.handler_crashed", topic=topic)
        finally:
            limit.release()

    async def _handled(self, topic: str, payload: bytes, received: float) -> bool:
        """Process one message; True when it may be acknowledged."""
        for pattern, handler in self._extra:
            if paho.topic_matches_sub(pattern, topic):
                try:
                    await handler(topic, payload)
                except Exception:
                    log.exception("mqtt.handler_failed", topic=topic)
                return True
        try:
            events = self._decoder.decode(topic, payload)
        except DeviceProtocolError as exc:
            await self._sink.reject(f"mqtt:{topic}", exc)
            return True  # acknowledged: redelivering junk forever helps nobody
        for event in events:
            try:
                await self._sink.handle(event, "mqtt", received=received)
            except Exception as exc:  # noqa: BLE001 - not acked: redelivered
                log.error("mqtt.not_acknowledged", topic=topic, error=str(exc))
                return False
        return True

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Publish if connected; False (and logged) otherwise. Never raises."""
        client = self._client
        if client is None:
            log.warning("mqtt.publish_skipped", topic=topic, reason="not connected")
            return False
        try:
            await client.publish(topic, payload, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            log.warning("mqtt.publish_failed", topic=topic, error=str(exc))
            return False
        deliver_lost_cancel()
        return True


def deliver_lost_cancel() -> None:
    """Raise the cancellation an aiomqtt call may have swallowed.

    aiomqtt 2.x awaits broker acknowledgements with ``asyncio.wait_for``, which on
    Python 3.11 returns normally when the acknowledgement arrives in the same loop
    iteration as a cancel of the calling task (CPython gh-86296, fixed in 3.12): the
    cancel is lost, and a task meant to stop goes on waiting for the next state or
    message -- a gateway that never finishes stopping. Call after such an await, outside
    cleanup code (where a cancel is already being handled).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError

