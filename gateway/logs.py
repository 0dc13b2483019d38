"""Structured logging: JSON lines on stdout for journald, a console renderer for humans.

Every log line about an alarm carries ``alarm_id`` (bound with structlog's
contextvars inside the task that handles it), so ``jq 'select(.alarm_id=="...")'``
shows an alarm's whole life.

Under systemd each JSON line starts with its syslog priority, ``<3>{"event": ...}``:
journald stores every stdout line at priority info unless it starts with ``<N>``
(``SyslogLevelPrefix=yes``, systemd's default), strips the prefix and files the line
at that priority, so ``journalctl -p err`` shows ``journal.write_failed`` and
``receiver.down``. The prefix is written when ``logging.format = "journald"``, or when
the format is ``auto``/``json`` and stdout is the stream systemd connected to the
journal (``$JOURNAL_STREAM`` names its device and inode; a child whose stdout was
redirected elsewhere inherits the variable but not the stream, and gets plain JSON).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal, TextIO

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}

# syslog(3) priorities, as journald reads them from a ``<N>`` prefix.
PRIORITIES = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
_PREFIXES = {level: f"<{n}>".encode() for level, n in PRIORITIES.items()}
_INFO = _PREFIXES["info"]

Format = Literal["auto", "json", "console", "journald"]


def _orjson_dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default or str)


def _journald_json(_logger: Any, _method: str, event_dict: Any) -> bytes:
    """The JSON line with its syslog priority in front (the last processor)."""
    prefix = _PREFIXES.get(event_dict.get("level", "info"), _INFO)
    return prefix + orjson.dumps(event_dict, default=str)


def connected_to_journal(stream: TextIO) -> bool:
    """True when ``stream`` is the stdout/stderr systemd connected to journald."""
    wanted = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = wanted.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no descriptor (a StringIO, closed)
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class _PriorityFormatter(logging.Formatter):
    """Stdlib logging (paho, aiohttp) on stderr, with the priority prefix for journald."""

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower()
        prefix = PRIORITIES.get(level, 4 if record.levelno >= logging.WARNING else 6)
        return f"<{prefix}>{super().format(record)}"


def configure_logging(
    level: str = "info",
    fmt: Format = "auto",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog once for the process."""
    out = stream or sys.stdout
    journald = fmt == "journald" or (fmt in ("auto", "json") and connected_to_journal(out))
    use_console = not journald and (fmt == "console" or (fmt == "auto" and out.isatty()))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_console:
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=out.isatty())]
        factory: Any = structlog.PrintLoggerFactory(out)
    else:
        renderer: Any = _journald_json if journald else \
            structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        processors = [*shared, structlog.processors.format_exc_info, renderer]
        binary: Any = getattr(out, "buffer", None) or out
        factory = structlog.BytesLoggerFactory(binary)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        # Not cached: the demo and the benchmarks reconfigure logging in-process, and a
        # cached logger would keep writing to the previous (closed) stream.
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (paho, aiohttp) go to stderr at warning level
    # (under systemd, stderr is the same journal stream: the same priority prefix).
    handler = logging.StreamHandler(sys.stderr)
    text = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(_PriorityFormatter(text) if journald else logging.Formatter(text))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
