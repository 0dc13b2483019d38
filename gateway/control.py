"""The operator's control API (used by ``gateway ack|resolve|status|duty``).

Only operators can act. Who is an operator is decided by the transport:

* the **unix socket** (``control.socket`` in the state dir, mode 0660 or 0600) is
  always there and is how the CLI talks to the gateway: the file's permissions
  say who may connect;
* a **TCP listener** exists only when ``control.port`` is set, and then every
  request, reads included (``/alarms`` names elders, ``/metrics`` shows the
  load), needs ``Authorization: Bearer <token>``, compared in constant time.

On both, a request whose ``Host`` is not one of the listener's own names
(loopback names, the bound address, ``control.public_names``) is refused with
403: that is what a DNS-rebinding page sends. An ``Origin`` other than the
request's own (a cross-site form or fetch) or a cross-site ``Sec-Fetch-Site``
is refused too. Acting requests (POST) take only ``application/json`` bodies
(415 otherwise), which no HTML form can send and no page can send cross-site
without a CORS preflight that is never answered, and must name the person
acting (``by``, 400 without it), which is journaled with the action.

The operator console (:mod:`gateway.console.server`) is mounted under ``/console/`` on
the same app: the Host, Origin and Sec-Fetch-Site checks apply to it too, but its
requests are authenticated by an operator's session cookie and CSRF token instead of
the bearer token and ``by`` (the signed-in operator is who acts). ``/`` redirects to it.

Twilio's webhooks are not served here: :class:`gateway.webhooks.WebhookServer`
has a listener of its own, the only one a public reverse proxy may reach.
``GET /metrics`` serves Prometheus text.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import os
import socket
import ssl
import stat
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import structlog
from aiohttp import hdrs, web

from gateway.closure import AlarmNotOpen, Closure
from gateway.config import ControlSection
from gateway.dispatch import Dispatcher
from gateway.journal import AlarmRecord, Journal, JournalError, UnknownAlarm
from gateway.lifecycle import IllegalTransition
from gateway.metrics import Metrics
from gateway.notices import NoticeBoard
from gateway.ratelimit import LogLimiter
from gateway.redact import mask_phone
from gateway.responders import ResponderDesk, UnknownResponder

log = structlog.get_logger(__name__)

MAX_BODY = 16 * 1024
#: Where the operator console is mounted (gateway.console.server).
CONSOLE_PREFIX: Final = "/console"
#: Longest ``by`` kept: a name or an operator id, not a note.
MAX_BY = 64
#: Host names every listener answers to (the unix socket's clients send one of these).
LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
# The checked JSON body of an acting request, for its handler.
_BODY_KEY: Final = web.RequestKey("body", dict[str, Any])


class ControlError(Exception):
    """The control API cannot listen as configured; ``reason`` says why."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"control API at {where}: {reason}")
        self.where = where
        self.reason = reason


def json_response(data: Any, status: int = 200) -> web.Response:
    """JSON as the gateway's HTTP APIs answer it (UTF-8 text, not ``\\u`` escapes)."""
    return web.json_response(data, status=status,
                             dumps=lambda d: json.dumps(d, ensure_ascii=False, default=str))


def json_error(status: int, reason: str, **headers: str) -> web.Response:
    response = json_response({"error": reason}, status)
    response.headers.update(headers)
    return response


class BodyRefused(Exception):
    """An acting request's body is not a JSON object: answer ``status`` with ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def json_object(request: web.Request) -> dict[str, Any]:
    """The JSON object an acting request carries; raises :class:`BodyRefused` (415 for
    another content type, which no HTML form can send cross-site; 400 otherwise)."""
    if request.content_type != "application/json":
        raise BodyRefused(415, "the body must be application/json")
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BodyRefused(400, f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BodyRefused(400, "body must be a JSON object")
    return data



@web.middleware
async def _journal_unavailable(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An action the journal cannot record did not happen: say so (503), never 500."""
    try:
        return await handler(request)
    except JournalError as exc:
        log.error("control.journal_unavailable", path=request.path, error=str(exc))
        return json_response({"error": f"journal unavailable, not done: {exc}"}, 503)


