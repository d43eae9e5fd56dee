"""From configuration, kernel links and guests to the desired state, and into the kernel.

compute() is pure; apply() gathers its inputs, sends one atomic batch through nft.py,
and reports what it did.  Callers hold the lock around apply() (never while they talk
to libvirt).
"""

from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

from smtp_gate import discovery, nft, ruleset, validate
from smtp_gate.config import Config
from smtp_gate.deadline import Deadline
from smtp_gate.discovery import Link, PortPlan
from smtp_gate.ruleset import Desired, Pair
from smtp_gate.runstate import Record


class Outcome(NamedTuple):
    """What an apply computed, and what the operator must hear about."""

    desired: Desired
    plan: PortPlan
    warnings: List[str]

    @property
    def has_warnings(self) -> bool:
        return bool(self.warnings)


def stable_links(before: Dict[str, Link], after: Dict[str, int]) -> Dict[str, Link]:
    """The links that kept their name and index across a read of the kernel's table.

    nft lists an allowance's interface index as the device's name while it exists: a name
    read back is mapped to an index only if that name meant the same device before and
    after the listing (indexes are never reused), so a device re-created under the same
    name in between cannot inherit an allowance."""
    return {name: link for name, link in before.items() if after.get(name) == link.ifindex}


def kernel_pairs(table: Optional[nft.KernelTable], links: Dict[str, Link], keep_gone: bool = False) -> Set[Pair]:
    """The allowances the kernel holds, as (ifindex, MAC).  nft lists an interface index as
    the device's name while it exists (mapped back through LINKS: see stable_links) and as
    a number once the device is gone: those are dropped, or kept with KEEP_GONE (to revoke
    them)."""
    if table is None:
        return set()
    by_name = {link.name: link.ifindex for link in links.values()}
    pairs: Set[Pair] = set()
    for value in table.elements.get("allowed", []):
        if not (isinstance(value, tuple) and len(value) == 2):
            continue
        port, mac = str(value[0]), validate.mac(str(value[1]))
        index = int(port) if port.isdigit() and keep_gone else by_name.get(port)
        if index is not None:
            pairs.add((index, mac))
    return pairs


def kernel_indexes(table: Optional[nft.KernelTable], set_name: str, links: Dict[str, Link]) -> Set[int]:
    """The interface indexes an iface_index set of the kernel's holds, for devices that still
    exist (nft lists those by name; see stable_links)."""
    if table is None:
        return set()
    by_name = {link.name: link.ifindex for link in links.values()}
    return {by_name[str(v)] for v in table.elements.get(set_name, []) if str(v) in by_name}


def compute(
    config: Config,
    links: Dict[str, Link],
    guests: Sequence[Record],
    kernel: Optional[nft.KernelTable],
    keep_kernel: bool = False,
) -> Outcome:
    """The whole desired state.

    GUESTS holds one record per running guest (see guests.record_for).  KEEP_KERNEL is for
    when no hypervisor could be asked (libvirt down, the boot-time apply that must not wait
    for libvirt, a restore after someone flushed the ruleset): the kernel's own allowances
    and guest ports are kept too, so neither a restart of our service nor a libvirt outage
    unblocks or blocks a running guest.  Anything naming a device that no longer exists
    is dropped: an interface index is never reused, a name may be.
    """
    name_of = {link.ifindex: link.name for link in links.values()}
    foreign: Set[int] = kernel_indexes(kernel, "foreign_ifaces", links) if keep_kernel else set()
    pairs: Set[Pair] = kernel_pairs(kernel, links) if keep_kernel else set()
    guest_ifaces: Set[int] = kernel_indexes(kernel, "guest_ifaces", links) if keep_kernel else set()
    for record in guests:
        guest_ifaces.update(i for _name, i in record.guest_ports if i in name_of)
        foreign.update(i for _name, i in record.foreign_ports if i in name_of)
        pairs.update(p for p in record.allowed if p[0] in name_of)
    guest_names = sorted(name_of[i] for i in guest_ifaces)
    plan = discovery.plan_ports(config, links, guest_names)
    warnings = list(plan.warnings)
    if plan.skipped:
        warnings.append(
            "ports with names that cannot be written into a rule are treated as unknown (blocked): "
            + ", ".join(repr(name) for name in plan.skipped)
        )
    # a port the hypervisor reported as a guest's is never an uplink, whatever UPLINKS says
    claimed = sorted(set(plan.uplinks) & set(guest_names))
    if claimed:
        warnings.append(
            "UPLINKS names ports a hypervisor reports as guest ports; they are treated as guest "
            "ports (outbound mail from them stays blocked): " + ", ".join(claimed)
        )
    foreign.update(links[name].ifindex for name in plan.foreign_ports if name in links)
    # a port is left alone only while it is a port of a bridge we do not protect: one moved
    # onto a protected bridge keeps its index, and must not keep its exemption there
    foreign = {i for i in foreign if _on_unprotected_bridge(links.get(name_of[i]), links, config.bridges)}
    if config.non_ip == "accept":
        warnings.append(
            'NON_IP="accept": non-IP frames from guests (QinQ double tags, PPPoE, ...) leave '
            "unfiltered, and can carry mail past every check"
        )
    desired = Desired(
        uplinks=tuple(u for u in plan.uplinks if u not in claimed),
        guest_ifaces=tuple(sorted(guest_ifaces)),
        foreign_ifaces=tuple(sorted(foreign - guest_ifaces)),
        blocked_ports=config.blocked_ports,
        allowed=tuple(sorted(pairs)),
        relays=config.allowed_destinations,
        audit=config.audit,
        log_drops=config.log_drops,
        log_rate=config.log_rate,
        log_burst=config.log_burst,
        non_ip=config.non_ip,
        log_group=config.log_group,
        log_group_rate=config.log_group_rate,
        log_group_burst=config.log_group_burst,
    )
    return Outcome(desired=desired, plan=plan, warnings=warnings)


