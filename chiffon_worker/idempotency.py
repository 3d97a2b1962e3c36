"""Remember which request_ids ran, so a retried request never runs twice.

Finished results live in a TTLCache (bounded, expiring). Requests still running
live in a plain dict beside it: they must not expire or be evicted while the
work runs, or a duplicate arriving during a long task would start it again.
One lock guards both, since TTLCache is not thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

from cachetools import TTLCache

ResultT = TypeVar("ResultT")


class ClaimState(Enum):
    NEW = "new"  # nobody ran it: the caller runs it now
    IN_FLIGHT = "in_flight"  # running right now: wait for its result
    DONE = "done"  # finished within the window: reuse the result


@dataclass(frozen=True)
class Claim(Generic[ResultT]):
    state: ClaimState
    result: ResultT | None = None


# Made once: a claim is taken for every message.
_NEW: Claim[Any] = Claim(ClaimState.NEW)
_IN_FLIGHT: Claim[Any] = Claim(ClaimState.IN_FLIGHT)


class IdempotencyCache(Generic[ResultT]):
    def __init__(
        self,
        maxsize: int = 1000,
        ttl: float = 300.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._done: TTLCache[str, ResultT] = TTLCache(maxsize=maxsize, ttl=ttl, timer=timer)
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, request_id: str) -> Claim[ResultT]:
        """Atomically look up request_id and, if unseen, mark it in flight."""
        with self._lock:
            if request_id in self._in_flight:
                return _IN_FLIGHT
            cached = self._done.get(request_id)
            if cached is not None:
                return Claim(ClaimState.DONE, cached)
            self._in_flight.add(request_id)
            return _NEW

    def complete(self, request_id: str, result: ResultT) -> None:
        """Record the finished result; later duplicates get it back."""
        with self._lock:
            self._in_flight.discard(request_id)
            self._done[request_id] = result

    def finished(self, request_id: str) -> bool:
        """True if request_id finished within the window (looks only, claims nothing)."""
        with self._lock:
            return request_id in self._done

    def abandon(self, request_id: str) -> None:
        """Forget an in-flight claim whose work never produced a result."""
        with self._lock:
            self._in_flight.discard(request_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._done) + len(self._in_flight)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)
