"""RequestConsumer, its Outbox and the Mailbox on a fake broker link; no broker.

The fake link records every ack, reject and publish in one ordered list of
events. The broker's answer to a publish is played by the test: it sets the
message's `state` to CONFIRMED or REFUSED and calls `settle()`, as the real
link does when confirms arrive. The test thread plays the baton holder: it
runs what work threads post to it.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from chiffon_worker import outbox as outbox_module
from chiffon_worker.amqp import Delivery, DeliveryTag, Outgoing, PublishState
from chiffon_worker.config import Settings
from chiffon_worker.consumer import HOLD_GRACE_SECONDS, RequestConsumer
from chiffon_worker.errors import ConnectionLost
from chiffon_worker.handoff import Mailbox
from chiffon_worker.outbox import MAX_PUBLISH_ATTEMPTS, Outbox
from chiffon_worker.protocol import (
    Envelope,
    WorkRequest,
    WorkResult,
    WorkStatus,
    encode,
    make_envelope,
    parse_envelope,
)
from chiffon_worker.tasks import Task

WAIT_S = 10.0
DROPPED = "publish failed for good: message dropped"
AGENT_ID = str(uuid.uuid4())

Event = tuple[object, ...]


# -- the fake broker link ----------------------------------------------------------


@dataclass
class Timer:
    delay: float
    callback: Callable[[], None]


class FakeLink:
    """consumer.Link and outbox.Publisher, recording what the consumer asked of the broker."""

    def __init__(self) -> None:
        self.is_open = True
        self._consuming = False
        self.events: list[Event] = []
        self.timers: list[Timer] = []
        # Messages published while the broker still had them: a double send.
        self.sent_twice: list[Outgoing] = []

    # -- consumer.Link --------------------------------------------------------

    @property
    def consuming(self) -> bool:
        return self._consuming

    def start_consuming(self) -> None:
        if not self._consuming:
            self._consuming = True
            self.events.append(("start_consuming",))

    def stop_consuming(self) -> None:
        if self._consuming:
            self._consuming = False
            self.events.append(("stop_consuming",))

    def ack(self, tag: DeliveryTag) -> bool:
        if not self.is_open:
            return False
        self.events.append(("ack", tag))
        return True

    def reject(self, tag: DeliveryTag, *, requeue: bool) -> bool:
        if not self.is_open:
            return False
        self.events.append(("reject", tag, requeue))
        return True

    def publish(self, message: Outgoing) -> None:
        assert self.is_open, "published on a closed link"
        if message.state is not PublishState.UNSENT:
            self.sent_twice.append(message)
        message.state, message.refusal = PublishState.WAITING, ""
        self.events.append(("publish", message))

    def call_later(self, delay: float, callback: Callable[[], None]) -> object | None:
        timer = Timer(delay, callback)
        self.timers.append(timer)
        return timer

    def cancel_timer(self, timer: object | None) -> None:
        if timer in self.timers:
            self.timers.remove(timer)

    # -- what the test plays ----------------------------------------------------

    def fire_timers(self) -> None:
        due, self.timers = self.timers, []
        for timer in due:
            timer.callback()

    def lose_channel(self) -> None:
        """As BrokerLink does when the channel dies: unconfirmed messages become unsent."""
        self.is_open = False
        self._consuming = False
        for message in self.published():
            if message.state is PublishState.WAITING:
                message.state = PublishState.UNSENT

    def published(self) -> list[Outgoing]:
        return [event[1] for event in self.events if event[0] == "publish"]  # type: ignore[misc]

    def acks(self) -> list[DeliveryTag]:
        return [event[1] for event in self.events if event[0] == "ack"]  # type: ignore[misc]

    def rejects(self) -> list[tuple[DeliveryTag, bool]]:
        return [(event[1], event[2]) for event in self.events if event[0] == "reject"]  # type: ignore[misc]

    def events_after(self, count: int) -> list[Event]:
        return self.events[count:]


def answer(message: Outgoing, state: PublishState, refusal: str = "") -> None:
    """The broker confirms or refuses one published message."""
    message.state = state
    message.refusal = refusal


# -- requests, work and the baton holder -----------------------------------------------


@dataclass
class Sent:
    """A work_request as the orchestrator sent it."""

    request_id: uuid.UUID = field(default_factory=uuid.uuid4)
    trace_id: uuid.UUID = field(default_factory=uuid.uuid4)
    work_type: str = "echo"

    def body(self) -> bytes:
        request = WorkRequest(task_id=uuid.uuid4(), work_type=self.work_type)
        envelope = make_envelope(
            request,
            from_agent="orchestrator",
            to_agent="infra",
            trace_id=self.trace_id,
            request_id=self.request_id,
        )
        return encode(envelope)


class Work:
    """The consumer's run_task: counts runs; when held, each task waits for its release."""

    def __init__(self, *, held: bool = False, output: str = "done") -> None:
        self.output = output
        self.runs: list[str] = []
        self.during: Callable[[Task], None] | None = None
        self._held = held
        self._gates: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def _gate(self, request_id: str) -> threading.Event:
        with self._lock:
            gate = self._gates.get(request_id)
            if gate is None:
                gate = self._gates[request_id] = threading.Event()
                if not self._held:
                    gate.set()
            return gate

    def release(self, sent: Sent) -> None:
        self._gate(str(sent.request_id)).set()

    def release_all(self) -> None:
        with self._lock:
            self._held = False
            gates = list(self._gates.values())
        for gate in gates:
            gate.set()

    def __call__(self, task: Task) -> WorkResult:
        with self._lock:
            self.runs.append(task.request_id)
        if self.during is not None:
            self.during(task)
        assert self._gate(task.request_id).wait(WAIT_S), "the test never released this task"
        return WorkResult.completed(task.request, output=self.output)


