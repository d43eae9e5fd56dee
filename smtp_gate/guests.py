"""From a guest's domain XML and the whitelist to what the kernel must hold for it.

judge() is the one derivation of "what this guest is allowed", for hooks, rebuilds,
status, the picker and the whitelist commands, so an allowance means the same thing
whoever installs or shows it: a NIC a bridge rule sees, on a protected bridge, with a MAC
the whitelist file or the guest's own metadata (domain.Allow, issue 11) allows, allowed
on its own port's interface index.  The two sources add up: either one allows.  Pure:
the caller passes the lookups, and the whitelist as a matcher (the hook its stdlib fast
path, whitelist.fast_allowed_macs; everyone else the parsed file's index), so the hook
stays cheap and still answers exactly as the others do.
"""

from typing import Callable, Collection, List, NamedTuple, Optional, Sequence, Tuple

from smtp_gate.domain import Allow, Domain, Nic
from smtp_gate.runstate import Pair, Port, Record
from smtp_gate.whitelist import Guest

IndexOf = Callable[[str], Optional[int]]  # interface name -> ifindex, None if it does not exist
MasterOf = Callable[[str], Optional[str]]  # interface name -> the bridge it is a port of
Matcher = Callable[[Guest], Sequence[str]]  # a guest -> the MACs the whitelist allows it

# What a NIC is, for enforcement
ALLOWED = "allowed"  # on a protected bridge, MAC whitelisted: (ifindex, MAC) allowed
BLOCKED = "blocked"  # on a protected bridge, not whitelisted: a guest port, mail blocked
# Where an allowance comes from
FROM_FILE = "file"  # a row of the whitelist file
FROM_METADATA = "metadata"  # the guest's libvirt metadata, urn:smtp-gate:1

FOREIGN = "foreign"  # on a bridge we do not protect: left alone
UNSEEN = "unseen"  # a bridge rule cannot see its frames (macvtap, hostdev, OVS, ...)
NO_DEVICE = "no-device"  # no target, no such device, on no bridge, or the guest is not running


class NicVerdict(NamedTuple):
    nic: Nic
    state: str  # one of the constants above
    bridge: Optional[str] = None
    index: Optional[int] = None
    sources: Tuple[str, ...] = ()  # FROM_FILE and/or FROM_METADATA: what allows its MAC


class Verdict(NamedTuple):
    """judge()'s answer for one guest."""

    domain: Domain
    whitelisted: Tuple[str, ...]  # the guest's MACs the whitelist file allows, whatever their NIC
    nics: Tuple[NicVerdict, ...]
    by_metadata: Tuple[str, ...] = ()  # the guest's MACs its metadata allows

    @property
    def allowed_macs(self) -> Tuple[str, ...]:
        """The guest's MACs that either source allows, whatever their NIC."""
        return tuple(dict.fromkeys(self.whitelisted + self.by_metadata))

    @property
    def allowed(self) -> Tuple[Tuple[int, str], ...]:
        return tuple(sorted({(v.index, v.nic.mac) for v in self.nics if v.state == ALLOWED}))  # type: ignore[misc]

    def record(self, uri: Optional[str] = None) -> Record:
        """What the kernel must hold for this guest: its ports on protected bridges are guest
        ports (guest-to-guest traffic toward them is untouched), its ports on other bridges
        are left alone, each allowed NIC is an (ifindex, MAC) pair.  URI: the listing that
        vouches for the guest (default: the domain's)."""
        ports = lambda *states: tuple(  # noqa: E731
            sorted({(v.nic.target, v.index) for v in self.nics if v.state in states})  # type: ignore[misc]
        )
        return Record(
            uuid=self.domain.uuid,
            name=self.domain.name,
            guest_ports=ports(ALLOWED, BLOCKED),
            foreign_ports=ports(FOREIGN),
            allowed=self.allowed,
            uri=(uri if uri is not None else self.domain.uri) or "",
        )


