"""run_process with real child processes: output, early ends, the whole tree killed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import psutil
import pytest

from chiffon_worker.context import TaskContext, enter_task, leave_task
from chiffon_worker.process import ProcessResult, run_process
from chiffon_worker.protocol import WorkRequest, WorkStatus
from tests.helpers.leftovers import processes_with, sleep_token


@dataclass
class Record:
    """The runtime's record of a task, as far as run_process looks at it."""

    cancel_reason: str | None = None
    timed_out: bool = False
    _event: threading.Event = field(default_factory=threading.Event)

    def cancel(self, reason: str, *, timed_out: bool = False) -> None:
        self.timed_out = timed_out
        self.cancel_reason = reason
        self._event.set()

    def wait_cancelled(self, timeout: float) -> bool:
        return self._event.wait(timeout)


def make_context(record: Record, kill_grace: float = 10.0) -> TaskContext:
    request = WorkRequest.model_validate(
        {"task_id": str(uuid.uuid4()), "work_type": "run", "parameters": {}}
    )

    def post(_record: Record, _status: WorkStatus) -> None:
        pass

    return TaskContext(request, record, threading.Event(), post, kill_grace=kill_grace)


def cancel_after(record: Record, seconds: float, reason: str) -> threading.Timer:
    timer = threading.Timer(seconds, record.cancel, args=(reason,))
    timer.start()
    return timer


def test_lines_stream_as_they_come_and_the_tail_keeps_the_last_ones() -> None:
    seen: list[tuple[str, str]] = []

    result = run_process(
        ["sh", "-c", "for i in 1 2 3 4 5; do echo out$i; done; echo oops >&2; exit 3"],
        on_line=lambda stream, line: seen.append((stream, line)),
        tail_lines=3,
    )

    assert [line for stream, line in seen if stream == "stdout"] == [f"out{i}" for i in range(1, 6)]
    assert ("stderr", "oops") in seen
    assert result.returncode == 3
    assert not result.cancelled
    assert len(result.output_tail.splitlines()) == 3
    assert result.output_tail.splitlines()[-1] in ("oops", "out5")


def test_a_shell_string_is_refused() -> None:
    with pytest.raises(TypeError, match="not a shell string"):
        run_process("echo hi")  # type: ignore[arg-type]


def test_fifty_megabytes_without_a_newline_are_cut_not_kept() -> None:
    script = "import sys\nfor _ in range(50): sys.stdout.write('x' * 1_000_000)\n"
    rss_before = psutil.Process().memory_info().rss

    result = run_process([sys.executable, "-c", script], max_line_bytes=4096, timeout=60)

    assert result.returncode == 0
    assert result.lines_cut == 1
    assert len(result.output_tail) < 4096 + 100
    assert result.output_tail.endswith(f"[... {50_000_000 - 4096} bytes cut]")
    # Bounded memory: nothing near the 50 MB it printed stayed with us.
    assert psutil.Process().memory_info().rss - rss_before < 20 * 2**20


def test_a_child_that_closes_its_output_but_runs_on_is_still_ended_by_the_timeout() -> None:
    token = sleep_token()
    started = time.monotonic()

    result = run_process(["sh", "-c", f"exec >&- 2>&-; sleep 60 {token}"], timeout=1, grace=1)

    assert time.monotonic() - started < 4
    assert result.timed_out
    assert result.cancelled
    assert result.returncode < 0
    assert processes_with(token) == []


def test_a_cancel_ends_a_child_that_obeys_sigterm_within_a_second() -> None:
    record = Record()
    context = make_context(record, kill_grace=10)
    token = sleep_token()
    timer = cancel_after(record, 0.5, "operator said stop")
    try:
        result = run_process(["sh", "-c", f"sleep 60 {token}"], task=context)
    finally:
        timer.cancel()

    latency = result.duration_ms / 1000 - 0.5
    assert latency < 1.0
    assert (result.cancelled, result.killed, result.timed_out) == (True, False, False)
    assert result.end_reason == "operator said stop"
    assert processes_with(token) == []


