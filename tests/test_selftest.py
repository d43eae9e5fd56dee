"""`smtp-gate selftest`: the real command, as an operator runs it, on this machine's kernel.

It must pass every check, leave nothing behind and never touch the host; a config that
does not block (audit mode) must be reported as FAIL with the reason, not as a pass.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Tuple

import pytest

from smtp_gate import config as config_mod, netlab, selftest
from tests.netlab import REPO


def run_selftest(tmp_path: Path, config_text: str, *args: str) -> subprocess.CompletedProcess:
    """The command as an operator runs it; timeout= is a give-up deadline (bench/bench_selftest.py
    measures how long it takes)."""
    conf = tmp_path / "smtp-gate.conf"
    conf.write_text(config_text)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("SMTP_GATE_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "smtp_gate", "--config", str(conf), "selftest", *args],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300,
    )


def host_state() -> Tuple[str, str]:
    return (
        netlab.run(["nft", "list", "ruleset"]).stdout,
        netlab.run(["ip", "-br", "link"]).stdout,
    )


def leftovers() -> List[str]:
    names = [n for n in netlab.netns_names() if n.startswith(selftest.PREFIX)]
    return names + [p.name for p in Path(tempfile.gettempdir()).glob(f"{selftest.PREFIX}*")]


@pytest.fixture
def root_lab(kernel_skip_reason: str) -> None:
    if kernel_skip_reason:
        pytest.skip(kernel_skip_reason)
    selftest.remove_stale_labs()


REQUIRED = (
    "IPv4 TCP 25 from a guest is blocked",
    "IPv6 TCP 25 from a guest is blocked",
    "IPv4 TCP 465 from a guest is blocked",
    "IPv6 TCP 465 from a guest is blocked",
    "IPv4 TCP 80 from a guest passes",
    "IPv6 TCP 80 from a guest passes",
    "the allowed guest reaches TCP 25",
    "the allowed guest reaches TCP 465",
    "whitelist row -> libvirt test driver -> kernel allowance",
    "the allowed guest's MAC sent from the other guest's port is blocked",
    "802.1Q-tagged TCP 25 from a guest is blocked",
    "802.1Q-tagged TCP 80 from a guest passes",
    "QinQ",
    "PPPoE-encapsulated TCP 25",
    "an IPv6 first fragment whose extension headers hide the TCP header is blocked",
    "a port added after apply is blocked from its first frame",
    "an uplink added after apply does not carry",
    "inbound TCP 25 from the internet to a guest passes",
    "guest-to-guest TCP 25 passes",
    "via the hypervisor as next hop: TCP 25 to a routed host is blocked",
    "TCP 25 to the hypervisor's own bridge address is blocked",
    "smtp-gate status counts the blocked attempts",
)


@pytest.mark.kernel
def test_selftest_passes_every_check_and_leaves_the_host_as_it_was(root_lab: None, tmp_path: Path) -> None:
    before = host_state()
    result = run_selftest(tmp_path, "")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("smtp-gate selftest: blocked ports 25,465 (default), enforce mode")
    table = lines[1:-1]
    assert table and all(line.startswith("PASS  ") for line in table), result.stdout
    for name in REQUIRED:
        assert any(name in line for line in table), f"no check {name!r} in:\n{result.stdout}"
    assert lines[-1].startswith(f"selftest: all {len(table)} checks passed in ")
    assert leftovers() == []
    assert host_state() == before, "the selftest changed the host's ruleset or links"


@pytest.mark.kernel
def test_audit_mode_is_reported_as_fail_with_the_reason_and_blocked_ports_come_from_the_config(
    root_lab: None, tmp_path: Path
) -> None:
    result = run_selftest(tmp_path, 'MODE="audit"\nBLOCKED_PORTS="25,465,587"\n', "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["mode"] == "audit" and report["blocked_ports"] == "25,465,587"
    checks = report["checks"]
    assert any(c["name"] == "IPv6 TCP 587 from a guest is blocked" for c in checks)
    blocked = [c for c in checks if c["expect"] == selftest.BLOCKED]
    others = [c for c in checks if c["expect"] != selftest.BLOCKED]
    assert len(blocked) >= 10
    for check in blocked:  # SMTP really got through: never a pass, and the reason is given
        assert not check["ok"] and "MODE=audit" in check["detail"], check
    for check in others:  # audit still counts, and everything else still holds
        assert check["ok"], check
    assert report["failed"] == len(blocked)
    assert any('MODE="audit"' in note for note in report["notes"])
    assert leftovers() == []


@pytest.mark.kernel
def test_non_ip_accept_installs_with_its_warning_and_the_encapsulation_checks_fail_with_the_reason(
    root_lab: None, tmp_path: Path
) -> None:
    result = run_selftest(tmp_path, 'NON_IP="accept"\n', "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    failed = sorted(c["name"] for c in report["checks"] if not c["ok"])
    assert report["checks"][1]["name"] == "smtp-gate apply installs the real ruleset in the lab"
    assert report["checks"][1]["ok"], report["checks"][1]
    assert len(failed) == 2 and all("QinQ" in name or "PPPoE" in name for name in failed), failed
    assert any('apply said: warning: NON_IP="accept"' in note for note in report["notes"])
    assert any('sets NON_IP="accept"' in note for note in report["notes"])
    assert leftovers() == []


@pytest.mark.kernel
def test_keep_leaves_the_lab_up_and_the_next_selftest_removes_it(root_lab: None, tmp_path: Path) -> None:
    result = run_selftest(tmp_path, 'BLOCKED_PORTS="25"\n', "--keep", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    prefix = report["lab"]
    kept = [n for n in netlab.netns_names() if n.startswith(prefix)]
    try:
        assert f"{prefix}hv" in kept and f"{prefix}guest" in kept
        assert any(hint.startswith(f"enter:   sudo ip netns exec {prefix}hv") for hint in report["kept"])
        table = netlab.run(["ip", "netns", "exec", f"{prefix}hv", "nft", "list", "table", "bridge", "smtp_gate"])
        assert "chain forward" in table.stdout
    finally:
        removed = selftest.remove_stale_labs()  # what the next selftest does first
    assert sorted(removed) == sorted(kept)
    assert leftovers() == []


def test_missing_prerequisites_exit_1_and_say_how_to_get_them(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    config = config_mod.parse("", Path("/nonexistent/smtp-gate.conf"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert selftest.main(config) == 1
    assert "root" in capsys.readouterr().err
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netlab, "tool", lambda name: None if name == "nft" else "/usr/sbin/" + name)
    assert selftest.main(config, as_json=True) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["missing"] == ["the 'nft' command: install the nftables package (apt-get install nftables)"]


def test_every_blocked_port_is_probed_and_a_port_that_passes_is_chosen() -> None:
    assert selftest.probe_ports([(25, 25), (465, 465), (2525, 2530)]) == [25, 465, 2525, 2530]
    assert selftest.pass_port([(25, 25), (465, 465)]) == 80
    assert selftest.pass_port([(1, 100)]) == 443
    assert selftest.pass_port([(1, 65535)]) is None
