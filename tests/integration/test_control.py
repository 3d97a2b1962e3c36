"""Control commands against the real broker: ping, pause, resume and cancel.

Commands go out as PROTOCOL.md's "Extension: control commands" spells them
(built by chiffon_worker.ctl.build_command, whose wire format
tests/unit/test_ctl.py pins; tests/helpers/control.py sends them and keeps the
answers raw); real `chiffon-worker run` processes answer. Each worker gets an
agent id of its own (CHIFFON_AGENT_ID): otherwise workers on one host derive
the same one and share a control queue.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest

from chiffon_worker.ctl import build_command
from tests.helpers.broker import Orchestrator, Vhost, work_request
from tests.helpers.control import Answer, ControlSender, Sent
from tests.helpers.process import WorkerProcess
from tests.helpers.proxy import TcpProxy

pytestmark = pytest.mark.integration

Spawn = Callable[..., WorkerProcess]
Request = dict[str, Any]


@dataclass(frozen=True)
class Worker:
    process: WorkerProcess
    agent_id: str

    def logged(self, message: str) -> list[dict[str, Any]]:
        return [r for r in self.process.records() if r.get("message", "").startswith(message)]


@pytest.fixture
def sender(orchestrator: Orchestrator) -> Iterator[ControlSender]:
    """On the orchestrator's connection: either one's wait services both."""
    control = ControlSender(orchestrator.connection)
    try:
        yield control
    finally:
        control.close()


def _via(proxy: TcpProxy, vhost: Vhost) -> str:
    return proxy.url(quote(vhost.name, safe=""))


@pytest.fixture
def behind_proxy(
    vhost: Vhost, orchestrator: Orchestrator, spawn: Spawn, proxy: TcpProxy
) -> Callable[..., Worker]:
    """start(**settings): one worker online through `proxy`, reconnecting within a second."""

    def start(**settings: Any) -> Worker:
        url = _via(proxy, vhost)
        [worker] = _start(spawn, orchestrator, 1, url=url, reconnect_max_delay=1, **settings)
        return worker

    return start


def _start(
    spawn: Spawn,
    orchestrator: Orchestrator,
    count: int,
    *,
    agent_id: str | None = None,
    **settings: object,
) -> list[Worker]:
    """`count` workers, online (each has sent the heartbeat it sends on connecting)."""
    first = len(orchestrator.heartbeats())
    workers: list[Worker] = []
    for _ in range(count):
        agent = agent_id or str(uuid.uuid4())
        name = f"worker-{len(workers)}-{uuid.uuid4().hex[:6]}"
        workers.append(Worker(spawn(name, agent_id=agent, **settings), agent))
    wanted = {w.agent_id for w in workers}
    orchestrator.wait_until(
        lambda: wanted <= {h["payload"]["agent_id"] for h in orchestrator.heartbeats()[first:]},
        20,
        f"{count} workers online",
    )
    return workers


def _ping(sender: ControlSender, agents: list[str], timeout: float = 2) -> dict[str, Answer]:
    answers = sender.ask("ping", len(agents), timeout, agent_ids=agents)
    return {a.agent_id: a for a in answers}


def _slow_task(
    orchestrator: Orchestrator,
    sender: ControlSender,
    workers: list[Worker],
    seconds: float,
    message: str,
) -> tuple[Request, str]:
    """A slow_echo of `seconds`, published; once one of `workers` runs it: it, and that
    worker's agent id (pinged until one runs it)."""
    request = work_request("slow_echo", {"seconds": seconds, "message": message})
    orchestrator.publish(request)
    task_id = request["payload"]["task_id"]
    agents = [w.agent_id for w in workers]
    found: list[str] = []

    def started() -> bool:
        found[:] = [
            a for a, ans in _ping(sender, agents).items() if ans.reply["current_task"] == task_id
        ]
        return bool(found)

    sender.wait_until(started, 15, f"task {task_id} to start")
    return request, found[0]


def _publish_all(orchestrator: Orchestrator, count: int, message: str) -> list[Request]:
    requests = [work_request("echo", {"message": f"{message} {n}"}) for n in range(count)]
    for request in requests:
        orchestrator.publish(request)
    return requests


