"""The operator's whitelist commands: add-vm, del-vm, add-mac, del-mac, list, ports-set and
the interactive picker.  Each change is a read-modify-write of the whitelist under the
lock, then an element change in the kernel: it takes effect at once on running guests.

libvirt is always asked before the lock is taken, never while it is held (DESIGN §2).
"""

import getpass
import os
import shlex
from contextlib import contextmanager, nullcontext
from datetime import datetime
from typing import Dict, Iterator, List, NamedTuple, NoReturn, Optional, Sequence, Tuple, Type

from smtp_gate import (
    allowances,
    config as config_mod,
    discovery,
    engine,
    exposure,
    files,
    guests,
    hypervisor,
    lock,
    nft,
    ruleset,
    status,
    validate,
    whitelist,
)
from smtp_gate.config import Config
from smtp_gate.domain import Allow, Domain, normalise_uuid
from smtp_gate.errors import ConfigError, NftError, PartialChange, RunStateError, SmtpGateError, WhitelistError
from smtp_gate.runstate import Record, RunState


class Change(NamedTuple):
    lines: List[str]  # one `ok: ...` line each
    warnings: List[str]
    notes: Tuple[str, ...] = ()  # facts to know, on stderr; the exit code stays 0
    # a removal done, and a NIC it concerned still allowed by another row: exit 3, since
    # "removed" alone would let the operator believe the guest can no longer send mail
    still_allowed: Tuple[str, ...] = ()


def invoking_user(environ: Optional[Dict[str, str]] = None) -> str:
    """The operator behind the command: SUDO_USER when run through sudo."""
    env = os.environ if environ is None else environ
    return env.get("SUDO_USER") or getpass.getuser()


def now() -> datetime:
    return datetime.now().astimezone()


def _protected_candidates(config: Config, dom: Domain, running: bool) -> List[str]:
    """The MACs of DOM's NICs an allowance can apply to; empty: a row allows nothing now.  A running
    guest's NICs are placed as status places them (exposure.py); a shut-off guest's XML may
    not name the bridge of a type='network' NIC yet, so that one is given the benefit of
    the doubt."""
    if running:
        master_of = discovery.master_of(discovery.read_links())
        return [n.mac or "?" for n in dom.nics if exposure.on_protected_bridge(n, config.bridges, master_of)]
    usable = []
    for nic in dom.nics:
        if not nic.bridge_visible:
            continue
        if nic.bridge in config.bridges or (nic.bridge is None and nic.type == "network"):
            usable.append(nic.mac or "?")
    return usable


def guest_unprotected(config: Config, dom: Domain, running: bool) -> List[exposure.Unprotected]:
    """DOM's UNPROTECTED NICs as `status` names them (running guests only: a shut-off
    guest's NICs are on no bridge yet)."""
    if not running:
        return []
    return exposure.unprotected_nics(dom, config.bridges, discovery.master_of(discovery.read_links()))


def _unprotected_warnings(nics: Sequence[exposure.Unprotected], allowing: str = "the guest") -> List[str]:
    """What add-vm, add-mac and the picker say after allowing a guest or a NIC with
    UNPROTECTED NICs."""
    return [f"{nic.line()} (no rule sees this NIC: allowing {allowing} changes nothing for it)" for nic in nics]


def allow_warnings(
    config: Config, dom: Domain, running: bool, unprotected: Sequence[exposure.Unprotected], what: str = "the row"
) -> List[str]:
    """What add-vm and the picker say after whitelisting DOM, so that they agree: the same
    derivation (exposure.py) for both.  A guest with no NIC on a protected bridge is
    whitelisted all the same, since it may get such a NIC, or its bridge may be added to
    BRIDGE; the operator is told that the row changes nothing until then, and which NICs
    (UNPROTECTED) it changes nothing for."""
    warnings = []
    if not _protected_candidates(config, dom, running):
        nics = "" if running else f"; its NICs: {_describe_nics(dom)}"
        warnings.append(
            f"guest {dom.name!r} has no NIC on a protected bridge ({', '.join(config.bridges)}): {what} allows "
            f"nothing until one of its NICs is on one (add its bridge to BRIDGE, or move the NIC){nics}"
        )
    return warnings + _unprotected_warnings(unprotected)


def _allowed_by(model: whitelist.Whitelist, guest: whitelist.Guest, verb: str) -> List[str]:
    """One line per NIC of GUEST that a row of MODEL allows, naming the rows: `NIC M of
    guest 'N' (UUID) VERB line L (row)`."""
    notes = []
    for mac in guest.macs:
        rows = model.matching(whitelist.Guest(guest.name, guest.uuid, (mac,)))
        if rows:
            by = ", ".join(f"line {number} ({entry.describe(guest.name)})" for number, entry in rows)
            who = f"{guest.name!r} ({guest.uuid})" if guest.uuid and guest.name else repr(guest.name or guest.uuid)
            notes.append(f"NIC {mac} of guest {who} {verb} {by}")
    return notes


def _recorded_guests(records: Sequence[Record], macs: Sequence[str] = ()) -> List[whitelist.Guest]:
    """The guests the records show (with the MACs they were allowed), those holding one of
    MACS if given: who a removal concerns when libvirt does not say."""
    out = []
    for record in records:
        allowed = tuple(dict.fromkeys(mac for _index, mac in record.allowed))
        if not macs or set(macs) & set(allowed):
            out.append(whitelist.Guest(record.name, record.uuid, tuple(m for m in allowed if not macs or m in macs)))
    return out


