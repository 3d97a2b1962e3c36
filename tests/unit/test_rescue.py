"""The rescue thread covers for long work on the connection thread, and only for that."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from chiffon_worker.rescue import Rescuer


class Recorder:
    def __init__(self) -> None:
        self.serviced = 0
        self.ticks = 0
        self.cancelled = threading.Event()
        self.holders: set[str] = set()

    def service(self, _seconds: float) -> None:
        self.serviced += 1
        self.holders.add(threading.current_thread().name)

    def tick(self) -> None:
        self.ticks += 1


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def rescuer(recorder: Recorder) -> Iterator[Rescuer]:
    thread = Rescuer(
        take_over_after=0.05,
        hold_grace=0.3,
        service=recorder.service,
        stop_taking=recorder.cancelled.set,
        on_tick=recorder.tick,
    )
    thread.baton.acquire()  # as the connection thread does in run()
    thread.start()
    yield thread
    thread.stop()
    thread.join(5)
    thread.baton.release()


def test_short_inline_work_never_wakes_the_rescue_thread(
    rescuer: Rescuer, recorder: Recorder
) -> None:
    for _ in range(100):
        rescuer.run_inline(lambda: None)
    assert recorder.serviced == 0
    assert not recorder.cancelled.is_set()


def test_long_inline_work_is_covered_and_its_queued_deliveries_released(
    rescuer: Rescuer, recorder: Recorder
) -> None:
    rescuer.run_inline(lambda: recorder.cancelled.wait(10) and None)
    assert recorder.cancelled.is_set()  # the consumer was cancelled after the grace
    assert recorder.serviced >= 2
    assert recorder.ticks == recorder.serviced
    assert recorder.holders == {"chiffon-rescue"}
    assert not rescuer.active


def test_connection_thread_has_the_baton_back_after_inline_work(
    rescuer: Rescuer, recorder: Recorder
) -> None:
    rescuer.run_inline(lambda: recorder.cancelled.wait(10) and None)
    assert not rescuer.baton.acquire(blocking=False)  # still held, by us