def _served_by(orchestrator: Orchestrator, requests: list[Request]) -> list[str]:
    """The agent ids that answered `requests` (in order), once all are answered."""
    return [orchestrator.wait_for_result(r)["payload"]["agent_id"] for r in requests]


def _results_of(orchestrator: Orchestrator, request: Request) -> list[dict[str, Any]]:
    rid = request["request_id"]
    return [m["payload"] for m in orchestrator.distinct_results() if m["request_id"] == rid]


def _alive(worker: Worker) -> bool:
    process = worker.process.process
    return process is not None and process.poll() is None


def _finished_runs(worker: Worker, request: Request) -> list[dict[str, Any]]:
    return [
        r for r in worker.logged("work finished") if r.get("request_id") == request["request_id"]
    ]


# -- ping -------------------------------------------------------------------------


def test_ping_lists_every_worker_and_a_busy_one_answers_within_a_second(
    orchestrator: Orchestrator, sender: ControlSender, spawn: Spawn
) -> None:
    workers = _start(spawn, orchestrator, 2)
    agents = {w.agent_id for w in workers}
    ping = sender.send("ping")
    answers = sender.wait_for_answers(ping, 2, timeout=2)
    assert {a.agent_id for a in answers} == agents
    for answer in answers:
        reply = answer.reply
        assert (reply["command_id"], reply["command"], reply["outcome"]) == (
            ping.command_id,
            "ping",
            "ok",
        )
        assert reply["state"] == "online"
        assert reply["paused"] is False
        assert all(reply[key] for key in ("host", "version", "started_at"))
        assert reply["uptime_s"] >= 0
        assert set(reply["work_types"]) >= {"echo", "slow_echo"}
        assert answer.message["payload"]["agent_type"] == "infra"

    long_task, busy = _slow_task(orchestrator, sender, workers, 15, "long")
    ping = sender.send("ping")
    answers = sender.wait_for_answers(ping, 2, timeout=1)
    by_agent = {a.agent_id: a for a in answers}
    assert by_agent.keys() == agents
    assert by_agent[busy].reply["state"] == "busy"
    assert by_agent[busy].reply["current_task"] == long_task["payload"]["task_id"]
    assert by_agent[busy].message["payload"]["current_task_id"] == long_task["payload"]["task_id"]
    print(f"\nping while busy: {by_agent[busy].latency(ping) * 1000:.0f} ms")
    assert by_agent[busy].latency(ping) <= 1.0


# -- pause and resume -------------------------------------------------------------


def test_paused_worker_takes_no_requests_keeps_heartbeating_and_resume_brings_it_back(
    orchestrator: Orchestrator, sender: ControlSender, spawn: Spawn
) -> None:
    paused, other = _start(spawn, orchestrator, 2, heartbeat_interval=0.5)

    [answer] = sender.ask("pause", agent_ids=[paused.agent_id])
    assert (answer.agent_id, answer.outcome, answer.paused) == (paused.agent_id, "paused", True)
    [again] = sender.ask("pause", agent_ids=[paused.agent_id])
    assert again.outcome == "already_paused"
    beats_from = len(orchestrator.heartbeats())

    requests = _publish_all(orchestrator, 10, "while paused")
    assert _served_by(orchestrator, requests) == [other.agent_id] * 10

    def paused_beats() -> list[dict[str, Any]]:
        return [
            h
            for h in orchestrator.heartbeats()[beats_from:]
            if h["payload"]["agent_id"] == paused.agent_id
        ]

    orchestrator.wait_until(lambda: len(paused_beats()) >= 2, 5, "heartbeats of the paused worker")
    assert all(h["x_custom_fields"]["x_paused"] is True for h in paused_beats())
    assert _alive(paused)

    [answer] = sender.ask("resume", agent_ids=[paused.agent_id])
    assert (answer.outcome, answer.paused) == ("resumed", False)
    [again] = sender.ask("resume", agent_ids=[paused.agent_id])
    assert again.outcome == "not_paused"
    requests = _publish_all(orchestrator, 10, "after resume")
    assert set(_served_by(orchestrator, requests)) == {paused.agent_id, other.agent_id}
    resumed_from = len(orchestrator.heartbeats())
    orchestrator.wait_until(
        lambda: any(
            h["payload"]["agent_id"] == paused.agent_id
            for h in orchestrator.heartbeats()[resumed_from:]
        ),
        5,
        "a heartbeat after resume",
    )
    last = [
        h
        for h in orchestrator.heartbeats()[resumed_from:]
        if h["payload"]["agent_id"] == paused.agent_id
    ]
    assert last[-1]["x_custom_fields"]["x_paused"] is False


