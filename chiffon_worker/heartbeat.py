"""Heartbeats: the thread that keeps time, and the StatusUpdate it sends.

The heartbeat thread never touches the broker: `send` hands the encoded
message to the holder of the connection (which drops it when there is no
connection: the next one supersedes it).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Generic, TypeVar

from chiffon_worker.amqp import Outgoing
from chiffon_worker.metrics import HostMetrics
from chiffon_worker.protocol import HEARTBEAT_PRIORITY, StatusUpdate, encode_message

logger = logging.getLogger(__name__)

MessageT = TypeVar("MessageT")


class HeartbeatThread(threading.Thread, Generic[MessageT]):
    def __init__(
        self,
        interval: float,
        build: Callable[[], MessageT],
        send: Callable[[MessageT], None],
    ) -> None:
        super().__init__(name="chiffon-heartbeat", daemon=True)
        self._interval = interval
        self._build = build
        self._send = send
        self._stop_event = threading.Event()

    def run(self) -> None:
        # The connection's holder sends one at once on every (re)connect, so
        # the first beat here waits one interval.
        # Ticks follow a fixed schedule, so a slow beat does not push the next one back.
        next_at = time.monotonic() + self._interval
        while not self._stop_event.wait(max(0.0, next_at - time.monotonic())):
            self.beat()
            next_at = max(next_at + self._interval, time.monotonic())

    def beat(self) -> None:
        try:
            self._send(self._build())
        except Exception:  # a metrics failure must not kill the heartbeat thread
            logger.exception("could not build a heartbeat")

    def stop(self) -> None:
        self._stop_event.set()


class StatusBuilder:
    """Builds this worker's StatusUpdate messages; safe from any thread."""

    def __init__(
        self,
        agent_id: uuid.UUID,
        agent_type: str,
        reply_queue: str,
        running: Callable[[], list[str]],
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        self._agent_id = agent_id
        self._agent_type = agent_type
        self._reply_queue = reply_queue
        self._running = running
        self._paused = paused
        self._metrics: HostMetrics | None = None

    def start(self) -> None:
        """Made when serving starts: the GPU library is loaded then, not at import."""
        self._metrics = HostMetrics()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()

    def update(self, status: str | None = None) -> StatusUpdate:
        """This worker's StatusUpdate now (`status` overrides online/busy)."""
        running = self._running()
        resources = self._metrics.sample() if self._metrics is not None else {}
        return StatusUpdate.model_validate(
            {
                "agent_id": self._agent_id,
                "agent_type": self._agent_type,
                "status": status or ("busy" if running else "online"),
                "current_task_id": running[0] if running else None,
                "resources": resources,
            }
        )

    def build(self, status: str | None = None) -> Outgoing:
        """A heartbeat message; a paused worker says so in x_custom_fields."""
        update = self.update(status)
        # A heartbeat answers no request: it starts its own trace.
        beat_id = uuid.uuid4()
        body = encode_message(
            update,
            from_agent=self._agent_type,
            to_agent="orchestrator",
            trace_id=beat_id,
            request_id=beat_id,
            priority=HEARTBEAT_PRIORITY,
            x_custom_fields={"x_paused": self._paused()},
        ).body
        return Outgoing(routing_key=self._reply_queue, body=body, priority=HEARTBEAT_PRIORITY)
