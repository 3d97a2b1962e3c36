"""chiffon_worker: a synchronous, threaded RabbitMQ worker for the Chiffon agent protocol."""

__version__ = "0.1.0"
