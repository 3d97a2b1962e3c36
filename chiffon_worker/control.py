"""Control commands from broadcast_exchange: ping, pause, resume, cancel.

The wire format is PROTOCOL.md's "Extension: control commands": an ordinary
1.0 `work_request` whose work type is `x_control`, published to
broadcast_exchange and read from this worker's own queue. Every method runs on
the holder of the connection's baton (the link hands each command over).
Nothing a command carries can stop the worker: a malformed, expired,
duplicate or foreign command costs one log line.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from cachetools import TTLCache
from pydantic import ValidationError

from chiffon_worker import __version__
from chiffon_worker.amqp import Delivery, Outgoing
from chiffon_worker.errors import InvalidMessage
from chiffon_worker.heartbeat import StatusBuilder
from chiffon_worker.log import message_context
from chiffon_worker.protocol import (
    HEARTBEAT_PRIORITY,
    Envelope,
    WorkRequest,
    encode_message,
    parse_envelope,
)
from chiffon_worker.stats import Stats

logger = logging.getLogger(__name__)

CONTROL_WORK_TYPE = "x_control"
COMMANDS = ("ping", "pause", "resume", "cancel")
# Outcomes that mean "this worker did what was asked" (ctl exits 0 on any).
APPLIED = frozenset({"ok", "paused", "resumed", "cancelled", "remembered"})
# A command id is remembered this long: far past any command's expiry.
SEEN_TTL_S = 600.0
SEEN_MAX = 10_000


class IgnoredCommand(Exception):
    """A control message this worker does not act on; the text says why."""


@dataclass(frozen=True, slots=True)
class Command:
    id: uuid.UUID
    name: str
    envelope: Envelope
    task_id: uuid.UUID | None = None
    request_id: uuid.UUID | None = None
    reason: str = ""


def parse_command(
    body: bytes, *, agent_type: str, agent_id: uuid.UUID, now: datetime | None = None
) -> Command:
    """The command in `body` if it is one for this worker; IgnoredCommand says why not."""
    try:
        envelope = parse_envelope(body)
    except InvalidMessage as exc:
        raise IgnoredCommand(f"malformed: {exc.reason}") from None
    if envelope.type != "work_request":
        raise IgnoredCommand(f"malformed: type {envelope.type!r}, expected 'work_request'")
    try:
        request = WorkRequest.model_validate(envelope.payload)
    except ValidationError as exc:
        raise IgnoredCommand(f"malformed: payload: {exc.errors()[0]['msg']}") from None
    parameters = request.parameters
    name = parameters.get("command")
    if request.work_type != CONTROL_WORK_TYPE or name not in COMMANDS:
        raise IgnoredCommand(
            f"malformed: work_type {request.work_type!r} command {name!r}; expected "
            f"{CONTROL_WORK_TYPE!r} with one of {', '.join(COMMANDS)}"
        )
    _check_addressed_to_us(envelope, agent_type, agent_id, now or datetime.now(UTC))
    command = Command(request.task_id, str(name), envelope)
    if name != "cancel":
        return command
    task_id, request_id = (
        _uuid_or_none(parameters, "task_id"),
        _uuid_or_none(parameters, "request_id"),
    )
    if task_id is None and request_id is None:
        raise IgnoredCommand("malformed: cancel needs a task_id or a request_id")
    reason = parameters.get("reason")
    return Command(
        command.id,
        command.name,
        envelope,
        task_id,
        request_id,
        reason if isinstance(reason, str) and reason else "cancel requested",
    )


def _check_addressed_to_us(
    envelope: Envelope, agent_type: str, agent_id: uuid.UUID, now: datetime
) -> None:
    control = envelope.x_custom_fields.get("x_control")
    if not isinstance(control, dict):
        raise IgnoredCommand("malformed: x_custom_fields.x_control is missing")
    expires_at = _timestamp(control.get("expires_at"))
    if expires_at is None:
        raise IgnoredCommand("malformed: x_control.expires_at is not an ISO time")
    if now > expires_at:
        raise IgnoredCommand(f"expired at {expires_at.isoformat()}")
    if envelope.to_agent != agent_type:
        raise IgnoredCommand(f"for agent type {envelope.to_agent!r}, not {agent_type!r}")
    agent_ids = control.get("agent_ids")
    if agent_ids is None:
        return
    if not isinstance(agent_ids, list) or not all(isinstance(a, str) for a in agent_ids):
        raise IgnoredCommand("malformed: x_control.agent_ids is not a list of strings")
    if str(agent_id) not in {a.lower() for a in agent_ids}:
        raise IgnoredCommand("for other agent ids")


def _timestamp(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _uuid_or_none(parameters: dict[str, Any], key: str) -> uuid.UUID | None:
    value = parameters.get(key)
    if value is None:
        return None
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise IgnoredCommand(f"malformed: {key} {value!r} is not a UUID") from None


class Controllable(Protocol):
    """What commands act on (RequestConsumer)."""

    @property
    def paused(self) -> bool: ...
    def pause(self) -> bool: ...
    def resume(self) -> bool: ...
    def cancel(
        self, task_id: uuid.UUID | None, request_id: uuid.UUID | None, reason: str
    ) -> tuple[str, str]: ...
    def current_task_ids(self) -> list[str]: ...


class ControlDesk:
    """Applies commands for one worker and answers them to their reply_to."""

    def __init__(
        self,
        worker: Controllable,
        status: StatusBuilder,
        send: Callable[[Outgoing], None],
        *,
        agent_type: str,
        agent_id: uuid.UUID,
        work_types: frozenset[str],
        stats: Stats,
    ) -> None:
        self._worker = worker
        self._status = status
        self._send = send
        self._agent_type = agent_type
        self._agent_id = agent_id
        self._work_types = sorted(work_types)
        self._stats = stats
        self._seen: TTLCache[uuid.UUID, bool] = TTLCache(SEEN_MAX, SEEN_TTL_S)
        self._host = socket.gethostname()
        self._started_at = datetime.now(UTC)
        self._started = time.monotonic()

    def on_command(self, delivery: Delivery) -> None:
        try:
            command = parse_command(
                delivery.body, agent_type=self._agent_type, agent_id=self._agent_id
            )
        except IgnoredCommand as why:
            self._stats.command("ignored")
            logger.info("control message ignored", extra={"reason": str(why)})
            return
        if command.id in self._seen:
            self._stats.command("ignored")
            logger.info("control message ignored", extra={"reason": "duplicate command id"})
            return
        self._seen[command.id] = True
        self._stats.command(command.name)
        envelope = command.envelope
        with message_context(trace_id=envelope.trace_id, request_id=envelope.request_id):
            outcome, detail = self._apply(command)
            logger.info(
                "control command",
                extra={"command": command.name, "outcome": outcome, "detail": detail},
            )
            if delivery.reply_to:
                self._send(self._answer(command, outcome, detail, delivery))

    def _apply(self, command: Command) -> tuple[str, str]:
        if command.name == "pause":
            if self._worker.pause():
                return "paused", "taking no new requests; running work goes on"
            return "already_paused", "was paused already"
        if command.name == "resume":
            if self._worker.resume():
                return "resumed", "taking requests again"
            return "not_paused", "was not paused"
        if command.name == "cancel":
            return self._worker.cancel(command.task_id, command.request_id, command.reason)
        return "ok", "alive"

    def _answer(self, command: Command, outcome: str, detail: str, delivery: Delivery) -> Outgoing:
        """A work_status with our StatusUpdate and what became of the command."""
        running = self._worker.current_task_ids()
        paused = self._worker.paused
        reply = {
            "command_id": str(command.id),
            "command": command.name,
            "outcome": outcome,
            "detail": detail,
            "paused": paused,
            "state": "paused" if paused else ("busy" if running else "online"),
            "version": __version__,
            "host": self._host,
            "started_at": self._started_at.isoformat(),
            "uptime_s": round(time.monotonic() - self._started, 1),
            "current_task": running[0] if running else None,
            "work_types": self._work_types,
        }
        envelope = command.envelope
        body = encode_message(
            self._status.update(),
            from_agent=self._agent_type,
            to_agent=envelope.from_agent,
            trace_id=envelope.trace_id,
            request_id=envelope.request_id,
            priority=HEARTBEAT_PRIORITY,
            x_custom_fields={"x_paused": paused, "x_control_reply": reply},
        ).body
        return Outgoing(
            routing_key=delivery.reply_to or "",
            body=body,
            priority=HEARTBEAT_PRIORITY,
            correlation_id=delivery.correlation_id,
            persistent=False,
        )