def _describe_nics(dom: Domain) -> str:
    parts = []
    for nic in dom.nics:
        where = nic.bridge or nic.network or "-"
        reason = nic.unprotected_reason
        parts.append(f"{nic.mac or 'no MAC'} ({nic.type} {where}{'; ' + reason if reason else ''})")
    return "; ".join(parts) or "none"


def _snapshot(path: "os.PathLike[str] | str", what: str, error: Type[SmtpGateError]) -> Optional[bytes]:
    """The file's bytes before a change, None if it does not exist: what _undo_on_failure restores."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


@contextmanager
def _undo_on_failure(
    path: "os.PathLike[str] | str", before: Optional[bytes], what: str, error: Type[SmtpGateError]
) -> Iterator[None]:
    """Put BEFORE back at PATH (atomically; call it under the lock) if the kernel change in
    the block fails, so that exit 1 keeps its promise: nothing was changed.

    nft batches and netlink batches are atomic, so a refusal changed nothing in the kernel.
    If the file cannot be put back, PartialChange says exactly what state is left.
    """
    try:
        yield
    except PartialChange:
        raise  # its raiser left the file as the kernel holds it, and says what is left
    except BaseException as exc:  # KeyboardInterrupt too: the file must not outlive a change never made
        try:
            if before is None:
                files.remove(path, what, error)
            else:
                files.atomic_write(path, before, what, error=error)
        except SmtpGateError as restore_exc:
            raise PartialChange(
                f"{_one_line(exc)}; restoring {what} {str(path)!r} failed too ({restore_exc}): the file holds the "
                "change and the kernel does not; undo the change in the file, or run `smtp-gate rebuild` to apply it"
            ) from None
        if isinstance(exc, NftError):
            raise NftError(f"{exc}; {what} {str(path)!r} restored as it was") from None
        if isinstance(exc, RunStateError):  # the kernel change was undone before the record failed
            raise RunStateError(f"{exc}; {what} {str(path)!r} restored as it was") from None
        raise


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _effect_line(effect: whitelist.Effect) -> str:
    """EFFECT for an `ok:` line; a removal that found nothing says so unmistakably."""
    if effect.action == whitelist.ABSENT:
        return f"nothing to remove: {effect.subject} is not in the whitelist"
    return str(effect)


def _write_and_apply(
    config: Config,
    edit,  # type: ignore[no-untyped-def]
    running: Sequence[Domain],
    affected: Sequence[str],
    journal: bool = False,
) -> Tuple[Change, whitelist.Whitelist]:
    """Under the lock: load, EDIT (returns effects), write if changed, reconcile the kernel;
    if the kernel change fails, the whitelist is put back as it was.  Returns the change
    and the whitelist as written, for what the caller must say about the rows left.
    JOURNAL: RUNNING was read back after a metadata write, so it is journaled as a hook's
    start is (a rebuild re-reads the file under the lock, but not libvirt)."""
    with lock.command_lock(config.lock_path):
        model = whitelist.load(config.whitelist)  # first: its errors name WHITELIST and what was expected
        before = _snapshot(config.whitelist, "whitelist", WhitelistError)
        effects = edit(model)
        written = any(e.changed for e in effects)
        if written:
            whitelist.write(config.whitelist, model)
        lines = [_effect_line(e) for e in effects]
        warnings = [f"whitelist {config.whitelist}: {p} (row kept, allows nothing)" for p in model.problems()]
        with _undo_on_failure(config.whitelist, before, "whitelist", WhitelistError) if written else nullcontext():
            lines += allowances.reconcile(config, model, running, affected, journal=journal)
    return Change(lines, warnings), model


SOURCE_ALL = "all"  # del-vm --source: every source that allows the guest


def add_vm(config: Config, name: str, reason: str, user: str, when: datetime, store: Optional[str] = None) -> Change:
    """Whitelist the guest NAME (a name or a UUID) by a row bound to its UUID: control panels
    reuse names, and a later guest given this name must not inherit the allowance.  STORE
    (add-vm --store) chooses the file or the guest's metadata; None: ALLOW_STORE."""
    validate.one_line("reason", reason)  # before asking libvirt: a bad value is refused at once
    dom, running = _find(config, name)
    if (store or config.allow_store) == config_mod.STORE_METADATA:
        change = allow_by_metadata(config, dom, running, reason, user, when)
        return change._replace(lines=change.lines + kernel_state(config, dom))
    row = whitelist.uuid_row(dom.uuid)
    change, _model = _write_and_apply(
        config,
        lambda model: [
            model.add_guest(row, added_at=when, added_by=user, reason=reason, uuid=dom.uuid, shown=dom.name)
        ],
        [dom] if running else [],
        [],
    )
    if not running:
        change.lines.append(f"guest {dom.name!r} is not running: its NICs are allowed when it starts")
    return change._replace(
        lines=change.lines + kernel_state(config, dom),
        warnings=change.warnings + allow_warnings(config, dom, running, guest_unprotected(config, dom, running)),
    )


def kernel_state(config: Config, dom: Domain) -> List[str]:
    """What the kernel holds for DOM's NICs now, read after the command: its own change lines
    say only what this command did, and `smtp-gate watch` may have applied a metadata change
    first, so this is the line that tells the operator where the guest stands.  Nothing for
    a guest not running here (no tap) or while our table is absent (not_in_force says so)."""
    links = discovery.read_links()
    table = nft.read_table()
    if table is None:
        return []
    held = engine.kernel_pairs(table, links)
    master_of = discovery.master_of(links)
    lines = []
    for nic in dom.nics:
        # an UNPROTECTED NIC has its own warning (allow_warnings): no rule sees it either way
        if nic.target in links and exposure.on_protected_bridge(nic, config.bridges, master_of):
            state = "allowed" if (links[nic.target].ifindex, nic.mac) in held else "blocked"
            lines.append(f"guest {dom.name!r} NIC {nic.mac or '?'} on {nic.target}: {state} in the kernel")
    return lines


