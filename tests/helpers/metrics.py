"""Test-side access to the Prometheus exporter: a free port, and reading /metrics."""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections.abc import Callable

# One exposition line: name, optional {labels}, value (timestamps are not used).
_SAMPLE = re.compile(r"^(?P<series>[a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (?P<value>\S+)$")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; we let it go at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 5) -> dict[str, float]:
    """GET /metrics once: {'name{labels}': value} for every sample line."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
        text: str = response.read().decode("utf-8")
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not an exposition line: {line!r}"
        samples[match["series"]] = float(match["value"])
    return samples


def scrape_until(
    port: int,
    condition: Callable[[dict[str, float]], bool],
    timeout: float,
    what: str = "the expected metrics",
) -> dict[str, float]:
    """Scrape until `condition(samples)` holds; fail after `timeout` s with the last scrape."""
    deadline = time.monotonic() + timeout
    last: dict[str, float] | str = "no scrape answered"
    while time.monotonic() < deadline:
        try:
            samples = scrape(port, timeout=min(5.0, max(0.1, deadline - time.monotonic())))
        except OSError as exc:  # not listening yet (URLError is an OSError)
            last = f"endpoint not answering: {exc}"
        else:
            if condition(samples):
                return samples
            last = {
                name: value
                for name, value in samples.items()
                if name.startswith("chiffon_worker_") and not name.endswith(("_created", "}"))
            }
        # Paced polling of an HTTP endpoint that has no event to wait on.
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last}")
