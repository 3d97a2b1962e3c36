"""The only module that imports pika: one broker connection and what it can do.

Everything here runs on the thread that owns the connection (the worker's
main thread), except `call_threadsafe`, the one door other threads may use.
pika's exceptions are translated into ours so no other module knows pika.

Delivery tags carry the generation of the channel that delivered them: after
a reconnect a tag from the old channel is dropped, never acked on the new one
(where the same number means a different message).

Publishes are confirmed by the broker, but not waited for one by one: the
link numbers them as the broker does and marks each Outgoing when its confirm
(or nack, or return) arrives. Waiting for every confirm before taking the next
message would make each message cost a full broker round trip.

In a cluster the link tries the nodes in an order shuffled per worker
(`node_order`) and moves on to the next one whenever a connection is lost.
The topology is declared (or, where the operator owns it, only checked) on a
channel of its own, so a refusal costs that channel only: a queue declared
differently is a TopologyMismatch (no retry helps); a queue that is missing
or whose node is down leaves the connection up (heartbeats and results keep
flowing) and is checked again every TOPOLOGY_RETRY_S until we can consume.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from chiffon_worker.config import TlsFiles, redact_url
from chiffon_worker.errors import (
    BrokerAuthError,
    BrokerUnavailable,
    ChiffonError,
    ConnectionLost,
    PublishFailed,
    TopologyMismatch,
    TopologyUnavailable,
)
from chiffon_worker.topology import BROADCAST_EXCHANGE, Refusal, Topology, read_refusal

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"
# How long to wait before consuming the control queue again after the broker
# refused our exclusive consumer (someone else holds it).
CONTROL_RETRY_S = 10.0
# How often a queue we cannot use (missing, or its node down) is checked again:
# slow, because an operator or a node restart has to act first, and every
# check is a line in the log.
TOPOLOGY_RETRY_S = 10.0
# The longest a graceful close waits for the broker's Close-Ok.
CLOSE_WAIT_SECONDS = 2.0
PERSISTENT = 2
TRANSIENT = 1


# Named tuples: made for every message, and a frozen dataclass costs more to build.
class DeliveryTag(NamedTuple):
    generation: int
    value: int


class Delivery(NamedTuple):
    tag: DeliveryTag
    body: bytes
    reply_to: str | None
    correlation_id: str | None


class PublishState(Enum):
    UNSENT = "unsent"  # not published on the current channel (never, or that channel is gone)
    WAITING = "waiting"  # published; the broker has not answered yet
    CONFIRMED = "confirmed"
    REFUSED = "refused"  # nacked, or returned as unroutable: see `refusal`


@dataclass(eq=False)
class Outgoing:
    """A message waiting in the outbox until the broker confirms it."""

    routing_key: str
    body: bytes
    priority: int
    correlation_id: str | None = None
    persistent: bool = True
    attempts: int = 0
    # Someone waits for its confirm (acks held back behind it): settle it at
    # once; otherwise it is settled when the loop next comes round.
    awaited: bool = False
    # Kept up to date by the BrokerLink that published it.
    state: PublishState = PublishState.UNSENT
    refusal: str = ""


DeliveryHandler = Callable[[Delivery], None]


class _translated:  # noqa: N801 - reads as the context manager it is
    """Turn pika's connection/channel failures into ConnectionLost.

    A class, not a generator-based context manager: it wraps every ack and
    publish, and this costs a third as much.
    """

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _trace: object
    ) -> None:
        if exc is None:
            return
        what = self._what
        if isinstance(exc, pika.exceptions.UnroutableError | pika.exceptions.NackError):
            raise PublishFailed(f"{what}: broker did not accept the message ({exc!r})") from None
        if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
            raise ConnectionLost(f"{what}: channel closed by broker: {exc.reply_text}") from None
        if isinstance(exc, pika.exceptions.AMQPError | OSError):
            raise ConnectionLost(f"{what}: {exc!r}") from None


# Stateless, so shared: these wrap a call or two for every message.
_PUBLISHING = _translated("basic.publish")
_ACKING = _translated("basic.ack")
_SERVICING = _translated("connection")


def connection_parameters(
    url: str, heartbeat: int, blocked_timeout: float, tls: TlsFiles | None = None
) -> pika.URLParameters:
    params = pika.URLParameters(url)
    if params.ssl_options is not None:
        params.ssl_options = pika.SSLOptions((tls or TlsFiles()).context(), params.host)
    # A heartbeat given in the URL wins: an operator who wrote it meant it.
    if "heartbeat=" not in url:
        params.heartbeat = heartbeat
    if "blocked_connection_timeout=" not in url:
        params.blocked_connection_timeout = blocked_timeout
    params.connection_attempts = 1
    params.retry_delay = 0
    if "socket_timeout=" not in url:
        params.socket_timeout = 10
    return params


def open_connection(
    url: str, heartbeat: int, blocked_timeout: float, tls: TlsFiles | None = None
) -> BlockingConnection:
    """Open one connection; bad credentials and a broker that is not there differ."""
    shown = redact_url(url)
    try:
        return BlockingConnection(connection_parameters(url, heartbeat, blocked_timeout, tls))
    except (
        pika.exceptions.ProbableAuthenticationError,
        pika.exceptions.AuthenticationError,
    ) as exc:
        raise BrokerAuthError(f"broker refused the credentials for {shown}: {exc!r}") from None
    except pika.exceptions.ProbableAccessDeniedError as exc:
        raise BrokerAuthError(f"broker refused access to the vhost of {shown}: {exc!r}") from None
    except (pika.exceptions.AMQPError, OSError) as exc:
        if any(alert in repr(exc) for alert in _CLIENT_CERTIFICATE_ALERTS):
            raise BrokerAuthError(
                f"TLS: the broker at {shown} does not accept our client certificate "
                f"(check CHIFFON_TLS_CERT_FILE and CHIFFON_TLS_KEY_FILE): {exc!r}"
            ) from None
        if _certificate_refused(exc):
            raise BrokerAuthError(
                f"TLS: the broker's certificate at {shown} is not trusted "
                f"(check CHIFFON_TLS_CA_FILE and the host name): {exc!r}"
            ) from None
        hint = ""
        if tls is not None and tls.cert_file and "SSLEOFError" in repr(exc):
            # Under TLS 1.3 a broker that rejects our certificate may close the
            # socket before its alert can be read: not provably a refusal, so
            # retried (a broker restarting mid-handshake looks the same).
            hint = "; if this repeats, the broker may not accept our client certificate"
        if isinstance(exc, pika.exceptions.IncompatibleProtocolError) and "StreamLost" in repr(exc):
            # pika's words for a peer that hung up before the AMQP greeting: a
            # broker starting or stopping, or a proxy with no broker behind it.
            raise BrokerUnavailable(
                f"cannot connect to {shown}: the connection closed during the AMQP handshake "
                f"(broker starting or stopping, or nothing behind a proxy): {exc!r}{hint}"
            ) from None
        raise BrokerUnavailable(f"cannot connect to {shown}: {exc!r}{hint}") from None


# TLS alerts a broker sends when it rejects our client certificate; pika reports
# them only as text inside a lost-stream error.
_CLIENT_CERTIFICATE_ALERTS = (
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_UNSUPPORTED_CERTIFICATE",
)


def _certificate_refused(exc: BaseException) -> bool:
    """pika wraps the SSL error; look through the chain and the text for it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in repr(exc)


