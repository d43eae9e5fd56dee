"""`smtp-gate apply` / `rebuild`: derive the whole truth and install it in one transaction.

The order matters (DESIGN §2):
1. note where the hooks' journal ends (briefly under the lock);
2. read the running guests from libvirt WITHOUT our lock: a guest whose start hook waits
   for our lock holds libvirt's lock on that guest, and listing it would wait forever;
3. under the lock: read the whitelist, replay what hooks did since step 1 onto the
   snapshot, derive each guest's record, apply everything in one nft transaction, and
   only then write the records and truncate the journal (firewalld's order: kernel
   first, bookkeeping after).
The operator's off-switch (offswitch.py) is read under the lock in step 3, where
`smtp-gate disable` removes the table: an unattended rebuild (the timer, the boot service,
the watcher) then installs nothing; an operator's `apply` installs and removes the switch.
Rebuilds run one at a time (rebuild.lock), so the journal has one reader.  Both locks
are taken with fcntl.flock, as the hooks take the main one (see lock.py: filelock's import
and exit would be a tenth of a rebuild of 1 000 guests).
"""

from typing import Dict, List, NamedTuple, Optional

from smtp_gate import discovery, engine, exposure, guests, hypervisor, lock, offswitch, ruleset, whitelist
from smtp_gate.config import Config
from smtp_gate.domain import Domain
from smtp_gate.engine import Outcome
from smtp_gate.errors import EnforcementDisabled
from smtp_gate.runstate import Record, RunState, replay


class Result(NamedTuple):
    outcome: Outcome
    batch: ruleset.Batch
    guests_seen: Optional[int]  # None: no hypervisor was asked (use_libvirt False) or none answered
    hypervisor_warnings: List[str]
    reenabled: Optional[offswitch.Disabled] = None  # the off-switch this (operator's) apply removed
    # running guest NICs no rule sees (exposure.py); None: not checked (libvirt not asked or silent)
    unprotected: Optional[List[exposure.Unprotected]] = None


def records_for(config: Config, domains: List[Domain], links: Dict[str, discovery.Link]) -> List[Record]:
    """One record per guest, from the whitelist as it is now (call under the lock)."""
    allow = whitelist.load(config.whitelist).index()
    index_of, master_of = discovery.index_of(links), discovery.master_of(links)
    return [
        guests.record_for(
            d,
            config.bridges,
            allow.allowed_macs(whitelist.Guest(d.name, d.uuid, tuple(guests.nic_macs(d)))),
            index_of,
            master_of,
        )
        for d in domains
    ]


def _off_switch(config: Config, reenable: bool) -> Optional[offswitch.Disabled]:
    """The off-switch, if set; raises EnforcementDisabled unless REENABLE (an operator's apply)."""
    off = offswitch.read(config.disabled_path)
    if off is not None and not reenable:
        raise EnforcementDisabled(off)
    return off


def rebuild(config: Config, use_libvirt: bool = True, dry_run: bool = False, reenable: bool = False) -> Result:
    """REENABLE: an operator's explicit apply, which ends `smtp-gate disable`; every other caller
    (the timer, the boot service, the watcher) honours the off-switch and installs nothing."""
    _off_switch(config, reenable)  # early too: a disabled host is not worth asking libvirt
    state = RunState(config.run_dir)
    state.prepare()
    with lock.flock(state.rebuild_lock, lock.COMMAND_TIMEOUT):
        with lock.flock(config.lock_path, lock.COMMAND_TIMEOUT):
            offset = state.journal_end()
        listing = hypervisor.list_running(config.uris()) if use_libvirt else None
        notes: List[str] = []
        unprotected: Optional[List[exposure.Unprotected]] = None
        if listing is not None:
            notes += [f"guest skipped, its XML could not be read: {line}" for line in listing.skipped]
            explicit = bool(config.hypervisor or config.libvirt_uris)
            if not listing.reached:
                notes.append(
                    "no hypervisor answered ("
                    + "; ".join(f"{uri}: {why}" for uri, why in listing.unreachable.items())
                    + "): enforcement is installed and the kernel's allowances for existing ports are kept"
                )
            elif explicit and listing.unreachable:
                notes += [f"libvirt {uri} did not answer: {why}" for uri, why in listing.unreachable.items()]
        with lock.flock(config.lock_path, lock.COMMAND_TIMEOUT):
            off = _off_switch(config, reenable)
            links = discovery.read_links()
            if listing is not None and listing.reached:
                snapshot = {d.uuid: d for d in listing.domains}
                amended = replay(snapshot, state.events_since(offset))
                records = records_for(config, list(amended.values()), links)
                unprotected = exposure.all_unprotected(amended.values(), config.bridges, discovery.master_of(links))
                if listing.unreachable:
                    # guests of a URI that did not answer: keep what their hooks recorded
                    known = {r.uuid for r in records}
                    records += [r for u, r in state.all_records().items() if u not in known]
                outcome, batch = engine.apply(config, records, dry_run=dry_run, links=links)
                if not dry_run:
                    state.replace_records(records)
                    state.truncate_journal()
            else:
                # no libvirt: what hooks and the last rebuild recorded, and what the kernel holds
                recorded = list(state.all_records().values())
                outcome, batch = engine.apply(config, recorded, keep_kernel=True, dry_run=dry_run, links=links)
            if off is not None and not dry_run:
                offswitch.clear(off.path)  # installed: only now is enforcement back on
    seen = len(listing.domains) if listing is not None and listing.reached else None
    return Result(outcome, batch, seen, notes, None if dry_run else off, unprotected)
