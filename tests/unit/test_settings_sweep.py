"""No setting can crash the worker: every CHIFFON_* value either loads or is refused by name.

The sweep feeds each field of Settings the values a careless operator or a
broken deployment tool writes: empty, negative, zero, huge, not finite, and
bytes that are not UTF-8. A refusal is a ConfigError that names the setting;
through the real command it is exit 78 and one line on stderr, no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chiffon_worker.config import ENV_PREFIX, Settings, load_settings
from chiffon_worker.errors import EXIT_CONFIG, ConfigError

VARIABLES = [ENV_PREFIX + name.upper() for name in Settings.model_fields]
HOSTILE_TEXT = {
    "empty": "",
    "negative": "-1",
    "negative-float": "-0.5",
    "zero": "0",
    "huge": "1e400",
    "huge-int": "1" + "0" * 40,
    "nan": "nan",
    "inf": "inf",
    "minus-inf": "-inf",
    "long": "x" * 10_000,
}
HOSTILE_BYTES = {
    "latin-1": b"caf\xe9",
    "invalid-start": b"\xff\xfe",
    "number-then-junk": b"1\x80",
}
# Nothing listens on port 1: a command that got past its settings would fail here.
UNREACHABLE = "amqp://127.0.0.1:1/%2F"
SUBPROCESS_TIMEOUT_S = 60


def loads_or_names_the_setting(variable: str, **kwargs: object) -> None:
    """Load, then use what a start uses; any refusal must name `variable`."""
    refusal = ""
    try:
        settings = load_settings(**kwargs)  # type: ignore[arg-type]
        settings.broker_urls()
        settings.tls_files()
        settings.resolved_agent_id()
    except ConfigError as exc:
        refusal = str(exc)
    if refusal:
        assert refusal.startswith(f"{variable}:"), refusal
        assert "\n" not in refusal


@pytest.mark.parametrize("value", list(HOSTILE_TEXT.values()), ids=list(HOSTILE_TEXT))
@pytest.mark.parametrize("variable", VARIABLES)
def test_hostile_value_loads_or_is_refused_naming_the_setting(variable: str, value: str) -> None:
    loads_or_names_the_setting(variable, environ={variable: value})


@pytest.mark.parametrize("raw", list(HOSTILE_BYTES.values()), ids=list(HOSTILE_BYTES))
@pytest.mark.parametrize("variable", VARIABLES)
def test_non_utf8_value_in_an_env_file_loads_or_is_refused_naming_the_setting(
    tmp_path: Path, variable: str, raw: bytes
) -> None:
    # os.environ cannot be handed raw bytes here; an env file can.
    env_file = tmp_path / "worker.env"
    env_file.write_bytes(variable.encode() + b"=" + raw + b"\n")

    loads_or_names_the_setting(variable, env_file=env_file, environ={})


def worker_environ(**settings: str) -> dict[str, str]:
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(ENV_PREFIX) and key not in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET")
    }
    environ[ENV_PREFIX + "AMQP_URL"] = UNREACHABLE
    environ.update(settings)
    return environ


def run_worker(
    tmp_path: Path, environ: dict[str, str] | dict[bytes, bytes], *args: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "chiffon_worker", "run", *args],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def assert_refused_in_one_line(done: subprocess.CompletedProcess[bytes], variable: str) -> None:
    stderr = done.stderr.decode("utf-8", errors="replace")
    assert done.returncode == EXIT_CONFIG, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"chiffon-worker: configuration error: {variable}:"), stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHIFFON_PREFETCH", "1e400"),
        ("CHIFFON_HEARTBEAT_INTERVAL", "nan"),
        ("CHIFFON_BLOCKED_CONNECTION_TIMEOUT", "inf"),
        ("CHIFFON_MAX_RESULT_BYTES", "1" + "0" * 40),
        ("CHIFFON_METRICS_PORT", "0"),
        ("CHIFFON_AGENT_ID", "-1"),
        ("CHIFFON_TLS_CA_FILE", "-1"),
        ("CHIFFON_AMQP_URL", UNREACHABLE + "?heartbeat=abc"),
        ("CHIFFON_AMQP_URL", UNREACHABLE + "?bogus_option=1"),
        ("CHIFFON_AMQP_URL", UNREACHABLE + "?channel_max=0"),
        ("CHIFFON_WORK_QUEUE", "amq.work"),
    ],
)
def test_bad_setting_stops_the_command_with_78_and_one_line(
    tmp_path: Path, variable: str, value: str
) -> None:
    done = run_worker(tmp_path, worker_environ(**{variable: value}))

    assert_refused_in_one_line(done, variable)


def test_non_utf8_environment_value_stops_the_command_with_one_line(tmp_path: Path) -> None:
    environ = {os.fsencode(k): os.fsencode(v) for k, v in worker_environ().items()}
    environ[b"CHIFFON_REPLY_QUEUE"] = b"caf\xe9"

    done = run_worker(tmp_path, environ)

    assert_refused_in_one_line(done, "CHIFFON_REPLY_QUEUE")


def test_non_utf8_env_file_stops_the_command_with_one_line(tmp_path: Path) -> None:
    env_file = tmp_path / "worker.env"
    env_file.write_bytes(b"CHIFFON_LOG_LEVEL=\xff\xfe\n")

    done = run_worker(tmp_path, worker_environ(), "--env-file", str(env_file))

    assert_refused_in_one_line(done, "CHIFFON_LOG_LEVEL")


def test_tls_file_that_is_not_pem_stops_the_command_at_start(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    environ = worker_environ(
        CHIFFON_AMQP_URL="amqps://127.0.0.1:1/%2F", CHIFFON_TLS_CA_FILE=str(not_pem)
    )

    done = run_worker(tmp_path, environ)

    assert_refused_in_one_line(done, "CHIFFON_TLS_CA_FILE")
