"""`smtp-gate watch`: put our table back at once when anything else changes it.

`nft flush ruleset` (Debian's /etc/nftables.conf begins with it, so does many a script),
`systemctl restart nftables`, an admin's typo or a tool that "cleans up" can remove our
table, delete or insert a rule, or add and remove set elements (a foreign allowance, a port
taken out of `blocked_ports`); the 60 s rebuild timer would leave guests open for up to a
minute.  This process follows nftables' own change events over netlink (nfnetlink.py:
multicast group NFNLGRP_NFTABLES; no `nft monitor` child, nothing to parse) and keeps the
table as it should be.

Ours or foreign?  Our own writers change the table too: hooks add and remove elements of
`guest_ifaces`, `foreign_ifaces` and `allowed` at every guest start and stop, the whitelist
commands change `allowed`, `apply`/`rebuild` rewrite everything in one transaction.  An
event cannot say which is which (the sender's netlink port id names a process, not a
purpose), so the watcher does not judge events: it judges the STATE they leave.  Every
legitimate writer changes the kernel and the run directory's per-guest records together,
under the main lock.  So, after any event touching our table, and a short debounce (one
check per burst, whatever its size), the watcher takes the main lock and compares:
- the dynamic sets (`guest_ifaces`, `foreign_ifaces`, `allowed`) with exactly what
  engine.compute() derives from the configuration, the links and the records
  (runstate.RunState.all_records()), key by key over netlink.  Elements a record holds for
  a device that is gone are the record's, not foreign (gone_keys(): a stopping guest's
  taps vanish with QEMU, before libvirt runs the stop hook that removes them);
- the fixed part (chains, rules, set definitions, counters by name, and the elements of
  `uplinks`, `blocked_ports`, `relay4`, `relay6`) with how the kernel rendered that same
  fixed part right after this watcher last installed it (without the interval end mark at
  0 that nft adds only to a set that existed before its batch, nfnetlink.interval_sentinel:
  a table that `enable` or `apply` created anew reads back as the watcher's own).  The
  expected text is regenerated from the configuration (re-read at every check, so
  `ports-set` is not undone); a text this watcher has not installed yet (at start, after a
  configuration or uplink change) counts as different, so it is installed once and its
  rendering remembered.  Comparing
  the kernel's rendering with itself avoids re-implementing nft's JSON for every rule.
When they differ, it re-applies exactly that state (engine.apply without keep_kernel:
kernel elements that no record accounts for are not ours, so a foreign allowance on an
existing port is removed too) and logs what differed.  Its own restore causes events as
well; they lead to one more comparison, which finds nothing to do.  Statistics (the
`attempts` set, counter values) are never compared.

Never behind libvirt (issue 10, 5a): the restore takes only the main lock, which nothing
holds while it talks to libvirt, never rebuild.lock (a rebuild from the timer holds that
while libvirtd may hang), and asks libvirt nothing.  Our records are what hooks and
rebuilds derived from libvirt; the timer's rebuild catches up with anything else.

libvirt (issue 11): no hook runs when an orchestrator sets a guest's allowance in its
metadata or hot-plugs a NIC.  The loop also serves SOURCES, each a file descriptor and a
handler; libvirt's domain events are one (libvirt_events.py follows them in threads,
guest_sync.py brings the guests they name into the kernel and the records, asking libvirt
in threads of its own, without our lock, and taking the main lock only to apply one batch).
Those changes go with their records, as a hook's do, so the check above agrees with them.
The abuse desk (abuse.py, issue 12: blocked attempts from NFLOG) is another source.  No
source delays a check: the restore never waits for libvirt.

Overruns: a full receive buffer loses events, and the next read fails with ENOBUFS; that
counts as "anything may have changed": the state is compared as above.

Children: none but `nft -f`/`nft -j list` of a check, each waited for, and the abuse desk's
ON_BLOCKED commands (abuse.py reaps them); SIGTERM ends the process through SystemExit, so
a running nft is waited for too.

While the operator has switched enforcement off (`smtp-gate disable`, offswitch.py) it
restores nothing: the check reads the off-switch under the lock, as every unattended writer
does.  It then stops following events and looks for the off-switch once a second; when it
is gone (`smtp-gate enable`, or the file removed by hand) it says so, follows events again
and repairs what is missing; when nothing is (`enable` installed it all), its first check
says so instead of claiming a change.
"""

