"""Tell systemd how the worker is doing, over the ``NOTIFY_SOCKET`` datagram socket (sd_notify).

This module only speaks the notify protocol: READY, STATUS, WATCHDOG and STOPPING messages, plus
the ping interval systemd asks for. When the worker does not run under a ``Type=notify`` unit
(``NOTIFY_SOCKET`` unset) every call is a no-op. No call ever raises: systemd supervision is a
convenience, never a reason for the worker to stop.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

__all__ = ["SystemdNotifier"]

_log = logging.getLogger("chiffon_worker.sdnotify")

# systemd drops a whole notification (READY=1 included) when the datagram is 4096 bytes or more,
# or when it holds a NUL byte. STATUS= texts are cut to this many UTF-8 bytes, far below that.
STATUS_MAX_BYTES = 1024

# Upper bound on how long one notification may block the caller when PID 1 is not reading its
# socket (its receive queue is full). The watchdog ping comes from the worker's main loop.
_SEND_TIMEOUT_S = 2.0

# Characters that would split a STATUS= field (newlines) or make systemd drop the message (NUL).
_STATUS_BREAKERS = str.maketrans({"\n": " ", "\r": " ", "\0": " "})


class SystemdNotifier:
    """Send sd_notify(3) messages to the service manager that started this process.

    Safe to share between threads: each message is sent on its own short-lived socket.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env: Mapping[str, str] = os.environ if environ is None else environ
        raw_address = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw_address)
        self._watchdog_usec = _positive_int(env.get("WATCHDOG_USEC"))
        self._watchdog_pid = _positive_int(env.get("WATCHDOG_PID"))
        self._lock = threading.Lock()
        self._failing = False
        if raw_address and self._address is None:
            _log.warning(
                "NOTIFY_SOCKET is not a unix socket path or abstract name; "
                "systemd notifications are disabled",
                extra={"notify_socket": raw_address},
            )

    @property
    def enabled(self) -> bool:
        """True when a usable NOTIFY_SOCKET was given, so messages are actually sent."""
        return self._address is not None

    def ready(self, status: str | None = None) -> None:
        """Tell systemd start-up is complete (``READY=1``), optionally with a status line."""
        self._send("READY=1", status)

    def status(self, text: str) -> None:
        """Set the one-line status shown by ``systemctl status`` (``STATUS=...``)."""
        self._send(None, text)

    def watchdog(self) -> None:
        """Ping the service watchdog (``WATCHDOG=1``); call it every watchdog_interval()."""
        self._send("WATCHDOG=1", None)

    def stopping(self, status: str | None = None) -> None:
        """Tell systemd the worker has begun shutting down (``STOPPING=1``)."""
        self._send("STOPPING=1", status)

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog() pings, or None when no watchdog is expected from us.

        Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends. None when the unit has no
        WatchdogSec=, when WATCHDOG_PID names another process (e.g. after a fork), or when
        notifications are disabled (no NOTIFY_SOCKET), since pings could not be sent anyway.
        """
        if self._address is None or self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def _send(self, state: str | None, status: str | None) -> None:
        address = self._address
        if address is None:
            return
        fields = [] if state is None else [state]
        if status is not None:
            fields.append("STATUS=" + _clean_status(status))
        payload = "\n".join(fields).encode("utf-8", errors="replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Connected, so the timeout also covers a full receive queue on systemd's side.
                sock.settimeout(_SEND_TIMEOUT_S)
                sock.connect(address)
                sock.send(payload)
        except (OSError, ValueError) as exc:
            self._report_failure(address, fields, exc)
            return
        with self._lock:
            self._failing = False

    def _report_failure(self, address: str, fields: list[str], exc: Exception) -> None:
        """Log the first failure of a run of failures; a later successful send re-arms it."""
        with self._lock:
            if self._failing:
                return
            self._failing = True
        _log.warning(
            "systemd notification failed; further failures are not logged until one succeeds",
            extra={
                "notify_socket": _display_address(address),
                "notify_fields": ",".join(field.partition("=")[0] for field in fields),
                "error": repr(exc),
                "errno": getattr(exc, "errno", None),
            },
        )


def _socket_address(raw: str) -> str | None:
    """AF_UNIX address for a NOTIFY_SOCKET value: a path, or '@name' for the abstract namespace."""
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    return None


def _display_address(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address


def _positive_int(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if value > 0 else None


def _clean_status(text: str) -> str:
    """One line, no NUL, at most STATUS_MAX_BYTES of UTF-8 (cut on a character boundary)."""
    flat = text.translate(_STATUS_BREAKERS)
    encoded = flat.encode("utf-8", errors="replace")
    if len(encoded) <= STATUS_MAX_BYTES:
        return flat
    return encoded[:STATUS_MAX_BYTES].decode("utf-8", errors="ignore")


class Watchdog:
    """The one feeder of systemd's watchdog: fed on every turn, pings at systemd's pace.

    Only the holder of the connection's baton feeds it (service.py), so a
    ping means the thread that serves the broker is turning, whoever it is.
    """

    def __init__(self, notifier: SystemdNotifier) -> None:
        self._notifier = notifier
        half = notifier.watchdog_interval()
        # Every third of WatchdogSec rather than every half: a ping may come up
        # to one turn late, and even then no gap reaches half of WatchdogSec.
        self._interval = None if half is None else half * 2 / 3
        self._last = float("-inf")

    def feed(self, now: float) -> None:
        if self._interval is not None and now - self._last >= self._interval:
            self._last = now
            self._notifier.watchdog()
