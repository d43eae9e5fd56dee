"""The operator's off-switch (issue 10, DESIGN §2 "Disable means disabled"): `smtp-gate disable`
stays in force against everything unattended that could put the table back, `status` says so,
and only the operator (`enable`, or an explicit `apply`) turns enforcement back on.

The watcher and the hooks have their own tests in test_watch.py and test_hooks.py."""

import json
import re
import shutil
from pathlib import Path
from typing import List, Tuple

import pytest

from smtp_gate import offswitch
from smtp_gate.errors import ValidationError
from tests.netlab import REPO, BridgeLab

ISO_WITH_OFFSET = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")


def table_installed(lab: BridgeLab) -> bool:
    return "table bridge smtp_gate" in lab.nft("list", "tables").stdout


def marker(lab: BridgeLab) -> Path:
    """Where `disable` records the off-switch: beside the config file (it survives reboots)."""
    return lab.config_path.parent / "disabled"


def unit_commands() -> List[Tuple[str, List[str], List[int]]]:
    """(unit, smtp-gate arguments, exit codes the unit counts as success) of every ExecStart= and
    ExecReload= of our services that install enforcement, read from the repository's unit files."""
    out = []
    for unit in ("smtp-gate.service", "smtp-gate-rebuild.service"):
        lines = (REPO / "systemd" / unit).read_text().splitlines()
        success = [0] + [int(c) for l in lines if l.startswith("SuccessExitStatus=") for c in l.split("=", 1)[1].split()]
        for line in lines:
            if line.startswith(("ExecStart=", "ExecReload=")):
                argv = line.split("=", 1)[1].split()
                assert argv[0] == "/usr/bin/smtp-gate", line
                out.append((unit, argv[1:], success))
    return out


# ------------------------------------------------------------------------- the file itself
def test_the_off_switch_file(tmp_path: Path) -> None:
    path = str(tmp_path / "disabled")
    assert offswitch.read(path) is None
    off = offswitch.write(path, "alice", "2026-11-25T14:03:07+01:00", "mail outage, ticket 4711")
    assert offswitch.read(path) == off
    assert off.describe() == "enforcement is disabled by alice at 2026-11-25T14:03:07+01:00 (mail outage, ticket 4711)"
    assert json.loads(Path(path).read_text()) == {"by": "alice", "at": "2026-11-25T14:03:07+01:00",
                                                  "reason": "mail outage, ticket 4711"}
    for bad in ("line\nforged: enforcing", "\x1b[2J", "tab\there", "c1\x85"):
        with pytest.raises(ValidationError, match="control characters"):
            offswitch.write(path, "bob", "2026-11-26T00:00:00+00:00", bad)
    assert offswitch.read(path) == off, "a refused reason changes nothing"
    # its existence is the switch: a file made by hand, or one that cannot be parsed, still disables
    Path(path).write_text("")
    assert offswitch.read(path) == offswitch.Disabled(path)
    Path(path).write_text('{"by": "x\\u001b[2J", "at": 7')
    assert offswitch.read(path) == offswitch.Disabled(path)
    offswitch.clear(path)
    offswitch.clear(path)
    assert offswitch.read(path) is None


