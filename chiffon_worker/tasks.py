"""Work threads: run tasks off the connection thread, hand each result back once.

A finished task reaches the connection thread by exactly one of two doors:
either that thread is still waiting briefly for it (short work: no handoff at
all, so an echo costs no more than bare pika), or the work thread hands it
over with one callback. The lock makes sure it is one door, never both.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from chiffon_worker.amqp import Delivery
from chiffon_worker.log import LogContext
from chiffon_worker.protocol import Envelope, WorkRequest, WorkResult, WorkStatus

logger = logging.getLogger(__name__)


class _Handoff:
    """Which door a work thread's result takes; only tasks on a work thread need one."""

    __slots__ = ("caller_waiting", "done", "finished", "lock")

    def __init__(self) -> None:
        # A lock held until the work is done: ten times cheaper to make than an Event.
        self.done = threading.Lock()
        self.done.acquire()
        self.lock = threading.Lock()
        self.caller_waiting = True
        self.finished = False


@dataclass(slots=True, eq=False)
class Task:
    delivery: Delivery
    envelope: Envelope
    request: WorkRequest
    started: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    result: WorkResult | None = None
    # Duplicates (same request_id) that arrived while this task ran.
    duplicates: list[tuple[Delivery, Envelope]] = field(default_factory=list)
    abandoned: bool = False
    # Set when the task must end early (time limit, shutdown timeout, cancel):
    # the work sees it through its TaskContext.
    cancel_reason: str | None = None
    # Progress reports the work made, waiting for the connection's holder:
    # appended by the thread running the work, drained only by the holder.
    progress: deque[WorkStatus] | None = None
    _cancelled: threading.Event | None = field(default=None, init=False)
    request_id: str = field(init=False)
    log_ids: dict[str, object] = field(init=False)
    _handoff: _Handoff | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # Made once: it keys the cache and the running tasks.
        self.request_id = str(self.envelope.request_id)
        self.log_ids = {
            "trace_id": self.envelope.trace_id,
            "request_id": self.request_id,
            "task_id": self.request.task_id,
        }

    def mark_cancelled(self, reason: str) -> None:
        """The connection's holder: the task must end early (its work may be waiting)."""
        self.cancel_reason = reason
        event = self._cancelled
        if event is not None:
            event.set()

    @property
    def timed_out(self) -> bool:
        """Ended early by its time limit (the consumer marks it when the deadline passes)."""
        return (
            self.cancel_reason is not None
            and self.deadline is not None
            and time.monotonic() >= self.deadline
        )

    def wait_cancelled(self, timeout: float) -> bool:
        """The work's thread: wait up to `timeout`; True (early) once the task is cancelled."""
        event = self._cancelled
        if event is None:
            with _EVENT_MADE:
                event = self._cancelled
                if event is None:
                    event = self._cancelled = threading.Event()
        # Checked after the Event exists: a cancel before it was made is seen here.
        if self.cancel_reason is not None:
            return True
        return event.wait(timeout)

    def expect_handoff(self) -> None:
        """Before a work thread takes it: from now on its result may come by either door."""
        self._handoff = _Handoff()

    def log_context(self) -> LogContext:
        return LogContext(self.log_ids)

    def finish(self, result: WorkResult) -> bool:
        """Called by whoever ran the work; True if it must hand the task over itself."""
        self.result = result
        handoff = self._handoff
        if handoff is None:
            return False  # run inline: the caller is right here
        with handoff.lock:
            handoff.finished = True
            hand_over = not handoff.caller_waiting
        handoff.done.release()
        return hand_over

    def wait_briefly(self, seconds: float) -> bool:
        """Called by the connection thread; True if it now owns the finished task."""
        handoff = self._handoff
        assert handoff is not None, "only for a task given to WorkThreads"
        if handoff.done.acquire(timeout=seconds):
            handoff.done.release()  # keep it open for anyone else who looks
        with handoff.lock:
            if handoff.finished:
                return True
            handoff.caller_waiting = False
            return False


Runner = Callable[[Task], WorkResult]

# Guards the making of a task's cancel Event (rare: only work that waits on it).
_EVENT_MADE = threading.Lock()


class WorkThreads:
    """A fixed set of daemon threads taking tasks from one queue.

    Daemon threads, because a work function that never returns must not keep
    the process alive after shutdown gave up on it.
    """

    def __init__(
        self,
        count: int,
        run: Runner,
        hand_over: Callable[[Task], None],
        after: Callable[[Task], None] | None = None,
    ) -> None:
        self._run = run
        self._hand_over = hand_over
        self._after = after
        self._queue: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._numbers = itertools.count(1)
        # Started with the first task: a worker whose work all runs inline
        # never needs them.
        self._count = count

    @property
    def size(self) -> int:
        with self._threads_lock:
            return len(self._threads)

    def add_thread(self) -> None:
        """Start one more thread: the replacement of one held by work answered early.

        The pool shrinks back when that work returns (see _retire).
        """
        name = f"chiffon-work-{next(self._numbers)}"
        thread = threading.Thread(target=self._loop, name=name, daemon=True)
        with self._threads_lock:
            self._threads.append(thread)
        thread.start()

    def submit(self, task: Task) -> None:
        while self.size < self._count:
            self.add_thread()
        task.expect_handoff()
        self._queue.put(task)

    def stop(self) -> None:
        for _ in range(self.size):
            self._queue.put(None)

    def _loop(self) -> None:
        while (task := self._queue.get()) is not None:
            # Every record of this task, the user's included, carries its ids.
            with task.log_context():
                self._work_on(task)
            if task.abandoned and self._retire():
                return

    def _retire(self) -> bool:
        """After work answered early returns: end this thread if a replacement took its place."""
        with self._threads_lock:
            if len(self._threads) <= self._count:
                return False
            self._threads.remove(threading.current_thread())
            return True

    def _work_on(self, task: Task) -> None:
        if task.finish(self._run(task)):
            self._hand_over(task)
        if self._after is not None:
            # Let the connection thread take the GIL first: the "after" work
            # (logging) then runs while it waits on the broker's confirm,
            # instead of keeping it from publishing.
            time.sleep(0)
            self._after(task)
