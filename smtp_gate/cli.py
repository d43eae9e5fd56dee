"""The `smtp-gate` command: one small function per subcommand, errors caught once at the top.

Exit codes: 0 success; 1 error (nothing was changed: a file written before the kernel
refused the change is put back); 2 usage; 3 done, with a warning the operator must read
(a protected bridge is missing or has no uplink; a running guest NIC is UNPROTECTED:
`apply`, `rebuild`, `status`; `list`: a whitelist row cannot be used; `list`, `status`: a
part of a guest's metadata allowance cannot be used, or a running guest's live and saved
allowances differ; `list`: a libvirt URI did not answer; `status`: the kernel holds an
allowance nothing grants, or lacks one; `del-vm`, `del-mac`, the picker: a
NIC of the guest is still allowed by another row or by the other source, file or
metadata; `export-metadata`: a row was not exported, a MAC row or one whose guest libvirt
does not know); 4 `status`: enforcement is not active; 5 the operator switched
enforcement off (`status`, and `apply --if-enabled`, which then installs nothing); 6 the
kernel refused a change whose file (ALLOW_STORE=metadata: the guest's metadata) was
written, and it could not be put back, or `export-metadata` failed after writing some
guests' metadata (the message says what is left); 141 the reader of stdout went away (`status | head`).
No hypervisor answering is a note on stderr, not a warning: apply then keeps what the
kernel holds.
"""

import argparse
import contextlib
import json
import os
import sys
from typing import Callable, Dict, List, Optional

from smtp_gate import __version__, config as config_mod, validate
from smtp_gate.config import Config
from smtp_gate.domain import METADATA_NS
from smtp_gate.errors import PartialChange, SmtpGateError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_WARNING, EXIT_INACTIVE, EXIT_DISABLED, EXIT_PARTIAL = 0, 1, 2, 3, 4, 5, 6
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away

Handler = Callable[[argparse.Namespace, Config], int]


def warn(message: str) -> None:
    print(f"smtp-gate: warning: {message}", file=sys.stderr)


def cmd_apply(args: argparse.Namespace, config: Config) -> int:
    """Install the whole desired state in one atomic transaction.  An operator's apply ends
    `smtp-gate disable`; the units' `--if-enabled` honours it (exit 5, nothing installed)."""
    from smtp_gate import offswitch, rebuild
    from smtp_gate.errors import EnforcementDisabled

    try:
        result = rebuild.rebuild(
            config, use_libvirt=not args.no_libvirt, dry_run=args.dry_run, reenable=not args.if_enabled
        )
    except EnforcementDisabled as exc:
        warn(str(exc))
        if not args.dry_run:
            _write_metrics(config)  # the file says so: disabled, nothing installed
        return EXIT_DISABLED
    outcome = result.outcome
    if result.reenabled is not None:
        print(f"ok: enforcement re-enabled; it was disabled {result.reenabled.by_line()}")
    if args.dry_run:
        sys.stdout.write(result.batch.text())
        print("# the kernel accepted this batch (nft -c); nothing was changed", file=sys.stderr)
        off = offswitch.read(config.disabled_path)
        if off is not None:
            warn(f"{off.describe()}: `smtp-gate apply` without --dry-run would turn it back on")
    else:
        d = outcome.desired
        if result.guests_seen is not None:
            guests = f"{result.guests_seen} running guest(s)"
        else:
            guests = "no hypervisor answered" if not args.no_libvirt else "libvirt not asked"
        print(
            f"ok: {'auditing' if d.audit else 'enforcing'} on {', '.join(config.bridges)}: "
            f"uplinks {', '.join(d.uplinks) or 'none'}; blocked ports {validate.format_ports(d.blocked_ports)}; "
            f"{guests}; {len(d.allowed)} allowed guest NIC(s)"
        )
    for message in result.hypervisor_warnings + outcome.warnings:
        warn(_as_dry_run(message) if args.dry_run else message)
    for nic in result.unprotected or []:
        warn(nic.line())
    desk_problems = _desk_problems(config)
    if result.unprotected is None and not args.no_libvirt:
        print("smtp-gate: note: no hypervisor answered: UNPROTECTED NICs could not be checked", file=sys.stderr)
    written = args.dry_run or _write_metrics(config)
    failed = outcome.has_warnings or result.unprotected or not written or desk_problems
    return EXIT_WARNING if failed else EXIT_OK


def _desk_problems(config: Config) -> List[str]:
    """Warn (stderr) what keeps the abuse desk from doing what the configuration asks
    (abuse.config_problems: ON_BLOCKED with LOG_GROUP off, a command that cannot run)."""
    from smtp_gate import abuse

    problems = abuse.config_problems(config)
    for problem in problems:
        warn(problem)
    return problems


