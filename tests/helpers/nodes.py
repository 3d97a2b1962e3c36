"""A private RabbitMQ node (or cluster) for a test module: started once, always stopped.

    @pytest.fixture(scope="module")
    def node() -> Iterator[PrivateNode]:
        with running(PrivateNode, "chiffon-alarm-", "a private RabbitMQ node") as private:
            yield private

With CI=true a node that cannot start fails the run; elsewhere the tests skip.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

from tests.helpers.ci import missing
from tests.helpers.tls_node import NodeUnavailable


class Startable(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


N = TypeVar("N", bound=Startable)


@contextlib.contextmanager
def running(make: Callable[[Path], N], prefix: str, what: str) -> Iterator[N]:
    """`make(a fresh temporary directory)`, started; on leaving, stopped (a half-started one
    included) and its directory removed. NodeUnavailable: `missing(what ...)`."""
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as base:
        node = make(Path(base))
        try:
            try:
                node.start()
            except NodeUnavailable as exc:
                missing(f"cannot start {what}: {exc}")
            yield node
        finally:
            node.stop()
