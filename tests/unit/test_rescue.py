"""The rescue thread covers for long work on the connection thread, and only for that."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import pytest

from chiffon_worker import rescue
from chiffon_worker.rescue import Rescuer

WAIT_S = 10.0


class Turns:
    """Stands in for WorkerService.turn: records who ran each turn."""

    def __init__(self, fail_first: int = 0) -> None:
        self.count = 0
        self.holders: set[str] = set()
        self.baton_free_during_turn = False
        self.rescuer: Rescuer | None = None
        self._fail_first = fail_first
        self._lock = threading.Lock()
        self._reached: dict[int, threading.Event] = {}

    def __call__(self, _timeout: float) -> None:
        assert self.rescuer is not None
        # Whoever runs a turn must hold the baton: nobody else may take it now.
        if self.rescuer.baton.acquire(blocking=False):
            self.baton_free_during_turn = True
            self.rescuer.baton.release()
        with self._lock:
            self.count += 1
            self.holders.add(threading.current_thread().name)
            count = self.count
            reached = [event for wanted, event in self._reached.items() if count >= wanted]
        for event in reached:
            event.set()
        if count <= self._fail_first:
            raise RuntimeError("a bad turn")

    def reached(self, count: int) -> threading.Event:
        """An Event set once `count` turns have run."""
        with self._lock:
            event = self._reached.setdefault(count, threading.Event())
            if self.count >= count:
                event.set()
            return event


def started(
    turns: Turns,
    take_over_after: float = 0.05,
    hold_grace: float = WAIT_S,
    on_long_work: Callable[[], None] = lambda: None,
) -> Rescuer:
    rescuer = Rescuer(
        take_over_after=take_over_after,
        hold_grace=hold_grace,
        turn=turns,
        on_long_work=on_long_work,
    )
    turns.rescuer = rescuer
    rescuer.baton.acquire()  # as the connection thread does in WorkerService.run()
    rescuer.start()
    return rescuer


@pytest.fixture
def turns() -> Turns:
    return Turns()


@pytest.fixture
def rescuer(turns: Turns) -> Iterator[Rescuer]:
    thread = started(turns)
    yield thread
    thread.stop()
    thread.join(5)
    thread.baton.release()


def work_lasting(seconds: float) -> Callable[[], None]:
    """Inline work that takes `seconds` (an Event nobody sets: the wait is the work)."""

    def work() -> None:
        threading.Event().wait(seconds)

    return work


def long_work_until(event: threading.Event) -> None:
    """Inline work that runs until `event` (or gives up after WAIT_S)."""
    assert event.wait(WAIT_S), "the rescue thread never covered for the long work"


def test_short_inline_work_never_wakes_the_rescue_thread(rescuer: Rescuer, turns: Turns) -> None:
    for _ in range(100):
        rescuer.run_inline(lambda: None)

    assert turns.count == 0


def test_inline_work_shorter_than_the_take_over_time_is_not_covered_while_watched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rescue, "WATCH_SECONDS", 0.005)  # it looks ~40 times during the work
    turns = Turns()
    rescuer = started(turns, take_over_after=WAIT_S)
    try:
        rescuer.run_inline(work_lasting(0.2))
    finally:
        rescuer.stop()
        rescuer.join(5)
        rescuer.baton.release()

    assert turns.count == 0


def test_long_inline_work_is_covered_by_turns_on_the_rescue_thread(
    rescuer: Rescuer, turns: Turns
) -> None:
    rescuer.run_inline(lambda: long_work_until(turns.reached(3)))

    assert turns.count >= 3
    assert turns.holders == {"chiffon-rescue"}
    assert not turns.baton_free_during_turn


def test_connection_thread_has_the_baton_back_after_inline_work(
    rescuer: Rescuer, turns: Turns
) -> None:
    rescuer.run_inline(lambda: long_work_until(turns.reached(2)))
    covered = turns.count

    assert not rescuer.baton.acquire(blocking=False)  # still held, by us
    # And the rescue thread has stopped covering: no turn runs without inline work.
    rescuer.run_inline(lambda: None)
    assert turns.count == covered


def test_rescue_thread_outlives_a_failing_turn(caplog: pytest.LogCaptureFixture) -> None:
    turns = Turns(fail_first=1)
    rescuer = started(turns)
    try:
        with caplog.at_level(logging.ERROR, logger="chiffon_worker"):
            rescuer.run_inline(lambda: long_work_until(turns.reached(3)))
    finally:
        rescuer.stop()
        rescuer.join(5)
        rescuer.baton.release()

    assert turns.count >= 3
    assert "a turn failed" in caplog.text


def test_work_past_the_hold_grace_returns_waiting_deliveries_once() -> None:
    turns = Turns()
    returned: list[str] = []
    told = threading.Event()

    def return_waiting() -> None:
        returned.append(threading.current_thread().name)
        told.set()

    rescuer = started(turns, hold_grace=0.2, on_long_work=return_waiting)
    try:

        def work() -> None:
            # Runs until told, then a few more turns: a second call would show by then.
            long_work_until(told)
            long_work_until(turns.reached(turns.count + 3))

        rescuer.run_inline(work)
    finally:
        rescuer.stop()
        rescuer.join(5)
        rescuer.baton.release()

    assert returned == ["chiffon-rescue"]
