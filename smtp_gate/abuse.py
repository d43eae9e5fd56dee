"""The abuse desk inside `smtp-gate watch`: blocked attempts read from the NFLOG group
(nflog.py), attributed to guests, written to the journal (journal.py), counted into the
report's store (store.py), and handed to ON_BLOCKED.

One object, Desk, is a source of the watcher's select loop: fileno() (the NFLOG socket),
readable() (read one datagram), due() and tick() (timers: the end of an aggregation
interval, a store flush, a child past its deadline).  Nothing here can stop enforcement:
the drop is a rule of its own, a slow desk only loses events (counted), and errors of the
desk are logged, never raised into the watcher's loop.

Packets and connection attempts: the kernel logs packets; one connect() whose SYN is
retransmitted (an 8 s timeout: 7 SYNs on Linux 6.5+) is several.  A connection
attempt is a logged TCP segment with SYN and without ACK (from the copied header) that is
not a retransmission of one seen within RETRANSMIT seconds (same port, addresses, TCP
ports and sequence number: Connections); entries, the store and the report carry both
counts, and ON_BLOCKED's threshold counts connection attempts.

Journal entries: the first attempt of a guest port opens an interval of EVENT_INTERVAL
seconds and is written at once (SMTP_GATE_COUNT=1); the attempts that follow within the
interval are counted and written as one entry at its end (SMTP_GATE_COUNT=n packets,
SMTP_GATE_CONNECTIONS=c, the fields of the last attempt), and the next interval begins; an
interval without attempts closes.  At the watcher's exit (SIGTERM included) every open
interval is written: nothing counted is left unsaid.  So
a flooding guest costs at most one entry per EVENT_INTERVAL, whatever MACs it spoofs (the
key is its port), plus one when it starts.

ON_BLOCKED: when the connection attempts of a guest (its UUID; an unknown port by index)
within the last ON_BLOCKED_WINDOW seconds reach ON_BLOCKED_THRESHOLD, the command runs once
with a JSON description on stdin, and not again for that guest before a window has passed
(remembered in STATE_DIR/on_blocked.json, so a watcher restart does not run it again).  It
is a child in a session of its own that the watcher never waits for: reaped by tick()
without blocking, killed (its whole process group) after ON_BLOCKED_TIMEOUT; a failure is
logged and counted (stats()).

Statistics: Desk.stats() (bound, events, overruns, kernel_drops, journal_entries,
journal_lost, on_blocked_runs, on_blocked_failures, store_full), also written atomically to
RUN_DIR/abuse.json (with "updated", unix time) every EVENT_INTERVAL and at exit, for
`status` and the metrics outside the watcher.
"""

import collections
import datetime
import errno
import json
import os
import signal
import socket
import stat
import subprocess
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

from smtp_gate import files, nflog
from smtp_gate.config import Config
from smtp_gate.errors import SmtpGateError
from smtp_gate.journal import PRIORITY_WARNING, Journal
from smtp_gate.nflog import Attempt, Attributor, Guest
from smtp_gate.nfnetlink import NetlinkError
from smtp_gate.runstate import RunState
from smtp_gate.store import Store

Log = Callable[[str], None]

STATS_FILE = "abuse.json"  # in RUN_DIR
FIRED_FILE = "on_blocked.json"  # in STATE_DIR: when ON_BLOCKED last ran, per guest
STATS_KEYS = ("bound", "events", "overruns", "kernel_drops", "journal_entries", "journal_lost",
              "on_blocked_runs", "on_blocked_failures", "store_full")
MAX_LISTED = 20  # sources and MACs listed in ON_BLOCKED's JSON; destinations: 5


def iso(seconds: float) -> str:
    """Unix time as ISO 8601 UTC, as `report` prints it."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def command_problem(argv: Tuple[str, ...]) -> Optional[str]:
    """Why ON_BLOCKED's command cannot run (missing, not a regular file, not executable), or None."""
    if not argv:
        return None
    path = argv[0]
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"ON_BLOCKED command {path!r} cannot be used: {exc.strerror}; expected an executable file"
    if not stat.S_ISREG(info.st_mode):
        return f"ON_BLOCKED command {path!r} is not a regular file; expected an executable file"
    if not os.access(path, os.X_OK):
        return f"ON_BLOCKED command {path!r} is not executable; expected an executable file (chmod +x)"
    return None