class Baton:
    """Plays the baton holder: what work threads post runs here, on the test thread."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def post(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def run_next(self) -> None:
        """Wait for the next posted job (a finished task, say) and run it."""
        self._jobs.get(timeout=WAIT_S)()

    def run_posted(self) -> None:
        while not self._jobs.empty():
            self._jobs.get_nowait()()


def progress(task: Task, percent: float) -> WorkStatus:
    return WorkStatus.model_validate(
        {
            "task_id": task.request.task_id,
            "status": "running",
            "progress_percent": percent,
            "step": {"number": 1, "name": "step"},
        }
    )


class Harness:
    """A RequestConsumer on a FakeLink, connected and consuming."""

    def __init__(
        self,
        work: Work,
        *,
        prefetch: int = 1,
        ack_mode: Literal["early", "late"] = "early",
        max_result_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.link = FakeLink()
        self.baton = Baton()
        self.work = work
        settings = Settings(prefetch=prefetch, ack_mode=ack_mode, max_result_bytes=max_result_bytes)
        # The service runs inline work inside the delivery callback; here it is
        # parked, so the test decides when it finishes.
        self.parked: list[Task] = []
        self.consumer = RequestConsumer(
            self.link, settings, AGENT_ID, work, self.baton.post, run_inline=self.parked.append
        )
        self.consumer.on_connected()
        self._tags = 0

    def deliver(self, sent: Sent) -> Delivery:
        self._tags += 1
        delivery = Delivery(
            tag=DeliveryTag(generation=1, value=self._tags),
            body=sent.body(),
            reply_to=None,
            correlation_id=f"delivery-{self._tags}",
        )
        self.consumer.on_delivery(delivery)
        return delivery

    def run_inline(self) -> Task:
        """What the service does inside the callback: run the inline task, then finish it."""
        task = self.take_inline()
        assert task is not None, "no task was waiting to run inline"
        self.finish_inline(task)
        return task

    def take_inline(self) -> Task | None:
        return self.parked.pop(0) if self.parked else None

    def start_inline(self) -> Task:
        """Deliver a request; its task, parked to run inline (the test finishes it)."""
        self.deliver(Sent())
        task = self.take_inline()
        assert task is not None, "no task was waiting to run inline"
        return task

    def finish_inline(self, task: Task) -> None:
        """Run the work and hand its result over, as the service does after inline work."""
        task.finish(self.work(task))
        self.consumer.finish_inline(task)

    def finish_held(self, sent: Sent) -> None:
        """Release the held work on `sent`; run what its thread posts (the result goes out)."""
        self.work.release(sent)
        self.baton.run_next()

    def broker_answers(self, message: Outgoing, state: PublishState, refusal: str = "") -> None:
        """The broker confirms or refuses `message`; the consumer hears of it."""
        answer(message, state, refusal)
        self.consumer.settle()

    def report(self, task: Task, status: WorkStatus) -> None:
        """A progress report as the service hands it over (service._progress_from)."""
        if task.progress is None:
            task.progress = collections.deque()
        task.progress.append(status)
        self.baton.post(lambda: self.consumer.send_progress(task))

    def messages(self, kind: str) -> list[tuple[Outgoing, Envelope]]:
        """Published messages of one envelope type, in publish order, each once."""
        seen: list[tuple[Outgoing, Envelope]] = []
        once: set[int] = set()
        for message in self.link.published():
            envelope = parse_envelope(message.body)
            if envelope.type == kind and id(message) not in once:
                once.add(id(message))
                seen.append((message, envelope))
        return seen

    def results(self) -> list[tuple[Outgoing, Envelope, WorkResult]]:
        return [
            (message, envelope, WorkResult.model_validate(envelope.payload))
            for message, envelope in self.messages("work_result")
        ]

    def confirm_all(self) -> None:
        for message in self.link.published():
            if message.state is PublishState.WAITING:
                answer(message, PublishState.CONFIRMED)
        self.consumer.settle()

    def close(self) -> None:
        self.work.release_all()
        self.consumer.close()


@pytest.fixture
def make() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def build(work: Work | None = None, **settings: object) -> Harness:
        harness = Harness(work or Work(), **settings)  # type: ignore[arg-type]
        made.append(harness)
        return harness

    yield build
    for harness in made:
        harness.close()


def _late_result(make: Callable[..., Harness]) -> tuple[Harness, Delivery, Outgoing]:
    """Late acks, one request finished: its delivery, and its result waiting for a confirm."""
    harness = make(Work(held=True), ack_mode="late")
    sent = Sent()
    delivery = harness.deliver(sent)
    harness.finish_held(sent)
    [(result, _, _)] = harness.results()
    return harness, delivery, result


# -- one message at a time, and no message held hostage -------------------------------


def test_delivery_arriving_while_busy_is_held_then_taken_when_the_slot_frees(
    make: Callable[..., Harness],
) -> None:
    harness = make()
    link = harness.link
    first = harness.deliver(Sent())
    before = len(link.events)

    second = harness.deliver(Sent())

    assert link.events_after(before) == []  # neither acked nor rejected: held
    assert [timer.delay for timer in link.timers] == [HOLD_GRACE_SECONDS]

    harness.run_inline()

    assert link.acks() == [first.tag, second.tag]
    assert link.rejects() == []
    assert link.timers == []  # the grace timer was cancelled
    assert link.consuming
    assert harness.run_inline().delivery == second


def test_held_delivery_goes_back_to_the_queue_after_the_grace_consumer_cancelled_first(
    make: Callable[..., Harness],
) -> None:
    harness = make()
    link = harness.link
    harness.deliver(Sent())
    held = harness.deliver(Sent())
    before = len(link.events)

    link.fire_timers()

    assert link.events_after(before) == [("stop_consuming",), ("reject", held.tag, True)]
    assert held.tag not in link.acks()

    harness.run_inline()

    assert link.consuming  # a free slot consumes again
    assert harness.take_inline() is None


def test_after_a_reconnect_no_new_work_is_taken_until_the_running_task_ends(
    make: Callable[..., Harness],
) -> None:
    harness = make()
    link = harness.link
    harness.deliver(Sent())
    link.lose_channel()
    harness.consumer.on_connection_lost()

    link.is_open = True
    harness.consumer.on_connected()

    assert not link.consuming
    harness.run_inline()
    assert link.consuming
    assert len(harness.results()) == 1


# -- duplicates ------------------------------------------------------------------------


def test_duplicate_arriving_while_the_first_runs_runs_the_work_once_and_answers_both(
    make: Callable[..., Harness],
) -> None:
    work = Work(held=True, output="once")
    harness = make(work, prefetch=2)
    first = Sent()
    again = Sent(request_id=first.request_id)
    deliveries = [harness.deliver(first), harness.deliver(again)]

    harness.finish_held(first)

    assert work.runs == [str(first.request_id)]
    results = harness.results()
    assert [message.correlation_id for message, _, _ in results] == [
        d.correlation_id for d in deliveries
    ]
    assert {envelope.trace_id for _, envelope, _ in results} == {first.trace_id, again.trace_id}
    assert {result.output for _, _, result in results} == {"once"}
    assert {envelope.request_id for _, envelope, _ in results} == {first.request_id}
    assert harness.link.acks() == [d.tag for d in deliveries]


def test_redelivery_of_the_running_message_is_answered_once_and_both_acked_late(
    make: Callable[..., Harness],
) -> None:
    work = Work(held=True)
    harness = make(work, prefetch=2, ack_mode="late")
    sent = Sent()
    body = sent.body()
    first = Delivery(DeliveryTag(1, 1), body, None, "first")
    again = Delivery(DeliveryTag(1, 2), body, None, "again")  # same message: its ack was lost
    harness.consumer.on_delivery(first)
    harness.consumer.on_delivery(again)

    harness.finish_held(sent)
    [(result, _, _)] = harness.results()
    assert harness.link.acks() == []

    harness.confirm_all()

    assert work.runs == [str(sent.request_id)]
    assert harness.link.acks() == [first.tag, again.tag]
    assert result.correlation_id == "first"


# -- late acks -------------------------------------------------------------------------


def test_late_ack_goes_out_only_after_the_result_is_confirmed(
    make: Callable[..., Harness],
) -> None:
    harness, delivery, result = _late_result(make)

    assert harness.link.acks() == []

    harness.broker_answers(result, PublishState.CONFIRMED)

    assert harness.link.acks() == [delivery.tag]
    events = harness.link.events
    assert events.index(("publish", result)) < events.index(("ack", delivery.tag))


def test_late_ack_waits_behind_an_earlier_unconfirmed_result(
    make: Callable[..., Harness],
) -> None:
    work = Work(held=True)
    harness = make(work, prefetch=2, ack_mode="late")
    earlier, later = Sent(), Sent()
    earlier_delivery = harness.deliver(earlier)
    later_delivery = harness.deliver(later)
    harness.finish_held(earlier)
    harness.finish_held(later)
    [(earlier_result, _, _), (later_result, _, _)] = harness.results()

    harness.broker_answers(later_result, PublishState.CONFIRMED)

    assert harness.link.acks() == []

    harness.broker_answers(earlier_result, PublishState.CONFIRMED)

    assert harness.link.acks() == [earlier_delivery.tag, later_delivery.tag]


# -- results the broker would not take -----------------------------------------------------


def test_oversized_result_is_answered_with_a_failure_saying_so(
    make: Callable[..., Harness],
) -> None:
    harness = make(Work(output="x" * 5000), max_result_bytes=1024)
    sent = Sent()
    harness.deliver(sent)

    task = harness.run_inline()

    [(message, envelope, result)] = harness.results()
    assert len(message.body) <= 1024
    assert envelope.request_id == sent.request_id
    assert result.task_id == task.request.task_id
    assert (result.status, result.exit_code, result.output) == ("failed", 1, "")
    assert result.error_message is not None
    assert "exceeds the 1024-byte limit" in result.error_message


def test_refused_result_is_published_again_and_acked_once_confirmed(
    make: Callable[..., Harness],
) -> None:
    harness, delivery, result = _late_result(make)

    harness.broker_answers(result, PublishState.REFUSED, "nacked by the broker")

    assert harness.link.published() == [result, result]
    assert harness.link.acks() == []

    harness.broker_answers(result, PublishState.CONFIRMED)

    assert harness.link.acks() == [delivery.tag]
    assert harness.consumer.pending() == 0


def test_result_refused_every_time_is_dropped_and_its_late_ack_still_goes_out(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    harness, delivery, result = _late_result(make)

    with caplog.at_level(logging.WARNING, logger="chiffon_worker"):
        for _ in range(MAX_PUBLISH_ATTEMPTS):
            assert harness.link.acks() == []
            harness.broker_answers(
                result, PublishState.REFUSED, "returned unroutable: 312 NO_ROUTE"
            )

    assert harness.link.published() == [result] * MAX_PUBLISH_ATTEMPTS
    assert harness.link.acks() == [delivery.tag]
    assert harness.consumer.pending() == 0
    dropped = [r for r in caplog.records if r.getMessage() == DROPPED]
    assert [r.levelno for r in dropped] == [logging.ERROR]


# -- progress ---------------------------------------------------------------------------


def test_progress_made_before_the_result_goes_out_before_it(make: Callable[..., Harness]) -> None:
    work = Work()
    harness = make(work)
    work.during = lambda task: harness.report(task, progress(task, 50))
    harness.deliver(Sent())

    harness.run_inline()
    harness.baton.run_posted()  # the report's own job, after the result: sends nothing more

    assert [envelope.type for _, envelope in harness.messages("work_status")] == ["work_status"]
    kinds = [parse_envelope(m.body).type for m in harness.link.published()]
    assert kinds == ["work_status", "work_result"]


def test_progress_for_a_finished_task_is_not_queued(make: Callable[..., Harness]) -> None:
    harness = make()
    harness.deliver(Sent())
    task = harness.run_inline()
    published = len(harness.link.published())

    harness.report(task, progress(task, 99))
    harness.baton.run_posted()
    harness.consumer.flush_outbox()

    assert len(harness.link.published()) == published
    assert harness.consumer.pending() == 1  # only the result, waiting for its confirm
    assert not task.progress


def test_progress_storm_publishes_each_report_once(make: Callable[..., Harness]) -> None:
    reports = 5000
    harness = make()
    task = harness.start_inline()

    for number in range(reports):
        harness.report(task, progress(task, number % 100))
        # The worst case: the holder takes its turn after every report.
        harness.baton.run_posted()
        harness.consumer.flush_outbox()
        if number % 1000 == 999:
            harness.confirm_all()
    harness.finish_inline(task)

    assert len(harness.messages("work_status")) == reports
    assert len(harness.link.published()) == reports + 1
    assert harness.link.sent_twice == []


def test_progress_beyond_the_cap_during_an_outage_is_dropped_and_the_result_still_goes_out(
    make: Callable[..., Harness],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(outbox_module, "MAX_PROGRESS_WAITING", 50)
    harness = make()
    task = harness.start_inline()

    with caplog.at_level(logging.INFO, logger="chiffon_worker"):
        harness.link.is_open = False  # an outage: the reports pile up unsent
        for number in range(200):
            harness.report(task, progress(task, number % 100))
        harness.baton.run_posted()
        harness.link.is_open = True
        harness.consumer.on_connected()
        harness.finish_inline(task)
        harness.confirm_all()

    assert len(harness.messages("work_status")) == 50
    assert len(harness.results()) == 1
    assert harness.consumer.pending() == 0
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("progress reports dropped: too many wait for the broker") == 1
    assert "progress reports flowing again" in messages


def test_progress_beyond_the_cap_is_not_dropped_while_connected(
    make: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "MAX_PROGRESS_WAITING", 50)
    harness = make()
    task = harness.start_inline()

    for number in range(200):  # confirms lag behind: all 200 wait for the broker at once
        harness.report(task, progress(task, number % 100))
    harness.baton.run_posted()
    harness.finish_inline(task)
    harness.confirm_all()

    assert len(harness.messages("work_status")) == 200
    assert len(harness.results()) == 1


# -- the outbox across a reconnect --------------------------------------------------------


def test_unconfirmed_messages_go_out_again_in_order_on_a_new_channel() -> None:
    link = FakeLink()
    box = Outbox(link)
    first, second, third = (Outgoing("reply_queue", f"m{n}".encode(), 3) for n in (1, 2, 3))
    for message in (first, second, third):
        box.add(message)
    box.flush()
    answer(first, PublishState.CONFIRMED)
    box.settle()

    link.lose_channel()
    waited = Outgoing("reply_queue", b"made while down", 3)
    box.add(waited)
    box.flush()  # nowhere to send it: it waits
    before = len(link.events)
    link.is_open = True
    box.reconnected()
    box.flush()

    resent = [event[1] for event in link.events_after(before)]
    assert resent == [second, third, waited]
    assert link.sent_twice == []
    assert box.pending() == 3


# -- the mailbox: the one door to the baton holder -------------------------------------------


class Wakes:
    """The mailbox's wake_link: counts wake-ups; answers whether a link was there to wake."""

    def __init__(self, connected: bool = True) -> None:
        self.connected = connected
        self.count = 0

    def __call__(self, _job: Callable[[], None]) -> bool:
        self.count += 1
        return self.connected


