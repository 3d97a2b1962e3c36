"""What an operator relies on: systemd notifications and secrets kept secret."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.broker import Orchestrator, Vhost, rabbitmqctl, work_request
from tests.helpers.process import REPO_ROOT, WorkerProcess

pytestmark = pytest.mark.integration

Spawn = Callable[..., WorkerProcess]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(20)
    try:
        yield sock
    finally:
        sock.close()


def _receive_until(sock: socket.socket, wanted: str) -> list[str]:
    """Every notification up to and including the first that carries `wanted`."""
    seen: list[str] = []
    while not seen or wanted not in seen[-1]:
        seen.append(sock.recv(4096).decode())
    return seen


def test_systemd_hears_ready_watchdog_and_stopping_in_order(
    vhost: Vhost, tmp_path: Path, notify_socket: socket.socket
) -> None:
    worker = WorkerProcess(vhost.url(), tmp_path / "worker.log")
    worker.env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    worker.env["WATCHDOG_USEC"] = "1000000"  # systemd's WatchdogSec=1: ping every 0.5 s
    worker.start()
    try:
        startup = _receive_until(notify_socket, "READY=1")
        assert any("STATUS=connected" in text for text in startup)
        assert "WATCHDOG=1" in _receive_until(notify_socket, "WATCHDOG=1")[-1]
        assert "WATCHDOG=1" in _receive_until(notify_socket, "WATCHDOG=1")[-1]
        worker.signal(signal.SIGTERM)
        assert "STOPPING=1" in _receive_until(notify_socket, "STOPPING=1")[-1]
        assert worker.wait(timeout=30) == 0
    finally:
        worker.kill()


def test_the_password_stays_out_of_logs_ps_and_errors(
    vhost: Vhost, orchestrator: Orchestrator, tmp_path: Path
) -> None:
    secret = "s3cr3t-Pa55word"
    rabbitmqctl("add_user", user := f"u-{vhost.name}", secret)
    try:
        rabbitmqctl("set_permissions", "-p", vhost.name, user, ".*", ".*", ".*")
        password_file = tmp_path / "amqp-password"
        password_file.write_text(secret + "\n")
        url = vhost.url().replace("guest:guest", user)  # no password in the URL at all
        worker = WorkerProcess(
            url, tmp_path / "worker.log", amqp_password_file=password_file, log_level="DEBUG"
        )
        worker.start()
        try:
            request = work_request("echo", {"message": "secret-free"})
            orchestrator.publish(request)
            orchestrator.wait_for_result(request)
            command_line = subprocess.run(
                ["ps", "-o", "args=", "-p", str(worker.pid)], capture_output=True, text=True
            ).stdout
            assert "chiffon_worker" in command_line
            assert secret not in command_line
        finally:
            assert worker.stop() == 0
        assert secret not in worker.log_path.read_text()

        # A refused login names the account and says why, never the password.
        password_file.write_text("wrong-" + secret)
        refused = WorkerProcess(url, tmp_path / "refused.log", amqp_password_file=password_file)
        assert refused.start().wait(timeout=30) == 77
        text = refused.log_path.read_text()
        assert "refused" in text
        assert secret not in text
    finally:
        rabbitmqctl("delete_user", user)


def test_help_shows_no_password() -> None:
    env = dict(os.environ, CHIFFON_AMQP_URL="amqp://u:hunter2-secret@localhost/%2F")
    for args in (["--help"], ["run", "--help"], ["send", "--help"]):
        shown = subprocess.run(
            [sys.executable, "-m", "chiffon_worker", *args],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "hunter2" not in shown
