"""What a worker's own code returns or reports cannot crash or wedge it (issue 13)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.helpers.broker import Orchestrator, is_result, work_request
from tests.helpers.process import WorkerProcess

Spawn = Callable[..., WorkerProcess]


@pytest.mark.parametrize("ack_mode", ["early", "late"])
def test_a_result_json_cannot_hold_and_an_oversized_progress_cost_only_themselves(
    orchestrator: Orchestrator, spawn: Spawn, ack_mode: str
) -> None:
    worker = spawn(
        worker="tests.helpers.poison_workers:PoisonOutputWorker",
        ack_mode=ack_mode,
        max_result_bytes=1024 * 1024,
    )
    unencodable = work_request("unencodable")
    huge = work_request("huge_progress")
    after = work_request("echo", {"message": "still here"})
    for request in (unencodable, huge, after):
        orchestrator.publish(request)

    failed = orchestrator.wait_for_result(unencodable, timeout=20)["payload"]
    dumped = orchestrator.wait_for_result(huge, timeout=20)["payload"]
    echoed = orchestrator.wait_for_result(after, timeout=20)["payload"]
    assert worker.stop() == 0

    assert failed["status"] == "failed"
    assert "could not be encoded" in failed["error_message"]
    assert (dumped["status"], dumped["output"]) == ("completed", "after the dump")
    progress = [
        message["payload"]
        for message in orchestrator.received["reply_queue"]
        if message["request_id"] == huge["request_id"] and not is_result(message)
    ]
    assert [report["step"]["name"] for report in progress] == ["done"]
    assert echoed["output"] == "still here"
    messages = worker.messages()
    assert "progress report too large: dropped" in messages
    assert messages.count("connection lost") == 0
    assert orchestrator.queue_depth("work_queue") == 0
    # The one traceback allowed is the one logged with the unencodable result.
    tracebacks = [line for line in worker.log_path.read_text().splitlines() if "Traceback" in line]
    assert all("result cannot be encoded" in line for line in tracebacks), tracebacks
