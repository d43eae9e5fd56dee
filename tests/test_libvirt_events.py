"""The watcher's libvirt side on libvirt's test driver (real libvirt-python, no daemon): which
events name a guest, and how they are coalesced (libvirt_events.Follower); what
hypervisor.read_guests answers for running, stopped and unknown guests; and how the watch
loop serves an extra source.  The real libvirtd (reconnects, the kernel) is
tests/test_watch_libvirt.py's."""

import os
import select
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest

libvirt = pytest.importorskip("libvirt")

from smtp_gate import hypervisor, libvirt_events, watch  # noqa: E402
from smtp_gate.domain import METADATA_NS  # noqa: E402

try:
    from tests import testdriver
except ImportError:  # tests/ run as rootdir modules
    import testdriver  # type: ignore[no-redef]

DEFAULT = "test:///default"
FIRST = 970  # guest indexes of this module in the shared test:///default instance


@pytest.fixture
def guest() -> Iterator[Any]:
    """A running transient guest in test:///default (destroyed afterwards)."""
    conn = libvirt.open(DEFAULT)
    dom = conn.createXML(testdriver.domain_xml(FIRST), 0)
    yield dom
    if any(d.UUIDString() == dom.UUIDString() for d in conn.listAllDomains(0)):
        dom.destroy()  # transient: gone after this
    conn.close()


@pytest.fixture
def follower() -> Iterator[libvirt_events.Follower]:
    lines: List[str] = []
    f = libvirt_events.Follower([DEFAULT], lines.append)
    assert f.start()
    f.lines = lines  # type: ignore[attr-defined]
    end = time.monotonic() + 5
    while not f.connected[DEFAULT] and time.monotonic() < end:
        time.sleep(0.01)
    yield f
    f.stop()


def settle(f: libvirt_events.Follower, timeout: float = 1.0) -> libvirt_events.Pending:
    """What the follower noted once the test driver's events are delivered."""
    select.select([f], [], [], timeout)
    time.sleep(0.2)
    return f.take()


def test_our_metadata_device_and_lifecycle_events_name_the_guest_once_each(follower, guest) -> None:
    first = settle(follower)
    assert first.resync == {DEFAULT}, "a full resync is asked for at every connect"
    assert f"following libvirt events of {DEFAULT}" in follower.lines  # type: ignore[attr-defined]
    uuid = testdriver.uuid(FIRST)
    live = libvirt.VIR_DOMAIN_AFFECT_LIVE
    element = libvirt.VIR_DOMAIN_METADATA_ELEMENT
    for n in range(50):  # a storm: one entry
        guest.setMetadata(element, f'<allow by="t{n}"/>', "smtpgate", METADATA_NS, live)
    assert settle(follower).guests == {(DEFAULT, uuid): {libvirt_events.METADATA}}

    # not ours: another namespace, the title, a suspend
    guest.setMetadata(element, "<x/>", "other", "urn:example:other", live)
    guest.setMetadata(libvirt.VIR_DOMAIN_METADATA_TITLE, "a title", None, None, live)
    guest.suspend()
    assert settle(follower).guests == {}
    guest.resume()
    guest.setMetadata(element, None, None, METADATA_NS, live)
    assert settle(follower).guests == {(DEFAULT, uuid): {libvirt_events.METADATA, libvirt_events.LIFECYCLE}}
    guest.destroy()
    assert settle(follower).guests == {(DEFAULT, uuid): {libvirt_events.LIFECYCLE}}


def test_an_unreachable_uri_is_said_once_and_retried(tmp_path: Path) -> None:
    lines: List[str] = []
    uri = f"qemu:///system?socket={tmp_path}/nobody-here"
    f = libvirt_events.Follower([uri], lines.append)
    assert f.start()
    try:
        time.sleep(libvirt_events.BACKOFF_MIN * 3.5)  # three attempts at least
        said = [line for line in lines if "cannot follow its events" in line]
        assert len(said) == 1 and "nobody-here" in said[0] and "retrying with backoff" in said[0], lines
        assert not f.connected[uri] and f.take().resync == set()
    finally:
        f.stop()


def test_read_guests_tells_running_from_stopped_and_unknown(tmp_path: Path) -> None:
    node = testdriver.write_node(tmp_path, running=2, shutoff=1)
    unknown = "00000000-0000-4000-8000-00000000abcd"
    got = hypervisor.read_guests(node, [testdriver.uuid(0), testdriver.uuid(2), unknown])
    assert got.unreachable is None
    assert list(got.running) == [testdriver.uuid(0)]
    assert got.running[testdriver.uuid(0)].uri == node
    assert [n.mac for n in got.running[testdriver.uuid(0)].nics] == [testdriver.mac(0, 0)]
    assert got.stopped == [testdriver.uuid(2), unknown]
    gone = hypervisor.read_guests(f"qemu:///system?socket={tmp_path}/nobody-here", [unknown], timeout=5)
    assert gone.unreachable and "nobody-here" in gone.unreachable and not gone.running and not gone.stopped


