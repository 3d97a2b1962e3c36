"""The Prometheus exporter of a real worker process, counting real traffic."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from tests.helpers.broker import Orchestrator, Vhost, rabbitmqctl, work_request
from tests.helpers.metrics import free_port, scrape_until
from tests.helpers.process import WorkerProcess

pytestmark = pytest.mark.integration

Spawn = Callable[..., WorkerProcess]
P = "chiffon_worker_"


def _chiffon(samples: dict[str, float]) -> dict[str, float]:
    """Our own series, without the *_created timestamps prometheus_client adds."""
    return {
        name: value
        for name, value in samples.items()
        if name.startswith(P) and not name.endswith("_created")
    }


def test_endpoint_counts_each_kind_of_delivery(orchestrator: Orchestrator, spawn: Spawn) -> None:
    port = free_port()
    before_start = time.time()
    worker = spawn(metrics_port=port)

    # One at a time, each answered before the next, so no delivery is held
    # back and redelivered (which would count as a second received).
    first = work_request("echo", {"message": "one"})
    orchestrator.publish(first)
    assert orchestrator.wait_for_result(first)["payload"]["status"] == "completed"
    second = work_request("echo", {"message": "two"})
    orchestrator.publish(second)
    assert orchestrator.wait_for_result(second)["payload"]["status"] == "completed"
    failing = work_request("fail", {"message": "on purpose"})
    orchestrator.publish(failing)
    assert orchestrator.wait_for_result(failing)["payload"]["status"] == "failed"
    # Same request_id, new message: answered from the cache, not run again.
    again = work_request("echo", {"message": "one"}, request_id=first["request_id"])
    orchestrator.publish(again)
    orchestrator.wait_until(
        lambda: [r["trace_id"] for r in orchestrator.results()][-1:] == [again["trace_id"]],
        15,
        "the cached answer to the duplicate",
    )
    # Not JSON, so no ids to answer to: dead-lettered without a reply.
    orchestrator.publish(b"{")
    orchestrator.wait_until(lambda: len(orchestrator.raw["dlx_queue"]) == 1, 15, "dead letter")

    expected = {
        f"{P}requests_received_total": 5.0,  # every delivery: 3 run, 1 duplicate, 1 malformed
        f"{P}requests_completed_total": 2.0,  # the echoes
        f"{P}requests_failed_total": 1.0,  # fail raised
        f"{P}requests_duplicate_total": 1.0,
        f"{P}requests_dead_lettered_total": 1.0,  # b"{"
        f"{P}reconnects_total": 0.0,
        f"{P}task_duration_seconds_count": 3.0,  # work that ran; the duplicate did not
        f"{P}tasks_in_flight": 0.0,
    }

    def settled(samples: dict[str, float]) -> bool:
        return all(samples.get(name) == value for name, value in expected.items())

    try:
        samples = scrape_until(port, settled, 15, "the counts of the traffic sent")
    except AssertionError as exc:
        tail = "\n".join(worker.messages()[-30:])
        raise AssertionError(f"{exc}\nworker log, last lines:\n{tail}") from None
    ours = _chiffon(samples)
    assert {name: ours[name] for name in expected} == expected
    # The histogram's +Inf bucket holds every observation.
    assert ours[f'{P}task_duration_seconds_bucket{{le="+Inf"}}'] == 3
    assert ours[f"{P}task_duration_seconds_sum"] >= 0
    # The start-up heartbeat (heartbeat_interval is 60 s, so the only one so far).
    assert len(orchestrator.heartbeats()) >= 1
    assert before_start <= ours[f"{P}last_heartbeat_timestamp_seconds"] <= time.time()
    # Process collectors are on the worker's registry too.
    assert samples["process_start_time_seconds"] >= before_start - 5
    assert worker.stop() == 0


def test_endpoint_counts_a_reconnect_after_the_broker_drops_the_worker(
    vhost: Vhost, spawn: Spawn
) -> None:
    port = free_port()
    worker = spawn(metrics_port=port)
    # Connected once the start-up heartbeat went out.
    scrape_until(port, lambda s: s.get(f"{P}last_heartbeat_timestamp_seconds", 0) > 0, 30)

    # Only the worker is connected to this test's vhost (no orchestrator here).
    rabbitmqctl("close_all_connections", "--vhost", vhost.name, "--limit", "10", "metrics test")

    samples = scrape_until(port, lambda s: s.get(f"{P}reconnects_total", 0) >= 1, 30)
    assert samples[f"{P}reconnects_total"] == 1
    assert worker.stop() == 0


def test_taken_metrics_port_stops_the_worker_with_a_config_error(
    vhost: Vhost, spawn: Spawn
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        worker = spawn(metrics_port=port)
        assert worker.wait(timeout=30) == 78
    text = worker.log_path.read_text()
    assert f"CHIFFON_METRICS_PORT: port {port} on 127.0.0.1 is already in use" in text