def test_the_whole_tree_dies_even_descendants_in_their_own_session_ignoring_sigterm() -> None:
    token = sleep_token()
    # One grandchild in its own session that ignores SIGTERM, and one started
    # by a subshell that exits at once: reparented to init, found by the mark.
    script = (
        f"setsid sh -c 'trap \"\" TERM; sleep 120 {token}' & "
        f"(setsid sleep 121 {token} >/dev/null 2>&1 &) ; "
        f"sleep 60 {token}"
    )
    record = Record()
    context = make_context(record, kill_grace=1)
    sleeping: list[int] = []

    def count_then_cancel() -> None:
        sleeping[:] = [p for p in processes_with(token) if psutil.Process(p).name() == "sleep"]
        record.cancel("time limit of 1 s exceeded", timed_out=True)

    # Started in a task, as the runtime runs work: the current task's flag counts.
    token_ctx = enter_task(context)
    timer = threading.Timer(1.0, count_then_cancel)
    try:
        timer.start()
        result = run_process(["sh", "-c", script])
    finally:
        leave_task(token_ctx)
        timer.cancel()

    assert len(sleeping) == 3, "the three sleeps were not all running when the cancel came"
    assert result.killed
    assert result.timed_out
    # The cancel came at 1 s; then 1 s of grace; then SIGKILL.
    assert result.duration_ms / 1000 < 1.0 + 1.0 + 2.0
    assert processes_with(token) == []


def test_an_exception_from_on_line_kills_the_child_and_propagates() -> None:
    token = sleep_token()

    calls = []

    def explode(_stream: str, line: str) -> None:
        calls.append(line)
        raise ValueError("bad line")

    # The partial line left at the end must not make on_line raise a second time.
    script = f"printf 'first\\npartial'; sleep 60 {token}"
    with pytest.raises(ValueError, match="bad line"):
        run_process(["sh", "-c", script], on_line=explode)

    assert calls == ["first"]

    assert processes_with(token) == []


def test_the_childrens_cpu_time_counts_into_the_task() -> None:
    record = Record()
    context = make_context(record)
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    # A grandchild's CPU counts too: the child waits for it.
    script = f"{sys.executable} -c '{burn}'; {sys.executable} -c '{burn}'"

    result = context.run_process(["sh", "-c", script])

    assert result.cpu_time_ms >= 500
    assert result.memory_peak_mb > 1
    assert context.children_cpu_time_ms == result.cpu_time_ms
    assert result.resources_used()["children_cpu_time_ms"] == result.cpu_time_ms


def test_it_reaps_only_its_own_child() -> None:
    other = subprocess.Popen(["sh", "-c", "exit 7"])
    try:
        run_process(["sh", "-c", "sleep 0.2"])
    finally:
        # Still ours to reap: run_process never waited for "any child".
        assert other.wait(timeout=5) == 7


@pytest.mark.parametrize(
    ("returncode", "cancelled", "status", "exit_code", "says"),
    [
        (0, False, "completed", 0, None),
        (2, False, "failed", 2, "exited with status 2"),
        (-9, False, "failed", 137, "killed by signal 9"),
        (-15, True, "failed", 143, "ended early: the worker's shutdown timeout passed"),
    ],
)
def test_work_result_says_how_the_process_ended(
    returncode: int, cancelled: bool, status: str, exit_code: int, says: str | None
) -> None:
    request = WorkRequest.model_validate(
        {"task_id": str(uuid.uuid4()), "work_type": "run", "parameters": {}}
    )
    ended = ProcessResult(
        argv=("tool",),
        pid=1,
        returncode=returncode,
        output_tail="last line",
        timed_out=False,
        cancelled=cancelled,
        end_reason="the worker's shutdown timeout passed" if cancelled else None,
        killed=False,
        cpu_time_ms=5,
        memory_peak_mb=1.0,
        tree_rss_peak_mb=1.0,
        duration_ms=10,
    )

    result = ended.work_result(request)

    assert (result.status, result.exit_code, result.output) == (status, exit_code, "last line")
    assert result.resources_used["children_cpu_time_ms"] == 5
    if says is not None:
        assert result.error_message is not None
        assert says in result.error_message


def test_a_status_stolen_by_a_catch_all_wait_is_unknown_not_success() -> None:
    def steal(_stream: str, _line: str) -> None:
        # Other code of the worker doing the wrong thing: reaping any child.
        time.sleep(0.3)
        os.waitpid(-1, 0)

    result = run_process(["sh", "-c", "echo started; exit 0"], on_line=steal)

    assert result.returncode == 255
    assert not result.ok
