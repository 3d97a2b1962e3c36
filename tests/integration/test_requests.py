"""Request handling on an in-process worker: duplicates, acks, progress, replies."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest

from chiffon_worker.config import Settings
from tests.helpers.broker import Orchestrator, Vhost, work_request
from tests.helpers.process import InProcessWorker
from tests.helpers.workers import CountingWorker, ProgressWorker, WrongTypeWorker

pytestmark = pytest.mark.integration


@pytest.fixture
def counting(settings: Settings, orchestrator: Orchestrator) -> Iterator[CountingWorker]:
    worker = CountingWorker(settings)
    with InProcessWorker(worker):
        orchestrator.wait_until(lambda: bool(orchestrator.heartbeats()), 15, "worker online")
        yield worker


def test_duplicate_request_runs_work_once_and_answers_with_its_own_trace_id(
    orchestrator: Orchestrator, counting: CountingWorker
) -> None:
    first = work_request("echo", {"message": "once"})
    orchestrator.publish(first)
    orchestrator.wait_for_result(first)
    retry = work_request("echo", {"message": "once"}, request_id=first["request_id"])
    orchestrator.publish(retry)
    orchestrator.wait_until(lambda: len(orchestrator.results()) == 2, 15, "the second result")

    assert counting.runs["once"] == 1
    traces = [r["trace_id"] for r in orchestrator.results()]
    assert traces == [first["trace_id"], retry["trace_id"]]
    assert orchestrator.results()[1]["payload"]["trace_id"] == retry["trace_id"]
    assert orchestrator.results()[1]["payload"]["output"] == "once"


def test_duplicate_arriving_while_the_first_runs_does_not_run_again(
    vhost: Vhost, orchestrator: Orchestrator
) -> None:
    # Two work slots, so the duplicate is dispatched while the first still runs.
    worker = CountingWorker(Settings(amqp_url=vhost.url(), prefetch=2, shutdown_timeout=10))
    worker.release.clear()
    with InProcessWorker(worker):
        first = work_request("gated", {"message": "gated"})
        orchestrator.publish(first)
        assert worker.started.wait(15)
        duplicate = work_request("gated", {"message": "gated"}, request_id=first["request_id"])
        orchestrator.publish(duplicate)
        # Wait until the broker shows the duplicate taken by the worker.
        orchestrator.wait_until(
            lambda: orchestrator.queue_depth("work_queue") == 0, 15, "duplicate delivered"
        )
        worker.release.set()
        orchestrator.wait_until(lambda: len(orchestrator.results()) == 2, 15, "both results")
    assert worker.runs["gated"] == 1
    assert {r["trace_id"] for r in orchestrator.results()} == {
        first["trace_id"],
        duplicate["trace_id"],
    }


def test_late_ack_mode_acks_only_after_the_result(vhost: Vhost, orchestrator: Orchestrator) -> None:
    worker = CountingWorker(Settings(amqp_url=vhost.url(), ack_mode="late", shutdown_timeout=10))
    worker.release.clear()
    with InProcessWorker(worker) as running:
        request = work_request("gated", {"message": "late"})
        orchestrator.publish(request)
        assert worker.started.wait(15)
        # Still running: the delivery is unacked, so the broker still counts it.
        depth = orchestrator.channel.queue_declare("work_queue", passive=True).method
        assert (depth.message_count, depth.consumer_count) == (0, 1)
        worker.release.set()
        orchestrator.wait_for_result(request)
        assert running.stop() == 0
    # Acked after the result: closing the connection returned nothing to the queue.
    assert orchestrator.queue_depth("work_queue") == 0
    assert worker.runs["late"] == 1


def test_work_still_unacked_in_late_mode_goes_back_to_the_queue_when_abandoned(
    vhost: Vhost, orchestrator: Orchestrator
) -> None:
    worker = CountingWorker(Settings(amqp_url=vhost.url(), ack_mode="late", shutdown_timeout=0))
    worker.release.clear()
    with InProcessWorker(worker) as running:
        orchestrator.publish(work_request("gated", {"message": "abandoned"}))
        assert worker.started.wait(15)
        assert running.stop() == 0
    worker.release.set()
    assert orchestrator.queue_depth("work_queue") == 1


def test_progress_is_reported_before_the_result(
    settings: Settings, orchestrator: Orchestrator
) -> None:
    with InProcessWorker(ProgressWorker(settings)):
        request = work_request("echo")
        orchestrator.publish(request)
        orchestrator.wait_for_result(request)
    kinds = [
        ("progress" if "progress_percent" in m["payload"] else m["type"])
        for m in orchestrator.received["reply_queue"]
        if m["request_id"] == request["request_id"]
    ]
    assert kinds == ["progress", "progress", "work_result"]
    steps = [
        m["payload"]
        for m in orchestrator.received["reply_queue"]
        if "progress_percent" in m["payload"]
    ]
    assert [(s["progress_percent"], s["step"]["name"], s["status"]) for s in steps] == [
        (50, "halfway", "running"),
        (100, "done", "step_completed"),
    ]
    assert steps[0]["step"]["output"] == "first half done"


def test_result_goes_to_reply_to_with_the_correlation_id(
    settings: Settings, orchestrator: Orchestrator
) -> None:
    private = orchestrator.channel.queue_declare("", exclusive=True).method.queue
    orchestrator.watch(private)
    with InProcessWorker(CountingWorker(settings)):
        request = work_request("echo", {"message": "direct"})
        orchestrator.publish(request, reply_to=private, correlation_id="corr-42")
        orchestrator.wait_until(lambda: bool(orchestrator.results(private)), 15, "direct reply")
    assert orchestrator.results(private)[0]["payload"]["output"] == "direct"
    assert orchestrator.properties[private][0].correlation_id == "corr-42"
    assert orchestrator.properties[private][0].delivery_mode == 2
    assert not orchestrator.results("reply_queue")


def test_a_result_of_the_wrong_type_becomes_a_failure(
    settings: Settings, orchestrator: Orchestrator
) -> None:
    with InProcessWorker(WrongTypeWorker(settings)):
        request = work_request("echo")
        orchestrator.publish(request)
        result = orchestrator.wait_for_result(request)["payload"]
    assert (result["status"], result["exit_code"]) == ("failed", 1)
    assert "str" in result["error_message"]


def test_work_over_its_time_limit_fails_with_5001_and_the_worker_serves_on(
    settings: Settings, orchestrator: Orchestrator
) -> None:
    with InProcessWorker(CountingWorker(settings)):
        stuck = work_request("slow_echo", {"seconds": 60}, hints={"max_duration_seconds": 1})
        after = work_request("echo", {"message": "next"})
        orchestrator.publish(stuck)
        orchestrator.publish(after)
        timed_out = orchestrator.wait_for_result(stuck)["payload"]
        assert orchestrator.wait_for_result(after)["payload"]["output"] == "next"
    assert timed_out["status"] == "failed"
    assert "5001" in timed_out["error_message"]


def test_a_result_too_large_for_the_broker_becomes_a_failure(
    vhost: Vhost, orchestrator: Orchestrator
) -> None:
    worker = CountingWorker(Settings(amqp_url=vhost.url(), max_result_bytes=4096))
    with InProcessWorker(worker):
        huge = work_request("echo", {"message": "x" * 10_000})
        after = work_request("echo", {"message": "small"})
        orchestrator.publish(huge)
        orchestrator.publish(after)
        result = orchestrator.wait_for_result(huge)["payload"]
        assert orchestrator.wait_for_result(after)["payload"]["output"] == "small"
    assert (result["status"], result["exit_code"], result["output"]) == ("failed", 1, "")
    assert "CHIFFON_MAX_RESULT_BYTES" in result["error_message"]


@pytest.mark.parametrize("ack_mode", ["early", "late"])
def test_an_answer_no_queue_can_take_is_retried_then_dropped_and_the_worker_serves_on(
    vhost: Vhost, orchestrator: Orchestrator, caplog: pytest.LogCaptureFixture, ack_mode: str
) -> None:
    """A reply_to naming no queue: the broker returns the result; it is not lost silently."""
    caplog.set_level(logging.INFO, logger="chiffon_worker")
    worker = CountingWorker(Settings(amqp_url=vhost.url(), ack_mode=ack_mode, shutdown_timeout=10))
    with InProcessWorker(worker) as running:
        lost = work_request("echo", {"message": "nowhere"})
        orchestrator.publish(lost, reply_to=f"no-such-queue-{uuid.uuid4()}")
        after = work_request("echo", {"message": "next"})
        orchestrator.publish(after)
        assert orchestrator.wait_for_result(after)["payload"]["output"] == "next"
        orchestrator.wait_until(
            lambda: "publish failed for good: message dropped" in caplog.messages,
            15,
            "the dropped result's log line",
        )
        # Nothing waits unacked behind the dropped answer, in either mode.
        orchestrator.wait_until(lambda: not running.service.pending(), 15, "an empty outbox")
    retries = [r for r in caplog.records if r.getMessage().startswith("publish refused")]
    dropped = [r for r in caplog.records if r.getMessage().startswith("publish failed for good")]
    assert len(retries) == 2
    assert len(dropped) == 1
    assert "NO_ROUTE" in dropped[0].reason  # type: ignore[attr-defined]
    assert orchestrator.queue_depth("work_queue") == 0
    assert worker.runs["nowhere"] == 1