def nic_bridge(nic: Nic, master_of: MasterOf) -> Optional[str]:
    """The bridge a NIC's port is on: the XML's word, else the kernel's (sysfs master)."""
    if nic.bridge:
        return nic.bridge
    return master_of(nic.target) if nic.target else None


def nic_macs(domain: Domain) -> List[str]:
    return [nic.mac for nic in domain.nics if nic.mac]


def whitelisted(matcher: Matcher, name: str, uuid: str, macs: Sequence[str]) -> Tuple[str, ...]:
    """The MACs among MACS the whitelist allows the guest NAME/UUID: the one way every
    caller asks the whitelist, also about a guest known only from its record."""
    return tuple(matcher(Guest(name, uuid, tuple(macs))))


def still_allowed(record: Record, matcher: Matcher, allow: Optional[Allow], allow_known: bool) -> Tuple[Pair, ...]:
    """The allowed (index, MAC) pairs of RECORD that a source still grants, for a running
    guest whose domain XML could not be read: the whitelist file (on the record's name,
    UUID and the pair's MAC, as judge() asks it) or, when ALLOW_KNOWN, its metadata ALLOW
    read alone (its <nic mac> list, or every MAC the record holds when it has none).
    Never more than RECORD holds: an unread guest's NICs are unknown, so nothing is added;
    and when its metadata could not be read either, only the file vouches (fail closed)."""
    macs = tuple(dict.fromkeys(mac for _index, mac in record.allowed))
    granted = set(whitelisted(matcher, record.name, record.uuid, macs))
    if allow_known and allow is not None:
        granted |= set(allow.allows(macs))
    return tuple(pair for pair in record.allowed if pair[1] in granted)


def _no_device(_name: str) -> Optional[int]:
    return None


def judge(
    domain: Domain,
    protected: Collection[str],
    matcher: Matcher,
    index_of: IndexOf,
    master_of: MasterOf,
    running: bool = True,
) -> Verdict:
    """What DOMAIN is allowed.  Every port is keyed by the index its device has now, so a
    later device that reuses the name inherits nothing; a NIC whose device does not exist
    (or a guest that is not RUNNING) gets NO_DEVICE: an unknown port is blocked anyway."""
    macs = nic_macs(domain)
    from_file = whitelisted(matcher, domain.name, domain.uuid, macs)
    from_metadata = domain.allow.allows(macs) if domain.allow is not None else ()
    lookup = index_of if running else _no_device
    verdicts = []
    for nic in domain.nics:
        if not nic.bridge_visible:
            verdicts.append(NicVerdict(nic, UNSEEN))
            continue
        index = lookup(nic.target) if nic.target else None
        bridge = nic_bridge(nic, master_of) if index is not None else nic.bridge
        if index is None or bridge is None:
            verdicts.append(NicVerdict(nic, NO_DEVICE, bridge, index))
        elif bridge not in protected:
            verdicts.append(NicVerdict(nic, FOREIGN, bridge, index))
        elif nic.mac and (nic.mac in from_file or nic.mac in from_metadata):
            sources = ((FROM_FILE,) if nic.mac in from_file else ()) + (
                (FROM_METADATA,) if nic.mac in from_metadata else ()
            )
            verdicts.append(NicVerdict(nic, ALLOWED, bridge, index, sources))
        else:
            verdicts.append(NicVerdict(nic, BLOCKED, bridge, index))
    return Verdict(domain, from_file, tuple(verdicts), from_metadata)


def record_for(
    domain: Domain,
    protected: Collection[str],
    allowed_macs: Collection[str],
    index_of: IndexOf,
    master_of: MasterOf,
) -> Record:
    """judge()'s record, the whitelist's answer already given as ALLOWED_MACS (benchmarks)."""
    return judge(domain, protected, lambda _guest: tuple(allowed_macs), index_of, master_of).record()
