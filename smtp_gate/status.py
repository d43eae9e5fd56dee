"""What the kernel enforces right now, as data, and its text and JSON renderings."""

import shlex
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Set, Tuple

from smtp_gate import discovery, guests as guests_mod, nft, offswitch, ruleset, validate, whitelist
from smtp_gate.config import Config
from smtp_gate.discovery import Link
from smtp_gate.errors import SmtpGateError

if TYPE_CHECKING:
    from smtp_gate.domain import Domain


@dataclass
class Attempts:
    port: str
    mac: str
    packets: int


@dataclass
class Report:
    active: bool
    mode: str
    bridges: List[Dict[str, object]] = field(default_factory=list)
    uplinks: List[str] = field(default_factory=list)
    guest_ports: List[str] = field(default_factory=list)  # from the kernel's guest_ifaces
    foreign_ports: List[str] = field(default_factory=list)  # ports of bridges we do not protect
    blocked_ports: str = ""
    relays: List[str] = field(default_factory=list)  # ALLOWED_DESTINATIONS as the kernel holds them
    non_ip: str = "drop"  # what the kernel's nonip chain does
    allowed: List[Dict[str, str]] = field(default_factory=list)
    counters: Dict[str, int] = field(default_factory=dict)
    attempts: List[Attempts] = field(default_factory=list)
    port_attempts: Dict[str, int] = field(default_factory=dict)  # port (name, or #index when gone) -> packets
    warnings: List[str] = field(default_factory=list)  # the operator must act: exit code 3
    notes: List[str] = field(default_factory=list)  # worth knowing, nothing to fix
    # filled by callers that know about guests and the whitelist
    guests: List[Dict[str, object]] = field(default_factory=list)
    # running guest NICs no rule sees (exposure.Unprotected.to_json); any of them: exit code 3
    unprotected: List[Dict[str, object]] = field(default_factory=list)
    # guests whose domain XML could not be read (hypervisor.Unread): name, uuid, uri, why, metadata; exit code 3
    unread: List[Dict[str, object]] = field(default_factory=list)
    # the operator's off-switch (`smtp-gate disable`): path, by, at, reason; exit code 5
    disabled: Optional[Dict[str, str]] = None

    def to_json(self) -> Dict[str, object]:
        return asdict(self)


def _ports_text(values: List[object]) -> str:
    ranges = []
    for value in values:
        if isinstance(value, tuple):
            ranges.append((int(value[0]), int(value[1])))
        else:
            ranges.append((int(value), int(value)))  # type: ignore[arg-type]
    return validate.format_ports(sorted(ranges))


def _port_names(values: List[object], names_by_index: Dict[int, str]) -> List[str]:
    """An iface_index set's elements as names: nft lists a device that exists by its name,
    and one that is gone by its number."""
    out = []
    for value in values:
        text = str(value)
        out.append(f"#{text} (gone)" if text.isdigit() and int(text) not in names_by_index else text)
    return sorted(out)


def _relay_text(value: object) -> str:
    """A relay4/relay6 element as nft JSON gives it: (address or {prefix}, port or {range})."""
    if not (isinstance(value, tuple) and len(value) == 2):
        return str(value)
    address, port = value
    if isinstance(address, dict) and "prefix" in address:
        address = f"{address['prefix']['addr']}/{address['prefix']['len']}"
    if isinstance(port, dict) and "range" in port:
        first, last = port["range"]
        port = "any port" if (first, last) == validate.ANY_PORT else f"ports {first}-{last}"
    else:
        port = f"port {port}"
    return f"{address} {port}"