def test_mailbox_runs_jobs_in_the_order_they_were_posted() -> None:
    mailbox = Mailbox(Wakes())
    ran: list[int] = []
    for number in range(5):
        mailbox.post(lambda number=number: ran.append(number))  # type: ignore[misc]

    assert mailbox.run_posted() == 5
    assert ran == [0, 1, 2, 3, 4]


def _failing_then_next(error: Exception) -> tuple[Mailbox, list[str]]:
    """A mailbox holding a job that raises `error`, then one that records "next" in the list."""
    mailbox = Mailbox(Wakes())
    ran: list[str] = []

    def failing() -> None:
        raise error

    mailbox.post(failing)
    mailbox.post(lambda: ran.append("next"))
    return mailbox, ran


def test_mailbox_job_that_raises_is_logged_and_the_next_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mailbox, ran = _failing_then_next(ValueError("a bug in one job"))
    with caplog.at_level(logging.ERROR, logger="chiffon_worker"):
        mailbox.run_posted()

    assert ran == ["next"]
    [record] = caplog.records
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)


def test_mailbox_lets_connection_lost_through_and_keeps_the_rest_for_later() -> None:
    mailbox, ran = _failing_then_next(ConnectionLost("channel is not open"))

    with pytest.raises(ConnectionLost):
        mailbox.run_posted()
    assert ran == []

    mailbox.run_posted()  # after the reconnect
    assert ran == ["next"]


