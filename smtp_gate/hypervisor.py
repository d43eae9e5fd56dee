"""The one adapter over libvirt-python: which guests exist, and their domain XML.

Read-only connections, opened and closed per call: no caching, no module-level
connection, because callers (rebuild, add-vm, status, the picker) must see libvirt as it
is now, and must never hold our lock while waiting on it (DESIGN §2).  A hook never
comes here: hooks run while libvirt holds the domain's lock.

libvirt is imported inside each call, so commands that never ask libvirt (the boot-time
apply, the hooks) neither pay for it nor need it installed.

Three answers per URI (docs/protocol.md):
- reached: it answered; its listing is the truth about its guests;
- absent: its driver does not exist on this host (libvirt says "no connection driver
  available", or the driver's module and daemon are not installed): it has no guests;
- unreachable: the driver exists but did not answer (daemon down, error mid-listing, or
  no answer within the deadline): what is known about its guests is kept.

**Deadlines.**  libvirt-python's calls block in C, and a daemon that accepts a connection
and never answers blocks them forever (a rebuild from the timer would then hold
rebuild.lock forever).  So each URI's whole conversation (open, listing, every XMLDesc)
runs in a daemon thread of its own, and the caller waits for all of them together at most
TIMEOUT seconds; a URI still talking then counts as unreachable.  Its thread is abandoned,
blocked in libvirt, and ends with the process (the CLI exits right after).  libvirt's
keepalive (setKeepAlive with an event loop) was not chosen: it needs a process-wide event
implementation registered before any connection and a loop thread, it bounds only an
established connection (not the open of a socket nobody serves), and it still leaves the
call blocked until the keepalive gives up.  A bonus of the threads: URIs answer in
parallel.
"""

import glob
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from smtp_gate.config import uri_driver
from smtp_gate.domain import METADATA_NS, Allow, Domain, normalise_uuid, parse, parse_allow, text_parser
from smtp_gate.errors import DomainXMLError, SmtpGateError

XmlOrError = Union[str, Exception]  # a domain's live XML, or the libvirt.libvirtError XMLDesc raised
DEFAULT_TIMEOUT = 20.0  # seconds; Config.libvirt_timeout (LIBVIRT_TIMEOUT) is what callers pass

# Where a distribution puts libvirtd's loadable drivers, and each hook driver's module and
# modular daemon: a driver with neither installed cannot have guests here.
MODULE_DIRS = (
    "usr/lib*/libvirt/connection-driver",
    "usr/lib/*/libvirt/connection-driver",
    "usr/local/lib*/libvirt/connection-driver",
    "usr/local/lib/*/libvirt/connection-driver",
)
DAEMON_DIRS = ("usr/sbin", "usr/bin", "sbin", "usr/local/sbin")
DRIVER_FILES = {"qemu": ("libvirt_driver_qemu.so", "virtqemud"), "lxc": ("libvirt_driver_lxc.so", "virtlxcd"),
                "libxl": ("libvirt_driver_libxl.so", "virtxend")}


class Unread(NamedTuple):
    """A guest whose domain XML could not be read (too big for libvirt's RPC: a description
    of a megabyte; a driver's error), and its smtp-gate allowance read alone with
    virDomainGetMetadata (a small reply), so that a revocation in libvirt is not ignored
    while the guest cannot be seen whole (issue 11, attacker review)."""

    uuid: str
    name: str
    uri: str
    why: str  # why its XML could not be read, one line
    running: bool = True
    allow: Optional[Allow] = None  # its allowance, read alone; None: it carries none
    allow_error: Optional[str] = None  # why even that could not be read: then nothing is known of it

    def metadata_text(self) -> str:
        """What its metadata, read alone, says: for the one line a caller writes per guest."""
        if self.allow_error is not None:
            return f"its smtp-gate metadata could not be read either ({self.allow_error})"
        if self.allow is None:
            return "its smtp-gate metadata (read alone) carries no allowance"
        nics = "every NIC" if self.allow.macs is None else "NIC(s) " + (", ".join(self.allow.macs) or "none usable")
        return f"its smtp-gate metadata (read alone) allows {nics} (by {self.allow.by or '?'}, at {self.allow.at or '?'})"

    def outcome(self, ports: Sequence[Tuple[str, int]], before: Sequence[Tuple[int, str]], after: Sequence[Tuple[int, str]]) -> str:
        """The one line said of this guest once its recorded allowance BEFORE was narrowed to
        AFTER (names from its recorded PORTS)."""
        names = {index: name for name, index in ports}
        show = lambda pairs: ", ".join(f"{names.get(i, f'#{i}')}/{m}" for i, m in sorted(pairs))  # noqa: E731
        revoked = [pair for pair in before if pair not in after]
        parts = [f"guest {self.name!r} ({self.uuid}) on {self.uri}: its XML could not be read ({self.why})", self.metadata_text()]
        if after:
            parts.append(f"still allowed on {show(after)}")
        if revoked:
            parts.append(f"allowance revoked on {show(revoked)}")
        if not before:
            parts.append("it held no allowance")
        parts.append("its recorded ports stay guest ports (blocked unless allowed) until it can be read, at most an hour")
        return "; ".join(parts)


class UnreadGuest(SmtpGateError):
    """find(): the guest exists and is known by name and UUID, but its XML cannot be read."""

    def __init__(self, guest: Unread) -> None:
        super().__init__(
            f"guest {guest.name!r} ({guest.uuid}) on {guest.uri}: its XML could not be read: {guest.why}"
        )
        self.guest = guest


