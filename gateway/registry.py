"""Load and validate the district registry: elders, devices, contacts, responders, facilities.

The registry is five UTF-8 CSV files in one directory (see ``config/sample/README.md``).
:func:`load_registry` reads all of them, checks every row and every cross-reference,
and either returns an immutable :class:`~gateway.model.Registry` or raises one
:class:`RegistryError` listing *every* problem found, each located by file, line and
field. A registry is all-or-nothing on purpose: an elder whose button is not
registered, or whom nobody can be told about, must stop the gateway at start, when
an operator is watching, not surface during an alarm.

Values are normalised once here so that lookups downstream are exact string
matches: phone numbers to E.164, Contact ID accounts to upper-case hex, MQTT base
topics checked for wildcards. Decoders that need to map what a device sent to a
registry key use :func:`normalise_device_address` so both sides agree.

Validating a city (100k elders, ~245k distinct numbers) is seconds of ``phonenumbers``
work, so a caller that passes ``cache_dir`` gets the last validated registry back from
a snapshot when the files' bytes and the parameters are the same, and a full validation
that asks ``phonenumbers`` only about numbers it has not seen before otherwise (see
:mod:`gateway.registry_snapshot`). A registry rebuilt from a snapshot logs no per-row
warnings (``registry.phone_not_mobile``): the validation that wrote it did.
"""

from __future__ import annotations

import codecs
import csv
import gc
import io
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Final, TypeVar

import phonenumbers
import structlog

from devices.events import AddressScheme, DeviceAddress
from gateway.model import (
    SMS_LINE_TYPES,
    Contact,
    Device,
    Elder,
    Facility,
    FacilityKind,
    LineType,
    LonLat,
    Registry,
    Responder,
    ResponderRole,
)
from gateway.redact import mask_phone
from gateway.registry_snapshot import (
    read_phones,
    read_snapshot,
    snapshot_key,
    write_phones,
    write_snapshot,
)

__all__ = [
    "DEVICE_SCHEMES",
    "MAX_SHOWN_PROBLEMS",
    "REGISTRY_FILES",
    "FieldValueError",
    "RegistryError",
    "RegistryProblem",
    "load_registry",
    "normalise_device_address",
    "normalise_phone",
    "registry_fingerprint",
    "registry_summary",
]

log = structlog.get_logger(__name__)

#: The files :func:`load_registry` reads, in the order it reads them.
REGISTRY_FILES: Final = (
    "elders.csv",
    "devices.csv",
    "contacts.csv",
    "responders.csv",
    "facilities.csv",
)

RegistryFingerprint = tuple[tuple[str, int, int, int] | tuple[str], ...]


def registry_fingerprint(directory: Path) -> RegistryFingerprint:
    """What identifies the current version of the registry files, without reading them.

    Per file of :data:`REGISTRY_FILES`: its name, modification time (ns), size and inode
    (an editor that saves by renaming a new file over the old one changes the inode), or
    just its name when it is missing. Equal fingerprints: nothing was written since.
    """
    parts: list[tuple[str, int, int, int] | tuple[str]] = []
    for name in REGISTRY_FILES:
        try:
            st = (directory / name).stat()
        except OSError:
            parts.append((name,))
        else:
            parts.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(parts)


#: Address schemes an elder's device may use. ``receiver`` identifies an alarm
#: receiver itself (heartbeats), never an elder's button.
DEVICE_SCHEMES: Final = (AddressScheme.MQTT, AddressScheme.CONTACT_ID, AddressScheme.PHONE)

#: How many problems ``str(RegistryError)`` shows before summarising the rest.
MAX_SHOWN_PROBLEMS: Final = 50

_BOM: Final = codecs.BOM_UTF8
_LANGUAGES: Final = ("zh", "en")
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})
_HEX: Final = frozenset("0123456789ABCDEF")
_BOOLS: Final = ("true", "false", "1", "0", "yes", "no")

_PN = phonenumbers.PhoneNumberType
_LINE_TYPES: Final[Mapping[int, LineType]] = {
    _PN.MOBILE: LineType.MOBILE,
    _PN.FIXED_LINE: LineType.FIXED_LINE,
    _PN.FIXED_LINE_OR_MOBILE: LineType.FIXED_LINE_OR_MOBILE,
    _PN.VOIP: LineType.VOIP,
    _PN.PERSONAL_NUMBER: LineType.PERSONAL_NUMBER,
    _PN.PAGER: LineType.PAGER,
    _PN.TOLL_FREE: LineType.TOLL_FREE,
    _PN.PREMIUM_RATE: LineType.PREMIUM_RATE,
    _PN.SHARED_COST: LineType.SHARED_COST,
    _PN.UAN: LineType.UAN,
    _PN.VOICEMAIL: LineType.VOICEMAIL,
    _PN.UNKNOWN: LineType.UNKNOWN,
}

_T = TypeVar("_T")


# ---------------------------------------------------------------------------
# Errors


