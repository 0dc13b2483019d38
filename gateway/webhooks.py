"""Inbound Twilio traffic: staff replies to alarm SMS, and the delivery status of ours.

Theory of operation
-------------------
A staff member who receives an alarm SMS answers it, e.g. ``K7QM-3XRD 1`` or
just ``收到``, and Twilio reports every status change of every message we send.
Both reach the gateway one of two ways:

* **Webhooks** (:class:`TwilioWebhooks`). Twilio POSTs a form to
  ``<public_url>/twilio/inbound`` (a message came in) and
  ``<public_url>/twilio/status`` (the ``StatusCallback`` of our messages). The
  routes are mounted on the gateway's control server. Every request must carry
  a valid ``X-Twilio-Signature`` (an HMAC of the public URL and the form, keyed
  with the auth token): a public URL can be reached by anybody, and an unsigned
  "1" must never acknowledge an alarm. A forged request is refused with 403
  before any callback runs. The answer to an inbound message is TwiML; Twilio
  sends its ``<Message>`` back to the sender.
* **Polling**, for a center behind NAT that Twilio cannot reach:
  :class:`InboundPoller` reads the Messages list every few seconds for inbound
  messages to our numbers (de-duplicated by SID, oldest first, each API call
  under its own timeout, backing off on errors), and :class:`StatusPoller`
  fetches the messages whose final status is still unknown.

Replies are parsed by :func:`parse_reply` (pure, never raises) into an alarm
reference, if the text holds one, and an intent. What a reply *means* (which
alarm, whether this sender may take it) is the ``on_reply`` callback's
decision, not this module's: a reference found here is only syntactically
valid.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape

import aiohttp
import structlog
from aiohttp import web
from multidict import MultiDict
from twilio.base.exceptions import TwilioException
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from devices.backoff import Backoff
from gateway.redact import mask_phone

__all__ = [
    "INBOUND_PATH",
    "MAX_REPLY_CHARS",
    "MAX_WEBHOOK_BODY",
    "STATUS_PATH",
    "InboundPoller",
    "InboundReply",
    "Intent",
    "ReplyHandler",
    "StatusHandler",
    "StatusPoller",
    "StatusUpdate",
    "TwilioWebhooks",
    "parse_reply",
    "twiml_response",
]

log = structlog.get_logger(__name__)

Intent = Literal["ack", "decline", "unknown"]

#: Route of Twilio's "a message comes in" webhook, below the public URL.
INBOUND_PATH: Final = "/twilio/inbound"
#: Route of the ``StatusCallback`` of our outgoing messages, below the public URL.
STATUS_PATH: Final = "/twilio/status"
#: Largest webhook body accepted. A 1,600-character Chinese reply is about 15 KB
#: once form-encoded; the rest is headroom, not an invitation.
MAX_WEBHOOK_BODY: Final = 64 * 1024
#: Twilio refuses longer message bodies (error 21617).
MAX_REPLY_CHARS: Final = 1600

_MAX_FORM_FIELDS: Final = 200
_SIGNATURE_HEADER: Final = "X-Twilio-Signature"
# Present when a Twilio Webhook Rule signs with a SharedKey instead of the
# account auth token: "key=<id>,algorithm=HMAC_SHA256".
_SIGNATURE_SETTINGS_HEADER: Final = "X-Twilio-Webhooks-Signature-Settings"
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
# Characters XML 1.0 cannot carry at all, even escaped.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_TWIML_HEAD: Final = '<?xml version="1.0" encoding="UTF-8"?>'

ReplyHandler = Callable[["InboundReply"], Awaitable[str | None]]
StatusHandler = Callable[["StatusUpdate"], Awaitable[None]]


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True)
class InboundReply:
    """One SMS a person sent to one of our numbers.

    ``from_phone`` is the sender (E.164), ``to_phone`` our number.
    ``alarm_ref`` is the reference found in the text (``"K7QM-3XRD"``), not yet
    checked against the journal. ``received_at`` is wall-clock seconds.
    """

    message_sid: str
    from_phone: str
    to_phone: str
    body: str
    alarm_ref: str | None
    intent: Intent
    received_at: float


@dataclass(frozen=True)
class StatusUpdate:
    """A status of one of our outgoing messages (``queued``, ``sent``,
    ``delivered``, ``undelivered``, ``failed``, ...) and its Twilio error code."""

    message_sid: str
    status: str
    error_code: int | None
    to_phone: str | None


# ----------------------------------------------------------------------------- parsing

# Crockford base32 plus I, L and O, which Crockford reads as 1, 1 and 0; never U.
_REF_CHAR = "[0-9A-TV-Z]"
_REF_START = "(?<![0-9A-Z])"
# A reference may be followed directly by the intent digit: "K7QM-3XRD1".
_REF_END = "(?=[12]?(?![0-9A-Z]))"
_DASHES = "-‐‑‒–—―−_.·・~"
_FLAGS = re.ASCII | re.IGNORECASE
_REF_DASHED = re.compile(
    rf"{_REF_START}({_REF_CHAR}{{4}}) ?[{re.escape(_DASHES)}]{{1,2}} ?({_REF_CHAR}{{4}}){_REF_END}",
    _FLAGS,
)
_REF_GLUED = re.compile(rf"{_REF_START}({_REF_CHAR}{{4}})({_REF_CHAR}{{4}}){_REF_END}", _FLAGS)
_REF_SPACED = re.compile(rf"{_REF_START}({_REF_CHAR}{{4}}) ({_REF_CHAR}{{4}}){_REF_END}", _FLAGS)
_CROCKFORD_READING = str.maketrans("ILO", "110")
_ASCII_DIGIT = re.compile("[0-9]")
_ASCII_LETTER = re.compile("[A-Za-z]")

_ACK_WORDS: Final = frozenset({"1", "ok", "okay", "yes", "y", "sure"})
_DECLINE_WORDS: Final = frozenset({"2", "no", "n", "nope", "busy"})
# English phrases are folded into one of the words above before splitting.
_DECLINE_PHRASES = re.compile(r"\b(?:can ?not|can[’']t|unable|not available)\b")
_ACK_PHRASES = re.compile(r"\b(?:no problem|on my way|omw)\b")
_FILLERS: Final = ("回复", "编号", "单号")
_DECLINE_PREFIXES: Final = ("不",)
# Checked before the acknowledgements: "我去不了" holds "我去" but declines.
_DECLINE_INFIXES: Final = (
    "不了", "不行", "不能", "不去", "不到", "不方便", "没空", "没时间", "没法", "没办法",
)  # fmt: skip
_ACK_INFIXES: Final = ("收到", "好的", "我去", "接单", "确认", "马上", "没问题", "在路上", "出发")
# One-character answers count only alone or repeated ("好", "嗯嗯"), with
# trailing particles ("好吧", "到了"): "到时候再说" is not an acknowledgement.
_ACK_SINGLE: Final = frozenset("好到接行嗯👍👌✅🆗🙆")
_DECLINE_SINGLE: Final = frozenset("不❌🙅")
_PARTICLES: Final = "了的啦吧啊呀嘞哒滴哈"
_ASCII_WORD = re.compile("[a-z0-9]+")


def _normalise(text: str) -> str:
    # NFKC folds full-width letters, digits and punctuation ("ＫＱ７Ｍ－１") and
    # circled digits to ASCII; whitespace of any script becomes one space.
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text))


def _plausible(raw: str, *, need_digit: bool) -> bool:
    # An all-digit group is a phone number or a date, not a random reference;
    # without a dash, a digit also rules out two English words ("GOOD NEWS").
    if _ASCII_LETTER.search(raw) is None:
        return False
    return not need_digit or _ASCII_DIGIT.search(raw) is not None


def _find_ref(text: str) -> tuple[str | None, str]:
    """The first alarm reference in ``text`` and the text without it."""
    for pattern, need_digit in ((_REF_DASHED, False), (_REF_GLUED, True), (_REF_SPACED, True)):
        for match in pattern.finditer(text):
            first, second = match.group(1), match.group(2)
            if _plausible(first + second, need_digit=need_digit):
                ref = f"{first}-{second}".upper().translate(_CROCKFORD_READING)
                return ref, f"{text[: match.start()]} {text[match.end() :]}"
    return None, text


def _is_separator(char: str) -> bool:
    category = unicodedata.category(char)
    return category[0] in "PZC" or category in ("Sm", "Sk", "Sc")


def _clauses(text: str) -> list[str]:
    clauses: list[str] = []
    current: list[str] = []
    for char in text:
        if unicodedata.category(char) in ("Mn", "Me"):
            continue  # emoji variation selectors, combining marks
        if _is_separator(char):
            if current:
                clauses.append("".join(current))
                current = []
        else:
            current.append(char)
    if current:
        clauses.append("".join(current))
    return clauses


def _clause_intent(clause: str) -> Intent | None:
    for filler in _FILLERS:
        clause = clause.removeprefix(filler)
    if not clause:
        return None
    head = _ASCII_WORD.match(clause)
    if head is not None:
        if head.group() in _ACK_WORDS:
            return "ack"
        if head.group() in _DECLINE_WORDS:
            return "decline"
    if clause.startswith(_DECLINE_PREFIXES) or any(w in clause for w in _DECLINE_INFIXES):
        return "decline"
    if any(word in clause for word in _ACK_INFIXES):
        return "ack"
    if head is not None:
        return None  # "10分钟" is a number of minutes, not an answer
    core = clause.rstrip(_PARTICLES)
    if core and all(char in _ACK_SINGLE for char in core):
        return "ack"
    if core and all(char in _DECLINE_SINGLE for char in core):
        return "decline"
    return None


def _intent(text: str) -> Intent:
    folded = _DECLINE_PHRASES.sub(" no ", text.casefold())
    folded = _ACK_PHRASES.sub(" ok ", folded)
    # The first clause that says something decides: "王强，收到" acknowledges,
    # "收到，不过要二十分钟" too.
    for clause in _clauses(folded):
        intent = _clause_intent(clause)
        if intent is not None:
            return intent
    return "unknown"


def parse_reply(body: str) -> tuple[str | None, Intent]:
    """The alarm reference and the intent of an SMS reply; never raises.

    The reference is four and four Crockford base32 characters, found
    case-insensitively in full- or half-width text, with a dash (or a dash-like
    character), nothing, or a space between the halves; I and L read as 1 and O
    as 0. It is returned as ``"K7QM-3XRD"``, or ``None``. Digits alone
    (``0531-8888``) read as a phone number or a date, not a reference, and
    without a dash the halves must mix letters and digits, so that two English
    words ("GOOD NEWS") are not taken for one; the first reference wins.

    The intent is ``"ack"`` ("1", "ok", "yes", "y", "好", "好的", "收到", "到",
    "我去", "接", "接单", "确认", ...), ``"decline"`` ("2", "no", "n", "不",
    "不行", "去不了", "没空", ...) or ``"unknown"``.
    """
    text = _normalise(body)
    ref, rest = _find_ref(text)
    return ref, _intent(rest)


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


def _reply(event: str, sid: str, sender: str, to: str, body: str, at: float) -> InboundReply:
    """Parse and log one inbound message, however it reached us (webhook or polling)."""
    ref, intent = parse_reply(body)
    log.info(event, sid=sid, sender=mask_phone(sender), alarm_ref=ref, intent=intent,
             chars=len(body))
    return InboundReply(sid, sender, to, body, ref, intent, at)


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
        self._clock = clock
        self._max_body = max_body

    @property
    def inbound_url(self) -> str:
        """The URL to configure as the number's "a message comes in" webhook."""
        return self._public_url + INBOUND_PATH

    @property
    def status_url(self) -> str:
        """The URL to give Twilio as ``StatusCallback`` of outgoing messages."""
        return self._public_url + STATUS_PATH

    def routes(self) -> list[web.RouteDef]:
        """The two POST routes, for ``ControlServer(extra_routes=...)``."""
        return [web.post(INBOUND_PATH, self._inbound), web.post(STATUS_PATH, self._status)]

    # -- request checks ---------------------------------------------------------------

    def _reject(self, request: web.Request, status: int, reason: str) -> web.HTTPException:
        log.warning("webhook.rejected", path=request.path, status=status, reason=reason)
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
            # A configuration error, not a forgery: Twilio signs with a key we lack.
            log.error("webhook.shared_key_missing", path=path)
            raise web.HTTPInternalServerError(text="no SharedKey secret configured")
        else:
            algorithm = _signature_algorithm(settings)
            valid = bool(signature) and bool(
                self._shared_validator.validate(url, form, signature, algorithm)
            )
        if not valid:
            log.warning(
                "webhook.forged",
                path=path,
                remote=request.remote,
                has_signature=bool(signature),
                fields=len(form),
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
        if not _E164.fullmatch(sender):
            # A short code or an alphanumeric sender (a carrier notice) is nobody
            # who can take an alarm; Twilio gets an empty answer.
            log.warning("webhook.inbound_sender_not_e164", sid=sid, sender=mask_phone(sender))
            return _twiml(None)
        body = form.get("Body", "")
        reply = _reply("webhook.inbound", sid, sender, to, body, self._clock())
        ref = reply.alarm_ref
        try:
            answer = await self._on_reply(reply)
        except Exception:
            log.exception("webhook.reply_handler_failed", sid=sid, alarm_ref=ref)
            raise web.HTTPInternalServerError(text="reply handler failed") from None
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
        try:
            await self._on_status(update)
        except Exception:
            log.exception("webhook.status_handler_failed", sid=sid, status=status)
            raise web.HTTPInternalServerError(text="status handler failed") from None
        return web.Response(status=204)


def _twiml(message: str | None) -> web.Response:
    return web.Response(text=twiml_response(message), content_type="text/xml", charset="utf-8")


# ----------------------------------------------------------------------------- polling

# What a Twilio API call can fail with: error answers, transport errors, our
# own timeout, unparsable answers (json.JSONDecodeError is a ValueError).
_API_ERRORS: Final = (TwilioException, aiohttp.ClientError, TimeoutError, OSError, ValueError)
_MAX_PAGES: Final = 50
_PAGE_SIZE: Final = 100


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class InboundPoller:
    """Reads inbound messages to ``our_numbers`` from Twilio's REST API, for a
    center that cannot receive webhooks.

    ``client`` is an async-capable twilio-python ``Client`` (e.g.
    ``TwilioSender.client``). Each poll lists the messages sent to each of our
    numbers since the watermark :attr:`since` (less ``overlap_s``, for Twilio's
    indexing delay), skips the SIDs in :attr:`seen`, and calls ``on_reply`` for
    each new one, oldest first. The text ``on_reply`` returns is texted back to
    the sender from the number it wrote to (as TwiML does for webhooks) unless
    ``send_replies`` is false. Nothing is persisted here: the daemon may save
    :attr:`since` and :attr:`seen` and pass them back after a restart. Without
    them, polling starts at ``clock()`` less ``overlap_s``: older messages are
    not replayed, and a local clock ahead of Twilio's by more than ``overlap_s``
    would skip the replies of that first moment, so a restarted daemon should
    pass ``since`` (e.g. when it texted the oldest open alarm). The watermark
    then only moves with Twilio's own timestamps, never with the local clock.

    A failing ``on_reply`` is retried on the next polls, up to
    ``max_handler_attempts`` calls, then the message is given up (logged).
    """

    def __init__(
        self,
        client: Client,
        *,
        our_numbers: Sequence[str],
        on_reply: ReplyHandler,
        interval_s: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        since: datetime | None = None,
        seen: Iterable[str] = (),
        request_timeout_s: float = 10.0,
        overlap_s: float = 120.0,
        max_backoff_s: float = 60.0,
        send_replies: bool = True,
        max_handler_attempts: int = 3,
        rng: random.Random | None = None,
    ) -> None:
        if not our_numbers:
            raise ValueError("our_numbers is empty")
        if interval_s <= 0 or request_timeout_s <= 0 or overlap_s < 0:
            raise ValueError("need interval_s > 0, request_timeout_s > 0, overlap_s >= 0")
        if max_handler_attempts < 1:
            raise ValueError("max_handler_attempts must be >= 1")
        if since is not None and since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        self._client = client
        self._numbers = tuple(dict.fromkeys(our_numbers))
        self._on_reply = on_reply
        self._interval = interval_s
        self._sleep = sleep
        self._clock = clock
        self._timeout = request_timeout_s
        self._overlap = timedelta(seconds=overlap_s)
        self._send_replies = send_replies
        self._max_attempts = max_handler_attempts
        self._backoff = Backoff(interval_s, max(max_backoff_s, interval_s), rng)
        self._since = (
            since.astimezone(UTC) if since is not None else datetime.fromtimestamp(clock(), UTC)
        )
        # SID -> Twilio's date of the message; None for SIDs restored by the
        # caller, until a listing shows them (or shows they are too old).
        self._seen: dict[str, datetime | None] = dict.fromkeys(seen)
        self._failures: dict[str, int] = {}

    @property
    def since(self) -> datetime:
        """The watermark (UTC): the newest Twilio date of a message listed so far."""
        return self._since

    @property
    def seen(self) -> frozenset[str]:
        """SIDs already handled that a coming poll could still list."""
        return frozenset(self._seen)

    async def run(self) -> None:
        """Poll until cancelled. API errors are logged and backed off (capped,
        jittered); nothing but cancellation ends the loop."""
        log.info("inbound_poll.started", numbers=len(self._numbers), interval_s=self._interval)
        while True:
            try:
                await self.poll_once()
            except _API_ERRORS as exc:
                delay = self._backoff.next_delay()
                log.warning(
                    "inbound_poll.failed",
                    error=_describe(exc),
                    failures=self._backoff.failures,
                    retry_in_s=round(delay, 3),
                )
            else:
                self._backoff.reset()
                delay = self._interval
            await self._sleep(delay)

    async def poll_once(self) -> list[InboundReply]:
        """One poll of every number; the replies handed to ``on_reply``.

        Raises the API's error (``TwilioException``, ``aiohttp.ClientError``,
        ``TimeoutError``, ...) when a listing fails; the watermark then stays.
        """
        floor = self._since - self._overlap
        records: list[Any] = []
        for number in self._numbers:
            # Twilio lists newest first; reversed, messages of the same second
            # stay in the order they arrived.
            records.extend(reversed(await self._list(number, floor)))
        newest = self._since
        fresh: list[tuple[datetime, str, Any]] = []
        for record in records:
            when = record.date_sent or record.date_created
            sid = record.sid
            if not sid or when is None or record.direction != "inbound" or when < floor:
                continue
            newest = max(newest, when)
            if sid in self._seen:
                self._seen[sid] = when
            else:
                fresh.append((when, str(sid), record))
        handled: list[InboundReply] = []
        # Stable: equal dates keep the arrival order established above.
        for when, sid, record in sorted(fresh, key=lambda item: item[0]):
            reply = await self._handle(sid, when, record)
            if reply is not None:
                handled.append(reply)
        self._since = newest
        self._prune()
        return handled

    async def _list(self, number: str, floor: datetime) -> list[Any]:
        async with asyncio.timeout(self._timeout):
            page = await self._client.messages.page_async(
                to=number, date_sent_after=floor, page_size=_PAGE_SIZE
            )
        records: list[Any] = []
        pages = 1
        while page is not None:
            records.extend(page)
            if pages >= _MAX_PAGES:
                log.warning("inbound_poll.truncated", to=mask_phone(number), pages=pages)
                break
            async with asyncio.timeout(self._timeout):
                page = await page.next_page_async()
            pages += 1
        return records

    def _prune(self) -> None:
        floor = self._since - self._overlap
        # Listings never return anything older than the floor again, and a
        # restored SID absent from a complete listing is outside its window.
        self._seen = {sid: when for sid, when in self._seen.items() if when and when >= floor}
        self._failures = {sid: n for sid, n in self._failures.items() if sid not in self._seen}

    async def _handle(self, sid: str, when: datetime, record: Any) -> InboundReply | None:
        sender = str(record.from_ or "")
        to = str(record.to or "")
        if not _E164.fullmatch(sender) or not to:
            log.warning("inbound_poll.sender_not_e164", sid=sid, sender=mask_phone(sender))
            self._seen[sid] = when
            return None
        body = str(record.body or "")
        reply = _reply("inbound_poll.reply", sid, sender, to, body, when.timestamp())
        try:
            answer = await self._on_reply(reply)
        # The callback is the daemon's code: whatever it raises must not stop
        # the intake of the replies behind this one.
        except Exception:
            attempts = self._failures.get(sid, 0) + 1
            self._failures[sid] = attempts
            if attempts < self._max_attempts:
                log.exception("inbound_poll.handler_failed", sid=sid, attempt=attempts)
                return None
            log.exception("inbound_poll.handler_gave_up", sid=sid, attempts=attempts)
            self._seen[sid] = when
            return None
        self._seen[sid] = when
        self._failures.pop(sid, None)
        if answer and self._send_replies:
            await self._send_answer(reply, answer)
        return reply

    async def _send_answer(self, reply: InboundReply, answer: str) -> None:
        # One attempt only: this is a courtesy confirmation, and a retry after
        # a lost answer could text the sender twice.
        try:
            async with asyncio.timeout(self._timeout):
                message = await self._client.messages.create_async(
                    to=reply.from_phone, from_=reply.to_phone, body=answer[:MAX_REPLY_CHARS]
                )
        except _API_ERRORS as exc:
            log.warning("inbound_poll.answer_failed", sid=reply.message_sid, error=_describe(exc))
            return
        log.info("inbound_poll.answered", sid=reply.message_sid, answer_sid=str(message.sid))


class StatusPoller:
    """Fetches the current status of our messages, for a center that no status
    callback can reach. ``client`` is an async-capable twilio-python ``Client``."""

    def __init__(
        self, client: Client, *, request_timeout_s: float = 10.0, concurrency: int = 4
    ) -> None:
        if request_timeout_s <= 0 or concurrency < 1:
            raise ValueError("need request_timeout_s > 0 and concurrency >= 1")
        self._client = client
        self._timeout = request_timeout_s
        self._concurrency = concurrency

    async def poll_once(self, sids: Iterable[str]) -> list[StatusUpdate]:
        """The current status of each message in ``sids`` (in that order, each
        once). A message that cannot be fetched now (API error, timeout, unknown
        SID) is logged and left out; ask again on the next round."""
        unique = list(dict.fromkeys(sids))
        semaphore = asyncio.Semaphore(self._concurrency)

        async def fetch(sid: str) -> StatusUpdate | None:
            try:
                async with semaphore, asyncio.timeout(self._timeout):
                    message = await self._client.messages(sid).fetch_async()
            except _API_ERRORS as exc:
                log.warning("status_poll.fetch_failed", sid=sid, error=_describe(exc))
                return None
            error_code = message.error_code
            to = message.to
            return StatusUpdate(
                str(message.sid or sid),
                str(message.status),
                int(error_code) if error_code is not None else None,
                str(to) if to else None,
            )

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(fetch(sid), name=f"status_poll.{sid}") for sid in unique]
        updates = [update for task in tasks if (update := task.result()) is not None]
        log.info("status_poll.done", asked=len(unique), answered=len(updates))
        return updates
