"""Bridges, their ports and their uplinks, read from the kernel (sysfs).

read_links() is the only function here that touches the system; everything else is
pure and takes its links as data.  sysfs, not `bridge link` text: the original's
substring match also caught `br01` when asked for `br0`, and printed veth ports as
`name@peer`, which never matched a set element.
"""

import os
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from smtp_gate import validate
from smtp_gate.config import Config
from smtp_gate.errors import ValidationError

SYSFS_NET = Path("/sys/class/net")

# Buses of real NICs (and of a virtual machine's own NICs, when the hypervisor is nested).
# Not "xen-backend": a Xen dom0 sees every guest's vifN.M with a device on that bus.
_PHYSICAL_BUSES = {"pci", "usb", "platform", "vmbus", "virtio", "xen", "ccwgroup", "mdio_bus"}


class Link(NamedTuple):
    name: str
    ifindex: int
    kind: str  # physical, bond, bridge, vlan, tun, vxlan, other
    master: Optional[str]  # the bridge (or bond) this link is enslaved to
    lowers: Tuple[str, ...]  # devices this one is stacked on (VLAN, bond, team members)


class BridgePlan(NamedTuple):
    name: str
    exists: bool
    ports: Tuple[str, ...]
    uplinks: Tuple[str, ...]


class PortPlan(NamedTuple):
    bridges: Tuple[BridgePlan, ...]
    uplinks: Tuple[str, ...]  # every uplink name, configured or found
    foreign_ports: Tuple[str, ...]  # ports of bridges we do not protect: left alone
    skipped: Tuple[str, ...]  # port names that cannot be written into a rule safely
    warnings: Tuple[str, ...]


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("ascii", "replace").strip()
    except OSError:
        return None


def _kind(path: str) -> str:
    """What a link is, from the fewest sysfs lookups for the common case (a guest's tap)."""
    if os.path.exists(f"{path}/tun_flags"):
        return "tun"
    if os.path.isdir(f"{path}/bridge"):
        return "bridge"
    if os.path.isdir(f"{path}/bonding"):
        return "bond"
    devtype = ""
    for line in (_read(f"{path}/uevent") or "").splitlines():
        if line.startswith("DEVTYPE="):
            devtype = line.split("=", 1)[1]
    if devtype in ("vlan", "vxlan", "wlan", "geneve", "macvlan", "ipvlan", "wireguard"):
        return devtype
    try:
        bus = os.path.basename(os.path.realpath(f"{path}/device/subsystem")) if os.path.exists(f"{path}/device") else ""
    except OSError:
        bus = ""
    if bus in _PHYSICAL_BUSES:
        return "physical"
    return "other"


def read_links(root: Path = SYSFS_NET) -> Dict[str, Link]:
    """Every network device of this namespace, by name.  Devices that vanish while we
    read are skipped: a guest may stop at any moment.  Plain os calls, not pathlib: a
    host with 1 000 guests has thousands of links, and a rebuild reads them all."""
    links: Dict[str, Link] = {}
    base = os.fspath(root)
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return links
    for name in names:
        path = f"{base}/{name}"
        index = _read(f"{path}/ifindex")
        if index is None or not index.isdigit():
            continue
        try:
            master: Optional[str] = os.path.basename(os.readlink(f"{path}/master"))
        except OSError:
            master = None
        kind = _kind(path)
        lowers: Tuple[str, ...] = ()
        if kind != "tun":  # a tap is stacked on nothing
            try:
                lowers = tuple(sorted(e[len("lower_") :] for e in os.listdir(path) if e.startswith("lower_")))
            except OSError:
                continue
        links[name] = Link(name=name, ifindex=int(index), kind=kind, master=master, lowers=lowers)
    return links


def index_of(links: Dict[str, Link]) -> Callable[[str], Optional[int]]:
    """Interface name -> index, None if no such link (guests.record_for's lookup)."""
    return lambda name: links[name].ifindex if name in links else None


def master_of(links: Dict[str, Link]) -> Callable[[str], Optional[str]]:
    """Interface name -> the bridge (or bond) it is a port of, None if none."""
    return lambda name: links[name].master if name in links else None


def read_indexes() -> Dict[str, int]:
    """Name -> interface index of every link, over netlink: a fraction of read_links()'s cost,
    for re-checking that names still mean the same devices."""
    import socket

    return {name: index for index, name in socket.if_nameindex()}


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
