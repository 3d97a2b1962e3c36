"""A real `chiffon-worker run` process against the real broker, driven as a user would."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

from tests.helpers.broker import Orchestrator, Vhost, rabbitmqctl, work_request
from tests.helpers.process import WorkerProcess, run_cli

pytestmark = pytest.mark.integration

Spawn = Callable[..., WorkerProcess]


def _cli(vhost: Vhost, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli(vhost.url(), *args, timeout=timeout)


def test_send_wait_prints_the_echo_result(vhost: Vhost, spawn: Spawn) -> None:
    spawn()
    done = _cli(vhost, "send", "--work-type", "echo", "--param", "message=hi", "--wait")
    assert done.returncode == 0, done.stderr
    assert '"status": "completed"' in done.stdout
    assert '"output": "hi"' in done.stdout


def test_send_wait_exits_1_when_the_work_failed(vhost: Vhost, spawn: Spawn) -> None:
    spawn()
    done = _cli(vhost, "send", "--work-type", "fail", "--wait", "--timeout", "20")
    assert done.returncode == 1, done.stderr
    assert '"status": "failed"' in done.stdout


def test_send_max_duration_sets_the_time_limit(vhost: Vhost, spawn: Spawn) -> None:
    spawn()
    done = _cli(
        vhost,
        "send",
        "--work-type",
        "slow_echo",
        "--param",
        "seconds=30",
        "--max-duration",
        "1",
        "--wait",
    )
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "failed"
    assert "5001" in result["error_message"]
    assert result["duration_ms"] < 10_000


def test_failed_and_unknown_work_answer_failed_and_the_worker_keeps_serving(
    orchestrator: Orchestrator, spawn: Spawn
) -> None:
    spawn()
    failing = work_request("fail", {"message": "boom"})
    unknown = work_request("paint_the_shed")
    after = work_request("echo", {"message": "still here"})
    for request in (failing, unknown, after):
        orchestrator.publish(request)

    failed = orchestrator.wait_for_result(failing)["payload"]
    assert (failed["status"], failed["exit_code"]) == ("failed", 1)
    assert "boom" in failed["error_message"]

    rejected = orchestrator.wait_for_result(unknown)["payload"]
    assert (rejected["status"], rejected["exit_code"]) == ("failed", 1)
    assert "paint_the_shed" in rejected["error_message"]
    assert "echo" in rejected["error_message"]

    served = orchestrator.wait_for_result(after)["payload"]
    assert (served["status"], served["output"]) == ("completed", "still here")


def test_invalid_messages_land_in_dlx_queue_with_a_5003_error(
    orchestrator: Orchestrator, spawn: Spawn
) -> None:
    worker = spawn()
    wrong_version = work_request()
    wrong_version["protocol_version"] = "2.0"
    wrong_type = work_request()
    wrong_type["type"] = "work_result"
    orchestrator.publish(b"{not json")
    orchestrator.publish(wrong_version)
    orchestrator.publish(wrong_type)
    after = work_request("echo", {"message": "alive"})
    orchestrator.publish(after)

    orchestrator.wait_until(lambda: len(orchestrator.raw["dlx_queue"]) >= 3, 15, "3 dead letters")
    assert orchestrator.raw["dlx_queue"][0] == b"{not json"
    assert [m.get("protocol_version") for m in orchestrator.received["dlx_queue"][1:]] == [
        "2.0",
        "1.0",
    ]
    orchestrator.wait_until(lambda: len(orchestrator.errors()) >= 2, 15, "two 5003 errors")
    errors = {e["request_id"]: e["payload"] for e in orchestrator.errors()}
    for broken in (wrong_version, wrong_type):
        assert errors[broken["request_id"]]["error_code"] == 5003
    assert "protocol_version" in errors[wrong_version["request_id"]]["error_message"]
    assert orchestrator.wait_for_result(after)["payload"]["output"] == "alive"
    assert worker.process is not None
    assert worker.process.poll() is None


def test_request_for_another_agent_type_is_dead_lettered_with_5006(
    orchestrator: Orchestrator, spawn: Spawn
) -> None:
    spawn(agent_type="infra")
    misrouted = work_request(to_agent="desktop")
    orchestrator.publish(misrouted)
    orchestrator.wait_until(lambda: bool(orchestrator.errors()), 15, "an error reply")
    error = orchestrator.errors()[0]
    assert error["request_id"] == misrouted["request_id"]
    assert error["payload"]["error_code"] == 5006
    assert "desktop" in error["payload"]["error_message"]
    assert "infra" in error["payload"]["error_message"]
    orchestrator.wait_until(lambda: bool(orchestrator.raw["dlx_queue"]), 15, "the dead letter")
    assert not orchestrator.results()


def test_worker_declares_the_protocol_topology_exactly(vhost: Vhost, spawn: Spawn) -> None:
    worker = spawn()
    peer = Orchestrator(vhost.url())  # a second declarer with the protocol's arguments
    try:
        peer.watch("reply_queue")
        peer.wait_until(lambda: bool(peer.heartbeats()), 15, "the first heartbeat")
    finally:
        peer.close()
    listing = rabbitmqctl("list_queues", "-p", vhost.name, "name", "durable", "arguments", "-q")
    rows = {line.split("\t")[0]: line for line in listing.splitlines() if line.strip()}
    assert "x-max-priority" in rows["work_queue"]
    assert "dlx_exchange" in rows["work_queue"]
    assert "dlx_exchange" in rows["reply_queue"]
    assert "x-max-length" in rows["dlx_queue"]
    bindings = rabbitmqctl(
        "list_bindings", "-p", vhost.name, "-q", "source_name", "destination_name", "routing_key"
    )
    dlx_keys = {
        key
        for source, queue, key in (line.split("\t") for line in bindings.splitlines()[1:])
        if (source, queue) == ("dlx_exchange", "dlx_queue")
    }
    assert dlx_keys == {"", "work_queue", "reply_queue"}
    assert worker.stop() == 0


def test_wrong_credentials_exit_77_without_retrying(vhost: Vhost, spawn: Spawn) -> None:
    bad_url = vhost.url().replace("guest:guest", "guest:wrong-password")
    worker = spawn(url=bad_url)
    assert worker.wait(timeout=30) == 77
    text = worker.log_path.read_text()
    assert "wrong-password" not in text
    assert "refused" in text
