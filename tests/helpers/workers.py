"""Worker classes for tests, loadable by CHIFFON_WORKER=tests.helpers.workers:NAME."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from chiffon_worker import WorkRequest, WorkResult
from chiffon_worker.echo import EchoWorker


class CountingWorker(EchoWorker):
    """EchoWorker that counts how often each task's work really ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runs: Counter[str] = Counter()
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def execute_work(self, request: WorkRequest) -> WorkResult:
        self.runs[request.parameters.get("message", "")] += 1
        self.started.set()
        if request.work_type == "gated":
            # Held until the test releases it: a task that is provably still running.
            self.release.wait(30)
            return WorkResult.completed(request, output="released")
        return super().execute_work(request)

    def get_agent_capabilities(self) -> dict[str, Any]:
        caps = super().get_agent_capabilities()
        caps["work_types"] = [*caps["work_types"], "gated"]
        return caps


class ProgressWorker(EchoWorker):
    """Reports two progress steps before answering."""

    def execute_work(self, request: WorkRequest) -> WorkResult:
        self.report_progress(50, "halfway", "first half done")
        self.report_progress(100, "done")
        return WorkResult.completed(request, output="progressed")


class WrongTypeWorker(EchoWorker):
    """Returns a plain string for `echo`: the worker must turn that into a failure."""

    def execute_work(self, request: WorkRequest) -> WorkResult:
        if request.work_type == "echo":
            return "not a WorkResult"  # type: ignore[return-value]
        return super().execute_work(request)
