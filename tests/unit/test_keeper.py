"""Reconnecting: a connection lost at once is retried with backoff, a healthy one at once."""

from __future__ import annotations

import time

import pytest

from chiffon_worker import keeper as keeper_module
from chiffon_worker.amqp import refusal_error
from chiffon_worker.keeper import LinkKeeper
from chiffon_worker.sdnotify import SystemdNotifier
from tests.unit.test_topology import QUORUM_MISMATCH


class FakeLink:
    current_url = "amqp://broker/"

    def __init__(self) -> None:
        self.connects = 0
        self.drops = 0

    def connect(self) -> None:
        self.connects += 1

    def drop(self) -> None:
        self.drops += 1

    def process(self, _timeout: float) -> None:
        pass


def keeper_for(link: FakeLink) -> LinkKeeper:
    return LinkKeeper(
        link,  # type: ignore[arg-type]
        SystemdNotifier(environ={}),
        on_connected=lambda: None,
        on_lost=lambda: None,
        wait=lambda _seconds: None,
    )


def connected_keeper() -> tuple[LinkKeeper, FakeLink]:
    link = FakeLink()
    keeper = keeper_for(link)
    keeper.serve(0.0)
    assert keeper.up
    return keeper, link


def test_a_connection_lost_as_soon_as_it_came_up_is_retried_only_after_a_backoff() -> None:
    keeper, link = connected_keeper()

    for _ in range(5):  # e.g. a message the broker closes the channel for, at every connect
        keeper.lost("channel closed by broker")
        keeper.serve(0.0)

    # The first loss waits before its retry, and so does every one after it:
    # no new connection was made in this tight loop.
    assert link.connects == 1
    assert not keeper.up


def test_a_connection_that_served_a_while_is_retried_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keeper, link = connected_keeper()
    served_since = time.monotonic()
    monkeypatch.setattr(keeper_module.time, "monotonic", lambda: served_since + 60)

    keeper.lost("connection reset")
    keeper.serve(0.0)

    assert link.connects == 2
    assert keeper.up


class MismatchedLink(FakeLink):
    """A broker whose work_queue is a quorum queue, while we declare a classic one."""

    current_url = "amqp://node2:5672/"

    def connect(self) -> None:
        self.connects += 1
        raise refusal_error(QUORUM_MISMATCH)


def test_a_mismatch_at_connect_is_not_retried_and_exits_78(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = MismatchedLink()
    keeper = keeper_for(link)
    for _ in range(3):
        keeper.serve(0.0)
    assert link.connects == 1
    assert keeper.refused is not None
    assert keeper.refused.exit_code == 78
    [line] = [r for r in caplog.records if "x-queue-type" in str(r.__dict__)]
    assert line.levelname == "ERROR"
    assert line.__dict__["queue"] == "work_queue"
    assert not [r for r in caplog.records if r.getMessage().startswith("broker not reachable")]
