"""Logging set-up: JSON or text lines, the message ids in every record, no secrets.

The ids of the message being handled live in a ContextVar, set with
`message_context(...)`; a filter copies them into every record, so a log line
written deep inside user code still carries the trace_id.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, TextIO

from pydantic_core import to_json
from pythonjsonlogger.json import JsonFormatter

CONTEXT_FIELDS = ("trace_id", "request_id", "task_id")
# Values are strings or UUIDs (written as their text; a UUID is not turned
# into a string for every message in case nothing is logged).
_EMPTY: dict[str, object] = dict.fromkeys(CONTEXT_FIELDS)
_context: ContextVar[dict[str, object]] = ContextVar("chiffon_log_context", default=_EMPTY)

logger = logging.getLogger("chiffon_worker")


class LogContext:
    """While entered, every record carries these ids (a dict with every CONTEXT_FIELD).

    A class rather than a generator-based context manager: one is entered
    for every message, and this costs a third as much.
    """

    __slots__ = ("_ids", "_token")

    def __init__(self, ids: dict[str, object]) -> None:
        self._ids = ids

    def __enter__(self) -> None:
        self._token: Token[dict[str, object]] = _context.set(self._ids)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        _context.reset(self._token)


def message_context(**ids: object) -> LogContext:
    """Attach trace_id / request_id / task_id (over the ambient ones) to records inside."""
    current = dict(_context.get())
    current.update({k: (None if v is None else str(v)) for k, v in ids.items()})
    return LogContext(current)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        for key, value in _context.get().items():
            # An explicit extra={"trace_id": ...} wins over the ambient one.
            if fields.get(key) is None:
                fields[key] = value
        return True


class _Redacting(logging.Formatter):
    """Wraps a formatter and blanks out secrets in whatever it produced."""

    def __init__(self, inner: logging.Formatter, secrets: Sequence[str]) -> None:
        super().__init__()
        self._inner = inner
        # Also the JSON-escaped spelling: a quote or backslash in a password
        # is written escaped by the JSON formatter and would slip past.
        escaped = [json.dumps(s)[1:-1] for s in secrets if s]
        self._secrets = sorted({s for s in [*secrets, *escaped] if s}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = self._inner.format(record)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _TextFormatter(logging.Formatter):
    """Human lines: time level logger message key=value..."""

    _skip = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {k: v for k, v in record.__dict__.items() if k not in self._skip and v is not None}
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def _serialize(document: object, **_options: object) -> str:
    """pydantic-core's encoder: a third of json.dumps's cost on the per-task line."""
    try:
        return to_json(document, fallback=str).decode("utf-8")
    except ValueError:  # what it cannot encode (bytes that are not UTF-8, say)
        return json.dumps(document, default=str, ensure_ascii=False)


# Our format's fields and their names in the JSON line.
_RENAMED = {"asctime": "time", "levelname": "level", "name": "logger", "message": "message"}


class _JsonFormatter(JsonFormatter):
    """python-json-logger's formatter, made cheaper where the worker logs every task.

    The time stamp is formatted once a second, and `add_fields` does for our
    fixed format what the base class does generically (a unit test holds the
    two to the same output): together half the cost of a line.
    """

    _stamp: tuple[int, str] = (-1, "")

    def __init__(self) -> None:
        super().__init__(
            " ".join(f"%({field})s" for field in _RENAMED),
            rename_fields={k: v for k, v in _RENAMED.items() if k != v},
            timestamp=False,
            json_serializer=_serialize,
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        fields = record.__dict__
        for field, name in _RENAMED.items():
            log_data[name] = fields.get(field)
        for key, value in message_dict.items():
            log_data[_RENAMED.get(key, key)] = value
        skip = self._skip_fields
        for key, value in fields.items():
            if key not in skip and not key.startswith("_"):
                log_data[key] = value

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = (second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second)))
            self._stamp = stamp  # one assignment: safe for records from other threads
        # The same text as logging's default: "2026-11-28 20:29:51,975".
        return f"{stamp[1]},{int(record.msecs):03d}"


def _json_formatter() -> logging.Formatter:
    return _JsonFormatter()


def setup_logging(
    level: str = "INFO",
    fmt: str = "json",
    secrets: Sequence[str] = (),
    stream: TextIO | None = None,
) -> logging.Handler:
    """Install one handler on the root logger; returns it so tests can remove it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    inner = (
        _json_formatter()
        if fmt == "json"
        else _TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    handler.setFormatter(_Redacting(inner, secrets))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Nobody reads a record's process name or pid here (one worker, one
    # process; the journal has the pid), and looking them up is a fifth of
    # what the per-task line costs.
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # pika logs each connection failure as several ERROR lines with tracebacks;
    # the worker logs the same event once, in its own words. Keep pika for DEBUG.
    logging.getLogger("pika").setLevel(
        logging.DEBUG if root.level <= logging.DEBUG else logging.CRITICAL
    )
    return handler
