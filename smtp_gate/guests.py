"""From a guest's domain XML and the whitelist to what the kernel must hold for it.

One derivation for hooks, rebuilds and whitelist commands, so an allowance means the same
thing whoever installs it: a NIC on a protected bridge, with a MAC the whitelist allows,
allowed on its own port's interface index.  Pure: the caller passes the lookups.
"""

from typing import Callable, Collection, List, Optional, Tuple

from smtp_gate.domain import Domain, Nic
from smtp_gate.runstate import Port, Record

IndexOf = Callable[[str], Optional[int]]  # interface name -> ifindex, None if it does not exist
MasterOf = Callable[[str], Optional[str]]  # interface name -> the bridge it is a port of


def nic_bridge(nic: Nic, master_of: MasterOf) -> Optional[str]:
    """The bridge a NIC's port is on: the XML's word, else the kernel's (sysfs master)."""
    if nic.bridge:
        return nic.bridge
    return master_of(nic.target) if nic.target else None


def record_for(
    domain: Domain,
    protected: Collection[str],
    allowed_macs: Collection[str],
    index_of: IndexOf,
    master_of: MasterOf,
) -> Record:
    """What the kernel must hold for DOMAIN: its ports on protected bridges are guest ports
    (guest-to-guest traffic toward them is untouched), its ports on other bridges are left
    alone, and each allowed NIC is an (ifindex, MAC) pair.  Every port is keyed by the
    index its device has now: a later device that reuses the name inherits nothing.  A NIC
    whose device does not exist is skipped (an unknown port is blocked anyway)."""
    guest_ports: List[Port] = []
    foreign: List[Port] = []
    allowed: List[Tuple[int, str]] = []
    for nic in domain.nics:
        if not nic.target or not nic.bridge_visible:
            continue
        bridge = nic_bridge(nic, master_of)
        index = index_of(nic.target)
        if bridge is None or index is None:
            continue
        if bridge not in protected:
            foreign.append((nic.target, index))
            continue
        guest_ports.append((nic.target, index))
        if nic.mac and nic.mac in allowed_macs:
            allowed.append((index, nic.mac))
    return Record(
        uuid=domain.uuid,
        name=domain.name,
        guest_ports=tuple(sorted(set(guest_ports))),
        foreign_ports=tuple(sorted(set(foreign))),
        allowed=tuple(sorted(set(allowed))),
    )


def nic_macs(domain: Domain) -> List[str]:
    return [nic.mac for nic in domain.nics if nic.mac]
