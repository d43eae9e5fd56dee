"""The operator's commands, as subprocesses in the hypervisor namespace: libvirt's test driver
tells who runs where, a real bridge shows that each change is enforced at once."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
import uuid as uuid_mod
from pathlib import Path
from typing import List

import pytest

from tests import testdriver
from tests.netlab import REPO, BridgeLab, immutable

pytestmark = pytest.mark.kernel

HEADER = "# vmname,mac,added_at,added_by,reason\n"
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")


@pytest.fixture
def fleet(bare_lab: BridgeLab) -> BridgeLab:
    """Three running guests in libvirt's test driver (vm00000 with two NICs, vm00001,
    vm00002) whose ports exist on the lab's br0 with their MACs, and one shut-off guest."""
    lab = bare_lab
    uri = testdriver.write_node(lab.tmp, running=3, nics=1, shutoff=1)
    node = Path(uri[len("test://"):])
    text = node.read_text()
    # vm00000 gets a second NIC
    second = (f"<interface type='bridge'><mac address='{testdriver.mac(0, 1)}'/><source bridge='br0'/>"
              f"<target dev='{testdriver.target(0, 1)}'/></interface>")
    first_end = text.index("</interface>") + len("</interface>")
    node.write_text(text[:first_end] + second + text[first_end:])
    lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="{uri}"\n')
    (lab.tmp / "whitelist.csv").write_text(HEADER + "# an operator's comment survives every write\n")
    for i, k, n in ((0, 0, 20), (0, 1, 21), (1, 0, 22), (2, 0, 23)):
        lab.add_guest(f"vm{i}n{k}", testdriver.target(i, k), n, mac=testdriver.mac(i, k))
    assert lab.smtp_gate("apply").returncode == 0
    return lab


def sg(lab: BridgeLab, *args: str, check: bool = False, env=None) -> subprocess.CompletedProcess:
    return lab.smtp_gate(*args, check=check, env=env)


def can_mail(lab: BridgeLab, guest: str) -> bool:
    return lab.tcp_connects(lab.guests[guest], lab.INET4, 25, timeout=0.4)


def rows(lab: BridgeLab) -> List[dict]:
    return json.loads(sg(lab, "list", "--json").stdout)["rows"]


