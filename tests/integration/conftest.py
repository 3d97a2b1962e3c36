"""Integration fixtures: a private vhost per test on the real RabbitMQ.

With CI=true a missing broker fails the run; on a laptop it skips.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chiffon_worker.config import Settings
from tests.helpers.broker import Orchestrator, Vhost, VhostPool, broker_reachable
from tests.helpers.ci import missing
from tests.helpers.process import WorkerProcess
from tests.helpers.proxy import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def broker() -> None:
    if broker_reachable():
        return
    missing("RabbitMQ is not reachable on 127.0.0.1:5672")


@pytest.fixture(scope="session")
def vhost_pool(broker: None) -> Iterator[VhostPool]:
    pool = VhostPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def vhost(vhost_pool: VhostPool) -> Vhost:
    return vhost_pool.take()


@pytest.fixture
def orchestrator(vhost: Vhost) -> Iterator[Orchestrator]:
    peer = Orchestrator(vhost.url())
    peer.watch("reply_queue")
    peer.watch("dlx_queue")
    try:
        yield peer
    finally:
        peer.close()


@pytest.fixture
def proxy(broker: None) -> Iterator[TcpProxy]:
    """A proxy in front of the broker that the test can cut, stall or close."""
    front = TcpProxy()
    try:
        yield front
    finally:
        front.close()


@pytest.fixture
def settings(vhost: Vhost) -> Settings:
    """Settings for an in-process worker on the test's vhost."""
    return Settings(amqp_url=vhost.url(), heartbeat_interval=60, shutdown_timeout=10)


@pytest.fixture
def spawn(vhost: Vhost, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `chiffon-worker run` processes on the vhost; all are killed after the test."""
    started: list[WorkerProcess] = []

    def start(name: str = "worker", url: str | None = None, **settings: object) -> WorkerProcess:
        process = WorkerProcess(url or vhost.url(), tmp_path / f"{name}.log", **settings)
        started.append(process.start())
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill()
