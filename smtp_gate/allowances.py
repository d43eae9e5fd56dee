"""Make a whitelist change take effect at once on running guests: element changes, no rebuild.

Called under the lock, after the new whitelist was written.  Additions come from the
guests the caller resolved through libvirt before it took the lock; revocations are
checked against what the kernel actually holds, so an allowance nobody recorded (a guest
started before smtp-gate ran) is revoked too.
"""

from typing import Dict, Iterable, List, Optional, Set, Tuple

from smtp_gate import discovery, guests, nft, ruleset, whitelist
from smtp_gate.config import Config
from smtp_gate.domain import Domain
from smtp_gate.runstate import Pair, Record, RunState


def _names_by_index(links: Dict[str, discovery.Link]) -> Dict[int, str]:
    return {link.ifindex: link.name for link in links.values()}


def kernel_allowed(links: Dict[str, discovery.Link]) -> Set[Pair]:
    """The allowances the kernel holds, as (ifindex, MAC); a gone device keeps its number."""
    table = nft.read_table()
    index_by_name = {link.name: link.ifindex for link in links.values()}
    pairs: Set[Pair] = set()
    for value in table.elements.get("allowed", []) if table else []:
        if isinstance(value, tuple) and len(value) == 2:
            port, mac = str(value[0]), str(value[1])
            index = index_by_name.get(port) if not port.isdigit() else int(port)
            if index is not None:
                pairs.add((index, mac))
    return pairs


def reconcile(
    config: Config,
    model: whitelist.Whitelist,
    running: Iterable[Domain],
    affected_macs: Iterable[str] = (),
) -> List[str]:
    """Bring the kernel in line with MODEL for the RUNNING guests the caller knows about and
    for every kernel allowance of AFFECTED_MACS.  Returns one line per change."""
    state = RunState(config.run_dir)
    links = discovery.read_links()
    names = _names_by_index(links)
    index_of = lambda name: links[name].ifindex if name in links else None  # noqa: E731
    master_of = lambda name: links[name].master if name in links else None  # noqa: E731
    records = state.all_records()
    owner: Dict[Pair, Record] = {pair: r for r in records.values() for pair in r.allowed}

    add: List[Tuple[str, ruleset.Element]] = []
    delete: List[Tuple[str, ruleset.Element]] = []
    messages: List[str] = []
    new_records: Dict[str, Record] = {}
    for dom in running:
        if not any(nic.target in links for nic in dom.nics if nic.target):
            continue  # it stopped after the caller asked libvirt: its stop hook did the rest
        allowed = model.allowed_macs(whitelist.Guest(dom.name, dom.uuid, tuple(guests.nic_macs(dom))))
        record = guests.record_for(dom, config.bridges, allowed, index_of, master_of)
        old = records.get(dom.uuid)
        for pair in sorted(set(record.allowed) - set(old.allowed if old else ())):
            add.append(("allowed", pair))
            messages.append(f"allowed guest {dom.name!r} NIC {pair[1]} on {names.get(pair[0], pair[0])}")
        for name in record.guest_ports:
            add.append(("guest_ports", name))
        new_records[dom.uuid] = record

    macs = {m for m in affected_macs}
    for pair in sorted(kernel_allowed(links)):
        index, mac = pair
        if mac not in macs:
            continue
        record = owner.get(pair)
        if record is not None and record.uuid in new_records:
            still = pair in new_records[record.uuid].allowed
        else:
            name, uuid = (record.name, record.uuid) if record else ("", "")
            still = mac in model.allowed_macs(whitelist.Guest(name, uuid, (mac,)))
        if not still:
            delete.append(("allowed", pair))
            who = f"guest {record.name!r} " if record else ""
            messages.append(f"revoked {who}NIC {mac} on {names.get(index, f'#{index} (gone)')}")
            if record is not None and record.uuid not in new_records:
                new_records[record.uuid] = record._replace(allowed=tuple(p for p in record.allowed if p != pair))
    if add or delete:
        if not nft.table_exists():
            messages.append("enforcement is not active: the change takes effect at the next `smtp-gate apply`")
            return messages
        nft.run_elements(ruleset.element_changes(add=add, delete=delete))
    for record in new_records.values():
        state.write_record(record)
    return messages


def macs_of(domain: Optional[Domain]) -> List[str]:
    return guests.nic_macs(domain) if domain else []
