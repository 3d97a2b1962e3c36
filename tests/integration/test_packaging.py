"""The distribution: built with `python -m build`, installed into a clean virtualenv."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from chiffon_worker import __version__
from tests.helpers.process import REPO_ROOT

pytestmark = pytest.mark.integration


def _run(*command: str | Path, cwd: Path = REPO_ROOT) -> str:
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# Builds and installs a wheel (~16 s): in make test-slow.
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_installs_in_a_clean_venv_and_reports_the_one_version(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", dist, REPO_ROOT)
    wheels = list(dist.glob("chiffon_worker-*.whl"))
    sdists = list(dist.glob("chiffon_worker-*.tar.gz"))
    assert len(wheels) == 1
    assert len(sdists) == 1
    assert f"-{__version__}-" in wheels[0].name

    target = tmp_path / "clean"
    venv.create(target, with_pip=True)
    _run(target / "bin" / "pip", "install", "--quiet", wheels[0])
    # Run from elsewhere, so the checkout cannot stand in for the installed package.
    printed = _run(target / "bin" / "chiffon-worker", "--version", cwd=tmp_path)
    assert printed.strip() == f"chiffon-worker {__version__}"
    listing = _run(target / "bin" / "python", "-m", "chiffon_worker", "--help", cwd=tmp_path)
    assert "run" in listing
    assert "send" in listing
