"""Nothing unprotected goes unsaid (issue 10, item 3): apply, rebuild, status, add-vm and the
picker name every running guest NIC no rule of ours sees, and exit 3 while one exists.

libvirt's test driver says who runs where; a real namespace holds br0 (protected) and
virbr0 (libvirt's NAT bridge, not in BRIDGE), so the kernel's port master decides where a
type='network' NIC is, as on a real host.
"""

import json
import os
import pty
import select
import sys
import time
from pathlib import Path
from typing import Dict, Set, Tuple

import pytest

from tests import testdriver
from tests.netlab import REPO, BridgeLab

pytestmark = pytest.mark.kernel

HEADER = "# vmname,mac,added_at,added_by,reason\n"


def uuid(i: int) -> str:
    return testdriver.uuid(i)


def mac(i: int) -> str:
    return testdriver.mac(i, 0)


# (name, index, interface XML after <mac/>, running); see the fixture for the lab's ports
GUESTS = (
    ("onbr0", 1, "<source bridge='br0'/><target dev='tapbr0'/>", "bridge", True),
    ("natnet", 2, "<source network='default'/><target dev='tapnat'/>", "network", True),  # live XML names no bridge
    ("natbridge", 3, "<source bridge='virbr0'/><target dev='tapnatb'/>", "bridge", True),
    ("mvtap", 4, "<source dev='eth0' mode='bridge'/><target dev='mvt4'/>", "direct", True),
    (
        "passthru",
        5,
        "<source><address type='pci' domain='0x0000' bus='0x03' slot='0x10' function='0x1'/></source>",
        "hostdev",
        True,
    ),
    ("offmvtap", 6, "<source dev='eth0' mode='bridge'/><target dev='mvt6'/>", "direct", False),
)
# what status must name: (guest, MAC, bridge or kind) of every running NIC not on br0
EXPECTED: Set[Tuple[str, str, str]] = {
    ("natnet", mac(2), "virbr0"),
    ("natbridge", mac(3), "virbr0"),
    ("mvtap", mac(4), "direct"),
    ("passthru", mac(5), "hostdev"),
}


def node_xml(tmp: Path) -> str:
    parts = ["<node>\n"]
    for name, i, body, kind, running in GUESTS:
        interface = f"<interface type='{kind}'><mac address='{mac(i)}'/>{body}</interface>"
        parts.append(testdriver._domain(name, uuid(i), interface, running))
    parts.append("</node>\n")
    path = tmp / "node.xml"
    path.write_text("".join(parts))
    return f"test://{path}"


@pytest.fixture
def hosts(bare_lab: BridgeLab) -> BridgeLab:
    """br0 (protected) with onbr0's port, virbr0 (not in BRIDGE) with natnet's and natbridge's."""
    lab = bare_lab
    lab.hv.ip("link", "add", "virbr0", "type", "bridge", "stp_state", "0")
    lab.hv.ip("link", "set", "virbr0", "up")
    lab.add_guest("onbr0", "tapbr0", 31, mac=mac(1))
    for port, bridge in (("tapnat", "virbr0"), ("tapnatb", "virbr0")):
        lab.hv.ip("link", "add", port, "type", "veth", "peer", "name", f"{port}p")
        lab.hv.ip("link", "set", port, "master", bridge, "up")
    uri = node_xml(lab.tmp)
    lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="{uri}"\n')
    # onbr0 and natnet are whitelisted; natnet's only NIC is on virbr0
    (lab.tmp / "whitelist.csv").write_text(
        HEADER + f"{uuid(1)},,2026-11-25T14:03:07+00:00,alice,\n{uuid(2)},,2026-11-25T14:03:07+00:00,alice,\n"
    )
    return lab


