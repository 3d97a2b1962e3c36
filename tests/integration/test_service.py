"""The worker as a long-running service: liveness while busy, sharing work, stopping."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable

import pytest

from tests.helpers.broker import Orchestrator, work_request
from tests.helpers.process import WorkerProcess

pytestmark = pytest.mark.integration

Spawn = Callable[..., WorkerProcess]


def _busy_with(orchestrator: Orchestrator, request: dict[str, object]) -> list[dict[str, object]]:
    task_id = request["payload"]["task_id"]  # type: ignore[index]
    return [
        h
        for h in orchestrator.heartbeats()
        if h["payload"]["status"] == "busy" and h["payload"]["current_task_id"] == task_id
    ]


@pytest.mark.slow  # ten seconds or more of long work: in make test-slow
def test_heartbeats_keep_coming_and_the_connection_stays_up_during_long_work(
    orchestrator: Orchestrator, spawn: Spawn
) -> None:
    worker = spawn(heartbeat_interval=1, amqp_heartbeat=2)
    long_task = work_request("slow_echo", {"seconds": 15, "message": "long"})
    orchestrator.publish(long_task)
    orchestrator.wait_for_result(long_task, timeout=40)

    assert len(_busy_with(orchestrator, long_task)) >= 10
    assert worker.stop() == 0
    messages = worker.messages()
    assert messages.count("connected to broker") == 1
    assert "connection lost" not in messages


@pytest.mark.slow  # ten seconds or more of long work: in make test-slow
def test_a_queued_request_is_not_held_hostage_by_a_busy_worker(
    orchestrator: Orchestrator, spawn: Spawn
) -> None:
    ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    for number, agent_id in enumerate(ids):
        spawn(f"worker{number}", agent_id=agent_id, heartbeat_interval=1)
    orchestrator.wait_until(
        lambda: {h["payload"]["agent_id"] for h in orchestrator.heartbeats()} == set(ids),
        20,
        "both workers online",
    )
    long_task = work_request("slow_echo", {"seconds": 10, "message": "long"})
    orchestrator.publish(long_task)
    orchestrator.wait_until(lambda: bool(_busy_with(orchestrator, long_task)), 20, "busy")
    busy_agent = _busy_with(orchestrator, long_task)[0]["payload"]["agent_id"]

    short_task = work_request("echo", {"message": "short"})
    orchestrator.publish(short_task)
    # Whichever worker the broker picks, the short task must not wait for the long one.
    short = orchestrator.wait_for_result(short_task, timeout=3)
    assert short["payload"]["agent_id"] != busy_agent
    orchestrator.wait_for_result(long_task, timeout=20)


def test_sigterm_finishes_the_running_task_then_goes_offline_and_exits_0(
    orchestrator: Orchestrator, spawn: Spawn
) -> None:
    worker = spawn(heartbeat_interval=0.5)
    task = work_request("slow_echo", {"seconds": 2, "message": "finish me"})
    orchestrator.publish(task)
    orchestrator.wait_until(lambda: bool(_busy_with(orchestrator, task)), 20, "busy")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0

    orchestrator.wait_until(
        lambda: any(h["payload"]["status"] == "offline" for h in orchestrator.heartbeats()),
        10,
        "offline heartbeat",
    )
    result = orchestrator.result_for(task)["payload"]
    assert (result["status"], result["output"]) == ("completed", "finish me")
    assert orchestrator.heartbeats()[-1]["payload"]["status"] == "offline"
    assert orchestrator.queue_depth("work_queue") == 0


def test_a_second_signal_exits_at_once(orchestrator: Orchestrator, spawn: Spawn) -> None:
    worker = spawn(heartbeat_interval=0.5)
    task = work_request("slow_echo", {"seconds": 60})
    orchestrator.publish(task)
    orchestrator.wait_until(lambda: bool(_busy_with(orchestrator, task)), 20, "busy")
    worker.signal(signal.SIGTERM)
    orchestrator.wait_until(
        lambda: "stop requested: finishing running work" in worker.messages(), 10, "stop log"
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) != 0  # not the 60 s the task would take
    assert any("second signal" in m for m in worker.messages())


def test_work_outliving_the_shutdown_timeout_is_given_up_with_a_clear_line(
    orchestrator: Orchestrator, spawn: Spawn
) -> None:
    worker = spawn(heartbeat_interval=0.5, shutdown_timeout=1)
    task = work_request("slow_echo", {"seconds": 60})
    orchestrator.publish(task)
    orchestrator.wait_until(lambda: bool(_busy_with(orchestrator, task)), 20, "busy")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0  # not the 60 s the task would take
    assert "shutdown timeout: giving up on running work" in worker.messages()
    orchestrator.wait_until(
        lambda: any(h["payload"]["status"] == "offline" for h in orchestrator.heartbeats()),
        10,
        "offline heartbeat",
    )
    assert not orchestrator.results()