def node_order(urls: list[str], seed: str | None) -> list[str]:
    """The order this worker tries the broker's nodes in: shuffled per worker.

    Seeded with the worker's agent_id, so a fleet with the same URL list
    spreads evenly over the nodes instead of all landing on the first, and
    one worker keeps its order across restarts (predictable, testable).
    Without a seed the order is shuffled per process.
    """
    order = list(urls)
    random.Random(seed).shuffle(order)
    return order


def node_address(url: str) -> str:
    """host:port of a broker URL, as log lines name a node."""
    parts = urlsplit(url)
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    return f"{parts.hostname or 'localhost'}:{port}"


def declare(channel: BlockingChannel, topology: Topology) -> None:
    """Everything of `topology`, declared (RequestClient's way: it owns nothing to check)."""
    for exchange in topology.exchanges:
        channel.exchange_declare(
            exchange=exchange.name, exchange_type=exchange.kind, durable=exchange.durable
        )
    for queue in topology.queues:
        channel.queue_declare(queue=queue.name, durable=queue.durable, arguments=queue.arguments)
    for binding in topology.bindings:
        channel.queue_bind(
            queue=binding.queue, exchange=binding.exchange, routing_key=binding.routing_key
        )


def prepare_shared(channel: BlockingChannel, topology: Topology) -> None:
    """Declare the shared queues and exchanges, or only check them if the operator owns them.

    A passive declare that finds nothing closes the channel (404), so the
    first missing one ends the check: it is the one named.
    """
    if not topology.declare_shared:
        for name in topology.used_queues():
            channel.queue_declare(queue=name, passive=True)
        return
    for exchange in topology.exchanges:
        channel.exchange_declare(
            exchange=exchange.name, exchange_type=exchange.kind, durable=exchange.durable
        )
    for queue in topology.shared_queues():
        channel.queue_declare(queue=queue.name, durable=queue.durable, arguments=queue.arguments)
    for binding in topology.shared_bindings():
        channel.queue_bind(
            queue=binding.queue, exchange=binding.exchange, routing_key=binding.routing_key
        )