def test_a_paused_worker_is_still_paused_after_its_connection_is_cut(
    orchestrator: Orchestrator,
    sender: ControlSender,
    spawn: Spawn,
    proxy: TcpProxy,
    behind_proxy: Callable[..., Worker],
) -> None:
    paused = behind_proxy()
    [other] = _start(spawn, orchestrator, 1)
    [answer] = sender.ask("pause", agent_ids=[paused.agent_id])
    assert answer.outcome == "paused"

    proxy.cut()
    orchestrator.wait_until(
        lambda: len(paused.logged("connected to broker")) == 2, 20, "the paused worker reconnecting"
    )
    state = _ping(sender, [paused.agent_id, other.agent_id])
    assert state[paused.agent_id].paused is True
    assert state[paused.agent_id].reply["state"] == "paused"
    assert state[other.agent_id].paused is False
    requests = _publish_all(orchestrator, 10, "after the cut")
    assert _served_by(orchestrator, requests) == [other.agent_id] * 10
    consumers = orchestrator.channel.queue_declare("work_queue", passive=True).method
    assert consumers.consumer_count == 1

    [answer] = sender.ask("resume", agent_ids=[paused.agent_id])
    assert answer.outcome == "resumed"
    requests = _publish_all(orchestrator, 10, "resumed after the cut")
    assert paused.agent_id in _served_by(orchestrator, requests)


# -- cancel -----------------------------------------------------------------------


def test_cancel_answers_a_running_task_within_two_seconds_and_frees_the_worker(
    orchestrator: Orchestrator, sender: ControlSender, spawn: Spawn
) -> None:
    workers = _start(spawn, orchestrator, 1)
    for key in ("task_id", "request_id"):
        task, _ = _slow_task(orchestrator, sender, workers, 30, f"cancel by {key}")
        target = task["payload"]["task_id"] if key == "task_id" else task["request_id"]
        cancel = sender.send("cancel", reason=f"operator said stop ({key})", **{key: target})
        result = orchestrator.wait_for_result(task, timeout=2)["payload"]
        cancel_s = time.monotonic() - cancel.sent_at
        assert result["status"] == "cancelled"
        assert f"operator said stop ({key})" in (result["error_message"] or "")
        [answer] = sender.wait_for_answers(cancel, 1, timeout=2)
        assert answer.outcome == "cancelled"

        # The next request is served at once: the cancelled work is not in its way.
        follow = work_request("echo", {"message": f"after cancel by {key}"})
        published = time.monotonic()
        orchestrator.publish(follow)
        assert orchestrator.wait_for_result(follow, timeout=1)["payload"]["status"] == "completed"
        follow_s = time.monotonic() - published
        print(
            f"\ncancel by {key}: result {cancel_s * 1000:.0f} ms after the command; "
            f"next echo {follow_s * 1000:.0f} ms"
        )
        # The work returned before the echo ran (one slot): its own result was dropped.
        assert [r["status"] for r in _results_of(orchestrator, task)] == ["cancelled"]


