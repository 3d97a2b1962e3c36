"""Logging: the message ids in every line, secrets never in any line, JSON or key=value text."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pythonjsonlogger.json import JsonFormatter

from chiffon_worker.log import _json_formatter, message_context, setup_logging

Setup = Callable[..., io.StringIO]
LOGGER = logging.getLogger("chiffon_worker.tests")


@pytest.fixture
def logging_to() -> Iterator[Setup]:
    """setup_logging into a StringIO; afterwards the root logger is as it was."""
    root = logging.getLogger()
    pika = logging.getLogger("pika")
    saved_handlers, saved_level, saved_pika_level = list(root.handlers), root.level, pika.level
    saved_flags = logging.logProcesses, logging.logMultiprocessing
    installed: list[logging.Handler] = []

    def setup(fmt: str = "json", secrets: tuple[str, ...] = ()) -> io.StringIO:
        stream = io.StringIO()
        installed.append(setup_logging("INFO", fmt, secrets, stream=stream))
        return stream

    yield setup
    for handler in installed:
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    pika.setLevel(saved_pika_level)
    logging.logProcesses, logging.logMultiprocessing = saved_flags


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_ids_of_the_message_being_handled(logging_to: Setup) -> None:
    stream = logging_to("json")

    with message_context(trace_id="t-1", request_id="r-1", task_id="k-1"):
        LOGGER.info("work started")

    [line] = json_lines(stream)
    assert (line["trace_id"], line["request_id"], line["task_id"]) == ("t-1", "r-1", "k-1")
    assert line["message"] == "work started"


def test_json_lines_have_null_ids_outside_a_message(logging_to: Setup) -> None:
    stream = logging_to("json")

    with message_context(trace_id="t-1", request_id="r-1", task_id="k-1"):
        LOGGER.info("inside")
    LOGGER.info("after")

    after = json_lines(stream)[-1]
    assert after["message"] == "after"
    assert (after["trace_id"], after["request_id"], after["task_id"]) == (None, None, None)


def test_explicit_extra_id_wins_over_the_ambient_one(logging_to: Setup) -> None:
    stream = logging_to("json")

    with message_context(trace_id="ambient"):
        LOGGER.info("duplicate", extra={"trace_id": "explicit"})

    assert json_lines(stream)[0]["trace_id"] == "explicit"


def test_text_lines_carry_fields_as_key_value(logging_to: Setup) -> None:
    stream = logging_to("text")

    with message_context(trace_id="t-1"):
        LOGGER.info("work finished", extra={"work_type": "echo", "duration_ms": 12})

    line = stream.getvalue()
    assert "work finished" in line
    assert "work_type=echo" in line
    assert "duration_ms=12" in line
    assert "trace_id=t-1" in line


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secret_never_appears_in_message_or_fields(logging_to: Setup, fmt: str) -> None:
    stream = logging_to(fmt, secrets=("hunter2-pw",))

    LOGGER.warning("connecting to amqp://app:hunter2-pw@node1/")
    LOGGER.warning("retrying", extra={"url": "amqp://app:hunter2-pw@node1/"})
    try:
        raise RuntimeError("login hunter2-pw refused")
    except RuntimeError:
        LOGGER.exception("broker said no")

    output = stream.getvalue()
    assert output.count("\n") >= 3
    assert "hunter2-pw" not in output
    assert "***" in output


@pytest.mark.parametrize("secret", ['pa"ss', "pa\\ss"], ids=["quote", "backslash"])
def test_secret_with_json_escaped_characters_never_appears(logging_to: Setup, secret: str) -> None:
    stream = logging_to("json", secrets=(secret,))

    LOGGER.warning("login failed", extra={"password": secret})

    assert json_lines(stream)[0]["password"] != secret


def _record(msg: object, **extra: Any) -> logging.LogRecord:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info() if extra.pop("with_exception", False) else None
    record = LOGGER.makeRecord(LOGGER.name, logging.WARNING, __file__, 1, msg, (), exc_info)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(lambda: _record("work finished", work_type="echo", exit_code=0), id="extras"),
        pytest.param(lambda: _record("work raised", with_exception=True), id="exception"),
        pytest.param(lambda: _record({"event": "dict message", "name": "x"}), id="dict-message"),
        pytest.param(lambda: _record("ünïcode %s", trace_id=None, _private=1), id="unicode"),
    ],
)
def test_our_json_formatter_writes_what_python_json_logger_writes(
    record: Callable[[], logging.LogRecord],
) -> None:
    """The per-task fast path must not change a line: same fields, same values."""
    stock = JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        timestamp=False,
        json_ensure_ascii=False,
    )
    ours = _json_formatter()
    made = record()
    assert json.loads(ours.format(made)) == json.loads(stock.format(made))
