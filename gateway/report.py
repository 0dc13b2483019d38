"""The daily report: what happened on one local day of the command center.

For a local day (``gateway.timezone``, the center's midnight to midnight, via zoneinfo):
alarms by kind, code and source; time from the press to the first SMS Twilio (or the
GSM modem) accepted, p50/p95; time to acknowledgement, p50/p95; the alarms nobody
acknowledged and those that escalated (reached wave 2 or later); the alarms the gateway
closed by itself; devices reported offline or low on battery that day (from the
notices). Drills are counted apart and are in none of the figures (the journal's
``alarms.drill`` column, when the journal has one).

Percentiles are nearest-rank (p95 of 3 values is the largest): with a few alarms a day,
an interpolated value would be one that never happened.

:func:`build_report` is a pure read of a SQLite connection, so the running gateway
(:func:`report_daily`, journaled and logged as one ``report.daily`` event shortly after
local midnight) and ``gateway report --day`` (:func:`open_journal_readonly`, the file
read directly while the gateway runs) compute the same figures.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import structlog

from gateway.closure import AUTO_RESOLVED
from gateway.config import ReportSection
from gateway.journal import Journal, JournalError

log = structlog.get_logger(__name__)

#: A wall clock that jumps (NTP at boot) is looked at again at least this often.
_MAX_SLEEP_S = 600.0


class ReportError(Exception):
    """The report cannot be made (no journal there, not a journal)."""


def day_bounds(day: date, zone: ZoneInfo) -> tuple[float, float]:
    """[start, end) of local ``day`` as Unix times (a DST day has 23 or 25 hours)."""
    start = datetime(day.year, day.month, day.day, tzinfo=zone)
    nxt = day + timedelta(days=1)
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone)
    return start.timestamp(), end.timestamp()


def local_day(at: float, zone: ZoneInfo) -> date:
    return datetime.fromtimestamp(at, zone).date()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _spread(values: list[float], digits: int) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    return {"count": len(values), "p50": r(percentile(values, 0.50)),
            "p95": r(percentile(values, 0.95)), "max": r(max(values) if values else None)}


def build_report(conn: sqlite3.Connection, day: date, zone: ZoneInfo, *,
                 generated_at: float) -> dict[str, Any]:
    """The report of local ``day`` from a journal connection (read-only is enough)."""
    start, end = day_bounds(day, zone)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(alarms)")}
    drill = "COALESCE(a.drill, 0)" if "drill" in columns else "0"
    rows = conn.execute(
        f"SELECT a.alarm_id, a.device_id, a.code, a.source, a.state, a.received_at,"
        f" a.acknowledged_at, a.note, {drill},"
        " (SELECT m.kind FROM device_messages m WHERE m.alarm_id = a.alarm_id"
        "  ORDER BY m.id LIMIT 1),"
        " (SELECT MIN(n.latency_ms) FROM notifications n WHERE n.alarm_id = a.alarm_id"
        "  AND n.kind = 'escalation' AND n.wave = 1 AND n.latency_ms IS NOT NULL),"
        " (SELECT MIN(l.at) FROM alarm_log l WHERE l.alarm_id = a.alarm_id"
        "  AND l.event = 'sms.accepted'),"
        " (SELECT MAX(n.wave) FROM notifications n WHERE n.alarm_id = a.alarm_id"
        "  AND n.kind = 'escalation')"
        " FROM alarms a WHERE a.received_at >= ? AND a.received_at < ?"
        " ORDER BY a.received_at", (start, end)).fetchall()
    kinds: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    drills: Counter[str] = Counter()
    first_sms_ms: list[float] = []
    ack_s: list[float] = []
    no_sms: list[str] = []
    unacked: list[dict[str, Any]] = []
    escalated: list[str] = []
    auto_resolved = 0
    count = 0
    for (alarm_id, device_id, code, source, state, received_at, acked_at, note,
         is_drill, kind, latency_ms, accepted_at, max_wave) in rows:
        kind = kind or "emergency"
        if is_drill:
            drills[kind] += 1
            continue
        count += 1
        kinds[kind] += 1
        codes[code] += 1
        sources[source.split(":", 1)[0]] += 1
        # The notifier measures wave 1 from the press on the monotonic clock; a row a
        # restart reconciled has no latency, so its journaled acceptance time is used.
        if latency_ms is not None:
            first_sms_ms.append(float(latency_ms))
        elif accepted_at is not None:
            first_sms_ms.append(max(0.0, (accepted_at - received_at) * 1000))
        else:
            no_sms.append(alarm_id)
        if acked_at is not None:
            ack_s.append(max(0.0, acked_at - received_at))
        else:
            unacked.append({"alarm_id": alarm_id, "device_id": device_id, "state": state})
        if state == "resolved" and note and note.startswith(AUTO_RESOLVED):
            auto_resolved += 1
        if max_wave is not None and max_wave >= 2:
            escalated.append(alarm_id)
    devices = {}
    for key, notice_kind in (("offline", "device.offline"), ("low_battery",
                                                             "device.low_battery")):
        devices[key] = [r[0] for r in conn.execute(
            "SELECT DISTINCT subject FROM notices WHERE kind = ? AND at >= ? AND at < ?"
            " ORDER BY subject", (notice_kind, start, end))]
    return {
        "day": day.isoformat(),
        "zone": zone.key,
        "from": start,
        "to": end,
        "generated_at": generated_at,
        "alarms": count,
        "by_kind": dict(sorted(kinds.items())),
        "by_code": dict(sorted(codes.items())),
        "by_source": dict(sorted(sources.items())),
        "first_sms_ms": _spread(first_sms_ms, 1),
        "without_sms": no_sms,
        "acknowledgement_s": _spread(ack_s, 1),
        "unacknowledged": unacked,
        "escalated": escalated,
        "auto_resolved": auto_resolved,
        "devices_offline": devices["offline"],
        "devices_low_battery": devices["low_battery"],
        "drills": {"count": sum(drills.values()), "by_kind": dict(sorted(drills.items()))},
    }


def open_journal_readonly(path: Path) -> sqlite3.Connection:
    """Open a journal file read-only (``mode=ro``): safe while the gateway writes it
    (WAL: readers see the last commit and never take the writer's lock)."""
    if not path.is_file():
        raise ReportError(f"{path}: no journal there")
    try:
        conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("SELECT COUNT(*) FROM alarms").fetchone()
    except sqlite3.Error as exc:
        raise ReportError(f"{path}: cannot read the journal: {exc}") from None
    return conn


def format_report(data: dict[str, Any]) -> str:
    """The report as a few lines for a terminal."""

    def spread(d: dict[str, Any], unit: str) -> str:
        if not d["count"]:
            return "none"
        return f"p50 {d['p50']} {unit}, p95 {d['p95']} {unit}, max {d['max']} {unit} " \
               f"(n={d['count']})"

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"

    unacked = data["unacknowledged"]
    lines = [
        f"Daily report {data['day']} ({data['zone']})",
        f"  alarms: {data['alarms']}  (drills apart: {data['drills']['count']})",
        f"  by kind: {counts(data['by_kind'])}",
        f"  by code: {counts(data['by_code'])}",
        f"  by source: {counts(data['by_source'])}",
        f"  press -> first SMS accepted: {spread(data['first_sms_ms'], 'ms')}",
        f"  without any SMS accepted: {', '.join(data['without_sms']) or 'none'}",
        f"  press -> acknowledgement: {spread(data['acknowledgement_s'], 's')}",
        f"  unacknowledged: {len(unacked)}"
        + (": " + ", ".join(f"{u['alarm_id']} ({u['state']})" for u in unacked)
           if unacked else ""),
        f"  escalated (wave 2+): {len(data['escalated'])}"
        + (": " + ", ".join(data["escalated"]) if data["escalated"] else ""),
        f"  closed by the gateway: {data['auto_resolved']}",
        f"  devices offline: {', '.join(data['devices_offline']) or 'none'}",
        f"  devices low on battery: {', '.join(data['devices_low_battery']) or 'none'}",
    ]
    return "\n".join(lines)


async def make_report(journal: Journal, day: date, zone: ZoneInfo, *,
                      clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Compute, journal and log (one ``report.daily`` event) the report of ``day``."""
    now = clock()
    data = await journal.read(lambda conn: build_report(conn, day, zone, generated_at=now))
    await journal.save_report(data["day"], zone.key, data)
    log.info("report.daily", **data)
    return data


async def report_daily(journal: Journal, settings: ReportSection, zone: ZoneInfo, *,
                       clock: Callable[[], float] = time.time,
                       sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """The report of each local day, ``after_midnight_min`` after the next midnight.

    At start, the last finished day's report is made if the journal has none (a
    gateway that was down at midnight catches up)."""
    if not settings.enabled:
        return
    delay_s = settings.after_midnight_min * 60
    while True:
        now = clock()
        # The last day whose end (+ the delay) has passed.
        due_day = local_day(now - delay_s, zone) - timedelta(days=1)
        try:
            if await journal.stored_report(due_day.isoformat()) is None:
                await make_report(journal, due_day, zone, clock=clock)
        except JournalError as exc:
            log.error("report.failed", day=due_day.isoformat(), error=str(exc))
            await sleep(min(_MAX_SLEEP_S, 60.0))
            continue
        _, next_end = day_bounds(due_day + timedelta(days=1), zone)
        await sleep(max(0.05, min(_MAX_SLEEP_S, next_end + delay_s - clock())))
