"""A worker for the soak test, loadable by CHIFFON_WORKER=tests.helpers.soak_worker:SoakWorker.

EchoWorker that writes the task_id of every execution to the file named by
SOAK_RUNS_FILE, one line per run, flushed at once: the test reads the file
from outside the process to prove that no work ran twice.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from chiffon_worker import WorkRequest, WorkResult
from chiffon_worker.echo import EchoWorker

RUNS_FILE_VARIABLE = "SOAK_RUNS_FILE"


class SoakWorker(EchoWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._runs_file = os.environ[RUNS_FILE_VARIABLE]
        self._write = threading.Lock()

    def execute_work(self, request: WorkRequest) -> WorkResult:
        # Recorded before the work, so a run that raises ("fail") is counted too.
        with self._write, open(self._runs_file, "a", encoding="utf-8") as runs:
            runs.write(f"{request.task_id}\n")
            runs.flush()
        return super().execute_work(request)
