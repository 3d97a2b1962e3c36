"""Integration fixtures: a private vhost per test on the real RabbitMQ.

With CI=true a missing broker fails the run; on a laptop it skips.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chiffon_worker.config import Settings
from tests.helpers.broker import Orchestrator, Vhost, VhostPool, broker_reachable
from tests.helpers.ci import missing
from tests.helpers.playbooks import copy_playbooks
from tests.helpers.process import Launcher, WorkerProcess
from tests.helpers.proxy import TcpProxy
from tests.helpers.watchdog import NotifyListener

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def broker() -> None:
    if broker_reachable():
        return
    missing("RabbitMQ is not reachable on 127.0.0.1:5672")


@pytest.fixture(scope="session")
def vhost_pool(broker: None) -> Iterator[VhostPool]:
    with contextlib.closing(VhostPool()) as pool:
        yield pool


@pytest.fixture
def vhost(vhost_pool: VhostPool) -> Vhost:
    return vhost_pool.take()


@pytest.fixture
def orchestrator(vhost: Vhost) -> Iterator[Orchestrator]:
    with Orchestrator(vhost.url()) as peer:
        peer.watch("reply_queue")
        peer.watch("dlx_queue")
        yield peer


@pytest.fixture
def proxy(broker: None) -> Iterator[TcpProxy]:
    """A proxy in front of the broker that the test can cut, stall or close."""
    with contextlib.closing(TcpProxy()) as front:
        yield front


@pytest.fixture
def settings(vhost: Vhost) -> Settings:
    """Settings for an in-process worker on the test's vhost."""
    return Settings(amqp_url=vhost.url(), heartbeat_interval=60, shutdown_timeout=10)


@pytest.fixture
def spawn(vhost: Vhost, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `chiffon-worker run` processes on the vhost; all are killed after the test."""
    with Launcher(tmp_path) as launcher:

        def start(
            name: str = "worker", url: str | None = None, **settings: object
        ) -> WorkerProcess:
            return launcher.start(url or vhost.url(), name, **settings)

        yield start


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    """systemd's notify socket, played by the test (tests/helpers/watchdog.py)."""
    with contextlib.closing(NotifyListener(tmp_path / "notify")) as listener:
        yield listener


@pytest.fixture
def supervised(tmp_path: Path, notify: NotifyListener) -> Iterator[Callable[..., WorkerProcess]]:
    """start(url, **settings): a worker process as a Type=notify unit with WatchdogSec=4 would
    run it, pinging `notify`; all are killed after the test."""
    with Launcher(tmp_path, env=notify.env) as launcher:
        yield launcher.start


@pytest.fixture
def playbook_dir(tmp_path: Path) -> Path:
    """A copy of tests/playbooks, for a PlaybookWorker (tests/helpers/playbooks.py)."""
    return copy_playbooks(tmp_path)
