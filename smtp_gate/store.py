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
- per guest port and minute at most MAX_DESTINATIONS destinations are kept apart; the
  rest are counted together as destination "other" (a guest spraying addresses adds one
  line, not one per address); spoofed MACs do not multiply lines (the key is the port;
  the MAC kept is the last one seen);
- files older than REPORT_DAYS days are deleted; and the directory never holds more than
  REPORT_MAX_MB MiB: the oldest days go first, and when today's file alone reaches the cap,
  further lines are not written (counted in `dropped`, said once in the watcher's log).
"""

import datetime
import json
import os
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

from smtp_gate.nflog import Attempt, Guest

MAX_DESTINATIONS = 20
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


def day_of(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d")


class Store:
    """The store's directory and the watcher's pending buckets."""

    def __init__(self, state_dir: str, days: int = 7, max_bytes: int = 64 << 20) -> None:
        self.dir = os.path.join(state_dir, SUBDIR)
        self.days = days
        self.max_bytes = max_bytes
        self.pending: Dict[Key, _Bucket] = {}
        self._destinations: Dict[Tuple[int, str, str], int] = {}  # (minute, uuid, iface) -> distinct kept
        self.dropped = 0  # lines not written because the store was full

    # -- the watcher's side -----------------------------------------------------------------
    def add(self, attempt: Attempt, guest: Guest, count: int = 1) -> None:
        minute = int(attempt.at // 60 * 60)
        dst, dport = attempt.dst, attempt.dport
        key: Key = (minute, guest.uuid, guest.name, guest.iface, attempt.mode, attempt.family, dst, dport)
        if key not in self.pending:
            seen = (minute, guest.uuid, guest.iface)
            if self._destinations.get(seen, 0) >= MAX_DESTINATIONS:
                key = (minute, guest.uuid, guest.name, guest.iface, attempt.mode, attempt.family, OTHER, 0)
            else:
                self._destinations[seen] = self._destinations.get(seen, 0) + 1
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

    def flush(self, now: Optional[float] = None) -> int:
        """Append the pending buckets (one line each), prune, and return the lines written."""
        now = time.time() if now is None else now
        pending, self.pending, self._destinations = self.pending, {}, {}
        if not pending:
            return 0
        os.makedirs(self.dir, mode=0o750, exist_ok=True)
        by_day: Dict[str, List[bytes]] = {}
        for (minute, uuid, name, iface, mode, family, dst, dport), b in sorted(pending.items(), key=_order):
            row = {"minute": minute, "guest": name, "uuid": uuid, "iface": iface, "mode": mode, "family": family,
                   "dst": dst, "dport": dport, "count": b.count, "connections": b.connections,
                   "first": round(b.first, 3), "last": round(b.last, 3), "mac": b.mac, "macs": b.macs,
                   "macs_other": b.macs_other, "srcs": b.srcs}
            by_day.setdefault(day_of(minute), []).append((json.dumps(row, sort_keys=True) + "\n").encode())
        self.prune(now)
        written = 0
        for day, lines in sorted(by_day.items()):
            data = b"".join(lines)
            if not self._room(len(data), day):
                self.dropped += len(lines)
                continue
            fd = os.open(os.path.join(self.dir, f"{day}.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o640)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            written += len(lines)
        return written

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

    def _room(self, size: int, day: str) -> bool:
        """Make room for SIZE more bytes of DAY's file by deleting older days; False if even
        then the cap would be passed."""
        files = self._files()
        total = sum(s for _d, s in files)
        for old, old_size in files:
            if total + size <= self.max_bytes or old >= day:
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
