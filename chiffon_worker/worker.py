"""WorkerBase: the class users subclass, and nothing of the runtime.

Every name on a WorkerBase subclass is the user's, except the few listed in
the class docstring. The runtime that serves a worker (connection, consumer,
outbox, heartbeats, watchdog, shutdown) lives in service.py and keeps no
state on the worker object; the running task reaches user code through
`chiffon_worker.context`.
"""

from __future__ import annotations

import abc
from typing import Any

from chiffon_worker.config import Settings, load_settings
from chiffon_worker.context import TaskContext, current_task, stop_requested
from chiffon_worker.protocol import WorkRequest, WorkResult


class WorkerBase(abc.ABC):
    """Subclass this: implement `execute_work` and `get_agent_capabilities`.

    Both are plain synchronous methods. `execute_work` runs on the
    connection thread or on a work thread (see the README, "Where the work
    runs"); either way the connection stays serviced while it runs.

    Reserved names (everything else, `_private` names included, is yours):
    `execute_work`, `get_agent_capabilities` (yours to write), `settings`,
    `agent_id` (set by `__init__`), `report_progress`, `task`, `cancelled`,
    `stopping`, `serve`.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else load_settings()
        self.agent_id = self.settings.resolved_agent_id()

    # -- what a subclass writes ----------------------------------------------

    @abc.abstractmethod
    def execute_work(self, request: WorkRequest) -> WorkResult:
        """Do the work; return a WorkResult (raise to report a failure)."""

    @abc.abstractmethod
    def get_agent_capabilities(self) -> dict[str, Any]:
        """What this worker can do; must contain "work_types": [...]."""

    # -- what a subclass may call from inside execute_work --------------------

    @property
    def task(self) -> TaskContext:
        """The running task's context; pass it to threads the work starts."""
        context = current_task()
        if context is None:
            raise RuntimeError("there is no task outside execute_work()")
        return context

    def report_progress(self, percent: float, step_name: str, output: str = "") -> None:
        """Publish a WorkStatus for the running task (queued; returns at once)."""
        context = current_task()
        if context is None:
            raise RuntimeError("report_progress() is only valid inside execute_work()")
        context.report_progress(percent, step_name, output)

    @property
    def cancelled(self) -> bool:
        """True once the running task must end early: return or raise soon."""
        context = current_task()
        return context is not None and context.cancelled

    @property
    def stopping(self) -> bool:
        """True once a stop was requested: long work may check it and wrap up."""
        return stop_requested(self)

    # -- entry point for scripts and the CLI ---------------------------------

    @classmethod
    def serve(cls, settings: Settings | None = None) -> int:
        """Load settings, set up logging and signals, run; returns an exit code.

        In a script: `raise SystemExit(MyWorker.serve())`.
        """
        from chiffon_worker.service import serve  # the runtime imports this module

        return serve(cls, settings)
