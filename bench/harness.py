"""Publishing requests, collecting replies, timing the scenarios.

Each scenario run gets a fresh worker process, freshly purged queues and a fresh
reply collector. Every wait is bounded: a lost reply or a dead worker ends the
scenario with a :class:`BenchError` that says what was missing.
"""

import contextlib
import itertools
import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from bench.broker import (
    DLX_QUEUE,
    REPLY_QUEUE,
    WORK_QUEUE,
    connection_parameters,
    declare_topology,
    server_version,
)
from bench.workers import BenchError, WorkerProcess, ours_env, worker_command

READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 15.0
IDLE_SETTLE_S = 1.0
WAIT_SLICE_S = 0.2

REQUEST_PROPERTIES = pika.BasicProperties(content_type="application/json", priority=3)


# --------------------------------------------------------------------------- requests


def make_request(work_type: str, parameters: dict[str, Any]) -> tuple[str, bytes]:
    """A fresh work_request envelope; returns ``(task_id, body)``.

    message_id, trace_id, request_id and task_id are all new uuid4s, so the worker's
    request_id deduplication never folds two benchmark requests into one.
    """
    task_id = str(uuid.uuid4())
    envelope: dict[str, Any] = {
        "protocol_version": "1.0",
        "message_id": str(uuid.uuid4()),
        "from_agent": "orchestrator",
        "to_agent": "infra",
        "timestamp": datetime.now(UTC).isoformat(),
        "trace_id": str(uuid.uuid4()),
        "request_id": str(uuid.uuid4()),
        "type": "work_request",
        "priority": 3,
        "payload": {
            "task_id": task_id,
            "work_type": work_type,
            "parameters": parameters,
            "hints": {},
        },
        "x_custom_fields": {},
    }
    return task_id, json.dumps(envelope).encode()


def echo_request(index: int) -> tuple[str, bytes]:
    return make_request("echo", {"message": f"chiffon bench message {index:06d}"})


# --------------------------------------------------------------------------- broker side


class Session:
    """The harness's own connection: topology, purges, consumer counts, publishing."""

    def __init__(self, vhost: str) -> None:
        self.connection = pika.BlockingConnection(connection_parameters(vhost))
        self.channel = self.connection.channel()

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def declare_topology(self) -> None:
        declare_topology(self.channel)

    def server_version(self) -> str:
        return server_version(self.connection)

    def purge_all(self) -> None:
        for queue in (WORK_QUEUE, REPLY_QUEUE, DLX_QUEUE):
            self.channel.queue_purge(queue)

    def consumer_count(self, queue: str) -> int:
        frame = self.channel.queue_declare(queue, passive=True)
        return int(frame.method.consumer_count)

    def publish(self, body: bytes) -> None:
        self.channel.basic_publish("", WORK_QUEUE, body, REQUEST_PROPERTIES)


@dataclass
class Reply:
    arrival: float
    payload: dict[str, Any]


