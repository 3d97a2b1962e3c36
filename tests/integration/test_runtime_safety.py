"""The runtime is safe by construction: no silence after a cut, no crash under
progress, the user's class left to the user (issue 9's "Must show").

Each test runs `chiffon-worker run` as a real process against the real broker.
Where systemd's watchdog matters, the test stands in for systemd: it binds the
NOTIFY_SOCKET datagram socket and time-stamps every notification
(tests/helpers/watchdog.py; the `notify` and `supervised` fixtures).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest

from tests.helpers.broker import Orchestrator, Vhost, work_request
from tests.helpers.process import WorkerProcess
from tests.helpers.proxy import TcpProxy
from tests.helpers.watchdog import MAX_WATCHDOG_GAP_S, NotifyListener, first_ping

pytestmark = pytest.mark.integration

# For `make test-slow`: real workers run for seconds on end (a cut, a
# minute-long outage, progress storms on every execution path, beats counted).
slow = pytest.mark.slow

Spawn = Callable[..., WorkerProcess]


def _via(proxy: TcpProxy, vhost: Vhost) -> str:
    return proxy.url(quote(vhost.name, safe=""))


def _busy_with(orchestrator: Orchestrator, request: dict[str, Any]) -> list[dict[str, Any]]:
    task_id = request["payload"]["task_id"]
    return [
        h
        for h in orchestrator.heartbeats()
        if h["payload"]["status"] == "busy" and h["payload"]["current_task_id"] == task_id
    ]


def _results_for(orchestrator: Orchestrator, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Every copy of the request's result that reached reply_queue (no deduplication)."""
    return [r for r in orchestrator.results() if r["request_id"] == request["request_id"]]


def _progress_for(orchestrator: Orchestrator, request: dict[str, Any]) -> int:
    task_id = request["payload"]["task_id"]
    return sum(
        1
        for m in orchestrator.received["reply_queue"]
        if m.get("type") == "work_status" and m["payload"].get("task_id") == task_id
    )


def _serve_until(orchestrator: Orchestrator, moment: float) -> None:
    """Keep the orchestrator's consumer running until the monotonic clock reads `moment`.

    Not a stand-in for synchronisation: the scenarios are defined by elapsed
    time ("4 s into the task", "a 60 s outage").
    """
    orchestrator.wait_until(
        lambda: time.monotonic() >= moment, moment - time.monotonic() + 5, "the clock"
    )


def _seconds_until(
    orchestrator: Orchestrator, condition: Callable[[], bool], timeout: float
) -> float | None:
    """How long until `condition()` held (the orchestrator consuming meanwhile); None: never."""
    started = time.monotonic()
    try:
        orchestrator.wait_until(condition, timeout)
    except AssertionError:
        return None
    return round(time.monotonic() - started, 2)


def _warnings(worker: WorkerProcess) -> list[str]:
    return [str(r.get("message")) for r in worker.records() if r.get("level") == "WARNING"]


def _stop_and_wait_offline(worker: WorkerProcess, orchestrator: Orchestrator) -> int:
    """SIGTERM; the offline beat follows everything the worker published before it."""
    code = worker.stop()
    orchestrator.wait_until(
        lambda: any(h["payload"]["status"] == "offline" for h in orchestrator.heartbeats()),
        10,
        "the offline heartbeat",
    )
    return code


# -- every execution path survives a cut --------------------------------------------


LongTask = tuple[WorkerProcess, float, dict[str, Any]]