def del_vm(config: Config, name: str, source: str = SOURCE_ALL) -> Change:
    """Revoke the guest's allowance from SOURCE (del-vm --source): its whitelist rows, bound to
    its name or to its UUID ("file"), its libvirt metadata ("metadata"), or both ("all", the
    default: "block this guest" must block it whatever allowed it).

    libvirt tells a name's UUID and a UUID's name.  For a guest libvirt no longer knows,
    the records its start hooks left give the UUIDs that ran under NAME.
    """
    if source == config_mod.STORE_METADATA:
        try:
            dom, running = _find(config, name)
        except hypervisor.UnreadGuest as exc:  # its XML cannot be read: the metadata calls alone
            return revoke_unread(config, exc.guest)
        change = revoke_by_metadata(config, dom, running)
        return change._replace(lines=change.lines + kernel_state(config, dom))
    warnings: List[str] = []
    unchecked: List[str] = []
    unread: Optional[hypervisor.Unread] = None
    try:
        found = hypervisor.find(config.uris(), name, config.libvirt_timeout)
    except SmtpGateError as exc:
        found = None
        unread = exc.guest if isinstance(exc, hypervisor.UnreadGuest) else None
        warnings.append(f"{exc}; removing the whitelist rows of {name!r} anyway")
        if source == SOURCE_ALL and unread is None:  # exit 3: "removed" must not suggest the guest is blocked
            unchecked.append(
                f"the libvirt metadata of guest {name!r} could not be checked, and may still allow it: "
                f"`smtp-gate del-vm {shlex.quote(name)} --source metadata` removes it once libvirt answers"
            )
    dom, running = found if found else (None, False)
    key = dom.name if dom else unread.name if unread else name
    records = list(RunState(config.run_dir).all_records().values())
    if dom is not None:
        uuids = [dom.uuid]
    elif unread is not None:
        uuids = [unread.uuid]
    elif normalise_uuid(name):
        uuids = [normalise_uuid(name) or ""]
    else:
        uuids = sorted({record.uuid for record in records if record.name == key})
    recorded = [
        mac
        for record in records
        if record.name == key or record.uuid in uuids
        for _index, mac in record.allowed
    ]

    def edit(model: whitelist.Whitelist) -> List[whitelist.Effect]:
        effects: List[whitelist.Effect] = []
        for uuid in uuids or [""]:
            effects += model.remove_guest(key, uuid, shown=key)
        return [e for e in effects if e.changed] or effects[:1]

    change, model, dom = _remove_everywhere(config, dom, running, edit, recorded, source == SOURCE_ALL)
    if unread is not None and source == SOURCE_ALL:  # its XML cannot be read: the metadata calls alone
        removed = revoke_unread(config, unread)
        change = change._replace(lines=change.lines + removed.lines, warnings=change.warnings + removed.warnings)
    if dom is not None:
        concerned = [whitelist.Guest(dom.name, dom.uuid, tuple(guests.nic_macs(dom)))]
    else:
        concerned = _recorded_guests([r for r in records if r.uuid in uuids or r.name == key])
    still = [note for guest in concerned for note in _allowed_by(model, guest, "is still allowed by")]
    still += _metadata_still_allows(dom) if dom is not None else []
    lines = change.lines + (kernel_state(config, dom) if dom is not None else [])
    return change._replace(
        lines=lines, warnings=warnings + change.warnings, still_allowed=tuple(still + unchecked) + change.still_allowed
    )


def _remove_everywhere(
    config: Config,
    dom: Optional[Domain],
    running: bool,
    edit,  # type: ignore[no-untyped-def]
    affected: Sequence[str],
    metadata: bool,
) -> Tuple[Change, whitelist.Whitelist, Optional[Domain]]:
    """Revoke DOM from the whitelist file (EDIT, under the lock) and, if METADATA, from its
    libvirt metadata too: that is written first (libvirt is never asked under our lock), the
    guest read back, and then one kernel change judged from both, so that no source left
    behind keeps the guest allowed.  If the file or kernel step fails, the metadata is put
    back as it was.  Returns the change (a line per source), the whitelist as written and
    the guest as read back."""
    written = None
    if metadata and dom is not None:
        written = hypervisor.write_allow(dom.uri or config.uris()[0], dom.uuid, None, config.libvirt_timeout)
        dom, running = written.domain, written.running
    shown: List[int] = []

    def counted(model: whitelist.Whitelist) -> List[whitelist.Effect]:
        effects = edit(model)
        shown.append(len(effects))
        return effects  # type: ignore[no-any-return]

    macs = (guests.nic_macs(dom) if dom is not None else []) + list(affected)
    try:
        journal = written is not None and written.written
        change, model = _write_and_apply(config, counted, [dom] if dom is not None and running else [], macs, journal)
    except PartialChange:
        raise
    except (SmtpGateError, OSError) as exc:
        if written is None or not written.written:
            raise
        _put_back_metadata(config, written, exc)
    if written is not None and dom is not None:
        if written.written:
            line = f"removed the allowance from the libvirt metadata of guest {dom.name!r} ({_scope_text(written.scopes)})"
        else:
            line = f"nothing to remove: the libvirt metadata of guest {dom.name!r} carries no allowance"
        change.lines.insert(shown[0] if shown else 0, line)
        still, warnings = _snapshot_notes(written, dom)
        change = change._replace(warnings=change.warnings + warnings, still_allowed=change.still_allowed + still)
    return change, model, dom


