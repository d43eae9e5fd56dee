"""Bridge ports and uplinks from a sysfs tree (built in a temporary directory)."""

import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from smtp_gate import config, discovery

CONF = Path("/etc/smtp-gate/smtp-gate.conf")


class FakeSysfs:
    """/sys/class/net as the kernel lays it out, for the links we need."""

    def __init__(self, root: Path) -> None:
        self.root = root / "class" / "net"
        self.buses = root / "bus"
        self.devices = root / "devices"
        self.root.mkdir(parents=True)
        self.next_index = 1

    def add(
        self,
        name: str,
        master: Optional[str] = None,
        bus: Optional[str] = None,
        devtype: str = "",
        bridge: bool = False,
        bond: bool = False,
        tun: bool = False,
        lowers: Sequence[str] = (),
    ) -> None:
        d = self.root / name
        d.mkdir()
        (d / "ifindex").write_text(f"{self.next_index}\n")
        self.next_index += 1
        (d / "uevent").write_text(f"DEVTYPE={devtype}\nINTERFACE={name}\n" if devtype else f"INTERFACE={name}\n")
        if master:
            os.symlink(f"../{master}", d / "master")
            if (self.root / master / "brif").is_dir():  # a bridge lists its ports, as the kernel does
                os.symlink(f"../../{name}/brport", self.root / master / "brif" / name)
        if bus:
            (self.buses / bus).mkdir(parents=True, exist_ok=True)
            device = self.devices / f"{name}-dev"
            device.mkdir(parents=True)
            os.symlink(self.buses / bus, device / "subsystem")
            os.symlink(device, d / "device")
        if bridge:
            (d / "bridge").mkdir()
            (d / "brif").mkdir()
        if bond:
            (d / "bonding").mkdir()
        if tun:
            (d / "tun_flags").write_text("0x1002\n")
        for lower in lowers:
            os.symlink(f"../{lower}", d / f"lower_{lower}")


