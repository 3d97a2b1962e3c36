"""The running task, as user code sees it: progress, cancellation, stop.

The runtime sets a TaskContext around each call of `execute_work`, in a
contextvar, so code anywhere below it reaches its task through
`current_task()` without anything stored on the user's worker object. A
TaskContext may be passed to other threads the work starts: its methods are
thread-safe.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from chiffon_worker.protocol import WorkRequest, WorkStatus

if TYPE_CHECKING:
    from chiffon_worker.process import ProcessResult


class Cancellable(Protocol):
    """The runtime's record of a task (tasks.Task), as far as the context reads it."""

    @property
    def cancel_reason(self) -> str | None: ...
    @property
    def timed_out(self) -> bool: ...
    def wait_cancelled(self, timeout: float) -> bool: ...


RecordT = TypeVar("RecordT", bound=Cancellable)


class TaskContext:
    """What `execute_work` may ask of the runtime about the task it runs."""

    __slots__ = (
        "_post_progress",
        "_record",
        "_steps",
        "_stop",
        "children_cpu_time_ms",
        "children_memory_peak_mb",
        "children_tree_rss_peak_mb",
        "kill_grace",
        "request",
    )

    def __init__(
        self,
        request: WorkRequest,
        record: RecordT,
        stop: threading.Event,
        post_progress: Callable[[RecordT, WorkStatus], None],
        kill_grace: float = 10.0,
    ) -> None:
        self.request = request
        self._record = record
        self._stop = stop
        self._post_progress: Callable[[Any, WorkStatus], None] = post_progress
        self._steps = itertools.count(1)  # next() is atomic: safe from several threads
        # Seconds between SIGTERM and SIGKILL when run_process ends a child early.
        self.kill_grace = kill_grace
        # What the task's child processes used (run_process adds each one's).
        self.children_cpu_time_ms = 0
        self.children_memory_peak_mb = 0.0
        self.children_tree_rss_peak_mb = 0.0

    def report_progress(self, percent: float, step_name: str, output: str = "") -> None:
        """Send a WorkStatus for this task (queued; never blocks on the broker)."""
        status = WorkStatus.model_validate(
            {
                "task_id": self.request.task_id,
                "status": "step_completed" if _clamped(percent) >= 100 else "running",
                "progress_percent": _clamped(percent),
                "step": {"number": next(self._steps), "name": str(step_name), "output": output},
            }
        )
        self._post_progress(self._record, status)

    @property
    def cancelled(self) -> bool:
        """True once the task must end early: cancelled, out of time, or shutdown gave up."""
        return self._record.cancel_reason is not None

    @property
    def cancel_reason(self) -> str | None:
        return self._record.cancel_reason

    @property
    def timed_out(self) -> bool:
        """True once the task was ended by its time limit (max_duration_seconds)."""
        return self._record.timed_out

    def add_child_usage(
        self, cpu_time_ms: int, memory_peak_mb: float, tree_rss_peak_mb: float = 0.0
    ) -> None:
        """Count a child process's CPU time and peak memory into the task's resources."""
        with _CHILD_USAGE_LOCK:
            self.children_cpu_time_ms += cpu_time_ms
            self.children_memory_peak_mb = max(self.children_memory_peak_mb, memory_peak_mb)
            self.children_tree_rss_peak_mb = max(self.children_tree_rss_peak_mb, tree_rss_peak_mb)

    def children_usage(self) -> dict[str, int | float]:
        """What every child process of the task used together ({} when none ran)."""
        if not (self.children_cpu_time_ms or self.children_memory_peak_mb):
            return {}
        return {
            "children_cpu_time_ms": self.children_cpu_time_ms,
            "children_memory_peak_mb": self.children_memory_peak_mb,
            "children_tree_rss_peak_mb": self.children_tree_rss_peak_mb,
        }

    def run_process(self, argv: Sequence[str], **options: Any) -> ProcessResult:
        """`chiffon_worker.process.run_process` for this task, from any thread; see there."""
        from chiffon_worker.process import run_process  # loaded only by work that needs it

        return run_process(argv, task=self, **options)

    def sleep(self, seconds: float) -> bool:
        """Wait `seconds`, or less if the task is cancelled; True when it was cancelled."""
        return self._record.wait_cancelled(seconds)

    @property
    def stopping(self) -> bool:
        """True once the worker was asked to stop: long work may wrap up."""
        return self._stop.is_set()


# One lock for all tasks: adding a child's usage is rare, making a lock per task is not.
_CHILD_USAGE_LOCK = threading.Lock()


def _clamped(percent: float) -> float:
    value = float(percent)
    if math.isnan(value):
        return 0.0
    return max(0.0, min(100.0, value))


_current: ContextVar[TaskContext | None] = ContextVar("chiffon_task", default=None)


def current_task() -> TaskContext | None:
    """The task the calling code runs inside, or None outside `execute_work`."""
    return _current.get()


def enter_task(context: TaskContext) -> object:
    """Runtime only: make `context` current; returns the token for `leave_task`."""
    return _current.set(context)


def leave_task(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]


# The stop flag of the service serving each worker object, by id(): read by
# WorkerBase.stopping outside a task (a thread of the user's own, say)
# without the runtime keeping anything on the user's object.
_stop_flags: dict[int, threading.Event] = {}


def register_stop_flag(worker: object, stop: threading.Event) -> None:
    _stop_flags[id(worker)] = stop


def forget_stop_flag(worker: object) -> None:
    _stop_flags.pop(id(worker), None)


def stop_requested(worker: object) -> bool:
    context = _current.get()
    if context is not None:
        return context.stopping
    stop = _stop_flags.get(id(worker))
    return stop is not None and stop.is_set()
