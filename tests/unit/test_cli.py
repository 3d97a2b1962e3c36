"""The chiffon-worker command: arguments, exit codes and one-line configuration errors."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from chiffon_worker import __version__
from chiffon_worker.cli import load_worker_class, main, parse_params
from chiffon_worker.config import load_settings
from chiffon_worker.echo import EchoWorker
from chiffon_worker.errors import EXIT_CONFIG, ConfigError
from chiffon_worker.worker import WorkerBase

SUBPROCESS_TIMEOUT_S = 60
# Nothing listens on port 1: a test that got as far as connecting fails fast.
UNREACHABLE = "amqp://127.0.0.1:1/"


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without any worker settings, plus `extra`."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CHIFFON_") and key not in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET")
    }
    environ.update(extra)
    return environ


def test_version_flag_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])

    assert caught.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_mentions_the_run_and_send_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--help"])

    out = capsys.readouterr().out
    assert caught.value.code == 0
    assert "run" in out
    assert "send" in out


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("seconds=5", 5),
        ("ratio=0.5", 0.5),
        ("dry_run=true", True),
        ('hosts=["a", "b"]', ["a", "b"]),
        ('opts={"k": null}', {"k": None}),
        ("message=hello world", "hello world"),
        ("empty=", ""),
        ("expr=a=b", "a=b"),
    ],
)
def test_param_values_are_json_when_they_parse_and_strings_otherwise(
    item: str, expected: Any
) -> None:
    key = item.partition("=")[0]

    assert parse_params([item]) == {key: expected}


@pytest.mark.parametrize("item", ["no-equals-sign", "=value"])
def test_param_without_a_key_and_equals_sign_is_refused(item: str) -> None:
    with pytest.raises(ConfigError, match="--param"):
        parse_params([item])


def test_worker_spec_loads_the_class() -> None:
    assert load_worker_class("chiffon_worker.echo:EchoWorker") is EchoWorker


@pytest.mark.parametrize(
    "spec",
    ["no_such_module_xyz:Worker", "chiffon_worker.echo:NoSuchWorker", "chiffon_worker.echo"],
)
def test_unloadable_worker_spec_names_chiffon_worker(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"^CHIFFON_WORKER:"):
        load_worker_class(spec)


@pytest.mark.parametrize(
    "spec", ["chiffon_worker.config:Settings", "chiffon_worker.echo:WORK_TYPES"]
)
def test_worker_spec_that_is_not_a_worker_base_names_chiffon_worker(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"^CHIFFON_WORKER:.*WorkerBase"):
        load_worker_class(spec)


def test_relative_worker_spec_is_a_config_error() -> None:
    def load_configured_worker() -> type[WorkerBase]:
        # Refusing the spec in either place (settings or loading) is a fix.
        settings = load_settings(environ={"CHIFFON_WORKER": ".echo:EchoWorker"})
        return load_worker_class(settings.worker)

    with pytest.raises(ConfigError, match="CHIFFON_WORKER"):
        load_configured_worker()


def test_bad_setting_exits_78_with_one_line_naming_it(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "chiffon_worker", "run"],
        env=clean_environ(CHIFFON_ACK_MODE="sometimes"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )

    assert finished.returncode == EXIT_CONFIG
    lines = finished.stderr.splitlines()
    assert len(lines) == 1, finished.stderr
    assert "CHIFFON_ACK_MODE" in lines[0]
    assert "Traceback" not in finished.stderr


def test_password_in_amqp_url_flag_is_refused_without_echoing_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["run", "--amqp-url", "amqp://u:secret@h/"])

    err = capsys.readouterr().err
    assert code == EXIT_CONFIG
    assert "--amqp-url" in err
    assert "secret" not in err


def test_a_worker_class_that_cannot_be_built_stops_with_one_line(tmp_path: Path) -> None:
    module = tmp_path / "half_done.py"
    module.write_text(
        "from chiffon_worker import WorkerBase\n"
        "class HalfDone(WorkerBase):\n"
        "    def get_agent_capabilities(self):\n"
        "        return {'work_types': ['x']}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHIFFON_")}
    env.update(PYTHONPATH=str(tmp_path), CHIFFON_WORKER="half_done:HalfDone")
    done = subprocess.run(
        [sys.executable, "-m", "chiffon_worker", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 78
    assert "Traceback" not in done.stderr
    assert "HalfDone cannot be started" in done.stderr
    assert "execute_work" in done.stderr


@pytest.mark.parametrize(
    "source", ["raise RuntimeError('no config here')\n", "def broken(:\n"], ids=["raises", "syntax"]
)
def test_a_worker_module_that_fails_to_import_is_a_one_line_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    module = f"broken_worker_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(ConfigError, match=r"^CHIFFON_WORKER: cannot load"):
        load_worker_class(f"{module}:Worker")


@pytest.mark.parametrize(
    "item", ["x=NaN", "x=Infinity", "x=-Infinity", "x=inf", "x=nan", "x=1e400", 'x=[1, {"y": NaN}]']
)
def test_param_number_json_cannot_carry_is_refused_not_sent_as_null(item: str) -> None:
    with pytest.raises(ConfigError, match=r"^--param x: "):
        parse_params([item])


def test_param_quoted_inf_is_the_text() -> None:
    assert parse_params(['x="inf"']) == {"x": "inf"}


def test_send_with_nan_param_is_one_line_and_exit_78(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["send", "--work-type", "echo", "--param", "x=NaN", "--amqp-url", UNREACHABLE])

    err = capsys.readouterr().err
    assert code == EXIT_CONFIG
    assert err.count("\n") == 1
    assert "--param x" in err


def test_send_to_the_reply_queue_is_refused_before_connecting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHIFFON_REPLY_QUEUE", raising=False)
    args = ["send", "--work-type", "echo", "--work-queue", "reply_queue", "--amqp-url", UNREACHABLE]

    code = main(args)

    err = capsys.readouterr().err
    assert code == EXIT_CONFIG
    assert err.splitlines() == [
        "chiffon-worker: configuration error: CHIFFON_WORK_QUEUE: must differ from "
        "CHIFFON_REPLY_QUEUE (both are 'reply_queue')"
    ]


@pytest.mark.parametrize("timeout", ["inf", "nan", "0", "-1", "1e400", "soon"])
@pytest.mark.parametrize("command", [["send", "--work-type", "echo"], ["ctl", "ping"]])
def test_timeout_that_is_not_a_finite_positive_number_is_a_usage_error(
    command: list[str], timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main([*command, "--timeout", timeout])

    assert caught.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_configuration_error_with_a_line_break_is_printed_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHIFFON_TLS_CA_FILE", str(tmp_path / "two\nlines"))

    code = main(["run", "--amqp-url", UNREACHABLE])

    assert code == EXIT_CONFIG
    assert len(capsys.readouterr().err.splitlines()) == 1
