"""The systemd units: `systemd-analyze verify` finds nothing to say, and the key settings hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.ci import systemd_analyze

pytestmark = pytest.mark.integration

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
PLAIN = "chiffon-worker.service"
TEMPLATE = "chiffon-worker@.service"
INSTANCE = "chiffon-worker@demo.service"
# install.sh replaces this path; the units must keep it verbatim.
PLACEHOLDER_EXEC_START = "/opt/chiffon-worker/venv/bin/chiffon-worker run"
# The worker's default CHIFFON_SHUTDOWN_TIMEOUT, which TimeoutStopSec= must exceed.
DEFAULT_SHUTDOWN_TIMEOUT_S = 30

Directives = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Directives:
    """[Section] -> key -> values in file order (systemd allows keys to repeat)."""
    sections: Directives = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        assert not line.endswith("\\"), "continuation lines are not used in our units"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(directives: Directives, section: str, key: str) -> str:
    values = directives.get(section, {}).get(key)
    assert values is not None, f"[{section}] {key}= is missing"
    assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times: {values}"
    return values[0]


def runnable_copy(unit: str, directory: Path) -> Path:
    """The unit with ExecStart= pointing at this Python, so verify finds an executable."""
    source = (SYSTEMD_DIR / unit).read_text(encoding="utf-8")
    exec_start = "ExecStart=" + PLACEHOLDER_EXEC_START
    assert source.count(exec_start + "\n") == 1
    python = sys.executable.replace("%", "%%")  # % starts a specifier in unit files
    copy = directory / unit
    copy.write_text(source.replace(exec_start, f'ExecStart="{python}" -V'), encoding="utf-8")
    return copy


def verify(analyze: str, target: Path) -> tuple[int, list[str], str]:
    """Run verify; return its exit code, the output lines about chiffon-worker, all output."""
    completed = subprocess.run(
        [analyze, "verify", "--man=no", str(target)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=target.parent,
        check=False,
    )
    output = completed.stdout + completed.stderr
    # Other units of the host may be reported too; only lines about ours count.
    ours = [line for line in output.splitlines() if "chiffon-worker" in line]
    return completed.returncode, ours, output


@pytest.fixture(scope="module")
def analyze() -> str:
    return systemd_analyze()


@pytest.mark.parametrize(("unit", "target"), [(PLAIN, PLAIN), (TEMPLATE, INSTANCE)])
def test_systemd_analyze_verify_reports_nothing(
    analyze: str, tmp_path: Path, unit: str, target: str
) -> None:
    runnable_copy(unit, tmp_path)
    returncode, ours, output = verify(analyze, tmp_path / target)
    assert ours == [], output
    assert returncode == 0, output


def test_verify_check_catches_a_bad_directive(analyze: str, tmp_path: Path) -> None:
    """Guards the test above: a broken copy must produce lines the filter keeps."""
    copy = runnable_copy(TEMPLATE, tmp_path)
    text = copy.read_text(encoding="utf-8")
    copy.write_text(text.replace("\nType=notify\n", "\nType=notify-please\n"), encoding="utf-8")
    _, ours, output = verify(analyze, tmp_path / INSTANCE)
    assert any("notify-please" in line for line in ours), output


@pytest.fixture(params=[PLAIN, TEMPLATE])
def unit(request: pytest.FixtureRequest) -> Directives:
    name: str = request.param
    return parse_unit((SYSTEMD_DIR / name).read_text(encoding="utf-8"))


def test_unit_is_type_notify_with_main_process_access(unit: Directives) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"


def test_unit_runs_the_console_script_from_the_placeholder_venv(unit: Directives) -> None:
    assert one(unit, "Service", "ExecStart") == PLACEHOLDER_EXEC_START


def test_stop_timeout_exceeds_the_worker_shutdown_timeout(unit: Directives) -> None:
    timeout = one(unit, "Service", "TimeoutStopSec")
    assert timeout.isdigit(), f"TimeoutStopSec={timeout}: keep it in plain seconds"
    assert int(timeout) > DEFAULT_SHUTDOWN_TIMEOUT_S
    assert one(unit, "Service", "KillSignal") == "SIGTERM"


def test_config_and_credential_errors_are_not_restarted(unit: Directives) -> None:
    assert one(unit, "Service", "Restart") == "on-failure"
    statuses = one(unit, "Service", "RestartPreventExitStatus").split()
    assert "78" in statuses  # EX_CONFIG
    assert "77" in statuses  # EX_NOPERM


def test_watchdog_is_enabled(unit: Directives) -> None:
    assert int(one(unit, "Service", "WatchdogSec")) > 0


def test_runs_as_a_dedicated_user(unit: Directives) -> None:
    user = one(unit, "Service", "User")
    assert user not in ("", "root", "0")
    assert "DynamicUser" not in unit["Service"]


def test_sandbox_settings(unit: Directives) -> None:
    service = unit["Service"]
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "ProtectHome") == "yes"
    assert one(unit, "Service", "CapabilityBoundingSet") == ""
    families = set(one(unit, "Service", "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    # /dev/nvidia* must stay reachable for GPU stats.
    assert service.get("PrivateDevices", ["no"]) == ["no"]
    assert "DeviceAllow" not in service


def test_waits_for_network_and_installs_into_multi_user(unit: Directives) -> None:
    assert "network-online.target" in one(unit, "Unit", "Wants").split()
    after = one(unit, "Unit", "After").split()
    assert {"network-online.target", "rabbitmq-server.service"} <= set(after)
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_plain_unit_reads_its_env_file() -> None:
    unit = parse_unit((SYSTEMD_DIR / PLAIN).read_text(encoding="utf-8"))
    assert one(unit, "Service", "EnvironmentFile") == "/etc/chiffon-worker/chiffon-worker.env"


def test_template_reads_the_instance_env_file() -> None:
    unit = parse_unit((SYSTEMD_DIR / TEMPLATE).read_text(encoding="utf-8"))
    assert one(unit, "Service", "EnvironmentFile") == "/etc/chiffon-worker/%i.env"


def test_plain_unit_and_template_differ_only_in_description_and_env_file() -> None:
    plain = parse_unit((SYSTEMD_DIR / PLAIN).read_text(encoding="utf-8"))
    template = parse_unit((SYSTEMD_DIR / TEMPLATE).read_text(encoding="utf-8"))
    for directives in (plain, template):
        del directives["Unit"]["Description"]
        del directives["Service"]["EnvironmentFile"]
    assert plain == template
