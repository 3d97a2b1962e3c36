"""chiffon_worker: a synchronous, threaded RabbitMQ worker for the Chiffon agent protocol."""

__version__ = "0.1.0"

from chiffon_worker.context import TaskContext, current_task
from chiffon_worker.protocol import WorkRequest, WorkResult
from chiffon_worker.worker import WorkerBase

__all__ = [
    "TaskContext",
    "WorkRequest",
    "WorkResult",
    "WorkerBase",
    "__version__",
    "current_task",
]
