"""EchoWorker: the reference worker, and the one `make run-agent` starts."""

from __future__ import annotations

import json
import threading
from typing import Any

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
            # An Event wait, not time.sleep: same wait, and it reads as one.
            threading.Event().wait(seconds)
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