class Listing(NamedTuple):
    """What list_running saw.  DOMAINS hold every running guest of each URI in REACHED
    but those whose XML could not be read (SKIPPED, one line each; UNREAD by UUID);
    a URI in UNREACHABLE contributed nothing, so a caller can tell "no guests" from "no
    answer" and keep what it knew for that URI.  A URI in ABSENT has no guests: its driver
    does not exist on this host."""

    domains: List[Domain]  # each with .uri set, sorted by URI order then name
    reached: List[str]
    unreachable: Dict[str, str]  # uri -> one-line reason
    skipped: List[str]  # one line per running guest whose XML could not be read
    absent: Dict[str, str] = {}  # uri -> why its driver does not exist here (never mutated)
    unread: Dict[str, Unread] = {}  # uuid -> each running guest in SKIPPED (never mutated)


def installed(driver: str, root: str = "/") -> bool:
    """Whether libvirt's DRIVER (qemu, lxc, libxl) may exist on the host under ROOT.  False
    only on evidence: libvirt's driver directory was found and holds no module for it, and
    no modular daemon for it is installed.  A layout we do not know says True (unknown:
    a silent daemon is then "unreachable" and what we knew is kept)."""
    module, daemon = DRIVER_FILES[driver]
    dirs = [d for pattern in MODULE_DIRS for d in glob.glob(os.path.join(root, pattern)) if os.path.isdir(d)]
    if not dirs or any(os.path.exists(os.path.join(d, module)) for d in dirs):
        return True
    return any(os.path.exists(os.path.join(root, d, daemon)) for d in DAEMON_DIRS)


def _absent_reason(libvirt: Any, uri: str, exc: Exception, root: str) -> Optional[str]:
    """Why URI's failed open means "this driver does not exist here", or None (unreachable)."""
    code = getattr(exc, "get_error_code", lambda: None)()
    if code == libvirt.VIR_ERR_NO_CONNECT and "no connection driver available" in str(exc):
        return _one_line(exc)  # the daemon answered: it has no such driver
    driver = uri_driver(uri)
    local = uri.partition("://")[2].startswith("/")  # no host: this machine's daemons
    if driver is not None and local and not installed(driver, root):
        module, daemon = DRIVER_FILES[driver]
        return f"libvirt's {driver} driver is not installed on this host (no {module}, no {daemon})"
    return None


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as exc:
        raise SmtpGateError(
            f"cannot talk to libvirt: the libvirt-python module is missing ({exc});"
            " install python3-libvirt or `pip install libvirt-python`"
        ) from None
    # libvirt prints every error to stderr by default; ours go into the result instead
    libvirt.registerErrorHandler(_ignore_error, None)
    _quiet_libxml2_warnings()
    return libvirt


def _quiet_libxml2_warnings() -> None:
    """Keep libxml2 from printing its warnings on stderr in the threads that talk to libvirt.

    A driver that runs in this process (the test driver) reads its file with libxml2, which
    prints "I/O warning : failed to load external entity ..." itself before libvirt reports
    the failure as an error, which we show in one line: the warning was a second line
    outside our control.  Only libxml2's warnings are turned off: its errors, libvirt's
    errors (what we report) and lxml's parse errors (domain.py) are unchanged.  libxml2
    keeps the setting per thread: it is set for threads started from now on (each URI is
    asked in a new one) and for this one, which libxml2 then takes as its main thread (else
    the first thread to ask would be, with the process-wide value).  Without the library
    or its functions, nothing changes."""
    import ctypes  # here: only callers of libvirt need it

    try:
        libxml2 = ctypes.CDLL("libxml2.so.2")
        libxml2.xmlThrDefGetWarningsDefaultValue(0)
        this_thread = libxml2.__xmlGetWarningsDefaultValue
    except (OSError, AttributeError):
        return
    this_thread.restype = ctypes.POINTER(ctypes.c_int)
    this_thread()[0] = 0


def _ignore_error(_context: Any, _error: Any) -> None:
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _unique(uris: Sequence[str]) -> List[str]:
    return list(dict.fromkeys(uris))


def _no_domain(libvirt: Any, exc: Exception) -> bool:
    return getattr(exc, "get_error_code", lambda: None)() == libvirt.VIR_ERR_NO_DOMAIN


class _ConnectionLost(Exception):
    """The daemon went away mid-listing: what this URI gave so far is incomplete."""


class _Absent(Exception):
    """The URI's driver does not exist on this host."""


_Work = Callable[[Any, str], Any]  # (connection, read-only unless a write asks, uri) -> that URI's answer


def _ask(libvirt: Any, uri: str, work: _Work, root: str, read_only: bool = True) -> Tuple[str, Any]:
    """Open URI (read-write only for a write: write_allow), run WORK on it and close it:
    ("ok", answer), ("absent", why), ("unreachable", why) or ("raise", an exception that is
    not libvirt's, for the caller)."""
    try:
        try:
            conn = libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)
        except libvirt.libvirtError as exc:
            why = _absent_reason(libvirt, uri, exc, root)
            return ("absent", why) if why else ("unreachable", _one_line(exc))
        if conn is None:  # very old bindings returned None instead of raising
            return "unreachable", "libvirt returned no connection"
        try:
            return "ok", work(conn, uri)
        except (libvirt.libvirtError, _ConnectionLost) as exc:
            return "unreachable", _one_line(exc)
        finally:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass
    except BaseException as exc:  # noqa: BLE001 - a bug or MemoryError: re-raised in the caller
        return "raise", exc


