"""``python -m bench [--quick]``: chiffon-worker against bare-pika baselines A and B.

Creates a uuid-suffixed vhost on the local broker, declares the Chiffon topology,
runs every scenario for every worker (alternating A, B, ours within each round),
prints a table of medians and writes it as JSON to bench/results/latest.json.
The vhost is deleted afterwards, also after an error or Ctrl-C.

Exit status: 0 done, 1 some scenario failed (see the errors), 2 ``--check`` and a
target was not met, 130 interrupted.
"""

import argparse
import json
import os
import platform
import signal
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import pika.exceptions
import psutil

from bench.broker import BrokerError, TemporaryVhost
from bench.harness import SCENARIOS, Bench, BenchResults, Settings
from bench.report import evaluate, failed_targets, render_table
from bench.workers import WORKER_KEYS, ours_executable

RESULTS_DIR = Path(__file__).resolve().parent / "results"

FULL = Settings(
    rounds=3,
    n_throughput=3000,
    n_latency=500,
    warmup=20,
    idle_s=10.0,
    slow_echo_s=8.0,
    heartbeat_interval_s=1.0,
)
QUICK = Settings(
    rounds=1,
    n_throughput=1000,
    n_latency=200,
    warmup=10,
    idle_s=3.0,
    slow_echo_s=4.0,
    heartbeat_interval_s=1.0,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark chiffon-worker against bare-pika baselines on the local broker.",
    )
    parser.add_argument("--quick", action="store_true", help="1 round, smaller N (< 1 minute)")
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 3, quick 1)")
    parser.add_argument("--n-throughput", type=int, help="requests in the throughput run")
    parser.add_argument("--n-latency", type=int, help="sequential requests in the latency run")
    parser.add_argument(
        "--workers",
        default=",".join(WORKER_KEYS),
        help="comma-separated subset of A,B,ours (default: all)",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS_DIR / "latest.json", help="JSON output path"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit with status 2 if ours misses a target"
    )
    args = parser.parse_args(argv)
    workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    unknown = sorted(set(workers) - set(WORKER_KEYS))
    if unknown or not workers:
        parser.error(f"--workers: choose from {','.join(WORKER_KEYS)} (got {args.workers!r})")
    args.workers = [w for w in WORKER_KEYS if w in workers]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown or not scenarios:
        parser.error(f"--scenarios: choose from {','.join(SCENARIOS)} (got {args.scenarios!r})")
    args.scenarios = [s for s in SCENARIOS if s in scenarios]
    for name in ("rounds", "n_throughput", "n_latency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    return Settings(
        rounds=args.rounds or base.rounds,
        n_throughput=args.n_throughput or base.n_throughput,
        n_latency=args.n_latency or base.n_latency,
        warmup=base.warmup,
        idle_s=base.idle_s,
        slow_echo_s=base.slow_echo_s,
        heartbeat_interval_s=base.heartbeat_interval_s,
    )


def machine_info() -> dict[str, Any]:
    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "cpu_count_logical": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "memory_total_mib": round(psutil.virtual_memory().total / (1024 * 1024)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pika": pkg("pika"),
        "chiffon_worker": pkg("chiffon-worker"),
    }


def document(
    args: argparse.Namespace,
    settings: Settings,
    results: BenchResults,
    vhost: str,
    started: datetime,
    elapsed_s: float,
) -> dict[str, Any]:
    return {
        "date": started.isoformat(),
        "elapsed_seconds": round(elapsed_s, 1),
        "quick": args.quick,
        "rounds": settings.rounds,
        "n": {
            "throughput": settings.n_throughput,
            "latency": settings.n_latency,
            "warmup": settings.warmup,
        },
        "idle_seconds": settings.idle_s,
        "slow_echo_seconds": settings.slow_echo_s,
        "heartbeat_interval_seconds": settings.heartbeat_interval_s,
        "workers": args.workers,
        "scenarios": args.scenarios,
        "machine": machine_info(),
        "rabbitmq": results.server_version,
        "vhost": vhost,
        "figures": evaluate(results),
        "skipped": results.skipped,
        "errors": results.errors,
        "notes": results.notes,
        "runs": results.runs,
    }


def _on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    started, t0 = datetime.now(UTC), time.monotonic()
    logs_dir = RESULTS_DIR / "logs"
    for old_log in logs_dir.glob("*.log"):
        old_log.unlink()
    results = BenchResults()
    selected = list(args.workers)
    if "ours" in selected and not ours_executable().exists():
        results.skipped["ours"] = (
            f"{ours_executable()} not found; install the package (make install) to include it"
        )
        selected.remove("ours")
    for key, reason in results.skipped.items():
        print(f"skipping {key}: {reason}")
    print(
        f"rounds {settings.rounds}, throughput N {settings.n_throughput}, "
        f"latency N {settings.n_latency}, idle {settings.idle_s:g} s, "
        f"slow_echo {settings.slow_echo_s:g} s, workers {','.join(selected) or 'none'}, "
        f"scenarios {','.join(args.scenarios)}"
    )
    vhost_name = ""
    try:
        with TemporaryVhost() as vhost:
            vhost_name = vhost.name
            print(f"vhost {vhost_name}")
            if selected:
                bench = Bench(vhost.name, vhost.url, settings, selected, args.scenarios, logs_dir)
                bench.results.skipped.update(results.skipped)
                results = bench.run()
    except KeyboardInterrupt:
        print("interrupted; vhost removed", file=sys.stderr)
        return 130
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except pika.exceptions.AMQPError as exc:
        print(f"error: broker connection failed: {exc!r}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - t0

    print()
    print(render_table(results, args.workers, args.scenarios))
    for key, reason in results.skipped.items():
        print(f"\nskipped {key}: {reason}")
    for note in results.notes:
        print(f"note: {note}")
    for error in results.errors:
        print(f"error: {error}")
    doc = document(args, settings, results, vhost_name, started, elapsed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.output} ({elapsed:.1f} s)")

    if results.errors:
        return 1
    if args.check and failed_targets(results):
        print(f"targets not met: {', '.join(failed_targets(results))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
