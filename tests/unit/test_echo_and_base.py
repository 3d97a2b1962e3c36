"""WorkerBase as a user subclasses it, EchoWorker, and what the runtime adds to
every result, heartbeat and start-up check; no broker."""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

import pytest

from chiffon_worker import heartbeat, service
from chiffon_worker.amqp import Delivery, DeliveryTag
from chiffon_worker.config import Settings
from chiffon_worker.context import TaskContext, current_task
from chiffon_worker.echo import EchoWorker
from chiffon_worker.errors import EXIT_CONFIG, EXIT_SOFTWARE, ConfigError
from chiffon_worker.keeper import Backoff, _explain_loss
from chiffon_worker.metrics import GpuProbe, HostMetrics
from chiffon_worker.protocol import (
    StatusUpdate,
    WorkRequest,
    WorkResult,
    WorkStatus,
    encode,
    make_envelope,
    parse_envelope,
    parse_work_request,
)
from chiffon_worker.runner import TaskRunner, declared_work_types
from chiffon_worker.service import WorkerService
from chiffon_worker.tasks import Task
from chiffon_worker.worker import WorkerBase

GIB = 1024**3


@pytest.fixture
def echo_worker() -> EchoWorker:
    return EchoWorker(Settings())


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


class Progress:
    """The runner's progress sink: records what each task reported."""

    def __init__(self) -> None:
        self.reports: list[tuple[Task, WorkStatus]] = []

    def __call__(self, task: Task, status: WorkStatus) -> None:
        self.reports.append((task, status))


