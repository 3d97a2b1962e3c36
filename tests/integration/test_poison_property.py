"""Poison never kills: valid-looking requests with hostile values, through a real worker.

Every generated message has the envelope's shape (protocol_version 1.0,
to_agent infra, type work_request, a payload object), but any field may hold
a hostile value: integers of hundreds to thousands of digits, NaN and Infinity on the
wire, lone surrogates and control characters (sent as JSON escapes), a few
hundred levels of nesting, very long strings, the wrong type, odd UUIDs and
timestamps at the edge of the calendar; hints and parameters included.

One `chiffon-worker run` process (the EchoWorker) serves them all, in each
ack mode. For every message, one at a time: it is answered (a work_result or
error naming its request_id, when that id is readable) or dead-lettered, and
the process is alive. At the end the worker still serves a plain echo, and in
late mode nothing is left in work_queue to be redelivered for ever.

`make test` runs a short sweep per ack mode; `make soak` (pytest -m soak)
runs CHIFFON_POISON_EXAMPLES (default 1000) per ack mode.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest
from hypothesis import HealthCheck, Phase, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.helpers.broker import Orchestrator, Vhost, rabbitmqctl, work_request
from tests.helpers.process import WorkerProcess

pytestmark = pytest.mark.integration

Spawn = Callable[..., WorkerProcess]

QUICK_EXAMPLES = 100  # per ack mode: a few seconds each in `make test`
SOAK_EXAMPLES = int(os.environ.get("CHIFFON_POISON_EXAMPLES", "1000"))
# A slow_echo sleeps 20 ms at most; anything not settled in this long is wedged.
SETTLE_SECONDS = 20
# The worker's default CHIFFON_MAX_BODY_BYTES; a body over it is dead-lettered
# unread, which proves little, so long strings mostly stay under it.
MAX_BODY = 1_048_576


class Raw:
    """A JSON literal that json.dumps cannot write (digits beyond its int limit)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:20]!r}, {len(self.text)} chars)"


class Poison:
    """One request as sent: its body, and the request_id an answer would carry.

    Its repr stays short (bodies may be a megabyte); the whole body is written
    to a file when the worker misbehaves on it.
    """

    __slots__ = ("body", "request_id", "work_type")

    def __init__(self, body: bytes, request_id: str | None, work_type: object) -> None:
        self.body = body
        self.request_id = request_id
        self.work_type = work_type

    def __repr__(self) -> str:
        return (
            f"Poison({self.work_type!r:.40}, request_id={self.request_id}, "
            f"{len(self.body)} bytes, {self.body[:300]!r}...)"
        )


# -- hostile values -------------------------------------------------------------

huge_ints = st.sampled_from(
    [
        10**400,
        -(10**400),
        2**63,
        -(2**63) - 1,
        2**64,
        2**1024,
        10**4000,
        Raw("9" * 5000),  # past Python's int-to-text limit
        Raw("-" + "9" * 20000),
    ]
)
non_finite = st.sampled_from(
    [
        math.nan,
        math.inf,
        -math.inf,
        Raw("1e400"),
        Raw("-1E99999"),
        Raw("1e-400"),
        Raw("-0"),
        Raw("0.000000000000000000000000000000000000000000000000001e-330"),
    ]
)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [1.7976931348623157e308, 5e-324, -0.0]
)
numbers = st.integers() | huge_ints | non_finite | floats
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
controls = st.characters(max_codepoint=0x1F) | st.sampled_from(
    "\x7f\x85\u200b\u200e\u202e\u2028\u2029\ufeff\ufffe\uffff"
)
hostile_char = st.characters() | surrogates | controls
short_text = st.text(hostile_char, max_size=30)
long_text = st.tuples(
    st.sampled_from(["x", "\x00", "\udcff", "\ud83d\ude00", "\u202e", "\\", '"', "é"]),
    st.integers(10_000, 150_000),
).map(lambda part: part[0] * part[1])
texts = short_text | long_text
wrong_type = st.sampled_from([True, False, None, [], {}, [1, "2", None], {"a": [1]}, "", "3"])


def nested(depth: int, inner: object, as_list: bool) -> object:
    value = inner
    for _ in range(depth):
        value = [value] if as_list else {"k": value}
    return value