import errno
import json
import select
import signal
import sys
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from smtp_gate import config as config_mod
from smtp_gate import abuse, discovery, engine, lock, metrics, nfnetlink, nft, offswitch, ruleset
from smtp_gate.config import Config
from smtp_gate.errors import EnforcementDisabled, SmtpGateError
from smtp_gate.runstate import Record, RunState

DEBOUNCE = 0.05  # s of quiet that ends a burst of events
MAX_DELAY = 0.25  # s from a burst's first event to its check, however long the burst
RETRY = 1.0  # s before a check that failed (nft refused, lock busy) is tried again
LOCK_TIMEOUT = 10.0  # s: the main lock is held for moments (hooks wait at most 5 s)
DYNAMIC_SETS = ("guest_ifaces", "foreign_ifaces", "allowed")
FIXED_SETS = tuple(name for name in ruleset.STATE_SETS if name not in DYNAMIC_SETS)
_VOLATILE = frozenset(("handle", "packets", "bytes"))  # a rebuild renumbers; traffic counts
_REMEMBERED = 8  # fixed-part renderings kept (configurations seen lately)


def relevant(event: nfnetlink.Event) -> bool:
    """Whether EVENT changed our table (statistics aside: the datapath fills `attempts` and
    the events' rate meter `log_ports`)."""
    return (
        event.family == nfnetlink.NFPROTO_BRIDGE
        and event.table == ruleset.TABLE
        and event.set_name not in ruleset.DATAPATH_SETS
    )


def _strip(value: object) -> object:
    """nft JSON without what changes by itself: handles and traffic counts."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def expected_keys(desired: ruleset.Desired) -> Dict[str, set]:
    """The dynamic sets' keys, in the kernel's bytes, for DESIRED."""
    return {
        "guest_ifaces": {nfnetlink.index_key(i) for i in desired.guest_ifaces},
        "foreign_ifaces": {nfnetlink.index_key(i) for i in desired.foreign_ifaces},
        "allowed": {nfnetlink.pair_key(i, m) for i, m in desired.allowed},
    }


def gone_keys(records: Sequence[Record], links: Dict[str, discovery.Link]) -> Dict[str, set]:
    """The dynamic sets' keys that RECORDS hold for devices that no longer exist.

    A guest's tap goes with its QEMU process, and libvirt runs the `stopped end` hook, which
    removes the guest's elements with its record under the main lock, only afterwards (2 s
    later, measured with libvirt 9.0 on `virsh destroy`; at the end of every migration out
    too).  The link change wakes this watcher in between: engine.compute() leaves such
    elements out (a gone index matches nothing), but the record still accounts for them, so
    they are neither foreign nor worth a restore; the stop hook removes them."""
    present = {link.ifindex for link in links.values()}
    out: Dict[str, set] = {name: set() for name in DYNAMIC_SETS}
    for record in records:
        for name, element in record.elements():
            index = element[0] if isinstance(element, tuple) else element
            if index in present:
                continue
            try:
                out[name].add(nfnetlink.pair_key(*element) if isinstance(element, tuple) else nfnetlink.index_key(element))
            except ValueError:
                continue  # no valid key: the kernel cannot hold it either
    return out


def fixed_text(desired: ruleset.Desired) -> str:
    """The fixed part of DESIRED as nft commands: everything but the dynamic sets' elements."""
    fixed = desired._replace(guest_ifaces=(), foreign_ifaces=(), allowed=())
    return ruleset.apply_batch(fixed).text()


