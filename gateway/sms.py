"""SMS through Twilio's Messages API, with the gateway's own retry policy.

Theory of operation
-------------------
One call to :meth:`TwilioSender.send` is one logical SMS. It makes up to
``max_attempts`` HTTP requests through the real twilio-python async client and
reports every attempt to the caller (who journals it) before deciding what to
do next:

* **201** -> ``accepted``: done.
* **429 / 20429** -> ``retry``: Twilio documents that a throttled request was
  never processed, so a retry cannot duplicate. ``Retry-After`` is honoured.
* **any other 4xx** (21211 invalid number, 21610 unsubscribed, 21408 region not
  enabled, 20003 bad credentials, ...) -> ``failed``, permanent: retrying cannot
  help, the caller must fall back to another channel or person.
* **5xx, timeout, connection dropped after the request was written** ->
  ``unknown``: the message may exist at Twilio. We retry anyway, because for an
  alarm one duplicate SMS is better than one missing SMS (Twilio has no
  idempotency key for outgoing messages). The caller learns about it from the
  attempt outcome and, after a crash, can reconcile with :meth:`find_sent`
  before resending.
* **connection refused / DNS failure** -> ``retry``: nothing was sent.

The policy is ours alone: the client's ``max_retries`` would retry POSTs on
every 5xx silently, and its ``timeout`` is ignored (twilio-python #925), so each
request runs under ``asyncio.timeout``. Backoff is capped, full-jitter
exponential; the sleep and the random source are injected so tests are fast
and deterministic. A :class:`gateway.sendgate.SendGate` bounds requests in flight (not
sends waiting in backoff, which hold no connection) and the account's message rate
(``[sms] rate_per_s``), and hands free slots out by priority: a new alarm's first wave
before later waves, supervisors and follow-ups.

The sender also owns every other call the gateway makes to the Messages API,
so that they all share its timeout, its gate and its error
classification: one listing with filters and a bounded number of pages
(:meth:`TwilioSender.list_messages`, used by :meth:`~TwilioSender.find_sent`
and by the inbound poller of :mod:`gateway.twilio_poll`), one status fetch
(:meth:`~TwilioSender.fetch_status`) and a one-attempt answer to an inbound
message (:meth:`~TwilioSender.send_reply`).

It is built from the validated ``[sms]`` section (:class:`gateway.config.SmsSection`)
plus the account's secrets (:class:`TwilioAccount`) and the status callback
URL the wiring derives from ``sms.public_url``.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import SimpleNamespace, TracebackType
from typing import Any, Final, Literal, Self, TypeVar

import aiohttp
import structlog
from twilio.auth_strategy.auth_strategy import AuthStrategy
from twilio.auth_strategy.auth_type import AuthType
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.credential.credential_provider import CredentialProvider
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from devices.backoff import full_jitter
from gateway.config import SmsSection
from gateway.redact import mask_phone
from gateway.sendgate import BACKGROUND, FIRST_WAVE, SendGate
from gateway.smstext import segments

__all__ = [
    "Attempt",
    "AttemptOutcome",
    "ListedMessage",
    "Listing",
    "SendResult",
    "SmsSendError",
    "TwilioAccount",
    "TwilioSender",
    "segments",
]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

AttemptOutcome = Literal["accepted", "retry", "failed", "unknown"]

# A server asking for a longer pause than this would starve an alarm; past it
# the caller's escalation (another channel, another person) is the better path.
_RETRY_AFTER_CAP_S: Final = 60.0
_PAGE_SIZE: Final = 100
# Reconciliation reads at most this many pages; a miss only costs a duplicate.
_MAX_RECONCILE_PAGES: Final = 20
_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")

# twilio-python logs query strings (phone numbers) at INFO through this logger;
# raising its level keeps numbers out of the logs whatever the root config is.
_twilio_http_log = logging.getLogger("gateway.sms.twilio_http")
_twilio_http_log.setLevel(logging.WARNING)


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True, repr=False)
class TwilioAccount:
    """The Twilio account's secrets, checked once. ``repr`` masks the auth token."""

    account_sid: str
    auth_token: str

    def __post_init__(self) -> None:
        if not _ACCOUNT_SID.fullmatch(self.account_sid):
            raise ValueError("account_sid must be 'AC' followed by 32 hex digits")
        if not self.auth_token:
            raise ValueError("auth_token is empty")

    def __repr__(self) -> str:
        return f"TwilioAccount(account_sid={self.account_sid!r}, auth_token='***')"


