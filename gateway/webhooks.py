"""Twilio's webhooks: staff replies to alarm SMS, and the delivery status of ours.

Twilio POSTs a form to ``<public_url>/twilio/inbound`` (a message came in) and
``<public_url>/twilio/status`` (the ``StatusCallback`` of our messages). The
routes of :class:`TwilioWebhooks` are served by :class:`WebhookServer`, a
listener of their own (``[webhooks]``) with nothing else on it: the reverse
proxy behind ``sms.public_url`` forwards to it, and the control API stays out of
reach of the public URL. Every request must carry a valid
``X-Twilio-Signature`` (an HMAC of the public URL and the form, keyed with the
auth token): a public URL can be reached by anybody, and an unsigned "1" must
never acknowledge an alarm. A forged request is refused with 403 before any
callback runs; such refusals, which anybody can provoke, are logged at most
once a minute per reason. The answer to an inbound message is TwiML; Twilio
sends its ``<Message>`` back to the sender.

A center behind NAT, which Twilio cannot reach, polls instead
(:mod:`gateway.twilio_poll`). Either way replies are parsed by
:func:`gateway.replies.parse_reply`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape

import structlog
from aiohttp import web
from multidict import MultiDict
from twilio.request_validator import RequestValidator

from gateway.config import WebhooksSection
from gateway.ratelimit import LogLimiter
from gateway.redact import mask_phone
from gateway.replies import (
    MAX_REPLY_CHARS,
    InboundReply,
    ReplyHandler,
    StatusHandler,
    StatusUpdate,
    is_e164,
)
from gateway.voice import (
    CallDigits,
    CallStatusHandler,
    CallUpdate,
    DigitHandler,
    digit_twiml,
)

__all__ = [
    "INBOUND_PATH",
    "MAX_WEBHOOK_BODY",
    "STATUS_PATH",
    "VOICE_GATHER_PATH",
    "VOICE_STATUS_PATH",
    "TwilioWebhooks",
    "WebhookServer",
    "twiml_response",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: Route of Twilio's "a message comes in" webhook, below the public URL.
INBOUND_PATH: Final = "/twilio/inbound"
#: Route of the ``StatusCallback`` of our outgoing messages, below the public URL.
STATUS_PATH: Final = "/twilio/status"
#: Route of the digit a callee pressed (the ``<Gather>`` action of our calls).
VOICE_GATHER_PATH: Final = "/twilio/voice/gather"
#: Route of the call progress events of our calls.
VOICE_STATUS_PATH: Final = "/twilio/voice/status"
#: Largest webhook body accepted. A 1,600-character Chinese reply is about 15 KB
#: once form-encoded; the rest is headroom, not an invitation.
MAX_WEBHOOK_BODY: Final = 64 * 1024

_MAX_FORM_FIELDS: Final = 200
_SIGNATURE_HEADER: Final = "X-Twilio-Signature"
# Present when a Twilio Webhook Rule signs with a SharedKey instead of the
# account auth token: "key=<id>,algorithm=HMAC_SHA256".
_SIGNATURE_SETTINGS_HEADER: Final = "X-Twilio-Webhooks-Signature-Settings"
# Characters XML 1.0 cannot carry at all, even escaped.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_TWIML_HEAD: Final = '<?xml version="1.0" encoding="UTF-8"?>'


def twiml_response(message: str | None) -> str:
    """A TwiML document answering an inbound message, with ``message`` (escaped,
    cut to :data:`MAX_REPLY_CHARS`) as the reply, or no reply when it is empty."""
    if not message:
        return f"{_TWIML_HEAD}<Response></Response>"
    text = _XML_INVALID.sub("", message)[:MAX_REPLY_CHARS]
    return f"{_TWIML_HEAD}<Response><Message>{escape(text)}</Message></Response>"


def _error_code(text: str | None) -> int | None:
    if text is None:
        return None
    stripped = text.strip()
    return int(stripped) if stripped.isascii() and stripped.isdigit() else None


def _signature_algorithm(settings: str) -> str:
    # Same reading as twilio-python's helper: no algorithm named means HMAC_SHA1.
    for part in settings.split(","):
        name, separator, value = part.partition("=")
        if separator and name.strip() == "algorithm" and value.strip():
            return value.strip()
    return "HMAC_SHA1"


# ----------------------------------------------------------------------------- webhooks


class TwilioWebhooks:
    """The ``/twilio/inbound`` and ``/twilio/status`` webhook endpoints.

    ``public_url`` is the address Twilio is configured with, up to and
    excluding these paths (``https://gw.example.org``, or with a prefix a
    reverse proxy strips): the signature covers the URL Twilio requested, not
    the one this server sees. ``auth_token`` is the account's auth token; a
    request signed through a Twilio Webhook Rule with a SharedKey needs
    ``shared_key_secret``. ``on_reply`` gets every authentic inbound message
    and returns the text to send back (or ``None``); ``on_status`` gets every
    status callback. An exception from either is logged and answered 500,
    which Twilio records as a failed webhook (error 11200).
    """

    def __init__(
        self,
        *,
        auth_token: str,
        public_url: str,
        on_reply: ReplyHandler,
        on_status: StatusHandler,
        clock: Callable[[], float] = time.time,
        shared_key_secret: str | None = None,
        max_body: int = MAX_WEBHOOK_BODY,
        on_digit: DigitHandler | None = None,
        on_call_status: CallStatusHandler | None = None,
        voice_language: str = "cmn-CN",
        voice: str | None = None,
    ) -> None:
        if not auth_token:
            raise ValueError("auth_token is empty")
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"public_url must be an absolute http(s) URL, got {public_url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"public_url must not have a query or fragment: {public_url!r}")
        if max_body < 1:
            raise ValueError("max_body must be >= 1")
        self._public_url = public_url.rstrip("/")
        self._validator = RequestValidator(auth_token)
        self._shared_validator = RequestValidator(shared_key_secret) if shared_key_secret else None
        self._on_reply = on_reply
        self._on_status = on_status
        self._on_digit = on_digit
        self._on_call_status = on_call_status
        self._voice = (voice_language, voice)
        self._clock = clock
        self._max_body = max_body
        self._refusals = LogLimiter(60.0)

    @property
    def max_body(self) -> int:
        """Largest body accepted, in bytes."""
        return self._max_body

    @property
    def inbound_url(self) -> str:
        """The URL to configure as the number's "a message comes in" webhook."""
        return self._public_url + INBOUND_PATH

    @property
    def status_url(self) -> str:
        """The URL to give Twilio as ``StatusCallback`` of outgoing messages."""
        return self._public_url + STATUS_PATH

    def routes(self) -> list[web.RouteDef]:
        """The POST routes, for :class:`WebhookServer` (or a test's application): SMS
        always, the voice routes when their handlers are given."""
        routes = [web.post(INBOUND_PATH, self._inbound), web.post(STATUS_PATH, self._status)]
        if self._on_digit is not None:
            routes.append(web.post(VOICE_GATHER_PATH, self._gather))
        if self._on_call_status is not None:
            routes.append(web.post(VOICE_STATUS_PATH, self._call_status))
        return routes

    # -- request checks ---------------------------------------------------------------

    def _reject(self, request: web.Request, status: int, reason: str) -> web.HTTPException:
        suppressed = self._refusals.allow(f"rejected:{status}:{reason}")
        if suppressed is not None:
            log.warning("webhook.rejected", path=request.path, status=status, reason=reason,
                        suppressed=suppressed)
        if status == 413:
            return web.HTTPRequestEntityTooLarge(
                max_size=self._max_body, actual_size=request.content_length or 0, text=reason
            )
        return web.HTTPBadRequest(text=reason)

    async def _read_form(self, request: web.Request) -> MultiDict[str]:
        length = request.content_length
        if length is not None and length > self._max_body:
            raise self._reject(request, 413, f"body over {self._max_body} bytes")
        if request.content_type != "application/x-www-form-urlencoded":
            raise self._reject(request, 400, "expected an application/x-www-form-urlencoded body")
        # Read by hand rather than request.post(): the limit is this endpoint's,
        # whatever client_max_size the hosting application has.
        raw = bytearray()
        while chunk := await request.content.readany():
            raw += chunk
            if len(raw) > self._max_body:
                raise self._reject(request, 413, f"body over {self._max_body} bytes")
        try:
            text = raw.decode(request.charset or "utf-8")
            pairs = parse_qsl(
                text,
                keep_blank_values=True,
                encoding="utf-8",
                errors="strict",
                max_num_fields=_MAX_FORM_FIELDS,
            )
        # LookupError: an unknown charset; UnicodeDecodeError is a ValueError.
        except (LookupError, ValueError) as exc:
            raise self._reject(request, 400, f"unreadable form: {exc}") from None
        return MultiDict(pairs)

    def _verify(self, request: web.Request, path: str, form: MultiDict[str]) -> None:
        query = request.rel_url.raw_query_string
        url = f"{self._public_url}{path}?{query}" if query else f"{self._public_url}{path}"
        signature = request.headers.get(_SIGNATURE_HEADER, "")
        settings = request.headers.get(_SIGNATURE_SETTINGS_HEADER)
        if settings is None:
            valid = bool(signature) and bool(self._validator.validate(url, form, signature))
        elif self._shared_validator is None:
            # Twilio signing with a SharedKey we lack, or anybody sending the header:
            # either way nothing here can check the request. Refused like a forgery
            # (not a 500, which would read as our failure), logged once a minute.
            suppressed = self._refusals.allow("shared_key_missing")
            if suppressed is not None:
                log.error("webhook.shared_key_missing", path=path, remote=request.remote,
                          suppressed=suppressed,
                          action="refused; configure the SharedKey secret if this is Twilio")
            raise web.HTTPForbidden(text="signed with a SharedKey this gateway does not have")
        else:
            algorithm = _signature_algorithm(settings)
            valid = bool(signature) and bool(
                self._shared_validator.validate(url, form, signature, algorithm)
            )
        if not valid:
            suppressed = self._refusals.allow("forged")
            if suppressed is not None:
                log.warning(
                    "webhook.forged",
                    path=path,
                    remote=request.remote,
                    has_signature=bool(signature),
                    fields=len(form),
                    suppressed=suppressed,
                )
            raise web.HTTPForbidden(text="invalid X-Twilio-Signature")

    async def _verified_form(self, request: web.Request, path: str) -> MultiDict[str]:
        form = await self._read_form(request)
        self._verify(request, path, form)
        return form

    # -- handlers -----------------------------------------------------------------------

    async def _inbound(self, request: web.Request) -> web.Response:
        form = await self._verified_form(request, INBOUND_PATH)
        sid = form.get("MessageSid") or form.get("SmsMessageSid") or form.get("SmsSid")
        sender = form.get("From", "").strip()
        to = form.get("To", "").strip()
        if not sid or not sender or not to:
            raise self._reject(request, 400, "MessageSid, From and To are required")
        if not is_e164(sender):
            # A short code or an alphanumeric sender (a carrier notice) is nobody
            # who can take an alarm; Twilio gets an empty answer.
            log.warning("webhook.inbound_sender_not_e164", sid=sid, sender=mask_phone(sender))
            return _twiml(None)
        reply = InboundReply.read(sid, sender, to, form.get("Body", ""), self._clock())
        log.info("webhook.inbound", sid=sid, sender=mask_phone(sender),
                 alarm_ref=reply.alarm_ref, intent=reply.intent, chars=len(reply.body))
        ref = reply.alarm_ref
        answer = await _handled("reply", self._on_reply(reply), sid=sid, alarm_ref=ref)
        return _twiml(answer)

    async def _status(self, request: web.Request) -> web.Response:
        form = await self._verified_form(request, STATUS_PATH)
        sid = form.get("MessageSid") or form.get("SmsSid")
        status = form.get("MessageStatus") or form.get("SmsStatus")
        if not sid or not status:
            raise self._reject(request, 400, "MessageSid and MessageStatus are required")
        to = form.get("To") or None
        update = StatusUpdate(sid, status, _error_code(form.get("ErrorCode")), to)
        log.info(
            "webhook.status",
            sid=sid,
            status=status,
            error_code=update.error_code,
            to=mask_phone(to) if to else None,
        )
        await _handled("status", self._on_status(update), sid=sid, status=status)
        return web.Response(status=204)


    async def _gather(self, request: web.Request) -> web.Response:
        assert self._on_digit is not None
        form = await self._verified_form(request, VOICE_GATHER_PATH)
        sid, to = form.get("CallSid", ""), form.get("To", "").strip()
        if not sid or not to:
            raise self._reject(request, 400, "CallSid and To are required")
        digits = CallDigits(sid, form.get("Digits", "").strip(), to,
                            form.get("AnsweredBy") or None)
        log.info("webhook.call_digits", sid=sid, to=mask_phone(to), digits=digits.digits)
        answer = await _handled("digit", self._on_digit(digits), sid=sid)
        language, voice = self._voice
        return web.Response(text=digit_twiml(answer, language=language, voice=voice),
                            content_type="application/xml")

    async def _call_status(self, request: web.Request) -> web.Response:
        assert self._on_call_status is not None
        form = await self._verified_form(request, VOICE_STATUS_PATH)
        sid, status, to = form.get("CallSid", ""), form.get("CallStatus", ""), form.get("To", "")
        if not sid or not status:
            raise self._reject(request, 400, "CallSid and CallStatus are required")
        duration = form.get("CallDuration") or form.get("Duration")
        sequence = form.get("SequenceNumber")
        update = CallUpdate(sid, status, to.strip(), form.get("AnsweredBy") or None,
                            int(duration) if duration and duration.isdigit() else None,
                            int(sequence) if sequence and sequence.isdigit() else None)
        log.info("webhook.call_status", sid=sid, status=status,
                 to=mask_phone(update.to) if update.to else None,
                 answered_by=update.answered_by)
        await _handled("call_status", self._on_call_status(update), sid=sid, status=status)
        return web.Response(status=204)


