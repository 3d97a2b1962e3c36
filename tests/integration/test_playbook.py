"""PlaybookWorker on the real broker, running real ansible-playbook against this host.

Each test starts `chiffon-worker run` with CHIFFON_WORKER=chiffon_worker.playbook:PlaybookWorker
and a playbook dir of its own (a copy of tests/playbooks). Real runs take a couple of
seconds each, so the tests share them: one successful run, one failing run.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers.broker import Orchestrator, work_request
from tests.helpers.playbooks import PLAYBOOKS, start_playbook_worker
from tests.helpers.process import WorkerProcess

pytestmark = pytest.mark.integration

Spawn = Callable[..., WorkerProcess]
# A cold ansible-playbook start (imports, inventory, callback) plus three tasks.
RUN_TIMEOUT_S = 60


def progress_for(orchestrator: Orchestrator, request: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        message["payload"]
        for message in orchestrator.received["reply_queue"]
        if message.get("type") == "work_status"
        and "progress_percent" in message.get("payload", {})
        and message.get("request_id") == request["request_id"]
    ]


def run_playbook(playbook: str | None = None, **parameters: Any) -> dict[str, Any]:
    if playbook is not None:
        parameters["playbook"] = playbook
    return work_request("run_playbook", parameters)


def test_a_three_task_playbook_completes_with_progress_per_task_and_stats(
    spawn: Spawn, orchestrator: Orchestrator, playbook_dir: Path
) -> None:
    worker = start_playbook_worker(spawn, playbook_dir)
    # A template in an extra var is data, not code: it must come back as written.
    request = run_playbook("three_tasks.yml", extra_vars={"greeting": "{{ 6 * 7 }}"})
    sent = time.monotonic()
    orchestrator.publish(request)
    orchestrator.wait_until(lambda: bool(progress_for(orchestrator, request)), RUN_TIMEOUT_S)
    first_progress = time.monotonic() - sent
    result = orchestrator.wait_for_result(request, timeout=RUN_TIMEOUT_S)["payload"]
    took = time.monotonic() - sent

    assert result["status"] == "completed", result
    assert result["exit_code"] == 0
    progress = progress_for(orchestrator, request)
    names = [status["step"]["name"] for status in progress]
    for task in ("Say hello", "Show the greeting", "Remember the answer"):
        assert task in names, names  # the task's start
        assert f"{task}: localhost ok" in names, names  # and its result
    percents = [status["progress_percent"] for status in progress]
    assert percents == sorted(percents), "progress went backwards"
    assert percents[-1] == 100
    greeting = next(s for s in progress if s["step"]["name"] == "Show the greeting: localhost ok")
    assert greeting["step"]["output"] == "greeting is {{ 6 * 7 }}"

    stats = result["analysis_result"]["stats"]["localhost"]
    assert (stats["ok"], stats["failed"], stats["unreachable"]) == (3, 0, 0)
    assert result["analysis_result"]["failed_tasks"] == []
    assert "localhost : ok=3" in result["output"]
    assert result["resources_used"]["cpu_time_ms"] > 0
    assert result["resources_used"]["children_cpu_time_ms"] > 0
    rss_mb = psutil.Process(worker.pid).memory_info().rss / 2**20
    print(
        f"\nplaybook: first progress after {first_progress:.2f} s, "
        f"3-task run {took:.2f} s, worker RSS after a run {rss_mb:.1f} MiB"
    )


def test_a_failing_task_fails_with_ansibles_exit_code_and_names_the_task(
    spawn: Spawn, orchestrator: Orchestrator, playbook_dir: Path
) -> None:
    start_playbook_worker(spawn, playbook_dir)
    request = run_playbook("failing.yml")
    orchestrator.publish(request)
    result = orchestrator.wait_for_result(request, timeout=RUN_TIMEOUT_S)["payload"]

    assert result["status"] == "failed"
    assert result["exit_code"] == 2  # ansible-playbook: a host failed
    message = result["error_message"]
    assert "Break on purpose" in message
    assert "the disk is on fire" in message
    assert "localhost" in message
    [failed] = result["analysis_result"]["failed_tasks"]
    assert (failed["task"], failed["host"], failed["status"]) == (
        "Break on purpose",
        "localhost",
        "failed",
    )
    assert result["analysis_result"]["stats"]["localhost"]["failed"] == 1
    names = [status["step"]["name"] for status in progress_for(orchestrator, request)]
    assert "Never reached" not in names


def test_requests_outside_the_playbook_dir_are_refused_and_nothing_runs(
    spawn: Spawn, orchestrator: Orchestrator, playbook_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.yml"
    shutil.copy(PLAYBOOKS / "three_tasks.yml", outside)
    (playbook_dir / "escape.yml").symlink_to(outside)
    worker = start_playbook_worker(spawn, playbook_dir)
    refused = {
        "../../etc/passwd": run_playbook("../../etc/passwd"),
        "/etc/passwd": run_playbook("/etc/passwd"),
        "symlink": run_playbook("escape.yml"),
        "missing": run_playbook("no_such_playbook.yml"),
        "ansible_ var": run_playbook("three_tasks.yml", extra_vars={"ansible_connection": "ssh"}),
        "inventory": run_playbook("three_tasks.yml", inventory="/etc/hosts"),
        "bad type": run_playbook("three_tasks.yml", check="yes"),
    }
    for request in refused.values():
        orchestrator.publish(request)

    messages = {}
    for case, request in refused.items():
        result = orchestrator.wait_for_result(request, timeout=20)["payload"]
        assert result["status"] == "failed", (case, result)
        assert result["exit_code"] != 0
        assert result["error_message"].startswith("run_playbook refused: "), (case, result)
        messages[case] = result["error_message"]
    assert "'..'" in messages["../../etc/passwd"]
    assert "absolute path" in messages["/etc/passwd"]
    assert "outside the playbook dir" in messages["symlink"]
    assert "does not exist" in messages["missing"]
    assert "ansible_connection" in messages["ansible_ var"]
    assert "inventory" in messages["inventory"]
    assert "'check'" in messages["bad type"]
    assert "process started" not in worker.messages(), "a refused request ran something"
