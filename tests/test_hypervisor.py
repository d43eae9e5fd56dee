"""smtp_gate.hypervisor on libvirt's test driver: real libvirt-python calls, no daemon.

Races (a guest stopping between listAllDomains and XMLDesc) are produced for real on
`test:///default`, the one test-driver instance every connection of a process shares:
a second, read-write connection destroys the guest right after the listing.  Only the
errors the test driver cannot produce (a failure other than "no such domain", a daemon
dying mid-listing) use a stand-in domain or connection, and say so.
"""

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest

from smtp_gate import hypervisor
from smtp_gate.errors import SmtpGateError
from tests import testdriver
from tests.silent import SilentDaemon

libvirt = pytest.importorskip("libvirt")

REPO = Path(__file__).resolve().parent.parent
UNREACHABLE = "qemu:///system?socket=/nonexistent"
DEFAULT = "test:///default"


class _Proxy:
    """Delegates everything to a real libvirt object; tests override single methods."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _error(message: str) -> Any:
    """A libvirtError that is not VIR_ERR_NO_DOMAIN, whatever libvirt's last error was."""
    exc = libvirt.libvirtError(message)
    exc.err = None
    return exc


def _wrap_connections(monkeypatch: pytest.MonkeyPatch, wrap: Any) -> List[Any]:
    """Make libvirt.openReadOnly return wrap(real connection); returns the opened wrappers."""
    real_open = libvirt.openReadOnly
    opened: List[Any] = []

    def open_read_only(uri: str) -> Any:
        conn = wrap(uri, real_open(uri))
        opened.append(conn)
        return conn

    monkeypatch.setattr(libvirt, "openReadOnly", open_read_only)
    return opened


@pytest.fixture
def node(tmp_path: Path) -> str:
    return testdriver.write_node(tmp_path, running=3, nics=2, shutoff=2, odd=True)


@pytest.fixture
def default_rw() -> Iterator[Any]:
    """A read-write connection to the process-wide test:///default instance; guests the
    test creates there are removed afterwards so other tests see the stock 'test' guest."""
    conn = libvirt.open(DEFAULT)
    before = {d.name() for d in conn.listAllDomains(0)}
    yield conn
    for dom in conn.listAllDomains(0):
        if dom.name() not in before:
            persistent = dom.isPersistent()
            if dom.isActive():
                dom.destroy()  # a transient guest is gone after this
            if persistent:
                dom.undefine()
    conn.close()


# --- list_running ------------------------------------------------------------------------


def test_list_running(node: str):
    listing = hypervisor.list_running([node])
    assert listing.reached == [node] and listing.unreachable == {} and listing.skipped == []
    assert [d.name for d in listing.domains] == [testdriver.ODD_NAME] + [testdriver.name(i) for i in range(3)]
    for i, dom in enumerate(listing.domains[1:]):
        assert dom.uuid == testdriver.uuid(i)
        assert dom.uri == node and dom.type == "test" and dom.id is not None
        assert [(n.mac, n.target, n.bridge) for n in dom.nics] == [
            (testdriver.mac(i, k), testdriver.target(i, k), "br0") for k in range(2)
        ]
        assert all(n.bridge_visible for n in dom.nics)
    odd = listing.domains[0]
    assert tuple(n.type for n in odd.nics) == tuple(kind for kind, _ in testdriver.ODD_NICS)
    assert tuple(n.bridge_visible for n in odd.nics) == testdriver.ODD_VISIBLE
    assert odd.nics[3].virtualport == "openvswitch"


def test_unreachable_uri_is_recorded_not_raised(node: str):
    listing = hypervisor.list_running([UNREACHABLE, node, node])
    assert listing.reached == [node]  # duplicates asked once
    assert list(listing.unreachable) == [UNREACHABLE]
    reason = listing.unreachable[UNREACHABLE]
    assert "/nonexistent" in reason and "\n" not in reason
    assert len(listing.domains) == 4


