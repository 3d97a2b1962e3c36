"""Counters of what the worker did, for operators; Prometheus when asked for.

`Stats` is the no-op default: the worker calls it unconditionally, so the
counting costs nothing unless CHIFFON_METRICS_PORT turns the exporter on.
"""

from __future__ import annotations


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


def make_stats(port: int | None, host: str = "127.0.0.1") -> Stats:
    """The exporter on `port`, or the no-op Stats when port is None."""
    if port is None:
        return Stats()
    raise NotImplementedError("Prometheus metrics are being written")
