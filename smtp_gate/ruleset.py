"""The nftables ruleset, built as data: a desired state in, nft commands out.

Fixed rules over named sets (fail2ban's model): allowing or revoking a guest is an
element change, never a rule rewrite.  Nothing here talks to the kernel; nft.py does.

Direction (DESIGN §1): a frame entering from an uplink is inbound and untouched; a frame
leaving through a known guest port is guest-to-guest and untouched; every other frame
from a port of a protected bridge is outbound, whatever port it leaves by, so a port we
have never heard of fails closed.  The same check runs on the bridge `input` hook for a
guest whose next hop is the hypervisor itself.
"""

import re
from typing import Iterable, List, NamedTuple, Optional, Tuple, Union

from smtp_gate import validate
from smtp_gate.validate import PortRange

FAMILY = "bridge"
TABLE = "smtp_gate"
PRIORITY = -200
T = f"{FAMILY} {TABLE}"

Pair = Tuple[int, str]  # (interface index, MAC): an allowance a reused interface name cannot inherit
Element = Union[str, int, Pair]  # an element of an ifname set (a name), an iface_index set, or `allowed`
Relay = Tuple[int, str, PortRange]  # (4 or 6, address or prefix in normal form, port range)

# Sets whose elements are the desired state: flushed and refilled by every apply.
STATE_SETS = ("uplinks", "guest_ifaces", "foreign_ifaces", "blocked_ports", "allowed", "relay4", "relay6")
# Blocked attempts per guest port and MAC: statistics, never flushed by an apply.  Entries
# expire a day after a guest's last attempt, so a set filled by spoofed MACs empties
# itself and per-MAC counting resumes (the drop never depends on it).  Keyed by the
# port's interface index, never its name: a later guest given the same vnetN name is not
# blamed for its predecessor's attempts (attacker review of issue 12).
ATTEMPTS_SET = "attempts"
ATTEMPTS_SIZE = 65536
ATTEMPTS_TIMEOUT = "1d"
# Blocked attempts per port alone: what per-guest figures (status, metrics) count.  A guest
# cannot add ports, so spoofing MACs can fill `attempts` but never this set: one guest
# cannot blind the per-guest counts of the others.
PORT_ATTEMPTS_SET = "port_attempts"
# Blocked attempts also go to the NFLOG group LOG_GROUP (`smtp-gate watch` reads it:
# nflog.py), in a rule of their own, rate-limited per ingress port by a meter keyed by
# `iif` (one flooding guest spends its own budget, never another's: a guest cannot choose
# its port, and spoofed MACs do not multiply it) and then by a global cap.  A full meter
# only stops events, never the drop, which is a later rule.
LOG_METER_SET = "log_ports"
LOG_METER_SIZE = 65536
LOG_METER_SPEC = f"type iface_index; size {LOG_METER_SIZE}; flags dynamic,timeout; timeout 1m;"
LOG_GROUP_CAP = "1000/second"  # every port's events together (the watcher's budget)
LOG_GROUP_CAP_BURST = 2000
# Sets the datapath fills (statistics and rate meters): never flushed, never compared.
DATAPATH_SETS = (PORT_ATTEMPTS_SET, ATTEMPTS_SET, LOG_METER_SET)
COUNTERS = ("blocked4", "blocked6", "nonip", "malformed")
CHAINS = ("forward", "input", "egress", "outbound", "out4", "out6", "smtp4", "smtp6", "nonip", "malformed")
BASE_CHAINS = {"forward": "forward", "input": "input"}

SET_TYPES = {
    # names, because an uplink must be recognised before it exists (boot) and is the
    # operator's own device; never an exemption for a frame from a known guest port
    "uplinks": "type ifname;",
    # interface indexes: what the hypervisor reported for this device, never inherited by
    # a later device that reuses the name (indexes are not reused)
    "guest_ifaces": "type iface_index;",
    "foreign_ifaces": "type iface_index;",
    "blocked_ports": "type inet_service; flags interval;",
    "allowed": "type iface_index . ether_addr;",
    "relay4": "type ipv4_addr . inet_service; flags interval;",
    "relay6": "type ipv6_addr . inet_service; flags interval;",
}


def attempts_spec(timeout: str = ATTEMPTS_TIMEOUT) -> str:
    return f"type iface_index . ether_addr; size {ATTEMPTS_SIZE}; flags dynamic,timeout; timeout {timeout}; counter;"