def _each_uri(
    libvirt: Any, uris: Sequence[str], work: _Work, timeout: float, root: str = "/", read_only: bool = True
) -> Tuple[Dict[str, Any], Dict[str, str], Dict[str, str]]:
    """(answers, unreachable, absent) for each URI, asked in parallel, each in a daemon
    thread, all within TIMEOUT seconds.  A URI that has not answered by then is
    unreachable and its thread is abandoned (see the module docstring)."""
    results: Dict[str, Tuple[str, Any]] = {}

    def run(uri: str) -> None:
        results[uri] = _ask(libvirt, uri, work, root, read_only)

    threads = [threading.Thread(target=run, args=(uri,), name="smtp-gate-libvirt", daemon=True) for uri in _unique(uris)]
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    answers: Dict[str, Any] = {}
    unreachable: Dict[str, str] = {}
    absent: Dict[str, str] = {}
    for uri in _unique(uris):
        kind, value = results.get(uri, ("unreachable", f"no answer within {timeout:g}s (LIBVIRT_TIMEOUT)"))
        if kind == "raise":
            raise value
        {"ok": answers, "absent": absent, "unreachable": unreachable}[kind][uri] = value
    return answers, unreachable, absent


class _SharedParser:
    """One lxml parser for every guest of a listing (building one costs more than parsing a
    guest), built at the first guest's XML: importing lxml (~35 ms) then overlaps the
    first RPCs of _xml_ahead() instead of preceding them."""

    def __init__(self) -> None:
        self._parser: Any = None

    def parse(self, xml: str) -> Domain:
        if self._parser is None:
            self._parser = text_parser()
        return parse(xml, self._parser)


def _xml_of(libvirt: Any, dom: Any) -> XmlOrError:
    try:
        return str(dom.XMLDesc(0))
    except libvirt.libvirtError as exc:
        return exc


def _xml_ahead(libvirt: Any, doms: Sequence[Any]) -> Iterator[Tuple[Any, XmlOrError]]:
    """(dom, its live XML or the libvirtError) for each of DOMS in order, the RPCs made by a
    thread of their own: while it waits for the daemon, the caller parses the guests
    already answered (1 000 guests over RPC: 0.24 s instead of 0.42 s, measured).  At
    most one call is in flight when the caller stops early; it is waited for."""
    answers: "queue.SimpleQueue[Tuple[Any, Union[str, BaseException]]]" = queue.SimpleQueue()
    stop = threading.Event()

    def fetch() -> None:
        for dom in doms:
            if stop.is_set():
                return
            try:
                answers.put((dom, _xml_of(libvirt, dom)))
            except BaseException as exc:  # not libvirt's error: the caller re-raises it
                answers.put((dom, exc))
                return

    thread = threading.Thread(target=fetch, name="smtp-gate-xmldesc", daemon=True)
    thread.start()
    try:
        for _ in doms:
            dom, answer = answers.get()
            if isinstance(answer, BaseException) and not isinstance(answer, libvirt.libvirtError):
                raise answer
            yield dom, answer
    finally:
        stop.set()
        thread.join()


def _read_domain(
    libvirt: Any,
    conn: Any,
    dom: Any,
    uri: str,
    skipped: List[str],
    parser: Optional[_SharedParser] = None,
    xml: Optional[XmlOrError] = None,
    unread: Optional[Dict[str, Unread]] = None,
    running_only: bool = True,
) -> Optional[Domain]:
    """DOM's live XML (XML if already fetched) as a Domain tagged with URI; None if the
    guest vanished meanwhile (normal: guests stop while we list) or its XML is unreadable
    (noted in SKIPPED and UNREAD with its allowance read alone, see _note_unread; with
    RUNNING_ONLY, a guest found not running then is neither: it stopped)."""
    if xml is None:
        xml = _xml_of(libvirt, dom)
    if isinstance(xml, libvirt.libvirtError):
        if _no_domain(libvirt, xml):
            return None
        if not _alive(libvirt, conn):
            raise _ConnectionLost(_one_line(xml)) from None
        _note_unread(libvirt, conn, dom, uri, _one_line(xml), skipped, unread, running_only)
        return None
    try:
        return (parser.parse(xml) if parser is not None else parse(xml))._replace(uri=uri)
    except DomainXMLError as exc:
        _note_unread(libvirt, conn, dom, uri, str(exc), skipped, unread, running_only)
        return None


def _running(libvirt: Any, conn: Any, dom: Any, domain: Domain) -> Optional[bool]:
    """True if running, False if not, None if it vanished.  The live XML of a running
    guest carries id='N', so isActive() is asked only when the id is missing."""
    if domain.id is not None:
        return True
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as exc:
        if _no_domain(libvirt, exc) or _alive(libvirt, conn):
            return None
        raise _ConnectionLost(_one_line(exc)) from None