def test_add_vm_allows_every_nic_now_and_del_vm_revokes_now(fleet: BridgeLab) -> None:
    lab = fleet
    assert not can_mail(lab, "vm0n0")
    r = sg(lab, "add-vm", "vm00000", 'ID verified, ticket "4711"', env={"SUDO_USER": "alice"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("ok: added guest 'vm00000'")
    assert r.stdout.splitlines()[-2:] == [
        f"ok: guest 'vm00000' NIC {testdriver.mac(0, 0)} on tap0n0: allowed in the kernel",
        f"ok: guest 'vm00000' NIC {testdriver.mac(0, 1)} on tap0n1: allowed in the kernel",
    ]
    assert sum(line.startswith("ok: allowed guest 'vm00000' NIC") for line in r.stdout.splitlines()) == 2
    assert can_mail(lab, "vm0n0") and can_mail(lab, "vm0n1"), "both NICs at once, no rebuild"
    assert not can_mail(lab, "vm1n0")
    (row,) = rows(lab)
    assert row["vmname"] == testdriver.uuid(0) and row["guest"] == "vm00000" and row["bound"] == "uuid"
    assert row["mac"] == "" and row["added_by"] == "alice"
    assert ISO.fullmatch(row["added_at"]) and row["reason"] == 'ID verified, ticket "4711"'
    # again, by UUID: already there, no duplicate row, exit 0
    again = sg(lab, "add-vm", testdriver.uuid(0).upper())
    assert again.returncode == 0 and "already there" in again.stdout and len(rows(lab)) == 1
    assert "# an operator's comment survives every write" in (lab.tmp / "whitelist.csv").read_text()

    r = sg(lab, "del-vm", "vm00000")
    assert r.returncode == 0, r.stderr
    assert "ok: removed guest 'vm00000'" in r.stdout and r.stdout.count("ok: revoked") == 2
    assert not can_mail(lab, "vm0n0") and not can_mail(lab, "vm0n1")
    assert rows(lab) == []
    gone = sg(lab, "del-vm", "vm00000")
    assert gone.returncode == 0 and gone.stdout.splitlines() == [
        "ok: nothing to remove: guest 'vm00000' is not in the whitelist",
        "ok: nothing to remove: the libvirt metadata of guest 'vm00000' carries no allowance",
        f"ok: guest 'vm00000' NIC {testdriver.mac(0, 0)} on tap0n0: blocked in the kernel",
        f"ok: guest 'vm00000' NIC {testdriver.mac(0, 1)} on tap0n1: blocked in the kernel",
    ]


def test_add_mac_in_any_spelling_allows_that_nic_only_and_del_mac_revokes(fleet: BridgeLab) -> None:
    lab = fleet
    mac = testdriver.mac(0, 1)
    dashed = mac.replace(":", "-").upper()
    r = sg(lab, "add-mac", dashed, "vm0-second", "--reason", "relay")
    assert r.returncode == 0, r.stderr
    assert f"ok: allowed guest 'vm00000' NIC {mac} on tap0n1" in r.stdout
    assert can_mail(lab, "vm0n1") and not can_mail(lab, "vm0n0")
    cisco = mac.replace(":", "")
    cisco = f"{cisco[:4]}.{cisco[4:8]}.{cisco[8:]}"
    again = sg(lab, "add-mac", cisco)
    assert again.returncode == 0 and "already there" in again.stdout
    (row,) = rows(lab)
    assert row["mac"] == mac and row["vmname"] == "vm0-second"
    r = sg(lab, "del-mac", mac.upper())
    assert r.returncode == 0 and "ok: removed" in r.stdout and "ok: revoked guest 'vm00000' NIC" in r.stdout
    assert not can_mail(lab, "vm0n1")


@pytest.mark.parametrize(
    "mac, why",
    [("ff:ff:ff:ff:ff:ff", "broadcast"), ("01:00:5e:00:00:fb", "multicast"), ("00-00-00-00-00-00", "all-zero"),
     ("52:54:00:zz:00:01", "expected six hex bytes")],
)
def test_add_mac_refuses_what_no_nic_owns_and_changes_nothing(fleet: BridgeLab, mac: str, why: str) -> None:
    before = (fleet.tmp / "whitelist.csv").read_bytes()
    r = sg(fleet, "add-mac", mac)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("smtp-gate: error: bad MAC address") and repr(mac) in r.stderr and why in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (fleet.tmp / "whitelist.csv").read_bytes() == before


def test_add_vm_errors_name_the_guest_and_what_is_wrong(fleet: BridgeLab) -> None:
    r = sg(fleet, "add-vm", "nosuchguest")
    assert r.returncode == 1 and "guest 'nosuchguest' not found in libvirt" in r.stderr
    assert rows(fleet) == []


def test_add_vm_of_a_guest_on_no_protected_bridge_adds_the_row_and_says_it_allows_nothing_yet(
    fleet: BridgeLab,
) -> None:
    """The guest may get a NIC on a protected bridge, or its bridge may be added to BRIDGE:
    the row is written (as the picker writes it), and the operator told it changes nothing now."""
    fleet.write_config(f'UPLINKS="uplink0"\nBRIDGE="br9"\nLIBVIRT_URI="test://{fleet.tmp}/node.xml"\n')
    r = sg(fleet, "add-vm", "vm00001")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"ok: added guest 'vm00001' (UUID {testdriver.uuid(1)}, every NIC) at line 3\n"
    assert (
        "smtp-gate: warning: guest 'vm00001' has no NIC on a protected bridge (br9): the row allows nothing until "
        "one of its NICs is on one (add its bridge to BRIDGE, or move the NIC)\n" in r.stderr
    ), r.stderr
    assert f"UNPROTECTED: guest vm00001 ({testdriver.uuid(1)}) NIC {testdriver.mac(1, 0)} on br0: " in r.stderr
    assert [row["vmname"] for row in rows(fleet)] == [testdriver.uuid(1)]
    # once its bridge is protected, the row allows it
    fleet.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="test://{fleet.tmp}/node.xml"\n')
    assert sg(fleet, "apply").returncode == 0 and can_mail(fleet, "vm1n0")


def test_a_stopped_guest_is_recorded_and_allowed_when_it_starts(fleet: BridgeLab) -> None:
    r = sg(fleet, "add-vm", testdriver.name(3))
    assert r.returncode == 0 and "is not running: its NICs are allowed when it starts" in r.stdout


def test_ports_set_validates_stores_and_enforces_at_once(fleet: BridgeLab) -> None:
    lab = fleet
    conf = lab.config_path
    conf.write_text("# operator's notes\n" + conf.read_text() + "BLOCKED_PORTS=\"25,465\"  # the original default\n")
    assert lab.tcp_connects(lab.guests["vm1n0"], lab.INET4, 587)
    r = sg(lab, "ports-set", "587, 25,465")
    assert r.returncode == 0, r.stderr
    assert "ok: blocked ports set to 25,465,587" in r.stdout and "enforced at once" in r.stdout
    assert not lab.tcp_connects(lab.guests["vm1n0"], lab.INET4, 587, timeout=0.4)
    text = conf.read_text()
    assert text.startswith("# operator's notes\n") and 'BLOCKED_PORTS="25,465,587"\n' in text
    assert text.count("BLOCKED_PORTS") == 1
    before = conf.read_bytes()
    for bad, message in (("25,25", "duplicate port 25"), ("25,99999", "expected 1-65535"), ("smtp", "bad port 'smtp'")):
        r = sg(lab, "ports-set", bad)
        assert r.returncode == 1 and message in r.stderr, r.stderr
        assert conf.read_bytes() == before
    assert json.loads(sg(lab, "status", "--json").stdout)["blocked_ports"] == "25,465,587"


def test_list_shows_rows_as_stored_and_reports_bad_rows(fleet: BridgeLab) -> None:
    (fleet.tmp / "whitelist.csv").write_text(
        HEADER + "web1,,2026-11-25T14:03:07+00:00,alice,\"ID verified, ticket \"\"4711\"\"\"\n"
        ",not-a-mac,2026-11-25T14:03:07+00:00,bob,oops\n"
    )
    r = sg(fleet, "list")
    assert r.returncode == 3 and "web1" in r.stdout and "(all NICs)" in r.stdout
    assert "line 3" in r.stderr and "'not-a-mac'" in r.stderr
    data = json.loads(sg(fleet, "list", "--json").stdout)
    assert data["rows"][0]["reason"] == 'ID verified, ticket "4711"' and data["rows"][0]["line"] == 2


def test_rebuild_and_status_from_libvirt_and_the_whitelist(fleet: BridgeLab) -> None:
    lab = fleet
    (lab.tmp / "whitelist.csv").write_text(
        HEADER + f"vm00001,,2026-11-25T14:03:07+00:00,alice,\n,{testdriver.mac(0, 1)},2026-11-25T14:03:07+00:00,bob,\n"
    )
    r = sg(lab, "rebuild")
    assert r.returncode == 0, r.stderr
    assert "4 running guest(s)" not in r.stdout and "3 running guest(s); 2 allowed guest NIC(s)" in r.stdout
    assert can_mail(lab, "vm1n0") and can_mail(lab, "vm0n1")
    assert not can_mail(lab, "vm0n0") and not can_mail(lab, "vm2n0")
    report = json.loads(sg(lab, "status", "--json").stdout)
    by_name = {g["name"]: g for g in report["guests"]}
    assert by_name["vm00001"]["held"] == "yes" and by_name["vm00001"]["state"] == "running"
    assert by_name["vm00000"]["allowed_macs"] == [testdriver.mac(0, 1)]
    assert set(report["guest_ports"]) == {"tap0n0", "tap0n1", "tap1n0", "tap2n0"}
    text = sg(lab, "status").stdout
    assert "whitelisted guest vm00001: running; ports tap1n0; allowance in kernel: yes" in text


def test_rebuild_and_status_match_a_uuid_row_and_show_the_guests_name(fleet: BridgeLab) -> None:
    """The row add-vm writes (here in another spelling of the UUID) is matched by the rebuild."""
    lab = fleet
    (lab.tmp / "whitelist.csv").write_text(HEADER + f"{testdriver.uuid(2).upper()},,2026-11-25T14:03:07+00:00,alice,\n")
    r = sg(lab, "rebuild")
    assert r.returncode == 0 and "1 allowed guest NIC(s)" in r.stdout, r.stdout + r.stderr
    assert can_mail(lab, "vm2n0") and not can_mail(lab, "vm1n0")
    assert "whitelisted guest vm00002: running; ports tap2n0; allowance in kernel: yes" in sg(lab, "status").stdout


def test_a_dry_run_says_what_would_happen_never_that_enforcement_is_installed(bare_lab: BridgeLab) -> None:
    """A missing bridge and no hypervisor answering: both warnings say "enforcement is
    installed" after a real apply; after a dry run, which installs nothing, they must not."""
    lab = bare_lab
    lab.write_config('UPLINKS="uplink0"\nBRIDGE="br0 br9"\n')
    r = sg(lab, "apply", "--dry-run")
    assert r.returncode == 3, r.stderr
    assert "is installed" not in r.stdout + r.stderr and "are kept" not in r.stderr
    lines = r.stderr.splitlines()
    assert "# the kernel accepted this batch (nft -c); nothing was changed" in lines
    warnings = [line for line in lines if line.startswith("smtp-gate: warning: ")]
    assert len(warnings) == 2 and all(w.startswith("smtp-gate: warning: dry run, nothing installed: ") for w in warnings)
    assert any("bridge 'br9' does not exist (yet): enforcement would be installed" in w for w in warnings), warnings
    assert any("no hypervisor answered" in w and "allowances for existing ports would be kept" in w for w in warnings)
    assert "smtp_gate" not in lab.nft("list", "tables").stdout
    r = sg(lab, "apply")  # the real apply says it, and it is true
    assert r.returncode == 3 and "bridge 'br9' does not exist (yet): enforcement is installed" in r.stderr
    assert "smtp_gate" in lab.nft("list", "tables").stdout


NO_NET_ADMIN = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]


@pytest.mark.parametrize(
    "args, changed_file",
    [
        (["add-mac", testdriver.mac(0, 1), "relay"], "whitelist.csv"),
        (["add-vm", "vm00002", "verified"], "whitelist.csv"),
        (["del-vm", "vm00001"], "whitelist.csv"),
        (["del-mac", testdriver.mac(1, 0)], "whitelist.csv"),
        (["ports-set", "25,465,587"], "smtp-gate.conf"),
    ],
)
def test_when_the_kernel_refuses_the_file_is_restored_and_exit_1_means_nothing_changed(
    fleet: BridgeLab, args: List[str], changed_file: str
) -> None:
    """Without CAP_NET_ADMIN the kernel refuses every nftables request: the command wrote its
    file first, so it must put it back byte for byte, and the kernel must be as it was."""
    lab = fleet
    wl = lab.tmp / "whitelist.csv"
    wl.write_text(HEADER + f"{testdriver.uuid(1)},,2026-11-25T14:03:07+00:00,alice,verified\n"
                  f"x,{testdriver.mac(1, 0)},2026-11-25T14:03:07+00:00,alice,\n")
    assert sg(lab, "rebuild").returncode == 0 and can_mail(lab, "vm1n0")
    before = {name: (lab.tmp / name).read_bytes() for name in ("whitelist.csv", "smtp-gate.conf")}
    table = lab.nft("list", "table", "bridge", "smtp_gate").stdout
    r = lab.hv.exec([*NO_NET_ADMIN, sys.executable, "-m", "smtp_gate", "--config", str(lab.config_path), *args],
                    check=False, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert (r.returncode, r.stdout) == (1, ""), (r.stdout, r.stderr)
    assert len(r.stderr.splitlines()) == 1, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("smtp-gate: error: ") and "Operation not permitted" in line, line
    what = "whitelist" if changed_file == "whitelist.csv" else "config file"
    assert line.endswith(f"{what} {str(lab.tmp / changed_file)!r} restored as it was"), line
    assert {name: (lab.tmp / name).read_bytes() for name in before} == before
    assert not [p for p in lab.tmp.iterdir() if ".tmp" in p.name], "no temporary file left behind"
    assert lab.nft("list", "table", "bridge", "smtp_gate").stdout == table
    assert can_mail(lab, "vm1n0") and not can_mail(lab, "vm2n0") and not can_mail(lab, "vm0n1")


@pytest.mark.parametrize("command", ["add-mac", "del-mac"])
def test_when_the_record_cannot_be_written_the_kernel_change_is_undone_and_exit_1_means_nothing_changed(
    fleet: BridgeLab, command: str
) -> None:
    """The kernel took the change, then the run directory refused its record (an immutable
    records directory stands in for a full /run).  An allowance no record names would
    outlive the whitelist row that was put back, so the command undoes the kernel change
    too: the guest can mail exactly as before, and exit 1 is true."""
    lab = fleet
    wl = lab.tmp / "whitelist.csv"
    mac = testdriver.mac(0, 1)
    if command == "del-mac":
        assert sg(lab, "add-mac", mac, "relay").returncode == 0
    before = wl.read_bytes()
    allowed = lab.nft("list", "set", "bridge", "smtp_gate", "allowed").stdout
    could = can_mail(lab, "vm0n1")
    assert could is (command == "del-mac")
    records = lab.tmp / "run" / "records"
    with immutable(records):
        r = sg(lab, command, mac)
    assert (r.returncode, r.stdout) == (1, ""), (r.stdout, r.stderr)
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"smtp-gate: error: cannot record the change in the run directory {str(lab.tmp / 'run')!r} ("), line
    assert "Operation not permitted" in line and "the kernel change was undone, nothing was changed" in line, line
    assert line.endswith(f"whitelist {str(wl)!r} restored as it was"), line
    assert wl.read_bytes() == before
    assert lab.nft("list", "set", "bridge", "smtp_gate", "allowed").stdout == allowed
    assert can_mail(lab, "vm0n1") is could and not can_mail(lab, "vm0n0")
    assert not [p for p in records.iterdir() if ".tmp" in p.name], "no temporary file left behind"


def test_when_neither_the_record_nor_the_undo_can_be_done_exit_6_says_what_is_left(
    fleet: BridgeLab, netlink_shim: str
) -> None:
    """The record cannot be written and the undo cannot reach the kernel either (its netlink
    socket is denied, after the lookup's and the change's): the whitelist is kept, since it
    matches the kernel, and exit 6 names the allowance no record holds.  Once the run
    directory can be written again, a rebuild records it."""
    lab = fleet
    mac = testdriver.mac(0, 1)
    records = lab.tmp / "run" / "records"
    with immutable(records):
        r = sg(lab, "add-mac", mac, "relay", env={"LD_PRELOAD": netlink_shim, "SG_NETLINK": "deny-after-2"})
    assert (r.returncode, r.stdout) == (6, ""), (r.stdout, r.stderr)
    (line,) = r.stderr.splitlines()
    assert "cannot record the change in the run directory" in line and "undoing the kernel change failed too" in line, line
    assert f"the whitelist and the kernel hold the change (allowed guest 'vm00000' NIC {mac} on tap0n1)" in line, line
    assert [row["mac"] for row in rows(lab)] == [mac]
    assert can_mail(lab, "vm0n1") and not can_mail(lab, "vm0n0")
    assert sg(lab, "rebuild").returncode == 0
    assert any(mac in p.read_text() for p in records.glob("*.json")), "the rebuild recorded the allowance"


def test_the_picker_refuses_without_a_terminal_and_toggles_with_one(fleet: BridgeLab) -> None:
    lab = fleet
    r = lab.hv.exec([sys.executable, "-m", "smtp_gate", "--config", str(lab.config_path), "whitelist"],
                    check=False, input="1\nq\n", env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (
        "smtp-gate: error: the picker needs a terminal; in scripts use `smtp-gate add-vm NAME` and "
        "`smtp-gate del-vm NAME`\n"
    )
    pid, fd = pty.fork()
    if pid == 0:  # child: the picker on a terminal, in the hypervisor namespace
        os.execvpe("ip", ["ip", "netns", "exec", lab.hv.name, sys.executable, "-m", "smtp_gate",
                          "--config", str(lab.config_path), "whitelist"], dict(os.environ, PYTHONPATH=str(REPO)))
    output = b""

    def read_until(marker: bytes, timeout: float = 20) -> None:
        nonlocal output
        end = time.monotonic() + timeout
        while marker not in output and time.monotonic() < end:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    output += os.read(fd, 4096)
                except OSError:
                    break

    read_until(b"q to quit")
    os.write(fd, b"2\n")
    read_until(b"ok: allowed guest 'vm00001'")
    read_until(b"q to quit", 5)
    os.write(fd, b"q\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, output.decode(errors="replace")
    assert b"ok: added guest 'vm00001'" in output
    assert can_mail(lab, "vm1n0")
    assert [(r["vmname"], r["guest"]) for r in rows(lab)] == [(testdriver.uuid(1), "vm00001")]


# -- revocations while the table is absent, and removals that leave a NIC allowed ---------------


def test_a_revocation_while_disabled_is_not_undone_by_an_install_that_does_not_ask_libvirt(
    bare_lab: BridgeLab,
) -> None:
    """The reviewer's sequence: a guest allowed by a MAC row, `disable`, `del-mac`, then
    `enable --no-libvirt` (and a rebuild with libvirt silent), which install from the
    records: the guest stays blocked.  libvirt never answers here; the hook's record is all
    smtp-gate knows of the guest."""
    lab = bare_lab
    mac = "52:54:00:77:00:0a"
    (lab.tmp / "whitelist.csv").write_text(HEADER + f"acustomer,{mac},2026-01-01T00:00:00+00:00,alice,verified\n")
    guest = lab.add_guest("a", "vnet1", 10, mac=mac)
    sg(lab, "apply")
    lab.start_guest(guest)
    assert can_mail(lab, "a")
    assert sg(lab, "disable", "--reason", "incident", env={"SUDO_USER": "alice"}).returncode == 0
    assert can_mail(lab, "a"), "disabled: nothing is enforced"

    r = sg(lab, "del-mac", mac)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == [f"ok: removed MAC {mac} (acustomer) from line 2", f"ok: revoked guest 'a' NIC {mac} on vnet1"]
    assert re.fullmatch(
        r"ok: enforcement is disabled \(by alice at \S+ \(incident\)\): the change takes effect at `smtp-gate enable`",
        lines[2],
    ), lines
    assert len(lines) == 3 and "smtp-gate apply" not in r.stdout + r.stderr
    (record,) = [json.loads(p.read_text()) for p in (lab.tmp / "run" / "records").glob("*.json")]
    assert record["name"] == "a" and record["allowed"] == [], "the record must not bring the allowance back"

    r = sg(lab, "enable", "--no-libvirt")
    assert r.returncode == 0, r.stderr
    assert "0 allowed guest NIC(s)" in r.stdout
    assert not can_mail(lab, "a"), "enable --no-libvirt put back a revoked allowance"
    assert sg(lab, "rebuild").returncode == 0  # libvirt silent: the records and the kernel are kept
    assert not can_mail(lab, "a")


def test_del_vm_while_disabled_revokes_from_the_records_too(bare_lab: BridgeLab) -> None:
    lab = bare_lab
    mac = "52:54:00:77:00:0b"
    guest_uuid = str(uuid_mod.uuid5(uuid_mod.NAMESPACE_DNS, "b"))  # what lab.start_guest gives guest b
    (lab.tmp / "whitelist.csv").write_text(HEADER + f"{guest_uuid},,2026-01-01T00:00:00+00:00,alice,verified\n")
    guest = lab.add_guest("b", "vnet2", 11, mac=mac)
    sg(lab, "apply")
    lab.start_guest(guest)
    assert can_mail(lab, "b")
    assert sg(lab, "disable").returncode == 0
    r = sg(lab, "del-vm", "b")
    # libvirt does not answer here: the guest's metadata could not be checked, which is said (exit 3)
    assert r.returncode == 3 and "the libvirt metadata of guest 'b' could not be checked" in r.stderr, r.stderr
    assert f"ok: removed guest 'b' (UUID {guest_uuid}, every NIC) from line 2" in r.stdout
    assert f"ok: revoked guest 'b' NIC {mac} on vnet2" in r.stdout
    assert "the change takes effect at `smtp-gate enable`" in r.stdout
    assert sg(lab, "enable", "--no-libvirt").returncode == 0
    assert not can_mail(lab, "b")


def test_del_vm_names_the_nic_another_row_still_allows_and_exits_3(bare_lab: BridgeLab) -> None:
    """The reviewer's del-vm: a UUID row and a MAC row with another label.  The NIC can still
    send mail, so `removed` alone would be a lie by omission: a note names the row, exit 3."""
    lab = bare_lab
    mac = "52:54:00:77:00:0a"
    guest_uuid = str(uuid_mod.uuid5(uuid_mod.NAMESPACE_DNS, "a"))
    (lab.tmp / "whitelist.csv").write_text(
        HEADER + f"{guest_uuid},,2026-01-01T00:00:00+00:00,alice,verified\n"
        f"old-label,{mac},2025-01-01T00:00:00+00:00,bob,relay\n"
    )
    guest = lab.add_guest("a", "vnet1", 10, mac=mac)
    sg(lab, "apply")
    lab.start_guest(guest)
    assert can_mail(lab, "a")
    r = sg(lab, "del-vm", "a")
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout == f"ok: removed guest 'a' (UUID {guest_uuid}, every NIC) from line 2\n"
    assert (
        f"smtp-gate: note: NIC {mac} of guest 'a' ({guest_uuid}) is still allowed by line 2 (MAC {mac} (old-label))\n"
        in r.stderr
    ), r.stderr
    assert can_mail(lab, "a"), "the note tells the truth: the MAC row still allows it"


def test_del_vm_and_del_mac_with_libvirt_name_what_still_allows_a_nic(fleet: BridgeLab) -> None:
    lab = fleet
    wl = lab.tmp / "whitelist.csv"
    wl.write_text(
        HEADER + f"{testdriver.uuid(0)},,2026-01-01T00:00:00+00:00,alice,\n"
        f"relay,{testdriver.mac(0, 1)},2026-01-01T00:00:00+00:00,bob,\n"
        f"{testdriver.uuid(1)},,2026-01-01T00:00:00+00:00,alice,\n"
        f"vm1-eth0,{testdriver.mac(1, 0)},2026-01-01T00:00:00+00:00,bob,\n"
    )
    assert sg(lab, "rebuild").returncode == 0
    assert can_mail(lab, "vm0n0") and can_mail(lab, "vm0n1") and can_mail(lab, "vm1n0")

    r = sg(lab, "del-vm", "vm00000")
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        f"ok: removed guest 'vm00000' (UUID {testdriver.uuid(0)}, every NIC) from line 2",
        "ok: nothing to remove: the libvirt metadata of guest 'vm00000' carries no allowance",
        f"ok: revoked guest 'vm00000' NIC {testdriver.mac(0, 0)} on tap0n0",
        f"ok: guest 'vm00000' NIC {testdriver.mac(0, 0)} on tap0n0: blocked in the kernel",
        f"ok: guest 'vm00000' NIC {testdriver.mac(0, 1)} on tap0n1: allowed in the kernel",  # the relay row
    ]
    assert r.stderr == (
        f"smtp-gate: note: NIC {testdriver.mac(0, 1)} of guest 'vm00000' ({testdriver.uuid(0)}) is still allowed "
        f"by line 2 (MAC {testdriver.mac(0, 1)} (relay))\n"
    )
    assert not can_mail(lab, "vm0n0") and can_mail(lab, "vm0n1")

    # the MAC row of vm00001's NIC goes; its UUID row (now line 3) still allows it
    r = sg(lab, "del-mac", testdriver.mac(1, 0))
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout == f"ok: removed MAC {testdriver.mac(1, 0)} (vm1-eth0) from line 4\n"
    assert r.stderr == (
        f"smtp-gate: note: NIC {testdriver.mac(1, 0)} of guest 'vm00001' ({testdriver.uuid(1)}) is still allowed "
        f"by line 3 (guest 'vm00001' (UUID {testdriver.uuid(1)}, every NIC))\n"
    )
    assert can_mail(lab, "vm1n0")

    # nothing left to name: exit 0
    r = sg(lab, "del-mac", testdriver.mac(0, 1))
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert not can_mail(lab, "vm0n1")
    r = sg(lab, "del-mac", testdriver.mac(0, 1))
    assert r.returncode == 0 and r.stdout == f"ok: nothing to remove: MAC {testdriver.mac(0, 1)} is not in the whitelist\n"


def test_whitelist_commands_while_disabled_point_at_enable_not_apply(fleet: BridgeLab) -> None:
    """`smtp-gate apply` would switch enforcement back on: while it is off, a change that
    cannot reach the kernel takes effect at `enable`, and the commands say so."""
    lab = fleet
    assert sg(lab, "disable", "--reason", "ticket 9", env={"SUDO_USER": "bob"}).returncode == 0
    want = re.compile(r"ok: enforcement is disabled \(by bob at \S+ \(ticket 9\)\): the change takes effect at `smtp-gate enable`")
    for args in (["add-vm", "vm00001"], ["add-mac", testdriver.mac(2, 0)], ["ports-set", "25,465,587"]):
        r = sg(lab, *args)
        assert r.returncode == 0, r.stderr
        assert any(want.fullmatch(line) for line in r.stdout.splitlines()), (args, r.stdout)
        assert "apply" not in r.stdout + r.stderr, (args, r.stdout, r.stderr)
    assert sg(lab, "enable").returncode == 0
    assert can_mail(lab, "vm1n0") and can_mail(lab, "vm2n0") and not can_mail(lab, "vm0n0")
