"""Metrics for Prometheus, in node_exporter's textfile collector format.

node_exporter (Debian: prometheus-node-exporter) already runs on the hypervisors a fleet
monitors; its textfile collector exposes every `*.prom` file of one directory (Debian's
default: METRICS_DIR below).  We write one, `smtp_gate.prom`, atomically: a temporary file
`.smtp_gate.prom.tmpXXXXXXXX` (not `*.prom`, so it is never read half-written) in the same
directory, fsynced and renamed over it (files.atomic_write).

Who writes it: `apply`/`rebuild` at their end (the timer's rebuild: at least once a
minute), also when the off-switch makes them install nothing; and `smtp-gate watch`
after each restore of our table and every REFRESH seconds.  Each writer renders the whole
file from the state as it is then (snapshot(): the kernel's table and counters, the run
directory's records and counters), so the writers never merge anything.

Counters that outlive one process live in RUN_DIR, one small file each, whose size is the
count (one byte per event, appended with O_APPEND: the cheapest write there is, which a
hook can afford and which never blocks on a tmpfs):
- `hook_failures`: owned by the libvirt hooks (hook.main: one byte per call that failed or
  gave up);
- `table_restores`: owned by the watcher (one byte per restore of our table);
- `last_rebuild.json`: owned by rebuilds (when the last one ended, how long it took,
  whether libvirt answered the last one that asked it, and the UNPROTECTED NICs the last
  one that reached libvirt found);
- `abuse.json`: owned by the watcher's abuse desk (abuse.Desk.stats(), rewritten every
  EVENT_INTERVAL); read only, its absence says the desk is not running;
- `attempt_owners.json`: owned by the metrics writers (remember_owners): the guest each
  entry of the kernel's attempts set was first attributed to, and the order entries were
  first seen, for as long as the entry lives (bounded by the set's size).
Nobody resets them: RUN_DIR is a tmpfs (/run), so they start again at zero at every boot,
as the kernel's counters do; a reset of a counter is read by rate()/increase() as a reset.

Counters are exported as counters only when each labelset's value can only grow (or fall
to zero with a real reset): one series per (guest, MAC), the sum of the kernel's entries of
that guest and MAC.  Sums whose membership changes (guests past max_guests, a guest's MACs
past MACS_PER_GUEST) fall when an entry expires or moves into a series of its own: they are
a gauge, smtp_gate_guest_blocked_packets_summed, never read with rate().

Cardinality is bounded: blocked-attempt counters for at most max_guests guests (those with
the most attempts; a port of no known guest counts as a guest "_unknown" with its iface
label) and MACS_PER_GUEST MACs each, chosen by packets, ties by the order first seen (so
ties do not reshuffle membership between writes).  The gauge has one series per such
guest with more MACs (mac="_other") and one guest="_other".  At most
(max_guests + 1) * (MACS_PER_GUEST + 1) series, whatever fills the kernel's set.

Import cost: the hooks import this module for count(), so its top level is stdlib only.
"""

import os
import struct
import time
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

from smtp_gate.errors import SmtpGateError

if TYPE_CHECKING:  # pragma: no cover
    from smtp_gate.config import Config
    from smtp_gate.runstate import Record

FILE_NAME = "smtp_gate.prom"
HOOK_FAILURES = "hook_failures"
TABLE_RESTORES = "table_restores"
LAST_REBUILD = "last_rebuild.json"
ABUSE = "abuse.json"  # written by abuse.Desk every EVENT_INTERVAL
ATTEMPT_OWNERS = "attempt_owners.json"
# the keys of abuse.json (abuse.Desk.stats(), plus "updated": Unix time)
ABUSE_COUNTERS = ("events", "overruns", "kernel_drops", "journal_entries", "journal_lost",
                  "on_blocked_runs", "on_blocked_failures")
ABUSE_GAUGES = ("bound", "store_full")
COUNTER_CAP = 1 << 24  # bytes (events) a counter file grows to at most: 16 MiB of tmpfs
MACS_PER_GUEST = 8
OTHER, UNKNOWN = "_other", "_unknown"
REFRESH = 30.0  # seconds between the watcher's writes


class MetricsDirMissing(SmtpGateError):
    """METRICS_DIR does not exist (node_exporter is not installed): nothing is written."""