@dataclass(frozen=True, slots=True)
class RegistryProblem:
    """One thing wrong with the registry, located as precisely as possible.

    ``line`` is the 1-based physical line where the CSV record starts (the header is
    line 1); ``None`` for problems about a whole file. ``field`` is the column name,
    or ``None`` when the problem is about the row or file as a whole.
    """

    file: Path
    line: int | None
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = self.file.name if self.line is None else f"{self.file.name}:{self.line}"
        what = f"field '{self.field}': " if self.field is not None else ""
        return f"{where}: {what}{self.reason}"


class RegistryError(Exception):
    """The registry cannot be loaded. ``problems`` holds every problem found, in file order."""

    def __init__(self, problems: Sequence[RegistryProblem]) -> None:
        self.problems: tuple[RegistryProblem, ...] = tuple(problems)
        super().__init__(f"{len(self.problems)} registry problem(s)")

    def __str__(self) -> str:
        count = len(self.problems)
        lines = [f"registry has {count} problem{'s' if count != 1 else ''}:"]
        lines.extend(f"  {p}" for p in self.problems[:MAX_SHOWN_PROBLEMS])
        rest = count - MAX_SHOWN_PROBLEMS
        if rest > 0:
            lines.append(f"  ... and {rest} more problem{'s' if rest != 1 else ''}")
        return "\n".join(lines)


class FieldValueError(ValueError):
    """A single value (phone number, account, topic) that cannot be normalised.

    ``value`` is the text as given; ``reason`` says why it was rejected and is safe to
    log (it never repeats a full phone number).
    """

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(reason)
        self.value = value
        self.reason = reason


# ---------------------------------------------------------------------------
# Value normalisation (public: decoders use the same rules to look devices up)

_PARSE_REASONS: Final = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "unknown country code",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "not a number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "too short after the '00' prefix",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "too short",
    phonenumbers.NumberParseException.TOO_LONG: "too long",
}

_PHONE_REASONS: Final = {
    phonenumbers.ValidationResult.INVALID_COUNTRY_CODE: "unknown country code",
    phonenumbers.ValidationResult.TOO_SHORT: "too short",
    phonenumbers.ValidationResult.TOO_LONG: "too long",
    phonenumbers.ValidationResult.INVALID_LENGTH: "wrong number of digits",
    phonenumbers.ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "local number only; add the area code",
}


def normalise_phone(raw: str, default_region: str = "CN") -> str:
    """Validate a phone number and return it in E.164 (``"0546-1234567"`` -> ``"+865461234567"``).

    Numbers without a ``+`` are read as national numbers of ``default_region``.
    Raises :class:`FieldValueError` for anything ``phonenumbers`` does not consider a
    valid, dialable number, and for numbers with an extension (no SMS reaches one).
    """
    return phonenumbers.format_number(
        _parse_phone(raw, default_region), phonenumbers.PhoneNumberFormat.E164
    )


def _parse_phone(raw: str, default_region: str) -> phonenumbers.PhoneNumber:
    text = raw.strip()
    shown = mask_phone(text)
    if not text:
        raise FieldValueError(raw, "empty phone number")
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException as exc:
        why = _PARSE_REASONS.get(exc.error_type, "unreadable")
        raise FieldValueError(raw, f"{shown} is not a phone number: {why}") from None
    if number.extension:
        without = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        raise FieldValueError(
            raw, f"{mask_phone(without)} has an extension, which SMS and caller ID cannot use"
        )
    if not phonenumbers.is_valid_number(number):
        why = _PHONE_REASONS.get(
            phonenumbers.is_possible_number_with_reason(number),
            f"not a valid number in the +{number.country_code} numbering plan",
        )
        if default_region == "CN" and not text.startswith(("+", "00")):
            why += _chinese_number_hint("".join(ch for ch in text if ch.isdigit()))
        raise FieldValueError(raw, f"{shown} is not a valid phone number: {why}")
    return number


def _chinese_number_hint(digits: str) -> str:
    # The two mistakes seen in hand-kept Chinese lists: a mobile number with a digit
    # dropped or doubled, and a landline written without its area code.
    if digits.startswith("1") and len(digits) != 11:
        return f"; Chinese mobile numbers have 11 digits, this has {len(digits)}"
    if digits[:1] in tuple("23456789") and 7 <= len(digits) <= 8:
        return "; landline missing its area code (e.g. 0546-)?"
    return ""


def _normalise_account(raw: str) -> str:
    text = raw.strip().upper()
    if len(text) != 4 or not set(text) <= _HEX:
        raise FieldValueError(raw, f"{raw.strip()!r} is not a Contact ID account (4 hex digits)")
    return text


def _normalise_topic(raw: str) -> str:
    text = raw.strip()
    if not text:
        raise FieldValueError(raw, "empty MQTT topic")
    if "+" in text or "#" in text:
        raise FieldValueError(raw, f"{text!r} contains an MQTT wildcard (+ or #)")
    if text.endswith("/"):
        raise FieldValueError(raw, f"{text!r} ends with '/'; give the base topic without it")
    if text.startswith("$"):
        raise FieldValueError(raw, f"{text!r} starts with '$', reserved for broker topics")
    if "\x00" in text:
        raise FieldValueError(raw, f"{text!r} contains a NUL character")
    if len(text.encode("utf-8")) > 65535:
        raise FieldValueError(raw, "MQTT topic longer than 65535 bytes")
    return text


