"""Workers whose own output is poison (issue 13), loadable by CHIFFON_WORKER."""

from __future__ import annotations

from typing import Any

from chiffon_worker import WorkRequest, WorkResult
from chiffon_worker.echo import EchoWorker


class PoisonOutputWorker(EchoWorker):
    """`unencodable`: an object in analysis_result; `huge_progress`: a 2 MiB progress report."""

    def get_agent_capabilities(self) -> dict[str, Any]:
        caps = super().get_agent_capabilities()
        caps["work_types"] = [*caps["work_types"], "unencodable", "huge_progress"]
        return caps

    def execute_work(self, request: WorkRequest) -> WorkResult:
        if request.work_type == "unencodable":
            return WorkResult.completed(request, analysis_result={"handle": object()})
        if request.work_type == "huge_progress":
            self.report_progress(50, "dump", output="x" * (2 * 1024 * 1024))
            self.report_progress(100, "done")
            return WorkResult.completed(request, output="after the dump")
        return super().execute_work(request)