def _desk_note(config: Config) -> None:
    """A note when the watcher said (RUN_DIR/abuse.json) that it follows no blocked attempts."""
    from smtp_gate import abuse

    stats = abuse.read_stats(config.run_dir)
    if config.log_group is not None and stats is not None and not stats.get("bound"):
        at = abuse.iso(float(stats.get("updated", 0)))
        print(f"smtp-gate: note: the abuse desk is not following blocked attempts (NFLOG group {config.log_group}): "
              f"{os.path.join(config.run_dir, abuse.STATS_FILE)} says so, written by `smtp-gate watch` at {at} "
              "(it was stopped, or could not bind the group: journalctl -u smtp-gate-watch)", file=sys.stderr)


def _write_metrics(config: Config) -> bool:
    """Refresh METRICS_DIR/smtp_gate.prom (metrics.py); False after a warning.  A missing
    METRICS_DIR (no node_exporter here) is a note: metrics are simply not wanted there."""
    from smtp_gate import metrics

    try:
        metrics.refresh(config)
    except metrics.MetricsDirMissing as exc:
        print(f"smtp-gate: note: {exc}", file=sys.stderr)
    except SmtpGateError as exc:
        warn(f"metrics not written: {exc}")
        return False
    return True


def _as_dry_run(message: str) -> str:
    """A warning worded for a real apply, told as what this dry run would have done: it
    installed nothing, so it must not say that enforcement "is installed"."""
    for done, would in (
        ("enforcement is installed", "enforcement would be installed"),
        ("allowances for existing ports are kept", "allowances for existing ports would be kept"),
    ):
        message = message.replace(done, would)
    return f"dry run, nothing installed: {message}"


def cmd_disable(args: argparse.Namespace, config: Config) -> int:
    """The operator's off-switch: record who, when and why, then remove our table and nothing
    else.  Under the lock, in that order: a hook or rebuild that installs the table either
    ran before (and the table is removed here) or sees the switch and installs nothing."""
    from smtp_gate import engine, lock, manage, offswitch

    by = manage.invoking_user()
    at = manage.now().isoformat(timespec="seconds")
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(lock.flock(config.lock_path, lock.COMMAND_TIMEOUT))
        except OSError as exc:
            # the off-switch must work whatever state the run directory is in; and whatever
            # installs the table (hooks, rebuilds, the watcher) needs this very lock first
            warn(
                f"{_os_error_text(exc, config)}: switching off without the lock (hooks, rebuilds and the "
                "watcher cannot take it either, so none of them installs the table meanwhile)"
            )
        # already off: keep the first record, which says since when and why
        before = offswitch.read(config.disabled_path)
        off = before if before is not None else offswitch.write(config.disabled_path, by, at, args.reason)
        try:
            existed = engine.remove()
        except SmtpGateError as exc:
            raise SmtpGateError(
                f"recorded the off-switch in {off.path!r} but could not remove the table: {exc}; run `smtp-gate disable` again"
            ) from None
    written = _write_metrics(config)  # at once: monitoring sees the table gone, not 30 s later
    if before is not None:
        print(f"ok: it was already off, and that record is kept: {before.describe()}")
    else:
        print(f"ok: {off.describe()}; recorded in {os.path.abspath(off.path)} (kept across reboots)")
    print("ok: removed table bridge smtp_gate" if existed else "ok: table bridge smtp_gate was not installed")
    print("ok: the watcher, the timer, the boot service and the hooks leave it off until `smtp-gate enable`")
    return EXIT_OK if written else EXIT_WARNING


def cmd_enable(args: argparse.Namespace, config: Config) -> int:
    """End `smtp-gate disable`: apply, as `smtp-gate apply` does, then remove the off-switch."""
    from smtp_gate import offswitch

    if offswitch.read(config.disabled_path) is None:
        print("ok: enforcement was not disabled; applying")
    return cmd_apply(args, config)


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from smtp_gate import status as status_mod

    from smtp_gate import abuse

    report = status_mod.read(config)
    if report.active and not args.no_libvirt:
        status_mod.add_guests(report, config)
    report.warnings += abuse.config_problems(config)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        sys.stdout.write(status_mod.render(report))
    _desk_note(config)
    if report.disabled is not None:
        return EXIT_DISABLED
    if not report.active:
        return EXIT_INACTIVE
    return EXIT_WARNING if report.warnings or report.unprotected else EXIT_OK


