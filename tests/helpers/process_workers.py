"""Workers that run child processes through run_process, for the integration tests."""

from __future__ import annotations

from typing import Any

from chiffon_worker.echo import EchoWorker
from chiffon_worker.protocol import WorkRequest, WorkResult


class CommandWorker(EchoWorker):
    """`run_command` runs parameters["argv"]; echo and the rest as EchoWorker."""

    def get_agent_capabilities(self) -> dict[str, Any]:
        return {"work_types": ["run_command", "echo"]}

    def execute_work(self, request: WorkRequest) -> WorkResult:
        if request.work_type != "run_command":
            return super().execute_work(request)
        argv = [str(arg) for arg in request.parameters["argv"]]
        return self.task.run_process(argv).work_result(request)