def add_mac(config: Config, mac: str, label: str, reason: str, user: str, when: datetime) -> Change:
    normal = validate.unicast_mac(mac)
    validate.one_line("label", label)  # before asking libvirt: a bad value is refused at once
    validate.one_line("reason", reason)
    listing = hypervisor.list_running(config.uris(), config.libvirt_timeout)
    running = [d for d in listing.domains if normal in guests.nic_macs(d)]
    warnings = []
    if not listing.reached:
        warnings.append("no hypervisor answered: the MAC is allowed when its guest next starts or at the next rebuild")
    already: List[str] = []

    def edit(model: whitelist.Whitelist) -> List[whitelist.Effect]:
        # asked before the row is added: a row that allowed the NIC already
        before = [
            note
            for d in running
            for note in _allowed_by(model, whitelist.Guest(d.name, d.uuid, (normal,)), "is already allowed by")
        ]
        effect = model.add_mac(normal, added_at=when, added_by=user, reason=reason, label=label)
        if effect.action == whitelist.ADDED:
            already.extend(before)
        return [effect]

    change, _model = _write_and_apply(config, edit, running, [])
    if listing.reached and not running:
        change.lines.append(f"no running guest has a NIC with MAC {normal}: it is allowed when that guest starts")
    master_of = discovery.master_of(discovery.read_links())
    unprotected = [
        nic for d in running for nic in exposure.unprotected_nics(d, config.bridges, master_of) if nic.mac == normal
    ]
    return change._replace(
        warnings=warnings + change.warnings + _unprotected_warnings(unprotected, "it"),
        notes=tuple(f"{note} (the new row changes nothing while that row stays)" for note in already),
    )


def del_mac(config: Config, mac: str) -> Change:
    """Remove the MAC's rows and revoke its allowances.  libvirt (asked first, without the
    lock) and the records tell which guests have that NIC, so that a NIC a whole-guest row
    still allows is named (exit 3) rather than reported as revoked by silence."""
    normal = validate.mac(mac)
    try:
        listed = hypervisor.list_all(config.uris(), config.libvirt_timeout)
    except SmtpGateError:
        listed = []  # no libvirt answered: the records still name the running guests
    concerned = {
        d.uuid: whitelist.Guest(d.name, d.uuid, (normal,)) for d, _running in listed if normal in guests.nic_macs(d)
    }
    for guest in _recorded_guests(list(RunState(config.run_dir).all_records().values()), [normal]):
        concerned.setdefault(guest.uuid, guest)
    change, model = _write_and_apply(config, lambda model: model.remove_mac(normal), [], [normal])
    still = [note for guest in concerned.values() for note in _allowed_by(model, guest, "is still allowed by")]
    return change._replace(still_allowed=tuple(still))


def ports_set(config: Config, value: str) -> Change:
    ranges = validate.port_list(value)
    text = validate.format_ports(ranges)
    with lock.command_lock(config.lock_path):
        try:
            with open(config.path, encoding="utf-8") as handle:
                current = handle.read()
        except FileNotFoundError:
            current = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {str(config.path)!r}: {exc}") from None
        before = _snapshot(config.path, "config file", ConfigError)
        updated, line = config_mod.with_value(current, config.path, "BLOCKED_PORTS", text)
        lines = []
        if updated != current:
            files.atomic_write(config.path, updated.encode("utf-8"), "config file", new_mode=0o644, error=ConfigError)
            lines.append(f"blocked ports set to {text} in {config.path} (line {line})")
        else:
            lines.append(f"blocked ports already {text} in {config.path} (line {line})")
        with _undo_on_failure(config.path, before, "config file", ConfigError) if updated != current else nullcontext():
            if nft.table_exists():
                nft.run_batch(
                    ruleset.Batch(
                        (
                            f"flush set {ruleset.T} blocked_ports",
                            f"add element {ruleset.T} blocked_ports {{ {', '.join(str(a) if a == b else f'{a}-{b}' for a, b in ranges)} }}",
                        )
                    )
                )
                lines.append(f"enforced at once: TCP {text} blocked for every guest that is not allowed")
            else:
                lines.append(allowances.not_in_force(config))
    return Change(lines, [])


class Row(NamedTuple):
    domain: Domain
    running: bool
    whitelisted: bool  # by the whitelist file
    unprotected: Tuple[exposure.Unprotected, ...] = ()  # as `status` and add-vm name them

    @property
    def allowed_by(self) -> str:
        """Which source allows the guest: what the picker's column shows, so that a toggle
        that removes one source does not look like it revoked the other."""
        sources = [s for s, on in (("file", self.whitelisted), ("metadata", self.domain.allow is not None)) if on]
        return "+".join(sources) or "no"


def picker_rows(config: Config) -> List[Row]:
    pairs = hypervisor.list_all(config.uris(), config.libvirt_timeout)
    model = whitelist.load(config.whitelist).index()
    links = discovery.read_links()
    index_of, master_of = discovery.index_of(links), discovery.master_of(links)
    rows = []
    for dom, running in pairs:
        verdict = guests.judge(dom, config.bridges, model.allowed_macs, index_of, master_of, running)
        unseen = exposure.unprotected_nics(dom, config.bridges, master_of) if running else []
        rows.append(Row(dom, running, bool(verdict.whitelisted), tuple(unseen)))
    return rows


