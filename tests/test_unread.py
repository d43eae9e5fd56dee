"""Guests whose domain XML cannot be read (attacker review of issue 11), on libvirt's test
driver: real libvirt-python calls (virDomainGetMetadata, virDomainSetMetadata), no daemon.

The test driver runs in this process, so no reply is ever too big for an RPC: the one
stand-in is virDomain.XMLDesc raising libvirt's "Unable to encode message payload" for the
guests a test names (tests/test_unread_libvirt.py produces the real failure on a real
libvirtd, with real frames).  Everything else (the metadata element read alone, its
removal, the commands' output and exit codes, the watcher's derivation) is real.
"""

from pathlib import Path
from typing import Iterator, Set

import pytest

libvirt = pytest.importorskip("libvirt")

from smtp_gate import config as config_mod, discovery, guest_sync, hypervisor, status  # noqa: E402
from smtp_gate.domain import Allow  # noqa: E402
from smtp_gate.runstate import Record, RunState  # noqa: E402
from tests import testdriver  # noqa: E402
from tests.test_fleet_cli import HEADER, NS, URI, Guests, fleet, run  # noqa: E402,F401

TOO_BIG = "internal error: Unable to encode message payload"


@pytest.fixture
def unreadable(monkeypatch: pytest.MonkeyPatch) -> Set[str]:
    """Names whose XMLDesc fails as libvirtd's does for a domain XML beyond its RPC limit."""
    names: Set[str] = set()
    real = libvirt.virDomain.XMLDesc

    def xmldesc(self, flags: int = 0) -> str:  # type: ignore[no-untyped-def]
        if self.name() in names:
            exc = libvirt.libvirtError(TOO_BIG)
            exc.err = (libvirt.VIR_ERR_RPC, libvirt.VIR_FROM_RPC, TOO_BIG, 2, None, None, None, 0, 0)
            raise exc
        return real(self, flags)

    monkeypatch.setattr(libvirt.virDomain, "XMLDesc", xmldesc)
    return names


@pytest.fixture
def conf(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "smtp-gate.conf"
    path.write_text(f'LIBVIRT_URI="{URI}"\nRUN_DIR="{tmp_path / "run"}"\nWHITELIST="{tmp_path / "whitelist.csv"}"\n')
    (tmp_path / "whitelist.csv").write_text(HEADER)
    yield path


def _allow(text: str) -> str:
    return f'<x:allow xmlns:x="{NS}" by="panel" reason="KYC"{text}'


def test_the_listing_reads_an_unreadable_guests_allowance_alone(fleet: Guests, unreadable: Set[str]) -> None:
    name, i = fleet.make("running", metadata=lambda i: _allow(f'><x:nic mac="{testdriver.mac(i, 0)}"/></x:allow>'))
    unreadable.add(name)
    listing = hypervisor.list_running([URI])
    assert name not in [d.name for d in listing.domains]
    assert listing.skipped == [f"{URI}: {name}: {TOO_BIG}"]
    guest = listing.unread[testdriver.uuid(i)]
    assert (guest.name, guest.uri, guest.why, guest.running, guest.allow_error) == (name, URI, TOO_BIG, True, None)
    assert guest.allow == Allow(by="panel", reason="KYC", macs=(testdriver.mac(i, 0),))

    fleet.conn.lookupByName(name).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, NS,
                                              libvirt.VIR_DOMAIN_AFFECT_LIVE)
    guest = hypervisor.read_guests(URI, [testdriver.uuid(i)]).unread[testdriver.uuid(i)]
    assert (guest.allow, guest.allow_error) == (None, None), "VIR_ERR_NO_DOMAIN_METADATA: none"
    assert "carries no allowance" in guest.metadata_text()


def test_a_failing_metadata_call_is_said_and_a_stopped_unreadable_guest_is_stopped(
    fleet: Guests, unreadable: Set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, i = fleet.make("running", metadata=lambda i: _allow("/>"))
    stopped, s = fleet.make("stopped")
    unreadable.update({name, stopped})

    def metadata(self, *args: object) -> str:  # type: ignore[no-untyped-def]
        exc = libvirt.libvirtError("internal error: boom")
        exc.err = (libvirt.VIR_ERR_INTERNAL_ERROR, 0, "internal error: boom", 2, None, None, None, 0, 0)
        raise exc

    monkeypatch.setattr(libvirt.virDomain, "metadata", metadata)
    answer = hypervisor.read_guests(URI, [testdriver.uuid(i), testdriver.uuid(s)])
    guest = answer.unread[testdriver.uuid(i)]
    assert (guest.allow, guest.allow_error) == (None, "internal error: boom")
    assert "its smtp-gate metadata could not be read either (internal error: boom)" in guest.metadata_text()
    assert answer.stopped == [testdriver.uuid(s)] and testdriver.uuid(s) not in answer.unread


def test_list_and_status_name_the_guest_and_exit_3(
    fleet: Guests, unreadable: Set[str], conf: Path, capsys: pytest.CaptureFixture
) -> None:
    name, i = fleet.make("running", metadata=lambda i: _allow("/>"))
    unreadable.add(name)
    code, out, err = run(conf, capsys, "list")
    line = (f"guest '{name}' ({testdriver.uuid(i)}) on {URI}, running: its XML could not be read: {TOO_BIG}; "
            "its smtp-gate metadata (read alone) allows every NIC (by panel, at ?)")
    assert code == 3 and f"smtp-gate: warning: {line}\n" in err, err
    report = status.Report(active=True, mode="enforce", counters={"blocked4": 0, "blocked6": 0, "nonip": 0, "malformed": 0})
    status.add_guests(report, config_mod.load(str(conf)), links={})
    assert [w for w in report.warnings if name in w] == [
        line + "; its NICs cannot be shown (a rebuild keeps its recorded ports, and only the allowance a source still grants)"
    ]
    assert report.unread[0]["name"] == name and report.unread[0]["allow"]["by"] == "panel"  # type: ignore[index]
    assert f"warning: {line}" in status.render(report)


def test_del_vm_removes_the_metadata_of_an_unreadable_guest_through_the_small_calls(
    fleet: Guests, unreadable: Set[str], conf: Path, capsys: pytest.CaptureFixture
) -> None:
    name, i = fleet.make("running", metadata=lambda i: _allow("/>"))
    fleet.conn.lookupByName(name).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, '<allow by="panel"/>', "smtpgate", NS,
                                              libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    unreadable.add(name)
    with open(conf, "a") as handle:
        handle.write('ALLOW_STORE="metadata"\n')
    code, out, err = run(conf, capsys, "add-vm", name, "again")
    assert code == 1 and f"guest '{name}' ({testdriver.uuid(i)}) on {URI}: its XML could not be read: {TOO_BIG}" in err, err
    code, out, err = run(conf, capsys, "del-vm", name)
    assert code == 0, err
    # del-vm's default source is "all": the file's line ("nothing to remove") comes first
    assert f"ok: removed the allowance from the libvirt metadata of guest '{name}' (live and saved definition)" in out.splitlines()
    assert f"its XML could not be read ({TOO_BIG})" in err and "no record of it here" in err
    dom = fleet.conn.lookupByName(name)
    for scope in (libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG):
        with pytest.raises(libvirt.libvirtError) as info:
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, scope)
        assert info.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA
    code, out, err = run(conf, capsys, "del-vm", name)
    assert code == 0 and f"ok: nothing to remove: the libvirt metadata of guest '{name}' carries no allowance" in out.splitlines()