def test_libvirt_errors_are_not_printed():
    """libvirt's default handler prints every error to stderr; fresh processes show it
    (the handler is process-wide, so an in-process check would pass by test order)."""
    plain = (
        "import libvirt\n"
        f"try: libvirt.openReadOnly({UNREACHABLE!r})\n"
        "except libvirt.libvirtError: pass\n"
    )
    ours = (
        "from smtp_gate import hypervisor\n"
        f"hypervisor.list_running([{UNREACHABLE!r}])\n"
        "hypervisor.find(['test:///default'], 'no-such-guest')\n"
    )
    run = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
        for code in (plain, ours)
    ]
    assert "Failed to connect socket" in run[0].stderr
    assert run[1].stderr == ""


def test_no_uris():
    assert hypervisor.list_running([]) == hypervisor.Listing([], [], {}, [])


def test_guest_destroyed_between_listing_and_xmldesc_is_skipped(monkeypatch, default_rw):
    """Real race: the transient guest is gone (VIR_ERR_NO_DOMAIN) when XMLDesc runs."""
    default_rw.createXML(testdriver.domain_xml(900, guest="vanishes"), 0)
    default_rw.createXML(testdriver.domain_xml(901, guest="stays"), 0)

    listed: List[str] = []

    class DestroyAfterListing(_Proxy):
        def listAllDomains(self, flags: int = 0) -> Any:
            domains = self._real.listAllDomains(flags)
            listed.extend(d.name() for d in domains)
            default_rw.lookupByName("vanishes").destroy()
            return domains

    _wrap_connections(monkeypatch, lambda uri, conn: DestroyAfterListing(conn))
    listing = hypervisor.list_running([DEFAULT])
    names = [d.name for d in listing.domains]
    assert "vanishes" in listed  # the race really happened
    assert "stays" in names and "vanishes" not in names
    assert listing.reached == [DEFAULT] and listing.skipped == []


def test_persistent_guest_stopped_between_listing_and_xmldesc_is_left_out(monkeypatch, default_rw):
    """Real race: the guest still exists, but XMLDesc now gives its inactive XML (no id)."""
    default_rw.defineXML(testdriver.domain_xml(902, guest="stops")).create()

    listed: List[str] = []

    class StopAfterListing(_Proxy):
        def listAllDomains(self, flags: int = 0) -> Any:
            domains = self._real.listAllDomains(flags)
            listed.extend(d.name() for d in domains)
            default_rw.lookupByName("stops").destroy()
            return domains

    _wrap_connections(monkeypatch, lambda uri, conn: StopAfterListing(conn))
    listing = hypervisor.list_running([DEFAULT])
    assert "stops" in listed
    assert "stops" not in [d.name for d in listing.domains]
    assert listing.skipped == []


def test_other_error_on_one_guest_skips_only_that_guest(monkeypatch, node: str):
    """Stand-in (the test driver has no way to fail one XMLDesc): vm00001's XMLDesc fails
    while the connection stays alive."""

    class BrokenDomain(_Proxy):
        def XMLDesc(self, flags: int = 0) -> str:
            raise _error("internal error: cannot format XML")

    class OneBroken(_Proxy):
        def listAllDomains(self, flags: int = 0) -> Any:
            return [BrokenDomain(d) if d.name() == "vm00001" else d for d in self._real.listAllDomains(flags)]

    _wrap_connections(monkeypatch, lambda uri, conn: OneBroken(conn))
    listing = hypervisor.list_running([node])
    assert [d.name for d in listing.domains] == [testdriver.ODD_NAME, "vm00000", "vm00002"]
    assert listing.reached == [node]
    assert listing.skipped == [f"{node}: vm00001: internal error: cannot format XML"]


def test_daemon_lost_mid_listing_makes_the_whole_uri_unreachable(monkeypatch, tmp_path: Path, node: str):
    """Stand-in (the test driver has no daemon to lose): XMLDesc fails and isAlive() says
    the connection is dead.  A partial listing would look like "those guests stopped"."""
    other = testdriver.write_node(tmp_path, running=1, filename="other.xml")

    class DeadDomain(_Proxy):
        def XMLDesc(self, flags: int = 0) -> str:
            raise _error("End of file while reading data: Input/output error")

    class Dying(_Proxy):
        def listAllDomains(self, flags: int = 0) -> Any:
            domains = self._real.listAllDomains(flags)
            return domains[:1] + [DeadDomain(d) for d in domains[1:]]

        def isAlive(self) -> int:
            return 0

    _wrap_connections(monkeypatch, lambda uri, conn: Dying(conn) if uri == node else conn)
    listing = hypervisor.list_running([node, other])
    assert listing.reached == [other]
    assert "End of file" in listing.unreachable[node]
    assert [d.uri for d in listing.domains] == [other]