class Kernel:
    """Our table as the kernel holds it, read for one comparison."""

    def __init__(self, fixed: str, keys: Dict[str, set]) -> None:
        self.fixed = fixed  # a canonical rendering of the fixed part
        self.keys = keys  # dynamic set -> its keys

    @classmethod
    def read(cls) -> Optional["Kernel"]:
        """None when our table does not exist."""
        result = nft._run(["-j", "-t", "list", "table", ruleset.FAMILY, ruleset.TABLE])
        if result.returncode != 0:
            if "No such file or directory" in result.stderr:
                return None
            raise SmtpGateError(f"nft list table {ruleset.T} failed: {result.stderr.strip()}")
        listing = [item for item in json.loads(result.stdout).get("nftables", []) if "metainfo" not in item]
        elements: Dict[str, List[str]] = {}
        keys: Dict[str, set] = {}
        try:
            for name in FIXED_SETS:
                raw = nfnetlink.list_raw_elements(name, ruleset.TABLE)
                elements[name] = sorted(e.hex() for e in raw if not nfnetlink.interval_sentinel(e))
            for name in DYNAMIC_SETS:
                keys[name] = set(nfnetlink.list_elements(name, ruleset.TABLE))
        except nfnetlink.NetlinkError as exc:
            if not exc.missing:
                raise
            return cls(f"(a set is missing: {exc})", {})
        fixed = json.dumps({"objects": _strip(listing), "elements": elements}, sort_keys=True)
        return cls(fixed, keys)


NOT_YET_CHECKED = "its rules and set definitions are not yet checked against this configuration"


def differences(
    kernel: Optional[Kernel], desired: ruleset.Desired, known_fixed: Optional[str], gone: Optional[Dict[str, set]] = None
) -> List[str]:
    """How KERNEL differs from DESIRED, one phrase each; empty when it holds just that.
    KNOWN_FIXED: the kernel's rendering of DESIRED's fixed part, if this watcher installed it.
    GONE (gone_keys()): keys a record holds for a device that is gone: no difference while
    the kernel holds them, nor once it does not."""
    if kernel is None:
        return ["our table is missing"]
    out = []
    if known_fixed is None:
        out.append(NOT_YET_CHECKED)
    elif kernel.fixed != known_fixed:
        out.append("its chains, rules, set definitions or fixed sets changed")
    for name, want in expected_keys(desired).items():
        have = kernel.keys.get(name)
        if have is None:
            continue  # a missing set was reported through the fixed part
        extra, missing = len(have - want - (gone or {}).get(name, set())), len(want - have)
        if extra or missing:
            out.append(f"set {name} has {extra} element(s) no record accounts for and lacks {missing}")
    return out


class Keeper:
    """Compares our table with what it should be, and restores it; remembers how the kernel
    rendered each fixed part it installed (a few, for configurations seen lately)."""

    def __init__(self, config: Config, log: Callable[[str], None]) -> None:
        self.config = config
        self.log = log
        self.rendered: "OrderedDict[str, str]" = OrderedDict()
        self.was_disabled = False  # the last check found the off-switch: the next one says what it found

    def _reload(self) -> Config:
        """The configuration as it is now (`ports-set` changes it); the last good one if it
        cannot be read, so a typo in the file does not leave the host without enforcement."""
        try:
            self.config = config_mod.load(self.config.path)
        except SmtpGateError as exc:
            self.log(f"cannot re-read the configuration, using the last good one: {exc}")
        return self.config

    def check(self) -> bool:
        """Compare and, if they differ, restore; True if it restored.  Raises EnforcementDisabled
        while the operator's off-switch is set (nothing is installed then)."""
        with lock.flock(self.config.lock_path, LOCK_TIMEOUT):
            started = time.monotonic()
            off = offswitch.read(self.config.disabled_path)
            if off is not None:
                self.was_disabled = True
                raise EnforcementDisabled(off)
            config = self._reload()
            links = discovery.read_links()
            records = list(RunState(config.run_dir).all_records().values())
            desired = engine.compute(config, links, records, None).desired
            text = fixed_text(desired)
            found = differences(Kernel.read(), desired, self.rendered.get(text), gone_keys(records, links))
            after_enable, self.was_disabled = self.was_disabled, False
            if not found:
                if after_enable:  # `enable` installed it: say it was looked at, and that nothing was wrong
                    self.log(f"checked our table after enable in {time.monotonic() - started:.3f}s: "
                             "it holds what the configuration and the records say, nothing to restore")
                return False
            outcome, _batch = engine.apply(config, records, links=links)
            after = Kernel.read()
            if after is not None and outcome.desired == desired:
                self.rendered[text] = after.fixed
                self.rendered.move_to_end(text)
                while len(self.rendered) > _REMEMBERED:
                    self.rendered.popitem(last=False)
            if found == [NOT_YET_CHECKED]:
                # nothing was wrong: the first look at a configuration installs it once, to
                # learn how the kernel renders its rules (later changes to them are undone)
                self.log(f"checked our table against this configuration in {time.monotonic() - started:.3f}s")
            else:
                metrics.count(config.run_dir, metrics.TABLE_RESTORES)  # smtp_gate_table_restores_total
                self.log(f"{'; '.join(found)}; restored in {time.monotonic() - started:.3f}s")
            return True