# -- counters in RUN_DIR (one byte per event) -------------------------------------------
def count(run_dir: str, name: str) -> None:
    """Count one event in RUN_DIR/NAME: one byte appended.  Never raises, never blocks (the
    hooks call it on their error path): a run directory that is missing, full or read-only
    loses the event, and a file at COUNTER_CAP stops growing."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(os.path.join(run_dir, name), flags, 0o600)
    except (OSError, ValueError):
        return
    try:
        if os.fstat(fd).st_size < COUNTER_CAP:
            os.write(fd, b"\n")
    except OSError:
        pass
    finally:
        os.close(fd)


def counted(run_dir: str, name: str) -> int:
    """The count in RUN_DIR/NAME (its size); 0 when it does not exist."""
    try:
        return os.stat(os.path.join(run_dir, name)).st_size
    except OSError:
        return 0


# -- the last rebuild ---------------------------------------------------------------------
class RebuildFacts(NamedTuple):
    at: float  # wall-clock seconds when the last rebuild ended
    duration: float  # seconds it took
    # running guest NICs no rule sees, as (guest, uuid), from the last rebuild that reached
    # libvirt, and when it ended; None: no rebuild reached libvirt this boot
    unprotected: Optional[Tuple[Tuple[str, str], ...]] = None
    unprotected_at: Optional[float] = None
    # whether libvirt answered the last rebuild that asked it, and when that one ended;
    # None: no rebuild asked libvirt this boot
    libvirt: Optional[bool] = None
    libvirt_at: Optional[float] = None


def read_rebuild(run_dir: str) -> Optional[RebuildFacts]:
    import json

    try:
        with open(os.path.join(run_dir, LAST_REBUILD), encoding="utf-8") as handle:
            data = json.load(handle)
        nics = data.get("unprotected")
        return RebuildFacts(
            at=float(data["at"]),
            duration=float(data["duration"]),
            unprotected=None if nics is None else tuple((str(g), str(u)) for g, u in nics),
            unprotected_at=None if data.get("unprotected_at") is None else float(data["unprotected_at"]),
            libvirt=None if data.get("libvirt") is None else bool(data["libvirt"]),
            libvirt_at=None if data.get("libvirt_at") is None else float(data["libvirt_at"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def note_rebuild(
    run_dir: str,
    at: float,
    duration: float,
    unprotected: Optional[Iterable[Tuple[str, str]]],
    libvirt: Optional[bool] = None,
) -> None:
    """Record a rebuild that installed the table (the caller holds rebuild.lock, so this
    read-modify-write has no rival).  UNPROTECTED None (libvirt not asked or silent) keeps
    the last known list; LIBVIRT None (not asked) keeps the last known answer, True/False:
    libvirt answered this rebuild or not."""
    import json

    from smtp_gate import files

    last = read_rebuild(run_dir)
    if unprotected is None:
        nics, nics_at = (last.unprotected, last.unprotected_at) if last else (None, None)
    else:
        nics, nics_at = tuple(unprotected), at
    if libvirt is None:
        up, up_at = (last.libvirt, last.libvirt_at) if last else (None, None)
    else:
        up, up_at = libvirt, at
    data = {
        "at": at,
        "duration": duration,
        "unprotected": None if nics is None else [list(n) for n in nics],
        "unprotected_at": nics_at,
        "libvirt": up,
        "libvirt_at": up_at,
    }
    files.atomic_write(os.path.join(run_dir, LAST_REBUILD), json.dumps(data).encode(), "the last rebuild's facts", 0o600)


# -- the abuse desk's figures ---------------------------------------------------------------
def read_abuse(run_dir: str) -> Optional[Dict[str, float]]:
    """RUN_DIR/abuse.json (abuse.Desk.stats() and "updated"); None when it is missing or is
    not what the desk writes (every key a number): the desk is then shown as down."""
    import json

    try:
        with open(os.path.join(run_dir, ABUSE), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    out: Dict[str, float] = {}
    for key in (*ABUSE_COUNTERS, *ABUSE_GAUGES, "updated"):
        value = data.get(key)
        if isinstance(value, bool) and key in ABUSE_GAUGES:  # true/false for 1/0: the same
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            return None
        out[key] = value
    return out


# -- who each entry of the attempts set belongs to ----------------------------------------
class Owner(NamedTuple):
    """The guest an entry (port . MAC) of the attempts set was first attributed to ("" while
    no record names its port), and when it was first seen (an order: smaller is earlier)."""

    guest: str
    uuid: str
    seen: int


def remember_owners(
    attempts: Iterable["Attempt"], now: Dict[str, Tuple[str, str]], remembered: Dict[str, Owner]
) -> Dict[str, Owner]:
    """Owner of each entry in ATTEMPTS ("port mac" -> Owner): the one REMEMBERED for it if
    any, else the guest whose record holds the port NOW.  So a guest that stops (its record
    goes, its port name may be given to another guest) keeps its name on its entries for as
    long as they live.  Entries no longer in the set are forgotten: bounded by its size."""
    out: Dict[str, Owner] = {}
    fresh: List[Tuple[str, str]] = []
    for item in attempts:
        key = f"{item.port} {item.mac}"
        old = remembered.get(key)
        if old is not None and old.guest:
            out[key] = old
            continue
        guest, uuid = now.get(item.port, ("", ""))
        if old is not None:
            out[key] = Owner(guest, uuid, old.seen)
        else:
            fresh.append((item.port, item.mac))
    start = max((o.seen for o in remembered.values()), default=-1) + 1
    for offset, (port, mac) in enumerate(sorted(set(fresh))):
        guest, uuid = now.get(port, ("", ""))
        out[f"{port} {mac}"] = Owner(guest, uuid, start + offset)
    return out


def read_owners(run_dir: str) -> Dict[str, Owner]:
    """RUN_DIR/attempt_owners.json; {} when missing or unreadable (owners are found again
    from the records, first-seen order from now)."""
    import json

    try:
        with open(os.path.join(run_dir, ATTEMPT_OWNERS), encoding="utf-8") as handle:
            data = json.load(handle)
        guests = [(str(g), str(u)) for g, u in data["guests"]]
        return {f"{port} {mac}": Owner(*guests[index], int(seen)) for port, mac, index, seen in data["entries"]}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return {}


def write_owners(run_dir: str, owners_map: Dict[str, Owner]) -> None:
    """Each guest once (a flood has thousands of entries per guest), then the entries."""
    import json

    from smtp_gate import files

    index: Dict[Tuple[str, str], int] = {}
    entries = []
    for key, owner in owners_map.items():
        port, mac = key.split(" ", 1)
        entries.append([port, mac, index.setdefault((owner.guest, owner.uuid), len(index)), owner.seen])
    data = {"guests": [list(g) for g in index], "entries": entries}
    files.atomic_write(os.path.join(run_dir, ATTEMPT_OWNERS), json.dumps(data, separators=(",", ":")).encode("utf-8"),
                       "the owners of blocked attempts", 0o600)


# -- the snapshot -------------------------------------------------------------------------
class Attempt(NamedTuple):
    """One element of the kernel's attempts set: a (port, source MAC) and its packets."""

    port: str
    mac: str
    packets: int


