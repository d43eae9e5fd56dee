"""The nftables ruleset, built as data: a desired state in, nft commands out.

Fixed rules over named sets (fail2ban's model): allowing or revoking a guest is an
element change, never a rule rewrite.  Nothing here talks to the kernel; nft.py does.

Direction (DESIGN §1): a frame entering from an uplink is inbound and untouched; a frame
leaving through a known guest port is guest-to-guest and untouched; every other frame
from a port of a protected bridge is outbound, whatever port it leaves by, so a port we
have never heard of fails closed.  The same check runs on the bridge `input` hook for a
guest whose next hop is the hypervisor itself.
"""

from typing import Iterable, List, NamedTuple, Tuple, Union

from smtp_gate import validate
from smtp_gate.validate import PortRange

FAMILY = "bridge"
TABLE = "smtp_gate"
PRIORITY = -200
T = f"{FAMILY} {TABLE}"

Pair = Tuple[int, str]  # (interface index, MAC): an allowance a reused interface name cannot inherit
Element = Union[str, Pair]  # an element of an ifname set (a name) or of `allowed` (a pair)

# Sets whose elements are the desired state: flushed and refilled by every apply.
STATE_SETS = ("uplinks", "guest_ports", "guest_patterns", "foreign_ports", "blocked_ports", "allowed")
# Blocked attempts per guest port and MAC: statistics, never flushed by an apply.
ATTEMPTS_SET = "attempts"
ATTEMPTS_SIZE = 65536
COUNTERS = ("blocked4", "blocked6", "nonip", "malformed")
CHAINS = ("forward", "input", "outbound", "out4", "out6", "smtp4", "smtp6", "nonip", "malformed")
BASE_CHAINS = {"forward": "forward", "input": "input"}

SET_TYPES = {
    "uplinks": "type ifname;",
    "guest_ports": "type ifname;",
    "guest_patterns": "type ifname; flags interval;",
    "foreign_ports": "type ifname;",
    "blocked_ports": "type inet_service; flags interval;",
    "allowed": "type iface_index . ether_addr;",
    ATTEMPTS_SET: f"type ifname . ether_addr; size {ATTEMPTS_SIZE}; flags dynamic; counter;",
}

ETHERTYPE_RARP = 0x8035  # QEMU announces a migrated guest with RARP


class Desired(NamedTuple):
    """Everything the kernel should hold.  check() validates it before any nft text is built."""

    uplinks: Tuple[str, ...] = ()
    guest_ports: Tuple[str, ...] = ()
    guest_patterns: Tuple[str, ...] = ()
    foreign_ports: Tuple[str, ...] = ()
    blocked_ports: Tuple[PortRange, ...] = ((25, 25), (465, 465))
    allowed: Tuple[Pair, ...] = ()
    audit: bool = False
    log_drops: bool = True
    log_rate: str = "5/second"
    log_burst: int = 50
    non_ip: str = "drop"



def check(state: Desired) -> Desired:
    """Refuse anything that is not a safe interface name, pattern, MAC or port list."""
    for name in (*state.uplinks, *state.guest_ports, *state.foreign_ports):
        validate.ifname(name)
    for pattern in state.guest_patterns:
        validate.ifname_pattern(pattern)
    for index, mac in state.allowed:
        if not isinstance(index, int) or index <= 0:
            raise validate.ValidationError(f"bad interface index {index!r}: expected a positive integer")
        if validate.mac(mac) != mac:
            raise validate.ValidationError(f"MAC {mac!r} is not in normal form")
    validate.port_list(validate.format_ports(state.blocked_ports))
    return state


class Batch(NamedTuple):
    """nft commands for one atomic transaction (`nft -f`)."""

    commands: Tuple[str, ...] = ()

    def text(self) -> str:
        return "".join(f"{command}\n" for command in self.commands)


