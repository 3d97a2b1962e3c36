"""Ansible plugins shipped with the worker: a directory Ansible loads plugins from.

Nothing here is imported by the worker itself. PlaybookWorker points
ANSIBLE_CALLBACK_PLUGINS at this directory and ANSIBLE_STDOUT_CALLBACK at
`chiffon_jsonl`, which Ansible loads in its own process (see that module).
"""

from __future__ import annotations

from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent
STDOUT_CALLBACK = "chiffon_jsonl"
