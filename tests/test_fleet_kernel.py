"""ALLOW_STORE="metadata" enforced at once (issue 11): the real CLI in the hypervisor namespace,
libvirt's test driver for the guests, real frames through the lab's bridge.

Each `test:///PATH` connection loads its own copy of the node file, so what one command
writes to a guest's metadata the next command does not see: each test here makes one
change per command and checks the kernel right after it (tests/test_fleet_cli.py checks
the written XML, on the shared test:///default)."""

from pathlib import Path

import pytest

from tests import testdriver
from tests.netlab import BridgeLab

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