def declare_control(channel: BlockingChannel, topology: Topology) -> None:
    """Our own control queue: always declared (it is per worker, nobody else's to make)."""
    control = topology.control()
    if control is None:
        return
    queue, binding = control
    if not topology.declare_shared:
        # Where the operator owns broadcast_exchange we only look for it, so a
        # missing one is named as such, not as a failed bind.
        channel.exchange_declare(exchange=BROADCAST_EXCHANGE, passive=True)
    channel.queue_declare(queue=queue.name, durable=queue.durable, arguments=queue.arguments)
    channel.queue_bind(
        queue=binding.queue, exchange=binding.exchange, routing_key=binding.routing_key
    )


def refusal_error(reply_text: str) -> ChiffonError:
    """What a broker's refusal of a declare or check means for us (see topology.Refusal)."""
    refusal = read_refusal(reply_text)
    if refusal is None:
        return ConnectionLost(f"declaring the topology: channel closed by broker: {reply_text}")
    fields = {refusal.kind: refusal.name, "broker_says": reply_text}
    if refusal.reason == "mismatch":
        fields.update(argument=refusal.argument, ours=refusal.ours, broker_has=refusal.theirs)
        return TopologyMismatch(_mismatch_text(refusal), fields)
    fields["reason"] = refusal.reason
    fields["what_to_do"] = _unavailable_advice(refusal)
    return TopologyUnavailable(f"{refusal.kind} {refusal.name!r} unavailable: {reply_text}", fields)


def _mismatch_text(refusal: Refusal) -> str:
    return (
        f"{refusal.kind} {refusal.name!r} exists with {refusal.argument}={refusal.theirs}, "
        f"we declare {refusal.argument}={refusal.ours}: align the declarations "
        "(PROTOCOL.md) or set CHIFFON_DECLARE_TOPOLOGY=false to use the queues as declared"
    )


def _unavailable_advice(refusal: Refusal) -> str:
    if refusal.reason == "node down":
        return (
            f"a classic queue lives on one node ({refusal.node}): it is back when that node "
            "is; a quorum queue survives the loss of a node"
        )
    return (
        f"declare the {refusal.kind} (with CHIFFON_DECLARE_TOPOLOGY=false the operator "
        "declares every shared queue and exchange), or set CHIFFON_DECLARE_TOPOLOGY=true"
    )


