"""A test-side control command sender: commands out on broadcast_exchange, answers in.

Commands are built by the operator CLI's own chiffon_worker.ctl.build_command,
whose wire format tests/unit/test_ctl.py pins to PROTOCOL.md ("Extension:
control commands"). Answers are kept as they arrived (raw JSON, not through
ctl.parse_answer), so a test of the worker's side reads what the worker wrote.

sender = ControlSender(orchestrator.connection)   # a channel on that connection
ping = sender.send("ping")
sender.wait_for_answers(ping, 2, timeout=2)       # [Answer, Answer]
sender.publish_raw(b"garbage")                    # anything at all, for hostile input

Answers are stamped with time.monotonic() when pika hands them over, so
`Answer.latency` is only as fine as the caller's servicing of the connection:
wait with `wait_until` (or the Orchestrator's, on the same connection).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from chiffon_worker.ctl import COMMAND_TTL_S, build_command
from chiffon_worker.topology import BROADCAST_EXCHANGE
from tests.helpers.broker import service_until

# PROTOCOL.md: commands are not persistent and go stale after about a minute.
EXPIRATION_MS = str(int(COMMAND_TTL_S * 1000))


@dataclass(frozen=True)
class Sent:
    """One command on its way: its id (also its correlation_id) and when it left."""

    command_id: str
    command: str
    sent_at: float


@dataclass(frozen=True)
class Answer:
    """One worker's answer to one command, as it arrived."""

    received_at: float
    correlation_id: str | None
    message: dict[str, Any]

    @property
    def reply(self) -> dict[str, Any]:
        reply: dict[str, Any] = self.message["x_custom_fields"]["x_control_reply"]
        return reply

    @property
    def agent_id(self) -> str:
        return str(self.message["payload"]["agent_id"])

    @property
    def outcome(self) -> str:
        return str(self.reply["outcome"])

    @property
    def paused(self) -> bool:
        return bool(self.reply["paused"])

    def latency(self, sent: Sent) -> float:
        return self.received_at - sent.sent_at


class ControlSender:
    """Publishes commands to broadcast_exchange and collects the answers to its own queue."""

    def __init__(self, connection: BlockingConnection) -> None:
        self.connection = connection
        self.channel: BlockingChannel = connection.channel()
        self.channel.confirm_delivery()
        self.channel.exchange_declare(BROADCAST_EXCHANGE, exchange_type="fanout", durable=False)
        declared = self.channel.queue_declare("", exclusive=True, auto_delete=True)
        self.reply_to = str(declared.method.queue)
        self.answers: list[Answer] = []
        self.channel.basic_consume(self.reply_to, self._on_answer, auto_ack=True)

    def _on_answer(self, _ch: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        now = time.monotonic()
        self.answers.append(Answer(now, props.correlation_id, json.loads(body)))

    # -- sending --------------------------------------------------------------

    def send(
        self,
        command: str,
        *,
        agent_ids: list[str] | None = None,
        now: datetime | None = None,
        **parameters: Any,
    ) -> Sent:
        """Publish one command (ping, pause, resume, cancel with task_id/request_id) to
        infra workers; `now`: when it claims to be made (it expires a minute later)."""
        message = build_command(
            command, agent_type="infra", agent_ids=agent_ids, parameters=parameters, now=now
        )
        sent = Sent(str(message.id), command, time.monotonic())
        self.publish_raw(message.body, correlation_id=sent.command_id)
        return sent

    def publish_raw(self, body: bytes, correlation_id: str | None = None) -> None:
        """Any bytes to broadcast_exchange, with our reply_to (a worker might answer)."""
        props = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=1,
            expiration=EXPIRATION_MS,
            reply_to=self.reply_to,
            correlation_id=correlation_id or str(uuid.uuid4()),
        )
        # Mandatory: a command no worker's queue is bound for yet is a test bug, said at once.
        self.channel.basic_publish(BROADCAST_EXCHANGE, "", body, props, mandatory=True)

    # -- answers --------------------------------------------------------------

    def answers_to(self, sent: Sent) -> list[Answer]:
        return [a for a in self.answers if a.correlation_id == sent.command_id]

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Service the connection until `condition()` holds; fail after `timeout` s."""
        service_until(self.connection, condition, timeout, what, step=0.05)

    def serve_until(self, moment: float) -> None:
        """Service the connection until time.monotonic() reaches `moment` (pacing, not waiting)."""
        while (left := moment - time.monotonic()) > 0:
            self.connection.process_data_events(time_limit=min(left, 0.05))

    def wait_for_answers(self, sent: Sent, count: int, timeout: float) -> list[Answer]:
        """The first `count` answers to `sent`, arriving within `timeout` s of now."""
        self.wait_until(
            lambda: len(self.answers_to(sent)) >= count,
            timeout,
            f"{count} answers to {sent.command} {sent.command_id}",
        )
        return self.answers_to(sent)[:count]

    def ask(self, command: str, count: int = 1, timeout: float = 5, **kwargs: Any) -> list[Answer]:
        """Send a command and wait for `count` answers."""
        return self.wait_for_answers(self.send(command, **kwargs), count, timeout)

    def close(self) -> None:
        if self.channel.is_open:
            self.channel.close()