def _shown(value: object) -> str:
    """A config value as it would be written in the file."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple) and value and isinstance(value[0], tuple) and len(value[0]) == 3:
        return " ".join(validate.format_relay(relay) for relay in value)  # type: ignore[arg-type]
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return validate.format_ports(value)  # type: ignore[arg-type]
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"  # as configured: 120, not 120.0
    return str(getattr(value, "pattern", value))


def cmd_debug(args: argparse.Namespace, config: Config) -> int:
    from smtp_gate import abuse, discovery, nft

    links = discovery.read_links()
    print("== configuration (value <- source)")
    for key, (attr, _parser) in config_mod.KEYS.items():
        value = getattr(config, attr)
        if key == "ON_BLOCKED":  # argv: a shell-quoted line that splits back into it (copy into the file)
            import shlex

            line = shlex.join(value)
            shown = f'"{line}"' if '"' not in line else shlex.quote(line)
            print(f"{key}={shown}  <- {config.sources.get(attr, 'default')}")
            continue
        print(f'{key}="{_shown(value)}"  <- {config.sources.get(attr, "default")}')
    exists = "" if os.path.exists(config.path) else " (does not exist: every value above is the default)"
    print(f"config file: {config.path}{exists}")
    print("== links")
    for link in sorted(links.values(), key=lambda l: l.ifindex):
        uplink = " auto-uplink" if discovery.is_auto_uplink(link, links) else ""
        print(
            f"{link.ifindex:>5} {link.name:<16} kind={link.kind:<9} master={link.master or '-':<10} "
            f"lowers={','.join(link.lowers) or '-'}{uplink}"
        )
    print("== table bridge smtp_gate (as the kernel holds it)")
    sys.stdout.write(nft.list_text() or "(not installed)\n")
    print("== abuse desk")
    stats = abuse.read_stats(config.run_dir)
    where = os.path.join(config.run_dir, abuse.STATS_FILE)
    if stats is None:
        print(f"{where}: not written (smtp-gate watch has not run with this RUN_DIR)")
    else:
        updated = abuse.iso(float(stats.get("updated", 0)))
        print(f"{where} (updated {updated}): " + " ".join(f"{k}={stats.get(k)}" for k in abuse.STATS_KEYS))
    _desk_note(config)
    return EXIT_WARNING if _desk_problems(config) else EXIT_OK


def cmd_guest_bridges(args: argparse.Namespace, config: Config) -> int:
    """`NAME STATE COUNT` lines: each bridge running guests' NICs are on, `protected` (in
    BRIDGE) or `unprotected`, then each bridge of BRIDGE no running guest uses, `unused`.
    Read-only: install.sh writes or proposes BRIDGE from it, without parsing the config."""
    from smtp_gate import discovery, exposure, hypervisor

    uris = tuple(args.libvirt_uri) or config.uris()
    listing = hypervisor.list_running(uris)
    if not listing.reached:
        reasons = "; ".join(f"{uri}: {why}" for uri, why in listing.unreachable.items())
        raise SmtpGateError(f"no libvirt URI answered, so the guests' bridges are unknown: {reasons}")
    master_of = discovery.master_of(discovery.read_links())
    used = exposure.guest_bridges(listing.domains, master_of)
    for bridge, count in used:
        state = "protected" if bridge in config.bridges else "unprotected"
        print(f"{bridge} {state} {count}")
    for bridge in config.bridges:
        if bridge not in dict(used):
            print(f"{bridge} unused 0")
    unseen = [u for u in exposure.all_unprotected(listing.domains, config.bridges, master_of) if u.bridge is None]
    for nic in unseen:
        print(f"smtp-gate: note: {nic.line()}", file=sys.stderr)
    if args.libvirt_uri or config.libvirt_uris or config.hypervisor:
        for uri, why in listing.unreachable.items():
            print(f"smtp-gate: note: libvirt {uri} did not answer: {why}", file=sys.stderr)
    return EXIT_OK


def _report(change) -> int:  # type: ignore[no-untyped-def]
    """Print a whitelist command's Change; exit 3 when a removal left a NIC allowed."""
    for line in change.lines:
        print(f"ok: {line}")
    for message in change.warnings:
        warn(message)
    for note in (*change.notes, *change.still_allowed):
        print(f"smtp-gate: note: {note}", file=sys.stderr)
    return EXIT_WARNING if change.still_allowed else EXIT_OK


def cmd_add_vm(args: argparse.Namespace, config: Config) -> int:
    from smtp_gate import manage

    return _report(manage.add_vm(config, args.name, args.reason, manage.invoking_user(), manage.now(), args.store))


def cmd_del_vm(args: argparse.Namespace, config: Config) -> int:
    from smtp_gate import manage

    return _report(manage.del_vm(config, args.name, args.source))


def cmd_add_mac(args: argparse.Namespace, config: Config) -> int:
    from smtp_gate import manage

    return _report(manage.add_mac(config, args.mac, args.label, args.reason, manage.invoking_user(), manage.now()))