def config_problems(config: Config) -> List[str]:
    """What keeps the abuse desk from doing what the configuration asks: for `apply`,
    `status`, `debug` (a warning each, exit 3) and the watcher's start."""
    out = []
    if config.on_blocked and config.log_group is None:
        out.append('ON_BLOCKED is set but LOG_GROUP is "off": blocked attempts are not followed, '
                   "so the command never runs (set LOG_GROUP, e.g. 2525)")
    problem = command_problem(config.on_blocked)
    if problem:
        out.append(problem)
    if config.on_blocked and config.log_group is not None:
        logged = config.log_group_burst + per_second(config.log_group_rate) * config.on_blocked_window
        if config.on_blocked_threshold > logged:
            out.append(f"ON_BLOCKED_THRESHOLD={config.on_blocked_threshold} can never be reached within "
                       f"ON_BLOCKED_WINDOW={config.on_blocked_window:g}s: a port has at most LOG_GROUP_BURST + "
                       f"LOG_GROUP_RATE x window = {config.log_group_burst} + {config.log_group_rate} x "
                       f"{config.on_blocked_window:g}s = {int(logged)} attempts logged (lower the threshold, or "
                       "raise LOG_GROUP_RATE, LOG_GROUP_BURST or the window)")
    return out


def per_second(rate: str) -> float:
    """"50/second", "3/minute"... as events per second (config.py checked its form)."""
    count, _, unit = rate.partition("/")
    return int(count) / {"second": 1, "minute": 60, "hour": 3600, "day": 86400}[unit]


