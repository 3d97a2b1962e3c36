"""The operator side of the control plane: commands to live workers, and their answers.

PROTOCOL.md's "Extension: control commands" is the wire format; control.py
is the worker's side. A command is an ordinary 1.0 `work_request` (work type
`x_control`) published to broadcast_exchange, so it reaches every worker's
own control queue; each worker it is addressed to answers to our reply
queue with a `work_status` whose `x_custom_fields.x_control_reply` says what
became of it. We cannot know how many workers there are, so a command
gathers answers until its timeout (or until every agent id it named has
answered).

A ControlClient holds one broker connection and runs on its caller's
thread only: one client per thread.

    with ControlClient("amqp://guest:guest@localhost/%2F") as control:
        for answer in control.ping():
            print(answer.agent_id, answer.status, answer.current_task)
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError

from chiffon_worker.amqp import RequestClient
from chiffon_worker.config import TlsFiles
from chiffon_worker.control import APPLIED, COMMANDS, CONTROL_WORK_TYPE
from chiffon_worker.errors import InvalidMessage
from chiffon_worker.protocol import (
    AGENT_TYPES,
    StatusUpdate,
    WorkRequest,
    encode,
    make_envelope,
    parse_envelope,
    utc_now,
)
from chiffon_worker.topology import CONTROL_MESSAGE_TTL_MS, broadcast_topology

logger = logging.getLogger(__name__)

# Long enough for a worker on the same broker to answer while long work runs
# (it answers within a second), short enough for an operator at a prompt.
DEFAULT_TIMEOUT_S = 2.0
# A command is stale after this long: its expires_at, and its AMQP expiration
# (the same as the control queue's message TTL).
COMMAND_TTL_S = CONTROL_MESSAGE_TTL_MS / 1000


class CommandMessage(NamedTuple):
    id: uuid.UUID
    body: bytes


def build_command(
    command: str,
    *,
    agent_type: str,
    agent_ids: Iterable[uuid.UUID | str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> CommandMessage:
    """The body of one command, and its id (the payload's task_id, our correlation_id).

    `agent_ids` None addresses every worker of `agent_type`. Raises
    ValueError for an unknown command, agent type or agent id.
    """
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}, expected one of {', '.join(COMMANDS)}")
    if agent_type not in AGENT_TYPES:
        raise ValueError(f"unknown agent type {agent_type!r}, expected one of {AGENT_TYPES}")
    control: dict[str, Any] = {
        "expires_at": ((now or utc_now()) + timedelta(seconds=COMMAND_TTL_S)).isoformat()
    }
    if agent_ids is not None:
        control["agent_ids"] = [str(uuid.UUID(str(agent_id))) for agent_id in agent_ids]
    command_id = uuid.uuid4()
    request = WorkRequest(
        task_id=command_id,
        work_type=CONTROL_WORK_TYPE,
        parameters={**(parameters or {}), "command": command},
    )
    envelope = make_envelope(
        request,
        from_agent="orchestrator",
        to_agent=agent_type,
        trace_id=uuid.uuid4(),
        # The command's one idempotency key: its id.
        request_id=command_id,
    )
    envelope.x_custom_fields = {"x_control": control}
    return CommandMessage(command_id, encode(envelope))


def cancel_parameters(
    task_id: uuid.UUID | str | None = None,
    request_id: uuid.UUID | str | None = None,
    reason: str | None = None,
) -> dict[str, str]:
    """What `cancel` carries: the task by either id (one is needed), and why."""
    if task_id is None and request_id is None:
        raise ValueError("cancel needs a task_id or a request_id")
    parameters = {}
    if task_id is not None:
        parameters["task_id"] = str(uuid.UUID(str(task_id)))
    if request_id is not None:
        parameters["request_id"] = str(uuid.UUID(str(request_id)))
    if reason:
        parameters["reason"] = reason
    return parameters


class _ControlReply(BaseModel):
    """`x_custom_fields.x_control_reply` of an answer, as control.ControlDesk writes it."""

    model_config = ConfigDict(extra="ignore")

    command_id: uuid.UUID
    command: str
    outcome: str
    detail: str = ""
    paused: bool = False
    state: str | None = None
    version: str = ""
    host: str = ""
    started_at: str = ""
    uptime_s: float = 0.0
    current_task: str | None = None
    work_types: list[str] = []


@dataclass(frozen=True, slots=True)
class WorkerAnswer:
    """One worker's answer to one command."""

    agent_id: str
    agent_type: str
    host: str
    status: str  # online, busy or paused
    paused: bool
    current_task: str | None
    version: str
    started_at: str
    uptime_s: float
    work_types: tuple[str, ...]
    command: str
    command_id: str
    outcome: str  # ok, paused, already_paused, resumed, not_paused, cancelled, ...
    detail: str

    @property
    def applied(self) -> bool:
        """The worker did what was asked (not: it was so already, or it was too late)."""
        return self.outcome in APPLIED

    def as_dict(self) -> dict[str, Any]:
        """For JSON: every field, and `applied`."""
        return {**asdict(self), "work_types": list(self.work_types), "applied": self.applied}


def parse_answer(body: bytes, command_id: uuid.UUID | str) -> WorkerAnswer:
    """A worker's answer to command `command_id`; InvalidMessage says why it is not one."""
    envelope = parse_envelope(body)
    if envelope.type != "work_status":
        raise InvalidMessage(f"type {envelope.type!r}, expected 'work_status'")
    try:
        status = StatusUpdate.model_validate(envelope.payload)
        reply = _ControlReply.model_validate(envelope.x_custom_fields.get("x_control_reply"))
    except ValidationError as exc:
        raise InvalidMessage(f"not a control answer: {exc.errors()[0]['msg']}") from None
    if str(reply.command_id) != str(command_id):
        raise InvalidMessage(f"answers command {reply.command_id}, not {command_id}")
    current = reply.current_task
    if current is None and status.current_task_id is not None:
        current = str(status.current_task_id)
    return WorkerAnswer(
        agent_id=str(status.agent_id),
        agent_type=status.agent_type,
        host=reply.host,
        status=reply.state or ("paused" if reply.paused else status.status),
        paused=reply.paused,
        current_task=current,
        version=reply.version,
        started_at=reply.started_at,
        uptime_s=reply.uptime_s,
        work_types=tuple(reply.work_types),
        command=reply.command,
        command_id=str(reply.command_id),
        outcome=reply.outcome,
        detail=reply.detail,
    )


class ControlClient:
    """Sends control commands to live workers and gathers their answers.

    Every command returns the answers that came within `timeout` seconds
    (an empty list when no worker answered); `answer.applied` says whether
    that worker did what was asked. Connection failures raise
    BrokerUnavailable or BrokerAuthError, as everywhere else.
    """

    def __init__(self, url: str, *, agent_type: str = "infra", tls: TlsFiles | None = None) -> None:
        if agent_type not in AGENT_TYPES:
            raise ValueError(f"unknown agent type {agent_type!r}, expected one of {AGENT_TYPES}")
        self._agent_type = agent_type
        self._client = RequestClient(url, broadcast_topology(), tls=tls)
        try:
            self._client.open_reply_queue()
        except BaseException:
            self._client.close()
            raise

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        _kind: type[BaseException] | None,
        _exc: BaseException | None,
        _trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def ping(
        self,
        *,
        agent_ids: Sequence[uuid.UUID | str] | None = None,
        agent_type: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> list[WorkerAnswer]:
        """Who is there: every live worker answers with its status (outcome `ok`)."""
        return self.send("ping", agent_ids=agent_ids, agent_type=agent_type, timeout=timeout)

    def pause(
        self,
        *,
        agent_ids: Sequence[uuid.UUID | str] | None = None,
        agent_type: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> list[WorkerAnswer]:
        """Stop taking requests (running work goes on): `paused` or `already_paused`."""
        return self.send("pause", agent_ids=agent_ids, agent_type=agent_type, timeout=timeout)

    def resume(
        self,
        *,
        agent_ids: Sequence[uuid.UUID | str] | None = None,
        agent_type: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> list[WorkerAnswer]:
        """Take requests again: `resumed` or `not_paused`."""
        return self.send("resume", agent_ids=agent_ids, agent_type=agent_type, timeout=timeout)

    def cancel(
        self,
        task_id: uuid.UUID | str | None = None,
        request_id: uuid.UUID | str | None = None,
        reason: str | None = None,
        *,
        agent_ids: Sequence[uuid.UUID | str] | None = None,
        agent_type: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> list[WorkerAnswer]:
        """Cancel a task by either id: `cancelled` where it runs, `remembered` elsewhere.

        `already_finished` from a worker that had finished it; the worker
        that ran it (or will) sends the task's `cancelled` work_result.
        """
        return self.send(
            "cancel",
            parameters=cancel_parameters(task_id, request_id, reason),
            agent_ids=agent_ids,
            agent_type=agent_type,
            timeout=timeout,
        )

    def send(
        self,
        command: str,
        *,
        parameters: Mapping[str, Any] | None = None,
        agent_ids: Sequence[uuid.UUID | str] | None = None,
        agent_type: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> list[WorkerAnswer]:
        """Publish one command; the answers that came within `timeout` seconds."""
        message = build_command(
            command,
            agent_type=agent_type or self._agent_type,
            agent_ids=agent_ids,
            parameters=parameters,
        )
        self._client.broadcast(message.body, str(message.id), int(COMMAND_TTL_S * 1000))
        expected = None if agent_ids is None else {str(uuid.UUID(str(a))) for a in agent_ids}
        return self._gather(message.id, expected, timeout)

    def _gather(
        self, command_id: uuid.UUID, expected: set[str] | None, timeout: float
    ) -> list[WorkerAnswer]:
        """Answers to `command_id` until the timeout, or until all of `expected` answered."""
        deadline = time.monotonic() + timeout
        answers: list[WorkerAnswer] = []
        while (left := deadline - time.monotonic()) > 0:
            reply = self._client.next_reply(left)
            if reply is None:
                break
            if reply.correlation_id != str(command_id):
                continue  # a late answer to an earlier command of ours
            try:
                answers.append(parse_answer(reply.body, command_id))
            except InvalidMessage as why:
                logger.warning("control answer ignored", extra={"reason": why.reason})
                continue
            if expected is not None and expected <= {answer.agent_id for answer in answers}:
                break
        return answers


# -- presentation (the CLI's tables) ---------------------------------------------


def format_duration(seconds: float) -> str:
    """42s, 12m 5s, 3h 12m, 2d 4h: two units at most."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]
    return "\n".join(lines)


def _in_order(answers: Iterable[WorkerAnswer]) -> list[WorkerAnswer]:
    return sorted(answers, key=lambda a: (a.agent_type, a.host, a.agent_id))


def status_table(answers: Iterable[WorkerAnswer]) -> str:
    """`ctl ping`: one row per live worker."""
    headers = (
        "AGENT ID",
        "TYPE",
        "HOST",
        "STATUS",
        "CURRENT TASK",
        "PAUSED",
        "VERSION",
        "UPTIME",
    )
    rows = [
        (
            a.agent_id,
            a.agent_type,
            a.host or "-",
            a.status,
            a.current_task or "-",
            "yes" if a.paused else "no",
            a.version or "-",
            format_duration(a.uptime_s),
        )
        for a in _in_order(answers)
    ]
    return _table(headers, rows)


def outcome_table(answers: Iterable[WorkerAnswer]) -> str:
    """`ctl pause|resume|cancel`: what each worker made of the command."""
    headers = ("AGENT ID", "HOST", "STATUS", "OUTCOME", "DETAIL")
    rows = [(a.agent_id, a.host or "-", a.status, a.outcome, a.detail) for a in _in_order(answers)]
    return _table(headers, rows)