def toggle(config: Config, row: Row, user: str, when: datetime) -> Change:
    """Allowed <-> blocked: a guest some source allows is revoked from every source that allows
    it (its whitelist rows, its MAC rows too, and its metadata), whatever ALLOW_STORE says; a
    blocked guest is allowed in ALLOW_STORE."""
    dom = row.domain
    if row.whitelisted or dom.allow is not None:
        macs = guests.nic_macs(dom)

        def edit(model: whitelist.Whitelist) -> List[whitelist.Effect]:
            effects = model.remove_guest(dom.name, dom.uuid, shown=dom.name)
            for mac in macs:
                effects += [e for e in model.remove_mac(mac) if e.changed]
            return [e for e in effects if e.changed] or effects

        change, model, after = _remove_everywhere(config, dom, row.running, edit, macs, True)
        after = after or dom
        still = _allowed_by(model, whitelist.Guest(after.name, after.uuid, tuple(macs)), "is still allowed by")
        return change._replace(still_allowed=tuple(still + _metadata_still_allows(after)))
    if config.allow_store == config_mod.STORE_METADATA:
        return allow_by_metadata(config, dom, row.running, "picker", user, when)
    running = [dom] if row.running else []
    key = whitelist.uuid_row(dom.uuid)  # bound to the UUID, as add-vm does
    change, _model = _write_and_apply(
        config,
        lambda model: [
            model.add_guest(key, added_at=when, added_by=user, reason="picker", uuid=dom.uuid, shown=dom.name)
        ],
        running,
        [],
    )
    return change._replace(warnings=change.warnings + allow_warnings(config, dom, row.running, row.unprotected))


def parse_selection(text: str, count: int) -> List[int]:
    """'1,3' or '2-4' or '1 3' -> zero-based indexes; a bad token names itself."""
    chosen: List[int] = []
    for token in text.replace(",", " ").split():
        first, _, last = token.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise SmtpGateError(f"bad selection {token!r}: expected numbers like 1,3 or a range like 2-4")
        a, b = int(first), int(last or first)
        if not (1 <= a <= b <= count):
            raise SmtpGateError(f"bad selection {token!r}: expected numbers between 1 and {count}")
        chosen.extend(range(a - 1, b))
    return list(dict.fromkeys(chosen))


def render_rows(rows: Sequence[Row]) -> str:
    out = [f"{'#':>3}  {'guest':<24} {'state':<9} {'allowed by':<13} MACs"]
    for n, row in enumerate(rows, start=1):
        macs = ", ".join(guests.nic_macs(row.domain)) or "-"
        out.append(
            f"{n:>3}  {row.domain.name:<24} {'running' if row.running else 'shut off':<9} "
            f"{row.allowed_by:<13} {macs}"
            + ("  UNPROTECTED" if row.unprotected else "")
        )
        out += [f"       {nic.line()}" for nic in row.unprotected]
    return "\n".join(out) + "\n"


class Listed(NamedTuple):
    rows: List[Dict[str, object]]  # the whitelist file's rows
    problems: List[str]  # file rows that allow nothing
    notes: List[str]
    metadata: List[Dict[str, object]]  # metadata_rows(): guests whose own definition allows them
    metadata_problems: List[str]  # one line per bad part of a metadata allowance
    unread: List[str] = []  # one line per guest whose XML could not be read: exit 3 (never mutated)
    unreachable: Dict[str, str] = {}  # libvirt URIs that did not answer -> why: their allowances are not shown
    drift: List[str] = []  # status.drift_warnings(): live and saved allowances differ


def list_rows(config: Config) -> Listed:
    """Each file row as stored, plus `source` ("file"), `bound` ("uuid", "name" or "mac")
    and `guest`: the name of the guest a whole-guest row allows (for a UUID row, from
    libvirt; None when libvirt does not know it or did not answer); and every guest's
    metadata allowance, running or defined (libvirt is asked once, for both)."""
    model = whitelist.load(config.whitelist)
    names: Dict[str, str] = {}
    notes: List[str] = []
    pairs: List[Tuple[Domain, bool]] = []
    unread: Dict[str, hypervisor.Unread] = {}
    unreachable: Dict[str, str] = {}
    drift: List[str] = []
    uuids = " and guest names of UUID rows" if any(e.bound == "uuid" for e in model.entries()) else ""
    try:
        pairs = hypervisor.list_all(config.uris(), config.libvirt_timeout, unread, unreachable)
        names = {**{u.uuid: u.name for u in unread.values()}, **{dom.uuid: dom.name for dom, _running in pairs}}
        drift = status.drift_warnings(config, pairs)
    except SmtpGateError as exc:
        notes.append(f"allowances in libvirt metadata{uuids} not shown: {exc}")
    else:
        notes += [f"allowances in libvirt metadata{uuids} of {uri} not shown: it did not answer ({why})"
                  for uri, why in unreachable.items()]
    rows = []
    for number, line in model.numbered():
        entry = line.entry
        if entry is None:
            continue
        guest: Optional[str] = None
        if entry.bound == "uuid":
            guest = names.get(whitelist.uuid_row(entry.vmname))
        elif entry.bound == "name":
            guest = entry.vmname
        rows.append({"line": number, **entry._asdict(), "source": "file", "bound": entry.bound, "guest": guest})
    metadata = metadata_rows(pairs)
    bad = [f"libvirt metadata of guest {r['guest']!r} ({r['uuid']}): {p}" for r in metadata for p in r["problems"]]  # type: ignore[union-attr]
    missed = [
        f"guest {u.name!r} ({u.uuid}) on {u.uri}, {'running' if u.running else 'shut off'}: its XML could not be read: "
        f"{u.why}; {u.metadata_text()}" for u in unread.values()
    ]
    return Listed(rows, [str(p) for p in model.problems()], notes, metadata, bad, missed, unreachable, drift)