@dataclass(frozen=True)
class SendResult:
    """Twilio accepted the message (it is queued there, not yet delivered)."""

    sid: str
    status: str
    num_segments: int
    attempts: int
    error_code: int | None


@dataclass(frozen=True)
class Attempt:
    """One HTTP request of a send, as reported to ``on_attempt``.

    ``delay_s`` is the pause before the next attempt (``None`` when there is
    none). ``outcome`` ``"unknown"`` means the message may exist at Twilio.
    """

    number: int
    outcome: AttemptOutcome
    status: int | None
    code: int | None
    delay_s: float | None
    error: str | None


@dataclass(frozen=True)
class ListedMessage:
    """One message of a Messages listing, in either direction.

    ``direction`` is Twilio's: ``inbound`` for a message a person sent to one of
    our numbers, ``outbound-api``/``outbound-reply`` for ours. ``when`` is
    Twilio's ``date_sent``, or ``date_created`` while the message has none yet.
    """

    sid: str
    to: str
    from_: str
    body: str
    status: str
    direction: str
    when: datetime | None


@dataclass(frozen=True)
class Listing:
    """The messages of one listing, newest first, and how it went: ``pages``
    requests were made, and ``truncated`` when pages were left unread."""

    messages: tuple[ListedMessage, ...]
    pages: int
    truncated: bool