def read(config: Config, links: Optional[Dict[str, Link]] = None) -> Report:
    """The kernel's table compared with the configuration; warnings for what the operator must fix."""
    off = offswitch.read(config.disabled_path)
    disabled = off.to_json() if off is not None else None
    links = discovery.read_links() if links is None else links
    table = nft.read_table()
    if table is None:
        fix = "`smtp-gate enable` turns it back on" if off else "run `smtp-gate apply`"
        return Report(
            active=False,
            mode=config.mode,
            warnings=[f"enforcement is not active: table {ruleset.T} does not exist ({fix})"],
            disabled=disabled,
        )
    names_by_index = {l.ifindex: l.name for l in links.values()}
    uplinks = sorted(str(v) for v in table.elements.get("uplinks", []))
    guest_ports = _port_names(table.elements.get("guest_ifaces", []), names_by_index)
    plan = discovery.plan_ports(config, links, guest_ports)
    report = Report(
        active=True,
        mode="audit" if _audit(table) else "enforce",
        non_ip="accept" if any(expr == [{"accept": None}] for expr in table.chains.get("nonip", [])) else "drop",
        uplinks=uplinks,
        guest_ports=guest_ports,
        foreign_ports=_port_names(table.elements.get("foreign_ifaces", []), names_by_index),
        blocked_ports=_ports_text(table.elements.get("blocked_ports", [])),
        relays=[_relay_text(v) for v in (*table.elements.get("relay4", []), *table.elements.get("relay6", []))],
        counters={name: table.counters.get(name, (0, 0))[0] for name in ruleset.COUNTERS},
        warnings=list(plan.warnings),
        disabled=disabled,
    )
    if off is not None:
        report.warnings.append(
            f"{off.describe()}, yet table {ruleset.T} exists: something other than smtp-gate installed it; "
            "`smtp-gate disable` removes it again, `smtp-gate enable` makes it smtp-gate's"
        )
    for bridge in plan.bridges:
        report.bridges.append(
            {
                "name": bridge.name,
                "exists": bridge.exists,
                "ports": list(bridge.ports),
                "uplinks": [u for u in bridge.ports if u in uplinks],
            }
        )
        missing = [u for u in bridge.uplinks if u not in uplinks]
        if missing:
            report.warnings.append(
                f"bridge {bridge.name!r}: uplink(s) {', '.join(missing)} found now but not in the kernel's table: "
                "run `smtp-gate rebuild`"
            )
    for value in table.elements.get("allowed", []):
        if isinstance(value, tuple) and len(value) == 2:
            port = str(value[0])
            gone = port.isdigit() and int(port) not in names_by_index
            report.allowed.append({"port": f"#{port} (gone)" if gone else port, "mac": str(value[1])})
    per_port = table.sets.get(ruleset.PORT_ATTEMPTS_SET)
    if per_port is not None:
        report.port_attempts = nft.port_counters(per_port)
    attempts = table.sets.get(ruleset.ATTEMPTS_SET)
    if attempts is not None:
        report.attempts = [Attempts(p, m, n) for p, m, n, _b in nft.attempt_counters(attempts)]
        if len(report.attempts) >= ruleset.ATTEMPTS_SIZE:
            report.warnings.append(
                f"the per-guest attempts set is full ({ruleset.ATTEMPTS_SIZE} entries, likely MAC spoofing): "
                "new sources are still blocked, and are counted per guest again as entries expire (a day after their last attempt)"
            )
    for name in report.foreign_ports:
        link = links.get(name)
        if link is not None and link.master in config.bridges:
            report.warnings.append(
                f"{name} is now a port of protected bridge {link.master!r} but still left alone as a port of "
                "an unprotected bridge: run `smtp-gate rebuild`"
            )
    # a whitelist row that cannot be used allows nothing: whoever wrote it meant to allow a guest
    try:
        report.warnings += [f"{config.whitelist}: {problem}" for problem in whitelist.load(config.whitelist).problems()]
    except SmtpGateError as exc:
        report.warnings.append(f"the whitelist cannot be read: {exc}")
    if config.non_ip == "accept":
        report.warnings.append(
            'NON_IP="accept": non-IP frames from guests (QinQ double tags, PPPoE, ...) leave unfiltered, '
            "and can carry mail past every check"
        )
    if report.mode != config.mode:
        report.warnings.append(f"the kernel runs in {report.mode} mode but the config says {config.mode}: run `smtp-gate apply`")
    return report


