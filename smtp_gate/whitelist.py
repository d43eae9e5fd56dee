"""The whitelist file, `whitelist.csv`, in the original tool's format.

    # vmname,mac,added_at,added_by,reason
    6f1a2b3c-0000-4000-8000-123456789abc,,2026-11-25T14:03:07+00:00,alice,"ID verified, ticket 4711"
    ,52:54:00:ab:cd:ef,2026-11-25T14:05:00+00:00,bob,relay
    web1,,2026-11-25T14:06:00+00:00,carol,written by hand

A row with a MAC allows the guest NIC that has that MAC (its vmname is only a label).
A row with an empty MAC allows every NIC of the guest whose UUID is in vmname (what
add-vm writes: names are reused, UUIDs are not), or, for a vmname that is not a UUID,
of the guest with that name (rows written by hand or by the original tool).  Operators edit the file by hand, so the model keeps every line verbatim:
comments, blank lines and rows it cannot use are written back byte for byte, and a row
it cannot use is reported with its line number and allows nothing (fail closed).

Callers hold smtp_gate.lock around every read-modify-write; this module only offers the
primitives.  The libvirt hook imports it on every guest start: the top level imports
nothing heavier than csv and re (no dataclasses, datetime, tempfile or filelock), and
fast_allowed_macs() answers for one guest without parsing the whole file.
"""

from __future__ import annotations

import csv
import io
import os
import re
from typing import TYPE_CHECKING, Dict, FrozenSet, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from smtp_gate import validate
from smtp_gate.errors import ValidationError, WhitelistError

if TYPE_CHECKING:  # only for annotations: datetime costs the hook an import
    from datetime import datetime

FIELDS = ("vmname", "mac", "added_at", "added_by", "reason")
HEADER = "# " + ",".join(FIELDS) + "\n"
NEW_FILE_MODE = 0o640  # guest names, operators and reasons (tickets, customers) are nobody else's business

# Line kinds
COMMENT = "comment"
BLANK = "blank"
HEADER_ROW = "header"  # the header written without its '#': kept, not reported
ENTRY = "entry"
BAD = "bad"

# Actions of an Effect
ADDED = "added"
REMOVED = "removed"
ALREADY = "already"
ABSENT = "absent"

_BOM = "\ufeff"
# Patterns as text, compiled by re (and kept in its cache) on first use: compiling them at
# import would cost every hook call, which needs at most one of them.
_CANONICAL_MAC = r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}"
_ZERO_MAC = "00:00:00:00:00:00"
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}"
# A quoted field that opens after a comma and closes on the same line.  If every '"' before
# a line lies in one of these, csv reads each line as a record of its own: a closing quote
# followed by anything but a comma or the line end is an error that ends the record on
# that very line (strict mode), and a '"' after it would lie in no such field.
_QUOTED_FIELD_STR = r'"(?<=,")[^"\n]*(?:""[^"\n]*)*"'  # re scans for '"' first: fast
_QUOTED_FIELD = _QUOTED_FIELD_STR.encode("ascii")


class Guest(NamedTuple):
    """What the matcher needs to know about a guest; any object with these attributes will do."""

    name: str
    uuid: str = ""
    macs: Tuple[str, ...] = ()


class Entry(NamedTuple):
    """One usable row.  vmname and mac are stripped; mac is normalised, "" for a whole-guest row."""

    vmname: str
    mac: str
    added_at: str
    added_by: str
    reason: str

    @property
    def bound(self) -> str:
        """What the row allows by: "mac", "uuid" (a guest's UUID in vmname) or "name" (a
        guest name, which a later guest given that name inherits)."""
        if self.mac:
            return "mac"
        return "uuid" if _uuid_key(self.vmname) else "name"

    def describe(self, shown: str = "", every_nic: bool = True) -> str:
        """For an `ok:` line; SHOWN is the guest's name when vmname holds its UUID."""
        if self.mac:
            return f"MAC {self.mac}" + (f" ({self.vmname})" if self.vmname else "")
        nics = ", every NIC" if every_nic else ""
        if shown and shown != self.vmname and self.bound == "uuid":
            return f"guest {shown!r} (UUID {self.vmname}{nics})"
        return f"guest {self.vmname!r}" + (" (every NIC)" if every_nic else "")


