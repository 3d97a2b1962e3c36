"""BrokerLink's confirm bookkeeping: publishes are numbered as the broker numbers them.

No broker here: a stand-in channel records what is published, and the
confirms, returns and nacks are fed in as pika would deliver them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pika.spec import Basic

from chiffon_worker.amqp import BrokerLink, Outgoing, PublishState
from chiffon_worker.topology import chiffon_topology


class StandInChannel:
    is_open = True

    def __init__(self) -> None:
        self.published: list[bytes] = []

    def basic_publish(self, *, body: bytes, **_kwargs: Any) -> None:
        self.published.append(body)


class StandInConnection:
    is_open = True

    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []

    def call_later(self, _delay: float, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def close(self) -> None:
        self.is_open = False


class Harness:
    """A BrokerLink wired to stand-ins, as `connect()` leaves it."""

    def __init__(self) -> None:
        self.settled = 0
        self.link = BrokerLink(
            ["amqp://guest:guest@127.0.0.1/"],
            chiffon_topology(),
            prefetch=1,
            heartbeat=30,
            blocked_timeout=60,
            on_delivery=lambda _delivery: None,
            on_consumer_cancelled=lambda: None,
            on_confirmed=self._on_confirmed,
        )
        self.channel = StandInChannel()
        self.connection = StandInConnection()
        self.link._channel = self.channel  # type: ignore[assignment]
        self.link._connection = self.connection  # type: ignore[assignment]
        self.link._generation = 1

    def _on_confirmed(self) -> None:
        self.settled += 1

    def publish(self, text: str, *, awaited: bool = False) -> Outgoing:
        message = Outgoing("reply_queue", text.encode(), 3, awaited=awaited)
        self.link.publish(message)
        return message

    def ack(self, tag: int, *, multiple: bool = False, generation: int = 1) -> None:
        self.link._confirmed(generation, Basic.Ack(delivery_tag=tag, multiple=multiple))

    def nack(self, tag: int) -> None:
        self.link._confirmed(1, Basic.Nack(delivery_tag=tag))

    def returned(self, body: bytes) -> None:
        method = Basic.Return(reply_code=312, reply_text="NO_ROUTE", routing_key="gone")
        self.link._returned(1, method, body)

    def run_soon(self) -> None:
        pending, self.connection.soon = self.connection.soon, []
        for callback in pending:
            callback()


@pytest.fixture
def harness() -> Harness:
    return Harness()


def states(*messages: Outgoing) -> list[PublishState]:
    return [m.state for m in messages]


def test_a_publish_waits_until_the_broker_confirms_it(harness: Harness) -> None:
    first = harness.publish("one")
    assert harness.channel.published == [b"one"]
    assert first.state is PublishState.WAITING
    harness.ack(1)
    assert first.state is PublishState.CONFIRMED


def test_a_multiple_ack_confirms_everything_up_to_its_tag(harness: Harness) -> None:
    one, two, three = (harness.publish(text) for text in ("one", "two", "three"))
    harness.ack(2, multiple=True)
    assert states(one, two, three) == [
        PublishState.CONFIRMED,
        PublishState.CONFIRMED,
        PublishState.WAITING,
    ]


def test_a_single_ack_out_of_order_confirms_only_its_own(harness: Harness) -> None:
    one, two = harness.publish("one"), harness.publish("two")
    harness.ack(2)
    assert states(one, two) == [PublishState.WAITING, PublishState.CONFIRMED]
    harness.ack(1)
    assert one.state is PublishState.CONFIRMED


def test_a_returned_message_is_refused_even_though_its_ack_follows(harness: Harness) -> None:
    kept, lost = harness.publish("kept"), harness.publish("lost")
    harness.returned(b"lost")
    harness.ack(2, multiple=True)
    assert states(kept, lost) == [PublishState.CONFIRMED, PublishState.REFUSED]
    assert "NO_ROUTE" in lost.refusal


def test_a_nack_refuses(harness: Harness) -> None:
    message = harness.publish("one")
    harness.nack(1)
    assert message.state is PublishState.REFUSED
    assert "nacked" in message.refusal


def test_a_confirm_from_a_channel_left_behind_changes_nothing(harness: Harness) -> None:
    message = harness.publish("one")
    harness.ack(1, generation=0)
    assert message.state is PublishState.WAITING


def test_messages_unconfirmed_when_the_connection_goes_are_to_be_sent_again(
    harness: Harness,
) -> None:
    confirmed, unconfirmed = harness.publish("one"), harness.publish("two")
    harness.ack(1)
    harness.link.close()
    assert states(confirmed, unconfirmed) == [PublishState.CONFIRMED, PublishState.UNSENT]


def test_the_owner_is_told_at_once_only_when_someone_waits_or_something_failed(
    harness: Harness,
) -> None:
    harness.publish("nobody waits")
    harness.ack(1)
    harness.run_soon()
    assert harness.settled == 0

    harness.publish("late acks wait", awaited=True)
    harness.publish("in the same ack", awaited=True)
    harness.ack(3, multiple=True)
    harness.run_soon()
    assert harness.settled == 1  # one settle for one confirm, however many it covers

    harness.publish("refused")
    harness.nack(4)
    harness.run_soon()
    assert harness.settled == 2