class _preparing:  # noqa: N801 - reads as the context manager it is
    """Around a declare or check: the broker's refusal becomes one of our errors."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _trace: object
    ) -> None:
        if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
            raise refusal_error(exc.reply_text) from None
        if isinstance(exc, pika.exceptions.AMQPError | OSError):
            raise ConnectionLost(f"declaring the topology: {exc!r}") from None


def _properties(message: Outgoing, reply_to: str | None = None) -> BasicProperties:
    if message.correlation_id is None and reply_to is None:
        # The common case, shared: pika only reads them, and building costs more than sending.
        key = (message.priority, message.persistent)
        shared = _SHARED_PROPERTIES.get(key)
        if shared is None:
            shared = _SHARED_PROPERTIES[key] = _properties_for(message.priority, message.persistent)
        return shared
    return _properties_for(message.priority, message.persistent, message.correlation_id, reply_to)


def _properties_for(
    priority: int, persistent: bool, correlation_id: str | None = None, reply_to: str | None = None
) -> BasicProperties:
    return BasicProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=PERSISTENT if persistent else TRANSIENT,
        priority=priority,
        correlation_id=correlation_id,
        reply_to=reply_to,
    )


_SHARED_PROPERTIES: dict[tuple[int, bool], BasicProperties] = {}


def _publish(channel: BlockingChannel, message: Outgoing, reply_to: str | None = None) -> None:
    """To the default exchange, mandatory.

    On a channel in BlockingChannel's confirm mode (RequestClient) this waits
    for the confirm; on BrokerLink's it returns once the message is written.
    """
    with _PUBLISHING:
        channel.basic_publish(
            exchange="",
            routing_key=message.routing_key,
            body=message.body,
            properties=_properties(message, reply_to),
            mandatory=True,
        )


class BrokerLink:
    """One connection + one confirm-mode channel, reopened by `connect()`."""

    def __init__(
        self,
        urls: list[str],
        topology: Topology,
        *,
        prefetch: int,
        heartbeat: int,
        blocked_timeout: float,
        on_delivery: DeliveryHandler,
        on_consumer_cancelled: Callable[[], None],
        on_confirmed: Callable[[], None] = lambda: None,
        on_control: DeliveryHandler | None = None,
        tls: TlsFiles | None = None,
        seed: str | None = None,
    ) -> None:
        self._urls = node_order(urls, seed)
        self._tls = tls
        self._next_url = 0
        self._topology = topology
        self._prefetch = prefetch
        self._heartbeat = heartbeat
        self._blocked_timeout = blocked_timeout
        self._on_delivery = on_delivery
        self._on_consumer_cancelled = on_consumer_cancelled
        self._on_confirmed = on_confirmed
        self._on_control = on_control
        # The control queue is consumed on a channel of its own, so a refused
        # exclusive consumer (another worker with our agent_id) costs only it.
        self._control_channel: BlockingChannel | None = None
        self._control_retry_at: float | None = None
        # Consuming a server-named queue bound to broadcast_exchange while our
        # control queue's node is down: commands sent meanwhile still reach us.
        self._control_stand_in = False
        # The shared topology was declared (or found) on this connection; until
        # then consuming waits, and it is tried again at _topology_retry_at.
        self.topology_ready = False
        self._topology_retry_at: float | None = None
        self._consume_when_ready = False
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._consumer_tag: str | None = None
        self._generation = 0
        # Publishes on the current channel, numbered from 1 as the broker numbers
        # its confirms; those not answered yet wait here by number.
        self._published = 0
        self._unconfirmed: dict[int, Outgoing] = {}
        self._settle_scheduled = False
        # Guards _connection against a swap while another thread hands over a callback.
        self._swap_lock = threading.Lock()
        self.current_url = ""
        self.current_node = ""
        # The broker blocked this connection (a memory or disk alarm): it reads
        # nothing we send until it unblocks us, so no call may wait for an answer.
        self.blocked = False
        # start_consuming() came while blocked: done once the broker unblocks us.
        self._consume_when_unblocked = False
        # The synchronous call (basic.consume, basic.cancel) waiting for its answer now.
        self._waiting_for: str | None = None

    # -- connection lifecycle -------------------------------------------------

    def connect(self) -> None:
        """Try the next node in turn; declare the topology; raise if that fails.

        A queue that is missing or on a node that is down does not fail the
        connection (see the module docstring); a mismatch does, for good.
        """
        url = self._urls[self._next_url % len(self._urls)]
        self._next_url += 1
        connection = open_connection(url, self._heartbeat, self._blocked_timeout, self._tls)
        generation = self._generation + 1
        try:
            with _translated("opening channel"):
                channel = connection.channel()
                self._enable_confirms(channel, generation)
                # Its Qos-Ok comes after the Select-Ok (one channel answers in
                # order), so confirm mode is on once this returns.
                channel.basic_qos(prefetch_count=self._prefetch)
                channel.add_on_cancel_callback(self._broker_cancelled)
                # On the I/O loop itself, not BlockingConnection's dispatch: it
                # must be seen while inline work runs inside pika's callback
                # and while one of our own calls waits for its answer.
                impl = connection._impl
                impl.add_on_connection_blocked_callback(
                    lambda _impl, _frame: self._blocked(generation)
                )
                impl.add_on_connection_unblocked_callback(
                    lambda _impl, _frame: self._unblocked(generation)
                )
            ready = self._prepare(connection)
        except (ConnectionLost, TopologyMismatch):
            _close_quietly(connection)
            raise
        with self._swap_lock:
            self._connection = connection
            self._channel = channel
            self._generation = generation
        self.topology_ready = ready
        self._consume_when_ready = False
        _watch_for_silence(connection, 2.0 * float(connection._impl.params.heartbeat or 0))
        self._consumer_tag = None
        self._consume_when_unblocked = False
        self.blocked = False
        self.current_url = redact_url(url)
        self.current_node = node_address(url)
        self._start_control()

    def _prepare(self, connection: BlockingConnection) -> bool:
        """The shared topology, on a channel of its own; False while a queue is unavailable."""
        try:
            with _preparing():
                channel = connection.channel()
                prepare_shared(channel, self._topology)
                channel.close()
        except TopologyUnavailable as exc:
            self._topology_retry_at = time.monotonic() + TOPOLOGY_RETRY_S
            logger.error(
                "queue unavailable: not consuming until it is back",
                extra={**exc.fields, "retry_in_s": TOPOLOGY_RETRY_S},
            )
            return False
        self._topology_retry_at = None
        return True

    def _retry_topology(self) -> None:
        """Check again on the live connection; consume once the work queue is back."""
        connection = self._connection
        if connection is None or self.blocked:  # opening a channel waits for an answer
            return
        if not self._prepare(connection):
            return
        logger.info("queue available again", extra={"queue": self._topology.work_queue})
        self.topology_ready = True
        if self._consume_when_ready:
            self._consume_when_ready = False
            self.start_consuming()

    @property
    def is_open(self) -> bool:
        connection = self._connection
        return connection is not None and connection.is_open

    @property
    def consuming(self) -> bool:
        return (
            self._consumer_tag is not None
            or self._consume_when_unblocked
            or self._consume_when_ready
        )

    def _detach(self) -> BlockingConnection | None:
        """Forget the current connection (under the lock other threads look through)."""
        with self._swap_lock:
            connection, self._connection, self._channel = self._connection, None, None
            # A confirm from a channel we left behind must not touch what we publish next.
            self._generation += 1
        self._consumer_tag = None
        self._consume_when_unblocked = False
        self.blocked = False
        self._control_channel = None
        self._control_retry_at = None
        self._control_stand_in = False
        self.topology_ready = False
        self._topology_retry_at = None
        self._consume_when_ready = False
        # Never confirmed, so to be published again on the next channel, which
        # numbers its publishes from 1 again (a settle the old one had
        # scheduled never runs).
        for message in self._unconfirmed.values():
            message.state = PublishState.UNSENT
        self._unconfirmed.clear()
        self._published = 0
        self._settle_scheduled = False
        return connection

    def close(self) -> None:
        """Close gracefully; a blocked connection is dropped (its Close-Ok would not come)."""
        blocked = self.blocked
        connection = self._detach()
        if connection is None:
            return
        if blocked:
            _abandon(connection, "blocked by the broker: dropped, not closed")
        else:
            # Bounded too: our last publish may have got us blocked just now.
            _close_quietly(connection, within=CLOSE_WAIT_SECONDS)

    def drop(self) -> None:
        """Abandon a connection judged dead, without the close handshake.

        A graceful close would wait for the peer's Close-Ok, which a stalled
        or half-open connection never sends.
        """
        connection = self._detach()
        if connection is not None:
            _abandon(connection, "abandoned by chiffon-worker")

    # -- consuming ------------------------------------------------------------

    def start_consuming(self) -> None:
        """Consume the work queue; while blocked, once the broker unblocks us."""
        if self._consumer_tag is not None:
            return
        channel = self._require_channel()
        if not self.topology_ready:
            # The work queue is missing or its node is down: consume once it is back.
            self._consume_when_ready = True
            return
        if self.blocked:
            # Consume-Ok would not come before the alarm clears: the broker
            # reads nothing of ours meanwhile, so nothing is lost by waiting.
            self._consume_when_unblocked = True
            return
        self._consume_when_unblocked = False
        generation = self._generation
        with _translated("basic.consume"), self._waiting("basic.consume"):
            self._consumer_tag = channel.basic_consume(
                queue=self._topology.work_queue,
                on_message_callback=lambda _ch, method, props, body: self._deliver(
                    generation, method, props, body
                ),
            )

    def stop_consuming(self) -> None:
        """Cancel our consumer; pika requeues deliveries it had not handed to us yet.

        While blocked the cancel is sent without waiting for its Cancel-Ok,
        which would not come before the alarm clears: the broker acts on it
        then, or requeues our unacked deliveries when the connection closes.
        A delivery pika still held for the cancelled consumer is rejected by
        pika (requeued).
        """
        self._consume_when_unblocked = False
        self._consume_when_ready = False
        tag, self._consumer_tag = self._consumer_tag, None
        channel = self._channel
        if tag is None or channel is None:
            return
        with _translated("basic.cancel"):
            if self.blocked:
                channel._impl.basic_cancel(tag)  # no callback: nowait
                return
            with self._waiting("basic.cancel"):
                channel.basic_cancel(tag)

    @contextlib.contextmanager
    def _waiting(self, call: str) -> Iterator[None]:
        self._waiting_for = call
        try:
            yield
        finally:
            self._waiting_for = None

    # -- the control queue ----------------------------------------------------

    def _start_control(self) -> None:
        """Declare and consume our control queue, exclusively, on its own channel."""
        queue = self._topology.control_queue
        connection = self._connection
        if queue is None or self._on_control is None or connection is None:
            return
        if self.blocked:  # opening a channel waits for an answer: try once unblocked
            self._control_retry_at = time.monotonic()
            return
        self._control_retry_at = None
        generation = self._generation
        try:
            channel = connection.channel()
            declare_control(channel, self._topology)
            channel.add_on_cancel_callback(lambda _frame: self._control_lost("cancelled"))
            channel.basic_consume(
                queue=queue,
                on_message_callback=lambda _ch, method, props, body: self._command(
                    generation, method, props, body
                ),
                # Acked once handled: a command delivered to a connection that
                # then stalls goes back to the queue for our next connection.
                auto_ack=False,
                exclusive=True,
            )
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._control_retry_at = time.monotonic() + CONTROL_RETRY_S
            self._control_refused(connection, queue, exc.reply_text)
            return
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise ConnectionLost(f"control channel: {exc!r}") from None
        self._end_stand_in()
        self._control_channel = channel

    def _control_refused(self, connection: BlockingConnection, queue: str, reply_text: str) -> None:
        error = refusal_error(reply_text)
        if isinstance(error, ConnectionLost):  # not about the queue: its consumer
            logger.error(
                "control queue in use by another consumer: another worker may have our "
                "agent_id (set CHIFFON_AGENT_ID per worker), or the broker has not yet "
                "noticed our previous connection closing; retrying",
                extra={"queue": queue, "reason": reply_text, "retry_in_s": CONTROL_RETRY_S},
            )
            return
        fields = getattr(error, "fields", {})
        logger.error(
            "control queue unavailable: commands reach us through a stand-in queue meanwhile",
            extra={**fields, "retry_in_s": CONTROL_RETRY_S},
        )
        if not self._control_stand_in:
            self._consume_stand_in(connection)

    def _consume_stand_in(self, connection: BlockingConnection) -> None:
        """A server-named queue on this node, bound to broadcast_exchange, while ours is away.

        Commands are fanned out to every bound queue, so new ones reach us
        here; those that waited in our own queue come when it is back (a
        command seen twice is answered once: the desk remembers command ids).
        """
        generation = self._generation
        try:
            channel = connection.channel()
            declared = channel.queue_declare(queue="", exclusive=True, auto_delete=True)
            name = str(declared.method.queue)
            channel.queue_bind(queue=name, exchange=BROADCAST_EXCHANGE)
            channel.basic_consume(
                queue=name,
                on_message_callback=lambda _ch, method, props, body: self._command(
                    generation, method, props, body
                ),
                auto_ack=False,
            )
        except pika.exceptions.ChannelClosedByBroker:
            return  # broadcast_exchange itself is missing: said already, retried with ours
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise ConnectionLost(f"control channel: {exc!r}") from None
        self._control_channel = channel
        self._control_stand_in = True

    def _end_stand_in(self) -> None:
        channel, stand_in = self._control_channel, self._control_stand_in
        self._control_stand_in = False
        if stand_in and channel is not None:
            logger.info(
                "control queue available again", extra={"queue": self._topology.control_queue}
            )
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                channel.close()  # its queue is deleted with its consumer

    def _control_lost(self, why: str) -> None:
        logger.warning("control consumer lost, consuming again", extra={"reason": why})
        self._control_channel = None
        self._control_stand_in = False
        self._control_retry_at = time.monotonic() + 1.0

    def _command(
        self, generation: int, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        if generation != self._generation or self._on_control is None:
            return
        tag = DeliveryTag(generation, method.delivery_tag)
        self._on_control(Delivery(tag, body, props.reply_to, props.correlation_id))
        channel = self._control_channel
        if channel is not None and channel.is_open and generation == self._generation:
            with _ACKING:
                channel.basic_ack(delivery_tag=method.delivery_tag)

    def _take_undispatched_commands(self, channel: BlockingChannel) -> None:
        """Commands pika read but cannot dispatch while work runs inside its callback.

        pika dispatches nothing on a connection while one of its callbacks
        runs (the connection thread's long inline work), so the rescue thread
        takes the control channel's deliveries from pika's queue itself: a
        ping is answered within a second even then. The work channel's
        events stay where they are, for the connection thread.
        """
        pending = channel._pending_events
        generation = self._generation
        while pending:
            event = pending.popleft()
            method = getattr(event, "method", None)
            if isinstance(method, Basic.Deliver):
                self._command(generation, method, event.properties, event.body)
            else:  # the broker cancelled the consumer (the queue went away)
                self._control_lost("cancelled")

    def _deliver(
        self, generation: int, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        if generation != self._generation:
            # Read from a connection given up on while long work ran inside
            # pika's callback: the broker requeues it, so it is not ours to run.
            return
        tag = DeliveryTag(generation, method.delivery_tag)
        self._on_delivery(Delivery(tag, body, props.reply_to, props.correlation_id))

    def _broker_cancelled(self, _frame: Any) -> None:
        self._consumer_tag = None
        self._on_consumer_cancelled()

    def _blocked(self, generation: int) -> None:
        """Runs inside pika's I/O loop, wherever it is pumped (a waiting call included)."""
        if generation != self._generation:
            return
        self.blocked = True
        logger.warning(
            "broker blocked publishing (memory or disk alarm)",
            extra={"blocked_connection_timeout": self._blocked_timeout},
        )
        waiting, connection = self._waiting_for, self._connection
        if waiting is not None and connection is not None:
            # Sent just after a publish that got us blocked: its answer will
            # not come until the alarm clears, and the thread waiting for it
            # feeds no watchdog and heeds no stop meanwhile. Give the
            # connection up instead (the broker requeues what we hold).
            connection._impl._terminate_stream(
                pika.exceptions.ConnectionBlockedTimeout(
                    f"blocked by the broker (memory or disk alarm) while {waiting} "
                    "waited for its answer"
                )
            )

    def _unblocked(self, generation: int) -> None:
        if generation != self._generation:
            return
        self.blocked = False
        logger.info("broker unblocked publishing")

    # -- acks -----------------------------------------------------------------

    def is_current(self, tag: DeliveryTag) -> bool:
        return tag.generation == self._generation and self.is_open

    def ack(self, tag: DeliveryTag) -> bool:
        """Ack on the channel that delivered it; False (and nothing sent) if that is gone."""
        if not self.is_current(tag):
            return False
        with _ACKING:
            self._require_channel().basic_ack(delivery_tag=tag.value)
        return True

    def reject(self, tag: DeliveryTag, *, requeue: bool) -> bool:
        if not self.is_current(tag):
            return False
        with _translated("basic.reject"):
            self._require_channel().basic_reject(delivery_tag=tag.value, requeue=requeue)
        return True

    # -- publishing -----------------------------------------------------------

    def publish(self, message: Outgoing) -> None:
        """Publish to the default exchange; `message.state` follows the broker's answer.

        Written out at once (the broker gets it sooner, and the next delivery
        is read on the way), but its confirm is not waited for.
        """
        channel = self._require_channel()
        self._published += 1
        message.state, message.refusal = PublishState.WAITING, ""
        self._unconfirmed[self._published] = message
        _publish(channel, message)

    def _enable_confirms(self, channel: BlockingChannel, generation: int) -> None:
        """Confirm mode driven by our callbacks, not BlockingChannel's wait per publish."""
        impl = channel._impl
        impl.confirm_delivery(
            ack_nack_callback=lambda frame: self._confirmed(generation, frame.method)
        )
        impl.add_on_return_callback(
            lambda _channel, method, _props, body: self._returned(generation, method, body)
        )

    def _returned(self, generation: int, method: Basic.Return, body: bytes) -> None:
        """Unroutable (mandatory): the broker returns it, then confirms it."""
        if generation != self._generation:
            return
        for message in self._unconfirmed.values():
            if message.body == body and not message.refusal:
                message.refusal = f"returned unroutable: {method.reply_code} {method.reply_text}"
                return

    def _confirmed(self, generation: int, method: Basic.Ack | Basic.Nack) -> None:
        """Runs inside pika's I/O loop: only marks messages, then asks for a settle."""
        if generation != self._generation:
            return
        accepted = isinstance(method, Basic.Ack)
        tag = method.delivery_tag
        answered = (
            [number for number in self._unconfirmed if number <= tag] if method.multiple else [tag]
        )
        wanted = False
        for number in answered:
            message = self._unconfirmed.pop(number, None)
            if message is None:
                continue
            if not accepted:
                message.refusal = message.refusal or "nacked by the broker"
            message.state = PublishState.REFUSED if message.refusal else PublishState.CONFIRMED
            wanted = wanted or message.awaited or bool(message.refusal)
        connection = self._connection
        if wanted and not self._settle_scheduled and connection is not None:
            # Settling may ack and publish: not from inside the I/O loop, so
            # from pika's next dispatch, which also ends a process() call.
            self._settle_scheduled = True
            connection.call_later(0, self._settle)

    def _settle(self) -> None:
        self._settle_scheduled = False
        self._on_confirmed()

    # -- the event loop and the cross-thread door -----------------------------

    def process(self, time_limit: float) -> None:
        """Service the socket: heartbeats, deliveries, handed-over callbacks, timers."""
        connection = self._connection
        if connection is None or not connection.is_open:
            # Also when another thread (the rescue thread) saw it die.
            raise ConnectionLost("not connected")
        try:
            with _SERVICING:
                connection.process_data_events(time_limit=time_limit)
        except ConnectionLost:
            if connection is self._connection:
                raise
            # Long inline work ran inside this call while the rescue thread
            # replaced the connection: the old one's end is old news.
            return
        if self._consume_when_unblocked and not self.blocked:
            self.start_consuming()
        if self._topology_retry_at is not None and time.monotonic() >= self._topology_retry_at:
            self._retry_topology()
        control = self._control_channel
        if control is not None and control._pending_events:
            self._take_undispatched_commands(control)
        elif (
            self._control_retry_at is not None
            and not self.blocked
            and time.monotonic() >= self._control_retry_at
        ):
            self._start_control()

    def call_threadsafe(self, callback: Callable[[], None]) -> bool:
        """Run `callback` on the connection's thread soon; False if not connected."""
        with self._swap_lock:
            connection = self._connection
            if connection is None or not connection.is_open:
                return False
            try:
                connection.add_callback_threadsafe(callback)
            except (pika.exceptions.AMQPError, OSError, RuntimeError):
                return False
            return True

    def call_later(self, delay: float, callback: Callable[[], None]) -> object | None:
        connection = self._connection
        if connection is None:
            return None
        timer: object = connection.call_later(delay, callback)
        return timer

    def cancel_timer(self, timer: object | None) -> None:
        connection = self._connection
        if timer is not None and connection is not None:
            connection.remove_timeout(timer)

    def _require_channel(self) -> BlockingChannel:
        channel = self._channel
        if channel is None or not channel.is_open:
            raise ConnectionLost("channel is not open")
        return channel


def _watch_for_silence(connection: BlockingConnection, limit: float) -> None:
    """Drop the connection after `limit` seconds without a byte from the broker.

    The broker sends a heartbeat every half interval when idle, so two
    intervals of silence mean a stalled network. pika's own check waits up to
    twice (interval + 5 s). This one runs on pika's I/O loop timers, so it also
    fires while a blocking call (a publish waiting for its confirm) is stuck.
    """
    if limit <= 0:
        return
    impl = connection._impl
    last = {"bytes": -1, "at": time.monotonic()}

    def check() -> None:
        if not impl.is_open:
            return
        now = time.monotonic()
        if impl.bytes_received != last["bytes"]:
            last["bytes"], last["at"] = impl.bytes_received, now
        elif now - last["at"] > limit:
            # The same door pika's heartbeat checker uses to give up on a stream.
            impl._terminate_stream(
                pika.exceptions.AMQPHeartbeatTimeout(
                    f"no bytes from the broker for {now - last['at']:.1f} s "
                    "(two AMQP heartbeat intervals): connection stalled"
                )
            )
            return
        impl._adapter_call_later(limit / 4, check)

    impl._adapter_call_later(limit / 4, check)


def _close_quietly(connection: BlockingConnection, within: float | None = None) -> None:
    """Close, waiting for the broker's Close-Ok; at most `within` seconds if given."""
    impl = getattr(connection, "_impl", None)  # stand-ins in the unit tests have none
    if within is not None and impl is not None and connection.is_open:

        def give_up() -> None:
            if not impl.is_closed:
                impl._terminate_stream(
                    pika.exceptions.StreamLostError(f"no Close-Ok within {within:g} s")
                )

        impl._adapter_call_later(within, give_up)
    with contextlib.suppress(pika.exceptions.AMQPError, OSError):
        if connection.is_open:
            connection.close()


def _abandon(connection: BlockingConnection, why: str) -> None:
    """Give a connection up without the close handshake (the broker sees the socket close)."""
    if not connection.is_open:
        return
    with contextlib.suppress(Exception):  # it is already broken; only cleaning up
        # The same door pika's own heartbeat checker uses to give up on a stream.
        connection._impl._terminate_stream(pika.exceptions.StreamLostError(why))
        connection.process_data_events(time_limit=0)


class Reply(NamedTuple):
    body: bytes
    correlation_id: str | None


class RequestClient:
    """A small publisher/waiter for the `send` and `ctl` commands and tests: not the worker.

    Runs on its caller's thread only (one BlockingConnection, no I/O thread).
    """

    def __init__(
        self, url: str, topology: Topology, heartbeat: int = 30, tls: TlsFiles | None = None
    ) -> None:
        self._connection = open_connection(url, heartbeat, blocked_timeout=30.0, tls=tls)
        try:
            with _translated("opening channel"):
                self._channel = self._connection.channel()
                self._channel.confirm_delivery()
                declare(self._channel, topology)
        except ConnectionLost:
            _close_quietly(self._connection)
            raise
        self._topology = topology
        self._reply_queue: str | None = None
        self._replies: deque[Reply] = deque()

    def open_reply_queue(self) -> str:
        """An exclusive server-named queue that the worker answers to via reply_to."""
        with _translated("declaring the reply queue"):
            result = self._channel.queue_declare(queue="", exclusive=True, auto_delete=True)
            self._reply_queue = str(result.method.queue)
            self._channel.basic_consume(
                queue=self._reply_queue,
                on_message_callback=lambda _ch, _m, props, body: self._replies.append(
                    Reply(body, props.correlation_id)
                ),
                auto_ack=True,
            )
        return self._reply_queue

    def send(self, body: bytes, priority: int, correlation_id: str) -> None:
        message = Outgoing(
            routing_key=self._topology.work_queue,
            body=body,
            priority=priority,
            correlation_id=correlation_id,
            persistent=priority >= 4,
        )
        _publish(self._channel, message, reply_to=self._reply_queue)

    def broadcast(self, body: bytes, correlation_id: str, expiration_ms: int) -> None:
        """To broadcast_exchange (every worker's control queue): transient, expiring.

        Not mandatory: a fanout with no control queue bound is no error here;
        the sender learns it from the answers that do not come.
        """
        properties = BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=TRANSIENT,
            correlation_id=correlation_id,
            reply_to=self._reply_queue,
            expiration=str(expiration_ms),
        )
        with _PUBLISHING:
            self._channel.basic_publish(
                exchange=BROADCAST_EXCHANGE, routing_key="", body=body, properties=properties
            )

    def next_reply(self, timeout: float) -> Reply | None:
        """The next message on our reply queue, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with _translated("waiting for a reply"):
            while not self._replies and (left := deadline - time.monotonic()) > 0:
                self._connection.process_data_events(time_limit=left)
        return self._replies.popleft() if self._replies else None

    def close(self) -> None:
        _close_quietly(self._connection)
