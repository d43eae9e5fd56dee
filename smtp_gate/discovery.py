"""Bridges, their ports and their uplinks, read from the kernel (sysfs).

read_links() is the only function here that touches the system; everything else is
pure and takes its links as data.  sysfs, not `bridge link` text: the original's
substring match also caught `br01` when asked for `br0`, and printed veth ports as
`name@peer`, which never matched a set element.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from smtp_gate import validate
from smtp_gate.config import Config
from smtp_gate.errors import ValidationError

SYSFS_NET = Path("/sys/class/net")

# Buses of real NICs (and of a virtual machine's own NICs, when the hypervisor is nested).
# Not "xen-backend": a Xen dom0 sees every guest's vifN.M with a device on that bus.
_PHYSICAL_BUSES = {"pci", "usb", "platform", "vmbus", "virtio", "xen", "ccwgroup", "mdio_bus"}


@dataclass(frozen=True)
class Link:
    name: str
    ifindex: int
    kind: str  # physical, bond, bridge, vlan, tun, vxlan, other
    master: Optional[str]  # the bridge (or bond) this link is enslaved to
    lowers: Tuple[str, ...]  # devices this one is stacked on (VLAN, bond, team members)


@dataclass(frozen=True)
class BridgePlan:
    name: str
    exists: bool
    ports: Tuple[str, ...]
    uplinks: Tuple[str, ...]


@dataclass(frozen=True)
class PortPlan:
    bridges: Tuple[BridgePlan, ...]
    uplinks: Tuple[str, ...]  # every uplink name, configured or found
    foreign_ports: Tuple[str, ...]  # ports of bridges we do not protect: left alone
    skipped: Tuple[str, ...]  # port names that cannot be written into a rule safely
    warnings: Tuple[str, ...]


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _kind(path: Path) -> str:
    if (path / "bridge").is_dir():
        return "bridge"
    if (path / "bonding").is_dir():
        return "bond"
    if (path / "tun_flags").exists():
        return "tun"
    devtype = ""
    for line in (_read(path / "uevent") or "").splitlines():
        if line.startswith("DEVTYPE="):
            devtype = line.split("=", 1)[1]
    if devtype in ("vlan", "vxlan", "wlan", "geneve", "macvlan", "ipvlan", "wireguard"):
        return devtype
    bus = os.path.basename(os.path.realpath(path / "device" / "subsystem")) if (path / "device").exists() else ""
    if bus in _PHYSICAL_BUSES:
        return "physical"
    return "other"


def read_links(root: Path = SYSFS_NET) -> Dict[str, Link]:
    """Every network device of this namespace, by name.  Devices that vanish while we
    read are skipped: a guest may stop at any moment."""
    links: Dict[str, Link] = {}
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return links
    for name in names:
        path = root / name
        index = _read(path / "ifindex")
        if index is None or not index.isdigit():
            continue
        master_path = path / "master"
        master = os.path.basename(os.readlink(master_path)) if master_path.is_symlink() else None
        try:
            lowers = tuple(sorted(entry[len("lower_"):] for entry in os.listdir(path) if entry.startswith("lower_")))
        except OSError:
            continue
        links[name] = Link(name=name, ifindex=int(index), kind=_kind(path), master=master, lowers=lowers)
    return links


def is_auto_uplink(link: Link, links: Dict[str, Link], _depth: int = 0) -> bool:
    """Physical NICs, bonds, and devices stacked only on those (VLANs, teams, VLANs of bonds)."""
    if link.kind in ("physical", "bond"):
        return True
    if _depth > 4 or not link.lowers or link.kind in ("tun", "bridge", "vxlan", "geneve", "wireguard"):
        return False
    return all(lower in links and is_auto_uplink(links[lower], links, _depth + 1) for lower in link.lowers)


def _is_guest_port(name: str, patterns: Sequence[str], guest_ports: Sequence[str]) -> bool:
    return name in guest_ports or any(validate.pattern_matches(p, name) for p in patterns)


def plan_ports(config: Config, links: Dict[str, Link], guest_ports: Sequence[str] = ()) -> PortPlan:
    """Decide the uplinks of each protected bridge and the ports we must leave alone.

    Uplinks: UPLINKS if set, else ports matching UPLINK_REGEX, else auto-detection.  A
    port that is a guest's (reported by a hypervisor or matching GUEST_PATTERNS) is never
    an auto-detected uplink: a Xen vif has a device of its own, and trusting it as an
    uplink would let its guest out.
    """
    bridges: List[BridgePlan] = []
    uplinks: List[str] = list(config.uplinks)
    warnings: List[str] = []
    skipped: List[str] = []

    def safe(name: str) -> bool:
        try:
            validate.ifname(name)
            return True
        except ValidationError:
            skipped.append(name)
            return False

    for bridge in config.bridges:
        link = links.get(bridge)
        if link is None or link.kind != "bridge":
            what = "does not exist (yet)" if link is None else f"is not a bridge (kind {link.kind})"
            warnings.append(
                f"bridge {bridge!r} {what}: enforcement is installed and every port it gets will be "
                "treated as a guest port until an uplink is found"
            )
            bridges.append(BridgePlan(bridge, False, (), ()))
            continue
        ports = tuple(sorted(l.name for l in links.values() if l.master == bridge and safe(l.name)))
        if config.uplinks:
            found = tuple(p for p in ports if p in config.uplinks)
        elif config.uplink_regex is not None:
            found = tuple(p for p in ports if config.uplink_regex.search(p))
        else:
            found = tuple(
                p
                for p in ports
                if not _is_guest_port(p, config.guest_patterns, guest_ports) and is_auto_uplink(links[p], links)
            )
        if not found:
            how = (
                "UPLINKS" if config.uplinks else "UPLINK_REGEX" if config.uplink_regex is not None else "auto-detection"
            )
            warnings.append(
                f"bridge {bridge!r} has no uplink ({how} found none among its ports: "
                f"{', '.join(ports) or 'none'}): inbound traffic is still delivered to guests, "
                "but set UPLINKS if mail from outside must reach the host through this bridge"
            )
        bridges.append(BridgePlan(bridge, True, ports, found))
        uplinks.extend(found)
    protected = set(config.bridges)
    foreign = sorted(
        l.name for l in links.values() if l.master and l.master not in protected and links.get(l.master, l).kind == "bridge"
        and safe(l.name)
    )
    return PortPlan(
        bridges=tuple(bridges),
        uplinks=tuple(dict.fromkeys(uplinks)),
        foreign_ports=tuple(foreign),
        skipped=tuple(sorted(set(skipped))),
        warnings=tuple(warnings),
    )
