"""The three-node cluster (started once per session) and what every cluster test uses.

Each test gets a fresh vhost (cluster-wide, so its queues are its own) and
finds every node running again afterwards. Only `make test-cluster` runs
these tests (marker `cluster`); plain `pytest` deselects them.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from chiffon_worker.amqp import node_order
from tests.helpers.broker import work_request
from tests.helpers.ci import missing
from tests.helpers.cluster import Cluster, start_cluster
from tests.helpers.process import Launcher, WorkerProcess
from tests.helpers.soak_worker import RUNS_FILE_VARIABLE
from tests.helpers.tls_node import NodeUnavailable

SOAK_WORKER = "tests.helpers.soak_worker:SoakWorker"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="chiffon-cluster-", ignore_cleanup_errors=True) as base:
        try:
            started = start_cluster(Path(base))
        except NodeUnavailable as exc:
            missing(f"cannot start a three-node RabbitMQ cluster: {exc}")
        try:
            yield started
        finally:
            started.stop()


@pytest.fixture
def vhost(cluster: Cluster) -> Iterator[str]:
    name = cluster.add_vhost()
    try:
        yield name
    finally:
        cluster.start_stopped()
        cluster.delete_vhost(name)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start SoakWorker processes (each execution recorded in runs-NAME.txt); killed after."""
    with Launcher(tmp_path) as launcher:

        def start(name: str, urls: list[str], **settings: object) -> WorkerProcess:
            settings.setdefault("worker", SOAK_WORKER)
            runs_file = {RUNS_FILE_VARIABLE: str(tmp_path / f"runs-{name}.txt")}
            return launcher.start(",".join(urls), name, env=runs_file, **settings)

        yield start


def agent_landing_on(urls: list[str], first: str) -> str:
    """An agent_id whose node order starts with `first` (the worker's own shuffle decides)."""
    while True:
        agent = str(uuid.uuid4())
        if node_order(urls, agent)[0] == first:
            return agent


def runs(worker: WorkerProcess) -> list[str]:
    """The task_id of every execution the SoakWorker recorded."""
    path = Path(worker.env[RUNS_FILE_VARIABLE])
    return path.read_text().split() if path.exists() else []


def wait_for_record(
    worker: WorkerProcess, message: str, timeout: float, after: int = 0, **fields: Any
) -> tuple[int, dict[str, Any]]:
    """The first log record from index `after` with this message (and fields); (index, record).

    Polls the log file, so the moment it is seen is within 20 ms of it being written.
    """
    deadline = time.monotonic() + timeout
    ready = threading.Event()
    while True:
        records = worker.records()
        for index in range(after, len(records)):
            record = records[index]
            if record.get("message", "").startswith(message) and all(
                record.get(k) == v for k, v in fields.items()
            ):
                return index, record
        if time.monotonic() > deadline:
            tail = "\n".join(json.dumps(r) for r in records[-15:])
            raise AssertionError(f"no {message!r} {fields} within {timeout} s; log ends:\n{tail}")
        if worker.process is not None and worker.process.poll() is not None:
            raise AssertionError(f"worker exited ({worker.process.returncode}) before {message!r}")
        ready.wait(0.02)  # a file has no event to wait on: look again shortly


class Operator:
    """Declares the topology an operator owns, on one node, as the operator would."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()

    def declare(self, *, queue_type: str | None, work_queue: bool = True) -> None:
        """PROTOCOL.md's topology, the queues of type `queue_type` (None: as the protocol says)."""
        dead_letter = {"x-dead-letter-exchange": "dlx_exchange"}
        typed = {"x-queue-type": queue_type} if queue_type else {}
        channel = self.channel
        channel.exchange_declare("broadcast_exchange", exchange_type="fanout", durable=False)
        channel.exchange_declare("dlx_exchange", exchange_type="direct", durable=True)
        channel.queue_declare("dlx_queue", durable=True, arguments={"x-max-length": 10000, **typed})
        for key in ("", "work_queue", "reply_queue"):
            channel.queue_bind("dlx_queue", "dlx_exchange", key)
        if work_queue:
            # Quorum queues on RabbitMQ 3.x have no priorities: the operator leaves it out.
            priority = {} if queue_type == "quorum" else {"x-max-priority": 5}
            channel.queue_declare(
                "work_queue", durable=True, arguments={**priority, **dead_letter, **typed}
            )
        channel.queue_declare("reply_queue", durable=True, arguments={**dead_letter, **typed})

    def depth(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


class Publisher(threading.Thread):
    """Publishes `count` echo requests at `rate` per second, confirmed, from its own thread."""

    def __init__(self, url: str, count: int, rate: float, priority: int = 4) -> None:
        super().__init__(name="cluster-publisher", daemon=True)
        self.url = url
        self.requests = [work_request(priority=priority) for _ in range(count)]
        self.rate = rate
        self.priority = priority
        self.sent = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._pace = threading.Event()  # never set: paces the stream, wakes nobody

    def run(self) -> None:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
            channel = connection.channel()
            channel.confirm_delivery()
            start = time.monotonic()
            properties = pika.BasicProperties(
                content_type="application/json", priority=self.priority, delivery_mode=2
            )
            for number, request in enumerate(self.requests):
                due = start + number / self.rate
                self._pace.wait(max(0.0, due - time.monotonic()))
                body = json.dumps(request).encode()
                channel.basic_publish("", "work_queue", body, properties, mandatory=True)
                self.sent += 1
            connection.close()
        except BaseException as exc:  # reported by the test, on its own thread
            self.error = exc
        finally:
            self.done.set()


class Collector:
    """Consumes reply_queue on one node; results by request_id, with when each came."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.results: dict[str, list[float]] = {}
        self.heartbeats: list[float] = []
        self.channel.basic_consume("reply_queue", self._on_message, auto_ack=True)

    def _on_message(self, _ch: Any, _method: Any, _props: Any, body: bytes) -> None:
        message = json.loads(body)
        now = time.monotonic()
        if message.get("type") == "work_result":
            self.results.setdefault(message["request_id"], []).append(now)
        elif "agent_id" in message.get("payload", {}):
            self.heartbeats.append(now)

    def serve(self, seconds: float) -> None:
        self.connection.process_data_events(time_limit=seconds)

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self.connection.process_data_events(time_limit=min(left, 0.1))

    def longest_gap(self, after: float) -> float:
        """The longest pause between results (first arrivals) after `after`."""
        times = sorted(t[0] for t in self.results.values() if t[0] >= after)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()