def test_del_vm_of_the_file_store_removes_the_uuid_row_of_an_unreadable_guest(
    fleet: Guests, unreadable: Set[str], conf: Path, capsys: pytest.CaptureFixture
) -> None:
    name, i = fleet.make("running")
    unreadable.add(name)
    (conf.parent / "whitelist.csv").write_text(HEADER + f"{testdriver.uuid(i)},,2026-01-01T00:00:00+00:00,alice,KYC\n")
    code, out, err = run(conf, capsys, "del-vm", name)
    assert code == 0, err
    assert testdriver.uuid(i) not in (conf.parent / "whitelist.csv").read_text(), out + err
    assert f"its XML could not be read: {TOO_BIG}; removing the whitelist rows of '{name}' anyway" in err


def test_the_watchers_round_keeps_the_ports_and_only_what_a_source_still_grants(conf: Path) -> None:
    """guest_sync's derivation under the lock, for an answer whose guest could not be read:
    the record keeps its port and loses the pair its metadata no longer grants; no journal
    line (no facts to replay); one line says why."""
    config = config_mod.load(str(conf))
    state = RunState(config.run_dir)
    lo = discovery.read_links()["lo"].ifindex  # a port index that exists
    uuid = testdriver.uuid(7)
    old = Record(uuid, "g", (("lo", lo),), (), ((lo, "52:54:00:00:00:07"),), uri=URI)
    state.write_record(old)
    unread = hypervisor.Unread(uuid, "g", URI, TOO_BIG)
    answer = hypervisor.Guests({}, [], {uuid: unread}, [f"{URI}: g: {TOO_BIG}"])
    sync = guest_sync.GuestSync(None, lambda: config, print)  # type: ignore[arg-type]
    generation, offset = state.journal_mark()
    fetched = guest_sync.Fetched(URI, {uuid: {"metadata"}}, False, offset, answer, generation)
    lines: list = []
    (change,) = sync._changes(config, state, [fetched], lines)
    assert change.new == old._replace(allowed=())
    assert lines == [f"guest 'g' ({uuid}) on {URI}: its XML could not be read ({TOO_BIG}); its smtp-gate metadata "
                     "(read alone) carries no allowance; allowance revoked on lo/52:54:00:00:00:07; its recorded ports "
                     "stay guest ports (blocked unless allowed) until it can be read, at most an hour"]
    assert guest_sync._journal_line(change) is None
    still = answer._replace(unread={uuid: unread._replace(allow=Allow())})
    assert sync._changes(config, state, [fetched._replace(answer=still)], []) == [], "its metadata still allows it"


def test_the_element_read_alone_is_read_as_in_a_whole_domain_xml() -> None:
    """libvirt returns our element without its namespace (it matched the URI already)."""
    from smtp_gate.domain import parse_allow
    from smtp_gate.errors import DomainXMLError

    me = "0f5e0c3e-6c55-4d7c-9b7e-6a1b2c3d4e5f"
    assert parse_allow('<allow by="p" reason="r">\n  <nic mac="52:54:00:00:00:01"/>\n</allow>', me) == Allow(
        by="p", reason="r", macs=("52:54:00:00:00:01",))
    assert parse_allow(f'<x:allow xmlns:x="{NS}"/>', me) == Allow()
    assert parse_allow('<allow><nics/></allow>', me).macs == (), "an unknown child allows nothing, as in the XML"
    copied = parse_allow('<allow uuid="0f5e0c3e-6c55-4d7c-9b7e-000000000001"/>', me)
    assert copied is not None and copied.macs == (), "an allowance bound to another guest allows nothing here too"
    assert parse_allow(f'<allow uuid="{me.upper()}"/>', me).macs is None
    assert parse_allow("<other/>", me) is None
    with pytest.raises(DomainXMLError, match="not well-formed"):
        parse_allow("<allow", me)