def _on_unprotected_bridge(link: Optional[Link], links: Dict[str, Link], protected: Sequence[str]) -> bool:
    master = links.get(link.master) if link is not None and link.master else None
    return master is not None and master.kind == "bridge" and master.name not in protected


_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def obsolete(kernel: Optional[nft.KernelTable], attempts_timeout: str = ruleset.ATTEMPTS_TIMEOUT) -> Tuple[List[str], List[str]]:
    """Chains and sets an older version left in our table, or sets whose type changed."""
    if kernel is None:
        return [], []
    chains = [name for name in kernel.chains if name not in ruleset.CHAINS]
    specs = dict(ruleset.SET_TYPES, **{ruleset.ATTEMPTS_SET: ruleset.attempts_spec(),
                                       ruleset.PORT_ATTEMPTS_SET: ruleset.port_attempts_spec(),
                                       ruleset.LOG_METER_SET: ruleset.LOG_METER_SPEC})
    sets = []
    for name, entry in kernel.sets.items():
        if name not in specs:
            sets.append(name)
            continue
        expected = specs[name].split(";")[0].replace("type ", "").strip()
        actual = entry.get("type")
        actual_text = " . ".join(actual) if isinstance(actual, list) else str(actual)
        flags = entry.get("flags", [])
        flags = set(flags if isinstance(flags, list) else [flags])
        # `add set` with other flags than the kernel's fails: such a set is re-created
        if actual_text != expected or ("interval" in flags) != ("interval" in specs[name]):
            sets.append(name)
        elif name in (ruleset.ATTEMPTS_SET, ruleset.PORT_ATTEMPTS_SET) and (
            "timeout" not in flags or entry.get("timeout") != int(attempts_timeout[:-1]) * _SECONDS[attempts_timeout[-1]]
        ):
            sets.append(name)  # an older version's attempts set, which never expired, or another timeout
    return chains, sets


def build(outcome: Outcome, kernel: Optional[nft.KernelTable]) -> ruleset.Batch:
    chains, sets = obsolete(kernel, outcome.desired.attempts_timeout)
    return ruleset.apply_batch(outcome.desired, obsolete_chains=chains, obsolete_sets=sets)


def apply(
    config: Config,
    guests: Sequence[Record],
    keep_kernel: bool = False,
    dry_run: bool = False,
    links: Optional[Dict[str, Link]] = None,
    deadline: Optional[Deadline] = None,
) -> Tuple[Outcome, ruleset.Batch]:
    """Compute and install the whole desired state in one transaction (or only check it).
    With DEADLINE (a hook's budget), each nft call gets what is left of it."""

    def timeout(before: str) -> float:
        return deadline.remaining(before) if deadline is not None else 60.0

    links = discovery.read_links() if links is None else links
    # only kept allowances need the kernel's elements
    kernel = nft.read_table(elements=keep_kernel, timeout=timeout("reading our table with nft"))
    if keep_kernel:
        links = stable_links(links, discovery.read_indexes())
    outcome = compute(config, links, guests, kernel, keep_kernel)
    batch = build(outcome, kernel)
    nft.run_batch(batch, check_only=dry_run, timeout=timeout("installing the table with nft -f"))
    return outcome, batch


def remove() -> bool:
    """Remove our table and nothing else.  Returns whether it existed."""
    existed = nft.table_exists()
    nft.run_batch(ruleset.remove_batch())
    return existed
