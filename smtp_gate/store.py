"""The abuse desk's store: blocked attempts per guest, destination and minute, for `report`.

Layout: STATE_DIR/blocked/YYYY-MM-DD.jsonl (UTC days), one JSON object per line:
  {"minute": 1764681600, "guest": "web1", "uuid": "...", "iface": "vnet3", "mode": "enforce",
   "family": 4, "dst": "192.0.2.25", "dport": 25, "count": 17, "connections": 3,
   "first": 1764681601.2, "last": 1764681659.9, "mac": "...",
   "macs": {"52:54:00:...": 17}, "macs_other": 0, "srcs": {"10.0.0.5": 17}}
"count" is logged packets, "connections" the connection attempts among them (TCP SYN
without ACK: one connect() whose SYN is retransmitted is several packets); "mode" tells
audit (delivered) from enforce (dropped).  Lines written before these fields existed lack
them: read as 0 connections, mode "enforce", the one "mac".
The watcher counts in memory and appends its buckets once per EVENT_INTERVAL; a minute may
appear on several lines (report adds them up).

The bound, whatever a guest does (docs: README "Abuse desk"):
- what reaches the watcher is already bounded by the kernel's meter (LOG_GROUP_RATE per
  guest port, 1 000 events/s in all);
- per guest port and minute at most MAX_DESTINATIONS destinations are kept apart (counted
  across flushes; chosen at each flush as the most attempted of those not kept yet, among
  the first MAX_CANDIDATES new ones of the flush); the rest are counted together as
  destination "other" (a guest spraying addresses adds one
  line, not one per address); spoofed MACs do not multiply lines (the key is the port;
  the MAC kept is the last one seen);
- per guest port and UTC day at most REPORT_MAX_MB / 64 bytes of these lines (1 MiB of the
  default 64; 16 KiB at least): past it, the port is reduced to one summary line per minute,
  mode and family ("dst": "other", "summary": true) holding its counts, written once the minute has
  ended (at the watcher's exit: at once), so totals are never lost to the budget (a
  restarted watcher starts the day's budgets afresh);
- files older than REPORT_DAYS days are deleted; and the directory never holds more than
  REPORT_MAX_MB MiB.  Older days are deleted to make room only for lines of ports within
  their budget, and only while that day's file is under half the cap: ports over budget
  (flooders) never push out the history.  A line there is no room for is not written
  (counted in `dropped`, said once in the watcher's log).
"""

import datetime
import json
import os
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

from smtp_gate.nflog import Attempt, Guest

MAX_DESTINATIONS = 20
MAX_CANDIDATES = 1024  # new destinations per port counted apart between two flushes; past it: "other"
PORT_DAY_SHARE = 64  # a port's detail per UTC day: REPORT_MAX_MB / 64 (1 MiB of the default 64)
MIN_PORT_DAY_BYTES = 16 << 10
MAX_MACS = 16  # distinct source MACs kept per line; attempts of the rest: "macs_other"
MAX_SOURCES = 16  # distinct source addresses kept per line; the rest: "other"
OTHER = "other"
SUBDIR = "blocked"

Key = Tuple[int, str, str, str, str, int, str, int]  # minute, uuid, name, iface, mode, family, dst, dport


class _Bucket:
    __slots__ = ("count", "connections", "first", "last", "mac", "macs", "macs_other", "srcs")

    def __init__(self, at: float) -> None:
        self.count = self.connections = self.macs_other = 0
        self.first = self.last = at
        self.mac = ""
        self.macs: Dict[str, int] = {}
        self.srcs: Dict[str, int] = {}


def _order(item: Tuple[Key, "_Bucket"]) -> tuple:
    """Lines in key order; a port the kernel's copy did not hold ("?") sorts as text."""
    return tuple(str(part) if isinstance(part, str) else f"{part:020d}" for part in item[0])


def _merge(into: "_Bucket", bucket: "_Bucket") -> None:
    """Add BUCKET's counts to INTO (same port and minute), within the bounds of a line."""
    into.count += bucket.count
    into.connections += bucket.connections
    into.first, into.last = min(into.first, bucket.first), max(into.last, bucket.last)
    into.mac = bucket.mac or into.mac
    into.macs_other += bucket.macs_other
    for mac, n in bucket.macs.items():
        if mac in into.macs or len(into.macs) < MAX_MACS:
            into.macs[mac] = into.macs.get(mac, 0) + n
        else:
            into.macs_other += n
    for src, n in bucket.srcs.items():
        src = src if src in into.srcs or len(into.srcs) < MAX_SOURCES else OTHER
        into.srcs[src] = into.srcs.get(src, 0) + n


