"""Short work runs on the connection thread; this thread covers for it when it is long.

Handing every task to a work thread costs two thread wake-ups per message,
which in CPython halves the throughput of an echo (see the README). So a task
that may run inline (see RequestConsumer) runs on the connection thread
itself, and this thread watches: once the task has run for `take_over_after`
seconds, it takes the *baton* and runs the service's turns for as long as
the task runs.

The baton is the right to call pika and to touch what the connection's owner
owns (consumer, outbox). The connection thread holds it at all times except
while it runs inline work; this thread holds it only while that work runs
long, and runs the service's turns meanwhile: AMQP and status heartbeats,
progress, the systemd watchdog, reconnecting after a cut, and the stop
sequence. Inline work runs inside pika's delivery callback, where pika
dispatches nothing more on that connection (no deliveries, timers or
handed-over callbacks: the turn drains the mailbox itself); so after the
hold grace this thread cancels the consumer, and pika returns the deliveries
it had not handed over to the queue, for an idle worker. A connection this
thread opens after a cut is a fresh one, with all of pika.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

# How often this thread looks at the connection thread (idle cost: a
# wake-up per tick), and the longest one turn waits while covering.
WATCH_SECONDS = 0.25
TICK_SECONDS = 0.1


class Rescuer(threading.Thread):
    def __init__(
        self,
        *,
        take_over_after: float,
        hold_grace: float,
        turn: Callable[[float], None],
        on_long_work: Callable[[], None],
    ) -> None:
        super().__init__(name="chiffon-rescue", daemon=True)
        self.baton = threading.Lock()
        self._take_over_after = take_over_after
        self._hold_grace = hold_grace
        self._turn = turn
        self._on_long_work = on_long_work
        self._inline_since: float | None = None
        self._stop_event = threading.Event()

    # -- the connection thread's side ------------------------------------------

    def run_inline(self, work: Callable[[], None]) -> None:
        """Run `work` on the calling (connection) thread, covered by this one."""
        self._inline_since = time.monotonic()
        self.baton.release()
        try:
            work()
        finally:
            self._inline_since = None
            # Waits at most one turn if we are covering for it right now.
            self.baton.acquire()

    def stop(self) -> None:
        self._stop_event.set()

    # -- this thread ---------------------------------------------------------------

    def run(self) -> None:
        while not self._stop_event.wait(WATCH_SECONDS):
            since = self._inline_since
            if since is not None and time.monotonic() - since >= self._take_over_after:
                self._cover(since)

    def _cover(self, since: float) -> None:
        with self.baton:
            if self._inline_since == since:
                logger.debug("long work on the connection thread: the rescue thread serves")
            past_grace = False
            while self._inline_since == since and not self._stop_event.is_set():
                try:
                    self._turn(TICK_SECONDS)
                    if not past_grace and time.monotonic() - since >= self._hold_grace:
                        past_grace = True
                        self._on_long_work()
                except Exception:  # this thread must outlive any one bad turn
                    logger.exception("rescue thread: a turn failed while covering long work")
                    self._stop_event.wait(TICK_SECONDS)