def _alive(libvirt: Any, conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _note_unread(
    libvirt: Any,
    conn: Any,
    dom: Any,
    uri: str,
    why: str,
    skipped: List[str],
    unread: Optional[Dict[str, Unread]],
    running_only: bool,
) -> None:
    """Note a guest whose XML could not be read (WHY) in SKIPPED and UNREAD, with its smtp-gate
    element asked alone (virDomainGetMetadata: a small reply where the whole XML was too
    big), so that callers keep only the allowance a source still grants.  A guest gone
    meanwhile is not noted, nor with RUNNING_ONLY one that is not running (it stopped)."""
    try:
        uuid = normalise_uuid(str(dom.UUIDString())) or ""  # kept in the handle: no call to the daemon
    except libvirt.libvirtError:
        uuid = ""
    try:
        running = bool(dom.isActive())
    except libvirt.libvirtError as exc:
        if _no_domain(libvirt, exc):
            return
        if not _alive(libvirt, conn):
            raise _ConnectionLost(_one_line(exc)) from None
        running = True  # unknown: as listed (a running guest's allowance is narrowed below, never widened)
    if running_only and not running:
        return
    allow: Optional[Allow] = None
    error: Optional[str] = None
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if running else libvirt.VIR_DOMAIN_AFFECT_CONFIG
    try:
        allow = parse_allow(str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, flags)), uuid)
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        if _no_domain(libvirt, exc) or (running_only and code == libvirt.VIR_ERR_OPERATION_INVALID):
            return  # gone, or stopped meanwhile (libvirt refuses a live read of a stopped guest)
        if code != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            error = _one_line(exc)
    except DomainXMLError as exc:
        error = str(exc)
    name = _dom_name(libvirt, dom)
    skipped.append(f"{uri}: {name}: {why}")
    if unread is not None and uuid:
        unread[uuid] = Unread(uuid, name, uri, why, running, allow, error)


def _dom_name(libvirt: Any, dom: Any) -> str:
    try:
        return str(dom.name())
    except libvirt.libvirtError:
        return "?"


def _order(uris: Sequence[str]) -> Callable[[Domain], Tuple[int, str, str]]:
    """Sort key: URI order as given, then name: stable output for diffs and goldens."""
    rank = {uri: n for n, uri in enumerate(_unique(uris))}
    return lambda d: (rank.get(d.uri or "", len(rank)), d.name, d.uuid)


def list_running(uris: Sequence[str], timeout: float = DEFAULT_TIMEOUT, root: str = "/") -> Listing:
    """Running guests of every URI, from their live XML (the only XML naming auto-named
    taps).  A guest that stops while we list is left out; a URI that cannot be opened, whose
    daemon goes away mid-listing, or that does not answer within TIMEOUT goes to
    `unreachable` with all its guests; one whose driver does not exist here (under ROOT), to
    `absent`."""
    libvirt = _libvirt()

    def work(conn: Any, uri: str) -> Tuple[List[Domain], List[str], Dict[str, Unread]]:
        parser = _SharedParser()  # one per URI: the threads run at once
        found: List[Domain] = []
        skipped: List[str] = []
        unread: Dict[str, Unread] = {}
        for dom, xml in _xml_ahead(libvirt, conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)):
            domain = _read_domain(libvirt, conn, dom, uri, skipped, parser, xml, unread)
            # no id: inactive XML, so the guest stopped between listing and XMLDesc
            if domain is not None and _running(libvirt, conn, dom, domain):
                found.append(domain)
        return found, skipped, unread

    answers, unreachable, absent = _each_uri(libvirt, uris, work, timeout, root)
    listing = Listing([], [], unreachable, [], absent, {})
    for uri, (found, skipped, unread) in answers.items():
        listing.domains.extend(found)
        listing.skipped.extend(skipped)
        listing.unread.update(unread)
        listing.reached.append(uri)
    listing.domains.sort(key=_order(uris))
    return listing


def list_all(
    uris: Sequence[str],
    timeout: float = DEFAULT_TIMEOUT,
    unread: Optional[Dict[str, Unread]] = None,
    unreachable_out: Optional[Dict[str, str]] = None,
) -> List[Tuple[Domain, bool]]:
    """Every guest, running or defined but off, with its running state: for the picker
    and status.  A running guest's XML is its live XML (targets included).  URIs that do
    not answer (within TIMEOUT) are left out, and put in UNREACHABLE_OUT (uri -> why) when
    given, so that `list` can say so; if none answers, raises SmtpGateError rather than
    claim the host has no guests.  Guests whose XML could not be read are added to
    UNREAD (when given), so that list and status name them rather than drop them."""
    libvirt = _libvirt()

    def work(conn: Any, uri: str) -> Tuple[List[Tuple[Domain, bool]], Dict[str, Unread]]:
        parser = _SharedParser()
        found: List[Tuple[Domain, bool]] = []
        missed: Dict[str, Unread] = {}
        for dom, xml in _xml_ahead(libvirt, conn.listAllDomains(0)):
            domain = _read_domain(libvirt, conn, dom, uri, [], parser, xml, missed, running_only=False)
            running = None if domain is None else _running(libvirt, conn, dom, domain)
            if domain is not None and running is not None:
                found.append((domain, running))
        return found, missed

    answers, unreachable, absent = _each_uri(libvirt, uris, work, timeout)
    if unreachable_out is not None:
        unreachable_out.update(unreachable)
    if not answers and unreachable:
        raise SmtpGateError(f"no libvirt URI answered: {_reasons(unreachable)}")
    key = _order(uris)
    result = [pair for found, _missed in answers.values() for pair in found]
    if unread is not None:
        for uri in _unique(uris):
            unread.update(answers[uri][1] if uri in answers else {})
    return sorted(result, key=lambda pair: key(pair[0]))


