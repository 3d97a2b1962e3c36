"""Logging set-up: JSON or text lines, the message ids in every record, no secrets.

The ids of the message being handled live in a ContextVar, set with
`message_context(...)`; a filter copies them into every record, so a log line
written deep inside user code still carries the trace_id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

CONTEXT_FIELDS = ("trace_id", "request_id", "task_id")
_EMPTY: dict[str, str | None] = dict.fromkeys(CONTEXT_FIELDS)
_context: ContextVar[dict[str, str | None]] = ContextVar("chiffon_log_context", default=_EMPTY)

logger = logging.getLogger("chiffon_worker")


@contextlib.contextmanager
def message_context(**ids: object) -> Iterator[None]:
    """Attach trace_id / request_id / task_id to every record logged inside."""
    current = dict(_context.get())
    current.update({k: (None if v is None else str(v)) for k, v in ids.items()})
    token = _context.set(current)
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            # An explicit extra={"trace_id": ...} wins over the ambient one.
            if getattr(record, key, None) is None:
                setattr(record, key, value)
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


def _json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        timestamp=False,
        json_ensure_ascii=False,
    )


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
    # pika logs each connection failure as several ERROR lines with tracebacks;
    # the worker logs the same event once, in its own words. Keep pika for DEBUG.
    logging.getLogger("pika").setLevel(
        logging.DEBUG if root.level <= logging.DEBUG else logging.CRITICAL
    )
    return handler
