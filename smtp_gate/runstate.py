"""What hooks and rebuilds leave for each other in the run directory (/run/smtp-gate).

- records/<uuid>.json: what smtp-gate put into the kernel for one running guest (its
  guest ports and the ports left alone, each as (name, interface index), and its
  allowances), the libvirt URI that vouches for it, and since when no listing has
  (a rebuild keeps a record it cannot check for a bounded time only: docs/protocol.md).  A stop hook removes exactly that, because
  the stop XML no longer names auto-created taps; a reconnect hook compares with it and
  does nothing when nothing changed.
- journal: one line per guest start or stop a hook saw.  A rebuild reads libvirt without
  our lock (a guest whose start hook waits for the lock holds libvirt's lock on that
  guest), notes where the journal ended first, and replays what hooks recorded in
  between onto its snapshot: it neither loses their additions nor brings back what they
  removed.
- journal.gen: a random token each truncation of the journal writes anew.  A reader that
  noted the journal's end without a lock (the watcher's rounds, guest_sync.py) compares
  it with its end and token later: a truncation followed by appends past the noted end
  would otherwise go unseen (the end alone shrinks and grows back).
- rebuild.lock: rebuilds run one at a time, so the one that truncates the journal is
  the only one reading it.

- boot_id: the kernel's boot id (BOOT_ID) when this directory's records and journal were
  written.  Interface indexes start again at every boot, so a record of another boot may
  name the index a new, unrelated device has now: readers ignore the records and journal
  of another boot (or of no stamp at all), and the next writer wipes them and stamps the
  directory.  It matters when RUN_DIR is not a tmpfs that starts empty at boot.

Everything here is written under the main lock.  The directory is tmpfs: it starts
empty at boot, when no guest runs.
"""

import json
import os
import time
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

from smtp_gate.domain import Allow, Domain, Nic

Pair = Tuple[int, str]
Port = Tuple[str, int]  # (name, interface index): the kernel is given the index, people the name


def _ports(values: object) -> Tuple[Port, ...]:
    """Ports of a record file.  A bare name (an older version's record) carries no index and
    is skipped: the set it went into no longer exists, and a name must never exempt a port."""
    out = []
    for value in values if isinstance(values, list) else []:
        if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool):
            out.append((str(value[0]), value[1]))
    return tuple(out)


def _number(value: object) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def now() -> float:
    """The clock of unverified_since: seconds since boot (CLOCK_BOOTTIME), which no wall-clock
    step moves and which counts suspended time; the run directory lives for one boot too."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Record(NamedTuple):
    uuid: str
    name: str
    guest_ports: Tuple[Port, ...] = ()
    foreign_ports: Tuple[Port, ...] = ()
    allowed: Tuple[Pair, ...] = ()
    # the libvirt URI whose listing vouches for this guest; "" in an older version's record
    uri: str = ""
    # set while rebuilds keep the record without a listing that shows the guest (its URI did
    # not answer, or its XML could not be read): since when (now()); None once seen again
    unverified_since: Optional[float] = None

    def elements(self) -> List[Tuple[str, object]]:
        """(set, element) for everything this record puts into the kernel: what a start adds
        and a stop removes."""
        out: List[Tuple[str, object]] = [("guest_ifaces", index) for _name, index in self.guest_ports]
        out += [("foreign_ifaces", index) for _name, index in self.foreign_ports]
        out += [("allowed", pair) for pair in self.allowed]
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "uuid": self.uuid,
                "name": self.name,
                "guest_ports": [list(p) for p in self.guest_ports],
                "foreign_ports": [list(p) for p in self.foreign_ports],
                "allowed": [list(p) for p in self.allowed],
                "uri": self.uri,
                "unverified_since": self.unverified_since,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> "Record":
        data = json.loads(text)
        return cls(
            uuid=str(data["uuid"]),
            name=str(data["name"]),
            guest_ports=_ports(data.get("guest_ports")),
            foreign_ports=_ports(data.get("foreign_ports")),
            allowed=tuple((int(i), str(m)) for i, m in data.get("allowed", [])),
            uri=str(data.get("uri") or ""),
            unverified_since=_number(data.get("unverified_since")),
        )


BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id(path: str = BOOT_ID) -> Optional[str]:
    """This boot's id; None if the kernel does not tell (then no stamp is checked or written)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(64).strip().decode("ascii", "replace") or None
    except OSError:
        return None


