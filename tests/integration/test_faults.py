"""Broker faults the worker must survive without losing a result or running work twice.

The worker reaches the broker through a TcpProxy the test can cut, stall or
shut; the orchestrator stand-in talks to the broker directly.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable
from urllib.parse import quote

import pytest

from chiffon_worker.config import Settings
from tests.helpers.broker import Orchestrator, Vhost, rabbitmqctl, work_request
from tests.helpers.process import InProcessWorker, WorkerProcess
from tests.helpers.proxy import ConnectionCutter, TcpProxy
from tests.helpers.workers import CountingWorker

pytestmark = pytest.mark.integration

Spawn = Callable[..., WorkerProcess]


def _via(proxy: TcpProxy, vhost: Vhost, **query: object) -> str:
    url = proxy.url(quote(vhost.name, safe=""))
    return url + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


def _count(worker: WorkerProcess, message: str) -> int:
    return worker.messages().count(message)


def test_worker_started_before_the_broker_retries_then_serves(
    vhost: Vhost, orchestrator: Orchestrator, proxy: TcpProxy, spawn: Spawn
) -> None:
    proxy.refuse()
    worker = spawn(url=_via(proxy, vhost))
    orchestrator.wait_until(
        lambda: _count(worker, "broker not reachable, retrying") >= 2, 20, "two retries"
    )
    request = work_request("echo", {"message": "late broker"})
    orchestrator.publish(request)
    proxy.accept()
    assert orchestrator.wait_for_result(request, timeout=40)["payload"]["output"] == "late broker"
    retries = [r for r in worker.records() if r.get("message") == "broker not reachable, retrying"]
    # One line per attempt, each saying when the next one comes, and growing.
    assert [r["attempt"] for r in retries[:3]] == list(range(1, len(retries[:3]) + 1))
    assert all(0 < r["retry_in_s"] <= 30 for r in retries)


def test_connection_cut_while_idle_reconnects_and_serves(
    vhost: Vhost, orchestrator: Orchestrator, proxy: TcpProxy, spawn: Spawn
) -> None:
    worker = spawn(url=_via(proxy, vhost), heartbeat_interval=1)
    orchestrator.wait_until(lambda: bool(orchestrator.heartbeats()), 20, "first heartbeat")
    proxy.cut()
    orchestrator.wait_until(lambda: _count(worker, "connected to broker") == 2, 30, "the reconnect")
    beats_after = len(orchestrator.heartbeats())
    request = work_request("echo", {"message": "after the cut"})
    orchestrator.publish(request)
    assert orchestrator.wait_for_result(request)["payload"]["output"] == "after the cut"
    orchestrator.wait_until(
        lambda: len(orchestrator.heartbeats()) > beats_after + 1, 10, "heartbeats resuming"
    )
    assert worker.stop() == 0


def test_result_of_work_running_through_a_cut_is_published_after_the_reconnect(
    vhost: Vhost, orchestrator: Orchestrator, proxy: TcpProxy, spawn: Spawn
) -> None:
    worker = spawn(url=_via(proxy, vhost), heartbeat_interval=0.5)
    task = work_request("slow_echo", {"seconds": 3, "message": "survived"})
    orchestrator.publish(task)
    orchestrator.wait_until(
        lambda: any(h["payload"]["status"] == "busy" for h in orchestrator.heartbeats()),
        20,
        "the task to start",
    )
    proxy.cut()
    result = orchestrator.wait_for_result(task, timeout=30)["payload"]
    assert (result["status"], result["output"]) == ("completed", "survived")
    assert _count(worker, "connection lost") >= 1
    assert len(orchestrator.distinct_results()) == 1
    # The log line follows the publish: wait for it, then count.
    orchestrator.wait_until(lambda: "work finished" in worker.messages(), 10, "its log line")
    assert worker.messages().count("work finished") == 1


def test_late_ack_redelivery_after_a_cut_does_not_run_the_work_again(
    vhost: Vhost, orchestrator: Orchestrator, proxy: TcpProxy
) -> None:
    worker = CountingWorker(
        Settings(amqp_url=_via(proxy, vhost), ack_mode="late", shutdown_timeout=10)
    )
    worker.release.clear()
    with InProcessWorker(worker) as running:
        request = work_request("gated", {"message": "once"})
        orchestrator.publish(request)
        assert worker.started.wait(15)
        proxy.cut()  # the unacked delivery goes back to the queue and comes back to us
        orchestrator.wait_until(lambda: proxy.connections >= 2, 30, "the reconnect")
        worker.release.set()
        orchestrator.wait_for_result(request, timeout=30)
        orchestrator.wait_until(
            lambda: (
                orchestrator.queue_depth("work_queue") == 0
                and orchestrator.channel.queue_declare(
                    "work_queue", passive=True
                ).method.consumer_count
                == 1
            ),
            30,
            "the redelivered copy to be settled",
        )
    assert worker.runs["once"] == 1
    assert len(orchestrator.distinct_results()) == 1
    assert orchestrator.queue_depth("work_queue") == 0
    # An ack of the old channel's delivery tag on the new channel would have made
    # the broker close it (unknown delivery tag): a third connection.
    assert running.service.connections == 2


def test_worker_moves_to_the_next_cluster_node_when_one_goes_away(
    vhost: Vhost, orchestrator: Orchestrator, proxy: TcpProxy, spawn: Spawn
) -> None:
    second = TcpProxy()
    try:
        worker = spawn(url=f"{_via(proxy, vhost)},{_via(second, vhost)}", heartbeat_interval=1)
        nodes = [proxy, second]
        # Each worker tries the nodes in an order of its own: either may be first.
        orchestrator.wait_until(
            lambda: any(node.open_connections == 1 for node in nodes), 20, "first connection"
        )
        first = next(node for node in nodes if node.open_connections == 1)
        other = second if first is proxy else proxy
        first.refuse()
        first.cut()
        orchestrator.wait_until(lambda: other.open_connections == 1, 30, "the other node")
        request = work_request("echo", {"message": "node two"})
        orchestrator.publish(request)
        assert orchestrator.wait_for_result(request)["payload"]["output"] == "node two"
        assert worker.stop() == 0
    finally:
        second.close()


def test_a_stalled_connection_is_detected_by_amqp_heartbeats(
    vhost: Vhost, orchestrator: Orchestrator, proxy: TcpProxy, spawn: Spawn
) -> None:
    worker = spawn(url=_via(proxy, vhost), amqp_heartbeat=2)
    orchestrator.wait_until(lambda: bool(orchestrator.heartbeats()), 20, "first heartbeat")
    proxy.stall()
    # Two heartbeat intervals (4 s) plus pika's check granularity.
    orchestrator.wait_until(lambda: _count(worker, "connection lost") == 1, 10, "detection")
    proxy.cut()
    proxy.resume()
    request = work_request("echo", {"message": "unstuck"})
    orchestrator.publish(request)
    assert orchestrator.wait_for_result(request, timeout=40)["payload"]["output"] == "unstuck"


def test_broker_restart_is_survived(
    vhost: Vhost, orchestrator: Orchestrator, proxy: TcpProxy, spawn: Spawn
) -> None:
    worker = spawn(url=_via(proxy, vhost))
    orchestrator.wait_until(lambda: bool(orchestrator.heartbeats()), 20, "first heartbeat")
    proxy.refuse()  # the broker is down for a while...
    proxy.cut()
    orchestrator.wait_until(
        lambda: _count(worker, "broker not reachable, retrying") >= 1, 20, "a failed retry"
    )
    request = work_request("echo", {"message": "back"})
    orchestrator.publish(request)
    proxy.accept()  # ...and back
    assert orchestrator.wait_for_result(request, timeout=40)["payload"]["output"] == "back"
    assert worker.stop() == 0


def test_deleted_work_queue_is_declared_again_and_consumed(
    orchestrator: Orchestrator, spawn: Spawn
) -> None:
    worker = spawn()
    orchestrator.wait_until(lambda: bool(orchestrator.heartbeats()), 20, "first heartbeat")
    orchestrator.wait_until(
        lambda: (
            orchestrator.channel.queue_declare("work_queue", passive=True).method.consumer_count
            == 1
        ),
        10,
        "consumer",
    )
    orchestrator.channel.queue_delete("work_queue")
    orchestrator.wait_until(lambda: _count(worker, "connected to broker") == 2, 20, "redeclare")
    request = work_request("echo", {"message": "queue is back"})
    orchestrator.publish(request)
    assert orchestrator.wait_for_result(request)["payload"]["output"] == "queue is back"
    assert any("cancelled our consumer" in str(r.get("reason")) for r in worker.records())


def test_sigterm_while_disconnected_exits_promptly(
    vhost: Vhost, orchestrator: Orchestrator, proxy: TcpProxy, spawn: Spawn
) -> None:
    proxy.refuse()
    worker = spawn(url=_via(proxy, vhost))
    orchestrator.wait_until(
        lambda: _count(worker, "broker not reachable, retrying") >= 1, 20, "a retry"
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=5) == 0


def test_wrong_vhost_exits_77_without_retrying(vhost: Vhost, spawn: Spawn) -> None:
    worker = spawn(url=vhost.url().rsplit("/", 1)[0] + "/no-such-vhost")
    assert worker.wait(timeout=30) == 77
    assert "vhost" in worker.log_path.read_text()


def test_memory_alarm_blocks_publishing_then_the_result_arrives(
    vhost: Vhost, orchestrator: Orchestrator
) -> None:
    worker = CountingWorker(
        Settings(amqp_url=vhost.url(), blocked_connection_timeout=2, shutdown_timeout=10)
    )
    worker.release.clear()
    with InProcessWorker(worker) as running:
        request = work_request("gated", {"message": "alarm"})
        orchestrator.publish(request)
        assert worker.started.wait(15)
        rabbitmqctl("set_vm_memory_high_watermark", "absolute", "1")
        try:
            worker.release.set()  # the result is ready while publishing is blocked
            orchestrator.wait_until(lambda: running.service.connections >= 2, 30, "blocked timeout")
        finally:
            rabbitmqctl("set_vm_memory_high_watermark", "0.4")
        result = orchestrator.wait_for_result(request, timeout=30)["payload"]
    assert result["output"] == "released"
    assert len(orchestrator.distinct_results()) == 1


def test_every_answered_task_has_its_work_finished_line_once_while_the_link_flaps(
    vhost: Vhost, orchestrator: Orchestrator, proxy: TcpProxy, spawn: Spawn
) -> None:
    worker = spawn(url=_via(proxy, vhost))
    # 20 ms of work each: about six seconds of cuts while they run.
    requests = [
        work_request("slow_echo", {"seconds": 0.02, "message": f"m{n}"}) for n in range(300)
    ]
    with ConnectionCutter(proxy, every=0.5) as cutter:
        for request in requests:
            orchestrator.publish(request)
        orchestrator.wait_until(
            lambda: len(orchestrator.distinct_results()) >= len(requests), 90, "every result"
        )
    assert worker.stop() == 0

    answered = {result["request_id"] for result in orchestrator.distinct_results()}
    logged = Counter(
        record.get("request_id")
        for record in worker.records()
        if record.get("message") == "work finished"
    )
    print(f"\nflapping link: {cutter.cuts} cuts, {len(answered)} answered")
    assert cutter.cuts >= 2
    assert answered == {request["request_id"] for request in requests}
    assert {request_id: logged[request_id] for request_id in answered} == dict.fromkeys(answered, 1)
