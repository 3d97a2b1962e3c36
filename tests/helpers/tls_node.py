"""A private RabbitMQ node with a TLS listener, and certificates made at test time.

The node is a second one next to the machine's broker, never that broker:
its own node name, cookie, ports, data, logs, config and (empty) plugin list,
all under one temporary directory, listening on 127.0.0.1 only and with the
plain AMQP listener turned off. Certificates come from the `openssl` CLI.

The scripts in /usr/lib/rabbitmq/bin are run directly, as the current user,
with HOME in that directory: the Debian wrappers in /usr/sbin would switch to
the rabbitmq user (whose ~/.erlang.cookie is the main node's) and could not
read a private directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
SERVER_NAME = "localhost"  # the only name the server certificate carries
CLIENT_NAME = "chiffon-worker-client"  # the subject CN of the client certificate
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# Where Debian/RPM packages keep the real scripts; elsewhere they are on PATH.
SCRIPT_DIRS = (Path("/usr/lib/rabbitmq/bin"),)


class NodeUnavailable(RuntimeError):
    """The private node (or a tool it needs) could not be set up."""


# -- certificates -------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA with a server and a client certificate; an unrelated CA with a client of its own."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
_DAYS = ("-days", "2")
_CA_CONSTRAINTS = "basicConstraints=critical,CA:TRUE"
_CA_KEY_USAGE = "keyUsage=critical,keyCertSign,cRLSign"

_SERVER_EXTENSIONS = f"""\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:{SERVER_NAME}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

