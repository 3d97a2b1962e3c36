"""PlaybookWorker processes for the tests, each with a playbook dir of its own."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers.process import REPO_ROOT, WorkerProcess

WORKER = "chiffon_worker.playbook:PlaybookWorker"
PLAYBOOKS = REPO_ROOT / "tests" / "playbooks"


def copy_playbooks(tmp_path: Path) -> Path:
    """A copy of tests/playbooks: a test may add files (a symlink out) without touching the tree."""
    directory = tmp_path / "playbooks"
    shutil.copytree(PLAYBOOKS, directory)
    return directory


def start_playbook_worker(
    spawn: Callable[..., WorkerProcess], playbook_dir: Path, **settings: Any
) -> WorkerProcess:
    return spawn(worker=WORKER, playbook_dir=playbook_dir, **settings)