class Snapshot(NamedTuple):
    """Everything the file says, read at one moment; render() turns it into text."""

    at: float  # wall-clock seconds
    active: bool  # our table exists
    disabled: bool  # the operator's off-switch is set
    disabled_since: Optional[float] = None
    mode: str = ""  # the kernel's mode ("enforce"/"audit") while active
    blocked: Dict[str, int] = {}  # family ("ipv4"/"ipv6") -> packets (the kernel's counters)
    nonip: int = 0
    malformed: int = 0
    attempts: Tuple[Attempt, ...] = ()
    owners: Dict[str, Tuple[str, str]] = {}  # guest port (its index, as text) -> (guest name, uuid), from records
    port_names: Dict[str, str] = {}  # interface index (as text) -> the name the iface label shows
    # "port mac" -> Owner of every entry of ATTEMPTS (remember_owners() with the file's map);
    # None: not worked out yet (render() finds them from OWNERS alone)
    remembered: Optional[Dict[str, Owner]] = None
    remembered_changed: bool = False  # remembered differs from the file: refresh() rewrites it
    guests: int = 0  # running guests with a record
    allowed_guests: int = 0  # of them, those with an allowance
    allowed_nics: int = 0  # elements of the kernel's `allowed` set
    hook_failures: int = 0
    restores: int = 0
    rebuild: Optional[RebuildFacts] = None
    abuse: Optional[Dict[str, float]] = None  # RUN_DIR/abuse.json; None: missing
    abuse_wanted: bool = False  # LOG_GROUP is on: the watcher's desk should be bound
    abuse_stale_after: float = 60.0  # seconds after which an abuse.json not rewritten says "down"


def abuse_stale_after(config: "Config") -> float:
    """The desk rewrites abuse.json every EVENT_INTERVAL: three missed writes (at least a
    minute) mean it stopped."""
    return max(60.0, 3 * config.event_interval)


def _iso_seconds(text: str) -> Optional[float]:
    from datetime import datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


def owners(records: Iterable["Record"]) -> Dict[str, Tuple[str, str]]:
    """Guest port -> (guest, uuid), the port as the attempts set keys it: its interface
    index (as text), which a later device given the same name never has."""
    out: Dict[str, Tuple[str, str]] = {}
    for record in records:
        for _name, index in (*record.guest_ports, *record.foreign_ports):
            out[str(index)] = (record.name, record.uuid)
    return out


def port_names(records: Iterable["Record"]) -> Dict[str, str]:
    """Interface index (as text) -> a name to show for it in the iface label: the device's
    name now, else the name a record gave it, else "#index" (render() falls back to that)."""
    import socket

    out: Dict[str, str] = {}
    for record in records:
        for name, index in (*record.guest_ports, *record.foreign_ports):
            out[str(index)] = name
    try:
        out.update({str(index): name for index, name in socket.if_nameindex()})
    except OSError:
        pass
    return out


# The kernel's attempts set, read over netlink: `nft -j list` of a full set (65 536 entries
# with counters) takes seconds (bench/bench_metrics.py), a GETSETELEM dump a fraction of it.
# Attribute numbers from linux/netfilter/nf_tables.h.
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_EXPR, NFTA_SET_ELEM_EXPRESSIONS = 1, 7, 11
NFTA_DATA_VALUE, NFTA_LIST_ELEM = 1, 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_COUNTER_PACKETS = 2
_INDEX_KEY = 12  # iface_index (4 bytes, host order) . ether_addr (6, padded to 8)


