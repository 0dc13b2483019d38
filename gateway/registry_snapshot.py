"""A validated registry kept as a compact snapshot, so that a start need not validate again.

Validating a city's registry is dominated by ``phonenumbers`` (parse, validity and line
type of ~245k numbers: seconds of CPU). The result depends only on the bytes of the CSV
files and on the validation parameters, so after a full validation succeeds
:func:`gateway.registry.load_registry` writes what it produced here, keyed by
:func:`snapshot_key`, and the next load with the same key rebuilds the objects from
the snapshot instead (``check-config`` in ``ExecStartPre`` thus makes ``run`` fast).

Trust rules: a snapshot is used only when its format version and key match exactly
(the key covers each file's SHA-256, ``default_region``, ``bbox``, the format version
and the ``phonenumbers`` version, whose metadata decides validity and line types); its
body carries its own SHA-256, so a truncated or damaged file is detected. Anything
else (unreadable, foreign version, other key, damaged) is logged and ignored: the
caller validates in full. The format is plain JSON lists (orjson), never pickle, so a
file in the state directory can at worst be rejected, not run.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import orjson
import phonenumbers
import structlog

from devices.events import AddressScheme
from gateway.files import write_atomically
from gateway.model import (
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

__all__ = [
    "PHONES_FILE",
    "SNAPSHOT_FILE",
    "SNAPSHOT_VERSION",
    "phones_key",
    "read_phones",
    "read_snapshot",
    "snapshot_key",
    "write_phones",
    "write_snapshot",
]

log = structlog.get_logger(__name__)

#: Bump whenever what is stored, or what validation accepts, changes.
SNAPSHOT_VERSION: Final = 1
#: The snapshot's name inside the cache directory (one snapshot: the last good registry).
SNAPSHOT_FILE: Final = "registry.snapshot.json"
#: Beside it: what ``phonenumbers`` said of each number, reused when files change.
PHONES_FILE: Final = "phones.json"


class SnapshotError(ValueError):
    """A snapshot that cannot be used (its reason is logged, then it is ignored)."""


def snapshot_key(
    files: Mapping[str, bytes],
    default_region: str,
    bbox: tuple[float, float, float, float] | None,
) -> str:
    """The fingerprint a snapshot must carry to stand for these files and parameters."""
    h = hashlib.sha256()
    h.update(orjson.dumps([SNAPSHOT_VERSION, phonenumbers.__version__, default_region,
                           None if bbox is None else list(bbox)]))
    for name in sorted(files):
        h.update(orjson.dumps([name, hashlib.sha256(files[name]).hexdigest()]))
    return h.hexdigest()


#: Rows per line of the snapshot: the decoder parses one line at a time, so that the
#: parsed lists of a whole city never exist at once next to the objects built from them,
#: and a reload's rebuild gives the event loop its turn after each line (~8 ms of
#: Python for 1000 elders; any size reads back, the writer's is not part of the format).
_CHUNK: Final = 1000


def _sections(reg: Registry) -> list[tuple[str, list[list[Any]]]]:
    return [
        ("elders", [
            [e.elder_id, e.name, e.address, e.community, e.location.lon, e.location.lat,
             e.phone, e.notes,
             [[c.name, c.phone, c.relation, c.language, c.line_type.value, c.sms_capable]
              for c in e.contacts]]
            for e in reg.elders.values()
        ]),
        ("devices", [
            [d.device_id, d.elder_id, d.scheme.value, d.address, d.model, d.test_interval_h]
            for d in reg.devices.values()
        ]),
        ("responders", [
            [r.responder_id, r.name, r.phone, r.community, r.role.value, r.on_duty,
             r.base.lon, r.base.lat, r.line_type.value, r.sms_capable]
            for r in reg.responders.values()
        ]),
        ("facilities", [
            [f.facility_id, f.name, f.kind.value, f.duty_phone, f.location.lon,
             f.location.lat, f.address, f.line_type.value, f.sms_capable]
            for f in reg.facilities.values()
        ]),
    ]


def _encode_body(reg: Registry) -> bytes:
    lines = [orjson.dumps([name, rows[i:i + _CHUNK]])
             for name, rows in _sections(reg) for i in range(0, len(rows), _CHUNK)]
    return b"\n".join(lines)


def write_snapshot(cache_dir: Path, key: str, reg: Registry) -> Path | None:
    """Store ``reg`` under ``key``; atomic (a reader sees the old or the new file).

    Returns the path, or ``None`` (logged) when the directory is not writable: a
    snapshot only saves time, so failing to write one never fails a load.
    """
    return _write(cache_dir / SNAPSHOT_FILE, key, _encode_body(reg))


def _write(path: Path, key: str, body: bytes) -> Path | None:
    header = orjson.dumps({"version": SNAPSHOT_VERSION, "key": key,
                           "sha256": hashlib.sha256(body).hexdigest()})
    try:
        write_atomically(path, header + b"\n" + body, 0o600)
    except OSError as exc:
        log.warning("registry.snapshot_not_written", path=str(path),
                    error=exc.strerror or str(exc), effect="the next start validates in full")
        return None
    log.info("registry.snapshot_written", path=str(path), bytes=len(body))
    return path


def _read(path: Path, key: str) -> tuple[bytes, int] | None:
    """The file's bytes and where its checked body starts; ``None`` (logged) if unusable.

    No file is the normal first start (not logged); any other reason for not using the
    file (other key, foreign version, damaged) is logged with the reason.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("registry.snapshot_ignored", path=str(path),
                    reason=f"cannot read: {exc.strerror or exc}")
        return None
    try:
        return data, _check(data, key)
    except SnapshotError as exc:
        _ignored(path, exc)
        return None


