"""The server's log: one line per record, as ``key=value`` text or as a JSON object, configured
once by ``configure``.

A record's ``extra`` fields are its context (``session_id``, ``node`` ...); values that a client
chose never break a line or forge a field: text values with spaces, quotes, ``=`` or control
characters are written as JSON strings. Repeated warnings — one bad client can make a library log
thousands a second — are written at most once per ``THROTTLE_S`` per message, with a count of
those left out, and a traceback of a client's malformed input (a ``ValueError`` while decoding its
packet, say) is left out too: the message says what happened.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

THROTTLE_S = 10.0
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_PLAIN = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/-+@,[]()'")
_INPUT_ERRORS = (ValueError, RecursionError, UnicodeDecodeError, KeyError, TypeError)


def context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


def _value(value: Any) -> str:
    text = str(value)
    if text and all(c in _PLAIN for c in text):
        return text
    return json.dumps(text)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` with the record's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = context(record)
        if fields:
            line += " " + " ".join(f"{k}={_value(v)}" for k, v in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the context, a traceback."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "node": self.node,
        }
        out.update(
            {
                k: v if isinstance(v, int | float | bool) else str(v)
                for k, v in context(record).items()
            }
        )
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class Throttle(logging.Filter):
    """Warnings and errors at most once per ``THROTTLE_S`` per (logger, message)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._left_out: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        library = not record.name.startswith("server.")  # choking on a client's bytes
        if library and record.exc_info and isinstance(record.exc_info[1], _INPUT_ERRORS):
            record.exc_info, record.exc_text = None, None
        key = (record.name, str(record.msg))
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < THROTTLE_S:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return False
        self._last[key] = now
        left_out = self._left_out.pop(key, 0)
        if left_out:
            record.left_out = left_out  # shown with the context: how many were not written
        return True


def configure(level: str, *, json_logs: bool = False, node: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(node)
        if json_logs
        else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(Throttle())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for noisy in ("engineio", "socketio", "werkzeug", "eventlet.wsgi"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def own_library_loggers() -> None:
    """python-engineio and python-socketio give their loggers a plain handler of their own when
    they find none configured at that moment: every line twice, and the second one neither
    formatted nor throttled. Theirs go; their records reach this module's handler."""
    for name in ("engineio.server", "socketio.server"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
