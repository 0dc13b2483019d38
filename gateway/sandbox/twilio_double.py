"""TEST DOUBLE of Twilio's Messages (and Calls) REST API. Never a production path.

A real HTTP server (aiohttp.web) on localhost that answers the subset of
``/2010-04-01/Accounts/{AccountSid}/Messages`` that the gateway uses, closely
enough that the real twilio-python client works against it unchanged
(``client.api.base_url = double.base_url``). Nothing sent to it leaves the
machine: it is the SMS sink of the gateway's clearly labelled ``demo`` mode and
the counterpart of the integration tests.

What it models, because the gateway's retry and reconciliation logic depends
on it:

* message creation with Twilio's validation errors (JSON ``code``,
  ``message``, ``more_info``, ``status``) and HTTP Basic authentication;
* list (with ``To``/``From``/``DateSent`` filters and paging) and fetch;
* the status progression ``queued -> sent -> delivered`` (or a scripted
  ``undelivered``/``failed`` per number), with signed ``StatusCallback``
  webhooks;
* inbound messages (a person replying to our number): injected with
  :meth:`TwilioDouble.inject_inbound`, listed and fetched with ``direction``
  ``inbound``, and POSTed, signed, to ``inbound_webhook_url`` when it is set;
  a TwiML ``<Message>`` in the webhook's answer becomes an ``outbound-reply``
  message, as Twilio sends it;
* Programmable Voice's Calls resource (``.../Calls.json``: create, list,
  fetch) and scripted callees whose calls :meth:`TwilioDouble.advance_call`
  plays out, with signed call progress callbacks and ``<Gather>`` digits: see
  :mod:`gateway.sandbox.twilio_calls`, mixed into the same server, behind the
  same authentication and request hook. Pieces both resources use live in
  :mod:`gateway.sandbox.twilio_common`.

Every request is recorded with its arrival time, so tests can count attempts
and check that requests overlapped.

Fault injection (HTTP 429/5xx, slow answers, a message created but its answer
lost, whole outages) is not part of this module, which ``gateway demo`` ships
and runs: the tests' ``FaultyTwilioDouble`` (``tests/support/twilio_faults.py``)
is a subclass that plugs in through the one request hook,
:meth:`TwilioDouble._intercept`, which sees every authenticated API call
(:class:`ApiCall`) and may answer it itself, hold it, or drop the connection.

Run it by hand with ``python -m gateway.sandbox.twilio_double --port 8099``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

import aiohttp
import structlog
from aiohttp import web
from twilio.request_validator import RequestValidator
from yarl import URL

from gateway.redact import mask_phone
from gateway.sandbox.twilio_calls import CallsMixin
from gateway.sandbox.twilio_common import (
    API_VERSION,
    E164,
    MAX_WEBHOOK_ANSWER,
    ApiCall,
    ApiTarget,
    CallbackDelivery,
    HttpMethod,
    error_response,
    invalid_query,
    list_page,
    matches_moment,
    moment_bounds,
    new_sid,
    parse_paging,
    parse_twiml,
    rfc2822,
)
from gateway.smstext import segments

__all__ = [
    "API_VERSION",
    "DEFAULT_ACCOUNT_SID",
    "ApiCall",
    "ApiTarget",
    "CallbackDelivery",
    "Direction",
    "RecordedRequest",
    "SentMessage",
    "TwilioDouble",
    "error_response",
    "main",
]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

#: Account SID the double answers to unless told otherwise. Not a real account.
DEFAULT_ACCOUNT_SID: Final = "AC" + "d0" * 16

MAX_BODY_CHARS: Final = 1600
FINAL_STATUSES: Final = frozenset({"delivered", "undelivered", "failed"})
_SCRIPTABLE_FINALS: Final = frozenset({"sent", "delivered", "undelivered", "failed"})
_ALPHANUMERIC_SENDER = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")
_ACCOUNT_SID = re.compile(r"^AC[0-9a-f]{32}$")
_SERVICE_SID = re.compile(r"^MG[0-9a-f]{32}$")


# ----------------------------------------------------------------------------- records

#: ``outbound-api``: created through the REST API; ``outbound-reply``: sent by
#: Twilio from a TwiML ``<Message>`` answering an inbound webhook; ``inbound``:
#: a message a person sent to one of our numbers.
Direction = Literal["outbound-api", "outbound-reply", "inbound"]


@dataclass(frozen=True, slots=True)
class SentMessage:
    """One message the double accepted (or, with ``direction`` ``inbound``, received).

    Replaced (not mutated) as its status moves on. An inbound message has
    status ``received``, ``from_`` the person's number and ``to`` ours.
    """

    sid: str
    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str
    status_callback: str | None
    received_at: float  # event-loop (monotonic) time of creation
    date_created: datetime  # UTC, from the injected wall clock
    num_segments: int
    status: str
    error_code: int | None = None
    date_sent: datetime | None = None
    date_updated: datetime | None = None
    validity_period: int | None = None
    direction: Direction = "outbound-api"


@dataclass(slots=True)
class RecordedRequest:
    """One HTTP request as it reached the double.

    ``answered_at`` and ``status`` are filled in when the answer is written;
    they stay ``None`` for a request whose connection was dropped on purpose.
    """

    arrived_at: float  # event-loop (monotonic) time
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    answered_at: float | None = None
    status: int | None = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    status: str
    error_code: int | None


# ----------------------------------------------------------------------------- helpers


async def _form(request: web.Request) -> dict[str, str]:
    # request.post() caches the parsed body, so the middleware and the handler
    # share one parse without stashing it on the request.
    if request.method != "POST":
        return {}
    posted = await request.post()
    return {key: value for key, value in posted.items() if isinstance(value, str)}


# ----------------------------------------------------------------------------- the double


class TwilioDouble(CallsMixin):
    """Local HTTP stand-in for Twilio's Messages API and Calls resource (a test
    double, see the module doc; the Calls half is :class:`CallsMixin`).

    Use as an async context manager::

        async with TwilioDouble() as double:
            client.api.base_url = double.base_url
            ...

    ``sent_delay`` and ``delivered_delay`` (seconds) drive the automatic status
    progression; ``None`` stops it at that step until :meth:`advance` is called.
    ``clock`` is the wall clock used for ``date_created``/``date_sent``.
    ``inbound_webhook_url`` is where :meth:`inject_inbound` POSTs (settable later).
    """

    def __init__(
        self,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        *,
        sent_delay: float | None = 0.05,
        delivered_delay: float | None = 0.05,
        callback_timeout: float = 5.0,
        inbound_webhook_url: str | None = None,
    ) -> None:
        if not _ACCOUNT_SID.fullmatch(account_sid):
            raise ValueError(f"account_sid must be 'AC' + 32 lowercase hex, got {account_sid!r}")
        self.account_sid = account_sid
        # A fresh random token per instance unless given: the double is never
        # configured with a real credential, and nothing can depend on a constant.
        self.auth_token = auth_token if auth_token is not None else secrets.token_hex(16)
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._clock = clock
        self.sent_delay = sent_delay
        self.delivered_delay = delivered_delay
        self._callback_timeout = callback_timeout

        #: Where inbound messages are POSTed (Twilio's "A message comes in"
        #: webhook of the number); ``None``: they are only listed.
        self.inbound_webhook_url = inbound_webhook_url

        self.messages: list[SentMessage] = []  # outgoing, oldest first
        self.inbound: list[SentMessage] = []  # received from people, oldest first
        self.requests: list[RecordedRequest] = []
        self.callbacks: list[CallbackDelivery] = []  # status callbacks
        self.inbound_deliveries: list[CallbackDelivery] = []  # inbound webhooks

        self._index: dict[str, int] = {}
        self._inbound_index: dict[str, int] = {}
        # Creation order across both directions, for Twilio's newest-first listing.
        self._sequence: dict[str, int] = {}
        self._final_by_number: dict[str, _Outcome] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._progressions: set[asyncio.Task[None]] = set()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        # Set by stop(): whatever holds a request wakes on it and lets go.
        self._closing: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None
        self._validator = RequestValidator(self.auth_token)
        self._init_calls()

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind the port and start serving."""
        if self._runner is not None:
            raise RuntimeError("TwilioDouble already started")
        self._closing = asyncio.Event()
        self._session = aiohttp.ClientSession()
        app = web.Application(middlewares=[self._middleware])
        base = f"/{API_VERSION}/Accounts/{{account_sid}}"
        app.router.add_post(f"{base}/Messages.json", self._create, name="create")
        app.router.add_get(f"{base}/Messages.json", self._list, name="list")
        app.router.add_get(f"{base}/Messages/{{message_sid}}.json", self._fetch, name="fetch")
        self._add_call_routes(app.router, base)
        # Short shutdown timeout: held requests wake on the closing event, so
        # nothing legitimate is still running when the runner stops.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        try:
            await self._runner.setup()
            await self._bind(self._requested_port)
        except BaseException:
            # E.g. the port is taken: release the runner and callback session now,
            # since __aexit__ does not run when __aenter__ fails.
            await self.stop()
            raise
        log.info(
            "twilio_double.started",
            base_url=self.base_url,
            account_sid=self.account_sid,
            note="TEST DOUBLE: no SMS leaves this machine",
        )

    async def _bind(self, port: int) -> None:
        runner = self._started(self._runner)
        self._site = web.TCPSite(runner, self.host, port)
        await self._site.start()
        self._port = int(runner.addresses[-1][1])

    @staticmethod
    def _started(resource: _T | None) -> _T:
        if resource is None:
            raise RuntimeError("TwilioDouble not started")
        return resource

    async def stop(self) -> None:
        """Stop serving, cancel pending status progressions, close the callback client."""
        if self._closing is not None:
            self._closing.set()
        tasks = list(self._progressions)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._progressions.clear()
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(RuntimeError("TwilioDouble stopped"))
        self._waiters.clear()
        self._close_calls()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        log.info("twilio_double.stopped", messages=len(self.messages), calls=len(self.calls))

    @property
    def port(self) -> int:
        """The bound TCP port (known once started)."""
        if self._port is None:
            raise RuntimeError("TwilioDouble not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``: what to set as ``client.api.base_url``."""
        return f"http://{self.host}:{self.port}"

    # -- scripting -----------------------------------------------------------------

    def set_final_status(self, to: str, status: str, *, error_code: int | None = None) -> None:
        """Script where messages to ``to`` end: ``delivered`` (default), ``sent``
        (no delivery report), ``undelivered`` or ``failed`` (with ``error_code``)."""
        if status not in _SCRIPTABLE_FINALS:
            raise ValueError(f"final status must be one of {sorted(_SCRIPTABLE_FINALS)}")
        self._final_by_number[to] = _Outcome(status, error_code)

    # The timeout parameter is the documented test-helper API (a bounded wait
    # that reports a clear failure), not a substitute for asyncio.timeout.
    async def wait_for_messages(
        self,
        n: int,
        timeout: float = 5.0,
    ) -> list[SentMessage]:
        """Wait until at least ``n`` messages exist; return all of them.

        Raises ``TimeoutError`` when fewer arrived within ``timeout`` seconds.
        """
        if len(self.messages) < n:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (n, waiter)
            self._waiters.append(entry)
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            finally:
                if entry in self._waiters:
                    self._waiters.remove(entry)
        return list(self.messages)

    def message(self, sid: str) -> SentMessage:
        """The current state of message ``sid``, outgoing or inbound (``KeyError``
        if unknown)."""
        if sid in self._inbound_index:
            return self.inbound[self._inbound_index[sid]]
        return self.messages[self._index[sid]]

    async def inject_inbound(self, from_: str, body: str, to: str | None = None) -> SentMessage:
        """A person at ``from_`` texts ``body`` to our number ``to``.

        ``to`` defaults to the sender number of the latest outgoing message to
        ``from_`` (a reply goes to the number that texted you); ``ValueError``
        when there is none. The message is listed and fetched with direction
        ``inbound`` and status ``received``. When :attr:`inbound_webhook_url` is
        set it is POSTed there, signed like Twilio, before this returns (the
        delivery is recorded in :attr:`inbound_deliveries`); a TwiML
        ``<Message>`` in the answer is sent back to ``from_`` as an
        ``outbound-reply`` message.
        """
        if not from_:
            raise ValueError("from_ is required")
        if to is None:
            to = self._our_number_for(from_)
        now = datetime.fromtimestamp(self._clock(), UTC)
        message = SentMessage(
            sid=new_sid("SM"),
            to=to,
            from_=from_,
            messaging_service_sid=None,
            body=body,
            status_callback=None,
            received_at=asyncio.get_running_loop().time(),
            date_created=now,
            num_segments=segments(body),
            status="received",
            date_sent=now,
            date_updated=now,
            direction="inbound",
        )
        self._inbound_index[message.sid] = len(self.inbound)
        self.inbound.append(message)
        self._sequence[message.sid] = len(self._sequence)
        log.info(
            "twilio_double.inbound_received",
            sid=message.sid,
            from_=mask_phone(from_),
            to=mask_phone(to),
        )
        if self.inbound_webhook_url is not None:
            await self._post_inbound(self.inbound_webhook_url, message)
        return message

    def _our_number_for(self, person: str) -> str:
        for sent in reversed(self.messages):
            if sent.to == person and sent.from_ is not None:
                return sent.from_
        raise ValueError(f"no outgoing message to {mask_phone(person)} names our number: pass to=")

    async def advance(self, sid: str | None = None) -> None:
        """Move one message (or every message) to its final status now,
        POSTing each intermediate status callback in order."""
        sids = [sid] if sid is not None else [m.sid for m in self.messages]
        for each in sids:
            while await self._step(each):
                pass

    # -- status progression ------------------------------------------------------------

    def _final_for(self, message: SentMessage) -> _Outcome:
        return self._final_by_number.get(message.to, _Outcome("delivered", None))

    async def _step(self, sid: str) -> bool:
        """Move ``sid`` one status further; False when it is already final."""
        lock = self._locks.setdefault(sid, asyncio.Lock())
        # The lock keeps the callbacks of one message in order when advance()
        # races the automatic progression.
        async with lock:
            current = self.message(sid)
            final = self._final_for(current)
            if current.status == final.status or current.status in FINAL_STATUSES:
                return False
            if current.status == "queued":
                nxt = "failed" if final.status == "failed" else "sent"
            else:
                nxt = final.status
            now = datetime.fromtimestamp(self._clock(), UTC)
            updated = replace(
                current,
                status=nxt,
                error_code=final.error_code if nxt in ("failed", "undelivered") else None,
                date_sent=now if nxt == "sent" else current.date_sent,
                date_updated=now,
            )
            self.messages[self._index[sid]] = updated
            log.info("twilio_double.status", sid=sid, status=nxt, to=mask_phone(updated.to))
            if updated.status_callback:
                await self._post_callback(updated)
            return True

    async def _progress(self, sid: str) -> None:
        closing = self._started(self._closing)
        for delay in (self.sent_delay, self.delivered_delay):
            if delay is None:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), delay)
            if closing.is_set() or not await self._step(sid):
                return

    async def _post_callback(self, message: SentMessage) -> None:
        url = message.status_callback
        if url is None:
            return
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "MessageSid": message.sid,
            "SmsSid": message.sid,
            "MessageStatus": message.status,
            "SmsStatus": message.status,
            "To": message.to,
        }
        if message.from_ is not None:
            params["From"] = message.from_
        if message.messaging_service_sid is not None:
            params["MessagingServiceSid"] = message.messaging_service_sid
        # Twilio includes ErrorCode only when the message failed.
        if message.error_code is not None:
            params["ErrorCode"] = str(message.error_code)
        self.callbacks.append(await self._post_signed(url, params, message.sid))

    async def _post_signed(self, url: str, params: dict[str, str], sid: str) -> CallbackDelivery:
        """POST ``params`` to ``url`` with Twilio's signature; never raises."""
        return await self._send_signed("POST", url, params, sid)

    async def _send_signed(
        self, method: HttpMethod, url: str, params: dict[str, str], sid: str
    ) -> CallbackDelivery:
        """Send ``params`` to ``url`` with Twilio's signature; never raises.

        POST sends them as a form and signs URL plus sorted params; GET, as
        Twilio does, appends them to the query string and signs that full URL
        alone (the recorded ``url`` is then that full URL).
        """
        target: str | URL = url
        if method == "GET":
            # Already encoded: sent exactly as signed.
            target = URL(url).update_query(params)
            url = str(target)
            signature = self._validator.compute_signature(url, {})
        else:
            signature = self._validator.compute_signature(url, params)
        headers = {"X-Twilio-Signature": signature}
        http_status: int | None = None
        error: str | None = None
        answer: str | None = None
        session = self._started(self._session)
        try:
            async with (
                asyncio.timeout(self._callback_timeout),
                session.request(
                    method,
                    target,
                    data=params if method == "POST" else None,
                    headers=headers,
                ) as response,
            ):
                http_status = response.status
                raw = bytearray()
                # read(n) returns what has arrived so far, not n bytes: loop to EOF.
                while len(raw) < MAX_WEBHOOK_ANSWER and (
                    chunk := await response.content.read(MAX_WEBHOOK_ANSWER - len(raw))
                ):
                    raw += chunk
                answer = raw.decode("utf-8", errors="replace")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Twilio does not retry a failed webhook either; record it.
            error = f"{type(exc).__name__}: {exc}"
            log.warning("twilio_double.callback_failed", sid=sid, error=error)
        return CallbackDelivery(url, params, signature, http_status, error, answer)

    async def _post_inbound(self, url: str, message: SentMessage) -> None:
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "MessageSid": message.sid,
            "SmsSid": message.sid,
            "SmsMessageSid": message.sid,
            "SmsStatus": "received",
            "From": message.from_ or "",
            "To": message.to,
            "Body": message.body,
            "NumMedia": "0",
            "NumSegments": str(message.num_segments),
        }
        delivery = await self._post_signed(url, params, message.sid)
        self.inbound_deliveries.append(delivery)
        if delivery.http_status != 200 or not delivery.answer:
            return
        for reply in self._twiml_messages(delivery.answer, message.sid):
            # Twilio sends the reply from the number that received the message.
            self._record_message(
                {"To": message.from_ or "", "From": message.to, "Body": reply},
                direction="outbound-reply",
            )

    @staticmethod
    def _twiml_messages(answer: str, sid: str) -> list[str]:
        """The texts of the ``<Message>`` verbs of a TwiML answer (Twilio logs
        error 12100 for a document it cannot parse and sends nothing)."""
        root = parse_twiml(answer, sid)
        if root is None:
            return []
        texts: list[str] = []
        for verb in root.iter("Message"):
            # <Message>text</Message> or <Message><Body>text</Body></Message>.
            body = verb.find("Body")
            text = "".join((body if body is not None else verb).itertext()).strip()
            if text:
                texts.append(text)
        return texts

    # -- HTTP ------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        form = await _form(request)
        record = RecordedRequest(
            arrived_at=loop.time(),
            method=request.method,
            path=request.path,
            query=dict(request.query),
            form=form,
        )
        self.requests.append(record)
        authorized = self._authorized(request)

        async def proceed() -> web.StreamResponse:
            if not authorized:
                return error_response(
                    20003, 401, headers={"WWW-Authenticate": 'Basic realm="Twilio API"'}
                )
            try:
                return await handler(request)
            except web.HTTPException as exc:
                # Unknown routes and methods, answered in Twilio's JSON shape.
                return error_response(20404, exc.status, path=request.path)

        response = await self._intercept(self._api_call(request, form, authorized), proceed)
        if response is None:
            return self._drop(request)
        record.answered_at = loop.time()
        record.status = response.status
        return response

    async def _intercept(
        self, call: ApiCall, proceed: Callable[[], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse | None:
        """The request hook: the answer to ``call``, or ``None`` to close the
        connection without one (the request stays recorded as unanswered).

        This double answers every request as Twilio would: ``proceed()``
        handles it (checking the credentials first). A subclass that injects
        faults overrides this to answer instead, hold the request (waking when
        the double stops), or drop the connection, before or after
        ``proceed()``.
        """
        return await proceed()

    def _api_call(self, request: web.Request, form: Mapping[str, str], authorized: bool) -> ApiCall:
        if (call := self._call_api_call(request, form, authorized)) is not None:
            return call
        target = request.match_info.route.name
        if target == "create":
            return ApiCall("create", form.get("To"), authorized)
        if target == "list":
            return ApiCall("list", request.query.get("To"), authorized)
        if target == "fetch":
            sid = request.match_info.get("message_sid", "")
            to = self.message(sid).to if sid in self._index or sid in self._inbound_index else None
            return ApiCall("fetch", to, authorized)
        return ApiCall(None, None, authorized)

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        if request.protocol is not None:
            request.protocol.force_close()
        # Nothing reaches the client: aiohttp discards this answer on the closed transport.
        return web.Response(status=500)

    def _authorized(self, request: web.Request) -> bool:
        # Parsed by hand: aiohttp 3.14 deprecates BasicAuth (and its decode()).
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except binascii.Error:
            return False
        login, sep, password = decoded.partition(b":")
        if not sep:
            return False
        login_ok = hmac.compare_digest(login, self.account_sid.encode())
        password_ok = hmac.compare_digest(password, self.auth_token.encode())
        return login_ok and password_ok

    def _wrong_account(self, request: web.Request) -> web.Response | None:
        if request.match_info["account_sid"] != self.account_sid:
            return error_response(20404, 404, path=request.path)
        return None

    async def _create(self, request: web.Request) -> web.StreamResponse:
        if (wrong := self._wrong_account(request)) is not None:
            return wrong
        form = await _form(request)
        invalid = self._validate(form)
        if invalid is not None:
            return invalid
        message = self._record_message(form)
        return web.json_response(self._message_json(message), status=201)

    def _validate(self, form: Mapping[str, str]) -> web.Response | None:
        to = form.get("To")
        sender = form.get("From")
        service = form.get("MessagingServiceSid")
        body = form.get("Body")
        validity = form.get("ValidityPeriod")
        if not to:
            return error_response(21604, 400)
        if not E164.fullmatch(to):
            return error_response(21211, 400, to=to)
        if not sender and not service:
            return error_response(21603, 400)
        if sender and not (E164.fullmatch(sender) or _ALPHANUMERIC_SENDER.fullmatch(sender)):
            return error_response(21606, 400)
        if service and not _SERVICE_SID.fullmatch(service):
            return error_response(21701, 400)
        if not body:
            return error_response(21602, 400)
        if len(body) > MAX_BODY_CHARS:
            return error_response(21617, 400)
        if validity is not None and not (validity.isdigit() and 1 <= int(validity) <= 36000):
            return error_response(21624, 400)
        return None

    def _record_message(
        self, form: Mapping[str, str], *, direction: Direction = "outbound-api"
    ) -> SentMessage:
        loop = asyncio.get_running_loop()
        body = form["Body"]
        validity = form.get("ValidityPeriod")
        now = datetime.fromtimestamp(self._clock(), UTC)
        message = SentMessage(
            sid=new_sid("SM"),
            to=form["To"],
            from_=form.get("From") or None,
            messaging_service_sid=form.get("MessagingServiceSid") or None,
            body=body,
            status_callback=form.get("StatusCallback") or None,
            received_at=loop.time(),
            date_created=now,
            num_segments=segments(body),
            status="queued",
            date_updated=now,
            validity_period=int(validity) if validity is not None else None,
            direction=direction,
        )
        self._index[message.sid] = len(self.messages)
        self.messages.append(message)
        self._sequence[message.sid] = len(self._sequence)
        log.info(
            "twilio_double.message_created",
            sid=message.sid,
            to=mask_phone(message.to),
            segments=message.num_segments,
        )
        for entry in list(self._waiters):
            wanted, waiter = entry
            if len(self.messages) >= wanted and not waiter.done():
                waiter.set_result(None)
        task = asyncio.get_running_loop().create_task(
            self._progress(message.sid), name=f"twilio_double.progress.{message.sid}"
        )
        # Owned here and cancelled by stop(); the set keeps the task referenced.
        self._progressions.add(task)
        task.add_done_callback(self._progressions.discard)
        return message

    def _message_json(self, message: SentMessage) -> dict[str, Any]:
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{message.sid}"
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": message.body,
            "date_created": rfc2822(message.date_created),
            "date_sent": rfc2822(message.date_sent),
            "date_updated": rfc2822(message.date_updated),
            "direction": message.direction,
            "error_code": message.error_code,
            "error_message": None,
            "from": message.from_,
            "messaging_service_sid": message.messaging_service_sid,
            "num_media": "0",
            "num_segments": str(message.num_segments),
            "price": None,
            "price_unit": "USD",
            "sid": message.sid,
            "status": message.status,
            "subresource_uris": {
                "media": f"{uri}/Media.json",
                "feedback": f"{uri}/Feedback.json",
            },
            "to": message.to,
            "uri": f"{uri}.json",
        }

    async def _fetch(self, request: web.Request) -> web.StreamResponse:
        if (wrong := self._wrong_account(request)) is not None:
            return wrong
        try:
            message: SentMessage | None = self.message(request.match_info["message_sid"])
        except KeyError:
            message = None
        if message is None:
            return error_response(20404, 404, path=request.path)
        return web.json_response(self._message_json(message))

    async def _list(self, request: web.Request) -> web.StreamResponse:
        if (wrong := self._wrong_account(request)) is not None:
            return wrong
        query = request.query
        try:
            page, page_size = parse_paging(query)
            bounds = moment_bounds(query, "DateSent")
        except ValueError:
            return invalid_query("Invalid paging or DateSent filter")

        def keep(message: SentMessage) -> bool:
            if "To" in query and message.to != query["To"]:
                return False
            if "From" in query and message.from_ != query["From"]:
                return False
            # A message still queued has no date_sent yet; it is matched on its
            # creation time so that a reconciliation right after a lost answer
            # finds it (Twilio does not document its handling of this case).
            when = message.date_sent or message.date_created
            return all(matches_moment(when, bound, relation) for bound, relation in bounds)

        # Newest first, as Twilio lists them; both directions, like Twilio.
        everything = sorted(
            [*self.messages, *self.inbound], key=lambda m: self._sequence[m.sid], reverse=True
        )
        return web.json_response(
            list_page(
                query,
                [m for m in everything if keep(m)],
                self._message_json,
                key="messages",
                path=f"/{API_VERSION}/Accounts/{self.account_sid}/Messages.json",
                page=page,
                page_size=page_size,
            )
        )


# ----------------------------------------------------------------------------- CLI


async def _serve(args: argparse.Namespace) -> None:
    double = TwilioDouble(
        account_sid=args.account_sid,
        auth_token=args.auth_token,
        host=args.host,
        port=args.port,
    )
    async with double:
        print("Twilio TEST DOUBLE (local SMS sink; nothing leaves this machine)", flush=True)
        print(f"  base_url:    {double.base_url}", flush=True)
        print(f"  account_sid: {double.account_sid}", flush=True)
        print(f"  auth_token:  {double.auth_token}", flush=True)
        print("  from number: any E.164 number, e.g. +15005550006", flush=True)
        print("Ctrl-C to stop.", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    """Command line entry: serve the double until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway.sandbox.twilio_double",
        description="Local Twilio Messages API test double (never a production path).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--account-sid", default=DEFAULT_ACCOUNT_SID)
    parser.add_argument(
        "--auth-token", default=None, help="default: a random token printed at start"
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