def _ignored(path: Path, exc: SnapshotError) -> None:
    level = log.info if str(exc) == "stale" else log.warning
    level("registry.snapshot_ignored", path=str(path), reason=str(exc))


def read_snapshot(cache_dir: Path, key: str,
                  pace: Callable[[], None] | None = None) -> Registry | None:
    """The registry stored under ``key``, or ``None`` when there is no usable one.
    ``pace`` is called after each line (:data:`_CHUNK` rows) is decoded."""
    path = cache_dir / SNAPSHOT_FILE
    found = _read(path, key)
    if found is None:
        return None
    try:
        return _decode(*found, pace)
    except SnapshotError as exc:
        _ignored(path, exc)
        return None


def _check(data: bytes, key: str) -> int:
    newline = data.find(b"\n")
    if newline < 0:
        raise SnapshotError("damaged: no header")
    try:
        header = orjson.loads(data[:newline])
    except orjson.JSONDecodeError:
        raise SnapshotError("damaged: unreadable header") from None
    if not isinstance(header, dict):
        raise SnapshotError("damaged: unreadable header")
    if header.get("version") != SNAPSHOT_VERSION:
        raise SnapshotError(f"format version {header.get('version')!r}, "
                            f"this gateway reads {SNAPSHOT_VERSION}")
    if header.get("key") != key:
        raise SnapshotError("stale")  # the files or the parameters changed: the usual miss
    if hashlib.sha256(memoryview(data)[newline + 1:]).hexdigest() != header.get("sha256"):
        raise SnapshotError("damaged: checksum mismatch")
    return newline + 1


def _decode(data: bytes, start: int, pace: Callable[[], None] | None) -> Registry:
    # Millions of new containers, none of them garbage: cyclic GC passes over them
    # would take as long as the decode itself.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _build(data, start, pace)
    except (orjson.JSONDecodeError, TypeError, ValueError, IndexError, KeyError) as exc:
        raise SnapshotError(f"damaged: {type(exc).__name__}: {exc}") from None
    finally:
        if was_enabled:
            gc.enable()


# ---------------------------------------------------------------------------
# What phonenumbers said about each number, kept across changes of the files


def phones_key(default_region: str) -> str:
    """What a phone file must carry: the answers depend on the region and the metadata."""
    return hashlib.sha256(orjson.dumps(
        ["phones", SNAPSHOT_VERSION, phonenumbers.__version__, default_region])).hexdigest()


