"""PlaybookWorker: runs `ansible-playbook` as a child process, one per `run_playbook` request.

A request names a playbook under CHIFFON_PLAYBOOK_DIR; everything else it
carries (extra_vars, limit, tags, check, inventory) is checked before
anything runs, and a request that fails a check is answered `failed` saying
why. The run goes through `run_process`, so a cancel, the task's time limit
or the worker's shutdown timeout ends ansible's whole tree (its forked
workers start sessions of their own). Progress comes from our own stdout
callback (ansible_plugins/chiffon_jsonl.py): one JSON line per event, read as
it comes and turned into a WorkStatus per task start and per host result.

Everything here runs on the thread that runs `execute_work`.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chiffon_worker.ansible_plugins import PLUGIN_DIR, STDOUT_CALLBACK
from chiffon_worker.config import Settings
from chiffon_worker.errors import ConfigError
from chiffon_worker.process import ProcessResult, run_process
from chiffon_worker.protocol import WorkRequest, WorkResult
from chiffon_worker.worker import WorkerBase

logger = logging.getLogger(__name__)

WORK_TYPE = "run_playbook"
EVENT_KEY = "chiffon_event"
PARAMETERS = ("playbook", "extra_vars", "limit", "tags", "check", "inventory")
# Ansible's variable names are Python identifiers; anything else is a typo or an attack.
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Event lines are a few KiB (the callback cuts its fields); ordinary lines longer than this
# are cut by run_process, which keeps memory bounded whatever a playbook prints.
MAX_LINE_BYTES = 65536
# Bounds on what a result carries, whatever the playbook did.
MAX_FAILED_TASKS = 50
MAX_RECAP_HOSTS = 500
MAX_ERROR_CHARS = 4000
OTHER_LINES_KEPT = 40
# Progress stays below this until the recap: the last stretch is ansible ending.
RUNNING_CEILING = 95.0


class ParameterError(ValueError):
    """A request parameter that must not run: the message says which and why."""


# -- parameters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlaybookRun:
    """A checked request: what to run, with paths already resolved inside the playbook dir."""

    playbook: Path
    inventory: Path | None = None
    extra_vars: Mapping[str, Any] = field(default_factory=dict)
    limit: str | None = None
    tags: str | None = None
    check: bool = False


def parse_request(
    parameters: Mapping[str, Any], playbook_dir: Path, *, allow_ansible_vars: bool = False
) -> PlaybookRun:
    """Check every parameter; ParameterError names the first bad one."""
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise ParameterError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))}; known: {', '.join(PARAMETERS)}"
        )
    if "playbook" not in parameters:
        raise ParameterError("parameter 'playbook' is required: a file name under the playbook dir")
    playbook = resolve_under(playbook_dir, parameters["playbook"], "playbook")
    if not playbook.is_file():
        raise ParameterError(f"playbook {parameters['playbook']!r} is not a file")
    inventory = None
    if parameters.get("inventory") is not None:
        inventory = resolve_under(playbook_dir, parameters["inventory"], "inventory")
    check = parameters.get("check", False)
    if not isinstance(check, bool):
        raise ParameterError(f"parameter 'check' must be true or false, not {check!r}")
    return PlaybookRun(
        playbook=playbook,
        inventory=inventory,
        extra_vars=checked_extra_vars(parameters.get("extra_vars"), allow_ansible_vars),
        limit=pattern_list(parameters.get("limit"), "limit"),
        tags=pattern_list(parameters.get("tags"), "tags"),
        check=check,
    )


def resolve_under(root: Path, name: object, what: str) -> Path:
    """`name` as a real path inside `root`; ParameterError if it is not one.

    Refused before looking at the disk: a non-string, an absolute path, a
    `..` component. Then the real path (every symlink followed) must lie
    inside the real `root`, and exist. Ansible is handed the real path, so
    swapping a symlink after this check changes nothing.
    """
    if not isinstance(name, str) or not name.strip():
        raise ParameterError(f"parameter {what!r} must be a non-empty file name, not {name!r}")
    if "\0" in name:
        raise ParameterError(f"parameter {what!r} must not contain a NUL character")
    if os.path.isabs(name):
        raise ParameterError(
            f"{what} {name!r} is an absolute path; give a file name under the playbook dir"
        )
    if ".." in Path(name).parts:
        raise ParameterError(
            f"{what} {name!r} contains '..'; give a file name under the playbook dir"
        )
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, name))
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise ParameterError(f"{what} {name!r} leads outside the playbook dir (a symlink?)")
    if not os.path.exists(real):
        raise ParameterError(f"{what} {name!r} does not exist in the playbook dir")
    return Path(real)


def checked_extra_vars(value: object, allow_ansible_vars: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ParameterError(
            f"parameter 'extra_vars' must be an object, not {type(value).__name__}"
        )
    for key in value:
        if not isinstance(key, str) or not VARIABLE_NAME.match(key):
            raise ParameterError(f"extra_vars key {key!r} is not a valid variable name")
        if key.startswith("ansible_") and not allow_ansible_vars:
            raise ParameterError(
                f"extra_vars key {key!r} is refused: ansible_* variables change how and where "
                "Ansible connects (CHIFFON_PLAYBOOK_ALLOW_ANSIBLE_VARS=true allows them)"
            )
    return dict(value)


def pattern_list(value: object, what: str) -> str | None:
    """A host pattern or tag list: a string or a list of strings, joined with commas."""
    if value is None:
        return None
    items: list[object] = value if isinstance(value, list) else [value]
    names = [item.strip() for item in items if isinstance(item, str) and item.strip()]
    if not names or len(names) != len(items):
        raise ParameterError(
            f"parameter {what!r} must be a non-empty string or list of strings, not {value!r}"
        )
    joined = ",".join(names)
    if "\0" in joined or "\n" in joined:
        raise ParameterError(f"parameter {what!r} must not contain NUL or newline characters")
    if what == "limit" and joined.startswith("@"):
        # "@file" reads host names from a file: a path outside the playbook dir.
        raise ParameterError("parameter 'limit' must not start with '@' (a file of hosts)")
    return joined


# -- the files a run needs -----------------------------------------------------------------


def unsafe_yaml(value: Any) -> str:
    """`value` as YAML in JSON's flow style, every string tagged !unsafe.

    Extra vars are data from the network: !unsafe keeps Ansible from
    rendering a "{{ lookup('pipe', ...) }}" inside one as a template.
    """
    if isinstance(value, str):
        return "!unsafe " + json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return json.dumps(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ParameterError("extra_vars: numbers must be finite")
        text = repr(value)
        # YAML 1.1 (PyYAML) reads "1e+20" as a string: give the mantissa a dot.
        if "e" in text and "." not in text:
            text = text.replace("e", ".0e")
        return text
    if isinstance(value, list):
        return "[" + ", ".join(unsafe_yaml(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(key))}: {unsafe_yaml(item)}" for key, item in value.items())
        return "{" + ", ".join(items) + "}"
    raise ParameterError(f"extra_vars: a value of type {type(value).__name__} is not JSON")


def local_inventory(python: str, remote_tmp: Path) -> str:
    """The default inventory: this host, reached without ssh, with the worker's own Python."""
    host = {
        "ansible_connection": "local",
        "ansible_python_interpreter": python,
        # ~/.ansible/tmp is not writable under the unit (ProtectHome, no home at all).
        "ansible_remote_tmp": str(remote_tmp),
    }
    return json.dumps({"all": {"hosts": {"localhost": host}}}) + "\n"


