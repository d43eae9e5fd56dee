"""From libvirt's events to the kernel: the watcher's share of docs/protocol.md (issue 11).

libvirt_events.Follower says which guests changed (metadata of our namespace, a NIC
plugged or unplugged, a start or stop a hook may have missed) and which URIs need a full
resync (after every (re)connect).  This module, driven by the watcher's main loop, makes
the kernel and the records follow, by the same protocol as the hooks:

1. coalesce: one entry per guest, however many events named it; while a URI is being
   asked, and for ROUND_GAP after the last round began, what arrives waits for the next
   round (a storm of 1 000 metadata changes over a few guests is a few rounds, each one
   kernel transaction at most; bench/bench_events.py counts them);
2. ask libvirt WITHOUT our lock, in a thread of its own per URI, through hypervisor.py's
   deadline adapter (LIBVIRT_TIMEOUT): the main loop never waits for libvirt, so a hung
   libvirtd delays no restore of our table.  A guest libvirt no longer knows, or knows as
   stopped, is stopped; a URI that does not answer is asked again later (a full resync,
   with backoff);
3. under the main lock: re-read the off-switch, the whitelist, the links, the records;
   derive each guest's record with guests.judge (as hooks and rebuilds do); send exactly
   the difference of those guests' elements (guest_ifaces, foreign_ifaces, allowed) in
   ONE netlink batch; then write or drop their records and journal a start or stop for
   each, as hooks do, so that a rebuild reading libvirt meanwhile replays them instead
   of undoing them.  If a record cannot be written, the inverse batch goes out: the
   kernel holds what the records say.  The table check of the watcher therefore finds
   nothing to restore afterwards.
   A guest whose start or stop a hook journaled after our question to libvirt began is
   left to that hook (its XML is at least as new as ours); a journal truncated meanwhile
   by a rebuild makes the round ask again.
While the operator's off-switch is set, records and journal still follow (as the hooks
keep theirs) and the kernel is left alone; `smtp-gate enable` installs from them.  Audit
mode changes the verdict of the rules, not the elements: nothing differs here.
"""

import queue
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Set, Tuple

from smtp_gate import discovery, guests, hypervisor, libvirt_events, lock, nft, offswitch, ruleset, whitelist
from smtp_gate.config import Config
from smtp_gate.domain import Domain
from smtp_gate.errors import NftError, SmtpGateError
from smtp_gate.libvirt_events import RESYNC, Follower, reasons
from smtp_gate.runstate import Record, RunState, domain_event

LOCK_TIMEOUT = 10.0  # s, as the table check: the lock is held for moments
RETRY_MIN, RETRY_MAX = 0.5, 30.0  # s before a URI that did not answer is resynced again
# s between the starts of two rounds of one URI: the first change after a quiet spell is
# asked at once; a storm is asked about at most 1/ROUND_GAP times a second (one kernel
# transaction each, at most), its last change at most ROUND_GAP late
ROUND_GAP = 0.1


class Fetched(NamedTuple):
    """One round's answer for one URI."""

    uri: str
    why: Dict[str, Set[str]]  # uuid -> what made us ask (libvirt_events.METADATA...)
    resync: bool  # the whole URI was listed: its records not listed are of stopped guests
    offset: int  # the journal's end when the question began
    answer: Optional[hypervisor.Guests]  # None: a bug in the asking thread (said in the log)
    generation: str = ""  # the journal's generation then (RunState.journal_mark)


class Change(NamedTuple):
    uri: str
    old: Optional[Record]
    new: Optional[Record]  # None: the guest stopped, drop its record
    domain: Optional[Domain]
    why: str


