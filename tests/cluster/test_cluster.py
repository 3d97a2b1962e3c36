"""The worker on a real three-node RabbitMQ cluster: node loss, queue ownership, spreading.

Run with `make test-cluster`. Figures (failover times, accounting) are
appended as JSON lines to the file named by CLUSTER_FIGURES when it is set;
CLUSTER_RUNS repeats each failover scenario (default once).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest

from chiffon_worker.ctl import ControlClient
from tests.cluster.conftest import (
    Collector,
    Operator,
    Publisher,
    agent_landing_on,
    runs,
    wait_for_record,
)
from tests.helpers.broker import work_request
from tests.helpers.cluster import Cluster
from tests.helpers.process import WorkerProcess

pytestmark = pytest.mark.cluster

Spawn = Callable[..., WorkerProcess]
REQUESTS = 2000
RATE = 100.0
# Results seen before a node is stopped: the stream is well under way.
STOP_AFTER = 500
FAILOVER_TARGET_S = 5.0
# Losing the leader costs a Raft election (measured 3.1-4.9 s on RabbitMQ 3.10
# here): the 5 s target, with room for a loaded CI machine.
LEADER_FAILOVER_LIMIT_S = 8.0
REPEATS = int(os.environ.get("CLUSTER_RUNS", "1"))


def record_figures(**figures: Any) -> None:
    path = os.environ.get("CLUSTER_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(figures) + "\n")


def failover_under_load(
    cluster: Cluster, vhost: str, spawn: Spawn, *, stop_leader: bool
) -> dict[str, Any]:
    """Worker on node 2, operator's quorum queues led by node 1; stop one of them mid-stream."""
    operator = Operator(cluster.url(1, vhost))
    operator.declare(queue_type="quorum")  # declared on node 1: node 1 leads
    operator.close()
    assert cluster.quorum_leader("work_queue", vhost) == 1
    urls = cluster.urls(vhost)
    worker = spawn(
        "worker",
        urls,
        agent_id=agent_landing_on(urls, urls[1]),
        declare_topology="false",
        ack_mode="late",
        heartbeat_interval=5,
    )
    _, connected = wait_for_record(worker, "connected to broker", 30)
    assert connected["node"] == cluster.node(2).address
    victim, spare = (1, 3) if stop_leader else (2, 3)
    collector = Collector(cluster.url(spare, vhost))
    publisher = Publisher(cluster.url(spare, vhost), REQUESTS, RATE)
    publisher.start()
    collector.wait_until(lambda: len(collector.results) >= STOP_AFTER, 30, "the stream")

    mark = len(worker.records())
    stopped_at = cluster.stop_app(victim)
    figures: dict[str, Any] = {"stopped": "quorum leader" if stop_leader else "worker's node"}
    if stop_leader:
        figures["new_leader"] = cluster.quorum_leader("work_queue", vhost)
    else:
        _, again = wait_for_record(worker, "connected to broker", 30, after=mark)
        figures["failover_s"] = round(time.monotonic() - stopped_at, 2)
        figures["worker_outage_s"] = again.get("outage_s")
        assert again["node"] != cluster.node(victim).address

    ids = {request["request_id"] for request in publisher.requests}
    collector.wait_until(
        lambda: publisher.done.is_set() and ids <= set(collector.results),
        REQUESTS / RATE + 60,
        "every request answered",
    )
    assert publisher.error is None, publisher.error
    figures["result_gap_s"] = round(collector.longest_gap(after=stopped_at - 1), 2)
    executions = Counter(runs(worker))
    checker = Operator(cluster.url(spare, vhost))
    try:
        figures.update(
            requests=REQUESTS,
            answered=len(ids & set(collector.results)),
            executions=sum(executions.values()),
            ran_twice=sum(1 for n in executions.values() if n > 1),
            results_sent_again=sum(len(t) - 1 for t in collector.results.values()),
            dead_lettered=checker.depth("dlx_queue"),
            left_in_work_queue=checker.depth("work_queue"),
        )
    finally:
        checker.close()
        collector.close()
    assert worker.stop() == 0
    record_figures(**figures)
    return figures