def test_cancel_before_arrival_answers_the_request_cancelled_without_running_it(
    orchestrator: Orchestrator, sender: ControlSender, spawn: Spawn
) -> None:
    [worker] = _start(spawn, orchestrator, 1)

    # Cancelled before it is even published.
    early = work_request("slow_echo", {"seconds": 5, "message": "never"})
    [answer] = sender.ask("cancel", task_id=early["payload"]["task_id"], reason="not wanted")
    assert answer.outcome == "remembered"
    orchestrator.publish(early)
    result = orchestrator.wait_for_result(early, timeout=2)["payload"]
    assert (result["status"], result["output"]) == ("cancelled", "")
    assert "not wanted" in (result["error_message"] or "")
    assert _ping(sender, [worker.agent_id])[worker.agent_id].reply["current_task"] is None
    # A retry: the same request (request_id, task_id), a new message_id.
    retry = {**early, "message_id": str(uuid.uuid4()), "trace_id": str(uuid.uuid4())}
    orchestrator.publish(retry)
    orchestrator.wait_until(
        lambda: len(_results_of(orchestrator, early)) == 2, 5, "the retry's answer"
    )
    assert [r["status"] for r in _results_of(orchestrator, early)] == ["cancelled", "cancelled"]

    # Cancelled while it waits in the queue behind a paused worker.
    assert sender.ask("pause")[0].outcome == "paused"
    queued = work_request("slow_echo", {"seconds": 5, "message": "never either"})
    orchestrator.publish(queued)
    assert orchestrator.queue_depth("work_queue") == 1
    [answer] = sender.ask("cancel", request_id=queued["request_id"])
    assert answer.outcome == "remembered"
    assert sender.ask("resume")[0].outcome == "resumed"
    result = orchestrator.wait_for_result(queued, timeout=2)["payload"]
    assert result["status"] == "cancelled"

    # Never ran: nothing runs now, and no run of either finished.
    assert _ping(sender, [worker.agent_id])[worker.agent_id].reply["state"] == "online"
    orchestrator.wait_until(
        lambda: len(worker.logged("request cancelled before it arrived")) == 2, 5, "log lines"
    )
    for request in (early, queued):
        assert not [r for r in _finished_runs(worker, request) if r["status"] == "completed"]


@pytest.mark.slow  # `make test-slow`: an outage of five seconds
def test_cancel_sent_while_the_worker_is_disconnected_is_applied_after_the_reconnect(
    orchestrator: Orchestrator,
    sender: ControlSender,
    proxy: TcpProxy,
    behind_proxy: Callable[..., Worker],
) -> None:
    worker = behind_proxy()
    task, _ = _slow_task(orchestrator, sender, [worker], 30, "cut off")

    proxy.refuse()
    proxy.cut()
    cut_at = time.monotonic()
    orchestrator.wait_until(lambda: bool(worker.logged("connection lost")), 5, "the worker cut off")
    cancel = sender.send("cancel", task_id=task["payload"]["task_id"], reason="while away")
    # The outage itself: five seconds in which nothing can reach the worker.
    sender.serve_until(cut_at + 5)
    assert not _results_of(orchestrator, task), "answered while disconnected?"
    assert not sender.answers_to(cancel)
    proxy.accept()
    accepted_at = time.monotonic()

    result = orchestrator.wait_for_result(task, timeout=10)["payload"]
    assert result["status"] == "cancelled"
    assert "while away" in (result["error_message"] or "")
    [answer] = sender.wait_for_answers(cancel, 1, timeout=5)
    assert answer.outcome == "cancelled"
    assert answer.received_at > accepted_at
    print(f"\ncancel applied {answer.received_at - accepted_at:.2f} s after the proxy accepted")


@pytest.mark.slow  # `make test-slow`: an outage of five seconds
def test_cancel_sent_while_the_connection_is_stalled_is_applied_after_the_reconnect(
    orchestrator: Orchestrator,
    sender: ControlSender,
    proxy: TcpProxy,
    behind_proxy: Callable[..., Worker],
) -> None:
    """A connection that goes silent (a partition, a dead host), not one closed cleanly.

    The worker gives up on it after two AMQP heartbeats (2 s each here) and
    reconnects; a command sent in that window must still reach it.
    """
    worker = behind_proxy(amqp_heartbeat=2)
    task, _ = _slow_task(orchestrator, sender, [worker], 30, "stalled")

    proxy.stall()
    stalled_at = time.monotonic()
    cancel = sender.send("cancel", task_id=task["payload"]["task_id"], reason="while stalled")
    control_queue = f"chiffon.control.{worker.agent_id}"
    sender.serve_until(stalled_at + 1)
    waiting_during_stall = orchestrator.queue_depth(control_queue)
    orchestrator.wait_until(
        lambda: bool(worker.logged("connection lost")), 10, "the worker giving up on it"
    )
    sender.serve_until(stalled_at + 5)
    proxy.resume()

    try:
        result = orchestrator.wait_for_result(task, timeout=10)["payload"]
    except AssertionError:
        raise AssertionError(
            "the cancel sent during the stall never took effect: no result 10 s after the "
            f"stall ended (control queue depth 1 s into the stall: {waiting_during_stall}; "
            f"answers to the cancel: {len(sender.answers_to(cancel))}; worker log: "
            f"{worker.process.messages()})"
        ) from None
    assert result["status"] == "cancelled"
    [answer] = sender.wait_for_answers(cancel, 1, timeout=5)
    assert answer.outcome == "cancelled"


