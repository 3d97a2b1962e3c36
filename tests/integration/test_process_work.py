"""Work that runs child processes, ended by each of the three reasons, on the real broker.

A time limit, a cancel command and the worker's shutdown timeout all end the
child's whole tree; afterwards no process of it is left (checked over every
process on the host by a token on its command line), no work thread is left
behind, and the worker serves the next request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from chiffon_worker.ctl import ControlClient
from tests.helpers.broker import Orchestrator, Vhost, work_request
from tests.helpers.leftovers import processes_with, sleep_token, wait_logged
from tests.helpers.process import WorkerProcess

pytestmark = pytest.mark.integration

Spawn = Callable[..., WorkerProcess]
WORKER = "tests.helpers.process_workers:CommandWorker"
# A child tree like ansible's: a grandchild in a session of its own that
# ignores SIGTERM, under a shell that obeys it.
STUBBORN_TREE = "setsid sh -c 'trap \"\" TERM; sleep 120 {token}' & sleep 120 {token}"


def start_worker(spawn: Spawn, orchestrator: Orchestrator, **settings: object) -> WorkerProcess:
    worker = spawn(worker=WORKER, **settings)
    orchestrator.watch("reply_queue")
    warm_up = work_request("echo", {"message": "warm up"}, hints={"max_duration_seconds": 30})
    orchestrator.publish(warm_up)
    assert orchestrator.wait_for_result(warm_up, timeout=20)["payload"]["status"] == "completed"
    return worker


def command(token: str, script: str = STUBBORN_TREE, **hints: Any) -> dict[str, Any]:
    return work_request(
        "run_command", {"argv": ["sh", "-c", script.format(token=token)]}, hints=hints
    )


def test_a_time_limit_kills_the_tree_answers_5001_and_leaves_no_thread(
    spawn: Spawn, orchestrator: Orchestrator
) -> None:
    worker = start_worker(spawn, orchestrator, kill_grace=1)
    threads_idle = psutil.Process(worker.pid).num_threads()
    token = sleep_token()
    request = command(token, max_duration_seconds=2)

    orchestrator.publish(request)
    result = orchestrator.wait_for_result(request, timeout=10)
    answered = time.monotonic()

    assert result["payload"]["status"] == "failed"
    assert "5001" in result["payload"]["error_message"]
    # The work returns once its tree is gone: then nothing of it is left.
    wait_logged(orchestrator, worker, "work returned after it was answered: its result is dropped")
    gone_after = time.monotonic() - answered
    assert processes_with(token) == []
    assert gone_after < 1 + 2, "the tree outlived the grace by more than 2 s"
    # The thread started in place of the one held by the work retires with it.
    orchestrator.wait_until(
        lambda: psutil.Process(worker.pid).num_threads() == threads_idle,
        5,
        f"the worker's threads back to {threads_idle}",
    )
    follow = work_request("echo", {"message": "next"})
    orchestrator.publish(follow)
    assert orchestrator.wait_for_result(follow)["payload"]["output"] == "next"


@pytest.mark.parametrize("obeys_sigterm", [True, False], ids=["obeys-sigterm", "ignores-sigterm"])
def test_a_cancel_command_ends_the_tree_and_answers_cancelled(
    spawn: Spawn, orchestrator: Orchestrator, vhost: Vhost, obeys_sigterm: bool
) -> None:
    agent_id = str(uuid.uuid4())
    grace = 1.0
    worker = start_worker(spawn, orchestrator, kill_grace=grace, agent_id=agent_id)
    token = sleep_token()
    request = command(token, "sleep 120 {token}" if obeys_sigterm else STUBBORN_TREE)
    orchestrator.publish(request)
    wait_logged(orchestrator, worker, "process started")
    orchestrator.wait_until(lambda: len(processes_with(token)) >= 1, 10, "the child to run")

    with ControlClient(vhost.url()) as control:
        sent = time.monotonic()
        [answer] = control.cancel(
            task_id=request["payload"]["task_id"], agent_ids=[agent_id], timeout=5
        )
    assert answer.outcome == "cancelled"
    orchestrator.wait_until(lambda: not processes_with(token), grace + 5, "the tree to end")
    latency = time.monotonic() - sent

    assert orchestrator.wait_for_result(request)["payload"]["status"] == "cancelled"
    assert latency < (1.0 if obeys_sigterm else 2.0 + grace)
    kind = "obeys" if obeys_sigterm else "ignores"
    print(f"\ncancel → last process gone ({kind} SIGTERM): {latency:.2f} s")


@pytest.mark.parametrize("on_thread", [False, True], ids=["inline", "work-thread"])
def test_a_stop_past_the_shutdown_timeout_kills_the_tree_and_says_why(
    spawn: Spawn, orchestrator: Orchestrator, on_thread: bool
) -> None:
    worker = start_worker(spawn, orchestrator, kill_grace=1, shutdown_timeout=1)
    token = sleep_token()
    # A time limit sends the work to a work thread; without one it runs inline.
    request = command(token, **({"max_duration_seconds": 600} if on_thread else {}))
    orchestrator.publish(request)
    wait_logged(orchestrator, worker, "process started")

    stopped = time.monotonic()
    worker.signal()
    assert worker.wait(timeout=1 + 1 + 10) == 0
    exited = time.monotonic() - stopped

    assert processes_with(token) == []
    result = orchestrator.wait_for_result(request)
    assert result["payload"]["status"] == "failed"
    assert "the worker's shutdown timeout passed" in result["payload"]["error_message"]
    assert exited < 1 + 1 + 5
