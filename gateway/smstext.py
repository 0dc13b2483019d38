"""SMS text facts shared by the sender and the local Twilio double: segment counting.

An SMS carries 140 octets. Text that fits the GSM 03.38 alphabet is packed in
7-bit septets (160 per single message, 153 per part once a concatenation header
is needed); anything else, which includes every Chinese character, goes as
UCS-2 (70 UTF-16 units per single message, 67 per part). Operators bill and
throttle per segment, so the count matters for cost and for queueing time
(a long code sends about one segment per second).
"""

from __future__ import annotations

__all__ = ["GSM7_BASIC", "GSM7_EXTENDED", "is_gsm7", "segments"]

# GSM 03.38 default alphabet (without the escape code 0x1B, which is not text).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Extension table: each costs two septets (escape + code) and the pair must not
# be split across two segments.
GSM7_EXTENDED = frozenset("\f^{}\\[~]|€")

_GSM7_SINGLE = 160
_GSM7_PART = 153
_UCS2_SINGLE = 70
_UCS2_PART = 67


def is_gsm7(body: str) -> bool:
    """True when every character of ``body`` is in the GSM 03.38 alphabet (with extensions)."""
    return all(ch in GSM7_BASIC or ch in GSM7_EXTENDED for ch in body)


def _pack(costs: list[int], single: int, part: int) -> int:
    if sum(costs) <= single:
        return 1
    # Greedy packing is exact here: a unit (escape pair, surrogate pair) that
    # does not fit in the current part starts the next one.
    parts = 1
    used = 0
    for cost in costs:
        if used + cost > part:
            parts += 1
            used = 0
        used += cost
    return parts


def segments(body: str) -> int:
    """Number of SMS segments ``body`` needs (an empty body still takes one)."""
    if is_gsm7(body):
        costs = [2 if ch in GSM7_EXTENDED else 1 for ch in body]
        return _pack(costs, _GSM7_SINGLE, _GSM7_PART)
    # UCS-2 in practice means UTF-16: characters outside the BMP (emoji) take
    # a surrogate pair, two units that stay in the same segment.
    costs = [2 if ord(ch) > 0xFFFF else 1 for ch in body]
    return _pack(costs, _UCS2_SINGLE, _UCS2_PART)
