"""Make a whitelist change take effect at once on running guests: element changes, no rebuild.

Called under the lock, after the new whitelist was written.  Additions come from the
guests the caller resolved through libvirt before it took the lock; revocations are
checked against what the kernel actually holds, so an allowance nobody recorded (a guest
started before smtp-gate ran) is revoked too, and against the guests' records, which
are revoked from even while our table is absent (`smtp-gate disable`): an install that
does not ask libvirt would otherwise put the allowance back from them.
"""

from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

from smtp_gate import discovery, engine, guests, nft, offswitch, ruleset, whitelist
from smtp_gate.config import Config
from smtp_gate.domain import Domain
from smtp_gate.errors import NftError, PartialChange, RunStateError
from smtp_gate.runstate import Pair, Record, RunState, domain_event


def reconcile(
    config: Config,
    model: whitelist.Whitelist,
    running: Iterable[Domain],
    affected_macs: Iterable[str] = (),
    journal: bool = False,
) -> List[str]:
    """Bring the kernel in line with MODEL for the RUNNING guests the caller knows about and
    for every kernel allowance of AFFECTED_MACS.  Returns one line per change.

    JOURNAL (the metadata store's commands, whose change is in the guest's XML, not in the
    whitelist): journal a start with each running guest's XML, as hooks do, so that a
    rebuild or a watcher's round that read libvirt before the caller's write replays it
    (docs/protocol.md)."""
    running = list(running)
    state = RunState(config.run_dir)
    links = discovery.read_links()
    names = {link.ifindex: link.name for link in links.values()}
    records = state.all_records()

    add: List[Tuple[str, ruleset.Element]] = []
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
    starts = [domain_event("start", dom) for dom in running if dom.uuid in new_records] if journal else []

    held = engine.kernel_pairs(nft.read_table(), links, keep_gone=True)
    revocation = _revocations(model, records, new_records, set(affected_macs), held, names)
    delete: List[Tuple[str, ruleset.Element]] = [("allowed", pair) for pair in revocation.kernel]
    messages += revocation.messages
    applied: Optional[ruleset.ElementChanges] = None  # the inverse of what the kernel took
    if add or delete or revocation.records:
        if not nft.table_exists():
            # a revocation must not wait for the table: every install that does not ask
            # libvirt puts back what the records hold
            for record in revocation.records.values():
                state.write_record(record)
            for event in starts:
                state.append(event)
            messages.append(not_in_force(config))
            return messages
        if add or delete:
            changes = ruleset.element_changes(add=add, delete=delete)
            absent = set(nft.missing_elements(changes.add))  # what the batch really adds, to undo it exactly
            nft.run_elements(changes)
            applied = ruleset.ElementChanges(add=changes.delete, delete=tuple(e for e in changes.add if e in absent))
    _commit(state, records, {**revocation.records, **new_records}, applied, messages, starts)
    return messages


def _commit(
    state: RunState,
    before: Dict[str, Record],
    new_records: Dict[str, Record],
    undo: Optional[ruleset.ElementChanges],
    messages: List[str],
    starts: Sequence[Dict[str, object]] = (),
) -> None:
    """Write NEW_RECORDS, then journal STARTS.  If that fails after the kernel took the change (a full or read-only
    run directory), put back the records already written and send UNDO, so that exit 1 keeps
    its promise: a kernel allowance no record names is one a stop hook cannot find, and
    the whitelist is restored by the caller.  What cannot be put back is a PartialChange
    naming exactly what is left (the caller keeps the whitelist then: it matches the kernel)."""
    written: List[str] = []
    try:
        for record in new_records.values():
            state.write_record(record)
            written.append(record.uuid)
        for event in starts:
            state.append(event)
    except OSError as exc:
        if undo is None:
            raise  # the kernel did not change: the caller restores the whitelist
        problem = f"cannot record the change in the run directory {state.dir!r} ({exc.strerror or exc})"
        change = "; ".join(messages) or "element changes"
        stuck: List[str] = []
        for uuid in written:
            try:
                if uuid in before:
                    state.write_record(before[uuid])
                else:
                    state.drop_record(uuid)
            except OSError:
                stuck.append(new_records[uuid].name)
        if stuck:
            raise PartialChange(
                f"{problem}, nor put back the records of {', '.join(map(repr, stuck))}: the whitelist and the "
                f"kernel hold the change ({change}); `smtp-gate rebuild` records it once the run directory can be written"
            ) from None
        try:
            if undo.add or undo.delete:
                nft.run_elements(undo)
        except NftError as undo_exc:
            raise PartialChange(
                f"{problem}, and undoing the kernel change failed too ({undo_exc}): the whitelist and the kernel "
                f"hold the change ({change}) and the records do not show it; `smtp-gate rebuild` records it once the run "
                "directory can be written"
            ) from None
        raise RunStateError(f"{problem}: the kernel change was undone, nothing was changed") from None


class Revocation(NamedTuple):
    kernel: List[Pair]  # to delete from the kernel's allowed set
    records: Dict[str, Record]  # by UUID: each record that held a revoked pair, without it
    messages: List[str]


def _revocations(
    model: whitelist.Whitelist,
    records: Dict[str, Record],
    judged: Dict[str, Record],
    macs: Set[str],
    held: Set[Pair],
    names: Dict[int, str],
) -> Revocation:
    """Every allowance of MACS the whitelist no longer grants, wherever it is held: in the
    kernel (HELD; also one nobody recorded) and in the guests' records.  The records count
    as much as the kernel: every install that does not ask libvirt (`enable --no-libvirt`,
    a rebuild with libvirt silent, the watcher, a hook's table install) puts back what they
    hold, also after a revocation made while the table was absent.  A guest JUDGED just now
    is allowed what its new record says; any other, what the whitelist grants its name and
    UUID."""
    owner: Dict[Pair, Record] = {pair: r for r in records.values() for pair in r.allowed}
    kernel: List[Pair] = []
    updated: Dict[str, Record] = {}
    messages: List[str] = []
    for pair in sorted({p for p in held | set(owner) if p[1] in macs}):
        index, mac = pair
        record = owner.get(pair)
        if record is not None and record.uuid in judged:
            still = pair in judged[record.uuid].allowed
        else:
            name, uuid = (record.name, record.uuid) if record else ("", "")
            still = mac in guests.whitelisted(model.allowed_macs, name, uuid, (mac,))
        if still:
            continue
        if pair in held:
            kernel.append(pair)
        who = f"guest {record.name!r} " if record else ""
        messages.append(f"revoked {who}NIC {mac} on {names.get(index, f'#{index} (gone)')}")
        if record is not None:
            base = updated.get(record.uuid, record)
            updated[record.uuid] = base._replace(allowed=tuple(p for p in base.allowed if p != pair))
    return Revocation(kernel, updated, messages)


def not_in_force(config: Config) -> str:
    """Where a change made while our table is absent takes effect.  While the operator has
    switched enforcement off, `smtp-gate apply` would also switch it back on: that is
    `smtp-gate enable`'s decision, so name that."""
    off = offswitch.read(config.disabled_path)
    if off is not None:
        return f"enforcement is disabled ({off.by_line()}): the change takes effect at `smtp-gate enable`"
    return "enforcement is not active: the change takes effect at the next `smtp-gate apply`"

