"""The `chiffon-worker` command: argument parsing and exit codes, no business logic."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from chiffon_worker import __version__
from chiffon_worker.amqp import RequestClient
from chiffon_worker.config import load_settings, url_password
from chiffon_worker.ctl import (
    DEFAULT_TIMEOUT_S,
    ControlClient,
    WorkerAnswer,
    outcome_table,
    status_table,
)
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
    WorkStatus,
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

# Longest a `send --wait` or `ctl` waits for answers.
MAX_TIMEOUT_S = 86400.0

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


def seconds(text: str) -> float:
    """A --timeout: a finite number of seconds above 0, at most a day."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        raise argparse.ArgumentTypeError(
            f"expected seconds above 0 and at most {MAX_TIMEOUT_S:g}, got {text!r}"
        )
    return value


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
    send.add_argument(
        "--max-duration",
        type=seconds,
        metavar="SECONDS",
        help="the work's time limit (hints.max_duration_seconds): failed with 5001 after it",
    )
    send.add_argument("--to-agent", choices=AGENT_TYPES, help="default: CHIFFON_AGENT_TYPE")
    send.add_argument("--wait", action="store_true", help="wait for the result and print it")
    send.add_argument("--timeout", type=seconds, default=30.0, help="seconds to wait (default 30)")
    send.add_argument("--work-queue", dest="work_queue", help="default work_queue")

    ctl = commands.add_parser("ctl", help="ping, pause, resume or cancel live workers")
    actions = ctl.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_control(actions, "ping", "list the live workers")
    _add_control(actions, "pause", "stop workers taking requests (running work goes on)")
    _add_control(actions, "resume", "let paused workers take requests again")
    cancel = _add_control(actions, "cancel", "cancel a task: running, waiting or still to come")
    cancel.add_argument("id", type=uuid.UUID, metavar="ID", help="the task_id (or --request-id)")
    cancel.add_argument("--request-id", action="store_true", help="ID is a request_id")
    cancel.add_argument("--reason", help="why: it goes into the cancelled result")
    return parser