def _line(key: Key, b: "_Bucket", summary: bool = False) -> bytes:
    minute, uuid, name, iface, mode, family, dst, dport = key
    row = {"minute": minute, "guest": name, "uuid": uuid, "iface": iface, "mode": mode, "family": family,
           "dst": dst, "dport": dport, "count": b.count, "connections": b.connections,
           "first": round(b.first, 3), "last": round(b.last, 3), "mac": b.mac, "macs": b.macs,
           "macs_other": b.macs_other, "srcs": b.srcs}
    if summary:
        row["summary"] = True  # a port past its day's budget: every destination as "other"
    return (json.dumps(row, sort_keys=True) + "\n").encode()


def day_of(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d")


class Store:
    """The store's directory and the watcher's pending buckets."""

    def __init__(self, state_dir: str, days: int = 7, max_bytes: int = 64 << 20) -> None:
        self.dir = os.path.join(state_dir, SUBDIR)
        self.days = days
        self.max_bytes = max_bytes
        self.pending: Dict[Key, _Bucket] = {}
        # (minute, uuid, iface) -> the destinations kept apart (mode, family, dst, dport), up to
        # MAX_DESTINATIONS, across flushes; pruned after 2 minutes
        self._destinations: Dict[Tuple[int, str, str], Set[tuple]] = {}
        self._candidates: Dict[Tuple[int, str, str], int] = {}  # pending destinations not (yet) kept
        self._used: Dict[Tuple[str, str, str], int] = {}  # (day, uuid, iface) -> bytes of detail written
        self.summaries: Dict[Key, _Bucket] = {}  # ports past their budget: per minute, until it ends
        self.dropped = 0  # lines not written because the store was full

    # -- the watcher's side -----------------------------------------------------------------
    def add(self, attempt: Attempt, guest: Guest, count: int = 1) -> None:
        minute = int(attempt.at // 60 * 60)
        dst, dport = attempt.dst, attempt.dport
        key: Key = (minute, guest.uuid, guest.name, guest.iface, attempt.mode, attempt.family, dst, dport)
        if key not in self.pending:
            seen = (minute, guest.uuid, guest.iface)
            kept = self._destinations.get(seen, ())
            if key[4:] in kept:
                pass
            elif len(kept) >= MAX_DESTINATIONS or self._candidates.get(seen, 0) >= MAX_CANDIDATES:
                key = (minute, guest.uuid, guest.name, guest.iface, attempt.mode, attempt.family, OTHER, 0)
            else:  # which ones are kept apart is decided at the flush, by their counts
                self._candidates[seen] = self._candidates.get(seen, 0) + 1
        bucket = self.pending.get(key)
        if bucket is None:
            bucket = self.pending[key] = _Bucket(attempt.at)
        bucket.count += count
        bucket.connections += count if attempt.syn else 0
        bucket.first = min(bucket.first, attempt.at)
        bucket.last = max(bucket.last, attempt.at)
        if attempt.mac:
            bucket.mac = attempt.mac
            if attempt.mac in bucket.macs or len(bucket.macs) < MAX_MACS:
                bucket.macs[attempt.mac] = bucket.macs.get(attempt.mac, 0) + count
            else:
                bucket.macs_other += count
        src = attempt.src if attempt.src in bucket.srcs or len(bucket.srcs) < MAX_SOURCES else OTHER
        bucket.srcs[src] = bucket.srcs.get(src, 0) + count

    def _port_budget(self) -> int:
        return max(MIN_PORT_DAY_BYTES, self.max_bytes // PORT_DAY_SHARE)

    def flush(self, now: Optional[float] = None, final: bool = False) -> int:
        """Append the pending buckets (one line each) and the summaries of ended minutes
        (FINAL: every one), prune, and return the lines written.  A port past its day's
        budget (bytes of detail) is reduced to one summary line per minute, mode and family."""
        now = time.time() if now is None else now
        pending, self.pending, self._candidates = self._choose(self.pending), {}, {}
        current = int(now // 60 * 60)
        self._destinations = {k: n for k, n in self._destinations.items() if k[0] >= current - 120}
        budget = self._port_budget()
        detail: Dict[str, List[bytes]] = {}
        for key, b in sorted(pending.items(), key=_order):
            minute, uuid, _name, iface = key[0], key[1], key[2], key[3]
            day = day_of(minute)
            line = _line(key, b)
            port = (day, uuid, iface)
            used = self._used.get(port, 0)
            if used + len(line) <= budget:
                self._used[port] = used + len(line)
                detail.setdefault(day, []).append(line)
            else:
                self._used[port] = budget + 1  # over: the rest of the day is summaries
                self._summarize(key, b)
        summaries: Dict[str, List[bytes]] = {}
        for key in sorted(self.summaries, key=lambda k: _order((k, None))):
            if final or key[0] + 60 <= now:
                summaries.setdefault(day_of(key[0]), []).append(_line(key, self.summaries.pop(key), summary=True))
        today = day_of(now)
        self._used = {k: v for k, v in self._used.items() if k[0] >= today}
        if not detail and not summaries:
            return 0
        os.makedirs(self.dir, mode=0o750, exist_ok=True)
        self.prune(now)
        written = 0
        # summaries first: they carry the totals of the flooders; neither makes room by
        # deleting older days while flooders are over their budget
        for batch, evict in ((summaries, False), (detail, True)):
            for day, lines in sorted(batch.items()):
                data = b"".join(lines)
                if not self._room(len(data), day, evict):
                    self.dropped += len(lines)
                    continue
                fd = os.open(os.path.join(self.dir, f"{day}.jsonl"),
                             os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                written += len(lines)
        return written

    def _choose(self, pending: Dict[Key, "_Bucket"]) -> Dict[Key, "_Bucket"]:
        """Keep apart, per port and minute, the most attempted of the destinations not kept
        yet (up to MAX_DESTINATIONS in all); fold the rest into "other": decoys sent first
        do not push the real target out."""
        groups: Dict[Tuple[int, str, str], List[Key]] = {}
        for key in pending:
            seen = (key[0], key[1], key[3])
            if key[6] != OTHER and key[4:] not in self._destinations.get(seen, ()):
                groups.setdefault(seen, []).append(key)
        for seen, keys in groups.items():
            kept = self._destinations.setdefault(seen, set())
            keys.sort(key=lambda k: (-pending[k].count, _order((k, None))))
            room = max(0, MAX_DESTINATIONS - len(kept))
            kept.update(k[4:] for k in keys[:room])
            for key in keys[room:]:
                other: Key = (key[0], key[1], key[2], key[3], key[4], key[5], OTHER, 0)
                bucket = pending.pop(key)
                if other in pending:
                    _merge(pending[other], bucket)
                else:
                    pending[other] = bucket
        return pending

    def _summarize(self, key: Key, bucket: "_Bucket") -> None:
        """Fold BUCKET into its port's summary of that minute, mode and family (destination "other")."""
        minute, uuid, name, iface, mode, family, _dst, _dport = key
        skey: Key = (minute, uuid, name, iface, mode, family, OTHER, 0)
        into = self.summaries.get(skey)
        if into is None:
            self.summaries[skey] = bucket
            return
        _merge(into, bucket)

    def exists(self) -> bool:
        """Whether the store holds any day file (the watcher wrote here within REPORT_DAYS)."""
        return bool(self._files())

    def _files(self) -> List[Tuple[str, int]]:
        """(day, size) of every day file, oldest first."""
        out = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        for name in sorted(names):
            if name.endswith(".jsonl") and len(name) == len("YYYY-MM-DD.jsonl"):
                try:
                    out.append((name[:10], os.stat(os.path.join(self.dir, name)).st_size))
                except FileNotFoundError:
                    continue
        return out

    def _room(self, size: int, day: str, evict: bool = True) -> bool:
        """Make room for SIZE more bytes of DAY's file by deleting older days: only for EVICT
        (detail of ports within their budget), and only while DAY's file holds less than half
        the cap (one day never pushes out the history); False if the cap would be passed."""
        files = self._files()
        total = sum(s for _d, s in files)
        evict = evict and dict(files).get(day, 0) + size <= self.max_bytes // 2
        for old, old_size in files:
            if total + size <= self.max_bytes or old >= day or not evict:
                break
            os.unlink(os.path.join(self.dir, f"{old}.jsonl"))
            total -= old_size
        return total + size <= self.max_bytes

    def prune(self, now: Optional[float] = None) -> None:
        """Delete the day files older than DAYS days."""
        now = time.time() if now is None else now
        oldest = day_of(now - self.days * 86400)
        for day, _size in self._files():
            if day < oldest:
                os.unlink(os.path.join(self.dir, f"{day}.jsonl"))

    def size(self) -> int:
        return sum(s for _d, s in self._files())

    # -- the report's side ------------------------------------------------------------------
    def rows(self, since: float) -> Iterator[dict]:
        """Every stored line whose last attempt is at SINCE or later (damaged lines skipped)."""
        first_day = day_of(since)
        for day, _size in self._files():
            if day < first_day:
                continue
            try:
                with open(os.path.join(self.dir, f"{day}.jsonl"), "rb") as handle:
                    for raw in handle:
                        try:
                            row = json.loads(raw)
                        except ValueError:
                            continue
                        if isinstance(row, dict) and isinstance(row.get("last"), (int, float)) and row["last"] >= since:
                            yield row
            except FileNotFoundError:
                continue


class Ranked(NamedTuple):
    guest: str
    uuid: str
    ifaces: Tuple[str, ...]
    macs: Tuple[str, ...]  # up to MACS_SHOWN, most attempts first
    attempts: int  # logged packets
    first: float
    last: float
    destinations: Tuple[Tuple[str, int], ...]  # ("192.0.2.25:25", count), most first
    connections: int = 0  # connection attempts (TCP SYN without ACK) among ATTEMPTS
    mode: str = "enforce"  # "audit": these attempts were let through (delivered)
    macs_more: int = 0  # distinct MACs seen beyond MACS; more may have gone uncounted (macs_other)
    sources: Tuple[Tuple[str, int], ...] = ()  # ("10.0.0.5", count), most first
    macs_other: int = 0  # attempts from MACs past MAX_MACS per stored line (not told apart)


MACS_SHOWN = 10


def _top(counts: Dict[str, int], top: int) -> Tuple[Tuple[str, int], ...]:
    return tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top])


def rank(rows: Iterator[dict], top: int = 3) -> List[Ranked]:
    """Guests by connection attempts, then logged packets, most first; a guest's audit-mode
    attempts (delivered) are an entry apart from its enforced ones; an unknown port is its
    own entry, by interface."""
    guests: Dict[Tuple[str, str, str], dict] = {}
    for row in rows:
        uuid = str(row.get("uuid", ""))
        name = str(row.get("guest", ""))
        mode = "audit" if row.get("mode") == "audit" else "enforce"
        key = (uuid, name if uuid else f"{name} {row.get('iface', '')}", mode)
        entry = guests.setdefault(key, {"attempts": 0, "connections": 0, "first": row["first"], "last": row["last"],
                                        "dst": {}, "ifaces": set(), "macs": {}, "srcs": {}, "name": name,
                                        "macs_other": 0})
        count = int(row.get("count", 0))
        entry["attempts"] += count
        entry["connections"] += int(row.get("connections", 0))
        entry["first"] = min(entry["first"], row["first"])
        entry["last"] = max(entry["last"], row["last"])
        family, dst, dport = row.get("family"), str(row.get("dst")), row.get("dport")
        where = OTHER if dst == OTHER else (f"[{dst}]:{dport}" if family == 6 else f"{dst}:{dport}")
        entry["dst"][where] = entry["dst"].get(where, 0) + count
        entry["ifaces"].add(str(row.get("iface", "")))
        macs = row.get("macs") if isinstance(row.get("macs"), dict) else ({row["mac"]: count} if row.get("mac") else {})
        for mac, n in macs.items():
            entry["macs"][str(mac)] = entry["macs"].get(str(mac), 0) + int(n)
        entry["macs_other"] += int(row.get("macs_other", 0))
        for src, n in (row.get("srcs") if isinstance(row.get("srcs"), dict) else {}).items():
            entry["srcs"][str(src)] = entry["srcs"].get(str(src), 0) + int(n)
    out = []
    for (uuid, _name, mode), e in guests.items():
        macs = _top(e["macs"], len(e["macs"]))
        out.append(Ranked(
            guest=e["name"], uuid=uuid, ifaces=tuple(sorted(e["ifaces"])), macs=tuple(m for m, _n in macs[:MACS_SHOWN]),
            attempts=e["attempts"], first=e["first"], last=e["last"], destinations=_top(e["dst"], top),
            connections=e["connections"], mode=mode, macs_more=max(0, len(macs) - MACS_SHOWN),
            sources=_top(e["srcs"], top), macs_other=e["macs_other"],
        ))
    return sorted(out, key=lambda r: (-r.connections, -r.attempts, r.guest, r.uuid, r.mode))