# -- ALLOW_STORE="metadata": the allowance in the guest's own libvirt definition (issue 11) --


def _find(config: Config, name: str) -> Tuple[Domain, bool]:
    found = hypervisor.find(config.uris(), name, config.libvirt_timeout)
    if found is None:
        raise SmtpGateError(
            f"guest {name!r} not found in libvirt ({', '.join(config.uris())}): "
            "expected a name or UUID as `virsh list --all` shows it"
        )
    return found


def allow_element(by: str, at: str, reason: str, macs: Sequence[str] = (), uuid: str = "") -> str:
    """The <allow> element of the contract (README "Fleets"), without namespace: libvirt
    puts it in urn:smtp-gate:1.  Empty attributes are left out; MACS limit it to those NICs.
    UUID (the guest's own; our writers always give it) makes a copy of the definition, a
    clone's or a template's, allow nothing."""
    import xml.etree.ElementTree as ET  # here: only the metadata store needs it

    fields = (("by", by), ("at", at), ("reason", reason), ("uuid", uuid))
    element = ET.Element("allow", {k: v for k, v in fields if v})
    for mac in macs:
        ET.SubElement(element, "nic", {"mac": mac})
    return ET.tostring(element, encoding="unicode")


def describe_allow(allow: Allow) -> str:
    """An allowance's audit fields in one line, as list, status and the notes show them."""
    parts = [f"by {allow.by or '?'}", f"at {allow.at or '?'}"]
    if allow.reason:
        parts.append(f"reason {allow.reason!r}")
    if allow.macs is not None:
        parts.append(f"NICs {', '.join(allow.macs) or 'none usable'}")
    return validate.escape_controls(", ".join(parts))


def _scope_text(scopes: Sequence[str]) -> str:
    return {("live", "config"): "live and saved definition", ("live",): "live definition only: a transient guest",
            ("config",): "saved definition: the guest is shut off",
            ("config", "image"): "saved definition and managed save image: the guest is shut off and resumes from "
            "that image"}.get(tuple(scopes), "+".join(scopes))


_SCOPE_NAMES = {"live": "live definition", "config": "saved definition", "image": "managed save image"}


def _apply_guest(config: Config, written: hypervisor.AllowWrite, affected: Sequence[str]) -> Tuple[whitelist.Whitelist, List[str]]:
    """After the metadata was written and the guest read back (no lock held meanwhile, DESIGN
    §2): under the lock, its kernel change, judged from the file and its metadata together.
    If the kernel refuses (its batches are atomic: nothing changed there), the metadata is
    put back as it was, after the lock is released, so that exit 1 keeps its promise; if
    that fails too, a PartialChange says what is left."""
    dom = written.domain
    try:
        with lock.command_lock(config.lock_path):
            model = whitelist.load(config.whitelist)
            # journaled with the XML read back, as hooks journal theirs: a rebuild or a
            # watcher's round that asked libvirt before the write replays it instead of
            # putting back what the metadata said then
            return model, allowances.reconcile(config, model, [dom] if written.running else [], affected, journal=True)
    except PartialChange:
        raise
    except (SmtpGateError, OSError) as exc:  # OSError: the run directory's lock, which cli.py words itself
        if not written.written:
            raise
        _put_back_metadata(config, written, exc)


def _put_back_metadata(config: Config, written: hypervisor.AllowWrite, exc: BaseException) -> NoReturn:
    """EXC failed a command after its metadata write: put the metadata back as it was (no
    lock held) and raise what exit 1 (or 6, if that fails too) must say."""
    dom = written.domain
    try:
        hypervisor.put_back(dom.uri or config.uris()[0], dom.uuid, written.raw, config.libvirt_timeout)
    except SmtpGateError as back:
        raise PartialChange(
            f"{_one_line(exc)}; putting back the metadata of guest {dom.name!r} failed too ({back}): its metadata "
            "holds the change and the kernel does not; `smtp-gate rebuild` applies it, or undo it with `virsh metadata`"
        ) from None
    if isinstance(exc, OSError):
        raise exc
    raise SmtpGateError(f"{exc}; the metadata of guest {dom.name!r} was put back as it was") from None


def _metadata_still_allows(dom: Domain) -> List[str]:
    """One note per NIC of DOM its metadata allows: after a file revocation, exit 3."""
    if dom.allow is None:
        return []
    return [
        f"NIC {mac} of guest {dom.name!r} ({dom.uuid}) is still allowed by its libvirt metadata "
        f"({describe_allow(dom.allow)}); `smtp-gate del-vm {shlex.quote(dom.name)} --source metadata` (or the panel that set it) "
        "removes it"
        for mac in dom.allow.allows(guests.nic_macs(dom))
    ]