def _write(path: str, text: str) -> None:
    """Write-then-rename: a reader never sees half a record.  On failure (a full /run) the
    temporary file goes too: nothing half-written is left to fill the directory further."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _holds(path: str, data: bytes) -> bool:
    """Whether the file at PATH holds exactly DATA.  One read of len(DATA) + 1 bytes (a
    regular file's read is short only at its end), with os calls: a rebuild checks 1 000."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.read(fd, len(data) + 1) == data
    except OSError:
        return False
    finally:
        os.close(fd)


class RunState:
    """The run directory.  A plain object over a path: tests give it a temporary one."""

    def __init__(self, run_dir: "os.PathLike[str] | str") -> None:
        self.dir = os.fspath(run_dir)
        self.records = os.path.join(self.dir, "records")
        self.journal = os.path.join(self.dir, "journal")
        self.generation = os.path.join(self.dir, "journal.gen")
        self.rebuild_lock = os.path.join(self.dir, "rebuild.lock")
        self.stamp = os.path.join(self.dir, "boot_id")
        self._boot: Optional[str] = None
        self._current = False  # once the stamp was seen to be this boot's, it stays so

    def prepare(self) -> None:
        os.makedirs(self.records, mode=0o700, exist_ok=True)

    # -- the boot stamp ---------------------------------------------------------------------
    def current(self) -> bool:
        """Whether the records and journal here were written during this boot (one small read
        of each id; the answer is kept once it is yes).  Readers see nothing otherwise."""
        if self._current:
            return True
        self._boot = self._boot or boot_id()
        if self._boot is None:
            self._current = True  # the kernel does not tell: trust the directory, as before
            return True
        try:
            with open(self.stamp, "rb") as handle:
                stamped = handle.read(64).strip().decode("ascii", "replace")
        except OSError:
            stamped = ""
        self._current = stamped == self._boot
        return self._current

    def claim(self) -> None:
        """For writers, under the main lock: if the directory holds another boot's records and
        journal, remove them and stamp it with this boot's id, before writing anything."""
        self.prepare()
        if self.current():
            return
        for name in os.listdir(self.records):
            if name.endswith(".json") or ".tmp" in name:
                try:
                    os.unlink(os.path.join(self.records, name))
                except FileNotFoundError:
                    pass
        try:
            os.unlink(self.journal)
        except FileNotFoundError:
            pass
        _write(self.generation, _token())  # the journal went: whoever noted a mark of it must ask again
        _write(self.stamp, f"{self._boot}\n")  # last: a writer interrupted before it wipes again
        self._current = True

    # -- per-guest records ------------------------------------------------------------------
    def _record_path(self, uuid: str) -> str:
        return os.path.join(self.records, f"{uuid}.json")

    def read_record(self, uuid: str) -> Optional[Record]:
        if not self.current():
            return None
        try:
            with open(self._record_path(uuid), encoding="utf-8") as handle:
                return Record.from_json(handle.read())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, OSError):
            return None  # a damaged record is as good as none: the caller falls back

    def write_record(self, record: Record) -> None:
        self.claim()
        _write(self._record_path(record.uuid), record.to_json() + "\n")

    def drop_record(self, uuid: str) -> None:
        self.claim()
        try:
            os.unlink(self._record_path(uuid))
        except FileNotFoundError:
            pass

    def all_records(self) -> Dict[str, Record]:
        out: Dict[str, Record] = {}
        if not self.current():
            return out
        try:
            names = os.listdir(self.records)
        except FileNotFoundError:
            return out
        for name in names:
            if name.endswith(".json") and not name.startswith("."):
                record = self.read_record(name[: -len(".json")])
                if record is not None:
                    out[record.uuid] = record
        return out

    def replace_records(self, records: Iterable[Record]) -> None:
        """After a rebuild: exactly one record per running guest.  Files are compared as
        text, not parsed: a rebuild of 1 000 unchanged guests then writes nothing."""
        self.claim()
        wanted = {r.uuid: r.to_json() + "\n" for r in records}
        for name in os.listdir(self.records):
            if name.endswith(".json") and not name.startswith(".") and name[: -len(".json")] not in wanted:
                self.drop_record(name[: -len(".json")])
        for uuid, text in wanted.items():
            path = self._record_path(uuid)
            if not _holds(path, text.encode("utf-8")):
                _write(path, text)

    # -- journal --------------------------------------------------------------------------
    def journal_end(self) -> int:
        if not self.current():
            return 0
        try:
            return os.stat(self.journal).st_size
        except FileNotFoundError:
            return 0

    def journal_mark(self) -> Tuple[str, int]:
        """(the journal's generation, its end): a position that a truncation changes even when
        appends grow the journal past the old end again.  No lock needed: the generation is
        read first, and truncate_journal() writes it after truncating, so a mark never pairs
        a new generation with an end from before the truncation."""
        try:
            with open(self.generation, "rb") as handle:
                generation = handle.read(64).strip().decode("ascii", "replace")
        except FileNotFoundError:
            generation = ""
        return generation, self.journal_end()

    def append(self, event: Dict[str, object]) -> None:
        self.claim()
        line = (json.dumps(event, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def events_since(self, offset: int) -> Iterator[Dict[str, object]]:
        if not self.current():
            return
        try:
            with open(self.journal, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return
        for line in data.splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue

    def truncate_journal(self) -> None:
        """Empty the journal, then give it a new generation (journal_mark())."""
        self.claim()
        try:
            os.truncate(self.journal, 0)
        except FileNotFoundError:
            pass
        _write(self.generation, _token())


def _token() -> str:
    return os.urandom(8).hex() + "\n"


def domain_event(op: str, domain: Domain) -> Dict[str, object]:
    return {
        "op": op,
        "uuid": domain.uuid,
        "name": domain.name,
        "type": domain.type,
        "uri": domain.uri or "",
        "nics": [[n.type, n.mac, n.bridge, n.target, n.virtualport] for n in domain.nics],
        "allow": None if domain.allow is None else list(domain.allow[:3]) + [domain.allow.macs],
    }


def domain_from_event(event: Dict[str, object]) -> Domain:
    nics = tuple(
        Nic(type=t or "", mac=m, bridge=b, network=None, target=d, virtualport=v)
        for t, m, b, d, v in event.get("nics", [])  # type: ignore[union-attr]
    )
    allow = event.get("allow")
    return Domain(
        name=str(event["name"]),
        uuid=str(event["uuid"]),
        type=str(event.get("type", "")),
        nics=nics,
        uri=str(event.get("uri") or "") or None,
        allow=None if not allow else Allow(*allow[:3], macs=None if allow[3] is None else tuple(allow[3])),  # type: ignore[index,misc]
    )


def replay(snapshot: Dict[str, Domain], events: Iterable[Dict[str, object]]) -> Dict[str, Domain]:
    """Amend a libvirt snapshot with the starts and stops hooks saw after it was taken."""
    amended = dict(snapshot)
    for event in events:
        uuid = str(event.get("uuid", ""))
        if event.get("op") == "start":
            amended[uuid] = domain_from_event(event)
        elif event.get("op") == "stop":
            amended.pop(uuid, None)
    return amended