RTNLGRP_LINK = 1
NETLINK_ROUTE = 0


def open_link_events() -> object:
    """A socket told of every link change of this network namespace (rtnetlink's link group).
    A port moved onto a protected bridge keeps its interface index, and with it an exemption
    as a port of an unprotected bridge, and no nftables event says so: a link change makes
    the watcher check, and the check recomputes which ports are foreign from their masters."""
    import socket

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        sock.bind((0, 1 << (RTNLGRP_LINK - 1)))
    except OSError:
        sock.close()
        raise
    return sock


def _drain_links(sock: object) -> bool:
    """Read one datagram of link events: any of them (or a lost batch) calls for a check."""
    try:
        sock.recv(1 << 16)  # type: ignore[attr-defined]
    except OSError as exc:
        if exc.errno != errno.ENOBUFS:
            raise
    return True


def _wait_readable(socks: List[object], timeout: Optional[float]) -> List[object]:
    ready, _, _ = select.select(socks, [], [], timeout)
    return ready


class Source(Protocol):
    """Something else the loop serves (guest_sync.GuestSync, abuse.Desk): a descriptor to
    read when readable, and a timer (due(): a time.monotonic() value, or None) to tick.
    readable() returns True when our table must be checked (a source found it missing);
    sources never raise for their own troubles: they log them."""

    def fileno(self) -> int: ...
    def readable(self) -> Optional[bool]: ...
    def due(self) -> Optional[float]: ...
    def tick(self) -> None: ...


def _serve(sources: Sequence[Source], ready: List[object]) -> bool:
    """Serve each ready or due source; whether one asked for a check."""
    wanted = False
    for source in sources:
        if source in ready:
            wanted = bool(source.readable()) or wanted
        due = source.due()
        if due is not None and time.monotonic() >= due:
            source.tick()
    return wanted


def _drain(sock: object) -> Tuple[bool, bool]:
    """Read one datagram: (relevant event seen, events were lost)."""
    try:
        return any(relevant(e) for e in nfnetlink.read_events(sock)), False  # type: ignore[arg-type]
    except OSError as exc:
        if exc.errno == errno.ENOBUFS:
            return False, True
        raise


def follow(
    sock: object,
    check: Callable[[], bool],
    log: Callable[[str], None],
    links: Optional[object] = None,
    sources: Sequence["Source"] = (),
) -> None:
    """Check at once, then after every burst of events touching our table (or, with LINKS,
    of link changes, or when a source asks for it), until CHECK raises EnforcementDisabled.
    A check that failed is tried again after RETRY seconds.  SOURCES (libvirt's events, the
    abuse desk) are served in between: they never delay a due check, and a check never
    waits for them."""
    burst_first: Optional[float] = None  # when the pending burst began
    burst_due: Optional[float] = time.monotonic()  # at start a removal would have gone unseen
    retry_due: Optional[float] = None
    while True:
        due = min((d for d in (burst_due, retry_due) if d is not None), default=None)
        now = time.monotonic()
        if due is not None and now >= due:
            burst_first = burst_due = retry_due = None
            try:
                check()
            except (SmtpGateError, OSError, ValueError) as exc:
                if isinstance(exc, EnforcementDisabled):
                    raise
                # nft refused, the lock stayed busy, a listing failed: try again soon
                log(f"could not check or restore our table (retrying in {RETRY:g}s): {exc}")
                retry_due = time.monotonic() + RETRY
            continue
        wake = min((d for d in [due, *(src.due() for src in sources)] if d is not None), default=None)
        ready = _wait_readable([sock] + ([links] if links is not None else []) + list(sources),
                               None if wake is None else max(0.0, wake - now))
        seen = _serve(sources, ready)
        if sock not in ready and (links is None or links not in ready) and not seen:
            continue
        lost = False
        if sock in ready:
            drained, lost = _drain(sock)
            seen = drained or seen
        if links is not None and links in ready:
            seen = _drain_links(links) or seen
        if lost:
            log("nftables events were lost (receive buffer overrun): checking our table")
        if seen or lost:
            now = time.monotonic()
            burst_first = now if burst_first is None else burst_first
            # a burst ends after DEBOUNCE of quiet, or MAX_DELAY after it began
            burst_due = min(now + DEBOUNCE, burst_first + MAX_DELAY)


