"""A private RabbitMQ node with a plain AMQP listener, for tests that change the node.

Alarms, watermarks and the like are node-wide: set on the machine's broker
they would block every other test's connections. This node is set up exactly
like the TLS tests' node (tls_node.py: its own name, cookie, ports, data and
logs on 127.0.0.1), with a plain TCP listener instead of the TLS one.

Nodes meant to join one cluster (cluster.py) share a home directory, so
they read one Erlang cookie: that is what lets them talk to each other.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.tls_node import HOST, TlsNode


class PrivateNode(TlsNode):
    def __init__(
        self, base: Path, *, prefix: str = "chiffon-private-", home: Path | None = None
    ) -> None:
        super().__init__(base)
        self.node = self.node.replace("chiffon-tls-", prefix, 1)
        self._pid_file = base / "mnesia" / f"{self.node}.pid"
        # Where the Erlang cookie is read from; the node's own when not shared.
        self._home = home

    def url(self, host: str = HOST, password: str = "guest") -> str:
        return f"amqp://guest:{password}@{host}:{self.port}/%2F"

    @property
    def address(self) -> str:
        """host:port, as the worker's 'connected to broker' line names a node."""
        return f"{HOST}:{self.port}"

    def _listeners(self) -> str:
        # guest may log in from the loopback only, which is where we are.
        return f"listeners.tcp.default = {HOST}:{self.port}\n"

    def _env(self) -> dict[str, str]:
        env = super()._env()
        if self._home is not None:
            env["HOME"] = str(self._home)
        return env

    def set_memory_alarm(self) -> None:
        """A watermark far below what the node uses: every publishing connection is blocked."""
        self.rabbitmqctl("set_vm_memory_high_watermark", "0.0001")

    def clear_memory_alarm(self) -> None:
        self.rabbitmqctl("set_vm_memory_high_watermark", "0.4")