def allow_by_metadata(config: Config, dom: Domain, running: bool, reason: str, user: str, when: datetime) -> Change:
    """Allow every NIC of DOM by its metadata (by USER, at WHEN, REASON): written through
    libvirt first, the guest read back, then its kernel change under the lock."""
    uri = dom.uri or config.uris()[0]
    scopes, before = hypervisor.read_allow(uri, dom.uuid, config.libvirt_timeout)
    if all(_whole(before.get(scope)) for scope in scopes):
        # as the file's "already there": the allowance (and its who, when and why) is kept
        current = before[scopes[0]]
        kept = hypervisor.AllowWrite(dom, running, scopes, before, False)
        _model, applied = _apply_guest(config, kept, [])
        line = (f"guest {dom.name!r} (UUID {dom.uuid}, every NIC) is already allowed by its libvirt metadata "
                f"({describe_allow(current)}; {_scope_text(scopes)}): already there")  # type: ignore[arg-type]
        return Change([line] + applied, [])
    element = allow_element(user, when.isoformat(timespec="seconds"), reason, uuid=dom.uuid)
    result = hypervisor.write_allow(uri, dom.uuid, element, config.libvirt_timeout)
    after = result.domain
    lines = [f"allowed guest {after.name!r} (UUID {after.uuid}, every NIC) in its libvirt metadata ({_scope_text(result.scopes)})"]
    notes = [
        f"it replaces the allowance its {_SCOPE_NAMES.get(scope, scope)} carried ({describe_allow(old)})"
        for scope, old in result.before.items()
        if old is not None and scope in result.scopes
    ]
    _model, applied = _apply_guest(config, result, [])
    lines += applied
    if not result.running:
        lines.append(f"guest {after.name!r} is not running: its NICs are allowed when it starts")
    unprotected = guest_unprotected(config, after, result.running)
    warnings = allow_warnings(config, after, result.running, unprotected, "the allowance")
    return Change(lines, warnings, tuple(notes))


def _snapshot_notes(result: hypervisor.AllowWrite, after: Domain) -> Tuple[Tuple[str, ...], List[str]]:
    """(notes, warnings) about the snapshots of AFTER whose definition still carries an
    allowance that RESULT removed: libvirt restores a snapshot's metadata on revert."""
    notes = tuple(
        f"snapshot {name!r} of guest {after.name!r} still carries an allowance in its saved definition: reverting to it "
        f"(`virsh snapshot-revert`) brings the allowance back; delete the snapshot (`virsh snapshot-delete {after.name} "
        f"{name}`) or redefine it without the allowance (`virsh snapshot-dumpxml`, edit, `virsh snapshot-create "
        "--redefine`)"
        for name in result.snapshots
    )
    warnings = []
    if result.snapshots_unknown:
        warnings.append(
            f"the snapshots of guest {after.name!r} could not be checked ({result.snapshots_unknown}): reverting to one "
            "taken while it was allowed brings the allowance back"
        )
    return notes, warnings


def revoke_by_metadata(config: Config, dom: Domain, running: bool) -> Change:
    """Remove DOM's metadata allowance and revoke what it allowed; a NIC the whitelist file
    still allows is named (exit 3), as del-vm does for the file's other rows."""
    result = hypervisor.write_allow(dom.uri or config.uris()[0], dom.uuid, None, config.libvirt_timeout)
    after = result.domain
    if result.written:
        lines = [f"removed the allowance from the libvirt metadata of guest {after.name!r} ({_scope_text(result.scopes)})"]
    else:
        lines = [f"nothing to remove: the libvirt metadata of guest {after.name!r} carries no allowance"]
    macs = guests.nic_macs(after)
    model, applied = _apply_guest(config, result, macs)
    still = _allowed_by(model, whitelist.Guest(after.name, after.uuid, tuple(macs)), "is still allowed by the whitelist file's")
    snapshots, warnings = _snapshot_notes(result, after)
    still += snapshots
    return Change(lines + applied, warnings, (), tuple(still))


def revoke_unread(config: Config, guest: hypervisor.Unread) -> Change:
    """del-vm (ALLOW_STORE=metadata) of a guest whose domain XML cannot be read: its
    allowance is removed with the metadata calls alone (hypervisor.remove_allow_unread),
    then revoked in the kernel for the MACs its record holds (its NICs cannot be read),
    unless the whitelist file still allows them."""
    result = hypervisor.remove_allow_unread(guest.uri, guest.uuid, config.libvirt_timeout)
    record = RunState(config.run_dir).read_record(guest.uuid)
    macs = list(dict.fromkeys(mac for _index, mac in record.allowed)) if record is not None else []
    if result.written:
        lines = [f"removed the allowance from the libvirt metadata of guest {guest.name!r} ({_scope_text(result.scopes)})"]
    else:
        lines = [f"nothing to remove: the libvirt metadata of guest {guest.name!r} carries no allowance"]
    model, applied = _apply_guest(config, result, macs)
    warnings = [
        f"guest {guest.name!r} ({guest.uuid}): its XML could not be read ({guest.why}): its metadata was changed "
        "through the metadata calls alone, and the kernel follows "
        + ("what its record held" if record is not None else "nothing: no record of it here names its NICs")
    ]
    still = _allowed_by(model, whitelist.Guest(guest.name, guest.uuid, tuple(macs)), "is still allowed by the whitelist file's")
    return Change(lines + applied, warnings, (), tuple(still))


LIVE_SCOPE, CONFIG_SCOPE = hypervisor.LIVE, hypervisor.CONFIG


class Export(NamedTuple):
    lines: List[str]  # one per guest: what was (or would be) written
    skipped: List[str]  # one per row that cannot be exported: exit 3
    notes: List[str]


