"""What waits to be published and confirmed, and the late acks held behind it.

Owned by the thread that holds the connection's baton (see service.py): only
that thread calls any method here. Other threads never touch the outbox; what
they want sent reaches it through the service's mailbox (handoff.py).

Entries leave in order: an entry whose message the broker has not confirmed
yet keeps every later entry (and its late acks) waiting, so a late ack never
goes out before the answer it stands behind.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from chiffon_worker.amqp import DeliveryTag, Outgoing, PublishState

logger = logging.getLogger(__name__)

MAX_PUBLISH_ATTEMPTS = 3
# Progress waiting unconfirmed beyond this while the connection is down is
# dropped (a later report supersedes it): a storm of reports during an outage
# must not grow memory without bound. While connected every report is written
# at once, so none is dropped. Results and errors are never dropped for this.
MAX_PROGRESS_WAITING = 10_000


class Publisher(Protocol):
    """The part of the broker link the outbox uses."""

    @property
    def is_open(self) -> bool: ...
    def publish(self, message: Outgoing) -> None: ...  # the broker answers in message.state
    def ack(self, tag: DeliveryTag) -> bool: ...


@dataclass(slots=True)
class OutboxEntry:
    message: Outgoing | None  # None: only acks, kept in order behind earlier results
    # Late-ack deliveries to ack once the broker has confirmed this message.
    acks: list[DeliveryTag] = field(default_factory=list)
    progress: bool = False


class Outbox:
    def __init__(self, link: Publisher) -> None:
        self._link = link
        self._entries: deque[OutboxEntry] = deque()
        # Messages not yet written on the current channel, oldest first: a
        # flush looks only at these, not at everything waiting for a confirm.
        self._unsent: deque[Outgoing] = deque()
        self._progress_waiting = 0
        self._progress_dropped = 0

    def add(self, message: Outgoing | None, acks: list[DeliveryTag] | None = None) -> None:
        self._entries.append(OutboxEntry(message, acks or []))
        if message is not None:
            self._unsent.append(message)

    def add_progress(self, message: Outgoing) -> bool:
        """Queue a progress report; False (dropped) when too many already wait."""
        if self._progress_waiting >= MAX_PROGRESS_WAITING and not self._link.is_open:
            self._progress_dropped += 1
            if self._progress_dropped == 1:
                logger.warning(
                    "progress reports dropped: too many wait for the broker",
                    extra={"waiting": self._progress_waiting},
                )
            return False
        self._progress_waiting += 1
        self._entries.append(OutboxEntry(message, [], progress=True))
        self._unsent.append(message)
        return True

    def pending(self) -> int:
        return len(self._entries)

    def reconnected(self) -> None:
        """A fresh channel: everything not confirmed goes out again, in order."""
        self._unsent = deque(
            entry.message
            for entry in self._entries
            if entry.message is not None and entry.message.state is PublishState.UNSENT
        )

    def flush(self) -> None:
        """Publish what has not gone out on this channel, then settle what is answered.

        Publishes do not wait for their confirms (see amqp.py); an entry
        leaves only once its message is confirmed, in order, and its late acks
        go out then.
        """
        if not self._link.is_open:
            return
        unsent = self._unsent
        while unsent:
            message = unsent[0]
            if message.state is PublishState.UNSENT:
                self._link.publish(message)
            unsent.popleft()
        self.settle()

    def settle(self) -> None:
        """Retire answered entries from the head (the link asks for this on confirms)."""
        entries = self._entries
        while entries and self._may_leave(entries[0].message):
            entry = entries.popleft()
            if entry.progress:
                self._progress_waiting -= 1
                if not self._progress_waiting and self._progress_dropped:
                    logger.info(
                        "progress reports flowing again", extra={"dropped": self._progress_dropped}
                    )
                    self._progress_dropped = 0
            for tag in entry.acks:
                self._link.ack(tag)

    def _may_leave(self, message: Outgoing | None) -> bool:
        """Confirmed, or refused for the last time (a refusal before that sends it again)."""
        if message is None or message.state is PublishState.CONFIRMED:
            return True
        return message.state is PublishState.REFUSED and not self._retry(message)

    def _retry(self, message: Outgoing) -> bool:
        """Send a refused message again; False (dropped) once it has had its attempts."""
        message.attempts += 1
        if message.attempts >= MAX_PUBLISH_ATTEMPTS:
            logger.error(
                "publish failed for good: message dropped",
                extra={"reason": message.refusal, "routing_key": message.routing_key},
            )
            return False
        logger.warning("publish refused by the broker, retrying", extra={"reason": message.refusal})
        message.state = PublishState.UNSENT
        if self._link.is_open:
            self._link.publish(message)
        else:
            self._unsent.append(message)
        return True
