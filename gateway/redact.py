"""Redaction of personal data before it reaches a log line."""

from __future__ import annotations

from phonenumbers import COUNTRY_CODE_TO_REGION_CODE

__all__ = ["mask_phone"]

_MASK = "****"


def _split_country_code(digits: str) -> tuple[str, str] | None:
    # Country calling codes are a prefix code (1 to 3 digits), so the first
    # known prefix is the only possible one.
    for length in (1, 2, 3):
        if int(digits[:length] or "0") in COUNTRY_CODE_TO_REGION_CODE:
            return digits[:length], digits[length:]
    return None


def mask_phone(e164: str) -> str:
    """Mask a phone number for logs: ``"+8613812345678"`` -> ``"+86138****5678"``.

    Keeps the country code, the first three national digits (the carrier
    prefix, useful when diagnosing delivery) and the last four. Anything that
    is not an E.164 number is masked whole except its last two characters, so a
    malformed number never leaks either.
    """
    text = e164.strip()
    digits = text[1:]
    split = (
        _split_country_code(digits)
        if text.startswith("+") and digits.isdigit() and digits.isascii()
        else None
    )
    if split is None:
        return _MASK + text[-2:] if len(text) > 6 else _MASK
    country, national = split
    if len(national) >= 8:
        return f"+{country}{national[:3]}{_MASK}{national[-4:]}"
    if len(national) >= 4:
        return f"+{country}{_MASK}{national[-2:]}"
    return f"+{country}{_MASK}"