def test_links_are_read_with_kind_master_and_lowers(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.add("br0", bridge=True)
    fs.add("eno1", bus="pci", master="bond0")
    fs.add("bond0", bond=True, lowers=["eno1"])
    fs.add("bond0.100", devtype="vlan", lowers=["bond0"], master="br0")
    fs.add("vnet0", tun=True, master="br0")
    links = discovery.read_links(fs.root)
    assert links["br0"].kind == "bridge"
    assert links["eno1"].kind == "physical" and links["eno1"].master == "bond0"
    assert links["bond0.100"].kind == "vlan" and links["bond0.100"].lowers == ("bond0",)
    assert links["vnet0"].kind == "tun" and links["vnet0"].ifindex == 5 and links["vnet0"].master == "br0"
    assert discovery.read_links(tmp_path / "nowhere") == {}
    bridge_of = discovery.master_of(links)
    assert bridge_of("vnet0") == "br0" and bridge_of("bond0.100") == "br0"
    assert bridge_of("eno1") is None  # a bond's member is no bridge's port
    assert bridge_of("missing0") is None


def test_links_of_a_real_namespace_match_what_ip_link_reports(bare_lab) -> None:
    """sysfs read in a namespace of the test's own (bare_lab: br0, uplink0, no guests), with
    taps and veths on two bridges and an unattached tap: names, indexes and masters equal
    what `ip -j link` reports, and each port's bridge is found.  (Bond members: the fake
    sysfs above; this kernel has no bonding, team, VRF or dummy driver to enslave with.)"""
    ns = bare_lab.hv
    commands = [
        "link add br1 type bridge",
        "tuntap add dev vnet0 mode tap",
        "link set vnet0 master br0",
        "tuntap add dev vnet1 mode tap",
        "link set vnet1 master br1",
        "tuntap add dev vnet2 mode tap",
        "link add veth0 type veth peer name veth0p",
        "link set veth0 master br1",
    ]
    for command in commands:
        ns.ip(*command.split())
    got = {name: tuple(value) for name, value in json.loads(ns.exec([sys.executable, "-c", READ_LINKS]).stdout).items()}
    reported = json.loads(ns.ip("-j", "link").stdout)
    assert got == {r["ifname"]: (r["ifindex"], r.get("master")) for r in reported}
    assert got["vnet0"][1] == "br0" and got["vnet1"][1] == "br1" and got["veth0"][1] == "br1"
    assert got["vnet2"][1] is None
    bridges = json.loads(ns.exec([sys.executable, "-c", READ_BRIDGES]).stdout)
    assert bridges == {"vnet0": "br0", "vnet1": "br1", "veth0": "br1", "veth0p": None, "vnet2": None, "uplink0": "br0"}


READ_LINKS = (
    "import json; from smtp_gate import discovery; "
    "print(json.dumps({l.name: [l.ifindex, l.master] for l in discovery.read_links().values()}))"
)
READ_BRIDGES = (
    "import json; from smtp_gate import discovery; links = discovery.read_links(); of = discovery.master_of(links); "
    "print(json.dumps({n: of(n) for n in ('vnet0', 'vnet1', 'veth0', 'veth0p', 'vnet2', 'uplink0')}))"
)


def host(tmp_path: Path) -> FakeSysfs:
    fs = FakeSysfs(tmp_path)
    fs.add("br0", bridge=True)
    fs.add("br01", bridge=True)  # the original's substring match also caught br01
    fs.add("docker0", bridge=True)
    fs.add("eno1", bus="pci", master="br0")
    fs.add("enp2s0", bus="pci")
    fs.add("team0", devtype="", lowers=["enp2s0"], master="br0")  # a team: stacked on a NIC
    fs.add("eth9", devtype="", master="br0")  # a veth named like a NIC: not an uplink by kind
    fs.add("vxlan10", devtype="vxlan", master="br0")
    fs.add("vif3.0", bus="xen-backend", master="br0")  # a Xen guest port has a device too
    fs.add("vnet0", tun=True, master="br0")
    fs.add("vnet7", tun=True, master="br01")
    fs.add("veth77", master="docker0")
    return fs


def test_auto_detection_finds_nics_bonds_teams_vlans_and_never_a_guest_port(tmp_path: Path) -> None:
    fs = host(tmp_path)
    plan = discovery.plan_ports(config.parse("", CONF), discovery.read_links(fs.root))
    (br0,) = plan.bridges
    assert br0.ports == ("eno1", "eth9", "team0", "vif3.0", "vnet0", "vxlan10")
    assert br0.uplinks == ("eno1", "team0")
    assert plan.uplinks == ("eno1", "team0")
    assert plan.warnings == ()
    # ports of bridges we do not protect are left alone; br01 is not br0
    assert plan.foreign_ports == ("veth77", "vnet7")


def test_a_physical_port_reported_as_a_guest_port_is_not_an_uplink(tmp_path: Path) -> None:
    fs = host(tmp_path)
    links = discovery.read_links(fs.root)
    plan = discovery.plan_ports(config.parse("", CONF), links, guest_ports=["eno1"])
    assert plan.bridges[0].uplinks == ("team0",)


def test_uplinks_and_uplink_regex_take_precedence(tmp_path: Path) -> None:
    links = discovery.read_links(host(tmp_path).root)
    explicit = discovery.plan_ports(config.parse('UPLINKS="eth9 missing0"\n', CONF), links)
    assert explicit.bridges[0].uplinks == ("eth9",)
    assert explicit.uplinks == ("eth9", "missing0")  # a configured name is trusted wherever it appears
    regex = discovery.plan_ports(config.parse('UPLINK_REGEX="^(ens|eno|enp|eth|bond)"\n', CONF), links)
    assert regex.bridges[0].uplinks == ("eno1", "eth9")


def test_missing_bridge_and_bridge_without_uplink_are_warnings(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.add("br0", bridge=True)
    fs.add("vnet0", tun=True, master="br0")
    fs.add("notabridge")
    plan = discovery.plan_ports(config.parse('BRIDGE="br0 br9 notabridge"\n', CONF), discovery.read_links(fs.root))
    text = "\n".join(plan.warnings)
    assert "bridge 'br0' has no uplink (auto-detection found none among its ports: vnet0)" in text
    assert "bridge 'br9' does not exist (yet)" in text
    assert "bridge 'notabridge' is not a bridge (kind other)" in text
    assert [b.exists for b in plan.bridges] == [True, False, False]


def test_a_port_whose_name_cannot_reach_nft_is_skipped_and_reported(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.add("br0", bridge=True)
    fs.add("eno1", bus="pci", master="br0")
    fs.add("we*rd", tun=True, master="br0")
    plan = discovery.plan_ports(config.parse("", CONF), discovery.read_links(fs.root))
    assert plan.skipped == ("we*rd",)
    assert plan.bridges[0].ports == ("eno1",)
