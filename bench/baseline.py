"""Bare-pika baseline workers, deliberately small and plain.

    python -m bench.baseline --mode A --url amqp://guest:guest@127.0.0.1:5672/VHOST

Mode A: a BlockingConnection consumer on ``work_queue`` with prefetch 1; for each
message it acks, then publishes a minimal ``work_result`` envelope echoing
``payload.parameters.message`` to ``reply_queue`` (default exchange), no confirms.
Mode B: the same with publisher confirms, so every reply waits for the broker.

The topology is declared by the harness; this module only consumes and publishes.
SIGTERM (or SIGINT) stops it cleanly with exit status 0.
"""

import argparse
import contextlib
import json
import signal
import sys
import time
import uuid
from datetime import UTC, datetime
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

WORK_QUEUE = "work_queue"
REPLY_QUEUE = "reply_queue"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

AGENT_ID = str(uuid.uuid4())
# Workers publish results persistent (PROTOCOL.md), so the baselines do too.
REPLY_PROPERTIES = pika.BasicProperties(
    content_type="application/json", delivery_mode=2, priority=3
)


def make_reply(body: bytes) -> bytes:
    """Build the work_result envelope for one work_request body."""
    started = time.perf_counter()
    request: dict[str, Any] = json.loads(body)
    payload: dict[str, Any] = request["payload"]
    output = str(payload.get("parameters", {}).get("message", ""))
    result: dict[str, Any] = {
        "task_id": payload["task_id"],
        "status": "completed",
        "exit_code": 0,
        "output": output,
        "error_message": None,
        "duration_ms": int((time.perf_counter() - started) * 1000),
        "agent_id": AGENT_ID,
        "trace_id": request.get("trace_id"),
        "request_id": request.get("request_id"),
        "resources_used": {},
        "analysis_result": None,
    }
    reply: dict[str, Any] = {
        "protocol_version": "1.0",
        "message_id": str(uuid.uuid4()),
        "from_agent": "infra",
        "to_agent": request.get("from_agent", "orchestrator"),
        "timestamp": datetime.now(UTC).isoformat(),
        "trace_id": request.get("trace_id"),
        "request_id": request.get("request_id"),
        "type": "work_result",
        "priority": request.get("priority", 3),
        "payload": result,
        "x_custom_fields": {},
    }
    return json.dumps(reply).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--mode", choices=("A", "B"), required=True)
    parser.add_argument("--url", required=True, help="AMQP URL of the benchmark vhost")
    args = parser.parse_args(argv)
    if urlsplit(args.url).hostname not in LOOPBACK_HOSTS:
        parser.error("only loopback broker addresses are allowed")

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    if args.mode == "B":
        channel.confirm_delivery()
    channel.basic_qos(prefetch_count=1)

    def on_message(
        ch: BlockingChannel, method: Basic.Deliver, properties: BasicProperties, body: bytes
    ) -> None:
        ch.basic_ack(delivery_tag=method.delivery_tag)
        try:
            reply = make_reply(body)
        except (ValueError, KeyError, TypeError) as exc:
            print(f"baseline {args.mode}: dropped a malformed request: {exc}", file=sys.stderr)
            return
        ch.basic_publish("", REPLY_QUEUE, reply, REPLY_PROPERTIES)

    channel.basic_consume(WORK_QUEUE, on_message)
    try:
        # A signal only sets the flag; the loop notices it within a second.
        while not stopping:
            connection.process_data_events(time_limit=1.0)
    finally:
        with contextlib.suppress(Exception):
            connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
