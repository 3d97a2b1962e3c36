"""systemd's side of a Type=notify unit with a watchdog, played by the test.

The test binds NOTIFY_SOCKET (a datagram socket) and time-stamps every
notification; a worker started with `listener.env` in its environment
pings it as it would ping systemd under WatchdogSec=4.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from pathlib import Path

from tests.helpers.broker import Orchestrator

WATCHDOG_USEC = 4_000_000
# WatchdogSec itself: systemd kills a worker that goes this long without a
# ping (the feeder pings every half of it, as sd_watchdog_enabled advises).
MAX_WATCHDOG_GAP_S = 4.0


class NotifyListener:
    """Stands in for systemd: receives sd_notify datagrams on a thread, time-stamped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._lock = threading.Lock()
        self._received: list[tuple[float, str]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-listener", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return  # closed under us
            with self._lock:
                self._received.append((time.monotonic(), data.decode(errors="replace")))

    @property
    def env(self) -> dict[str, str]:
        """What systemd puts in a Type=notify unit's environment under WatchdogSec=4."""
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    def pings(self) -> list[float]:
        """When each WATCHDOG=1 arrived."""
        with self._lock:
            return [at for at, text in self._received if "WATCHDOG=1" in text.split("\n")]

    def max_gap(self, start: float, end: float) -> float:
        """Longest stretch of [start, end] without a watchdog ping (both ends count)."""
        moments = [start, *(at for at in self.pings() if start < at < end), end]
        return max(later - earlier for earlier, later in itertools.pairwise(moments))

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._sock.close()


def first_ping(notify: NotifyListener, orchestrator: Orchestrator) -> float:
    """When the first watchdog ping came (waited for up to 20 s, the orchestrator served)."""
    orchestrator.wait_until(lambda: bool(notify.pings()), 20, "the first watchdog ping")
    return notify.pings()[0]