def normalise_device_address(
    scheme: AddressScheme, raw: str, default_region: str = "CN"
) -> str:
    """Normalise a device address the way the registry stores it.

    ``contact_id``: 4 hex digits, upper case. ``phone``: E.164. ``mqtt``: the base
    topic, stripped, without wildcards or a trailing slash. Raises
    :class:`FieldValueError` with the reason, including for the ``receiver`` scheme,
    which never names an elder's device.
    """
    if scheme is AddressScheme.CONTACT_ID:
        return _normalise_account(raw)
    if scheme is AddressScheme.PHONE:
        return normalise_phone(raw, default_region)
    if scheme is AddressScheme.MQTT:
        return _normalise_topic(raw)
    raise FieldValueError(raw, f"scheme {scheme.value!r} does not address an elder's device")


# ---------------------------------------------------------------------------
# CSV reading


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return self.required + self.optional


# Optional columns may be left out of the header entirely; required ones may not,
# and their cells must not be empty.
_ELDERS: Final = _Table(
    "elders.csv",
    ("elder_id", "name", "address", "community", "lon", "lat"), ("phone", "notes"),
)
_DEVICES: Final = _Table(
    "devices.csv",
    ("device_id", "elder_id", "scheme", "address"), ("model", "test_interval_h"),
)
_CONTACTS: Final = _Table(
    "contacts.csv", ("elder_id", "name", "phone"), ("relation", "language", "voice_only"),
)
_RESPONDERS: Final = _Table(
    "responders.csv",
    ("responder_id", "name", "phone", "community", "role", "on_duty", "lon", "lat"),
    ("voice_only",),
)
_FACILITIES: Final = _Table(
    "facilities.csv",
    ("facility_id", "name", "kind", "duty_phone", "lon", "lat"), ("address", "voice_only"),
)


@dataclass(frozen=True, slots=True)
class _Row:
    line: int
    values: Mapping[str, str]


class _Problems:
    """Collects problems; every check reports here instead of raising."""

    def __init__(self) -> None:
        self.items: list[RegistryProblem] = []

    def add(self, file: Path, line: int | None, field: str | None, reason: str) -> None:
        self.items.append(RegistryProblem(file, line, field, reason))


@dataclass(slots=True)
class _Phone:
    """One distinct number as written: parsed once, its line type looked up at most once."""

    e164: str
    number: phonenumbers.PhoneNumber | None  # None: known from an earlier load, not parsed
    line_type: LineType | None = None  # None until a texted field asks for it


@dataclass(slots=True)
class _Context:
    """What every row check needs: settings, the problem list, and a parse cache."""

    region: str
    bbox: tuple[float, float, float, float] | None
    problems: _Problems
    # Parsing dominates load time, and real registries repeat numbers (a couple's
    # children are contacts of both): raw text -> the parsed number.
    phones: dict[str, _Phone]
    # E.164 -> (file, line, value) of the first row that set ``voice_only`` for it: a
    # line either takes an SMS or not, whichever row names it.
    overrides: dict[str, tuple[str, int, bool]]
    # One object per distinct text for values that repeat across a city's rows (names,
    # communities, relations, notes, models, elder ids in references).
    strings: dict[str, str] = field(default_factory=dict)

    def share(self, text: str) -> str:
        return self.strings.setdefault(text, text)


def _decode(path: Path, data: bytes, problems: _Problems) -> str | None:
    bom = len(_BOM) if data.startswith(_BOM) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        line = data.count(b"\n", 0, offset) + 1
        bad = data[offset : offset + 4]
        hint = ""
        try:
            data[bom:].decode("gb18030")
        except UnicodeDecodeError:
            pass
        else:
            hint = "; the file looks GBK/GB18030-encoded: save it as 'CSV UTF-8'"
        problems.add(
            path, line, None, f"invalid UTF-8 at byte offset {offset} ({bad!r}){hint}"
        )
        return None


def _read_files(directory: Path, problems: _Problems) -> dict[str, bytes]:
    """The bytes of every registry file that could be read (the others are problems)."""
    files: dict[str, bytes] = {}
    for name in REGISTRY_FILES:
        path = directory / name
        try:
            files[name] = path.read_bytes()
        except FileNotFoundError:
            problems.add(path, None, None, "file not found")
        except OSError as exc:
            problems.add(path, None, None, f"cannot read file: {exc.strerror or exc}")
    return files