class Line(NamedTuple):
    """One record as read: raw is verbatim, line ending(s) included (a quoted field may span lines)."""

    raw: str
    kind: str
    entry: Optional[Entry] = None
    problem: str = ""  # for BAD: what is wrong and what was expected


class Problem(NamedTuple):
    """A row that allows nothing, with its 1-based line numbers, for the operator to fix."""

    line: int
    last_line: int
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line == self.last_line else f"lines {self.line}-{self.last_line}"
        return f"{where}: {self.message}"


class Effect(NamedTuple):
    """What one operation did, for one `ok: ...` line of the CLI.

    line is the 1-based line of the row in the model as it was before the operation
    (for ADDED: where the new row now starts).
    """

    action: str
    subject: str
    line: int = 0
    entry: Optional[Entry] = None

    @property
    def changed(self) -> bool:
        return self.action in (ADDED, REMOVED)

    def __str__(self) -> str:
        if self.action == ADDED:
            return f"added {self.subject} at line {self.line}"
        if self.action == REMOVED:
            return f"removed {self.subject} from line {self.line}"
        if self.action == ALREADY:
            return f"{self.subject} already there (line {self.line})"
        return f"{self.subject} not in the whitelist"


# --------------------------------------------------------------------------- parsing


def _split_lines(text: str) -> List[str]:
    """Split on '\\n' only, keeping it: str.splitlines() would also split a reason at \\x0c or \\u2028."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _physical_lines(raw: str) -> int:
    return raw.count("\n") + (0 if raw.endswith("\n") else 1)


class _Feed:
    """The lines handed to csv, counting them: csv alone decides where a record ends."""

    __slots__ = ("lines", "index", "exhausted")

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = lines
        self.index = 0
        self.exhausted = False  # csv asked for a line after the last: a quoted field was left open

    def __iter__(self) -> "_Feed":
        return self

    def __next__(self) -> str:
        i = self.index
        if i >= len(self.lines):
            self.exhausted = True
            raise StopIteration
        self.index = i + 1
        return self.lines[i]


def _records(lines: Sequence[str], at_file_start: bool) -> Iterator[Tuple[Line, int, bool]]:
    """Yield (Line, index after it, ended inside an open quote) for each record of LINES.

    The full parse and the fast path both read records through here, so they cannot
    disagree on what a record means.  A blank or '#' line is taken before csv sees it;
    csv (strict: malformed quoting is a reported bad row, not a guess) reads the rest
    and may continue a quoted field over several lines.
    """
    feed_lines = lines
    if at_file_start and lines and lines[0].startswith(_BOM):
        feed_lines = [lines[0][1:]] + list(lines[1:])  # an editor's byte-order mark is no data
    feed = _Feed(feed_lines)
    reader = csv.reader(feed, strict=True)
    count = len(lines)
    while feed.index < count:
        i = feed.index
        stripped = feed_lines[i].strip()
        if not stripped or stripped[0] == "#":
            feed.index = i + 1
            yield Line(lines[i], COMMENT if stripped else BLANK), i + 1, False
            continue
        fields = _plain_fields(feed_lines[i])
        if fields is not None:  # what csv would read, without asking it
            feed.index = i + 1
            yield _classify(lines[i], fields), i + 1, False
            continue
        error = ""
        try:
            fields = next(reader)
        except csv.Error as e:
            error = str(e)
        end = feed.index
        raw = lines[i] if end == i + 1 else "".join(lines[i:end])
        if feed.exhausted:
            yield (
                Line(raw, BAD, None, f"row {_preview(raw)} has an unterminated quoted field: a '\"' opens a "
                     "field that never closes (expected a closing '\"')"),
                end,
                True,
            )
        elif error:
            yield (
                Line(raw, BAD, None, f"row {_preview(raw)} is unreadable ({error}): expected CSV with whole "
                     'fields in double quotes and a quote inside doubled, e.g. "ticket ""4711"""'),
                end,
                False,
            )
        else:
            yield _classify(raw, fields), end, False


