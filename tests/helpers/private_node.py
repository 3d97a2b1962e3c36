"""A private RabbitMQ node with a plain AMQP listener, for tests that change the node.

Alarms, watermarks and the like are node-wide: set on the machine's broker
they would block every other test's connections. This node is set up exactly
like the TLS tests' node (tls_node.py: its own name, cookie, ports, data and
logs on 127.0.0.1), with a plain TCP listener instead of the TLS one.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.tls_node import HOST, TlsNode


class PrivateNode(TlsNode):
    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.node = self.node.replace("chiffon-tls-", "chiffon-private-", 1)
        self._pid_file = base / "mnesia" / f"{self.node}.pid"

    def url(self, host: str = HOST, password: str = "guest") -> str:
        return f"amqp://guest:{password}@{host}:{self.port}/%2F"

    def _listeners(self) -> str:
        # guest may log in from the loopback only, which is where we are.
        return f"listeners.tcp.default = {HOST}:{self.port}\n"

    def set_memory_alarm(self) -> None:
        """A watermark far below what the node uses: every publishing connection is blocked."""
        self.rabbitmqctl("set_vm_memory_high_watermark", "0.0001")

    def clear_memory_alarm(self) -> None:
        self.rabbitmqctl("set_vm_memory_high_watermark", "0.4")
