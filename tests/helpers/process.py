"""Run `chiffon-worker run` as a real process and read its JSON log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from chiffon_worker import WorkerBase
from chiffon_worker.service import WorkerService

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`chiffon-worker ARGS` as an operator runs it, the broker URL from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHIFFON_")}
    env["CHIFFON_AMQP_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "chiffon_worker", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class WorkerProcess:
    def __init__(self, url: str, log_path: Path, **settings: Any) -> None:
        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CHIFFON_")}
        self.env.update(
            {
                "CHIFFON_AMQP_URL": url,
                "CHIFFON_LOG_FORMAT": "json",
                "CHIFFON_LOG_LEVEL": "INFO",
                "CHIFFON_HEARTBEAT_INTERVAL": "60",
                "CHIFFON_SHUTDOWN_TIMEOUT": "20",
                # tests.helpers.workers must be importable by CHIFFON_WORKER
                "PYTHONPATH": str(REPO_ROOT),
            }
        )
        self.env.update({f"CHIFFON_{k.upper()}": str(v) for k, v in settings.items()})
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> WorkerProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "chiffon_worker", "run", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records so far (non-JSON lines kept under 'raw')."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"raw": line})
        return records

    def messages(self) -> list[str]:
        return [r.get("message", r.get("raw", "")) for r in self.records()]

    def logged(self, message: str) -> list[dict[str, Any]]:
        """The JSON log records whose message is exactly `message`."""
        return [r for r in self.records() if r.get("message") == message]


class Launcher:
    """Starts worker processes logging under `log_dir`; leaving the `with` kills what is left."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.env = env or {}  # added to every process's environment
        self.started: list[WorkerProcess] = []

    def start(
        self, url: str, name: str = "worker", env: dict[str, str] | None = None, **settings: Any
    ) -> WorkerProcess:
        """A worker process; `env` is added to this one's environment only."""
        process = WorkerProcess(url, self.log_dir / f"{name}.log", **settings)
        process.env.update(self.env)
        process.env.update(env or {})
        self.started.append(process.start())
        return process

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *_exc: object) -> None:
        for process in self.started:
            process.kill()


class InProcessWorker:
    """Serve a worker object on a thread of the test process (no signals there)."""

    def __init__(self, worker: WorkerBase) -> None:
        self.worker = worker
        self.service = WorkerService(worker)
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, name="test-worker-loop", daemon=True)

    def _run(self) -> None:
        self.exit_code = self.service.run()

    def __enter__(self) -> InProcessWorker:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 30) -> int | None:
        self.service.request_stop()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "worker loop did not stop"
        return self.exit_code
