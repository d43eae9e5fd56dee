"""The abuse desk inside `smtp-gate watch`: blocked attempts read from the NFLOG group
(nflog.py), attributed to guests, written to the journal (journal.py), counted into the
report's store (store.py), and handed to ON_BLOCKED.

One object, Desk, is a source of the watcher's select loop: fileno() (the NFLOG socket),
readable() (read one datagram), due() and tick() (timers: the end of an aggregation
interval, a store flush, a child past its deadline).  Nothing here can stop enforcement:
the drop is a rule of its own, a slow desk only loses events (counted), and errors of the
desk are logged, never raised into the watcher's loop.

Journal entries: the first attempt of a guest port opens an interval of EVENT_INTERVAL
seconds and is written at once (SMTP_GATE_COUNT=1); the attempts that follow within the
interval are counted and written as one entry at its end (SMTP_GATE_COUNT=n, the fields of
the last attempt), and the next interval begins; an interval without attempts closes.  So
a flooding guest costs at most one entry per EVENT_INTERVAL, whatever MACs it spoofs (the
key is its port), plus one when it starts.

ON_BLOCKED: when the logged attempts of a guest (its UUID; an unknown port by index) within
the last ON_BLOCKED_WINDOW seconds reach ON_BLOCKED_THRESHOLD, the command runs once with a
JSON description on stdin, and not again for that guest before a window has passed.  It is
a child in a session of its own that the watcher never waits for: reaped by tick() without
blocking, killed (its whole process group) after ON_BLOCKED_TIMEOUT.
"""

import collections
import errno
import json
import os
import signal
import socket
import subprocess
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

from smtp_gate import nflog
from smtp_gate.config import Config
from smtp_gate.journal import PRIORITY_WARNING, Journal
from smtp_gate.nflog import Attempt, Attributor, Guest
from smtp_gate.nfnetlink import NetlinkError
from smtp_gate.runstate import RunState
from smtp_gate.store import Store

Log = Callable[[str], None]


def fields(attempt: Attempt, guest: Guest, count: int, message: str) -> Dict[str, object]:
    """A journal entry's fields: stable names (README "Abuse desk")."""
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
        "SMTP_GATE_COUNT": count,
    }


class _Interval:
    __slots__ = ("ends", "count", "last", "guest")

    def __init__(self, ends: float, attempt: Attempt, guest: Guest) -> None:
        self.ends, self.count, self.last, self.guest = ends, 0, attempt, guest


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
            self._write(fields(attempt, guest, 1, nflog.describe(attempt, guest)))
            return
        current.count += 1
        current.last, current.guest = attempt, guest

    def due(self) -> Optional[float]:
        return min((i.ends for i in self.open.values()), default=None)

    def tick(self, now: float) -> None:
        for ifindex, interval in list(self.open.items()):
            if now < interval.ends:
                continue
            if not interval.count:
                del self.open[ifindex]
                continue
            message = (f"{interval.count} more blocked SMTP attempt(s) in {self.interval:g}s; last: "
                       + nflog.describe(interval.last, interval.guest))
            self._write(fields(interval.last, interval.guest, interval.count, message))
            interval.count, interval.ends = 0, now + self.interval

    def _write(self, entry: Dict[str, object]) -> None:
        self.entries += 1
        self.write(entry)