def write_phones(
    cache_dir: Path, default_region: str, phones: Iterable[tuple[str, str, str | None]]
) -> Path | None:
    """Store ``(number as written, E.164, line type or None)`` of every valid number.

    A changed registry mostly names the same numbers: the next full validation looks
    them up here instead of asking ``phonenumbers`` again (most of its time).
    """
    return _write(cache_dir / PHONES_FILE, phones_key(default_region),
                  orjson.dumps(list(phones)))


def read_phones(cache_dir: Path, default_region: str) -> list[tuple[str, str, str | None]]:
    """What :func:`write_phones` stored for this region; empty when nothing usable is."""
    path = cache_dir / PHONES_FILE
    found = _read(path, phones_key(default_region))
    if found is None:
        return []
    data, start = found
    try:
        return _phone_rows(orjson.loads(memoryview(data)[start:]))
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        _ignored(path, SnapshotError(f"damaged: {type(exc).__name__}: {exc}"))
        return []


def _phone_rows(rows: Iterable[Any]) -> list[tuple[str, str, str | None]]:
    out: list[tuple[str, str, str | None]] = []
    for raw, e164, line_type in rows:
        if not (isinstance(raw, str) and isinstance(e164, str)
                and (line_type is None or isinstance(line_type, str))):
            raise TypeError("not (str, str, str | None)")
        out.append((raw, e164, line_type))
    return out


def _chunks(data: bytes, start: int) -> Iterator[memoryview]:
    """The lines of ``data`` from ``start`` on, without copying them."""
    view = memoryview(data)
    end = len(data)
    while start < end:
        stop = data.find(b"\n", start)
        if stop < 0:
            stop = end
        yield view[start:stop]
        start = stop + 1


def _build(data: bytes, start: int, pace: Callable[[], None] | None) -> Registry:
    # Repeated values (names, communities, relations, notes, models, languages, numbers)
    # share one string object, and devices point at their elder's id string, as after a
    # full load: a city has 100k+ of each.
    strings: dict[str, str] = {}
    share = strings.setdefault
    numbers: dict[str, str] = {}
    phones = numbers.setdefault  # a number named in several roles: one string, as on a full load
    line_types = {t.value: t for t in LineType}
    schemes = {s.value: s for s in AddressScheme}
    elders: dict[str, Elder] = {}
    devices: dict[str, Device] = {}
    responders: dict[str, Responder] = {}
    facilities: dict[str, Facility] = {}
    order = ("elders", "devices", "responders", "facilities")
    last = 0
    for chunk in _chunks(data, start):
        section, rows = orjson.loads(chunk)
        at = order.index(section)  # ValueError: damaged
        if at < last:
            raise ValueError(f"section {section!r} out of order")
        last = at
        if section == "elders":
            for eid, name, address, community, lon, lat, phone, notes, contacts in rows:
                elders[eid] = Elder(
                    eid, share(name, name), address, share(community, community),
                    LonLat(float(lon), float(lat)), phone, tuple(
                        Contact(share(cname, cname), phones(cphone, cphone),
                                share(relation, relation), share(lang, lang),
                                line_types[lt], bool(sms))
                        for cname, cphone, relation, lang, lt, sms in contacts
                    ),
                    share(notes, notes),
                )
        elif section == "devices":
            for did, eid, scheme, address, model, interval in rows:
                elder = elders[eid]  # KeyError: damaged
                devices[did] = Device(did, elder.elder_id, schemes[scheme], address,
                                      share(model, model),
                                      None if interval is None else float(interval))
        elif section == "responders":
            for rid, name, phone, community, role, on_duty, lon, lat, lt, sms in rows:
                responders[rid] = Responder(
                    rid, share(name, name), phones(phone, phone), share(community, community),
                    ResponderRole(role),
                    bool(on_duty), LonLat(float(lon), float(lat)), line_types[lt], bool(sms))
        else:
            for fid, name, kind, phone, lon, lat, address, lt, sms in rows:
                facilities[fid] = Facility(
                    fid, name, FacilityKind(kind), phones(phone, phone),
                    LonLat(float(lon), float(lat)),
                    address, line_types[lt], bool(sms))
        del rows
        if pace is not None:
            pace()
    return Registry.build(MappingProxyType(elders), MappingProxyType(devices),
                          MappingProxyType(responders), MappingProxyType(facilities))
