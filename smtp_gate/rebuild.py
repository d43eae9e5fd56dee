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
Records a listing does not show are kept only while they cannot be checked (their URI did
not answer, or the guest's XML could not be read), for at most KEEP_UNVERIFIED seconds,
and never once their ports are gone (keep_unverified; docs/protocol.md).
Rebuilds run one at a time (rebuild.lock), so the journal has one reader.  Both locks
are taken with fcntl.flock, as the hooks take the main one (see lock.py: filelock's import
and exit would be a tenth of a rebuild of 1 000 guests).  A dry run writes no file: it
creates neither the run directory nor a lock file, and takes each lock whose file exists.
"""

import time
from typing import Callable, Collection, ContextManager, Dict, List, NamedTuple, Optional, Tuple

from smtp_gate import discovery, engine, exposure, guests, hypervisor, lock, metrics, offswitch, ruleset, whitelist
from smtp_gate.config import Config
from smtp_gate.domain import Domain
from smtp_gate.engine import Outcome
from smtp_gate.errors import EnforcementDisabled, SmtpGateError, WhitelistError
from smtp_gate.runstate import Record, RunState, now, replay

# How long a rebuild keeps a record no listing vouches for (its libvirt did not answer, or
# its XML could not be read), while its ports exist.  Long enough for a daemon restart or
# upgrade; a driver silent for longer is broken, and its guests fall back to blocked.
KEEP_UNVERIFIED = 3600.0


class Result(NamedTuple):
    outcome: Outcome
    batch: ruleset.Batch
    guests_seen: Optional[int]  # None: no hypervisor was asked (use_libvirt False) or none answered
    hypervisor_warnings: List[str]
    reenabled: Optional[offswitch.Disabled] = None  # the off-switch this (operator's) apply removed
    # running guest NICs no rule sees (exposure.py); None: not checked (libvirt not asked or silent)
    unprotected: Optional[List[exposure.Unprotected]] = None


def records_for(
    config: Config, domains: List[Domain], links: Dict[str, discovery.Link], model: Optional[whitelist.Whitelist] = None
) -> List[Record]:
    """One record per guest, from the whitelist as it is now (call under the lock)."""
    matcher = (model or whitelist.load(config.whitelist)).index().allowed_macs
    index_of, master_of = discovery.index_of(links), discovery.master_of(links)
    return [guests.judge(d, config.bridges, matcher, index_of, master_of).record() for d in domains]


def keep_unverified(
    recorded: Dict[str, Record],
    listed: Collection[str],
    listing: hypervisor.Listing,
    alive: Collection[int],
    at: float,
    bound: float = KEEP_UNVERIFIED,
    matcher: Optional[guests.Matcher] = None,
) -> Tuple[List[Record], List[str]]:
    """(records to keep, notes: one per record dropped for an unverified reason and one per
    guest whose XML could not be read) among the RECORDED guests that are not in LISTED
    (the amended listing's UUIDs).

    A record is kept only when no answer could check it: its URI did not answer, or the
    guest's XML could not be read (an older record without a URI: when any URI did not
    answer).  A URI that answered or whose driver is absent vouches that the guest is not
    running there, so its record goes.  A kept record holds only its ports that still
    exist (ALIVE interface indexes; a device re-created under the name has a new index),
    goes at once when none does, and goes BOUND seconds after the first rebuild that could
    not check it (AT: runstate.now()).

    A guest whose XML could not be read keeps its ports, but only the allowed pairs a source
    still grants (guests.still_allowed): the whitelist file (MATCHER; None: no row) or its
    metadata as libvirt gave it alone (hypervisor.Unread), never what its metadata no longer
    says: a revocation must not wait an hour because a description grew too big."""
    keep: List[Record] = []
    notes: List[str] = []
    no_rows: guests.Matcher = lambda _guest: ()  # noqa: E731
    for uuid, record in sorted(recorded.items()):
        if uuid in listed:
            continue
        unread = listing.unread.get(uuid)
        if record.uri and record.uri in listing.unreachable:
            unread = None
            why = f"libvirt {record.uri} did not answer"
        elif unread is not None:
            why = "its XML could not be read"
        elif not record.uri and listing.unreachable:
            why = "a libvirt URI did not answer (record of an older version, URI unknown)"
        else:
            continue
        ports = tuple(p for p in record.guest_ports if p[1] in alive)
        foreign = tuple(p for p in record.foreign_ports if p[1] in alive)
        if not ports and not foreign:
            if unread is not None:
                notes.append(f"guest {record.name!r} ({uuid}): its XML could not be read ({unread.why}) and its "
                             "recorded ports are gone: record dropped")
            continue  # its devices are gone: the guest is not running, whatever libvirt says
        since = record.unverified_since if record.unverified_since is not None else at
        if at - since > bound:
            notes.append(
                f"guest {record.name!r} ({uuid}) dropped: unverified for {at - since:.0f}s ({why}); "
                "its NICs are blocked until a rebuild can read it"
            )
            continue
        allowed = tuple(p for p in record.allowed if p[0] in alive)
        if unread is not None:
            narrowed = guests.still_allowed(
                record._replace(allowed=allowed), matcher or no_rows, unread.allow, unread.allow_error is None
            )
            notes.append(unread.outcome(record.guest_ports, allowed, narrowed))
            allowed = narrowed
        keep.append(record._replace(guest_ports=ports, foreign_ports=foreign, allowed=allowed, unverified_since=since))
    for uuid, unread in sorted(listing.unread.items()):
        if uuid not in recorded and uuid not in listed:
            notes.append(
                f"guest {unread.name!r} ({uuid}) on {unread.uri}: its XML could not be read ({unread.why}); "
                f"{unread.metadata_text()}; no record of it here: its NICs stay blocked until it can be read"
            )
    return keep, notes


def whitelist_warnings(config: Config) -> List[str]:
    """The whitelist's problems, for an apply that matches no guest against it (no hypervisor
    asked or answering: the boot service's apply).  Read anyway, so that a broken file is
    heard at boot, not at the first guest start that finds it; a file that cannot be read at
    all is a warning too, never an error: enforcement must be installed regardless."""
    try:
        model = whitelist.load(config.whitelist)
    except WhitelistError as exc:
        return [
            f"the whitelist cannot be read ({exc}): enforcement is installed and the kernel's "
            "allowances for existing ports are kept"
        ]
    return [f"{config.whitelist}: {problem}" for problem in model.problems()]


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
    started = time.monotonic()
    state = RunState(config.run_dir)
    # a dry run writes nothing, so it creates neither the run directory nor a lock file: it
    # takes each lock whose file exists (a consistent read of the records and the journal)
    take: Callable[[str, float], ContextManager[object]] = lock.flock_existing if dry_run else lock.flock
    if not dry_run:
        state.prepare()
    with take(state.rebuild_lock, lock.COMMAND_TIMEOUT):
        with take(config.lock_path, lock.COMMAND_TIMEOUT):
            offset = state.journal_end()
        listing = hypervisor.list_running(config.uris(), config.libvirt_timeout) if use_libvirt else None
        notes: List[str] = []
        unprotected: Optional[List[exposure.Unprotected]] = None
        if listing is not None:
            # a guest whose XML could not be read (listing.skipped) is said by keep_unverified, once
            explicit = bool(config.hypervisor or config.libvirt_uris)
            if not listing.reached:
                notes.append(
                    "no hypervisor answered ("
                    + "; ".join(f"{uri}: {why}" for uri, why in {**listing.unreachable, **listing.absent}.items())
                    + "): enforcement is installed and the kernel's allowances for existing ports are kept"
                )
            else:
                notes += [
                    f"libvirt {uri} did not answer: {why}; its guests keep what they had" for uri, why in listing.unreachable.items()
                ]
            if explicit and listing.reached:
                notes += [f"libvirt {uri}: no such driver here: {why}" for uri, why in listing.absent.items()]
        with take(config.lock_path, lock.COMMAND_TIMEOUT):
            off = _off_switch(config, reenable)
            links = discovery.read_links()
            if listing is not None and listing.reached:
                snapshot = {d.uuid: d for d in listing.domains}
                amended = replay(snapshot, state.events_since(offset))
                model = whitelist.load(config.whitelist)
                records = records_for(config, list(amended.values()), links, model)
                unprotected = exposure.all_unprotected(amended.values(), config.bridges, discovery.master_of(links))
                alive = {link.ifindex for link in links.values()}
                kept, dropped = keep_unverified(
                    state.all_records(), amended, listing, alive, now(), matcher=model.index().allowed_macs
                )
                records += kept
                notes += dropped
                outcome, batch = engine.apply(config, records, dry_run=dry_run, links=links)
                # a row that cannot be used allows nothing: whoever wrote it meant to allow a guest
                outcome.warnings.extend(f"{config.whitelist}: {problem}" for problem in model.problems())
                if not dry_run:
                    state.replace_records(records)
                    state.truncate_journal()
            else:
                # no libvirt: what hooks and the last rebuild recorded, and what the kernel holds
                recorded = list(state.all_records().values())
                outcome, batch = engine.apply(config, recorded, keep_kernel=True, dry_run=dry_run, links=links)
                outcome.warnings.extend(whitelist_warnings(config))
            if off is not None and not dry_run:
                offswitch.clear(off.path)  # installed: only now is enforcement back on
        if not dry_run:  # bookkeeping for metrics.py, under rebuild.lock (one rebuild at a time)
            try:
                metrics.note_rebuild(
                    state.dir, time.time(), time.monotonic() - started,
                    None if unprotected is None else [(u.guest, u.uuid) for u in unprotected],
                    libvirt=None if listing is None else listing.reached,
                )
            except SmtpGateError as exc:  # installed all the same: only the metrics miss it
                notes.append(f"metrics: {exc}")
    seen = len(listing.domains) if listing is not None and listing.reached else None
    return Result(outcome, batch, seen, notes, None if dry_run else off, unprotected)