def named(entries) -> Set[Tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    return {(e["guest"], e["mac"], e["where"]) for e in entries}


def test_apply_and_rebuild_warn_about_every_unprotected_nic_and_exit_3(hosts: BridgeLab) -> None:
    for command in ("apply", "rebuild"):
        r = hosts.smtp_gate(command, check=False)
        assert r.returncode == 3, r.stdout + r.stderr
        lines = [line for line in r.stderr.splitlines() if "UNPROTECTED:" in line]
        assert len(lines) == len(EXPECTED), r.stderr
        for guest, nic_mac, where in EXPECTED:
            i = next(g[1] for g in GUESTS if g[0] == guest)
            want = f"smtp-gate: warning: UNPROTECTED: guest {guest} ({uuid(i)}) NIC {nic_mac} on {where}: "
            assert any(line.startswith(want) for line in lines), (want, r.stderr)
        assert "bridge virbr0 is not in BRIDGE (br0)" in r.stderr
        assert "offmvtap" not in r.stderr and "onbr0" not in r.stderr
    # the protected guest's allowance is in, and it can mail; nothing was given to natnet
    assert hosts.tcp_connects(hosts.guests["onbr0"], hosts.INET4, 25)


def test_status_names_exactly_the_unprotected_nics_and_exits_3(hosts: BridgeLab) -> None:
    hosts.smtp_gate("apply", check=False)
    r = hosts.smtp_gate("status", "--json", check=False)
    assert r.returncode == 3, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert named(report["unprotected"]) == EXPECTED
    for entry in report["unprotected"]:
        assert entry["uuid"] and entry["reason"] and entry["line"].startswith(f"UNPROTECTED: guest {entry['guest']} (")
    text = hosts.smtp_gate("status", check=False)
    assert text.returncode == 3
    assert "WITH WARNINGS" in text.stdout.splitlines()[0]
    shown = [line for line in text.stdout.splitlines() if line.startswith("UNPROTECTED: ")]
    assert {line.split(" ")[2] for line in shown} == {g for g, _m, _w in EXPECTED} and len(shown) == 4
    assert f"UNPROTECTED: guest natnet ({uuid(2)}) NIC {mac(2)} on virbr0: bridge virbr0 is not in BRIDGE" in text.stdout


def test_a_whitelisted_guest_with_no_nic_on_a_protected_bridge_is_not_held(hosts: BridgeLab) -> None:
    hosts.smtp_gate("apply", check=False)
    report = json.loads(hosts.smtp_gate("status", "--json", check=False).stdout)
    by_name: Dict[str, dict] = {g["name"]: g for g in report["guests"]}
    assert by_name["onbr0"]["held"] == "yes"
    assert by_name["natnet"]["held"] == "no NIC on a protected bridge"
    assert not any("natnet" in w for w in report["warnings"]), report["warnings"]
    text = hosts.smtp_gate("status", check=False).stdout
    assert "whitelisted guest natnet: running; ports -; allowance in kernel: no NIC on a protected bridge" in text
    assert "allowance in kernel: yes" in text.split("whitelisted guest onbr0")[1].splitlines()[0]


def test_once_virbr0_is_protected_only_the_nics_no_bridge_rule_sees_are_left(hosts: BridgeLab) -> None:
    hosts.write_config(f'UPLINKS="uplink0"\nBRIDGE="br0 virbr0"\nLIBVIRT_URI="test://{hosts.tmp}/node.xml"\n')
    r = hosts.smtp_gate("apply", check=False)
    assert r.returncode == 3 and "virbr0" not in "".join(l for l in r.stderr.splitlines() if "UNPROTECTED" in l)
    report = json.loads(hosts.smtp_gate("status", "--json", check=False).stdout)
    assert named(report["unprotected"]) == {("mvtap", mac(4), "direct"), ("passthru", mac(5), "hostdev")}


def test_without_libvirt_apply_and_status_say_unprotected_nics_were_not_checked(hosts: BridgeLab) -> None:
    hosts.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="qemu:///system?socket={hosts.tmp}/nobody"\n')
    r = hosts.smtp_gate("apply", check=False)
    assert r.returncode == 0 and "UNPROTECTED NICs could not be checked" in r.stderr, r.stderr
    s = hosts.smtp_gate("status", check=False)
    assert "UNPROTECTED NICs could not be checked" in s.stdout


def test_add_vm_says_which_nics_allowing_changes_nothing_for(hosts: BridgeLab) -> None:
    # a guest with one NIC on br0 and one on virbr0: allowed, and the virbr0 one named
    node = hosts.tmp / "node.xml"
    text = node.read_text()
    second = f"<interface type='bridge'><mac address='{testdriver.mac(1, 1)}'/><source bridge='virbr0'/><target dev='tapnatb'/></interface>"
    node.write_text(text.replace("<target dev='tapbr0'/></interface>", "<target dev='tapbr0'/></interface>" + second))
    (hosts.tmp / "whitelist.csv").write_text(HEADER)
    r = hosts.smtp_gate("add-vm", "onbr0", check=False)
    assert r.returncode == 0, r.stderr
    assert "ok: allowed guest 'onbr0' NIC" in r.stdout
    assert (
        f"smtp-gate: warning: UNPROTECTED: guest onbr0 ({uuid(1)}) NIC {testdriver.mac(1, 1)} on virbr0: " in r.stderr
    )
    assert "allowing the guest changes nothing for it" in r.stderr


def run_picker(lab: BridgeLab, *answers: bytes) -> str:
    """The picker on a terminal, in the hypervisor namespace: each answer after a prompt, then
    q.  Returns everything it printed (stdout and stderr share the terminal)."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execvpe("ip", ["ip", "netns", "exec", lab.hv.name, sys.executable, "-m", "smtp_gate",
                          "--config", str(lab.config_path), "whitelist"], dict(os.environ, PYTHONPATH=str(REPO)))
    output = b""

    def prompt() -> None:
        nonlocal output
        end = time.monotonic() + 20
        seen = output.count(b"q to quit")
        while output.count(b"q to quit") == seen and time.monotonic() < end:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    output += os.read(fd, 4096)
                except OSError:
                    break

    for answer in (*answers, b"q"):
        prompt()
        os.write(fd, answer + b"\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = output.decode(errors="replace").replace("\r\n", "\n")
    assert os.waitstatus_to_exitcode(status) == 0, text
    return text


def test_the_picker_marks_unprotected_guests_as_status_does(hosts: BridgeLab) -> None:
    text = run_picker(hosts)
    rows = {line.split()[1]: line for line in text.splitlines() if line[:3].strip().isdigit()}
    assert set(rows) == {g[0] for g in GUESTS}
    marked = {name for name, line in rows.items() if line.rstrip().endswith("UNPROTECTED")}
    assert marked == {g for g, _m, _w in EXPECTED}
    picker_lines = {line.strip() for line in text.splitlines() if line.strip().startswith("UNPROTECTED: ")}
    hosts.smtp_gate("apply", check=False)
    report = json.loads(hosts.smtp_gate("status", "--json", check=False).stdout)
    assert picker_lines == {e["line"] for e in report["unprotected"]}


def test_guest_bridges_lists_the_bridges_of_running_guests(hosts: BridgeLab) -> None:
    r = hosts.smtp_gate("guest-bridges", check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["br0 protected 1", "virbr0 unprotected 2"]
    hosts.write_config(f'UPLINKS="uplink0"\nBRIDGE="virbr0,br7"\nLIBVIRT_URI="test://{hosts.tmp}/node.xml"\n')
    r = hosts.smtp_gate("guest-bridges", check=False)
    assert r.stdout.splitlines() == ["br0 unprotected 1", "virbr0 protected 2", "br7 unused 0"]
    assert "mvtap" in r.stderr and "passthru" in r.stderr
    bad = hosts.smtp_gate("guest-bridges", "--libvirt-uri", f"qemu:///system?socket={hosts.tmp}/nobody", check=False)
    assert bad.returncode == 1 and bad.stdout == "" and "no libvirt URI answered" in bad.stderr


def test_add_vm_and_the_picker_agree_on_a_guest_with_no_protected_nic(hosts: BridgeLab) -> None:
    """natbridge's only NIC is on virbr0, which BRIDGE does not name.  Both add the row (the
    guest may get a protected NIC, or virbr0 may be added to BRIDGE), both say the same
    warnings, and neither gives the guest anything in the kernel now."""
    hosts.smtp_gate("apply", check=False)
    wl = hosts.tmp / "whitelist.csv"
    wl.write_text(HEADER)
    r = hosts.smtp_gate("add-vm", "natbridge", check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"ok: added guest 'natbridge' (UUID {uuid(3)}, every NIC) at line 2\n"
    by_add_vm = [line for line in r.stderr.splitlines() if line.startswith("smtp-gate: warning: ")]
    assert by_add_vm == [
        "smtp-gate: warning: guest 'natbridge' has no NIC on a protected bridge (br0): the row allows nothing until "
        "one of its NICs is on one (add its bridge to BRIDGE, or move the NIC)",
        f"smtp-gate: warning: UNPROTECTED: guest natbridge ({uuid(3)}) NIC {mac(3)} on virbr0: bridge virbr0 is not in "
        "BRIDGE (br0): its ports are left alone (no rule sees this NIC: allowing the guest changes nothing for it)",
    ], r.stderr
    row_by_add_vm = wl.read_text().splitlines()[1].split(",")[:2]
    assert "smtp_gate" in hosts.nft("list", "tables").stdout
    assert mac(3) not in hosts.nft("list", "set", "bridge", "smtp_gate", "allowed").stdout

    wl.write_text(HEADER)
    number = sorted(g[0] for g in GUESTS).index("natbridge") + 1  # the picker lists guests by name
    text = run_picker(hosts, str(number).encode())
    assert f"ok: added guest 'natbridge' (UUID {uuid(3)}, every NIC) at line 2" in text
    by_picker = [line for line in text.splitlines() if line.startswith("smtp-gate: warning: ")]
    assert by_picker == by_add_vm, text
    assert wl.read_text().splitlines()[1].split(",")[:2] == row_by_add_vm == [uuid(3), ""]
    assert mac(3) not in hosts.nft("list", "set", "bridge", "smtp_gate", "allowed").stdout


def test_add_mac_of_an_unprotected_nic_warns_as_add_vm_does(hosts: BridgeLab) -> None:
    hosts.smtp_gate("apply", check=False)
    r = hosts.smtp_gate("add-mac", mac(4), "mv", check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"ok: added MAC {mac(4)} (mv) at line 4\n"), r.stdout
    assert r.stderr == (
        f"smtp-gate: warning: UNPROTECTED: guest mvtap ({uuid(4)}) NIC {mac(4)} on direct: "
        + next(u for u in json.loads(hosts.smtp_gate("status", "--json", check=False).stdout)["unprotected"]
               if u["guest"] == "mvtap")["reason"]
        + " (no rule sees this NIC: allowing it changes nothing for it)\n"
    )


def test_metrics_say_whether_libvirt_answered_and_keep_the_last_unprotected_count(hosts: BridgeLab) -> None:
    """smtp_gate_libvirt_up: 1 after a rebuild libvirt answered (the test driver), 0 after one
    it did not; smtp_gate_unprotected_nics then keeps the last count, which the libvirt alert
    tells the operator is not being checked any more (review of issue 12, finding 6)."""
    from tests.test_metrics import parse

    textfiles = hosts.tmp / "textfile"
    textfiles.mkdir()
    uri = node_xml(hosts.tmp)
    hosts.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="{uri}"\nMETRICS_DIR="{textfiles}"\n')
    assert hosts.smtp_gate("rebuild", check=False).returncode == 3
    samples = parse((textfiles / "smtp_gate.prom").read_text())
    assert samples[("smtp_gate_libvirt_up", ())] == 1
    assert samples[("smtp_gate_unprotected_nics", ())] == len(EXPECTED)
    hosts.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="qemu:///system?socket={hosts.tmp}/nobody"\n'
                       f'METRICS_DIR="{textfiles}"\n')
    assert hosts.smtp_gate("rebuild", check=False).returncode == 0
    samples = parse((textfiles / "smtp_gate.prom").read_text())
    assert samples[("smtp_gate_libvirt_up", ())] == 0
    assert samples[("smtp_gate_unprotected_nics", ())] == len(EXPECTED)
    # --no-libvirt asks nobody: the last answer stands
    assert hosts.smtp_gate("rebuild", "--no-libvirt", check=False).returncode == 0
    assert parse((textfiles / "smtp_gate.prom").read_text())[("smtp_gate_libvirt_up", ())] == 0