def cmd_del_mac(args: argparse.Namespace, config: Config) -> int:
    from smtp_gate import manage

    return _report(manage.del_mac(config, args.mac))


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    """The whitelist file's rows, then every guest whose own libvirt metadata allows it."""
    from smtp_gate import manage

    listed = manage.list_rows(config)
    rows, notes = listed.rows, listed.notes
    # read after the rows: a file that went away in between is shown as absent, never the reverse
    exists = os.path.lexists(config.whitelist)
    if args.json:
        print(json.dumps(
            {"whitelist": str(config.whitelist), "exists": exists, "rows": rows, "problems": listed.problems,
             "metadata": listed.metadata, "metadata_problems": listed.metadata_problems, "unread": listed.unread,
             # "metadata" lists only what the URIs that answered hold
             "libvirt": {"unreachable": listed.unreachable}, "warnings": listed.drift}, indent=2
        ))
    elif not exists:
        # the empty whitelist, as every command reads it; add-vm and add-mac create the file
        print(f"# {config.whitelist}: the whitelist file does not exist (it allows no guest)")
    else:
        print(f"# {config.whitelist}: {len(rows)} row(s)")
        for row in rows:
            who = str(row["vmname"]) or "-"
            if row["bound"] == "uuid":  # the guest's name, as libvirt knows it now
                unknown = "(name unknown)" if notes else "(not in libvirt)"
                who = f"{row['guest']} ({who})" if row["guest"] else f"{who} {unknown}"
            elif row["bound"] == "name":
                who += " (name-bound)"
            print(
                validate.escape_controls(  # a row written by hand may hold line breaks
                    f"{row['line']:>4}  {who:<24} {row['mac'] or '(all NICs)':<17}  "
                    f"{row['added_at']}  {row['added_by']}  {row['reason']}"
                )
            )
        if any(row["bound"] == "name" for row in rows):
            print(
                "# (name-bound): allows whichever guest has that name, also a later one that reuses it; "
                "`smtp-gate add-vm NAME --store file` adds a row bound to the guest's UUID, then delete the name-bound line"
            )
    if listed.metadata and not args.json:
        print(f"# libvirt metadata ({METADATA_NS}): {len(listed.metadata)} guest(s)")
        print("# guest (UUID, state)  NICs  at  by  reason")
        for meta in listed.metadata:
            macs = meta["macs"]
            nics = "(all NICs)" if macs is None else ",".join(macs) or "(no usable NIC)"  # type: ignore[arg-type]
            print(validate.escape_controls(  # "?" for an absent field, as status and the notes show it
                f"  {meta['guest']} ({meta['uuid']}, {meta['state']}) {nics}  {meta['at'] or '?'}  "
                f"{meta['by'] or '?'}  {meta['reason']}"
            ))
    for note in notes:
        if listed.unreachable:  # a URI that did not answer hides its guests' allowances: exit 3
            warn(note)
        else:
            print(f"smtp-gate: note: {note}", file=sys.stderr)
    for problem in listed.problems:
        warn(f"whitelist {config.whitelist}: {problem} (row kept, allows nothing)")
    for problem in listed.metadata_problems:
        warn(f"{problem} (that part allows nothing)")
    for line in listed.unread:
        warn(line)
    for problem in listed.drift:
        warn(problem)
    warned = listed.problems or listed.metadata_problems or listed.unread or listed.unreachable or listed.drift
    return EXIT_WARNING if warned else EXIT_OK


def cmd_export_metadata(args: argparse.Namespace, config: Config) -> int:
    """Copy the whitelist file's guest rows into the guests' own metadata (the way to fleets)."""
    from smtp_gate import manage

    result = manage.export_metadata(config, args.dry_run, manage.invoking_user(), manage.now(), args.replace)
    for line in result.lines:
        print(f"{'dry run: ' if args.dry_run else 'ok: '}{line}")
    if not result.lines:
        print("ok: no row of the whitelist file names a guest libvirt knows: nothing to export")
    for line in result.skipped:
        warn(line)
    for note in result.notes:
        print(f"smtp-gate: note: {note}", file=sys.stderr)
    return EXIT_WARNING if result.skipped else EXIT_OK


def cmd_ports_set(args: argparse.Namespace, config: Config) -> int:
    from smtp_gate import manage

    return _report(manage.ports_set(config, args.ports))