@pytest.fixture
def long_inline_task(
    vhost: Vhost,
    orchestrator: Orchestrator,
    proxy: TcpProxy,
    notify: NotifyListener,
    supervised: Spawn,
) -> Callable[..., LongTask]:
    """start(seconds, message, running_for=...): a supervised worker behind the proxy, a
    slow_echo running on it for `running_for` s; (worker, first watchdog ping, request)."""

    def start(seconds: float, message: str, *, running_for: float) -> LongTask:
        worker = supervised(_via(proxy, vhost), heartbeat_interval=1)
        watched_from = first_ping(notify, orchestrator)
        task = work_request("slow_echo", {"seconds": seconds, "message": message})
        orchestrator.publish(task)
        orchestrator.wait_until(
            lambda: bool(_busy_with(orchestrator, task)), 20, "the task to start"
        )
        _serve_until(orchestrator, time.monotonic() + running_for)
        return worker, watched_from, task

    return start


def _finish(
    orchestrator: Orchestrator, notify: NotifyListener, run: LongTask, timeout: float
) -> tuple[dict[str, Any], float, list[str]]:
    """The task's result, the longest watchdog gap until it came, and (once the worker
    stopped cleanly) the warnings it logged."""
    worker, watched_from, task = run
    result = orchestrator.wait_for_result(task, timeout=timeout)["payload"]
    gap = notify.max_gap(watched_from, time.monotonic())
    assert _stop_and_wait_offline(worker, orchestrator) == 0
    return result, gap, _warnings(worker)


@slow
def test_a_cut_during_long_inline_work_keeps_heartbeats_watchdog_and_the_result(
    orchestrator: Orchestrator,
    proxy: TcpProxy,
    notify: NotifyListener,
    long_inline_task: Callable[..., LongTask],
) -> None:
    # Defaults: prefetch 1, early ack, no time limit: the task runs inline.
    run = long_inline_task(20, "through the cut", running_for=4)
    worker, _, task = run
    assert proxy.open_connections == 1, "the worker should still be on its first connection"

    busy_before = len(_busy_with(orchestrator, task))
    cut_at = time.monotonic()
    proxy.cut()
    _serve_until(orchestrator, cut_at + 11)
    busy_after_cut = len(_busy_with(orchestrator, task)) - busy_before

    result, gap, warnings = _finish(orchestrator, notify, run, timeout=30)
    print(
        f"\ncut during inline work: {busy_after_cut} busy heartbeats in the 11 s after the cut,"
        f" max watchdog gap {gap:.2f} s, {len(warnings)} warnings: {warnings}"
    )

    assert worker.messages().count("connection lost") == 1, "the cut went unnoticed"
    assert busy_after_cut >= 8
    assert gap <= MAX_WATCHDOG_GAP_S
    assert len(warnings) <= 10
    assert (result["status"], result["output"]) == ("completed", "through the cut")
    assert len(_results_for(orchestrator, task)) == 1


@slow
@pytest.mark.timeout(240)
def test_a_minute_long_broker_outage_during_long_work_keeps_the_watchdog_fed(
    orchestrator: Orchestrator,
    proxy: TcpProxy,
    notify: NotifyListener,
    long_inline_task: Callable[..., LongTask],
) -> None:
    run = long_inline_task(90, "outlived the outage", running_for=5)
    worker, _, task = run

    proxy.refuse()  # the broker is gone: new connections are closed at once...
    proxy.cut()  # ...and the current one with them
    down_at = time.monotonic()
    orchestrator.wait_until(
        lambda: "broker not reachable, retrying" in worker.messages(), 20, "a failed reconnect"
    )
    _serve_until(orchestrator, down_at + 60)
    busy_before = len(_busy_with(orchestrator, task))
    proxy.accept()
    reopened_at = time.monotonic()
    # Waits past the 5 s allowed, so a failure says how late the beats were.
    resumed_after = _seconds_until(
        orchestrator, lambda: len(_busy_with(orchestrator, task)) > busy_before, 35
    )

    result, gap, warnings = _finish(orchestrator, notify, run, timeout=60)
    outage_gap = notify.max_gap(down_at, reopened_at)
    print(
        f"\n60 s outage: heartbeats resumed {resumed_after} s after reopening,"
        f" max watchdog gap {gap:.2f} s (during the outage {outage_gap:.2f} s),"
        f" {len(warnings)} warnings"
    )

    assert resumed_after is not None, "no busy heartbeat within 35 s of the broker coming back"
    assert resumed_after <= 5
    assert gap <= MAX_WATCHDOG_GAP_S
    assert (result["status"], result["output"]) == ("completed", "outlived the outage")
    assert len(_results_for(orchestrator, task)) == 1


