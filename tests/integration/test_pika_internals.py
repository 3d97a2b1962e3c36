"""pika's private internals that chiffon_worker/amqp.py relies on, checked on a real connection.

setup.cfg bounds pika from above because of them; this test is what tells
whoever raises that bound which one an upgrade took away, in one line.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pytest
from pika.spec import Basic

from chiffon_worker.amqp import open_connection
from tests.helpers.broker import Vhost

pytestmark = pytest.mark.integration

WAIT_S = 10.0
HEARTBEAT_S = 17  # below the broker's default, so the connection's value is ours


def removed(name: str) -> str:
    return f"pika upgrade removed {name}; chiffon_worker/amqp.py depends on it"


def internal(owner: object, name: str, shown: str) -> Any:
    assert hasattr(owner, name), removed(shown)
    return getattr(owner, name)


def takes(function: Callable[..., Any], shown: str, *parameters: str) -> None:
    """`function` accepts these parameters by name, as amqp.py passes them."""
    assert callable(function), removed(shown)
    names = inspect.signature(function).parameters
    for parameter in parameters:
        assert parameter in names, removed(f"{shown}({parameter}=...)")


def serve_until(connection: pika.BlockingConnection, done: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT_S
    while not done() and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.1)
    return done()


def test_pika_internals_used_by_amqp_are_still_there(vhost: Vhost) -> None:
    connection = open_connection(vhost.url(), heartbeat=HEARTBEAT_S, blocked_timeout=30.0)
    try:
        impl = internal(connection, "_impl", "BlockingConnection._impl")

        # The silence watch sizes itself from the negotiated heartbeat.
        params = internal(impl, "params", "Connection.params")
        heartbeat = internal(params, "heartbeat", "Connection.params.heartbeat")
        assert heartbeat == HEARTBEAT_S, removed("Connection.params.heartbeat (negotiated value)")

        # ... and watches the byte counter grow.
        received = internal(impl, "bytes_received", "Connection.bytes_received")
        assert isinstance(received, int), removed("Connection.bytes_received (an int)")
        assert received > 0, removed("Connection.bytes_received (counts what was read)")

        # ... on timers of pika's own I/O loop.
        call_later = internal(impl, "_adapter_call_later", "Connection._adapter_call_later")
        takes(call_later, "Connection._adapter_call_later", "delay", "callback")
        fired: list[bool] = []
        call_later(0, lambda: fired.append(True))
        assert serve_until(connection, lambda: bool(fired)), removed(
            "Connection._adapter_call_later (a timer run by process_data_events)"
        )

        # Confirms and returns arrive through callbacks on the channel's impl.
        channel = connection.channel()
        channel_impl = internal(channel, "_impl", "BlockingChannel._impl")
        confirm = internal(channel_impl, "confirm_delivery", "Channel.confirm_delivery")
        takes(confirm, "Channel.confirm_delivery", "ack_nack_callback")
        on_return = internal(
            channel_impl, "add_on_return_callback", "Channel.add_on_return_callback"
        )
        takes(on_return, "Channel.add_on_return_callback", "callback")

        confirms: list[object] = []
        returns: list[tuple[object, bytes]] = []
        confirm(ack_nack_callback=lambda frame: confirms.append(frame.method))
        on_return(lambda _channel, method, _props, body: returns.append((method, body)))
        queue = channel.queue_declare(queue="", exclusive=True).method.queue
        # The channel's next RPC answers after Select-Ok: confirm mode is on now.
        channel.basic_qos(prefetch_count=1)
        channel.basic_publish(exchange="", routing_key=queue, body=b"kept", mandatory=True)
        assert serve_until(connection, lambda: len(confirms) == 1), removed(
            "Channel.confirm_delivery(ack_nack_callback=...) (called per confirm)"
        )
        assert isinstance(confirms[0], Basic.Ack), removed(
            "Channel.confirm_delivery(ack_nack_callback=...) (given the frame of a Basic.Ack)"
        )

        nowhere = f"nowhere-{uuid.uuid4().hex}"
        channel.basic_publish(exchange="", routing_key=nowhere, body=b"lost", mandatory=True)
        assert serve_until(connection, lambda: bool(returns) and len(confirms) == 2), removed(
            "Channel.add_on_return_callback (called with channel, method, properties, body)"
        )
        [(method, body)] = returns
        assert isinstance(method, Basic.Return), removed(
            "Channel.add_on_return_callback (given the Basic.Return method)"
        )
        assert body == b"lost"

        # While a callback runs, pika dispatches nothing more: a delivery on
        # another channel waits in that BlockingChannel's _pending_events,
        # where the rescue thread takes control commands from.
        inbox = connection.channel()
        commands = inbox.queue_declare(queue="", exclusive=True).method.queue
        inbox.basic_consume(commands, lambda *_args: None, auto_ack=True)
        waiting: list[Any] = []

        def inside_a_callback(*_args: object) -> None:
            channel.basic_publish(exchange="", routing_key=commands, body=b"command")
            deadline = time.monotonic() + 5
            while not getattr(inbox, "_pending_events", None) and time.monotonic() < deadline:
                connection.process_data_events(time_limit=0.05)
            waiting.extend(getattr(inbox, "_pending_events", ()))

        channel.basic_consume(queue, inside_a_callback, auto_ack=True)  # "kept" is there
        assert serve_until(connection, lambda: bool(waiting)), removed(
            "BlockingChannel._pending_events (deliveries read while a callback runs)"
        )
        event = waiting[0]
        assert isinstance(getattr(event, "method", None), Basic.Deliver), removed(
            "BlockingChannel._pending_events items with .method (a Basic.Deliver)"
        )
        assert event.body == b"command"
        assert hasattr(event, "properties"), removed("_ConsumerDeliveryEvt.properties")
        # Once the callback has returned, pika dispatches what waited.
        assert serve_until(connection, lambda: not inbox._pending_events)

        # Dropping a dead connection uses the door pika's heartbeat checker uses.
        terminate = internal(impl, "_terminate_stream", "Connection._terminate_stream")
        takes(terminate, "Connection._terminate_stream", "error")
        terminate(pika.exceptions.StreamLostError("abandoned by the pika internals test"))
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.process_data_events(time_limit=0)
        assert not connection.is_open, removed(
            "Connection._terminate_stream (ends the connection at once)"
        )
    finally:
        if connection.is_open:
            connection.close()