def _read_table(
    directory: Path, table: _Table, files: Mapping[str, bytes], problems: _Problems
) -> list[_Row] | None:
    """Read one CSV file into rows keyed by column name.

    Returns ``None`` when the file cannot be read as a table at all (missing, not
    UTF-8, empty, required columns missing); the caller then skips cross-file checks
    that depend on it rather than burying the real problem under consequences.
    """
    path = directory / table.name
    data = files.get(table.name)
    if data is None:  # reported by _read_files
        return None
    text = _decode(path, data, problems)
    if text is None:
        return None

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for cells in reader:
            if "".join(cells).strip():  # not a blank row (one call, not one per cell)
                records.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as exc:
        problems.add(path, start, None, f"malformed CSV: {exc}")
        return None
    if not records:
        problems.add(path, None, None, "file is empty: expected a header row")
        return None

    header_line, header_cells = records[0]
    header = [c.strip() for c in header_cells]
    usable = True
    seen: set[str] = set()
    for position, name in enumerate(header, start=1):
        if not name:
            problems.add(path, header_line, None, f"header column {position} has no name")
        elif name in seen:
            problems.add(path, header_line, name, "column appears twice in the header")
            usable = False
        elif name not in table.columns:
            problems.add(
                path, header_line, name,
                f"unknown column; expected {','.join(table.columns)}",
            )
        seen.add(name)
    for name in table.required:
        if name not in seen:
            problems.add(path, header_line, name, "required column missing from the header")
            usable = False
    if not usable:
        return None

    # Absent optional columns read as empty: point them past the end of every row.
    width = len(header)
    picks = [(name, header.index(name) if name in seen else width) for name in table.columns]
    padding = [""] * (width + 1)
    rows: list[_Row] = []
    for line, cells in records[1:]:
        if len(cells) != width:
            problems.add(
                path, line, None, f"row has {len(cells)} fields but the header has {width}"
            )
        cells = (cells + padding)[: width + 1]
        rows.append(_Row(line, {name: cells[i].strip() for name, i in picks}))
    return rows


# ---------------------------------------------------------------------------
# Field parsing


class _Fields:
    """Typed access to one row's fields, reporting problems at this row's location."""

    def __init__(self, path: Path, row: _Row, ctx: _Context) -> None:
        self.path = path
        self.row = row
        self.ctx = ctx
        self.ok = True

    def problem(self, field: str | None, reason: str) -> None:
        self.ok = False
        self.ctx.problems.add(self.path, self.row.line, field, reason)

    def text(self, field: str) -> str:
        """A required field: empty is a problem (the empty string is returned)."""
        value = self.row.values[field]
        if not value:
            self.problem(field, "required value is empty")
        return value

    def optional(self, field: str) -> str:
        return self.row.values[field]

    def choice(
        self, field: str, parse: Callable[[str], _T], allowed: Iterable[str]
    ) -> _T | None:
        value = self.text(field)
        if not value:
            return None
        try:
            return parse(value)
        except ValueError:
            self.problem(field, f"{value!r} is not one of {'|'.join(allowed)}")
            return None

    def phone(self, field: str, *, required: bool = True) -> str | None:
        """A phone number in E.164 (a number the gateway never texts)."""
        known = self._phone(field, required=required)
        return None if known is None else known.e164

    def _phone(self, field: str, *, required: bool = True) -> _Phone | None:
        value = self.text(field) if required else self.optional(field)
        if not value:
            return None
        known = self.ctx.phones.get(value)
        if known is None:
            try:
                number = _parse_phone(value, self.ctx.region)
            except FieldValueError as exc:
                self.problem(field, exc.reason)
                return None
            known = _Phone(
                phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), number)
            self.ctx.phones[value] = known
        return known

    def texted_phone(
        self, field: str, *, warn: bool = True
    ) -> tuple[str, LineType, bool] | None:
        """A number the gateway texts: E.164, its line type, and whether an SMS reaches it.

        The row's ``voice_only`` (true/false), when given, overrides what the line type
        says; one number given both ways is a problem. ``warn``: log the rows that cannot
        be texted by line type alone (a landline is a legitimate contact, someone may ring
        it, but a person expected to read an SMS should know).
        """
        known = self._phone(field)
        voice_only = self.optional("voice_only")
        override: bool | None = None
        if voice_only:
            try:
                override = _parse_bool(voice_only)
            except ValueError:
                self.problem("voice_only", f"{voice_only!r} is not one of {'|'.join(_BOOLS)}")
        if known is None:
            return None
        if known.line_type is None:  # the parse is reused; the lookup is done once too
            number = known.number
            if number is None:  # valid when last seen: parsed again for its line type
                number = _parse_phone(self.row.values[field], self.ctx.region)
            known.line_type = _LINE_TYPES.get(phonenumbers.number_type(number),
                                              LineType.UNKNOWN)
        e164, line_type = known.e164, known.line_type
        if override is None:
            capable = line_type in SMS_LINE_TYPES
            if warn and not capable:
                log.warning("registry.phone_not_mobile", file=self.path.name,
                            line=self.row.line, field=field, phone=mask_phone(e164),
                            line_type=line_type.value)
            return e164, line_type, capable
        first = self.ctx.overrides.setdefault(e164, (self.path.name, self.row.line, override))
        if first[2] != override:
            self.problem("voice_only", f"{voice_only!r} contradicts {first[0]}:{first[1]}, "
                         f"which says {'true' if first[2] else 'false'} for "
                         f"{mask_phone(e164)}: a line either takes an SMS or not")
        return e164, line_type, not override

    def number(self, field: str, *, required: bool = True) -> float | None:
        value = self.text(field) if required else self.optional(field)
        if not value:
            return None
        try:
            number = float(value)
        except ValueError:
            self.problem(field, f"{value!r} is not a number")
            return None
        if not math.isfinite(number):
            self.problem(field, f"{value!r} is not a finite number")
            return None
        return number

    def location(self) -> LonLat | None:
        bbox = self.ctx.bbox
        lon = self.number("lon")
        lat = self.number("lat")
        if lon is None or lat is None:
            return None
        lon_text, lat_text = self.row.values["lon"], self.row.values["lat"]
        swapped_hint = "; lon/lat swapped?"
        if not -180.0 <= lon <= 180.0:
            self.problem("lon", f"{lon_text} is not a longitude (-180..180)")
            return None
        if not -90.0 <= lat <= 90.0:
            hint = swapped_hint if -90.0 <= lon <= 90.0 else ""
            self.problem("lat", f"{lat_text} is not a latitude (-90..90){hint}")
            return None
        if lon == 0.0 and lat == 0.0:
            self.problem("lon", "0,0 is a placeholder, not a location (geocoding failed?)")
            return None
        if bbox is not None and not _inside(bbox, lon, lat):
            min_lon, min_lat, max_lon, max_lat = bbox
            field = "lon" if not min_lon <= lon <= max_lon else "lat"
            hint = swapped_hint if _inside(bbox, lat, lon) else ""
            self.problem(
                field,
                f"({lon_text}, {lat_text}) is outside the service area "
                f"lon {min_lon:g}..{max_lon:g}, lat {min_lat:g}..{max_lat:g}{hint}",
            )
            return None
        return LonLat(lon, lat)