def runner_for(
    worker: WorkerBase,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> TaskRunner:
    """A TaskRunner as WorkerService builds one for `worker`."""
    work_types = declared_work_types(worker.get_agent_capabilities())
    assert work_types is not None
    return TaskRunner(
        worker,
        work_types,
        worker.agent_id,
        stop or threading.Event(),
        progress or Progress(),
    )


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


def test_capabilities_are_asked_for_after_the_subclass_init_has_run() -> None:
    class LateTypes(EchoWorker):
        def __init__(self, settings: Settings) -> None:
            super().__init__(settings)
            self.types = ["echo"]  # only known once the subclass's own __init__ ran

        def get_agent_capabilities(self) -> dict[str, Any]:
            return {"work_types": self.types}

    worker = LateTypes(Settings())

    assert WorkerService(worker, Settings()).work_types == frozenset({"echo"})


def test_serving_a_worker_keeps_nothing_on_the_users_object(echo_worker: EchoWorker) -> None:
    before = dict(vars(echo_worker))

    WorkerService(echo_worker, echo_worker.settings)

    assert vars(echo_worker) == before
    assert set(before) == {"settings", "agent_id"}


def test_private_names_on_the_subclass_do_not_reach_the_runtime() -> None:
    class Squatter(EchoWorker):
        def __init__(self, settings: Settings) -> None:
            super().__init__(settings)
            # Everyday names the old WorkerBase used for its own runtime.
            for name in ("_metrics", "_stop", "_link", "_consumer", "_stats", "_current"):
                setattr(self, name, {})
            self._run_task = None
            self._heartbeat = None

    worker = Squatter(Settings())
    task = task_for(request("echo", message="still mine"))

    result = runner_for(worker)(task)

    assert (result.status, result.output) == ("completed", "still mine")
    assert WorkerService(worker, Settings()).work_types == frozenset({"echo", "slow_echo", "fail"})


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


# -- TaskRunner: what every result carries -------------------------------------


def test_result_is_stamped_with_agent_ids_duration_and_resources(
    echo_worker: EchoWorker,
) -> None:
    task = task_for(request("echo", message="hello"))

    result = runner_for(echo_worker)(task)

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

    result = runner_for(Busy(Settings()))(task_for(request("echo", message="spin")))

    assert result.resources_used["cpu_time_ms"] >= 30
    assert result.duration_ms >= result.resources_used["cpu_time_ms"]


def test_exception_in_work_becomes_a_failed_result(echo_worker: EchoWorker) -> None:
    result = runner_for(echo_worker)(task_for(request("fail", message="disk on fire")))

    assert (result.status, result.exit_code) == ("failed", 1)
    assert result.error_message is not None
    assert "disk on fire" in result.error_message
    assert result.agent_id == echo_worker.agent_id


def test_unknown_work_type_is_refused_before_the_work_runs() -> None:
    class Counting(EchoWorker):
        runs = 0

        def execute_work(self, request: WorkRequest) -> WorkResult:
            Counting.runs += 1
            return super().execute_work(request)

    result = runner_for(Counting(Settings()))(task_for(request("dance")))

    assert Counting.runs == 0
    assert (result.status, result.exit_code) == ("failed", 1)
    assert result.error_message is not None
    assert "dance" in result.error_message
    assert "slow_echo" in result.error_message


def test_work_returning_a_non_result_gets_a_failed_result_naming_the_type() -> None:
    class ReturnsText(EchoWorker):
        def execute_work(self, request: WorkRequest) -> WorkResult:
            return "done"  # type: ignore[return-value]

    result = runner_for(ReturnsText(Settings()))(task_for(request("echo")))

    assert (result.status, result.exit_code) == ("failed", 1)
    assert result.error_message is not None
    assert "str" in result.error_message


# -- the task as user code sees it ----------------------------------------------


def test_report_progress_outside_execute_work_raises(echo_worker: EchoWorker) -> None:
    with pytest.raises(RuntimeError, match="execute_work"):
        echo_worker.report_progress(50, "halfway")


def test_task_outside_execute_work_raises(echo_worker: EchoWorker) -> None:
    with pytest.raises(RuntimeError, match="execute_work"):
        _ = echo_worker.task


def test_cancelled_is_false_outside_a_task(echo_worker: EchoWorker) -> None:
    assert echo_worker.cancelled is False


class Reporter(EchoWorker):
    """Reports progress and records what it saw of its task from inside the work."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.seen: dict[str, Any] = {}

    def execute_work(self, request: WorkRequest) -> WorkResult:
        self.report_progress(10, "started")
        self.report_progress(100, "done")
        self.seen = {
            "request": self.task.request,
            "cancelled": self.cancelled,
            "stopping": self.stopping,
            "current": current_task(),
        }
        return WorkResult.completed(request)


def test_report_progress_inside_execute_work_reaches_the_runtime_for_its_task() -> None:
    worker = Reporter(Settings())
    progress = Progress()
    task = task_for(request("echo"))

    runner_for(worker, progress)(task)

    assert [reported for reported, _ in progress.reports] == [task, task]
    assert [status.step.name for _, status in progress.reports] == ["started", "done"]
    assert worker.seen["request"] == task.request
    assert current_task() is None  # the context ends with the work


def test_work_sees_its_task_cancelled_and_the_worker_stopping() -> None:
    worker = Reporter(Settings())
    stop = threading.Event()
    stop.set()
    task = task_for(request("echo"))
    task.cancel_reason = "time limit of 5 s exceeded"

    runner_for(worker, stop=stop)(task)

    assert worker.seen["cancelled"] is True
    assert worker.seen["stopping"] is True


@dataclass
class Record:
    cancel_reason: str | None = None


def context_posting_to(posted: list[WorkStatus]) -> TaskContext:
    record = Record()

    def post(reported: Record, status: WorkStatus) -> None:
        assert reported is record
        posted.append(status)

    return TaskContext(request("echo"), record, threading.Event(), post)


def test_progress_reports_are_numbered_one_two_three() -> None:
    posted: list[WorkStatus] = []
    context = context_posting_to(posted)

    for step in ("fetch", "build", "ship"):
        context.report_progress(50, step, output=f"{step} ok")

    assert [(s.step.number, s.step.name) for s in posted] == [
        (1, "fetch"),
        (2, "build"),
        (3, "ship"),
    ]
    assert {s.task_id for s in posted} == {context.request.task_id}
    assert posted[0].step.output == "fetch ok"


@pytest.mark.parametrize(
    ("percent", "expected", "status"),
    [
        (math.nan, 0.0, "running"),
        (-5, 0.0, "running"),
        (42.5, 42.5, "running"),
        (150, 100.0, "step_completed"),
    ],
)
def test_progress_percent_is_clamped_to_what_the_protocol_allows(
    percent: float, expected: float, status: str
) -> None:
    posted: list[WorkStatus] = []

    context_posting_to(posted).report_progress(percent, "step")

    [report] = posted
    assert report.progress_percent == expected
    assert report.status == status


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


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """StatusBuilder.start() samples a host with one 16 GiB GPU, 12 GiB free."""
    monkeypatch.setattr(
        heartbeat, "HostMetrics", lambda: HostMetrics(GpuProbe(cast(ModuleType, OneGpuNvml())))
    )


@pytest.mark.usefixtures("one_gpu")
def test_heartbeat_is_an_online_status_update_for_the_orchestrator() -> None:
    agent_id = uuid.uuid4()
    builder = heartbeat.StatusBuilder(agent_id, "infra", "reply_queue", list)
    builder.start()
    try:
        outgoing = builder.build()
    finally:
        builder.close()

    envelope = parse_envelope(outgoing.body)
    update = StatusUpdate.model_validate(envelope.payload)
    assert envelope.type == "work_status"
    assert (envelope.to_agent, envelope.from_agent) == ("orchestrator", "infra")
    assert envelope.priority == 4
    assert outgoing.priority == 4
    assert outgoing.routing_key == "reply_queue"
    assert update.status == "online"
    assert update.agent_id == agent_id
    assert update.current_task_id is None
    assert update.resources["gpu_vram_total_gb"] == 16.0
    assert update.resources["gpu_vram_available_gb"] == 12.0


@pytest.mark.usefixtures("one_gpu")
def test_heartbeat_while_a_task_runs_is_busy_and_names_it() -> None:
    task_id = str(uuid.uuid4())
    builder = heartbeat.StatusBuilder(uuid.uuid4(), "infra", "reply_queue", lambda: [task_id])
    builder.start()
    try:
        update = StatusUpdate.model_validate(parse_envelope(builder.build().body).payload)
        goodbye = StatusUpdate.model_validate(parse_envelope(builder.build("offline").body).payload)
    finally:
        builder.close()

    assert (update.status, str(update.current_task_id)) == ("busy", task_id)
    assert goodbye.status == "offline"


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
    caplog: pytest.LogCaptureFixture,
) -> None:
    reason = (
        "connection: channel closed by broker: PRECONDITION_FAILED - delivery "
        "acknowledgement on channel 1 timed out. Timeout value used: 1800000 ms."
    )
    with caplog.at_level(logging.ERROR, logger="chiffon_worker"):
        _explain_loss(reason)
        _explain_loss("connection: StreamLostError: EOF")
    [record] = caplog.records
    assert "consumer_timeout" in record.getMessage()


# -- capabilities and start-up ----------------------------------------------------

BAD_CAPABILITIES = [
    {},
    {"work_types": []},
    {"work_types": [""]},
    {"work_types": "echo"},
    {"work_types": [3]},
    [],
]


@pytest.mark.parametrize("capabilities", BAD_CAPABILITIES)
def test_capabilities_without_a_list_of_work_types_name_none(capabilities: Any) -> None:
    assert declared_work_types(capabilities) is None


def test_capabilities_listing_work_types_give_exactly_those() -> None:
    declared = declared_work_types({"work_types": ["echo", "fail"], "description": "x"})

    assert declared == frozenset({"echo", "fail"})


def vague(capabilities: object) -> type[EchoWorker]:
    """An EchoWorker class whose capabilities are `capabilities`."""

    class Vague(EchoWorker):
        def get_agent_capabilities(self) -> dict[str, Any]:
            return cast(dict[str, Any], capabilities)

    return Vague


@pytest.mark.parametrize("capabilities", BAD_CAPABILITIES)
def test_serving_a_worker_without_work_types_is_a_config_error(capabilities: Any) -> None:
    worker = vague(capabilities)(Settings())

    with pytest.raises(ConfigError, match="work_types"):
        WorkerService(worker, Settings())


@pytest.fixture
def serve_without_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve() would replace the root logger's handlers, caplog's among them."""
    monkeypatch.setattr(service, "setup_logging", lambda *_args, **_kwargs: None)


@pytest.mark.usefixtures("serve_without_logging_setup")
def test_serve_without_work_types_exits_78_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = vague({"work_types": []}).serve(Settings())

    err = capsys.readouterr().err
    assert code == EXIT_CONFIG
    assert err.count("\n") == 1
    assert "configuration error" in err
    assert "work_types" in err


@pytest.mark.usefixtures("serve_without_logging_setup")
def test_serve_shows_a_bug_in_the_users_init_with_its_traceback_and_exits_70(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(EchoWorker):
        def __init__(self, settings: Settings) -> None:
            super().__init__(settings)
            raise TypeError("typo in my own __init__")

    with caplog.at_level(logging.ERROR, logger="chiffon_worker"):
        code = Broken.serve(Settings())

    assert code == EXIT_SOFTWARE
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], TypeError)
    assert "typo in my own __init__" in caplog.text


def test_every_child_process_of_a_task_counts_even_when_the_result_is_one_of_them() -> None:
    burn = "import time\nend = time.process_time() + 0.2\nwhile time.process_time() < end: pass\n"

    class TwoSteps(EchoWorker):
        def execute_work(self, request: WorkRequest) -> WorkResult:
            first = self.task.run_process([sys.executable, "-c", burn])
            second = self.task.run_process([sys.executable, "-c", burn])
            self.seen = (first.cpu_time_ms, second.cpu_time_ms)
            return second.work_result(request)  # carries only the second's figures

    worker = TwoSteps(Settings())
    result = runner_for(worker)(task_for(request("echo", message="two")))

    assert result.status == "completed"
    both = sum(worker.seen)
    assert result.resources_used["children_cpu_time_ms"] == both
    assert result.resources_used["cpu_time_ms"] >= both
