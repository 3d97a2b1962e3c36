"""One settings model for the worker, and loading it from its four sources.

Precedence, later wins: defaults < env file < CHIFFON_* variables < flags.
A bad value becomes a ConfigError whose message names the setting.
"""

from __future__ import annotations

import ast
import ipaddress
import math
import os
import socket
import ssl
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from chiffon_worker.errors import ConfigError
from chiffon_worker.protocol import AgentType
from chiffon_worker.topology import CONTROL_QUEUE_PREFIX, DLX_QUEUE

ENV_PREFIX = "CHIFFON_"
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_WORKER = "chiffon_worker.echo:EchoWorker"
# systemd's LoadCredential puts secrets here; the name is the credential id.
CREDENTIAL_NAME = "amqp-password"
# RabbitMQ's default max_message_size: a larger message closes our channel.
BROKER_MAX_MESSAGE_BYTES = 128 * 1024 * 1024
# The broker refuses longer queue names (AMQP short strings).
MAX_QUEUE_NAME_BYTES = 255


@dataclass(frozen=True)
class TlsFiles:
    """Where the CA bundle and our client certificate live, for amqps:// URLs."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        """The client TLS context; a file that does not load is a ConfigError naming it."""
        # Peer verification is always on; only the host name check may be relaxed
        # (for brokers reached by IP whose certificate names a host).
        context = ssl.create_default_context()
        context.check_hostname = self.verify_hostname
        if self.ca_file:
            with _tls_file("CHIFFON_TLS_CA_FILE", self.ca_file, "PEM CA certificates"):
                context.load_verify_locations(cafile=self.ca_file)
        if self.cert_file:
            with _tls_file("CHIFFON_TLS_CERT_FILE", self.cert_file, "a PEM certificate"):
                # A scratch context: this only proves the file holds a certificate.
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=self.cert_file)
            setting, what = (
                ("CHIFFON_TLS_KEY_FILE", "a PEM private key matching CHIFFON_TLS_CERT_FILE")
                if self.key_file
                else ("CHIFFON_TLS_CERT_FILE", "its private key (or set CHIFFON_TLS_KEY_FILE)")
            )
            with _tls_file(setting, self.key_file or self.cert_file, what):
                # An empty password: an encrypted key fails here instead of
                # OpenSSL prompting on a terminal that a service does not have.
                context.load_cert_chain(self.cert_file, self.key_file, password=b"")
        return context


@contextmanager
def _tls_file(setting: str, path: str, holds: str) -> Iterator[None]:
    """Turn a TLS file that does not load into a ConfigError naming its setting."""
    try:
        yield
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ConfigError(f"{setting}: {shown(path)} does not hold {holds} ({reason})") from None


class Settings(BaseModel):
    """Every setting of the worker, each with a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amqp_url: str = DEFAULT_AMQP_URL
    amqp_password_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_verify_hostname: bool = True
    amqp_heartbeat: int = Field(default=30, ge=0, le=3600)
    # Every duration has a sane range: 1e-6 s of heartbeat is a busy loop, and
    # inf overflows the thread waits (or makes a freeze unbounded).
    blocked_connection_timeout: float = Field(default=60.0, ge=1, le=3600)
    reconnect_max_delay: float = Field(default=4.0, ge=0.5, le=300)
    agent_type: AgentType = "infra"
    agent_id: uuid.UUID | None = None
    heartbeat_interval: float = Field(default=60.0, ge=0.1, le=86400)
    prefetch: int = Field(default=1, ge=1, le=1000)
    ack_mode: Literal["early", "late"] = "early"
    shutdown_timeout: float = Field(default=30.0, ge=0, le=86400)
    idempotency_ttl: float = Field(default=300.0, ge=1, le=7 * 86400)
    idempotency_size: int = Field(default=1000, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    worker: str = DEFAULT_WORKER
    work_queue: str = "work_queue"
    reply_queue: str = "reply_queue"
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    # Above the broker's message size limit a result would close our channel.
    max_result_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=BROKER_MAX_MESSAGE_BYTES)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    default_max_duration: float | None = Field(default=None, gt=0, le=7 * 86400)
    # false: the operator owns the queues and exchanges (quorum, policies):
    # the worker declares nothing and checks passively that they exist.
    declare_topology: bool = True
    # Child processes (process.run_process): SIGTERM to the group, this long,
    # then SIGKILL to the whole tree.
    kill_grace: float = Field(default=10.0, ge=0, le=3600)
    # PlaybookWorker: playbooks (and inventories) are file names under this dir.
    playbook_dir: Path = Path("/etc/chiffon-worker/playbooks")
    # extra_vars keys starting with ansible_ change how Ansible connects: refused unless true.
    playbook_allow_ansible_vars: bool = False

    @field_validator("*", mode="before")
    @classmethod
    def _text_is_utf8(cls, value: Any, info: ValidationInfo) -> Any:
        # Environment values arrive with undecodable bytes as surrogates; they
        # cannot go on the wire. A path may hold them (the file system allows it).
        if isinstance(value, str):
            if "\x00" in value:
                raise ValueError("the value contains a NUL character")
            if info.field_name not in _PATH_FIELDS and not _is_utf8(value):
                raise ValueError("the value is not UTF-8 text")
        return value

    @field_validator("work_queue", "reply_queue")
    @classmethod
    def _queue_name_the_broker_accepts(cls, value: str) -> str:
        if not value:
            raise ValueError("a queue name cannot be empty")
        if len(value.encode("utf-8")) > MAX_QUEUE_NAME_BYTES:
            raise ValueError(f"a queue name is at most {MAX_QUEUE_NAME_BYTES} bytes in UTF-8")
        if value.startswith("amq."):
            raise ValueError("queue names starting with 'amq.' are reserved by the broker")
        if value == DLX_QUEUE or value.startswith(CONTROL_QUEUE_PREFIX):
            raise ValueError(
                f"{DLX_QUEUE!r} and names starting with {CONTROL_QUEUE_PREFIX!r} "
                "are the protocol's own queues"
            )
        return value

    @field_validator("metrics_host")
    @classmethod
    def _ip_or_host_name(cls, value: str) -> str:
        if not _is_host(value):
            raise ValueError("expected an IP address or a host name")
        return value

    @model_validator(mode="after")
    def _settings_agree(self) -> Settings:
        if self.work_queue == self.reply_queue:
            raise ValueError(
                f"CHIFFON_WORK_QUEUE: must differ from CHIFFON_REPLY_QUEUE "
                f"(both are {self.work_queue!r})"
            )
        if self.amqp_password_file is None:
            for url in split_urls(self.amqp_url):
                parts = urlsplit(url)
                if parts.username is not None and parts.password is None:
                    raise ValueError(
                        f"CHIFFON_AMQP_URL: user {shown(parts.username)} has no password: "
                        "put it in the URL or set CHIFFON_AMQP_PASSWORD_FILE"
                    )
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("worker")
    @classmethod
    def _module_colon_class(cls, value: str) -> str:
        # Checked here, not with a `pattern`: pydantic-core compiles Unicode
        # \w into a 2 MiB automaton that every worker would carry.
        module, _, name = value.partition(":")
        if not (name.isidentifier() and all(part.isidentifier() for part in module.split("."))):
            raise ValueError("expected module.path:ClassName, e.g. chiffon_worker.echo:EchoWorker")
        return value

    @field_validator("amqp_url")
    @classmethod
    def _urls_look_like_amqp(cls, value: str) -> str:
        for url in split_urls(value):
            parts = urlsplit(url)
            if parts.scheme not in ("amqp", "amqps"):
                raise ValueError("each URL must start with amqp:// or amqps://")
            try:
                parts.port  # noqa: B018 - urlsplit checks the port only when asked
            except ValueError:
                raise ValueError("the port must be a number from 0 to 65535") from None
            if parts.hostname is not None and not _is_host(parts.hostname, idna=True):
                raise ValueError(f"{shown(parts.hostname)} is not an IP address or host name")
            check_url_options(parts.query)
        if not split_urls(value):
            raise ValueError("no broker URL given")
        return value

    def broker_urls(self) -> list[str]:
        """The node URLs to try in turn, with the password from a file where one is set."""
        password = self.broker_password()
        urls = split_urls(self.amqp_url)
        if password is None:
            return urls
        return [with_password(url, password) for url in urls]

    def broker_password(self) -> str | None:
        path = self.amqp_password_file
        if path is None:
            return None
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"CHIFFON_AMQP_PASSWORD_FILE: cannot read {shown(path)}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(
                f"CHIFFON_AMQP_PASSWORD_FILE: {shown(path)} is not UTF-8 text"
            ) from None

    def secrets(self) -> list[str]:
        """Strings that must never reach a log line."""
        found = [p for p in (url_password(u) for u in split_urls(self.amqp_url)) if p]
        from_file = self.broker_password()
        if from_file:
            found.append(from_file)
        return found

    def tls_files(self) -> TlsFiles:
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path is not None and not _is_file(path):
                raise ConfigError(f"CHIFFON_{name.upper()}: {shown(path)} is not a readable file")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ConfigError("CHIFFON_TLS_KEY_FILE: set CHIFFON_TLS_CERT_FILE too")
        files = TlsFiles(
            ca_file=str(self.tls_ca_file) if self.tls_ca_file else None,
            cert_file=str(self.tls_cert_file) if self.tls_cert_file else None,
            key_file=str(self.tls_key_file) if self.tls_key_file else None,
            verify_hostname=self.tls_verify_hostname,
        )
        if files.ca_file or files.cert_file:
            # Loaded once now: a file that is not PEM is a configuration error
            # at start, not a connect failure retried for ever.
            files.context()
        return files

    def resolved_agent_id(self) -> uuid.UUID:
        """A stable id: configured, else derived from host, agent type and queue."""
        if self.agent_id is not None:
            return self.agent_id
        name = f"chiffon-worker/{socket.getfqdn()}/{self.agent_type}/{self.work_queue}"
        return uuid.uuid5(uuid.NAMESPACE_DNS, name)