def test_mailbox_runs_every_job_from_many_threads_exactly_once() -> None:
    threads, per_thread = 4, 2000
    mailbox = Mailbox(Wakes())
    ran: collections.Counter[tuple[int, int]] = collections.Counter()
    start = threading.Barrier(threads + 1)
    done = threading.Event()
    finished = 0
    finished_lock = threading.Lock()

    def poster(number: int) -> None:
        nonlocal finished
        start.wait(WAIT_S)
        for job in range(per_thread):
            mailbox.post(lambda key=(number, job): ran.update([key]))  # type: ignore[misc]
        with finished_lock:
            finished += 1
            if finished == threads:
                done.set()

    posters = [threading.Thread(target=poster, args=(n,)) for n in range(threads)]
    for thread in posters:
        thread.start()
    start.wait(WAIT_S)
    while not done.is_set():  # the holder drains while they post
        mailbox.run_posted()
    for thread in posters:
        thread.join(WAIT_S)
    mailbox.run_posted()

    assert len(ran) == threads * per_thread
    assert set(ran.values()) == {1}


def test_a_storm_of_posts_wakes_the_holder_once_per_drain() -> None:
    wakes = Wakes()
    mailbox = Mailbox(wakes)

    for _ in range(1000):
        mailbox.post(lambda: None)
    assert wakes.count == 1

    mailbox.run_posted()
    mailbox.post(lambda: None)
    assert wakes.count == 2