def find(uris: Sequence[str], name_or_uuid: str, timeout: float = DEFAULT_TIMEOUT) -> Optional[Tuple[Domain, bool]]:
    """The guest named NAME_OR_UUID (a name, or a UUID in any case) and whether it runs.

    None only if every URI answered (within TIMEOUT) and none has it.  Raises
    SmtpGateError when the guest is on several URIs (an allowance for the wrong one would
    be wrong), or when it was not found but some URI did not answer; UnreadGuest (with its
    name, UUID and allowance read alone) when libvirt has it but its XML cannot be read.
    """
    libvirt = _libvirt()
    key = name_or_uuid.strip()
    uuid = normalise_uuid(key)

    def work(conn: Any, uri: str) -> Union[None, Tuple[Domain, bool], Unread]:
        dom = _lookup(libvirt, conn, key, uuid)
        missed: Dict[str, Unread] = {}
        domain = None if dom is None else _read_domain(libvirt, conn, dom, uri, [], None, None, missed, False)
        if missed:
            return next(iter(missed.values()))
        running = None if domain is None else _running(libvirt, conn, dom, domain)
        return (domain, running) if domain is not None and running is not None else None

    answers, unreachable, _absent = _each_uri(libvirt, uris, work, timeout)
    hits = [answers[uri] for uri in _unique(uris) if answers.get(uri) is not None]
    if len(hits) > 1:
        where = ", ".join(
            f"{h.uri} ({h.name} {h.uuid})" if isinstance(h, Unread) else f"{h[0].uri} ({h[0].name} {h[0].uuid})" for h in hits
        )
        raise SmtpGateError(f"guest {key!r} exists on several libvirt URIs: {where}; limit the URIs")
    if hits and isinstance(hits[0], Unread):
        raise UnreadGuest(hits[0])
    if hits:
        return hits[0]  # type: ignore[return-value]
    if unreachable:
        raise SmtpGateError(f"guest {key!r} not found, and some libvirt URIs did not answer: {_reasons(unreachable)}")
    return None


def _lookup(libvirt: Any, conn: Any, key: str, uuid: Optional[str]) -> Any:
    """By UUID first when KEY looks like one, then by name (a name may look like a UUID)."""
    lookups = ([lambda: conn.lookupByUUIDString(uuid)] if uuid else []) + [lambda: conn.lookupByName(key)]
    for lookup in lookups:
        try:
            return lookup()
        except libvirt.libvirtError as exc:
            if not _no_domain(libvirt, exc):
                raise
    return None


def _reasons(unreachable: Dict[str, str]) -> str:
    return "; ".join(f"{uri}: {reason}" for uri, reason in unreachable.items())


# -- the fleet allowance in a guest's metadata (issue 11): the one write we make to libvirt --

ALLOW_KEY = "smtpgate"  # the prefix libvirt gives our element; readers match the URI (METADATA_NS)
LIVE, CONFIG = "live", "config"
# a shut-off guest's managed save image (`virsh managedsave`): `virsh start` resumes from the
# definition saved in it, not from CONFIG, so an allowance must be written (or removed) there too
IMAGE = "image"


class AllowWrite(NamedTuple):
    """What write_allow() did to one guest's metadata."""

    domain: Domain  # as libvirt holds it after the write: the live XML while it runs
    running: bool
    scopes: Tuple[str, ...]  # the definitions written: (LIVE, CONFIG), (LIVE,), (CONFIG,) or (CONFIG, IMAGE)
    before: Dict[str, Optional[Allow]]  # scope -> the allowance it carried before (None: none)
    written: bool = True  # False: a removal that found nothing to remove, so nothing was sent
    raw: Dict[str, Optional[str]] = {}  # scope -> that element as libvirt gave it: what put_back() writes
    # after a removal: the guest's snapshots whose definition still carries an allowance
    # (reverting to one brings it back: libvirt restores the metadata a snapshot holds)
    snapshots: Tuple[str, ...] = ()
    snapshots_unknown: str = ""  # why the snapshots could not be listed ("" when they were)


_SCOPE_FLAGS = {LIVE: "VIR_DOMAIN_AFFECT_LIVE", CONFIG: "VIR_DOMAIN_AFFECT_CONFIG"}


def _raw_allow(libvirt: Any, dom: Any, scope: str) -> Optional[str]:
    """Our element in the guest's SCOPE definition, verbatim (bad parts included), or None."""
    if scope == IMAGE:
        found = _allow_in(_image_xml(libvirt, dom))
        if found is None:
            return None
        from lxml import etree

        return str(etree.tostring(found, encoding="unicode", with_tail=False))
    try:
        return str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, getattr(libvirt, _SCOPE_FLAGS[scope])))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise


def _has_image(libvirt: Any, dom: Any) -> bool:
    try:
        return bool(dom.hasManagedSaveImage(0))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            return False  # a driver without managed save has no image
        raise


