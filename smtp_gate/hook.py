"""The libvirt hook: keeps enforcement exact at every guest start and stop (DESIGN §2).

libvirt runs /etc/libvirt/hooks/<driver>.d/* with `argv = name operation sub-operation
extra` and the domain XML on stdin, while it holds the guest's lock.  So this code:
- never calls libvirt (it would deadlock) and only reads the XML it is given;
- never prints on stdout (for migrate and restore, libvirt takes stdout as the new
  domain XML);
- never fails: an exit status other than 0 at prepare/start aborts the guest's start and
  at reconnect kills a running guest.  Every error is logged (syslog and stderr) and
  the hook exits 0; the guest then stays blocked, which is the safe side, and the next
  rebuild repairs the rest;
- waits for our lock a bounded time only;
- imports as little as it can: its import time is most of its cost (no lxml, no
  filelock, no libvirt; the stdlib parses the XML).
"""

import os
import sys
import time
from typing import BinaryIO, List, Optional, Sequence

# (driver, operation, sub-operation) -> action.  qemu and lxc create their taps/veths
# before `start begin` and the guest cannot run yet: allow there.  libxl creates vifD.N
# only after `start begin`: allow at `started` (blocked, not open, for the first instants).
ACTIONS = {
    ("qemu", "prepare", "begin"): "ensure",
    ("qemu", "start", "begin"): "allow",
    ("qemu", "reconnect", "begin"): "reconnect",
    ("qemu", "stopped", "end"): "revoke",
    ("qemu", "release", "end"): "revoke",
    ("lxc", "prepare", "begin"): "ensure",
    ("lxc", "start", "begin"): "allow",
    ("lxc", "reconnect", "begin"): "reconnect",
    ("lxc", "stopped", "end"): "revoke",
    ("lxc", "release", "end"): "revoke",
    ("libxl", "prepare", "begin"): "ensure",
    ("libxl", "start", "begin"): "ensure",
    ("libxl", "started", "begin"): "allow",
    ("libxl", "reconnect", "begin"): "reconnect",
    ("libxl", "stopped", "end"): "revoke",
    ("libxl", "release", "end"): "revoke",
}


def _log(message: str, error: bool = False) -> None:
    import syslog

    syslog.openlog("smtp-gate-hook", syslog.LOG_PID, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_ERR if error else syslog.LOG_INFO, message)
    print(f"smtp-gate hook: {message}", file=sys.stderr)


def _sysfs_index(name: str) -> Optional[int]:
    try:
        with open(f"/sys/class/net/{name}/ifindex", "rb") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def _sysfs_bridge(name: str) -> Optional[str]:
    """The bridge NAME is a port of (brport/ exists only for bridge ports), as
    discovery.master_of answers for a rebuild."""
    try:
        return os.path.basename(os.readlink(f"/sys/class/net/{name}/brport/bridge"))
    except OSError:
        return None


