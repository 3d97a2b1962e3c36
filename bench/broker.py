"""Broker plumbing for the benchmark: a throwaway vhost, connections and the Chiffon topology.

Everything talks to the local broker on the loopback address only.
"""

import contextlib
import shutil
import signal
import subprocess
import sys
import uuid
from types import TracebackType
from typing import Any
from urllib.parse import quote

import pika
from pika.adapters.blocking_connection import BlockingChannel

HOST = "127.0.0.1"
PORT = 5672
USER = "guest"
PASSWORD = "guest"

WORK_QUEUE = "work_queue"
REPLY_QUEUE = "reply_queue"
DLX_QUEUE = "dlx_queue"
DLX_EXCHANGE = "dlx_exchange"
BROADCAST_EXCHANGE = "broadcast_exchange"

# Exactly the arguments of PROTOCOL.md; any difference makes the broker refuse the worker's
# own (identical) declarations with PRECONDITION_FAILED.
WORK_QUEUE_ARGS: dict[str, Any] = {"x-max-priority": 5, "x-dead-letter-exchange": DLX_EXCHANGE}
REPLY_QUEUE_ARGS: dict[str, Any] = {"x-dead-letter-exchange": DLX_EXCHANGE}
DLX_QUEUE_ARGS: dict[str, Any] = {"x-max-length": 10000}
DLX_BINDING_KEYS: tuple[str, ...] = ("", WORK_QUEUE, REPLY_QUEUE)

RABBITMQCTL_TIMEOUT_S = 60.0
VHOST_PREFIX = "chiffon-bench-"


class BrokerError(Exception):
    """The broker could not be prepared or cleaned up."""


def amqp_url(vhost: str) -> str:
    """The AMQP URL of ``vhost`` on the local broker, with the vhost url-quoted."""
    return f"amqp://{USER}:{PASSWORD}@{HOST}:{PORT}/{quote(vhost, safe='')}"


def connection_parameters(vhost: str) -> pika.ConnectionParameters:
    """Parameters for a harness connection: loopback, one attempt, bounded timeouts."""
    return pika.ConnectionParameters(
        host=HOST,
        port=PORT,
        virtual_host=vhost,
        credentials=pika.PlainCredentials(USER, PASSWORD),
        connection_attempts=1,
        socket_timeout=5.0,
        stack_timeout=10.0,
        blocked_connection_timeout=30.0,
    )


def find_rabbitmqctl() -> str:
    """Path of ``rabbitmqctl`` (PATH first, then the usual sbin location)."""
    found = shutil.which("rabbitmqctl") or shutil.which("rabbitmqctl", path="/usr/sbin:/sbin")
    if found is None:
        raise BrokerError("rabbitmqctl not found (looked in PATH and /usr/sbin)")
    return found


def _rabbitmqctl(ctl: str, *args: str) -> None:
    try:
        done = subprocess.run(
            [ctl, *args],
            capture_output=True,
            text=True,
            timeout=RABBITMQCTL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(f"rabbitmqctl {' '.join(args)}: no answer in {exc.timeout} s") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise BrokerError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): {detail}")


class TemporaryVhost:
    """A uuid-suffixed vhost that exists for the duration of a ``with`` block.

    It is deleted on the way out, also after an error or Ctrl-C; a second Ctrl-C
    during the deletion is ignored so that the deletion can finish.
    """

    def __init__(self, ctl: str | None = None) -> None:
        self.ctl = ctl or find_rabbitmqctl()
        self.name = f"{VHOST_PREFIX}{uuid.uuid4().hex[:12]}"
        self.url = amqp_url(self.name)

    def __enter__(self) -> "TemporaryVhost":
        _rabbitmqctl(self.ctl, "add_vhost", self.name)
        try:
            _rabbitmqctl(self.ctl, "set_permissions", "-p", self.name, USER, ".*", ".*", ".*")
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()

    def delete(self) -> None:
        """Delete the vhost; report, but do not raise, a failure."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            _rabbitmqctl(self.ctl, "delete_vhost", self.name)
        except BrokerError as exc:
            print(f"warning: could not delete vhost {self.name}: {exc}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, previous)


def declare_topology(channel: BlockingChannel) -> None:
    """Declare the Chiffon topology exactly as PROTOCOL.md specifies it."""
    channel.exchange_declare(DLX_EXCHANGE, exchange_type="direct", durable=True)
    channel.exchange_declare(BROADCAST_EXCHANGE, exchange_type="fanout", durable=False)
    channel.queue_declare(WORK_QUEUE, durable=True, arguments=WORK_QUEUE_ARGS)
    channel.queue_declare(REPLY_QUEUE, durable=True, arguments=REPLY_QUEUE_ARGS)
    channel.queue_declare(DLX_QUEUE, durable=True, arguments=DLX_QUEUE_ARGS)
    for key in DLX_BINDING_KEYS:
        channel.queue_bind(DLX_QUEUE, DLX_EXCHANGE, routing_key=key)


def server_version(connection: pika.BlockingConnection) -> str:
    """The broker's version string as announced at connection start, or ``"unknown"``."""
    with contextlib.suppress(Exception):
        props = connection._impl.server_properties
        version = props.get("version", props.get(b"version"))
        if isinstance(version, bytes):
            version = version.decode()
        if version:
            return str(version)
    return "unknown"