def test_post_while_disconnected_wakes_the_holder_waiting_to_reconnect() -> None:
    mailbox = Mailbox(Wakes(connected=False))
    waiting = threading.Event()
    woke = threading.Event()

    def holder() -> None:
        waiting.set()
        mailbox.wait(WAIT_S * 6)
        woke.set()

    thread = threading.Thread(target=holder)
    thread.start()
    assert waiting.wait(WAIT_S)
    mailbox.post(lambda: None)

    assert woke.wait(WAIT_S), "the holder slept through a post"
    thread.join(WAIT_S)


# -- poison the work returns or reports (issue 13) ---------------------------------------


@pytest.mark.parametrize(
    "poison",
    [{"output": "\udcff"}, {"analysis_result": {"handle": object()}}],
    ids=["lone-surrogate", "object-in-analysis"],
)
def test_a_result_json_cannot_hold_is_answered_failed_and_the_next_request_served(
    make: Callable[..., Harness], poison: dict[str, Any]
) -> None:
    class Poisoned(Work):
        def __call__(self, task: Task) -> WorkResult:
            result = super().__call__(task)
            first = len(self.runs) == 1
            return result.model_copy(update=poison) if first else result

    harness = make(Poisoned())
    harness.deliver(Sent())
    harness.run_inline()
    harness.deliver(Sent())
    harness.run_inline()

    statuses = [(result.status, result.error_message) for _m, _e, result in harness.results()]
    assert statuses[0][0] == "failed"
    assert "could not be encoded" in (statuses[0][1] or "")
    assert statuses[1] == ("completed", None)


def test_oversized_or_unencodable_progress_is_dropped_and_the_result_still_goes_out(
    make: Callable[..., Harness],
) -> None:
    harness = make(max_result_bytes=2048)
    task = harness.start_inline()
    huge = progress(task, 10).model_copy(update={"step": {"number": 1, "name": "x" * 5000}})
    broken = progress(task, 20).model_copy(update={"step": {"number": 2, "name": "\udcff"}})
    fine = progress(task, 30)
    for status in (huge, broken, fine):
        harness.report(task, status)
    harness.baton.run_posted()
    harness.finish_inline(task)

    sent_progress = [
        envelope.payload["progress_percent"] for _m, envelope in harness.messages("work_status")
    ]
    assert sent_progress == [30]
    assert len(harness.results()) == 1