class GuestSync:
    """The libvirt source of the watcher's select loop: fileno() and handle()."""

    def __init__(
        self,
        follower: Follower,
        config: Callable[[], Config],
        log: Callable[[str], None],
    ) -> None:
        self.follower = follower
        self.config = config  # the watcher's current configuration (re-read by its checks)
        self.log = log
        self.waiting: Dict[str, Dict[str, Set[str]]] = {}  # uri -> uuid -> why, not yet asked
        self.resync: Set[str] = set()
        self.busy: Set[str] = set()  # URIs being asked now
        self.answers: "queue.SimpleQueue[Fetched]" = queue.SimpleQueue()
        self.retry: Dict[str, float] = {}  # uri -> the next backoff after it did not answer
        self.asked: Dict[str, float] = {}  # uri -> when its last round began (monotonic)
        self.timed: Set[str] = set()  # URIs with a wake-up pending for their next round

    def fileno(self) -> int:
        return self.follower.fileno()

    def readable(self) -> bool:
        """watch.Source: the follower woke the loop."""
        return self.handle()

    def due(self) -> None:
        """watch.Source: no timer of its own (its timers wake the follower's descriptor)."""
        return None

    def tick(self) -> None:
        """watch.Source: nothing to do on a timer."""

    # -- the main loop's side ----------------------------------------------------------
    def handle(self) -> bool:
        """Take what the events noted and what the askers answered; apply the answers; start
        the next questions.  True when our table must be checked (it was missing).  Never
        raises for libvirt's or the kernel's troubles: they are logged and retried."""
        pending = self.follower.take()
        for (uri, uuid), why in pending.guests.items():
            self.waiting.setdefault(uri, {}).setdefault(uuid, set()).update(why)
        self.resync |= pending.resync
        fetched: List[Fetched] = []
        while True:
            try:
                fetched.append(self.answers.get_nowait())
            except queue.Empty:
                break
        check = False
        if fetched:
            for item in fetched:
                self.busy.discard(item.uri)
            try:
                check = self.apply(fetched)
            except (SmtpGateError, OSError, ValueError) as exc:
                self.log(f"could not apply libvirt's changes (retrying in {RETRY_MIN:g}s): {exc}")
                for item in fetched:
                    self._again(item)
                self._later(RETRY_MIN, self.follower.wake)
        now = time.monotonic()
        for uri in sorted(set(self.waiting) | self.resync):
            if uri in self.busy or uri in self.timed:
                continue
            wait = self.asked.get(uri, -ROUND_GAP) + ROUND_GAP - now
            if wait > 0:
                self.timed.add(uri)
                self._later(wait, lambda uri=uri: self._due(uri))  # type: ignore[misc]
            else:
                self._ask(uri)
        return check

    def _due(self, uri: str) -> None:
        """A timer's thread: URI's next round may begin (the main loop starts it)."""
        self.timed.discard(uri)
        self.follower.wake()

    def _again(self, item: Fetched) -> None:
        """Ask ITEM's question again in the next round."""
        for uuid, why in item.why.items():
            self.waiting.setdefault(item.uri, {}).setdefault(uuid, set()).update(why)
        if item.resync:
            self.resync.add(item.uri)

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        libvirt_events.later(delay, action)

    # -- asking libvirt (a thread per URI, no lock) ---------------------------------------
    def _ask(self, uri: str) -> None:
        why = self.waiting.pop(uri, {})
        resync = uri in self.resync
        self.resync.discard(uri)
        self.busy.add(uri)
        self.asked[uri] = time.monotonic()
        config = self.config()
        mark = RunState(config.run_dir).journal_mark()  # no lock: an append is one write()
        libvirt_events.spawn(self._fetch, uri, why, resync, mark, config.libvirt_timeout, name="smtp-gate-libvirt-read")

    def _fetch(self, uri: str, why: Dict[str, Set[str]], resync: bool, mark: Tuple[str, int], timeout: float) -> None:
        answer: Optional[hypervisor.Guests] = None
        try:
            if resync:
                listing = hypervisor.list_running([uri], timeout)
                running = {d.uuid: d for d in listing.domains}
                problem = listing.unreachable.get(uri) or listing.absent.get(uri)
                stopped = [u for u in why if u not in running and u not in listing.unread]
                answer = hypervisor.Guests(running, stopped, dict(listing.unread), listing.skipped, problem)
            else:
                answer = hypervisor.read_guests(uri, sorted(why), timeout)
        except SmtpGateError as exc:
            answer = hypervisor.Guests({}, [], {}, [], str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave the URI busy forever
            self.log(f"libvirt {uri}: reading guests failed: {type(exc).__name__}: {exc}")
        finally:
            self.answers.put(Fetched(uri, why, resync, mark[1], answer, mark[0]))
            self.follower.wake()

    # -- under the lock -------------------------------------------------------------------
    def apply(self, fetched: List[Fetched]) -> bool:
        """Bring the kernel and the records in line with FETCHED, in one batch.  True when our
        table was missing (the watcher's check installs it, from the records written here)."""
        usable = []
        for item in fetched:
            if item.answer is None or item.answer.unreachable is not None:
                self._unanswered(item)
            else:
                self.retry.pop(item.uri, None)
                usable.append(item)
        if not usable:
            return False
        config = self.config()
        state = RunState(config.run_dir)
        unread: List[str] = []  # one line per guest whose XML could not be read
        missing = self._apply(config, state, usable, unread)
        for line in unread:
            self.log(line)
        return missing

    def _apply(self, config: Config, state: RunState, usable: List[Fetched], unread: List[str]) -> bool:
        with lock.flock(config.lock_path, LOCK_TIMEOUT):
            off = offswitch.read(config.disabled_path)
            changes = self._changes(config, state, usable, unread)
            if not changes:
                return False
            add, delete = _difference(changes)
            missing = False
            if off is None and (add or delete):
                try:
                    nft.run_elements(ruleset.element_changes(add=add, delete=delete))
                except NftError as exc:
                    if not nft.missing_table_or_set(exc):
                        raise
                    missing = True  # the records below are what the check installs
            sent = off is None and not missing and bool(add or delete)
            self._commit(state, changes, ruleset.element_changes(add=delete, delete=add) if sent else None)
        for change in changes:
            line = _describe(change) if change.domain is not None or change.new is None else None  # unread: said above
            if line:
                self.log(line + (f" (recorded only: {off.describe()})" if off is not None else ""))
        return missing

    def _unanswered(self, item: Fetched) -> None:
        """The URI did not answer: forget this round, and resync the whole URI after a backoff
        (its events connection, if still up, cannot be trusted to have told us everything)."""
        delay = self.retry.get(item.uri, RETRY_MIN)
        self.retry[item.uri] = min(delay * 2, RETRY_MAX)
        why = item.answer.unreachable if item.answer is not None else "see above"
        what = "its guests (resync)" if item.resync else f"{len(item.why)} guest(s)"
        self.log(f"libvirt {item.uri} did not answer about {what} ({why}); resyncing it in {delay:g}s")
        self._later(delay, lambda: self.follower.want_resync(item.uri))

    def _changes(
        self, config: Config, state: RunState, fetched: List[Fetched], unread: Optional[List[str]] = None
    ) -> List[Change]:
        """Each guest whose record changes, derived as hooks derive it.  A running guest whose
        XML could not be read keeps its recorded ports and only the allowed pairs a source
        still grants (guests.still_allowed: the file, or its metadata read alone), as a
        rebuild keeps it; one line each in UNREAD."""
        records = state.all_records()
        links = discovery.read_links()
        index_of, master_of = discovery.index_of(links), discovery.master_of(links)
        text = whitelist.read_text(config.whitelist)
        matcher = lambda guest: whitelist.fast_allowed_macs(text, guest)  # noqa: E731
        generation, end = state.journal_mark()
        out: Dict[str, Change] = {}
        for item in fetched:
            # a rebuild truncated the journal (a new generation: also when appends grew it
            # back past the noted end since): what happened since is unknown
            if generation != item.generation or end < item.offset:
                self._again(item)
                self.follower.wake()
                continue
            answer = item.answer
            assert answer is not None  # apply() kept only answered rounds
            hooked = {str(e.get("uuid")) for e in state.events_since(item.offset)}
            stopped = set(answer.stopped)
            if item.resync:  # a stop no hook reported: records of this URI the listing lacks
                stopped |= {u for u, r in records.items() if r.uri == item.uri and u not in answer.running
                            and u not in answer.unread}
            for uuid, dom in answer.running.items():
                targets = [nic.target for nic in dom.nics if nic.target]
                if targets and not any(t in links for t in targets):
                    stopped.add(uuid)  # it stopped after libvirt answered: its devices are gone
                    continue
                if uuid in hooked:
                    continue
                new = guests.judge(dom, config.bridges, matcher, index_of, master_of).record(item.uri)
                old = records.get(uuid)
                if new != old:
                    out[uuid] = Change(item.uri, old, new, dom, reasons(item.why.get(uuid, {RESYNC})))
            for uuid in stopped - hooked:
                old = records.get(uuid)
                if old is not None:
                    out[uuid] = Change(item.uri, old, None, None, reasons(item.why.get(uuid, {RESYNC})))
            for uuid, guest in sorted(answer.unread.items()):
                old = records.get(uuid)
                if uuid in hooked or uuid in out:
                    continue
                if old is None:
                    if unread is not None:
                        unread.append(f"guest {guest.name!r} ({uuid}) on {guest.uri}: its XML could not be read "
                                      f"({guest.why}); {guest.metadata_text()}; no record of it: its NICs stay blocked")
                    continue
                alive = {link.ifindex for link in links.values()}
                if not any(index in alive for _name, index in old.guest_ports + old.foreign_ports):
                    out[uuid] = Change(item.uri, old, None, None, reasons(item.why.get(uuid, {RESYNC})))
                    continue  # its devices are gone: it stopped, whatever libvirt said
                kept = guests.still_allowed(old, matcher, guest.allow, guest.allow_error is None)
                if unread is not None:
                    unread.append(guest.outcome(old.guest_ports, old.allowed, kept))
                if kept != old.allowed:
                    new = old._replace(allowed=kept)
                    out[uuid] = Change(item.uri, old, new, None, reasons(item.why.get(uuid, {RESYNC})))
        return list(out.values())

    def _commit(self, state: RunState, changes: List[Change], undo: Optional[ruleset.ElementChanges]) -> None:
        """Write or drop each record, journal it; if that fails after the kernel took the
        batch, put back the records already written and send UNDO (the kernel then holds
        what the records say), then raise."""
        done: List[Change] = []
        try:
            for change in changes:
                uuid = (change.new or change.old).uuid  # type: ignore[union-attr]
                if change.new is not None:
                    state.write_record(change.new)
                else:
                    state.drop_record(uuid)
                done.append(change)
            for change in changes:
                line = _journal_line(change)
                if line is not None:
                    state.append(line)
        except OSError as exc:
            for change in done:
                try:
                    if change.old is not None:
                        state.write_record(change.old)
                    else:
                        state.drop_record(change.new.uuid)  # type: ignore[union-attr]
                except OSError:
                    pass  # the next rebuild that reaches libvirt writes every record anew
            if undo is not None and (undo.add or undo.delete):
                nft.run_elements(undo)
            raise SmtpGateError(
                f"cannot record libvirt's changes in the run directory {state.dir!r} ({exc.strerror or exc}): "
                + ("the kernel change was undone" if undo is not None else "the kernel was not changed")
            ) from None


def _difference(changes: List[Change]) -> Tuple[List[Tuple[str, object]], List[Tuple[str, object]]]:
    """(add, delete): exactly what differs between the old and new records of CHANGES."""
    add: List[Tuple[str, object]] = []
    delete: List[Tuple[str, object]] = []
    for change in changes:
        old = set(change.old.elements()) if change.old is not None else set()
        new = set(change.new.elements()) if change.new is not None else set()
        add += sorted(new - old, key=repr)
        delete += sorted(old - new, key=repr)
    return add, delete


def _journal_line(change: Change) -> Optional[Dict[str, object]]:
    """A start (with the XML's facts, for a rebuild to replay) or a stop, as hooks journal them;
    None for a guest whose XML could not be read (no facts to replay: a rebuild narrows its
    record itself, and never widens one)."""
    if change.new is not None and change.domain is None:
        return None
    if change.new is not None and change.domain is not None:
        return domain_event("start", change.domain._replace(uri=change.uri))
    record = change.old or change.new
    return domain_event("stop", Domain(name=record.name, uuid=record.uuid, type="", nics=(), uri=change.uri))  # type: ignore[union-attr]


def _pairs(record: Optional[Record]) -> Set[Tuple[int, str]]:
    return set(record.allowed) if record is not None else set()


def _ports(record: Optional[Record]) -> Set[Tuple[str, int]]:
    return set(record.guest_ports) if record is not None else set()


def _describe(change: Change) -> Optional[str]:
    """One line for a guest whose allowance or guest ports changed; None when only the
    record's bookkeeping did (its name, URI, a kept record seen again)."""
    record = change.new or change.old
    assert record is not None
    names = {index: name for name, index in _ports(change.old) | _ports(change.new)}
    show = lambda pairs: ", ".join(f"{names.get(i, f'#{i}')}/{m}" for i, m in sorted(pairs))  # noqa: E731
    gained = _pairs(change.new) - _pairs(change.old)
    lost = _pairs(change.old) - _pairs(change.new)
    ports_new = {n for n, _i in _ports(change.new) - _ports(change.old)}
    ports_gone = {n for n, _i in _ports(change.old) - _ports(change.new)}
    parts = []
    if change.new is None:
        parts.append("stopped: " + (f"allowance removed ({show(lost)})" if lost else "its ports removed"))
    else:
        if gained:
            parts.append(f"allowed on {show(gained)}")
        if lost:
            parts.append(f"allowance removed on {show(lost)}")
        blocked = ports_new - {names.get(i) for i, _m in _pairs(change.new)}
        if blocked:
            parts.append(f"new guest port(s) {', '.join(sorted(blocked))} blocked")
        if ports_gone:
            parts.append(f"port(s) {', '.join(sorted(ports_gone))} gone")
    if not parts:
        return None
    return f"guest {record.name!r}: {'; '.join(parts)} ({change.why})"

