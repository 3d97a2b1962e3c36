"""Settings: documented defaults, the four sources and their order, errors that name the setting."""

from __future__ import annotations

import ssl
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
from tests.helpers.tls_node import Pki, make_pki


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


BROKER = "amqp://app:s3cr3tpw@127.0.0.1:1/%2F"


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("heartbeat=abc", "heartbeat"),
        ("heartbeat=-1", "heartbeat"),
        ("heartbeat=", "heartbeat"),
        ("heartbeat=5&heartbeat=6", "heartbeat"),
        ("bogus_option=1", "bogus_option"),
        ("backpressure_detection=t", "backpressure_detection"),
        ("channel_max=0", "channel_max"),
        ("channel_max=65536", "channel_max"),
        ("frame_max=1", "frame_max"),
        ("socket_timeout=inf", "socket_timeout"),
        ("stack_timeout=nan", "stack_timeout"),
        ("blocked_connection_timeout=1e400", "blocked_connection_timeout"),
        ("connection_attempts=0", "connection_attempts"),
        ("retry_delay=-1", "retry_delay"),
        ("client_properties=nonsense", "client_properties"),
        ("client_properties={'a': {1}}", "client_properties"),
        ("tcp_options={'TCP_KEEPIDLE': 0}", "tcp_options"),
        ("tcp_options={'SO_NONSENSE': 1}", "tcp_options"),
        ("ssl_options={'cafile': '/etc/ca.pem'}", "ssl_options"),
    ],
)
def test_url_option_pika_would_raise_on_is_refused_naming_it(query: str, named: str) -> None:
    message = config_error(environ={"CHIFFON_AMQP_URL": f"{BROKER}?{query}"})

    assert message.startswith("CHIFFON_AMQP_URL:")
    assert named in message
    assert "s3cr3tpw" not in message


def test_url_options_in_range_are_accepted_and_pika_takes_them() -> None:
    from chiffon_worker.amqp import connection_parameters

    url = (
        f"{BROKER}?heartbeat=10&channel_max=100&frame_max=131072&socket_timeout=5"
        "&stack_timeout=15&blocked_connection_timeout=30&locale=en_US&connection_attempts=3"
        "&retry_delay=1&tcp_options={'TCP_KEEPIDLE': 60}&client_properties={'name': 'w1'}"
    )

    settings = load_settings(environ={"CHIFFON_AMQP_URL": url})
    params = connection_parameters(settings.broker_urls()[0], 30, 60.0)

    assert (params.heartbeat, params.channel_max, params.frame_max) == (10, 100, 131072)


def test_url_user_without_a_password_is_refused_unless_a_password_file_gives_one(
    tmp_path: Path,
) -> None:
    message = config_error(environ={"CHIFFON_AMQP_URL": "amqp://app@127.0.0.1/"})
    password_file = write(tmp_path / "pw", "from-file\n")

    assert message.startswith("CHIFFON_AMQP_URL:")
    assert "CHIFFON_AMQP_PASSWORD_FILE" in message
    load_settings(
        environ={
            "CHIFFON_AMQP_URL": "amqp://app@127.0.0.1/",
            "CHIFFON_AMQP_PASSWORD_FILE": str(password_file),
        }
    )


def test_url_host_name_resolution_cannot_take_is_refused() -> None:
    message = config_error(environ={"CHIFFON_AMQP_URL": f"amqp://{'a' * 64}.example/"})

    assert message.startswith("CHIFFON_AMQP_URL:")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHIFFON_WORK_QUEUE", "é" * 128),  # 128 characters, 256 bytes
        ("CHIFFON_REPLY_QUEUE", "q" * 256),
        ("CHIFFON_WORK_QUEUE", "amq.work"),
        ("CHIFFON_REPLY_QUEUE", "amq.gen-reply"),
        ("CHIFFON_WORK_QUEUE", "dlx_queue"),
        ("CHIFFON_REPLY_QUEUE", "chiffon.control.mine"),
        ("CHIFFON_WORK_QUEUE", "reply_queue"),
    ],
)
def test_queue_name_the_broker_or_protocol_refuses_is_a_config_error(
    variable: str, value: str
) -> None:
    message = config_error(environ={variable: value})

    assert message.startswith(f"{variable}:")


def test_queue_name_of_255_utf8_bytes_is_accepted() -> None:
    settings = load_settings(environ={"CHIFFON_WORK_QUEUE": "é" * 127 + "q"})

    assert len(settings.work_queue.encode("utf-8")) == 255


