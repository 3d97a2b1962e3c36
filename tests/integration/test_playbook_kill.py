"""A real ansible-playbook run ended early: by its time limit, a cancel, the worker's shutdown.

tests/playbooks/sleep.yml runs `sleep 120` marked with a unique token; ansible
runs it in a forked worker that calls setsid(), so the sleep is not in
ansible-playbook's process group. After each ending, no process with the
token may exist anywhere on the host, and the worker serves the next request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from chiffon_worker.ctl import ControlClient
from tests.helpers.broker import Orchestrator, Vhost, work_request
from tests.helpers.leftovers import processes_with, sleep_token, wait_logged
from tests.helpers.playbooks import start_playbook_worker
from tests.helpers.process import WorkerProcess

pytestmark = pytest.mark.integration

Spawn = Callable[..., WorkerProcess]
GRACE_S = 2.0
LIMIT_S = 8


def start(spawn: Spawn, playbook_dir: Path, **settings: Any) -> WorkerProcess:
    return start_playbook_worker(spawn, playbook_dir, kill_grace=GRACE_S, **settings)


def sleep_playbook(token: str, **hints: Any) -> dict[str, Any]:
    return work_request(
        "run_playbook",
        {"playbook": "sleep.yml", "extra_vars": {"token": token}},
        hints=hints,
    )


def wait_for_sleep(orchestrator: Orchestrator, token: str) -> None:
    """Until ansible has started the task's own `sleep` (the deepest process of the tree)."""
    orchestrator.wait_until(
        lambda: any(
            psutil.Process(pid).name() == "sleep"
            for pid in processes_with(token)
            if psutil.pid_exists(pid)
        ),
        30,
        "the playbook's sleep to start",
    )


def serves_the_next_request(orchestrator: Orchestrator, playbook_dir: Path) -> None:
    follow = work_request("run_playbook", {"playbook": "three_tasks.yml"})
    orchestrator.publish(follow)
    result = orchestrator.wait_for_result(follow, timeout=60)["payload"]
    assert result["status"] == "completed", result


def test_a_time_limit_kills_ansible_and_its_setsid_children(
    spawn: Spawn, orchestrator: Orchestrator, playbook_dir: Path
) -> None:
    worker = start(spawn, playbook_dir)
    token = sleep_token()
    # The 5 s, plus room for a cold ansible start on a loaded machine:
    # the sleep must have started before the limit for the test to mean anything.
    request = sleep_playbook(token, max_duration_seconds=LIMIT_S)
    sent = time.monotonic()
    orchestrator.publish(request)
    wait_for_sleep(orchestrator, token)

    result = orchestrator.wait_for_result(request, timeout=LIMIT_S + 10)["payload"]
    answered = time.monotonic() - sent
    wait_logged(orchestrator, worker, "process ended", timeout=GRACE_S + 5)
    gone = time.monotonic() - sent

    assert result["status"] == "failed"
    assert "5001" in result["error_message"]
    assert processes_with(token) == []
    assert gone < LIMIT_S + GRACE_S + 3, f"the tree lived {gone:.1f} s"
    # (That no work thread is left behind is shown by test_process_work.py.)
    serves_the_next_request(orchestrator, playbook_dir)
    print(f"\ntime limit {LIMIT_S} s: answered after {answered:.2f} s, tree gone at {gone:.2f} s")


def test_a_cancel_kills_ansible_and_answers_cancelled(
    spawn: Spawn, orchestrator: Orchestrator, playbook_dir: Path, vhost: Vhost
) -> None:
    agent_id = str(uuid.uuid4())
    start(spawn, playbook_dir, agent_id=agent_id)
    token = sleep_token()
    request = sleep_playbook(token)
    orchestrator.publish(request)
    wait_for_sleep(orchestrator, token)

    with ControlClient(vhost.url()) as control:
        sent = time.monotonic()
        [answer] = control.cancel(request_id=request["request_id"], agent_ids=[agent_id], timeout=5)
    assert answer.outcome == "cancelled"
    orchestrator.wait_until(lambda: not processes_with(token), GRACE_S + 5, "the tree to end")
    latency = time.monotonic() - sent

    assert orchestrator.wait_for_result(request)["payload"]["status"] == "cancelled"
    assert latency < 2 + GRACE_S
    serves_the_next_request(orchestrator, playbook_dir)
    print(f"\ncancel → last process of the playbook gone: {latency:.2f} s")


def test_sigterm_past_the_shutdown_timeout_kills_the_playbook_and_says_why(
    spawn: Spawn, orchestrator: Orchestrator, playbook_dir: Path
) -> None:
    worker = start(spawn, playbook_dir, shutdown_timeout=1)
    token = sleep_token()
    request = sleep_playbook(token)
    orchestrator.publish(request)
    wait_for_sleep(orchestrator, token)

    stopped = time.monotonic()
    worker.signal()
    assert worker.wait(timeout=1 + GRACE_S + 10) == 0
    exited = time.monotonic() - stopped

    assert processes_with(token) == []
    result = orchestrator.wait_for_result(request)["payload"]
    assert result["status"] == "failed"
    assert "shutdown timeout" in result["error_message"]
    assert exited < 1 + GRACE_S + 5
    print(f"\nSIGTERM with shutdown timeout 1 s: exited after {exited:.2f} s")