def _inside(bbox: tuple[float, float, float, float], lon: float, lat: float) -> bool:
    min_lon, min_lat, max_lon, max_lat = bbox
    return min_lon <= lon <= max_lon and min_lat <= lat <= max_lat


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(value)


def _check_id(fields: _Fields, id_field: str, first_seen: dict[str, int]) -> str:
    """Read the row's id, reporting empty and duplicate ids; returns '' if unusable."""
    value = fields.text(id_field)
    if not value:
        return ""
    if any(c.isspace() for c in value):
        fields.problem(id_field, f"{value!r} contains whitespace")
        return ""
    if value in first_seen:
        fields.problem(id_field, f"duplicate id {value!r} (first on line {first_seen[value]})")
        return ""
    first_seen[value] = fields.row.line
    return value


# ---------------------------------------------------------------------------
# Loading


def load_registry(
    directory: Path,
    *,
    default_region: str = "CN",
    bbox: tuple[float, float, float, float] | None = None,
    cache_dir: Path | None = None,
    write_cache: bool = True,
    pace: Callable[[], None] | None = None,
) -> Registry:
    """Read and validate the registry CSV files in ``directory``.

    ``default_region`` (ISO 3166 code) is how phone numbers without ``+`` are read.
    ``bbox`` is the service area ``(min_lon, min_lat, max_lon, max_lat)`` in degrees;
    when given, every elder, responder base and facility must lie inside it.

    ``cache_dir`` (e.g. ``state_dir/registry-cache``): where a validated snapshot is
    kept (see :mod:`gateway.registry_snapshot`). When its fingerprint matches the files'
    bytes and these parameters, the registry is rebuilt from it without validating
    rows again; otherwise the files are validated in full and, if valid, a new snapshot
    is written there (unless ``write_cache`` is false). ``None``: always validate.

    ``pace``, if given, is called between the steps of a rebuild from the snapshot (a
    reload in a worker thread passes one that waits for the event loop's turn).

    Raises :class:`RegistryError` listing every problem found. Raises
    :class:`ValueError` for a bad ``default_region`` or ``bbox`` (caller errors, not
    registry errors).
    """
    if default_region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown phone region {default_region!r}")
    if bbox is not None:
        min_lon, min_lat, max_lon, max_lat = bbox
        if not (all(math.isfinite(v) for v in bbox)
                and -180 <= min_lon < max_lon <= 180 and -90 <= min_lat < max_lat <= 90):
            raise ValueError(f"bbox {bbox!r} is not (min_lon, min_lat, max_lon, max_lat)")

    with _gc_paused():
        registry = _load(directory, default_region, bbox, cache_dir, write_cache, pace)
        # It lives until a reload: frozen before the collector is on again. Else the next
        # collection, in whichever thread, walks all of its objects at once (about 100 ms
        # holding the GIL for a city: an event-loop stall when a reload loads in a
        # worker thread). Nothing of it is garbage; what the loop made meanwhile is
        # freed by reference counting, only its cycles (rare) are kept.
        gc.freeze()
        return registry


