"""The runtime that serves one WorkerBase: wiring, the turn, the stop sequence.

Threads and who owns what:

- The *baton holder* owns the broker link, the consumer and its outbox, and
  the stop sequence. It is the thread that called `run()` (the connection
  thread), except while that thread runs a task inline and the task runs
  long: then the rescue thread holds the baton (rescue.py). Either way the
  holder calls `turn()` over and over; a turn runs what other threads posted,
  feeds the systemd watchdog, checks time limits and stop requests, and
  services the connection or reconnects it (keeper.py).
- Work threads run tasks (tasks.py) and post their results and progress.
- The heartbeat thread builds a StatusUpdate every interval and posts it.

Other threads reach the holder only through the mailbox (handoff.py).
`request_stop` is safe from any thread or a signal handler.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from types import FrameType
from typing import Any

from chiffon_worker.amqp import BrokerLink, Delivery, Outgoing, PublishState
from chiffon_worker.config import Settings, load_settings, unknown_variables
from chiffon_worker.consumer import HOLD_GRACE_SECONDS, RequestConsumer
from chiffon_worker.context import forget_stop_flag, register_stop_flag
from chiffon_worker.control import ControlDesk
from chiffon_worker.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SOFTWARE,
    ChiffonError,
    ConfigError,
    ConnectionLost,
)
from chiffon_worker.handoff import Mailbox
from chiffon_worker.heartbeat import HeartbeatThread, StatusBuilder
from chiffon_worker.keeper import LinkKeeper
from chiffon_worker.log import setup_logging
from chiffon_worker.protocol import WorkStatus
from chiffon_worker.rescue import Rescuer
from chiffon_worker.runner import TaskRunner, declared_work_types
from chiffon_worker.sdnotify import SystemdNotifier, Watchdog
from chiffon_worker.stats import make_stats
from chiffon_worker.tasks import Task
from chiffon_worker.topology import chiffon_topology, control_queue_name
from chiffon_worker.worker import WorkerBase

logger = logging.getLogger(__name__)

# Longest one turn of the connection thread stays inside pika before it looks
# at stop requests, deadlines and the watchdog again.
LOOP_TICK_SECONDS = 0.5
# Inline work longer than this gets the rescue thread serving the connection.
TAKE_OVER_AFTER_SECONDS = 0.25
# How long a stop waits for the broker to confirm what is still in the outbox.
CONFIRM_WAIT_SECONDS = 5.0
# Beyond the kill grace, how long a stop waits for work whose child processes
# were ended to return its result.
KILL_MARGIN_SECONDS = 3.0
# The status code of a forced exit (a second signal).
FORCED_EXIT_CODE = EXIT_FAILED


class WorkerService:
    """Serves one worker object until a stop; see the module docstring."""

    def __init__(self, worker: WorkerBase, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else worker.settings
        self.agent_id = self.settings.resolved_agent_id()
        work_types = declared_work_types(worker.get_agent_capabilities())
        if work_types is None:
            raise ConfigError(
                f"{type(worker).__name__}.get_agent_capabilities() must return a dict whose "
                "'work_types' lists the supported work types (non-empty strings)"
            )
        self.work_types = work_types
        self._worker = worker
        self._stop = threading.Event()
        self._signals = 0
        self._progress_lock = threading.Lock()
        self._notifier = SystemdNotifier()
        self._watchdog = Watchdog(self._notifier)
        settings = self.settings
        self._link = BrokerLink(
            settings.broker_urls(),
            chiffon_topology(
                settings.work_queue,
                settings.reply_queue,
                control_queue_name(self.agent_id),
                declare_shared=settings.declare_topology,
            ),
            prefetch=settings.prefetch,
            heartbeat=settings.amqp_heartbeat,
            blocked_timeout=settings.blocked_connection_timeout,
            on_delivery=self._on_delivery,
            on_consumer_cancelled=self._on_consumer_cancelled,
            on_confirmed=self._on_confirmed,
            on_control=self._on_command,
            tls=settings.tls_files(),
            # Nodes in an order of this worker's own, so a fleet spreads over a cluster.
            seed=str(self.agent_id),
        )
        self._mailbox = Mailbox(self._link.call_threadsafe)
        self._stats = make_stats(settings.metrics_port, settings.metrics_host)
        runner = TaskRunner(
            worker,
            work_types,
            self.agent_id,
            self._stop,
            self._progress_from,
            kill_grace=self.settings.kill_grace,
        )
        self._consumer = RequestConsumer(
            self._link,
            settings,
            str(self.agent_id),
            runner,
            self._mailbox.post,
            self._stats,
            after_task=_log_finished,
            run_inline=self._run_inline,
        )
        self._run_task = runner
        consumer = self._consumer
        self._status = StatusBuilder(
            self.agent_id,
            settings.agent_type,
            settings.reply_queue,
            consumer.current_task_ids,
            lambda: consumer.paused,
        )
        self._control = ControlDesk(
            consumer,
            self._status,
            consumer.publish_best_effort,
            agent_type=settings.agent_type,
            agent_id=self.agent_id,
            work_types=work_types,
            stats=self._stats,
        )
        self._keeper = LinkKeeper(
            self._link,
            self._notifier,
            on_connected=self._on_connected,
            on_lost=self._consumer.on_connection_lost,
            wait=self._mailbox.wait,
            max_delay=settings.reconnect_max_delay,
        )
        self._rescuer = Rescuer(
            take_over_after=TAKE_OVER_AFTER_SECONDS,
            hold_grace=HOLD_GRACE_SECONDS,
            turn=self.turn,
            on_long_work=self._return_waiting_deliveries,
        )
        self._consumer_cancelled = False
        self._inline: Task | None = None
        self._stop_deadline: float | None = None
        # Set when the shutdown timeout passes with child processes running:
        # how long their trees get to be ended (SIGTERM, grace, SIGKILL) so
        # their work can answer saying why, instead of leaving them behind.
        self._kill_deadline: float | None = None
        self._said_offline = False
        self._finished = False
        self._exit_code = EXIT_OK

    # -- any thread ------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask for a graceful stop; safe from any thread or a signal handler.

        Running work is waited for up to the shutdown timeout; work running on
        the connection thread past it ends the process only when the stop came
        from a signal (a library caller keeps its process).
        """
        self._stop.set()

    def pending(self) -> int:
        """Messages waiting for the broker's confirm (read from any thread: a snapshot)."""
        return self._consumer.pending()

    @property
    def connections(self) -> int:
        """How many times a connection was made (1 without a reconnect)."""
        return self._keeper.connections

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # Written straight to stderr: the logging lock may be held by the
            # very code this signal interrupted.
            os.write(2, b'{"level": "ERROR", "message": "second signal: exiting now"}\n')
            _kill_children_now()
            os._exit(FORCED_EXIT_CODE)
        self._stop.set()

    def _progress_from(self, task: Task, status: WorkStatus) -> None:
        """Whichever thread runs the task: hand its progress report to the holder.

        Kept on the task, so the result (which may reach the holder by another
        door) always goes out after every report made before it.
        """
        waiting = task.progress
        if waiting is None:
            # Made with the first report (most tasks make none); the work's
            # own threads may make their first report at the same moment.
            with self._progress_lock:
                waiting = task.progress
                if waiting is None:
                    waiting = task.progress = deque()
        waiting.append(status)
        self._mailbox.post(lambda: self._consumer.send_progress(task))

    def _send_heartbeat(self, message: Outgoing) -> None:
        """Heartbeat thread: hand the beat over, refresh `systemctl status`."""
        self._mailbox.post(lambda: self._publish_beat(message))
        running = self._consumer.current_task_ids()
        where = self._link.current_url
        if not self._keeper.up:
            return
        self._notifier.status(
            f"connected to {where}, running task {running[0]}"
            if running
            else f"connected to {where}, idle"
        )

    # -- the connection thread -------------------------------------------------

    def run(self) -> int:
        """Serve until a stop is requested; returns the process exit code."""
        self._rescuer.baton.acquire()  # this thread owns the connection
        self._rescuer.start()
        self._status.start()
        heartbeat = HeartbeatThread(
            self.settings.heartbeat_interval, self._status.build, self._send_heartbeat
        )
        heartbeat.start()
        register_stop_flag(self._worker, self._stop)
        logger.info(
            "worker starting",
            extra={
                "agent_id": str(self.agent_id),
                "agent_type": self.settings.agent_type,
                "work_queue": self.settings.work_queue,
                "ack_mode": self.settings.ack_mode,
                "work_types": sorted(self.work_types),
            },
        )
        # Everything made so far (modules, classes, pydantic's schemas) lives
        # as long as the process: out of the collector's sight, a full
        # collection takes microseconds instead of ~20 ms (a latency spike).
        gc.freeze()
        try:
            while not self._finished:
                self.turn(LOOP_TICK_SECONDS)
            return self._exit_code
        finally:
            forget_stop_flag(self._worker)
            self._rescuer.stop()
            self._rescuer.baton.release()
            heartbeat.stop()
            self._consumer.close()
            self._status.close()
            self._stats.close()
            self._link.close()

    def _run_inline(self, task: Task) -> None:
        """Connection thread, inside pika's delivery callback (the consumer calls it)."""
        self._inline = task
        try:
            self._rescuer.run_inline(lambda: self._work_on(task))
        finally:
            self._inline = None
        try:
            self._consumer.finish_inline(task)
        finally:
            # Also when publishing its result found the connection gone.
            if not task.abandoned:
                _log_finished(task)

    def _return_waiting_deliveries(self) -> None:
        """Rescue thread, once inline work has run past the hold grace."""
        try:
            self._consumer.stop_consuming_while_busy()
        except ConnectionLost as exc:
            self._keeper.lost(str(exc))

    def _work_on(self, task: Task) -> None:
        task.finish(self._run_task(task))

    # -- the baton holder: one turn ----------------------------------------------

    def turn(self, timeout: float) -> None:
        """Everything the connection's owner does, once; waits at most `timeout`."""
        if self._finished:
            self._mailbox.wait(timeout)
            return
        now = time.monotonic()
        self._watchdog.feed(now)
        try:
            self._mailbox.run_posted()
            if self._consumer_cancelled:
                self._consumer_cancelled = False
                self._keeper.lost("broker cancelled our consumer (was the queue deleted?)")
            self._consumer.check_deadlines(now)
            if (self._stop.is_set() or self._keeper.refused) and self._stop_sequence(now):
                return
            self._keeper.serve(timeout)
            self._consumer.flush_outbox()
        except ConnectionLost as exc:
            self._keeper.lost(str(exc))

    def _on_connected(self) -> None:
        self._stats.connected(reconnect=self._keeper.connections > 1)
        self._consumer_cancelled = False
        status = self._status.build()
        # Consuming first: basic.consume waits for an answer, and during a
        # broker alarm the publish before it would get the connection blocked
        # and that answer would never come (the link then drops the connection).
        self._consumer.on_connected()
        self._consumer.publish_now(status)
        self._notifier.ready(f"connected to {self._link.current_url}, consuming")

    def _on_delivery(self, delivery: Delivery) -> None:
        self._consumer.on_delivery(delivery)

    def _on_command(self, delivery: Delivery) -> None:
        self._control.on_command(delivery)

    def _on_consumer_cancelled(self) -> None:
        self._consumer_cancelled = True

    def _on_confirmed(self) -> None:
        self._consumer.settle()

    def _publish_beat(self, message: Outgoing) -> None:
        # A beat still on its way after the goodbye would say "online" or
        # "busy" after "offline"; one built while disconnected is superseded.
        if self._keeper.up and not self._said_offline:
            self._consumer.publish_now(message)

    # -- the stop sequence (baton holder) ----------------------------------------

    def _stop_sequence(self, now: float) -> bool:
        """Drive a requested stop; True once it is complete."""
        if self._stop_deadline is None:
            self._stop_deadline = now + self.settings.shutdown_timeout
            self._begin_stop()
        busy = self._consumer.busy
        if busy and now < self._stop_deadline and self._keeper.refused is None:
            return False
        if busy and self._ending_children(now):
            return False
        self._finish(timed_out=busy)
        return True

    def _ending_children(self, now: float) -> bool:
        """After the shutdown timeout: True while running child processes are being ended."""
        if self._kill_deadline is None:
            process = _process_module()
            if self._keeper.refused is not None or process is None or not process.running_count():
                return False
            self._kill_deadline = now + self.settings.kill_grace + KILL_MARGIN_SECONDS
            logger.error(
                "shutdown timeout: ending the child processes of running work",
                extra={
                    "running": self._consumer.current_task_ids(),
                    "kill_grace": self.settings.kill_grace,
                },
            )
            self._consumer.cancel_running("the worker's shutdown timeout passed")
        return now < self._kill_deadline

    def _begin_stop(self) -> None:
        if self._keeper.refused is not None:
            return
        logger.info(
            "stop requested: finishing running work",
            extra={
                "running": self._consumer.current_task_ids(),
                "shutdown_timeout": self.settings.shutdown_timeout,
            },
        )
        self._notifier.stopping("stopping: finishing running work")
        self._consumer.stop_taking()

    def _finish(self, *, timed_out: bool) -> None:
        self._finished = True
        refused = self._keeper.refused
        self._exit_code = refused.exit_code if refused is not None else EXIT_OK
        if timed_out:
            running = self._consumer.current_task_ids()
            logger.error(
                "shutdown timeout: giving up on running work",
                extra={
                    "running": running,
                    "ack_mode": self.settings.ack_mode,
                    "redelivered": self.settings.ack_mode == "late",
                },
            )
            self._consumer.cancel_running("the worker's shutdown timeout passed")
        if self._keeper.up:
            self._say_goodbye()
        elif refused is None:
            logger.info("stopped while disconnected", extra={"unsent": self._consumer.pending()})
        self._notifier.stopping()
        self._rescuer.stop()
        if timed_out and self._inline is not None and self._signals:
            # The work runs on the connection thread and cannot be abandoned
            # from here: the process ends (early ack: the task is lost, as it
            # would be with a work thread).
            _kill_children_now()
            os._exit(self._exit_code)

    def _say_goodbye(self) -> None:
        try:
            self._consumer.flush_outbox()
            offline = self._status.build("offline")
            self._said_offline = True
            # Sent even while blocked: it costs nothing and goes out if the
            # alarm clears before we close.
            self._consumer.publish_now(offline)
            self._await_confirms(offline)
        except ConnectionLost as exc:
            logger.warning("connection lost while stopping", extra={"reason": str(exc)})
        extra: dict[str, object] = {"unsent": self._consumer.pending()}
        if self._link.blocked:
            # No confirm comes while an alarm lasts; unacked deliveries go
            # back to the queue when the connection closes.
            extra["blocked"] = True
        logger.info("stopped", extra=extra)
        self._link.close()
        self._keeper.up = False

    def _await_confirms(self, last: Outgoing) -> None:
        """Service the connection until the broker has confirmed the outbox and `last`.

        Not while the broker blocks us (a memory or disk alarm): it confirms
        nothing until the alarm clears, which may be long after the stop.
        """
        deadline = time.monotonic() + CONFIRM_WAIT_SECONDS
        while self._consumer.pending() or last.state is PublishState.WAITING:
            if time.monotonic() >= deadline or self._link.blocked:
                return
            self._link.process(0.05)
            self._consumer.flush_outbox()