def _nlattrs(data: bytes) -> Iterator[Tuple[int, bytes]]:
    """(type, payload) of each netlink attribute in DATA (type without the nested/byte-order bits)."""
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > len(data):
            return
        yield kind & 0x3FFF, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def _counter_packets(expr: bytes) -> Optional[int]:
    """The packets of a `counter` expression's attributes; None for another expression."""
    attrs = dict(_nlattrs(expr))
    if attrs.get(NFTA_EXPR_NAME, b"").rstrip(b"\0") != b"counter":
        return None
    data = dict(_nlattrs(attrs.get(NFTA_EXPR_DATA, b"")))
    packets = data.get(NFTA_COUNTER_PACKETS, b"")
    return struct.unpack(">Q", packets)[0] if len(packets) == 8 else None


# The layout every element of the attempts set has on the kernels we know: KEY { DATA_VALUE
# (12 bytes) } then EXPR { NAME "counter", DATA { BYTES, PACKETS } }.  Checked, byte by byte,
# before it is trusted; anything else takes the general parse.
_FAST_VALUE = struct.pack("=HH", 4 + _INDEX_KEY, NFTA_DATA_VALUE)
_FAST_NAME = struct.pack("=HH", 12, NFTA_EXPR_NAME) + b"counter\0"
_FAST_PACKETS = struct.pack("=HH", 12, NFTA_COUNTER_PACKETS)
_EXPR_AT = 8 + _INDEX_KEY


def _attempt_key(key: bytes, packets: int) -> Attempt:
    return Attempt(str(struct.unpack_from("=I", key)[0]), key[4:10].hex(":"), packets)


def _fast_attempt(element: bytes) -> Optional[Attempt]:
    at = _EXPR_AT
    if (
        len(element) >= at + 44
        and element[4:8] == _FAST_VALUE
        and element[at + 4 : at + 16] == _FAST_NAME
        and element[at + 32 : at + 36] == _FAST_PACKETS
        and struct.unpack_from("=H", element, 2)[0] & 0x3FFF == NFTA_SET_ELEM_KEY
        and struct.unpack_from("=H", element, at + 2)[0] & 0x3FFF == NFTA_SET_ELEM_EXPR
    ):
        return _attempt_key(element[8 : 8 + _INDEX_KEY], int.from_bytes(element[at + 36 : at + 44], "big"))
    return None


def parse_attempt(element: bytes) -> Optional[Attempt]:
    """One element of the attempts set (`iface_index . ether_addr`, counter) as the kernel
    sends it: a 12-byte key (the index in host order, the MAC padded to 8 bytes) and a
    counter expression, alone (NFTA_SET_ELEM_EXPR) or in a list (NFTA_SET_ELEM_EXPRESSIONS).
    Its port is the index, as text."""
    fast = _fast_attempt(element)
    if fast is not None:
        return fast
    key: Optional[bytes] = None
    packets = 0
    for kind, value in _nlattrs(element):
        if kind == NFTA_SET_ELEM_KEY:
            key = dict(_nlattrs(value)).get(NFTA_DATA_VALUE)
        elif kind == NFTA_SET_ELEM_EXPR:
            packets = _counter_packets(value) or packets
        elif kind == NFTA_SET_ELEM_EXPRESSIONS:
            for item_kind, item in _nlattrs(value):
                if item_kind == NFTA_LIST_ELEM:
                    packets = _counter_packets(item) or packets
    if key is None or len(key) < 10:
        return None
    return _attempt_key(key, packets)


NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_COUNTER = 1
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_IMMEDIATE_DATA, NFTA_DATA_VERDICT, NFTA_VERDICT_CODE = 2, 2, 1
NF_ACCEPT = 1


def _nlattr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _name(kind: int, name: str) -> bytes:
    return _nlattr(kind, name.encode() + b"\0")


def kernel_counters(timeout: float = 10.0) -> Dict[str, int]:
    """Packets of each named counter of our table (one GETOBJ dump)."""
    from smtp_gate import nfnetlink, ruleset

    payload = _name(NFTA_OBJ_TABLE, ruleset.TABLE) + _nlattr(NFTA_OBJ_TYPE, struct.pack(">I", NFT_OBJECT_COUNTER))
    out: Dict[str, int] = {}
    for obj in nfnetlink.dump(nfnetlink.NFT_MSG_GETOBJ, payload, f"the counters of {ruleset.T}", timeout=timeout):
        attrs = dict(_nlattrs(obj))
        data = dict(_nlattrs(attrs.get(NFTA_OBJ_DATA, b"")))
        packets = data.get(NFTA_COUNTER_PACKETS, b"")
        if NFTA_OBJ_NAME in attrs and len(packets) == 8:
            out[attrs[NFTA_OBJ_NAME].rstrip(b"\0").decode("utf-8", "replace")] = struct.unpack(">Q", packets)[0]
    return out


def _accepts(rule: bytes) -> bool:
    """Whether RULE (GETRULE attributes) is a lone `accept`: one immediate verdict expression."""
    exprs = [item for kind, item in _nlattrs(dict(_nlattrs(rule)).get(NFTA_RULE_EXPRESSIONS, b"")) if kind == NFTA_LIST_ELEM]
    if len(exprs) != 1:
        return False
    attrs = dict(_nlattrs(exprs[0]))
    if attrs.get(NFTA_EXPR_NAME, b"").rstrip(b"\0") != b"immediate":
        return False
    data = dict(_nlattrs(dict(_nlattrs(attrs.get(NFTA_EXPR_DATA, b""))).get(NFTA_IMMEDIATE_DATA, b"")))
    verdict = dict(_nlattrs(data.get(NFTA_DATA_VERDICT, b""))).get(NFTA_VERDICT_CODE, b"")
    return len(verdict) == 4 and struct.unpack(">i", verdict)[0] == NF_ACCEPT