def _add_control(
    actions: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str
) -> argparse.ArgumentParser:
    parser = actions.add_parser(name, help=text, description=text)
    _add_common(parser)
    parser.add_argument(
        "--agent-type",
        choices=AGENT_TYPES,
        help="workers of this type (default: CHIFFON_AGENT_TYPE)",
    )
    parser.add_argument(
        "--agent-id",
        dest="agent_ids",
        action="append",
        type=uuid.UUID,
        metavar="ID",
        help="only this worker (repeatable; default: every worker of the type)",
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to gather answers (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
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
    except Exception as exc:  # a module that raises at import (SyntaxError too) is named, once
        raise ConfigError(
            f"CHIFFON_WORKER: cannot load {spec!r}: {type(exc).__name__}: {exc}"
        ) from None
    if not (isinstance(found, type) and issubclass(found, WorkerBase)):
        raise ConfigError(f"CHIFFON_WORKER: {spec!r} is not a WorkerBase subclass")
    return found


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(args.env_file, overrides=_overrides(args, [n for n, _ in RUN_FLAGS]))
    worker_class = load_worker_class(settings.worker)
    return worker_class.serve(settings)


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE items; VALUE is JSON when it parses, else the text itself.

    JSON has no NaN or Infinity (Python's json would put null on the wire for
    them), so a number that is not finite is refused rather than changed.
    """
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param: expected KEY=VALUE, got {item!r}")
        try:
            if raw.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
                _not_finite(raw)  # not JSON, but surely not meant as text either
            params[key] = json.loads(
                raw, parse_constant=_not_finite, parse_float=_finite_float, parse_int=_json_int
            )
        except _NotANumber as exc:
            raise ConfigError(f"--param {key}: {exc}") from None
        except ValueError:  # json.JSONDecodeError among them
            params[key] = raw
    return params


class _NotANumber(Exception):
    """A --param number JSON cannot carry."""


def _not_finite(text: str) -> float:
    raise _NotANumber(f"{text} is not a number JSON can carry (for the text, write '\"{text}\"')")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotANumber(f"{text} is too large for a JSON number (a double)")
    return value


def _json_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # more digits than Python converts
        raise _NotANumber(f"a number of {len(text)} digits is too long") from None


def _send(args: argparse.Namespace) -> int:
    settings = load_settings(args.env_file, overrides=_overrides(args, ["work_queue"]))
    setup_logging("WARNING", "text", settings.secrets())
    hints = {} if args.max_duration is None else {"max_duration_seconds": args.max_duration}
    request = WorkRequest(
        task_id=uuid.uuid4(),
        work_type=args.work_type,
        parameters=parse_params(args.param),
        hints=hints,
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
        ids = json.dumps({"request_id": str(request_id), "task_id": str(request.task_id)})
        if not args.wait:
            print(ids)
            return EXIT_OK
        # stdout is the result's alone (`| jq -r .output`); the rest is for a person.
        print(ids, file=sys.stderr)
        return _wait_for_result(client, request_id, args.timeout)
    finally:
        client.close()


class ProgressLine:
    """Progress reports on stderr: one live line on a terminal, a line each otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._live = stream.isatty()
        self._open = False

    def show(self, payload: dict[str, Any]) -> None:
        try:
            status = WorkStatus.model_validate(payload)
        except ValidationError:
            return
        text = f"progress {status.progress_percent:3.0f}%  {status.step.name}"
        if self._live:
            self._stream.write("\r\x1b[K" + text)  # back to the start, clear the rest
            self._open = True
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def end(self) -> None:
        """Finish the live line, so what follows starts on a line of its own."""
        if self._open:
            self._stream.write("\n")
            self._stream.flush()
            self._open = False


def _wait_for_result(client: RequestClient, request_id: uuid.UUID, timeout: float) -> int:
    progress = ProgressLine(sys.stderr)
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            reply = client.next_reply(left)
            if reply is None:
                break
            try:
                envelope = parse_envelope(reply.body)
            except InvalidMessage:
                continue
            if envelope.request_id != request_id:
                continue
            if envelope.type == "work_status" and "progress_percent" in envelope.payload:
                progress.show(envelope.payload)
            elif envelope.type == "error":
                progress.end()
                print(json.dumps(envelope.payload, indent=2))
                return EXIT_FAILED
            elif envelope.type == "work_result":
                progress.end()
                result = WorkResult.model_validate(envelope.payload)
                print(result.model_dump_json(indent=2))
                return EXIT_OK if result.status == "completed" else EXIT_FAILED
    finally:
        progress.end()
    print(f"chiffon-worker: no result within {timeout:g} s", file=sys.stderr)
    return EXIT_TIMEOUT


def _ctl(args: argparse.Namespace) -> int:
    settings = load_settings(args.env_file, overrides=_overrides(args, ["agent_type"]))
    setup_logging("WARNING", "text", settings.secrets())
    url, tls = settings.broker_urls()[0], settings.tls_files()
    with ControlClient(url, agent_type=settings.agent_type, tls=tls) as control:
        if args.action == "cancel":
            ids = {"request_id": args.id} if args.request_id else {"task_id": args.id}
            answers = control.cancel(
                **ids, reason=args.reason, agent_ids=args.agent_ids, timeout=args.timeout
            )
        else:
            answers = control.send(args.action, agent_ids=args.agent_ids, timeout=args.timeout)
    return report_answers(args.action, answers, as_json=args.json, timeout=args.timeout)


def report_answers(
    command: str, answers: Sequence[WorkerAnswer], *, as_json: bool, timeout: float
) -> int:
    """Print what the workers answered; 0 when at least one applied the command."""
    if as_json:
        print(json.dumps({"command": command, "answers": [a.as_dict() for a in answers]}))
    elif answers:
        print(status_table(answers) if command == "ping" else outcome_table(answers))
    if not answers:
        print(f"chiffon-worker: no worker answered {command} within {timeout:g} s", file=sys.stderr)
        return EXIT_FAILED
    if not any(answer.applied for answer in answers):
        print(f"chiffon-worker: no worker applied {command}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "ctl":
            return _ctl(args)
        return _send(args)
    except ConfigError as exc:
        print(f"chiffon-worker: configuration error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except ChiffonError as exc:
        print(f"chiffon-worker: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code


def one_line(exc: BaseException) -> str:
    """The error as one line: a value or path may hold a line break."""
    return " ".join(str(exc).splitlines())
