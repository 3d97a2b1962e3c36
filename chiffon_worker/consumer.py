"""Deliveries in, results out: validate, ack or reject, dispatch, answer.

Every method runs on the thread that holds the connection's baton (the
connection thread, or the rescue thread while long work runs inline; see
service.py), except `current_task_ids` and `busy`, which any thread may read.
Other threads reach the consumer only through the service's mailbox. Knows
the broker through BrokerLink's methods, never through pika.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cachetools import TTLCache
from pydantic_core import PydanticSerializationError

from chiffon_worker.amqp import Delivery, DeliveryTag, Outgoing
from chiffon_worker.config import Settings
from chiffon_worker.errors import ConnectionLost, InvalidMessage
from chiffon_worker.idempotency import ClaimState, IdempotencyCache
from chiffon_worker.log import message_context
from chiffon_worker.outbox import Outbox
from chiffon_worker.protocol import (
    ERROR_INVALID_MESSAGE,
    ERROR_TIMEOUT,
    ERROR_UNSUPPORTED_WORK_TYPE,
    Envelope,
    ErrorMessage,
    Payload,
    WorkResult,
    encode_message,
    parse_work_request,
)
from chiffon_worker.stats import Stats
from chiffon_worker.tasks import Task, WorkThreads

logger = logging.getLogger(__name__)

# How long the connection thread waits for a task that may finish at once
# before going back to the broker. Short work then needs no thread handoff;
# long work delays AMQP heartbeats by at most this much.
FAST_PATH_SECONDS = 0.05
# A delivery that arrives while every slot is busy is kept this long in case
# the running task is about to finish; after that it goes back to the queue
# for an idle worker.
HOLD_GRACE_SECONDS = 1.0
# What serialising a payload the work filled in may raise (a lone surrogate in
# a string, an object JSON cannot hold).
ENCODING_ERRORS = (ValueError, UnicodeError, PydanticSerializationError)


class Link(Protocol):
    """What the consumer needs from the broker connection (BrokerLink)."""

    @property
    def is_open(self) -> bool: ...
    @property
    def consuming(self) -> bool: ...
    def start_consuming(self) -> None: ...
    def stop_consuming(self) -> None: ...
    def ack(self, tag: DeliveryTag) -> bool: ...
    def reject(self, tag: DeliveryTag, *, requeue: bool) -> bool: ...
    def publish(self, message: Outgoing) -> None: ...  # the broker answers in message.state
    def call_later(self, delay: float, callback: Callable[[], None]) -> object | None: ...
    def cancel_timer(self, timer: object | None) -> None: ...


@dataclass(slots=True)
class Answered:
    """What the idempotency cache remembers of a finished request.

    The answer is kept as the JSON of the WorkResult that was sent, not as
    the model: a quarter of the memory, for a cache of a thousand; a
    duplicate (rare) pays for parsing it back.
    """

    result_json: bytes
    # Every request message answered with it: a redelivery of one of them (its
    # ack lost with a connection) is acked, not answered a second time. A
    # tuple: nearly always one, and a set costs four times the memory.
    message_ids: tuple[uuid.UUID, ...]

    def result(self) -> WorkResult:
        return WorkResult.model_validate_json(self.result_json)


class RequestConsumer:
    def __init__(
        self,
        link: Link,
        settings: Settings,
        agent_id: str,
        run_task: Callable[[Task], WorkResult],
        post: Callable[[Callable[[], None]], None],
        stats: Stats | None = None,
        after_task: Callable[[Task], None] | None = None,
        run_inline: Callable[[Task], None] | None = None,
    ) -> None:
        self._stats = stats or Stats()
        self._link = link
        self._settings = settings
        self._agent_id = agent_id
        self._slots = settings.prefetch
        self._late_ack = settings.ack_mode == "late"
        self._cache: IdempotencyCache[Answered] = IdempotencyCache(
            settings.idempotency_size, settings.idempotency_ttl
        )
        self._running: dict[str, Task] = {}
        self._held: deque[Delivery] = deque()
        self._hold_timer: object | None = None
        self._outbox = Outbox(link)
        self._post = post
        self._taking = True
        self._threads = WorkThreads(self._slots, run_task, self._hand_over, after_task)
        # Inline work needs the one slot and an early ack (a late ack must wait
        # for the result anyway), and no time limit: only a work thread can be
        # abandoned when work overruns.
        self._run_inline = run_inline if self._slots == 1 and not self._late_ack else None
        self._inline_task: Task | None = None
        self._paused = False
        # Cancels of tasks not (yet) here, by task_id or request_id (UUIDs do
        # not collide), for as long as a retry is recognised.
        self._cancels: TTLCache[uuid.UUID, str] = TTLCache(
            settings.idempotency_size, settings.idempotency_ttl
        )
        self._finished_task_ids: deque[uuid.UUID] = deque(maxlen=settings.idempotency_size)

    # -- state other threads may read ----------------------------------------

    def current_task_ids(self) -> list[str]:
        return [str(task.request.task_id) for task in list(self._running.values())]

    @property
    def busy(self) -> bool:
        return bool(self._running)

    # -- link events (connection thread) -------------------------------------

    def on_connected(self) -> None:
        """Fresh channel: send what waited, then consume if we have room."""
        self._outbox.reconnected()
        self.flush_outbox()
        self._consume_if_room()

    def on_connection_lost(self) -> None:
        # Held deliveries were never acked: the broker requeues them itself.
        self._held.clear()
        self._hold_timer = None

    def stop_taking(self) -> None:
        """Shutdown: no new work; give held deliveries back to the queue."""
        self._taking = False
        if self._link.is_open:
            self._link.stop_consuming()
            self._return_held()

    def close(self) -> None:
        self._threads.stop()

    def on_delivery(self, delivery: Delivery) -> None:
        self._stats.received()
        if not self._taking or self._paused:
            self._link.reject(delivery.tag, requeue=True)
        elif len(self._running) >= self._slots:
            self._hold(delivery)
        else:
            self._accept(delivery)

    # -- holding a delivery while busy ---------------------------------------

    def _hold(self, delivery: Delivery) -> None:
        self._held.append(delivery)
        if self._hold_timer is None:
            self._hold_timer = self._link.call_later(HOLD_GRACE_SECONDS, self._release_held)

    def _release_held(self) -> None:
        self._hold_timer = None
        if not self._held:
            return
        # Cancel first, or the broker hands the message straight back to us.
        self._link.stop_consuming()
        count = self._return_held()
        logger.info("busy: returned waiting deliveries to the queue", extra={"count": count})

    def _return_held(self) -> int:
        self._link.cancel_timer(self._hold_timer)
        self._hold_timer = None
        count = 0
        while self._held:
            count += self._link.reject(self._held.popleft().tag, requeue=True)
        return count

    def _slot_freed(self) -> None:
        if self._held:
            if len(self._held) == 1:
                self._link.cancel_timer(self._hold_timer)
                self._hold_timer = None
            self._accept(self._held.popleft())
        else:
            self._consume_if_room()

    def _consume_if_room(self) -> None:
        if (
            self._taking
            and not self._paused
            and len(self._running) < self._slots
            and self._link.is_open
            and not self._link.consuming
        ):
            self._link.start_consuming()

    # -- validating and dispatching ------------------------------------------

    def _accept(self, delivery: Delivery) -> None:
        if len(delivery.body) > self._settings.max_body_bytes:
            self._dead_letter(
                delivery,
                InvalidMessage(
                    f"body of {len(delivery.body)} bytes exceeds the "
                    f"{self._settings.max_body_bytes}-byte limit"
                ),
            )
            return
        try:
            envelope, request = parse_work_request(delivery.body)
        except InvalidMessage as problem:
            self._dead_letter(delivery, problem)
            return
        except Exception as exc:  # a parser bug must cost one message, not the worker
            logger.exception("unexpected error while validating a message")
            self._dead_letter(delivery, InvalidMessage(f"unreadable message: {type(exc).__name__}"))
            return
        task = Task(delivery, envelope, request)
        with task.log_context():
            if envelope.to_agent != self._settings.agent_type:
                self._wrong_agent(delivery, envelope)
                return
            if not self._late_ack:
                self._link.ack(delivery.tag)
            self._dispatch(delivery, envelope, task)

    def _dispatch(self, delivery: Delivery, envelope: Envelope, task: Task) -> None:
        claim = self._cache.claim(task.request_id)
        if claim.state is ClaimState.DONE:
            assert claim.result is not None
            self._stats.duplicate()
            if envelope.message_id in claim.result.message_ids:
                logger.info("redelivery of an answered request: acked, not answered again")
                # Behind the answer in the outbox, so a late ack never precedes it.
                self._outbox.add(None, self._late_acks(delivery))
            else:
                logger.info("duplicate request: sending the cached result")
                claim.result.message_ids += (envelope.message_id,)
                answer = claim.result.result()
                self._queue_result(answer, delivery, envelope, self._late_acks(delivery))
            self.flush_outbox()
        elif claim.state is ClaimState.IN_FLIGHT:
            self._stats.duplicate()
            logger.info("duplicate request while the first is running: will answer both")
            self._running[task.request_id].duplicates.append((delivery, envelope))
        # currsize, not len(): len() would expire the cache for every request.
        elif not (self._cancels.currsize and self._cancelled_on_arrival(task)):
            self._start(task)

    def _start(self, task: Task) -> None:
        hint = task.request.hints.get("max_duration_seconds")
        limit = hint if isinstance(hint, int | float) and hint > 0 else None
        limit = limit or self._settings.default_max_duration
        if limit:
            task.deadline = task.started + float(limit)
        self._running[task.request_id] = task
        self._stats.in_flight(len(self._running))
        if self._run_inline is not None and task.deadline is None:
            # Right here, inside pika's delivery callback: a delivery that
            # arrives meanwhile is dispatched straight after this one returns,
            # in the same pass through pika (half the cost of going round the
            # loop). The service calls finish_inline when the work is done.
            self._inline_task = task
            self._run_inline(task)
            return
        self._threads.submit(task)
        if task.wait_briefly(FAST_PATH_SECONDS):
            self._complete(task)

    def finish_inline(self, task: Task) -> None:
        """After the service ran an inline task (its result is set)."""
        self._inline_task = None
        if task.abandoned:  # answered already (cancelled): only its slot is left
            self._drop_late_result(task)
            self._free_slot(task)
            return
        self._complete(task)

    # -- finished work --------------------------------------------------------

    def _hand_over(self, task: Task) -> None:
        """Work thread: the connection thread stopped waiting; post the result to it."""
        self._post(lambda: self._handed_over(task))

    def _handed_over(self, task: Task) -> None:
        if task.abandoned:
            self._drop_late_result(task)
        else:
            self._complete(task)

    @staticmethod
    def _drop_late_result(task: Task) -> None:
        late = task.result
        # Work that saw the flag and ended as cancelled did the right thing.
        level = logging.INFO if late is not None and late.status == "cancelled" else logging.WARNING
        with task.log_context():
            logger.log(
                level,
                "work returned after it was answered: its result is dropped",
                extra={"reason": task.cancel_reason},
            )

    def _complete(self, task: Task, result: WorkResult | None = None) -> None:
        try:
            self._answer(task, result)
        except ConnectionLost:
            # The answer waits in the outbox; the slot must not stay taken, or
            # nothing is consumed after the reconnect. New work waits for it.
            self._running.pop(task.request_id, None)
            self._stats.in_flight(len(self._running))
            raise
        self._free_slot(task)

    def _answer(self, task: Task, result: WorkResult | None = None) -> None:
        """Send (and cache) the task's result; its slot may stay taken (_free_slot).

        `result` when the runtime answers for work still running (a time limit,
        a cancel): its thread may set task.result meanwhile.
        """
        result = result or task.result
        assert result is not None
        if task.progress:
            self.send_progress(task)  # reports made before the result go out before it
        self._stats.finished(result.status, result.duration_ms / 1000)
        self._finished_task_ids.append(task.request.task_id)
        # Recorded before publishing: a publish may raise ConnectionLost, and a
        # request left "in flight" would swallow its retries.
        self._cache.complete(task.request_id, self._answer_all(task, result))
        self.flush_outbox()

    def _free_slot(self, task: Task) -> None:
        self._running.pop(task.request_id, None)
        self._stats.in_flight(len(self._running))
        self._slot_freed()

    def _answer_all(self, task: Task, result: WorkResult) -> Answered:
        """One result per request message; returns what the cache keeps of them.

        Deliveries of the same message (a redelivery after a lost ack) share
        that one result, and in late mode all of them are acked after it.
        """
        if not task.duplicates:  # nearly always
            payload_json = self._queue_result(
                result, task.delivery, task.envelope, self._late_acks(task.delivery)
            )
            return Answered(payload_json, (task.envelope.message_id,))
        by_message: dict[uuid.UUID, tuple[Delivery, Envelope, list[DeliveryTag]]] = {}
        for delivery, envelope in [(task.delivery, task.envelope), *task.duplicates]:
            first = by_message.setdefault(envelope.message_id, (delivery, envelope, []))
            first[2].extend(self._late_acks(delivery))
        payloads = [self._queue_result(result, *answer) for answer in by_message.values()]
        return Answered(payloads[0], tuple(by_message))

    def stop_consuming_while_busy(self) -> None:
        """Long inline work: deliveries pika has not handed over go back to the queue.

        pika cannot hand them to us while the work runs inside its callback;
        cancelling the consumer makes it requeue them for an idle worker.
        """
        if self._link.is_open and self._link.consuming:
            self._link.stop_consuming()

    def cancel_running(self, reason: str) -> None:
        """Tell every running task it must end early (work sees it as `cancelled`)."""
        for task in list(self._running.values()):
            if task.cancel_reason is None:
                task.mark_cancelled(reason)

    def check_deadlines(self, now: float) -> None:
        """Fail tasks that outlived max_duration_seconds; their thread is replaced."""
        for task in list(self._running.values()):
            if task.deadline is None or now < task.deadline or task.abandoned:
                continue
            limit = task.deadline - task.started
            with task.log_context():
                logger.error(
                    "work exceeded its time limit: failing it, its thread is left behind",
                    extra={"max_duration_seconds": limit, "error_code": ERROR_TIMEOUT},
                )
            failed = WorkResult.failed(
                task.request, f"error {ERROR_TIMEOUT}: timeout, work ran longer than {limit:g} s"
            )
            self._answer_early(task, failed, f"time limit of {limit:g} s exceeded")

    def _answer_early(self, task: Task, result: WorkResult, reason: str) -> None:
        """Answer a running task now (time limit, cancel); its work is told and left behind.

        A work thread is replaced, so the slot serves the next request at
        once. Inline work runs on the connection thread itself: its slot
        stays taken until it returns (finish_inline), so no request waits
        behind it unseen.
        """
        answer = result.model_copy(
            update={
                "duration_ms": int((time.monotonic() - task.started) * 1000),
                "agent_id": self._agent_id,
                "trace_id": task.envelope.trace_id,
                "request_id": task.envelope.request_id,
            }
        )
        task.abandoned = True
        try:
            if self._inline_task is task:
                self._answer(task, answer)
            else:
                self._threads.add_thread()
                self._complete(task, answer)
        finally:
            # Told last: the work may end at once, and its own result must not
            # take the place of this answer.
            task.mark_cancelled(reason)

    # -- control commands (baton holder) -----------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> bool:
        """Take no new requests (the running ones go on); False if already paused."""
        if self._paused:
            return False
        self._paused = True
        if self._link.is_open:
            self._link.stop_consuming()
            self._return_held()
        return True

    def resume(self) -> bool:
        """Take requests again; False if not paused."""
        if not self._paused:
            return False
        self._paused = False
        self._consume_if_room()
        return True

    def cancel(
        self, task_id: uuid.UUID | None, request_id: uuid.UUID | None, reason: str
    ) -> tuple[str, str]:
        """Cancel a task by either id; returns (outcome, detail) for the answer."""
        for task in list(self._running.values()):
            if task.request.task_id == task_id or task.envelope.request_id == request_id:
                if task.abandoned:
                    return "already_finished", f"it was answered already ({task.cancel_reason})"
                with task.log_context():
                    logger.warning("task cancelled while running", extra={"reason": reason})
                self._stats.cancelled()
                self._answer_early(task, WorkResult.cancelled(task.request, reason), reason)
                return "cancelled", "it was running here: answered cancelled, its work told to stop"
        if (request_id is not None and self._cache.finished(str(request_id))) or (
            task_id is not None and task_id in self._finished_task_ids
        ):
            return "already_finished", "it was answered here already: nothing changed"
        for key in (task_id, request_id):
            if key is not None:
                self._cancels[key] = reason
        return "remembered", "not running here: it will be answered cancelled if it arrives"

    def _cancelled_on_arrival(self, task: Task) -> bool:
        """A request cancelled before it came: answered cancelled, never run."""
        reason = self._cancels.get(task.request.task_id) or self._cancels.get(
            task.envelope.request_id
        )
        if reason is None:
            return False
        logger.info("request cancelled before it arrived: not run", extra={"reason": reason})
        self._stats.cancelled()
        self._running[task.request_id] = task
        task.mark_cancelled(reason)
        task.result = WorkResult.cancelled(
            task.request,
            reason,
            agent_id=self._agent_id,
            trace_id=task.envelope.trace_id,
            request_id=task.envelope.request_id,
        )
        self._complete(task)
        return True

    # -- answers --------------------------------------------------------------

    def _late_acks(self, delivery: Delivery) -> list[DeliveryTag]:
        return [delivery.tag] if self._late_ack else []

    def _reply(
        self,
        payload: Payload,
        delivery: Delivery,
        envelope_ids: Envelope | dict[str, str],
        acks: list[DeliveryTag],
        priority: int = 3,
    ) -> None:
        self._outbox.add(self._message(payload, delivery, envelope_ids, priority), acks)

    def _message(
        self,
        payload: Payload,
        delivery: Delivery,
        envelope_ids: Envelope | dict[str, str],
        priority: int,
    ) -> Outgoing:
        """The answer to `delivery`: to its reply_to (else the reply queue), ids copied."""
        body, _ = self._encode(payload, envelope_ids, priority)
        return self._outgoing(delivery, body, priority)

    def _encode(
        self, payload: Payload, envelope_ids: Envelope | dict[str, str], priority: int
    ) -> tuple[bytes, bytes]:
        """The message's bytes and its payload's."""
        if isinstance(envelope_ids, Envelope):
            trace_id, request_id = envelope_ids.trace_id, envelope_ids.request_id
            to_agent: str = envelope_ids.from_agent
        else:
            trace_id = envelope_ids["trace_id"]  # type: ignore[assignment]
            request_id = envelope_ids["request_id"]  # type: ignore[assignment]
            to_agent = envelope_ids.get("from_agent", "orchestrator")
        return encode_message(
            payload,
            from_agent=self._settings.agent_type,
            to_agent=to_agent,
            trace_id=trace_id,
            request_id=request_id,
            priority=priority,
        )

    def _outgoing(self, delivery: Delivery, body: bytes, priority: int) -> Outgoing:
        return Outgoing(
            routing_key=delivery.reply_to or self._settings.reply_queue,
            body=body,
            priority=priority,
            correlation_id=delivery.correlation_id,
            awaited=self._late_ack,
        )

    def _queue_result(
        self,
        result: WorkResult,
        delivery: Delivery,
        envelope: Envelope,
        acks: list[DeliveryTag],
    ) -> bytes:
        """Queue the answer to one request message; returns the payload's JSON."""
        # A duplicate's answer carries its own trace_id, not the first one's.
        if result.trace_id != envelope.trace_id:
            result = result.model_copy(update={"trace_id": envelope.trace_id})
        try:
            body, payload_json = self._encode(result, envelope, envelope.priority)
        except ENCODING_ERRORS as exc:
            # A lone surrogate in output, an object in analysis_result: the
            # work's own data, so it costs the answer's content, not the worker.
            logger.error("result cannot be encoded: sending a failure instead", exc_info=True)
            body, payload_json = self._failure_instead(
                result, envelope, f"result could not be encoded as JSON: {type(exc).__name__}"
            )
        limit = self._settings.max_result_bytes
        if len(body) > limit:
            # The broker would refuse it (message size) and close our channel:
            # say what happened instead of losing the answer.
            size = len(body)
            logger.error("result too large: sending a failure instead", extra={"bytes": size})
            body, payload_json = self._failure_instead(
                result,
                envelope,
                f"result of {size} bytes exceeds the {limit}-byte limit (CHIFFON_MAX_RESULT_BYTES)",
            )
        self._outbox.add(self._outgoing(delivery, body, envelope.priority), acks)
        return payload_json

    def _failure_instead(
        self, result: WorkResult, envelope: Envelope, why: str
    ) -> tuple[bytes, bytes]:
        """The bytes of a `failed` answer saying why `result` itself cannot be sent."""
        failed = result.model_copy(
            update={
                "status": "failed",
                "exit_code": 1,
                "output": "",
                "analysis_result": None,
                "resources_used": {},
                "error_message": why,
            }
        )
        return self._encode(failed, envelope, envelope.priority)

    def _dead_letter(self, delivery: Delivery, problem: InvalidMessage) -> None:
        with message_context(**problem.ids):
            logger.warning("invalid message dead-lettered", extra={"reason": problem.reason})
            # Without readable ids there is nobody to address an error to.
            error = ErrorMessage(
                error_code=ERROR_INVALID_MESSAGE,
                error_message=f"invalid message: {problem.reason}",
                context={"reason": problem.reason},
            )
            self._refuse(delivery, error, problem.ids or None)

    def _wrong_agent(self, delivery: Delivery, envelope: Envelope) -> None:
        reason = (
            f"request is for agent type {envelope.to_agent!r} but this worker is "
            f"{self._settings.agent_type!r}"
        )
        logger.warning("request for another agent type dead-lettered", extra={"reason": reason})
        error = ErrorMessage(
            error_code=ERROR_UNSUPPORTED_WORK_TYPE,
            error_message=reason,
            context={"to_agent": envelope.to_agent, "agent_type": self._settings.agent_type},
        )
        self._refuse(delivery, error, envelope)

    def _refuse(
        self,
        delivery: Delivery,
        error: ErrorMessage,
        answer_to: Envelope | dict[str, str] | None,
    ) -> None:
        """Reject without requeue (to dlx_queue) and send `error` where it can be addressed."""
        self._stats.dead_lettered()
        self._link.reject(delivery.tag, requeue=False)
        if answer_to is not None:
            self._reply(error, delivery, answer_to, [])
            self.flush_outbox()

    # -- outbox ---------------------------------------------------------------

    def send_progress(self, task: Task) -> None:
        """Move a task's progress reports into the outbox; they go out with the next flush."""
        waiting = task.progress
        if not waiting:
            return
        if task.request_id not in self._running or task.abandoned:
            waiting.clear()  # answered already: a report now would follow its result
            return
        envelope = task.envelope
        limit = self._settings.max_result_bytes
        while waiting:
            status = waiting.popleft()
            try:
                message = self._message(status, task.delivery, envelope, envelope.priority)
            except ENCODING_ERRORS as exc:
                logger.error(
                    "progress report cannot be encoded: dropped", extra={"reason": repr(exc)}
                )
                continue
            if len(message.body) > limit:
                # The broker would close our channel for it, at every reconnect.
                logger.error(
                    "progress report too large: dropped",
                    extra={"bytes": len(message.body), "limit": limit},
                )
                continue
            self._outbox.add_progress(message)

    def flush_outbox(self) -> None:
        self._outbox.flush()

    def settle(self) -> None:
        """The link calls this when confirms came in that someone waits for."""
        self._outbox.settle()

    def publish_now(self, message: Outgoing) -> None:
        """Heartbeats: best effort, never queued (the next one supersedes it)."""
        self._link.publish(message)
        self._stats.heartbeat_sent(time.time())

    def publish_best_effort(self, message: Outgoing) -> None:
        """Answers to control commands: sent once, not kept for a reconnect."""
        self._link.publish(message)

    def pending(self) -> int:
        return self._outbox.pending()
