"""`chiffon-worker ctl` and `send --wait` against real worker processes on the real broker.

The worker's own behaviour under commands is test_control.py's; here is what
an operator runs, and what goes over the wire: every command ctl sends and
every answer a worker returns must parse with strict protocol 1.0 models
written from PROTOCOL.md alone (below), as the original orchestrator's would.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

import pika
import pytest
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from chiffon_worker import __version__
from chiffon_worker.ctl import build_command, cancel_parameters
from chiffon_worker.errors import EXIT_FAILED, EXIT_NOPERM, EXIT_OK, EXIT_UNAVAILABLE
from tests.helpers.broker import Orchestrator, Vhost, work_request
from tests.helpers.process import WorkerProcess, run_cli

pytestmark = pytest.mark.integration

Spawn = Callable[..., WorkerProcess]

A = "aaaaaaaa-0000-4000-8000-00000000000a"
B = "bbbbbbbb-0000-4000-8000-00000000000b"
CLI_TIMEOUT_S = 60


def chiffon(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(url, *args, timeout=CLI_TIMEOUT_S)


def serving(*workers: WorkerProcess, timeout: float = 30) -> None:
    """Wait until each worker is connected (its control queue is consumed by then)."""
    deadline = time.monotonic() + timeout
    while not all("connected to broker" in worker.messages() for worker in workers):
        assert time.monotonic() < deadline, "a worker did not connect"
        time.sleep(0.05)


def ping(url: str) -> dict[str, dict[str, Any]]:
    """Both workers' state (returns as soon as both answered)."""
    done = chiffon(url, "ctl", "ping", "--json", "--agent-id", A, "--agent-id", B)
    assert done.returncode == EXIT_OK, done.stderr
    return {answer["agent_id"]: answer for answer in json.loads(done.stdout)["answers"]}


def test_ctl_ping_lists_both_workers_within_two_seconds(vhost: Vhost, spawn: Spawn) -> None:
    serving(spawn("a", agent_id=A), spawn("b", agent_id=B))

    done = chiffon(vhost.url(), "ctl", "ping", "--json", "--timeout", "2")

    assert done.returncode == EXIT_OK, done.stderr
    answers = json.loads(done.stdout)["answers"]  # one JSON document
    assert sorted(a["agent_id"] for a in answers) == [A, B]
    for answer in answers:
        assert (answer["status"], answer["paused"], answer["current_task"]) == (
            "online",
            False,
            None,
        )
        assert answer["version"] == __version__
        assert answer["work_types"] == ["echo", "fail", "slow_echo"]
        assert answer["host"] == socket.gethostname()
        assert (answer["outcome"], answer["applied"]) == ("ok", True)


def test_ctl_pause_one_worker_by_agent_id_then_resume_it(vhost: Vhost, spawn: Spawn) -> None:
    url = vhost.url()
    serving(spawn("a", agent_id=A), spawn("b", agent_id=B))

    paused = chiffon(url, "ctl", "pause", "--agent-id", A)
    again = chiffon(url, "ctl", "pause", "--agent-id", A)
    while_paused = ping(url)
    resumed = chiffon(url, "ctl", "resume", "--agent-id", A)
    resumed_again = chiffon(url, "ctl", "resume", "--agent-id", A)
    after = ping(url)

    assert paused.returncode == EXIT_OK, paused.stderr
    assert A in paused.stdout
    assert B not in paused.stdout  # not addressed: it does not answer
    assert " paused " in paused.stdout
    assert again.returncode == EXIT_FAILED
    assert "already_paused" in again.stdout
    assert "no worker applied pause" in again.stderr
    assert (while_paused[A]["paused"], while_paused[B]["paused"]) == (True, False)
    assert while_paused[A]["status"] == "paused"
    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert "resumed" in resumed.stdout
    assert resumed_again.returncode == EXIT_FAILED
    assert "not_paused" in resumed_again.stdout
    assert (after[A]["paused"], after[B]["paused"]) == (False, False)


