"""Which running guest NICs smtp-gate does not filter, and why: one derivation for apply,
rebuild, status, add-vm and the picker, so that they all name the same NICs.

A NIC is filtered only when its frames cross a port of a bridge in BRIDGE.  Everything
else is UNPROTECTED: a NIC on another bridge (libvirt's NAT network virbr0, say, which
the default BRIDGE="br0" does not cover), or of a kind no bridge rule sees (macvtap,
hostdev, vhost-user, Open vSwitch, user-mode, an unbridged tap).  Saying nothing about
them would let an operator believe every guest is blocked.  Pure: callers pass the
kernel's bridge lookup.
"""

from typing import Collection, Dict, Iterable, List, NamedTuple, Optional, Tuple

from smtp_gate.domain import Domain, Nic
from smtp_gate.guests import MasterOf, nic_bridge


class Unprotected(NamedTuple):
    """One running guest NIC that no rule of ours sees."""

    guest: str
    uuid: str
    mac: str  # "?" when the XML gives none
    target: Optional[str]  # the host-side device, when there is one
    bridge: Optional[str]  # the bridge it is on, when it is on one (not in BRIDGE)
    kind: str  # <interface type=...>
    reason: str

    @property
    def where(self) -> str:
        """The bridge it is on, else its kind: what the operator looks for in `virsh domiflist`."""
        return self.bridge or self.kind or "?"

    def line(self) -> str:
        return f"UNPROTECTED: guest {self.guest} ({self.uuid}) NIC {self.mac} on {self.where}: {self.reason}"

    def to_json(self) -> Dict[str, object]:
        return {**self._asdict(), "where": self.where, "line": self.line()}


def placement(nic: Nic, master_of: MasterOf) -> Tuple[Optional[str], Optional[str]]:
    """(the Linux bridge NIC's frames cross, None) or (None, why no bridge rule sees them).

    The bridge is the XML's word, else the kernel's (the port's master): libvirt's live XML
    names the bridge of an <interface type='network'>, but not every driver writes it.
    """
    if nic.bridge_visible:
        bridge = nic_bridge(nic, master_of)
        if bridge is None:
            return None, "its bridge is not known: the XML names none and its port is on no bridge"
        return bridge, None
    if nic.type == "network" and not nic.virtualport and nic.target:
        bridge = master_of(nic.target)
        if bridge is not None:
            return bridge, None
    return None, nic.unprotected_reason or "not on a Linux bridge"


def unprotected_nics(domain: Domain, protected: Collection[str], master_of: MasterOf) -> List[Unprotected]:
    """DOMAIN's NICs (a running guest's live XML) that no rule on the PROTECTED bridges sees."""
    out = []
    for nic in domain.nics:
        bridge, reason = placement(nic, master_of)
        if bridge is not None and bridge in protected:
            continue
        if bridge is not None:
            reason = f"bridge {bridge} is not in BRIDGE ({', '.join(protected)}): its ports are left alone"
        out.append(Unprotected(domain.name, domain.uuid, nic.mac or "?", nic.target, bridge, nic.type, reason or ""))
    return out


def on_protected_bridge(nic: Nic, protected: Collection[str], master_of: MasterOf) -> bool:
    """True if NIC's frames cross a bridge in PROTECTED: the rules see them."""
    return placement(nic, master_of)[0] in protected


def all_unprotected(
    domains: Iterable[Domain], protected: Collection[str], master_of: MasterOf
) -> List[Unprotected]:
    """unprotected_nics of every running guest in DOMAINS, in their order."""
    return [u for d in domains for u in unprotected_nics(d, protected, master_of)]


def guest_bridges(domains: Iterable[Domain], master_of: MasterOf) -> List[Tuple[str, int]]:
    """(bridge, how many NICs) for every Linux bridge the running DOMAINS' NICs are on, sorted:
    what BRIDGE must name for all of them to be filtered (install.sh proposes it)."""
    counts: Dict[str, int] = {}
    for domain in domains:
        for nic in domain.nics:
            bridge, _reason = placement(nic, master_of)
            if bridge is not None:
                counts[bridge] = counts.get(bridge, 0) + 1
    return sorted(counts.items())