def kernel_audit(timeout: float = 10.0) -> bool:
    """Audit mode: the blocked-attempt chain smtp4 ends with accept instead of drop (one
    GETRULE dump of that chain), as status.py reads it from nft's listing."""
    from smtp_gate import nfnetlink, ruleset

    payload = _name(NFTA_RULE_TABLE, ruleset.TABLE) + _name(NFTA_RULE_CHAIN, "smtp4")
    rules = nfnetlink.dump(nfnetlink.NFT_MSG_GETRULE, payload, f"chain {ruleset.T} smtp4", timeout=timeout)
    return any(_accepts(rule) for rule in rules)


def kernel_attempts(timeout: float = 10.0) -> Tuple[Attempt, ...]:
    """The kernel's attempts set, one GETSETELEM dump; () when the set does not exist."""
    from smtp_gate import nfnetlink, ruleset

    try:
        elements = nfnetlink.list_raw_elements(ruleset.ATTEMPTS_SET, ruleset.TABLE, timeout=timeout)
    except nfnetlink.NetlinkError as exc:
        if exc.missing:
            return ()
        raise
    return tuple(a for a in map(parse_attempt, elements) if a is not None)


def snapshot(config: "Config", at: Optional[float] = None) -> Snapshot:
    """Read the state: the kernel's (over netlink, no `nft` process: whether our base chains
    exist, the named counters, the mode, the attempts set, the allowances), the off-switch,
    and RUN_DIR.  Takes no lock: every file read here is replaced atomically."""
    from smtp_gate import nfnetlink, nft, offswitch, ruleset
    from smtp_gate.runstate import RunState

    at = time.time() if at is None else at
    off = offswitch.read(config.disabled_path)
    records = list(RunState(config.run_dir).all_records().values())
    common = dict(
        at=at,
        disabled=off is not None,
        disabled_since=_iso_seconds(off.at) if off is not None else None,
        owners=owners(records),
        port_names=port_names(records),
        guests=len(records),
        allowed_guests=sum(1 for r in records if r.allowed),
        hook_failures=counted(config.run_dir, HOOK_FAILURES),
        restores=counted(config.run_dir, TABLE_RESTORES),
        rebuild=read_rebuild(config.run_dir),
        abuse=read_abuse(config.run_dir),
        abuse_wanted=config.log_group is not None,
        abuse_stale_after=abuse_stale_after(config),
    )
    if not nft.base_exists():  # no table, no entries: nothing to remember
        gone = os.path.exists(os.path.join(config.run_dir, ATTEMPT_OWNERS))
        return Snapshot(active=False, remembered={}, remembered_changed=gone, **common)  # type: ignore[arg-type]
    try:
        allowed = len(nfnetlink.list_elements("allowed", ruleset.TABLE))
    except nfnetlink.NetlinkError as exc:
        if not exc.missing:
            raise
        allowed = 0
    counters = kernel_counters()
    attempts = kernel_attempts()
    known = read_owners(config.run_dir)
    remembered = remember_owners(attempts, common["owners"], known)  # type: ignore[arg-type]
    return Snapshot(
        active=True,
        mode="audit" if kernel_audit() else "enforce",
        blocked={"ipv4": counters.get("blocked4", 0), "ipv6": counters.get("blocked6", 0)},
        nonip=counters.get("nonip", 0),
        malformed=counters.get("malformed", 0),
        attempts=attempts,
        remembered=remembered,
        remembered_changed=remembered != known,
        allowed_nics=allowed,
        **common,  # type: ignore[arg-type]
    )


# -- the text format ----------------------------------------------------------------------
def label_value(text: str) -> str:
    """TEXT as a label value of the text exposition format: valid UTF-8 (what cannot be
    encoded, such as a lone surrogate, becomes U+FFFD), with backslash, double quote and
    line feed escaped, as the format requires."""
    if not text.isascii():
        text = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[Tuple[str, str]]) -> str:
    inner = ",".join(f'{name}="{label_value(value)}"' for name, value in pairs)
    return "{" + inner + "}" if inner else ""


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


Sample = Tuple[Tuple[Tuple[str, str], ...], float]  # (label pairs, value)


