"""PlaybookWorker without a broker: what a request may ask for, and how ansible's events read."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import stat
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from chiffon_worker import playbook
from chiffon_worker.ansible_plugins import PLUGIN_DIR
from chiffon_worker.config import Settings
from chiffon_worker.errors import ConfigError
from chiffon_worker.playbook import (
    EVENT_KEY,
    EventReader,
    ParameterError,
    PlaybookWorker,
    parse_event,
    parse_request,
    unsafe_yaml,
)
from chiffon_worker.process import ProcessResult
from chiffon_worker.protocol import WorkRequest
from chiffon_worker.service import serve

yaml = pytest.importorskip("yaml")  # comes with ansible-core (the dev extra)


@pytest.fixture
def playbook_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "playbooks"
    (directory / "web").mkdir(parents=True)
    (directory / "site.yml").write_text("- hosts: all\n  tasks: []\n")
    (directory / "web" / "deploy.yml").write_text("- hosts: all\n  tasks: []\n")
    (directory / "hosts.ini").write_text("localhost\n")
    (tmp_path / "secret.yml").write_text("- hosts: all\n  tasks: []\n")
    (directory / "escape.yml").symlink_to(tmp_path / "secret.yml")
    (directory / "inside.yml").symlink_to(directory / "site.yml")
    return directory


@pytest.fixture
def worker(playbook_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PlaybookWorker:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    return PlaybookWorker(Settings(playbook_dir=playbook_dir, agent_id=uuid.uuid4()))


def request(**parameters: Any) -> WorkRequest:
    return WorkRequest(task_id=uuid.uuid4(), work_type="run_playbook", parameters=parameters)


# -- parameters --------------------------------------------------------------------------


def test_a_playbook_under_the_dir_resolves_to_its_real_path(playbook_dir: Path) -> None:
    assert parse_request({"playbook": "site.yml"}, playbook_dir).playbook == (
        playbook_dir / "site.yml"
    )
    assert parse_request({"playbook": "web/deploy.yml"}, playbook_dir).playbook == (
        playbook_dir / "web" / "deploy.yml"
    )
    # A symlink that stays inside is fine; ansible gets the target.
    assert parse_request({"playbook": "inside.yml"}, playbook_dir).playbook == (
        playbook_dir / "site.yml"
    )


@pytest.mark.parametrize(
    ("parameters", "says"),
    [
        ({}, "'playbook' is required"),
        ({"playbook": "../../etc/passwd"}, "contains '..'"),
        ({"playbook": "web/../../secret.yml"}, "contains '..'"),
        ({"playbook": "/etc/passwd"}, "absolute path"),
        ({"playbook": "escape.yml"}, "leads outside the playbook dir"),
        ({"playbook": "missing.yml"}, "does not exist"),
        ({"playbook": "web"}, "is not a file"),
        ({"playbook": "."}, "leads outside the playbook dir"),
        ({"playbook": ""}, "non-empty file name"),
        ({"playbook": 42}, "non-empty file name"),
        ({"playbook": "site.yml\0x"}, "NUL"),
        ({"playbook": "site.yml", "inventory": "/etc/hosts"}, "inventory '/etc/hosts'"),
        ({"playbook": "site.yml", "inventory": "../hosts"}, "contains '..'"),
        ({"playbook": "site.yml", "extra_vars": ["a"]}, "must be an object"),
        ({"playbook": "site.yml", "extra_vars": {"ansible_connection": "ssh"}}, "ansible_conn"),
        ({"playbook": "site.yml", "extra_vars": {"ansible_become": True}}, "refused"),
        ({"playbook": "site.yml", "extra_vars": {"not a name": 1}}, "not a valid variable"),
        ({"playbook": "site.yml", "check": "yes"}, "'check' must be true or false"),
        ({"playbook": "site.yml", "limit": 3}, "'limit' must be"),
        ({"playbook": "site.yml", "limit": []}, "'limit' must be"),
        ({"playbook": "site.yml", "limit": "@/etc/hosts"}, "must not start with '@'"),
        ({"playbook": "site.yml", "tags": ["a", 1]}, "'tags' must be"),
        ({"playbook": "site.yml", "tags": "a\nb"}, "newline"),
        ({"playbook": "site.yml", "verbosity": 4}, "unknown parameter(s) 'verbosity'"),
    ],
)
def test_a_bad_parameter_is_refused_naming_it(
    playbook_dir: Path, parameters: dict[str, Any], says: str
) -> None:
    with pytest.raises(ParameterError) as raised:
        parse_request(parameters, playbook_dir)
    assert says in str(raised.value)


def test_ansible_vars_pass_when_the_setting_allows_them(playbook_dir: Path) -> None:
    run = parse_request(
        {"playbook": "site.yml", "extra_vars": {"ansible_user": "deploy"}},
        playbook_dir,
        allow_ansible_vars=True,
    )
    assert run.extra_vars == {"ansible_user": "deploy"}


def test_limit_and_tags_take_a_string_or_a_list(playbook_dir: Path) -> None:
    run = parse_request(
        {"playbook": "site.yml", "limit": ["web1", " web2 "], "tags": "deploy,config"},
        playbook_dir,
    )
    assert (run.limit, run.tags) == ("web1,web2", "deploy,config")


# -- the files and the command line ------------------------------------------------------


class UnsafeLoader(yaml.SafeLoader):  # type: ignore[misc,name-defined]
    """PyYAML as Ansible reads the vars file, minus Ansible: !unsafe marks a plain string."""


UnsafeLoader.add_constructor(
    "!unsafe", lambda loader, node: ("unsafe", loader.construct_scalar(node))
)


@pytest.mark.parametrize(
    "value",
    [
        "{{ lookup('pipe', 'id') }}",
        'quote " backslash \\ newline \n tab \t',
        "unicode é ✓ 😀",
        "\x01 control",
        "yes",
        "1e3",
    ],
)
def test_every_extra_var_string_is_tagged_unsafe_and_reads_back_unchanged(value: str) -> None:
    loaded = yaml.load(unsafe_yaml({"v": value, "nested": [{"w": value}]}), Loader=UnsafeLoader)
    assert loaded == {"v": ("unsafe", value), "nested": [{"w": ("unsafe", value)}]}


def test_extra_var_numbers_and_constants_keep_their_type() -> None:
    values = {"i": -3, "f": 1.5, "big": 1e20, "small": 1e-7, "t": True, "n": None}
    assert yaml.load(unsafe_yaml(values), Loader=UnsafeLoader) == values


def test_extra_vars_go_into_a_private_file_not_onto_the_command_line(
    worker: PlaybookWorker, playbook_dir: Path, tmp_path: Path
) -> None:
    run = parse_request(
        {
            "playbook": "site.yml",
            "extra_vars": {"password": "hunter2"},
            "limit": "web",
            "tags": ["a", "b"],
            "check": True,
        },
        playbook_dir,
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = worker._argv(run, scratch)

    assert not any("hunter2" in arg for arg in argv)
    vars_file = scratch / "extra_vars.yml"
    assert f"--extra-vars=@{vars_file}" in argv
    assert stat.S_IMODE(vars_file.stat().st_mode) == 0o600
    assert "hunter2" in vars_file.read_text()
    assert {"--limit=web", "--tags=a,b", "--check", "--diff"} <= set(argv)
    assert argv[-2:] == ["--", str(playbook_dir / "site.yml")]


def test_the_default_inventory_is_this_host_with_the_workers_python(
    worker: PlaybookWorker, playbook_dir: Path, tmp_path: Path
) -> None:
    argv = worker._argv(parse_request({"playbook": "site.yml"}, playbook_dir), tmp_path)
    inventory = tmp_path / "inventory.yml"
    assert f"--inventory={inventory}" in argv
    host = json.loads(inventory.read_text())["all"]["hosts"]["localhost"]
    assert host["ansible_connection"] == "local"
    assert host["ansible_python_interpreter"] == sys.executable
    assert not any(arg.startswith("--extra-vars") for arg in argv)


def test_a_named_inventory_is_used_as_given(worker: PlaybookWorker, playbook_dir: Path) -> None:
    run = parse_request({"playbook": "site.yml", "inventory": "hosts.ini"}, playbook_dir)
    assert f"--inventory={playbook_dir / 'hosts.ini'}" in worker._argv(run, playbook_dir)


def test_ansible_gets_our_callback_and_no_chiffon_settings(
    worker: PlaybookWorker, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CHIFFON_AMQP_URL", "amqp://user:secret@broker/")
    monkeypatch.setenv("ANSIBLE_HOME", "/srv/ansible-home")
    monkeypatch.setenv("ANSIBLE_CALLBACK_PLUGINS", "/srv/plugins")
    env = worker._env()
    assert not [name for name in env if name.startswith("CHIFFON_")]
    assert env["ANSIBLE_STDOUT_CALLBACK"] == "chiffon_jsonl"
    plugin_dirs = env["ANSIBLE_CALLBACK_PLUGINS"].split(os.pathsep)
    assert (Path(plugin_dirs[0]) / "chiffon_jsonl.py").is_file()
    assert plugin_dirs[1] == "/srv/plugins"
    assert env["ANSIBLE_HOME"] == "/srv/ansible-home"  # the operator's choice stands
    assert env["ANSIBLE_LOCAL_TEMP"].startswith(str(tmp_path / "state"))
    assert env["ANSIBLE_NOCOLOR"] == "1"


# -- starting ------------------------------------------------------------------------------


def test_a_worker_without_ansible_says_so_in_one_line_and_exits_78(
    playbook_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(playbook, "find_ansible_playbook", lambda: None)
    with pytest.raises(ConfigError, match=r"chiffon-worker\[ansible\]"):
        PlaybookWorker(Settings(playbook_dir=playbook_dir))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert serve(PlaybookWorker, Settings(playbook_dir=playbook_dir, log_format="text")) == 78
    finally:  # serve() logs to this test's captured stderr: leave the root logger as it was
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
        root.setLevel(level)
    printed = capsys.readouterr().err.strip().splitlines()
    assert len(printed) == 1
    assert "needs Ansible" in printed[0]


def test_a_missing_playbook_dir_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CHIFFON_PLAYBOOK_DIR"):
        PlaybookWorker(Settings(playbook_dir=tmp_path / "nowhere"))


def test_it_declares_run_playbook(worker: PlaybookWorker) -> None:
    assert worker.get_agent_capabilities()["work_types"] == ["run_playbook"]


# -- the event stream --------------------------------------------------------------------


def event(name: str, **fields: Any) -> str:
    return json.dumps({EVENT_KEY: name, **fields})


class Reports:
    def __init__(self) -> None:
        self.seen: list[tuple[float, str, str]] = []

    def __call__(self, percent: float, name: str, output: str) -> None:
        self.seen.append((percent, name, output))

    @property
    def percents(self) -> list[float]:
        return [percent for percent, _, _ in self.seen]

    @property
    def names(self) -> list[str]:
        return [name for _, name, _ in self.seen]


def feed(reader: EventReader, *lines: str, stream: str = "stdout") -> None:
    for line in lines:
        reader.on_line(stream, line)


def test_each_task_start_and_host_result_is_reported_with_rising_percent() -> None:
    reports = Reports()
    reader = EventReader(reports)
    feed(
        reader,
        event("playbook_start", playbook="site.yml", tasks=2),
        event("play_start", play="Web"),
        event("task_start", task="Install", handler=False),
        event("task_result", task="Install", host="web1", status="changed", ignored=False),
        event("task_result", task="Install", host="web2", status="skipped", ignored=False),
        event("task_start", task="Start", handler=False),
        event("task_result", task="Start", host="web1", status="ok", ignored=False, msg="up"),
        event("stats", host="web1", ok=2, changed=1, failed=0, unreachable=0, skipped=0),
        event("playbook_end"),
    )
    assert reports.names == [
        "PLAY Web",
        "Install",
        "Install: web1 changed",
        "Install: web2 skipped",
        "Start",
        "Start: web1 ok",
        "PLAY RECAP",
    ]
    assert reports.percents == sorted(reports.percents)
    assert reports.percents[-1] == 100
    assert [out for _, name, out in reports.seen if name == "Start: web1 ok"] == ["up"]
    assert reader.analysis()["stats"]["web1"]["changed"] == 1
    assert "web1 : ok=2 changed=1" in reader.recap()


def test_percent_never_decreases_and_stays_below_100_past_the_estimate() -> None:
    reports = Reports()
    reader = EventReader(reports)
    feed(reader, event("playbook_start", tasks=1))
    feed(reader, *(event("task_start", task=f"t{n}") for n in range(30)))
    assert reports.percents == sorted(reports.percents)
    assert reports.percents[-1] < 100


def test_a_failure_names_the_task_host_and_message() -> None:
    reader = EventReader(Reports())
    feed(
        reader,
        event("task_start", task="Migrate"),
        event(
            "task_result",
            task="Migrate",
            host="db1",
            status="failed",
            ignored=False,
            msg="non-zero return code",
            stderr="relation exists",
            rc=3,
        ),
        event("task_result", task="Migrate", host="db2", status="unreachable", msg="no route"),
        event("task_result", task="Optional", host="db1", status="failed", ignored=True),
    )
    message = reader.failure_message(2)
    assert message.startswith("ansible-playbook exited with 2: ")
    assert "task 'Migrate' failed on db1: non-zero return code: relation exists: rc=3" in message
    assert "task 'Migrate' unreachable on db2: no route" in message
    assert "Optional" not in message  # ignore_errors: not a failure of the run
    assert [f["host"] for f in reader.analysis()["failed_tasks"]] == ["db1", "db2"]


def test_a_failure_before_any_task_is_explained_by_what_ansible_printed() -> None:
    reader = EventReader(Reports())
    feed(reader, "[ERROR]: couldn't resolve module/action 'nosuch'", stream="stderr")
    assert "couldn't resolve module/action 'nosuch'" in reader.failure_message(4)


def test_only_event_lines_on_stdout_are_events() -> None:
    reports = Reports()
    reader = EventReader(reports)
    feed(reader, event("task_start", task="from stderr"), stream="stderr")
    feed(reader, "{not json " + EVENT_KEY, '{"other": 1}', "plain text")
    feed(reader, event("task_start", task="x")[:20] + " [... 99 bytes cut]")
    assert reports.seen == []
    assert parse_event(event("task_start", task="x")) == {EVENT_KEY: "task_start", "task": "x"}
    assert parse_event("[1, 2]") is None


# -- the callback plugin, in ansible's place ---------------------------------------------------


class FakeDisplay:
    verbosity = 0

    def __init__(self) -> None:
        self.lines: list[str] = []

    def display(self, msg: str, **_kwargs: Any) -> None:
        self.lines.append(msg)


class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def get_name(self) -> str:
        return self.name


class FakeTaskResult:
    """A TaskResult as ansible-core 2.15-2.18 hands it over (private names)."""

    def __init__(self, task: str, host: str, data: dict[str, Any]) -> None:
        self._task, self._host, self._result = Named(task), Named(host), data


@pytest.fixture
def callback() -> Any:
    pytest.importorskip("ansible")
    spec = importlib.util.spec_from_file_location(
        "chiffon_jsonl_under_test", PLUGIN_DIR / "chiffon_jsonl.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CallbackModule(display=FakeDisplay())


def test_a_huge_task_result_still_makes_one_short_event_line(callback: Any) -> None:
    huge = "x" * 1_000_000
    data = {"msg": huge, "stderr": huge, "stdout": huge, "rc": 1, "failed": True}
    callback.v2_runner_on_failed(FakeTaskResult("T" * 5000, "web1", data))
    [line] = callback._display.lines
    assert len(line.encode()) < 16384
    parsed = parse_event(line)
    assert parsed is not None
    assert (parsed["status"], parsed["host"], parsed["rc"]) == ("failed", "web1", 1)
    assert "[... cut ...]" in parsed["msg"]


def test_a_failed_loop_reports_the_failed_item(callback: Any) -> None:
    data = {
        "msg": "One or more items failed",
        "results": [{"msg": "fine"}, {"failed": True, "msg": "item two broke"}],
    }
    callback.v2_runner_on_failed(FakeTaskResult("Loop", "web1", data))
    parsed = parse_event(callback._display.lines[0])
    assert parsed is not None
    assert parsed["msg"] == "item two broke"


# -- the result ------------------------------------------------------------------------------


def process_result(returncode: int = 0, **fields: Any) -> ProcessResult:
    values: dict[str, Any] = {
        "argv": ("ansible-playbook",),
        "pid": 1,
        "returncode": returncode,
        "output_tail": "",
        "timed_out": False,
        "cancelled": False,
        "end_reason": None,
        "killed": False,
        "cpu_time_ms": 5,
        "memory_peak_mb": 1.0,
        "tree_rss_peak_mb": 1.0,
        "duration_ms": 10,
    }
    values.update(fields)
    return ProcessResult(**values)


def test_a_cancelled_run_answers_cancelled_with_the_task_it_was_in(worker: PlaybookWorker) -> None:
    reader = EventReader(Reports())
    feed(reader, event("task_start", task="Sleep a long time"))
    ended = process_result(-15, cancelled=True, end_reason="operator said so")
    result = worker._result(request(playbook="site.yml"), ended, reader)
    assert result.status == "cancelled"
    assert "operator said so" in (result.error_message or "")
    assert "Sleep a long time" in (result.error_message or "")


def test_a_run_ended_by_its_time_limit_fails_saying_why(worker: PlaybookWorker) -> None:
    ended = process_result(-9, cancelled=True, timed_out=True, end_reason="time limit", killed=True)
    result = worker._result(request(playbook="site.yml"), ended, EventReader(Reports()))
    assert result.status == "failed"
    assert result.exit_code == 128 + 9
    assert "time limit" in (result.error_message or "")
    assert result.analysis_result is not None
    assert result.analysis_result["end_reason"] == "time limit"


def test_a_run_ended_by_the_shutdown_timeout_fails_naming_the_task(
    worker: PlaybookWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PlaybookWorker, "stopping", property(lambda _self: True))
    reader = EventReader(Reports())
    feed(reader, event("task_start", task="Sleep a long time"))
    why = "the worker's shutdown timeout passed"
    ended = process_result(-15, cancelled=True, end_reason=why)
    result = worker._result(request(playbook="site.yml"), ended, reader)
    assert result.status == "failed"
    assert result.error_message == (
        f"ansible-playbook was ended during task 'Sleep a long time': {why}"
    )
    assert result.exit_code == 128 + 15
