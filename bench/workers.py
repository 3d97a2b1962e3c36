"""Worker processes under test: the two baselines and ``chiffon-worker run``."""

import os
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_S = 10.0
MIB = 1024 * 1024

WORKER_KEYS: tuple[str, ...] = ("A", "B", "ours")


class BenchError(Exception):
    """A scenario could not produce its figure; the message says why."""


class WorkerExitedError(BenchError):
    """The worker process ended when it should still be running."""


def ours_executable() -> Path:
    """``chiffon-worker`` in the same environment as the running interpreter."""
    return Path(sys.executable).parent / "chiffon-worker"


def ours_env(url: str, heartbeat_interval_s: float) -> dict[str, str]:
    """The environment for ``chiffon-worker run``; inherited CHIFFON_* settings are dropped."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHIFFON_")}
    env.update(
        {
            "CHIFFON_AMQP_URL": url,
            "CHIFFON_LOG_FORMAT": "json",
            "CHIFFON_LOG_LEVEL": "INFO",
            "CHIFFON_HEARTBEAT_INTERVAL": f"{heartbeat_interval_s:g}",
            "CHIFFON_AGENT_TYPE": "infra",
        }
    )
    return env


def worker_command(key: str, url: str) -> list[str]:
    """The command line that starts worker ``key`` (one of :data:`WORKER_KEYS`)."""
    if key in ("A", "B"):
        return [sys.executable, "-m", "bench.baseline", "--mode", key, "--url", url]
    if key == "ours":
        override = os.environ.get("BENCH_OURS_COMMAND")  # to profile a variant of ours
        return override.split() if override else [str(ours_executable()), "run"]
    raise ValueError(f"unknown worker {key!r}")


@dataclass(frozen=True)
class StopOutcome:
    returncode: int
    killed: bool

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and not self.killed


class WorkerProcess:
    """One worker subprocess, its stdout/stderr going to ``log_path``.

    It runs in its own session, so a Ctrl-C on the terminal reaches only the harness,
    which then stops it. Leaving the ``with`` block always stops it (SIGTERM, then
    SIGKILL after :data:`STOP_TIMEOUT_S`).
    """

    def __init__(
        self, key: str, argv: list[str], env: dict[str, str] | None, log_path: Path
    ) -> None:
        self.key = key
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._ps: psutil.Process | None = None
        self.stop_outcome: StopOutcome | None = None

    def __enter__(self) -> "WorkerProcess":
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError("worker not started")
        return self._popen.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        try:
            self._popen = subprocess.Popen(
                self.argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise
        self._ps = psutil.Process(self._popen.pid)

    def returncode(self) -> int | None:
        """The exit status if the process has ended, else ``None``."""
        return None if self._popen is None else self._popen.poll()

    def check_alive(self) -> None:
        code = self.returncode()
        if code is not None:
            raise WorkerExitedError(
                f"worker {self.key} exited with status {code}; log {self.log_path}:\n"
                f"{self.log_tail()}"
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            with self.log_path.open("r", encoding="utf-8", errors="replace") as fh:
                return "".join(deque(fh, maxlen=lines)).rstrip()
        except OSError as exc:
            return f"(log unreadable: {exc})"

    def _process(self) -> psutil.Process:
        self.check_alive()
        if self._ps is None:
            raise RuntimeError("worker not started")
        return self._ps

    def rss_mib(self) -> float:
        try:
            return float(self._process().memory_info().rss) / MIB
        except psutil.Error as exc:
            raise WorkerExitedError(f"worker {self.key}: cannot read its memory: {exc}") from exc

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the worker process itself."""
        try:
            times = self._process().cpu_times()
        except psutil.Error as exc:
            raise WorkerExitedError(f"worker {self.key}: cannot read its CPU time: {exc}") from exc
        return float(times.user + times.system)

    def cpu_seconds_schedstat(self) -> float | None:
        """On-CPU time of all live threads from /proc/PID/task/*/schedstat (nanosecond
        resolution, unlike the clock-tick resolution of cpu_times); None where unavailable.
        """
        self.check_alive()
        try:
            stats = list(Path(f"/proc/{self.pid}/task").glob("*/schedstat"))
            total_ns = sum(int(stat.read_text().split()[0]) for stat in stats)
        except (OSError, ValueError, IndexError):
            return None
        return total_ns / 1e9 if stats else None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> StopOutcome | None:
        """SIGTERM, wait, SIGKILL if needed. Idempotent; returns how it ended."""
        if self._popen is None:
            return None
        if self.stop_outcome is None:
            killed = False
            if self._popen.poll() is None:
                self._popen.send_signal(signal.SIGTERM)
                try:
                    self._popen.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self._popen.kill()
                    self._popen.wait(timeout=timeout_s)
                    killed = True
            self.stop_outcome = StopOutcome(returncode=self._popen.returncode, killed=killed)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.stop_outcome
