"""IdempotencyCache: a request_id runs once; its result is reused within the window."""

from __future__ import annotations

import threading

from chiffon_worker.idempotency import ClaimState, IdempotencyCache

JOIN_TIMEOUT_S = 10.0


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_claim_is_new() -> None:
    cache: IdempotencyCache[str] = IdempotencyCache()

    assert cache.claim("r1").state is ClaimState.NEW


def test_second_claim_while_running_is_in_flight() -> None:
    cache: IdempotencyCache[str] = IdempotencyCache()
    cache.claim("r1")

    assert cache.claim("r1").state is ClaimState.IN_FLIGHT


def test_claim_after_complete_is_done_with_the_result() -> None:
    cache: IdempotencyCache[str] = IdempotencyCache()
    cache.claim("r1")
    cache.complete("r1", "result-1")

    claim = cache.claim("r1")

    assert (claim.state, claim.result) == (ClaimState.DONE, "result-1")


def test_other_request_ids_are_independent() -> None:
    cache: IdempotencyCache[str] = IdempotencyCache()
    cache.claim("r1")

    assert cache.claim("r2").state is ClaimState.NEW


def test_abandoned_claim_can_be_claimed_again() -> None:
    cache: IdempotencyCache[str] = IdempotencyCache()
    cache.claim("r1")
    cache.abandon("r1")

    assert cache.claim("r1").state is ClaimState.NEW
    assert cache.in_flight() == 1


def test_least_recently_used_result_is_evicted_beyond_maxsize() -> None:
    cache: IdempotencyCache[str] = IdempotencyCache(maxsize=2)
    for request_id in ("r1", "r2"):
        cache.claim(request_id)
        cache.complete(request_id, f"result-{request_id}")
    cache.claim("r1")  # r1 used again: r2 is now the least recently used

    cache.claim("r3")
    cache.complete("r3", "result-r3")

    assert cache.claim("r2").state is ClaimState.NEW
    assert cache.claim("r1").result == "result-r1"
    assert cache.claim("r3").result == "result-r3"


def test_running_request_is_never_evicted_by_finished_ones() -> None:
    cache: IdempotencyCache[str] = IdempotencyCache(maxsize=2)
    cache.claim("long")
    for request_id in ("r1", "r2", "r3"):
        cache.claim(request_id)
        cache.complete(request_id, request_id)

    assert cache.claim("long").state is ClaimState.IN_FLIGHT


def test_result_is_kept_until_the_ttl_and_forgotten_after() -> None:
    clock = FakeClock()
    cache: IdempotencyCache[str] = IdempotencyCache(ttl=300.0, timer=clock)
    cache.claim("r1")
    cache.complete("r1", "result-1")

    clock.now += 299.0
    assert cache.claim("r1").result == "result-1"

    clock.now += 2.0
    assert cache.claim("r1").state is ClaimState.NEW


def test_concurrent_claims_of_one_request_id_yield_exactly_one_new() -> None:
    cache: IdempotencyCache[str] = IdempotencyCache()
    threads_count = 16
    barrier = threading.Barrier(threads_count)
    states: list[ClaimState] = []
    states_lock = threading.Lock()

    def claim() -> None:
        barrier.wait(timeout=JOIN_TIMEOUT_S)
        state = cache.claim("same").state
        with states_lock:
            states.append(state)

    threads = [threading.Thread(target=claim) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)

    assert len(states) == threads_count
    assert states.count(ClaimState.NEW) == 1
    assert states.count(ClaimState.IN_FLIGHT) == threads_count - 1
