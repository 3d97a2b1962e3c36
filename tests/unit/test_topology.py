"""Topology ownership and node order: what the broker's refusals mean, and where a worker goes."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from chiffon_worker.amqp import node_address, node_order, refusal_error
from chiffon_worker.errors import ConnectionLost, TopologyMismatch, TopologyUnavailable
from chiffon_worker.topology import Refusal, chiffon_topology, read_refusal

QUORUM_MISMATCH = (
    "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'work_queue' in vhost "
    "'/': received none but current is the value 'quorum' of type 'longstr'"
)
URLS = [f"amqp://guest:guest@node{n}:5672/%2F" for n in (1, 2, 3)]


def test_an_operators_quorum_queue_reads_as_a_mismatch_naming_queue_argument_and_both_values() -> (
    None
):
    assert read_refusal(QUORUM_MISMATCH) == Refusal(
        "mismatch",
        "queue",
        "work_queue",
        argument="x-queue-type",
        ours="(not set)",
        theirs="'quorum'",
    )


def test_a_priority_we_declare_and_the_broker_lacks_reads_the_other_way_round() -> None:
    text = (
        "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'work_queue' in "
        "vhost 'prod': received the value '5' of type 'signedint' but current is none"
    )
    refusal = read_refusal(text)
    assert refusal is not None
    assert (refusal.argument, refusal.ours, refusal.theirs) == (
        "x-max-priority",
        "'5'",
        "(not set)",
    )


def test_a_missing_queue_and_a_queue_whose_node_is_down_are_told_apart() -> None:
    missing = read_refusal("NOT_FOUND - no queue 'work_queue' in vhost '/'")
    down = read_refusal(
        "NOT_FOUND - home node 'rabbit@b' of durable queue 'work_queue' in vhost '/' "
        "is down or inaccessible"
    )
    assert missing == Refusal("missing", "queue", "work_queue")
    assert down == Refusal("node down", "queue", "work_queue", node="rabbit@b")


def test_a_missing_exchange_is_named() -> None:
    found = read_refusal("NOT_FOUND - no exchange 'broadcast_exchange' in vhost '/'")
    assert found == Refusal("missing", "exchange", "broadcast_exchange")


def test_a_mismatch_is_fatal_and_its_message_says_what_to_do() -> None:
    error = refusal_error(QUORUM_MISMATCH)
    assert isinstance(error, TopologyMismatch)
    assert error.exit_code == 78
    assert error.fields["queue"] == "work_queue"
    assert error.fields["argument"] == "x-queue-type"
    assert error.fields["broker_has"] == "'quorum'"
    assert "CHIFFON_DECLARE_TOPOLOGY=false" in str(error)


def test_a_missing_queue_is_unavailable_not_fatal_and_says_who_declares_it() -> None:
    error = refusal_error("NOT_FOUND - no queue 'reply_queue' in vhost '/'")
    assert isinstance(error, TopologyUnavailable)
    assert error.fields["queue"] == "reply_queue"
    assert "CHIFFON_DECLARE_TOPOLOGY" in error.fields["what_to_do"]


def test_a_refusal_that_is_not_about_the_topology_stays_a_lost_connection() -> None:
    assert isinstance(refusal_error("ACCESS_REFUSED - access to queue denied"), ConnectionLost)


def test_in_check_mode_the_control_queue_is_still_ours_and_the_shared_part_is_apart() -> None:
    topology = chiffon_topology(control_queue="chiffon.control.x", declare_shared=False)
    control = topology.control()
    assert control is not None
    assert control[0].name == "chiffon.control.x"
    assert control[1].exchange == "broadcast_exchange"
    assert "chiffon.control.x" not in {q.name for q in topology.shared_queues()}
    assert topology.used_queues() == ("work_queue", "reply_queue")
    assert not topology.declare_shared


def test_one_worker_keeps_its_node_order_across_restarts() -> None:
    agent = str(uuid.uuid4())
    assert node_order(URLS, agent) == node_order(URLS, agent)
    assert sorted(node_order(URLS, agent)) == sorted(URLS)


def test_a_fleet_with_one_url_list_spreads_evenly_over_the_nodes() -> None:
    firsts = Counter(node_order(URLS, str(uuid.uuid4()))[0] for _ in range(3000))
    assert set(firsts) == set(URLS)
    for count in firsts.values():  # 1000 each expected; 850 is > 7 standard deviations off
        assert count > 850, firsts


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("amqp://guest:secret@10.0.0.2:5673/%2F", "10.0.0.2:5673"),
        ("amqps://rabbit.example/", "rabbit.example:5671"),
        ("amqp://broker/", "broker:5672"),
    ],
)
def test_a_node_is_named_by_host_and_port_never_by_its_password(url: str, address: str) -> None:
    assert node_address(url) == address
