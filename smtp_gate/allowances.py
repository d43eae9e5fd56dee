"""Make a whitelist change take effect at once on running guests: element changes, no rebuild.

Called under the lock, after the new whitelist was written.  Additions come from the
guests the caller resolved through libvirt before it took the lock; revocations are
checked against what the kernel actually holds, so an allowance nobody recorded (a guest
started before smtp-gate ran) is revoked too.
"""

from typing import Dict, Iterable, List, Tuple

from smtp_gate import discovery, engine, guests, nft, ruleset, whitelist
from smtp_gate.config import Config
from smtp_gate.domain import Domain
from smtp_gate.runstate import Pair, Record, RunState


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
    names = {link.ifindex: link.name for link in links.values()}
    records = state.all_records()
    owner: Dict[Pair, Record] = {pair: r for r in records.values() for pair in r.allowed}

    add: List[Tuple[str, ruleset.Element]] = []
    delete: List[Tuple[str, ruleset.Element]] = []
    messages: List[str] = []
    new_records: Dict[str, Record] = {}
    for dom in running:
        if not any(nic.target in links for nic in dom.nics if nic.target):
            continue  # it stopped after the caller asked libvirt: its stop hook did the rest
        record = guests.judge(
            dom, config.bridges, model.allowed_macs, discovery.index_of(links), discovery.master_of(links)
        ).record()
        old = records.get(dom.uuid)
        for pair in sorted(set(record.allowed) - set(old.allowed if old else ())):
            add.append(("allowed", pair))
            messages.append(f"allowed guest {dom.name!r} NIC {pair[1]} on {names.get(pair[0], pair[0])}")
        for _name, index in record.guest_ports:
            add.append(("guest_ifaces", index))
        new_records[dom.uuid] = record

    macs = {m for m in affected_macs}
    for pair in sorted(engine.kernel_pairs(nft.read_table(), links, keep_gone=True)):
        index, mac = pair
        if mac not in macs:
            continue
        record = owner.get(pair)
        if record is not None and record.uuid in new_records:
            still = pair in new_records[record.uuid].allowed
        else:
            name, uuid = (record.name, record.uuid) if record else ("", "")
            still = mac in guests.whitelisted(model.allowed_macs, name, uuid, (mac,))
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