def test_ctl_cancel_of_a_request_not_here_is_remembered_and_answered_cancelled_on_arrival(
    vhost: Vhost, spawn: Spawn, orchestrator: Orchestrator
) -> None:
    serving(spawn())
    request = work_request("echo", {"message": "must not run"})

    done = chiffon(
        vhost.url(), "ctl", "cancel", request["request_id"], "--request-id", "--reason", "drained"
    )
    orchestrator.publish(request)

    assert done.returncode == EXIT_OK, done.stderr
    assert "remembered" in done.stdout
    result = orchestrator.wait_for_result(request)["payload"]
    assert (result["status"], result["output"]) == ("cancelled", "")
    assert "drained" in result["error_message"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_ctl_exits_69_when_the_broker_cannot_be_reached(broker: None) -> None:
    done = chiffon(f"amqp://guest:guest@127.0.0.1:{_free_port()}/%2F", "ctl", "ping")

    assert done.returncode == EXIT_UNAVAILABLE
    assert "cannot connect" in done.stderr
    assert "Traceback" not in done.stderr


def test_ctl_exits_77_when_the_broker_refuses_the_credentials(vhost: Vhost) -> None:
    done = chiffon(vhost.url().replace("guest:guest@", "guest:wrong@"), "ctl", "pause")

    assert done.returncode == EXIT_NOPERM
    assert "wrong" not in done.stderr


def test_send_wait_stdout_is_one_json_document_and_progress_goes_to_stderr(
    vhost: Vhost, spawn: Spawn
) -> None:
    serving(spawn(worker="tests.helpers.workers:ProgressWorker"))

    done = chiffon(vhost.url(), "send", "--work-type", "echo", "--wait", "--timeout", "20")

    assert done.returncode == EXIT_OK, done.stderr
    result = json.loads(done.stdout)  # the whole of stdout: `| jq -r .output` works
    assert (result["status"], result["output"]) == ("completed", "progressed")
    ids, *progress = done.stderr.splitlines()
    assert json.loads(ids) == {"request_id": result["request_id"], "task_id": result["task_id"]}
    assert progress == ["progress  50%  halfway", "progress 100%  done"]


# -- protocol 1.0, strictly, from PROTOCOL.md alone ------------------------------------

AgentType = Literal["orchestrator", "infra", "desktop", "code", "research"]
Command = Literal["ping", "pause", "resume", "cancel"]
Outcome = Literal[
    "ok",
    "paused",
    "already_paused",
    "resumed",
    "not_paused",
    "cancelled",
    "remembered",
    "already_finished",
]


def _iso_8601(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError("an ISO 8601 string")
    return datetime.fromisoformat(value)


def _with_offset(value: datetime) -> datetime:
    # "emit UTC with offset": what we send must not be naive.
    if value.tzinfo is None:
        raise ValueError("an ISO time with an offset")
    return value


Timestamp = Annotated[datetime, BeforeValidator(_iso_8601)]
SentTimestamp = Annotated[Timestamp, AfterValidator(_with_offset)]


class Strict(BaseModel):
    """Exact types (no "3" for 3, no true for 1); nothing beyond the protocol's fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


class Envelope10(Strict):
    model_config = ConfigDict(strict=True, extra="ignore")  # forward compatible, as 1.0 says

    protocol_version: Literal["1.0"]
    message_id: uuid.UUID
    from_agent: AgentType
    to_agent: AgentType
    timestamp: SentTimestamp
    trace_id: uuid.UUID
    request_id: uuid.UUID
    type: Literal["work_request", "work_status", "work_result", "error"]
    priority: Annotated[int, Field(ge=1, le=5)] = 3
    payload: dict[str, Any]
    x_custom_fields: dict[str, Any] = {}


class WorkRequest10(Strict):
    task_id: uuid.UUID
    work_type: str
    parameters: dict[str, Any] = {}
    hints: dict[str, Any] = {}


class StatusUpdate10(Strict):
    agent_id: uuid.UUID
    agent_type: AgentType
    status: Literal["online", "offline", "busy"]
    current_task_id: uuid.UUID | None
    resources: dict[str, Any]
    timestamp: SentTimestamp


class WorkResult10(Strict):
    task_id: uuid.UUID
    status: Literal["completed", "failed", "cancelled"]
    exit_code: int
    output: str = ""
    error_message: str | None
    duration_ms: int
    agent_id: uuid.UUID
    trace_id: uuid.UUID | None
    request_id: uuid.UUID | None
    resources_used: dict[str, Any]
    analysis_result: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _failed_says_why(self) -> WorkResult10:
        if self.status == "failed" and not self.error_message:
            raise ValueError("error_message is required when status is failed")
        return self


class XControl(Strict):
    expires_at: SentTimestamp
    agent_ids: list[uuid.UUID] | None = None


class CancelParameters(Strict):
    command: Literal["cancel"]
    task_id: uuid.UUID | None = None
    request_id: uuid.UUID | None = None
    reason: str | None = None


class XControlReply(BaseModel):
    """The extension's answer: {command_id, command, outcome, detail} plus operator fields."""

    model_config = ConfigDict(strict=True, extra="allow")

    command_id: uuid.UUID
    command: Command
    outcome: Outcome
    detail: str
    paused: bool


def _json(value: Any) -> str:
    return json.dumps(value)


def strict_command(body: bytes) -> tuple[Envelope10, WorkRequest10]:
    envelope = Envelope10.model_validate_json(body)
    assert envelope.type == "work_request"
    assert envelope.from_agent == "orchestrator"
    request = WorkRequest10.model_validate_json(_json(envelope.payload))
    assert request.work_type == "x_control"
    assert set(envelope.x_custom_fields) == {"x_control"}
    XControl.model_validate_json(_json(envelope.x_custom_fields["x_control"]))
    command = request.parameters["command"]
    assert command in ("ping", "pause", "resume", "cancel")
    if command == "cancel":
        CancelParameters.model_validate_json(_json(request.parameters))
    else:
        assert request.parameters == {"command": command}
    return envelope, request


def strict_answer(body: bytes) -> tuple[Envelope10, StatusUpdate10, XControlReply]:
    envelope = Envelope10.model_validate_json(body)
    assert envelope.type == "work_status"
    status = StatusUpdate10.model_validate_json(_json(envelope.payload))
    reply = XControlReply.model_validate_json(_json(envelope.x_custom_fields["x_control_reply"]))
    assert envelope.x_custom_fields["x_paused"] is reply.paused
    return envelope, status, reply


CAPTURE = "test.ctl.capture"
ANSWERS = "test.ctl.answers"


def ask(orchestrator: Orchestrator, command: str, **parameters: Any) -> bytes:
    """A command as ctl builds it, answered to a queue of ours: the worker's raw answer."""
    message = build_command(command, agent_type="infra", parameters=parameters or None)
    orchestrator.channel.basic_publish(
        "broadcast_exchange",
        "",
        message.body,
        pika.BasicProperties(
            content_type="application/json",
            reply_to=ANSWERS,
            correlation_id=str(message.id),
            expiration="60000",
        ),
    )
    answered = orchestrator.properties[ANSWERS]
    orchestrator.wait_until(
        lambda: any(p.correlation_id == str(message.id) for p in answered), 5, f"the {command}"
    )
    index = next(i for i, p in enumerate(answered) if p.correlation_id == str(message.id))
    return orchestrator.raw[ANSWERS][index]


def test_every_command_ctl_sends_and_every_answer_parse_with_strict_1_0_models(
    vhost: Vhost, spawn: Spawn, orchestrator: Orchestrator
) -> None:
    url = vhost.url()
    serving(spawn(agent_id=A))
    channel = orchestrator.channel
    for queue in (CAPTURE, ANSWERS):
        channel.queue_declare(queue, exclusive=True)
    channel.queue_bind(CAPTURE, "broadcast_exchange", "")
    orchestrator.watch(CAPTURE)
    orchestrator.watch(ANSWERS)

    # What an operator runs: each command, as the CLI sends it.
    # (Named, they return once A answered; one goes to every worker of the type.)
    for args in (
        ["ping", "--timeout", "1"],
        ["pause", "--agent-id", A],
        ["resume", "--agent-type", "infra", "--agent-id", A],
        ["cancel", str(uuid.uuid4()), "--reason", "not needed", "--agent-id", A],
        ["cancel", str(uuid.uuid4()), "--request-id", "--agent-id", A],
    ):
        assert chiffon(url, "ctl", *args).returncode == EXIT_OK, args

    # Every outcome a worker can answer, raw, in every state (busy, paused, both).
    slow = work_request("slow_echo", {"seconds": 30})
    task_id = slow["payload"]["task_id"]
    answers = [ask(orchestrator, "ping")]
    orchestrator.publish(slow)
    while strict_answer(answers[-1])[1].current_task_id != uuid.UUID(task_id):
        time.sleep(0.05)
        answers.append(ask(orchestrator, "ping"))
    answers += [ask(orchestrator, "pause"), ask(orchestrator, "pause")]
    answers.append(ask(orchestrator, "cancel", **cancel_parameters(task_id, reason="test")))
    result = orchestrator.wait_for_result(slow)
    answers.append(ask(orchestrator, "cancel", **cancel_parameters(task_id)))
    answers.append(ask(orchestrator, "cancel", **cancel_parameters(uuid.uuid4())))
    answers += [ask(orchestrator, "resume"), ask(orchestrator, "resume")]

    orchestrator.wait_until(
        lambda: len(orchestrator.raw[CAPTURE]) == 5 + len(answers), 5, "every command"
    )
    for body, properties in zip(
        orchestrator.raw[CAPTURE], orchestrator.properties[CAPTURE], strict=True
    ):
        envelope, request = strict_command(body)
        assert properties.correlation_id == str(request.task_id)
        assert properties.expiration == "60000"
        assert properties.delivery_mode in (None, 1)  # not persistent

    outcomes = []
    for body in answers:
        envelope, status, reply = strict_answer(body)
        assert (envelope.from_agent, envelope.to_agent) == ("infra", "orchestrator")
        assert str(status.agent_id) == A
        outcomes.append(reply.outcome)
    assert set(outcomes) == set(get_args(Outcome))
    assert outcomes[-7:] == [
        "paused",
        "already_paused",
        "cancelled",
        "already_finished",
        "remembered",
        "resumed",
        "not_paused",
    ]
    cancelled = WorkResult10.model_validate_json(_json(result["payload"]))
    assert cancelled.status == "cancelled"
    Envelope10.model_validate_json(_json(result))


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("priority", 6),
        ("priority", "3"),
        ("to_agent", "operator"),
        ("type", "control"),
        ("protocol_version", "1.1"),
        ("message_id", "m-1"),
        ("timestamp", "2026-12-01T12:00:00"),  # we must send an offset
        ("timestamp", 1764590400),
        ("payload.task_id", 42),
        ("payload.surprise", True),
        ("x_custom_fields.x_control.expires_at", "in a minute"),
        ("x_custom_fields.x_control.agent_ids", ["host-7"]),
    ],
)
def test_the_strict_models_refuse_what_1_0_does_not_allow(where: str, value: Any) -> None:
    """They would catch a command that strays: a check that can fail."""
    document = json.loads(build_command("ping", agent_type="infra", agent_ids=[A]).body)
    *path, key = where.split(".")
    target = document
    for step in path:
        target = target[step]
    target[key] = value

    with pytest.raises((ValidationError, AssertionError)):
        strict_command(json.dumps(document).encode())
