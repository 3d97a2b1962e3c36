"""WorkerBase, the class users subclass, and the loop that keeps it connected.

The thread that calls `run()` owns the broker connection (it holds the
rescue thread's baton): it services the socket, and the heartbeat and work
threads reach the broker only by handing a callback to it. Short work runs on
this thread, covered by the rescue thread when it runs long (rescue.py). It
reconnects with capped, jittered backoff, and on a stop request finishes the
running work before it says goodbye.
"""

from __future__ import annotations

import abc
import gc
import logging
import os
import random
import signal
import sys
import threading
import time
import uuid
from types import FrameType
from typing import Any, ClassVar

from chiffon_worker.amqp import BrokerLink, Outgoing, PublishState
from chiffon_worker.config import Settings, load_settings, unknown_variables
from chiffon_worker.consumer import HOLD_GRACE_SECONDS, RequestConsumer
from chiffon_worker.errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    BrokerAuthError,
    BrokerUnavailable,
    ChiffonError,
    ConfigError,
    ConnectionLost,
)
from chiffon_worker.heartbeat import HeartbeatThread
from chiffon_worker.log import setup_logging
from chiffon_worker.metrics import HostMetrics, peak_memory_mb
from chiffon_worker.protocol import (
    HEARTBEAT_PRIORITY,
    StatusUpdate,
    WorkRequest,
    WorkResult,
    WorkStatus,
    encode_message,
)
from chiffon_worker.rescue import Rescuer
from chiffon_worker.sdnotify import SystemdNotifier
from chiffon_worker.stats import make_stats
from chiffon_worker.tasks import Task
from chiffon_worker.topology import chiffon_topology

logger = logging.getLogger(__name__)

# Longest the loop stays inside pika before it looks at stop requests,
# deadlines and the watchdog again.
LOOP_TICK_SECONDS = 0.5
# Inline work longer than this gets the rescue thread servicing the connection.
TAKE_OVER_AFTER_SECONDS = 0.25
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0
# How long a stop waits for the broker to confirm what is still in the outbox.
CONFIRM_WAIT_SECONDS = 5.0