deep = st.builds(
    nested,
    st.integers(100, 700) | st.sampled_from([200, 500, 900]),
    st.none() | short_text | numbers,
    st.booleans(),
)
scalars = numbers | short_text | wrong_type
hostile = st.one_of(
    scalars,
    long_text,
    deep,
    st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(short_text, inner, max_size=4),
        max_leaves=10,
    ),
)
hostile_object = st.dictionaries(short_text, hostile, max_size=4)


@st.composite
def odd_uuid(draw: st.DrawFn, base: uuid.UUID | None = None) -> object:
    """A UUID in an unusual spelling, a boundary UUID, or something close to one."""
    value = base or draw(st.uuids())
    spellings = [
        str(value).upper(),
        value.hex,
        "{" + str(value) + "}",
        "urn:uuid:" + str(value),
        str(uuid.UUID(int=0)),
        str(uuid.UUID(int=2**128 - 1)),
    ]
    near_misses = [
        str(value)[:-1] + "\udcff",
        str(value) + "\x00",
        " " + str(value),
        str(value)[:-1],
        str(value).replace("-", "-\u2028"),
        value.int,
    ]
    return draw(st.sampled_from(spellings) | st.sampled_from(near_misses) | hostile)


def readable(value: object) -> str | None:
    """The id as the worker writes it when it can read it; None when it cannot."""
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


timestamps = st.sampled_from(
    [
        "9999-12-31T23:59:59-23:59",
        "0001-01-01T00:00:00+23:59",
        "9999-12-31T23:59:59.999999Z",
        "0001-01-01T00:00:00",
        "2024-02-29T24:00:00Z",
        "2016-12-31T23:59:60Z",
        "2024-01-01T00:00:00.123456789012345678901234567890Z",
        "2024-01-01t00:00:00z",
        "2024-01-01 00:00:00",
        "20240101T000000Z",
        "2024-W01-1",
        "+275760-09-13T00:00:00Z",
        "2024-01-01T00:00:00+24:00",
        "2024-01-01T00:00:00\udcff",
        "2024-01-01T00:00:00\x00Z",
        253402300800,
        -62135596801,
        10**20,
        1e308,
        -1,
    ]
) | st.one_of(numbers, texts, wrong_type)

# slow_echo reads parameters["seconds"] with float(): tiny, or not a number at all.
seconds = st.sampled_from(
    [0, 0.001, 0.02, 5e-324, -1, -(10**400), 10**400, math.nan, -math.inf, "0.01", "abc", "nan"]
) | st.sampled_from([None, [], {}, "\udcff", Raw("9" * 5000)])
sane_duration = st.sampled_from([1e-300, 0.001, 0.5, 30, 604800])
odd_duration = st.sampled_from([604801, 0, -1]) | numbers | wrong_type
memory_hints = st.integers(-5, 10**9) | numbers | wrong_type

# The fields (envelope and payload) that may be poisoned; the rest keep a usual value.
FIELDS = (
    "message_id",
    "from_agent",
    "timestamp",
    "trace_id",
    "request_id",
    "priority",
    "x_custom_fields",
    "task_id",
    "work_type",
    "parameters",
    "hints",
    "unknown fields",
)


@st.composite
def parameters(draw: st.DrawFn, poisoned: bool, slow_echo: bool) -> object:
    if poisoned:  # not an object at all
        return draw(wrong_type | texts | st.lists(hostile, max_size=3))
    params: dict[str, object] = {"message": draw(hostile)}
    # A slow_echo without "seconds" sleeps its default 5 s: nothing hostile in
    # that, and a few of them once made the quick sweep take a minute.
    if slow_echo or draw(st.booleans()):
        params["seconds"] = draw(seconds)
    params.update(draw(hostile_object))
    return params


@st.composite
def hints(draw: st.DrawFn, poisoned: bool) -> object:
    found: dict[str, object] = {}
    if draw(st.booleans()):
        found["max_duration_seconds"] = draw(odd_duration if poisoned else sane_duration)
    if poisoned:
        if draw(st.integers(0, 3)) == 0:
            return draw(wrong_type | st.lists(hostile, max_size=3))
        if draw(st.booleans()):
            found["max_memory_mb"] = draw(memory_hints)
    found.update(draw(hostile_object))
    return found


def encode(document: dict[str, Any]) -> bytes:
    """JSON as a careless sender writes it: NaN allowed, surrogates as \\u escapes."""
    literals: dict[str, str] = {}

    def placeholder(value: object) -> str:
        if not isinstance(value, Raw):
            raise TypeError(type(value).__name__)
        token = f"@@raw{len(literals)}@@"
        literals[f'"{token}"'] = value.text
        return token

    text = json.dumps(document, ensure_ascii=True, allow_nan=True, default=placeholder)
    for token, literal in literals.items():
        text = text.replace(token, literal, 1)
    return text.encode("ascii")


