"""ALLOW_STORE="metadata" enforced at once (issue 11): the real CLI in the hypervisor namespace,
libvirt's test driver for the guests, real frames through the lab's bridge.

Each `test:///PATH` connection loads its own copy of the node file, so what one command
writes to a guest's metadata the next command does not see: each test here makes one
change per command and checks the kernel right after it (tests/test_fleet_cli.py checks
the written XML, on the shared test:///default)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Tuple

import pytest

from tests import testdriver
from tests.netlab import REPO, BridgeLab

pytestmark = pytest.mark.kernel

HEADER = "# vmname,mac,added_at,added_by,reason\n"
NS = "urn:smtp-gate:1"


def fleet(lab: BridgeLab, store: str, metadata: str = "", file_rows: str = "") -> BridgeLab:
    """Guests vm00000 (running, MAC and port of the lab's guest vm0) and vm00001 (running);
    vm00000 carries METADATA in its definition."""
    uri = testdriver.write_node(lab.tmp, running=2, nics=1)
    node = Path(uri[len("test://"):])
    if metadata:
        text = node.read_text()
        first = text.index("<devices>")
        node.write_text(text[:first] + f"<metadata>{metadata}</metadata>" + text[first:])
    lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="{uri}"\nALLOW_STORE="{store}"\n')
    (lab.tmp / "whitelist.csv").write_text(HEADER + file_rows)
    for i in (0, 1):
        lab.add_guest(f"vm{i}", testdriver.target(i, 0), 20 + i, mac=testdriver.mac(i, 0))
    assert lab.smtp_gate("apply").returncode == 0
    return lab


def can_mail(lab: BridgeLab, guest: str) -> bool:
    return lab.tcp_connects(lab.guests[guest], lab.INET4, 25, timeout=0.4)


def test_add_vm_into_metadata_allows_at_once(bare_lab: BridgeLab) -> None:
    lab = fleet(bare_lab, "metadata")
    assert not can_mail(lab, "vm0")
    r = lab.smtp_gate("add-vm", "vm00000", "KYC 1", check=False, env={"SUDO_USER": "alice"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"ok: allowed guest 'vm00000' (UUID {testdriver.uuid(0)}, every NIC) in its libvirt metadata "
        "(live and saved definition)",  # a node file's guests are persistent
        f"ok: allowed guest 'vm00000' NIC {testdriver.mac(0, 0)} on {testdriver.target(0, 0)}",
        f"ok: guest 'vm00000' NIC {testdriver.mac(0, 0)} on {testdriver.target(0, 0)}: allowed in the kernel",
    ]
    assert can_mail(lab, "vm0") and not can_mail(lab, "vm1")
    assert (lab.tmp / "whitelist.csv").read_text() == HEADER


def test_a_defined_allowance_is_enforced_by_apply_and_del_vm_revokes_it_at_once(bare_lab: BridgeLab) -> None:
    lab = fleet(bare_lab, "metadata", f'<sg:allow xmlns:sg="{NS}" by="panel" reason="KYC 2"/>')
    assert can_mail(lab, "vm0"), "apply reads the metadata"
    assert not can_mail(lab, "vm1")
    status = lab.smtp_gate("status", check=False).stdout
    assert "whitelisted guest vm00000: running;" in status and "allowance in kernel: yes" in status
    assert "allowed by: metadata (by panel, at ?, reason 'KYC 2')" in status
    r = lab.smtp_gate("del-vm", "vm00000", check=False)
    assert (r.returncode, r.stderr) == (0, ""), r
    assert r.stdout.splitlines() == [
        "ok: nothing to remove: guest 'vm00000' is not in the whitelist",
        "ok: removed the allowance from the libvirt metadata of guest 'vm00000' (live and saved definition)",
        f"ok: revoked guest 'vm00000' NIC {testdriver.mac(0, 0)} on {testdriver.target(0, 0)}",
        f"ok: guest 'vm00000' NIC {testdriver.mac(0, 0)} on {testdriver.target(0, 0)}: blocked in the kernel",
    ]
    assert not can_mail(lab, "vm0")


def test_removing_the_file_row_keeps_the_metadata_allowance_and_says_so(bare_lab: BridgeLab) -> None:
    row = f"{testdriver.uuid(0)},,2026-01-01T00:00:00+00:00,alice,file\n"
    lab = fleet(bare_lab, "file", f'<sg:allow xmlns:sg="{NS}" by="panel"/>', row)
    r = lab.smtp_gate("del-vm", "vm00000", "--source", "file", check=False)
    assert r.returncode == 3, r
    assert r.stdout == (f"ok: removed guest 'vm00000' (UUID {testdriver.uuid(0)}, every NIC) from line 2\n"
                        f"ok: guest 'vm00000' NIC {testdriver.mac(0, 0)} on {testdriver.target(0, 0)}: allowed in the kernel\n")
    assert "is still allowed by its libvirt metadata (by panel, at ?)" in r.stderr
    assert "`smtp-gate del-vm vm00000 --source metadata`" in r.stderr
    assert can_mail(lab, "vm0"), "the metadata still allows it"


def _held_rebuild(lab: BridgeLab) -> "Tuple[subprocess.Popen, Path]":
    """A rebuild that has listed libvirt and waits (tests/stale_rebuild.py) until the file
    returned is created: it then commits what it listed."""
    listed, go = lab.tmp / "listed", lab.tmp / "go"
    for path in (listed, go):
        if path.exists():
            path.unlink()
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.hv.name, sys.executable, "-m", "tests.stale_rebuild", str(lab.config_path),
         str(listed), str(go)],
        cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not listed.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert listed.exists(), proc.communicate()
    return proc, go


def _set_node_allow(lab: BridgeLab, element: str) -> None:
    """libvirt's truth from now on (each connection re-reads the node file): vm00000's
    <metadata> holds ELEMENT (or nothing)."""
    node = Path(lab.config_path.read_text().split('LIBVIRT_URI="test://')[1].split('"')[0])
    text = node.read_text()
    start = text.index("<metadata>") if "<metadata>" in text else -1
    if start >= 0:
        text = text[:start] + text[text.index("</metadata>") + len("</metadata>"):]
    first = text.index("<devices>")
    node.write_text(text[:first] + (f"<metadata>{element}</metadata>" if element else "") + text[first:])


def test_a_rebuild_that_listed_before_del_vm_does_not_bring_the_allowance_back(bare_lab: BridgeLab) -> None:
    """Attacker review of issue 11: del-vm (metadata store) journals the XML it read back, as
    hooks do, so a rebuild that listed libvirt before it replays the revocation."""
    allow = f'<sg:allow xmlns:sg="{NS}" by="panel" reason="KYC 2"/>'
    lab = fleet(bare_lab, "metadata", allow)
    assert can_mail(lab, "vm0")
    proc, go = _held_rebuild(lab)
    r = lab.smtp_gate("del-vm", "vm00000", check=False)
    assert r.returncode == 0 and f"ok: revoked guest 'vm00000' NIC {testdriver.mac(0, 0)}" in r.stdout, r
    assert not can_mail(lab, "vm0")
    # journaled as a hook journals a start, with the XML read back: what a rebuild replays, and
    # what makes a watcher's round that asked libvirt before the write leave the guest alone
    journal = [json.loads(line) for line in (lab.tmp / "run" / "journal").read_text().splitlines()]
    assert [(e["op"], e["name"], e["allow"]) for e in journal] == [("start", "vm00000", None)]
    _set_node_allow(lab, "")
    go.touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert not can_mail(lab, "vm0"), "the rebuild's stale listing put the revoked allowance back"


def test_a_metadata_add_vm_during_a_rebuild_is_not_lost(bare_lab: BridgeLab) -> None:
    lab = fleet(bare_lab, "metadata")
    assert not can_mail(lab, "vm0")
    proc, go = _held_rebuild(lab)
    r = lab.smtp_gate("add-vm", "vm00000", "KYC 3", check=False)
    assert r.returncode == 0 and f"ok: allowed guest 'vm00000' NIC {testdriver.mac(0, 0)}" in r.stdout, r
    assert can_mail(lab, "vm0")
    _set_node_allow(lab, f'<sg:allow xmlns:sg="{NS}" by="root" reason="KYC 3" uuid="{testdriver.uuid(0)}"/>')
    go.touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert can_mail(lab, "vm0"), "the rebuild's stale listing dropped the allowance add-vm made"
    assert not can_mail(lab, "vm1")


def test_del_vm_by_default_blocks_a_guest_both_sources_allow(bare_lab: BridgeLab) -> None:
    """The abuse desk's `del-vm NAME` in file mode, for a guest the file and its metadata allow:
    it is blocked, and the output says which sources were removed and where the kernel stands."""
    row = f"{testdriver.uuid(0)},,2026-01-01T00:00:00+00:00,alice,file\n"
    lab = fleet(bare_lab, "file", f'<sg:allow xmlns:sg="{NS}" by="panel"/>', row)
    assert can_mail(lab, "vm0")
    r = lab.smtp_gate("del-vm", "vm00000", check=False)
    assert (r.returncode, r.stderr) == (0, ""), r
    assert r.stdout.splitlines() == [
        f"ok: removed guest 'vm00000' (UUID {testdriver.uuid(0)}, every NIC) from line 2",
        "ok: removed the allowance from the libvirt metadata of guest 'vm00000' (live and saved definition)",
        f"ok: revoked guest 'vm00000' NIC {testdriver.mac(0, 0)} on {testdriver.target(0, 0)}",
        f"ok: guest 'vm00000' NIC {testdriver.mac(0, 0)} on {testdriver.target(0, 0)}: blocked in the kernel",
    ]
    assert not can_mail(lab, "vm0")


def test_status_warns_about_a_kernel_allowance_nothing_grants_and_exits_3(bare_lab: BridgeLab) -> None:
    """`virsh metadata --remove` with no watcher running: the kernel still lets the NIC send
    mail.  status must say so (port and MAC, and the repair), not exit 0 in silence."""
    lab = fleet(bare_lab, "metadata", f'<sg:allow xmlns:sg="{NS}" by="panel"/>')
    assert can_mail(lab, "vm0")
    assert lab.smtp_gate("status", check=False).returncode == 0
    node = next(lab.tmp.glob("*.xml"))
    text = node.read_text()
    node.write_text(text.replace(f'<metadata><sg:allow xmlns:sg="{NS}" by="panel"/></metadata>', ""))
    assert node.read_text() != text
    r = lab.smtp_gate("status", check=False)
    assert r.returncode == 3, r
    port, mac = testdriver.target(0, 0), testdriver.mac(0, 0)
    assert (f"warning: the kernel allows MAC {mac} on port {port} (guest 'vm00000'), which nothing allows any more: "
            "that NIC can send mail; run `smtp-gate rebuild` to revoke it") in r.stdout, r.stdout
    assert can_mail(lab, "vm0")
    assert lab.smtp_gate("rebuild", check=False).returncode == 0
    r = lab.smtp_gate("status", check=False)
    assert r.returncode == 0 and "nothing allows" not in r.stdout, r.stdout
    assert not can_mail(lab, "vm0")


def test_add_vm_reports_the_kernels_state_whoever_changed_it(bare_lab: BridgeLab) -> None:
    """The kernel already holds the allowance (as when `smtp-gate watch` applied the metadata
    first): add-vm has nothing to add, and still says where the guest stands."""
    row = f"{testdriver.uuid(0)},,2026-01-01T00:00:00+00:00,alice,file\n"
    lab = fleet(bare_lab, "metadata", file_rows=row)
    assert can_mail(lab, "vm0")
    (lab.tmp / "whitelist.csv").write_text(HEADER)  # the row edited out: the kernel still holds it
    r = lab.smtp_gate("add-vm", "vm00000", "KYC", check=False)
    assert (r.returncode, r.stderr) == (0, ""), r
    assert r.stdout.splitlines() == [
        f"ok: allowed guest 'vm00000' (UUID {testdriver.uuid(0)}, every NIC) in its libvirt metadata "
        "(live and saved definition)",
        f"ok: guest 'vm00000' NIC {testdriver.mac(0, 0)} on {testdriver.target(0, 0)}: allowed in the kernel",
    ]
