"""What a test does when something it needs is missing: fail under CI, skip elsewhere."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(message: str) -> NoReturn:
    """On a laptop a missing broker or tool skips; in CI it must never pass silently."""
    if under_ci():
        pytest.fail(f"{message} (CI=true: this is a failure, not a skip)")
    pytest.skip(message)


def systemd_analyze() -> str:
    """Path of systemd-analyze, which the unit checks need."""
    found = shutil.which("systemd-analyze")
    if found is None:
        missing("systemd-analyze not found (Debian/Ubuntu: apt-get install systemd)")
    return found
