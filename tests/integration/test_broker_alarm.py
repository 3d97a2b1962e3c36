"""A broker memory alarm neither freezes a stop nor starves the watchdog (issue 13, item 4).

While a RabbitMQ alarm is on, the broker stops reading from every connection
that publishes: a synchronous call (basic.consume, basic.cancel, the close
handshake) is never answered. Alarms are node-wide, so these tests run their
own node (tests/helpers/private_node.py), never the machine's broker. The
test stands in for systemd (tests/helpers/watchdog.py, the `supervised`
fixture): it binds NOTIFY_SOCKET and time-stamps every watchdog ping.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.helpers.broker import Orchestrator, work_request
from tests.helpers.nodes import running
from tests.helpers.private_node import PrivateNode
from tests.helpers.process import WorkerProcess
from tests.helpers.watchdog import MAX_WATCHDOG_GAP_S, NotifyListener, first_ping

# Slow (`make test-slow`): a node of its own to boot, and a stop and a blocked
# timeout to sit through.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHUTDOWN_TIMEOUT = 5
# Exit within the shutdown timeout, plus the interpreter's own start-up of
# nothing and its teardown: a generous margin, far below a frozen stop.
STOP_MARGIN_S = 3.0
BLOCKED = "broker blocked publishing (memory or disk alarm)"


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    with running(PrivateNode, "chiffon-alarm-", "a private RabbitMQ node") as private:
        yield private


@pytest.fixture
def alarm(node: PrivateNode) -> Iterator[Callable[[], None]]:
    """Sets the node's memory alarm when called; always cleared after the test."""
    try:
        yield node.set_memory_alarm
    finally:
        node.clear_memory_alarm()


@pytest.fixture
def orchestrator(node: PrivateNode) -> Iterator[Orchestrator]:
    with Orchestrator(node.url()) as peer:
        peer.watch("reply_queue")
        yield peer


def _busy(orchestrator: Orchestrator, request: dict[str, Any]) -> bool:
    task_id = request["payload"]["task_id"]
    return any(
        h["payload"]["status"] == "busy" and h["payload"]["current_task_id"] == task_id
        for h in orchestrator.heartbeats()
    )


def test_a_stop_during_a_broker_alarm_ends_within_the_shutdown_timeout_and_feeds_the_watchdog(
    node: PrivateNode,
    orchestrator: Orchestrator,
    notify: NotifyListener,
    supervised: Callable[..., WorkerProcess],
    alarm: Callable[[], None],
) -> None:
    worker = supervised(
        node.url(),
        heartbeat_interval=1,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        blocked_connection_timeout=60,
    )
    watched_from = first_ping(notify, orchestrator)
    # Long enough to be past the hold grace (the rescue thread cancels the
    # consumer) and to finish while blocked (its result cannot go out, and
    # consuming again needs basic.consume, which the blocked broker ignores).
    task = work_request("slow_echo", {"seconds": 3, "message": "during the alarm"})
    orchestrator.publish(task)
    orchestrator.wait_until(lambda: _busy(orchestrator, task), 20, "the task to start")

    alarm()
    # The next heartbeat (every second) is what gets the connection blocked.
    orchestrator.wait_until(lambda: bool(worker.logged(BLOCKED)), 15, "the worker to be blocked")
    orchestrator.wait_until(
        lambda: bool(worker.logged("work finished")), 15, "the task to finish while blocked"
    )
    # Blocked and idle for a while: a healthy worker keeps feeding the watchdog.
    quiet_until = time.monotonic() + 3
    orchestrator.wait_until(lambda: time.monotonic() >= quiet_until, 10, "the clock")

    stop_at = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = worker.wait(timeout=SHUTDOWN_TIMEOUT + 30)
    ended_at = time.monotonic()

    took = ended_at - stop_at
    gap = notify.max_gap(watched_from, ended_at)
    print(f"SIGTERM to exit: {took:.2f} s; longest watchdog gap: {gap:.2f} s")
    assert code == 0, worker.messages()[-10:]
    assert took <= SHUTDOWN_TIMEOUT + STOP_MARGIN_S, worker.messages()[-10:]
    assert gap <= MAX_WATCHDOG_GAP_S, (notify.pings(), worker.messages()[-10:])
    stopped = worker.logged("stopped") or worker.logged("stopped while disconnected")
    assert stopped, worker.messages()[-10:]
    # The result of the task that finished while blocked never reached the broker.
    assert stopped[-1]["unsent"] >= 1, stopped


def test_a_worker_blocked_past_the_blocked_timeout_reconnects_and_serves_after_the_alarm(
    node: PrivateNode,
    orchestrator: Orchestrator,
    notify: NotifyListener,
    supervised: Callable[..., WorkerProcess],
    alarm: Callable[[], None],
) -> None:
    worker = supervised(node.url(), heartbeat_interval=1, blocked_connection_timeout=2)
    watched_from = first_ping(notify, orchestrator)
    alarm()
    orchestrator.wait_until(
        lambda: any(
            "blocked" in str(r.get("reason", "")).lower() for r in worker.logged("connection lost")
        ),
        20,
        "the blocked timeout to drop the connection",
    )
    node.clear_memory_alarm()
    connected = len(worker.logged("connected to broker"))
    task = work_request("echo", {"message": "after the alarm"})
    orchestrator.publish(task)
    assert orchestrator.wait_for_result(task, timeout=30)["payload"]["status"] == "completed"
    assert len(worker.logged("connected to broker")) >= max(connected, 2)
    assert notify.max_gap(watched_from, time.monotonic()) <= MAX_WATCHDOG_GAP_S
    assert worker.stop(timeout=SHUTDOWN_TIMEOUT + 10) == 0