class WebhookServer:
    """The listener of Twilio's webhooks: ``/twilio/*`` and nothing else.

    Served apart from the control API so that the public reverse proxy can
    forward everything it gets to this port without exposing a single control
    route (anything else answers 404). ``settings`` is the validated
    ``[webhooks]`` section; ``url`` is where this machine reaches it.
    """

    def __init__(self, webhooks: TwilioWebhooks, settings: WebhooksSection) -> None:
        self._webhooks = webhooks
        self._settings = settings
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> WebhookServer:
        # The webhooks read their bodies themselves, up to their own limit.
        app = web.Application(client_max_size=self._webhooks.max_body)
        app.add_routes(self._webhooks.routes())
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._settings.host, self._settings.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise WebhookListenError(self._settings.host, self._settings.port, exc) from exc
        server = site._server  # noqa: SLF001 - only way to learn an ephemeral port
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else self._settings.port
        host = self._settings.host
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        log.info("webhooks.listening", url=self.url, inbound=self._webhooks.inbound_url,
                 status=self._webhooks.status_url)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class WebhookListenError(Exception):
    """The webhook listener cannot bind ``host:port``."""

    def __init__(self, host: str, port: int, error: OSError) -> None:
        super().__init__(f"webhooks at {host}:{port}: cannot listen: {error.strerror or error}")
        self.host = host
        self.port = port


async def _handled(what: str, call: Awaitable[T], **context: Any) -> T:
    """Await a webhook's handler; any exception is logged as ``webhook.<what>_handler_failed``
    and answered 500, which Twilio records as a failed webhook (error 11200)."""
    try:
        return await call
    except Exception:
        log.exception(f"webhook.{what}_handler_failed", **context)
        raise web.HTTPInternalServerError(
            text=f"{what.replace('_', ' ')} handler failed") from None


def _twiml(message: str | None) -> web.Response:
    return web.Response(text=twiml_response(message), content_type="text/xml", charset="utf-8")