@pytest.mark.parametrize("run", range(REPEATS))
def test_losing_the_workers_node_under_load_loses_and_doubles_nothing(
    cluster: Cluster, vhost: str, spawn: Spawn, run: int
) -> None:
    figures = failover_under_load(cluster, vhost, spawn, stop_leader=False)
    assert figures["answered"] == REQUESTS
    assert figures["executions"] == REQUESTS
    assert figures["ran_twice"] == 0
    assert figures["dead_lettered"] == 0
    assert figures["failover_s"] <= FAILOVER_TARGET_S, figures


@pytest.mark.parametrize("run", range(REPEATS))
def test_losing_the_quorum_leader_under_load_loses_and_doubles_nothing(
    cluster: Cluster, vhost: str, spawn: Spawn, run: int
) -> None:
    figures = failover_under_load(cluster, vhost, spawn, stop_leader=True)
    assert figures["new_leader"] in (2, 3)
    assert figures["answered"] == REQUESTS
    assert figures["executions"] == REQUESTS
    assert figures["ran_twice"] == 0
    assert figures["dead_lettered"] == 0
    assert figures["result_gap_s"] <= LEADER_FAILOVER_LIMIT_S, figures


def test_a_classic_queue_whose_node_stops_is_named_heartbeats_go_on_and_it_is_consumed_again(
    cluster: Cluster, vhost: str, spawn: Spawn
) -> None:
    operator = Operator(cluster.url(1, vhost))
    operator.declare(queue_type=None, work_queue=False)  # reply_queue lives on node 1
    urls = cluster.urls(vhost)
    agent_id = agent_landing_on(urls, urls[2])
    worker = spawn("worker", urls, agent_id=agent_id, heartbeat_interval=1)
    _, connected = wait_for_record(worker, "connected to broker", 30)
    assert connected["node"] == cluster.node(3).address
    assert cluster.queue_home("work_queue", vhost) == 3  # the worker declared it there
    # So did its control queue: both are away while node 3 is.
    collector = Collector(cluster.url(1, vhost))
    operator.channel.confirm_delivery()
    requests = [work_request("slow_echo", {"seconds": 0.5}, priority=4) for _ in range(10)]
    for request in requests:  # persistent and confirmed: the broker has them
        operator.channel.basic_publish(
            "",
            "work_queue",
            json.dumps(request).encode(),
            pika.BasicProperties(content_type="application/json", priority=4, delivery_mode=2),
            mandatory=True,
        )
    collector.wait_until(lambda: len(collector.results) >= 1, 30, "the first result")

    mark = len(worker.records())
    stopped_at = cluster.stop_app(3)
    _, unavailable = wait_for_record(worker, "queue unavailable", 30, after=mark)
    assert unavailable["queue"] == "work_queue"
    assert unavailable["reason"] == "node down"
    assert cluster.node(3).node in unavailable["broker_says"]
    _, moved = wait_for_record(worker, "connected to broker", 30, after=mark)
    assert moved["node"] != cluster.node(3).address
    beats_before = len(collector.heartbeats)
    collector.wait_until(
        lambda: len(collector.heartbeats) >= beats_before + 3, 15, "heartbeats from another node"
    )
    answered_while_down = len(collector.results)
    # Commands still reach the worker, through the stand-in for its control queue.
    wait_for_record(worker, "control queue unavailable", 15, after=mark)
    with ControlClient(cluster.url(1, vhost)) as control:
        answers = control.ping(agent_ids=[agent_id], timeout=10)
    assert [answer.agent_id for answer in answers] == [agent_id]

    cluster.start_app(3)
    back_at = time.monotonic()
    wait_for_record(worker, "queue available again", 30, after=mark, queue="work_queue")
    ids = {request["request_id"] for request in requests}
    collector.wait_until(lambda: ids <= set(collector.results), 30, "every confirmed request")
    executions = Counter(runs(worker))
    assert sum(executions.values()) == len(requests)
    assert worker.stop() == 0
    record_figures(
        scenario="classic queue's node stopped",
        answered_before_node_back=answered_while_down,
        heartbeats_while_down=len(collector.heartbeats) - beats_before,
        consuming_again_after_node_back_s=round(time.monotonic() - back_at, 2),
        down_for_s=round(back_at - stopped_at, 2),
    )
    collector.close()
    operator.close()