def add_guests(report: Report, config: Config, links: Optional[Dict[str, Link]] = None) -> None:
    """Whitelisted guests (running or not, their ports, whether the kernel holds their
    allowance, their blocked attempts) and every running guest NIC no rule sees (UNPROTECTED,
    exposure.py).  Asks libvirt (no lock held); if no hypervisor answers, says so instead,
    and that UNPROTECTED NICs could not be checked."""
    from smtp_gate import exposure, hypervisor, whitelist
    from smtp_gate.errors import SmtpGateError

    links = discovery.read_links() if links is None else links
    unread: Dict[str, hypervisor.Unread] = {}
    try:
        pairs = hypervisor.list_all(config.uris(), config.libvirt_timeout, unread)
    except SmtpGateError as exc:
        report.notes.append(f"guests not shown, and UNPROTECTED NICs could not be checked: {exc}")
        return
    for guest in unread.values():
        # named, never dropped: its NICs, and whether they are protected, cannot be told
        report.unread.append({**guest._asdict(), "allow": None if guest.allow is None else guest.allow._asdict()})
        report.warnings.append(
            f"guest {guest.name!r} ({guest.uuid}) on {guest.uri}, {'running' if guest.running else 'shut off'}: "
            f"its XML could not be read: {guest.why}; {guest.metadata_text()}; its NICs cannot be shown "
            "(a rebuild keeps its recorded ports, and only the allowance a source still grants)"
        )
    model = whitelist.load(config.whitelist).index()
    held = {(a["port"], a["mac"]) for a in report.allowed}
    index_of, master_of = discovery.index_of(links), discovery.master_of(links)
    accounted: Set[Tuple[str, str]] = set()  # (port, MAC) the allowed guests account for
    seen_ports: Set[str] = set()  # ports of the running guests libvirt showed: what can be judged
    for dom, running in pairs:
        if running:
            seen_ports.update(nic.target for nic in dom.nics if nic.target)
        verdict = guests_mod.judge(dom, config.bridges, model.allowed_macs, index_of, master_of, running)
        allowed = verdict.allowed_macs
        if running:
            report.unprotected += [u.to_json() for u in exposure.unprotected_nics(dom, config.bridges, master_of)]
        meta = dom.allow
        if meta is not None:
            # a bad part allows nothing: whoever set it meant to allow the guest, or that NIC
            report.warnings += [
                f"the libvirt metadata allowance of guest {dom.name!r} ({dom.uuid}): {p} (that part allows nothing)"
                for p in meta.problems
            ]
        if not allowed and meta is None:
            continue
        filtered = [n for n in dom.nics if exposure.on_protected_bridge(n, config.bridges, master_of)]
        expected = [(v.nic.target, v.nic.mac) for v in verdict.nics if v.state == guests_mod.ALLOWED]
        if running:
            accounted.update(expected)
        held_all = all(pair in held for pair in expected)
        if not running:
            state = "-"
        elif not filtered:
            # nothing of ours sees this guest: "yes" would claim a protection that is not there
            state = "no NIC on a protected bridge"
        elif not expected:
            state = "no allowed NIC on a protected bridge"
        else:
            state = "yes" if held_all else "NO"
        report.guests.append(
            {
                "name": dom.name,
                "uuid": dom.uuid,
                "state": "running" if running else "shut off",
                "ports": ", ".join(str(port) for port, _mac in expected) or "-",
                "allowed_macs": list(allowed),
                "held": state,
                # per port: whatever MACs the guest sent from (spoofing them hides nothing)
                "attempts": sum(report.port_attempts.get(n.target, 0) for n in dom.nics if n.target and running),
                "allowances": _allowances(verdict),
            }
        )
        if running and not held_all:
            report.warnings.append(
                f"whitelisted guest {dom.name!r} runs but the kernel does not hold its allowance: run `smtp-gate rebuild`"
            )
    # the other way round: an allowance the kernel holds on a running guest's port that no
    # source grants (its metadata removed with no watcher running, a row edited out by hand)
    # lets that NIC send mail; a port of a guest libvirt did not show is not judged here
    for port, mac in sorted(held - accounted):
        if port in seen_ports:
            owner = next((d.name for d, r in pairs if r and any(n.target == port for n in d.nics)), "?")
            report.warnings.append(
                f"the kernel allows MAC {mac} on port {port} (guest {owner!r}), which nothing allows any more: "
                "that NIC can send mail; run `smtp-gate rebuild` to revoke it"
            )
    report.warnings += drift_warnings(config, pairs)


def drift_warnings(config: Config, pairs: "List[Tuple[Domain, bool]]") -> List[str]:
    """One warning per running persistent guest of PAIRS whose live and saved definitions carry
    different allowances: a live-only one is lost at the guest's next cold boot and at a
    `--persistent` migration's destination (whose saved definition is the source's), a
    saved-only one is not in force now.  For `list` and `status` only: one cheap
    virDomainGetMetadata per definition, which a rebuild need not pay."""
    from smtp_gate import domain as domain_mod, hypervisor

    wanted: Dict[str, List[str]] = {}
    names: Dict[str, str] = {}
    for dom, running in pairs:
        if running:
            wanted.setdefault(dom.uri or config.uris()[0], []).append(dom.uuid)
            names[dom.uuid] = dom.name
    if not wanted:
        return []
    warnings = []
    for uuid, (live, saved) in sorted(hypervisor.live_and_saved_allows(wanted, config.libvirt_timeout).items()):
        if live == saved:
            continue
        try:
            held = [domain_mod.parse_allow(raw, uuid) if raw is not None else None for raw in (live, saved)]
        except SmtpGateError:
            continue  # not readable XML: the listing reports the live one
        if held[0] == held[1]:
            continue
        from smtp_gate.manage import describe_allow  # here: status is imported by commands that never manage

        live_text, saved_text = (describe_allow(a) if a is not None else "none" for a in held)
        name = names[uuid]
        shown = shlex.quote(name)
        warnings.append(
            f"guest {name!r} ({uuid}): its live and saved definitions carry different smtp-gate allowances (live: "
            f"{live_text}; saved: {saved_text}): a live-only allowance is lost at its next cold boot and at a "
            "`--persistent` migration's destination, a saved-only one is not in force now; "
            f"`smtp-gate add-vm {shown} --store metadata` writes one into both, "
            f"`smtp-gate del-vm {shown} --source metadata` removes both"
        )
    return warnings


