"""EchoWorker: the reference worker, and the one `make run-agent` starts."""

from __future__ import annotations

import json
import threading
from typing import Any

from chiffon_worker.context import current_task
from chiffon_worker.protocol import WorkRequest, WorkResult
from chiffon_worker.worker import WorkerBase

WORK_TYPES = ("echo", "slow_echo", "fail")


class EchoWorker(WorkerBase):
    def get_agent_capabilities(self) -> dict[str, Any]:
        return {"work_types": list(WORK_TYPES), "description": "echoes its input back"}

    def execute_work(self, request: WorkRequest) -> WorkResult:
        if request.work_type == "echo":
            return WorkResult.completed(request, output=self._echo(request))
        if request.work_type == "slow_echo":
            seconds = float(request.parameters.get("seconds", 5))
            task = current_task()
            if task is None:  # called directly, outside the runtime
                threading.Event().wait(seconds)
            elif task.sleep(seconds):  # cancelled: the runtime has answered it already
                return WorkResult.cancelled(request, task.cancel_reason or "cancelled")
            return WorkResult.completed(request, output=self._echo(request))
        if request.work_type == "fail":
            raise RuntimeError(str(request.parameters.get("message", "asked to fail")))
        supported = ", ".join(WORK_TYPES)
        return WorkResult.failed(
            request, f"unsupported work_type {request.work_type!r}; supported: {supported}"
        )

    @staticmethod
    def _echo(request: WorkRequest) -> str:
        message = request.parameters.get("message")
        if isinstance(message, str):
            return message
        return json.dumps(request.parameters, sort_keys=True)