class Collector:
    """Consumes ``reply_queue`` in a thread (own connection) and records arrival times.

    Results are keyed by task_id; heartbeats (work_status with ``agent_id`` and no
    ``task_id``) are kept as ``(arrival, status)``; anything else is only counted.
    Arrival times are ``time.perf_counter()`` values taken as the message is handled.
    """

    def __init__(self, vhost: str) -> None:
        self._params = connection_parameters(vhost)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._consuming = threading.Event()
        self._failure: BaseException | None = None
        self.results: dict[str, Reply] = {}
        self.heartbeats: list[tuple[float, str]] = []
        self.others = 0
        self.pending: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="reply-collector", daemon=True)

    def start(self, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._consuming.wait(WAIT_SLICE_S):
            self._raise_failure()
            if time.monotonic() > deadline:
                raise BenchError(f"reply collector not consuming after {timeout_s:g} s")
        self._raise_failure()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        connection: pika.BlockingConnection | None = None
        try:
            connection = pika.BlockingConnection(self._params)
            channel = connection.channel()
            channel.basic_consume(REPLY_QUEUE, self._on_message, auto_ack=True)
            self._consuming.set()
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.1)
        except BaseException as exc:
            with self._cond:
                self._failure = exc
                self._cond.notify_all()
        finally:
            if connection is not None and connection.is_open:
                try:
                    connection.close()
                except Exception as exc:
                    print(f"warning: closing the reply collector: {exc}")

    def _on_message(
        self, ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        arrival = time.perf_counter()
        try:
            message = json.loads(body)
            kind = message.get("type")
            payload = message.get("payload")
        except (ValueError, AttributeError):
            kind, payload = None, None
        with self._cond:
            if not isinstance(payload, dict):
                self.others += 1
            elif kind == "work_result" and "task_id" in payload:
                task_id = str(payload["task_id"])
                self.results[task_id] = Reply(arrival, payload)
                self.pending.discard(task_id)
            elif kind == "work_status" and "agent_id" in payload and "task_id" not in payload:
                self.heartbeats.append((arrival, str(payload.get("status"))))
            else:
                self.others += 1
            self._cond.notify_all()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise BenchError(f"reply collector failed: {self._failure!r}") from self._failure

    def wait_until(
        self,
        done: Callable[[], bool],
        timeout_s: float,
        what: str,
        check: Callable[[], None] | None = None,
    ) -> None:
        """Wait until ``done()`` (called under the lock) holds, at most ``timeout_s``.

        ``check`` runs every slice outside the lock (e.g. "is the worker still alive")
        and may raise to end the wait early.
        """
        deadline = time.monotonic() + timeout_s
        while not self.wait_for(done, min(WAIT_SLICE_S, max(deadline - time.monotonic(), 0))):
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise BenchError(f"timeout after {timeout_s:g} s waiting for {what}")

    def wait_for(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` for ``done()`` (called under the lock); its last value.

        Raises only if the collector itself has failed.
        """
        with self._cond:
            met = self._cond.wait_for(lambda: done() or self._failure is not None, timeout_s)
            self._raise_failure()
            return bool(met)

    def wait_result(self, task_id: str, timeout_s: float, check: Callable[[], None]) -> Reply:
        self.wait_until(lambda: task_id in self.results, timeout_s, f"result {task_id}", check)
        return self.results[task_id]

    def expect(self, task_ids: Iterable[str]) -> None:
        """Track ``task_ids`` in :attr:`pending` until their results arrive."""
        with self._cond:
            self.pending = {t for t in task_ids if t not in self.results}

    def pending_count(self) -> int:
        with self._cond:
            return len(self.pending)

    def heartbeat_count(self) -> int:
        with self._cond:
            return len(self.heartbeats)

    def heartbeats_since(self, index: int) -> list[tuple[float, str]]:
        with self._cond:
            return list(self.heartbeats[index:])


def require_completed(replies: Iterable[Reply]) -> None:
    """Raise if any result is not ``completed`` (a failing worker gives no figure)."""
    bad = [r for r in replies if r.payload.get("status") != "completed"]
    if bad:
        first = bad[0].payload
        raise BenchError(
            f"{len(bad)} result(s) not completed, e.g. status={first.get('status')!r} "
            f"error_message={first.get('error_message')!r}"
        )


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Settings:
    rounds: int
    n_throughput: int
    n_latency: int
    warmup: int
    idle_s: float
    slow_echo_s: float
    heartbeat_interval_s: float


@dataclass
class RunContext:
    key: str
    settings: Settings
    session: Session
    collector: Collector
    worker: WorkerProcess


@dataclass
class Outcome:
    figures: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


def send_and_wait(ctx: RunContext, body: bytes, task_id: str) -> tuple[float, Reply]:
    sent = time.perf_counter()
    ctx.session.publish(body)
    reply = ctx.collector.wait_result(task_id, REQUEST_TIMEOUT_S, ctx.worker.check_alive)
    return sent, reply


def warm_up(ctx: RunContext) -> None:
    for i in range(ctx.settings.warmup):
        task_id, body = echo_request(i)
        _, reply = send_and_wait(ctx, body, task_id)
        require_completed([reply])


def scenario_throughput(ctx: RunContext) -> Outcome:
    """N echo requests published back to back; first publish to last result. Then RSS."""
    warm_up(ctx)
    n = ctx.settings.n_throughput
    collector = ctx.collector
    requests = [echo_request(i) for i in range(n)]
    collector.expect(task_id for task_id, _ in requests)
    cpu_before = ctx.worker.cpu_seconds_schedstat()
    first_publish = time.perf_counter()
    for _, body in requests:
        ctx.session.publish(body)
    published = time.perf_counter()

    # Bounded twice: no new result for STALL_TIMEOUT_S, and an overall cap.
    overall = time.monotonic() + 60.0 + n / 20.0
    last_count, last_progress = n, time.monotonic()
    while not collector.wait_for(lambda: not collector.pending, 1.0):
        ctx.worker.check_alive()
        count, now = collector.pending_count(), time.monotonic()
        if count < last_count:
            last_count, last_progress = count, now
        elif now - last_progress > STALL_TIMEOUT_S or now > overall:
            raise BenchError(
                f"timeout: {n - count}/{n} results, none new for {now - last_progress:.0f} s"
            )
    replies = [collector.results[task_id] for task_id, _ in requests]
    require_completed(replies)
    elapsed = max(r.arrival for r in replies) - first_publish
    rss = ctx.worker.rss_mib()
    cpu_after = ctx.worker.cpu_seconds_schedstat()
    figures = {"throughput": n / elapsed, "rss": rss}
    if cpu_before is not None and cpu_after is not None:
        # What one message costs the worker in CPU, whatever else shares the machine.
        figures["cpu_per_message"] = (cpu_after - cpu_before) / n * 1e6
    return Outcome(
        figures,
        {
            "n": n,
            "seconds": round(elapsed, 4),
            "publish_seconds": round(published - first_publish, 4),
        },
    )


def percentile(values: list[float], pct: float) -> float:
    """Linear-interpolated percentile (``pct`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def scenario_latency(ctx: RunContext) -> Outcome:
    """Sequential round trips: publish one request, wait for its result, repeat."""
    warm_up(ctx)
    samples: list[float] = []
    for i in range(ctx.settings.n_latency):
        task_id, body = echo_request(i)
        sent, reply = send_and_wait(ctx, body, task_id)
        require_completed([reply])
        samples.append((reply.arrival - sent) * 1000.0)
    return Outcome(
        {"latency_p50": percentile(samples, 50), "latency_p99": percentile(samples, 99)},
        {
            "n": len(samples),
            "mean_ms": round(statistics.fmean(samples), 4),
            "max_ms": round(max(samples), 4),
        },
    )


def scenario_idle(ctx: RunContext) -> Outcome:
    """CPU share of the idle worker process: cpu_times delta over wall time."""
    time.sleep(IDLE_SETTLE_S)
    worker = ctx.worker
    cpu0, fine0, wall0 = worker.cpu_seconds(), worker.cpu_seconds_schedstat(), time.monotonic()
    time.sleep(ctx.settings.idle_s)
    cpu1, fine1, wall1 = worker.cpu_seconds(), worker.cpu_seconds_schedstat(), time.monotonic()
    wall = wall1 - wall0
    details: dict[str, Any] = {
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round(cpu1 - cpu0, 4),
        # cpu_times counts clock ticks (10 ms): over 3 s that is 0.33 % per tick.
        "resolution_pct": round(100.0 * 0.01 / wall, 3),
    }
    figures = {"idle_cpu": 100.0 * (cpu1 - cpu0) / wall}
    if fine0 is not None and fine1 is not None:
        figures["idle_cpu_schedstat"] = 100.0 * (fine1 - fine0) / wall
    return Outcome(figures, details)


def scenario_heartbeat(ctx: RunContext) -> Outcome:
    """Heartbeat gaps while a slow_echo keeps the worker busy (chiffon-worker only).

    The window runs from the last heartbeat before the request to the first heartbeat
    after its result, so a heartbeat thread that stalls during the work shows up as
    one long gap. Lateness = max(gap - interval) over consecutive heartbeats.
    """
    settings, collector = ctx.settings, ctx.collector
    interval = settings.heartbeat_interval_s
    task_id, body = make_request("slow_echo", {"seconds": settings.slow_echo_s})
    start_index = collector.heartbeat_count() - 1
    sent = time.perf_counter()
    ctx.session.publish(body)
    reply = collector.wait_result(
        task_id, settings.slow_echo_s + STALL_TIMEOUT_S, ctx.worker.check_alive
    )
    require_completed([reply])
    collector.wait_until(
        lambda: collector.heartbeats[-1][0] > reply.arrival,
        5 * interval + 5.0,
        "a heartbeat after the slow_echo result",
        ctx.worker.check_alive,
    )
    window: list[tuple[float, str]] = []
    for arrival, status in collector.heartbeats_since(max(start_index, 0)):
        window.append((arrival, status))
        if arrival > reply.arrival:
            break
    if len(window) < 2:
        raise BenchError("fewer than two heartbeats around the slow_echo request")
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(window)]
    busy = sum(
        1 for arrival, status in window if sent < arrival < reply.arrival and status == "busy"
    )
    return Outcome(
        {"hb_lateness": max(gap - interval for gap in gaps)},
        {
            "work_seconds": round(reply.arrival - sent, 3),
            "heartbeats": len(window),
            "busy_heartbeats": busy,
            "max_gap_seconds": round(max(gaps), 4),
        },
    )


SCENARIOS: dict[str, Callable[[RunContext], Outcome]] = {
    "throughput": scenario_throughput,
    "latency": scenario_latency,
    "idle": scenario_idle,
    "heartbeat": scenario_heartbeat,
}
OURS_ONLY: frozenset[str] = frozenset({"heartbeat"})


# --------------------------------------------------------------------------- the runs


def wait_ready(ctx: RunContext) -> float:
    """Wait until the worker consumes work_queue (and, for ours, has sent a heartbeat).

    Returns the seconds from process start to ready.
    """
    started = time.monotonic()
    if ctx.key == "ours":
        ctx.collector.wait_until(
            lambda: bool(ctx.collector.heartbeats),
            READY_TIMEOUT_S,
            "the first heartbeat of chiffon-worker on reply_queue",
            ctx.worker.check_alive,
        )
    deadline = started + READY_TIMEOUT_S
    while ctx.session.consumer_count(WORK_QUEUE) < 1:
        ctx.worker.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"worker {ctx.key}: no consumer on {WORK_QUEUE} after ready timeout")
        time.sleep(0.05)
    return time.monotonic() - started


