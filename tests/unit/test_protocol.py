"""The wire contract of PROTOCOL.md: what the worker accepts, rejects and emits."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from chiffon_worker.errors import InvalidMessage
from chiffon_worker.protocol import (
    AGENT_TYPES,
    Envelope,
    ErrorMessage,
    Payload,
    StatusUpdate,
    WorkRequest,
    WorkResult,
    WorkStatus,
    encode,
    encode_message,
    make_envelope,
    parse_work_request,
)

NOON_UTC = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def request_document(**changes: Any) -> dict[str, Any]:
    """A valid work_request as the orchestrator would send it; `changes` replace fields."""
    document: dict[str, Any] = {
        "protocol_version": "1.0",
        "message_id": str(uuid.uuid4()),
        "from_agent": "orchestrator",
        "to_agent": "infra",
        "timestamp": "2024-05-01T12:00:00+00:00",
        "trace_id": str(uuid.uuid4()),
        "request_id": str(uuid.uuid4()),
        "type": "work_request",
        "priority": 3,
        "payload": {"task_id": str(uuid.uuid4()), "work_type": "echo", "parameters": {}},
    }
    document.update(changes)
    return document


def body_of(document: object) -> bytes:
    return json.dumps(document).encode("utf-8")


def invalid_reason(body: bytes) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as caught:
        parse_work_request(body)
    return caught.value


def a_request() -> WorkRequest:
    return WorkRequest(task_id=uuid.uuid4(), work_type="echo", parameters={"message": "hi"})


# -- envelope -----------------------------------------------------------------


def test_encoded_envelope_parses_back_to_equal_fields() -> None:
    request = WorkRequest(
        task_id=uuid.uuid4(),
        work_type="run_playbook",
        parameters={"message": "hi", "n": 2},
        hints={"max_duration_seconds": 30},
    )
    sent = make_envelope(
        request,
        from_agent="orchestrator",
        to_agent="code",
        trace_id=uuid.uuid4(),
        request_id=uuid.uuid4(),
        priority=5,
    )

    envelope, parsed = parse_work_request(encode(sent))

    assert envelope == sent
    assert parsed == request


@pytest.fixture
def local_time_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A local zone far from UTC, so reading a naive time as local time would show."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_time_not_utc")
def test_naive_timestamp_is_read_as_utc() -> None:
    envelope, _ = parse_work_request(body_of(request_document(timestamp="2024-05-01T12:00:00")))

    assert envelope.timestamp == NOON_UTC
    assert envelope.timestamp.utcoffset() == timedelta(0)


@pytest.mark.parametrize("stamp", ["2024-05-01T12:00:00Z", "2024-05-01T14:00:00+02:00"])
def test_timestamp_with_offset_is_normalised_to_utc(stamp: str) -> None:
    envelope, _ = parse_work_request(body_of(request_document(timestamp=stamp)))

    assert envelope.timestamp == NOON_UTC
    assert envelope.timestamp.utcoffset() == timedelta(0)


def test_emitted_timestamp_states_its_utc_offset() -> None:
    envelope, _ = parse_work_request(
        body_of(request_document(timestamp="2024-05-01T14:00:00+02:00"))
    )

    emitted = json.loads(encode(envelope))["timestamp"]

    assert emitted.endswith("+00:00")
    assert datetime.fromisoformat(emitted) == NOON_UTC


@pytest.mark.parametrize(
    "stamp",
    ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"],
    ids=["past-9999", "before-1"],
)
def test_timestamp_whose_utc_time_leaves_the_calendar_is_invalid_with_its_ids(stamp: str) -> None:
    document = request_document(timestamp=stamp)

    problem = invalid_reason(body_of(document))

    assert "timestamp" in problem.reason
    # The ids were readable, so the consumer can still answer 5003.
    assert problem.ids["request_id"] == document["request_id"]
    assert problem.ids["trace_id"] == document["trace_id"]


@pytest.mark.parametrize(
    "stamp", ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00", "0001-01-01T00:00:00-23:59"]
)
def test_timestamp_at_the_calendar_edge_in_utc_is_accepted(stamp: str) -> None:
    envelope, _ = parse_work_request(body_of(request_document(timestamp=stamp)))

    assert envelope.timestamp.utcoffset() == timedelta(0)
    assert datetime.fromisoformat(json.loads(encode(envelope))["timestamp"]) == envelope.timestamp


@pytest.mark.parametrize("agent", AGENT_TYPES)
def test_every_protocol_agent_type_is_accepted(agent: str) -> None:
    envelope, _ = parse_work_request(body_of(request_document(from_agent=agent, to_agent=agent)))

    assert (envelope.from_agent, envelope.to_agent) == (agent, agent)


def test_all_five_agent_types_are_known() -> None:
    assert set(AGENT_TYPES) == {"orchestrator", "infra", "desktop", "code", "research"}


@pytest.mark.parametrize("field", ["from_agent", "to_agent"])
def test_unknown_agent_type_is_rejected(field: str) -> None:
    problem = invalid_reason(body_of(request_document(**{field: "janitor"})))

    assert field in problem.reason


@pytest.mark.parametrize("message_type", ["work_request", "work_status", "work_result", "error"])
def test_the_four_message_types_are_accepted(message_type: str) -> None:
    envelope = Envelope.model_validate(request_document(type=message_type))

    assert envelope.type == message_type


def test_another_message_type_is_rejected() -> None:
    with pytest.raises(ValidationError, match="type"):
        Envelope.model_validate(request_document(type="heartbeat"))


@pytest.mark.parametrize("priority", [1, 2, 3, 4, 5])
def test_priorities_one_to_five_are_accepted(priority: int) -> None:
    envelope, _ = parse_work_request(body_of(request_document(priority=priority)))

    assert envelope.priority == priority


@pytest.mark.parametrize("priority", [0, 6])
def test_priority_outside_one_to_five_is_rejected(priority: int) -> None:
    problem = invalid_reason(body_of(request_document(priority=priority)))

    assert "priority" in problem.reason


def test_missing_priority_defaults_to_three() -> None:
    document = request_document()
    del document["priority"]

    envelope, _ = parse_work_request(body_of(document))

    assert envelope.priority == 3


@pytest.mark.parametrize("version", ["2.0", "1", "1.1"])
def test_other_protocol_version_is_rejected_naming_the_field(version: str) -> None:
    problem = invalid_reason(body_of(request_document(protocol_version=version)))

    assert "protocol_version" in problem.reason


def test_unknown_top_level_fields_are_ignored() -> None:
    document = request_document(routing_hint={"zone": "eu"}, protocol_extension=True)

    envelope, request = parse_work_request(body_of(document))

    assert str(envelope.request_id) == document["request_id"]
    assert request.work_type == "echo"


def test_custom_fields_with_unknown_keys_are_kept_through_a_round_trip() -> None:
    custom = {"vendor.retry_budget": 3, "labels": ["a", "b"], "nested": {"k": None}}

    envelope, _ = parse_work_request(body_of(request_document(x_custom_fields=custom)))

    assert envelope.x_custom_fields == custom
    assert json.loads(encode(envelope))["x_custom_fields"] == custom


# -- rejecting what is not a work request --------------------------------------


def test_malformed_json_is_invalid() -> None:
    invalid_reason(b'{"protocol_version": "1.0",')


def test_non_utf8_body_is_invalid() -> None:
    invalid_reason(b'{"protocol_version": "1.0", "from_agent": "\xff\xfe\xfa"}')


def test_json_array_body_is_invalid() -> None:
    problem = invalid_reason(body_of([request_document()]))

    assert "list" in problem.reason


def test_deeply_nested_json_is_invalid_not_a_crash() -> None:
    invalid_reason(b"[" * 100_000)


def test_work_result_type_is_not_a_work_request() -> None:
    problem = invalid_reason(body_of(request_document(type="work_result")))

    assert "work_result" in problem.reason


def test_payload_without_task_id_is_invalid() -> None:
    document = request_document()
    del document["payload"]["task_id"]

    problem = invalid_reason(body_of(document))

    assert "task_id" in problem.reason


def test_huge_integer_literal_is_invalid_not_a_crash() -> None:
    body = b'{"protocol_version": "1.0", "priority": ' + b"9" * 5000 + b"}"

    invalid_reason(body)


def test_integer_past_pythons_digit_limit_is_invalid_with_its_ids() -> None:
    # JSON sets no limit on digits; Python's int() refuses more than 4300.
    document = request_document()
    body = body_of(document).replace(
        b'"parameters": {}', b'"parameters": {"n": -' + b"9" * 5000 + b"}"
    )

    problem = invalid_reason(body)

    assert "5000 digits" in problem.reason
    assert problem.ids["request_id"] == document["request_id"]


def test_invalid_message_keeps_readable_ids_for_an_error_reply() -> None:
    document = request_document()
    del document["payload"]["task_id"]

    problem = invalid_reason(body_of(document))

    assert problem.ids["trace_id"] == document["trace_id"]
    assert problem.ids["request_id"] == document["request_id"]
    assert problem.ids["from_agent"] == "orchestrator"


@pytest.mark.parametrize(
    "changes",
    [{"trace_id": "not-a-uuid"}, {"request_id": 12345}, {"trace_id": None}],
    ids=["bad-trace-id", "numeric-request-id", "null-trace-id"],
)
def test_invalid_message_has_no_ids_when_they_are_not_uuids(changes: dict[str, Any]) -> None:
    problem = invalid_reason(body_of(request_document(**changes)))

    assert problem.ids == {}


def test_invalid_message_has_no_ids_when_body_is_not_json() -> None:
    assert invalid_reason(b"\x00garbage").ids == {}


# -- payloads ------------------------------------------------------------------


def test_failed_result_without_error_message_is_rejected() -> None:
    with pytest.raises(ValidationError, match="error_message"):
        WorkResult(task_id=uuid.uuid4(), status="failed", exit_code=1)


def test_failed_result_with_empty_error_message_is_rejected() -> None:
    with pytest.raises(ValidationError, match="error_message"):
        WorkResult(task_id=uuid.uuid4(), status="failed", exit_code=1, error_message="")


def test_completed_helper_fills_task_id_status_and_zero_exit_code() -> None:
    request = a_request()

    result = WorkResult.completed(request, output="done")

    assert (result.task_id, result.status, result.exit_code, result.output) == (
        request.task_id,
        "completed",
        0,
        "done",
    )
    assert result.error_message is None


def test_failed_helper_fills_error_message_and_exit_code_one() -> None:
    request = a_request()

    result = WorkResult.failed(request, "disk full")

    assert (result.task_id, result.status, result.exit_code, result.error_message) == (
        request.task_id,
        "failed",
        1,
        "disk full",
    )


def test_failed_helper_takes_a_specific_exit_code() -> None:
    assert WorkResult.failed(a_request(), "timed out", exit_code=3).exit_code == 3


def heartbeat_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "agent_id": str(uuid.uuid4()),
        "agent_type": "infra",
        "status": "online",
        "current_task_id": None,
        "resources": {"cpu_percent": 1.5, "memory_percent": 20.0},
    }
    payload.update(changes)
    return payload


@pytest.mark.parametrize("status", ["online", "offline", "busy"])
def test_status_update_accepts_the_three_agent_statuses(status: str) -> None:
    assert StatusUpdate.model_validate(heartbeat_payload(status=status)).status == status


@pytest.mark.parametrize(
    "changes",
    [{"status": "sleeping"}, {"agent_type": "janitor"}, {"agent_id": "nope"}],
    ids=["status", "agent_type", "agent_id"],
)
def test_status_update_rejects_values_outside_the_protocol(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=next(iter(changes))):
        StatusUpdate.model_validate(heartbeat_payload(**changes))


def test_status_update_emits_timestamp_in_utc() -> None:
    update = StatusUpdate.model_validate(heartbeat_payload(timestamp="2024-05-01T14:00:00+02:00"))

    emitted = json.loads(update.model_dump_json())["timestamp"]

    assert datetime.fromisoformat(emitted) == NOON_UTC
    assert emitted.endswith("+00:00")


def progress_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "task_id": str(uuid.uuid4()),
        "status": "running",
        "progress_percent": 50,
        "step": {"number": 1, "name": "copy"},
    }
    payload.update(changes)
    return payload


@pytest.mark.parametrize("percent", [0, 42.5, 100])
def test_work_status_accepts_percent_from_zero_to_hundred(percent: float) -> None:
    status = WorkStatus.model_validate(progress_payload(progress_percent=percent))

    assert status.progress_percent == percent
    assert status.step.output == ""


@pytest.mark.parametrize(
    "changes",
    [{"progress_percent": -1}, {"progress_percent": 100.5}, {"status": "done"}],
    ids=["below-zero", "above-hundred", "unknown-status"],
)
def test_work_status_rejects_values_outside_the_protocol(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=next(iter(changes))):
        WorkStatus.model_validate(progress_payload(**changes))


@pytest.mark.parametrize("code", [1000, 5003, 9999])
def test_error_message_accepts_codes_1000_to_9999(code: int) -> None:
    assert ErrorMessage(error_code=code, error_message="x").error_code == code


@pytest.mark.parametrize("code", [999, 10000])
def test_error_message_rejects_codes_outside_1000_to_9999(code: int) -> None:
    with pytest.raises(ValidationError, match="error_code"):
        ErrorMessage(error_code=code, error_message="x")


@pytest.mark.parametrize(
    ("payload", "expected_type"),
    [
        (a_request(), "work_request"),
        (WorkResult(task_id=uuid.uuid4(), status="completed"), "work_result"),
        (WorkStatus.model_validate(progress_payload()), "work_status"),
        (StatusUpdate.model_validate(heartbeat_payload()), "work_status"),
        (ErrorMessage(error_code=5003, error_message="bad"), "error"),
    ],
    ids=["WorkRequest", "WorkResult", "WorkStatus", "StatusUpdate", "ErrorMessage"],
)
def test_make_envelope_sets_the_type_for_each_payload_class(
    payload: Payload, expected_type: str
) -> None:
    envelope = make_envelope(
        payload,
        from_agent="infra",
        to_agent="orchestrator",
        trace_id=uuid.uuid4(),
        request_id=uuid.uuid4(),
    )

    assert envelope.type == expected_type
    assert type(payload).model_validate(envelope.payload) == payload


def test_fast_encoding_matches_the_validated_envelope_except_fresh_ids() -> None:
    task = uuid.uuid4()
    result = WorkResult(task_id=task, status="failed", exit_code=1, error_message="boom")
    ids = {"trace_id": uuid.uuid4(), "request_id": uuid.uuid4()}
    encoded = encode_message(result, from_agent="infra", to_agent="orchestrator", priority=4, **ids)
    fast = json.loads(encoded.body)
    # What the idempotency cache keeps of it: the payload as sent.
    assert json.loads(encoded.payload_json) == fast["payload"]
    slow = json.loads(
        encode(
            make_envelope(result, from_agent="infra", to_agent="orchestrator", priority=4, **ids)
        )
    )
    for varying in ("message_id", "timestamp"):
        assert fast.pop(varying) != slow.pop(varying)
    assert fast == slow
    reparsed = Envelope.model_validate_json(
        encode_message(result, from_agent="infra", to_agent="code", **ids).body
    )
    assert reparsed.timestamp.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "field", ["message_id", "timestamp", "trace_id", "request_id", "from_agent", "type"]
)
def test_an_envelope_without_a_required_field_is_invalid(field: str) -> None:
    document = request_document()
    del document[field]
    assert field in invalid_reason(body_of(document)).reason


@pytest.mark.parametrize(
    "hint",
    [10**400, True, float("nan"), float("inf"), -1, 0, "30", 8 * 24 * 3600],
    ids=["huge", "true", "nan", "inf", "negative", "zero", "string", "over-a-week"],
)
def test_an_insane_time_limit_hint_makes_the_request_invalid(hint: object) -> None:
    body = json.dumps(
        {
            "protocol_version": "1.0",
            "message_id": str(uuid.uuid4()),
            "from_agent": "orchestrator",
            "to_agent": "infra",
            "timestamp": "2026-12-04T10:00:00Z",
            "trace_id": str(uuid.uuid4()),
            "request_id": str(uuid.uuid4()),
            "type": "work_request",
            "payload": {
                "task_id": str(uuid.uuid4()),
                "work_type": "echo",
                "hints": {"max_duration_seconds": hint},
            },
        },
        allow_nan=True,
    ).encode()

    with pytest.raises(InvalidMessage, match="max_duration_seconds"):
        parse_work_request(body)


def test_a_sane_time_limit_hint_and_unknown_hints_are_accepted() -> None:
    request = WorkRequest(
        task_id=uuid.uuid4(), work_type="echo", hints={"max_duration_seconds": 2.5, "colour": 1}
    )

    assert request.hints == {"max_duration_seconds": 2.5, "colour": 1}


def test_priority_true_is_not_priority_one() -> None:
    body = json.dumps(request_document(priority=True)).encode()

    assert "priority" in invalid_reason(body).reason