_CLIENT_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl(*args: str | Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise NodeUnavailable("the openssl command is not installed")
    done = subprocess.run(
        [openssl, *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise NodeUnavailable(f"openssl {args[0]} failed: {done.stderr.strip()}")


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subject = ("-subj", f"/CN={name}", "-addext", _CA_CONSTRAINTS, "-addext", _CA_KEY_USAGE)
    _openssl("req", "-x509", *_EC_KEY, *_DAYS, *subject, "-keyout", key, "-out", cert)
    return cert, key


def _issue(
    directory: Path, name: str, common_name: str, extensions: str, ca: tuple[Path, Path]
) -> tuple[Path, Path]:
    cert, key, csr = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(extensions)
    _openssl("req", "-new", *_EC_KEY, "-keyout", key, "-out", csr, "-subj", f"/CN={common_name}")
    serial = f"0x{secrets.token_hex(8)}"
    signing = ("-CA", ca[0], "-CAkey", ca[1], "-set_serial", serial, *_DAYS)
    _openssl("x509", "-req", "-in", csr, *signing, "-extfile", ext_file, "-out", cert)
    return cert, key


def make_pki(directory: Path) -> Pki:
    """Fresh keys and certificates under `directory` (EC P-256: fast to make)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(directory, "chiffon-test-ca")
    server = _issue(directory, "server", SERVER_NAME, _SERVER_EXTENSIONS, ca)
    client = _issue(directory, "client", CLIENT_NAME, _CLIENT_EXTENSIONS, ca)
    other_ca = _make_ca(directory, "unrelated-ca")
    other_client = _issue(directory, "other-client", CLIENT_NAME, _CLIENT_EXTENSIONS, other_ca)
    return Pki(
        ca=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        other_ca=other_ca[0],
        other_client_cert=other_client[0],
        other_client_key=other_client[1],
    )


# -- the node -----------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct ports free on the loopback right now (all held open until chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


def _scripts_dir() -> Path:
    for directory in SCRIPT_DIRS:
        if (directory / "rabbitmq-server").is_file() and (directory / "rabbitmqctl").is_file():
            return directory
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise NodeUnavailable("rabbitmq-server is not installed")
    return Path(found).resolve().parent


def _excerpt(path: Path) -> str:
    """The first error lines of a node's output (where the cause is) and its last lines."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(none)"
    errors = [line for line in lines if "error" in line.lower()][:10]
    return "\n".join([*errors, "...", *lines[-5:]]) if errors else "\n".join(lines[-15:])


class TlsNode:
    """One private RabbitMQ node with only a TLS listener, run in the foreground."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.node = f"chiffon-tls-{uuid.uuid4().hex[:12]}@localhost"
        self.port, self.dist_port = free_ports(2)
        self._pki: Pki | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._output = base / "server.out"
        self._pid_file = base / "mnesia" / f"{self.node}.pid"
        self._scripts: Path | None = None

    # -- what tests use --------------------------------------------------------

    def url(self, host: str = SERVER_NAME, password: str = "guest") -> str:
        return f"amqps://guest:{password}@{host}:{self.port}/%2F"

    @property
    def certificates(self) -> Pki:
        assert self._pki is not None, "the node was not started"
        return self._pki

    def client_context(self) -> ssl.SSLContext:
        """Trusts the node's CA; presents no client certificate."""
        return ssl.create_default_context(cafile=str(self.certificates.ca))

    def peer_cert_subjects(self) -> list[str]:
        """The client certificate subject of each open connection ('' without one)."""
        out = self.rabbitmqctl(
            "list_connections", "peer_cert_subject", "--quiet", "--no-table-headers"
        )
        return [line.strip() for line in out.splitlines()]

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Make certificates, write the config, boot the node and wait until it serves."""
        self._scripts = _scripts_dir()
        for name in ("home", "mnesia", "log"):
            (self.base / name).mkdir()
        cookie = self.base / "home" / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "rabbitmq.conf").write_text(self._listeners())
        server = self._scripts / "rabbitmq-server"
        with self._output.open("wb") as output:
            try:
                self._process = subprocess.Popen(
                    [str(server)],
                    env=self._env(),
                    cwd=self.base,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own group: pytest's Ctrl-C is for us to pass on
                )
            except OSError as exc:
                raise NodeUnavailable(f"cannot run {server}: {exc}") from None
        self._await_startup(time.monotonic() + timeout)

    def _listeners(self) -> str:
        """The listener part of rabbitmq.conf: TLS only (certificates made here)."""
        self._pki = make_pki(self.base / "pki")
        return (
            "listeners.tcp = none\n"
            f"listeners.ssl.default = {HOST}:{self.port}\n"
            f"ssl_options.cacertfile = {self._pki.ca}\n"
            f"ssl_options.certfile = {self._pki.server_cert}\n"
            f"ssl_options.keyfile = {self._pki.server_key}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )

    def _await_startup(self, deadline: float) -> None:
        # await_startup gives up at once while the node is not yet known to epmd;
        # the pid file appears only after it is, so wait for that first.
        assert self._process is not None
        while not self._pid_file.exists():
            if self._process.poll() is not None:
                raise self._failed(f"rabbitmq-server ended (status {self._process.returncode})")
            if time.monotonic() > deadline:
                raise self._failed("no pid file: the node did not boot in time")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=0.1)
        left = max(1, int(deadline - time.monotonic()))
        try:
            done = self._ctl("await_startup", "--timeout", str(left), timeout=left + 15)
        except subprocess.TimeoutExpired:
            raise self._failed("rabbitmqctl await_startup did not return") from None
        if done.returncode != 0:
            raise self._failed(f"await_startup: {done.stdout.strip()} {done.stderr.strip()}")

    def _failed(self, why: str) -> NodeUnavailable:
        return NodeUnavailable(
            f"{self.node} on {HOST}:{self.port}: {why}\n--- server output ---\n"
            f"{_excerpt(self._output)}\n--- server log ---\n"
            f"{_excerpt(self.base / 'log' / f'{self.node}.log')}"
        )

    def stop(self) -> None:
        """Stop the node: politely, then by signal to its own process group."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self._ctl("stop", timeout=STOP_TIMEOUT)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            for signum in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signum)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=15)
                    break
        self._process = None

    # -- rabbitmqctl ---------------------------------------------------------

    def rabbitmqctl(self, *args: str) -> str:
        done = self._ctl(*args, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def _ctl(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        assert self._scripts is not None
        return subprocess.run(
            [str(self._scripts / "rabbitmqctl"), "-n", self.node, *args],
            env=self._env(),
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_", "CHIFFON_"))
        }
        base = self.base
        env.update(
            {
                # Our own cookie: the server and our rabbitmqctl both read $HOME's.
                "HOME": str(base / "home"),
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                # Not /etc/rabbitmq/rabbitmq-env.conf: it names the main node.
                "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
                "RABBITMQ_PID_FILE": str(self._pid_file),
                # Erlang distribution (and an epmd we might start) on loopback only.
                "ERL_EPMD_ADDRESS": HOST,
                "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        return env