def test_an_operators_quorum_queue_is_a_one_line_mismatch_and_exit_78(
    cluster: Cluster, vhost: str, spawn: Spawn
) -> None:
    operator = Operator(cluster.url(1, vhost))
    operator.channel.queue_declare(
        "work_queue",
        durable=True,
        arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": "dlx_exchange"},
    )
    operator.close()
    started = time.monotonic()
    worker = spawn("worker", cluster.urls(vhost))
    assert worker.wait(timeout=15) == 78
    took = time.monotonic() - started
    lines = [r for r in worker.records() if "x-queue-type" in json.dumps(r)]
    assert len(lines) == 1, lines
    assert lines[0]["queue"] == "work_queue"
    assert lines[0]["argument"] == "x-queue-type"
    assert lines[0]["broker_has"] == "'quorum'"
    assert "CHIFFON_DECLARE_TOPOLOGY=false" in lines[0]["message"]
    assert not [m for m in worker.messages() if m.startswith("broker not reachable")]
    record_figures(scenario="quorum mismatch", exit_code=78, exit_after_s=round(took, 2))
    assert took <= 5.0


def test_a_missing_queue_is_named_and_checked_again_slowly_until_the_operator_declares_it(
    cluster: Cluster, vhost: str, spawn: Spawn
) -> None:
    operator = Operator(cluster.url(1, vhost))
    operator.declare(queue_type="quorum", work_queue=False)
    worker = spawn("worker", cluster.urls(vhost), declare_topology="false")
    first, missing = wait_for_record(worker, "queue unavailable", 30)
    assert (missing["queue"], missing["reason"]) == ("work_queue", "missing")
    seen_at = time.monotonic()
    wait_for_record(worker, "queue unavailable", 30, after=first + 1)
    assert time.monotonic() - seen_at >= 8.0  # checked again slowly, not in a tight loop

    operator.channel.queue_declare(
        "work_queue",
        durable=True,
        arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": "dlx_exchange"},
    )
    wait_for_record(worker, "queue available again", 30, after=first)
    collector = Collector(cluster.url(1, vhost))
    request = work_request()
    operator.channel.basic_publish("", "work_queue", json.dumps(request).encode())
    collector.wait_until(lambda: request["request_id"] in collector.results, 30, "the result")
    messages = worker.messages()
    assert not [m for m in messages if m.startswith("broker not reachable")]
    assert messages.count("connected to broker") == 1
    collector.close()
    operator.close()


def test_workers_with_one_url_list_spread_over_the_nodes(
    cluster: Cluster, vhost: str, spawn: Spawn, tmp_path: Path
) -> None:
    urls = cluster.urls(vhost)
    landed: list[tuple[str, str]] = []
    for start in range(10):
        pair = [spawn(f"start{start}-{side}", urls, agent_id=str(uuid.uuid4())) for side in "ab"]
        nodes = [wait_for_record(worker, "connected to broker", 30)[1]["node"] for worker in pair]
        landed.append((nodes[0], nodes[1]))
        for worker in pair:
            assert worker.stop() == 0
    apart = sum(1 for a, b in landed if a != b)
    record_figures(scenario="two workers, 10 starts", apart=apart, landed=landed)
    # Independent shuffles part two workers 2 times in 3: 6.7 of 10 expected; 2 or
    # fewer happens once in 300 runs of this test, and always if they did not shuffle.
    assert apart >= 3, landed
    assert len({node for pair in landed for node in pair}) == 3
