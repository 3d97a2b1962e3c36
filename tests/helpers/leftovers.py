"""What work left behind: processes by a token on their command line; waiting for log lines."""

from __future__ import annotations

import random

import psutil

from tests.helpers.broker import Orchestrator
from tests.helpers.process import WorkerProcess


def sleep_token() -> str:
    """A unique extra argument for `sleep`, so the sleep itself carries it.

    `sleep 120 TOKEN` sleeps 120 s plus TOKEN (a few microseconds): unlike a
    `# comment` in a shell command, the token stays in the command line of
    the process that matters most, the one at the bottom of the tree. The
    `s` suffix keeps Ansible's templating from turning it into a float.
    """
    return f"0.0000{random.randrange(10**15):015d}s"


def processes_with(token: str) -> list[int]:
    """Live processes on this host whose command line holds `token` (zombies have none)."""
    return [
        proc.pid
        for proc in psutil.process_iter(["cmdline"])
        if token in " ".join(proc.info["cmdline"] or [])
    ]


def wait_logged(
    orchestrator: Orchestrator, worker: WorkerProcess, message: str, timeout: float = 20
) -> None:
    """Service the orchestrator's connection until the worker has logged `message`."""
    orchestrator.wait_until(lambda: bool(worker.logged(message)), timeout, repr(message))
