"""Test-side broker access: private vhosts, and an orchestrator stand-in."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from chiffon_worker.topology import chiffon_topology

HOST = "127.0.0.1"
PORT = 5672


def broker_reachable(host: str = HOST, port: int = PORT) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


class Vhost:
    """A vhost of its own for one test, so no test sees another's messages."""

    def __init__(self) -> None:
        self.name = f"chiffon-test-{uuid.uuid4().hex[:12]}"

    def url(self, host: str = HOST, port: int = PORT, **query: Any) -> str:
        base = f"amqp://guest:guest@{host}:{port}/{quote(self.name, safe='')}"
        if query:
            base += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        return base


def _erlang_binaries(names: list[str]) -> str:
    return "[" + ", ".join(f'<<"{name}">>' for name in names) + "]"


class VhostPool:
    """Hands out fresh vhosts, made and removed in batches.

    Each rabbitmqctl call starts an Erlang VM (most of a second of CPU), so
    one call makes a dozen vhosts and one call at the end removes them all,
    instead of three calls per test.
    """

    BATCH = 12

    def __init__(self) -> None:
        self._free: list[Vhost] = []
        self._made: list[str] = []

    def take(self) -> Vhost:
        if not self._free:
            self._fill()
        return self._free.pop()

    def _fill(self) -> None:
        batch = [Vhost() for _ in range(self.BATCH)]
        names = [v.name for v in batch]
        try:
            rabbitmqctl(
                "eval",
                '[begin ok = rabbit_vhost:add(V, <<"chiffon-tests">>), '
                'ok = rabbit_auth_backend_internal:set_permissions(<<"guest">>, V, '
                '<<".*">>, <<".*">>, <<".*">>, <<"chiffon-tests">>) end '
                f"|| V <- {_erlang_binaries(names)}].",
            )
        except subprocess.CalledProcessError:
            # Another RabbitMQ version's internals: the slow, documented way.
            for name in names:
                rabbitmqctl("add_vhost", name)
                rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        self._made += names
        self._free += batch

    def close(self) -> None:
        if not self._made:
            return
        try:
            rabbitmqctl(
                "eval",
                '[rabbit_vhost:delete(V, <<"chiffon-tests">>) '
                f"|| V <- {_erlang_binaries(self._made)}].",
            )
        except subprocess.CalledProcessError:
            for name in self._made:
                rabbitmqctl("delete_vhost", name)
        self._made = []


def work_request(
    work_type: str = "echo",
    parameters: dict[str, Any] | None = None,
    *,
    request_id: str | None = None,
    trace_id: str | None = None,
    to_agent: str = "infra",
    priority: int = 3,
    hints: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A work_request envelope as the orchestrator sends it (plain JSON, on purpose)."""
    return {
        "protocol_version": "1.0",
        "message_id": str(uuid.uuid4()),
        "from_agent": "orchestrator",
        "to_agent": to_agent,
        "timestamp": datetime.now(UTC).isoformat(),
        "trace_id": trace_id or str(uuid.uuid4()),
        "request_id": request_id or str(uuid.uuid4()),
        "type": "work_request",
        "priority": priority,
        "payload": {
            "task_id": str(uuid.uuid4()),
            "work_type": work_type,
            "parameters": parameters if parameters is not None else {"message": "hi"},
            "hints": hints or {},
        },
        "x_custom_fields": {},
    }


def is_heartbeat(message: dict[str, Any]) -> bool:
    return message.get("type") == "work_status" and "agent_id" in message.get("payload", {})


def is_result(message: dict[str, Any]) -> bool:
    return message.get("type") == "work_result"


def service_until(
    connection: BlockingConnection,
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    step: float = 0.2,
) -> None:
    """Service `connection` (its consumers run) until `condition()` holds, checked at least
    every `step` s; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        connection.process_data_events(time_limit=min(left, step))


class Orchestrator:
    """Publishes requests and watches queues, the way the real orchestrator would."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None = None) -> None:
        parameters = pika.URLParameters(url)
        if ssl_context is not None:  # for amqps:// URLs: whom to trust, what to present
            parameters.ssl_options = pika.SSLOptions(ssl_context, parameters.host)
        self.connection = pika.BlockingConnection(parameters)
        self.channel: BlockingChannel = self.connection.channel()
        self.channel.confirm_delivery()
        topology = chiffon_topology()
        for exchange in topology.exchanges:
            self.channel.exchange_declare(
                exchange.name, exchange_type=exchange.kind, durable=exchange.durable
            )
        for queue in topology.queues:
            self.channel.queue_declare(queue.name, durable=queue.durable, arguments=queue.arguments)
        for binding in topology.bindings:
            self.channel.queue_bind(binding.queue, binding.exchange, binding.routing_key)
        self.received: dict[str, list[dict[str, Any]]] = {}
        self.raw: dict[str, list[bytes]] = {}
        self.properties: dict[str, list[pika.BasicProperties]] = {}

    def publish(
        self,
        body: bytes | dict[str, Any],
        routing_key: str = "work_queue",
        **properties: Any,
    ) -> None:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        props = pika.BasicProperties(content_type="application/json", **properties)
        self.channel.basic_publish("", routing_key, data, props, mandatory=True)

    def watch(self, queue: str) -> None:
        """Consume `queue` into self.received[queue] (decoded) and self.raw[queue]."""
        self.received[queue] = []
        self.raw[queue] = []
        self.properties[queue] = []

        def on_message(_ch: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
            self.raw[queue].append(body)
            self.properties[queue].append(props)
            try:
                self.received[queue].append(json.loads(body))
            except (ValueError, RecursionError):
                self.received[queue].append({"undecodable": body.decode("latin-1")})

        self.channel.basic_consume(queue, on_message, auto_ack=True)

    def wait_until(
        self, condition: Callable[[], bool], timeout: float, what: str = "condition"
    ) -> None:
        """Service the connection until `condition()` holds; fail after `timeout` s."""
        service_until(self.connection, condition, timeout, what)

    def results(self, queue: str = "reply_queue") -> list[dict[str, Any]]:
        return [m for m in self.received.get(queue, []) if is_result(m)]

    def distinct_results(self, queue: str = "reply_queue") -> list[dict[str, Any]]:
        """Results once each: a result re-published after a lost confirm keeps its message_id."""
        return list({m["message_id"]: m for m in self.results(queue)}.values())

    def heartbeats(self, queue: str = "reply_queue") -> list[dict[str, Any]]:
        return [m for m in self.received.get(queue, []) if is_heartbeat(m)]

    def errors(self, queue: str = "reply_queue") -> list[dict[str, Any]]:
        return [m for m in self.received.get(queue, []) if m.get("type") == "error"]

    def result_for(self, request: dict[str, Any], queue: str = "reply_queue") -> dict[str, Any]:
        found = [m for m in self.results(queue) if m["request_id"] == request["request_id"]]
        assert found, f"no result for request {request['request_id']}"
        return found[-1]

    def wait_for_result(self, request: dict[str, Any], timeout: float = 15) -> dict[str, Any]:
        rid = request["request_id"]
        self.wait_until(
            lambda: any(m["request_id"] == rid for m in self.results()),
            timeout,
            f"the result of {request['payload']['work_type']} {rid}",
        )
        return self.result_for(request)

    def queue_depth(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
