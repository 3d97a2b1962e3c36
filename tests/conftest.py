"""Checks every test gets: no thread may die with an unhandled exception."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_thread_died() -> Iterator[None]:
    died: list[str] = []
    previous = threading.excepthook

    def record(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread else "?"
        died.append(f"{name}: {args.exc_type.__name__}: {args.exc_value}")

    threading.excepthook = record
    try:
        yield
    finally:
        threading.excepthook = previous
    assert not died, f"threads died during the test: {died}"
