"""The operator's whitelist commands: add-vm, del-vm, add-mac, del-mac, list, ports-set and
the interactive picker.  Each change is a read-modify-write of the whitelist under the
lock, then an element change in the kernel: it takes effect at once on running guests.

libvirt is always asked before the lock is taken, never while it is held (DESIGN §2).
"""

import getpass
import os
from contextlib import contextmanager, nullcontext
from datetime import datetime
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Type

from smtp_gate import (
    allowances,
    config as config_mod,
    discovery,
    exposure,
    files,
    guests,
    hypervisor,
    lock,
    nft,
    ruleset,
    validate,
    whitelist,
)
from smtp_gate.config import Config
from smtp_gate.domain import Domain, normalise_uuid
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
    config: Config, dom: Domain, running: bool, unprotected: Sequence[exposure.Unprotected]
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
            f"guest {dom.name!r} has no NIC on a protected bridge ({', '.join(config.bridges)}): the row allows "
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
    config: Config, edit, running: Sequence[Domain], affected: Sequence[str]  # type: ignore[no-untyped-def]
) -> Tuple[Change, whitelist.Whitelist]:
    """Under the lock: load, EDIT (returns effects), write if changed, reconcile the kernel;
    if the kernel change fails, the whitelist is put back as it was.  Returns the change
    and the whitelist as written, for what the caller must say about the rows left."""
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
            lines += allowances.reconcile(config, model, running, affected)
    return Change(lines, warnings), model


def add_vm(config: Config, name: str, reason: str, user: str, when: datetime) -> Change:
    """Whitelist the guest NAME (a name or a UUID) by a row bound to its UUID: control panels
    reuse names, and a later guest given this name must not inherit the allowance."""
    validate.one_line("reason", reason)  # before asking libvirt: a bad value is refused at once
    found = hypervisor.find(config.uris(), name, config.libvirt_timeout)
    if found is None:
        raise SmtpGateError(
            f"guest {name!r} not found in libvirt ({', '.join(config.uris())}): "
            "expected a name or UUID as `virsh list --all` shows it"
        )
    dom, running = found
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
        warnings=change.warnings + allow_warnings(config, dom, running, guest_unprotected(config, dom, running))
    )


def del_vm(config: Config, name: str) -> Change:
    """Remove the guest's rows, bound to its name or to its UUID, and revoke its allowances.

    libvirt tells a name's UUID and a UUID's name.  For a guest libvirt no longer knows,
    the records its start hooks left give the UUIDs that ran under NAME.
    """
    warnings: List[str] = []
    try:
        found = hypervisor.find(config.uris(), name, config.libvirt_timeout)
    except SmtpGateError as exc:
        found = None
        warnings.append(f"{exc}; removing the whitelist rows of {name!r} anyway")
    dom = found[0] if found else None
    key = dom.name if dom else name
    records = list(RunState(config.run_dir).all_records().values())
    if dom is not None:
        uuids = [dom.uuid]
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

    change, model = _write_and_apply(
        config,
        edit,
        [dom] if found and found[1] else [],
        (guests.nic_macs(dom) if dom else []) + recorded,
    )
    if dom is not None:
        concerned = [whitelist.Guest(dom.name, dom.uuid, tuple(guests.nic_macs(dom)))]
    else:
        concerned = _recorded_guests([r for r in records if r.uuid in uuids or r.name == key])
    still = [note for guest in concerned for note in _allowed_by(model, guest, "is still allowed by")]
    return change._replace(warnings=warnings + change.warnings, still_allowed=tuple(still))


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
    whitelisted: bool
    unprotected: Tuple[exposure.Unprotected, ...] = ()  # as `status` and add-vm name them


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
    """Whitelist a guest that is not, or remove every row that allows it (its MAC rows too)."""
    dom = row.domain
    running = [dom] if row.running else []
    if row.whitelisted:
        macs = guests.nic_macs(dom)

        def edit(model: whitelist.Whitelist) -> List[whitelist.Effect]:
            effects = model.remove_guest(dom.name, dom.uuid, shown=dom.name)
            for mac in macs:
                effects += [e for e in model.remove_mac(mac) if e.changed]
            return [e for e in effects if e.changed] or effects

        change, model = _write_and_apply(config, edit, running, macs)
        still = _allowed_by(model, whitelist.Guest(dom.name, dom.uuid, tuple(macs)), "is still allowed by")
        return change._replace(still_allowed=tuple(still))
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
    out = [f"{'#':>3}  {'guest':<24} {'state':<9} {'whitelisted':<11} MACs"]
    for n, row in enumerate(rows, start=1):
        macs = ", ".join(guests.nic_macs(row.domain)) or "-"
        out.append(
            f"{n:>3}  {row.domain.name:<24} {'running' if row.running else 'shut off':<9} "
            f"{'yes' if row.whitelisted else 'no':<11} {macs}"
            + ("  UNPROTECTED" if row.unprotected else "")
        )
        out += [f"       {nic.line()}" for nic in row.unprotected]
    return "\n".join(out) + "\n"


def list_rows(config: Config) -> Tuple[List[Dict[str, object]], List[str], List[str]]:
    """(rows, problems, notes).  Each row as stored, plus `bound` ("uuid", "name" or "mac")
    and `guest`: the name of the guest a whole-guest row allows (for a UUID row, from
    libvirt; None when libvirt does not know it or did not answer)."""
    model = whitelist.load(config.whitelist)
    names: Dict[str, str] = {}
    notes: List[str] = []
    if any(entry.bound == "uuid" for entry in model.entries()):
        try:
            names = {dom.uuid: dom.name for dom, _running in hypervisor.list_all(config.uris(), config.libvirt_timeout)}
        except SmtpGateError as exc:
            notes.append(f"guest names of UUID rows not shown: {exc}")
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
        rows.append({"line": number, **entry._asdict(), "bound": entry.bound, "guest": guest})
    return rows, [str(p) for p in model.problems()], notes