# In _malformed_commands: take this field out of the command.
_DROP = object()


def _malformed_commands(count: int) -> list[bytes]:
    """Control messages no worker may act on, written from PROTOCOL.md, many kinds."""
    rng = random.Random(10)

    def command(**changes: Any) -> dict[str, Any]:
        good: dict[str, Any] = json.loads(build_command("ping", agent_type="infra").body)
        for path, value in changes.items():
            *parents, leaf = path.split("__")
            node = good
            for part in parents:
                node = node[part]
            if value is _DROP:
                node.pop(leaf)
            else:
                node[leaf] = value
        return good

    def encoded(document: object) -> bytes:
        return json.dumps(document).encode()

    kinds: list[Callable[[], bytes]] = [
        lambda: os.urandom(rng.randint(0, 300)),
        lambda: b"\xff\xfe" + os.urandom(20),
        lambda: rng.choice([b"", b"{", b"null", b"[]", b"42", b'"ping"', b"{'a': 1}"]),
        lambda: b"[" * 5000 + b"]" * 5000,
        lambda: encoded({"hello": "world", "n": rng.random()}),
        lambda: encoded([command()]),
        lambda: encoded(
            command(
                **{rng.choice(["message_id", "trace_id", "type", "payload", "to_agent"]): _DROP}
            )
        ),
        lambda: encoded(command(payload__task_id=_DROP)),
        lambda: encoded(command(payload__work_type=_DROP)),
        lambda: encoded(command(x_custom_fields=_DROP)),
        lambda: encoded(command(x_custom_fields__x_control=_DROP)),
        lambda: encoded(command(x_custom_fields__x_control__expires_at=_DROP)),
        lambda: encoded(command(x_custom_fields__x_control__expires_at="tomorrow")),
        lambda: encoded(command(x_custom_fields__x_control__agent_ids="not a list")),
        lambda: encoded(command(message_id="not-a-uuid")),
        lambda: encoded(command(trace_id="1234")),
        lambda: encoded(command(payload__task_id="zzzz")),
        lambda: encoded(
            command(payload__parameters={"command": "cancel", "task_id": "no-such-uuid"})
        ),
        lambda: encoded(command(payload__parameters={"command": "cancel"})),
        lambda: encoded(command(payload__parameters={"command": rng.choice(["reboot", "PING"])})),
        lambda: encoded(command(payload__parameters={})),
        lambda: encoded(command(payload__work_type="echo")),
        lambda: encoded(command(type="work_result")),
        lambda: encoded(command(protocol_version="2.0")),
        lambda: encoded(command(priority=9)),
        lambda: encoded(command(from_agent="nobody")),
        lambda: encoded(command(payload="ping")),
    ]
    return [kinds[n % len(kinds)]() for n in range(count)]


