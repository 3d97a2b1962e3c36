"""The heartbeat thread: every interval, build a StatusUpdate and hand it over.

It never touches the broker: `send` hands the encoded message to the
connection thread (and says False when there is no connection, in which case
this beat is dropped: the next one supersedes it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

MessageT = TypeVar("MessageT")


class HeartbeatThread(threading.Thread, Generic[MessageT]):
    def __init__(
        self,
        interval: float,
        build: Callable[[], MessageT],
        send: Callable[[MessageT], bool],
    ) -> None:
        super().__init__(name="chiffon-heartbeat", daemon=True)
        self._interval = interval
        self._build = build
        self._send = send
        self._stop_event = threading.Event()

    def run(self) -> None:
        # The connection thread sends one at once on every (re)connect, so the
        # first beat here waits one interval.
        # Ticks follow a fixed schedule, so a slow beat does not push the next one back.
        next_at = time.monotonic() + self._interval
        while not self._stop_event.wait(max(0.0, next_at - time.monotonic())):
            self.beat()
            next_at = max(next_at + self._interval, time.monotonic())

    def beat(self) -> None:
        try:
            message = self._build()
        except Exception:  # a metrics failure must not kill the heartbeat thread
            logger.exception("could not build a heartbeat")
            return
        if not self._send(message):
            logger.debug("heartbeat dropped: not connected")

    def stop(self) -> None:
        self._stop_event.set()