class Backoff:
    """Exponential delays with full jitter, capped (the AWS "full jitter" scheme)."""

    def __init__(self, first: float = BACKOFF_FIRST_SECONDS, cap: float = BACKOFF_CAP_SECONDS):
        self._first = first
        self._cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self._cap, self._first * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class WorkerBase(abc.ABC):
    """Subclass this: implement `execute_work` and `get_agent_capabilities`.

    Both are plain synchronous methods. `execute_work` runs on the
    connection thread or on a work thread (see the README, "Where the work
    runs"); either way the connection stays serviced while it runs. It may
    call `self.report_progress(...)`. Everything else (connection,
    validation, acks, deduplication, heartbeats, shutdown) is done here.
    """

    #: the status code a forced exit (second signal) uses
    FORCED_EXIT_CODE: ClassVar[int] = EXIT_FAILED

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else load_settings()
        self.agent_id = self.settings.resolved_agent_id()
        self._capabilities = self.get_agent_capabilities()
        self._work_types = self._declared_work_types(self._capabilities)
        self._stop = threading.Event()
        self._signals = 0
        self._current = threading.local()
        self._notifier = SystemdNotifier()
        self._link = BrokerLink(
            self.settings.broker_urls(),
            chiffon_topology(self.settings.work_queue, self.settings.reply_queue),
            prefetch=self.settings.prefetch,
            heartbeat=self.settings.amqp_heartbeat,
            blocked_timeout=self.settings.blocked_connection_timeout,
            on_delivery=self._on_delivery,
            on_consumer_cancelled=self._on_consumer_cancelled,
            on_confirmed=lambda: self._consumer.settle(),
            tls=self.settings.tls_files(),
        )
        self._stats = make_stats(self.settings.metrics_port, self.settings.metrics_host)
        self._consumer = RequestConsumer(
            self._link,
            self.settings,
            str(self.agent_id),
            self._run_task,
            self._stats,
            after_task=self._log_finished,
            run_inline=lambda work: self._rescuer.run_inline(work),
        )
        self._rescuer = Rescuer(
            take_over_after=TAKE_OVER_AFTER_SECONDS,
            hold_grace=HOLD_GRACE_SECONDS,
            service=self._link.process,
            stop_taking=self._link.stop_consuming,
            on_tick=self._while_covering,
        )
        self._pending_beat: Outgoing | None = None
        self._last_watchdog = 0.0  # fed by the loop, or the rescue thread covering for it
        self._stop_requested_at: float | None = None
        self._connections = 0
        self._metrics: HostMetrics | None = None
        self._consumer_cancelled = False
        self._said_offline = False

    # -- what a subclass writes ----------------------------------------------

    @abc.abstractmethod
    def execute_work(self, request: WorkRequest) -> WorkResult:
        """Do the work; return a WorkResult (raise to report a failure)."""

    @abc.abstractmethod
    def get_agent_capabilities(self) -> dict[str, Any]:
        """What this worker can do; must contain "work_types": [...]."""

    @staticmethod
    def _declared_work_types(capabilities: object) -> frozenset[str]:
        work_types = capabilities.get("work_types") if isinstance(capabilities, dict) else None
        if not (
            isinstance(work_types, list | tuple | set | frozenset)
            and work_types
            and all(isinstance(name, str) and name for name in work_types)
        ):
            raise TypeError(
                "get_agent_capabilities() must return a dict whose 'work_types' lists the "
                "supported work types (non-empty strings)"
            )
        return frozenset(work_types)

    # -- helpers a subclass may call -----------------------------------------

    def report_progress(self, percent: float, step_name: str, output: str = "") -> None:
        """From inside execute_work: publish a WorkStatus for the running task."""
        task: Task | None = getattr(self._current, "task", None)
        if task is None:
            raise RuntimeError("report_progress() is only valid inside execute_work()")
        task.progress_step += 1
        status = WorkStatus.model_validate(
            {
                "task_id": task.request.task_id,
                "status": "step_completed" if percent >= 100 else "running",
                "progress_percent": max(0.0, min(100.0, float(percent))),
                "step": {"number": task.progress_step, "name": step_name, "output": output},
            }
        )
        self._consumer.send_threadsafe(status, task)

    @property
    def stopping(self) -> bool:
        """True once a stop was requested: long work may check it and wrap up."""
        return self._stop.is_set()

    # -- running a task (work thread) ----------------------------------------

    def _run_task(self, task: Task) -> WorkResult:
        """Run the work and stamp the result; the caller has set the task's log context."""
        envelope, request = task.envelope, task.request
        started = time.monotonic()
        cpu_started = time.thread_time()
        result = self._execute_guarded(request, task)
        elapsed = time.monotonic() - started
        # A thread cannot use more CPU than the time that passed: under a
        # millisecond the answer is 0 without a second (costly, in a VM)
        # read of the thread's CPU clock.
        cpu_used = time.thread_time() - cpu_started if elapsed >= 0.001 else 0.0
        resources = {
            "cpu_time_ms": int(cpu_used * 1000),
            "memory_peak_mb": peak_memory_mb(),
            **result.resources_used,
        }
        return result.model_copy(
            update={
                "duration_ms": int(elapsed * 1000),
                "agent_id": self.agent_id,
                "trace_id": envelope.trace_id,
                "request_id": envelope.request_id,
                "resources_used": resources,
            }
        )

    @staticmethod
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

    def _execute_guarded(self, request: WorkRequest, task: Task) -> WorkResult:
        if request.work_type not in self._work_types:
            supported = ", ".join(sorted(self._work_types))
            return WorkResult.failed(
                request,
                f"unsupported work_type {request.work_type!r}; supported: {supported}",
            )
        self._current.task = task
        try:
            result = self.execute_work(request)
        except Exception as exc:
            logger.exception("work raised", extra={"work_type": request.work_type})
            return WorkResult.failed(request, f"{type(exc).__name__}: {exc}")
        finally:
            self._current.task = None
        if not isinstance(result, WorkResult):
            return WorkResult.failed(
                request,
                f"execute_work returned {type(result).__name__}, expected WorkResult",
            )
        return result

    # -- heartbeats -----------------------------------------------------------

    def _heartbeat(self, status: str | None = None) -> Outgoing:
        running = self._consumer.current_task_ids()
        assert self._metrics is not None
        update = StatusUpdate.model_validate(
            {
                "agent_id": self.agent_id,
                "agent_type": self.settings.agent_type,
                "status": status or ("busy" if running else "online"),
                "current_task_id": running[0] if running else None,
                "resources": self._metrics.sample(),
            }
        )
        # A heartbeat answers no request: it starts its own trace.
        beat_id = uuid.uuid4()
        body = encode_message(
            update,
            from_agent=self.settings.agent_type,
            to_agent="orchestrator",
            trace_id=beat_id,
            request_id=beat_id,
            priority=HEARTBEAT_PRIORITY,
        ).body
        return Outgoing(
            routing_key=self.settings.reply_queue,
            body=body,
            priority=HEARTBEAT_PRIORITY,
        )

    def _send_heartbeat_threadsafe(self, message: Outgoing) -> bool:
        if self._rescuer.active:
            # The connection thread is running long work: the rescue thread sends it.
            self._pending_beat = message
            sent = True
        else:
            sent = self._link.call_threadsafe(lambda: self._publish_beat(message))
        if sent:
            # systemctl status shows this line; refreshed at heartbeat pace, off the hot path.
            running = self._consumer.current_task_ids()
            where = self._link.current_url
            self._notifier.status(
                f"connected to {where}, running task {running[0]}"
                if running
                else f"connected to {where}, idle"
            )
        return sent

    def _publish_beat(self, message: Outgoing) -> None:
        # A beat still on its way to this thread after the goodbye would say
        # "online" or "busy" after "offline".
        if not self._said_offline:
            self._consumer.publish_now(message)

    # -- link callbacks (connection thread) ----------------------------------

    def _on_delivery(self, delivery: Any) -> None:
        self._consumer.on_delivery(delivery)

    def _on_consumer_cancelled(self) -> None:
        self._consumer_cancelled = True

    # -- the loop ---------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to stop gracefully; safe from any thread or a signal handler.

        Running work is waited for up to the shutdown timeout; work running on
        the connection thread past it ends the process only when the stop came
        from a signal (a library caller keeps its process).
        """
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # Written straight to stderr: the logging lock may be held by the
            # very code this signal interrupted.
            os.write(2, b'{"level": "ERROR", "message": "second signal: exiting now"}\n')
            os._exit(self.FORCED_EXIT_CODE)
        self._stop.set()

    def run(self) -> int:
        """Serve until a stop is requested; returns the process exit code."""
        self._rescuer.baton.acquire()  # this thread owns the connection
        self._rescuer.start()
        self._metrics = HostMetrics()
        heartbeat = HeartbeatThread(
            self.settings.heartbeat_interval,
            self._heartbeat,
            self._send_heartbeat_threadsafe,
        )
        heartbeat.start()
        logger.info(
            "worker starting",
            extra={
                "agent_id": str(self.agent_id),
                "agent_type": self.settings.agent_type,
                "work_queue": self.settings.work_queue,
                "ack_mode": self.settings.ack_mode,
                "work_types": sorted(self._work_types),
            },
        )
        # Everything made so far (modules, classes, pydantic's schemas) lives
        # as long as the process: out of the collector's sight, a full
        # collection takes microseconds instead of ~20 ms (a latency spike).
        gc.freeze()
        try:
            return self._connect_and_serve()
        finally:
            self._rescuer.stop()
            self._rescuer.baton.release()
            heartbeat.stop()
            self._consumer.close()
            self._metrics.close()
            self._stats.close()
            self._link.close()

    def _connect_and_serve(self) -> int:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                self._link.connect()
            except BrokerAuthError as exc:
                logger.error(
                    "broker refused us: check the credentials, vhost and TLS settings",
                    extra={"reason": str(exc)},
                )
                return exc.exit_code
            except (BrokerUnavailable, ConnectionLost) as exc:
                delay = backoff.next_delay()
                self._notifier.status(f"reconnecting: {exc}")
                logger.warning(
                    "broker not reachable, retrying",
                    extra={
                        "reason": str(exc),
                        "attempt": backoff.attempt,
                        "retry_in_s": round(delay, 2),
                    },
                )
                self._pause(delay)
                continue
            backoff.reset()
            try:
                if self._serve():
                    return EXIT_OK
            except ConnectionLost as exc:
                logger.warning("connection lost", extra={"reason": str(exc)})
                self._explain_loss(str(exc))
                self._notifier.status(f"reconnecting: {exc}")
                self._link.drop()
                self._consumer.on_connection_lost()
        logger.info("stopped while disconnected", extra={"unsent": self._consumer.pending()})
        self._notifier.stopping()
        return EXIT_OK

    def _serve(self) -> bool:
        """Serve one connection; True once a graceful stop completed on it."""
        logger.info("connected to broker", extra={"url": self._link.current_url})
        self._stats.connected(reconnect=self._connections > 0)
        self._connections += 1
        self._consumer_cancelled = False
        self._consumer.publish_now(self._heartbeat())
        self._consumer.on_connected()
        self._notifier.ready(f"connected to {self._link.current_url}, consuming")
        watchdog_every = self._notifier.watchdog_interval()
        stop_deadline: float | None = None
        while True:
            now = time.monotonic()
            if self._stop.is_set() and stop_deadline is None:
                began = self._stop_requested_at
                stop_deadline = (began or now) + self.settings.shutdown_timeout
                if began is None:
                    self._begin_stop()
            if stop_deadline is not None and (not self._consumer.busy or now >= stop_deadline):
                self._finish_stop(timed_out=self._consumer.busy)
                return True
            if self._consumer_cancelled:
                raise ConnectionLost("broker cancelled our consumer (was the queue deleted?)")
            if watchdog_every is not None and now - self._last_watchdog >= watchdog_every:
                self._notifier.watchdog()
                self._last_watchdog = now
            self._consumer.check_deadlines(now)
            self._link.process(LOOP_TICK_SECONDS)
            self._consumer.flush_outbox()

    def _while_covering(self) -> None:
        """Rescue thread, each tick while long work runs on the connection thread."""
        beat, self._pending_beat = self._pending_beat, None
        if beat is not None:
            self._consumer.publish_now(beat)
        self._consumer.flush_outbox()  # progress reports
        interval = self._notifier.watchdog_interval()
        now = time.monotonic()
        if interval is not None and now - self._last_watchdog >= interval:
            self._notifier.watchdog()
            self._last_watchdog = now
        if not self._stop.is_set():
            return
        if self._stop_requested_at is None:
            self._stop_requested_at = now
            self._begin_stop()
        elif now - self._stop_requested_at > self.settings.shutdown_timeout and self._signals:
            # The work cannot be abandoned from here (it runs on the connection
            # thread), so the process ends; early ack: the task is lost, as it
            # would be with a work thread.
            self._finish_stop(timed_out=True)
            os._exit(EXIT_OK)

    def _pause(self, seconds: float) -> None:
        """Wait before the next attempt; wake for a stop, keep the watchdog fed."""
        interval = self._notifier.watchdog_interval()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if interval is not None:
                # Retrying a broker that is down is the loop doing its job.
                self._notifier.watchdog()
            if self._stop.wait(min(left, interval or left)):
                return

    def _explain_loss(self, reason: str) -> None:
        if "acknowledgement" in reason and "timed out" in reason:
            logger.error(
                "RabbitMQ's consumer_timeout closed our channel: a task in late-ack mode "
                "ran longer than the broker allows between delivery and ack; the message "
                "is redelivered. Raise consumer_timeout in rabbitmq.conf or use ack_mode=early",
                extra={"ack_mode": self.settings.ack_mode},
            )

    def _begin_stop(self) -> None:
        running = self._consumer.current_task_ids()
        logger.info(
            "stop requested: finishing running work",
            extra={"running": running, "shutdown_timeout": self.settings.shutdown_timeout},
        )
        self._notifier.stopping("stopping: finishing running work")
        self._consumer.stop_taking()

    def _finish_stop(self, *, timed_out: bool) -> None:
        if timed_out:
            logger.error(
                "shutdown timeout: giving up on running work",
                extra={
                    "running": self._consumer.current_task_ids(),
                    "ack_mode": self.settings.ack_mode,
                    "redelivered": self.settings.ack_mode == "late",
                },
            )
        self._consumer.flush_outbox()
        offline = self._heartbeat("offline")
        self._said_offline = True
        self._consumer.publish_now(offline)
        self._await_confirms(offline)
        logger.info("stopped", extra={"unsent": self._consumer.pending()})
        self._link.close()

    def _await_confirms(self, last: Outgoing) -> None:
        """Service the connection until the broker has confirmed the outbox and `last`."""
        deadline = time.monotonic() + CONFIRM_WAIT_SECONDS
        while self._consumer.pending() or last.state is PublishState.WAITING:
            if time.monotonic() >= deadline:
                return
            self._link.process(0.05)
            self._consumer.flush_outbox()

    # -- entry point for scripts and the CLI ---------------------------------

    @classmethod
    def serve(cls, settings: Settings | None = None) -> int:
        """Load settings, set up logging and signals, run; returns an exit code.

        In a script: `raise SystemExit(MyWorker.serve())`.
        """
        try:
            settings = settings if settings is not None else load_settings()
            setup_logging(settings.log_level, settings.log_format, settings.secrets())
            for name in unknown_variables(os.environ):
                logger.warning("unknown setting ignored", extra={"variable": name})
            worker = cls(settings)
        except ConfigError as exc:
            print(f"chiffon-worker: configuration error: {exc}", file=sys.stderr)
            return exc.exit_code
        except TypeError as exc:  # an abstract method left out, capabilities without work_types
            print(f"chiffon-worker: {cls.__name__} cannot be started: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        worker.install_signal_handlers()
        try:
            return worker.run()
        except ChiffonError as exc:
            logger.error("worker failed", extra={"reason": str(exc)})
            return exc.exit_code