# -- progress storms ------------------------------------------------------------------

EXECUTION_PATHS = {
    "inline": {},
    "work_thread": {"default_max_duration": 600},
    "prefetch_4": {"prefetch": 4},
    "late_ack": {"ack_mode": "late"},
}


@slow
@pytest.mark.parametrize("path_settings", EXECUTION_PATHS.values(), ids=EXECUTION_PATHS.keys())
def test_progress_storms_complete_and_the_worker_survives(
    orchestrator: Orchestrator, spawn: Spawn, path_settings: dict[str, object]
) -> None:
    worker = spawn(worker="tests.helpers.workers:ProgressStormWorker", **path_settings)
    tasks = [work_request("storm", {"count": 3000}) for _ in range(4)]
    for task in tasks:
        orchestrator.publish(task)
    results = [orchestrator.wait_for_result(task, timeout=45)["payload"] for task in tasks]
    assert worker.process is not None
    alive = worker.process.poll() is None
    log = worker.log_path.read_text(errors="replace")
    errors = [r for r in worker.records() if r.get("level") in ("ERROR", "CRITICAL")]
    received = [_progress_for(orchestrator, task) for task in tasks]
    print(f"\nprogress reports received per task: {received}")

    assert [(r["status"], r["output"]) for r in results] == [("completed", "3000 reports")] * 4
    assert alive, f"the worker died: {log[-2000:]}"
    assert "Traceback" not in log
    assert not errors
    assert worker.stop() == 0


# -- the user's class is the user's ------------------------------------------------


@slow
def test_a_subclass_using_the_old_runtime_names_still_answers_beats_and_stops(
    orchestrator: Orchestrator, spawn: Spawn
) -> None:
    worker = spawn(worker="tests.helpers.workers:SquattingWorker", heartbeat_interval=1)
    orchestrator.wait_until(lambda: bool(orchestrator.heartbeats()), 20, "the first heartbeat")
    first_beat = time.monotonic()
    request = work_request("echo", {"message": "mine"})
    orchestrator.publish(request)
    result = orchestrator.wait_for_result(request)["payload"]
    _serve_until(orchestrator, first_beat + 4)
    beats = len(orchestrator.heartbeats()) - 1  # after the one sent on connecting
    print(f"\nsquatting subclass: {beats} heartbeats in the ~4 s after the first")

    assert (result["status"], result["output"]) == ("completed", "mine")
    assert beats >= 3
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert "stopped" in worker.messages()


# A TypeError once passed for a configuration error (exit 78, never restarted).
@pytest.mark.parametrize("worker_class", ["BrokenInitWorker", "TypeErrorInitWorker"])
def test_a_bug_in_the_subclass_init_shows_its_traceback_and_exits_for_a_restart(
    spawn: Spawn, worker_class: str
) -> None:
    worker = spawn(worker=f"tests.helpers.workers:{worker_class}")
    code = worker.wait(timeout=30)
    output = worker.log_path.read_text(errors="replace")

    assert code not in (0, 77, 78)
    assert "Traceback" in output
    assert "boom in init" in output


def test_capabilities_without_work_types_are_a_one_line_configuration_error(
    spawn: Spawn,
) -> None:
    worker = spawn(worker="tests.helpers.workers:NoWorkTypesWorker")
    code = worker.wait(timeout=30)
    output = worker.log_path.read_text(errors="replace")
    lines = [line for line in output.splitlines() if "configuration error" in line]

    assert code == 78
    assert len(lines) == 1, output
    assert "work_types" in lines[0]
    assert "Traceback" not in output