# ------------------------------------------------------------------ the CLI, in a namespace
@pytest.mark.kernel
def test_disable_records_who_when_and_why_and_status_says_disabled(lab: BridgeLab) -> None:
    lab.smtp_gate("apply")
    r = lab.smtp_gate("disable", "--reason", "evil\nok: enforcing", check=False, env={"SUDO_USER": "alice"})
    assert r.returncode == 1 and "control characters" in r.stderr
    assert table_installed(lab) and not marker(lab).exists(), "a refused disable changes nothing"

    r = lab.smtp_gate("disable", "--reason", "mail outage, ticket 4711", env={"SUDO_USER": "alice"})
    assert "removed table bridge smtp_gate" in r.stdout
    assert not table_installed(lab)
    recorded = json.loads(marker(lab).read_text())
    assert recorded["by"] == "alice" and recorded["reason"] == "mail outage, ticket 4711"
    assert ISO_WITH_OFFSET.fullmatch(recorded["at"]), recorded

    r = lab.smtp_gate("status", check=False)
    assert r.returncode == 5, r
    assert r.stdout.startswith(f"smtp-gate: DISABLED by alice at {recorded['at']}\n")
    assert "reason: mail outage, ticket 4711" in r.stdout and "NOT BLOCKED" in r.stdout
    r = lab.smtp_gate("status", "--json", check=False)
    assert r.returncode == 5
    report = json.loads(r.stdout)
    assert report["active"] is False
    assert report["disabled"] == {"by": "alice", "at": recorded["at"], "reason": "mail outage, ticket 4711",
                                  "path": str(marker(lab))}

    # `rollback` is the same command; a second one keeps the first record (since when, and why)
    lab.nft("add", "table", "bridge", "smtp_gate")  # as if installed by hand meanwhile
    r = lab.smtp_gate("rollback", "--reason", "again", env={"SUDO_USER": "bob"})
    assert "it was already off, and that record is kept: enforcement is disabled by alice" in r.stdout
    assert json.loads(marker(lab).read_text()) == recorded and not table_installed(lab)


@pytest.mark.kernel
def test_the_units_commands_install_nothing_while_disabled_even_after_a_reboot(lab: BridgeLab) -> None:
    commands = unit_commands()
    assert {u for u, _a, _s in commands} == {"smtp-gate.service", "smtp-gate-rebuild.service"}
    lab.smtp_gate("apply")
    lab.smtp_gate("disable", "--reason", "incident 42", env={"SUDO_USER": "alice"})
    shutil.rmtree(lab.tmp / "run")  # a reboot: /run is empty again, the config directory is not
    for unit, args, success in commands:
        r = lab.smtp_gate(*args, check=False)
        assert r.returncode == 5 and r.returncode in success, (unit, args, r)
        assert "enforcement is disabled by alice at " in r.stderr and "(incident 42): not installing" in r.stderr
        assert not table_installed(lab), f"{unit}: {' '.join(args)} brought the table back"
    assert marker(lab).exists()

    # the operator's own apply turns it back on; from then on the units install again
    r = lab.smtp_gate("apply")
    assert "ok: enforcement re-enabled; it was disabled by alice at " in r.stdout
    assert table_installed(lab) and not marker(lab).exists()
    assert not lab.tcp_connects(lab.guests["g1"], lab.INET4, 25, timeout=0.5)
    lab.smtp_gate("disable")
    marker(lab).unlink()  # removing the file by hand also turns it back on
    for unit, args, success in commands:
        lab.nft("delete", "table", "bridge", "smtp_gate", check=False)
        r = lab.smtp_gate(*args, check=False)
        assert r.returncode in success, (unit, args, r)
        assert table_installed(lab), f"{unit}: {' '.join(args)} did not install the table"


@pytest.mark.kernel
def test_enable_restores_enforcement_and_a_dry_run_does_not(lab: BridgeLab) -> None:
    lab.smtp_gate("apply")
    lab.smtp_gate("disable", "--reason", "maintenance")
    assert lab.tcp_connects(lab.guests["g1"], lab.INET4, 25), "disabled means nothing is blocked"

    r = lab.smtp_gate("apply", "--dry-run")
    assert "smtp_gate" in r.stdout and "would turn it back on" in r.stderr
    assert not table_installed(lab) and marker(lab).exists(), "a dry run ends nothing"

    r = lab.smtp_gate("enable")
    assert "ok: enforcement re-enabled; it was disabled by " in r.stdout and "(maintenance)" in r.stdout
    assert table_installed(lab) and not marker(lab).exists()
    assert not lab.tcp_connects(lab.guests["g1"], lab.INET4, 25, timeout=0.5)
    assert lab.smtp_gate("status", check=False).returncode == 0
    r = lab.smtp_gate("enable")
    assert "enforcement was not disabled" in r.stdout and table_installed(lab)