class SmsSendError(Exception):
    """A send (or a Twilio query) that did not succeed.

    ``permanent``: Twilio refused it and retrying cannot help.
    ``retryable``: transient; the caller may try again later.
    ``outcome_unknown``: some attempt may have created the message at Twilio
    (a timeout or dropped connection after sending, or a 5xx): reconcile with
    :meth:`TwilioSender.find_sent` before resending from scratch.
    ``timed_out``: the last attempt got no answer in time.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        retryable: bool = False,
        permanent: bool = False,
        outcome_unknown: bool = False,
        timed_out: bool = False,
        attempts: tuple[Attempt, ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retryable = retryable
        self.permanent = permanent
        self.outcome_unknown = outcome_unknown
        self.timed_out = timed_out
        self.attempts = attempts

    def __str__(self) -> str:
        flags = [
            name
            for name, on in (
                ("permanent", self.permanent),
                ("retryable", self.retryable),
                ("outcome_unknown", self.outcome_unknown),
                ("timed_out", self.timed_out),
            )
            if on
        ]
        return (
            f"{self.args[0]} (status={self.status}, code={self.code}, "
            f"attempts={len(self.attempts)}, {'/'.join(flags) or 'no flags'})"
        )


# ----------------------------------------------------------------------------- internals


@dataclass
class _ResponseCapture:
    """Headers of the last HTTP answer within one attempt (Retry-After lives there:
    twilio's exceptions do not carry headers)."""

    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


_capture: contextvars.ContextVar[_ResponseCapture | None] = contextvars.ContextVar(
    "gateway_sms_capture", default=None
)


async def _on_request_end(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceRequestEndParams,
) -> None:
    # Trace callbacks run inline in the task that issued the request, so the
    # context variable set by that attempt is the one visible here.
    capture = _capture.get()
    if capture is not None:
        capture.status = params.response.status
        capture.headers = params.response.headers  # case-insensitive, unlike a dict


# twilio ships no type information, so its base classes are Any to mypy.
class _BasicAuthStrategy(AuthStrategy):  # type: ignore[misc]
    def __init__(self, header: str) -> None:
        super().__init__(AuthType.BASIC)
        self._header = header

    def get_auth_string(self) -> str:
        return self._header

    def requires_authentication(self) -> bool:
        return True


class _BasicCredentials(CredentialProvider):  # type: ignore[misc]
    """Sends HTTP Basic auth as a ready header.

    twilio-python otherwise builds ``aiohttp.BasicAuth`` for every request,
    which aiohttp 3.14 deprecates (a DeprecationWarning per request).
    """

    def __init__(self, account_sid: str, auth_token: str) -> None:
        super().__init__(AuthType.BASIC)
        token = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode("ascii")
        self._strategy = _BasicAuthStrategy(f"Basic {token}")

    def to_auth_strategy(self) -> _BasicAuthStrategy:
        return self._strategy


@dataclass(frozen=True)
class _Failure:
    kind: Literal["retry", "unknown", "permanent"]
    status: int | None
    code: int | None
    error: str
    timed_out: bool = False
    retry_after: float | None = None


def _parse_retry_after(value: str | None, now: float) -> float | None:
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = moment.timestamp() - now
    return max(0.0, seconds)


def _twilio_code(code: object, status: int) -> int | None:
    # For a non-JSON error body twilio-python copies the HTTP status into
    # ``code``; Twilio's own error codes have five digits.
    if isinstance(code, int) and code != status:
        return code
    if isinstance(code, str) and code.isdigit() and int(code) != status:
        return int(code)
    return None


def _error_of(exc: TwilioException) -> tuple[int, int | None, str] | None:
    """HTTP status, Twilio code and detail of an error answer, if ``exc`` carries one."""
    if isinstance(exc, TwilioRestException):
        status = int(exc.status)
        return status, _twilio_code(exc.code, status), str(exc.msg)
    if isinstance(exc, TwilioServiceException):
        status = int(exc.status)
        return status, _twilio_code(exc.code, status), str(exc.title)
    # Pages raise a bare TwilioException("Unable to fetch page", response).
    response = exc.args[1] if len(exc.args) > 1 else None
    status_code = getattr(response, "status_code", None)
    if not isinstance(status_code, int):
        return None
    code: object = None
    detail = str(exc.args[0])
    try:
        payload = json.loads(getattr(response, "text", "") or "")
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        code = payload.get("code")
        detail = str(payload.get("message", detail))
    return status_code, _twilio_code(code, status_code), detail


def _classify(exc: BaseException, capture: _ResponseCapture, timeout_s: float, to: str) -> _Failure:
    if isinstance(exc, TimeoutError):
        return _Failure(
            "unknown", None, None, f"TimeoutError: no answer within {timeout_s:g} s", True
        )
    answer = _error_of(exc) if isinstance(exc, TwilioException) else None
    if answer is not None:
        status, code, detail = answer
        if to:
            detail = detail.replace(to, mask_phone(to))
        error = f"HTTP {status} code {code}: {detail}"
        if status == 429 or code == 20429:
            retry_after = _parse_retry_after(capture.headers.get("Retry-After"), time.time())
            return _Failure("retry", status, code, error, retry_after=retry_after)
        if 400 <= status < 500:
            return _Failure("permanent", status, code, error)
        return _Failure("unknown", status, code, error)
    if isinstance(exc, aiohttp.ClientConnectorError):
        # Failed before a connection existed: nothing reached Twilio.
        return _Failure("retry", None, None, f"{type(exc).__name__}: {exc}")
    # Dropped connection, reset, truncated or unparsable answer: the request
    # may have been processed.
    return _Failure("unknown", capture.status, None, f"{type(exc).__name__}: {exc}")


_CLASSIFIED: Final = (
    TimeoutError,
    TwilioException,  # base of TwilioRestException and TwilioServiceException
    aiohttp.ClientError,
    json.JSONDecodeError,
    OSError,  # a socket error aiohttp did not wrap: the request may have gone out
)


# ----------------------------------------------------------------------------- sender


class TwilioSender:
    """Sends SMS through Twilio (or the local test double) with the gateway's retry policy.

    An async context manager: the aiohttp-based Twilio HTTP client is created on
    entry, inside the running loop, and closed on exit.

    ``sms`` is the validated ``[sms]`` section: sender number or Messaging
    Service, ``base_url`` (``None`` means the real Twilio; set it only to reach
    the local test double), request timeout, attempts per send, backoff and
    concurrency. ``account`` holds the secrets. ``status_callback_url`` is
    given to Twilio as ``StatusCallback`` of every message (``None``: no
    delivery reports).
    """

    def __init__(
        self,
        sms: SmsSection,
        account: TwilioAccount,
        *,
        status_callback_url: str | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._sms = sms
        self._account = account
        self._status_callback_url = status_callback_url
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._http: AsyncTwilioHttpClient | None = None
        self._client: Any = None
        self._gate: SendGate | None = None

    def __repr__(self) -> str:
        return (
            f"TwilioSender({self._account!r}, base_url={self._sms.base_url!r}, "
            f"from_number={self._sms.from_number!r}, "
            f"messaging_service_sid={self._sms.messaging_service_sid!r}, "
            f"status_callback_url={self._status_callback_url!r})"
        )

    @property
    def client(self) -> Any:
        """The underlying twilio-python ``Client`` (only while open), for API calls
        this class does not wrap. Calls made through it get none of this class's
        timeouts or retries."""
        return self._open()[0]

    async def __aenter__(self) -> Self:
        if self._http is not None:
            raise RuntimeError("TwilioSender is already open")
        sms, account = self._sms, self._account
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(_on_request_end)
        http = AsyncTwilioHttpClient(logger=_twilio_http_log, trace_configs=[trace])
        client = Client(
            account.account_sid,
            account.auth_token,
            http_client=http,
            credential_provider=_BasicCredentials(account.account_sid, account.auth_token),
        )
        if sms.base_url is not None:
            # URLs are built per request from the domain's base_url. Edge and
            # region (possibly from TWILIO_EDGE/TWILIO_REGION) would rewrite the
            # host name, which must stay the one configured here.
            client.api.base_url = sms.base_url.rstrip("/")
            client.edge = None
            client.region = None
        self._http = http
        self._client = client
        self._gate = SendGate(sms.concurrency, sms.rate_per_s)
        log.info("sms.sender_opened", base_url=sms.base_url or "twilio",
                 concurrency=sms.concurrency, rate_per_s=sms.rate_per_s)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        http, self._http = self._http, None
        self._client = None
        if http is not None:
            await http.close()

    def _open(self) -> tuple[Any, SendGate]:
        if self._client is None or self._gate is None:
            raise RuntimeError("TwilioSender used outside 'async with'")
        return self._client, self._gate

    async def _request(self, call: Callable[[], Awaitable[_T]], capture: _ResponseCapture,
                       priority: int = BACKGROUND, *, rated: bool = False) -> _T:
        _, gate = self._open()
        token = _capture.set(capture)
        try:
            async with gate.slot(priority, rated=rated), \
                    asyncio.timeout(self._sms.request_timeout_s):
                return await call()
        finally:
            _capture.reset(token)

    def _backoff(self, number: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, _RETRY_AFTER_CAP_S)
        sms = self._sms
        return full_jitter(number, sms.backoff_initial_s, sms.backoff_max_s, self._rng)

    async def send(
        self,
        to: str,
        body: str,
        *,
        on_attempt: Callable[[Attempt], Awaitable[None]] | None = None,
        status_callback: str | None = None,
        priority: int = FIRST_WAVE,
    ) -> SendResult:
        """Send one SMS, retrying transient failures; return once Twilio accepted it.

        ``on_attempt`` is awaited after every HTTP attempt, before any backoff.
        ``priority`` orders it among the requests waiting for a slot
        (:mod:`gateway.sendgate`; each retry waits again at the same priority).
        ``status_callback`` overrides the sender's ``status_callback_url``.
        Raises :class:`SmsSendError` (``permanent`` or ``retryable``, and
        ``outcome_unknown`` when a duplicate may already exist).
        """
        client, _ = self._open()
        sms = self._sms
        callback = status_callback or self._status_callback_url
        kwargs: dict[str, Any] = {"to": to, "body": body}
        if sms.messaging_service_sid:
            kwargs["messaging_service_sid"] = sms.messaging_service_sid
        if sms.from_number:
            kwargs["from_"] = sms.from_number
        if callback:
            kwargs["status_callback"] = callback
        masked = mask_phone(to)
        attempts: list[Attempt] = []

        async def report(attempt: Attempt) -> None:
            attempts.append(attempt)
            # An accepted attempt is told by sms.accepted (and the dispatcher's sms.sent);
            # the rest (retries, failures, unknown outcomes) are worth a line of their own.
            (log.debug if attempt.outcome == "accepted" else log.info)(
                "sms.attempt",
                to=masked,
                attempt=attempt.number,
                outcome=attempt.outcome,
                status=attempt.status,
                code=attempt.code,
                delay_s=attempt.delay_s,
                error=attempt.error,
            )
            if on_attempt is not None:
                await on_attempt(attempt)

        for number in range(1, sms.max_attempts + 1):
            capture = _ResponseCapture()
            try:
                message = await self._request(
                    lambda: client.messages.create_async(**kwargs), capture, priority,
                    rated=True)
            except _CLASSIFIED as exc:
                failure = _classify(exc, capture, sms.request_timeout_s, to)
                unknown_before = any(a.outcome == "unknown" for a in attempts)
                if failure.kind == "permanent" or number == sms.max_attempts:
                    outcome: AttemptOutcome = "unknown" if failure.kind == "unknown" else "failed"
                    await report(
                        Attempt(number, outcome, failure.status, failure.code, None, failure.error)
                    )
                    permanent = failure.kind == "permanent"
                    error = SmsSendError(
                        "SMS refused by Twilio" if permanent else "SMS not accepted after retries",
                        status=failure.status,
                        code=failure.code,
                        retryable=not permanent,
                        permanent=permanent,
                        outcome_unknown=unknown_before or failure.kind == "unknown",
                        timed_out=failure.timed_out,
                        attempts=tuple(attempts),
                    )
                    # Not "sms.failed": the caller decides whether this is a failure
                    # (permanent, or out of time) or a retry later, and logs it so.
                    (log.warning if permanent else log.info)(
                        "sms.refused" if permanent else "sms.round_exhausted",
                        to=masked,
                        attempts=number,
                        status=failure.status,
                        code=failure.code,
                        outcome_unknown=error.outcome_unknown,
                    )
                    raise error from exc
                delay = self._backoff(number, failure.retry_after)
                await report(
                    Attempt(
                        number,
                        "unknown" if failure.kind == "unknown" else "retry",
                        failure.status,
                        failure.code,
                        delay,
                        failure.error,
                    )
                )
                await self._sleep(delay)
                continue

            await report(Attempt(number, "accepted", capture.status or 201, None, None, None))
            result = SendResult(
                sid=str(message.sid),
                status=str(message.status),
                num_segments=int(message.num_segments)
                if message.num_segments is not None
                else segments(body),
                attempts=number,
                error_code=int(message.error_code) if message.error_code is not None else None,
            )
            # Debug: the caller reports the outcome (the dispatcher's sms.sent carries the
            # sid, attempts and segments with the latency against the budget).
            log.debug(
                "sms.accepted",
                to=masked,
                sid=result.sid,
                attempts=number,
                segments=result.num_segments,
            )
            return result
        # max_attempts >= 1 is validated, so the loop always returns or raises.
        raise RuntimeError("unreachable: send loop ended without a result")

    async def query(self, what: str, call: Callable[[], Awaitable[_T]], to: str = "",
                    priority: int = FIRST_WAVE) -> _T:
        """One request through the client (``call`` makes it), under this sender's
        timeout and gate; any failure becomes :class:`SmsSendError` with Twilio's
        status and code (``permanent`` when retrying cannot help). For the other
        Twilio resources the gateway uses (calls, :mod:`gateway.voice`)."""
        return await self._query(what, call, to, priority)

    async def _query(self, what: str, call: Callable[[], Awaitable[_T]], to: str = "",
                     priority: int = BACKGROUND) -> _T:
        capture = _ResponseCapture()
        try:
            return await self._request(call, capture, priority)
        except _CLASSIFIED as exc:
            failure = _classify(exc, capture, self._sms.request_timeout_s, to)
            permanent = failure.kind == "permanent"
            raise SmsSendError(
                f"Twilio {what} failed: {failure.error}",
                status=failure.status,
                code=failure.code,
                retryable=not permanent,
                permanent=permanent,
                outcome_unknown=failure.kind == "unknown",
                timed_out=failure.timed_out,
            ) from exc

    async def list_messages(
        self,
        *,
        since: datetime,
        to: str | None = None,
        from_: str | None = None,
        max_pages: int = _MAX_RECONCILE_PAGES,
    ) -> Listing:
        """Messages (both directions) sent since ``since``, newest first, to
        ``to`` and from ``from_`` when given; at most ``max_pages`` requests of
        100 messages, each under the request timeout.

        ``since`` must be timezone-aware; it is compared with Twilio's clock.
        Raises :class:`SmsSendError` when a page cannot be read.
        """
        client, _ = self._open()
        if since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        if max_pages < 1:
            raise ValueError("max_pages must be >= 1")
        # twilio-python formats the filter with a literal 'Z', so it must be UTC.
        filters: dict[str, Any] = {"date_sent_after": since.astimezone(UTC)}
        if to is not None:
            filters["to"] = to
        if from_ is not None:
            filters["from_"] = from_
        page = await self._query(
            "list", lambda: client.messages.page_async(page_size=_PAGE_SIZE, **filters)
        )
        messages: list[ListedMessage] = []
        pages = 1
        while True:
            messages.extend(_listed(record) for record in page)
            if not page.next_page_url:
                return Listing(tuple(messages), pages, truncated=False)
            if pages >= max_pages:
                return Listing(tuple(messages), pages, truncated=True)
            page = await self._query("list", page.next_page_async)
            pages += 1

    async def find_sent(self, to: str, *, since: datetime, marker: str) -> list[tuple[str, str]]:
        """Messages to ``to`` sent since ``since`` whose body contains ``marker``,
        newest first, as ``(sid, status)``.

        Used after a crash to learn whether an ``outcome_unknown`` send reached
        Twilio before sending it again. ``since`` must be timezone-aware; give it
        some slack, it is compared with Twilio's clock. Raises
        :class:`SmsSendError` when Twilio cannot be queried.
        """
        listing = await self.list_messages(since=since, to=to, max_pages=_MAX_RECONCILE_PAGES)
        if listing.truncated:
            log.warning("sms.find_sent_truncated", to=mask_phone(to), requests=listing.pages)
        found = [(m.sid, m.status) for m in listing.messages if marker in m.body]
        log.info("sms.find_sent", to=mask_phone(to), found=len(found), requests=listing.pages)
        return found

    async def fetch_status(self, sid: str) -> tuple[str, int | None]:
        """Current ``(status, error_code)`` of message ``sid``.

        Raises :class:`SmsSendError` (``permanent``, code 20404 for an unknown sid).
        """
        client, _ = self._open()
        message = await self._query("fetch", lambda: client.messages(sid).fetch_async())
        error_code = int(message.error_code) if message.error_code is not None else None
        return str(message.status), error_code

    async def send_reply(self, to: str, body: str, *, from_number: str) -> str:
        """Answer an inbound message: ``body`` to ``to`` from our number
        ``from_number``, in one attempt (a courtesy confirmation: a retry after
        a lost answer could text the person twice). Returns the message SID.

        Raises :class:`SmsSendError`.
        """
        client, _ = self._open()
        message = await self._query(
            "reply",
            lambda: client.messages.create_async(to=to, from_=from_number, body=body),
            to,
        )
        return str(message.sid)


def _listed(record: Any) -> ListedMessage:
    return ListedMessage(
        sid=str(record.sid or ""),
        to=str(record.to or ""),
        from_=str(record.from_ or ""),
        body=str(record.body or ""),
        status=str(record.status),
        direction=str(record.direction),
        when=record.date_sent or record.date_created,
    )