def test_the_watch_loop_serves_a_source_and_checks_when_it_asks(monkeypatch) -> None:
    """A source's handler runs when its fd is readable; when it returns True, the table is
    checked after the usual debounce."""
    events_r, events_w = os.pipe()  # stands in for the nftables socket: never readable
    src_r, src_w = os.pipe()
    served: List[float] = []
    checks: List[float] = []

    def handler() -> bool:
        os.read(src_r, 100)
        served.append(time.monotonic())
        return len(served) == 2

    class Stop(Exception):
        pass

    def check() -> bool:
        checks.append(time.monotonic())
        if len(checks) == 2:
            raise Stop()
        return False

    def feed() -> None:
        time.sleep(0.2)
        os.write(src_w, b"!")  # no check wanted
        time.sleep(0.3)
        os.write(src_w, b"!")  # a check wanted

    class Fd:
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def fileno(self) -> int:
            return self.fd

    class Source(Fd):
        """A watch.Source whose readable() is HANDLER."""

        def readable(self) -> bool:
            return handler()

        def due(self) -> None:
            return None

        def tick(self) -> None:
            pass

    threading.Thread(target=feed, daemon=True).start()
    with pytest.raises(Stop):
        watch.follow(Fd(events_r), check, lambda _m: None, None, [Source(src_r)])
    assert len(served) == 2 and len(checks) == 2
    assert checks[1] >= served[1], "the second check came after the source asked for it"
    assert checks[1] - checks[0] > 0.4, "the first source wake-up asked for no check"
    for fd in (events_r, events_w, src_r, src_w):
        os.close(fd)


def test_a_round_asks_again_after_a_truncation_even_when_the_journal_grew_back(tmp_path: Path) -> None:
    """guest_sync: a rebuild truncated the journal while a round asked libvirt, then hooks
    journaled past the noted end (attacker review of issue 11): the round must not take its
    answer for newer than theirs; it asks again."""
    from smtp_gate import config as config_mod, guest_sync
    from smtp_gate.domain import Domain, Nic
    from smtp_gate.runstate import RunState, domain_event

    conf = tmp_path / "smtp-gate.conf"
    conf.write_text(f'BRIDGE="br0"\nRUN_DIR="{tmp_path / "run"}"\nWHITELIST="{tmp_path / "whitelist.csv"}"\n'
                    f'LIBVIRT_URI="{DEFAULT}"\n')
    (tmp_path / "whitelist.csv").write_text("# vmname,mac,added_at,added_by,reason\n")
    config = config_mod.load(str(conf))
    state = RunState(config.run_dir)
    nic = Nic("bridge", testdriver.mac(FIRST + 1, 0), "br0", None, None, None)
    victim = Domain("victim", testdriver.uuid(FIRST + 1), "test", (nic,), uri=DEFAULT)
    others = [Domain(f"other{n}", testdriver.uuid(FIRST + 2 + n), "test", (), uri=DEFAULT) for n in range(3)]
    for dom in others:
        state.append(domain_event("start", dom))
    follower = libvirt_events.Follower([DEFAULT], lambda _line: None)  # not started: only its wake-up pipe
    sync = guest_sync.GuestSync(follower, lambda: config, lambda _line: None)
    generation, offset = state.journal_mark()  # as _ask notes it
    state.truncate_journal()  # a rebuild commits meanwhile
    state.append(domain_event("stop", victim))  # the victim's hooks: stop, start with newer XML
    state.append(domain_event("start", victim))
    for dom in others:
        state.append(domain_event("start", dom))
    assert state.journal_end() > offset
    answer = hypervisor.Guests({victim.uuid: victim}, [], {}, [])  # libvirt's (older) answer
    item = guest_sync.Fetched(DEFAULT, {victim.uuid: {libvirt_events.METADATA}}, False, offset, answer, generation)
    assert sync._changes(config, state, [item]) == []
    assert sync.waiting == {DEFAULT: {victim.uuid: {libvirt_events.METADATA}}}, "asked again in the next round"
    # a round that noted the position after the truncation goes ahead
    generation, offset = state.journal_mark()
    fresh = guest_sync.Fetched(DEFAULT, {victim.uuid: {libvirt_events.METADATA}}, False, offset, answer, generation)
    assert [c.domain for c in sync._changes(config, state, [fresh])] == [victim]