def _plain_fields(line: str) -> Optional[List[str]]:
    """LINE's fields if it has no quote, CR (but a final one), LF (but a final one) or NUL:
    then csv's reading is exactly a split on commas, without csv's per-line cost (parse()
    of 10 000 plain rows, which every rebuild does: 68 ms -> 41 ms, measured).  None
    otherwise: csv reads it."""
    body = line[:-1] if line.endswith("\n") else line
    if body.endswith("\r"):
        body = body[:-1]
    if '"' in body or "\r" in body or "\n" in body or "\0" in body:
        return None
    return body.split(",")


def _first_record(lines: Sequence[str], at_file_start: bool) -> Tuple[Line, int, bool]:
    return next(_records(lines, at_file_start))


def _classify(raw: str, fields: List[str]) -> Line:
    """Turn the fields of one record into an entry, or into a bad row saying what was expected."""
    if len(fields) != len(FIELDS):
        hint = "; put a reason that contains commas in double quotes" if len(fields) > len(FIELDS) else ""
        return Line(
            raw, BAD, None, f"row {_preview(raw)}: expected 5 fields ({','.join(FIELDS)}), found {len(fields)}{hint}"
        )
    vmname = fields[0].strip()
    mac_text = fields[1].strip()
    if vmname.lower() == "vmname" and mac_text.lower() == "mac":
        return Line(raw, HEADER_ROW)
    if not mac_text:
        if not vmname:
            return Line(raw, BAD, None, f"row {_preview(raw)} has neither a guest name nor a MAC: expected a "
                        "guest name or UUID in vmname, or a MAC in mac")
        return Line(raw, ENTRY, Entry(vmname, "", fields[2], fields[3], fields[4]))
    if re.fullmatch(_CANONICAL_MAC, mac_text) and not int(mac_text[:2], 16) & 1 and mac_text != _ZERO_MAC:
        mac = mac_text  # what validate.unicast_mac() returns for it, at a fifth of the cost
    else:
        try:
            mac = validate.unicast_mac(mac_text)
        except ValidationError as e:
            return Line(raw, BAD, None, str(e))
    return Line(raw, ENTRY, Entry(vmname, mac, fields[2], fields[3], fields[4]))


def _preview(raw: str) -> str:
    text = raw.strip()
    return repr(text if len(text) <= 60 else text[:57] + "...")


def parse(text: str) -> "Whitelist":
    """The model of TEXT, every line kept; never raises (bad rows are reported by problems())."""
    return Whitelist([record for record, _, _ in _records(_split_lines(text), True)])


def _uuid_key(value: str) -> str:
    """A UUID's 32 lower-case hex digits, "" if VALUE is not a UUID (dashed or bare, any case)."""
    text = value.strip().lower()
    return text.replace("-", "") if re.fullmatch(_UUID, text) else ""


def _guest_macs(guest: Guest) -> List[str]:
    seen: List[str] = []
    for value in guest.macs:
        normal = validate.mac(value)
        if normal not in seen:
            seen.append(normal)
    return seen


def _matches_guest(entry: Entry, name: str, uuid_key: str) -> bool:
    """A vmname that is a UUID matches that UUID only, never a guest merely named so: a
    guest's name is whatever its owner chose, its UUID is libvirt's and never reused."""
    row_key = _uuid_key(entry.vmname)
    if row_key:
        return bool(uuid_key) and row_key == uuid_key
    return bool(name) and entry.vmname == name


class Index(NamedTuple):
    """Whitelist.allowed_macs() for many guests at the cost of one pass over the rows."""

    names: FrozenSet[str]  # vmname of every whole-guest row that is not a UUID
    uuid_keys: FrozenSet[str]  # those that are UUIDs, as _uuid_key() gives them
    macs: FrozenSet[str]  # MAC of every MAC row, normalised

    def allowed_macs(self, guest: Guest) -> Tuple[str, ...]:
        """Exactly Whitelist.allowed_macs(guest)."""
        macs = _guest_macs(guest)
        name, key = guest.name or "", _uuid_key(guest.uuid or "")
        if (name and name in self.names) or (key and key in self.uuid_keys):
            return tuple(macs)
        return tuple(mac for mac in macs if mac in self.macs)


# --------------------------------------------------------------------------- the model