@contextmanager
def _gc_paused() -> Iterator[None]:
    # A city's load makes millions of objects and frees few: the cyclic collector's
    # passes over them (each generation-2 pass walks them all) cost seconds, for nothing.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load(
    directory: Path,
    default_region: str,
    bbox: tuple[float, float, float, float] | None,
    cache_dir: Path | None,
    write_cache: bool,
    pace: Callable[[], None] | None = None,
) -> Registry:
    problems = _Problems()
    if not directory.is_dir():
        problems.add(directory, None, None, "registry directory not found")
        raise RegistryError(problems.items)
    files = _read_files(directory, problems)
    key: str | None = None
    if cache_dir is not None and not problems.items:
        key = snapshot_key(files, default_region, bbox)
        cached = read_snapshot(cache_dir, key, pace)
        if cached is not None:
            log.info("registry.loaded", directory=str(directory), snapshot=True,
                     **registry_summary(cached))
            return cached
    phones: dict[str, _Phone] = {}
    if cache_dir is not None:
        phones = {raw: _Phone(e164, None, None if lt is None else LineType(lt))
                  for raw, e164, lt in read_phones(cache_dir, default_region)}
    known = len(phones)
    try:
        registry = _validate(directory, files, problems, default_region, bbox, phones)
    finally:
        # Also after a refused registry: the next try, with the typo fixed, is fast.
        if cache_dir is not None and write_cache and len(phones) != known:
            write_phones(cache_dir, default_region,
                         ((raw, p.e164, None if p.line_type is None else p.line_type.value)
                          for raw, p in phones.items()))
    if cache_dir is not None and key is not None and write_cache:
        write_snapshot(cache_dir, key, registry)
    return registry


def _validate(
    directory: Path,
    files: Mapping[str, bytes],
    problems: _Problems,
    default_region: str,
    bbox: tuple[float, float, float, float] | None,
    phones: dict[str, _Phone],
) -> Registry:
    """Full validation of the files' bytes (``problems`` may already hold read errors).

    ``phones``: numbers already known valid (as written -> what they are); the numbers
    validated here are added to it.
    """
    ctx = _Context(default_region, bbox, problems, phones, {})

    # One table's rows at a time: a city's rows (a dict each) all alive at once would
    # be most of the load's peak memory.
    rows = _read_table(directory, _ELDERS, files, problems)
    elders, known_elders = _parse_elders(directory, rows, ctx)
    rows = _read_table(directory, _DEVICES, files, problems)
    devices_read = rows is not None
    devices, device_owners = _parse_devices(directory, rows, known_elders, ctx)
    rows = _read_table(directory, _CONTACTS, files, problems)
    contacts_read = rows is not None
    contacts, contact_owners = _parse_contacts(directory, rows, known_elders, ctx)
    rows = _read_table(directory, _RESPONDERS, files, problems)
    responders = _parse_responders(directory, rows, ctx)
    rows = _read_table(directory, _FACILITIES, files, problems)
    facilities = _parse_facilities(directory, rows, ctx)
    del rows

    # An elder without a device cannot raise an alarm; one without a contact cannot be
    # reported to anyone. Only judged when the other file was readable at all.
    elders_path = directory / _ELDERS.name
    for elder_id, line in (known_elders or {}).items():
        if devices_read and elder_id not in device_owners:
            problems.add(elders_path, line, "elder_id",
                         f"elder {elder_id!r} has no device in devices.csv: "
                         "they cannot raise an alarm")
        if contacts_read and elder_id not in contact_owners:
            problems.add(elders_path, line, "elder_id",
                         f"elder {elder_id!r} has no contact in contacts.csv: "
                         "nobody can be told of their alarm")

    if problems.items:
        log.warning("registry.invalid", directory=str(directory), problems=len(problems.items))
        order = {name: i for i, name in enumerate(REGISTRY_FILES)}
        raise RegistryError(sorted(
            problems.items, key=lambda p: (order.get(p.file.name, -1), p.line or 0)
        ))

    if ctx.overrides:
        _apply_overrides(ctx.overrides, contacts, responders, facilities)
    elder_map = {
        elder_id: replace(elder, contacts=tuple(contacts[elder_id]))
        for elder_id, elder in elders.items()
    }
    registry = Registry.build(
        MappingProxyType(elder_map),
        MappingProxyType(devices),
        MappingProxyType(responders),
        MappingProxyType(facilities),
    )
    log.info("registry.loaded", directory=str(directory), **registry_summary(registry))
    return registry


