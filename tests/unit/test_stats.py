"""The stats interface: the no-op default, and the Prometheus exporter behind it."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
from collections.abc import Callable, Iterator

import pytest

from chiffon_worker.errors import ConfigError
from chiffon_worker.stats import PrometheusStats, Stats, make_stats
from tests.helpers.metrics import free_port, scrape

P = "chiffon_worker_"
COUNTERS = (
    "requests_received_total",
    "requests_completed_total",
    "requests_failed_total",
    "requests_dead_lettered_total",
    "requests_duplicate_total",
    "reconnects_total",
)


@pytest.fixture
def exporter() -> Iterator[Callable[[], tuple[PrometheusStats, int]]]:
    """Start exporters on free ports through make_stats; all are closed after the test."""
    started: list[Stats] = []

    def start() -> tuple[PrometheusStats, int]:
        port = free_port()
        stats = make_stats(port, "127.0.0.1")
        started.append(stats)
        assert isinstance(stats, PrometheusStats)
        return stats, port

    try:
        yield start
    finally:
        for stats in started:
            stats.close()


def test_noop_stats_accepts_every_call() -> None:
    stats = Stats()
    stats.received()
    stats.dead_lettered()
    stats.duplicate()
    stats.finished("completed", 0.01)
    stats.finished("failed", 1.5)
    stats.finished("cancelled", 0.0)
    stats.in_flight(3)
    stats.connected(reconnect=False)
    stats.connected(reconnect=True)
    stats.heartbeat_sent(1_700_000_000.0)
    stats.close()
    stats.close()


def test_make_stats_without_a_port_is_the_noop_stats() -> None:
    assert type(make_stats(None)) is Stats
    assert type(make_stats(None, "0.0.0.0")) is Stats


def test_base_install_never_imports_prometheus_client() -> None:
    code = (
        "import sys\n"
        "import chiffon_worker.cli, chiffon_worker.worker\n"
        "from chiffon_worker.stats import make_stats\n"
        "make_stats(None).received()\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"


def test_exporter_serves_on_the_port_it_was_given(
    exporter: Callable[[], tuple[PrometheusStats, int]],
) -> None:
    stats, port = exporter()
    assert stats.port == port
    assert f"{P}requests_received_total" in scrape(port)


def test_fresh_exporter_shows_every_metric_at_zero(
    exporter: Callable[[], tuple[PrometheusStats, int]],
) -> None:
    _, port = exporter()
    samples = scrape(port)
    for name in COUNTERS:
        assert samples[P + name] == 0, name
    assert samples[f"{P}task_duration_seconds_count"] == 0
    assert samples[f"{P}tasks_in_flight"] == 0
    assert samples[f"{P}last_heartbeat_timestamp_seconds"] == 0


def test_exporter_counts_each_call(exporter: Callable[[], tuple[PrometheusStats, int]]) -> None:
    stats, port = exporter()
    for _ in range(3):
        stats.received()
    stats.dead_lettered()
    stats.duplicate()
    stats.duplicate()
    stats.connected(reconnect=False)
    stats.connected(reconnect=True)
    stats.connected(reconnect=True)

    samples = scrape(port)

    assert samples[f"{P}requests_received_total"] == 3
    assert samples[f"{P}requests_dead_lettered_total"] == 1
    assert samples[f"{P}requests_duplicate_total"] == 2
    assert samples[f"{P}reconnects_total"] == 2


def test_finished_work_is_counted_by_status_and_timed(
    exporter: Callable[[], tuple[PrometheusStats, int]],
) -> None:
    stats, port = exporter()
    stats.finished("completed", 0.002)
    stats.finished("completed", 0.5)
    stats.finished("failed", 2.0)
    stats.finished("cancelled", 4000.0)

    samples = scrape(port)

    assert samples[f"{P}requests_completed_total"] == 2
    assert samples[f"{P}requests_failed_total"] == 2  # failed and cancelled both
    histogram = f"{P}task_duration_seconds"
    assert samples[f"{histogram}_count"] == 4
    assert samples[f"{histogram}_sum"] == pytest.approx(4002.502)
    assert samples[f'{histogram}_bucket{{le="0.001"}}'] == 0
    assert samples[f'{histogram}_bucket{{le="0.0025"}}'] == 1
    assert samples[f'{histogram}_bucket{{le="0.5"}}'] == 2
    assert samples[f'{histogram}_bucket{{le="2.5"}}'] == 3
    assert samples[f'{histogram}_bucket{{le="3600.0"}}'] == 3
    assert samples[f'{histogram}_bucket{{le="+Inf"}}'] == 4


def test_gauges_hold_the_latest_value(exporter: Callable[[], tuple[PrometheusStats, int]]) -> None:
    stats, port = exporter()
    stats.in_flight(4)
    stats.in_flight(2)
    stats.heartbeat_sent(1_700_000_000.5)
    stats.heartbeat_sent(1_700_000_060.25)

    samples = scrape(port)

    assert samples[f"{P}tasks_in_flight"] == 2
    assert samples[f"{P}last_heartbeat_timestamp_seconds"] == 1_700_000_060.25


def test_exporter_includes_process_metrics(
    exporter: Callable[[], tuple[PrometheusStats, int]],
) -> None:
    _, port = exporter()
    samples = scrape(port)
    assert samples["process_start_time_seconds"] > 0
    assert any(name.startswith("python_info") for name in samples)


def test_two_exporters_keep_separate_counts(
    exporter: Callable[[], tuple[PrometheusStats, int]],
) -> None:
    first, first_port = exporter()
    _, second_port = exporter()
    first.received()
    assert scrape(first_port)[f"{P}requests_received_total"] == 1
    assert scrape(second_port)[f"{P}requests_received_total"] == 0


def test_close_stops_serving_and_may_be_repeated() -> None:
    port = free_port()
    stats = make_stats(port)
    try:
        scrape(port)
    finally:
        stats.close()
    stats.close()
    with pytest.raises(urllib.error.URLError):
        scrape(port, timeout=2)


def test_taken_port_is_a_config_error_naming_the_setting_and_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^CHIFFON_METRICS_PORT: .*\b{port}\b.*in use"):
            make_stats(port, "127.0.0.1")


def test_address_not_on_this_host_is_a_config_error_naming_the_host() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never assigned to a local interface.
    with pytest.raises(ConfigError, match=r"^CHIFFON_METRICS_HOST: .*192\.0\.2\.1"):
        make_stats(free_port(), "192.0.2.1")


def test_missing_extra_is_a_config_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigError) as caught:
        make_stats(free_port())
    message = str(caught.value)
    assert message.startswith("CHIFFON_METRICS_PORT:")
    assert "pip install 'chiffon-worker[metrics]'" in message
