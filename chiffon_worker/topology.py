"""The queues, exchanges and bindings of PROTOCOL.md, as data.

Every participant declares these idempotently, so the arguments must match
the other declarers' exactly or RabbitMQ closes our channel with
PRECONDITION_FAILED. amqp.py applies them; nothing here talks to a broker.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

DLX_EXCHANGE = "dlx_exchange"
DLX_QUEUE = "dlx_queue"
BROADCAST_EXCHANGE = "broadcast_exchange"
DEFAULT_WORK_QUEUE = "work_queue"
DEFAULT_REPLY_QUEUE = "reply_queue"
CONTROL_QUEUE_PREFIX = "chiffon.control."
# PROTOCOL.md, control extension: a worker away for a few seconds still finds
# its commands; one gone for ten minutes leaves no queue behind; a command
# older than a minute is stale.
CONTROL_QUEUE_EXPIRES_MS = 600_000
CONTROL_MESSAGE_TTL_MS = 60_000


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    kind: str
    durable: bool


@dataclass(frozen=True)
class QueueSpec:
    name: str
    durable: bool
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BindingSpec:
    queue: str
    exchange: str
    routing_key: str


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[ExchangeSpec, ...]
    queues: tuple[QueueSpec, ...]
    bindings: tuple[BindingSpec, ...]
    work_queue: str
    reply_queue: str
    control_queue: str | None = None


_BROADCAST = ExchangeSpec(BROADCAST_EXCHANGE, "fanout", durable=False)


def control_queue_name(agent_id: object) -> str:
    return f"{CONTROL_QUEUE_PREFIX}{agent_id}"


def chiffon_topology(
    work_queue: str = DEFAULT_WORK_QUEUE,
    reply_queue: str = DEFAULT_REPLY_QUEUE,
    control_queue: str | None = None,
) -> Topology:
    """The protocol's topology; a deployment may rename the work and reply queues.

    With `control_queue`, also the worker's own queue for control commands,
    bound to broadcast_exchange.
    """
    dead_letter = {"x-dead-letter-exchange": DLX_EXCHANGE}
    # Dead-lettered messages keep their routing key, so a direct DLX only
    # routes them to dlx_queue if it is bound with each source queue's name.
    dlx_keys = dict.fromkeys(["", DEFAULT_WORK_QUEUE, DEFAULT_REPLY_QUEUE, work_queue, reply_queue])
    topology = Topology(
        exchanges=(_BROADCAST, ExchangeSpec(DLX_EXCHANGE, "direct", durable=True)),
        queues=(
            QueueSpec(DLX_QUEUE, durable=True, arguments={"x-max-length": 10000}),
            QueueSpec(work_queue, durable=True, arguments={"x-max-priority": 5, **dead_letter}),
            QueueSpec(reply_queue, durable=True, arguments=dict(dead_letter)),
        ),
        bindings=tuple(BindingSpec(DLX_QUEUE, DLX_EXCHANGE, key) for key in dlx_keys),
        work_queue=work_queue,
        reply_queue=reply_queue,
    )
    if control_queue is None:
        return topology
    control = QueueSpec(
        control_queue,
        durable=True,
        arguments={
            "x-expires": CONTROL_QUEUE_EXPIRES_MS,
            "x-message-ttl": CONTROL_MESSAGE_TTL_MS,
        },
    )
    return replace(
        topology,
        queues=(*topology.queues, control),
        bindings=(*topology.bindings, BindingSpec(control_queue, BROADCAST_EXCHANGE, "")),
        control_queue=control_queue,
    )


def broadcast_topology() -> Topology:
    """What a sender of control commands declares: broadcast_exchange, nothing else.

    It publishes only there, so it leaves the work and reply queues (whose
    names a deployment may change) to the workers and the orchestrator.
    """
    return Topology(
        exchanges=(_BROADCAST,),
        queues=(),
        bindings=(),
        work_queue=DEFAULT_WORK_QUEUE,
        reply_queue=DEFAULT_REPLY_QUEUE,
    )
