"""Staff replies to alarm SMS, read without any I/O: the alarm reference and the intent.

A staff member who receives an alarm SMS answers it, e.g. ``K7QM-3XRD 1`` or
just ``收到``. :func:`parse_reply` (pure, never raises) finds an alarm
reference, if the text holds one, and an intent. What a reply *means* (which
alarm, whether this sender may take it) is the ``on_reply`` callback's
decision, not this module's: a reference found here is only syntactically
valid.

The values handed to the gateway for inbound Twilio traffic live here too,
whichever way they arrived (signed webhooks, :mod:`gateway.webhooks`, or
polling, :mod:`gateway.twilio_poll`): :class:`InboundReply` and
:class:`StatusUpdate`. This module imports neither aiohttp nor twilio.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "MAX_REPLY_CHARS",
    "InboundReply",
    "Intent",
    "ReplyHandler",
    "StatusHandler",
    "StatusUpdate",
    "is_e164",
    "parse_reply",
]

Intent = Literal["ack", "decline", "unknown"]

#: Twilio refuses longer message bodies (error 21617): the most an answer may hold.
MAX_REPLY_CHARS: Final = 1600

_E164 = re.compile(r"\+[1-9][0-9]{1,14}")

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

    @classmethod
    def read(cls, sid: str, sender: str, to: str, body: str, at: float) -> InboundReply:
        """The reply ``body`` parsed (:func:`parse_reply`), however it reached us."""
        ref, intent = parse_reply(body)
        return cls(sid, sender, to, body, ref, intent, at)


@dataclass(frozen=True)
class StatusUpdate:
    """A status of one of our outgoing messages (``queued``, ``sent``,
    ``delivered``, ``undelivered``, ``failed``, ...) and its Twilio error code.
    ``to_phone`` is the recipient when the report names it."""

    message_sid: str
    status: str
    error_code: int | None
    to_phone: str | None


def is_e164(number: str) -> bool:
    """Whether ``number`` is an E.164 phone number: a person who can take an
    alarm, not a short code or an alphanumeric sender (a carrier notice)."""
    return _E164.fullmatch(number) is not None


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