class Family(NamedTuple):
    name: str
    kind: str  # gauge or counter
    help: str
    samples: Tuple[Sample, ...]

    def text(self) -> str:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines = [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{self.name}{_labels(labels)} {_number(value)}" for labels, value in self.samples]
        return "\n".join(lines) + "\n"


GuestKey = Tuple[str, str]  # (guest name, uuid)
Row = Tuple[str, str, str, str, int]  # (guest, uuid, iface, mac, packets)


def guest_attempts(
    attempts: Iterable[Attempt],
    owners: Dict[str, Tuple[str, str]],
    max_guests: int,
    owned: Optional[Dict[str, Owner]] = None,
    names: Optional[Dict[str, str]] = None,
) -> Tuple[List[Row], List[Row]]:
    """(counters, sums) from the kernel's attempts set, attributed by OWNED (what
    remember_owners() gave for these very attempts; None: found from OWNERS alone).
    A port of no known guest is a guest "_unknown" of its own, told apart by iface (NAMES:
    index -> name; "#index" for a device gone; known guests have iface "": their port names
    change with every start).  The max_guests
    guests with the most packets keep counter rows, one per MAC for their MACS_PER_GUEST
    busiest MACs (ties: the MAC first seen, so ties do not reshuffle them between writes).
    Sums, whose members come and go (a guest's other MACs: mac "_other"; the other guests:
    guest "_other", uuid ""), are rows apart: they can fall, so they are no counters."""
    attempts = list(attempts)
    if owned is None:
        owned = remember_owners(attempts, owners, {})
    groups: Dict[Tuple[str, str, str], Dict[str, List[int]]] = {}  # -> mac -> [packets, first seen]
    by_owner: Dict[Tuple[str, str], Dict[str, List[int]]] = {}  # (guest, uuid) or (UNKNOWN, port): its group
    for port, mac, packets in attempts:
        owner = owned[f"{port} {mac}"]
        guest = owner.guest
        macs = by_owner.get((guest, owner.uuid) if guest else (UNKNOWN, port))
        if macs is None:
            shown = (names or {}).get(port) or (f"#{port}" if port.isdigit() else port)
            macs = groups[(guest, owner.uuid, "") if guest else (UNKNOWN, "", shown)] = {}
            by_owner[(guest, owner.uuid) if guest else (UNKNOWN, port)] = macs
        slot = macs.get(mac)
        if slot is None:
            macs[mac] = [packets, owner.seen]
        else:  # the same MAC on another port of the guest
            slot[0] += packets
            slot[1] = min(slot[1], owner.seen)

    def order(macs: Dict[str, List[int]]) -> Tuple[int, int]:
        return -sum(v[0] for v in macs.values()), min(v[1] for v in macs.values())

    ranked = sorted(groups.items(), key=lambda kv: (*order(kv[1]), kv[0]))
    counters: List[Row] = []
    sums: List[Row] = []
    for (guest, uuid, iface), macs in ranked[:max_guests]:
        busiest = sorted(macs.items(), key=lambda kv: (-kv[1][0], kv[1][1], kv[0]))
        counters += [(guest, uuid, iface, mac, v[0]) for mac, v in busiest[:MACS_PER_GUEST]]
        if len(busiest) > MACS_PER_GUEST:
            sums.append((guest, uuid, iface, OTHER, sum(v[0] for _mac, v in busiest[MACS_PER_GUEST:])))
    others = ranked[max_guests:]
    if others:
        sums.append((OTHER, "", "", OTHER, sum(v[0] for _key, macs in others for v in macs.values())))
    return counters, sums


def _capped_counts(keys: Iterable[GuestKey], max_guests: int) -> List[Tuple[str, str, int]]:
    """(guest, uuid, count) per guest, at most max_guests rows plus one "_other"."""
    counts: Dict[GuestKey, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    rows = [(guest, uuid, n) for (guest, uuid), n in ranked[:max_guests]]
    if len(ranked) > max_guests:
        rows.append((OTHER, "", sum(n for _key, n in ranked[max_guests:])))
    return rows


def families(snap: Snapshot, max_guests: int) -> List[Family]:
    """The metric families SNAP shows (a family without samples is left out)."""
    from smtp_gate import __version__, ruleset

    def one(value: float) -> Tuple[Sample, ...]:
        return (((), value),)

    out = [
        Family("smtp_gate_build_info", "gauge", "smtp-gate's version, as a label; always 1.",
               (((("version", __version__),), 1),)),
        Family("smtp_gate_metrics_written_timestamp_seconds", "gauge",
               "When this file was written (Unix time): rebuilds and the watcher rewrite it at least every minute.",
               one(snap.at)),
        Family("smtp_gate_enforcement_active", "gauge",
               "1 while the kernel holds table bridge smtp_gate (blocked SMTP is counted, and dropped in enforce mode).",
               one(int(snap.active))),
        Family("smtp_gate_disabled", "gauge", "1 while the operator's off-switch (`smtp-gate disable`) is set.",
               one(int(snap.disabled))),
    ]
    if snap.disabled_since is not None:
        out.append(Family("smtp_gate_disabled_since_timestamp_seconds", "gauge",
                          "When the operator switched enforcement off (Unix time).", one(snap.disabled_since)))
    out.append(Family("smtp_gate_mode", "gauge",
                      "1 for the mode the kernel's table runs in (enforce: dropped, audit: only counted); 0 for the others, "
                      "and for both while the table is not installed.",
                      tuple(((("mode", m),), int(snap.active and snap.mode == m)) for m in ("enforce", "audit"))))
    if snap.active:
        out += [
            Family("smtp_gate_blocked_packets_total", "counter",
                   "Packets to a blocked port that no allowance exempted, by IP family (the kernel's counters; they "
                   "start again when the table is re-created).",
                   tuple(((("family", f),), n) for f, n in sorted(snap.blocked.items()))),
            Family("smtp_gate_nonip_frames_total", "counter",
                   "Non-IP frames from guests toward the outside (dropped unless NON_IP=accept or audit mode).",
                   one(snap.nonip)),
            Family("smtp_gate_malformed_packets_total", "counter",
                   "IP packets whose TCP port cannot be read safely (dropped unless audit mode).", one(snap.malformed)),
            Family("smtp_gate_attempt_sources", "gauge",
                   "Entries (port, source MAC) in the kernel's attempts set; entries expire a day after their last "
                   "attempt.", one(len(snap.attempts))),
            Family("smtp_gate_attempt_sources_limit", "gauge",
                   "Size of the attempts set: when full (MAC spoofing), new sources are still blocked but not counted "
                   "per guest.", one(ruleset.ATTEMPTS_SIZE)),
            Family("smtp_gate_allowed_nics", "gauge", "Allowances (guest port, MAC) the kernel holds.",
                   one(snap.allowed_nics)),
        ]
        counted_rows, summed = guest_attempts(snap.attempts, snap.owners, max_guests, snap.remembered, snap.port_names)
        labels = ("guest", "uuid", "iface", "mac")
        if counted_rows:
            out.append(Family(
                "smtp_gate_guest_blocked_packets_total", "counter",
                f"Blocked packets per guest and source MAC (the kernel's attempts set; a guest keeps its entries "
                f"after it stops, for as long as they live). At most {max_guests} guests (METRICS_MAX_GUESTS, the "
                f"busiest) and {MACS_PER_GUEST} MACs each; ports of no known guest: guest=\"{UNKNOWN}\" with iface. "
                f"The rest: smtp_gate_guest_blocked_packets_summed.",
                tuple((tuple(zip(labels, row[:4])), row[4]) for row in counted_rows)))
        if summed:
            out.append(Family(
                "smtp_gate_guest_blocked_packets_summed", "gauge",
                f'Blocked packets without a counter of their own: a guest\'s MACs past {MACS_PER_GUEST} '
                f'(mac="{OTHER}") and the guests past METRICS_MAX_GUESTS (guest="{OTHER}"). A gauge: it falls when '
                f"an entry expires or gets a series of its own; never use rate() on it.",
                tuple((tuple(zip(labels, row[:4])), row[4]) for row in summed)))
    out += [
        Family("smtp_gate_guests", "gauge", "Running guests smtp-gate holds a record for (hooks and rebuilds).",
               one(snap.guests)),
        Family("smtp_gate_allowed_guests", "gauge", "Of those, the guests with at least one allowed NIC.",
               one(snap.allowed_guests)),
        Family("smtp_gate_hook_failures_total", "counter",
               "libvirt hook calls that failed or gave up (the guest stays blocked until the next rebuild); "
               "starts again at 0 at every boot.", one(snap.hook_failures)),
        Family("smtp_gate_table_restores_total", "counter",
               "Times `smtp-gate watch` put our table back after something else changed or removed it; "
               "starts again at 0 at every boot.", one(snap.restores)),
    ]
    facts = snap.rebuild
    if facts is not None:
        out += [
            Family("smtp_gate_last_rebuild_timestamp_seconds", "gauge",
                   "When the last apply/rebuild that installed the table ended (Unix time).", one(facts.at)),
            Family("smtp_gate_last_rebuild_duration_seconds", "gauge", "How long that apply/rebuild took.",
                   one(facts.duration)),
        ]
        if facts.unprotected is not None and facts.unprotected_at is not None:
            out += [
                Family("smtp_gate_unprotected_nics", "gauge",
                       "Running guest NICs no rule of smtp-gate sees (not on a bridge in BRIDGE), as the last rebuild "
                       "that reached libvirt found them.", one(len(facts.unprotected))),
                Family("smtp_gate_unprotected_checked_timestamp_seconds", "gauge",
                       "When that rebuild ended (Unix time).", one(facts.unprotected_at)),
            ]
            rows3 = _capped_counts(facts.unprotected, max_guests)
            if rows3:
                out.append(Family(
                    "smtp_gate_guest_unprotected_nics", "gauge",
                    f'UNPROTECTED NICs per guest; at most {max_guests} guests, the rest summed into guest="{OTHER}".',
                    tuple(((("guest", g), ("uuid", u)), n) for g, u, n in rows3)))
        if facts.libvirt is not None and facts.libvirt_at is not None:
            out += [
                Family("smtp_gate_libvirt_up", "gauge",
                       "1 if libvirt answered the last apply/rebuild that asked it, 0 if none of its URIs did "
                       "(UNPROTECTED NICs are then not checked).", one(int(facts.libvirt))),
                Family("smtp_gate_libvirt_checked_timestamp_seconds", "gauge",
                       "When that apply/rebuild ended (Unix time).", one(facts.libvirt_at)),
            ]
    out += _abuse_families(snap)
    return out


def _one(value: float) -> Tuple[Sample, ...]:
    return (((), value),)


def _abuse_families(snap: Snapshot) -> List[Family]:
    """The watcher's abuse desk, from RUN_DIR/abuse.json: up only while the file says the
    NFLOG group is bound and is fresh; its counters only while the file exists."""
    facts = snap.abuse
    fresh = facts is not None and snap.at - facts["updated"] <= snap.abuse_stale_after
    out = [
        Family("smtp_gate_abuse_desk_enabled", "gauge",
               "1 when LOG_GROUP is set: `smtp-gate watch` should read blocked attempts from that NFLOG group.",
               _one(int(snap.abuse_wanted))),
        Family("smtp_gate_abuse_desk_up", "gauge",
               "1 while the watcher's abuse desk is bound to LOG_GROUP and rewrites RUN_DIR/abuse.json; 0 when the "
               "file is missing, unreadable, stale or says it is not bound.",
               _one(int(bool(fresh and facts is not None and facts["bound"] == 1)))),
    ]
    if facts is None:
        return out
    names = {
        "events": ("smtp_gate_abuse_events_total", "Blocked attempts the desk read from the NFLOG group."),
        "overruns": ("smtp_gate_abuse_overruns_total",
                     "Times the NFLOG socket's receive buffer overflowed (events lost in the host)."),
        "kernel_drops": ("smtp_gate_abuse_kernel_drops_total",
                         "Events the kernel could not queue to the NFLOG group (lost before the desk)."),
        "journal_entries": ("smtp_gate_abuse_journal_entries_total", "Journal entries the desk wrote."),
        "journal_lost": ("smtp_gate_abuse_journal_lost_total", "Journal entries the desk could not write."),
        "on_blocked_runs": ("smtp_gate_on_blocked_runs_total", "Times the ON_BLOCKED command was started."),
        "on_blocked_failures": ("smtp_gate_on_blocked_failures_total",
                                "ON_BLOCKED runs that failed (exit status, signal, timeout, cannot start)."),
    }
    for key in ABUSE_COUNTERS:
        name, text = names[key]
        out.append(Family(name, "counter", text + " Per watcher process: starts again at 0 when it restarts.",
                          _one(int(facts[key]))))
    out += [
        Family("smtp_gate_abuse_store_full", "gauge",
               "1 while the report's store is full (attempts are journaled but not counted for `smtp-gate report`).",
               _one(int(facts["store_full"]))),
        Family("smtp_gate_abuse_desk_updated_timestamp_seconds", "gauge",
               "When the desk last wrote RUN_DIR/abuse.json (Unix time): time() minus this is its age.",
               _one(facts["updated"])),
    ]
    return out


def render(snap: Snapshot, max_guests: int) -> str:
    """The whole file for SNAP."""
    return "".join(family.text() for family in families(snap, max_guests))


# -- the writer ---------------------------------------------------------------------------
def write(directory: str, text: str) -> str:
    """Replace DIRECTORY/smtp_gate.prom with TEXT atomically; its path.  A missing DIRECTORY
    raises MetricsDirMissing (created by node_exporter's package, never by us)."""
    from smtp_gate import files

    if not os.path.isdir(directory):
        raise MetricsDirMissing(
            f"METRICS_DIR {directory!r} does not exist: metrics not written "
            '(install prometheus-node-exporter, or set METRICS_DIR="" to turn them off)'
        )
    path = os.path.join(directory, FILE_NAME)
    files.atomic_write(path, text.encode("utf-8"), "the metrics file", new_mode=0o644)
    return path


def refresh(config: "Config") -> Optional[str]:
    """Read the state and write the file; its path, or None when METRICS_DIR is "" (off)."""
    if not config.metrics_dir:
        return None
    snap = snapshot(config)
    path = write(config.metrics_dir, render(snap, config.metrics_max_guests))
    if snap.remembered_changed:
        write_owners(config.run_dir, snap.remembered or {})  # after the file: it named them already
    return path


class Refresher:
    """The watcher's writer: a daemon thread that refreshes the file every PERIOD seconds and
    at once when poked (after a restore).  Logs a failure once, until it changes or ends."""

    def __init__(self, config: Callable[[], "Config"], log: Callable[[str], None], period: float = REFRESH) -> None:
        import threading

        self.config = config
        self.log = log
        self.period = period
        self.wake = threading.Event()
        self.last_problem: Optional[str] = None

    def poke(self) -> None:
        self.wake.set()

    def once(self) -> None:
        try:
            refresh(self.config())
            problem = None
        except (SmtpGateError, OSError, ValueError) as exc:
            problem = str(exc)
        if problem != self.last_problem:
            self.log(f"metrics: {problem}" if problem else "metrics: written again")
        self.last_problem = problem

    def run(self) -> None:
        while True:
            started = time.monotonic()
            self.once()
            # a refresh that takes long (a full attempts set: ~1 s, bench/bench_metrics.py)
            # is done less often: at most a tenth of a CPU, whatever fills the kernel's set
            self.wake.wait(max(self.period, 10 * (time.monotonic() - started)))
            self.wake.clear()

    def start(self) -> None:
        import threading

        threading.Thread(target=self.run, name="smtp-gate-metrics", daemon=True).start()