def shown(value: object, limit: int = 100) -> str:
    """A value as an error message may quote it: on one line, not too long."""
    text = repr(str(value)) if isinstance(value, Path) else repr(value)
    return text if len(text) <= limit else f"{text[: limit - 4]}...{text[-1]}"


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system, say
        return False


def split_urls(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


_PATH_FIELDS = frozenset(
    {"amqp_password_file", "tls_ca_file", "tls_cert_file", "tls_key_file", "playbook_dir"}
)


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_host(value: str, *, idna: bool = False) -> bool:
    """An IP address or a host name that name resolution will take."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    if idna:  # the URL host may be an internationalised name
        try:
            value = value.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    labels = value.rstrip(".").split(".")
    return 0 < len(value) <= 253 and all(
        0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    )


def _int_in(low: int, high: int) -> Callable[[str], object]:
    def check(text: str) -> object:
        try:
            number = int(text)
        except ValueError:
            number = low - 1
        if not low <= number <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return number

    return check


def _seconds_in(low: float, high: float) -> Callable[[str], object]:
    def check(text: str) -> object:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and low <= number <= high):
            raise ValueError(f"must be a number of seconds from {low:g} to {high:g}")
        return number

    return check


def _literal_dict(check_item: Callable[[Any, Any], bool], what: str) -> Callable[[str], object]:
    def check(text: str) -> object:
        try:
            value = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(f"must be a Python dict literal of {what}") from None
        if not (isinstance(value, dict) and all(check_item(k, v) for k, v in value.items())):
            raise ValueError(f"must be a Python dict literal of {what}")
        return value

    return check


# What an AMQP table can carry (pika encodes client_properties as one).
def _amqp_field(key: Any, value: Any, depth: int = 0) -> bool:
    if not (isinstance(key, str) and _is_utf8(key) and len(key.encode("utf-8")) <= 255):
        return False
    if depth > 10:
        return False
    if isinstance(value, dict):
        return all(_amqp_field(k, v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_amqp_field("", v, depth + 1) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**63
    return (
        value is None
        or isinstance(value, bool | bytes)
        or (isinstance(value, str) and _is_utf8(value))
    )


# Linux's limits for the socket options pika sets from tcp_options.
_TCP_OPTION_RANGES = {
    "TCP_KEEPIDLE": (1, 32767),
    "TCP_KEEPINTVL": (1, 32767),
    "TCP_KEEPCNT": (1, 127),
    "TCP_USER_TIMEOUT": (0, 2**31 - 1),
}


def _tcp_option(key: Any, value: Any) -> bool:
    low, high = _TCP_OPTION_RANGES.get(key, (1, 0))
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _ssl_options_refused(_text: str) -> object:
    # pika would build a context from it, and connection_parameters replaces
    # that context with ours: whatever it said would be silently ignored.
    raise ValueError(
        "is not used: set CHIFFON_TLS_CA_FILE, CHIFFON_TLS_CERT_FILE and CHIFFON_TLS_KEY_FILE"
    )


# Every query option pika's URLParameters takes (1.4 dropped backpressure_detection),
# with the values it can use.
URL_OPTIONS: dict[str, Callable[[str], object]] = {
    "blocked_connection_timeout": _seconds_in(1, 3600),
    "channel_max": _int_in(1, 65535),
    "client_properties": _literal_dict(_amqp_field, "AMQP field values"),
    "connection_attempts": _int_in(1, 1000),
    "frame_max": _int_in(4096, 2**31 - 1),
    "heartbeat": _int_in(0, 3600),
    "locale": lambda text: text,
    "retry_delay": _seconds_in(0, 300),
    "socket_timeout": _seconds_in(0.1, 3600),
    "ssl_options": _ssl_options_refused,
    "stack_timeout": _seconds_in(0.1, 3600),
    "tcp_options": _literal_dict(_tcp_option, ", ".join(_TCP_OPTION_RANGES) + " within range"),
}


def check_url_options(query: str) -> None:
    """Refuse a URL query that pika would raise on (or silently misuse) at connect time."""
    for name, values in parse_qs(query, keep_blank_values=True).items():
        check = URL_OPTIONS.get(name)
        if check is None:
            raise ValueError(f"unknown URL option {shown(name)}; known: {', '.join(URL_OPTIONS)}")
        if len(values) != 1:
            raise ValueError(f"URL option {name!r} is given {len(values)} times")
        if not values[0]:
            raise ValueError(f"URL option {name!r} has no value")
        try:
            check(values[0])
        except ValueError as exc:
            raise ValueError(f"URL option {name}={shown(values[0])} {exc}") from None


def url_password(url: str) -> str | None:
    password = urlsplit(url).password
    return unquote(password) if password else None


def _with_userinfo(url: str, password: str, *, quoted: bool) -> str:
    parts = urlsplit(url)
    # Keep the host:port text as written, so an IPv6 "[::1]" keeps its brackets.
    host_port = parts.netloc.rpartition("@")[2]
    user = parts.username or "guest"
    secret = quote(password, safe="") if quoted else password
    netloc = f"{user}:{secret}@{host_port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def with_password(url: str, password: str) -> str:
    return _with_userinfo(url, password, quoted=True)


def redact_url(url: str) -> str:
    """The URL as it may appear in a log: password replaced by ***."""
    if urlsplit(url).password is None:
        return url
    return _with_userinfo(url, "***", quoted=False)


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a systemd-style EnvironmentFile: KEY=VALUE lines, # comments, optional quotes.

    Bytes that are not UTF-8 come through as surrogates, as they do in
    os.environ, so the setting they land in can refuse them by name.
    """
    try:
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as exc:
        raise ConfigError(f"--env-file: cannot read {shown(path)}: {exc.strerror}") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        line = line.removeprefix("export ")
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--env-file: {shown(path)} line {number} is not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    fields = Settings.model_fields
    picked: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in fields:
                picked[name] = value
    return picked


def _credential_password_file(environ: Mapping[str, str]) -> dict[str, str]:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return {}
    candidate = Path(directory) / CREDENTIAL_NAME
    return {"amqp_password_file": str(candidate)} if candidate.is_file() else {}


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:  # a rule across settings names its own
        return message
    name = str(first["loc"][0])
    value = first.get("input")
    got = ""
    if name != "amqp_url" and not isinstance(value, dict):  # the URL may hold a password
        got = f" (got {shown(value, 64)})"
    return f"{ENV_PREFIX}{name.upper()}: {message}{got}"


def load_settings(
    env_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the four sources, later wins, and validate once."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    merged.update(_credential_password_file(environ))
    if env_file is not None:
        merged.update(_from_environment(read_env_file(env_file)))
    merged.update(_from_environment(environ))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    # An empty value in an env file means "use the default", as systemd users expect.
    merged = {k: v for k, v in merged.items() if v != ""}
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    settings.broker_password()  # an unreadable password file is a start-up error
    settings.tls_files()  # so is a TLS file that is missing or not PEM
    return settings


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """CHIFFON_* names we do not know: most likely typos worth a warning."""
    fields = Settings.model_fields
    return sorted(
        key
        for key in environ
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() not in fields
    )