def _xmldesc_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "smtp-gate-xmldesc"]


def test_a_listing_stopped_early_leaves_no_thread_behind(monkeypatch, tmp_path: Path):
    """The XMLDesc calls run in a thread ahead of the parsing: when the daemon is lost at
    the first guest of 50, the thread stops too, and is gone when list_running returns."""
    many = testdriver.write_node(tmp_path, running=50)
    calls: List[str] = []

    class DeadDomain(_Proxy):
        def XMLDesc(self, flags: int = 0) -> str:
            calls.append(self._real.name())
            time.sleep(0.01)  # an RPC takes time; an instant stand-in could finish all 50 first
            raise _error("End of file while reading data: Input/output error")

    class Dying(_Proxy):
        def listAllDomains(self, flags: int = 0) -> Any:
            return [DeadDomain(d) for d in self._real.listAllDomains(flags)]

        def isAlive(self) -> int:
            return 0

    _wrap_connections(monkeypatch, lambda uri, conn: Dying(conn))
    listing = hypervisor.list_running([many])
    assert many in listing.unreachable and listing.domains == []
    assert _xmldesc_threads() == []
    assert 1 <= len(calls) < 50  # it stopped asking, rather than asking all 50 dead guests


def test_an_unexpected_error_in_the_xmldesc_thread_reaches_the_caller(monkeypatch, node: str):
    """Not libvirt's error (a bug, a MemoryError): raised in the caller, as it would be
    without the thread, never swallowed as "guest skipped"."""

    class Buggy(_Proxy):
        def XMLDesc(self, flags: int = 0) -> str:
            raise RuntimeError("bug in a binding")

    class OneBuggy(_Proxy):
        def listAllDomains(self, flags: int = 0) -> Any:
            return [Buggy(d) if d.name() == "vm00001" else d for d in self._real.listAllDomains(flags)]

    _wrap_connections(monkeypatch, lambda uri, conn: OneBuggy(conn))
    with pytest.raises(RuntimeError, match="bug in a binding"):
        hypervisor.list_running([node])
    assert _xmldesc_threads() == []


def test_connections_are_closed(monkeypatch, node: str):
    closed: List[str] = []

    class Closing(_Proxy):
        def __init__(self, uri: str, real: Any) -> None:
            super().__init__(real)
            self._uri = uri

        def close(self) -> int:
            closed.append(self._uri)
            return self._real.close()

    class FailingList(Closing):
        def listAllDomains(self, flags: int = 0) -> Any:
            raise _error("listing failed")

    broken = node.replace("node.xml", "broken.xml")
    testdriver.write_node(Path(broken[len("test://"):]).parent, running=1, filename="broken.xml")
    _wrap_connections(monkeypatch, lambda uri, conn: (FailingList if uri == broken else Closing)(uri, conn))
    listing = hypervisor.list_running([node, broken])
    assert listing.unreachable == {broken: "listing failed"}
    hypervisor.list_all([node])
    hypervisor.find([node], "vm00000")
    assert sorted(closed) == sorted([node, broken, node, node])  # URIs are asked in parallel


def test_missing_libvirt_python_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "libvirt", None)  # makes `import libvirt` fail
    with pytest.raises(SmtpGateError, match="libvirt-python"):
        hypervisor.list_running(["test:///default"])


def test_thousand_guests(tmp_path: Path):
    """The benchmark's shape; timing is the benchmark's business, not asserted here."""
    uri = testdriver.write_node(tmp_path, running=1000, nics=2, shutoff=3)
    listing = hypervisor.list_running([uri])
    assert len(listing.domains) == 1000
    assert len({n.mac for d in listing.domains for n in d.nics}) == 2000
    assert len({n.target for d in listing.domains for n in d.nics}) == 2000


