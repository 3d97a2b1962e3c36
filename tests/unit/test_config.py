"""Settings: documented defaults, the four sources and their order, errors that name the setting."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from chiffon_worker.config import (
    Settings,
    load_settings,
    read_env_file,
    redact_url,
    split_urls,
    unknown_variables,
    url_password,
)
from chiffon_worker.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def config_error(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(**kwargs)  # type: ignore[arg-type]
    return str(caught.value)


def test_defaults_are_the_documented_ones() -> None:
    settings = load_settings(environ={})

    assert settings.amqp_url == "amqp://guest:guest@localhost:5672/%2F"
    assert settings.agent_type == "infra"
    assert settings.heartbeat_interval == 60
    assert settings.prefetch == 1
    assert settings.ack_mode == "early"
    assert settings.shutdown_timeout == 30
    assert settings.idempotency_ttl == 300
    assert settings.idempotency_size == 1000
    assert settings.log_format == "json"
    assert settings.worker == "chiffon_worker.echo:EchoWorker"
    assert settings.work_queue == "work_queue"
    assert settings.reply_queue == "reply_queue"


def test_later_sources_win_defaults_env_file_environ_overrides(tmp_path: Path) -> None:
    env_file = write(
        tmp_path / "worker.env",
        "CHIFFON_PREFETCH=2\nCHIFFON_WORK_QUEUE=from_file\nCHIFFON_REPLY_QUEUE=from_file\n",
    )

    settings = load_settings(
        env_file=env_file,
        environ={"CHIFFON_PREFETCH": "3", "CHIFFON_WORK_QUEUE": "from_environ"},
        overrides={"prefetch": "4"},
    )

    assert settings.prefetch == 4  # flag over environ over file
    assert settings.work_queue == "from_environ"  # environ over file
    assert settings.reply_queue == "from_file"  # file over default
    assert settings.ack_mode == "early"  # untouched default


def test_flag_not_given_leaves_the_environment_value() -> None:
    settings = load_settings(environ={"CHIFFON_PREFETCH": "7"}, overrides={"prefetch": None})

    assert settings.prefetch == 7


def test_empty_value_means_the_default(tmp_path: Path) -> None:
    env_file = write(tmp_path / "worker.env", "CHIFFON_PREFETCH=\n")

    assert load_settings(env_file=env_file, environ={}).prefetch == 1


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHIFFON_ACK_MODE", "sometimes"),
        ("CHIFFON_PREFETCH", "0"),
        ("CHIFFON_PREFETCH", "many"),
        ("CHIFFON_HEARTBEAT_INTERVAL", "-5"),
        ("CHIFFON_HEARTBEAT_INTERVAL", "soon"),
        ("CHIFFON_AGENT_TYPE", "janitor"),
        ("CHIFFON_LOG_FORMAT", "xml"),
        ("CHIFFON_WORKER", "not a spec"),
        ("CHIFFON_WORKER", "module.only"),
        ("CHIFFON_WORKER", "my-module:Worker"),
        ("CHIFFON_WORKER", "pkg..mod:Worker"),
        ("CHIFFON_WORKER", "pkg.mod:Work.er"),
    ],
)
def test_bad_value_error_starts_with_the_variable_name(variable: str, value: str) -> None:
    message = config_error(environ={variable: value})

    assert message.startswith(f"{variable}:")


def test_bad_flag_value_names_the_variable_too() -> None:
    message = config_error(environ={}, overrides={"ack_mode": "sometimes"})

    assert message.startswith("CHIFFON_ACK_MODE:")


def test_bad_amqp_url_error_hides_the_password() -> None:
    message = config_error(environ={"CHIFFON_AMQP_URL": "http://user:s3cr3tpw@broker/"})

    assert message.startswith("CHIFFON_AMQP_URL:")
    assert "s3cr3tpw" not in message


@pytest.mark.parametrize("port", ["notaport", "99999"])
def test_amqp_url_with_bad_port_is_a_config_error(port: str) -> None:
    message = config_error(environ={"CHIFFON_AMQP_URL": f"amqp://user:s3cr3tpw@broker:{port}/"})

    assert message.startswith("CHIFFON_AMQP_URL:")
    assert "s3cr3tpw" not in message


def test_env_file_skips_comments_strips_quotes_and_export(tmp_path: Path) -> None:
    env_file = write(
        tmp_path / "worker.env",
        "# a comment\n"
        "; another comment\n"
        "\n"
        "export CHIFFON_WORK_QUEUE=exported\n"
        'CHIFFON_REPLY_QUEUE="double quoted"\n'
        "CHIFFON_AGENT_TYPE='code'\n"
        "  CHIFFON_LOG_LEVEL = debug  \n",
    )

    assert read_env_file(env_file) == {
        "CHIFFON_WORK_QUEUE": "exported",
        "CHIFFON_REPLY_QUEUE": "double quoted",
        "CHIFFON_AGENT_TYPE": "code",
        "CHIFFON_LOG_LEVEL": "debug",
    }


def test_env_file_values_reach_the_settings(tmp_path: Path) -> None:
    env_file = write(
        tmp_path / "worker.env", "CHIFFON_AGENT_TYPE='code'\nCHIFFON_LOG_LEVEL=debug\n"
    )

    settings = load_settings(env_file=env_file, environ={})

    assert (settings.agent_type, settings.log_level) == ("code", "DEBUG")


def test_malformed_env_file_line_is_named(tmp_path: Path) -> None:
    env_file = write(tmp_path / "worker.env", "# ok\nCHIFFON_PREFETCH=2\nthis is not a pair\n")

    message = config_error(env_file=env_file, environ={})

    assert "line 3" in message
    assert str(env_file) in message


def test_missing_env_file_is_a_config_error(tmp_path: Path) -> None:
    message = config_error(env_file=tmp_path / "absent.env", environ={})

    assert message.startswith("--env-file:")


def test_password_file_replaces_the_url_password(tmp_path: Path) -> None:
    password_file = write(tmp_path / "pw", "from-file\n")

    settings = load_settings(
        environ={
            "CHIFFON_AMQP_URL": "amqp://app:in-url@node1:5672/%2F, amqp://app@node2/prod",
            "CHIFFON_AMQP_PASSWORD_FILE": str(password_file),
        }
    )

    assert settings.broker_urls() == [
        "amqp://app:from-file@node1:5672/%2F",
        "amqp://app:from-file@node2/prod",
    ]


def test_password_file_with_url_special_characters_is_quoted(tmp_path: Path) -> None:
    password_file = write(tmp_path / "pw", "p@ss/w:rd%\n")

    settings = load_settings(
        environ={
            "CHIFFON_AMQP_URL": "amqp://app@node1/",
            "CHIFFON_AMQP_PASSWORD_FILE": str(password_file),
        }
    )

    assert url_password(settings.broker_urls()[0]) == "p@ss/w:rd%"


def test_password_file_keeps_an_ipv6_broker_address(tmp_path: Path) -> None:
    password_file = write(tmp_path / "pw", "from-file\n")

    settings = load_settings(
        environ={
            "CHIFFON_AMQP_URL": "amqp://app@[::1]:5672/%2F",
            "CHIFFON_AMQP_PASSWORD_FILE": str(password_file),
        }
    )

    assert settings.broker_urls() == ["amqp://app:from-file@[::1]:5672/%2F"]


def test_password_file_content_is_a_secret(tmp_path: Path) -> None:
    password_file = write(tmp_path / "pw", "from-file\n")

    settings = load_settings(
        environ={
            "CHIFFON_AMQP_URL": "amqp://app:in-url@node1/",
            "CHIFFON_AMQP_PASSWORD_FILE": str(password_file),
        }
    )

    assert set(settings.secrets()) == {"in-url", "from-file"}


def test_unreadable_password_file_names_the_variable(tmp_path: Path) -> None:
    message = config_error(environ={"CHIFFON_AMQP_PASSWORD_FILE": str(tmp_path / "absent")})

    assert message.startswith("CHIFFON_AMQP_PASSWORD_FILE:")


def test_systemd_credential_is_used_as_password_file(tmp_path: Path) -> None:
    write(tmp_path / "amqp-password", "from-credential\n")

    settings = load_settings(
        environ={"CREDENTIALS_DIRECTORY": str(tmp_path), "CHIFFON_AMQP_URL": "amqp://app@node1/"}
    )

    assert settings.broker_urls() == ["amqp://app:from-credential@node1/"]
    assert "from-credential" in settings.secrets()


def test_explicit_password_file_wins_over_systemd_credential(tmp_path: Path) -> None:
    write(tmp_path / "amqp-password", "from-credential\n")
    explicit = write(tmp_path / "explicit", "explicit\n")

    settings = load_settings(
        environ={
            "CREDENTIALS_DIRECTORY": str(tmp_path),
            "CHIFFON_AMQP_PASSWORD_FILE": str(explicit),
            "CHIFFON_AMQP_URL": "amqp://app@node1/",
        }
    )

    assert settings.broker_urls() == ["amqp://app:explicit@node1/"]


def test_redact_url_hides_the_password() -> None:
    redacted = redact_url("amqp://app:hunter2@node1:5672/%2F")

    assert redacted == "amqp://app:***@node1:5672/%2F"


def test_redact_url_leaves_a_url_without_password_alone() -> None:
    assert redact_url("amqp://node1:5672/%2F") == "amqp://node1:5672/%2F"


def test_split_urls_splits_a_comma_separated_list() -> None:
    assert split_urls(" amqp://a/ ,amqps://b:5671/,, ") == ["amqp://a/", "amqps://b:5671/"]


def test_derived_agent_id_is_stable_across_calls_and_instances() -> None:
    first = Settings(agent_type="code").resolved_agent_id()

    assert Settings(agent_type="code").resolved_agent_id() == first
    assert Settings(agent_type="research").resolved_agent_id() != first


def test_configured_agent_id_is_used() -> None:
    configured = uuid.uuid4()

    settings = load_settings(environ={"CHIFFON_AGENT_ID": str(configured)})

    assert settings.resolved_agent_id() == configured


def test_unknown_variables_lists_only_unknown_chiffon_names() -> None:
    environ = {"CHIFFON_TYPO": "1", "CHIFFON_PREFETCH": "2", "PATH": "/bin"}

    assert unknown_variables(environ) == ["CHIFFON_TYPO"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHIFFON_HEARTBEAT_INTERVAL", "1e-6"),
        ("CHIFFON_HEARTBEAT_INTERVAL", "inf"),
        ("CHIFFON_BLOCKED_CONNECTION_TIMEOUT", "inf"),
        ("CHIFFON_SHUTDOWN_TIMEOUT", "inf"),
        ("CHIFFON_IDEMPOTENCY_TTL", "nan"),
        ("CHIFFON_DEFAULT_MAX_DURATION", "1e400"),
    ],
)
def test_absurd_durations_are_refused_naming_the_setting(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(environ={variable: value})