class Hook:
    """One hook call.  Holds the parsed inputs; each action is a method."""

    def __init__(self, driver: str, argv: Sequence[str], xml: bytes) -> None:
        from smtp_gate import config as config_mod
        from smtp_gate.runstate import RunState

        self.driver = driver
        self.guest = argv[0] if argv else "?"
        self.xml = xml
        self.config = config_mod.load(None)
        self.state = RunState(self.config.run_dir)
        self.uri = self.config.hook_uri(driver)  # None: HYPERVISOR leaves this driver out

    def domain(self):  # type: ignore[no-untyped-def]
        import xml.etree.ElementTree as ET

        from smtp_gate import domain

        return domain.from_element(ET.fromstring(self.xml))

    def record(self, dom):  # type: ignore[no-untyped-def]
        """guests.judge(), as rebuilds and status derive it, with the whitelist's fast path."""
        from smtp_gate import guests, whitelist

        text = whitelist.read_text(self.config.whitelist)
        matcher = lambda guest: whitelist.fast_allowed_macs(text, guest)  # noqa: E731
        return guests.judge(dom, self.config.bridges, matcher, _sysfs_index, _sysfs_bridge).record(self.uri)

    def _excluded(self) -> bool:
        """HYPERVISOR leaves this driver out: rebuilds never list its guests, so granting here
        would only last until the next rebuild.  Its guests stay blocked, as unknown ports."""
        if self.uri is None:
            _log(f"{self.driver} is not in HYPERVISOR: guest {self.guest!r} gets no allowance")
        return self.uri is None

    def locked(self):  # type: ignore[no-untyped-def]
        from smtp_gate import lock

        return lock.flock(self.config.lock_path, lock.HOOK_TIMEOUT)

    # -- actions --------------------------------------------------------------------------
    def ensure(self) -> None:
        """Make sure the base table exists, even if the boot service has not run, unless the
        operator switched enforcement off (`smtp-gate disable`)."""
        from smtp_gate import nft

        if self._disabled() or nft.table_exists():
            return
        with self.locked():
            if not nft.table_exists():
                self._install_base()

    def _disabled(self) -> bool:
        """Whether the operator's off-switch is set (one open()); says so in the log.  Hooks
        still keep their records and journal then, so that `enable` comes back exact."""
        from smtp_gate import offswitch

        off = offswitch.read(self.config.disabled_path)
        if off is not None:
            _log(f"{off.describe()}: guest {self.guest!r} runs without enforcement until `smtp-gate enable`")
        return off is not None

    def _install_base(self) -> bool:
        """Install the base table (callers hold the lock, under which `disable` removes it).
        False, and nothing installed, while the operator has switched enforcement off."""
        from smtp_gate import engine

        if self._disabled():
            return False
        outcome, _batch = engine.apply(self.config, list(self.state.all_records().values()), keep_kernel=True)
        _log(f"installed the base enforcement (table was missing) for {self.guest!r}")
        for message in outcome.warnings:
            _log(f"warning: {message}")
        return True

    def allow(self) -> None:
        from smtp_gate import nft, ruleset
        from smtp_gate.errors import NftError
        from smtp_gate.runstate import domain_event

        if self._excluded():
            return
        dom = self.domain()._replace(uri=self.uri)
        with self.locked():
            record = self.record(dom)
            old = self.state.read_record(dom.uuid)
            add = record.elements()
            delete = sorted(set(old.elements()) - set(add), key=repr) if old else []
            changes = ruleset.element_changes(add=add, delete=delete)
            try:
                nft.run_elements(changes)  # the common case: one netlink batch, no check first
            except NftError as exc:
                if not nft.missing_table_or_set(exc):
                    raise
                if self._install_base():  # the table was missing (prepare did not run, or a flush)
                    nft.run_elements(changes)
            self.state.write_record(record)
            self.state.append(domain_event("start", dom))
        if record.allowed:
            _log(f"guest {dom.name!r} allowed on {', '.join(f'#{i}/{m}' for i, m in record.allowed)}")

    def reconnect(self) -> None:
        """libvirtd restarted: one call per running guest, all at once.  Do nothing, without
        the lock and without nft, when our record already says what the kernel must hold."""
        if self._excluded():
            return
        dom = self.domain()
        old = self.state.read_record(dom.uuid)
        if old is not None and old == self.record(dom):
            return
        self.allow()

    def revoke(self) -> None:
        from smtp_gate import nft, ruleset
        from smtp_gate.errors import NftError
        from smtp_gate.runstate import domain_event

        dom = self.domain()
        with self.locked():
            record = self.state.read_record(dom.uuid)
            if record is None:
                if self.state.journal_end() and self._already_stopped(dom.uuid):
                    return
                record = self._record_from_kernel(dom)
            delete = record.elements()
            try:
                nft.run_elements(ruleset.element_changes(delete=delete))
            except NftError as exc:
                # no table, nothing to remove; a table without one of our sets is broken: say so
                if not nft.missing_table_or_set(exc) or nft.table_exists():
                    raise
            self.state.drop_record(dom.uuid)
            self.state.append(domain_event("stop", dom))
        if record.allowed:
            _log(f"guest {dom.name!r} stopped: allowance removed")

    def _already_stopped(self, uuid: str) -> bool:
        """release end follows stopped end: the journal's last word on the guest says so."""
        last = None
        for event in self.state.events_since(max(0, self.state.journal_end() - 65536)):
            if event.get("uuid") == uuid:
                last = event.get("op")
        return last == "stop"

    def _record_from_kernel(self, dom):  # type: ignore[no-untyped-def]
        """No record (the guest started before smtp-gate ran, or /run was wiped): remove the
        guest's MACs from the allowances whose device is gone or named in this XML, and the
        guest ports of the devices this XML names.  (Indexes of gone devices left in
        guest_ifaces exempt nothing, indexes are not reused; the next rebuild drops them.)"""
        from smtp_gate import discovery, engine, nft
        from smtp_gate.runstate import Record

        macs = {nic.mac for nic in dom.nics if nic.mac}
        targets = {nic.target for nic in dom.nics if nic.target}
        links = discovery.read_links()
        names = {link.ifindex: link.name for link in links.values()}
        pairs = [
            (index, mac)
            for index, mac in sorted(engine.kernel_pairs(nft.read_table(), links, keep_gone=True))
            if mac in macs and (index not in names or names[index] in targets)
        ]
        ports = tuple(sorted((name, links[name].ifindex) for name in targets if name in links))
        return Record(uuid=dom.uuid, name=dom.name, guest_ports=ports, allowed=tuple(pairs))


def main(driver: str, argv: Optional[List[str]] = None, stdin: Optional[BinaryIO] = None) -> int:
    """Entry point of hooks/<driver>.  Always returns 0 (see the module docstring)."""
    args = sys.argv[1:] if argv is None else argv
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # nothing of ours may ever reach libvirt's stdout
    started = time.monotonic()
    try:
        action = ACTIONS.get((driver, *(args[1:3] if len(args) >= 3 else ("", ""))))
        if action is None:
            return 0
        xml = (stdin or sys.stdin.buffer).read()
        getattr(Hook(driver, args, xml), action)()
    except Exception as exc:  # noqa: BLE001 - a hook must never fail a guest
        _log(
            f"{driver} hook for {args[:3]} failed after {time.monotonic() - started:.2f}s, "
            f"the guest stays blocked until the next rebuild: {type(exc).__name__}: {exc}",
            error=True,
        )
    finally:
        sys.stdout = real_stdout
    return 0
