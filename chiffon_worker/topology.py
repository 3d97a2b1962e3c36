"""The queues, exchanges and bindings of PROTOCOL.md, as data.

Every participant declares these idempotently, so the arguments must match
the other declarers' exactly or RabbitMQ closes our channel with
PRECONDITION_FAILED. amqp.py applies them; nothing here talks to a broker.

Where an operator owns the shared queues (CHIFFON_DECLARE_TOPOLOGY=false,
e.g. a quorum work_queue), the worker only checks that they exist; its own
control queue it always declares. The broker's refusals are read back here
into what an operator needs to know (`read_refusal`).
"""

from __future__ import annotations

import re
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
    # False: the operator owns the shared queues and exchanges; we check that
    # they exist and never declare them (CHIFFON_DECLARE_TOPOLOGY=false).
    declare_shared: bool = True

    def shared_queues(self) -> tuple[QueueSpec, ...]:
        return tuple(q for q in self.queues if q.name != self.control_queue)

    def shared_bindings(self) -> tuple[BindingSpec, ...]:
        return tuple(b for b in self.bindings if b.queue != self.control_queue)

    def control(self) -> tuple[QueueSpec, BindingSpec] | None:
        """The worker's own queue and its binding to broadcast_exchange, if it has one."""
        queue = next((q for q in self.queues if q.name == self.control_queue), None)
        binding = next((b for b in self.bindings if b.queue == self.control_queue), None)
        if queue is None or binding is None:
            return None
        return queue, binding

    def used_queues(self) -> tuple[str, ...]:
        """The shared queues the worker needs to exist: it consumes one, publishes to the other."""
        return (self.work_queue, self.reply_queue)


_BROADCAST = ExchangeSpec(BROADCAST_EXCHANGE, "fanout", durable=False)


def control_queue_name(agent_id: object) -> str:
    return f"{CONTROL_QUEUE_PREFIX}{agent_id}"


def chiffon_topology(
    work_queue: str = DEFAULT_WORK_QUEUE,
    reply_queue: str = DEFAULT_REPLY_QUEUE,
    control_queue: str | None = None,
    *,
    declare_shared: bool = True,
) -> Topology:
    """The protocol's topology; a deployment may rename the work and reply queues.

    With `control_queue`, also the worker's own queue for control commands,
    bound to broadcast_exchange. With `declare_shared` False, the shared part
    is only checked (see Topology.declare_shared).
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
        declare_shared=declare_shared,
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


# -- what the broker says when it refuses a declaration ----------------------

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<argument>[^']*)' for (?P<kind>queue|exchange) "
    r"'(?P<name>.*?)' in vhost '.*?': received (?P<ours>.*) but current is (?P<theirs>.*)$"
)
_NO_SUCH = re.compile(r"no (?P<kind>queue|exchange) '(?P<name>.*?)' in vhost")
_NODE_DOWN = re.compile(
    r"home node '(?P<node>[^']*)' of durable (?P<kind>queue) '(?P<name>.*?)' in vhost "
    r".* is down or inaccessible"
)
_TYPED_VALUE = re.compile(r"the value (?P<value>'.*') of type '[^']*'")


@dataclass(frozen=True)
class Refusal:
    """A declaration or check the broker refused, in an operator's terms.

    `reason` is "mismatch" (declared differently: no retry helps), "missing"
    (nobody declared it yet) or "node down" (a classic queue whose node is
    gone: back with the node). `ours` and `theirs` are set for a mismatch.
    """

    reason: str
    kind: str
    name: str
    argument: str = ""
    ours: str = ""
    theirs: str = ""
    node: str = ""


def read_refusal(reply_text: str) -> Refusal | None:
    """Read RabbitMQ's reply text for a refused declare; None if it is none of ours.

    The text is all the broker gives: e.g. "PRECONDITION_FAILED - inequivalent
    arg 'x-queue-type' for queue 'work_queue' in vhost '/': received none but
    current is the value 'quorum' of type 'longstr'".
    """
    found = _INEQUIVALENT.search(reply_text)
    if found is not None:
        return Refusal(
            "mismatch",
            found["kind"],
            found["name"],
            argument=found["argument"],
            ours=_plain_value(found["ours"]),
            theirs=_plain_value(found["theirs"]),
        )
    found = _NODE_DOWN.search(reply_text)
    if found is not None:
        return Refusal("node down", found["kind"], found["name"], node=found["node"])
    found = _NO_SUCH.search(reply_text)
    if found is not None:
        return Refusal("missing", found["kind"], found["name"])
    return None


def _plain_value(text: str) -> str:
    """ "the value 'quorum' of type 'longstr'" reads as 'quorum'; "none" as not set."""
    text = text.strip()
    typed = _TYPED_VALUE.fullmatch(text)
    if typed is not None:
        return typed["value"]
    return "(not set)" if text == "none" else text