class SkipWorkerError(BenchError):
    """This worker cannot be benchmarked at all (for the rest of the run)."""


@dataclass
class BenchResults:
    server_version: str = "unknown"
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Bench:
    """Runs every scenario for every worker, alternating workers within each round."""

    def __init__(
        self,
        vhost: str,
        url: str,
        settings: Settings,
        workers: list[str],
        scenarios: list[str],
        logs_dir: Path,
        say: Callable[[str], None] = print,
    ) -> None:
        self.vhost = vhost
        self.url = url
        self.settings = settings
        self.workers = workers
        self.scenarios = scenarios
        self.logs_dir = logs_dir
        self.say = say
        self.results = BenchResults()
        self.session: Session | None = None

    def run(self) -> BenchResults:
        try:
            session = self._session()
            session.declare_topology()
            self.results.server_version = session.server_version()
            for round_no in range(1, self.settings.rounds + 1):
                for scenario in self.scenarios:
                    for key in self.workers:
                        if key in self.results.skipped:
                            continue
                        if scenario in OURS_ONLY and key != "ours":
                            continue
                        self._run_one(round_no, scenario, key)
        finally:
            if self.session is not None:
                with contextlib.suppress(Exception):
                    self.session.close()
        return self.results

    def _session(self) -> Session:
        if self.session is None or not self.session.channel.is_open:
            if self.session is not None:
                with contextlib.suppress(Exception):
                    self.session.close()
            self.session = Session(self.vhost)
        return self.session

    def _run_one(self, round_no: int, scenario: str, key: str) -> None:
        where = f"round {round_no}/{self.settings.rounds}"
        label = f"{where} {scenario:<10} {key:<4}"
        record: dict[str, Any] = {"round": round_no, "scenario": scenario, "worker": key}
        self.results.runs.append(record)
        try:
            outcome, record["ready_seconds"], record["exit"] = self._attempt(
                round_no, scenario, key
            )
        except SkipWorkerError as exc:
            self.results.skipped[key] = str(exc)
            record["error"] = str(exc)
            self.say(f"{label} SKIPPED from now on: {exc}")
            return
        except (BenchError, pika.exceptions.AMQPError) as exc:
            message = str(exc) or repr(exc)
            record["error"] = message
            self.results.errors.append(f"{where} {scenario} {key}: {message}")
            self.say(f"{label} ERROR: {message}")
            return
        record["figures"] = outcome.figures
        record["details"] = outcome.details
        for figure, value in outcome.figures.items():
            self.results.samples.setdefault(figure, {}).setdefault(key, []).append(value)
        if record["exit"] != 0:
            self.results.notes.append(
                f"{key} ({scenario}, round {round_no}) did not exit cleanly on SIGTERM: "
                f"{record['exit']}"
            )
        shown = ", ".join(f"{name} {value:.4g}" for name, value in outcome.figures.items())
        self.say(f"{label} {shown}  (ready {record['ready_seconds']:.2f} s)")

    def _attempt(self, round_no: int, scenario: str, key: str) -> tuple[Outcome, float, Any]:
        session = self._session()
        session.purge_all()
        collector = Collector(self.vhost)
        try:
            collector.start()
            env = ours_env(self.url, self.settings.heartbeat_interval_s) if key == "ours" else None
            log_path = self.logs_dir / f"{key}-{scenario}-r{round_no}.log"
            worker = WorkerProcess(key, worker_command(key, self.url), env, log_path)
            with worker:
                ctx = RunContext(key, self.settings, session, collector, worker)
                try:
                    ready = wait_ready(ctx)
                except BenchError as exc:
                    if key == "ours":
                        raise SkipWorkerError(
                            f"chiffon-worker did not become ready: {exc}"
                        ) from exc
                    raise
                outcome = SCENARIOS[scenario](ctx)
            stop = worker.stop_outcome
            exit_info: Any = (
                0
                if stop is None or stop.clean
                else ("killed after SIGTERM timeout" if stop.killed else stop.returncode)
            )
            return outcome, ready, exit_info
        finally:
            collector.close()