def watch(
    keeper_check: Callable[[], bool],
    log: Callable[[str], None],
    disabled: Callable[[], Optional[offswitch.Disabled]],
    open_events: Callable[[], object] = nfnetlink.open_events,
    poll: float = 1.0,
    open_links: Optional[Callable[[], object]] = open_link_events,
    sources: Sequence["Source"] = (),
) -> None:
    """Run until killed: follow events while enforcement is on; while the operator's off-switch
    is set, look for it to go away once every POLL seconds, and keep serving SOURCES (the
    libvirt events still update the records then, as the hooks do)."""
    while True:
        sock = open_events()  # subscribed before the first check: no change falls in between
        links = open_links() if open_links is not None else None
        log("following nftables events" + (" and link changes" if links is not None else ""))
        try:
            follow(sock, keeper_check, log, links, sources)
        except EnforcementDisabled as exc:
            log(f"our table changed or is missing, but {exc}")
        finally:
            sock.close()  # type: ignore[attr-defined]
            if links is not None:
                links.close()  # type: ignore[attr-defined]
        while disabled() is not None:
            _serve(sources, _wait_readable(list(sources), poll))
        log("enforcement was re-enabled (the off-switch is gone): following nft events again")


def _terminate(_signum: int, _frame: object) -> None:
    raise SystemExit(0)  # unwinds: a running nft child is killed and waited for by subprocess


def main_loop(config: Config) -> int:
    def log(message: str) -> None:
        print(f"smtp-gate watch: {message}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _terminate)
    keeper = Keeper(config, log)
    # metrics (metrics.py): a thread of their own rewrites the file every REFRESH seconds,
    # and at once after a restore; a slow `nft list` there never delays a restore
    refresher = metrics.Refresher(lambda: keeper.config, log)
    refresher.start()

    def check() -> bool:
        restored = keeper.check()
        if restored:
            refresher.poke()
        return restored

    sources: List[Source] = list(libvirt_sources(keeper, log))
    desk = abuse.open_desk(config, log)  # blocked attempts (issue 12); None: not followed
    if desk is not None:
        sources.append(desk)
        desk.write_stats()
    else:
        _write_unbound(config, log)  # RUN_DIR/abuse.json says so ("bound": 0) to status and metrics
    try:
        watch(check, log, lambda: offswitch.read(config.disabled_path), sources=sources)
    finally:
        if desk is not None:
            # SIGTERM's SystemExit too: open journal intervals and the store are written, and
            # a second SIGTERM must not cut that short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            desk.close()
    return 0


def _write_unbound(config: Config, log: Callable[[str], None]) -> None:
    try:
        abuse.write_stats(config.run_dir, abuse.unbound_stats())
    except SmtpGateError as exc:
        log(str(exc))


def libvirt_sources(keeper: Keeper, log: Callable[[str], None]) -> Tuple[Source, ...]:
    """The libvirt events of the configured URIs as a source of the loop (issue 11:
    guest_sync.py); none when libvirt-python is missing (said once in the log)."""
    from smtp_gate import guest_sync, libvirt_events

    follower = libvirt_events.Follower(keeper.config.uris(), log)
    if not follower.start():
        return ()
    sync = guest_sync.GuestSync(follower, lambda: keeper.config, log)
    return (sync,)