def _apply_overrides(
    overrides: Mapping[str, tuple[str, int, bool]],
    contacts: dict[str, list[Contact]],
    responders: dict[str, Responder],
    facilities: dict[str, Facility],
) -> None:
    # ``voice_only`` describes the line, not the row: a facility's duty phone marked
    # "takes SMS" is texted as a contact too. Only registries with overrides pay this pass.
    def capable(phone: str, current: bool) -> bool:
        found = overrides.get(phone)
        return current if found is None else not found[2]

    for people in contacts.values():
        people[:] = [c if capable(c.phone, c.sms_capable) == c.sms_capable
                     else replace(c, sms_capable=not c.sms_capable) for c in people]
    for rid, r in responders.items():
        if capable(r.phone, r.sms_capable) != r.sms_capable:
            responders[rid] = replace(r, sms_capable=not r.sms_capable)
    for fid, fac in facilities.items():
        if capable(fac.duty_phone, fac.sms_capable) != fac.sms_capable:
            facilities[fid] = replace(fac, sms_capable=not fac.sms_capable)


def _parse_elders(
    directory: Path,
    rows: list[_Row] | None,
    ctx: _Context,
) -> tuple[dict[str, Elder], dict[str, int] | None]:
    """Valid elders (contacts not yet attached), and every usable elder id with its line.

    The ids include elders whose rows have other problems, so that rows referring
    to them are not also reported as dangling. ``None`` when the file is unusable.
    """
    elders: dict[str, Elder] = {}
    if rows is None:
        return elders, None
    path = directory / _ELDERS.name
    first_seen: dict[str, int] = {}
    for row in rows:
        f = _Fields(path, row, ctx)
        elder_id = _check_id(f, "elder_id", first_seen)
        name, address, community = f.text("name"), f.text("address"), f.text("community")
        location = f.location()
        phone = f.phone("phone", required=False)
        if f.ok and elder_id and location is not None:
            share = ctx.share
            elders[elder_id] = Elder(
                elder_id=share(elder_id), name=share(name), address=address,
                community=share(community), location=location, phone=phone,
                notes=share(f.optional("notes")),
            )
    return elders, first_seen


def _parse_devices(
    directory: Path,
    rows: list[_Row] | None,
    known_elders: Mapping[str, int] | None,
    ctx: _Context,
) -> tuple[dict[str, Device], set[str]]:
    """Devices by id, and the ids of elders that at least one device row names."""
    devices: dict[str, Device] = {}
    owners: set[str] = set()
    if rows is None:
        return devices, owners
    path = directory / _DEVICES.name
    first_seen: dict[str, int] = {}
    addresses: dict[DeviceAddress, tuple[int, str]] = {}
    topics: dict[str, tuple[int, str]] = {}
    for row in rows:
        f = _Fields(path, row, ctx)
        device_id = _check_id(f, "device_id", first_seen)
        elder_id = _elder_ref(f, known_elders)
        if elder_id:
            owners.add(elder_id)
        scheme = f.choice("scheme", AddressScheme, (s.value for s in DEVICE_SCHEMES))
        if scheme is AddressScheme.RECEIVER:
            f.problem("scheme", "'receiver' identifies an alarm receiver, not an elder's "
                      f"device; use {'|'.join(s.value for s in DEVICE_SCHEMES)}")
            scheme = None
        raw_address = f.text("address")
        address: str | None = None
        if scheme is AddressScheme.PHONE and raw_address:
            address = f.phone("address")  # the same parse cache as every other number
        elif scheme is not None and raw_address:
            try:
                address = normalise_device_address(scheme, raw_address, ctx.region)
            except FieldValueError as exc:
                f.problem("address", exc.reason)
        if scheme is not None and address is not None:
            key = DeviceAddress(scheme, address)
            shown = mask_phone(address) if scheme is AddressScheme.PHONE else address
            if key in addresses:
                first_line, first_id = addresses[key]
                f.problem("address", f"{scheme.value} address {shown!r} is already device "
                          f"{first_id!r} (line {first_line})")
            else:
                addresses[key] = (row.line, device_id)
                if scheme is AddressScheme.MQTT:
                    topics[address] = (row.line, device_id)
        interval = f.number("test_interval_h", required=False)
        if interval is not None and interval <= 0:
            f.problem("test_interval_h", f"{f.optional('test_interval_h')} is not positive")
            interval = None
        if f.ok and device_id and elder_id and scheme is not None and address is not None:
            devices[device_id] = Device(device_id, ctx.share(elder_id), scheme, address,
                                        ctx.share(f.optional("model")), interval)
    _check_nested_topics(path, topics, ctx.problems)
    return devices, owners


def _check_nested_topics(
    path: Path, topics: Mapping[str, tuple[int, str]], problems: _Problems
) -> None:
    # A device's sub-topics (e.g. "<base>/availability") must not be another device's
    # base topic, or one message would be attributed to two devices.
    for topic, (line, _device_id) in topics.items():
        parts = topic.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in topics:
                owner_line, owner = topics[parent]
                problems.add(path, line, "address",
                             f"topic {topic!r} lies under the topic of device {owner!r} "
                             f"(line {owner_line})")


def _elder_ref(f: _Fields, known_elders: Mapping[str, int] | None) -> str:
    elder_id = f.text("elder_id")
    if elder_id and known_elders is not None and elder_id not in known_elders:
        f.problem("elder_id", f"unknown elder {elder_id!r} (not in elders.csv)")
        return ""
    return elder_id


