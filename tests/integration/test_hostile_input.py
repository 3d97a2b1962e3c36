"""Hostile input: whatever bytes arrive on work_queue, a bad message ends in
dlx_queue, never becomes work, and the worker keeps serving.

Every generated message is invalid *by construction*, judged against
PROTOCOL.md (UTF-8 JSON object, the envelope's fields and value sets, a
work_request payload) and the worker's CHIFFON_MAX_BODY_BYTES, never by the
worker's own parser. Where the protocol is open to reading (a numeric string
for an int, a timestamp given as a number, a UUID without dashes), the
generator stays away: only clear violations are sent.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.helpers.broker import Orchestrator, work_request
from tests.helpers.process import WorkerProcess

pytestmark = pytest.mark.integration

Spawn = Callable[..., WorkerProcess]

# Small, so that "huge" is cheap to send; the worker is started with it.
MAX_BODY = 65536
BATCH = 100
BATCHES = 12  # 1200 hostile messages in all
RSS_GROWTH_LIMIT = 50 * 1024 * 1024

# Written out from PROTOCOL.md, not imported from the worker under test.
AGENT_TYPES = ("orchestrator", "infra", "desktop", "code", "research")
MESSAGE_TYPES = ("work_request", "work_status", "work_result", "error")
REQUIRED_ENVELOPE = (
    "protocol_version",
    "from_agent",
    "to_agent",
    "trace_id",
    "request_id",
    "type",
    "payload",
)
REQUIRED_PAYLOAD = ("task_id", "work_type")


class Hostile:
    """One bad message and why it is bad.

    A plain class, not a dataclass: Hypothesis prints a dataclass field by
    field, and bodies may be 200 kB; this repr stays short.
    """

    __slots__ = ("body", "kind")

    def __init__(self, kind: str, body: bytes) -> None:
        self.kind = kind
        self.body = body

    def __repr__(self) -> str:
        head = self.body[:120]
        return f"Hostile({self.kind}, {len(self.body)} bytes, {head!r}...)"


# -- building blocks ----------------------------------------------------------

uuids = st.uuids().map(str)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
not_a_string = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
not_a_string = (
    not_a_string
    | st.lists(json_scalars, max_size=3)
    | st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)
)
not_an_object = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.lists(json_scalars, max_size=3)
)
# No hex digit at all, so no spelling of a UUID can hide in it.
not_a_uuid_text = st.text(alphabet="ghijklmnopqrstuvwxyz-_{}: ", max_size=40) | uuids.map(
    lambda u: u[:-1] + "g"
)
not_a_uuid = not_a_string | not_a_uuid_text
not_an_agent = st.text(max_size=20).filter(lambda s: s not in AGENT_TYPES) | st.sampled_from(
    ["Infra", "INFRA", " infra", "infra ", "orchestrator\x00", "worker", "*"]
)
not_a_date_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz -", max_size=20) | st.sampled_from(
    ["2024-13-45T99:99:99Z", "yesterday", "", "T", "2024-02-30"]
)
out_of_range_priority = (
    st.integers(max_value=0)
    | st.integers(min_value=6)
    | st.sampled_from([0, 6, -1, 10**20, -(10**20)])
)
# A priority that is not an int: text that is no number, fractions, containers.
wrong_priority_type = (
    st.none()
    | st.text(alphabet="abcxyz ", max_size=8)
    | st.sampled_from([3.5, 1.25, 4.999])
    | st.lists(st.integers(1, 5), max_size=3)
    | st.dictionaries(st.text(max_size=3), st.integers(1, 5), max_size=2)
)


@st.composite
def valid_request(draw: st.DrawFn, message: st.SearchStrategy[str] | None = None) -> dict[str, Any]:
    """A work_request that PROTOCOL.md accepts (it gets broken afterwards)."""
    text = draw(message if message is not None else st.text(max_size=30))
    return {
        "protocol_version": "1.0",
        "message_id": draw(uuids),
        "from_agent": "orchestrator",
        "to_agent": "infra",
        "timestamp": "2026-01-02T03:04:05+00:00",
        "trace_id": draw(uuids),
        "request_id": draw(uuids),
        "type": "work_request",
        "priority": draw(st.integers(1, 5)),
        "payload": {
            "task_id": draw(uuids),
            "work_type": draw(st.sampled_from(["echo", "fail", "slow_echo"])),
            "parameters": {"message": text},
            "hints": {},
        },
        "x_custom_fields": {},
    }


def dumps(document: object) -> bytes:
    return json.dumps(document).encode("utf-8")


def is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body.decode("utf-8")), dict)
    except (ValueError, RecursionError):
        return False


def with_field(request: dict[str, Any], path: tuple[str, ...], value: object) -> dict[str, Any]:
    changed = json.loads(json.dumps(request))
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


def without_field(request: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    changed = json.loads(json.dumps(request))
    target = changed
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return changed


# -- the kinds of bad message -----------------------------------------------

random_bytes = (
    st.binary(max_size=600)
    .filter(lambda b: not is_json_object(b))
    .map(lambda b: Hostile("random bytes", b))
)


@st.composite
def truncated_request(draw: st.DrawFn) -> Hostile:
    # json.dumps writes no trailing whitespace: every strict prefix lacks its "}".
    body = dumps(draw(valid_request()))
    cut = draw(st.integers(0, len(body) - 1))
    return Hostile("truncated JSON", body[:cut])


WRONG_TYPES: dict[tuple[str, ...], st.SearchStrategy[object]] = {
    ("protocol_version",): not_a_string,
    ("message_id",): not_a_uuid,
    ("from_agent",): not_a_string,
    ("to_agent",): not_a_string,
    ("timestamp",): st.none() | st.booleans() | st.lists(json_scalars, max_size=2) | st.just({}),
    ("trace_id",): not_a_uuid,
    ("request_id",): not_a_uuid,
    ("type",): not_a_string,
    ("priority",): wrong_priority_type,
    ("payload",): not_an_object,
    ("x_custom_fields",): not_an_object,
    ("payload", "task_id"): not_a_uuid,
    ("payload", "work_type"): not_a_string,
    ("payload", "parameters"): not_an_object,
    ("payload", "hints"): not_an_object,
}


@st.composite
def wrong_type(draw: st.DrawFn) -> Hostile:
    path = draw(st.sampled_from(sorted(WRONG_TYPES)))
    value = draw(WRONG_TYPES[path])
    body = dumps(with_field(draw(valid_request()), path, value))
    return Hostile(f"wrong type for {'.'.join(path)}", body)


@st.composite
def missing_field(draw: st.DrawFn) -> Hostile:
    paths = [(name,) for name in REQUIRED_ENVELOPE] + [("payload", n) for n in REQUIRED_PAYLOAD]
    path = draw(st.sampled_from(paths))
    return Hostile(f"missing {'.'.join(path)}", dumps(without_field(draw(valid_request()), path)))


@st.composite
def bad_value(draw: st.DrawFn) -> Hostile:
    """Right type, value outside what PROTOCOL.md allows."""
    field, value = draw(
        st.one_of(
            st.tuples(
                st.just(("protocol_version",)),
                st.text(max_size=10).filter(lambda s: s != "1.0")
                | st.sampled_from(["1.1", "2.0", "1", "1.0 ", "v1.0", "1.00", "0.9"]),
            ),
            st.tuples(
                st.just(("type",)),
                st.sampled_from([t for t in MESSAGE_TYPES if t != "work_request"])
                | st.text(max_size=15).filter(lambda s: s != "work_request")
                | st.sampled_from(["Work_Request", "work-request", "work_request "]),
            ),
            st.tuples(st.just(("priority",)), out_of_range_priority),
            st.tuples(st.sampled_from([("to_agent",), ("from_agent",)]), not_an_agent),
            st.tuples(st.just(("timestamp",)), not_a_date_text),
        )
    )
    body = dumps(with_field(draw(valid_request()), field, value))
    return Hostile(f"bad value for {'.'.join(field)}", body)


@st.composite
def huge(draw: st.DrawFn) -> Hostile:
    size = draw(st.integers(1000, 3 * MAX_BODY))
    filler = draw(st.sampled_from("x0 -"))
    request = draw(valid_request())
    choice = draw(st.integers(0, 2))
    if choice == 0:
        # Valid in every way but its size, which the worker was told to refuse.
        padding = filler * max(size, MAX_BODY + 1)
        return Hostile(
            "oversize valid request",
            dumps(with_field(request, ("x_custom_fields",), {"pad": padding})),
        )
    if choice == 1:
        path = draw(
            st.sampled_from(
                [
                    ("protocol_version",),
                    ("to_agent",),
                    ("type",),
                    ("trace_id",),
                    ("payload", "task_id"),
                ]
            )
        )
        start = {"protocol_version": "1.0", "to_agent": "infra", "type": "work_request"}.get(
            path[-1], ""
        )
        return Hostile(
            f"huge {'.'.join(path)}", dumps(with_field(request, path, start + filler * size))
        )
    return Hostile("huge JSON string", dumps(filler * size))


@st.composite
def deep_nesting(draw: st.DrawFn) -> Hostile:
    depth = draw(st.integers(1, 20000) | st.sampled_from([100, 200, 1000, 3000]))
    shape = draw(st.integers(0, 3))
    if shape == 0:
        return Hostile("deep array", b"[" * depth + b"]" * depth)
    if shape == 1:
        # An object, but its only key is "a": no envelope field at all.
        return Hostile("deep object", b'{"a":' * depth + b"1" + b"}" * depth)
    if shape == 2:
        return Hostile("unclosed nesting", b'{"a":[' * depth)
    nested = "[" * depth + "]" * depth
    body = dumps(with_field(draw(valid_request()), ("trace_id",), "@")).replace(
        b'"@"', nested.encode()
    )
    return Hostile("deeply nested trace_id", body)


# Text whose latin-1 bytes are never UTF-8: each non-ASCII character stands
# alone between ASCII ones (a lone byte >= 0x80 is never valid UTF-8).
ascii_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=6)
high_latin1 = st.characters(min_codepoint=0xA0, max_codepoint=0xFF)
latin1_only_text = st.lists(st.tuples(ascii_text, high_latin1), min_size=1, max_size=4).map(
    lambda parts: "".join(a + "a" + h for a, h in parts) + "z"
)


@st.composite
def wrong_encoding(draw: st.DrawFn) -> Hostile:
    codec = draw(st.sampled_from(["latin-1", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]))
    text = latin1_only_text if codec == "latin-1" else st.text(max_size=20)
    request = draw(valid_request(text))
    body = json.dumps(request, ensure_ascii=False).encode(codec)
    return Hostile(f"JSON in {codec}", body)


@st.composite
def wrong_shape(draw: st.DrawFn) -> Hostile:
    request = draw(valid_request())
    document = draw(
        st.one_of(
            st.just([request]),
            st.lists(json_values, max_size=5),
            st.integers() | st.floats(allow_nan=False, allow_infinity=False),
            st.none() | st.booleans(),
            st.text(max_size=40),
            st.just(json.dumps(request)),  # a request encoded twice: a JSON string
            st.dictionaries(
                st.text(max_size=12).filter(lambda k: k not in REQUIRED_ENVELOPE),
                json_values,
                max_size=6,
            ),
            st.just({"payload": request["payload"]}),
        )
    )
    return Hostile(f"JSON {type(document).__name__}", dumps(document))


def bad_message() -> st.SearchStrategy[Hostile]:
    return st.one_of(
        random_bytes,
        truncated_request(),
        wrong_type(),
        missing_field(),
        bad_value(),
        huge(),
        deep_nesting(),
        wrong_encoding(),
        wrong_shape(),
    )


# -- the tests ----------------------------------------------------------------


@pytest.fixture
def peer(orchestrator: Orchestrator) -> Orchestrator:
    """The orchestrator stand-in, watching reply_queue and dlx_queue."""
    return orchestrator


def _serves_echo(peer: Orchestrator, message: str) -> str:
    request = work_request("echo", {"message": message})
    peer.publish(request)
    result = peer.wait_for_result(request)["payload"]
    assert (result["status"], result["output"]) == ("completed", message)
    return str(request["request_id"])


def _exit_code(worker: WorkerProcess) -> int | None:
    assert worker.process is not None
    return worker.process.poll()


def _worker_online(peer: Orchestrator, spawn: Spawn) -> WorkerProcess:
    worker = spawn(max_body_bytes=MAX_BODY)
    peer.wait_until(lambda: bool(peer.heartbeats()), 20, "the worker online")
    return worker


def test_hostile_messages_all_end_in_dlx_and_the_worker_keeps_serving(
    peer: Orchestrator, spawn: Spawn
) -> None:
    worker = _worker_online(peer, spawn)
    echoed = {_serves_echo(peer, "before")}
    rss_before = psutil.Process(worker.pid).memory_info().rss
    dlx = peer.raw["dlx_queue"]
    sent: list[Hostile] = []
    problems: list[str] = []

    @hypothesis_settings(
        max_examples=BATCHES,
        deadline=None,
        derandomize=False,
        database=None,
        # No shrinking: a failure is reported with the offending bodies below,
        # and replaying batches against the same worker would muddle the counts.
        phases=[Phase.generate],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(st.lists(bad_message(), min_size=BATCH, max_size=BATCH))
    def publish_batch(batch: list[Hostile]) -> None:
        if problems:
            return  # the worker already misbehaved; the first failure is the report
        dlx_before, results_before = len(dlx), len(peer.results())
        for message in batch:
            peer.publish(message.body)
        sent.extend(batch)

        def settled() -> bool:
            handled = len(dlx) - dlx_before + len(peer.results()) - results_before
            return handled >= len(batch) or _exit_code(worker) is not None

        try:
            peer.wait_until(settled, 30, f"{len(batch)} hostile messages dead-lettered")
        except AssertionError as exc:
            problems.append(str(exc))
        if _exit_code(worker) is not None:
            problems.append(f"the worker exited with {_exit_code(worker)}")
        missing = Counter(m.body for m in batch) - Counter(dlx[dlx_before:])
        if missing:
            not_dead = [m for m in batch if m.body in missing]
            problems.append(f"{sum(missing.values())} not dead-lettered, e.g. {not_dead[:5]}")
        if len(peer.results()) != results_before:
            taken = peer.results()[results_before:]
            problems.append(f"bad messages became work: {[r['payload'] for r in taken][:5]}")

    publish_batch()
    assert not problems, problems
    assert len(sent) >= 1000
    assert Counter(dlx) == Counter(m.body for m in sent)
    work = [r for r in peer.results() if r["request_id"] not in echoed]
    assert work == [], "a hostile message produced a work_result"
    assert {e["payload"]["error_code"] for e in peer.errors()} <= {5003}

    assert _exit_code(worker) is None, "the worker died"
    _serves_echo(peer, "after")
    growth = psutil.Process(worker.pid).memory_info().rss - rss_before
    assert growth < RSS_GROWTH_LIMIT, f"worker RSS grew by {growth / 2**20:.1f} MiB"


def _padded(request: dict[str, Any], size: int) -> bytes:
    """The request as exactly `size` bytes of JSON, padded in x_custom_fields."""
    request = with_field(request, ("x_custom_fields",), {"pad": ""})
    short = len(dumps(request))
    assert size >= short
    return dumps(with_field(request, ("x_custom_fields",), {"pad": "x" * (size - short)}))


def test_request_over_max_body_bytes_is_dead_lettered_without_being_parsed(
    peer: Orchestrator, spawn: Spawn
) -> None:
    worker = _worker_online(peer, spawn)
    at_limit = work_request("echo", {"message": "just fits"})
    over = work_request("echo", {"message": "one byte too many"})
    # Readable ids but a wrong version: parsed, so the worker answers a 5003.
    parsed = dict(work_request("echo"), protocol_version="0.9")

    peer.publish(_padded(at_limit, MAX_BODY))
    peer.publish(_padded(over, MAX_BODY + 1))
    peer.publish(parsed)
    peer.wait_until(
        lambda: any(e["request_id"] == parsed["request_id"] for e in peer.errors()),
        20,
        "the 5003 error for the message after the oversize one",
    )

    # The limit is inclusive: a body of exactly max_body_bytes is served.
    assert peer.result_for(at_limit)["payload"]["output"] == "just fits"
    assert peer.raw["dlx_queue"] == [_padded(over, MAX_BODY + 1), dumps(parsed)]
    assert not [r for r in peer.results() if r["request_id"] == over["request_id"]]
    # Its ids were never read: no 5003 names it, though the next message's came.
    assert not [e for e in peer.errors() if e["request_id"] == over["request_id"]]
    reasons = [r.get("reason", "") for r in worker.records()]
    assert any(str(MAX_BODY) in reason for reason in reasons), reasons
