"""A request message that arrives again is one message: it is answered once.

The soak found it with a real broker redelivery: a retry (same request_id, new
message_id) answered from the idempotency cache had its early ack and its
result lost in a connection cut; the broker redelivered it and the worker
answered it a second time, with a second result message_id. Here the second
arrival is the same bytes published again (as a publisher does after a lost
confirm), which reaches the same code path deterministically.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.helpers.broker import Orchestrator, work_request
from tests.helpers.process import WorkerProcess

pytestmark = pytest.mark.integration

Spawn = Callable[..., WorkerProcess]


def test_a_retry_arriving_twice_is_answered_once(orchestrator: Orchestrator, spawn: Spawn) -> None:
    spawn()
    first = work_request("echo", {"message": "once"})
    retry = work_request("echo", {"message": "once"}, request_id=first["request_id"])
    retry["payload"] = first["payload"]
    orchestrator.publish(first)
    orchestrator.wait_for_result(first)
    orchestrator.publish(retry)
    orchestrator.wait_until(lambda: len(orchestrator.results()) == 2, 15, "the retry's result")

    # Each arrives a second time, the same message (same message_id), then a
    # marker request whose result shows the worker has handled both.
    orchestrator.publish(first)
    orchestrator.publish(retry)
    marker = work_request("echo", {"message": "marker"})
    orchestrator.publish(marker)
    orchestrator.wait_for_result(marker)

    answers = [
        r["trace_id"] for r in orchestrator.results() if r["request_id"] != marker["request_id"]
    ]
    assert answers == [first["trace_id"], retry["trace_id"]]