def _names(names: Iterable[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def _pairs(pairs: Iterable[Pair]) -> str:
    return ", ".join(f"{index} . {mac}" for index, mac in pairs)


def _ports(ranges: Iterable[PortRange]) -> str:
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _elements(state: Desired) -> List[Tuple[str, str]]:
    return [
        ("uplinks", _names(sorted(state.uplinks))),
        ("guest_ports", _names(sorted(state.guest_ports))),
        ("guest_patterns", _names(sorted(state.guest_patterns))),
        ("foreign_ports", _names(sorted(state.foreign_ports))),
        ("blocked_ports", _ports(state.blocked_ports)),
        ("allowed", _pairs(sorted(set(state.allowed)))),
    ]


def _verdict(state: Desired) -> str:
    return "accept" if state.audit else "drop"


def rules(state: Desired) -> List[Tuple[str, str]]:
    """(chain, rule) in order.  The drop is always a rule of its own, after the counting and
    logging rules: a `limit ... log ... drop` rule lets everything over the rate through,
    and an `update @set ... drop` rule stops matching once the set is full."""
    verdict = _verdict(state)
    out: List[Tuple[str, str]] = [
        ("forward", "iifname @foreign_ports accept"),
        ("forward", "iifname @uplinks accept"),
        ("forward", "oifname @guest_ports accept"),
        ("forward", "oifname @guest_patterns accept"),
        ("forward", "goto outbound"),
        ("input", "iifname @foreign_ports accept"),
        ("input", "iifname @uplinks accept"),
        ("input", "goto outbound"),
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
    ]
    # TCP never needs IPv6 fragmentation (path MTU discovery, MSS), and an IPv6 fragment's
    # TCP header may sit beyond the first fragment, where nft would read the bytes trailing
    # the packet instead: every IPv6 fragment carrying TCP is dropped.
    out.append(("out6", "meta l4proto tcp exthdr frag exists goto malformed"))
    for family, chain, nonfirst in (("4", "out4", "ip frag-off & 0x1fff != 0"), ("6", "out6", "frag frag-off != 0")):
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
        out.append((chain, f"update @{ATTEMPTS_SET} {{ iifname . ether saddr }}"))
        out.append((chain, f"counter name blocked{family}"))
        if state.log_drops:
            prefix = f"SMTPGATE{family} " + ("audit " if state.audit else "")
            out.append(
                (chain, f'limit rate {state.log_rate} burst {state.log_burst} packets log prefix "{prefix}" level warn')
            )
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


def _declare_objects() -> List[str]:
    commands = [f"add counter {T} {name}" for name in COUNTERS]
    commands += [f"add set {T} {name} {{ {spec} }}" for name, spec in SET_TYPES.items()]
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
    commands += _declare_objects()
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


def _check_element(set_name: str, element: Element) -> Element:
    """ELEMENT in normal form, if SET_NAME is one of ours and takes that kind of element."""
    if set_name in NAME_SETS and isinstance(element, str):
        return validate.ifname(element)
    if set_name in PAIR_SETS and isinstance(element, (tuple, list)) and len(element) == 2:
        index, mac = element
        if not isinstance(index, int) or isinstance(index, bool) or not 0 < index < 2**32:
            raise validate.ValidationError(f"bad interface index {index!r}: expected a positive integer")
        return (index, validate.mac(mac))
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
            return _names([element]) if isinstance(element, str) else _pairs([element])

        commands = [f"add element {T} {name} {{ {text(e)} }}" for name, e in self.add]
        for name, e in self.delete:
            commands.append(f"add element {T} {name} {{ {text(e)} }}")
            commands.append(f"delete element {T} {name} {{ {text(e)} }}")
        return Batch(tuple(commands))

    def keys(self) -> Tuple[List[Tuple[str, bytes]], List[Tuple[str, bytes]]]:
        """(add, delete) as (set, key bytes) in nft's layout (nfnetlink.ifname_key, pair_key)."""
        from smtp_gate.nfnetlink import ifname_key, pair_key  # the encoders live with the netlink code

        def key(element: Element) -> bytes:
            return ifname_key(element) if isinstance(element, str) else pair_key(*element)

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
