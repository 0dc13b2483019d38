"""Structured logging: JSON lines on stdout for journald, a console renderer for humans.

Every log line about an alarm carries ``alarm_id`` (bound with structlog's
contextvars inside the task that handles it), so ``jq 'select(.alarm_id=="...")'``
shows an alarm's whole life.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _orjson_dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default or str)


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog once for the process."""
    out = stream or sys.stdout
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_console:
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=out.isatty())]
        factory: Any = structlog.PrintLoggerFactory(out)
    else:
        processors = [
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
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
    # Libraries that use stdlib logging (paho, aiohttp) go to stderr at warning level.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
