"""Bridges, their ports and their uplinks, read from the kernel (sysfs).

read_links() is the only function here that touches the system; everything else is
pure and takes its links as data.  sysfs, not `bridge link` text: the original's
substring match also caught `br01` when asked for `br0`, and printed veth ports as
`name@peer`, which never matched a set element.
"""

import os
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from smtp_gate import validate
from smtp_gate.config import Config
from smtp_gate.errors import ValidationError

# a string, not a pathlib.Path: pathlib (with urllib.parse and ipaddress) costs every
# command and hook that reads links ~8 ms of imports
SYSFS_NET = "/sys/class/net"

# Buses of real NICs (and of a virtual machine's own NICs, when the hypervisor is nested).
# Not "xen-backend": a Xen dom0 sees every guest's vifN.M with a device on that bus.
_PHYSICAL_BUSES = {"pci", "usb", "platform", "vmbus", "virtio", "xen", "ccwgroup", "mdio_bus"}


class Link(NamedTuple):
    name: str
    ifindex: int
    kind: str  # physical, bond, bridge, vlan, tun, vxlan, other
    master: Optional[str]  # the bridge (or bond, team...) this link is enslaved to
    lowers: Tuple[str, ...]  # what it is stacked on (VLAN, bond, team); () for taps and bridges: never asked


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
    """A small sysfs attribute's text; os calls, not open(): a rebuild reads one per link,
    and the io objects cost more than the read (60 ms against 40 for 2 000 links)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


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


def read_links(root: "os.PathLike[str] | str" = SYSFS_NET) -> Dict[str, Link]:
    """Every network device of this namespace, by name.  Devices that vanish while we
    read are skipped: a guest may stop at any moment.  Plain os calls, not pathlib: a
    host with 1 000 guests has thousands of links, and a rebuild reads them all.  A
    bridge port's master comes from its bridge's brif/ listing (one listdir per bridge,
    not a readlink per tap); only other links read their own master (a bond's members)."""
    base = os.fspath(root)
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return {}
    found: List[Tuple[str, int, str]] = []
    for name in names:
        index = _read(f"{base}/{name}/ifindex")
        if index is not None and index.isdigit():
            found.append((name, int(index), _kind(f"{base}/{name}")))
    bridge_of: Dict[str, str] = {}
    for name, _index, kind in found:
        if kind == "bridge":
            try:
                bridge_of.update((port, name) for port in os.listdir(f"{base}/{name}/brif"))
            except OSError:
                continue
    links: Dict[str, Link] = {}
    for name, index, kind in found:
        path = f"{base}/{name}"
        master = bridge_of.get(name)
        lowers: Tuple[str, ...] = ()
        # a tap is stacked on nothing and enslaved to nothing but a bridge; a bridge's
        # lower_* are its ports: never asked for
        if kind not in ("tun", "bridge"):
            try:
                entries = os.listdir(path)
            except OSError:
                continue
            lowers = tuple(sorted(e[len("lower_") :] for e in entries if e.startswith("lower_")))
            if master is None and "master" in entries:
                try:
                    master = os.path.basename(os.readlink(f"{path}/master"))
                except OSError:
                    pass
        links[name] = Link(name=name, ifindex=index, kind=kind, master=master, lowers=lowers)
    return links


def index_of(links: Dict[str, Link]) -> Callable[[str], Optional[int]]:
    """Interface name -> index, None if no such link (guests.record_for's lookup)."""
    return lambda name: links[name].ifindex if name in links else None


def master_of(links: Dict[str, Link]) -> Callable[[str], Optional[str]]:
    """Interface name -> the bridge it is a port of, None if none (a bond's member, too):
    what the hook reads from sysfs brport/bridge, so both derive the same records."""

    def bridge(name: str) -> Optional[str]:
        master = links[name].master if name in links else None
        return master if master in links and links[master].kind == "bridge" else None

    return bridge


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
    an uplink found by UPLINK_REGEX or auto-detection: a Xen vif has a device of its own,
    and trusting it as an uplink would let its guest out.  (config.parse refuses UPLINKS
    that match GUEST_PATTERNS; the engine drops UPLINKS a hypervisor reports as a guest's.)
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
                "treated as an unknown port (its outbound mail blocked) until an uplink is found"
            )
            bridges.append(BridgePlan(bridge, False, (), ()))
            continue
        ports = tuple(sorted(l.name for l in links.values() if l.master == bridge and safe(l.name)))
        if config.uplinks:
            found = tuple(p for p in ports if p in config.uplinks)
        elif config.uplink_regex is not None:
            matched = [p for p in ports if config.uplink_regex.search(p)]
            found = tuple(p for p in matched if not _is_guest_port(p, config.guest_patterns, guest_ports))
            if len(found) != len(matched):
                warnings.append(
                    f"UPLINK_REGEX matches guest ports of bridge {bridge!r}, which are never uplinks: "
                    + ", ".join(p for p in matched if p not in found)
                )
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