@st.composite
def poison(draw: st.DrawFn) -> Poison:
    # Half the requests keep a valid envelope, so the poison in their
    # parameters and unknown hints reaches the work and the answer.
    poisoned = draw(st.just(frozenset()) | st.frozensets(st.sampled_from(FIELDS), max_size=3))

    def pick(field: str, usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> Any:
        return draw(odd if field in poisoned else usual)

    fresh = uuid.uuid4()  # no two examples are one request sent twice
    request_id = pick("request_id", st.just(str(fresh)), odd_uuid(base=fresh))
    trace_id = pick("trace_id", st.uuids().map(str), odd_uuid())
    task_id = pick("task_id", st.uuids().map(str), odd_uuid())
    work_type = pick(
        "work_type", st.sampled_from(["echo", "slow_echo", "fail", "unknown"]), texts | wrong_type
    )
    payload: dict[str, object] = {
        "task_id": task_id,
        "work_type": work_type,
        "parameters": draw(parameters("parameters" in poisoned, work_type == "slow_echo")),
        "hints": draw(hints("hints" in poisoned)),
    }
    senders = st.sampled_from(["code", "Orchestrator", "infra\x00", ""]) | hostile
    document: dict[str, Any] = {
        "protocol_version": "1.0",
        "message_id": pick("message_id", st.uuids().map(str), odd_uuid()),
        "from_agent": pick("from_agent", st.just("orchestrator"), senders),
        "to_agent": "infra",
        "timestamp": pick("timestamp", st.just("2026-01-02T03:04:05Z"), timestamps),
        "trace_id": trace_id,
        "request_id": request_id,
        "type": "work_request",
        "priority": pick("priority", st.integers(1, 5), numbers | wrong_type),
        "payload": payload,
        "x_custom_fields": pick("x_custom_fields", st.just({}), hostile_object | hostile),
    }
    if "unknown fields" in poisoned:
        payload.update(draw(st.dictionaries(short_text, hostile, min_size=1, max_size=2)))
        for key, value in draw(st.dictionaries(short_text, hostile, max_size=2)).items():
            document.setdefault(key, value)
    answerable = readable(request_id) if readable(trace_id) else None
    return Poison(encode(document), answerable, payload["work_type"])


def known(work_type: str = "echo", **changes: Any) -> Poison:
    """A request that once crashed or confused the worker (issue 13), kept as an example."""
    document = work_request(work_type, {"message": "hi", "seconds": 0.001})
    for path, value in changes.items():
        target = document
        *parents, name = path.split("__")
        for parent in parents:
            target = target[parent]
        target[name] = value
    return Poison(encode(document), str(document["request_id"]), work_type)


KNOWN_POISON = [
    known(timestamp="9999-12-31T23:59:59-23:59"),
    known(timestamp="0001-01-01T00:00:00+23:59"),
    known(payload__hints={"max_duration_seconds": 10**400}),
    known(payload__hints={"max_duration_seconds": True}),
    known(payload__parameters={"message": "\udcff"}),
    known("fail", payload__parameters={"message": "\ud800 and \x00"}),
    known("slow_echo", payload__parameters={"seconds": 10**400}),
    known(payload__parameters={"message": 1, "deep": nested(900, math.nan, as_list=True)}),
    known(priority=True),
    # Valid JSON (RFC 8259 sets no limit) but past Python's int-to-text limit.
    known(payload__parameters={"message": Raw("9" * 5000)}),
]


# -- checking the worker ----------------------------------------------------------


def strict_json(body: bytes) -> bool:
    """Decodable UTF-8 JSON without NaN/Infinity: what an orchestrator can read."""

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    try:
        json.loads(body.decode("utf-8"), parse_constant=refuse)
    except (ValueError, RecursionError):
        return False
    return True


def unacked_and_ready(vhost: Vhost, queue: str) -> tuple[int, int]:
    listing = rabbitmqctl(
        "list_queues", "-p", vhost.name, "name", "messages_ready", "messages_unacknowledged", "-q"
    )
    for line in listing.splitlines():
        fields = line.split()
        if fields and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"{queue} not in {listing!r}")


# What the consumer logs when parsing raised something other than InvalidMessage.
PARSER_BUG = "unexpected error while validating a message"