def cmd_whitelist(args: argparse.Namespace, config: Config) -> int:
    """The interactive picker of the original README."""
    from smtp_gate import manage

    if not sys.stdin.isatty():
        raise SmtpGateError(
            "the picker needs a terminal; in scripts use `smtp-gate add-vm NAME` and `smtp-gate del-vm NAME`"
        )
    while True:
        rows = manage.picker_rows(config)
        if not rows:
            print("no guests found in libvirt")
            return EXIT_OK
        sys.stdout.write(manage.render_rows(rows))
        try:
            answer = input("toggle which (e.g. 1,3 or 2-4; q to quit): ").strip()
        except EOFError:
            return EXIT_OK
        if answer.lower() in ("q", "quit", ""):
            return EXIT_OK
        try:
            chosen = manage.parse_selection(answer, len(rows))
        except SmtpGateError as exc:
            print(f"smtp-gate: error: {exc}", file=sys.stderr)
            continue
        for index in chosen:
            _report(manage.toggle(config, rows[index], manage.invoking_user(), manage.now()))


def cmd_watch(args: argparse.Namespace, config: Config) -> int:
    """Restore enforcement at once when another tool flushes the ruleset (runs until killed)."""
    from smtp_gate import watch

    return watch.main_loop(config)


def cmd_report(args: argparse.Namespace, config: Config) -> int:
    """The abuse desk's ranking: guests by connection attempts (then packets) over --since,
    from the watcher's store.  No data is a warning (exit 3), not "0 guests": the watcher may
    not be running, or STATE_DIR may be another than the watcher's."""
    import re
    import time

    from smtp_gate import abuse, store

    m = re.fullmatch(r"([1-9]\d{0,6})([smhdw])", args.since.strip())
    if not m:
        print(f"smtp-gate: error: bad --since {args.since!r}: expected a duration like 30m, 1h, 2d or 1w "
              "(a whole number and s, m, h, d or w)", file=sys.stderr)
        return EXIT_USAGE
    if args.top < 1:
        print(f"smtp-gate: error: bad --top {args.top}: expected a whole number from 1 (destinations and sources "
              "shown per guest)", file=sys.stderr)
        return EXIT_USAGE
    window = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    since = time.time() - window
    if window > config.report_days * 86400:
        print(f"smtp-gate: note: --since {args.since} reaches beyond REPORT_DAYS={config.report_days}: "
              f"the store keeps {config.report_days} day(s), older attempts are gone", file=sys.stderr)
    stored = store.Store(config.state_dir)
    try:
        ranked = store.rank(stored.rows(since), top=args.top)
        exists = stored.exists()
    except PermissionError as exc:
        raise SmtpGateError(
            f"cannot read the report's store in STATE_DIR {config.state_dir!r} ({exc.filename}): {exc.strerror}; "
            "report needs root (or membership of the group that owns the store)") from None
    iso = abuse.iso
    no_data = None
    if not exists:
        no_data = (f"no data: is smtp-gate watch running? STATE_DIR={config.state_dir} holds no blocked attempt "
                   "(the watcher writes it; LOG_GROUP must not be off)")
    elif not ranked:
        no_data = (f"no data since {iso(since)}: no blocked attempt stored in STATE_DIR={config.state_dir} for this "
                   "window (is smtp-gate watch running?)")
    if args.json:
        json.dump({
            "since": iso(since), "window_seconds": window, "state_dir": config.state_dir, "no_data": no_data is not None,
            "guests": [{
                "guest": r.guest, "uuid": r.uuid, "port": store_who(r), "mode": r.mode, "ifaces": list(r.ifaces),
                "macs": list(r.macs), "macs_more": r.macs_more, "connections": r.connections, "attempts": r.attempts,
                "first": iso(r.first), "last": iso(r.last),
                "sources": [{"source": a, "packets": n} for a, n in r.sources],
                "destinations": [{"destination": d, "attempts": n} for d, n in r.destinations],
            } for r in ranked],
        }, sys.stdout, indent=2)
        print()
    else:
        audit = sum(1 for r in ranked if r.mode == "audit")
        print(f"blocked SMTP since {iso(since)} ({args.since}): {len(ranked)} guest(s), ranked by connection attempts"
              + (f"; {audit} of them in audit mode (delivered, not blocked)" if audit else ""))
        for r in ranked:
            who = store_who(r) + (f" ({r.uuid})" if r.uuid else "")
            label = "  AUDIT (delivered)" if r.mode == "audit" else ""
            more = f" +{r.macs_more} more" if r.macs_more else ""
            if r.macs_other:
                more += f" (+{r.macs_other} packets from MACs not kept apart)"
            print(f"{r.connections:>7} connection attempt(s) {r.attempts:>7} packet(s)  {who}{label}")
            print(f"         first {iso(r.first)}  last {iso(r.last)}")
            print(f"         sources: {', '.join(f'{a} ({n})' for a, n in r.sources) or '-'}")
            print(f"         MACs: {', '.join(r.macs) or '-'}{more}")
            print(f"         top destinations: {', '.join(f'{d} ({n})' for d, n in r.destinations)}")
    if no_data is not None:
        warn(no_data)
        return EXIT_WARNING
    return EXIT_OK


