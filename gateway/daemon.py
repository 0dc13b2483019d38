"""The gateway's lifecycle: wiring and running, in the shape of uvicorn's server.

:meth:`Gateway.run` is :meth:`~Gateway.startup`, :meth:`~Gateway.main_loop` and
:meth:`~Gateway.shutdown`. This module holds no domain rules: each component owns
its own (intake, dispatch, supervision, notices, responders, the world keeper) and
gets what it reads passed in at construction; nothing calls back up into here.

Start: the world (registry and geo indexes, validated) -> journal -> notice board ->
SMS client (+ GSM fallback) -> alert player -> dispatcher -> responder desk ->
supervision -> intake -> resume open alarms from the journal -> control API ->
device links (MQTT, serial) -> READY=1 to systemd.

Stop (SIGTERM, or SIGINT once), all within one deadline (``shutdown_timeout_s``):
phase 1 stops intake (device links close; devices and the broker keep what we did not
acknowledge); phase 2 lets in-flight dispatch finish, leaving a reserve of the
deadline for phase 3, then cancels what remains (the journal has it as unfinished and
the next start resumes it); phase 3 closes the control API, the dispatcher, the alert
player, the SMS clients and, last, the journal, each bounded by what is left of the
deadline. A second SIGINT forces exit.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict
from typing import Any, NamedTuple, TypeVar

import structlog

from devices.callerid import DEFAULT_INIT_COMMANDS, CallerIdDecoder
from devices.contact_id import DEFAULT_EVENT_KINDS
from devices.drills import DrillDecoder
from devices.mqtt_link import MqttLink, MqttSettings
from devices.mqtt_payloads import MqttDecoder
from devices.responder_app import ResponderAppDecoder
from devices.serial_link import SerialLink
from devices.surgard import SurGardDecoder
from gateway import systemd
from gateway.alert import AlertPlayer
from gateway.calling import CallDesk
from gateway.closure import Closure
from gateway.config import Config, Secrets
from gateway.console.accounts import OperatorAccounts, accounts_path
from gateway.console.server import ConsoleApp
from gateway.console.views import Views
from gateway.control import ControlError, ControlServer
from gateway.dispatch import Dispatcher
from gateway.geo import GeoError, GeoService
from gateway.gsm import GsmModemSender
from gateway.intake import Intake
from gateway.journal import Journal
from gateway.mapdata import MapDataError, load_district_map
from gateway.metrics import Metrics
from gateway.model import Registry
from gateway.notices import NoticeBoard
from gateway.registry import RegistryError
from gateway.report import report_daily
from gateway.responders import ResponderDesk
from gateway.retention import prune_daily
from gateway.sms import TwilioAccount, TwilioSender
from gateway.statefeed import AlarmStateFeed
from gateway.supervision import Supervisor
from gateway.twilio_poll import InboundPoller, StatusPoller
from gateway.voice import Caller
from gateway.webhooks import (
    STATUS_PATH,
    VOICE_GATHER_PATH,
    VOICE_STATUS_PATH,
    TwilioWebhooks,
    WebhookListenError,
    WebhookServer,
)
from gateway.wording import Composer
from gateway.world import WorldKeeper, WorldRef

log = structlog.get_logger(__name__)

_T = TypeVar("_T")


class _Parts(NamedTuple):
    """What the long-running tasks need, once startup has built it."""

    journal: Journal
    notices: NoticeBoard
    feed: AlarmStateFeed
    supervisor: Supervisor
    sender: TwilioSender
    dispatcher: Dispatcher


class StartupError(Exception):
    """The gateway cannot start (missing secrets, unreadable registry...)."""


class Gateway:
    """A running gateway's parts, for the CLI, the demo and tests."""

    def __init__(
        self,
        config: Config,
        secrets: Secrets,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.secrets = secrets
        self.clock = clock
        self.monotonic = monotonic
        self.sleep = sleep
        self.metrics = Metrics()
        self.ready = asyncio.Event()
        self.stop_requested = asyncio.Event()
        self.started_at = 0.0
        self.keeper = WorldKeeper(config)
        self.world: WorldRef | None = None
        self.journal: Journal | None = None
        self.notices: NoticeBoard | None = None
        self.sender: TwilioSender | None = None
        self.player: AlertPlayer | None = None
        self.feed: AlarmStateFeed | None = None
        self.dispatcher: Dispatcher | None = None
        self.desk: ResponderDesk | None = None
        self.closure: Closure | None = None
        self.supervisor: Supervisor | None = None
        self.intake: Intake | None = None
        self.control: ControlServer | None = None
        self.console: ConsoleApp | None = None
        self.webhooks: WebhookServer | None = None
        self.mqtt: MqttLink | None = None
        self.serial: list[SerialLink] = []
        self._opened: list[tuple[str, AbstractAsyncContextManager[Any]]] = []
        self._intake_tasks: list[asyncio.Task[Any]] = []
        self._service_tasks: list[asyncio.Task[Any]] = []
        self._deadline = 0.0  # set when the stop begins

    # -- what tests and the CLI read ------------------------------------------------------

    @property
    def registry(self) -> Registry | None:
        return self.world.registry if self.world is not None else None

    @property
    def geo(self) -> GeoService | None:
        return self.world.geo if self.world is not None else None

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def reload(self) -> bool:
        return await self.keeper.reload()

    # -- the three phases -----------------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`request_stop`. Raises StartupError on a bad start."""
        try:
            parts = await self.startup()
            async with asyncio.TaskGroup() as tg:
                self._start_tasks(tg, parts)
                self.ready.set()
                systemd.notify("READY=1")
                log.info("gateway.ready",
                         control=str(self.control.socket_path) if self.control else None,
                         tasks=len(self._intake_tasks) + len(self._service_tasks))
                await self.main_loop()
                await self.shutdown(tg)
        finally:
            await self._close_all(self._deadline or (
                self.monotonic() + self.config.model.gateway.shutdown_timeout_s))
        log.info("gateway.stopped")

    async def startup(self) -> _Parts:
        """Open and wire every part; raises StartupError (what is open is closed by run)."""
        m = self.config.model
        self.started_at = self.monotonic()
        try:
            self.world = world = await self.keeper.load()
        except (RegistryError, GeoError) as exc:
            raise StartupError(str(exc)) from exc
        self.metrics.responders_on_duty.set_function(lambda: world.geo.stats().on_duty)
        self.metrics.responders_live.set_function(lambda: world.geo.stats().live)
        registry = world.registry
        log.info("gateway.starting", name=m.gateway.name, elders=len(registry.elders),
                 devices=len(registry.devices), responders=len(registry.responders),
                 journal=str(m.gateway.journal_path))
        self.journal = journal = await self._open("journal", Journal(
            m.gateway.journal_path, synchronous=m.gateway.journal_synchronous,
            clock=self.clock))
        self.notices = notices = NoticeBoard(journal=journal, clock=self.clock)
        self.sender = sender = await self._open("sms", TwilioSender(
            m.sms, self._twilio_account(),
            status_callback_url=(m.sms.public_url + STATUS_PATH) if m.sms.public_url else None,
            sleep=self.sleep))
        fallback = None
        if m.gsm is not None:
            fallback = await self._open("gsm", GsmModemSender(m.gsm))
        self.player = player = await self._open("alert", AlertPlayer(
            m.alert, heard=self.metrics.press_to_alert.observe))
        notices.attach(player=player)
        self.feed = feed = AlarmStateFeed(m.mqtt.alarm_topic)
        self.dispatcher = dispatcher = await self._open("dispatch", Dispatcher(
            journal=journal, world=world, player=player, sender=sender, metrics=self.metrics,
            escalation=m.escalation, sms=m.sms, geo=m.geo,
            composer=Composer(m.sms.merged_templates()), fallback=fallback,
            clock=self.clock, monotonic=self.monotonic, sleep=self.sleep,
            on_state=feed.announce, on_notice=notices.raise_notice))
        self.calls: CallDesk | None = None
        if m.voice.enabled:
            public = m.sms.public_url
            caller = Caller(sender, from_number=m.voice.from_number or m.sms.from_number or "",
                            status_callback_url=public + VOICE_STATUS_PATH if public else None,
                            ring_timeout_s=m.voice.ring_timeout_s,
                            machine_detection=m.voice.machine_detection, sleep=self.sleep)
            self.calls = CallDesk(
                journal=journal, caller=caller, settings=m.voice,
                gather_url=public + VOICE_GATHER_PATH if public else None,
                callbacks=bool(public), acknowledge=dispatcher.call_accepted,
                decline=dispatcher.call_declined, ringer=fallback,
                ring_s=m.gsm.ring_s if m.gsm is not None else 0.0,
                metrics=self.metrics,
                monotonic=self.monotonic, sleep=self.sleep)
            dispatcher.attach_calls(self.calls)
        self.desk = desk = ResponderDesk(world=world, journal=journal, dispatcher=dispatcher,
                                         notices=notices, clock=self.clock)
        self.keeper.on_reloaded(lambda: desk.sync_duty(apply=False))
        # Real time, like the registry watch: closure looks at the journal now and then;
        # a test driving alarm timers with an injected sleep must not see it spin them.
        self.closure = Closure(journal=journal, dispatcher=dispatcher, notices=notices,
                               settings=m.lifecycle, clock=self.clock)
        self.supervisor = supervisor = Supervisor(
            world=world, on_notice=notices.raise_notice, clock=self.clock,
            settings=m.supervision)
        supervisor.restore({s.device_id: (s.last_seen, s.battery_pct)
                            for s in await journal.device_states()})
        for port in m.serial:
            if port.protocol == "surgard":
                supervisor.watch_channel(f"serial:{port.name}", port.heartbeat_interval_s,
                                         port.heartbeat_missed)
        self.intake = intake = Intake(
            world=world, journal=journal, dispatcher=dispatcher, supervisor=supervisor,
            notices=notices, commands=desk.apply, metrics=self.metrics,
            dedupe_window_s=m.gateway.dedupe_window_s, clock=self.clock,
            monotonic=self.monotonic)
        await desk.sync_duty(apply=True)
        resumed = await dispatcher.resume_from_journal()
        log.info("gateway.resumed", alarms=resumed)
        if m.sms.public_url:
            hooks = TwilioWebhooks(auth_token=self._twilio_account().auth_token,
                                   public_url=m.sms.public_url,
                                   on_reply=dispatcher.reply_received,
                                   on_status=dispatcher.status_received,
                                   on_digit=self.calls.digits_received if self.calls else None,
                                   on_call_status=self.calls.status_received
                                   if self.calls else None,
                                   voice_language=m.voice.language, voice=m.voice.voice)
            try:
                self.webhooks = await self._open("webhooks", WebhookServer(hooks, m.webhooks))
            except WebhookListenError as exc:
                raise StartupError(str(exc)) from exc
        console = await self._console(journal, dispatcher, notices, desk)
        try:
            self.control = await self._open("control", ControlServer(
                settings=m.control, state_dir=m.gateway.state_dir,
                token=self.secrets.control_token, journal=journal, dispatcher=dispatcher,
                metrics=self.metrics, health=self.health, on_reload=self.reload,
                devices=self.device_health, notices=notices, desk=desk,
                closure=self.closure, console=console.app if console else None))
        except ControlError as exc:
            raise StartupError(str(exc)) from exc
        self._links(intake)
        mqtt = self.mqtt
        if mqtt is not None:
            notices.attach(publish=mqtt.publish)
        self.metrics.watch(notices_by_kind=notices.raised_by_kind, devices=supervisor.counts,
                           mqtt_reconnects=(lambda: mqtt.reconnects) if mqtt else None)
        return _Parts(journal, notices, feed, supervisor, sender, dispatcher)

    async def main_loop(self) -> None:
        await self.stop_requested.wait()

    async def shutdown(self, tg: asyncio.TaskGroup) -> None:
        """Phases 1 and 2 (phase 3, closing, follows when the task group is done)."""
        del tg  # the tasks it owns are cancelled here, by name
        timeout = self.config.model.gateway.shutdown_timeout_s
        self._deadline = self.monotonic() + timeout
        log.info("gateway.stopping", phase="intake")
        systemd.notify("STOPPING=1")
        await _cancel(self._intake_tasks)
        if self.dispatcher is not None:
            # Closing needs a share of the deadline too: the journal closes last.
            reserve = min(5.0, timeout / 4)
            budget = max(0.0, self._deadline - reserve - self.monotonic())
            log.info("gateway.stopping", phase="dispatch", in_flight=len(self.dispatcher.active),
                     budget_s=round(budget, 1))
            try:
                await self.dispatcher.wait_idle(timeout=budget)
            except TimeoutError:
                log.warning("gateway.drain_timeout", action="cancelling; resumed on next start")
            # Escalation timers still waiting are rebuilt from the journal on the next start.
            self.dispatcher.cancel_all()
        await _cancel(self._service_tasks)

    # -- wiring helpers ---------------------------------------------------------------------

    async def _console(self, journal: Journal, dispatcher: Dispatcher, notices: NoticeBoard,
                       desk: ResponderDesk) -> ConsoleApp | None:
        """The operator console, on the control API's TCP listener (none without one)."""
        m = self.config.model
        if not m.console.enabled or m.control.port is None or self.world is None:
            return None
        district = None
        path = self.config.district_map_path
        if path is not None:
            try:
                district = load_district_map(path, m.registry.bbox)
            except MapDataError as exc:
                raise StartupError(str(exc)) from exc
        c = m.console
        accounts = OperatorAccounts(
            accounts_path(m.gateway.state_dir), clock=self.clock,
            max_failures=c.max_failures, lockout_s=c.lockout_min * 60,
            failure_window_s=c.lockout_min * 60, session_idle_s=c.session_idle_h * 3600,
            session_max_s=c.session_max_h * 3600)
        self.console = await self._open("console", ConsoleApp(
            settings=c, alert=m.alert, accounts=accounts, journal=journal,
            views=Views(journal, self.world, dispatcher), dispatcher=dispatcher,
            notices=notices, desk=desk, devices=self.device_health, health=self.health,
            district_map=district, zone=m.gateway.zone, secure=m.control.tls,
            clock=self.clock))
        return self.console

    async def _open(self, name: str, resource: AbstractAsyncContextManager[_T]) -> _T:
        """Enter ``resource``; it is closed in reverse order by :meth:`_close_all`."""
        entered = await resource.__aenter__()
        self._opened.append((name, resource))
        return entered

    async def _close_all(self, deadline: float) -> None:
        """Phase 3: close what startup opened, newest first, within ``deadline``.

        The journal opened first and closes last; a share of the deadline is kept for
        it, so a part that hangs on close (a sound card, a modem) cannot take the
        journal's time too."""
        journal_share = min(2.0, self.config.model.gateway.shutdown_timeout_s / 10)
        while self._opened:
            name, resource = self._opened.pop()
            until = deadline if not self._opened else deadline - journal_share
            left = until - self.monotonic()
            try:
                async with asyncio.timeout(max(left, 0.1)):
                    await resource.__aexit__(None, None, None)
            except TimeoutError:
                log.error("gateway.close_timeout", part=name, deadline_s=round(left, 1))
            except Exception:  # close the rest (above all the journal) whatever happened
                log.exception("gateway.close_failed", part=name)

    def _start_tasks(self, tg: asyncio.TaskGroup, parts: _Parts) -> None:
        m = self.config.model

        def intake(coro: Coroutine[Any, Any, Any], name: str) -> None:
            self._intake_tasks.append(tg.create_task(coro, name=name))

        def service(coro: Coroutine[Any, Any, Any], name: str) -> None:
            self._service_tasks.append(tg.create_task(coro, name=name))

        service(parts.notices.run(), "notices")
        for link in self.serial:
            intake(link.run(), f"serial-{link.name}")
        if self.mqtt is not None:
            intake(self.mqtt.run(), "mqtt")
            service(parts.feed.run(self.mqtt.publish), "alarm-states")
        intake(parts.supervisor.run(), "supervision")
        if m.sms.poll_inbound_s > 0:
            if m.sms.from_number:
                poller = InboundPoller(parts.sender, our_numbers=[m.sms.from_number],
                                       on_reply=parts.dispatcher.reply_received,
                                       interval_s=m.sms.poll_inbound_s)
                intake(poller.run(), "poll-inbound")
            else:
                log.warning("poll_inbound.unavailable",
                            reason="needs sms.from_number (a Messaging Service has many)")
        if m.sms.poll_status_s > 0:
            intake(StatusPoller(parts.sender).run(
                parts.journal, parts.dispatcher.status_received, m.sms.poll_status_s,
                clock=self.clock), "poll-status")
        intake(prune_daily(parts.journal, m.gateway.retain_device_messages_days,
                           m.retention, clock=self.clock), "prune")
        if self.closure is not None:
            intake(self.closure.run(), "closure")
        intake(report_daily(parts.journal, m.report, m.gateway.zone, clock=self.clock),
               "daily-report")
        if m.registry.watch_interval_s > 0:
            intake(self.keeper.watch(m.registry.watch_interval_s), "registry-watch")
        interval = systemd.watchdog_interval_s()
        if interval:
            service(systemd.watchdog_loop(interval), "watchdog")

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
            self.mqtt = MqttLink(settings, [decoder, DrillDecoder(), ResponderAppDecoder()], intake,
                                 on_state=self._link_state("mqtt"))

    def _link_state(self, channel: str) -> Callable[[bool], None]:
        gauge = self.metrics.transport_up.labels(channel)

        def changed(up: bool) -> None:
            gauge.set(int(up))
            if self.supervisor is not None:
                self.supervisor.link_changed(channel, up)

        return changed

    def _twilio_account(self) -> TwilioAccount:
        m = self.config.model.sms
        sid, token = self.secrets.twilio_account_sid, self.secrets.twilio_auth_token
        if not (sid and token):
            raise StartupError(
                f"Twilio credentials missing: set the {m.account_sid_secret.upper()} and "
                f"{m.auth_token_secret.upper()} environment variables or systemd credentials "
                f"'{m.account_sid_secret}' and '{m.auth_token_secret}'")
        try:
            return TwilioAccount(sid, token)
        except ValueError as exc:
            raise StartupError(f"Twilio credentials: {exc}") from exc

    # -- what the control API shows ---------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``ok`` only when every part can take and carry an alarm; otherwise ``degraded``
        with the reasons (``starting`` before READY)."""
        links = {}
        problems: list[str] = []
        if self.mqtt is not None:
            links[self.mqtt.source] = self.mqtt.connected.is_set()
            if self.mqtt.stalled:
                problems.append(f"mqtt intake: {self.mqtt.stalled} message(s) waiting for "
                                "the journal")
        for s in self.serial:
            links[s.source] = s.connected.is_set()
        if self.journal is not None and not self.journal.healthy:
            problems.append("journal cannot write")
        if self.notices is not None:
            problems += [f"critical notice sounding: {subject}"
                         for subject in self.notices.critical]
        status = "starting" if not self.ready.is_set() else ("degraded" if problems else "ok")
        health: dict[str, Any] = {
            "status": status,
            "problems": problems,
            "uptime_s": round(self.monotonic() - self.started_at, 1),
            "links": links,
            "open_alarms": len(self.dispatcher.active) if self.dispatcher else 0,
            "alerting": list(self.player.active()) if self.player else [],
        }
        if self.world is not None:
            stats = self.world.geo.stats()
            health["responders"] = {"on_duty": stats.on_duty, "live": stats.live,
                                    "busy": len(self.dispatcher.busy_responders())
                                    if self.dispatcher else 0}
        return health

    def device_health(self) -> list[dict[str, Any]]:
        if self.supervisor is None:
            return []
        return [asdict(h) for h in self.supervisor.health()]


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()


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
