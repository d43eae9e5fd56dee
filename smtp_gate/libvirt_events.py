"""Which guests libvirt says changed: domain events of every configured URI, as a wake-up fd.

No hook runs when an orchestrator sets a guest's allowance (`virsh metadata ... --live`)
or hot-plugs a NIC (issue 11), so `smtp-gate watch` follows libvirt's own events:
METADATA_CHANGE (of our namespace), DEVICE_ADDED / DEVICE_REMOVED, and LIFECYCLE (started,
resumed, e.g. at the end of an incoming migration, stopped, undefined, crashed) as a
backstop for a hook that did not run.  None of them carries what changed (a metadata
event names the namespace, a device event an alias): the guest's XML must be read again,
and that is guest_sync.py's job, in the main loop, outside this module.

Threads, and what they may do:
- one runs libvirt's default event loop (virEventRunDefaultImpl), which keepalives and
  callbacks need; a callback only reads the domain's UUID (kept in the handle: no call to
  the daemon), notes (uri, uuid, why) and writes a byte to a pipe the watcher's select()
  waits on.  No libvirt call there: the event loop is also what answers keepalives;
- one per URI opens a READ-ONLY connection, sets a keepalive (5 s, 3 missed: a daemon
  that hangs or vanishes closes the connection within ~20 s), registers the callbacks and
  a close callback, and asks for a FULL resync of that URI once it is registered (a
  libvirtd restart, or the time we were not connected, may have hidden events).  When the
  connection closes it reconnects with exponential backoff (BACKOFF_MIN .. BACKOFF_MAX).
  An open that never returns (a daemon that accepts and says nothing) blocks only that
  URI's thread.
Nothing here takes our lock, and nothing here can end the watcher: libvirt missing,
unreachable or misbehaving is said once in the log and retried.
"""

import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

from smtp_gate.domain import METADATA_NS, normalise_uuid
from smtp_gate.errors import SmtpGateError

BACKOFF_MIN = 0.5  # s before the first reconnect
BACKOFF_MAX = 30.0  # s at most between attempts; a connection that lived this long resets it
KEEPALIVE = (5, 3)  # interval (s), missed answers before libvirt closes the connection

METADATA, DEVICE, LIFECYCLE, RESYNC = "metadata", "device", "lifecycle", "resync"

# Signals only the main thread may take: lock.flock() times out by SIGALRM interrupting the
# main thread's flock(), and SIGTERM must wake the main thread's select().  A process-directed
# signal may be delivered to any thread that does not block it: ours block them.
_MAIN_THREAD_SIGNALS = {signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def spawn(target: Callable[..., None], *args: Any, name: str = "smtp-gate-libvirt") -> threading.Thread:
    """Start TARGET(*ARGS) in a daemon thread that blocks the main thread's signals (threads
    it starts inherit that: hypervisor.py's per-URI threads too)."""

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_THREAD_SIGNALS)
        target(*args)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def later(delay: float, action: Callable[[], None]) -> None:
    """ACTION after DELAY seconds, in a thread of its own (spawn)."""

    def wait_then_act() -> None:
        time.sleep(delay)
        action()

    spawn(wait_then_act, name="smtp-gate-timer")


# libvirt's default event implementation is process-wide, and only one thread may run its
# loop: it is registered and started once per process, whatever number of Followers
_EVENT_LOOP = threading.Lock()
_event_loop: List[threading.Thread] = []


def _start_event_loop(libvirt: Any) -> None:
    with _EVENT_LOOP:
        if _event_loop:
            return
        libvirt.virEventRegisterDefaultImpl()  # before any connection: keepalives and callbacks need it
        _event_loop.append(spawn(_run_loop, libvirt, name="smtp-gate-libvirt-events"))


def _run_loop(libvirt: Any) -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            time.sleep(0.1)  # libvirt said why on its error handler; do not spin


class Pending(NamedTuple):
    """What the callbacks noted since the last take(): guests by (uri, uuid) with why (a set
    of METADATA, DEVICE, LIFECYCLE), and URIs that need a full resync."""

    guests: Dict[Tuple[str, str], Set[str]]
    resync: Set[str]


