"""WorkerBase as a user subclasses it, and EchoWorker, the reference worker; no broker."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

import pytest

from chiffon_worker.amqp import Delivery, DeliveryTag
from chiffon_worker.config import Settings
from chiffon_worker.echo import EchoWorker
from chiffon_worker.metrics import GpuProbe, HostMetrics
from chiffon_worker.protocol import (
    StatusUpdate,
    WorkRequest,
    WorkResult,
    encode,
    make_envelope,
    parse_envelope,
    parse_work_request,
)
from chiffon_worker.tasks import Task
from chiffon_worker.worker import Backoff, WorkerBase

GIB = 1024**3


@pytest.fixture
def echo_worker() -> Iterator[EchoWorker]:
    worker = EchoWorker(Settings())
    yield worker
    worker._consumer.close()  # let its idle work threads end


def request(work_type: str, **parameters: Any) -> WorkRequest:
    return WorkRequest(task_id=uuid.uuid4(), work_type=work_type, parameters=parameters)


def task_for(work_request: WorkRequest) -> Task:
    """A Task as the consumer builds it from a delivery of this request."""
    sent = make_envelope(
        work_request,
        from_agent="orchestrator",
        to_agent="infra",
        trace_id=uuid.uuid4(),
        request_id=uuid.uuid4(),
    )
    body = encode(sent)
    envelope, parsed = parse_work_request(body)
    delivery = Delivery(
        tag=DeliveryTag(generation=1, value=1),
        body=body,
        reply_to=None,
        correlation_id=None,
    )
    return Task(delivery, envelope, parsed)


# -- subclassing WorkerBase --------------------------------------------------


def test_worker_base_cannot_be_instantiated() -> None:
    with pytest.raises(TypeError):
        WorkerBase(Settings())  # type: ignore[abstract]


def test_subclass_without_execute_work_cannot_be_instantiated() -> None:
    class NoWork(WorkerBase):
        def get_agent_capabilities(self) -> dict[str, Any]:
            return {"work_types": ["x"]}

    with pytest.raises(TypeError, match="execute_work"):
        NoWork(Settings())  # type: ignore[abstract]


def test_subclass_without_capabilities_cannot_be_instantiated() -> None:
    class NoCapabilities(WorkerBase):
        def execute_work(self, request: WorkRequest) -> WorkResult:
            return WorkResult.completed(request)

    with pytest.raises(TypeError, match="get_agent_capabilities"):
        NoCapabilities(Settings())  # type: ignore[abstract]


# -- EchoWorker.execute_work ---------------------------------------------------


def test_echo_returns_the_message(echo_worker: EchoWorker) -> None:
    result = echo_worker.execute_work(request("echo", message="hello"))

    assert (result.status, result.exit_code, result.output) == ("completed", 0, "hello")


def test_echo_without_a_string_message_returns_the_parameters_as_json(
    echo_worker: EchoWorker,
) -> None:
    result = echo_worker.execute_work(request("echo", message=42, extra=[1, 2]))

    assert result.status == "completed"
    assert json.loads(result.output) == {"message": 42, "extra": [1, 2]}


def test_slow_echo_completes_after_its_wait(echo_worker: EchoWorker) -> None:
    result = echo_worker.execute_work(request("slow_echo", seconds=0.01, message="late"))

    assert (result.status, result.output) == ("completed", "late")


def test_fail_raises(echo_worker: EchoWorker) -> None:
    with pytest.raises(RuntimeError, match="on purpose"):
        echo_worker.execute_work(request("fail", message="on purpose"))


def test_unknown_work_type_fails_naming_the_supported_ones(echo_worker: EchoWorker) -> None:
    result = echo_worker.execute_work(request("dance"))

    assert (result.status, result.exit_code) == ("failed", 1)
    assert result.error_message is not None
    for name in ("dance", "echo", "slow_echo", "fail"):
        assert name in result.error_message


# -- WorkerBase._run_task: what every result carries -----------------------------


def test_result_is_stamped_with_agent_ids_duration_and_resources(
    echo_worker: EchoWorker,
) -> None:
    task = task_for(request("echo", message="hello"))

    result = echo_worker._run_task(task)

    assert result.status == "completed"
    assert result.agent_id == echo_worker.agent_id
    assert result.trace_id == task.envelope.trace_id
    assert result.request_id == task.envelope.request_id
    assert result.duration_ms >= 0
    assert result.resources_used["cpu_time_ms"] >= 0
    assert result.resources_used["memory_peak_mb"] > 0


def test_cpu_time_counts_the_work_that_ran() -> None:
    class Busy(EchoWorker):
        def execute_work(self, request: WorkRequest) -> WorkResult:
            deadline = time.thread_time() + 0.03  # 30 ms of this thread's CPU
            while time.thread_time() < deadline:
                pass
            return WorkResult.completed(request, output="done")

    result = Busy(Settings())._run_task(task_for(request("echo", message="spin")))

    assert result.resources_used["cpu_time_ms"] >= 30
    assert result.duration_ms >= result.resources_used["cpu_time_ms"]


def test_exception_in_work_becomes_a_failed_result(echo_worker: EchoWorker) -> None:
    result = echo_worker._run_task(task_for(request("fail", message="disk on fire")))

    assert (result.status, result.exit_code) == ("failed", 1)
    assert result.error_message is not None
    assert "disk on fire" in result.error_message
    assert result.agent_id == echo_worker.agent_id


def test_unknown_work_type_is_refused_before_the_work_runs(echo_worker: EchoWorker) -> None:
    result = echo_worker._run_task(task_for(request("dance")))

    assert (result.status, result.exit_code) == ("failed", 1)
    assert result.error_message is not None
    assert "dance" in result.error_message
    assert "slow_echo" in result.error_message


class ReturnsText(EchoWorker):
    def execute_work(self, request: WorkRequest) -> WorkResult:
        return "done"  # type: ignore[return-value]


def test_work_returning_a_non_result_gets_a_failed_result_naming_the_type() -> None:
    worker = ReturnsText(Settings())
    try:
        result = worker._run_task(task_for(request("echo")))
    finally:
        worker._consumer.close()

    assert (result.status, result.exit_code) == ("failed", 1)
    assert result.error_message is not None
    assert "str" in result.error_message


def test_report_progress_outside_execute_work_raises(echo_worker: EchoWorker) -> None:
    with pytest.raises(RuntimeError, match="execute_work"):
        echo_worker.report_progress(50, "halfway")


# -- heartbeats -----------------------------------------------------------------


@dataclass
class MemoryInfo:
    total: int
    used: int
    free: int


class OneGpuNvml:
    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        pass

    def nvmlShutdown(self) -> None:  # noqa: N802
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetMemoryInfo(self, _handle: int) -> MemoryInfo:  # noqa: N802
        return MemoryInfo(total=16 * GIB, used=4 * GIB, free=12 * GIB)

    def nvmlDeviceGetName(self, _handle: int) -> bytes:  # noqa: N802
        return b"Fake GPU"


def test_heartbeat_is_an_online_status_update_for_the_orchestrator(
    echo_worker: EchoWorker,
) -> None:
    echo_worker._metrics = HostMetrics(GpuProbe(cast(ModuleType, OneGpuNvml())))

    outgoing = echo_worker._heartbeat()

    envelope = parse_envelope(outgoing.body)
    update = StatusUpdate.model_validate(envelope.payload)
    assert envelope.type == "work_status"
    assert (envelope.to_agent, envelope.from_agent) == ("orchestrator", "infra")
    assert envelope.priority == 4
    assert outgoing.priority == 4
    assert outgoing.routing_key == "reply_queue"
    assert update.status == "online"
    assert update.agent_id == echo_worker.agent_id
    assert update.current_task_id is None
    assert update.resources["gpu_vram_total_gb"] == 16.0
    assert update.resources["gpu_vram_available_gb"] == 12.0


# -- reconnect backoff ------------------------------------------------------------


def test_backoff_delays_grow_up_to_the_cap_and_never_beyond() -> None:
    backoff = Backoff(first=1.0, cap=8.0)

    delays = [backoff.next_delay() for _ in range(40)]

    # Full jitter draws from [ceiling/2, ceiling] with the ceiling doubling: 1, 2, 4, 8, 8...
    assert delays[:4] == sorted(delays[:4])
    assert delays[3] >= 4.0
    assert all(0 < delay <= 8.0 for delay in delays)


def test_backoff_reset_starts_from_the_first_delay_again() -> None:
    backoff = Backoff(first=1.0, cap=8.0)
    for _ in range(10):
        backoff.next_delay()

    backoff.reset()

    assert backoff.next_delay() <= 1.0


def test_consumer_timeout_closing_the_channel_is_explained_in_the_log(
    echo_worker: EchoWorker, caplog: pytest.LogCaptureFixture
) -> None:
    worker = echo_worker
    reason = (
        "connection: channel closed by broker: PRECONDITION_FAILED - delivery "
        "acknowledgement on channel 1 timed out. Timeout value used: 1800000 ms."
    )
    with caplog.at_level(logging.ERROR, logger="chiffon_worker"):
        worker._explain_loss(reason)
        worker._explain_loss("connection: StreamLostError: EOF")
    [record] = caplog.records
    assert "consumer_timeout" in record.getMessage()


@pytest.mark.parametrize("capabilities", [{}, {"work_types": []}, {"work_types": [""]}, []])
def test_capabilities_must_list_the_work_types(capabilities: Any) -> None:
    class Vague(EchoWorker):
        def get_agent_capabilities(self) -> dict[str, Any]:
            return capabilities  # type: ignore[no-any-return]

    with pytest.raises(TypeError, match="work_types"):
        Vague(Settings())
