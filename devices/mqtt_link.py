"""MQTT transport: IoT SOS buttons (Zigbee2MQTT and our own make) and responder phones.

Theory of operation
-------------------
* **One sink, decoders by topic.** Each message goes to the first decoder whose
  subscriptions match its topic: button messages become events
  (``sink.handle``), responder-app messages commands (``sink.command``), malformed
  ones a rejection (``sink.reject``). The link only moves messages.
* **Acknowledge after commit.** aiomqtt 2.x lets paho PUBACK a QoS 1 message
  before our code sees it (aiomqtt #345). We switch the wrapped paho client to
  manual acknowledgement and PUBACK each message only after the gateway's sink
  returned, i.e. after the journal commit (for a command: after its effect is
  applied and committed; for malformed input: after it is journaled as rejected).
  A crash before that leaves the message unacknowledged at the broker, which
  redelivers it to our persistent session.
* **A withheld PUBACK is retried here, never left to the broker.** MQTT 3.1.1
  redelivers an unacknowledged message only on reconnect, and the broker sends no
  more than ``max_inflight_messages`` unacknowledged ones: a message left
  unacknowledged while the connection stays up is stuck, and after that many the
  broker holds back every later press (issue 9, faults 1 and 4). So when the sink
  raises :class:`~devices.links.CommitFailed` (journal full) the link keeps the
  message and calls the sink again with capped, jittered backoff until it commits;
  meanwhile the link is *stalled* (``stalled``, ``healthy``, ``on_stalled``) so the
  gateway's health turns red. Any other exception is a handler bug: reported
  through ``sink.crashed`` (operator notice, health red), journaled as a rejection
  and acknowledged, so a poison message can never fill the in-flight window.
* **End-to-end confirmation for our own buttons and drills.** After a message of our
  own schema is committed the link publishes ``MqttDecoder.confirmation`` (QoS 1, not
  retained) on ``<own_base>/<device>/confirm``; the button resends until it sees it
  (``devices/SCHEMA.md``); a drill gets ``DrillDecoder.confirmation``. That covers a
  broker that acknowledged the button and then lost the message (crash or power cut
  before its persistence snapshot).
* **Persistent session.** Fixed client id and MQTT 3.1.1 ``clean_session=False``:
  messages published while the gateway is down or restarting are queued by the
  broker (measured in FIELD-NOTES: MQTT 5 with the default clean start loses them).
* **Reconnect** with capped, jittered backoff around ``async with client``; aiomqtt
  has no reconnect of its own and the client is created inside the running loop.
* **Status**: a retained ``online`` on connect, a retained ``offline`` will, so
  dashboards see a dead gateway, and a retained ``offline`` published on a graceful
  stop (which sends no will).
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
from devices.drills import DrillDecoder
from devices.events import DeviceEvent, DeviceProtocolError
from devices.links import CommitFailed, EventSink, LinkState
from devices.mqtt_payloads import MqttDecoder
from devices.responder_app import ResponderAppDecoder, ResponderCommand

log = structlog.get_logger(__name__)

TopicDecoder = MqttDecoder | DrillDecoder | ResponderAppDecoder
"""What the link routes messages to: button messages, drills or responder-app commands."""


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
    # Retrying a commit the journal refused (disk full): first delay and cap, seconds.
    commit_retry_initial_s: float = 0.1
    commit_retry_max_s: float = 5.0


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


class _Pending:
    """One received message on its way to the sink; ``held`` once a commit failed."""

    __slots__ = ("attempts", "held", "raw", "topic")

    def __init__(self, topic: str, raw: bytes) -> None:
        self.topic = topic
        self.raw = raw
        self.held = False
        self.attempts = 0


class MqttLink:
    """Owns the gateway's MQTT session for the life of the gateway.

    Counters for metrics and health: ``received``, ``acked``, ``rejected`` (malformed
    input journaled), ``crashes`` (handler bugs), ``confirmed`` (confirmations
    published) and ``stalled`` (messages held because their commit failed).
    """

    def __init__(
        self,
        settings: MqttSettings,
        decoders: Sequence[TopicDecoder],
        sink: EventSink,
        *,
        on_state: Callable[[bool], None] | None = None,
        on_stalled: Callable[[bool], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        """``decoders``: a message goes to the first one with a matching subscription.

        ``on_state(up)`` follows the connection; ``on_stalled(True)`` is called when a
        first message is held because its commit failed, ``on_stalled(False)`` when
        the last held one is committed. Raises ValueError without decoders."""
        if not decoders:
            raise ValueError("MqttLink needs at least one decoder")
        self._s = settings
        self._decoders = tuple(decoders)
        self._routes = [(f, d) for d in self._decoders for f in d.subscriptions()]
        self._confirmers = tuple(d for d in self._decoders
                                 if isinstance(d, MqttDecoder | DrillDecoder))
        self._sink = sink
        self._state = LinkState(on_state)
        self._on_stalled = on_stalled
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s,
                                self._rng)
        self._client: aiomqtt.Client | None = None
        self.connected = self._state.connected
        self.source = f"mqtt:{settings.host}:{settings.port}"
        self.received = 0
        self.acked = 0
        self.rejected = 0
        self.crashes = 0
        self.confirmed = 0
        self.stalled = 0
        self.reconnects = 0  # connections made after the first (a metric)
        self._connections = 0

    @property
    def healthy(self) -> bool:
        """False while any message is held because the journal could not commit it."""
        return self.stalled == 0

    def subscriptions(self) -> list[str]:
        """Every topic filter the link subscribes to (QoS 1), in decoder order."""
        return [f for f, _ in self._routes]

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
                        for topic in self.subscriptions():
                            await client.subscribe(topic, qos=1)
                            deliver_lost_cancel()
                        await client.publish(self._s.status_topic, b"online", qos=1,
                                             retain=True)
                        deliver_lost_cancel()
                        self._state.set(True)
                        self._connections += 1
                        self.reconnects = self._connections - 1
                        bound.info("mqtt.connected")
                        try:
                            await self._consume(client, handlers, limit)
                        except asyncio.CancelledError:
                            await self._goodbye(client)
                            raise
                except (aiomqtt.MqttError, OSError) as exc:  # ssl.SSLError is an OSError
                    bound.warning("mqtt.disconnected", error=str(exc))
                finally:
                    self._client = None
                    self._state.set(False)
                delay = self._backoff.next_delay()
                bound.info("mqtt.reconnecting", retry_in_s=round(delay, 2))
                await self._sleep(delay)

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        """On stop: publish a retained ``offline`` and wait (briefly) for the broker.

        A clean disconnect sends no will, so without this the status would stay
        ``online`` after a graceful stop. Awaiting its PUBACK also flushes the PUBACKs
        paho still had queued (``ack`` only queues them): stopping without that drops
        them, and the broker redelivers those messages on the next start."""
        try:
            async with asyncio.timeout(2):
                await client.publish(self._s.status_topic, b"offline", qos=1, retain=True)
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            log.warning("mqtt.goodbye_failed", error=str(exc) or type(exc).__name__)

    async def _consume(self, client: aiomqtt.Client, handlers: asyncio.TaskGroup,
                       limit: asyncio.Semaphore) -> None:
        async for message in client.messages:
            self.received += 1
            stamp = time.monotonic()
            await limit.acquire()
            handlers.create_task(self._one(client, message, limit, stamp))

    async def _one(self, client: aiomqtt.Client, message: aiomqtt.Message,
                   limit: asyncio.Semaphore, received: float) -> None:
        """Take one message to the sink, PUBACK it, then confirm it to its button.

        Never raises but CancelledError: a task failing here would end the TaskGroup
        of every handler, and the link with it."""
        raw = message.payload if isinstance(message.payload, bytes | bytearray) else (
            str(message.payload).encode() if message.payload is not None else b"")
        pending = _Pending(message.topic.value, bytes(raw))
        try:
            confirmation = await self._deliver(pending, received)
            # On the connection that delivered it; after a reconnect this is a no-op
            # and the broker redelivers (the journal dedupes the press).
            client._client.ack(message.mid, message.qos)  # noqa: SLF001
            self.acked += 1
        finally:
            if pending.held:
                self._unhold()
            limit.release()
        # After the PUBACK: the confirmation is for the button, the broker and the journal
        # are done. Lost (not connected)? The button resends; the gateway dedupes.
        if confirmation is not None and await self.publish(*confirmation):
            self.confirmed += 1

    def _decoder_for(self, topic: str) -> TopicDecoder | None:
        for pattern, decoder in self._routes:
            if paho.topic_matches_sub(pattern, topic):
                return decoder
        return None

    async def _deliver(self, pending: _Pending, received: float) -> tuple[str, bytes] | None:
        """Hand one message to the sink until it is committed; the confirmation to send."""
        topic, raw = pending.topic, pending.raw
        source = f"mqtt:{topic}"
        try:
            decoded = self._decode(topic, raw)
            if isinstance(decoded, DeviceProtocolError):
                error = decoded
                await self._commit(pending, lambda: self._sink.reject(source, error))
                self.rejected += 1
                return None
            if isinstance(decoded, list):
                return await self._events(pending, decoded, received)
            command: ResponderCommand = decoded
            await self._commit(pending, lambda: self._sink.command(command, source))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a handler bug: reported, journaled, acked
            await self._crashed(pending, source, exc)
        return None

    def _decode(self, topic: str, raw: bytes) -> (
            list[DeviceEvent] | ResponderCommand | DeviceProtocolError):
        decoder = self._decoder_for(topic)
        if decoder is None:
            # A subscription of an earlier version lives on in the persistent session:
            # what it delivers is input we do not understand.
            return DeviceProtocolError(f"no decoder for topic {topic!r}", raw)
        try:
            return decoder.decode(topic, raw)
        except DeviceProtocolError as exc:
            return exc

    async def _events(self, pending: _Pending, events: list[DeviceEvent],
                      received: float) -> tuple[str, bytes] | None:
        # One at a time, each until committed: a retry resumes at the event that failed
        # instead of journaling the ones before it twice.
        for event in events:
            await self._commit(pending, lambda e=event: self._sink.handle(  # type: ignore[misc]
                e, "mqtt", received=received))
        for event in events:
            for confirmer in self._confirmers:
                confirmation = confirmer.confirmation(event)
                if confirmation is not None:
                    return confirmation
        return None

    async def _commit(self, pending: _Pending, call: Callable[[], Awaitable[None]]) -> None:
        """Await ``call`` until it stops raising CommitFailed (or the link is stopped)."""
        backoff: Backoff | None = None
        while True:
            pending.attempts += 1
            try:
                await call()
            except CommitFailed as exc:
                if backoff is None:
                    backoff = Backoff(self._s.commit_retry_initial_s,
                                      self._s.commit_retry_max_s, self._rng)
                if not pending.held:
                    pending.held = True
                    self._hold()
                    log.error("mqtt.commit_retry", topic=pending.topic, reason=exc.reason,
                              stalled=self.stalled,
                              action="message kept, not acknowledged; retrying")
                await self._sleep(backoff.next_delay())
                continue
            if backoff is not None:
                log.warning("mqtt.commit_recovered", topic=pending.topic,
                            attempts=pending.attempts)
            return

    async def _crashed(self, pending: _Pending, source: str, exc: Exception) -> None:
        self.crashes += 1
        log.error("mqtt.handler_crashed", topic=pending.topic, error=repr(exc),
                  crashes=self.crashes, action="journaled as rejected and acknowledged")
        try:
            self._sink.crashed(source, f"handling {pending.topic!r}", pending.raw, exc)
        except Exception:  # the sink promised not to raise; the link must go on anyway
            log.exception("mqtt.crash_report_failed", topic=pending.topic)
        error = DeviceProtocolError(f"handler crashed: {exc!r}", pending.raw)
        try:
            await self._commit(pending, lambda: self._sink.reject(source, error))
        except asyncio.CancelledError:
            raise
        except Exception:  # acked anyway: crashed() already turned health red
            log.exception("mqtt.reject_crashed", topic=pending.topic)

    def _hold(self) -> None:
        self.stalled += 1
        if self.stalled == 1 and self._on_stalled is not None:
            self._on_stalled(True)

    def _unhold(self) -> None:
        self.stalled -= 1
        if self.stalled == 0:
            log.info("mqtt.unstalled")
            if self._on_stalled is not None:
                self._on_stalled(False)

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