class Trigger:
    """ON_BLOCKED: thresholds per guest over a sliding window of one-second buckets, and the
    children it started."""

    def __init__(self, argv: Tuple[str, ...], threshold: int, window: float, timeout: float, log: Log) -> None:
        self.argv, self.threshold, self.window, self.timeout, self.log = argv, threshold, window, timeout, log
        self.buckets: Dict[str, Deque[List[float]]] = {}  # guest key -> [[second, count], ...]
        self.fired: Dict[str, float] = {}  # guest key -> when its command last ran
        self.children: List[Tuple[subprocess.Popen, float, str]] = []  # (child, deadline, guest)
        self.runs = 0
        self.reap_due = 0.0

    REAP = 0.2

    def add(self, attempt: Attempt, guest: Guest, now: float, recent: Callable[[], List[Tuple[str, int]]]) -> None:
        if not self.argv:
            return
        key = guest.uuid or f"ifindex:{attempt.ifindex}"
        buckets = self.buckets.setdefault(key, collections.deque())
        second = float(int(now))
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += 1
        else:
            buckets.append([second, 1])
        while buckets and buckets[0][0] <= now - self.window:
            buckets.popleft()
        total = int(sum(c for _s, c in buckets))
        last = self.fired.get(key)
        if total >= self.threshold and (last is None or now - last >= self.window):
            self.fired[key] = now
            self._run(attempt, guest, total, recent())

    def _run(self, attempt: Attempt, guest: Guest, total: int, destinations: List[Tuple[str, int]]) -> None:
        document = {
            "event": "blocked", "host": socket.gethostname(), "guest": guest.name, "uuid": guest.uuid,
            "iface": guest.iface, "ifindex": attempt.ifindex, "mac": attempt.mac, "mode": attempt.mode,
            "attempts": total, "threshold": self.threshold, "window_seconds": self.window,
            "last": {"family": attempt.family, "src": attempt.src, "dst": attempt.dst, "sport": attempt.sport,
                     "dport": attempt.dport, "at": attempt.at},
            "destinations": [{"destination": d, "attempts": n} for d, n in destinations],
        }
        data = (json.dumps(document, sort_keys=True) + "\n").encode()
        try:
            child = subprocess.Popen(list(self.argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     start_new_session=True, close_fds=True)
        except OSError as exc:
            self.log(f"ON_BLOCKED {self.argv[0]!r} for {guest.name} could not start: {exc}")
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
        self.children.append((child, time.monotonic() + self.timeout, guest.name))
        self.log(f"ON_BLOCKED: {total} blocked attempts from {guest.name} within {self.window:g}s: "
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
        for key in [k for k, b in self.buckets.items() if not b or b[-1][0] <= now - self.window]:
            if now - self.fired.get(key, float("-inf")) >= self.window:
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
        for child, deadline, name in self.children:
            code = child.poll()
            if code is None:
                if now >= deadline:
                    try:
                        os.killpg(child.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.log(f"ON_BLOCKED for {name} ran longer than {self.timeout:g}s: killed (pid {child.pid})")
                    deadline = float("inf")
                kept.append((child, deadline, name))
            elif code != 0:
                self.log(f"ON_BLOCKED for {name} exited with status {code}")
        self.children = kept


class Desk:
    """The abuse desk as a source of the watcher's select loop."""

    def __init__(self, config: Config, sock: "socket.socket", log: Log, journal: Optional[Journal] = None) -> None:
        self.sock = sock
        self.log = log
        self.journal = journal or Journal()
        self.attribute = Attributor(lambda: RunState(config.run_dir).all_records().values())
        self.aggregator = Aggregator(config.event_interval, self.journal.send)
        self.store = Store(config.state_dir, config.report_days, config.report_max_mb << 20)
        self.trigger = Trigger(config.on_blocked, config.on_blocked_threshold, config.on_blocked_window,
                               config.on_blocked_timeout, log)
        self.interval = config.event_interval
        self.flush_due = time.monotonic() + self.interval
        self.received = 0
        self.overruns = 0  # reads that failed with ENOBUFS (events were lost before them)
        self._told_full = False
        self._recent: Dict[str, Dict[str, int]] = {}  # guest key -> destination -> attempts (this window)

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
            guest = self.attribute(attempt.ifindex, now)
            self.aggregator.add(attempt, guest, now)
            self.store.add(attempt, guest)
            key = guest.uuid or f"ifindex:{attempt.ifindex}"
            where = f"[{attempt.dst}]:{attempt.dport}" if attempt.family == 6 else f"{attempt.dst}:{attempt.dport}"
            recent = self._recent.setdefault(key, {})
            if where in recent or len(recent) < 100:
                recent[where] = recent.get(where, 0) + 1
            self.trigger.add(attempt, guest, now,
                             lambda: sorted(recent.items(), key=lambda kv: (-kv[1], kv[0]))[:5])

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

    def flush(self) -> None:
        try:
            self.store.flush()
        except OSError as exc:
            self.log(f"cannot write the report's store in {self.store.dir}: {exc}")
        if self.store.dropped and not self._told_full:
            self._told_full = True
            self.log(f"the report's store {self.store.dir} is full (REPORT_MAX_MB): "
                     "lines of today are no longer written")

    def close(self) -> None:
        self.trigger.stop()
        self.flush()
        drops = nflog.socket_drops(self.sock)
        self.log(f"abuse desk: {self.received} blocked-attempt events received, {self.overruns} overrun(s), "
                 f"kernel drops {drops if drops is not None else 'unknown'}, "
                 f"{self.aggregator.entries} journal entries ({self.journal.sent} to the journal, "
                 f"{self.journal.fell_back} to stderr, {self.journal.lost} lost), {self.trigger.runs} ON_BLOCKED run(s)")
        self.sock.close()
        self.journal.close()


def open_desk(config: Config, log: Log) -> Optional[Desk]:
    """The desk, bound to LOG_GROUP; None (said in the log) when LOG_GROUP is off or the group
    cannot be bound: the watcher then restores the table as before, without events."""
    if config.log_group is None:
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