def test_populate_default(default_rw):
    uri = testdriver.populate_default(2, nics=2, first=910)
    names = [d.name for d in hypervisor.list_running([uri]).domains]
    assert {testdriver.name(910), testdriver.name(911)} <= set(names)


# --- list_all and find -------------------------------------------------------------------


def test_list_all(node: str):
    guests = hypervisor.list_all([node, UNREACHABLE])
    assert [(d.name, running) for d, running in guests] == [
        (testdriver.ODD_NAME, True),
        ("vm00000", True),
        ("vm00001", True),
        ("vm00002", True),
        ("vm00003", False),
        ("vm00004", False),
    ]
    off = guests[-1][0]
    assert off.id is None and off.uuid == testdriver.uuid(4)
    # unlike QEMU, the test driver keeps targets in a shut-off guest's XML
    assert [n.target for n in off.nics] == [testdriver.target(4, 0), testdriver.target(4, 1)]


def test_list_all_with_no_uri_answering_raises():
    with pytest.raises(SmtpGateError, match="no libvirt URI answered"):
        hypervisor.list_all([UNREACHABLE])


def test_find_by_name_and_uuid(node: str):
    dom, running = hypervisor.find([node], "vm00001")
    assert (dom.name, running, dom.uri) == ("vm00001", True, node)
    uuid = testdriver.uuid(4)
    for key in (uuid, uuid.upper(), uuid.replace("-", ""), f" {uuid} "):
        found = hypervisor.find([UNREACHABLE, node], key)
        assert found is not None and found[0].name == "vm00004" and found[1] is False
    assert hypervisor.find([node], "no-such-guest") is None
    assert hypervisor.find([node], "00000000-0000-0000-0000-000000000000") is None


def test_find_a_guest_named_like_a_uuid(default_rw):
    odd_name = "11111111-2222-3333-4444-555555555555"
    default_rw.createXML(testdriver.domain_xml(903, guest=odd_name), 0)
    found = hypervisor.find([DEFAULT], odd_name)
    assert found is not None and found[0].uuid == testdriver.uuid(903)


def test_find_not_found_while_a_uri_is_down_raises(node: str):
    with pytest.raises(SmtpGateError, match="did not answer"):
        hypervisor.find([node, UNREACHABLE], "no-such-guest")


def test_find_on_several_uris_raises(tmp_path: Path, node: str):
    other = testdriver.write_node(tmp_path, running=1, filename="other.xml")
    with pytest.raises(SmtpGateError, match="several libvirt URIs"):
        hypervisor.find([node, other], "vm00000")


# --- what the test driver does (the reasons behind testdriver.py) -----------------------


def test_driver_facts(tmp_path: Path):
    path = tmp_path / "facts.xml"
    path.write_text(
        "<node>"
        "<domain type='test'><name>a</name><memory>65536</memory><os><type>hvm</type></os><devices>"
        "<interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/><target dev='vnet7'/></interface>"
        "<interface type='bridge'><mac address='52:54:00:00:00:02'/><source bridge='br0'/><target dev='tap7'/></interface>"
        "<interface type='bridge'><mac address='52:54:00:00:00:03'/><source bridge='br0'/></interface>"
        "</devices></domain>"
        "<domain type='test'><name>b</name><memory>65536</memory><os><type>hvm</type></os><devices>"
        "<interface type='bridge'><mac address='52:54:00:00:00:04'/><source bridge='br0'/></interface>"
        "</devices></domain>"
        "</node>"
    )
    uri = f"test://{path}"
    (a, a_running), (b, b_running) = hypervisor.list_all([uri])
    assert a_running and b_running  # running unless <test:runstate>5</test:runstate>
    assert [n.target for n in a.nics] == ["testnet0", "tap7", "testnet1"]  # vnet* is reserved
    assert [n.target for n in b.nics] == ["testnet0"]  # counted per guest: not unique
    # every connection to a file URI loads its own copy: a random <uuid> differs each time
    assert hypervisor.find([uri], "a")[0].uuid != a.uuid


# --- absent drivers: "reached, no guests", not "unreachable" -----------------------------


def _driver_dir(root: Path) -> Path:
    path = root / "usr" / "lib" / "x86_64-linux-gnu" / "libvirt" / "connection-driver"
    path.mkdir(parents=True)
    return path


