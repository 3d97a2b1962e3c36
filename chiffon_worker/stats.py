"""Counters of what the worker did, for operators; Prometheus when asked for.

`Stats` is the no-op default: the worker calls it unconditionally, so the
counting costs nothing unless CHIFFON_METRICS_PORT turns the exporter on.

prometheus_client is an optional extra (`chiffon-worker[metrics]`) and is
imported only when the exporter is asked for, never by the base install.
"""

from __future__ import annotations

import errno
import threading
from types import ModuleType
from typing import TYPE_CHECKING

from chiffon_worker.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "chiffon_worker_"
# Work lasts from a millisecond (echo) to an hour (long infra jobs).
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
MISSING_EXTRA = (
    "CHIFFON_METRICS_PORT: needs the metrics extra: pip install 'chiffon-worker[metrics]'"
)


class Stats:
    """Records nothing; PrometheusStats overrides each method."""

    def received(self) -> None:
        """A delivery arrived on the work queue."""

    def dead_lettered(self) -> None:
        """A delivery was rejected to the dead-letter queue."""

    def duplicate(self) -> None:
        """A request_id was seen again and not run."""

    def finished(self, status: str, seconds: float) -> None:
        """Work ended with a WorkResult status (completed/failed/cancelled)."""

    def in_flight(self, count: int) -> None:
        """Tasks running right now."""

    def connected(self, reconnect: bool) -> None:
        """A broker connection came up (reconnect=False for the first one)."""

    def heartbeat_sent(self, unix_time: float) -> None:
        """A StatusUpdate was published."""

    def command(self, name: str) -> None:
        """A control command (ping, pause, resume, cancel, or "ignored") was received."""

    def cancelled(self) -> None:
        """A task was cancelled (running, or on arrival)."""

    def close(self) -> None:
        """Stop serving metrics, if anything serves them; safe to call twice."""


def _prometheus_client() -> ModuleType:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    return prometheus_client


class PrometheusStats(Stats):
    """Prometheus metrics on a registry of its own, served by `serve()`.

    Each method is one lock-protected add or set: cheap enough for the
    per-message path. A registry per instance keeps instances independent
    (the global REGISTRY would refuse a second set of the same names).
    """

    def __init__(self) -> None:
        client = _prometheus_client()
        self.registry: CollectorRegistry = client.CollectorRegistry(auto_describe=True)
        registry = self.registry
        client.ProcessCollector(registry=registry)
        client.PlatformCollector(registry=registry)
        client.GCCollector(registry=registry)

        def counter(name: str, text: str) -> Counter:
            made: Counter = client.Counter(PREFIX + name, text, registry=registry)
            return made

        self._received = counter("requests_received", "Deliveries that arrived on the work queue.")
        self._completed = counter("requests_completed", "Work that ended with status completed.")
        self._failed = counter(
            "requests_failed", "Work that ended with status failed or cancelled."
        )
        self._dead_lettered = counter(
            "requests_dead_lettered", "Deliveries rejected to the dead-letter queue."
        )
        self._duplicate = counter(
            "requests_duplicate",
            "Requests whose request_id was seen before, answered without running.",
        )
        self._reconnects = counter(
            "reconnects", "Broker connections re-established after the first one."
        )
        self._duration: Histogram = client.Histogram(
            PREFIX + "task_duration_seconds",
            "How long work ran, whatever its status.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._in_flight: Gauge = client.Gauge(
            PREFIX + "tasks_in_flight",
            "Tasks running right now.",
            registry=registry,
        )
        self._heartbeat: Gauge = client.Gauge(
            PREFIX + "last_heartbeat_timestamp_seconds",
            "Unix time of the last heartbeat (StatusUpdate) published.",
            registry=registry,
        )
        self._commands: Counter = client.Counter(
            PREFIX + "control_commands",
            "Control commands received, by command (ignored: expired, malformed, not ours).",
            ["command"],
            registry=registry,
        )
        self._cancelled = counter("tasks_cancelled", "Tasks cancelled, running or on arrival.")
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # -- serving ---------------------------------------------------------------

    @property
    def port(self) -> int | None:
        """The port the exporter listens on, or None when it does not serve."""
        return self._server.server_port if self._server is not None else None

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Start the HTTP exporter on host:port (port 0: any free port)."""
        if self._server is not None:
            raise RuntimeError("the metrics exporter is already serving")
        client = _prometheus_client()
        try:
            self._server, self._thread = client.start_http_server(
                port, addr=host, registry=self.registry
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"CHIFFON_METRICS_PORT: port {port} on {host} is already in use"
                ) from None
            # The port is at fault when we may not bind it; otherwise the host is.
            setting = (
                "CHIFFON_METRICS_PORT" if exc.errno == errno.EACCES else "CHIFFON_METRICS_HOST"
            )
            raise ConfigError(
                f"{setting}: cannot serve metrics on {host} port {port}: {exc.strerror or exc}"
            ) from None

    def close(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    # -- the hot path ----------------------------------------------------------

    def received(self) -> None:
        self._received.inc()

    def dead_lettered(self) -> None:
        self._dead_lettered.inc()

    def duplicate(self) -> None:
        self._duplicate.inc()

    def finished(self, status: str, seconds: float) -> None:
        if status == "completed":
            self._completed.inc()
        else:
            self._failed.inc()
        self._duration.observe(seconds)

    def in_flight(self, count: int) -> None:
        self._in_flight.set(count)

    def connected(self, reconnect: bool) -> None:
        if reconnect:
            self._reconnects.inc()

    def heartbeat_sent(self, unix_time: float) -> None:
        self._heartbeat.set(unix_time)

    def command(self, name: str) -> None:
        self._commands.labels(command=name).inc()

    def cancelled(self) -> None:
        self._cancelled.inc()


def make_stats(port: int | None, host: str = "127.0.0.1") -> Stats:
    """The exporter on `port`, or the no-op Stats when port is None.

    Raises ConfigError when the metrics extra is missing or the port is taken.
    """
    if port is None:
        return Stats()
    stats = PrometheusStats()
    stats.serve(port, host)
    return stats
