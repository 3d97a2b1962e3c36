"""Keeping the broker connection up: connect, notice a loss, retry with backoff.

Run only by the holder of the connection's baton (see service.py), one turn
at a time, so a reconnect happens on whichever thread serves the connection
at that moment, the rescue thread included. Never blocks longer than a turn
between attempts. An outage is logged as events: one line when it starts,
one per failed attempt (with the backoff), one when it is over.

Some refusals are not outages and are not retried: credentials, vhost and
TLS (exit 77), and a queue or exchange declared differently from ours
(exit 78, see amqp.refusal_error). Each is one error line saying what to do.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from chiffon_worker.amqp import BrokerLink, node_address
from chiffon_worker.errors import (
    BrokerAuthError,
    BrokerUnavailable,
    ChiffonError,
    ConnectionLost,
    TopologyMismatch,
)
from chiffon_worker.sdnotify import SystemdNotifier

logger = logging.getLogger(__name__)

BACKOFF_FIRST_SECONDS = 0.5
# The default of CHIFFON_RECONNECT_MAX_DELAY: back within seconds of the broker.
BACKOFF_CAP_SECONDS = 4.0
# A connection that stayed up this long was healthy: its loss is retried at
# once. One refused by the broker for what we send dies within a round trip,
# and that is the loop to back off from; a link that flaps every second or so
# still gets its work done.
STABLE_SECONDS = 0.25


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


class LinkKeeper:
    def __init__(
        self,
        link: BrokerLink,
        notifier: SystemdNotifier,
        *,
        on_connected: Callable[[], None],
        on_lost: Callable[[], None],
        wait: Callable[[float], None],
        max_delay: float = BACKOFF_CAP_SECONDS,
    ) -> None:
        self._link = link
        self._notifier = notifier
        self._on_connected = on_connected
        self._on_lost = on_lost
        self._wait = wait
        self._backoff = Backoff(cap=max_delay)
        self._next_attempt = 0.0
        self._down_since = time.monotonic()
        self._up_since = self._down_since
        self._connections = 0
        self.up = False
        # Set when the broker refused us (credentials, vhost, TLS, a topology
        # mismatch): no retry helps; the stop sequence exits with its code.
        self.refused: ChiffonError | None = None

    @property
    def connections(self) -> int:
        return self._connections

    def serve(self, timeout: float) -> None:
        """One turn: service the connection, or try to (re)open it when its time has come."""
        if self.up:
            try:
                self._link.process(timeout)
            except ConnectionLost as exc:
                self.lost(str(exc))
            except TopologyMismatch as exc:  # redeclared under us while we were connected
                self._mismatch(exc)
                self.lost(str(exc))
            return
        if self.refused is not None:
            return
        left = self._next_attempt - time.monotonic()
        if left > 0:
            self._wait(min(timeout, left))
            return
        self._attempt()

    def lost(self, reason: str) -> None:
        """The connection died (seen by anyone holding the baton): drop it, retry at once."""
        if not self.up:
            return
        self.up = False
        now = time.monotonic()
        self._down_since = now
        if now - self._up_since >= STABLE_SECONDS:
            self._backoff.reset()
            self._next_attempt = now  # a connection that served a while: retry at once
        else:
            # Lost soon after it came up (a message the broker refuses, a node
            # that accepts then drops us): back off, never a tight loop.
            self._next_attempt = now + self._backoff.next_delay()
        logger.warning("connection lost", extra={"reason": reason})
        _explain_loss(reason)
        self._notifier.status(f"reconnecting: {reason}")
        self._link.drop()
        self._on_lost()

    def _attempt(self) -> None:
        try:
            self._link.connect()
        except BrokerAuthError as exc:
            logger.error(
                "broker refused us: check the credentials, vhost and TLS settings",
                extra={"reason": str(exc)},
            )
            self.refused = exc
            return
        except TopologyMismatch as exc:
            self._mismatch(exc)
            return
        except (BrokerUnavailable, ConnectionLost) as exc:
            delay = self._backoff.next_delay()
            self._next_attempt = time.monotonic() + delay
            self._notifier.status(f"reconnecting: {exc}")
            logger.warning(
                "broker not reachable, retrying",
                extra={
                    "reason": str(exc),
                    "attempt": self._backoff.attempt,
                    "retry_in_s": round(delay, 2),
                },
            )
            return
        self.up = True
        self._up_since = time.monotonic()
        self._connections += 1
        extra: dict[str, object] = {
            "node": node_address(self._link.current_url),
            "url": self._link.current_url,
        }
        if self._connections > 1:
            extra["outage_s"] = round(time.monotonic() - self._down_since, 2)
        logger.info("connected to broker", extra=extra)
        try:
            self._on_connected()
        except ConnectionLost as exc:
            self.lost(str(exc))

    def _mismatch(self, exc: TopologyMismatch) -> None:
        logger.error(
            "topology mismatch: a queue or exchange on the broker is declared differently "
            "from ours; align the declarations or set CHIFFON_DECLARE_TOPOLOGY=false",
            extra={**exc.fields, "detail": str(exc)},
        )
        self.refused = exc


def _explain_loss(reason: str) -> None:
    if "acknowledgement" in reason and "timed out" in reason:
        logger.error(
            "RabbitMQ's consumer_timeout closed our channel: a task in late-ack mode "
            "ran longer than the broker allows between delivery and ack; the message "
            "is redelivered. Raise consumer_timeout in rabbitmq.conf or use ack_mode=early"
        )
