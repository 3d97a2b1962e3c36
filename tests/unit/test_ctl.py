"""The operator side of the control plane without a broker: commands, answers, tables, exits."""

from __future__ import annotations

import io
import json
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest

from chiffon_worker import cli, ctl
from chiffon_worker.amqp import Delivery, DeliveryTag, Outgoing, Reply
from chiffon_worker.control import APPLIED, ControlDesk, IgnoredCommand, parse_command
from chiffon_worker.ctl import (
    ControlClient,
    WorkerAnswer,
    build_command,
    format_duration,
    outcome_table,
    parse_answer,
    status_table,
)
from chiffon_worker.errors import (
    EXIT_FAILED,
    EXIT_NOPERM,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    BrokerAuthError,
    BrokerUnavailable,
    InvalidMessage,
)
from chiffon_worker.heartbeat import StatusBuilder
from chiffon_worker.protocol import (
    WorkResult,
    WorkStatus,
    encode_message,
    parse_envelope,
)
from chiffon_worker.stats import Stats
from chiffon_worker.topology import BROADCAST_EXCHANGE

AGENT = uuid.UUID("11111111-1111-4111-8111-111111111111")
OTHER = uuid.UUID("22222222-2222-4222-8222-222222222222")
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


# -- commands ----------------------------------------------------------------------


def test_a_command_is_an_ordinary_work_request_from_the_orchestrator() -> None:
    command = build_command("ping", agent_type="infra", now=NOW)

    envelope = parse_envelope(command.body)
    assert envelope.type == "work_request"
    assert (envelope.from_agent, envelope.to_agent) == ("orchestrator", "infra")
    assert envelope.payload == {
        "task_id": str(command.id),
        "work_type": "x_control",
        "parameters": {"command": "ping"},
        "hints": {},
    }
    # Without agent ids: every worker of the type, so the key is absent.
    assert envelope.x_custom_fields == {"x_control": {"expires_at": "2026-12-01T12:01:00+00:00"}}


def test_the_worker_accepts_a_command_addressed_to_it() -> None:
    command = build_command("pause", agent_type="infra", agent_ids=[str(AGENT).upper()], now=NOW)

    parsed = parse_command(command.body, agent_type="infra", agent_id=AGENT, now=NOW)

    assert (parsed.id, parsed.name) == (command.id, "pause")


@pytest.mark.parametrize(
    ("agent_type", "agent_id", "seconds_later", "why"),
    [
        ("infra", OTHER, 0, "for other agent ids"),
        ("code", AGENT, 0, "for agent type 'infra'"),
        ("infra", AGENT, 61, "expired"),
    ],
)
def test_the_worker_ignores_a_command_for_others_or_too_old(
    agent_type: str, agent_id: uuid.UUID, seconds_later: int, why: str
) -> None:
    command = build_command("resume", agent_type="infra", agent_ids=[AGENT], now=NOW)

    with pytest.raises(IgnoredCommand, match=why):
        parse_command(
            command.body,
            agent_type=agent_type,
            agent_id=agent_id,
            now=NOW + timedelta(seconds=seconds_later),
        )


def test_a_cancel_carries_the_task_its_request_and_the_reason() -> None:
    task_id, request_id = uuid.uuid4(), uuid.uuid4()
    parameters = ctl.cancel_parameters(task_id, request_id, "wrong host")
    command = build_command("cancel", agent_type="infra", parameters=parameters, now=NOW)

    parsed = parse_command(command.body, agent_type="infra", agent_id=AGENT, now=NOW)

    assert (parsed.task_id, parsed.request_id, parsed.reason) == (
        task_id,
        request_id,
        "wrong host",
    )


def test_a_cancel_without_a_reason_sends_none() -> None:
    assert ctl.cancel_parameters(request_id=str(OTHER)) == {"request_id": str(OTHER)}


