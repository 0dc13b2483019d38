"""Pieces shared by the Twilio test doubles (Messages and Calls). Never a production path.

Theory of operation: :mod:`gateway.sandbox.twilio_double` (the Messages API and
the server) and :mod:`gateway.sandbox.twilio_calls` (the Calls resource, mixed
into the same server) answer in one wire format, so what they have in common
lives here rather than in either of them (which would make the two modules
import each other):

* Twilio's JSON error body (``code``, ``message``, ``more_info``, ``status``)
  and the message texts of the error codes either resource answers;
* what the request hook sees of a request (:class:`ApiCall`, :data:`ApiTarget`)
  and the record of a webhook the double sent (:class:`CallbackDelivery`);
* SIDs, RFC 2822 dates, list paging and the ``Name``/``Name>``/``Name<`` date
  filters of Twilio's list endpoints;
* parsing a TwiML answer.

Everything here is re-exported by :mod:`gateway.sandbox.twilio_double` where it
was public before, so existing imports keep working.
"""

from __future__ import annotations

import re
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.utils import format_datetime
from typing import Any, Final, Literal, TypeVar

import structlog
from aiohttp import web
from yarl import URL

__all__ = [
    "API_VERSION",
    "CREATE_TARGETS",
    "ApiCall",
    "ApiTarget",
    "CallbackDelivery",
    "HttpMethod",
    "error_response",
]

log = structlog.get_logger("gateway.sandbox.twilio_double")

_R = TypeVar("_R")

API_VERSION: Final = "2010-04-01"
# How much of a webhook's answer the double reads: a bound, so that a runaway
# test server cannot exhaust memory; real TwiML answers are a few hundred bytes
# (Twilio itself refuses answers over 64 kB, error 11750).
MAX_WEBHOOK_ANSWER: Final = 64 * 1024

E164 = re.compile(r"^\+[1-9]\d{1,14}$")
ISO_DATETIME: Final = "%Y-%m-%dT%H:%M:%SZ"

ERROR_MESSAGES: Final[Mapping[int, str]] = {
    20001: "{detail}",
    20003: "Authenticate",
    20404: "The requested resource {path} was not found",
    20429: "Too Many Requests",
    20500: "Internal Server Error",
    20502: "Bad Gateway",
    20503: "Service Unavailable",
    # Messages.
    21211: "Invalid 'To' Phone Number: {to}",
    21408: "Permission to send an SMS has not been enabled for the region indicated by the "
    "'To' number: {to}",
    21602: "Message body is required.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21606: "The 'From' phone number provided is not a valid message-capable Twilio phone "
    "number for this destination.",
    21610: "Attempt to send to unsubscribed recipient",
    21612: "The 'To' phone number: {to}, is not currently reachable using the 'From' phone "
    "number via SMS.",
    21614: "'To' number is not a valid mobile number",
    21617: "The concatenated message body exceeds the 1600 character limit.",
    21624: "Invalid validity period value",
    21701: "The Messaging Service Sid is invalid.",
    # Calls.
    21201: "No 'To' number is specified",
    21205: "Url is not a valid URL: {url}",
    21206: "SendDigits must contain only digits, '#', '*' and 'w': {value}",
    21208: "Timeout must be a whole number of seconds between 1 and 600: {value}",
    21209: "{name} must be GET or POST: {value}",
    21212: "The 'From' phone number: {value}, is not a valid phone number or client identifier",
    21213: "No 'From' number is specified",
    21218: "Invalid ApplicationSid: {value}",
    21234: "MachineDetection must be Enable or DetectMessageEnd: {value}",
    21609: "StatusCallback is not a valid URL: {url}",
    21626: "Invalid StatusCallbackEvent: {value}",
    32018: "Twiml size exceeded maximum allowed value of 4000 characters",
}


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class CallbackDelivery:
    """One webhook the double sent (or failed to): a status callback, an inbound
    message, or a voice TwiML request; ``answer`` holds the body of the answer
    (the TwiML). A GET sends ``params`` in the query string: ``url`` is then the
    full URL with it, as signed."""

    url: str
    params: dict[str, str]
    signature: str
    http_status: int | None
    error: str | None
    answer: str | None = None


#: How the double sends a webhook (Twilio's ``Method``/``StatusCallbackMethod``...).
HttpMethod = Literal["GET", "POST"]

#: Which API call a request is: message creation, the Messages list, fetching
#: one message, or the same three for Calls.
ApiTarget = Literal["create", "list", "fetch", "call_create", "call_list", "call_fetch"]

#: The targets that create a resource (a fault "after receive" creates it first).
CREATE_TARGETS: Final[frozenset[ApiTarget]] = frozenset({"create", "call_create"})


@dataclass(frozen=True, slots=True)
class ApiCall:
    """A request, as :meth:`TwilioDouble._intercept` sees it.

    ``target`` is ``None`` for a request no API route matches. ``to`` is the
    request's ``To`` field (create) or filter (list), or the fetched message's
    or call's recipient (fetch); ``None`` when there is none. ``authorized``: its
    Basic credentials are the account's.
    """

    target: ApiTarget | None
    to: str | None
    authorized: bool


