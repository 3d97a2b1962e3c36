"""Short work runs on the connection thread; this thread covers for it when it is long.

Handing every task to a work thread costs two thread wake-ups per message,
which in CPython halves the throughput of an echo (see the README). So a task
that may run inline (see RequestConsumer) runs on the connection thread
itself, and this thread watches: once the task has run for `take_over_after`
seconds, it takes the connection over (the "baton") and services it for as
long as the task runs: AMQP heartbeats, status heartbeats, progress messages,
the systemd watchdog, and, after the hold grace, cancelling the consumer so
that a delivery waiting behind the long task goes back to the queue for an
idle worker.

Only the holder of the baton calls pika. The connection thread holds it at all
times except while it runs inline work; the rescue thread holds it only while
that work runs long. pika then dispatches nothing to us (the connection thread
is inside a delivery callback), so the rescue thread does I/O only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from chiffon_worker.errors import ChiffonError

logger = logging.getLogger(__name__)

# How often the rescue thread looks at the connection thread (idle cost: a
# wake-up per tick), and how often it services the connection while covering.
WATCH_SECONDS = 0.25
TICK_SECONDS = 0.1


class Rescuer(threading.Thread):
    def __init__(
        self,
        *,
        take_over_after: float,
        hold_grace: float,
        service: Callable[[float], None],
        stop_taking: Callable[[], None],
        on_tick: Callable[[], None],
    ) -> None:
        super().__init__(name="chiffon-rescue", daemon=True)
        self.baton = threading.Lock()
        self._take_over_after = take_over_after
        self._hold_grace = hold_grace
        self._service = service
        self._stop_taking = stop_taking
        self._on_tick = on_tick
        self._inline_since: float | None = None
        self._stop_event = threading.Event()
        self.active = False

    # -- the connection thread's side ------------------------------------------

    def run_inline(self, work: Callable[[], None]) -> None:
        """Run `work` on the calling (connection) thread, covered by this one."""
        self._inline_since = time.monotonic()
        self.baton.release()
        try:
            work()
        finally:
            self._inline_since = None
            # Waits at most one tick if we are covering for it right now.
            self.baton.acquire()

    def stop(self) -> None:
        self._stop_event.set()

    # -- this thread ---------------------------------------------------------------

    def run(self) -> None:
        while not self._stop_event.wait(WATCH_SECONDS):
            since = self._inline_since
            if since is not None and time.monotonic() - since >= self._take_over_after:
                try:
                    self._cover(since)
                except Exception:  # this thread must outlive any one bad stretch
                    logger.exception("rescue thread failed while covering long work")

    def _cover(self, since: float) -> None:
        with self.baton:
            if self._inline_since != since:
                return  # that work finished while we waited for the baton
            self.active = True
            logger.debug("long work on the connection thread: the rescue thread services it")
            try:
                self._cover_until_done(since)
            except ChiffonError as exc:
                # The connection died under the long work: the connection thread
                # finds out (and reconnects) as soon as the work returns.
                logger.warning("connection trouble during long work", extra={"reason": str(exc)})
            finally:
                self.active = False

    def _cover_until_done(self, since: float) -> None:
        cancelled = False
        while self._inline_since == since:
            self._service(TICK_SECONDS)
            self._on_tick()
            if not cancelled and time.monotonic() - since >= self._hold_grace:
                # A delivery behind this long task must go to an idle worker.
                self._stop_taking()
                cancelled = True
