"""The operator's control API on localhost (used by ``gateway ack|resolve|status``).

Bound to the loopback interface only: acknowledging an alarm is an operator act,
and the command-center workstation talks to the gateway on the same host (or
through an authenticated reverse proxy). ``GET /metrics`` serves Prometheus text.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from gateway.dispatch import Dispatcher
from gateway.journal import Journal, JournalError, UnknownAlarm
from gateway.lifecycle import IllegalTransition
from gateway.metrics import Metrics
from gateway.notices import NoticeBoard
from gateway.redact import mask_phone
from gateway.responders import ResponderDesk, UnknownResponder

log = structlog.get_logger(__name__)

MAX_BODY = 16 * 1024


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status,
                             dumps=lambda d: json.dumps(d, ensure_ascii=False, default=str))


@web.middleware
async def _journal_unavailable(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An action the journal cannot record did not happen: say so (503), never 500."""
    try:
        return await handler(request)
    except JournalError as exc:
        log.error("control.journal_unavailable", path=request.path, error=str(exc))
        return _json({"error": f"journal unavailable, not done: {exc}"}, 503)


class ControlServer:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        journal: Journal,
        dispatcher: Dispatcher,
        metrics: Metrics,
        health: Callable[[], dict[str, Any]],
        state_file: Path | None = None,
        extra_routes: list[web.RouteDef] | None = None,
        on_reload: Callable[[], Awaitable[bool]] | None = None,
        devices: Callable[[], list[dict[str, Any]]] | None = None,
        notices: NoticeBoard | None = None,
        desk: ResponderDesk | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._journal = journal
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._health = health
        self._state_file = state_file
        self._extra = extra_routes or []
        self._on_reload = on_reload
        self._devices = devices
        self._notices = notices
        self._desk = desk
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> ControlServer:
        app = web.Application(client_max_size=MAX_BODY)
        app.add_routes([
            web.get("/health", self._get_health),
            web.get("/metrics", self._get_metrics),
            web.get("/alarms", self._get_alarms),
            web.get("/alarms/{alarm_id}", self._get_alarm),
            web.post("/alarms/{alarm_id}/ack", self._post_ack),
            web.post("/alarms/{alarm_id}/resolve", self._post_resolve),
            web.get("/devices", self._get_devices),
            web.post("/reload", self._post_reload),
            web.post("/responders/{responder_id}/duty", self._post_duty),
            web.get("/notices", self._get_notices),
            web.post("/notices/{notice_id}/ack", self._post_notice_ack),
            *self._extra,
        ])
        app.middlewares.append(_journal_unavailable)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server  # noqa: SLF001 - only way to learn an ephemeral port
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else self._port
        self.url = f"http://{self._host}:{port}"
        if self._state_file is not None:
            self._state_file.write_text(json.dumps({"url": self.url}), encoding="utf-8")
        log.info("control.listening", url=self.url)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _get_health(self, _request: web.Request) -> web.Response:
        return _json(self._health())

    async def _get_metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(),
                            content_type="text/plain", charset="utf-8")

    async def _get_alarms(self, _request: web.Request) -> web.Response:
        alarms = await self._journal.open_alarms()
        return _json({"alarms": [asdict(a) for a in alarms]})

    async def _get_alarm(self, request: web.Request) -> web.Response:
        alarm_id = request.match_info["alarm_id"]
        try:
            alarm = await self._journal.get_alarm(alarm_id)
        except UnknownAlarm:
            return _json({"error": f"unknown alarm {alarm_id}"}, 404)
        notes = await self._journal.notifications(alarm_id)
        history = await self._journal.alarm_log(alarm_id)
        return _json({
            "alarm": asdict(alarm),
            "notifications": [
                {"role": n.role, "name": n.name, "to": mask_phone(n.phone), "kind": n.kind,
                 "wave": n.wave,
                 "state": n.state, "sid": n.sid, "attempts": n.attempts,
                 "latency_ms": n.latency_ms, "error_code": n.error_code}
                for n in notes
            ],
            "log": [{"at": at, "event": ev, "data": data} for at, ev, data in history],
        })

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise web.HTTPBadRequest(text=f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return data

    async def _post_ack(self, request: web.Request) -> web.Response:
        alarm_id = request.match_info["alarm_id"]
        body = await self._body(request)
        by = str(body.get("by") or "operator")[:64]
        try:
            previous = await self._dispatcher.acknowledge(alarm_id, by=f"operator:{by}")
        except UnknownAlarm:
            return _json({"error": f"unknown alarm {alarm_id}"}, 404)
        except IllegalTransition as exc:
            return _json({"error": str(exc)}, 409)
        return _json({"alarm_id": alarm_id, "state": "acknowledged", "previous": previous})

    async def _post_resolve(self, request: web.Request) -> web.Response:
        alarm_id = request.match_info["alarm_id"]
        body = await self._body(request)
        note = body.get("note")
        by = str(body.get("by") or "operator")[:64]
        try:
            previous = await self._dispatcher.resolve(
                alarm_id, None if note is None else str(note)[:2000], by=f"operator:{by}")
        except UnknownAlarm:
            return _json({"error": f"unknown alarm {alarm_id}"}, 404)
        except IllegalTransition as exc:
            return _json({"error": str(exc)}, 409)
        return _json({"alarm_id": alarm_id, "state": "resolved", "previous": previous})

    async def _get_devices(self, _request: web.Request) -> web.Response:
        if self._devices is not None:
            return _json({"devices": self._devices()})
        states = await self._journal.device_states()
        return _json({"devices": [asdict(s) for s in states]})

    async def _get_notices(self, _request: web.Request) -> web.Response:
        return _json({"notices": await self._journal.open_notices()})

    async def _post_notice_ack(self, request: web.Request) -> web.Response:
        try:
            notice_id = int(request.match_info["notice_id"])
        except ValueError:
            return _json({"error": "notice id must be a number"}, 400)
        body = await self._body(request)
        by = str(body.get("by") or "operator")[:64]
        if self._notices is None or not await self._notices.acknowledge(notice_id, by):
            return _json({"error": f"no open notice {notice_id}"}, 404)
        return _json({"notice_id": notice_id, "acknowledged_by": by})

    async def _post_duty(self, request: web.Request) -> web.Response:
        responder_id = request.match_info["responder_id"]
        body = await self._body(request)
        on_duty = body.get("on_duty")
        if not isinstance(on_duty, bool):
            return _json({"error": "on_duty must be true or false"}, 400)
        if self._desk is None:
            return _json({"error": "duty changes not supported"}, 501)
        by = str(body.get("by") or "operator")[:64]
        try:
            await self._desk.set_duty(responder_id, on_duty, by=f"operator:{by}")
        except UnknownResponder:
            return _json({"error": f"unknown responder {responder_id}"}, 404)
        return _json({"responder_id": responder_id, "on_duty": on_duty})

    async def _post_reload(self, _request: web.Request) -> web.Response:
        if self._on_reload is None:
            return _json({"error": "reload not supported"}, 501)
        ok = await self._on_reload()
        return _json({"reloaded": ok}, 200 if ok else 422)