def _host_name(value: str) -> str | None:
    """The name part of a Host header (``[::1]:8765`` -> ``::1``); None if unreadable."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return name
    name, _, port = value.partition(":")
    if port and not port.isdigit():
        return None
    return name.rstrip(".") or None


def _via_tcp(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    # No socket to ask (a closed transport): treat it as the stricter listener.
    return sock is None or sock.family != socket.AF_UNIX


def _bind_unix(path: Path, mode: int) -> socket.socket:
    """A listening-ready unix socket at ``path`` with ``mode``, never looser meanwhile.

    Bound inside a fresh 0700 folder next to ``path``, given its mode there and
    renamed into place, so at no moment can anyone but the gateway's user reach
    a socket with the umask's permissions; a stale socket of a dead gateway is
    replaced by the rename, a live one is refused."""
    where = str(path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISSOCK(info.st_mode):
            raise ControlError(where, "exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(where)
        except ConnectionRefusedError:
            pass  # a socket file left by a gateway that died: replaced below
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ControlError(where, f"cannot check the existing socket: {exc}") from exc
        else:
            raise ControlError(where, "another gateway is listening there")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=".c", dir=path.parent))
    staged = private / "s"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(staged))
        os.chmod(staged, mode)
        os.replace(staged, path)
    except OSError as exc:
        sock.close()
        raise ControlError(where, f"cannot bind: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            staged.unlink()
        private.rmdir()
    return sock


class ControlServer:
    """The control API on its unix socket and, when configured, on TCP with a token.

    ``settings`` is the validated ``[control]`` section; ``state_dir`` holds the
    socket (unless ``settings.socket`` is absolute) and ``control.json``, where
    the CLI learns the TCP address (the port may be ephemeral). ``token`` is the
    bearer token, required when ``settings.port`` is set.
    """

    def __init__(
        self,
        *,
        settings: ControlSection,
        state_dir: Path,
        token: str | None,
        journal: Journal,
        dispatcher: Dispatcher,
        metrics: Metrics,
        health: Callable[[], dict[str, Any]],
        on_reload: Callable[[], Awaitable[bool]] | None = None,
        devices: Callable[[], list[dict[str, Any]]] | None = None,
        notices: NoticeBoard | None = None,
        desk: ResponderDesk | None = None,
        closure: Closure | None = None,
        console: Callable[[], web.Application] | None = None,
        write_state_file: bool = True,
    ) -> None:
        self._settings = settings
        self.socket_path = settings.socket_path(state_dir)
        self._state_file = state_dir / "control.json" if write_state_file else None
        self._token = token.encode() if token else None
        self._journal = journal
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._health = health
        self._on_reload = on_reload
        self._devices = devices
        self._notices = notices
        self._desk = desk
        self._closure = closure
        self._console = console
        self._runner: web.AppRunner | None = None
        self._socket_inode: int | None = None
        self._names = set(LOOPBACK_NAMES) | {n.lower().rstrip(".") for n in
                                             settings.public_names}
        if settings.host not in ("0.0.0.0", "::"):  # noqa: S104 - names, not a bind
            self._names.add(settings.host.strip("[]").lower())
        self._refusals = LogLimiter(60.0)
        #: ``http://host:port`` of the TCP listener; empty when there is none.
        self.url = ""

    async def __aenter__(self) -> ControlServer:
        settings = self._settings
        if settings.port is not None and self._token is None:
            raise ControlError(f"{settings.host}:{settings.port}",
                               "a TCP listener needs a bearer token (control_token)")
        app = web.Application(client_max_size=MAX_BODY,
                              middlewares=[self._guard, _journal_unavailable])
        app.add_routes([
            web.get("/health", self._get_health),
            web.get("/healthz", self._get_healthz),
            web.get("/metrics", self._get_metrics),
            web.get("/alarms", self._get_alarms),
            web.get("/alarms/{alarm_id}", self._get_alarm),
            web.post("/alarms/{alarm_id}/ack", self._post_ack),
            web.post("/alarms/{alarm_id}/resolve", self._post_resolve),
            web.post("/alarms/{alarm_id}/keep-open", self._post_keep_open),
            web.get("/drills/{drill_id}", self._get_drill),
            web.get("/devices", self._get_devices),
            web.post("/reload", self._post_reload),
            web.post("/responders/{responder_id}/duty", self._post_duty),
            web.get("/notices", self._get_notices),
            web.post("/notices/{notice_id}/ack", self._post_notice_ack),
        ])
        if self._console is not None:
            app.add_subapp(CONSOLE_PREFIX, self._console())
            app.router.add_get("/", self._to_console)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = _bind_unix(self.socket_path, settings.socket_mode)
        self._socket_inode = os.stat(self.socket_path).st_ino
        await web.SockSite(self._runner, sock).start()
        if settings.port is not None:
            site = web.TCPSite(self._runner, settings.host, settings.port,
                               ssl_context=self._ssl_context())
            try:
                await site.start()
            except OSError as exc:
                raise ControlError(f"{settings.host}:{settings.port}",
                                   f"cannot listen: {exc.strerror or exc}") from exc
            server = site._server  # noqa: SLF001 - only way to learn an ephemeral port
            sockets = getattr(server, "sockets", None) or []
            port = sockets[0].getsockname()[1] if sockets else settings.port
            host = f"[{settings.host}]" if ":" in settings.host else settings.host
            self.url = f"{'https' if settings.tls_cert_file else 'http'}://{host}:{port}"
        if self._state_file is not None:
            self._state_file.write_text(json.dumps(
                {"socket": str(self.socket_path), "url": self.url or None}), encoding="utf-8")
        log.info("control.listening", socket=str(self.socket_path),
                 mode=oct(settings.socket_mode), url=self.url or None,
                 behind_tls_proxy=settings.behind_tls_proxy)
        return self

    def _ssl_context(self) -> ssl.SSLContext | None:
        settings = self._settings
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ControlError(str(settings.tls_cert_file),
                               f"cannot load the TLS certificate and key: {exc}") from exc
        return context

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        # Remove our socket only: a gateway started since may have put its own there.
        with contextlib.suppress(OSError):
            if os.stat(self.socket_path).st_ino == self._socket_inode:
                self.socket_path.unlink()

    # -- who may ask ----------------------------------------------------------------------

    def _refuse(self, request: web.Request, status: int, reason: str,
                **headers: str) -> web.Response:
        suppressed = self._refusals.allow(f"{status}:{reason}")
        if suppressed is not None:
            log.warning("control.refused", status=status, reason=reason, path=request.path,
                        method=request.method, remote=request.remote or "unix",
                        suppressed=suppressed)
        return json_error(status, reason, **headers)

    def _origin_ok(self, request: web.Request, host: str) -> bool:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:  # not a browser, or a same-origin GET
            return True
        # Same origin: the page came from this very listener under this very name
        # (browsers leave the default port out of both Origin and Host).
        scheme = "https" if _via_tcp(request) and self._settings.tls else "http"
        return origin.strip().lower().rstrip("/") == f"{scheme}://{host.strip().lower()}"

    @web.middleware
    async def _guard(
        self, request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        host = request.headers.get(hdrs.HOST, "")
        name = _host_name(host)
        if name is None or name not in self._names:
            return self._refuse(request, 403, "Host is not a name of this gateway")
        if not self._origin_ok(request, host):
            return self._refuse(request, 403, "cross-origin request")
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return self._refuse(request, 403, "cross-site request")
        if self._console is not None and (request.path == "/"
                                          or request.path.startswith(CONSOLE_PREFIX + "/")):
            return await handler(request)  # operators' sessions: gateway.console.server
        if _via_tcp(request) and not self._authorized(
                request.headers.get(hdrs.AUTHORIZATION, "")):
            return self._refuse(request, 401, "a valid bearer token is required",
                                **{"WWW-Authenticate": 'Bearer realm="alarm-gateway"'})
        if request.method == hdrs.METH_POST:
            try:
                data = await json_object(request)
            except BodyRefused as exc:
                if exc.status == 415:
                    return self._refuse(request, exc.status, exc.reason)
                return json_error(exc.status, exc.reason)
            by = data.get("by")
            if not isinstance(by, str) or not by.strip():
                return json_error(400, "name who acts: 'by' must be a non-empty string")
            if len(by.strip()) > MAX_BY:
                return json_error(400, f"'by' is longer than {MAX_BY} characters")
            data["by"] = by.strip()
            request[_BODY_KEY] = data
        return await handler(request)

    def _authorized(self, header: str) -> bool:
        if self._token is None:
            return False
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant time: a timing difference must not spell the token out.
        return hmac.compare_digest(given.strip().encode(), self._token)

    @staticmethod
    def _body(request: web.Request) -> dict[str, Any]:
        return request[_BODY_KEY]

    # -- the routes -------------------------------------------------------------------------

    async def _to_console(self, _request: web.Request) -> web.Response:
        raise web.HTTPFound(CONSOLE_PREFIX + "/")

    async def _get_health(self, _request: web.Request) -> web.Response:
        return json_response(self._health())

    async def _get_healthz(self, _request: web.Request) -> web.Response:
        """For probes (the name ops tools expect): 200 ``{"status": "ok"}``, or 503 with
        the reasons while starting or degraded, so a plain HTTP check turns red."""
        health = self._health()
        if health["status"] == "ok":
            return json_response({"status": "ok"})
        return json_response({"status": health["status"],
                      "problems": health["problems"] or [health["status"]]}, 503)

    async def _get_metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(),
                            content_type="text/plain", charset="utf-8")

    async def _get_alarms(self, _request: web.Request) -> web.Response:
        alarms = await self._journal.open_alarms()
        return json_response({"alarms": [asdict(a) for a in alarms]})

    async def _get_alarm(self, request: web.Request) -> web.Response:
        alarm_id = request.match_info["alarm_id"]
        try:
            alarm = await self._journal.get_alarm(alarm_id)
        except UnknownAlarm:
            return json_response({"error": f"unknown alarm {alarm_id}"}, 404)
        return await self._alarm_view(alarm)

    async def _get_drill(self, request: web.Request) -> web.Response:
        """The alarm a drill was journaled as (``gateway simulate press`` reads it back);
        404 until the gateway has committed it."""
        drill_id = request.match_info["drill_id"]
        alarm = await self._journal.alarm_for_drill(drill_id)
        if alarm is None:
            return json_response({"error": f"no alarm journaled for drill {drill_id}"}, 404)
        return await self._alarm_view(alarm)

    async def _alarm_view(self, alarm: AlarmRecord) -> web.Response:
        alarm_id = alarm.alarm_id
        drill = await self._journal.drill_of(alarm_id) if alarm.drill else None
        notes = await self._journal.notifications(alarm_id)
        history = await self._journal.alarm_log(alarm_id)
        calls = await self._journal.calls(alarm_id)
        return json_response({
            "alarm": asdict(alarm),
            "calls": [{"role": c.role, "name": c.name, "to": mask_phone(c.phone),
                       "wave": c.wave, "tree": c.tree, "state": c.state, "sid": c.sid,
                       "status": c.status, "answered_by": c.answered_by, "digits": c.digits,
                       "attempts": c.attempts} for c in calls],
            "drill": None if drill is None else {
                "drill_id": drill.drill_id, "by": drill.by, "dry_run": drill.dry_run,
                "notify": [mask_phone(w) if w.startswith("+") else w for w in drill.notify]},
            "notifications": [
                {"role": n.role, "name": n.name, "to": mask_phone(n.phone), "kind": n.kind,
                 "wave": n.wave,
                 "state": n.state, "sid": n.sid, "attempts": n.attempts,
                 "latency_ms": n.latency_ms, "error_code": n.error_code}
                for n in notes
            ],
            "log": [{"at": at, "event": ev, "data": data} for at, ev, data in history],
        })

    async def _post_ack(self, request: web.Request) -> web.Response:
        alarm_id = request.match_info["alarm_id"]
        body = self._body(request)
        by = body["by"]
        try:
            previous = await self._dispatcher.acknowledge(alarm_id, by=f"operator:{by}")
        except UnknownAlarm:
            return json_response({"error": f"unknown alarm {alarm_id}"}, 404)
        except IllegalTransition as exc:
            return json_response({"error": str(exc)}, 409)
        return json_response({"alarm_id": alarm_id, "state": "acknowledged", "previous": previous})

    async def _post_resolve(self, request: web.Request) -> web.Response:
        alarm_id = request.match_info["alarm_id"]
        body = self._body(request)
        note = body.get("note")
        by = body["by"]
        try:
            previous = await self._dispatcher.resolve(
                alarm_id, None if note is None else str(note)[:2000], by=f"operator:{by}")
        except UnknownAlarm:
            return json_response({"error": f"unknown alarm {alarm_id}"}, 404)
        except IllegalTransition as exc:
            return json_response({"error": str(exc)}, 409)
        return json_response({"alarm_id": alarm_id, "state": "resolved", "previous": previous})

    async def _post_keep_open(self, request: web.Request) -> web.Response:
        """``{"by": ..., "keep": true|false, "note": ...}``: the gateway must not (or may
        again) resolve the alarm by itself after its acknowledgement."""
        alarm_id = request.match_info["alarm_id"]
        body = self._body(request)
        keep = body.get("keep", True)
        if not isinstance(keep, bool):
            return json_error(400, "'keep' must be true or false")
        note = body.get("note")
        if self._closure is None:
            return json_error(503, "alarm closure is not running")
        try:
            state = await self._closure.keep_open(
                alarm_id, f"operator:{body['by']}", keep=keep,
                note=None if note is None else str(note)[:2000])
        except UnknownAlarm:
            return json_response({"error": f"unknown alarm {alarm_id}"}, 404)
        except AlarmNotOpen as exc:
            return json_response({"error": str(exc)}, 409)
        return json_response({"alarm_id": alarm_id, "state": state, "keep_open": keep})

    async def _get_devices(self, _request: web.Request) -> web.Response:
        if self._devices is not None:
            return json_response({"devices": self._devices()})
        states = await self._journal.device_states()
        return json_response({"devices": [asdict(s) for s in states]})

    async def _get_notices(self, _request: web.Request) -> web.Response:
        return json_response({"notices": await self._journal.open_notices()})

    async def _post_notice_ack(self, request: web.Request) -> web.Response:
        try:
            notice_id = int(request.match_info["notice_id"])
        except ValueError:
            return json_response({"error": "notice id must be a number"}, 400)
        body = self._body(request)
        by = body["by"]
        if self._notices is None or not await self._notices.acknowledge(notice_id, by):
            return json_response({"error": f"no open notice {notice_id}"}, 404)
        return json_response({"notice_id": notice_id, "acknowledged_by": by})

    async def _post_duty(self, request: web.Request) -> web.Response:
        responder_id = request.match_info["responder_id"]
        body = self._body(request)
        on_duty = body.get("on_duty")
        if not isinstance(on_duty, bool):
            return json_response({"error": "on_duty must be true or false"}, 400)
        if self._desk is None:
            return json_response({"error": "duty changes not supported"}, 501)
        by = body["by"]
        try:
            await self._desk.set_duty(responder_id, on_duty, by=f"operator:{by}")
        except UnknownResponder:
            return json_response({"error": f"unknown responder {responder_id}"}, 404)
        return json_response({"responder_id": responder_id, "on_duty": on_duty})

    async def _post_reload(self, request: web.Request) -> web.Response:
        if self._on_reload is None:
            return json_response({"error": "reload not supported"}, 501)
        # A reload changes no alarm: it is logged with who asked (the journal keeps
        # alarm, notice and duty history, and a reload is none of those).
        log.info("control.reload", by=f"operator:{self._body(request)['by']}")
        ok = await self._on_reload()
        return json_response({"reloaded": ok}, 200 if ok else 422)
