"""Three private RabbitMQ nodes on this machine, joined as one cluster.

Each node is a PrivateNode (own name, ports, data and logs under one
temporary directory, loopback only); the three share a home directory and so
one Erlang cookie, which is what lets them cluster. Node 1 is the seed; nodes
2 and 3 join it. Never the machine's own broker: tests may stop and start
these nodes' apps at will.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import quote

from tests.helpers.private_node import PrivateNode
from tests.helpers.tls_node import NodeUnavailable

SIZE = 3
JOIN_TIMEOUT = 120.0


class Cluster:
    """Nodes are numbered 1..3 as the issue and the tests speak of them."""

    def __init__(self, base: Path, size: int = SIZE) -> None:
        self.base = base
        home = base / "home"
        home.mkdir(parents=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        tag = secrets.token_hex(4)
        self.nodes = []
        for number in range(1, size + 1):
            directory = base / f"node{number}"
            directory.mkdir()
            prefix = f"chiffon-cluster{number}-{tag}-"
            self.nodes.append(PrivateNode(directory, prefix=prefix, home=home))

    def node(self, number: int) -> PrivateNode:
        return self.nodes[number - 1]

    def number_of(self, address: str) -> int:
        """Which node listens at host:port (as the worker's log names it)."""
        for number, node in enumerate(self.nodes, start=1):
            if node.address == address:
                return number
        raise AssertionError(f"no cluster node listens at {address}")

    def url(self, number: int, vhost: str = "/") -> str:
        return self.node(number).url().rsplit("/", 1)[0] + "/" + quote(vhost, safe="")

    def urls(self, vhost: str = "/") -> list[str]:
        """Every node's URL, node 1 first (CHIFFON_AMQP_URL is these joined by commas)."""
        return [self.url(number, vhost) for number in range(1, len(self.nodes) + 1)]

    def add_vhost(self) -> str:
        """A fresh vhost (cluster-wide) that guest may use: one per test."""
        name = f"chiffon-cluster-{secrets.token_hex(4)}"
        self.nodes[0].rabbitmqctl("add_vhost", name)
        self.nodes[0].rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return name

    def delete_vhost(self, name: str) -> None:
        for node in self.nodes:
            with contextlib.suppress(AssertionError, OSError):
                node.rabbitmqctl("delete_vhost", name)
                return

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Boot the nodes side by side, then join 2.. to node 1."""
        failures: list[BaseException] = []

        def boot(node: PrivateNode) -> None:
            try:
                node.start()
            except BaseException as exc:  # re-raised below, on the caller's thread
                failures.append(exc)

        threads = [threading.Thread(target=boot, args=(node,)) for node in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        seed = self.nodes[0].node
        for node in self.nodes[1:]:
            node.rabbitmqctl("stop_app")
            node.rabbitmqctl("join_cluster", seed)
            node.rabbitmqctl("start_app")
        self.nodes[0].rabbitmqctl(
            "await_online_nodes", str(len(self.nodes)), "--timeout", str(int(JOIN_TIMEOUT))
        )

    def stop(self) -> None:
        """Stop every node (a half-started cluster included); never raises."""
        for node in reversed(self.nodes):
            with contextlib.suppress(Exception):
                node.stop()

    # -- what tests do to it ---------------------------------------------------

    def stop_app(self, number: int) -> float:
        """`rabbitmqctl -n NODE stop_app`; returns when it was asked (monotonic)."""
        asked = time.monotonic()
        self.node(number).rabbitmqctl("stop_app")
        return asked

    def start_app(self, number: int) -> None:
        self.node(number).rabbitmqctl("start_app")
        self.node(number).rabbitmqctl("await_startup")

    def start_stopped(self) -> None:
        """Every node's app running again (after a test that stopped one)."""
        running = self.running()
        for number in range(1, len(self.nodes) + 1):
            if number not in running:
                self.start_app(number)

    def running(self) -> list[int]:
        """The nodes whose RabbitMQ app runs, as one of the running ones sees it."""
        for node in self.nodes:
            with contextlib.suppress(AssertionError, OSError):
                out = node.rabbitmqctl("eval", "rabbit_nodes:all_running().")
                return [n for n, each in enumerate(self.nodes, 1) if each.node in out]
        return []

    def quorum_leader(self, queue: str, vhost: str = "/") -> int:
        """The node that leads a quorum queue now."""
        return self._number_of_node(self._queue_info(queue, vhost, "leader"))

    def queue_home(self, queue: str, vhost: str = "/") -> int:
        """The node a classic queue lives on (its pid is <node.N.M>)."""
        pid = self._queue_info(queue, vhost, "pid")
        return self._number_of_node(pid.strip("<>").split(".")[0])

    def _queue_info(self, queue: str, vhost: str, column: str) -> str:
        """One column of `list_queues` for `queue`, as the first node that answers has it."""
        for node in self.nodes:
            with contextlib.suppress(AssertionError, OSError):
                out = node.rabbitmqctl(
                    "list_queues", "-p", vhost, "name", column, "--quiet", "--no-table-headers"
                )
                for line in out.splitlines():
                    name, _, value = line.partition("\t")
                    if name == queue:
                        return value.strip()
        raise AssertionError(f"no node knows the {column} of {queue}")

    def _number_of_node(self, text: str) -> int:
        for number, node in enumerate(self.nodes, start=1):
            if node.node in text:
                return number
        raise AssertionError(f"{text!r} names no node of this cluster")


def start_cluster(base: Path) -> Cluster:
    """A started cluster; a failed start stops what did come up, and says why."""
    cluster = Cluster(base)
    try:
        cluster.start()
    except (NodeUnavailable, AssertionError):
        cluster.stop()
        raise
    return cluster