def _image_xml(libvirt: Any, dom: Any, secure: bool = True) -> str:
    """The definition in DOM's managed save image (SECURE: with its secure parts, for a
    definition written back whole; that needs a read-write connection).  SmtpGateError when this libvirt cannot read it (libvirt < 3.7): the caller
    refuses rather than promise what the resumed guest would not do."""
    getter = getattr(dom, "managedSaveGetXMLDesc", None)
    try:
        if getter is None or not hasattr(dom, "managedSaveDefineXML"):
            raise SmtpGateError("libvirt-python has no managedSaveGetXMLDesc/managedSaveDefineXML (libvirt >= 3.7)")
        return str(getter(getattr(libvirt, "VIR_DOMAIN_SAVE_IMAGE_XML_SECURE", 1) if secure else 0))
    except (libvirt.libvirtError, SmtpGateError) as exc:
        raise SmtpGateError(
            f"guest {_dom_name(libvirt, dom)!r} has a managed save image (`virsh managedsave`) whose definition cannot "
            f"be read or rewritten here ({_one_line(exc)}): `virsh start` would resume it with the allowance it saved; "
            "nothing was written (start the guest and run the command again, or discard the image with "
            "`virsh managedsave-remove`)"
        ) from None


def _xml_root(xml: str) -> Any:
    from lxml import etree

    return etree.fromstring(xml.encode("utf-8"), text_parser())


def _allow_in(xml: str) -> Any:
    """Our <allow> element in the domain XML's <metadata>, or None."""
    metadata = _xml_root(xml).find("metadata")
    return None if metadata is None else metadata.find(f"{{{METADATA_NS}}}allow")


def with_allow(xml: str, element: Optional[str]) -> str:
    """The domain XML with ELEMENT as our allowance in its <metadata> (None: without one),
    as virDomainSetMetadata would leave it: every <allow> of our namespace goes, ELEMENT (with
    or without our namespace, as write_allow and _raw_allow give it) is put in with prefix
    ALLOW_KEY.  For a managed save image, which setMetadata cannot reach."""
    from lxml import etree

    root = _xml_root(xml)
    metadata = root.find("metadata")
    if metadata is not None:
        for old in metadata.findall(f"{{{METADATA_NS}}}allow"):
            metadata.remove(old)
    if element is not None:
        given = etree.fromstring(element.encode("utf-8"), text_parser())
        allow = etree.Element(f"{{{METADATA_NS}}}allow", nsmap={ALLOW_KEY: METADATA_NS})
        for key, value in given.attrib.items():
            allow.set(key, value)
        allow.text = given.text
        allow.extend(list(given))
        if metadata is None:
            metadata = etree.Element("metadata")
            after = root.find("uuid")
            root.insert(root.index(after) + 1 if after is not None else 0, metadata)
        metadata.append(allow)
    return str(etree.tostring(root, encoding="unicode"))


def _write_image(libvirt: Any, dom: Any, element: Optional[str]) -> None:
    """Set (or remove) our allowance in DOM's managed save image's definition."""
    try:
        dom.managedSaveDefineXML(with_allow(_image_xml(libvirt, dom), element), 0)
    except libvirt.libvirtError as exc:
        raise SmtpGateError(
            f"guest {_dom_name(libvirt, dom)!r} has a managed save image (`virsh managedsave`) whose definition libvirt "
            f"refused to rewrite ({_one_line(exc)}): `virsh start` would resume it with the allowance it saved; start the "
            "guest and run the command again, or discard the image with `virsh managedsave-remove`"
        ) from None


def _scopes(libvirt: Any, running: bool, persistent: bool, image: bool = False) -> Tuple[int, Tuple[str, ...]]:
    """The flags for the guest's state: a running persistent guest's live and saved
    definitions (live metadata travels with a migration, the saved one is what a
    `--persistent` destination and the next boot get), a transient guest's live one, a
    shut-off guest's saved one, and its managed save image's if it has one (IMAGE has no
    flag: write_allow rewrites the image's definition)."""
    if running and persistent:
        return libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG, (LIVE, CONFIG)
    if running:
        return libvirt.VIR_DOMAIN_AFFECT_LIVE, (LIVE,)
    return libvirt.VIR_DOMAIN_AFFECT_CONFIG, (CONFIG, IMAGE) if image else (CONFIG,)


def _state(libvirt: Any, dom: Any, secure: bool = True) -> Tuple[bool, int, Tuple[str, ...], Dict[str, Optional[Allow]]]:
    """(running, flags, scopes, the allowance each definition carries) of the guest DOM
    (SECURE: read-write connections only, see _image_xml)."""
    running, persistent = bool(dom.isActive()), bool(dom.isPersistent())
    image = not running and _has_image(libvirt, dom)
    flags, scopes = _scopes(libvirt, running, persistent, image)
    before: Dict[str, Optional[Allow]] = {}
    if running:
        before[LIVE] = parse(str(dom.XMLDesc(0))).allow
    if persistent:
        before[CONFIG] = parse(str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))).allow
    if image:
        before[IMAGE] = parse(_image_xml(libvirt, dom, secure)).allow
    return running, flags, scopes, before


