"""The `chiffon-worker` command: argument parsing and exit codes, no business logic."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chiffon_worker import __version__
from chiffon_worker.amqp import RequestClient
from chiffon_worker.config import load_settings, url_password
from chiffon_worker.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    ChiffonError,
    ConfigError,
    InvalidMessage,
)
from chiffon_worker.log import setup_logging
from chiffon_worker.protocol import (
    AGENT_TYPES,
    WorkRequest,
    WorkResult,
    encode,
    make_envelope,
    parse_envelope,
)
from chiffon_worker.topology import chiffon_topology
from chiffon_worker.worker import WorkerBase

# Flags that map one-to-one onto settings; the env variable is CHIFFON_<NAME>.
RUN_FLAGS: tuple[tuple[str, str], ...] = (
    ("agent_type", "agent type this worker serves: " + ", ".join(AGENT_TYPES)),
    ("agent_id", "stable UUID of this worker (default: derived from host and agent type)"),
    ("heartbeat_interval", "seconds between StatusUpdate heartbeats (default 60)"),
    ("prefetch", "deliveries in progress at once (default 1)"),
    ("ack_mode", "early (ack before work, default) or late (ack after the result)"),
    ("shutdown_timeout", "seconds to finish running work on SIGTERM (default 30)"),
    ("log_level", "DEBUG, INFO (default), WARNING, ERROR"),
    ("log_format", "json (default) or text"),
    ("worker", "worker class as module:Class (default chiffon_worker.echo:EchoWorker)"),
    ("work_queue", "queue to consume (default work_queue)"),
    ("reply_queue", "queue for results and heartbeats (default reply_queue)"),
)

EPILOG = """\
Settings come from, later wins: defaults < --env-file < CHIFFON_* environment
variables < flags. The broker URL (with its password) is read only from
CHIFFON_AMQP_URL / CHIFFON_AMQP_PASSWORD_FILE, never a flag, so it stays out of `ps`.
"""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env-file", type=Path, help="KEY=VALUE file read before the environment")
    parser.add_argument(
        "--amqp-url",
        help="broker URL(s), comma-separated, without password (use CHIFFON_AMQP_URL for one)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chiffon-worker",
        description="A synchronous RabbitMQ worker for the Chiffon agent protocol.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"chiffon-worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve work requests until SIGTERM/SIGINT")
    _add_common(run)
    for name, text in RUN_FLAGS:
        run.add_argument("--" + name.replace("_", "-"), dest=name, help=text)

    send = commands.add_parser("send", help="publish one work request (and wait for its result)")
    _add_common(send)
    send.add_argument("--work-type", required=True, help="e.g. echo, slow_echo, fail")
    send.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a request parameter; VALUE is parsed as JSON when it can be (repeatable)",
    )
    send.add_argument("--priority", type=int, default=3, choices=range(1, 6), metavar="1..5")
    send.add_argument("--to-agent", choices=AGENT_TYPES, help="default: CHIFFON_AGENT_TYPE")
    send.add_argument("--wait", action="store_true", help="wait for the result and print it")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    send.add_argument("--work-queue", dest="work_queue", help="default work_queue")
    return parser


def _overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    values = {name: getattr(args, name, None) for name in names}
    url = getattr(args, "amqp_url", None)
    if url:
        if url_password(url):
            raise ConfigError(
                "--amqp-url: a password on the command line shows in `ps`; "
                "use CHIFFON_AMQP_URL or CHIFFON_AMQP_PASSWORD_FILE"
            )
        values["amqp_url"] = url
    return values


def load_worker_class(spec: str) -> type[WorkerBase]:
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        found = getattr(module, class_name)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"CHIFFON_WORKER: cannot load {spec!r}: {exc}") from None
    if not (isinstance(found, type) and issubclass(found, WorkerBase)):
        raise ConfigError(f"CHIFFON_WORKER: {spec!r} is not a WorkerBase subclass")
    return found


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(args.env_file, overrides=_overrides(args, [n for n, _ in RUN_FLAGS]))
    worker_class = load_worker_class(settings.worker)
    return worker_class.serve(settings)


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param: expected KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def _send(args: argparse.Namespace) -> int:
    settings = load_settings(args.env_file, overrides=_overrides(args, ["work_queue"]))
    setup_logging("WARNING", "text", settings.secrets())
    request = WorkRequest(
        task_id=uuid.uuid4(), work_type=args.work_type, parameters=parse_params(args.param)
    )
    trace_id, request_id = uuid.uuid4(), uuid.uuid4()
    envelope = make_envelope(
        request,
        from_agent="orchestrator",
        to_agent=args.to_agent or settings.agent_type,
        trace_id=trace_id,
        request_id=request_id,
        priority=args.priority,
    )
    topology = chiffon_topology(settings.work_queue, settings.reply_queue)
    client = RequestClient(settings.broker_urls()[0], topology, tls=settings.tls_files())
    try:
        if args.wait:
            client.open_reply_queue()
        client.send(encode(envelope), args.priority, str(envelope.message_id))
        print(json.dumps({"request_id": str(request_id), "task_id": str(request.task_id)}))
        if not args.wait:
            return EXIT_OK
        return _wait_for_result(client, request_id, args.timeout)
    finally:
        client.close()


def _wait_for_result(client: RequestClient, request_id: uuid.UUID, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        body = client.next_reply(left)
        if body is None:
            break
        try:
            envelope = parse_envelope(body)
        except InvalidMessage:
            continue
        if envelope.request_id != request_id:
            continue
        if envelope.type == "error":
            print(json.dumps(envelope.payload, indent=2))
            return EXIT_FAILED
        if envelope.type == "work_result":
            result = WorkResult.model_validate(envelope.payload)
            print(result.model_dump_json(indent=2))
            return EXIT_OK if result.status == "completed" else EXIT_FAILED
    print(f"chiffon-worker: no result within {timeout:g} s", file=sys.stderr)
    return EXIT_TIMEOUT


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        return _send(args)
    except ConfigError as exc:
        print(f"chiffon-worker: configuration error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ChiffonError as exc:
        print(f"chiffon-worker: {exc}", file=sys.stderr)
        return exc.exit_code