def test_max_result_bytes_above_the_brokers_message_limit_is_refused() -> None:
    at_limit = load_settings(environ={"CHIFFON_MAX_RESULT_BYTES": str(128 * 1024 * 1024)})

    message = config_error(environ={"CHIFFON_MAX_RESULT_BYTES": str(128 * 1024 * 1024 + 1)})

    assert at_limit.max_result_bytes == 134217728
    assert message.startswith("CHIFFON_MAX_RESULT_BYTES:")


@pytest.mark.parametrize("value", ["a" * 64, "bad host", "-", "host:9000"])
def test_metrics_host_that_cannot_be_bound_is_refused(value: str) -> None:
    message = config_error(environ={"CHIFFON_METRICS_HOST": value})

    assert message.startswith("CHIFFON_METRICS_HOST:")


@pytest.mark.parametrize("value", ["0.0.0.0", "::", "localhost", "metrics-1.example.org"])
def test_metrics_host_address_or_name_is_accepted(value: str) -> None:
    assert load_settings(environ={"CHIFFON_METRICS_HOST": value}).metrics_host == value


def test_env_file_value_that_is_not_utf8_names_its_setting(tmp_path: Path) -> None:
    env_file = tmp_path / "worker.env"
    env_file.write_bytes(b"# caf\xe9 comments are harmless\nCHIFFON_WORK_QUEUE=caf\xe9\n")

    message = config_error(env_file=env_file, environ={})

    assert message.startswith("CHIFFON_WORK_QUEUE: the value is not UTF-8 text")


def test_nul_character_in_a_value_is_refused_naming_the_setting() -> None:
    message = config_error(environ={"CHIFFON_TLS_CA_FILE": "/etc/ca\x00.pem"})

    assert message.startswith("CHIFFON_TLS_CA_FILE:")


def test_error_message_is_one_line_even_for_a_path_with_a_line_break(tmp_path: Path) -> None:
    message = config_error(environ={"CHIFFON_TLS_CA_FILE": str(tmp_path / "a\nb")})

    assert message.startswith("CHIFFON_TLS_CA_FILE:")
    assert "\n" not in message


def test_password_file_that_is_not_utf8_names_the_setting(tmp_path: Path) -> None:
    password_file = tmp_path / "pw"
    password_file.write_bytes(b"caf\xe9\n")

    message = config_error(environ={"CHIFFON_AMQP_PASSWORD_FILE": str(password_file)})

    assert message.startswith("CHIFFON_AMQP_PASSWORD_FILE:")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize(
    "variable", ["CHIFFON_TLS_CA_FILE", "CHIFFON_TLS_CERT_FILE", "CHIFFON_TLS_KEY_FILE"]
)
def test_tls_file_that_is_not_pem_is_refused_at_start_naming_it(
    tmp_path: Path, pki: Pki, variable: str
) -> None:
    garbage = write(tmp_path / "garbage.pem", "this is not PEM\n")
    environ = {
        "CHIFFON_AMQP_URL": "amqps://app:pw@127.0.0.1:1/",
        "CHIFFON_TLS_CA_FILE": str(pki.ca),
        "CHIFFON_TLS_CERT_FILE": str(pki.client_cert),
        "CHIFFON_TLS_KEY_FILE": str(pki.client_key),
    }
    environ[variable] = str(garbage)

    message = config_error(environ=environ)

    assert message.startswith(f"{variable}:")


def test_client_key_of_another_certificate_names_the_key_file(pki: Pki) -> None:
    message = config_error(
        environ={
            "CHIFFON_TLS_CERT_FILE": str(pki.client_cert),
            "CHIFFON_TLS_KEY_FILE": str(pki.other_client_key),
        }
    )

    assert message.startswith("CHIFFON_TLS_KEY_FILE:")


def test_certificate_without_its_key_names_the_cert_file(pki: Pki) -> None:
    message = config_error(environ={"CHIFFON_TLS_CERT_FILE": str(pki.client_cert)})

    assert message.startswith("CHIFFON_TLS_CERT_FILE:")


def test_pem_tls_files_load(pki: Pki) -> None:
    settings = load_settings(
        environ={
            "CHIFFON_TLS_CA_FILE": str(pki.ca),
            "CHIFFON_TLS_CERT_FILE": str(pki.client_cert),
            "CHIFFON_TLS_KEY_FILE": str(pki.client_key),
        }
    )

    assert settings.tls_files().context().verify_mode == ssl.CERT_REQUIRED


def test_every_setting_has_a_row_in_the_readme_table() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = {line.split("|")[1] for line in readme.splitlines() if line.startswith("| `CHIFFON_")}
    documented = " ".join(rows)
    missing = [
        f"CHIFFON_{name.upper()}"
        for name in Settings.model_fields
        if f"`CHIFFON_{name.upper()}`" not in documented
    ]
    assert not missing, f"settings without a README row: {missing}"