def store_who(r) -> str:  # type: ignore[no-untyped-def]
    """A ranked entry named as everywhere else: the guest, or "unknown port vnet3"."""
    return r.guest if r.uuid else f"{r.guest} {', '.join(r.ifaces)}"


def cmd_selftest(args: argparse.Namespace, config: Config) -> int:
    """Prove in a throwaway network-namespace lab that this kernel enforces the real ruleset."""
    from smtp_gate import selftest

    return selftest.main(config, as_json=args.json, keep=args.keep)


COMMANDS: Dict[str, Handler] = {
    "apply": cmd_apply,
    "rebuild": cmd_apply,
    "disable": cmd_disable,
    "rollback": cmd_disable,
    "enable": cmd_enable,
    "status": cmd_status,
    "debug": cmd_debug,
    "guest-bridges": cmd_guest_bridges,
    "add-vm": cmd_add_vm,
    "del-vm": cmd_del_vm,
    "add-mac": cmd_add_mac,
    "del-mac": cmd_del_mac,
    "list": cmd_list,
    "export-metadata": cmd_export_metadata,
    "ports-set": cmd_ports_set,
    "whitelist": cmd_whitelist,
    "watch": cmd_watch,
    "selftest": cmd_selftest,
    "report": cmd_report,
}


WATCH_DESCRIPTION = """\
One long-running process (the service smtp-gate-watch) that follows:
  - nftables events and link changes over netlink: when our table differs from what the
    configuration and the hooks' records say (a flushed ruleset, a deleted or inserted rule,
    a foreign set element, a port moved onto a protected bridge), it restores the table at
    once; our own hooks, commands and rebuilds are left alone.  The restore takes only the
    main lock and never waits for libvirt, so a hung libvirtd does not delay it;
  - libvirt's domain events (LIBVIRT_URI, read-only, keepalive, reconnect with backoff and a
    full resync): a guest's urn:smtp-gate:1 metadata, a NIC hot-plugged or unplugged, a start
    or stop a hook missed.  The guest's live XML is read in a thread of its own, without our
    lock; its allowance is then applied as a hook applies it;
  - the blocked attempts logged to NFLOG group LOG_GROUP (unless "off"): journal entries
    naming the guest (about one per guest port and EVENT_INTERVAL), the store that
    `smtp-gate report` reads (STATE_DIR), and the ON_BLOCKED command.
While `smtp-gate disable` is in force it installs nothing; libvirt's changes are only
recorded, for `smtp-gate enable`."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtp-gate",
        description="Block outbound SMTP from guests at the hypervisor's bridge; allow verified guests.",
        epilog="exit codes: 0 ok, 1 error (nothing changed), 2 usage, 3 done with a warning (e.g. an UNPROTECTED guest NIC), "
        "4 (status) not active, "
        "5 disabled by the operator (status, apply --if-enabled), 6 a file (or a guest's metadata) changed but the "
        "kernel did not, "
        "141 the reader of the output went away (`status | head`)",
    )
    parser.add_argument("--config", metavar="PATH", help="config file (default: $SMTP_GATE_CONFIG, else the installed one)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"smtp-gate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # --config and --debug after the subcommand too (`smtp-gate status --debug`); SUPPRESS keeps
    # a subcommand that does not name them from overwriting what came before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def add(name: str, help_text: str, example: str, aliases: Optional[List[str]] = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example: {example}",
            aliases=aliases or [],
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    for name in ("apply", "rebuild"):
        p = add(
            name,
            "compute the whole desired state and install it in one atomic nft transaction",
            f"sudo smtp-gate {name}   |   smtp-gate {name} --dry-run",
        )
        p.add_argument("--dry-run", action="store_true", help="print the nft batch and check it with the kernel; change nothing")
        p.add_argument(
            "--no-libvirt",
            action="store_true",
            help="do not ask libvirt (boot time: keep the kernel's allowances for ports that exist)",
        )
        p.add_argument(
            "--if-enabled",
            action="store_true",
            help="for the systemd units: install nothing and exit 5 while `smtp-gate disable` is in force "
            "(without it, an operator's apply turns enforcement back on)",
        )
    p = add(
        "disable",
        "emergency off-switch: remove smtp-gate's nft table and nothing else, and keep it off (across reboots) "
        "until `smtp-gate enable`",
        'sudo smtp-gate disable --reason "mail outage, ticket 4711"',
        aliases=["rollback"],
    )
    p.add_argument("--reason", default="", help="why (shown by `smtp-gate status`; no control characters)")
    p = add(
        "enable",
        "end `smtp-gate disable`: install the whole desired state, as `apply` does, and remove the off-switch",
        "sudo smtp-gate enable",
    )
    p.add_argument("--no-libvirt", action="store_true", help="do not ask libvirt (keep the recorded allowances)")
    p.set_defaults(dry_run=False, if_enabled=False)
    p = add("status", "show what the kernel enforces, allowances and blocked attempts", "smtp-gate status --json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-libvirt", action="store_true", help="do not ask libvirt about guests")
    add("debug", "show bridge ports, our table as the kernel holds it, and the effective configuration", "smtp-gate debug")
    p = add(
        "guest-bridges",
        "list the bridges running guests' NICs are on, each `protected` (in BRIDGE) or `unprotected`, "
        "with its number of NICs, then BRIDGE's bridges no running guest uses (`unused`); read-only",
        "smtp-gate guest-bridges   |   smtp-gate guest-bridges --libvirt-uri qemu:///system",
    )
    p.add_argument(
        "--libvirt-uri",
        metavar="URI",
        action="append",
        default=[],
        help="ask this libvirt URI (repeatable) instead of the config's LIBVIRT_URI/HYPERVISOR",
    )
    p = add(
        "add-vm",
        "allow a guest (name or UUID) and its NICs now: a whitelist file row, or with --store metadata (or "
        "ALLOW_STORE=metadata) the guest's own libvirt metadata (live and saved definition, as its state allows); "
        "then says where each NIC stands in the kernel",
        'smtp-gate add-vm web1 "ID verified, ticket 4711"   |   smtp-gate add-vm web1 "KYC 123" --store metadata',
    )
    p.add_argument("name", metavar="NAME", help="guest name or UUID, as `virsh list --all` shows it")
    p.add_argument("reason", metavar="REASON", nargs="?", default="", help="why (stored with the allowance)")
    p.add_argument(
        "--store", choices=config_mod.ALLOW_STORES, default=None,
        help="where to write the allowance: the whitelist file or the guest's libvirt metadata (default: ALLOW_STORE)",
    )
    p = add(
        "del-vm",
        "block a guest now: remove its whitelist rows and its libvirt metadata allowance (--source limits it to "
        "one), and revoke its allowances; says which sources were removed, and (exit 3) what still allows it",
        "smtp-gate del-vm web1   |   smtp-gate del-vm web1 --source file",
    )
    p.add_argument("name", metavar="NAME", help="guest name or UUID")
    p.add_argument(
        "--source", choices=("file", "metadata", "all"), default="all",
        help="remove the allowance from the whitelist file, the guest's libvirt metadata, or both (default: all, "
        "whatever ALLOW_STORE says)",
    )
    p = add(
        "add-mac",
        "whitelist one NIC by MAC and allow it now (always the whitelist file, whatever ALLOW_STORE)",
        "smtp-gate add-mac 52:54:00:ab:cd:ef web1-eth0",
    )
    p.add_argument("mac", metavar="MAC", help="52:54:00:ab:cd:ef, 52-54-00-AB-CD-EF or 5254.00ab.cdef")
    p.add_argument("label", metavar="LABEL", nargs="?", default="", help="a label (stored in the vmname column)")
    p.add_argument("--reason", default="", help="why (stored in the whitelist)")
    p = add(
        "del-mac",
        "remove a MAC's whitelist rows and revoke it now (always the whitelist file, whatever ALLOW_STORE)",
        "smtp-gate del-mac 52:54:00:ab:cd:ef",
    )
    p.add_argument("mac", metavar="MAC")
    p = add(
        "list",
        "show the whitelist file as stored, and every guest (running or not) whose libvirt metadata allows it, "
        "with who, when and why",
        "smtp-gate list --json",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add(
        "export-metadata",
        "write each whitelist row that names a guest (UUID or name) into that guest's libvirt metadata, with the "
        "row's who/when/why, so that its allowance follows it when it migrates; MAC rows cannot be; the file is "
        "never changed",
        "smtp-gate export-metadata --dry-run   |   sudo smtp-gate export-metadata",
    )
    p.add_argument("--dry-run", action="store_true", help="say what would be written; write nothing")
    p.add_argument(
        "--replace", action="store_true",
        help="write the row's allowance over one the guest's metadata already carries (default: keep that one)",
    )
    p = add("ports-set", "set the blocked TCP ports, store them in the config and enforce them now", 'smtp-gate ports-set "25,465,587"')
    p.add_argument("ports", metavar="PORTS", help="comma-separated ports 1-65535, ranges like 2525-2530")
    add("whitelist", "pick guests to whitelist interactively (needs a terminal)", "sudo smtp-gate whitelist")
    p = add(
        "watch",
        "run as a service: restore our table at once when another tool changes it; apply libvirt's guest "
        "events (metadata, NIC hot-plug, start/stop); log blocked attempts for the abuse desk",
        "systemctl enable --now smtp-gate-watch.service",
    )
    p.description = WATCH_DESCRIPTION
    p = add(
        "report",
        "the abuse desk: guests ranked by blocked SMTP attempts over a window, with first/last attempt and "
        "top destinations (what `smtp-gate watch` stored under STATE_DIR)",
        "smtp-gate report --since 1h   |   smtp-gate report --since 7d --json",
    )
    p.add_argument("--since", default="1h", metavar="DURATION",
                   help="the window: a whole number and s, m, h, d or w (30m, 1h, 2d, 1w; default 1h); "
                   "data older than REPORT_DAYS is gone")
    p.add_argument("--top", type=int, default=3, metavar="N",
                   help="destinations and source addresses shown per guest, from 1 (default 3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add(
        "selftest",
        "prove in a throwaway network-namespace lab that this kernel enforces the real ruleset",
        "sudo smtp-gate selftest   |   sudo smtp-gate selftest --json",
    )
    p.description = (
        "Prove in a throwaway network-namespace lab that this kernel enforces the real ruleset: one PASS/FAIL\n"
        "line per check, exit 0 only if all pass.  The host's bridges, ruleset and libvirt are never touched.\n"
        "BLOCKED_PORTS, MODE, NON_IP and LOG_* come from the config when there is one; none is needed."
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--keep", action="store_true", help="leave the lab up for inspection and print how to enter and remove it")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    command = {"rollback": "disable"}.get(args.command, args.command)
    config: Optional[Config] = None
    try:
        config = config_mod.load(args.config)
        code = COMMANDS[command](args, config)
        sys.stdout.flush()  # here, not at exit: a reader that went away is handled below
        return code
    except BrokenPipeError:
        # the reader went away (`status | head`): not an error; nothing more can be said on
        # stdout, and Python must not complain about it when it flushes at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # every error, ours or not, is one line (a traceback only with --debug)
        if args.debug:
            import traceback  # here: only --debug needs it, and it costs every command ~6 ms

            traceback.print_exc()
        print(f"smtp-gate: error: {_error_line(exc, config)}", file=sys.stderr)
        return EXIT_PARTIAL if isinstance(exc, PartialChange) else EXIT_ERROR
    except KeyboardInterrupt:
        print("smtp-gate: interrupted", file=sys.stderr)
        return 130


def _error_line(exc: Exception, config: Optional[Config] = None) -> str:
    """EXC as one line: our own message; an OS error with the file it concerns (and, for a
    path of the CONFIG's, the key it comes from and what was expected); any other error
    with its type, since it is a bug to report.  Line breaks (nft's stderr, say) become
    ' | ', so that one error is one line whatever produced it."""
    if isinstance(exc, SmtpGateError):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = _os_error_text(exc, config)
    else:
        text = f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback, and report it)"
    return " | ".join(part.strip() for part in text.splitlines() if part.strip()) or type(exc).__name__


def _os_error_text(exc: OSError, config: Optional[Config]) -> str:
    """An OS error as the README's rule asks: the value, where it came from, what was expected.

    Of the configured paths, only RUN_DIR's reach here as OS errors (its lock, records and
    journal are used by several modules); the whitelist, the config file and the off-switch
    have messages of their own.  Any other OS error is shown with the files it names."""
    names = [os.fsdecode(f) if isinstance(f, bytes) else str(f) for f in (exc.filename, exc.filename2) if f is not None]
    why = exc.strerror or str(exc)
    if config is not None and names and _under_run_dir(names[0], config.run_dir):
        run_dir, path = os.path.abspath(config.run_dir), os.path.abspath(names[0])
        source = config.sources.get("run_dir", "default")
        if source == "default":
            origin, expected = " (the default)", "expected a directory smtp-gate can write"
        else:
            origin = f" (from {source})"
            expected = f"expected a directory smtp-gate can write (default {Config._field_defaults['run_dir']})"
        if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
            problem = "is not a directory"
        elif not os.path.isdir(run_dir):
            problem = f"cannot be created: {why}"
        else:
            problem = f"cannot be used: {why}" + ("" if path == run_dir else f" ({names[0]!r})")
        return f"RUN_DIR {config.run_dir!r}{origin} {problem}; {expected}"
    return why + (f": {' -> '.join(repr(name) for name in names)}" if names else "")


def _under_run_dir(path: str, run_dir: str) -> bool:
    """Whether an error on PATH is one of RUN_DIR's: the directory, a file in it, or a missing
    parent that creating it failed on (an existing parent is never the one an error names)."""
    path, run_dir = os.path.abspath(path), os.path.abspath(run_dir)
    if path == run_dir or path.startswith(run_dir.rstrip(os.sep) + os.sep):
        return True
    return run_dir.startswith(path.rstrip(os.sep) + os.sep) and not os.path.isdir(path)


if __name__ == "__main__":
    sys.exit(main())