def _log_finished(task: Task) -> None:
    """After the result went out; the task's log context is still set."""
    result = task.result
    assert result is not None
    logger.info(
        "work finished",
        extra={
            "work_type": task.request.work_type,
            "status": result.status,
            "exit_code": result.exit_code,
            "duration_ms": result.duration_ms,
        },
    )


def _process_module() -> Any:
    """process.py if work loaded it; None: no child process ever ran, none to end."""
    return sys.modules.get("chiffon_worker.process")


def _kill_children_now() -> None:
    """Before a forced exit: child processes of running work must not outlive us."""
    process = _process_module()
    if process is not None:
        process.kill_all_now()


# -- entry point for scripts and the CLI ------------------------------------------


def serve(worker_class: type[WorkerBase], settings: Settings | None = None) -> int:
    """Load settings, set up logging and signals, build the worker and serve it.

    A bad setting, a missing abstract method or capabilities without work
    types are configuration errors (one line, exit 78, not restarted by the
    units); an exception from the worker class's own code is a bug: its
    traceback is logged and the exit code (70) is one the units restart.
    """
    try:
        settings = settings if settings is not None else load_settings()
        setup_logging(settings.log_level, settings.log_format, settings.secrets())
        for name in unknown_variables(os.environ):
            logger.warning("unknown setting ignored", extra={"variable": name})
        _require_concrete(worker_class)
        worker = worker_class(settings)
        service = WorkerService(worker, settings)
    except ConfigError as exc:
        print(f"chiffon-worker: configuration error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        logger.exception(
            "the worker class failed while starting", extra={"worker": worker_class.__qualname__}
        )
        return EXIT_SOFTWARE
    service.install_signal_handlers()
    try:
        return service.run()
    except ChiffonError as exc:
        logger.error("worker failed", extra={"reason": str(exc)})
        return exc.exit_code


def _require_concrete(worker_class: type[Any]) -> None:
    if inspect.isabstract(worker_class):
        missing = ", ".join(sorted(getattr(worker_class, "__abstractmethods__", ())))
        raise ConfigError(
            f"{worker_class.__qualname__} cannot be started: it does not implement {missing}"
        )
