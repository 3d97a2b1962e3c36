"""Running the user's `execute_work` for one task: guarded, in its context, stamped.

Called by whichever thread runs the task (the connection thread for inline
work, a work thread otherwise); touches nothing but the task and the worker.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from chiffon_worker.context import TaskContext, enter_task, leave_task
from chiffon_worker.metrics import peak_memory_mb
from chiffon_worker.protocol import WorkResult, WorkStatus
from chiffon_worker.tasks import Task
from chiffon_worker.worker import WorkerBase

logger = logging.getLogger(__name__)

ProgressSink = Callable[[Task, WorkStatus], None]


class TaskRunner:
    def __init__(
        self,
        worker: WorkerBase,
        work_types: frozenset[str],
        agent_id: uuid.UUID,
        stop: threading.Event,
        progress: ProgressSink,
        kill_grace: float = 10.0,
    ) -> None:
        self._kill_grace = kill_grace
        self._worker = worker
        self._work_types = work_types
        self._agent_id = agent_id
        self._stop = stop
        self._progress = progress

    def __call__(self, task: Task) -> WorkResult:
        """Run the work and stamp the result; the caller has set the task's log context."""
        envelope = task.envelope
        started = time.monotonic()
        cpu_started = time.thread_time()
        context = TaskContext(
            request=task.request,
            record=task,
            stop=self._stop,
            post_progress=self._progress,
            kill_grace=self._kill_grace,
        )
        result = self._execute_guarded(task, context)
        elapsed = time.monotonic() - started
        # A thread cannot use more CPU than the time that passed: under a
        # millisecond the answer is 0 without a second (costly, in a VM)
        # read of the thread's CPU clock.
        cpu_used = time.thread_time() - cpu_started if elapsed >= 0.001 else 0.0
        resources: dict[str, object] = {
            # Child processes (run_process) count into the task's CPU time.
            "cpu_time_ms": int(cpu_used * 1000) + context.children_cpu_time_ms,
            "memory_peak_mb": peak_memory_mb(),
        }
        resources.update(result.resources_used)
        # After the work's own figures: a result built from one of several
        # processes (ProcessResult.work_result) must not hide the others.
        resources.update(context.children_usage())
        return result.model_copy(
            update={
                "duration_ms": int(elapsed * 1000),
                "agent_id": self._agent_id,
                "trace_id": envelope.trace_id,
                "request_id": envelope.request_id,
                "resources_used": resources,
            }
        )

    def _execute_guarded(self, task: Task, context: TaskContext) -> WorkResult:
        request = task.request
        if request.work_type not in self._work_types:
            supported = ", ".join(sorted(self._work_types))
            return WorkResult.failed(
                request,
                f"unsupported work_type {request.work_type!r}; supported: {supported}",
            )
        token = enter_task(context)
        try:
            result = self._worker.execute_work(request)
        except Exception as exc:
            logger.exception("work raised", extra={"work_type": request.work_type})
            return WorkResult.failed(request, f"{type(exc).__name__}: {exc}")
        finally:
            leave_task(token)
        if not isinstance(result, WorkResult):
            return WorkResult.failed(
                request,
                f"execute_work returned {type(result).__name__}, expected WorkResult",
            )
        return result


def declared_work_types(capabilities: object) -> frozenset[str] | None:
    """The work types a worker's capabilities name, or None when they name none properly."""
    work_types = capabilities.get("work_types") if isinstance(capabilities, dict) else None
    if not (
        isinstance(work_types, list | tuple | set | frozenset)
        and work_types
        and all(isinstance(name, str) and name for name in work_types)
    ):
        return None
    return frozenset(work_types)
