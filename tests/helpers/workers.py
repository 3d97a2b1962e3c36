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


class ProgressStormWorker(EchoWorker):
    """`storm`: reports progress `count` times (3000 by default), then completes.

    Every `pause_every` reports it waits `pause_seconds`, so a storm spans the
    moment the rescue thread takes over inline work, and work threads keep
    reporting while the connection's holder flushes.
    """

    def execute_work(self, request: WorkRequest) -> WorkResult:
        if request.work_type != "storm":
            return super().execute_work(request)
        count = int(request.parameters.get("count", 3000))
        pause_every = int(request.parameters.get("pause_every", 500))
        pause = threading.Event()
        for number in range(1, count + 1):
            self.report_progress(number * 100 / count, f"step {number}")
            if number % pause_every == 0:
                pause.wait(float(request.parameters.get("pause_seconds", 0.05)))
        return WorkResult.completed(request, output=f"{count} reports")

    def get_agent_capabilities(self) -> dict[str, Any]:
        caps = super().get_agent_capabilities()
        caps["work_types"] = [*caps["work_types"], "storm"]
        return caps


class SquattingWorker(EchoWorker):
    """Sets on itself the private names the old runtime kept on the worker object."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, Any] = {}
        self._stop = False
        self._link = None
        self._consumer = None
        self._stats: dict[str, Any] = {}
        self._current = None
        self._signals = False
        self._notifier = None


class BrokenInitWorker(EchoWorker):
    """A bug in the subclass's own __init__."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        raise RuntimeError("boom in init")


class TypeErrorInitWorker(EchoWorker):
    """A TypeError from the subclass's own __init__ is a bug too, not a configuration error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        raise TypeError("boom in init")


class NoWorkTypesWorker(EchoWorker):
    """Capabilities without the required work_types."""

    def get_agent_capabilities(self) -> dict[str, Any]:
        return {"description": "forgot to say what it does"}
