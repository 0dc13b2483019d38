"""The operator console's routes, mounted under ``/console/`` on the control API's app.

Who may use it: an operator signed in with an account of ``gateway operator add``.
The control API's guard has already refused foreign ``Host`` names, cross-origin
requests and cross-site fetches (see :mod:`gateway.control`); here:

* every ``/console/api/`` request but sign-in needs the session cookie (HttpOnly,
  SameSite=Strict, Secure when browsers come over TLS), 401 otherwise;
* every POST needs ``X-CSRF-Token`` equal to the session's token (403 otherwise) and
  a JSON body (415 otherwise): no form of another site can post here;
* sign-in failures lock an account for a while (:mod:`gateway.console.accounts`).

Actions go through the same owners as the control API (dispatcher, notice board,
responder desk), named ``operator:<login>``, and are journaled there; the journal's
watch tells every open console at once (:mod:`gateway.console.feed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import structlog
from aiohttp import hdrs, web

from gateway.alert import AlertError, render_alert_wav
from gateway.config import AlertSection, ConsoleSection
from gateway.console.accounts import OperatorAccounts, Session, SignInRefused
from gateway.console.feed import MAX_BATCH, ConsoleFeed
from gateway.console.views import Views, to_csv
from gateway.control import BodyRefused, json_object
from gateway.control import json_error as _error
from gateway.control import json_response as _json
from gateway.dispatch import Dispatcher
from gateway.journal import Journal, UnknownAlarm
from gateway.lifecycle import IllegalTransition
from gateway.notices import NoticeBoard
from gateway.report import build_report, day_bounds
from gateway.responders import ResponderDesk, UnknownResponder

log = structlog.get_logger(__name__)

PREFIX: Final = "/console"
COOKIE: Final = "gw_console"
_SESSION: Final = web.RequestKey("console_session", Session)
_BODY: Final = web.RequestKey("console_body", dict[str, Any])
#: Seconds between keep-alive comments on an idle event stream (proxies close idle ones).
PING_S: Final = 15.0
#: How often an open stream checks that its session still holds (signed out, disabled).
RECHECK_S: Final = 60.0
MAX_NOTE: Final = 2000
HISTORY_COLUMNS: Final = ("alarm_id", "received_at_local", "elder", "community", "elder_id",
                          "device_id", "channel", "code", "state", "drill",
                          "acknowledged_by", "ack_s", "note")


def static_root() -> Path:
    return Path(str(resources.files("gateway.console") / "static"))


class ConsoleApp:
    """The console: its page, its API and its event stream, as an aiohttp sub-app."""

    def __init__(
        self,
        *,
        settings: ConsoleSection,
        alert: AlertSection,
        accounts: OperatorAccounts,
        journal: Journal,
        views: Views,
        dispatcher: Dispatcher,
        notices: NoticeBoard,
        desk: ResponderDesk,
        devices: Callable[[], list[dict[str, Any]]],
        health: Callable[[], dict[str, Any]],
        district_map: dict[str, Any] | None,
        zone: ZoneInfo,
        secure: bool,
        clock: Callable[[], float],
    ) -> None:
        self._settings = settings
        self._alert = alert
        self._accounts = accounts
        self._journal = journal
        self._views = views
        self._dispatcher = dispatcher
        self._notices = notices
        self._desk = desk
        self._devices = devices
        self._health = health
        self._map = district_map
        self._zone = zone
        self._secure = secure
        self._clock = clock
        self.feed = ConsoleFeed(clock=clock)
        journal.watch(self.feed.changed)
        self._closing = asyncio.Event()
        self._audio_dir = Path(tempfile.mkdtemp(prefix="gateway-console-audio-"))
        self._renders: dict[str, asyncio.Task[Path]] = {}
        self._cookie = f"__Host-{COOKIE}" if secure else COOKIE
        # The page and its policy, read and composed once.
        self._page = (static_root() / "index.html").read_text(encoding="utf-8")
        tiles = ""
        if settings.tile_url:
            parts = urlsplit(settings.tile_url.replace("{s}", "a"))
            tiles = f" {parts.scheme}://{parts.netloc}"
        self._policy = (
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            f"img-src 'self' data:{tiles}; media-src 'self' blob:; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")

    async def __aenter__(self) -> ConsoleApp:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Closes the accounts file and removes the rendered alerts."""
        for task in self._renders.values():
            task.cancel()
        self._accounts.close()
        shutil.rmtree(self._audio_dir, ignore_errors=True)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.add_routes([
            web.get("/", self._index),
            web.post("/api/sign-in", self._sign_in),
            web.post("/api/sign-out", self._sign_out),
            web.get("/api/me", self._me),
            web.get("/api/board", self._board),
            web.get("/api/events", self._events),
            web.post("/api/presence", self._presence),
            web.get("/api/alarms/{alarm_id}", self._alarm),
            web.get("/api/alarms/{alarm_id}/alert.wav", self._alert_wav),
            web.post("/api/alarms/{alarm_id}/ack", self._ack),
            web.post("/api/alarms/{alarm_id}/resolve", self._resolve),
            web.post("/api/alarms/{alarm_id}/false-alarm", self._false_alarm),
            web.get("/api/notices", self._get_notices),
            web.post("/api/notices/{notice_id}/ack", self._notice_ack),
            web.get("/api/devices", self._get_devices),
            web.get("/api/responders", self._get_responders),
            web.post("/api/responders/{responder_id}/duty", self._duty),
            web.get("/api/map", self._get_map),
            web.get("/api/history", self._history),
            web.get("/api/history.csv", self._history_csv),
            web.get("/api/report", self._report),
            web.get("/api/report.csv", self._report_csv),
        ])
        app.router.add_static("/static/", static_root(), append_version=True)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self._closing.set()  # open event streams end now, not at aiohttp's timeout

    # -- who may ask ------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                    ) -> web.StreamResponse:
        response = await self._checked(request, handler)
        if request.path.startswith(f"{PREFIX}/api/"):
            # Operators' data: never kept by a browser or a proxy (the alert WAV says
            # what it may be kept for itself).
            response.headers.setdefault(hdrs.CACHE_CONTROL, "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    async def _checked(self, request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                       ) -> web.StreamResponse:
        path = request.path
        if not path.startswith(f"{PREFIX}/api/"):
            return await handler(request)
        if request.method == hdrs.METH_POST:
            try:
                request[_BODY] = await json_object(request)
            except BodyRefused as exc:
                return _error(exc.status, exc.reason)
        if path == f"{PREFIX}/api/sign-in":
            return await handler(request)
        token = request.cookies.get(self._cookie, "")
        session = await self._accounts.session(token) if token else None
        if session is None:
            return _error(401, "sign in first")
        if request.method == hdrs.METH_POST:
            given = request.headers.get("X-CSRF-Token", "")
            if not hmac.compare_digest(given.encode(), session.csrf_token.encode()):
                log.warning("console.csrf_refused", login=session.login, path=path,
                            remote=request.remote or "unix")
                return _error(403, "missing or wrong CSRF token")
        request[_SESSION] = session
        return await handler(request)

    @staticmethod
    def _by(request: web.Request) -> str:
        return f"operator:{request[_SESSION].login}"

    # -- the page and the session ----------------------------------------------------

    async def _index(self, _request: web.Request) -> web.StreamResponse:
        response = web.Response(text=self._page, content_type="text/html", charset="utf-8")
        response.headers["Content-Security-Policy"] = self._policy
        response.headers[hdrs.CACHE_CONTROL] = "no-store"
        return response

    async def _sign_in(self, request: web.Request) -> web.Response:
        body = request[_BODY]
        login, password = body.get("login"), body.get("password")
        if not isinstance(login, str) or not isinstance(password, str):
            return _error(400, "login and password are required")
        try:
            new = await self._accounts.sign_in(login.strip().lower(), password,
                                               remote=request.remote or "unix")
        except SignInRefused as exc:
            status = 423 if exc.reason == "locked" else 401
            return _json({"error": exc.reason, "until": exc.until}, status)
        response = _json({"login": new.login, "name": new.display_name,
                          "csrf": new.csrf_token})
        response.set_cookie(self._cookie, new.token, httponly=True, samesite="Strict",
                            secure=self._secure, path="/",
                            max_age=int(self._settings.session_max_h * 3600))
        return response

    async def _sign_out(self, request: web.Request) -> web.Response:
        token = request.cookies.get(self._cookie, "")
        await self._accounts.sign_out(token)
        log.info("console.sign_out", login=request[_SESSION].login)
        response = _json({"signed_out": True})
        response.del_cookie(self._cookie, path="/")
        return response

    async def _me(self, request: web.Request) -> web.Response:
        s = request[_SESSION]
        return _json({"login": s.login, "name": s.display_name, "csrf": s.csrf_token,
                      "language": self._settings.language,
                      "tile_url": self._settings.tile_url,
                      "tile_attribution": self._settings.tile_attribution,
                      "timezone": str(self._zone)})

    # -- the board and its stream ------------------------------------------------------

    async def _board(self, _request: web.Request) -> web.Response:
        cursor = self.feed.cursor  # before the read: the stream resumes from here
        board = await self._views.board()
        board.update(cursor=cursor, consoles=self.feed.consoles(), health=self._health(),
                     now=self._clock())
        return _json(board)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        session = request[_SESSION]
        feed = self.feed
        response = web.StreamResponse(headers={
            hdrs.CONTENT_TYPE: "text/event-stream", hdrs.CACHE_CONTROL: "no-store",
            "X-Accel-Buffering": "no"})
        await response.prepare(request)
        presence = feed.join(session.login, session.display_name)
        log.info("console.stream_opened", login=session.login, stream=presence.stream_id)
        seq = feed.parse_cursor(request.headers.get("Last-Event-ID")
                                or request.query.get("after"))
        checked = self._clock()
        try:
            await _send(response, "hello", {"stream_id": presence.stream_id,
                                             "consoles": feed.consoles()})
            if seq is None:
                seq = await self._resync(response)
            while not self._closing.is_set():
                changes = feed.since(seq)
                if changes is None or sum(c.kind == "alarm" for c in changes) > MAX_BATCH:
                    seq = await self._resync(response)
                    continue
                if changes:
                    seq = changes[-1].seq
                    await _send(response, "change", _batch(changes, feed), f"{feed.boot}-{seq}")
                    continue
                waiter = asyncio.ensure_future(feed.wait(seq, PING_S))
                closing = asyncio.ensure_future(self._closing.wait())
                try:
                    await asyncio.wait({waiter, closing}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    closing.cancel()
                if feed.since(seq) == []:
                    await response.write(b": ping\n\n")
                if self._clock() - checked > RECHECK_S:
                    checked = self._clock()
                    if await self._accounts.session(request.cookies.get(self._cookie, "")) \
                            is None:
                        await _send(response, "signed-out", {})
                        break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            feed.leave(presence.stream_id)
            log.info("console.stream_closed", login=session.login, stream=presence.stream_id)
        return response

    async def _resync(self, response: web.StreamResponse) -> int:
        """Tell the console to read the board again; returns the cursor it covers."""
        cursor = self.feed.cursor
        await _send(response, "resync", {"cursor": cursor}, cursor)
        return int(cursor.rpartition("-")[2])

    async def _presence(self, request: web.Request) -> web.Response:
        body = request[_BODY]
        sound = body.get("sound")
        stream_id = body.get("stream_id")
        if sound not in ("on", "muted", "off") or not isinstance(stream_id, str):
            return _error(400, "give stream_id and sound: on, muted or off")
        if not self.feed.set_sound(stream_id, request[_SESSION].login, sound):
            return _error(404, "no such open stream of yours")
        if sound != "on":
            log.warning("console.silent", login=request[_SESSION].login, sound=sound)
        return _json({"stream_id": stream_id, "sound": sound})

    # -- alarms -----------------------------------------------------------------------

    async def _alarm(self, request: web.Request) -> web.Response:
        alarm_id = request.match_info["alarm_id"]
        try:
            return _json(await self._views.alarm(alarm_id))
        except UnknownAlarm:
            return _error(404, f"unknown alarm {alarm_id}")

    async def _alert_wav(self, request: web.Request) -> web.StreamResponse:
        """The center's alert for an alarm in flight (tone + announcement), for browsers."""
        alarm_id = request.match_info["alarm_id"]
        text = self._dispatcher.announcement(alarm_id)
        if text is None:
            return _error(404, f"alarm {alarm_id} is not sounding")
        task = self._renders.get(alarm_id)
        if task is None or task.cancelled():
            task = asyncio.ensure_future(self._render(alarm_id, text))
            self._renders[alarm_id] = task
        try:
            path = await asyncio.shield(task)
        except AlertError as exc:
            self._renders.pop(alarm_id, None)
            return _error(503, f"the alert cannot be rendered: {exc}")
        return web.FileResponse(path, headers={hdrs.CONTENT_TYPE: "audio/wav",
                                               hdrs.CACHE_CONTROL: "private, max-age=3600"})

    async def _render(self, alarm_id: str, text: str) -> Path:
        for old in list(self._renders):  # alarms no longer sounding: drop their files
            if old != alarm_id and self._dispatcher.announcement(old) is None:
                self._renders.pop(old, None)
                with contextlib.suppress(OSError):
                    (self._audio_dir / f"{_stem(old)}.wav").unlink()
        path = self._audio_dir / f"{_stem(alarm_id)}.wav"
        a = self._alert
        await asyncio.to_thread(render_alert_wav, path, text, voice=a.voice, espeak=a.espeak,
                                timeout_s=a.max_render_s)
        return path

    async def _ack(self, request: web.Request) -> web.Response:
        alarm_id = request.match_info["alarm_id"]
        try:
            previous = await self._dispatcher.acknowledge(alarm_id, by=self._by(request))
        except UnknownAlarm:
            return _error(404, f"unknown alarm {alarm_id}")
        except IllegalTransition as exc:
            return _error(409, str(exc))
        return _json({"alarm_id": alarm_id, "state": "acknowledged", "previous": previous})

    async def _resolve(self, request: web.Request) -> web.Response:
        return await self._close(request, false_alarm=False)

    async def _false_alarm(self, request: web.Request) -> web.Response:
        return await self._close(request, false_alarm=True)

    async def _close(self, request: web.Request, *, false_alarm: bool) -> web.Response:
        alarm_id = request.match_info["alarm_id"]
        note = request[_BODY].get("note")
        if note is not None and not isinstance(note, str):
            return _error(400, "note must be text")
        note = (note or "").strip()[:MAX_NOTE] or None
        by = self._by(request)
        try:
            if false_alarm:
                await self._journal.get_alarm(alarm_id)  # 404 before anything is written
                await self._journal.log_event(alarm_id, "alarm.false_alarm",
                                              {"by": by, "note": note})
                note = f"误报 / false alarm{': ' + note if note else ''}"
            previous = await self._dispatcher.resolve(alarm_id, note, by=by)
        except UnknownAlarm:
            return _error(404, f"unknown alarm {alarm_id}")
        except IllegalTransition as exc:
            return _error(409, str(exc))
        return _json({"alarm_id": alarm_id, "state": "resolved", "previous": previous,
                      "false_alarm": false_alarm})

    # -- notices, devices, responders, map -----------------------------------------------

    async def _get_notices(self, _request: web.Request) -> web.Response:
        return _json({"notices": await self._views.notices()})

    async def _notice_ack(self, request: web.Request) -> web.Response:
        try:
            notice_id = int(request.match_info["notice_id"])
        except ValueError:
            return _error(400, "notice id must be a number")
        login = request[_SESSION].login
        if not await self._notices.acknowledge(notice_id, f"operator:{login}"):
            return _error(404, f"no open notice {notice_id}")
        return _json({"notice_id": notice_id, "acknowledged_by": login})

    async def _get_devices(self, _request: web.Request) -> web.Response:
        registry = self._views.world.registry
        rows = []
        for d in self._devices():
            elder = registry.elders.get(d.get("elder_id", ""))
            due = None
            if d.get("last_seen") is not None and d.get("expected_every_h"):
                due = d["last_seen"] + d["expected_every_h"] * 3600
            rows.append(dict(d, elder=elder.name if elder else None,
                             community=elder.community if elder else None, next_due=due))
        return _json({"devices": rows, "health": self._health()})

    async def _get_responders(self, request: web.Request) -> web.Response:
        on_duty = request.query.get("on_duty") in ("1", "true")
        return _json({"responders": self._views.responders(on_duty_only=on_duty)})

    async def _duty(self, request: web.Request) -> web.Response:
        responder_id = request.match_info["responder_id"]
        on_duty = request[_BODY].get("on_duty")
        if not isinstance(on_duty, bool):
            return _error(400, "on_duty must be true or false")
        try:
            await self._desk.set_duty(responder_id, on_duty, by=self._by(request))
        except UnknownResponder:
            return _error(404, f"unknown responder {responder_id}")
        return _json({"responder_id": responder_id, "on_duty": on_duty})

    async def _get_map(self, _request: web.Request) -> web.Response:
        data = self._views.map_points()
        data["district"] = self._map
        return _json(data)

    # -- history and the daily report -----------------------------------------------------

    def _day(self, value: str | None) -> date | None:
        if not value:
            return None
        return date.fromisoformat(value)

    async def _history_rows(self, request: web.Request) -> list[dict[str, Any]]:
        q = request.query
        start = end = None
        day = self._day(q.get("day"))
        if day is not None:
            start, end = day_bounds(day, self._zone)
        rows = await self._views.history(elder=q.get("elder") or None,
                                         device=q.get("device") or None,
                                         start=start, end=end)
        for r in rows:
            r["received_at_local"] = datetime.fromtimestamp(
                r["received_at"], self._zone).isoformat(timespec="seconds")
        return rows

    async def _history(self, request: web.Request) -> web.Response:
        try:
            rows = await self._history_rows(request)
        except ValueError as exc:
            return _error(400, f"day must be YYYY-MM-DD: {exc}")
        return _json({"alarms": rows, "notices": []})

    async def _history_csv(self, request: web.Request) -> web.Response:
        try:
            rows = await self._history_rows(request)
        except ValueError as exc:
            return _error(400, f"day must be YYYY-MM-DD: {exc}")
        return _csv(to_csv(rows, HISTORY_COLUMNS), "alarms.csv")

    async def _report_data(self, request: web.Request) -> dict[str, Any]:
        day = self._day(request.query.get("day")) or (
            datetime.fromtimestamp(self._clock(), self._zone).date() - timedelta(days=0))
        zone, now = self._zone, self._clock()
        return await self._journal.read(
            lambda conn: build_report(conn, day, zone, generated_at=now))

    async def _report(self, request: web.Request) -> web.Response:
        try:
            return _json(await self._report_data(request))
        except ValueError as exc:
            return _error(400, f"day must be YYYY-MM-DD: {exc}")

    async def _report_csv(self, request: web.Request) -> web.Response:
        try:
            data = await self._report_data(request)
        except ValueError as exc:
            return _error(400, f"day must be YYYY-MM-DD: {exc}")
        rows = [{"figure": k, "value": json.dumps(v, ensure_ascii=False)
                 if isinstance(v, dict | list) else v} for k, v in _flatten(data)]
        return _csv(to_csv(rows, ("figure", "value")), f"report-{data.get('day', '')}.csv")


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_flatten(value, f"{name}."))
        else:
            out.append((name, value))
    return out


def _csv(text: str, filename: str) -> web.Response:
    return web.Response(text=text, content_type="text/csv", charset="utf-8", headers={
        hdrs.CONTENT_DISPOSITION: f'attachment; filename="{filename}"',
        hdrs.CACHE_CONTROL: "no-store"})


def _stem(alarm_id: str) -> str:
    return "".join(c for c in alarm_id if c.isalnum() or c == "-")


def _batch(changes: list[Any], feed: ConsoleFeed) -> dict[str, Any]:
    alarms = list(dict.fromkeys(c.key for c in changes if c.kind == "alarm"))
    notices = list(dict.fromkeys(c.key for c in changes if c.kind == "notice"))
    data: dict[str, Any] = {"alarms": alarms, "notices": notices,
                            "duty": any(c.kind == "duty" for c in changes)}
    if any(c.kind == "consoles" for c in changes):
        data["consoles"] = feed.consoles()
    return data


async def _send(response: web.StreamResponse, event: str, data: dict[str, Any],
                event_id: str | None = None) -> None:
    lines = f"event: {event}\n"
    if event_id is not None:
        lines += f"id: {event_id}\n"
    lines += f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
    await response.write(lines.encode())