class Whitelist:
    """Every line of the file, in order; operations edit it in place and say what they did."""

    __slots__ = ("lines",)

    def __init__(self, lines: Iterable[Line] = ()) -> None:
        self.lines: List[Line] = list(lines)

    def __repr__(self) -> str:
        return f"Whitelist({len(self.lines)} lines)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Whitelist) and self.lines == other.lines

    def text(self) -> str:
        return "".join(line.raw for line in self.lines)

    def numbered(self) -> Iterator[Tuple[int, Line]]:
        """(1-based line number of its first physical line, Line) for every record."""
        number = 1
        for line in self.lines:
            yield number, line
            number += _physical_lines(line.raw)

    def entries(self) -> List[Entry]:
        return [line.entry for line in self.lines if line.entry is not None]

    def problems(self) -> List[Problem]:
        return [
            Problem(number, number + _physical_lines(line.raw) - 1, line.problem)
            for number, line in self.numbered()
            if line.kind == BAD
        ]

    # ----------------------------------------------------------------- matching

    def allowed_macs(self, guest: Guest) -> Tuple[str, ...]:
        """The guest's MACs (normalised, in its order) that the whitelist allows."""
        macs = _guest_macs(guest)
        name, key = guest.name or "", _uuid_key(guest.uuid or "")
        allowed = set()
        for entry in self.entries():
            if entry.mac:
                if entry.mac in macs:
                    allowed.add(entry.mac)
            elif _matches_guest(entry, name, key):
                return tuple(macs)
        return tuple(mac for mac in macs if mac in allowed)

    def index(self) -> "Index":
        """The usable rows as sets, for asking about many guests (a rebuild asks about all)."""
        names, uuid_keys, macs = set(), set(), set()
        for entry in self.entries():
            if entry.mac:
                macs.add(entry.mac)
            elif entry.vmname:
                key = _uuid_key(entry.vmname)
                if key:
                    uuid_keys.add(key)
                else:
                    names.add(entry.vmname)
        return Index(frozenset(names), frozenset(uuid_keys), frozenset(macs))

    def matching(self, guest: Guest) -> List[Tuple[int, Entry]]:
        """The rows (line number, entry) that allow some NIC of GUEST, for status output."""
        macs = _guest_macs(guest)
        name, key = guest.name or "", _uuid_key(guest.uuid or "")
        return [
            (number, line.entry)
            for number, line in self.numbered()
            if line.entry is not None
            and (line.entry.mac in macs if line.entry.mac else _matches_guest(line.entry, name, key))
        ]

    # ----------------------------------------------------------------- editing

    def add_guest(
        self, name: str, *, added_at: "datetime", added_by: str, reason: str, uuid: str = "", shown: str = ""
    ) -> Effect:
        """Allow every NIC of the guest NAME stands for: a UUID (what add-vm writes, see
        uuid_row()) or a name.  ALREADY if a whole-guest row allows it the same way (by that
        UUID, or by that name); SHOWN is the guest's name for the message."""
        name = _field("guest name", name, required=True)
        key = _uuid_key(uuid) if uuid else ""
        for number, line in self.numbered():
            entry = line.entry
            if entry is not None and not entry.mac and _matches_guest(entry, name, key):
                return Effect(ALREADY, entry.describe(shown, every_nic=False), number, entry)
        entry = Entry(name, "", _timestamp(added_at), _text("added_by", added_by), _text("reason", reason))
        return self._append(entry, entry.describe(shown))

    def remove_guest(self, name: str, uuid: str = "", shown: str = "") -> List[Effect]:
        """Remove every usable row for the guest named NAME or with UUID: rows bound to its
        UUID, rows bound to its name, and MAC rows labelled with its name.

        A MAC row labelled with the guest's name would otherwise keep the guest allowed
        after `remove`; a MAC row with another label stays (see allowed_macs()).
        """
        name = name.strip()
        key = _uuid_key(uuid) if uuid else ""
        return self._remove(
            lambda entry: _matches_guest(entry, name, key),
            f"guest {name!r}" if name else f"guest {uuid!r}",
            shown or name,
        )

    def add_mac(self, mac: str, *, added_at: "datetime", added_by: str, reason: str, label: str = "") -> Effect:
        """Allow the NIC with MAC; ALREADY if a usable row has that MAC in any spelling, whatever its label."""
        normal = validate.unicast_mac(mac)
        label = _text("label", _field("label", label, required=False))
        for number, line in self.numbered():
            if line.entry is not None and line.entry.mac == normal:
                return Effect(ALREADY, f"MAC {normal}", number, line.entry)
        entry = Entry(label, normal, _timestamp(added_at), _text("added_by", added_by), _text("reason", reason))
        return self._append(entry, entry.describe())

    def remove_mac(self, mac: str) -> List[Effect]:
        """Remove every usable row for MAC, whatever its spelling in the file."""
        normal = validate.mac(mac)
        return self._remove(lambda entry: entry.mac == normal, f"MAC {normal}")

    def _remove(self, wanted, subject: str, shown: str = "") -> List[Effect]:  # type: ignore[no-untyped-def]
        kept: List[Line] = []
        effects: List[Effect] = []
        for number, line in self.numbered():
            if line.entry is not None and wanted(line.entry):
                effects.append(Effect(REMOVED, line.entry.describe(shown), number, line.entry))
            else:
                kept.append(line)
        self.lines = kept
        return effects or [Effect(ABSENT, subject)]

    def _append(self, entry: Entry, subject: str) -> Effect:
        """Append ENTRY as a new row, so that every existing line keeps its bytes and its number."""
        newline = "\r\n" if self.lines and self.lines[0].raw.endswith("\r\n") else "\n"
        row = _format_row(entry, newline)
        if not self.lines:
            self.lines.append(Line(HEADER, COMMENT))
        at = len(self.lines)
        last = self.lines[-1]
        if last.kind == BAD and _swallows(last.raw, row):
            at -= 1  # an unterminated quote at the end would make the new row part of it
            if at and not self.lines[at - 1].raw.endswith("\n"):
                self.lines[at - 1] = self.lines[at - 1]._replace(raw=self.lines[at - 1].raw + newline)
        elif not last.raw.endswith("\n"):
            self.lines[-1] = last._replace(raw=last.raw + newline)
        self.lines.insert(at, Line(row, ENTRY, entry))
        number = 1 + sum(_physical_lines(line.raw) for line in self.lines[:at])
        return Effect(ADDED, subject, number, entry)