@pytest.mark.parametrize(
    "call",
    [
        lambda: ctl.cancel_parameters(),
        lambda: ctl.cancel_parameters(task_id="not-a-uuid"),
        lambda: build_command("reboot", agent_type="infra"),
        lambda: build_command("ping", agent_type="operator"),
        lambda: build_command("ping", agent_type="infra", agent_ids=["host-7"]),
    ],
    ids=["cancel-without-id", "bad-task-id", "unknown-command", "bad-type", "bad-agent-id"],
)
def test_a_command_the_worker_would_ignore_is_refused_before_sending(call: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each says its own why
        call()


def test_every_command_gets_a_fresh_id() -> None:
    ids = {build_command("ping", agent_type="infra").id for _ in range(3)}

    assert len(ids) == 3


# -- answers -----------------------------------------------------------------------


class FakeWorker:
    """What ControlDesk asks of the consumer (control.Controllable)."""

    def __init__(self, running: list[str] | None = None) -> None:
        self.running = running or []
        self.paused = False

    def pause(self) -> bool:
        was, self.paused = self.paused, True
        return not was

    def resume(self) -> bool:
        was, self.paused = self.paused, False
        return was

    def cancel(
        self, task_id: uuid.UUID | None, request_id: uuid.UUID | None, reason: str
    ) -> tuple[str, str]:
        return "remembered", "not running here"

    def current_task_ids(self) -> list[str]:
        return self.running


def worker_answer(command: ctl.CommandMessage, worker: FakeWorker) -> Outgoing:
    """What the real worker side (control.ControlDesk) publishes for `command`."""
    sent: list[Outgoing] = []
    desk = ControlDesk(
        worker,
        StatusBuilder(AGENT, "infra", "reply_queue", worker.current_task_ids),
        sent.append,
        agent_type="infra",
        agent_id=AGENT,
        work_types=frozenset({"echo", "slow_echo"}),
        stats=Stats(),
    )
    desk.on_command(Delivery(DeliveryTag(1, 1), command.body, "amq.gen-reply", str(command.id)))
    assert len(sent) == 1
    return sent[0]


def test_a_worker_answer_to_ping_says_who_it_is_and_what_it_does() -> None:
    task = str(uuid.uuid4())
    command = build_command("ping", agent_type="infra")

    answer = parse_answer(worker_answer(command, FakeWorker([task])).body, command.id)

    assert answer.agent_id == str(AGENT)
    assert answer.agent_type == "infra"
    assert (answer.status, answer.paused, answer.current_task) == ("busy", False, task)
    assert answer.work_types == ("echo", "slow_echo")
    assert answer.host
    assert answer.version
    assert (answer.command, answer.command_id) == ("ping", str(command.id))
    assert (answer.outcome, answer.applied) == ("ok", True)


def test_a_paused_worker_answers_paused_and_pausing_it_again_is_not_applied() -> None:
    worker = FakeWorker()
    first, again = (build_command("pause", agent_type="infra") for _ in range(2))

    paused = parse_answer(worker_answer(first, worker).body, first.id)
    repeated = parse_answer(worker_answer(again, worker).body, again.id)

    assert (paused.outcome, paused.applied, paused.status, paused.paused) == (
        "paused",
        True,
        "paused",
        True,
    )
    assert (repeated.outcome, repeated.applied) == ("already_paused", False)


@pytest.mark.parametrize("outcome", sorted(APPLIED))
def test_outcomes_that_did_what_was_asked_are_applied(outcome: str) -> None:
    assert answer(outcome=outcome).applied


@pytest.mark.parametrize("outcome", ["already_paused", "not_paused", "already_finished"])
def test_outcomes_that_changed_nothing_are_not_applied(outcome: str) -> None:
    assert not answer(outcome=outcome).applied


def test_an_answer_to_another_command_is_not_ours() -> None:
    command = build_command("ping", agent_type="infra")
    body = worker_answer(command, FakeWorker()).body

    with pytest.raises(InvalidMessage, match="answers command"):
        parse_answer(body, uuid.uuid4())


def test_a_result_or_a_plain_heartbeat_is_not_an_answer() -> None:
    builder = StatusBuilder(AGENT, "infra", "reply_queue", list)
    request_id = uuid.uuid4()
    result = encode_message(
        WorkResult(task_id=uuid.uuid4(), status="completed"),
        from_agent="infra",
        to_agent="orchestrator",
        trace_id=request_id,
        request_id=request_id,
    ).body

    with pytest.raises(InvalidMessage, match="work_status"):
        parse_answer(result, request_id)
    with pytest.raises(InvalidMessage, match="not a control answer"):
        parse_answer(builder.build().body, request_id)
    with pytest.raises(InvalidMessage):
        parse_answer(b"{not json", request_id)


# -- the client, on a fake connection -----------------------------------------------


class FakeRequestClient:
    """RequestClient's surface: what was broadcast, and the replies to hand back."""

    instances: ClassVar[list[FakeRequestClient]] = []

    def __init__(self, url: str, topology: Any, tls: Any = None) -> None:
        self.topology = topology
        self.broadcasts: list[tuple[bytes, str, int]] = []
        self.replies: deque[Reply] = deque()
        self.answer: Any = None  # called with each command to queue its replies
        self.closed = False
        self.waits = 0
        FakeRequestClient.instances.append(self)

    def open_reply_queue(self) -> str:
        return "amq.gen-test"

    def broadcast(self, body: bytes, correlation_id: str, expiration_ms: int) -> None:
        self.broadcasts.append((body, correlation_id, expiration_ms))
        if self.answer is not None:
            self.answer(ctl.CommandMessage(uuid.UUID(correlation_id), body), self.replies)

    def next_reply(self, timeout: float) -> Reply | None:
        self.waits += 1
        return self.replies.popleft() if self.replies else None

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_connection(monkeypatch: pytest.MonkeyPatch) -> type[FakeRequestClient]:
    FakeRequestClient.instances = []
    monkeypatch.setattr(ctl, "RequestClient", FakeRequestClient)
    return FakeRequestClient


def test_commands_go_to_broadcast_exchange_expiring_after_a_minute(
    fake_connection: type[FakeRequestClient],
) -> None:
    with ControlClient("amqp://h/", agent_type="code") as control:
        control.pause(timeout=0.01)

    connection = fake_connection.instances[0]
    assert [e.name for e in connection.topology.exchanges] == [BROADCAST_EXCHANGE]
    assert connection.topology.queues == ()  # declares no work or reply queue of its own
    body, correlation_id, expiration_ms = connection.broadcasts[0]
    assert expiration_ms == 60_000
    assert parse_envelope(body).payload["task_id"] == correlation_id
    assert parse_envelope(body).to_agent == "code"
    assert connection.closed


def test_answers_to_other_commands_are_skipped_and_each_worker_counted(
    fake_connection: type[FakeRequestClient],
) -> None:
    worker = FakeWorker()

    def two_answers(command: ctl.CommandMessage, replies: deque[Reply]) -> None:
        stale = build_command("ping", agent_type="infra")
        replies.append(Reply(worker_answer(stale, worker).body, str(stale.id)))
        replies.append(Reply(b"garbage", str(command.id)))
        replies.append(Reply(worker_answer(command, worker).body, str(command.id)))

    with ControlClient("amqp://h/") as control:
        fake_connection.instances[0].answer = two_answers
        answers = control.ping(timeout=5)

    assert [(a.agent_id, a.outcome) for a in answers] == [(str(AGENT), "ok")]


def test_a_command_for_named_workers_returns_once_they_all_answered(
    fake_connection: type[FakeRequestClient],
) -> None:
    worker = FakeWorker()

    def answer_and_more(command: ctl.CommandMessage, replies: deque[Reply]) -> None:
        for _ in range(3):  # only the first may be read: the one named worker answered
            replies.append(Reply(worker_answer(command, worker).body, str(command.id)))

    with ControlClient("amqp://h/") as control:
        connection = fake_connection.instances[0]
        connection.answer = answer_and_more
        answers = control.resume(agent_ids=[AGENT], timeout=30)

    assert len(answers) == 1
    assert connection.waits == 1


def test_library_cancel_by_request_id_sends_it_with_the_reason(
    fake_connection: type[FakeRequestClient],
) -> None:
    request_id = uuid.uuid4()
    with ControlClient("amqp://h/") as control:
        control.cancel(request_id=request_id, reason="operator", timeout=0.01)

    body = fake_connection.instances[0].broadcasts[0][0]
    assert parse_envelope(body).payload["parameters"] == {
        "command": "cancel",
        "request_id": str(request_id),
        "reason": "operator",
    }


# -- presentation ------------------------------------------------------------------


def answer(**fields: Any) -> WorkerAnswer:
    values: dict[str, Any] = {
        "agent_id": str(AGENT),
        "agent_type": "infra",
        "host": "web-1",
        "status": "online",
        "paused": False,
        "current_task": None,
        "version": "0.1.0",
        "started_at": NOW.isoformat(),
        "uptime_s": 75.0,
        "work_types": ("echo",),
        "command": "ping",
        "command_id": str(uuid.uuid4()),
        "outcome": "ok",
        "detail": "alive",
    }
    values.update(fields)
    return WorkerAnswer(**values)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (42.9, "42s"),
        (725, "12m 5s"),
        (3 * 3600 + 12 * 60 + 9, "3h 12m"),
        (2 * 86400 + 4 * 3600, "2d 4h"),
    ],
)
def test_uptime_reads_in_two_units_at_most(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_the_ping_table_has_a_row_per_worker_in_aligned_columns() -> None:
    busy = answer(
        agent_id=str(OTHER),
        host="db-2",
        status="paused",
        paused=True,
        current_task="33333333-3333-4333-8333-333333333333",
        uptime_s=3 * 3600,
    )

    lines = status_table([answer(), busy]).splitlines()

    assert lines[0].split() == [
        "AGENT", "ID", "TYPE", "HOST", "STATUS", "CURRENT", "TASK", "PAUSED", "VERSION", "UPTIME",
    ]  # fmt: skip
    assert lines[1].split() == [
        str(OTHER), "infra", "db-2", "paused", busy.current_task, "yes", "0.1.0", "3h", "0m",
    ]  # fmt: skip
    assert lines[2].split() == [
        str(AGENT), "infra", "web-1", "online", "-", "no", "0.1.0", "1m", "15s",
    ]  # fmt: skip
    starts = {line.index("infra") for line in lines[1:]}
    assert starts == {lines[0].index("TYPE")}


def test_the_outcome_table_says_what_each_worker_made_of_it() -> None:
    table = outcome_table([answer(outcome="already_paused", detail="was paused already")])

    assert "already_paused" in table
    assert "was paused already" in table


def test_exit_0_when_one_worker_applied_it(capsys: pytest.CaptureFixture[str]) -> None:
    answers = [answer(outcome="already_paused"), answer(agent_id=str(OTHER), outcome="paused")]

    code = cli.report_answers("pause", answers, as_json=False, timeout=2)

    assert code == EXIT_OK
    assert str(OTHER) in capsys.readouterr().out


def test_exit_1_and_say_so_when_none_applied_it(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.report_answers("resume", [answer(outcome="not_paused")], as_json=False, timeout=2)

    out, err = capsys.readouterr()
    assert code == EXIT_FAILED
    assert "not_paused" in out
    assert "no worker applied resume" in err


def test_exit_1_and_say_so_when_no_worker_answered(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.report_answers("ping", [], as_json=False, timeout=2)

    out, err = capsys.readouterr()
    assert code == EXIT_FAILED
    assert out == ""
    assert "no worker answered ping within 2 s" in err


def test_json_output_is_one_document_with_every_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli.report_answers("ping", [answer(), answer(agent_id=str(OTHER))], as_json=True, timeout=2)

    document = json.loads(capsys.readouterr().out)
    assert document["command"] == "ping"
    assert [a["agent_id"] for a in document["answers"]] == [str(AGENT), str(OTHER)]
    assert document["answers"][0]["applied"] is True
    assert document["answers"][0]["work_types"] == ["echo"]


# -- the command line ---------------------------------------------------------------


class RecordingControl:
    """Stands in for ControlClient in cli: records the call, answers `applied`."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    fail_with: ClassVar[Exception | None] = None

    def __init__(self, url: str, *, agent_type: str, tls: Any) -> None:
        if RecordingControl.fail_with is not None:
            raise RecordingControl.fail_with
        self.agent_type = agent_type

    def __enter__(self) -> RecordingControl:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def send(self, command: str, **kwargs: Any) -> list[WorkerAnswer]:
        RecordingControl.calls.append((command, {**kwargs, "agent_type": self.agent_type}))
        return [answer(command=command, outcome="paused" if command == "pause" else "ok")]

    def cancel(self, **kwargs: Any) -> list[WorkerAnswer]:
        RecordingControl.calls.append(("cancel", kwargs))
        return [answer(command="cancel", outcome="already_finished")]


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> type[RecordingControl]:
    RecordingControl.calls = []
    RecordingControl.fail_with = None
    monkeypatch.setattr(cli, "ControlClient", RecordingControl)
    for key in ("CHIFFON_AGENT_TYPE", "CHIFFON_AMQP_URL"):
        monkeypatch.delenv(key, raising=False)
    return RecordingControl


def test_ctl_pause_names_the_workers_and_the_type(
    recording: type[RecordingControl], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        ["ctl", "pause", "--agent-id", str(AGENT), "--agent-id", str(OTHER), "--agent-type", "code"]
    )

    assert code == EXIT_OK
    assert recording.calls == [
        ("pause", {"agent_ids": [AGENT, OTHER], "timeout": 2.0, "agent_type": "code"})
    ]
    assert "paused" in capsys.readouterr().out


def test_ctl_cancel_by_request_id_with_a_reason(
    recording: type[RecordingControl], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["ctl", "cancel", str(OTHER), "--request-id", "--reason", "drain"])

    assert recording.calls == [
        (
            "cancel",
            {"request_id": OTHER, "reason": "drain", "agent_ids": None, "timeout": 2.0},
        )
    ]
    # It had finished everywhere: nothing was applied.
    assert code == EXIT_FAILED
    assert "already_finished" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BrokerUnavailable("cannot connect"), EXIT_UNAVAILABLE),
        (BrokerAuthError("refused"), EXIT_NOPERM),
    ],
)
def test_ctl_exit_codes_say_whether_retrying_can_help(
    recording: type[RecordingControl], error: Exception, code: int
) -> None:
    recording.fail_with = error

    assert cli.main(["ctl", "ping"]) == code


# -- send --wait: progress on stderr ------------------------------------------------


def progress(percent: float, name: str) -> dict[str, Any]:
    return WorkStatus.model_validate(
        {
            "task_id": uuid.uuid4(),
            "status": "running",
            "progress_percent": percent,
            "step": {"number": 1, "name": name},
        }
    ).model_dump(mode="json")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_line_each_when_stderr_is_not_a_terminal() -> None:
    stream = io.StringIO()
    line = cli.ProgressLine(stream)

    line.show(progress(50, "halfway"))
    line.show(progress(100, "done"))
    line.end()

    assert stream.getvalue() == "progress  50%  halfway\nprogress 100%  done\n"


def test_progress_rewrites_one_line_on_a_terminal() -> None:
    stream = Terminal()
    line = cli.ProgressLine(stream)

    line.show(progress(50, "halfway"))
    line.show(progress(100, "done"))
    line.end()

    assert stream.getvalue() == ("\r\x1b[Kprogress  50%  halfway\r\x1b[Kprogress 100%  done\n")