def read_stats(run_dir: str) -> Optional[Dict[str, int]]:
    """RUN_DIR/abuse.json as the watcher last wrote it; None if absent or unreadable."""
    try:
        with open(os.path.join(run_dir, STATS_FILE), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_stats(run_dir: str, stats: Dict[str, int], now: Optional[float] = None) -> None:
    """Replace RUN_DIR/abuse.json atomically: STATS and "updated" (unix time). Raises SmtpGateError."""
    document = dict(stats, updated=int(time.time() if now is None else now))
    files.atomic_write(os.path.join(run_dir, STATS_FILE), (json.dumps(document, sort_keys=True) + "\n").encode(),
                       "the abuse desk's statistics", new_mode=0o644)


def unbound_stats() -> Dict[str, int]:
    """The statistics of a watcher that follows no blocked attempts (LOG_GROUP off, group not bound)."""
    return {key: 0 for key in STATS_KEYS}


def destination(attempt: Attempt) -> str:
    """"192.0.2.25:25" or "[2001:db8::25]:25", as the report and ON_BLOCKED name it."""
    return f"[{attempt.dst}]:{attempt.dport}" if attempt.family == 6 else f"{attempt.dst}:{attempt.dport}"


class TopK:
    """The heaviest hitters of a stream in bounded memory (space-saving, Metwally et al.):
    K counters; a new item takes the smallest one's place, inheriting its count as its
    possible error, so an item seen more than total/K times is always among them, whatever
    came first.  top() ranks by that estimate and gives each item's guaranteed count (the
    estimate less its error): never more than it was seen."""

    __slots__ = ("k", "counts", "errors")

    def __init__(self, k: int = 20) -> None:
        self.k = k
        self.counts: Dict[str, int] = {}
        self.errors: Dict[str, int] = {}

    def add(self, item: str, n: int = 1) -> None:
        if item in self.counts or len(self.counts) < self.k:
            self.counts[item] = self.counts.get(item, 0) + n
            return
        smallest = min(self.counts, key=self.counts.__getitem__)
        floor = self.counts.pop(smallest)
        self.errors.pop(smallest, None)
        self.counts[item], self.errors[item] = floor + n, floor

    def top(self, n: int) -> List[Tuple[str, int]]:
        return [(item, count - self.errors.get(item, 0)) for item, count in _ranked(self.counts, n)]


TOP_DESTINATIONS = 3  # in a journal entry: SMTP_GATE_TOP_DESTINATIONS


def fields(attempt: Attempt, guest: Guest, count: int, connections: int, message: str,
           top: Optional[TopK] = None) -> Dict[str, object]:
    """A journal entry's fields: stable names (README "Abuse desk")."""
    ranked = top.top(TOP_DESTINATIONS) if top is not None else [(destination(attempt), 1)]
    return {
        "MESSAGE": message,
        "PRIORITY": PRIORITY_WARNING,
        "SYSLOG_IDENTIFIER": "smtp-gate",
        "SMTP_GATE_EVENT": "blocked",
        "SMTP_GATE_GUEST": guest.name,
        "SMTP_GATE_UUID": guest.uuid,
        "SMTP_GATE_MAC": attempt.mac,
        "SMTP_GATE_IFACE": guest.iface,
        "SMTP_GATE_IFINDEX": attempt.ifindex,
        "SMTP_GATE_FAMILY": f"ipv{attempt.family}",
        "SMTP_GATE_SRC": attempt.src,
        "SMTP_GATE_DST": attempt.dst,
        "SMTP_GATE_SPORT": attempt.sport,
        "SMTP_GATE_DPORT": attempt.dport,
        "SMTP_GATE_MODE": attempt.mode,
        "SMTP_GATE_COUNT": count,  # logged packets
        "SMTP_GATE_CONNECTIONS": connections,  # connection attempts (SYN without ACK) among them
        # the interval's most attempted destinations (bounded heavy hitters), not the last one's
        "SMTP_GATE_TOP_DESTINATIONS": " ".join(f"{d}={n}" for d, n in ranked),
    }


class Connections:
    """Tells a new connection attempt from a retransmitted SYN: the SYNs seen within the last
    RETRANSMIT seconds (Linux gives up on a SYN after about 127 s), at most LIMIT of them
    (the oldest forgotten first: a flood of spoofed ports costs memory up to LIMIT, and
    only makes a later retransmission count once more)."""

    RETRANSMIT = 130.0
    LIMIT = 65536

    def __init__(self) -> None:
        self.seen: "collections.OrderedDict[tuple, float]" = collections.OrderedDict()

    def new(self, attempt: Attempt, now: float) -> bool:
        """Whether ATTEMPT opens a connection (a SYN not seen before); remembers it."""
        if not attempt.syn:
            return False
        while self.seen and (len(self.seen) >= self.LIMIT or next(iter(self.seen.values())) <= now - self.RETRANSMIT):
            self.seen.popitem(last=False)
        key = (attempt.ifindex, attempt.src, attempt.sport, attempt.dst, attempt.dport, attempt.seq)
        if key in self.seen:
            return False
        self.seen[key] = now
        return True


class _Interval:
    __slots__ = ("ends", "count", "connections", "last", "guest", "top")

    def __init__(self, ends: float, attempt: Attempt, guest: Guest) -> None:
        self.ends, self.count, self.connections, self.last, self.guest = ends, 0, 0, attempt, guest
        self.top = TopK()


class Aggregator:
    """One journal entry per attempt, or per guest port per INTERVAL under a flood."""

    def __init__(self, interval: float, write: Callable[[Dict[str, object]], object]) -> None:
        self.interval = interval
        self.write = write
        self.open: Dict[int, _Interval] = {}
        self.entries = 0

    def add(self, attempt: Attempt, guest: Guest, now: float) -> None:
        current = self.open.get(attempt.ifindex)
        if current is None:
            self.open[attempt.ifindex] = _Interval(now + self.interval, attempt, guest)
            self._write(fields(attempt, guest, 1, int(attempt.syn), nflog.describe(attempt, guest)))
            return
        current.count += 1
        current.connections += int(attempt.syn)
        current.last, current.guest = attempt, guest
        current.top.add(destination(attempt))

    def due(self) -> Optional[float]:
        return min((i.ends for i in self.open.values()), default=None)

    def tick(self, now: float, final: bool = False) -> None:
        """Write the intervals that ended (FINAL: every one with attempts, at the watcher's exit)."""
        for ifindex, interval in list(self.open.items()):
            if now < interval.ends and not final:
                continue
            if not interval.count:
                del self.open[ifindex]
                continue
            message = (f"{interval.count} more SMTP packet(s), {interval.connections} connection attempt(s) "
                       f"in {self.interval:g}s; last: " + nflog.describe(interval.last, interval.guest))
            self._write(fields(interval.last, interval.guest, interval.count, interval.connections, message,
                               interval.top))
            interval.count, interval.connections, interval.ends = 0, 0, now + self.interval
            interval.top = TopK()
            if final:
                del self.open[ifindex]

    def _write(self, entry: Dict[str, object]) -> None:
        self.entries += 1
        self.write(entry)


class Recent:
    """What ON_BLOCKED's document lists of one guest within the current window (started
    afresh every ON_BLOCKED_WINDOW): destinations (the heaviest, TopK), source addresses and
    MACs, each bounded."""

    MACS_KEPT = 1024  # distinct MACs counted; the packets of any further one: macs_uncounted

    __slots__ = ("destinations", "sources", "macs", "macs_uncounted", "since")

    def __init__(self, since: float = 0.0) -> None:
        self.since = since
        self.destinations = TopK(MAX_LISTED)
        self.sources: Dict[str, int] = {}
        self.macs: Dict[str, int] = {}
        self.macs_uncounted = 0

    def add(self, attempt: Attempt) -> None:
        self.destinations.add(destination(attempt))
        if attempt.src in self.sources or len(self.sources) < MAX_LISTED:
            self.sources[attempt.src] = self.sources.get(attempt.src, 0) + 1
        if attempt.mac:
            if attempt.mac in self.macs or len(self.macs) < self.MACS_KEPT:
                self.macs[attempt.mac] = self.macs.get(attempt.mac, 0) + 1
            else:
                self.macs_uncounted += 1


def _ranked(counts: Dict[str, int], top: int) -> List[Tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


WINDOW_STEPS = 60  # buckets per ON_BLOCKED_WINDOW


class _Window:
    """One guest's attempts within ON_BLOCKED_WINDOW: buckets [start, connections, packets,
    first wall time] oldest first, and their running totals.  An attempt leaves the totals
    when its whole bucket is older than the window: between window and window + step
    seconds after it (step: window / WINDOW_STEPS)."""

    __slots__ = ("buckets", "connections", "packets")

    def __init__(self) -> None:
        self.buckets: Deque[List[float]] = collections.deque()
        self.connections = 0
        self.packets = 0

    def add(self, now: float, step: float, window: float, connections: int, at: float) -> None:
        start = now - now % step
        if self.buckets and self.buckets[-1][0] == start:
            last = self.buckets[-1]
            last[1] += connections
            last[2] += 1
        else:
            self.buckets.append([start, connections, 1, at])
        self.connections += connections
        self.packets += 1
        self.expire(now, step, window)

    def expire(self, now: float, step: float, window: float) -> bool:
        """Drop the buckets wholly older than the window; whether none is left."""
        while self.buckets and self.buckets[0][0] + step <= now - window:
            old = self.buckets.popleft()
            self.connections -= int(old[1])
            self.packets -= int(old[2])
        return not self.buckets

    def first(self) -> float:
        return self.buckets[0][3] if self.buckets else 0.0


class Trigger:
    """ON_BLOCKED: connection attempts per guest over a sliding window (WINDOW_STEPS buckets of
    window/WINDOW_STEPS seconds, at least one, and running totals: O(1) per event whatever
    the window), when each guest's command last ran (kept in FIRED_PATH across restarts), and the
    children it started."""

    def __init__(self, argv: Tuple[str, ...], threshold: int, window: float, timeout: float, log: Log,
                 fired_path: Optional[str] = None) -> None:
        self.argv, self.threshold, self.window, self.timeout, self.log = argv, threshold, window, timeout, log
        self.fired_path = fired_path
        self.step = max(1.0, window / WINDOW_STEPS)  # the width of a bucket
        self.buckets: Dict[str, _Window] = {}  # guest key -> its attempts within the window
        self.fired: Dict[str, float] = self._load()  # guest key -> wall time its command last ran
        self.children: List[Tuple[subprocess.Popen, float, str]] = []  # (child, deadline, who)
        self.runs = 0
        self.failures = 0  # could not start, exited non-zero, killed at the timeout
        self.reap_due = 0.0

    REAP = 0.2

    def _load(self) -> Dict[str, float]:
        if not self.fired_path or not self.argv:
            return {}
        try:
            with open(self.fired_path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self.log(f"ON_BLOCKED: cannot read when it last ran ({self.fired_path}): {exc}; starting afresh")
            return {}
        if not isinstance(data, dict):
            return {}
        now = time.time()
        return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float)) and now - v < self.window}

    def _save(self) -> None:
        if not self.fired_path:
            return
        try:
            os.makedirs(os.path.dirname(self.fired_path), mode=0o750, exist_ok=True)
            files.atomic_write(self.fired_path, (json.dumps(self.fired, sort_keys=True) + "\n").encode(),
                               "ON_BLOCKED's memory of its runs")
        except (OSError, SmtpGateError) as exc:
            self.log(f"ON_BLOCKED: cannot remember this run across a restart: {exc}")

    def add(self, attempt: Attempt, guest: Guest, now: float, recent: Recent) -> None:
        if not self.argv:
            return
        key = guest.uuid or f"ifindex:{attempt.ifindex}"
        window = self.buckets.get(key)
        if window is None:
            window = self.buckets[key] = _Window()
        window.add(now, self.step, self.window, int(attempt.syn), attempt.at)
        if not attempt.syn:
            return
        total = window.connections
        last = self.fired.get(key)
        wall = time.time()
        if total >= self.threshold and (last is None or wall - last >= self.window):
            self.fired[key] = wall
            self._save()
            self._run(attempt, guest, total, window.packets, window.first(), recent)

    def document(self, attempt: Attempt, guest: Guest, total: int, packets: int, first: float,
                 recent: Recent) -> Dict[str, object]:
        """ON_BLOCKED's JSON (every key is in the README's table)."""
        macs = _ranked(recent.macs, MAX_LISTED)
        window = int(self.window) if float(self.window).is_integer() else self.window
        return {
            "event": "blocked", "host": socket.gethostname(), "guest": guest.name, "uuid": guest.uuid,
            "port": nflog.who(guest), "iface": guest.iface, "ifindex": attempt.ifindex, "mac": attempt.mac,
            "mode": attempt.mode, "attempts": total, "packets": packets, "threshold": self.threshold,
            "window_seconds": window, "first": iso(first), "last": iso(attempt.at),
            "last_attempt": {"family": f"ipv{attempt.family}", "src": attempt.src, "dst": attempt.dst,
                             "sport": attempt.sport, "dport": attempt.dport},
            "sources": [{"source": s, "packets": n} for s, n in _ranked(recent.sources, MAX_LISTED)],
            "macs": [m for m, _n in macs], "macs_more": len(recent.macs) - len(macs),
            "macs_uncounted_packets": recent.macs_uncounted,
            "destinations": [{"destination": d, "packets": n} for d, n in recent.destinations.top(5)],
        }

    def _run(self, attempt: Attempt, guest: Guest, total: int, packets: int, first: float, recent: Recent) -> None:
        data = (json.dumps(self.document(attempt, guest, total, packets, first, recent), sort_keys=True)
                + "\n").encode()
        who = nflog.who(guest)
        try:
            child = subprocess.Popen(list(self.argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     start_new_session=True, close_fds=True)
        except OSError as exc:
            self.failures += 1
            self.log(f"ON_BLOCKED {self.argv[0]!r} for {who} could not start: {exc}")
            return
        assert child.stdin is not None
        try:
            os.set_blocking(child.stdin.fileno(), False)  # never wait for a command that does not read
            os.write(child.stdin.fileno(), data)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EAGAIN):
                self.log(f"ON_BLOCKED {self.argv[0]!r}: cannot write its input: {exc}")
        finally:
            child.stdin.close()
        self.runs += 1
        self.reap_due = time.monotonic() + self.REAP
        self.children.append((child, time.monotonic() + self.timeout, who))
        self.log(f"ON_BLOCKED: {total} connection attempts ({packets} packets) from {who} within {self.window:g}s: "
                 f"started {self.argv[0]} (pid {child.pid})")

    def stop(self) -> None:
        """At the watcher's exit: no command outlives it (each one's process group is killed)."""
        for child, _deadline, _name in self.children:
            if child.poll() is None:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.wait()
        self.children = []

    def prune(self, now: float) -> None:
        """Forget guests with no attempt and no run within the window (ports come and go)."""
        wall = time.time()
        for key in [k for k, w in self.buckets.items() if w.expire(now, self.step, self.window)]:
            if wall - self.fired.get(key, float("-inf")) >= self.window:
                self.buckets.pop(key, None)
                self.fired.pop(key, None)

    def due(self) -> Optional[float]:
        """Children are polled every REAP seconds until they are reaped."""
        return self.reap_due if self.children else None

    def reap(self, now: float) -> None:
        if not self.children or now < self.reap_due:
            return
        self.reap_due = now + self.REAP
        kept = []
        for child, deadline, who in self.children:
            code = child.poll()
            if code is None:
                if now >= deadline:
                    try:
                        os.killpg(child.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.failures += 1
                    self.log(f"ON_BLOCKED for {who} killed after {self.timeout:g} s (timeout, pid {child.pid})")
                    deadline = float("inf")  # killed: reaped later, said once
                kept.append((child, deadline, who))
            elif deadline == float("inf"):
                continue  # the timeout's kill, already said and counted
            elif code > 0:
                self.failures += 1
                self.log(f"ON_BLOCKED for {who} failed: {self.argv[0]} exited with status {code}")
            elif code < 0:
                self.failures += 1
                self.log(f"ON_BLOCKED for {who} failed: {self.argv[0]} was killed by signal {-code}")
        self.children = kept


class Desk:
    """The abuse desk as a source of the watcher's select loop."""

    def __init__(self, config: Config, sock: "socket.socket", log: Log, journal: Optional[Journal] = None) -> None:
        self.sock = sock
        self.log = log
        self.run_dir = config.run_dir
        self.journal = journal or Journal()
        self.attribute = Attributor(lambda: RunState(config.run_dir).all_records().values())
        self.aggregator = Aggregator(config.event_interval, self.journal.send)
        self.store = Store(config.state_dir, config.report_days, config.report_max_mb << 20)
        self.trigger = Trigger(config.on_blocked, config.on_blocked_threshold, config.on_blocked_window,
                               config.on_blocked_timeout, log, os.path.join(config.state_dir, FIRED_FILE))
        self.interval = config.event_interval
        self.flush_due = time.monotonic() + self.interval
        self.received = 0
        self.overruns = 0  # reads that failed with ENOBUFS (events were lost before them)
        self.bound = True
        self._told_full = False
        self._told_stats = False
        self._recent: Dict[str, Recent] = {}  # guest key -> what ON_BLOCKED lists
        self.connections = Connections()

    def fileno(self) -> int:
        return self.sock.fileno()

    def readable(self) -> None:
        try:
            self._read()
        except (OSError, ValueError) as exc:  # the desk never stops the watcher
            self.log(f"cannot handle blocked-attempt events: {exc}")

    def _read(self) -> None:
        attempts, lost = nflog.read(self.sock)
        if lost:
            self.overruns += 1
        now = time.monotonic()
        for attempt in attempts:
            self.received += 1
            if attempt.syn and not self.connections.new(attempt, now):
                attempt = attempt._replace(syn=False)  # a retransmitted SYN: a packet, not an attempt
            guest = self.attribute(attempt.ifindex, now)
            self.aggregator.add(attempt, guest, now)
            self.store.add(attempt, guest)
            if self.trigger.argv:
                key = guest.uuid or f"ifindex:{attempt.ifindex}"
                recent = self._recent.get(key)
                if recent is None or now - recent.since >= self.trigger.window:
                    recent = self._recent[key] = Recent(now)  # afresh every window
                recent.add(attempt)
                self.trigger.add(attempt, guest, now, recent)

    def due(self) -> Optional[float]:
        return min(d for d in (self.aggregator.due(), self.flush_due, self.trigger.due()) if d is not None)

    def tick(self) -> None:
        try:
            self._tick()
        except (OSError, ValueError) as exc:
            self.log(f"abuse desk: {exc}")

    def _tick(self) -> None:
        now = time.monotonic()
        self.aggregator.tick(now)
        self.trigger.reap(now)
        if now >= self.flush_due:
            self.flush_due = now + self.interval
            self.trigger.prune(now)
            self._recent = {k: v for k, v in self._recent.items() if k in self.trigger.buckets}
            self.flush()
            self.write_stats()

    def stats(self) -> Dict[str, int]:
        """The desk's counters since the watcher started (README "Abuse desk"; metrics.py reads them)."""
        drops = nflog.socket_drops(self.sock) if self.bound else None
        return {
            "bound": int(self.bound), "events": self.received, "overruns": self.overruns,
            "kernel_drops": drops or 0, "journal_entries": self.aggregator.entries, "journal_lost": self.journal.lost,
            "on_blocked_runs": self.trigger.runs, "on_blocked_failures": self.trigger.failures,
            "store_full": int(self.store.dropped > 0),
        }

    def write_stats(self) -> None:
        try:
            write_stats(self.run_dir, self.stats())
        except SmtpGateError as exc:
            if not self._told_stats:
                self._told_stats = True
                self.log(str(exc))

    def flush(self, final: bool = False) -> None:
        try:
            self.store.flush(final=final)
        except OSError as exc:
            self.log(f"cannot write the report's store in {self.store.dir}: {exc}")
        if self.store.dropped and not self._told_full:
            self._told_full = True
            self.log(f"the report's store {self.store.dir} is full (REPORT_MAX_MB): "
                     "lines that do not fit are no longer written (older days are kept)")

    def close(self) -> None:
        """At the watcher's exit (SIGTERM too): write what is pending (open journal intervals,
        the store's buckets, the statistics), then say the totals."""
        self.trigger.stop()
        self.trigger.argv = ()  # no command starts while the watcher exits
        try:
            self._read_pending()
            self.aggregator.tick(time.monotonic(), final=True)
        except (OSError, ValueError) as exc:
            self.log(f"abuse desk: cannot write the last entries: {exc}")
        self.flush(final=True)
        drops = nflog.socket_drops(self.sock)
        self.log(f"abuse desk: {self.received} blocked-attempt events received, {self.overruns} overrun(s), "
                 f"kernel drops {drops if drops is not None else 'unknown'}, "
                 f"{self.aggregator.entries} journal entries ({self.journal.sent} to the journal, "
                 f"{self.journal.fell_back} to stderr, {self.journal.lost} lost), {self.trigger.runs} ON_BLOCKED run(s)"
                 f" ({self.trigger.failures} failed)")
        stats = self.stats()
        self.bound = False
        self.sock.close()
        self.journal.close()
        try:
            write_stats(self.run_dir, dict(stats, bound=0))
        except SmtpGateError as exc:
            self.log(str(exc))

    def _read_pending(self) -> None:
        """Events the kernel queued before the exit: read without waiting."""
        self.sock.setblocking(False)
        for _ in range(64):
            try:
                self._read()
            except BlockingIOError:
                return


def open_desk(config: Config, log: Log) -> Optional[Desk]:
    """The desk, bound to LOG_GROUP; None (said in the log) when LOG_GROUP is off or the group
    cannot be bound: the watcher then restores the table as before, without events."""
    problem = command_problem(config.on_blocked)
    if problem:
        log(f"warning: {problem}: it will fail when a guest passes the threshold")
    if config.log_group is None:
        log('blocked attempts are not followed: LOG_GROUP is "off" (no journal entries, report or ON_BLOCKED)')
        if config.on_blocked:
            log(f"warning: {config_problems(config)[0]}")
        return None
    try:
        sock = nflog.open_group(config.log_group)
    except NetlinkError as exc:  # it names the group
        log(f"blocked attempts are not followed: {exc}")
        return None
    except OSError as exc:  # no nfnetlink_log in this kernel, no permission
        log(f"blocked attempts are not followed: cannot bind NFLOG group {config.log_group}: {exc}")
        return None
    log(f"following blocked attempts on NFLOG group {config.log_group}")
    return Desk(config, sock, log)
