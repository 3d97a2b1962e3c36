"""Running a child process for a task: stream its output, end it early, kill its whole tree.

`run_process` runs on the thread that calls it (the work's own thread; it
starts no thread of its own) and returns when the child has exited and been
reaped. It ends the child early when the running task must end (a cancel
command, the task's time limit, the worker's shutdown timeout) or its own
`timeout` passes: SIGTERM to the child's process group and to every
descendant, a grace period, then SIGKILL to every process of the tree still
there. The tree is what psutil sees below the child, snapshotted before each
signal, plus every process that carries this run's mark in its environment:
that finds descendants that started a session of their own (ansible's forked
workers do) and even those whose parent died and left them to init.

The child is reaped by its pid with `os.wait4`, never `waitpid(-1)` (which
would steal the exit status of processes other code of the worker waits
for). wait4 gives its CPU time and peak memory, including the descendants it
reaped itself; see `ProcessResult` for what the memory figures miss.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from chiffon_worker.context import TaskContext, current_task
from chiffon_worker.protocol import WorkRequest, WorkResult

logger = logging.getLogger(__name__)

# Every process of a run inherits this variable (unless it clears its
# environment): the mark that finds descendants that left the tree.
RUN_MARK_VARIABLE = "CHIFFON_RUN_ID"
# Without a task (a script's own thread), the grace between SIGTERM and SIGKILL.
DEFAULT_KILL_GRACE_SECONDS = 10.0
# How often the loop looks at the task's cancel flag: the worst added latency
# of a cancel, for a loop that costs nothing measurable.
POLL_SECONDS = 0.1
# How often the tree's memory is sampled (a few /proc reads per process).
SAMPLE_SECONDS = 0.5
# After the child exits, how long output still held open by a descendant it
# left running is read before we stop listening.
DRAIN_SECONDS = 1.0
READ_CHUNK_BYTES = 65536
# The returncode of a child whose status another waitpid(-1) took from us.
UNKNOWN_EXIT_STATUS = 255
# After SIGKILL, how long we wait for the kernel to take the tree down.
KILL_WAIT_SECONDS = 2.0

LineCallback = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class ProcessResult:
    """How a child process ended, its output's tail and what it used.

    `cpu_time_ms` is user + system time of the child and of every descendant
    it waited for itself (wait4's rusage); a descendant that outlived its
    parent is not counted. `memory_peak_mb` is the peak resident set of the
    largest single process of the tree (the kernel's high-water mark, VmHWM,
    read every half second: exact for a process alive at a reading, a
    process that lives between two readings is missed), not their sum;
    `tree_rss_peak_mb` is the largest sum of the tree's resident sets at a
    reading (a peak between readings is missed).
    """

    argv: tuple[str, ...]
    pid: int
    returncode: int  # negative: killed by that signal
    output_tail: str
    timed_out: bool
    cancelled: bool
    end_reason: str | None
    killed: bool
    cpu_time_ms: int
    memory_peak_mb: float
    tree_rss_peak_mb: float
    duration_ms: int
    lines_cut: int = 0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.cancelled

    def resources_used(self) -> dict[str, int | float]:
        return {
            "children_cpu_time_ms": self.cpu_time_ms,
            "children_memory_peak_mb": self.memory_peak_mb,
            "children_tree_rss_peak_mb": self.tree_rss_peak_mb,
        }

    def work_result(self, request: WorkRequest) -> WorkResult:
        """The usual answer: completed on exit 0, else failed saying why, with the tail."""
        fields: dict[str, Any] = {
            "output": self.output_tail,
            "resources_used": self.resources_used(),
        }
        if self.ok:
            return WorkResult.completed(request, **fields)
        if self.cancelled:
            why = f"{self.argv[0]} was ended early: {self.end_reason}"
        elif self.returncode < 0:
            why = f"{self.argv[0]} was killed by signal {-self.returncode}"
        else:
            why = f"{self.argv[0]} exited with status {self.returncode}"
        # A process killed by a signal has no exit status: 128 + N, as shells say.
        code = self.returncode if self.returncode > 0 else 128 - self.returncode
        return WorkResult.failed(request, why, exit_code=code, **fields)


def run_process(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineCallback | None = None,
    timeout: float | None = None,
    grace: float | None = None,
    max_line_bytes: int = 65536,
    tail_lines: int = 200,
    task: TaskContext | None = None,
) -> ProcessResult:
    """Run `argv` (never a shell string) as a child in its own session; see the module doc.

    `env` is the child's whole environment (default: the worker's). `on_line`
    gets ("stdout" or "stderr", line without its newline) on this thread as
    lines come; lines longer than `max_line_bytes` are cut. If `on_line`
    raises, the tree is killed and the exception propagates. `grace` defaults
    to the worker's CHIFFON_KILL_GRACE. `task` is the task the child belongs
    to (default: the one the calling code runs in; pass it from a thread of
    your own).
    """
    args = _argv_list(argv)
    context = task if task is not None else current_task()
    if grace is None:
        grace = context.kill_grace if context is not None else DEFAULT_KILL_GRACE_SECONDS
    output = _Output(on_line, max_line_bytes, tail_lines)
    return _Run(args, context, timeout, grace, output).start(cwd, env).wait()


def running_count() -> int:
    """How many child processes run_process is running now (any thread)."""
    with _LIVE_LOCK:
        return len(_LIVE)


def kill_all_now() -> None:
    """SIGKILL the process group of every running child: the worker is exiting now.

    Safe in a signal handler: it takes no lock (copying the set is atomic
    under the GIL). Descendants in sessions of their own are not reached.
    """
    for pgid in tuple(_LIVE):
        _signal_group(pgid, signal.SIGKILL)


_LIVE: set[int] = set()
_LIVE_LOCK = threading.Lock()


def _argv_list(argv: Sequence[str]) -> list[str]:
    if isinstance(argv, str | bytes):
        raise TypeError("run_process takes an argv list, not a shell string")
    args = [os.fspath(arg) for arg in argv]
    if not args or not all(isinstance(arg, str) for arg in args):
        raise TypeError("run_process needs a non-empty list of strings")
    return args


class _Output:
    """Split a child's bytes into lines: cut long ones, keep a bounded tail."""

    def __init__(self, on_line: LineCallback | None, max_line_bytes: int, tail_lines: int) -> None:
        self._on_line = on_line
        self._max = max(1, max_line_bytes)
        self.tail: deque[str] = deque(maxlen=max(1, tail_lines))
        self.lines_cut = 0
        # Per stream: the partial line so far, and how many bytes of it were cut.
        self._partial: dict[str, bytearray] = {}
        self._cut: dict[str, int] = {}

    def silence(self) -> None:
        """No more calls of on_line (it raised): lines are still kept in the tail."""
        self._on_line = None

    def feed(self, stream: str, data: bytes) -> None:
        partial = self._partial.setdefault(stream, bytearray())
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            self._add(stream, partial, data[start:end])
            self._line(stream, bytes(partial))
            partial.clear()
            start = end + 1
        self._add(stream, partial, data[start:])

    def close(self, stream: str) -> None:
        partial = self._partial.pop(stream, None)
        if partial or self._cut.get(stream):
            self._line(stream, bytes(partial or b""))

    def _add(self, stream: str, partial: bytearray, piece: bytes) -> None:
        room = self._max - len(partial)
        if len(piece) > room:
            # Memory stays bounded whatever the child prints: the rest of a
            # long line is counted, not kept.
            self._cut[stream] = self._cut.get(stream, 0) + len(piece) - max(room, 0)
            piece = piece[: max(room, 0)]
        partial += piece

    def _line(self, stream: str, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace")
        cut = self._cut.pop(stream, 0)
        if cut:
            self.lines_cut += 1
            text += f" [... {cut} bytes cut]"
        self.tail.append(text)
        if self._on_line is not None:
            self._on_line(stream, text)


class _Run:
    """One child from start to reaped; every method runs on the calling thread."""

    def __init__(
        self,
        argv: list[str],
        context: TaskContext | None,
        timeout: float | None,
        grace: float,
        output: _Output,
    ) -> None:
        self.argv = argv
        self.context = context
        self.grace = grace
        self.output = output
        self.mark = uuid.uuid4().hex
        self.started = time.monotonic()
        self.timeout_at = self.started + timeout if timeout is not None else None
        self.popen: subprocess.Popen[bytes]
        self.status: int | None = None
        self.rusage: Any = None
        self.end_reason: str | None = None
        self.timed_out = False
        self.killed = False
        self.kill_at: float | None = None
        self.tree: dict[int, psutil.Process] = {}
        self.peak_kib = 0
        self.tree_rss_peak_kib = 0
        self.next_sample = self.started

    # -- start -------------------------------------------------------------------

    def start(self, cwd: str | os.PathLike[str] | None, env: Mapping[str, str] | None) -> _Run:
        child_env = dict(os.environ if env is None else env)
        child_env[RUN_MARK_VARIABLE] = self.mark
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=child_env,
            start_new_session=True,  # its own group: one signal reaches all of it
            close_fds=True,
        )
        with _LIVE_LOCK:
            _LIVE.add(self.popen.pid)
        logger.info("process started", extra={"pid": self.popen.pid, "argv0": self.argv[0]})
        return self

    # -- the loop ----------------------------------------------------------------

    def wait(self) -> ProcessResult:
        popen = self.popen
        assert popen.stdout is not None
        assert popen.stderr is not None
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(popen.stdout, selectors.EVENT_READ, "stdout")
                selector.register(popen.stderr, selectors.EVENT_READ, "stderr")
                self._loop(selector)
        except BaseException:
            # on_line raised, or the thread is being torn down: nothing of
            # the child may outlive this call, and on_line is not called again.
            self.output.silence()
            self._end_early("the caller raised")
            self._kill_now()
            self._reap(block=True)
            raise
        finally:
            self._close_pipes()
            with _LIVE_LOCK:
                _LIVE.discard(popen.pid)
        return self._result()

    def _loop(self, selector: selectors.BaseSelector) -> None:
        pidfd = _pidfd(self.pid)
        if pidfd is not None:
            selector.register(pidfd, selectors.EVENT_READ, "exit")
        drain_until: float | None = None
        try:
            while True:
                for key, _ in selector.select(POLL_SECONDS):
                    if key.data == "exit":
                        selector.unregister(key.fileobj)
                    else:
                        self._read(selector, key)
                now = time.monotonic()
                self._reap(block=False)
                self._sample(now)
                self._watch(now)
                if self.status is None or self.kill_at is not None:
                    continue  # running, or its tree still being ended
                # Output a descendant still holds open is read a little longer.
                drain_until = drain_until or now + DRAIN_SECONDS
                if not _pipes_left(selector) or now >= drain_until:
                    return
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _read(self, selector: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        try:
            data = os.read(key.fd, READ_CHUNK_BYTES)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return
            data = b""
        if data:
            self.output.feed(key.data, data)
        else:
            selector.unregister(key.fileobj)
            self.output.close(key.data)

    def _watch(self, now: float) -> None:
        """Start ending the child when it must end; escalate when the grace is over."""
        if self.end_reason is None:
            if self.status is None and (why := self._why_end(now)) is not None:
                self._end_early(why)
                self._terminate()
        elif self.kill_at is not None:
            if self._tree_gone():
                self.kill_at = None  # all ended on SIGTERM: no need to wait out the grace
            elif now >= self.kill_at:
                self._kill_now()

    def _why_end(self, now: float) -> str | None:
        context = self.context
        if context is not None and context.cancel_reason is not None:
            self.timed_out = context.timed_out
            return context.cancel_reason
        if self.timeout_at is not None and now >= self.timeout_at:
            self.timed_out = True
            return f"its timeout of {self.timeout_at - self.started:g} s passed"
        return None

    def _end_early(self, why: str) -> None:
        if self.end_reason is None:
            self.end_reason = why

    # -- signals -----------------------------------------------------------------

    def _terminate(self) -> None:
        self._snapshot()
        logger.warning(
            "ending process tree",
            extra={
                "pid": self.pid,
                "reason": self.end_reason,
                "processes": len(self.tree) + 1,
                "grace_seconds": self.grace,
            },
        )
        _signal_group(self.pid, signal.SIGTERM)
        _signal_all(self.tree.values(), signal.SIGTERM)
        self.kill_at = time.monotonic() + self.grace

    def _kill_now(self) -> None:
        """SIGKILL to every process of the tree still there, and wait until it is gone."""
        self._snapshot()
        alive = [proc for proc in self.tree.values() if _alive(proc)]
        if alive or self.status is None:
            self.killed = True
            logger.warning(
                "killing process tree", extra={"pid": self.pid, "processes": len(alive) + 1}
            )
        _signal_group(self.pid, signal.SIGKILL)
        _signal_all(alive, signal.SIGKILL)
        self.kill_at = None
        _wait_gone(alive, KILL_WAIT_SECONDS)

    def _snapshot(self) -> None:
        """Add the tree below the child and every process carrying our mark."""
        for proc in _descendants(self.pid):
            self.tree.setdefault(proc.pid, proc)
        for proc in _marked(self.mark, exclude=self.pid):
            self.tree.setdefault(proc.pid, proc)

    def _tree_gone(self) -> bool:
        return self.status is not None and not any(_alive(proc) for proc in self.tree.values())

    # -- reaping and accounting --------------------------------------------------

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _reap(self, *, block: bool) -> None:
        if self.status is not None:
            return
        try:
            pid, status, rusage = os.wait4(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            # Someone else's catch-all wait took its exit status: say so, not "exit 0".
            logger.warning("child reaped by other code: its exit status is unknown")
            self.status, self.rusage = 0, None
            self.popen.returncode = UNKNOWN_EXIT_STATUS
            return
        if pid == 0:
            return
        self.status, self.rusage = status, rusage
        # Popen must not wait for it again (or warn that it still runs).
        self.popen.returncode = os.waitstatus_to_exitcode(status)

    def _sample(self, now: float) -> None:
        if now < self.next_sample or self.status is not None:
            return
        self.next_sample = now + SAMPLE_SECONDS
        total_rss = 0
        for pid in [self.pid, *(proc.pid for proc in _descendants(self.pid))]:
            peak, rss = _memory_kib(pid)
            self.peak_kib = max(self.peak_kib, peak)
            total_rss += rss
        self.tree_rss_peak_kib = max(self.tree_rss_peak_kib, total_rss)

    def _close_pipes(self) -> None:
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()
        for stream in ("stdout", "stderr"):
            self.output.close(stream)

    def _result(self) -> ProcessResult:
        assert self.popen.returncode is not None
        rusage = self.rusage
        cpu = (rusage.ru_utime + rusage.ru_stime) if rusage is not None else 0.0
        result = ProcessResult(
            argv=tuple(self.argv),
            pid=self.pid,
            returncode=self.popen.returncode,
            output_tail="\n".join(self.output.tail),
            timed_out=self.timed_out,
            cancelled=self.end_reason is not None,
            end_reason=self.end_reason,
            killed=self.killed,
            cpu_time_ms=int(cpu * 1000),
            memory_peak_mb=round(self.peak_kib / 1024, 1),
            tree_rss_peak_mb=round(self.tree_rss_peak_kib / 1024, 1),
            duration_ms=int((time.monotonic() - self.started) * 1000),
            lines_cut=self.output.lines_cut,
        )
        if self.context is not None:
            self.context.add_child_usage(
                result.cpu_time_ms, result.memory_peak_mb, result.tree_rss_peak_mb
            )
        logger.info(
            "process ended",
            extra={
                "pid": result.pid,
                "returncode": result.returncode,
                "end_reason": result.end_reason,
                "killed": result.killed,
                "cpu_time_ms": result.cpu_time_ms,
                "duration_ms": result.duration_ms,
            },
        )
        return result


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when the child exits (Linux 5.3+), else None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None  # the loop then notices the exit within POLL_SECONDS


def _memory_kib(pid: int) -> tuple[int, int]:
    """A process's peak and current resident set in KiB (VmHWM, VmRSS); zeros once gone.

    VmHWM, not wait4's ru_maxrss: the latter keeps the peak from before
    exec, which for a forked child is the whole worker's resident set.
    """
    peak = rss = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    peak = int(line.split()[1])
                elif line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return peak, rss


def _pipes_left(selector: selectors.BaseSelector) -> bool:
    return any(key.data != "exit" for key in selector.get_map().values())


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _descendants(pid: int) -> list[psutil.Process]:
    proc = _process(pid)
    if proc is None:
        return []
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _marked(mark: str, exclude: int) -> list[psutil.Process]:
    """Every process whose environment carries `mark` (readable as root or the same user)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == exclude:
            continue
        try:
            if proc.environ().get(RUN_MARK_VARIABLE) == mark:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], limit: float) -> None:
    """Wait until the kernel took every process down (a zombie counts as gone).

    Not psutil.wait_procs: a process reparented to an init that does not reap
    stays a zombie, and wait_procs would wait the whole limit for it.
    """
    deadline = time.monotonic() + limit
    while any(_alive(proc) for proc in procs) and time.monotonic() < deadline:
        time.sleep(0.02)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(pgid, signum)


def _signal_all(procs: Iterable[psutil.Process], signum: signal.Signals) -> None:
    for proc in procs:
        try:
            proc.send_signal(signum)  # psutil checks the pid still names that process
        except psutil.Error:
            continue