def _allowances(verdict: "guests_mod.Verdict") -> List[Dict[str, object]]:
    """Each source that allows the guest, with what it allows: the file (its MACs), and the
    metadata with its audit fields (by, at, reason) and any bad part (problems)."""
    out: List[Dict[str, object]] = []
    if verdict.whitelisted:
        out.append({"source": "file", "macs": list(verdict.whitelisted)})
    meta = verdict.domain.allow
    if meta is not None:
        out.append({
            "source": "metadata", "macs": list(verdict.by_metadata), "by": meta.by, "at": meta.at,
            "reason": meta.reason, "nics": list(meta.macs) if meta.macs is not None else None,
            "problems": list(meta.problems),
        })
    return out


def _allowances_text(allowances: List[Dict[str, object]]) -> str:
    parts = []
    for item in allowances:
        if item["source"] == "file":
            parts.append("whitelist file")
            continue
        fields = [f"by {item['by'] or '?'}", f"at {item['at'] or '?'}"]
        if item["reason"]:
            fields.append(f"reason {item['reason']!r}")
        if item["nics"] is not None:
            fields.append(f"NICs {', '.join(item['nics']) or 'none usable'}")  # type: ignore[arg-type]
        if item["problems"]:
            fields.append(f"{len(item['problems'])} bad part(s)")  # type: ignore[arg-type]
        parts.append(f"metadata ({', '.join(fields)})")
    return "; ".join(parts) or "-"


def _audit(table: nft.KernelTable) -> bool:
    """Audit mode ends the blocked-attempt chain with accept instead of drop."""
    return any(expr == [{"accept": None}] for expr in table.chains.get("smtp4", []))


def _disabled_lines(off: Dict[str, str]) -> List[str]:
    return [
        f"smtp-gate: DISABLED by {off['by']} at {off['at']}",
        f"  reason: {off['reason'] or '(none given)'}",
        "  OUTBOUND SMTP FROM GUESTS IS NOT BLOCKED.  The watcher, the timer, the boot service and",
        f"  the hooks leave it off until `smtp-gate enable` (off-switch: {off['path']}).",
    ]


def render(report: Report) -> str:
    lines = _disabled_lines(report.disabled) if report.disabled is not None else []
    if report.disabled is not None and not report.active:
        lines += [f"warning: {w}" for w in report.warnings]
        return "\n".join(lines) + "\n"
    if not report.active:
        lines.append("smtp-gate: INACTIVE")
        lines += [f"warning: {w}" for w in report.warnings]
        return "\n".join(lines) + "\n"
    warned = report.warnings or report.unprotected
    lines.append(f"smtp-gate: active ({report.mode} mode)" + (" WITH WARNINGS" if warned else ""))
    lines.append(f"blocked TCP ports: {report.blocked_ports or 'none'}")
    for bridge in report.bridges:
        state = "" if bridge["exists"] else " (missing)"
        lines.append(
            f"bridge {bridge['name']}{state}: uplinks {', '.join(bridge['uplinks']) or 'NONE'}; "  # type: ignore[arg-type]
            f"ports {', '.join(bridge['ports']) or 'none'}"  # type: ignore[arg-type]
        )
    lines.append(f"guest ports (from hypervisors): {', '.join(report.guest_ports) or 'none'}")
    if report.foreign_ports:
        lines.append(f"ports of unprotected bridges (left alone): {', '.join(report.foreign_ports)}")
    lines.append(f"relays every guest may reach (ALLOWED_DESTINATIONS): {', '.join(report.relays) or 'none'}")
    lines.append(f"allowed (port, MAC): {len(report.allowed)}")
    for pair in report.allowed:
        lines.append(f"  {pair['port']:<16} {pair['mac']}")
    for guest in report.guests:
        lines.append(validate.escape_controls(
            "whitelisted guest {name}: {state}; ports {ports}; allowance in kernel: {held}; blocked attempts: {attempts}".format(
                **guest
            )
            + f"; allowed by: {_allowances_text(guest.get('allowances', []))}"  # type: ignore[arg-type]
        ))
    lines += [str(nic["line"]) for nic in report.unprotected]
    lines.append(
        "blocked attempts: IPv4 {blocked4}, IPv6 {blocked6}; non-IP frames {verb} {nonip}; malformed {malformed}".format(
            verb="counted, not dropped (audit mode)" if report.mode == "audit"
            else "let through (NON_IP=accept)" if report.non_ip == "accept" else "dropped",
            **report.counters,
        )
    )
    for item in sorted(report.attempts, key=lambda a: -a.packets):
        lines.append(f"  {item.port:<16} {item.mac}  {item.packets} packets")
    lines += [f"note: {n}" for n in report.notes]
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"
