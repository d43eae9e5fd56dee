"""Recovery from outside interference: `smtp-gate watch` brings enforcement back by itself.

How fast is bench/bench_recovery.py's business; the tests here wait with a give-up deadline."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smtp_gate import watch
from tests.netlab import REPO, BridgeLab

SAMPLE = Path(__file__).parent / "data" / "libvirt-samples" / "2nic-virsh-destroy" / "02-lab2-start-begin.xml"


def test_transactions_are_split_at_generation_lines() -> None:
    lines = ["delete rule bridge smtp_gate forward handle 4\n", "# new generation 7 by process 1 (nft)\n",
             "add table inet x\n", "# new generation 8 by process 2 (nft)\n"]
    assert list(watch.transactions(lines)) == [["delete rule bridge smtp_gate forward handle 4"], ["add table inet x"]]


@pytest.mark.parametrize(
    "block, removed",
    [
        (["delete chain bridge smtp_gate forward", "delete table bridge smtp_gate"], True),
        (["delete rule bridge smtp_gate forward handle 3"], True),
        (["delete rule bridge smtp_gate forward handle 3", "add rule bridge smtp_gate forward iifname @uplinks accept"], False),
        (["add element bridge smtp_gate allowed { 7 . 52:54:00:00:00:01 }"], False),
        (["delete table inet filter"], False),
        (["delete table bridge smtp_gate_other"], False),
    ],
)
def test_what_counts_as_removing_enforcement(block, removed) -> None:
    assert watch.removes_enforcement(block) is removed


# A give-up deadline, not a claim about speed: bench/bench_recovery.py measures how fast the
# table comes back (tens of milliseconds), for each of these interferences.
GIVE_UP = 30.0


def wait_for(predicate, timeout: float = GIVE_UP) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"enforcement not restored after {timeout:g} s (giving up)")


@pytest.mark.kernel
@pytest.mark.parametrize(
    "interference",
    [["flush", "ruleset"], ["delete", "table", "bridge", "smtp_gate"], ["flush", "chain", "bridge", "smtp_gate", "forward"]],
)
def test_enforcement_comes_back_by_itself_with_the_allowances(bare_lab: BridgeLab, interference) -> None:
    lab = bare_lab
    blocked = lab.add_guest("g1", "vnet0", 2)
    allowed = lab.add_guest("lab2", "lab2n1", 3, mac="52:54:00:aa:00:02")
    (lab.tmp / "whitelist.csv").write_text("# vmname,mac,added_at,added_by,reason\nlab2,,2026-01-01T00:00:00+00:00,root,\n")
    lab.smtp_gate("apply")
    env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SMTP_GATE_CONFIG": str(lab.config_path)}
    hook = subprocess.run(["ip", "netns", "exec", lab.hv.name, "/usr/bin/python3", str(REPO / "hooks" / "qemu"),
                           "lab2", "start", "begin", "-"], input=SAMPLE.read_bytes(), env=env, capture_output=True)
    assert hook.returncode == 0
    assert lab.tcp_connects(allowed, lab.INET4, 25)
    watcher = subprocess.Popen(
        ["ip", "netns", "exec", lab.hv.name, sys.executable, "-m", "smtp_gate", "--config", str(lab.config_path), "watch"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        time.sleep(1.0)  # let it start following nft events
        lab.nft(*interference)
        wait_for(lambda: "goto egress" in lab.nft("list", "chain", "bridge", "smtp_gate", "forward", check=False).stdout)
        assert not lab.tcp_connects(blocked, lab.INET4, 25, timeout=0.5), "SMTP must be blocked again"
        assert lab.tcp_connects(allowed, lab.INET4, 25), "the restore kept the recorded allowance"
    finally:
        os.killpg(watcher.pid, signal.SIGTERM)
        _out, err = watcher.communicate(timeout=10)
    assert "restored in" in err


@pytest.mark.kernel
def test_the_watcher_leaves_a_disabled_table_away_until_enable(lab) -> None:
    """`smtp-gate disable` with the watcher running (the installed default): the table stays away;
    after `enable` the watcher follows events again and restores after a flush."""
    lab.smtp_gate("apply")
    watcher = subprocess.Popen(
        ["ip", "netns", "exec", lab.hv.name, sys.executable, "-m", "smtp_gate", "--config", str(lab.config_path), "watch"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    has_table = lambda: "table bridge smtp_gate" in lab.nft("list", "tables").stdout  # noqa: E731
    try:
        time.sleep(1.0)  # let it start following nft events
        lab.smtp_gate("disable", "--reason", "incident 42", env={"SUDO_USER": "alice"})
        time.sleep(2.0)
        assert not has_table(), "the watcher brought a disabled table back"
        assert lab.tcp_connects(lab.guests["g1"], lab.INET4, 25)
        lab.smtp_gate("enable")
        assert has_table()
        time.sleep(1.5)  # it looks for the off-switch once a second
        lab.nft("flush", "ruleset")
        wait_for(has_table)  # raises unless the watcher restores again after enable
        assert not lab.tcp_connects(lab.guests["g1"], lab.INET4, 25, timeout=0.5)
    finally:
        os.killpg(watcher.pid, signal.SIGTERM)
        _out, err = watcher.communicate(timeout=10)
    assert "enforcement is disabled by alice at " in err and "(incident 42): not installing" in err, err
    assert "re-enabled" in err and "restored in" in err, err