def port_attempts_spec(timeout: str = ATTEMPTS_TIMEOUT) -> str:
    return f"type iface_index; size {ATTEMPTS_SIZE}; flags dynamic,timeout; timeout {timeout}; counter;"


ETHERTYPE_RARP = 0x8035  # QEMU announces a migrated guest with RARP


class Desired(NamedTuple):
    """Everything the kernel should hold.  check() validates it before any nft text is built."""

    uplinks: Tuple[str, ...] = ()
    guest_ifaces: Tuple[int, ...] = ()
    foreign_ifaces: Tuple[int, ...] = ()
    blocked_ports: Tuple[PortRange, ...] = ((25, 25), (465, 465))
    allowed: Tuple[Pair, ...] = ()
    relays: Tuple[Relay, ...] = ()
    audit: bool = False
    log_drops: bool = True
    log_rate: str = "5/second"
    log_burst: int = 50
    non_ip: str = "drop"
    attempts_timeout: str = ATTEMPTS_TIMEOUT
    log_group: Optional[int] = 2525  # NFLOG group of attributed events; None: none
    log_group_rate: str = "50/second"  # per guest port
    log_group_burst: int = 100


_RATE = re.compile(r"[1-9]\d{0,8}/(second|minute|hour|day)")


def _index(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**32:
        raise validate.ValidationError(f"bad interface index {value!r}: expected a positive 32-bit integer")
    return value


def check(state: Desired) -> Desired:
    """Refuse anything that is not a safe interface name, index, MAC, address or port list."""
    for name in state.uplinks:
        validate.ifname(name)
    for index in (*state.guest_ifaces, *state.foreign_ifaces):
        _index(index)
    for index, mac in state.allowed:
        _index(index)
        if validate.mac(mac) != mac:
            raise validate.ValidationError(f"MAC {mac!r} is not in normal form")
    for relay in state.relays:
        if validate.relay_destination(validate.format_relay(relay)) != relay:
            raise validate.ValidationError(f"relay destination {relay!r} is not in normal form")
    validate.port_list(validate.format_ports(state.blocked_ports))
    validate.timeout(state.attempts_timeout)
    if state.log_group is not None and (
        not isinstance(state.log_group, int) or isinstance(state.log_group, bool) or not 0 <= state.log_group <= 65535
    ):
        raise validate.ValidationError(f"bad NFLOG group {state.log_group!r}: expected 0-65535")
    if not isinstance(state.log_group_burst, int) or state.log_group_burst < 1:
        raise validate.ValidationError(f"bad burst {state.log_group_burst!r}: expected a whole number, 1 or more")
    for rate in (state.log_rate, state.log_group_rate):
        if not isinstance(rate, str) or not _RATE.fullmatch(rate):
            raise validate.ValidationError(f"bad rate {rate!r}: expected N/second, N/minute, N/hour or N/day")
    return state


class Batch(NamedTuple):
    """nft commands for one atomic transaction (`nft -f`)."""

    commands: Tuple[str, ...] = ()

    def text(self) -> str:
        return "".join(f"{command}\n" for command in self.commands)


def _names(names: Iterable[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def _indexes(indexes: Iterable[int]) -> str:
    return ", ".join(str(index) for index in indexes)


def _pairs(pairs: Iterable[Pair]) -> str:
    return ", ".join(f"{index} . {mac}" for index, mac in pairs)


def _ports(ranges: Iterable[PortRange]) -> str:
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _relays(relays: Iterable[Relay], family: int) -> str:
    return ", ".join(f"{net} . {a}-{b}" for fam, net, (a, b) in relays if fam == family)


def _elements(state: Desired) -> List[Tuple[str, str]]:
    return [
        ("uplinks", _names(sorted(state.uplinks))),
        ("guest_ifaces", _indexes(sorted(set(state.guest_ifaces)))),
        ("foreign_ifaces", _indexes(sorted(set(state.foreign_ifaces)))),
        ("blocked_ports", _ports(state.blocked_ports)),
        ("allowed", _pairs(sorted(set(state.allowed)))),
        ("relay4", _relays(sorted(set(state.relays)), 4)),
        ("relay6", _relays(sorted(set(state.relays)), 6)),
    ]


def _verdict(state: Desired) -> str:
    return "accept" if state.audit else "drop"


# Upper-layer protocols other than TCP that may follow an IPv6 header directly, or an IPv6
# first fragment's fragment header: UDP, ICMPv6, ESP, GRE, SCTP, UDP-Lite, IPv4 and IPv6
# tunnels.  Never an extension header: the kernel walks an extension header chain to the
# end of the frame, trailer included, while the receiver stops at the packet's length, so a
# chain that runs past the packet can name UDP for nft and go on to TCP in the next
# fragment for the receiver.  A list of what may pass, not of what may not: an extension
# header nft does not know fails closed.  ("No next header" is left to the full checks.)
IPV6_UPPER = ("udp", "ipv6-icmp", "esp", "gre", "sctp", "udplite", "4", "41")
IPV6_NOT_TCP = "{ " + ", ".join(IPV6_UPPER) + " }"

# The fast path: the first rules of both base chains.  They accept only what the full
# checks would accept from any port in any direction: IPv4, and IPv6 whose fixed header
# names TCP or a protocol of IPV6_NOT_TCP (no extension header, so no fragment), when the
# 16 bits where a destination port would be (`th dport`) are not a blocked port.  For TCP
# that is the destination port, and TCP to a port that is not blocked is accepted by the
# full checks; any other protocol is accepted by them whatever those bytes hold, and when
# they happen to match a blocked port the frame just takes the full checks.  A later IPv4
# fragment has no transport header for nft (`th` does not match): full checks.
# `meta protocol` is the protocol inside a single VLAN tag, and placed before `ip6 nexthdr`
# it keeps nft from adding an `ether type` dependency that would read the tag.  One rule
# per family, one set lookup: see docs/verdicts.md for the equivalence argument.
FAST_PATH = (
    "meta protocol ip th dport != @blocked_ports accept",
    "meta protocol ip6 ip6 nexthdr { tcp, " + ", ".join(IPV6_UPPER) + " } th dport != @blocked_ports accept",
)


def rules(state: Desired) -> List[Tuple[str, str]]:
    """(chain, rule) in order.  The drop is always a rule of its own, after the counting and
    logging rules: a `limit ... log ... drop` rule lets everything over the rate through,
    and an `update @set ... drop` rule stops matching once the set is full.

    Direction (DESIGN §1), keyed on interface indexes wherever an exemption is granted:
    a frame from a known guest port is never inbound, whatever its port's name; a frame
    from an uplink (by name: an uplink may not exist yet at boot) or from a port of a bridge
    we do not protect is left alone; a frame that leaves by an uplink is outbound, and one
    that leaves by a known guest port is guest-to-guest.  Everything else is outbound."""
    verdict = _verdict(state)
    out: List[Tuple[str, str]] = []
    for chain, after in (("forward", "goto egress"), ("input", "goto outbound")):
        out += [(chain, rule) for rule in FAST_PATH]
        # A port of a bridge we do not protect is left alone -- in `forward` only toward
        # another such port: a port moved onto a protected bridge keeps its index, and must
        # not carry its exemption there (the next rebuild forgets it; until then its frames
        # across the protected bridge are outbound).
        foreign = "iif @foreign_ifaces oif @foreign_ifaces accept" if chain == "forward" else "iif @foreign_ifaces accept"
        out += [
            (chain, f"iif @guest_ifaces {after}"),
            (chain, "iifname @uplinks accept"),
            (chain, foreign),
            (chain, after),
        ]
    out += [
        ("egress", "oifname @uplinks goto outbound"),
        ("egress", "oif @guest_ifaces accept"),
        ("egress", "goto outbound"),
        # An allowed guest NIC is exempt: the key is the ingress port's index and the
        # source MAC, so the same MAC from another port, or a new device that reuses the
        # port's name, does not match.
        ("outbound", "iif . ether saddr @allowed accept"),
        # meta protocol, not ether type: for a single 802.1Q-tagged frame the kernel keeps
        # the tag outside the packet and ether type would read the tag.
        (
            "outbound",
            f"meta protocol vmap {{ ip : goto out4, ip6 : goto out6, arp : accept, {ETHERTYPE_RARP:#06x} : accept }}",
        ),
        ("outbound", "goto nonip"),
        # TCP never needs IPv6 fragmentation (path MTU discovery, MSS), and an IPv6
        # fragment's TCP header may sit beyond the first fragment, where nft would read the
        # bytes trailing the packet instead: every IPv6 fragment carrying TCP is dropped.
        # `meta protocol ip6` first: without it nft guards `exthdr` with `ether type`.
        ("out6", "meta protocol ip6 meta l4proto tcp exthdr frag exists goto malformed"),
        # A first fragment must name its upper-layer protocol in the fragment header itself,
        # and not TCP: an extension header after it may run past the packet into the frame's
        # trailer, where nft reads a chain the receiver never sees (IPV6_NOT_TCP).
        ("out6", f"meta protocol ip6 frag frag-off 0 frag nexthdr != {IPV6_NOT_TCP} goto malformed"),
        # The relay exception: plain TCP to an allowed destination.  No IPv4 options and no
        # IPv6 extension header (a source route or routing header could carry the segment
        # past the relay to another host).
        ("out4", "ip hdrlength 5 ip daddr . tcp dport @relay4 accept"),
        ("out6", "meta protocol ip6 ip6 nexthdr tcp ip6 daddr . tcp dport @relay6 accept"),
    ]
    for family, chain, nonfirst in (
        ("4", "out4", "ip frag-off & 0x1fff != 0"),
        ("6", "out6", "meta protocol ip6 frag frag-off != 0"),
    ):
        out += [
            (chain, f"tcp dport @blocked_ports goto smtp{family}"),
            (chain, "tcp dport != @blocked_ports accept"),
            # a later fragment carries no port and is useless without its first fragment
            (chain, f"{nonfirst} accept"),
            # known, not TCP (meta l4proto is unset when the header chain cannot be walked)
            (chain, "meta l4proto != tcp accept"),
            # TCP whose port cannot be read, or a header chain that hides the transport
            # header (an IPv6 first fragment with a split extension-header chain)
            (chain, "goto malformed"),
        ]
    for family in ("4", "6"):
        chain = f"smtp{family}"
        out.append((chain, f"update @{PORT_ATTEMPTS_SET} {{ iif }}"))
        out.append((chain, f"update @{ATTEMPTS_SET} {{ iif . ether saddr }}"))
        out.append((chain, f"counter name blocked{family}"))
        if state.log_drops:
            prefix = f"SMTPGATE{family} " + ("audit " if state.audit else "")
            out.append(
                (chain, f'limit rate {state.log_rate} burst {state.log_burst} packets log prefix "{prefix}" level warn')
            )
        if state.log_group is not None:
            # attributed events (nflog.py): the same prefix tells the family and the mode
            prefix = f"SMTPGATE{family} " + ("audit " if state.audit else "")
            out.append((
                chain,
                f"update @{LOG_METER_SET} {{ iif limit rate {state.log_group_rate} burst {state.log_group_burst} packets }} "
                f'limit rate {LOG_GROUP_CAP} burst {LOG_GROUP_CAP_BURST} packets log prefix "{prefix}" group {state.log_group}',
            ))
        out.append((chain, verdict))
    out += [
        ("nonip", "counter name nonip"),
        ("nonip", "accept" if state.non_ip == "accept" else verdict),
        ("malformed", "counter name malformed"),
        ("malformed", verdict),
    ]
    return out


def _declare_chains() -> List[str]:
    commands = [f"add table {T}"]
    for chain in CHAINS:
        hook = BASE_CHAINS.get(chain)
        if hook:
            commands.append(
                f"add chain {T} {chain} {{ type filter hook {hook} priority {PRIORITY}; policy accept; }}"
            )
        else:
            commands.append(f"add chain {T} {chain}")
    return commands


def _declare_objects(state: Desired) -> List[str]:
    commands = [f"add counter {T} {name}" for name in COUNTERS]
    commands += [f"add set {T} {name} {{ {spec} }}" for name, spec in SET_TYPES.items()]
    commands.append(f"add set {T} {PORT_ATTEMPTS_SET} {{ {port_attempts_spec(state.attempts_timeout)} }}")
    commands.append(f"add set {T} {ATTEMPTS_SET} {{ {attempts_spec(state.attempts_timeout)} }}")
    commands.append(f"add set {T} {LOG_METER_SET} {{ {LOG_METER_SPEC} }}")
    return commands


def apply_batch(state: Desired, obsolete_chains: Iterable[str] = (), obsolete_sets: Iterable[str] = ()) -> Batch:
    """The whole desired state as one transaction.

    `add` on an existing table, chain, set or counter changes nothing, so the table is
    never deleted and re-created (that let about one frame per rebuild through under a
    flood): chains and state sets are flushed and refilled inside the same transaction.
    Objects an older version left behind (or a set whose type changed) are deleted after
    the flush that removed their last reference, then declared afresh.  The attempts set
    and the named counters are never flushed: their counts survive every rebuild.
    """
    check(state)
    commands = _declare_chains()
    commands += [f"flush chain {T} {chain}" for chain in CHAINS]
    for chain in obsolete_chains:
        commands.append(f"flush chain {T} {chain}")
    for chain in obsolete_chains:
        commands.append(f"delete chain {T} {chain}")
    for name in obsolete_sets:
        commands.append(f"delete set {T} {name}")
    commands += _declare_objects(state)
    commands += [f"flush set {T} {name}" for name in STATE_SETS]
    commands += [f"add rule {T} {chain} {rule}" for chain, rule in rules(state)]
    commands += [f"add element {T} {name} {{ {elements} }}" for name, elements in _elements(state) if elements]
    return Batch(tuple(commands))


def remove_batch() -> Batch:
    """Remove our table whether or not it exists (nft 1.0.6 has no `destroy`): add, then delete."""
    return Batch((f"add table {T}", f"delete table {T}"))


# Sets an element change may touch, by key type: hooks and whitelist commands change these.
PAIR_SETS = frozenset(name for name, spec in SET_TYPES.items() if spec == "type iface_index . ether_addr;")
NAME_SETS = frozenset(name for name, spec in SET_TYPES.items() if spec == "type ifname;")
INDEX_SETS = frozenset(name for name, spec in SET_TYPES.items() if spec == "type iface_index;")


def _check_element(set_name: str, element: Element) -> Element:
    """ELEMENT in normal form, if SET_NAME is one of ours and takes that kind of element."""
    if set_name in NAME_SETS and isinstance(element, str):
        return validate.ifname(element)
    if set_name in INDEX_SETS and isinstance(element, int):
        return _index(element)
    if set_name in PAIR_SETS and isinstance(element, (tuple, list)) and len(element) == 2:
        index, mac = element
        return (_index(index), validate.mac(mac))
    raise validate.ValidationError(f"{element!r} is not an element of set {set_name!r}")


class ElementChanges(NamedTuple):
    """Element changes as data (set, name or (ifindex, MAC)), checked.  The hooks and the
    whitelist commands send them over netlink (keys(), nfnetlink.py); batch() is the same
    change as nft commands, which the tests apply with `nft -f` to prove both agree.

    A delete of an element that may be absent is an add and then a delete of it, in the
    same atomic batch: nft 1.0.6 has no `destroy element`, and the pair is a no-op or a
    removal."""

    add: Tuple[Tuple[str, Element], ...] = ()
    delete: Tuple[Tuple[str, Element], ...] = ()

    def batch(self) -> Batch:
        def text(element: Element) -> str:
            if isinstance(element, str):
                return _names([element])
            return str(element) if isinstance(element, int) else _pairs([element])

        commands = [f"add element {T} {name} {{ {text(e)} }}" for name, e in self.add]
        for name, e in self.delete:
            commands.append(f"add element {T} {name} {{ {text(e)} }}")
            commands.append(f"delete element {T} {name} {{ {text(e)} }}")
        return Batch(tuple(commands))

    def keys(self) -> Tuple[List[Tuple[str, bytes]], List[Tuple[str, bytes]]]:
        """(add, delete) as (set, key bytes) in nft's layout (nfnetlink.ifname_key, index_key, pair_key)."""
        from smtp_gate.nfnetlink import ifname_key, index_key, pair_key  # the encoders live with the netlink code

        def key(element: Element) -> bytes:
            if isinstance(element, str):
                return ifname_key(element)
            return index_key(element) if isinstance(element, int) else pair_key(*element)

        return [(s, key(e)) for s, e in self.add], [(s, key(e)) for s, e in self.delete]


def element_changes(
    add: Iterable[Tuple[str, Element]] = (), delete: Iterable[Tuple[str, Element]] = ()
) -> ElementChanges:
    """Checked ElementChanges: every name and MAC validated, MACs in normal form, and each
    element's kind matching its set's type."""
    return ElementChanges(
        add=tuple((s, _check_element(s, e)) for s, e in add),
        delete=tuple((s, _check_element(s, e)) for s, e in delete),
    )
