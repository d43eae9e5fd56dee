"""The operator's whitelist commands: add-vm, del-vm, add-mac, del-mac, list, ports-set and
the interactive picker.  Each change is a read-modify-write of the whitelist under the
lock, then an element change in the kernel: it takes effect at once on running guests.

libvirt is always asked before the lock is taken, never while it is held (DESIGN §2).
"""

import getpass
import os
from datetime import datetime
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from smtp_gate import allowances, config as config_mod, files, guests, hypervisor, lock, nft, ruleset, validate, whitelist
from smtp_gate.config import Config
from smtp_gate.domain import Domain, normalise_uuid
from smtp_gate.errors import ConfigError, SmtpGateError
from smtp_gate.runstate import RunState


class Change(NamedTuple):
    lines: List[str]  # one `ok: ...` line each
    warnings: List[str]


def invoking_user(environ: Optional[Dict[str, str]] = None) -> str:
    """The operator behind the command: SUDO_USER when run through sudo."""
    env = os.environ if environ is None else environ
    return env.get("SUDO_USER") or getpass.getuser()


def now() -> datetime:
    return datetime.now().astimezone()


def _protected_candidates(config: Config, dom: Domain) -> List[str]:
    """Why each NIC of DOM can or cannot be allowed; empty list of 'can' means refuse."""
    usable = []
    for nic in dom.nics:
        if not nic.bridge_visible:
            continue
        if nic.bridge in config.bridges or (nic.bridge is None and nic.type == "network"):
            usable.append(nic.mac or "?")
    return usable


def _describe_nics(dom: Domain) -> str:
    parts = []
    for nic in dom.nics:
        where = nic.bridge or nic.network or "-"
        reason = nic.unprotected_reason
        parts.append(f"{nic.mac or 'no MAC'} ({nic.type} {where}{'; ' + reason if reason else ''})")
    return "; ".join(parts) or "none"


def _write_and_apply(
    config: Config, edit, running: Sequence[Domain], affected: Sequence[str]  # type: ignore[no-untyped-def]
) -> Change:
    """Under the lock: load, EDIT (returns effects), write if changed, reconcile the kernel."""
    with lock.command_lock(config.lock_path):
        model = whitelist.load(config.whitelist)
        effects = edit(model)
        if any(e.changed for e in effects):
            whitelist.write(config.whitelist, model)
        lines = [str(e) for e in effects]
        warnings = [f"whitelist {config.whitelist}: {p} (row kept, allows nothing)" for p in model.problems()]
        lines += allowances.reconcile(config, model, running, affected)
    return Change(lines, warnings)


def add_vm(config: Config, name: str, reason: str, user: str, when: datetime) -> Change:
    found = hypervisor.find(config.uris(), name)
    if found is None:
        raise SmtpGateError(
            f"guest {name!r} not found in libvirt ({', '.join(config.uris())}): "
            "expected a name or UUID as `virsh list --all` shows it"
        )
    dom, running = found
    if not _protected_candidates(config, dom):
        raise SmtpGateError(
            f"guest {dom.name!r} has no NIC on a protected bridge ({', '.join(config.bridges)}), "
            f"so there is nothing to allow: its NICs: {_describe_nics(dom)}"
        )
    change = _write_and_apply(
        config,
        lambda model: [model.add_guest(dom.name, added_at=when, added_by=user, reason=reason, uuid=dom.uuid)],
        [dom] if running else [],
        [],
    )
    if not running:
        change.lines.append(f"guest {dom.name!r} is not running: its NICs are allowed when it starts")
    return change


def del_vm(config: Config, name: str) -> Change:
    warnings: List[str] = []
    try:
        found = hypervisor.find(config.uris(), name)
    except SmtpGateError as exc:
        found = None
        warnings.append(f"{exc}; removing the whitelist rows named {name!r} anyway")
    dom = found[0] if found else None
    key = dom.name if dom else name
    uuid = dom.uuid if dom else (normalise_uuid(name) or "")
    recorded = [
        mac
        for record in RunState(config.run_dir).all_records().values()
        if record.name == key or record.uuid == uuid
        for _index, mac in record.allowed
    ]
    change = _write_and_apply(
        config,
        lambda model: model.remove_guest(key, uuid),
        [dom] if found and found[1] else [],
        (guests.nic_macs(dom) if dom else []) + recorded,
    )
    return Change(change.lines, warnings + change.warnings)


def add_mac(config: Config, mac: str, label: str, reason: str, user: str, when: datetime) -> Change:
    normal = validate.unicast_mac(mac)
    listing = hypervisor.list_running(config.uris())
    running = [d for d in listing.domains if normal in guests.nic_macs(d)]
    warnings = []
    if not listing.reached:
        warnings.append("no hypervisor answered: the MAC is allowed when its guest next starts or at the next rebuild")
    change = _write_and_apply(
        config,
        lambda model: [model.add_mac(normal, added_at=when, added_by=user, reason=reason, label=label)],
        running,
        [],
    )
    if listing.reached and not running:
        change.lines.append(f"no running guest has a NIC with MAC {normal}: it is allowed when that guest starts")
    return Change(change.lines, warnings + change.warnings)


def del_mac(config: Config, mac: str) -> Change:
    normal = validate.mac(mac)
    return _write_and_apply(config, lambda model: model.remove_mac(normal), [], [normal])


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
        updated, line = config_mod.with_value(current, config.path, "BLOCKED_PORTS", text)
        lines = []
        if updated != current:
            files.atomic_write(config.path, updated.encode("utf-8"), "config file", new_mode=0o644, error=ConfigError)
            lines.append(f"blocked ports set to {text} in {config.path} (line {line})")
        else:
            lines.append(f"blocked ports already {text} in {config.path} (line {line})")
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
            lines.append("enforcement is not active: run `smtp-gate apply`")
    return Change(lines, [])


class Row(NamedTuple):
    domain: Domain
    running: bool
    whitelisted: bool


def picker_rows(config: Config) -> List[Row]:
    pairs = hypervisor.list_all(config.uris())
    model = whitelist.load(config.whitelist).index()
    rows = []
    for dom, running in pairs:
        macs = tuple(guests.nic_macs(dom))
        allowed = model.allowed_macs(whitelist.Guest(dom.name, dom.uuid, macs))
        rows.append(Row(dom, running, bool(allowed)))
    return rows


def toggle(config: Config, row: Row, user: str, when: datetime) -> Change:
    """Whitelist a guest that is not, or remove every row that allows it (its MAC rows too)."""
    dom = row.domain
    running = [dom] if row.running else []
    if row.whitelisted:
        macs = guests.nic_macs(dom)

        def edit(model: whitelist.Whitelist) -> List[whitelist.Effect]:
            effects = model.remove_guest(dom.name, dom.uuid)
            for mac in macs:
                effects += [e for e in model.remove_mac(mac) if e.changed]
            return [e for e in effects if e.changed] or effects

        return _write_and_apply(config, edit, running, macs)
    return _write_and_apply(
        config,
        lambda model: [model.add_guest(dom.name, added_at=when, added_by=user, reason="picker", uuid=dom.uuid)],
        running,
        [],
    )


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
        )
    return "\n".join(out) + "\n"


def list_rows(config: Config) -> Tuple[List[Dict[str, object]], List[str]]:
    model = whitelist.load(config.whitelist)
    rows = []
    for number, line in model.numbered():
        if line.entry is not None:
            rows.append({"line": number, **line.entry._asdict()})
    return rows, [str(p) for p in model.problems()]