def _snapshots_allowing(libvirt: Any, dom: Any) -> Tuple[Tuple[str, ...], str]:
    """(names of DOM's snapshots whose saved definition carries an allowance that allows
    something, why they could not be listed or "")."""
    from lxml import etree

    from smtp_gate.domain import from_element

    try:
        snapshots = dom.listAllSnapshots(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            return (), ""  # a driver without snapshots
        return (), _one_line(exc)
    found = []
    try:
        for snapshot in snapshots:
            root = etree.fromstring(str(snapshot.getXMLDesc(0)).encode("utf-8"), text_parser())
            for saved in (root.find("domain"), root.find("inactiveDomain")):
                try:
                    allow = None if saved is None else from_element(saved).allow
                except DomainXMLError:
                    allow = None
                if allow is not None and allow.macs != ():
                    found.append(str(snapshot.getName()))
                    break
    except (libvirt.libvirtError, etree.XMLSyntaxError) as exc:
        return tuple(found), _one_line(exc)
    return tuple(sorted(found)), ""


def read_allow(uri: str, uuid: str, timeout: float = DEFAULT_TIMEOUT) -> Tuple[Tuple[str, ...], Dict[str, Optional[Allow]]]:
    """(the scopes write_allow would write, the allowance each definition carries now) of the
    guest UUID on URI, read-only: what `export-metadata` (also --dry-run) decides from, since
    a listing shows a running guest's live definition only."""
    libvirt = _libvirt()

    def work(conn: Any, _uri: str) -> Tuple[Tuple[str, ...], Dict[str, Optional[Allow]]]:
        _running, _flags, scopes, before = _state(libvirt, conn.lookupByUUIDString(uuid), secure=False)
        return scopes, before

    answers, unreachable, absent = _each_uri(libvirt, [uri], work, timeout)
    if uri not in answers:
        raise SmtpGateError(f"cannot read the metadata of guest {uuid} on {uri}: {unreachable.get(uri) or absent.get(uri, 'no answer')}")
    return answers[uri]  # type: ignore[no-any-return]


def _metadata_written(libvirt: Any, uri: str, uuid: str, work: _Work, timeout: float, verb: str, done: str) -> "AllowWrite":
    """WORK's AllowWrite over a read-write connection to URI, or SmtpGateError saying that the
    metadata of guest UUID could not be VERB-ed (and, after a timeout, that it may be DONE)."""
    answers, unreachable, absent = _each_uri(libvirt, [uri], work, timeout, read_only=False)
    if uri in answers:
        return answers[uri]  # type: ignore[no-any-return]
    why = unreachable.get(uri) or absent.get(uri, "no answer")
    if why.startswith("no answer within"):
        why += f"; the metadata may or may not have been {done}: check it with `virsh metadata`"
    raise SmtpGateError(f"cannot {verb} the smtp-gate metadata of guest {uuid} on {uri}: {why}")


def write_allow(uri: str, uuid: str, element: Optional[str], timeout: float = DEFAULT_TIMEOUT) -> AllowWrite:
    """Set ELEMENT (an <allow .../> without namespace: libvirt puts it in METADATA_NS with
    prefix ALLOW_KEY) as the guest UUID's allowance on URI, or remove it (ELEMENT None), in
    the definitions its state allows (_scopes), then read the guest back.

    A shut-off guest with a managed save image resumes from the image's own definition: it
    is rewritten too (first: if libvirt cannot, SmtpGateError and nothing is written).  A
    removal also lists the snapshots that still carry an allowance (AllowWrite.snapshots).

    A read-write connection, in a thread within TIMEOUT like every other call here; the
    caller holds no lock of ours (DESIGN §2).  A guest that starts or stops between the
    state check and the write makes libvirt refuse the flags: asked once more.  A removal
    from a guest that carries no allowance writes nothing."""
    libvirt = _libvirt()

    def work(conn: Any, _uri: str) -> AllowWrite:
        for attempt in (1, 2):
            dom = conn.lookupByUUIDString(uuid)
            running, flags, scopes, before = _state(libvirt, dom)
            raw = {scope: _raw_allow(libvirt, dom, scope) for scope in scopes}
            snapshots, unknown = _snapshots_allowing(libvirt, dom) if element is None else ((), "")
            if element is None and all(before.get(scope) is None for scope in scopes):
                return AllowWrite(parse(str(dom.XMLDesc(0)))._replace(uri=uri), running, scopes, before, False, raw,
                                  snapshots, unknown)
            if IMAGE in scopes:
                _write_image(libvirt, dom, element)
            try:
                dom.setMetadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, ALLOW_KEY if element else None, METADATA_NS, flags
                )
            except libvirt.libvirtError as exc:
                if IMAGE in scopes:
                    _write_image(libvirt, dom, raw[IMAGE])  # as it was: nothing written
                if attempt == 1 and exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                    continue  # it started or stopped meanwhile: choose the flags again
                raise
            return AllowWrite(parse(str(dom.XMLDesc(0)))._replace(uri=uri), running, scopes, before, True, raw,
                              snapshots, unknown)
        raise AssertionError("unreachable")  # the loop returns or raises

    return _metadata_written(libvirt, uri, uuid, work, timeout, "write", "written")


def put_back(uri: str, uuid: str, raw: Dict[str, Optional[str]], timeout: float = DEFAULT_TIMEOUT) -> None:
    """Write back, scope by scope, the elements write_allow() found (AllowWrite.raw): for a
    command whose kernel change failed after its metadata write, so that exit 1 keeps its
    promise.  A live definition that is gone (the guest stopped meanwhile), or a managed
    save image that is gone (the guest resumed from it), needs nothing."""
    libvirt = _libvirt()

    def work(conn: Any, _uri: str) -> None:
        dom = conn.lookupByUUIDString(uuid)
        for scope, element in raw.items():
            if scope == LIVE and not dom.isActive():
                continue
            if scope == IMAGE:
                if _has_image(libvirt, dom):
                    _write_image(libvirt, dom, element)
                continue
            flags = getattr(libvirt, _SCOPE_FLAGS[scope])
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, ALLOW_KEY if element else None, METADATA_NS, flags)

    answers, unreachable, absent = _each_uri(libvirt, [uri], work, timeout, read_only=False)
    if uri not in answers:
        raise SmtpGateError(unreachable.get(uri) or absent.get(uri, "no answer"))


