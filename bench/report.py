"""Medians, targets, the printed table and the JSON document."""

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.harness import BenchResults

WORKER_COLUMNS: tuple[str, ...] = ("A", "B", "ours")


@dataclass(frozen=True)
class Target:
    text: str
    # (ours median, B median) -> pass? ; None when it cannot be judged
    check: Callable[[float, float | None], bool | None]


def _ratio_to_b(limit: float, at_least: bool) -> Callable[[float, float | None], bool | None]:
    def check(ours: float, b: float | None) -> bool | None:
        if b is None or b == 0:
            return None
        ratio = ours / b
        return ratio >= limit if at_least else ratio <= limit

    return check


def _absolute(limit: float) -> Callable[[float, float | None], bool | None]:
    def check(ours: float, b: float | None) -> bool | None:
        return ours <= limit

    return check


@dataclass(frozen=True)
class Figure:
    key: str
    scenario: str
    label: str
    unit: str
    decimals: int
    target: Target | None = None
    ours_only: bool = False


FIGURES: tuple[Figure, ...] = (
    Figure(
        "throughput",
        "throughput",
        "throughput",
        "msg/s",
        0,
        Target(">= 0.9x B", _ratio_to_b(0.9, True)),
    ),
    Figure("cpu_per_message", "throughput", "worker CPU per message", "us", 0),
    Figure("latency_p50", "latency", "latency p50", "ms", 3),
    Figure(
        "latency_p99",
        "latency",
        "latency p99",
        "ms",
        3,
        Target("<= 1.3x B", _ratio_to_b(1.3, False)),
    ),
    Figure(
        "rss", "throughput", "RSS after throughput", "MiB", 1, Target("<= 40 MiB", _absolute(40.0))
    ),
    Figure("idle_cpu", "idle", "idle CPU", "%", 3, Target("<= 0.5 %", _absolute(0.5))),
    # Same measurement from /proc/PID/task/*/schedstat (ns resolution), for information only.
    Figure("idle_cpu_schedstat", "idle", "idle CPU, schedstat", "%", 3),
    Figure(
        "hb_lateness",
        "heartbeat",
        "heartbeat lateness",
        "s",
        3,
        Target("<= 1 s", _absolute(1.0)),
        ours_only=True,
    ),
)


def median_of(results: BenchResults, figure: str, worker: str) -> float | None:
    values = results.samples.get(figure, {}).get(worker, [])
    return statistics.median(values) if values else None


def _cell(
    results: BenchResults, fig: Figure, worker: str, workers: list[str], scenarios: list[str]
) -> str:
    if fig.ours_only and worker != "ours":
        return "n/a"
    value = median_of(results, fig.key, worker)
    if value is not None:
        return f"{value:.{fig.decimals}f}"
    if worker in results.skipped:
        return "skipped"
    if worker not in workers or fig.scenario not in scenarios:
        return "-"
    return "error"


def evaluate(results: BenchResults) -> dict[str, dict[str, Any]]:
    """Per figure: medians, ours/B ratio, target text and pass (True/False/None)."""
    table: dict[str, dict[str, Any]] = {}
    for fig in FIGURES:
        medians = {w: median_of(results, fig.key, w) for w in WORKER_COLUMNS}
        ours, b = medians["ours"], medians["B"]
        ratio = ours / b if ours is not None and b else None
        passed: bool | None = None
        if fig.target is not None and ours is not None:
            passed = fig.target.check(ours, b)
        table[fig.key] = {
            "label": fig.label,
            "unit": fig.unit,
            **{
                w: {
                    "median": medians[w],
                    "rounds": results.samples.get(fig.key, {}).get(w, []),
                }
                for w in WORKER_COLUMNS
                if not (fig.ours_only and w != "ours")
            },
            "ours_over_B": ratio,
            "target": fig.target.text if fig.target else None,
            "pass": passed,
        }
    return table


def render_table(results: BenchResults, workers: list[str], scenarios: list[str]) -> str:
    """The figure | A | B | ours | ours/B | target | verdict table (medians over rounds)."""
    evaluated = evaluate(results)
    header = ["figure", "A", "B", "ours", "ours/B", "target", "ours meets it"]
    rows: list[list[str]] = [header]
    for fig in FIGURES:
        row = [f"{fig.label} ({fig.unit})"]
        row += [_cell(results, fig, w, workers, scenarios) for w in WORKER_COLUMNS]
        ratio = evaluated[fig.key]["ours_over_B"]
        row.append(f"{ratio:.2f}" if ratio is not None and not fig.ours_only else "")
        row.append(fig.target.text if fig.target else "")
        passed = evaluated[fig.key]["pass"]
        if fig.target is None:
            row.append("")
        else:
            row.append({True: "PASS", False: "FAIL", None: "-"}[passed])
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return " | ".join([first, *rest]).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def failed_targets(results: BenchResults) -> list[str]:
    """Figures whose target was not met (or could not be judged)."""
    return [
        fig.label
        for fig in FIGURES
        if fig.target is not None and evaluate(results)[fig.key]["pass"] is not True
    ]