def test_late_cancel_expired_and_malformed_commands_change_nothing(
    orchestrator: Orchestrator, sender: ControlSender, spawn: Spawn
) -> None:
    workers = _start(spawn, orchestrator, 1)
    [worker] = workers

    # A late cancel of A, while B runs: B is untouched.
    task_a = work_request("echo", {"message": "A"})
    orchestrator.publish(task_a)
    assert orchestrator.wait_for_result(task_a)["payload"]["status"] == "completed"
    task_b, _ = _slow_task(orchestrator, sender, workers, 2, "B")
    for key, value in (
        ("task_id", task_a["payload"]["task_id"]),
        ("request_id", task_a["request_id"]),
    ):
        [answer] = sender.ask("cancel", **{key: value})
        assert answer.outcome == "already_finished", key
        assert answer.reply["current_task"] == task_b["payload"]["task_id"]
    result_b = orchestrator.wait_for_result(task_b, timeout=10)["payload"]
    assert (result_b["status"], result_b["output"]) == ("completed", "B")
    assert [r["status"] for r in _results_of(orchestrator, task_a)] == ["completed"]

    # An expired command: ignored without an answer (the ping behind it is answered).
    # Made two minutes ago: expired one minute ago.
    expired = sender.send("ping", now=datetime.now(UTC) - timedelta(minutes=2))
    sender.ask("ping")
    assert not sender.answers_to(expired)
    ignored = worker.logged("control message ignored")
    assert len(ignored) == 1
    assert ignored[0]["reason"].startswith("expired")

    # The same command twice (a sender's retry): applied and answered once.
    twice = build_command("ping", agent_type="infra")
    for _ in range(2):
        sender.publish_raw(twice.body, correlation_id=str(twice.id))
    sender.ask("ping")
    assert len([a for a in sender.answers if a.correlation_id == str(twice.id)]) == 1
    assert worker.logged("control message ignored")[-1]["reason"] == "duplicate command id"

    # 300 malformed control messages: each ignored, none answered, the worker lives.
    answered_before = len(sender.answers)
    for body in _malformed_commands(300):
        sender.publish_raw(body)
    ping = sender.send("ping")
    sender.wait_for_answers(ping, 1, timeout=10)
    assert len(sender.answers) == answered_before + 1, "a malformed command was answered"
    assert _alive(worker)
    orchestrator.wait_until(
        lambda: len(worker.logged("control message ignored")) >= 302, 5, "300 more ignored lines"
    )
    assert len(worker.logged("control message ignored")) == 302
    request = work_request("echo", {"message": "still here"})
    orchestrator.publish(request)
    assert orchestrator.wait_for_result(request)["payload"]["output"] == "still here"
    assert "Traceback" not in worker.process.log_path.read_text(errors="replace")


# -- many workers -----------------------------------------------------------------


def _percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: the smallest value at or above `fraction` of them."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def test_ping_is_answered_within_a_second_at_p99_by_four_workers_one_busy(
    orchestrator: Orchestrator, sender: ControlSender, spawn: Spawn
) -> None:
    workers = _start(spawn, orchestrator, 4)
    _, busy = _slow_task(orchestrator, sender, workers, 60, "busy")

    pings: list[Sent] = []
    for _ in range(100):
        pings.append(sender.send("ping"))
        # A ping every 20 ms, the connection serviced in between (answers stamped on arrival).
        sender.serve_until(pings[-1].sent_at + 0.02)
    sender.wait_until(
        lambda: all(len(sender.answers_to(p)) >= 4 for p in pings), 10, "every ping answered 4x"
    )
    latencies: dict[str, list[float]] = {w.agent_id: [] for w in workers}
    for ping in pings:
        for answer in sender.answers_to(ping):
            latencies[answer.agent_id].append(answer.latency(ping))
    print()
    for agent, values in latencies.items():
        assert len(values) == 100, f"{agent} answered {len(values)} of 100 pings"
        p50, p99 = statistics.median(values), _percentile(values, 0.99)
        role = "busy" if agent == busy else "idle"
        print(f"{role} {agent[:8]}: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    for agent, values in latencies.items():
        assert _percentile(values, 0.99) <= 1.0, agent


def test_two_workers_with_one_agent_id_are_noticed_and_both_serve(
    orchestrator: Orchestrator, sender: ControlSender, spawn: Spawn
) -> None:
    shared = str(uuid.uuid4())
    [first] = _start(spawn, orchestrator, 1, agent_id=shared)
    [second] = _start(spawn, orchestrator, 1, agent_id=shared)
    orchestrator.wait_until(
        lambda: bool(second.logged("control queue in use by another consumer")),
        10,
        "the second worker to notice",
    )
    assert not first.logged("control queue in use by another consumer")
    requests = _publish_all(orchestrator, 10, "shared id")
    assert all(
        r["payload"]["status"] == "completed" for r in map(orchestrator.wait_for_result, requests)
    )
    orchestrator.wait_until(
        lambda: sum(len(w.logged("work finished")) for w in (first, second)) == 10,
        5,
        "the log lines of 10 runs",
    )
    assert first.logged("work finished"), "the first worker served nothing"
    assert second.logged("work finished"), "the second worker served nothing"
    # Commands still reach the one holding the queue.
    assert [a.agent_id for a in sender.ask("ping")] == [shared]