def _field(what: str, value: str, required: bool) -> str:
    value = _text(what, value)
    if value != value.strip() or (required and not value):
        raise WhitelistError(
            f"bad {what} {value!r}: expected a non-empty value without leading or trailing spaces"
            if required
            else f"bad {what} {value!r}: expected no leading or trailing spaces"
        )
    return value


def _text(what: str, value: str) -> str:
    """VALUE if it is one line without control characters: `list` shows each row on one line.
    (Rows written by hand may hold them, quoted; they are read, kept and shown escaped.)"""
    return validate.one_line(what, value)


def uuid_row(uuid: str) -> str:
    """The vmname add-vm writes for the guest with UUID: its canonical lower-case dashed form."""
    key = _uuid_key(uuid)
    if not key:
        raise WhitelistError(f"bad guest UUID {uuid!r}: expected 32 hex digits, e.g. 6f1a2b3c-0000-4000-8000-123456789abc")
    return f"{key[:8]}-{key[8:12]}-{key[12:16]}-{key[16:20]}-{key[20:]}"


def _timestamp(value: "datetime") -> str:
    """ISO 8601 with its offset: a timestamp without one is ambiguous across hosts and DST."""
    if getattr(value, "utcoffset", None) is None or value.utcoffset() is None:
        raise WhitelistError(f"bad timestamp {value!r}: expected a timezone-aware datetime")
    return value.isoformat(timespec="seconds")


