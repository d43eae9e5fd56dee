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
- is bounded as a whole: one budget, DEADLINE seconds from its start, pays for every wait
  (our lock, each netlink answer, any `nft` process, which gets the rest of it as its
  timeout).  When it runs out, the hook logs what it did not do and exits 0: a guest it
  was to allow stays blocked (fail closed) and the next rebuild repairs the rest;
- spawns no process on its common paths: element changes, the check that our table
  exists (`prepare`) and the check of a guest's elements (`reconnect`) go over netlink;
  `nft` runs only to install the base table, and to retry an element change when netlink
  itself failed us (not when the kernel refused: nft would be refused the same);
- imports as little as it can: its import time is most of its cost (no lxml, no
  filelock, no libvirt; the stdlib parses the XML).
"""

import os
import sys
from contextlib import contextmanager
from typing import BinaryIO, Iterator, List, Optional, Sequence, Tuple

from smtp_gate.deadline import Deadline
from smtp_gate.errors import DeadlineExceeded, LockTimeout, NftError

# Seconds for a whole hook call, from main() on.  libvirt holds the guest's lock meanwhile;
# a start takes a few ms when nothing waits (bench/bench_hook.py), so this is only ever
# spent waiting: for a rebuild holding our lock, or for a kernel or nft that does not answer.
DEADLINE = 5.0

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


# syslog facility daemon (3 << 3) with the severities err (3) and info (6), as in syslog.h
_PRI_ERR, _PRI_INFO = 24 + 3, 24 + 6
_DEV_LOG = "/dev/log"


def _syslog(message: str, error: bool = False) -> None:
    """Send MESSAGE to syslog without ever waiting: glibc's syslog() blocks while /dev/log's
    queue is full (a journald or rsyslog that does not read), and libvirt waits for its
    hooks without a timeout, so a hook that blocks there hangs the guest's start.  One
    datagram, MSG_DONTWAIT on a non-blocking socket; when it cannot go at once (EAGAIN,
    no /dev/log, nobody bound to it, any OSError) the line is dropped: stderr keeps it,
    in libvirt's log.  _socket, not socket.py: import time is most of a hook's cost."""
    try:
        import _socket as sock_mod
    except ImportError:  # an interpreter that has no _socket
        import socket as sock_mod  # type: ignore[no-redef]
    line = f"<{_PRI_ERR if error else _PRI_INFO}>smtp-gate-hook[{os.getpid()}]: {message}"
    try:
        sock = sock_mod.socket(sock_mod.AF_UNIX, sock_mod.SOCK_DGRAM | sock_mod.SOCK_CLOEXEC)
    except OSError:
        return
    try:
        sock.setblocking(False)
        sock.sendto(line.encode("utf-8", "replace"), sock_mod.MSG_DONTWAIT, _DEV_LOG)
    except OSError:
        pass  # EAGAIN (queue full), ENOENT, ECONNREFUSED, EMSGSIZE...: the stderr line remains
    finally:
        sock.close()


def _log(message: str, error: bool = False) -> None:
    """One line to syslog (never blocking: _syslog) and to stderr, which libvirt keeps in its
    log (never stdout: libvirt may take that as the domain XML)."""
    _syslog(message, error)
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

    def __init__(self, driver: str, argv: Sequence[str], xml: bytes, deadline: Deadline) -> None:
        from smtp_gate import config as config_mod
        from smtp_gate.runstate import RunState

        self.driver = driver
        self.guest = argv[0] if argv else "?"
        self.xml = xml
        self.deadline = deadline
        # what the current action would leave undone, and what that means, for the log
        self.undone = f"change anything for guest {self.guest!r}: it stays blocked until the next rebuild"
        self.config = config_mod.load(None)
        self.state = RunState(self.config.run_dir)
        self.uri = self.config.hook_uri(driver)  # None: HYPERVISOR leaves this driver out
        self.held = False  # while we hold the main lock, log lines wait in `pending` (see locked())
        self.pending: List[Tuple[str, bool]] = []

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

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The main lock, for what is left of the budget.  What is logged meanwhile (_say) is
        written once the lock is released: every smtp-gate process waits for this lock, and
        no log line, however slow its reader, is worth holding it."""
        from smtp_gate import lock

        try:
            with lock.flock(self.config.lock_path, self.deadline.remaining("taking the lock")):
                self.held = True
                try:
                    yield
                finally:
                    self.held = False
        finally:
            pending, self.pending = self.pending, []
            for message, error in pending:
                _log(message, error)

    def _say(self, message: str, error: bool = False) -> None:
        """_log, or after the lock is released when it is held (see locked())."""
        if self.held:
            self.pending.append((message, error))
        else:
            _log(message, error)

    # -- nftables within the budget ---------------------------------------------------------
    def _netlink_timeout(self, before: str) -> float:
        """Half of what is left: the kernel answers a request within our sendto(), so a longer
        wait means netlink failed us, and the fallback (`nft`) gets the other half."""
        return self.deadline.remaining(before) / 2

    def _base_exists(self) -> bool:
        """Whether our table exists with its base chains: two GETCHAIN over netlink, no process.
        If netlink itself fails us, `nft list chains` with the rest of the budget."""
        from smtp_gate import nft

        try:
            return nft.base_exists(self._netlink_timeout("looking up our table over netlink"))
        except NftError as exc:
            if not nft.netlink_failed(exc):
                raise
            self._say(f"netlink failed ({exc}); asking nft whether our table exists")
            return nft.table_exists(self.deadline.remaining("looking up our table with nft"))

    def _run_elements(self, changes) -> None:  # type: ignore[no-untyped-def]
        """CHANGES (ruleset.ElementChanges) in one netlink batch; if netlink itself failed us
        (nft.netlink_failed: no socket, no answer...), the same change with `nft -f`, which
        is just as atomic and idempotent.  Both within the budget."""
        from smtp_gate import nft

        try:
            nft.run_elements(changes, timeout=self._netlink_timeout("sending the element changes over netlink"))
        except NftError as exc:
            if not nft.netlink_failed(exc):
                raise
            self._say(f"netlink failed ({exc}); retrying the element changes with nft -f")
            # if the retry fails too, the log says whether netlink's batch may have taken effect
            self.undone += f" (netlink failed first: {exc})"
            nft.run_batch(changes.batch(), timeout=self.deadline.remaining("retrying the element changes with nft -f"))

    # -- actions --------------------------------------------------------------------------
    def ensure(self) -> None:
        """Make sure the base table exists, even if the boot service has not run, unless the
        operator switched enforcement off (`smtp-gate disable`).  The check spawns nothing."""
        self.undone = "make sure our table exists (if it is missing, the watcher or the next rebuild installs it)"
        if self._disabled() or self._base_exists():
            return
        with self.locked():
            if not self._base_exists():
                self._install_base()

    def _disabled(self) -> bool:
        """Whether the operator's off-switch is set (one open()); says so in the log.  Hooks
        still keep their records and journal then, so that `enable` comes back exact."""
        from smtp_gate import offswitch

        off = offswitch.read(self.config.disabled_path)
        if off is not None:
            self._say(f"{off.describe()}: guest {self.guest!r} runs without enforcement until `smtp-gate enable`")
        return off is not None

    def _install_base(self) -> bool:
        """Install the base table (callers hold the lock, under which `disable` removes it).
        False, and nothing installed, while the operator has switched enforcement off."""
        from smtp_gate import engine

        if self._disabled():
            return False
        outcome, _batch = engine.apply(
            self.config, list(self.state.all_records().values()), keep_kernel=True, deadline=self.deadline
        )
        self._say(f"installed the base enforcement (table was missing) for {self.guest!r}")
        for message in outcome.warnings:
            self._say(f"warning: {message}")
        return True

    def allow(self) -> None:
        from smtp_gate import nft, ruleset
        from smtp_gate.runstate import domain_event

        if self._excluded():
            return
        dom = self.domain()._replace(uri=self.uri)
        self.undone = f"add the elements of guest {dom.name!r}: it stays blocked until the next rebuild"
        with self.locked():
            record = self.record(dom)
            old = self.state.read_record(dom.uuid)
            add = record.elements()
            delete = sorted(set(old.elements()) - set(add), key=repr) if old else []
            changes = ruleset.element_changes(add=add, delete=delete)
            applied = True
            try:
                self._run_elements(changes)  # the common case: one netlink batch, no check first
            except NftError as exc:
                if not nft.missing_table_or_set(exc):
                    raise
                applied = self._install_base()  # the table was missing (prepare did not run, or a flush)
                if applied:
                    self._run_elements(changes)
            try:
                self.state.write_record(record)
            except OSError:
                if applied:  # the kernel must not keep what no record names (main() logs the error)
                    known = set(old.elements()) if old else set()
                    self._undo(dom.name, [e for e in add if e not in known], delete, bool(old))
                raise
            self.undone = (
                f"journal the start of guest {dom.name!r}: it is allowed and recorded, but a rebuild that "
                "was reading libvirt meanwhile may miss it and block it until the next rebuild"
            )
            self.state.append(domain_event("start", dom))
        if record.allowed:
            _log(f"guest {dom.name!r} allowed on {', '.join(f'#{i}/{m}' for i, m in record.allowed)}")

    def _undo(self, name: str, added: List[Tuple[str, object]], deleted: List[Tuple[str, object]], recorded: bool) -> None:
        """The record of a change the kernel took could not be written (a full or read-only
        run directory): send the inverse batch, so that the kernel holds what the records
        say, and set `undone` to what the log must say.  An allowance no record names is
        one a stop hook cannot find: the guest would be allowed while the log said blocked."""
        from smtp_gate import ruleset

        shown = ", ".join(f"{s} {{ {_show(e)} }}" for s, e in added)
        back = ", ".join(f"{s} {{ {_show(e)} }}" for s, e in deleted)
        if not added and not deleted:
            self.undone = f"record guest {name!r} in the run directory (the kernel holds what its earlier record says)"
            return
        try:
            self._run_elements(ruleset.element_changes(add=deleted, delete=added))
        except (NftError, DeadlineExceeded) as exc:
            self.undone = (
                f"record guest {name!r} in the run directory, and undoing its element changes failed too ({exc}): "
                f"the kernel holds {shown or 'nothing new'}"
                + (f" and lacks {back}" if back else "")
                + " without a record saying so; the next rebuild that reaches libvirt records or removes them"
            )
            return
        what = f"removed again what it had added ({shown})" if added else ""
        if deleted:
            what += f"{' and ' if what else ''}put back what it had removed ({back})"
        self.undone = (
            f"record guest {name!r} in the run directory; {what}: "
            + ("the kernel holds what the guest's earlier record says" if recorded else "the guest stays blocked")
            + " until the next rebuild"
        )

    def reconnect(self) -> None:
        """libvirtd restarted: one call per running guest, all at once.  Do nothing, without
        the lock and without a process, when our record already says what the kernel must
        hold AND the kernel holds each of those elements (looked up one by one over
        netlink, not a dump of the sets); otherwise restore them as `start` does."""
        from smtp_gate import nft

        if self._excluded():
            return
        dom = self.domain()
        record = self.record(dom)
        self.undone = (
            f"check the elements of guest {dom.name!r} in the kernel: a missing one stays missing "
            "(the guest blocked) until the next rebuild"
        )
        if record == self.state.read_record(dom.uuid):
            try:
                missing = nft.missing_elements(
                    record.elements(), timeout=self._netlink_timeout("looking up the guest's elements over netlink")
                )
            except NftError as exc:  # cannot tell: restoring all of them is idempotent
                _log(f"cannot look up the elements of guest {dom.name!r} over netlink ({exc}); adding them again")
                missing = record.elements()
            if not missing:
                return
            shown = ", ".join(f"{name} {{ {_show(element)} }}" for name, element in missing)
            _log(f"the kernel lacked {shown} of guest {dom.name!r}: restoring")
        self.allow()

    def revoke(self) -> None:
        from smtp_gate import nft, ruleset
        from smtp_gate.runstate import domain_event

        dom = self.domain()
        # an allowance left behind names an interface index that went with the guest's
        # device, and indexes are not reused: it lets nobody through
        self.undone = f"remove the elements of guest {dom.name!r}: the next rebuild drops them"
        with self.locked():
            record = self.state.read_record(dom.uuid)
            if record is None:
                if self.state.journal_end() and self._already_stopped(dom.uuid):
                    return
                record = self._record_from_kernel(dom)
            delete = record.elements()
            try:
                self._run_elements(ruleset.element_changes(delete=delete))
            except NftError as exc:
                # no table, nothing to remove; a table without one of our sets is broken: say so
                if not nft.missing_table_or_set(exc) or self._base_exists():
                    raise
            self.undone = (
                f"drop the record of guest {dom.name!r}: its elements are removed from the kernel, "
                "and the next rebuild drops the record"
            )
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
            for index, mac in sorted(engine.kernel_pairs(
                nft.read_table(timeout=self.deadline.remaining("reading the kernel's allowances with nft")),
                links, keep_gone=True,
            ))
            if mac in macs and (index not in names or names[index] in targets)
        ]
        ports = tuple(sorted((name, links[name].ifindex) for name in targets if name in links))
        return Record(uuid=dom.uuid, name=dom.name, guest_ports=ports, allowed=tuple(pairs))