def _parse_contacts(
    directory: Path,
    rows: list[_Row] | None,
    known_elders: Mapping[str, int] | None,
    ctx: _Context,
) -> tuple[dict[str, list[Contact]], set[str]]:
    """Contacts grouped by elder id, and the ids of elders that any contact row names."""
    contacts: dict[str, list[Contact]] = {}
    owners: set[str] = set()
    if rows is None:
        return contacts, owners
    path = directory / _CONTACTS.name
    seen_phones: dict[tuple[str, str], int] = {}
    for row in rows:
        f = _Fields(path, row, ctx)
        elder_id = _elder_ref(f, known_elders)
        if elder_id:
            owners.add(elder_id)
        name = f.text("name")
        texted = f.texted_phone("phone")
        phone = None if texted is None else texted[0]
        language = f.optional("language").lower() or "zh"
        if language not in _LANGUAGES:
            f.problem("language", f"{f.optional('language')!r} is not one of zh|en")
        if elder_id and phone is not None:
            first = seen_phones.setdefault((elder_id, phone), row.line)
            if first != row.line:
                f.problem("phone", f"{mask_phone(phone)} is already a contact of "
                          f"{elder_id!r} (line {first}); they would be told twice")
        if f.ok and elder_id and texted is not None:
            contacts.setdefault(elder_id, []).append(
                Contact(name=ctx.share(name), phone=texted[0],
                        relation=ctx.share(f.optional("relation")),
                        language=ctx.share(language), line_type=texted[1],
                        sms_capable=texted[2])
            )
    return contacts, owners


def _parse_responders(
    directory: Path,
    rows: list[_Row] | None,
    ctx: _Context,
) -> dict[str, Responder]:
    responders: dict[str, Responder] = {}
    if rows is None:
        return responders
    path = directory / _RESPONDERS.name
    first_seen: dict[str, int] = {}
    for row in rows:
        f = _Fields(path, row, ctx)
        responder_id = _check_id(f, "responder_id", first_seen)
        name, community = f.text("name"), f.text("community")
        texted = f.texted_phone("phone")
        role = f.choice("role", ResponderRole, (r.value for r in ResponderRole))
        on_duty = f.choice("on_duty", _parse_bool, _BOOLS)
        base = f.location()
        if (f.ok and responder_id and texted is not None and role is not None
                and on_duty is not None and base is not None):
            responders[responder_id] = Responder(
                responder_id, ctx.share(name), texted[0], ctx.share(community), role,
                on_duty, base,
                line_type=texted[1], sms_capable=texted[2],
            )
    return responders


def _parse_facilities(
    directory: Path,
    rows: list[_Row] | None,
    ctx: _Context,
) -> dict[str, Facility]:
    facilities: dict[str, Facility] = {}
    if rows is None:
        return facilities
    path = directory / _FACILITIES.name
    first_seen: dict[str, int] = {}
    for row in rows:
        f = _Fields(path, row, ctx)
        facility_id = _check_id(f, "facility_id", first_seen)
        name = f.text("name")
        kind = f.choice("kind", FacilityKind, (k.value for k in FacilityKind))
        # Duty desks are landlines as a rule: the check-config wave check reports what
        # that means, rather than one warning per facility at every load.
        texted = f.texted_phone("duty_phone", warn=False)
        location = f.location()
        if f.ok and facility_id and kind is not None and texted is not None and location:
            facilities[facility_id] = Facility(
                facility_id, name, kind, texted[0], location, f.optional("address"),
                line_type=texted[1], sms_capable=texted[2],
            )
    return facilities


# ---------------------------------------------------------------------------
# Summary


def registry_summary(reg: Registry) -> dict[str, int]:
    """Counts for ``gateway check-config`` and the start-up log line.

    Keys: ``elders``, ``communities``, ``contacts``, ``devices`` and
    ``devices_<scheme>`` for each device scheme, ``responders``,
    ``responders_on_duty``, ``responders_<role>`` for each role, ``facilities`` and
    ``facilities_<kind>`` for each kind. Every key is present, zero or not.
    """
    schemes = Counter(d.scheme for d in reg.devices.values())
    roles = Counter(r.role for r in reg.responders.values())
    kinds = Counter(f.kind for f in reg.facilities.values())
    summary: dict[str, int] = {
        "elders": len(reg.elders),
        "communities": len({e.community for e in reg.elders.values()}),
        "contacts": sum(len(e.contacts) for e in reg.elders.values()),
        "devices": len(reg.devices),
    }
    summary.update({f"devices_{s.value}": schemes[s] for s in DEVICE_SCHEMES})
    summary["responders"] = len(reg.responders)
    summary["responders_on_duty"] = sum(1 for r in reg.responders.values() if r.on_duty)
    summary.update({f"responders_{r.value}": roles[r] for r in ResponderRole})
    summary["facilities"] = len(reg.facilities)
    summary.update({f"facilities_{k.value}": kinds[k] for k in FacilityKind})
    return summary