def lifecycle_matters(libvirt: Any, event: int) -> bool:
    """Lifecycle events that can change what the kernel must hold for a guest: it starts or
    resumes (also at the end of an incoming migration), stops, crashes or is undefined.
    Suspend, define and the like change no tap and no allowance."""
    return event in (
        libvirt.VIR_DOMAIN_EVENT_STARTED,
        libvirt.VIR_DOMAIN_EVENT_RESUMED,
        libvirt.VIR_DOMAIN_EVENT_STOPPED,
        libvirt.VIR_DOMAIN_EVENT_UNDEFINED,
        getattr(libvirt, "VIR_DOMAIN_EVENT_CRASHED", -1),
    )


def metadata_matters(libvirt: Any, kind: int, nsuri: Optional[str]) -> bool:
    """A change of the custom element in our namespace (title and description are not ours)."""
    return kind == libvirt.VIR_DOMAIN_METADATA_ELEMENT and nsuri == METADATA_NS


class Follower:
    """Follows URIS; fileno() becomes readable when take() has something."""

    def __init__(self, uris: Sequence[str], log: Callable[[str], None]) -> None:
        self.uris = list(dict.fromkeys(uris))
        self.log = log
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._mutex = threading.Lock()  # guards _guests, _resync, _closed (never held across libvirt calls)
        self._guests: Dict[Tuple[str, str], Set[str]] = {}
        self._resync: Set[str] = set()
        self._stop = threading.Event()
        self._closed: Dict[str, threading.Event] = {}  # uri -> set when its connection closed
        self._close_reason: Dict[str, int] = {}  # uri -> why libvirt closed it (VIR_CONNECT_CLOSE_REASON_*)
        self.connected: Dict[str, bool] = {uri: False for uri in self.uris}
        self._callbacks: Dict[str, List[int]] = {}  # uri -> its connection's callback ids

    def fileno(self) -> int:
        return self._read_fd

    # -- what the main loop sees ---------------------------------------------------------
    def take(self) -> Pending:
        """Everything noted since the last call (coalesced: one entry per guest)."""
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        with self._mutex:
            pending = Pending(self._guests, self._resync)
            self._guests, self._resync = {}, set()
        return pending

    def note(self, uri: str, uuid: str, why: str) -> None:
        """Mark a guest for the next round; thread-safe (the event loop's thread calls it)."""
        with self._mutex:
            self._guests.setdefault((uri, uuid), set()).add(why)
        self.wake()

    def want_resync(self, uri: str) -> None:
        with self._mutex:
            self._resync.add(uri)
        self.wake()

    def wake(self) -> None:
        """Make fileno() readable (thread-safe): something is ready for the main loop."""
        try:
            os.write(self._write_fd, b"!")
        except BlockingIOError:
            pass  # the pipe is full: the main loop has plenty to wake for already

    # -- threads -------------------------------------------------------------------------
    def start(self) -> bool:
        """Start the event loop and one connection thread per URI.  False (and said once)
        when libvirt-python is missing: the watcher then does its nftables job alone."""
        from smtp_gate import hypervisor

        try:
            libvirt = hypervisor.libvirt_module()
        except SmtpGateError as exc:
            self.log(f"not following libvirt events: {exc}")
            return False
        _start_event_loop(libvirt)
        for uri in self.uris:
            self._closed[uri] = threading.Event()
            spawn(self._follow, libvirt, uri, name="smtp-gate-libvirt-conn")
        return True

    def stop(self) -> None:
        """Let the connection threads end (tests; the watcher itself ends with its process)."""
        self._stop.set()
        for closed in self._closed.values():
            closed.set()

    def _follow(self, libvirt: Any, uri: str) -> None:
        """Connect, follow until the connection closes, reconnect with backoff; forever."""
        delay = BACKOFF_MIN
        failing = ""  # the last failure said, so that a daemon down for an hour is one line
        while not self._stop.is_set():
            began = time.monotonic()
            conn, problem = self._connect(libvirt, uri)
            if conn is None:
                if problem != failing:
                    self.log(f"libvirt {uri}: cannot follow its events ({problem}); retrying with backoff up to {BACKOFF_MAX:g}s")
                    failing = problem
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            failing = ""
            if self._stop.is_set():  # stop() came while we connected
                self._disconnect(libvirt, uri, conn)
                return
            self.connected[uri] = True
            self.log(f"following libvirt events of {uri}")
            self.want_resync(uri)  # after registering: nothing falls between the two
            self._closed[uri].wait()
            self.connected[uri] = False
            self._disconnect(libvirt, uri, conn)
            if self._stop.is_set():
                return
            lived = time.monotonic() - began
            delay = BACKOFF_MIN if lived >= BACKOFF_MAX else min(delay * 2, BACKOFF_MAX)
            why = closed_because(libvirt, self._close_reason.pop(uri, None))
            self.log(f"libvirt {uri}: {why}, {lived:.1f}s after it was opened; reconnecting with backoff "
                     f"(next attempt in {delay:g}s, doubling up to {BACKOFF_MAX:g}s); the table check goes on meanwhile")
            self._stop.wait(delay)

    def _connect(self, libvirt: Any, uri: str) -> Tuple[Any, str]:
        """(connection with every callback registered, "") or (None, why not)."""
        self._closed[uri].clear()
        self._close_reason.pop(uri, None)
        try:
            conn = libvirt.openReadOnly(uri)
        except libvirt.libvirtError as exc:
            return None, _one_line(exc)
        if conn is None:
            return None, "libvirt returned no connection"
        try:
            # a driver in this process (test:///) has no keepalive and never closes: fine
            for step, args in ((conn.setKeepAlive, KEEPALIVE), (conn.registerCloseCallback, (self._on_close, uri))):
                try:
                    step(*args)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                        raise
            for event_id, callback in (
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
                (libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._on_metadata),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self._on_device),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device),
            ):
                self._callbacks.setdefault(uri, []).append(
                    conn.domainEventRegisterAny(None, event_id, callback, (libvirt, uri))
                )
        except libvirt.libvirtError as exc:
            self._disconnect(libvirt, uri, conn)
            return None, _one_line(exc)
        return conn, ""

    def _disconnect(self, libvirt: Any, uri: str, conn: Any) -> None:
        """Deregister and close CONN; a connection already dead may refuse each step, which
        changes nothing (the library lets go of the callbacks either way)."""
        steps = [lambda i=i: conn.domainEventDeregisterAny(i) for i in self._callbacks.pop(uri, [])]
        for step in steps + [conn.unregisterCloseCallback, conn.close]:
            try:
                step()
            except libvirt.libvirtError:
                pass

    # -- callbacks (the event loop's thread: no libvirt call but the handle's UUID) --------
    def _on_close(self, _conn: Any, reason: int, uri: str) -> None:
        self._close_reason[uri] = reason
        self._closed[uri].set()

    def _noted(self, libvirt: Any, uri: str, dom: Any, why: str) -> None:
        try:
            uuid = normalise_uuid(str(dom.UUIDString()))
        except libvirt.libvirtError:
            return
        if uuid:
            self.note(uri, uuid, why)

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, _detail: int, opaque: Tuple[Any, str]) -> None:
        libvirt, uri = opaque
        if lifecycle_matters(libvirt, event):
            self._noted(libvirt, uri, dom, LIFECYCLE)

    def _on_metadata(self, _conn: Any, dom: Any, kind: int, nsuri: Optional[str], opaque: Tuple[Any, str]) -> None:
        libvirt, uri = opaque
        if metadata_matters(libvirt, kind, nsuri):
            self._noted(libvirt, uri, dom, METADATA)

    def _on_device(self, _conn: Any, dom: Any, _alias: str, opaque: Tuple[Any, str]) -> None:
        libvirt, uri = opaque
        self._noted(libvirt, uri, dom, DEVICE)


def closed_because(libvirt: Any, reason: Optional[int]) -> str:
    """What closed a connection, from the close callback's REASON (None: it did not say)."""
    interval, count = KEEPALIVE
    causes = {
        getattr(libvirt, "VIR_CONNECT_CLOSE_REASON_KEEPALIVE", 2): (
            f"connection closed: no keepalive answer for {interval * (count + 1)}s ({count} pings {interval}s apart "
            "went unanswered: libvirtd hung, or cannot be reached)"
        ),
        getattr(libvirt, "VIR_CONNECT_CLOSE_REASON_EOF", 1): "connection closed by libvirtd (end of file: it stopped or restarted)",
        getattr(libvirt, "VIR_CONNECT_CLOSE_REASON_ERROR", 0): "connection closed after an I/O error on its socket",
        getattr(libvirt, "VIR_CONNECT_CLOSE_REASON_CLIENT", 3): "connection closed by this process",
    }
    if reason is None:
        return "connection closed (libvirt gave no reason)"
    return causes.get(reason, f"connection closed (libvirt's reason {reason})")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def reasons(why: Set[str]) -> str:
    """'metadata', 'device, lifecycle'...: what made the watcher look, for the log."""
    return ", ".join(sorted(why)) or RESYNC

