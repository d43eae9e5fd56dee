"""The `smtp-gate` command: one small function per subcommand, errors caught once at the top.

Exit codes: 0 success; 1 error (nothing was changed); 2 usage; 3 done, with a warning
the operator must read (a protected bridge is missing or has no uplink, or no
hypervisor answered); 4 `status`: enforcement is not active.
"""

import argparse
import json
import sys
import traceback
from typing import Callable, Dict, List, Optional

from smtp_gate import __version__, config as config_mod, discovery, engine, nft, status as status_mod, validate
from smtp_gate.config import Config
from smtp_gate.errors import SmtpGateError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_WARNING, EXIT_INACTIVE = 0, 1, 2, 3, 4

Handler = Callable[[argparse.Namespace, Config], int]


def warn(message: str) -> None:
    print(f"smtp-gate: warning: {message}", file=sys.stderr)


def cmd_apply(args: argparse.Namespace, config: Config) -> int:
    """Install the whole desired state in one atomic transaction."""
    from smtp_gate import rebuild

    result = rebuild.rebuild(config, use_libvirt=not args.no_libvirt, dry_run=args.dry_run)
    outcome = result.outcome
    if args.dry_run:
        sys.stdout.write(result.batch.text())
        print("# the kernel accepted this batch (nft -c); nothing was changed", file=sys.stderr)
    else:
        d = outcome.desired
        guests = "libvirt not asked" if result.guests_seen is None else f"{result.guests_seen} running guest(s)"
        print(
            f"ok: {'auditing' if d.audit else 'enforcing'} on {', '.join(config.bridges)}: "
            f"uplinks {', '.join(d.uplinks) or 'none'}; blocked ports {validate.format_ports(d.blocked_ports)}; "
            f"{guests}; {len(d.allowed)} allowed guest NIC(s)"
        )
    for note in result.hypervisor_warnings:
        warn(note)
    for message in outcome.warnings:
        warn(message)
    return EXIT_WARNING if outcome.has_warnings else EXIT_OK


def cmd_rollback(args: argparse.Namespace, config: Config) -> int:
    """Remove our table and nothing else."""
    existed = engine.remove()
    print("ok: removed table bridge smtp_gate" if existed else "ok: table bridge smtp_gate was not installed")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    report = status_mod.read(config)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        sys.stdout.write(status_mod.render(report))
    if not report.active:
        return EXIT_INACTIVE
    return EXIT_WARNING if report.warnings else EXIT_OK


def cmd_debug(args: argparse.Namespace, config: Config) -> int:
    links = discovery.read_links()
    print("== configuration (value <- source)")
    for key, (attr, _parser) in config_mod.KEYS.items():
        value = getattr(config, attr)
        if attr == "uplink_regex" and value is not None:
            value = value.pattern
        print(f"{key}={value!r}  <- {config.sources.get(attr, 'default')}")
    print(f"config file: {config.path}")
    print("== links")
    for link in sorted(links.values(), key=lambda l: l.ifindex):
        uplink = " auto-uplink" if discovery.is_auto_uplink(link, links) else ""
        print(
            f"{link.ifindex:>5} {link.name:<16} kind={link.kind:<9} master={link.master or '-':<10} "
            f"lowers={','.join(link.lowers) or '-'}{uplink}"
        )
    print("== table bridge smtp_gate (as the kernel holds it)")
    sys.stdout.write(nft.list_text() or "(not installed)\n")
    return EXIT_OK


COMMANDS: Dict[str, Handler] = {
    "apply": cmd_apply,
    "rebuild": cmd_apply,
    "rollback": cmd_rollback,
    "disable": cmd_rollback,
    "status": cmd_status,
    "debug": cmd_debug,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtp-gate",
        description="Block outbound SMTP from guests at the hypervisor's bridge; allow verified guests.",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 done with a warning, 4 (status) not active",
    )
    parser.add_argument("--config", metavar="PATH", help="config file (default: $SMTP_GATE_CONFIG, else the installed one)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"smtp-gate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help_text: str, example: str, aliases: Optional[List[str]] = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example: {example}",
            aliases=aliases or [],
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
    add("rollback", "remove smtp-gate's nft table and nothing else", "sudo smtp-gate rollback", aliases=["disable"])
    p = add("status", "show what the kernel enforces, allowances and blocked attempts", "smtp-gate status --json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add("debug", "show bridge ports, our table as the kernel holds it, and the effective configuration", "smtp-gate debug")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    command = {"disable": "rollback"}.get(args.command, args.command)
    try:
        config = config_mod.load(args.config)
        return COMMANDS[command](args, config)
    except SmtpGateError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"smtp-gate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("smtp-gate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
