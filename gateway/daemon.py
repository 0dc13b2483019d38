"""The gateway's lifecycle: start in order, run until asked to stop, stop in phases.

Start: registry and geo indexes (validated, in memory) -> journal -> SMS client ->
alert player -> dispatcher -> resume open alarms from the journal -> control API
-> device links (MQTT, serial) -> READY=1 to systemd.

Stop (SIGTERM, or SIGINT once): phase 1 stops intake (device links close; devices
and the broker keep what we did not acknowledge); phase 2 lets in-flight
dispatch finish within ``shutdown_timeout_s``, then cancels what remains (the
journal has it as unfinished and the next start resumes it); phase 3 closes the
SMS client, the alert player and the journal. A second SIGINT forces exit.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import structlog

from devices.callerid import DEFAULT_INIT_COMMANDS, CallerIdDecoder
from devices.contact_id import DEFAULT_EVENT_KINDS
from devices.mqtt_link import MqttLink, MqttSettings
from devices.mqtt_payloads import MqttDecoder
from devices.serial_link import SerialLink
from devices.surgard import SurGardDecoder
from gateway import systemd
from gateway.alert import AlertPlayer, AlertSettings
from gateway.config import Config, Secrets
from gateway.control import ControlServer
from gateway.dispatch import Dispatcher, DispatchSettings, Wave
from gateway.geo import GeoError, GeoService, Projector, parse_position
from gateway.gsm import GsmModemSender, GsmSettings
from gateway.intake import Intake
from gateway.journal import Journal, JournalError, UnknownAlarm
from gateway.lifecycle import IllegalTransition
from gateway.metrics import Metrics
from gateway.model import Registry
from gateway.registry import (
    RegistryError,
    RegistryFingerprint,
    load_registry,
    registry_fingerprint,
)
from gateway.sms import TwilioSender, TwilioSettings
from gateway.supervision import Notice, Supervisor
from gateway.webhooks import (
    STATUS_PATH,
    InboundPoller,
    InboundReply,
    StatusPoller,
    StatusUpdate,
    TwilioWebhooks,
)
from gateway.wording import Composer

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """The gateway cannot start (missing secrets, unreadable registry...)."""


def load_world(cfg: Config) -> tuple[Registry, GeoService]:
    """Registry and geo indexes, validated. Raises RegistryError / GeoError."""
    m = cfg.model
    registry = load_registry(cfg.registry_dir, default_region=m.registry.default_region,
                             bbox=m.registry.bbox)
    projector = Projector(m.geo.crs, m.geo.source_crs, m.registry.bbox)
    return registry, GeoService(registry, projector, stale_after_s=m.geo.stale_after_s)


_MAX_COMMAND_PAYLOAD = 256  # an ack or a duty change is a few dozen bytes
_F = TypeVar("_F")


def _small_json_field(payload: bytes, name: str, kind: type[_F]) -> _F | None:
    """``payload``'s JSON object field ``name`` if it is a ``kind``; None if anything is off
    (too large, not UTF-8 JSON, not an object, missing, wrong type)."""
    if len(payload) > _MAX_COMMAND_PAYLOAD:
        return None
    try:
        data = json.loads(payload)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    value = data.get(name) if isinstance(data, dict) else None
    return value if isinstance(value, kind) else None


@dataclass
class Gateway:
    """A running gateway's parts, for the CLI, the demo and tests."""

    config: Config
    secrets: Secrets
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    registry: Registry | None = None
    geo: GeoService | None = None
    journal: Journal | None = None
    dispatcher: Dispatcher | None = None
    intake: Intake | None = None
    player: AlertPlayer | None = None
    control: ControlServer | None = None
    mqtt: MqttLink | None = None
    serial: list[SerialLink] = field(default_factory=list)
    supervisor: Supervisor | None = None
    sender: TwilioSender | None = None
    metrics: Metrics = field(default_factory=Metrics)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    _tasks: asyncio.TaskGroup | None = None
    _sounding_notices: dict[str, str] = field(default_factory=dict)  # subject -> alert id
    _side_tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _states: dict[str, bytes] = field(default_factory=dict)  # alarm id -> latest state
    _states_ready: asyncio.Event = field(default_factory=asyncio.Event)
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _registry_seen: RegistryFingerprint | None = None  # files of the registry in use
    _registry_failed: RegistryFingerprint | None = None  # files a reload refused

    def request_stop(self) -> None:
        self.stop_requested.set()

    def _registry(self) -> Registry:
        if self.registry is None:
            raise RuntimeError("registry not loaded")
        return self.registry

    def _geo(self) -> GeoService:
        if self.geo is None:
            raise RuntimeError("geo not loaded")
        return self.geo

    async def reload(self) -> bool:
        """Reload the registry and rebuild indexes in a worker thread, then swap them in.

        Alarms in flight keep the objects they hold; live responder positions and duty
        overrides carry over; a broken registry is refused and the running one kept.
        One reload at a time (SIGHUP, POST /reload and the file watch may coincide)."""
        async with self._reload_lock:
            # Taken before reading: a write during the load shows up as a change later.
            files = registry_fingerprint(self.config.registry_dir)
            try:
                registry, fresh = await asyncio.to_thread(load_world, self.config)
            except (RegistryError, GeoError, OSError) as exc:
                self._registry_failed = files
                log.error("registry.reload_failed", error=str(exc),
                          action="kept the old registry")
                return False
            fresh.adopt_live_state(self._geo())  # on the loop thread: the old index is live
            self.geo, self.registry = fresh, registry
            self._registry_seen, self._registry_failed = files, None
            gc.freeze()
            log.info("registry.reloaded", elders=len(registry.elders),
                     devices=len(registry.devices), responders=len(registry.responders))
            if self.journal is not None:
                await self._sync_duty(self.journal, apply=False)
            return True

    async def _watch_registry(self, interval_s: float) -> None:
        """Reload the registry when its files change, once they have stopped changing.

        Looks every ``interval_s``; a change is acted on when the next look finds the
        files as they were (an editor or a copy may take a while to finish), so a
        reload follows a save within one to two intervals. A version a reload refused
        is not tried again until the files change once more."""
        directory = self.config.registry_dir
        settling: RegistryFingerprint | None = None
        while True:
            # Real time, not the injected sleep: files change in real time, and a test
            # driving alarm timers with a fake clock must not see this loop spin it.
            await asyncio.sleep(interval_s)
            files = registry_fingerprint(directory)
            if files in (self._registry_seen, self._registry_failed):
                settling = None
                continue
            if files != settling:
                if settling is None:
                    before = dict((f[0], f) for f in self._registry_seen or ())
                    log.info("registry.changed", directory=str(directory),
                             files=[f[0] for f in files if before.get(f[0]) != f])
                settling = files
                continue
            settling = None
            try:
                await self.reload()
            except Exception:  # a watcher must never take the gateway down
                self._registry_failed = files
                log.exception("registry.reload_crashed", action="kept the old registry")

    def health(self) -> dict[str, Any]:
        links = {}
        if self.mqtt is not None:
            links[self.mqtt.source] = self.mqtt.connected.is_set()
        for s in self.serial:
            links[s.source] = s.connected.is_set()
        health: dict[str, Any] = {
            "status": "ok" if self.ready.is_set() else "starting",
            "uptime_s": round(self.monotonic() - self.started_at, 1),
            "links": links,
            "open_alarms": len(self.dispatcher.active) if self.dispatcher else 0,
            "alerting": list(self.player.active()) if self.player else [],
        }
        if self.geo is not None:
            stats = self.geo.stats()
            health["responders"] = {"on_duty": stats.on_duty, "live": stats.live,
                                    "busy": len(self.dispatcher.busy_responders())
                                    if self.dispatcher else 0}
        return health

    def _geo_gauge(self, field_name: str) -> Callable[[], float]:
        def read() -> float:
            return float(getattr(self.geo.stats(), field_name)) if self.geo else 0.0

        return read

    def _twilio(self) -> TwilioSettings:
        m = self.config.model.sms
        if not (self.secrets.twilio_account_sid and self.secrets.twilio_auth_token):
            raise StartupError(
                f"Twilio credentials missing: set the {m.account_sid_secret.upper()} and "
                f"{m.auth_token_secret.upper()} environment variables or systemd credentials "
                f"'{m.account_sid_secret}' and '{m.auth_token_secret}'")
        return TwilioSettings(
            account_sid=self.secrets.twilio_account_sid,
            auth_token=self.secrets.twilio_auth_token,
            from_number=m.from_number,
            messaging_service_sid=m.messaging_service_sid,
            base_url=m.base_url,
            request_timeout_s=m.request_timeout_s,
            max_attempts=m.max_attempts,
            concurrency=m.concurrency,
            status_callback_url=(m.public_url + STATUS_PATH) if m.public_url else None,
        )

    def _links(self, intake: Intake) -> None:
        m = self.config.model
        kinds = {**DEFAULT_EVENT_KINDS, **m.contact_id.codes}
        for port in m.serial:
            if port.protocol == "surgard":
                def factory(k: dict[str, Any] = kinds) -> SurGardDecoder:
                    return SurGardDecoder(kinds=k)
                init: tuple[str, ...] = ()
            else:
                def factory(region: str = m.registry.default_region) -> CallerIdDecoder:  # type: ignore[misc]
                    return CallerIdDecoder(default_region=region)
                init = port.init_commands if port.init_commands is not None \
                    else DEFAULT_INIT_COMMANDS
            self.serial.append(SerialLink(
                name=port.name, url=port.port, protocol=port.protocol, decoder_factory=factory,
                sink=intake, baudrate=port.baudrate, init_commands=init,
                reconnect_initial_s=port.reconnect_initial_s,
                reconnect_max_s=port.reconnect_max_s,
                on_state=self._link_state(f"serial:{port.name}"),
            ))
        q = m.mqtt
        if q.enabled:
            tls = q.tls
            settings = MqttSettings(
                host=q.host, port=q.port, client_id=q.client_id or f"gw-{m.gateway.name}",
                status_topic=q.status_topic.format(name=m.gateway.name),
                username=q.username, password=self.secrets.mqtt_password,
                ca_file=tls.ca_file if tls else None, cert_file=tls.cert_file if tls else None,
                key_file=tls.key_file if tls else None,
                tls_insecure=tls.insecure if tls else False, use_tls=tls is not None,
                keepalive_s=q.keepalive_s, reconnect_initial_s=q.reconnect_initial_s,
                reconnect_max_s=q.reconnect_max_s, max_inflight=q.max_inflight,
            )
            decoder = MqttDecoder(z2m_base=q.z2m_base, own_base=q.own_base,
                                  emergency_actions=frozenset(q.emergency_actions))
            self.mqtt = MqttLink(
                settings, decoder, intake,
                extra=[("responders/+/location", self._position),
                       ("responders/+/duty", self._duty),
                       ("responders/+/ack", self._responder_ack),
                       ("alarm/alarms/+/ack", self._mqtt_ack)],
                on_state=self._link_state("mqtt"),
            )

    def _link_state(self, channel: str) -> Callable[[bool], None]:
        gauge = self.metrics.transport_up.labels(channel)

        def changed(up: bool) -> None:
            gauge.set(int(up))
            if self.supervisor is not None:
                notices = self.supervisor.link_state(channel, up)
                if notices:
                    self._spawn(self.supervisor.publish(notices), f"notice-{channel}")

        return changed

    def _spawn(self, coro: Any, name: str) -> None:
        """Best-effort side work (MQTT announcements, notices): cancelled at shutdown."""
        if self._tasks is None:
            coro.close()
            return
        task = self._tasks.create_task(coro, name=name)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _notice(self, notice: Notice) -> None:
        """An operator notice: logged, journaled, published, and heard when critical."""
        level = {"critical": "critical", "info": "info"}.get(notice.severity, "warning")
        getattr(log, level)(f"notice.{notice.kind}", subject=notice.subject, text=notice.text)
        notice_id = None
        if self.journal is not None:
            notice_id = await self.journal.record_notice(
                at=notice.at, kind=notice.kind, subject=notice.subject,
                severity=notice.severity, text=notice.text)
        if self.mqtt is not None:
            await self.mqtt.publish("alarm/notices", json.dumps({
                "id": notice_id, "kind": notice.kind, "subject": notice.subject,
                "severity": notice.severity, "text": notice.text, "at": notice.at,
            }, ensure_ascii=False).encode())
        if self.player is None:
            return
        if notice.severity == "critical" and notice_id is not None:
            alert_id = f"notice-{notice_id}"
            self._sounding_notices[notice.subject] = alert_id
            await self.player.start(alert_id, notice.text)
        elif notice.kind.endswith((".up", ".online")):
            sounding = self._sounding_notices.pop(notice.subject, None)
            if sounding is not None:
                await self.player.stop(sounding)

    async def ack_notice(self, notice_id: int, by: str) -> bool:
        if self.journal is None:
            return False
        done = await self.journal.ack_notice(notice_id, by)
        if self.player is not None:
            await self.player.stop(f"notice-{notice_id}")
        for subject, alert_id in list(self._sounding_notices.items()):
            if alert_id == f"notice-{notice_id}":
                del self._sounding_notices[subject]
        return done

    async def _on_reply(self, reply: InboundReply) -> str | None:
        if self.dispatcher is None:
            return None
        return await self.dispatcher.on_reply(reply.from_phone, reply.alarm_ref, reply.intent)

    async def _on_status(self, update: StatusUpdate) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.on_delivery(update.message_sid, update.status,
                                              update.error_code)

    def _pollers(self, tg: asyncio.TaskGroup, sender: TwilioSender) -> list[asyncio.Task[Any]]:
        """Behind NAT no webhook reaches us: ask Twilio for replies and delivery reports."""
        m = self.config.model.sms
        tasks: list[asyncio.Task[Any]] = []
        if m.poll_inbound_s > 0:
            if m.from_number:
                poller = InboundPoller(sender.client, our_numbers=[m.from_number],
                                       on_reply=self._on_reply, interval_s=m.poll_inbound_s)
                tasks.append(tg.create_task(poller.run(), name="poll-inbound"))
            else:
                log.warning("poll_inbound.unavailable",
                            reason="needs sms.from_number (a Messaging Service has many)")
        if m.poll_status_s > 0:
            tasks.append(tg.create_task(self._poll_status(StatusPoller(sender.client),
                                                          m.poll_status_s), name="poll-status"))
        return tasks

    async def _prune_daily(self) -> None:
        keep_s = self.config.model.gateway.retain_device_messages_days * 86400
        while True:
            if self.journal is not None:
                try:
                    removed = await self.journal.prune(self.clock() - keep_s)
                except JournalError as exc:
                    log.error("journal.prune_failed", error=str(exc))
                else:
                    log.info("journal.pruned", device_messages=removed)
            await asyncio.sleep(86400)

    async def _poll_status(self, poller: StatusPoller, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            if self.journal is None:
                continue
            pending = await self.journal.unfinished_deliveries(self.clock() - every_s)
            for update in await poller.poll_once(r.sid for r in pending if r.sid):
                await self._on_status(update)

    def device_health(self) -> list[dict[str, Any]]:
        if self.supervisor is None:
            return []
        return [asdict(h) for h in self.supervisor.health()]

    def _announce_state(self, alarm_id: str, state: str, info: dict[str, Any]) -> None:
        """Alarm state changes, retained, for dashboards and the staff's phones.

        One publisher, in order; while it is behind (a storm, a slow broker) only each
        alarm's latest state is kept: a retained topic only needs to converge."""
        if self.mqtt is None:
            return
        payload = json.dumps({"alarm_id": alarm_id, "state": state, **info},
                             ensure_ascii=False).encode()
        self._states.pop(alarm_id, None)
        self._states[alarm_id] = payload
        self._states_ready.set()

    async def _publish_states(self, mqtt: MqttLink) -> None:
        topic = self.config.model.mqtt.alarm_topic
        while True:
            await self._states_ready.wait()
            self._states_ready.clear()
            while self._states:
                alarm_id = next(iter(self._states))
                payload = self._states.pop(alarm_id)
                await mqtt.publish(topic.format(alarm_id=alarm_id), payload, retain=True)

    async def _mqtt_ack(self, topic: str, payload: bytes) -> None:
        """A trusted console acknowledges for a responder: alarm/alarms/<id>/ack
        {"by": "<responder id>"} (the shipped ACL lets only the gateway's own user write
        there; staff phones use responders/<their id>/ack)."""
        alarm_id = topic.split("/")[2]
        try:
            data = json.loads(payload)
            responder_id = str(data["by"])
        except (ValueError, KeyError, TypeError):
            log.warning("mqtt.bad_ack", alarm_id=alarm_id, size=len(payload))
            return
        await self._ack_for(alarm_id, responder_id)

    async def _responder_ack(self, topic: str, payload: bytes) -> None:
        """A staff phone acknowledges: responders/<responder id>/ack {"alarm_id": "..."}.

        Who acknowledges is the topic's responder id, which the broker's ACL ties to the
        phone's login (pattern write responders/%u/ack): a phone cannot ack as another."""
        responder_id = topic.split("/")[1]
        alarm_id = _small_json_field(payload, "alarm_id", str)
        if alarm_id is None:
            log.warning("mqtt.bad_ack", responder_id=responder_id[:64], size=len(payload))
            return
        await self._ack_for(alarm_id[:32], responder_id)

    async def _duty(self, topic: str, payload: bytes) -> None:
        """A staff phone starts or ends a shift: responders/<id>/duty {"on_duty": true}.

        Published retained, the broker hands the latest state to a restarted gateway."""
        responder_id = topic.split("/")[1]
        on_duty = _small_json_field(payload, "on_duty", bool)
        if on_duty is None:
            log.warning("responder.bad_duty", responder_id=responder_id[:64],
                        size=len(payload))
            return
        await self.set_duty(responder_id, on_duty, by=f"app:{responder_id}")

    async def set_duty(self, responder_id: str, on_duty: bool, by: str = "operator") -> bool:
        """Put a responder on or off duty over the roster (False: unknown responder).

        Journaled, so that it outlives a restart; it lasts until changed again or until
        the roster changes that responder's own flag."""
        responder = self._registry().responders.get(responder_id)
        if responder is None:
            log.warning("responder.duty_unknown", responder_id=responder_id[:64], by=by)
            return False
        if self.journal is not None:
            try:
                await self.journal.set_duty_override(responder_id, on_duty,
                                                     roster_on_duty=responder.on_duty, by=by)
            except JournalError as exc:  # still applied, only not kept across a restart
                log.error("journal.write_failed", what="duty override", error=str(exc))
        geo = self._geo()
        before = geo.stats().on_duty
        geo.set_on_duty(responder_id, on_duty)
        log.info("responder.duty_set", responder_id=responder_id, on_duty=on_duty, by=by)
        after = geo.stats().on_duty
        if before > 0 and after == 0:
            await self._notice(Notice(
                "responders.none_on_duty", "responders",
                "当前没有在岗的社区人员：新的紧急呼叫将直接通知督导员。", self.clock()))
        elif before == 0 and after > 0:
            await self._notice(Notice(
                "responders.on_duty", "responders", f"社区人员已恢复在岗（{after}人）。",
                self.clock(), severity="info"))
        return True

    async def _sync_duty(self, journal: Journal, *, apply: bool) -> None:
        """Drop the journaled duty overrides the current roster superseded (it changed
        that responder's own flag since); with ``apply``, put the others into effect
        (at start; a reload carries them over in memory)."""
        registry, geo = self._registry(), self._geo()
        try:
            for o in await journal.duty_overrides():
                responder = registry.responders.get(o.responder_id)
                if responder is None or responder.on_duty != o.roster_on_duty:
                    await journal.drop_duty_override(o.responder_id)
                    log.info("responder.duty_override_superseded",
                             responder_id=o.responder_id,
                             roster_on_duty=None if responder is None else responder.on_duty)
                elif apply:
                    geo.set_on_duty(o.responder_id, o.on_duty)
                    log.info("responder.duty_restored", responder_id=o.responder_id,
                             on_duty=o.on_duty, by=o.by)
        except JournalError as exc:  # the roster's flags stand; alarms come first
            log.error("journal.write_failed", what="duty overrides", error=str(exc))

    async def _ack_for(self, alarm_id: str, responder_id: str) -> None:
        responder = self._registry().responders.get(responder_id)
        if responder is None or self.dispatcher is None:
            log.warning("mqtt.ack_unknown_responder", alarm_id=alarm_id,
                        responder_id=responder_id[:64])
            return
        try:
            await self.dispatcher.acknowledge(alarm_id, f"app:{responder.name}",
                                              phone=responder.phone)
        except (UnknownAlarm, IllegalTransition) as exc:
            log.info("mqtt.ack_ignored", alarm_id=alarm_id, reason=str(exc))

    async def _position(self, topic: str, payload: bytes) -> None:
        responder_id = topic.split("/")[1]
        try:
            position, accuracy, ts = parse_position(payload)
            self._geo().update_position(responder_id, position, accuracy_m=accuracy,
                                        timestamp=ts)
        except GeoError as exc:
            log.warning("responder.bad_position", responder_id=responder_id, error=str(exc))

    async def run(self) -> None:
        """Run until :meth:`request_stop`. Raises StartupError on a bad start."""
        m = self.config.model
        self.started_at = self.monotonic()
        self._registry_seen = registry_fingerprint(self.config.registry_dir)
        try:
            registry, self.geo = await asyncio.to_thread(load_world, self.config)
        except (RegistryError, GeoError) as exc:
            raise StartupError(str(exc)) from exc
        self.registry = registry
        gc.freeze()  # the registry and indexes live forever: keep them out of GC passes
        self.metrics.responders_on_duty.set_function(self._geo_gauge("on_duty"))
        self.metrics.responders_live.set_function(self._geo_gauge("live"))
        twilio = self._twilio()
        log.info("gateway.starting", name=m.gateway.name, elders=len(registry.elders),
                 devices=len(registry.devices), responders=len(registry.responders),
                 journal=str(m.gateway.journal_path))
        async with AsyncExitStack() as stack:
            self.journal = await stack.enter_async_context(
                Journal(m.gateway.journal_path, synchronous=m.gateway.journal_synchronous,
                        clock=self.clock))
            sender = await stack.enter_async_context(TwilioSender(twilio, sleep=self.sleep))
            self.sender = sender
            fallback = None
            if m.gsm is not None:
                fallback = await stack.enter_async_context(GsmModemSender(GsmSettings(
                    port=m.gsm.port, baudrate=m.gsm.baudrate,
                    command_timeout_s=m.gsm.command_timeout_s,
                    send_timeout_s=m.gsm.send_timeout_s, max_attempts=m.gsm.max_attempts)))
            a = m.alert
            self.player = await stack.enter_async_context(AlertPlayer(AlertSettings(
                backend=a.backend, output_dir=a.output_dir, repeat_interval_s=a.repeat_interval_s,
                voice=a.voice, device=a.device)))
            self.dispatcher = await stack.enter_async_context(Dispatcher(
                journal=self.journal, registry=self._registry, geo=self._geo,
                player=self.player, sender=sender, metrics=self.metrics,
                settings=DispatchSettings(
                    waves=tuple(Wave(**w.model_dump()) for w in m.escalation.waves),
                    responders_k=m.geo.responders_k, budget_ms=m.sms.budget_ms,
                    exclude_busy=m.geo.exclude_busy,
                    map_url_template=m.sms.map_url_template,
                    retry_later_s=m.sms.retry_later_s, give_up_after_s=m.sms.give_up_after_s),
                composer=Composer(m.sms.merged_templates()), fallback=fallback,
                clock=self.clock, monotonic=self.monotonic, sleep=self.sleep,
                on_state=self._announce_state, on_notice=self._notice))
            stack.push_async_callback(self._drain, m.gateway.shutdown_timeout_s)
            sv = m.supervision
            self.supervisor = Supervisor(
                registry=self._registry, on_notice=self._notice, clock=self.clock,
                grace=sv.grace, low_battery_pct=sv.low_battery_pct,
                check_every_s=sv.check_every_s)
            self.supervisor.restore({s.device_id: (s.last_seen, s.battery_pct)
                                     for s in await self.journal.device_states()})
            for port in m.serial:
                if port.protocol == "surgard":
                    self.supervisor.watch_channel(f"serial:{port.name}",
                                                  port.heartbeat_interval_s,
                                                  port.heartbeat_missed)
            self.intake = Intake(journal=self.journal, registry=self._registry,
                                 dispatcher=self.dispatcher, metrics=self.metrics,
                                 dedupe_window_s=m.gateway.dedupe_window_s, clock=self.clock,
                                 monotonic=self.monotonic, supervisor=self.supervisor)
            await self._sync_duty(self.journal, apply=True)
            resumed = await self.dispatcher.resume_from_journal()
            routes = []
            if m.sms.public_url:
                hooks = TwilioWebhooks(auth_token=twilio.auth_token, public_url=m.sms.public_url,
                                       on_reply=self._on_reply, on_status=self._on_status)
                routes = hooks.routes()
                log.info("webhooks.enabled", inbound=hooks.inbound_url, status=hooks.status_url)
            self.control = await stack.enter_async_context(ControlServer(
                host=m.control.host, port=m.control.port, journal=self.journal,
                dispatcher=self.dispatcher, metrics=self.metrics, health=self.health,
                state_file=m.gateway.state_dir / "control.json", on_reload=self.reload,
                devices=self.device_health, ack_notice=self.ack_notice,
                set_duty=self.set_duty, extra_routes=routes))
            self._links(self.intake)
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                links = [tg.create_task(s.run(), name=f"serial-{s.name}") for s in self.serial]
                links.append(tg.create_task(self.supervisor.run(), name="supervision"))
                links += self._pollers(tg, sender)
                links.append(tg.create_task(self._prune_daily(), name="prune"))
                if m.registry.watch_interval_s > 0:
                    links.append(tg.create_task(
                        self._watch_registry(m.registry.watch_interval_s),
                        name="registry-watch"))
                if self.mqtt is not None:
                    links.append(tg.create_task(self.mqtt.run(), name="mqtt"))
                    links.append(tg.create_task(self._publish_states(self.mqtt),
                                                name="alarm-states"))
                interval = systemd.watchdog_interval_s()
                if interval:
                    links.append(tg.create_task(systemd.watchdog_loop(interval),
                                                name="watchdog"))
                self.ready.set()
                systemd.notify("READY=1")
                log.info("gateway.ready", resumed=resumed, control=self.control.url,
                         links=len(links))
                await self.stop_requested.wait()
                log.info("gateway.stopping", phase="intake")
                systemd.notify("STOPPING=1")
                for t in [*links, *self._side_tasks]:
                    t.cancel()
            self._tasks = None
        log.info("gateway.stopped")

    async def _drain(self, timeout_s: float) -> None:
        """Phase 2: let in-flight dispatch finish, then cancel what is left."""
        if self.dispatcher is None:
            return
        log.info("gateway.stopping", phase="dispatch", in_flight=len(self.dispatcher.active))
        try:
            await self.dispatcher.wait_idle(timeout=timeout_s)
        except TimeoutError:
            log.warning("gateway.drain_timeout", action="cancelling; resumed on next start")
        # Escalation timers still waiting are rebuilt from the journal on the next start.
        self.dispatcher.cancel_all()


def install_signal_handlers(gw: Gateway) -> None:
    """SIGTERM/SIGINT ask to stop; a second SIGINT forces; SIGHUP reloads the registry."""
    loop = asyncio.get_running_loop()
    presses = {"int": 0}

    def on_int() -> None:
        presses["int"] += 1
        if presses["int"] > 1:
            log.warning("gateway.forced_exit")
            raise SystemExit(130)
        gw.request_stop()

    loop.add_signal_handler(signal.SIGTERM, gw.request_stop)
    loop.add_signal_handler(signal.SIGINT, on_int)
    tasks: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = loop.create_task(gw.reload(), name="reload")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    if hasattr(signal, "SIGHUP"):  # POSIX only; the gateway runs under systemd on Linux
        loop.add_signal_handler(signal.SIGHUP, on_hup)