# ----------------------------------------------------------------------------- helpers


def new_sid(prefix: str) -> str:
    """A Twilio SID: ``prefix`` and 32 lowercase hex digits."""
    return prefix + secrets.token_hex(16)


def rfc2822(moment: datetime | None) -> str | None:
    """Twilio's date format (``Sat, 01 Mar 2025 08:00:00 +0000``); ``None`` stays ``None``."""
    return None if moment is None else format_datetime(moment.replace(microsecond=0))


def _error_body(code: int, status: int, **fields: str) -> dict[str, Any]:
    template = ERROR_MESSAGES.get(code, "Error {code}")
    try:
        message = template.format(code=code, **fields)
    except KeyError:
        message = template
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def error_response(
    code: int, status: int, headers: Mapping[str, str] | None = None, **fields: str
) -> web.Response:
    """Twilio's JSON error answer (``code``, ``message``, ``more_info``, ``status``);
    ``fields`` fill the message template of ``code`` (``to``, ``path``, ``value``...)."""
    return web.json_response(_error_body(code, status, **fields), status=status, headers=headers)


def parse_filter_moment(text: str) -> datetime | date:
    """Parse a date filter: ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM:SSZ`` (what the
    twilio client sends for a datetime)."""
    try:
        return datetime.strptime(text, ISO_DATETIME).replace(tzinfo=UTC)
    except ValueError:
        return date.fromisoformat(text)


Relation = Literal["eq", "ge", "le"]
Bound = tuple[datetime | date, Relation]


def moment_bounds(query: Mapping[str, str], name: str) -> list[Bound]:
    """The ``name``, ``name>`` (on or after) and ``name<`` (on or before) filters
    of a list query; ``ValueError`` for one that is not a date."""
    relations: tuple[tuple[str, Relation], ...] = (
        (name, "eq"),
        (f"{name}>", "ge"),
        (f"{name}<", "le"),
    )
    return [(parse_filter_moment(query[key]), rel) for key, rel in relations if key in query]


def matches_moment(when: datetime, bound: datetime | date, relation: Relation) -> bool:
    """``when`` against one bound: a date compares days, a datetime whole seconds."""
    if isinstance(bound, datetime):
        left: datetime | date = when.replace(microsecond=0)
    else:
        left = when.date()
    if relation == "ge":
        return left >= bound
    if relation == "le":
        return left <= bound
    return left == bound


def parse_paging(query: Mapping[str, str]) -> tuple[int, int]:
    """``(page, page_size)`` of a list query, clamped as Twilio does rather than
    rejected; ``ValueError`` when they are not integers."""
    page_size = int(query.get("PageSize", "50"))
    page = int(query.get("Page", "0"))
    return max(page, 0), min(max(page_size, 1), 1000)


def invalid_query(detail: str) -> web.Response:
    """The 400 (code 20001) of a list request with a malformed filter or paging."""
    return error_response(20001, 400, detail=detail)


def list_page(
    query: Mapping[str, str],
    selected: Sequence[_R],
    render: Callable[[_R], dict[str, Any]],
    *,
    key: str,
    path: str,
    page: int,
    page_size: int,
) -> dict[str, Any]:
    """One page of a Twilio list answer: the records under ``key`` plus ``page``,
    ``page_size``, ``start``, ``end`` and the ``uri``/``first_page_uri``/
    ``next_page_uri``/``previous_page_uri`` links (filters kept in them)."""
    start = page * page_size
    chunk = selected[start : start + page_size]
    filters = {k: v for k, v in query.items() if k not in ("Page", "PageSize", "PageToken")}

    def page_uri(number: int) -> str:
        params = {**filters, "PageSize": str(page_size), "Page": str(number)}
        if number > 0:
            params["PageToken"] = f"PA{number}"
        return str(URL(path).with_query(params))

    has_next = start + page_size < len(selected)
    return {
        key: [render(record) for record in chunk],
        "end": start + len(chunk) - 1 if chunk else start,
        "first_page_uri": page_uri(0),
        "next_page_uri": page_uri(page + 1) if has_next else None,
        "page": page,
        "page_size": page_size,
        "previous_page_uri": page_uri(page - 1) if page > 0 else None,
        "start": start,
        "uri": page_uri(page),
    }


def parse_twiml(answer: str, sid: str) -> ET.Element | None:
    """The ``<Response>`` root of a TwiML document, or ``None`` (logged) when it is
    not one: Twilio logs error 12100 for a document it cannot parse and goes on
    as if it were empty."""
    try:
        # The answer comes from a webhook a test pointed the double at, on this
        # machine, and is size-bounded; it is not untrusted input.
        root = ET.fromstring(answer)  # noqa: S314
    except ET.ParseError as exc:
        log.warning("twilio_double.twiml_invalid", sid=sid, error=str(exc))
        return None
    if root.tag != "Response":
        log.warning("twilio_double.twiml_invalid", sid=sid, error=f"root <{root.tag}>")
        return None
    return root