def write_private(path: Path, text: str) -> None:
    """Write a file only we can read (it may hold secrets), created, never reused."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)


def find_ansible_playbook() -> str | None:
    """ansible-playbook of the worker's own environment first, then the one on PATH."""
    beside = Path(sys.executable).parent / "ansible-playbook"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("ansible-playbook")


def state_base(agent_id: str) -> Path:
    """Where Ansible may write: a dir of this worker under systemd's StateDirectory, else /tmp.

    Under the unit everything else is read-only; outside it a private temp
    dir (removed at exit) keeps one user's workers apart from another's.
    """
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        base = Path(state) / "ansible" / agent_id
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        return base
    base = Path(tempfile.mkdtemp(prefix="chiffon-ansible-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    return base


# -- reading the event stream ----------------------------------------------------------------


@dataclass
class FailedTask:
    task: str
    host: str
    status: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {
            "task": self.task,
            "host": self.host,
            "status": self.status,
            "message": self.message,
        }


Reporter = Callable[[float, str, str], None]


class EventReader:
    """Turns ansible's output lines into progress reports and what the result says.

    `on_line` is run_process's line callback: event lines (JSON objects with
    EVENT_KEY) drive the progress; other lines (warnings, errors on stderr)
    are kept, the last few, to explain a failure that happened before any task.
    """

    def __init__(self, report: Reporter) -> None:
        self._report = report
        self.total_tasks: int | None = None
        self.tasks_started = 0
        self.percent = 0.0
        self.current_task = ""
        self.stats: dict[str, dict[str, int]] = {}
        self.failed: list[FailedTask] = []
        self.failed_count = 0
        self.no_hosts_matched = False
        self.finished = False
        self.other_lines: deque[str] = deque(maxlen=OTHER_LINES_KEPT)

    def on_line(self, stream: str, line: str) -> None:
        event = parse_event(line) if stream == "stdout" else None
        if event is None:
            if line.strip():
                self.other_lines.append(line)
            return
        handler = getattr(self, "_on_" + str(event.get(EVENT_KEY)), None)
        if handler is not None:
            handler(event)

    # -- events ------------------------------------------------------------

    def _on_playbook_start(self, event: dict[str, Any]) -> None:
        tasks = event.get("tasks")
        if isinstance(tasks, int) and tasks > 0:
            self.total_tasks = tasks

    def _on_play_start(self, event: dict[str, Any]) -> None:
        self._report(self.percent, f"PLAY {text(event, 'play')}", "")

    def _on_no_hosts_matched(self, _event: dict[str, Any]) -> None:
        self.no_hosts_matched = True
        self._report(self.percent, "no hosts matched", "the play's hosts are not in the inventory")

    def _on_task_start(self, event: dict[str, Any]) -> None:
        self.current_task = text(event, "task")
        self._advance()
        self.tasks_started += 1
        kind = "handler" if event.get("handler") else "task"
        self._report(self.percent, self.current_task, f"{kind} started")

    def _on_task_result(self, event: dict[str, Any]) -> None:
        task, host, status = text(event, "task"), text(event, "host"), text(event, "status")
        if event.get("ignored"):
            status = "failed (ignored)"
        message = result_message(event)
        if status in ("failed", "unreachable"):
            self.failed_count += 1
            if len(self.failed) < MAX_FAILED_TASKS:
                self.failed.append(FailedTask(task, host, status, message))
        self._report(self.percent, f"{task}: {host} {status}", message)

    def _on_stats(self, event: dict[str, Any]) -> None:
        if len(self.stats) < MAX_RECAP_HOSTS:
            counts = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
            self.stats[text(event, "host")] = {
                name: value if isinstance(value := event.get(name), int) else 0 for name in counts
            }

    def _on_playbook_end(self, _event: dict[str, Any]) -> None:
        self.finished = True
        self.percent = 100.0
        self._report(self.percent, "PLAY RECAP", self.recap())

    def _advance(self) -> None:
        """Percent at a task's start: its share of the estimate, never decreasing.

        Past the estimate (roles, includes and loops it cannot see) the rest
        of the way to the ceiling is halved at each task.
        """
        done = self.tasks_started
        if self.total_tasks and done < self.total_tasks:
            estimate = RUNNING_CEILING * done / self.total_tasks
        else:
            estimate = self.percent + (RUNNING_CEILING - self.percent) / 2
        self.percent = max(self.percent, min(estimate, RUNNING_CEILING))

    # -- what the result says ----------------------------------------------

    def recap(self) -> str:
        lines = [
            f"{host} : " + " ".join(f"{name}={value}" for name, value in counts.items())
            for host, counts in self.stats.items()
        ]
        if self.no_hosts_matched:
            lines.append("no hosts matched")
        return "\n".join(lines)

    def analysis(self) -> dict[str, Any]:
        return {
            "stats": self.stats,
            "failed_tasks": [failure.as_dict() for failure in self.failed],
            "failed_count": self.failed_count,
            "tasks_started": self.tasks_started,
            "no_hosts_matched": self.no_hosts_matched,
        }

    def failure_message(self, returncode: int) -> str:
        """Why ansible failed: the failed tasks, or (before any task) what it printed last."""
        if self.failed:
            shown = "; ".join(
                f"task {f.task!r} {f.status} on {f.host}: {f.message}" for f in self.failed[:5]
            )
            more = self.failed_count - 5
            tail = f" (and {more} more)" if more > 0 else ""
            return cut(f"ansible-playbook exited with {returncode}: {shown}{tail}")
        printed = " | ".join(line.strip() for line in list(self.other_lines)[-6:])
        return cut(f"ansible-playbook exited with {returncode}: {printed or 'no output'}")


def parse_event(line: str) -> dict[str, Any] | None:
    """The event a line carries, or None for any other line."""
    if not line.startswith("{") or EVENT_KEY not in line:
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and EVENT_KEY in event else None


def text(event: Mapping[str, Any], key: str) -> str:
    value = event.get(key)
    return value if isinstance(value, str) else ""


def result_message(event: Mapping[str, Any]) -> str:
    parts = [text(event, "msg")]
    if event.get("status") in ("failed", "unreachable"):
        parts += [text(event, name) for name in ("stderr", "module_stderr", "reason")]
        if isinstance(event.get("rc"), int) and event["rc"] != 0:
            parts.append(f"rc={event['rc']}")
    return cut(": ".join(part for part in parts if part))


def exit_status(returncode: int) -> int:
    """A non-zero exit code for a failed run: a signal N as shells say it (128 + N)."""
    if returncode > 0:
        return returncode
    return 128 - returncode if returncode < 0 else 1


def cut(value: str, limit: int = MAX_ERROR_CHARS) -> str:
    return value if len(value) <= limit else value[: limit - 12] + " [... cut]"


# -- the worker --------------------------------------------------------------------------------


class PlaybookWorker(WorkerBase):
    """`run_playbook`: one ansible-playbook run per request, on this host by default."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings)
        ansible = find_ansible_playbook()
        if ansible is None:
            raise ConfigError(
                "CHIFFON_WORKER: PlaybookWorker needs Ansible, and ansible-playbook is neither "
                f"beside {sys.executable} nor on PATH: pip install 'chiffon-worker[ansible]'"
            )
        self._ansible_playbook = ansible
        self._playbook_dir = self.settings.playbook_dir
        if not self._playbook_dir.is_dir():
            raise ConfigError(f"CHIFFON_PLAYBOOK_DIR: {self._playbook_dir} is not a directory")
        base = state_base(str(self.agent_id))
        self._runs_dir = base / "runs"
        self._remote_tmp = base / "remote-tmp"
        self._ansible_env = {
            "ANSIBLE_HOME": str(base / "home"),
            "ANSIBLE_LOCAL_TEMP": str(base / "tmp"),
        }
        for path in (self._runs_dir, self._remote_tmp):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        logger.info(
            "playbook worker ready",
            extra={"ansible_playbook": ansible, "playbook_dir": str(self._playbook_dir)},
        )

    def get_agent_capabilities(self) -> dict[str, Any]:
        return {
            "work_types": [WORK_TYPE],
            "description": "runs Ansible playbooks from its playbook dir",
            "parameters": list(PARAMETERS),
        }

    def execute_work(self, request: WorkRequest) -> WorkResult:
        if request.work_type != WORK_TYPE:
            return WorkResult.failed(
                request, f"unsupported work_type {request.work_type!r}; supported: {WORK_TYPE}"
            )
        try:
            run = parse_request(
                request.parameters,
                self._playbook_dir,
                allow_ansible_vars=self.settings.playbook_allow_ansible_vars,
            )
        except ParameterError as exc:
            logger.warning("playbook request refused", extra={"reason": str(exc)})
            return WorkResult.failed(request, f"run_playbook refused: {exc}")
        with tempfile.TemporaryDirectory(prefix="run-", dir=self._runs_dir) as scratch:
            try:
                argv = self._argv(run, Path(scratch))
            except ParameterError as exc:
                return WorkResult.failed(request, f"run_playbook refused: {exc}")
            except UnicodeEncodeError:
                return WorkResult.failed(
                    request, "run_playbook refused: extra_vars holds text that is not valid UTF-8"
                )
            reader = EventReader(self.report_progress)
            process = run_process(
                argv,
                cwd=run.playbook.parent,
                env=self._env(),
                on_line=reader.on_line,
                max_line_bytes=MAX_LINE_BYTES,
            )
        return self._result(request, process, reader)

    # -- pieces ------------------------------------------------------------------------

    def _argv(self, run: PlaybookRun, scratch: Path) -> list[str]:
        """The command line; extra vars go through a private file, never the command line."""
        if run.inventory is not None:
            inventory = str(run.inventory)
        else:
            inventory = str(scratch / "inventory.yml")
            write_private(Path(inventory), local_inventory(sys.executable, self._remote_tmp))
        argv = [self._ansible_playbook, f"--inventory={inventory}"]
        if run.extra_vars:
            vars_file = scratch / "extra_vars.yml"
            write_private(vars_file, unsafe_yaml(run.extra_vars) + "\n")
            argv.append(f"--extra-vars=@{vars_file}")
        if run.limit is not None:
            argv.append(f"--limit={run.limit}")
        if run.tags is not None:
            argv.append(f"--tags={run.tags}")
        if run.check:
            argv += ["--check", "--diff"]
        # "--" ends the options: a playbook file named "-x.yml" stays a file name.
        return [*argv, "--", str(run.playbook)]

    def _env(self) -> dict[str, str]:
        """The worker's environment for ansible, without our own settings (the broker URL)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHIFFON_")}
        for name, value in self._ansible_env.items():
            env.setdefault(name, value)  # the unit (or the operator) may place them elsewhere
        plugin_path = env.get("ANSIBLE_CALLBACK_PLUGINS")
        env.update(
            {
                "ANSIBLE_STDOUT_CALLBACK": STDOUT_CALLBACK,
                "ANSIBLE_CALLBACK_PLUGINS": os.pathsep.join(
                    filter(None, [str(PLUGIN_DIR), plugin_path])
                ),
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_FORCE_COLOR": "0",
                "ANSIBLE_RETRY_FILES_ENABLED": "0",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def _result(
        self, request: WorkRequest, process: ProcessResult, reader: EventReader
    ) -> WorkResult:
        fields: dict[str, Any] = {
            "output": cut(reader.recap() or "\n".join(reader.other_lines), 65536),
            "resources_used": process.resources_used(),
            "analysis_result": reader.analysis(),
        }
        logger.info(
            "playbook finished",
            extra={
                "returncode": process.returncode,
                "tasks_started": reader.tasks_started,
                "failed_tasks": reader.failed_count,
                "end_reason": process.end_reason,
                "duration_ms": process.duration_ms,
            },
        )
        if process.cancelled:
            return self._ended_early(request, process, reader, fields)
        if process.returncode == 0:
            return WorkResult.completed(request, **fields)
        message = reader.failure_message(process.returncode)
        return WorkResult.failed(request, message, exit_status(process.returncode), **fields)

    def _ended_early(
        self,
        request: WorkRequest,
        process: ProcessResult,
        reader: EventReader,
        fields: dict[str, Any],
    ) -> WorkResult:
        reason = process.end_reason or "ended early"
        where = f" during task {reader.current_task!r}" if reader.current_task else ""
        fields["analysis_result"]["end_reason"] = reason
        if process.timed_out or self.stopping:
            # The time limit (the runtime answered 5001 already) or the shutdown timeout.
            message = f"ansible-playbook was ended{where}: {reason}"
            return WorkResult.failed(request, message, exit_status(process.returncode), **fields)
        return WorkResult.cancelled(request, f"{reason}{where}", **fields)