def export_metadata(config: Config, dry_run: bool, user: str, when: datetime, replace: bool = False) -> Export:
    """Write each whitelist-file row that names a guest (by UUID or name) into that guest's
    metadata, one write per guest, with the row's own audit fields (so the record of who
    allowed it and why travels with the guest).  The file is never changed, and the kernel
    needs no change: the file still allows those guests here.  MAC rows name no guest and
    rows whose guest libvirt does not know are reported, not exported.  A guest whose metadata
    already allows it (a panel's allowance, perhaps narrower on purpose) is left as it is,
    unless REPLACE."""
    model = whitelist.load(config.whitelist)
    pairs = hypervisor.list_all(config.uris(), config.libvirt_timeout)  # raises if no URI answered
    by_uuid = {dom.uuid: dom for dom, _running in pairs}
    by_name: Dict[str, List[Domain]] = {}
    for dom, _running in pairs:
        by_name.setdefault(dom.name, []).append(dom)
    wanted: Dict[str, Tuple[Domain, int, whitelist.Entry]] = {}  # uuid -> (guest, first line, its row)
    skipped: List[str] = []
    for number, line in model.numbered():
        entry = line.entry
        if entry is None:
            continue
        if entry.bound == "mac":
            skipped.append(
                f"line {number}: {entry.describe()} is not exported: a MAC row names no guest (it stays in the file; "
                "`smtp-gate add-vm NAME --store metadata` the guest, or set <nic mac> in its metadata, to make it follow the guest)"
            )
            continue
        if entry.bound == "uuid":
            found = [by_uuid[u] for u in [whitelist.uuid_row(entry.vmname)] if u in by_uuid]
        else:
            found = by_name.get(entry.vmname, [])
        if len(found) != 1:
            why = "libvirt does not know it" if not found else f"{len(found)} guests have that name"
            skipped.append(f"line {number}: {entry.describe()} is not exported: {why} ({', '.join(config.uris())})")
            continue
        wanted.setdefault(found[0].uuid, (found[0], number, entry))
    lines: List[str] = []
    done: List[str] = []  # guests written, for the message if a later write fails
    for dom, number, entry in wanted.values():
        uri = dom.uri or config.uris()[0]
        try:
            scopes, before = hypervisor.read_allow(uri, dom.uuid, config.libvirt_timeout)
        except SmtpGateError as exc:
            if not done:
                raise
            raise PartialChange(f"{exc}; written before it: {', '.join(map(repr, done))} (run export-metadata again)") from None
        current = next((before[scope] for scope in scopes if before.get(scope) is not None), None)
        if current is not None and not replace:
            lines.append(f"guest {dom.name!r} (line {number}): already allowed by its metadata ({_held_text(scopes, before)}): "
                         "kept (`--replace` writes the row's allowance over it)")
            continue
        at = entry.added_at if _iso(entry.added_at) else when.isoformat(timespec="seconds")
        element = allow_element(entry.added_by or user, at, entry.reason, uuid=dom.uuid)
        replaced = f", replacing ({describe_allow(current)})" if current is not None else ""
        if dry_run:
            lines.append(
                f"guest {dom.name!r} (line {number}): would write <allow by={entry.added_by or user!r} at={at!r} "
                f"reason={entry.reason!r} uuid={dom.uuid!r}/> into its {_scope_text(scopes)}{replaced}"
            )
            continue
        try:
            result = hypervisor.write_allow(uri, dom.uuid, element, config.libvirt_timeout)
        except SmtpGateError as exc:
            if not done:
                raise
            raise PartialChange(
                f"{exc}; written before it: {', '.join(map(repr, done))} (run export-metadata again: it keeps "
                "what is already there)"
            ) from None
        done.append(dom.name)
        lines.append(f"guest {dom.name!r} (line {number}): wrote its allowance into its {_scope_text(result.scopes)}{replaced}")
        if result.running:  # the file allows it already: journaled only, for a rebuild racing this write
            lines += _apply_guest(config, result, [])[1]
    notes = []
    if wanted:  # there is a file row to remove later: say how, and only what is true
        done_text = "nothing was written (dry run)" if dry_run else (
            "each guest written is now allowed by both" if done else "no guest's metadata was written")
        notes.append(
            f"the whitelist file {config.whitelist} was not changed: {done_text}; once `smtp-gate list` shows each "
            "guest's metadata allowance, remove its file rows with `smtp-gate del-vm NAME --source file` or by "
            "editing the file"
        )
    return Export(lines, skipped, notes)


def _held_text(scopes: Sequence[str], before: Dict[str, Optional[Allow]]) -> str:
    """The allowance each definition carries, in one phrase: one description when they agree."""
    held = [before.get(scope) for scope in scopes]
    if all(allow == held[0] for allow in held):
        return f"{describe_allow(held[0])}; {_scope_text(scopes)}" if held[0] else _scope_text(scopes)
    names = {LIVE_SCOPE: "live definition", CONFIG_SCOPE: "saved definition"}
    return "; ".join(f"{names.get(s, s)}: {describe_allow(a) if a else 'none'}" for s, a in zip(scopes, held))


def _whole(allow: Optional[Allow]) -> bool:
    """An allowance of every NIC with no bad part: what exporting a whole-guest row would write."""
    return allow is not None and allow.macs is None and not allow.problems


def _iso(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def metadata_rows(pairs: Sequence[Tuple[Domain, bool]]) -> List[Dict[str, object]]:
    """One row per guest whose metadata carries an allowance, running or not, for `list`."""
    rows: List[Dict[str, object]] = []
    for dom, running in pairs:
        allow = dom.allow
        if allow is None:
            continue
        rows.append({
            "source": "metadata", "guest": dom.name, "uuid": dom.uuid, "uri": dom.uri,
            "state": "running" if running else "shut off", "by": allow.by, "at": allow.at, "reason": allow.reason,
            "macs": list(allow.macs) if allow.macs is not None else None,
            "allows": list(allow.allows(guests.nic_macs(dom))), "problems": list(allow.problems),
        })
    return rows
