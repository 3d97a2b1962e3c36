"""amqps:// end to end: a real worker process against a private RabbitMQ node with TLS.

The node is started once for this module (tests/helpers/tls_node.py) with
certificates made now: a CA, a server certificate for "localhost" only, a client
certificate, and an unrelated second CA. With CI=true a node that cannot start
fails the run; elsewhere these tests skip.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chiffon_worker.amqp import open_connection
from chiffon_worker.config import TlsFiles
from chiffon_worker.errors import EXIT_NOPERM, BrokerAuthError, BrokerUnavailable, ChiffonError
from tests.helpers.broker import Orchestrator, work_request
from tests.helpers.nodes import running
from tests.helpers.process import Launcher, WorkerProcess
from tests.helpers.tls_node import CLIENT_NAME, HOST, TlsNode

pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]
REFUSED = "broker refused us"


@pytest.fixture(scope="module")
def tls_node() -> Iterator[TlsNode]:
    with running(TlsNode, "chiffon-tls-", "a private RabbitMQ node with TLS") as node:
        yield node


@pytest.fixture
def orchestrator(tls_node: TlsNode) -> Iterator[Orchestrator]:
    """An orchestrator on the TLS node; it trusts the CA and shows no certificate."""
    with Orchestrator(tls_node.url(), ssl_context=tls_node.client_context()) as peer:
        peer.watch("reply_queue")
        yield peer


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[StartWorker]:
    """Start `chiffon-worker run` processes; all are killed after the test."""
    with Launcher(tmp_path) as launcher:
        yield launcher.start


def trusting(node: TlsNode, *, ca: Path | None = None) -> dict[str, Path]:
    """CHIFFON_TLS_* settings: our client certificate, and the given CA (the node's)."""
    pki = node.certificates
    return {
        "tls_ca_file": ca or pki.ca,
        "tls_cert_file": pki.client_cert,
        "tls_key_file": pki.client_key,
    }


def exit_code(worker: WorkerProcess, timeout: float = 20) -> int:
    try:
        return worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker still runs after {timeout} s; its log: {worker.messages()}")


def refusal_reason(worker: WorkerProcess) -> str:
    records = worker.records()
    reasons = [r.get("reason", "") for r in records if r.get("message", "").startswith(REFUSED)]
    assert reasons, f"no '{REFUSED}' line in the log: {worker.messages()}"
    return str(reasons[0])


def test_worker_serves_a_request_over_tls_presenting_its_client_certificate(
    tls_node: TlsNode, orchestrator: Orchestrator, start_worker: StartWorker
) -> None:
    start_worker(tls_node.url(), **trusting(tls_node))
    request = work_request("echo", {"message": "over tls"})
    orchestrator.publish(request)

    result = orchestrator.wait_for_result(request, timeout=20)["payload"]

    assert (result["status"], result["output"]) == ("completed", "over tls")
    # The orchestrator shows no certificate, so this subject is the worker's.
    assert f"CN={CLIENT_NAME}" in tls_node.peer_cert_subjects()


def test_worker_that_does_not_trust_the_brokers_ca_exits_77_saying_so_without_the_password(
    tls_node: TlsNode, start_worker: StartWorker
) -> None:
    # The handshake fails before any login, so this password never reaches the
    # broker; it is here to prove the refusal does not print it.
    password = f"pw-{uuid.uuid4().hex}"
    url = tls_node.url(password=password)
    worker = start_worker(url, **trusting(tls_node, ca=tls_node.certificates.other_ca))

    assert exit_code(worker) == EXIT_NOPERM
    reason = refusal_reason(worker)
    assert reason.startswith("TLS: the broker's certificate"), reason
    assert "is not trusted" in reason
    assert "CERTIFICATE_VERIFY_FAILED" in reason
    assert f"localhost:{tls_node.port}" in reason
    assert password not in worker.log_path.read_text()


def test_hostname_is_verified_by_default_so_an_address_the_certificate_does_not_name_is_refused(
    tls_node: TlsNode, start_worker: StartWorker
) -> None:
    # The right CA and client certificate; only the host differs from the first test.
    worker = start_worker(tls_node.url(host=HOST), **trusting(tls_node))

    assert exit_code(worker) == EXIT_NOPERM
    reason = refusal_reason(worker)
    assert reason.startswith("TLS: the broker's certificate"), reason
    assert "is not trusted" in reason
    assert f"not valid for '{HOST}'" in reason


def test_worker_with_hostname_check_off_serves_a_request_through_an_address_the_cert_lacks(
    tls_node: TlsNode, orchestrator: Orchestrator, start_worker: StartWorker
) -> None:
    worker = start_worker(
        tls_node.url(host=HOST), tls_verify_hostname="false", **trusting(tls_node)
    )
    request = work_request("echo", {"message": "by address"})
    orchestrator.publish(request)

    result = orchestrator.wait_for_result(request, timeout=20)["payload"]

    assert (result["status"], result["output"]) == ("completed", "by address")
    assert not [m for m in worker.messages() if m.startswith(REFUSED)]


def test_a_client_certificate_the_broker_does_not_trust_is_refused_not_retried(
    tls_node: TlsNode,
) -> None:
    pki = tls_node.certificates
    # We trust the broker; the broker does not trust the CA that signed our certificate.
    tls = TlsFiles(str(pki.ca), str(pki.other_client_cert), str(pki.other_client_key))

    # Under TLS 1.3 the broker's alert can be lost in a race with its closing
    # the socket; the worker then retries, saying what it suspects. The alert
    # comes through on most tries (fewer on a loaded machine), so twenty tries
    # without it mean the refusal is not recognised at all.
    outcomes: list[ChiffonError] = []
    for _ in range(20):
        try:
            open_connection(tls_node.url(), heartbeat=30, blocked_timeout=10, tls=tls).close()
        except (BrokerAuthError, BrokerUnavailable) as exc:
            outcomes.append(exc)
            if isinstance(exc, BrokerAuthError):
                break
    refused = [str(o) for o in outcomes if isinstance(o, BrokerAuthError)]
    suspected = [str(o) for o in outcomes if isinstance(o, BrokerUnavailable)]
    assert refused, f"never refused, only: {suspected}"
    assert "does not accept our client certificate" in refused[0]
    assert all("may not accept our client certificate" in text for text in suspected)
