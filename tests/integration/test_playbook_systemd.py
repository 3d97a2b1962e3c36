"""What the units and examples give a playbook worker: a writable state dir, a valid drop-in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chiffon_worker.config import Settings, load_settings
from tests.helpers.ci import systemd_analyze
from tests.integration.test_systemd_units import (
    PLAIN,
    SYSTEMD_DIR,
    TEMPLATE,
    one,
    parse_unit,
    runnable_copy,
    verify,
)

pytestmark = pytest.mark.integration

DROP_IN = SYSTEMD_DIR / "playbook-host-access.conf.example"
ENV_EXAMPLE = SYSTEMD_DIR / "playbook-worker.env.example"


@pytest.mark.parametrize("name", [PLAIN, TEMPLATE])
def test_ansible_writes_under_the_units_state_directory(name: str) -> None:
    unit = parse_unit((SYSTEMD_DIR / name).read_text(encoding="utf-8"))
    assert one(unit, "Service", "StateDirectory") == "chiffon-worker"
    assert one(unit, "Service", "ProtectSystem") == "strict"  # still read-only elsewhere
    environment = " ".join(unit["Service"]["Environment"]).split()
    assert "ANSIBLE_HOME=%S/chiffon-worker/ansible" in environment
    assert "ANSIBLE_LOCAL_TEMP=%S/chiffon-worker/ansible/tmp" in environment


def test_the_host_access_drop_in_verifies_with_every_option_on(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    runnable_copy(PLAIN, tmp_path)
    drop_ins = tmp_path / f"{PLAIN}.d"
    drop_ins.mkdir()
    # Option 2's lines uncommented too: all of it must be valid, not only the default part.
    text = re.sub(r"^#([A-Z]\w+=)", r"\1", DROP_IN.read_text(encoding="utf-8"), flags=re.M)
    (drop_ins / "host-access.conf").write_text(text + "NotADirective=1\n", encoding="utf-8")
    _, ours, output = verify(analyze, tmp_path / PLAIN)
    # The guard line proves verify read the drop-in; nothing else may be reported.
    assert any("NotADirective" in line for line in ours), output
    assert [line for line in ours if "NotADirective" not in line] == [], output


def test_the_playbook_env_example_names_only_real_settings_and_loads() -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    named = re.findall(r"^#?CHIFFON_(\w+)=", text, flags=re.M)
    assert named
    unknown = [name for name in named if name.lower() not in Settings.model_fields]
    assert unknown == []
    settings = load_settings(ENV_EXAMPLE, environ={})
    assert settings.worker == "chiffon_worker.playbook:PlaybookWorker"
    assert settings.playbook_dir == Path("/etc/chiffon-worker/playbooks")
