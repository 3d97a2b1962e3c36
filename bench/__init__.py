"""Benchmark harness: chiffon-worker against two bare-pika baselines on a throwaway vhost.

Run it with ``python -m bench`` (``make bench``) or ``python -m bench --quick``
(``make bench-quick``). The baselines live in :mod:`bench.baseline`, the broker
plumbing in :mod:`bench.broker`, worker processes in :mod:`bench.workers`, the
scenarios in :mod:`bench.harness` and the table/JSON output in :mod:`bench.report`.
"""