def stray_tracebacks(worker: WorkerProcess) -> list[str]:
    """Lines outside the JSON log (an unhandled exception's default print), and parser bugs."""
    found = []
    text = worker.log_path.read_text(errors="replace")
    # Only whole lines: the worker may be writing the last one right now.
    for line in text[: text.rfind("\n") + 1].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or record.get("message") == PARSER_BUG:
            found.append(line[:2000])
    return found


@pytest.mark.parametrize(
    ("ack_mode", "examples"),
    [
        pytest.param("early", QUICK_EXAMPLES, id="early"),
        pytest.param("late", QUICK_EXAMPLES, id="late"),
        pytest.param(
            "early",
            SOAK_EXAMPLES,
            id="early-soak",
            marks=[pytest.mark.soak, pytest.mark.timeout(120 + SOAK_EXAMPLES)],
        ),
        pytest.param(
            "late",
            SOAK_EXAMPLES,
            id="late-soak",
            marks=[pytest.mark.soak, pytest.mark.timeout(120 + SOAK_EXAMPLES)],
        ),
    ],
)
def test_hostile_values_in_a_valid_looking_request_are_answered_or_dead_lettered(
    ack_mode: str,
    examples: int,
    orchestrator: Orchestrator,
    spawn: Spawn,
    vhost: Vhost,
    tmp_path: Path,
) -> None:
    peer = orchestrator
    worker = spawn(ack_mode=ack_mode)
    process = worker.process
    assert process is not None
    peer.wait_until(lambda: bool(peer.heartbeats()), 20, "the worker online")
    dlx, replies = peer.raw["dlx_queue"], peer.raw["reply_queue"]
    counter = itertools.count()
    tally: Counter[str] = Counter()

    def fail(message: Poison, why: str) -> NoReturn:
        saved = tmp_path / f"poison-{next(counter)}.json"
        saved.write_bytes(message.body)
        tail = "\n".join(worker.messages()[-15:])
        raise AssertionError(f"{why}; body in {saved}; worker log ends:\n{tail}")

    @hypothesis_settings(
        max_examples=examples,
        deadline=None,
        database=None,
        # No shrinking: replaying against a worker that may be dead or busy
        # would shrink to noise; the failing body is saved whole instead.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(poison())
    def one_request(message: Poison) -> None:
        dlx_before, replies_before = len(dlx), len(replies)
        peer.publish(message.body)

        def died() -> bool:
            return process.poll() is not None

        def dead_lettered() -> bool:
            return message.body in dlx[dlx_before:]

        def answers() -> list[dict[str, Any]]:
            return [
                m
                for m in peer.received["reply_queue"][replies_before:]
                if m.get("type") in ("work_result", "error")
                and m.get("request_id") == message.request_id
            ]

        def settled() -> bool:
            if died():
                return True
            if message.request_id is not None and len(message.body) <= MAX_BODY:
                # Ids the worker can read: a dead-letter is answered too (5003).
                return bool(answers())
            return dead_lettered() or bool(answers())

        try:
            peer.wait_until(settled, SETTLE_SECONDS, "an answer or the dead-letter queue")
        except AssertionError as exc:
            if dead_lettered():
                fail(message, f"dead-lettered but no error answered its readable ids ({exc})")
            fail(message, f"neither answered nor dead-lettered ({exc})")
        if died():
            fail(message, f"the worker exited with {process.poll()}")
        if found := answers():
            payload = found[0].get("payload", {})
            tally[str(payload.get("status") or payload.get("error_code"))] += 1
        else:
            tally["dead-lettered unanswered"] += 1
        unreadable = [body[:200] for body in replies[replies_before:] if not strict_json(body)]
        if unreadable:
            fail(message, f"the worker sent a reply that is not strict JSON: {unreadable}")
        if strays := stray_tracebacks(worker):
            fail(message, f"a traceback escaped the worker's handling: {strays[:20]}")

    for found in KNOWN_POISON:
        one_request = example(found)(one_request)
    one_request()

    assert process.poll() is None, "the worker died"
    request = work_request("echo", {"message": "still here"})
    peer.publish(request)
    assert peer.wait_for_result(request)["payload"]["output"] == "still here"
    if ack_mode == "late":
        # Every delivery was acked or rejected: none waits to come back at a restart.
        assert unacked_and_ready(vhost, "work_queue") == (0, 0)
    print(f"\n{ack_mode}: {sum(tally.values())} hostile requests, {dict(tally)}")
