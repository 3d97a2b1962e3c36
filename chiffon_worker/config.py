"""One settings model for the worker, and loading it from its four sources.

Precedence, later wins: defaults < env file < CHIFFON_* variables < flags.
A bad value becomes a ConfigError whose message names the setting.
"""

from __future__ import annotations

import os
import socket
import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chiffon_worker.errors import ConfigError
from chiffon_worker.protocol import AgentType

ENV_PREFIX = "CHIFFON_"
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_WORKER = "chiffon_worker.echo:EchoWorker"
# systemd's LoadCredential puts secrets here; the name is the credential id.
CREDENTIAL_NAME = "amqp-password"


@dataclass(frozen=True)
class TlsFiles:
    """Where the CA bundle and our client certificate live, for amqps:// URLs."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        # Peer verification is always on; only the host name check may be relaxed
        # (for brokers reached by IP whose certificate names a host).
        context = ssl.create_default_context(cafile=self.ca_file)
        context.check_hostname = self.verify_hostname
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


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
    work_queue: str = Field(default="work_queue", min_length=1, max_length=255)
    reply_queue: str = Field(default="reply_queue", min_length=1, max_length=255)
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    max_result_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    default_max_duration: float | None = Field(default=None, gt=0, le=7 * 86400)

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
                f"CHIFFON_AMQP_PASSWORD_FILE: cannot read {path}: {exc.strerror}"
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
            if path is not None and not path.is_file():
                raise ConfigError(f"CHIFFON_{name.upper()}: {path} is not a readable file")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ConfigError("CHIFFON_TLS_KEY_FILE: set CHIFFON_TLS_CERT_FILE too")
        return TlsFiles(
            ca_file=str(self.tls_ca_file) if self.tls_ca_file else None,
            cert_file=str(self.tls_cert_file) if self.tls_cert_file else None,
            key_file=str(self.tls_key_file) if self.tls_key_file else None,
            verify_hostname=self.tls_verify_hostname,
        )

    def resolved_agent_id(self) -> uuid.UUID:
        """A stable id: configured, else derived from host, agent type and queue."""
        if self.agent_id is not None:
            return self.agent_id
        name = f"chiffon-worker/{socket.getfqdn()}/{self.agent_type}/{self.work_queue}"
        return uuid.uuid5(uuid.NAMESPACE_DNS, name)


def split_urls(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


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
    """Parse a systemd-style EnvironmentFile: KEY=VALUE lines, # comments, optional quotes."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--env-file: cannot read {path}: {exc.strerror}") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        line = line.removeprefix("export ")
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--env-file: {path} line {number} is not KEY=VALUE")
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
    name = str(first["loc"][0]) if first["loc"] else "setting"
    value = first.get("input")
    shown = "" if name in ("amqp_url",) or isinstance(value, dict) else f" (got {value!r})"
    return f"{ENV_PREFIX}{name.upper()}: {first['msg']}{shown}"


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
    return settings


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """CHIFFON_* names we do not know: most likely typos worth a warning."""
    fields = Settings.model_fields
    return sorted(
        key
        for key in environ
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() not in fields
    )