def _format_row(entry: Entry, newline: str) -> str:
    """The CSV row for ENTRY, checked to read back as exactly ENTRY."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator=newline).writerow(entry)
    row = buffer.getvalue()
    if entry.vmname.startswith("#"):  # unquoted, the row would read back as a comment
        quoted = '"' + entry.vmname.replace('"', '""') + '"'
        row = quoted + row[row.index(","):] if not row.startswith('"') else row
    lines = _split_lines(row)
    record, end, _ = _first_record(lines, False)
    if end != len(lines) or record.entry != entry:
        raise WhitelistError(f"cannot store {entry!r} in the whitelist: it would not read back unchanged")
    return row


def _swallows(raw: str, row: str) -> bool:
    """True if ROW, appended after RAW, would be read as part of RAW's record."""
    text = raw if raw.endswith("\n") else raw + "\n"
    return parse(text + row).lines[-1].raw != row


# --------------------------------------------------------------------------- the fast path


def fast_allowed_macs(text: str, guest: Guest) -> Tuple[str, ...]:
    """parse(text).allowed_macs(guest), without parsing the rows that cannot concern GUEST.

    For the libvirt hook, on every guest start.  See _fast() for why it is exact.
    """
    return _fast(text, guest)[0]


def _fast(text: str, guest: Guest) -> Tuple[Tuple[str, ...], str]:
    """(answer, how it was found): "miss", "lines" or "full" (fell back to the full parse).

    A row can concern GUEST only if its raw text contains a needle: the guest's name, the
    last 12 hex digits of its UUID, or a run of one of its MACs in a pattern that matches
    every spelling validate.mac() accepts (UUID and MAC are searched in an ASCII-lowered
    copy, so case-insensitively).  Only the lines holding a needle are read, through the
    same _records() as the full parse.  That is exact only if csv reads every line up to
    the last such line as a record of its own, so that no quoted field is open where a
    needle line starts or ends.  No '"' before that point: exact at once.  Else every '"'
    there must lie in a quoted field that opens after a comma and closes on its line
    (_QUOTED_FIELD says why that is enough); else each line with a '"' is read on its
    own (a comment may hold any quote); else, and for a needle that cannot be searched
    line by line (a name with '"' or a line break, a MAC without a byte >= 0x10), the
    full parse.
    """
    macs = _guest_macs(guest)
    if not macs:
        return (), "miss"
    name = guest.name or ""
    if any(c in name for c in '"\n\r'):
        return parse(text).allowed_macs(guest), "full"  # escaped or split in the file
    # Search a str when the text is ASCII (no copy to encode); else its UTF-8 bytes, whose
    # lower() changes ASCII letters only, so offsets in the lowered copy stay valid.
    hay: Union[str, bytes] = text if text.isascii() else text.encode("utf-8", "surrogatepass")
    as_hay = _identity if isinstance(hay, str) else _to_bytes
    low = hay.lower()
    newline = as_hay("\n")
    starts: Dict[int, int] = {}

    def collect(pos: int) -> int:
        start = hay.rfind(newline, 0, pos) + 1  # type: ignore[arg-type]
        end = hay.find(newline, pos)  # type: ignore[arg-type]
        end = len(hay) if end == -1 else end + 1
        starts[start] = end
        return end

    if name and name == name.strip():
        needle = as_hay(name)
        pos = hay.find(needle)  # type: ignore[arg-type]
        while pos != -1:
            pos = hay.find(needle, collect(pos))  # type: ignore[arg-type]
    key = _uuid_key(guest.uuid or "")
    if key:
        needle = as_hay(key[-12:])
        pos = low.find(needle)  # type: ignore[arg-type]
        while pos != -1:
            pos = low.find(needle, collect(pos))  # type: ignore[arg-type]
    for mac in macs:
        pattern = _mac_pattern(mac)
        if pattern is None:
            return parse(text).allowed_macs(guest), "full"
        compiled = re.compile(as_hay(pattern))
        match = compiled.search(low)
        while match:
            match = compiled.search(low, collect(match.start()))
    if not starts:
        return (), "miss"

    last_end = max(starts.values())
    if hay.find(as_hay('"'), 0, last_end) != -1 and not _quotes_safe(hay, last_end):  # type: ignore[arg-type]
        return parse(text).allowed_macs(guest), "full"
    lines = []
    for start in sorted(starts):
        record, _, open_quote = _first_record((_to_str(hay[start:starts[start]]),), start == 0)
        if open_quote:  # cannot happen after _quotes_safe(); never guess
            return parse(text).allowed_macs(guest), "full"
        lines.append(record)
    return Whitelist(lines).allowed_macs(guest), "lines"