def test_a_driver_counts_as_not_installed_only_on_evidence(tmp_path: Path):
    assert hypervisor.installed("lxc", str(tmp_path)), "no libvirt driver directory: unknown, so maybe"
    modules = _driver_dir(tmp_path)
    (modules / "libvirt_driver_qemu.so").touch()
    assert hypervisor.installed("qemu", str(tmp_path))
    assert not hypervisor.installed("lxc", str(tmp_path)) and not hypervisor.installed("libxl", str(tmp_path))
    (tmp_path / "usr" / "sbin").mkdir(parents=True)
    (tmp_path / "usr" / "sbin" / "virtxend").touch()  # a modular daemon is a driver too
    assert hypervisor.installed("libxl", str(tmp_path))


def test_a_uri_whose_driver_is_not_installed_is_absent_and_a_silent_installed_one_unreachable(tmp_path: Path, node: str):
    """Real libvirt calls to sockets nobody serves; only the host's driver directory is a
    stand-in (ROOT), so the answer does not depend on what this machine has installed."""
    (_driver_dir(tmp_path) / "libvirt_driver_qemu.so").touch()
    lxc, qemu = f"lxc:///system?socket={tmp_path}/none", f"qemu:///system?socket={tmp_path}/none"
    listing = hypervisor.list_running([lxc, qemu, node], root=str(tmp_path))
    assert list(listing.absent) == [lxc] and "lxc driver is not installed" in listing.absent[lxc]
    assert list(listing.unreachable) == [qemu]
    assert listing.reached == [node] and len(listing.domains) == 4


def test_this_hosts_missing_drivers_are_absent():
    """The same on this machine's own layout, for the drivers it lacks."""
    missing = [d for d in ("lxc", "libxl") if not hypervisor.installed(d)]
    if not missing:
        pytest.skip("lxc and libxl are both installed here")
    uris = [f"{'xen' if d == 'libxl' else d}:///system?socket=/nonexistent" for d in missing]
    listing = hypervisor.list_running(uris)
    assert list(listing.absent) == uris and listing.unreachable == {}


def test_a_remote_uri_is_never_judged_by_this_hosts_drivers(tmp_path: Path):
    _driver_dir(tmp_path)
    exc = _error("Failed to connect socket")
    assert hypervisor._absent_reason(libvirt, "lxc+tcp://192.0.2.1/system", exc, str(tmp_path)) is None
    assert hypervisor._absent_reason(libvirt, "lxc:///system", exc, str(tmp_path)) is not None
    assert hypervisor._absent_reason(libvirt, "test:///default", exc, str(tmp_path)) is None


# --- deadlines ---------------------------------------------------------------------------


@pytest.fixture
def silent(tmp_path: Path) -> Iterator[SilentDaemon]:
    daemon = SilentDaemon(tmp_path / "silent.sock")
    yield daemon
    daemon.close()


@pytest.mark.parametrize("call", ["list_running", "list_all", "find"])
def test_a_daemon_that_never_answers_costs_the_deadline_and_no_more(silent: SilentDaemon, node: str, call: str):
    started = time.monotonic()
    if call == "list_running":
        listing = hypervisor.list_running([silent.uri, node], timeout=1.0)
        assert listing.unreachable == {silent.uri: "no answer within 1s (LIBVIRT_TIMEOUT)"}
        assert listing.reached == [node] and len(listing.domains) == 4, "the other URI still answers"
    elif call == "list_all":
        assert len(hypervisor.list_all([silent.uri, node], timeout=1.0)) == 6
        with pytest.raises(SmtpGateError, match="no answer within 1s"):
            hypervisor.list_all([silent.uri], timeout=1.0)
    else:
        assert hypervisor.find([silent.uri, node], "vm00001", timeout=1.0)[0].name == "vm00001"
        with pytest.raises(SmtpGateError, match="did not answer.*no answer within 1s"):
            hypervisor.find([silent.uri, node], "no-such-guest", timeout=1.0)
    elapsed = time.monotonic() - started
    assert silent.accepted, "libvirt really connected to the silent daemon"
    assert elapsed < (2 if call == "list_running" else 3) * 1.0 + 2.0, f"{call} took {elapsed:.1f}s"
