"""The one door from other threads to the thread that holds the connection.

Work threads (results, progress) and the heartbeat thread never touch pika,
the outbox or the consumer's state: they post a callable here, and the holder
of the connection's baton runs it on its next turn (see service.py). Posting
wakes the holder: through pika's `add_callback_threadsafe` while connected,
through an Event while it waits between reconnect attempts.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from chiffon_worker.errors import ConnectionLost

logger = logging.getLogger(__name__)

Job = Callable[[], None]


def _nothing() -> None:
    """Handed to pika only to wake its loop; the work itself is in the mailbox."""


class Mailbox:
    def __init__(self, wake_link: Callable[[Job], bool]) -> None:
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._wake_link = wake_link
        self._woken = threading.Event()
        # Set by the first post after a drain, so a storm of posts (thousands
        # of progress reports) costs one wake-up per turn, not one per post.
        self._wake_pending = False

    # -- any thread --------------------------------------------------------------

    def post(self, job: Job) -> None:
        self._jobs.put(job)
        if self._wake_pending:
            return
        self._wake_pending = True
        if not self._wake_link(_nothing):
            self._woken.set()  # not connected: the holder waits on this instead

    # -- the baton holder ------------------------------------------------------------

    def run_posted(self) -> int:
        """Run every job posted so far; returns how many ran."""
        # Cleared before draining: a post that lands after this wakes us again.
        self._wake_pending = False
        jobs = self._jobs
        ran = 0
        # Only this thread takes from the queue, so "not empty" stays true
        # until it does; the check spares the idle turn an exception.
        while not jobs.empty():
            job = jobs.get_nowait()
            ran += 1
            try:
                job()
            except ConnectionLost:
                raise  # the loop reconnects; the jobs still queued run after that
            except Exception:  # a bug in one job must not stop the connection's owner
                logger.exception("a job handed to the connection thread failed")
        return ran

    def wait(self, timeout: float) -> None:
        """While disconnected: sleep until something is posted, or `timeout`."""
        if self._woken.wait(timeout):
            self._woken.clear()