def _identity(value: str) -> str:
    return value


def _to_bytes(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def _to_str(value: Union[str, bytes]) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "surrogatepass")


def _mac_pattern(mac: str) -> Optional[str]:
    """A regex for a run of MAC's bytes in every spelling validate.mac() accepts, lower case,
    and in near misses it refuses: a line found so is then read by the full row parser,
    which refuses it exactly as parse() does, so a wider net costs time, never exactness.

    A byte >= 0x10 is always two digits; a smaller one may lose its leading zero in a
    near miss ("52:54:0:ab:cd:ef"); separators are ':', '-', '.' or none.  The run
    starts at a byte >= 0x10, so the regex starts with a literal and re scans for it fast;
    it covers the last bytes, which are the NIC's own (the first three are the vendor's).
    """
    parts = mac.split(":")
    values = [int(part, 16) for part in parts]
    start = next((k for k in (3, 4, 5) if values[k] >= 0x10), None)
    if start is None:
        start = next((k for k in (2, 1, 0) if values[k] >= 0x10), None)
    if start is None:
        return None
    pieces = [parts[k] if values[k] >= 0x10 else "0?" + parts[k][1] for k in range(start, 6)]
    return "[:.-]?".join(pieces)


def _quotes_safe(hay: Union[str, bytes], end: int) -> bool:
    """True if csv reads each line of hay[:end] as a record of its own (see _fast())."""
    if isinstance(hay, str):
        quote, newline = '"', "\n"
        covered = "".join(re.compile(_QUOTED_FIELD_STR).findall(hay, 0, end)).count(quote)
    else:
        quote, newline = b'"', b"\n"  # type: ignore[assignment]
        covered = b"".join(re.compile(_QUOTED_FIELD).findall(hay, 0, end)).count(quote)  # type: ignore[arg-type]
    if covered == hay.count(quote, 0, end):  # type: ignore[arg-type]
        return True  # findall, not sub: no copy of the text to allocate
    pos = hay.find(quote, 0, end)  # type: ignore[arg-type]
    while pos != -1:
        start = hay.rfind(newline, 0, pos) + 1  # type: ignore[arg-type]
        stop = hay.find(newline, pos)  # type: ignore[arg-type]
        stop = len(hay) if stop == -1 else stop + 1
        # the sentinel line is swallowed if this line leaves a quoted field open
        _, after, _ = _first_record((_to_str(hay[start:stop]), "x\n"), start == 0)
        if after != 1:
            return False
        pos = hay.find(quote, stop, end)  # type: ignore[arg-type]
    return True


# --------------------------------------------------------------------------- files


def read_text(path: Union[str, "os.PathLike[str]"]) -> str:
    """The file's text; "" if it does not exist.  Not UTF-8 is an error: never guess, never rewrite."""
    text = _read(path)
    return "" if text is None else text


def _read(path: Union[str, "os.PathLike[str]"]) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise WhitelistError(f"WHITELIST {str(path)!r} is a directory: expected a file") from None
    except OSError as e:
        raise WhitelistError(
            f"WHITELIST {str(path)!r} cannot be read: {e.strerror or e}; expected a file smtp-gate can read"
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise WhitelistError(
            f"whitelist {str(path)!r} is not valid UTF-8 (line {line}, byte {e.start}: "
            f"{data[e.start:e.start + 1]!r}): convert it to UTF-8; it was left unchanged"
        ) from None


def load(path: Union[str, "os.PathLike[str]"]) -> Whitelist:
    """The model of the file at PATH; a missing file is a model with only the header comment."""
    text = _read(path)
    return Whitelist([Line(HEADER, COMMENT)]) if text is None else parse(text)


def write(path: Union[str, "os.PathLike[str]"], model: Whitelist) -> None:
    """Replace the file at PATH with MODEL atomically (see files.atomic_write); call it under
    the lock.  A new file gets NEW_FILE_MODE."""
    from smtp_gate import files

    files.atomic_write(path, model.text().encode("utf-8", "surrogatepass"), "whitelist", NEW_FILE_MODE, WhitelistError)