def _show(element: object) -> str:
    return f"{element[0]} . {element[1]}" if isinstance(element, tuple) else str(element)


def _count_failure(hook: Optional[Hook]) -> None:
    """One byte appended to RUN_DIR/hook_failures, the counter behind the metric
    smtp_gate_hook_failures_total (metrics.count: never raises, never blocks).  A hook that
    could not read its configuration (the likeliest reason for every hook to fail) counts in
    the default RUN_DIR, where an unconfigured host keeps its state too."""
    try:
        from smtp_gate.config import Config
        from smtp_gate.metrics import HOOK_FAILURES, count

        count(hook.config.run_dir if hook is not None else Config._field_defaults["run_dir"], HOOK_FAILURES)
    except Exception:  # noqa: BLE001 - on the error path of a hook: its exit status matters more than a count
        pass


def main(driver: str, argv: Optional[List[str]] = None, stdin: Optional[BinaryIO] = None) -> int:
    """Entry point of hooks/<driver>.  Always returns 0 (see the module docstring)."""
    args = sys.argv[1:] if argv is None else argv
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # nothing of ours may ever reach libvirt's stdout
    deadline = Deadline(DEADLINE)
    hook: Optional[Hook] = None
    try:
        action = ACTIONS.get((driver, *(args[1:3] if len(args) >= 3 else ("", ""))))
        if action is None:
            return 0
        xml = (stdin or sys.stdin.buffer).read()
        hook = Hook(driver, args, xml, deadline)
        getattr(hook, action)()
    except (DeadlineExceeded, LockTimeout) as exc:  # the budget ran out (LockTimeout: while waiting for the lock)
        undone = hook.undone if hook else "anything: it stays blocked until the next rebuild"
        _log(
            f"{driver} hook for {args[:3]} gave up after {deadline.elapsed():.2f}s ({DEADLINE:g}s allowed) "
            f"and did not {undone}: {exc}",
            error=True,
        )
        _count_failure(hook)
    except Exception as exc:  # noqa: BLE001 - a hook must never fail a guest
        undone = hook.undone if hook else "anything: it stays blocked until the next rebuild"
        _log(
            f"{driver} hook for {args[:3]} failed after {deadline.elapsed():.2f}s "
            f"and did not {undone}: {type(exc).__name__}: {exc}",
            error=True,
        )
        _count_failure(hook)
    finally:
        sys.stdout = real_stdout
    return 0
