"""Pydantic models of the Chiffon agent protocol 1.0, and parsing/serialising them.

PROTOCOL.md is the contract: names and value sets here are exactly its own.
Unknown fields are ignored (forward compatibility); nothing else lives here.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, NamedTuple, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import to_json

from chiffon_worker.errors import InvalidMessage

PROTOCOL_VERSION = "1.0"

AgentType = Literal["orchestrator", "infra", "desktop", "code", "research"]
MessageType = Literal["work_request", "work_status", "work_result", "error"]
ResultStatus = Literal["completed", "failed", "cancelled"]
AgentStatus = Literal["online", "offline", "busy"]
ProgressStatus = Literal["running", "step_completed", "paused"]

AGENT_TYPES: tuple[str, ...] = get_args(AgentType)

# Error codes named in PROTOCOL.md.
ERROR_TIMEOUT = 5001
ERROR_AGENT_UNAVAILABLE = 5002
ERROR_INVALID_MESSAGE = 5003
ERROR_AUTH_FAILED = 5004
ERROR_RESOURCE_LIMIT = 5005
ERROR_UNSUPPORTED_WORK_TYPE = 5006

HEARTBEAT_PRIORITY = 4


def utc_now() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    # The protocol says a naive timestamp means UTC.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 9999-12-31T23:59:59-23:59 is a valid ISO 8601 stamp whose UTC time
        # is past year 9999; pydantic turns ValueError, not OverflowError,
        # into a validation error (an InvalidMessage, answered 5003).
        raise ValueError("timestamp is outside the years 1 to 9999 in UTC") from None


# Accepts Z, offsets and naive (read as UTC); always emits UTC with "+00:00".
UtcTimestamp = Annotated[
    datetime,
    AfterValidator(_as_utc),
    PlainSerializer(lambda value: _as_utc(value).isoformat(), return_type=str),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Envelope(_Model):
    """The fields every message carries; `payload` is checked per `type`."""

    protocol_version: str
    message_id: uuid.UUID
    from_agent: AgentType
    to_agent: AgentType
    timestamp: UtcTimestamp
    trace_id: uuid.UUID
    request_id: uuid.UUID
    type: MessageType
    # strict: JSON `true` is not priority 1.
    priority: int = Field(default=3, ge=1, le=5, strict=True)
    payload: dict[str, Any]
    x_custom_fields: dict[str, Any] = Field(default_factory=dict)

    @field_validator("protocol_version")
    @classmethod
    def _known_version(cls, value: str) -> str:
        if value != PROTOCOL_VERSION:
            raise ValueError(
                f"unsupported protocol_version {value!r}, expected {PROTOCOL_VERSION!r}"
            )
        return value


# The hints PROTOCOL.md names, and the largest value a worker accepts for each.
KNOWN_HINT_LIMITS: dict[str, float] = {
    "max_duration_seconds": 7 * 24 * 3600.0,
    "max_memory_mb": 16 * 1024 * 1024.0,
}


class WorkRequest(_Model):
    """Payload of `work_request`: what the orchestrator wants done."""

    task_id: uuid.UUID
    work_type: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    hints: dict[str, Any] = Field(default_factory=dict)

    @field_validator("hints")
    @classmethod
    def _known_hints_are_sane(cls, hints: dict[str, Any]) -> dict[str, Any]:
        """The hints the protocol names must be positive, finite numbers in range.

        Orchestrator input like any other field: `true` is not one second, and
        10**400 must not reach float() (OverflowError) deep in the worker.
        """
        if not hints:
            return hints
        for name, ceiling in KNOWN_HINT_LIMITS.items():
            value = hints.get(name)
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value <= ceiling  # also false for NaN
            ):
                raise ValueError(f"hints.{name} must be a number above 0 and at most {ceiling:g}")
        return hints


class WorkResult(_Model):
    """Payload of `work_result`.

    `agent_id`, `duration_ms`, `trace_id` and `request_id` are stamped by the
    worker before sending, so `execute_work` only fills in what it knows.
    """

    task_id: uuid.UUID
    status: ResultStatus
    exit_code: int = 0
    output: str = ""
    error_message: str | None = None
    duration_ms: int = Field(default=0, ge=0)
    agent_id: uuid.UUID | None = None
    trace_id: uuid.UUID | None = None
    request_id: uuid.UUID | None = None
    resources_used: dict[str, Any] = Field(default_factory=dict)
    analysis_result: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _failed_needs_reason(self) -> WorkResult:
        if self.status == "failed" and not self.error_message:
            raise ValueError("error_message is required when status is 'failed'")
        return self

    @classmethod
    def completed(cls, request: WorkRequest, output: str = "", **fields: Any) -> WorkResult:
        return cls(
            task_id=request.task_id, status="completed", exit_code=0, output=output, **fields
        )

    @classmethod
    def cancelled(cls, request: WorkRequest, reason: str, **fields: Any) -> WorkResult:
        """Ended early on request; exit_code 1 (not a success), the reason in error_message."""
        return cls(
            task_id=request.task_id,
            status="cancelled",
            exit_code=1,
            error_message=f"cancelled: {reason}",
            **fields,
        )

    @classmethod
    def failed(
        cls, request: WorkRequest, error_message: str, exit_code: int = 1, **fields: Any
    ) -> WorkResult:
        return cls(
            task_id=request.task_id,
            status="failed",
            exit_code=exit_code,
            error_message=error_message,
            **fields,
        )


class ProgressStep(_Model):
    number: int = Field(ge=0)
    name: str
    output: str = ""


class WorkStatus(_Model):
    """Payload of `work_status` for progress inside one task."""

    task_id: uuid.UUID
    status: ProgressStatus
    progress_percent: float = Field(ge=0, le=100)
    step: ProgressStep


class StatusUpdate(_Model):
    """Payload of `work_status` for a heartbeat: who we are and how we are."""

    agent_id: uuid.UUID
    agent_type: AgentType
    status: AgentStatus
    current_task_id: uuid.UUID | None = None
    resources: dict[str, Any] = Field(default_factory=dict)
    timestamp: UtcTimestamp = Field(default_factory=utc_now)


class ErrorMessage(_Model):
    """Payload of `error`."""

    error_code: int = Field(ge=1000, le=9999)
    error_message: str
    context: dict[str, Any] = Field(default_factory=dict)


Payload = WorkRequest | WorkResult | WorkStatus | StatusUpdate | ErrorMessage

_TYPE_OF_PAYLOAD: dict[type[BaseModel], str] = {
    WorkRequest: "work_request",
    WorkResult: "work_result",
    WorkStatus: "work_status",
    StatusUpdate: "work_status",
    ErrorMessage: "error",
}


def make_envelope(
    payload: Payload,
    *,
    from_agent: str,
    to_agent: str,
    trace_id: uuid.UUID,
    request_id: uuid.UUID,
    priority: int = 3,
) -> Envelope:
    """Wrap a payload in a fresh envelope (new message_id, now as timestamp)."""
    return Envelope.model_validate(
        {
            "protocol_version": PROTOCOL_VERSION,
            "message_id": uuid.uuid4(),
            "timestamp": utc_now(),
            "from_agent": from_agent,
            "to_agent": to_agent,
            "trace_id": trace_id,
            "request_id": request_id,
            "type": _TYPE_OF_PAYLOAD[type(payload)],
            "priority": priority,
            "payload": payload.model_dump(mode="json"),
        }
    )


def encode(envelope: Envelope) -> bytes:
    return envelope.model_dump_json().encode("utf-8")


class Encoded(NamedTuple):
    body: bytes  # the whole message
    payload_json: bytes  # its payload, as it appears inside `body`


def encode_message(
    payload: Payload,
    *,
    from_agent: str,
    to_agent: str,
    trace_id: uuid.UUID | str,
    request_id: uuid.UUID | str,
    priority: int = 3,
    x_custom_fields: dict[str, Any] | None = None,
) -> Encoded:
    """The bytes of `encode(make_envelope(...))`, for the worker's hot path.

    Our own payload models are valid by construction, so this skips building
    and re-validating an Envelope; pydantic-core serialises directly, three
    to four times faster. A unit test holds the two to the same output.
    """
    payload_json = to_json(payload)
    head = to_json(
        {
            "protocol_version": PROTOCOL_VERSION,
            "message_id": uuid.uuid4(),
            "from_agent": from_agent,
            "to_agent": to_agent,
            "timestamp": utc_now().isoformat(),
            "trace_id": trace_id,
            "request_id": request_id,
            "type": _TYPE_OF_PAYLOAD[type(payload)],
            "priority": priority,
            "x_custom_fields": x_custom_fields or {},
        }
    )
    # `head` is one JSON object: the payload goes in before its closing brace.
    return Encoded(b"".join((head[:-1], b',"payload":', payload_json, b"}")), payload_json)


def _readable_ids(document: object) -> dict[str, str]:
    """The ids of a broken message that are still good enough to answer it."""
    if not isinstance(document, dict):
        return {}
    ids: dict[str, str] = {}
    for key in ("trace_id", "request_id"):
        value = document.get(key)
        try:
            ids[key] = str(uuid.UUID(str(value))) if isinstance(value, str) else ""
        except ValueError:
            ids[key] = ""
    if not ids["trace_id"] or not ids["request_id"]:
        return {}
    sender = document.get("from_agent")
    if isinstance(sender, str) and sender in AGENT_TYPES:
        ids["from_agent"] = sender
    return ids


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "message"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def parse_work_request(body: bytes) -> tuple[Envelope, WorkRequest]:
    """Validate a delivery body as a work_request; raise InvalidMessage saying why not."""
    try:
        # The common case in one pass through pydantic-core's JSON parser (which
        # insists on UTF-8); anything wrong is diagnosed the slow way below.
        envelope = Envelope.model_validate_json(body)
        if envelope.type == "work_request":
            return envelope, WorkRequest.model_validate(envelope.payload)
    except ValidationError:
        pass
    return _diagnose(body)


def _diagnose(body: bytes) -> tuple[Envelope, WorkRequest]:
    """Parse step by step to say exactly what is wrong (and recover the ids)."""
    too_long: list[int] = []

    def read_int(digits: str) -> int:
        # JSON sets no limit on digits; Python's int() does. Keep reading so
        # the ids can still be answered.
        count = len(digits.lstrip("-"))
        limit = sys.get_int_max_str_digits()  # 0: no limit
        if limit and count > limit:
            too_long.append(count)
            return 0
        return int(digits)

    try:
        # Decoded explicitly: json.loads(bytes) would also guess UTF-16/32,
        # and the protocol says UTF-8.
        document = json.loads(body.decode("utf-8"), parse_int=read_int)
    # ValueError covers bad UTF-8 and bad JSON.
    except (ValueError, RecursionError) as exc:
        raise InvalidMessage(f"body is not UTF-8 JSON: {exc}") from None
    ids = _readable_ids(document)
    if too_long:
        raise InvalidMessage(f"a number of {too_long[0]} digits is too long", ids)
    if not isinstance(document, dict):
        raise InvalidMessage(f"body is JSON {type(document).__name__}, expected an object")
    try:
        envelope = Envelope.model_validate(document)
    except ValidationError as exc:
        raise InvalidMessage(f"bad envelope: {_describe(exc)}", ids) from None
    if envelope.type != "work_request":
        raise InvalidMessage(f"type {envelope.type!r} is not 'work_request'", ids)
    try:
        request = WorkRequest.model_validate(envelope.payload)
    except ValidationError as exc:
        raise InvalidMessage(f"bad work_request payload: {_describe(exc)}", ids) from None
    return envelope, request


def parse_envelope(body: bytes) -> Envelope:
    """Validate any protocol message's envelope (used by `send --wait` and tests)."""
    try:
        return Envelope.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidMessage(f"bad envelope: {_describe(exc)}") from None
