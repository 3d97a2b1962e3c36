"""SystemdNotifier against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from chiffon_worker import sdnotify
from chiffon_worker.sdnotify import SystemdNotifier

RECV_TIMEOUT_S = 2.0
LOGGER = "chiffon_worker.sdnotify"


@pytest.fixture
def notify_path(tmp_path: Path) -> Path:
    path = tmp_path / "n.sock"
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path normally is far shorter.
    assert len(os.fsencode(path)) < 100, f"tmp_path too long for an AF_UNIX socket: {path}"
    return path


@pytest.fixture
def receiver(notify_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        sock.settimeout(RECV_TIMEOUT_S)
        yield sock


@pytest.fixture
def notifier(notify_path: Path, receiver: socket.socket) -> SystemdNotifier:
    return SystemdNotifier({"NOTIFY_SOCKET": str(notify_path)})


def assert_nothing_pending(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
    finally:
        sock.settimeout(RECV_TIMEOUT_S)


def sdnotify_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def test_ready_without_status_sends_only_ready(
    notifier: SystemdNotifier, receiver: socket.socket
) -> None:
    notifier.ready()
    assert receiver.recv(4096) == b"READY=1"


def test_ready_with_status_sends_ready_and_status_in_one_datagram(
    notifier: SystemdNotifier, receiver: socket.socket
) -> None:
    notifier.ready("consuming from work_queue")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=consuming from work_queue"
    assert_nothing_pending(receiver)


def test_status_sends_status_line(notifier: SystemdNotifier, receiver: socket.socket) -> None:
    notifier.status("3 tasks done, idle")
    assert receiver.recv(4096) == b"STATUS=3 tasks done, idle"


def test_watchdog_sends_watchdog_ping(notifier: SystemdNotifier, receiver: socket.socket) -> None:
    notifier.watchdog()
    assert receiver.recv(4096) == b"WATCHDOG=1"


def test_stopping_sends_stopping(notifier: SystemdNotifier, receiver: socket.socket) -> None:
    notifier.stopping()
    assert receiver.recv(4096) == b"STOPPING=1"


def test_stopping_with_status_sends_both(
    notifier: SystemdNotifier, receiver: socket.socket
) -> None:
    notifier.stopping("draining 2 tasks")
    assert receiver.recv(4096) == b"STOPPING=1\nSTATUS=draining 2 tasks"


def test_messages_arrive_one_datagram_each_in_order(
    notifier: SystemdNotifier, receiver: socket.socket
) -> None:
    notifier.ready()
    notifier.watchdog()
    notifier.stopping()
    received = [receiver.recv(4096) for _ in range(3)]
    assert received == [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]


def test_newlines_in_status_become_spaces(
    notifier: SystemdNotifier, receiver: socket.socket
) -> None:
    notifier.status("broker lost\nreconnecting\r\nREADY=1")
    # A raw newline would have smuggled in a second field (here a fake READY=1).
    assert receiver.recv(4096) == b"STATUS=broker lost reconnecting  READY=1"


def test_nul_in_status_becomes_space(notifier: SystemdNotifier, receiver: socket.socket) -> None:
    notifier.ready("a\0b")
    # systemd ignores a whole message that holds a NUL byte, READY=1 included.
    assert receiver.recv(4096) == b"READY=1\nSTATUS=a b"


def test_long_status_is_cut_on_a_character_boundary(
    notifier: SystemdNotifier, receiver: socket.socket
) -> None:
    # One ASCII byte, then two-byte characters: the byte limit falls inside a character.
    notifier.ready("x" + "é" * 5000)
    message = receiver.recv(65536)
    ready, status = message.split(b"\n")
    assert ready == b"READY=1"
    text = status.removeprefix(b"STATUS=").decode("utf-8")  # fails if cut mid-character
    assert text == "x" + "é" * ((sdnotify.STATUS_MAX_BYTES - 1) // 2)


def test_abstract_socket_name_is_used_for_leading_at(caplog: pytest.LogCaptureFixture) -> None:
    name = f"chiffon-sdnotify-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECV_TIMEOUT_S)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    assert sdnotify_records(caplog) == []


def test_reads_os_environ_by_default(
    notify_path: Path, receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    notifier = SystemdNotifier()
    assert notifier.enabled
    notifier.watchdog()
    assert receiver.recv(4096) == b"WATCHDOG=1"


def test_enabled_when_notify_socket_is_a_path(notify_path: Path) -> None:
    assert SystemdNotifier({"NOTIFY_SOCKET": str(notify_path)}).enabled


def test_without_notify_socket_every_call_is_a_silent_no_op(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_socket_allowed(*args: object, **kwargs: object) -> socket.socket:
        raise AssertionError("a disabled notifier must not open a socket")

    monkeypatch.setattr(socket, "socket", no_socket_allowed)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    notifier = SystemdNotifier({})

    assert not notifier.enabled
    notifier.ready("x")
    notifier.status("y")
    notifier.watchdog()
    notifier.stopping("z")
    assert sdnotify_records(caplog) == []


@pytest.mark.parametrize("value", ["", "relative/n.sock", "@", "vsock:2:1234"])
def test_unusable_notify_socket_disables_notifications(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": value})
    assert not notifier.enabled
    notifier.ready()
    warned = [r for r in sdnotify_records(caplog) if r.levelno == logging.WARNING]
    assert len(warned) == (1 if value else 0)


def test_watchdog_interval_is_half_of_watchdog_usec(notify_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "60000000"}
    assert SystemdNotifier(env).watchdog_interval() == 30.0


def test_watchdog_interval_when_watchdog_pid_is_this_process(notify_path: Path) -> None:
    env = {
        "NOTIFY_SOCKET": str(notify_path),
        "WATCHDOG_USEC": "3000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    assert SystemdNotifier(env).watchdog_interval() == 1.5


def test_no_watchdog_interval_when_watchdog_pid_is_another_process(notify_path: Path) -> None:
    env = {
        "NOTIFY_SOCKET": str(notify_path),
        "WATCHDOG_USEC": "60000000",
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    assert SystemdNotifier(env).watchdog_interval() is None


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "sixty"])
def test_no_watchdog_interval_without_a_valid_watchdog_usec(
    notify_path: Path, usec: str | None
) -> None:
    env = {"NOTIFY_SOCKET": str(notify_path)}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    assert SystemdNotifier(env).watchdog_interval() is None


def test_no_watchdog_interval_without_notify_socket() -> None:
    assert SystemdNotifier({"WATCHDOG_USEC": "60000000"}).watchdog_interval() is None


def test_send_failure_does_not_raise_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "missing.sock"
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(missing)})
    assert notifier.enabled

    notifier.ready("starting")
    notifier.status("still failing")
    notifier.watchdog()
    notifier.stopping()

    records = sdnotify_records(caplog)
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.WARNING
    assert record.__dict__["notify_socket"] == str(missing)
    assert record.__dict__["notify_fields"] == "READY,STATUS"
    assert "FileNotFoundError" in record.__dict__["error"]
    # Data travels in `extra`, not in the message text.
    assert str(missing) not in record.getMessage()


def test_failure_is_logged_again_after_a_send_succeeded(
    notify_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(notify_path)})
    notifier.watchdog()  # nobody listening yet: first failure, logged
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        sock.settimeout(RECV_TIMEOUT_S)
        notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    notifier.watchdog()  # socket closed, path left behind: refused, logged again
    notifier.watchdog()  # same run of failures: not logged

    assert len(sdnotify_records(caplog)) == 2


def test_abstract_name_is_shown_with_at_in_failure_log(caplog: pytest.LogCaptureFixture) -> None:
    name = f"chiffon-sdnotify-nobody-{uuid.uuid4().hex}"
    SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
    (record,) = sdnotify_records(caplog)
    assert record.__dict__["notify_socket"] == "@" + name
