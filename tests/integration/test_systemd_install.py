"""systemd/install.sh in its dry mode (DESTDIR=): what lands where, and what it refuses."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers.ci import systemd_analyze

pytestmark = pytest.mark.integration

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
INSTALL_SH = SYSTEMD_DIR / "install.sh"
UNITS = ("chiffon-worker.service", "chiffon-worker@.service")
PLACEHOLDER_EXEC_START = "ExecStart=/opt/chiffon-worker/venv/bin/chiffon-worker run"
# Commands a dry install must never run: they would change the machine running the test.
SYSTEM_CHANGING = ("useradd", "groupadd", "systemctl", "chgrp", "chown")


class Installer:
    """Runs install.sh with DESTDIR=root and stubs that record any system-changing command."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        self.stub_log = tmp_path / "stub-calls.log"
        self.stub_bin = tmp_path / "stub-bin"
        self.stub_bin.mkdir()
        for name in SYSTEM_CHANGING:
            stub = self.stub_bin / name
            stub.write_text('#!/bin/sh\necho "$0 $*" >> "$STUB_LOG"\n', encoding="utf-8")
            stub.chmod(0o755)

    def run(self, *args: str, destdir: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.stub_bin}{os.pathsep}{env.get('PATH', '')}"
        env["STUB_LOG"] = str(self.stub_log)
        env["DESTDIR"] = str(self.root) if destdir is None else destdir
        return subprocess.run(
            ["bash", str(INSTALL_SH), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    def system_changing_calls(self) -> str:
        return self.stub_log.read_text(encoding="utf-8") if self.stub_log.exists() else ""

    @property
    def unit_dir(self) -> Path:
        return self.root / "etc/systemd/system"

    @property
    def conf_dir(self) -> Path:
        return self.root / "etc/chiffon-worker"


@pytest.fixture
def installer(tmp_path: Path) -> Installer:
    return Installer(tmp_path)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("venv", ["/srv/chiffon/venv", "/srv/chiffon/venv/"])
def test_units_land_with_exec_start_in_the_given_venv(installer: Installer, venv: str) -> None:
    result = installer.run(venv)
    assert result.returncode == 0, result.stderr

    for unit in UNITS:
        installed = (installer.unit_dir / unit).read_text(encoding="utf-8").splitlines()
        source = (SYSTEMD_DIR / unit).read_text(encoding="utf-8").splitlines()
        expected = [
            "ExecStart=/srv/chiffon/venv/bin/chiffon-worker run"
            if line == PLACEHOLDER_EXEC_START
            else line
            for line in source
        ]
        assert installed == expected
        assert expected != source  # the placeholder line was there to be replaced
        assert mode(installer.unit_dir / unit) == 0o644


def test_env_file_is_created_from_the_example_and_kept_private(installer: Installer) -> None:
    result = installer.run("/srv/chiffon/venv")
    assert result.returncode == 0, result.stderr

    example = (SYSTEMD_DIR / "chiffon-worker.env.example").read_bytes()
    env_file = installer.conf_dir / "chiffon-worker.env"
    assert env_file.read_bytes() == example
    assert mode(env_file) == 0o640
    assert mode(installer.conf_dir) == 0o750
    assert (installer.conf_dir / "chiffon-worker.env.example").read_bytes() == example


def test_dry_install_changes_nothing_outside_destdir(installer: Installer) -> None:
    result = installer.run("/srv/chiffon/venv")
    assert result.returncode == 0, result.stderr
    assert installer.system_changing_calls() == ""


def test_rerun_replaces_units_but_keeps_an_edited_env_file(installer: Installer) -> None:
    assert installer.run("/srv/old/venv").returncode == 0
    env_file = installer.conf_dir / "chiffon-worker.env"
    env_file.write_text("CHIFFON_AGENT_TYPE=code\n", encoding="utf-8")

    result = installer.run("/srv/new/venv")
    assert result.returncode == 0, result.stderr
    assert env_file.read_text(encoding="utf-8") == "CHIFFON_AGENT_TYPE=code\n"
    unit = (installer.unit_dir / "chiffon-worker.service").read_text(encoding="utf-8")
    assert "ExecStart=/srv/new/venv/bin/chiffon-worker run\n" in unit
    assert "/srv/old/venv" not in unit


def test_next_steps_name_both_ways_to_start(installer: Installer) -> None:
    result = installer.run("/srv/chiffon/venv")
    assert result.returncode == 0, result.stderr
    assert "systemctl enable --now chiffon-worker\n" in result.stdout
    assert "systemctl enable --now chiffon-worker@NAME" in result.stdout


def test_missing_venv_argument_prints_usage(installer: Installer) -> None:
    result = installer.run()
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert not installer.root.exists()


@pytest.mark.parametrize(
    "venv",
    ["relative/venv", "/opt/my venv", "/opt/100%/venv", "/opt/a|b"],
    ids=["relative", "space", "percent", "pipe"],
)
def test_unsafe_venv_path_is_refused_before_writing(installer: Installer, venv: str) -> None:
    result = installer.run(venv)
    assert result.returncode == 1
    assert "VENV_PATH" in result.stderr
    assert not installer.root.exists()


def test_installed_units_pass_systemd_analyze_verify(installer: Installer, tmp_path: Path) -> None:
    analyze = systemd_analyze()
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    script = venv / "bin" / "chiffon-worker"
    script.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    script.chmod(0o755)
    result = installer.run(str(venv))
    assert result.returncode == 0, result.stderr

    for target in ("chiffon-worker.service", "chiffon-worker@demo.service"):
        completed = subprocess.run(
            [analyze, "verify", "--man=no", str(installer.unit_dir / target)],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        output = completed.stdout + completed.stderr
        assert [line for line in output.splitlines() if "chiffon-worker" in line] == [], output
        assert completed.returncode == 0, output