def remove_allow_unread(uri: str, uuid: str, timeout: float = DEFAULT_TIMEOUT) -> AllowWrite:
    """write_allow(URI, UUID, None) for a guest whose domain XML cannot be read (find()
    raised UnreadGuest): our element is read, removed and checked gone with the metadata
    calls alone (small replies), in the definitions the guest's state allows (_scopes).
    AllowWrite.domain then knows only the name, UUID and URI (no NICs: the caller revokes
    from the guest's record); RAW is what put_back() writes back."""
    libvirt = _libvirt()

    def work(conn: Any, _uri: str) -> AllowWrite:
        for attempt in (1, 2):
            dom = conn.lookupByUUIDString(uuid)
            running = bool(dom.isActive())
            flags, scopes = _scopes(libvirt, running, bool(dom.isPersistent()))
            raw = {scope: _raw_allow(libvirt, dom, scope) for scope in scopes}
            before = {scope: None if text is None else parse_allow(text, uuid) for scope, text in raw.items()}
            domain = Domain(name=str(dom.name()), uuid=uuid, type="", nics=(), uri=uri)
            if all(text is None for text in raw.values()):
                return AllowWrite(domain, running, scopes, before, False, raw)
            try:
                dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, METADATA_NS, flags)
            except libvirt.libvirtError as exc:
                if attempt == 1 and exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                    continue  # it started or stopped meanwhile: choose the flags again
                raise
            left = [scope for scope in scopes if _raw_allow(libvirt, dom, scope) is not None]
            if left:
                raise SmtpGateError(f"libvirt still shows the smtp-gate metadata in the {'+'.join(left)} definition after removing it")
            return AllowWrite(domain, running, scopes, before, True, raw)
        raise AssertionError("unreachable")  # the loop returns or raises

    return _metadata_written(libvirt, uri, uuid, work, timeout, "remove", "removed")


def live_and_saved_allows(
    uris: Dict[str, Sequence[str]], timeout: float = DEFAULT_TIMEOUT
) -> Dict[str, Tuple[Optional[str], Optional[str]]]:
    """uuid -> (live, saved) <allow> element, verbatim (None: none), of the running persistent
    guests URIS names (uri -> UUIDs), read-only: for `list` and `status`, which warn when the
    two differ (a live-only allowance is lost at the next cold boot and at a `--persistent`
    migration's destination; a saved-only one is not in force).  dom.metadata() per
    definition, not the inactive XML: cheap.  A URI that does not answer, or a guest that
    stopped or went away meanwhile, is left out: nothing is claimed about it."""
    libvirt = _libvirt()

    def work(conn: Any, uri: str) -> Dict[str, Tuple[Optional[str], Optional[str]]]:
        found: Dict[str, Tuple[Optional[str], Optional[str]]] = {}
        for uuid in uris[uri]:
            try:
                dom = conn.lookupByUUIDString(uuid)
                if dom.isActive() and dom.isPersistent():
                    found[uuid] = (_raw_allow(libvirt, dom, LIVE), _raw_allow(libvirt, dom, CONFIG))
            except libvirt.libvirtError as exc:
                if not _no_domain(libvirt, exc) and exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                    raise
        return found

    answers, _unreachable, _absent = _each_uri(libvirt, list(uris), work, timeout)
    return {uuid: pair for found in answers.values() for uuid, pair in found.items()}


# -- for the watcher (libvirt_events.py, guest_sync.py) ----------------------------------------


def libvirt_module() -> Any:
    """libvirt-python, its errors kept off stderr (as every call here has them); SmtpGateError
    naming the package when it is missing."""
    return _libvirt()


class Guests(NamedTuple):
    """What read_guests saw of some guests of one URI."""

    running: Dict[str, Domain]  # uuid -> its live XML, tagged with the URI
    stopped: List[str]  # UUIDs libvirt does not know, or knows as not running
    unread: Dict[str, Unread]  # uuid -> each running guest whose XML could not be read (a line in SKIPPED)
    skipped: List[str]
    unreachable: Optional[str] = None  # why the URI did not answer: then nothing above is known


def read_guests(uri: str, uuids: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> Guests:
    """The guests UUIDS of URI as they are now, over one read-only connection, within
    TIMEOUT (the watcher asks this after libvirt's events, for the few guests they name)."""
    libvirt = _libvirt()

    def work(conn: Any, uri: str) -> Guests:
        found = Guests({}, [], {}, [])
        for uuid in uuids:
            dom = _lookup(libvirt, conn, uuid, uuid)
            domain = None if dom is None else _read_domain(libvirt, conn, dom, uri, found.skipped, None, None, found.unread)
            if domain is not None and _running(libvirt, conn, dom, domain):
                found.running[uuid] = domain
            elif uuid not in found.unread:
                found.stopped.append(uuid)
        return found

    answers, unreachable, absent = _each_uri(libvirt, [uri], work, timeout)
    if uri in answers:
        return answers[uri]
    return Guests({}, [], {}, [], {**unreachable, **absent}.get(uri, "no answer"))
