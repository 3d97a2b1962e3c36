"""Ansible stdout callback: one JSON object per line, for PlaybookWorker to read.

Loaded by Ansible (ANSIBLE_STDOUT_CALLBACK=chiffon_jsonl with this directory
in ANSIBLE_CALLBACK_PLUGINS), never imported by the worker: it uses only the
standard library and Ansible's own CallbackBase, and runs with ansible-core
2.15 and later (the 2.19 names `result.host` and the older `result._host`).

Every line is an object whose "chiffon_event" names it: playbook_start,
play_start, no_hosts_matched, task_start, task_result, stats (one per host)
and playbook_end. Text fields are cut so that a line stays a few KiB whatever
a task prints: the reader caps lines at 64 KiB and a cut line is no JSON.
Warnings and errors still go to stderr as Ansible writes them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ansible.plugins.callback import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    CallbackBase,
)

DOCUMENTATION = """
    name: chiffon_jsonl
    type: stdout
    short_description: JSON lines for chiffon-worker's PlaybookWorker
    description:
        - One JSON object per line on stdout for each playbook, play, task and result.
"""

EVENT_KEY = "chiffon_event"
# Longest text kept of a name (task, play, host) and of a message field.
MAX_NAME_CHARS = 300
MAX_TEXT_CHARS = 2000
# Result fields that explain a failure, in the order a reader wants them.
DETAIL_FIELDS = ("msg", "stderr", "stdout", "module_stderr", "module_stdout", "reason")


def cut(value: Any, limit: int = MAX_TEXT_CHARS) -> str:
    """The text of `value`, at most `limit` characters: the head and the tail kept."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    half = (limit - 20) // 2
    return f"{text[:half]} [... cut ...] {text[-half:]}"


def attr(result: Any, name: str) -> Any:
    """A TaskResult field by its 2.19 name, or by the older private one."""
    try:
        return getattr(result, name)
    except AttributeError:
        return getattr(result, "_" + name)


def count_tasks(blocks: Any) -> int:
    """Tasks in a list of blocks and tasks, blocks opened recursively (rescue/always too)."""
    total = 0
    for item in blocks or ():
        if hasattr(item, "block"):
            total += count_tasks(item.block) + count_tasks(item.rescue) + count_tasks(item.always)
        else:
            total += 1
    return total


def play_tasks(play: Any) -> int:
    """A static estimate of the tasks a play runs per host: its own, its roles', fact gathering."""
    total = count_tasks(play.pre_tasks) + count_tasks(play.tasks) + count_tasks(play.post_tasks)
    for role in getattr(play, "roles", None) or ():
        total += count_tasks(getattr(role, "_task_blocks", None))
    if play.gather_facts is not False:
        total += 1
    return total


class CallbackModule(CallbackBase):  # type: ignore[misc,unused-ignore]
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "chiffon_jsonl"

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({EVENT_KEY: event, **fields}, default=str)
        self._display.display(line)
        # A pipe is block-buffered: flush, so the worker sees each event as it happens.
        sys.stdout.flush()

    # -- playbook and plays ----------------------------------------------------

    def v2_playbook_on_start(self, playbook: Any) -> None:
        try:
            tasks: int | None = sum(play_tasks(play) for play in playbook.get_plays())
        except Exception:  # an estimate only: unknown is fine
            tasks = None
        name = getattr(playbook, "_file_name", None) or ""
        self.emit("playbook_start", playbook=cut(name, MAX_NAME_CHARS), tasks=tasks)

    def v2_playbook_on_play_start(self, play: Any) -> None:
        name = play.get_name().strip()
        self.emit("play_start", play=cut(name, MAX_NAME_CHARS))

    def v2_playbook_on_no_hosts_matched(self) -> None:
        self.emit("no_hosts_matched")

    def v2_playbook_on_task_start(self, task: Any, is_conditional: Any) -> None:
        self.emit_task_start(task, handler=False)

    def v2_playbook_on_handler_task_start(self, task: Any) -> None:
        self.emit_task_start(task, handler=True)

    def emit_task_start(self, task: Any, *, handler: bool) -> None:
        self.emit(
            "task_start",
            task=cut(task.get_name().strip(), MAX_NAME_CHARS),
            action=cut(getattr(task, "action", "") or "", MAX_NAME_CHARS),
            handler=handler,
        )

    # -- per-host results ------------------------------------------------------

    def v2_runner_on_ok(self, result: Any) -> None:
        changed = bool(attr(result, "result").get("changed", False))
        self.emit_result(result, "changed" if changed else "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self.emit_result(result, "failed", ignored=bool(ignore_errors))

    def v2_runner_on_skipped(self, result: Any) -> None:
        self.emit_result(result, "skipped")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self.emit_result(result, "unreachable")

    def emit_result(self, result: Any, status: str, *, ignored: bool = False) -> None:
        self.show_warnings(result)
        data = attr(result, "result")
        fields: dict[str, Any] = {
            "task": cut(attr(result, "task").get_name().strip(), MAX_NAME_CHARS),
            "host": cut(attr(result, "host").get_name(), MAX_NAME_CHARS),
            "status": status,
            "ignored": ignored,
        }
        if isinstance(data.get("rc"), int):
            fields["rc"] = data["rc"]
        fields.update(self.details(data, status))
        self.emit("task_result", **fields)

    @staticmethod
    def details(data: Any, status: str) -> dict[str, str]:
        """What explains the result: its msg, and for a failure stderr/stdout too."""
        if status in ("failed", "unreachable"):
            data = first_failed_item(data)
            names: tuple[str, ...] = DETAIL_FIELDS
        else:
            names = ("msg",)
        return {
            name: cut(data[name]).rstrip()
            for name in names
            if data.get(name) not in (None, "", [], {})
        }

    def show_warnings(self, result: Any) -> None:
        """Warnings and module exceptions to stderr, as the default callback shows them."""
        handle = getattr(self, "_handle_warnings_and_exception", None)  # 2.19
        try:
            if handle is not None:
                handle(result)
            else:
                data = attr(result, "result")
                self._handle_exception(data)
                self._handle_warnings(data)
        except Exception:  # cosmetic: never lose the event for it
            pass

    # -- the end ---------------------------------------------------------------

    def v2_playbook_on_stats(self, stats: Any) -> None:
        # One line per host: a recap of a thousand hosts would not fit one line.
        for host in sorted(stats.processed):
            summary = stats.summarize(host)
            self.emit(
                "stats",
                host=cut(host, MAX_NAME_CHARS),
                ok=summary.get("ok", 0),
                changed=summary.get("changed", 0),
                failed=summary.get("failures", 0),
                unreachable=summary.get("unreachable", 0),
                skipped=summary.get("skipped", 0),
                rescued=summary.get("rescued", 0),
                ignored=summary.get("ignored", 0),
            )
        self.emit("playbook_end")


def first_failed_item(data: Any) -> Any:
    """For a loop, the first failed item's result (its msg says more than the loop's)."""
    for item in data.get("results") or ():
        if isinstance(item, dict) and item.get("failed"):
            return item
    return data
