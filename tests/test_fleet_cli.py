"""ALLOW_STORE="metadata", `list`, `status` and `export-metadata` (issue 11) on libvirt's test
driver: real libvirt-python calls (virDomainSetMetadata, XMLDesc live and inactive), no
daemon.  `test:///default` is used, not a node file: it is one instance per process, so
what the command writes through its own connection is what the test reads back (each
`test:///PATH` connection loads a private copy of its file).  Every guest made here is
destroyed and undefined again.  No table is installed: tests/test_hooks.py and
tests/test_manage.py prove enforcement in the kernel."""

import itertools
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest

libvirt = pytest.importorskip("libvirt")

from smtp_gate import config as config_mod, domain, manage, status  # noqa: E402
from smtp_gate.cli import main  # noqa: E402
from tests import testdriver  # noqa: E402

URI = testdriver.DEFAULT_URI
NS = domain.METADATA_NS
HEADER = "# vmname,mac,added_at,added_by,reason\n"
_numbers = itertools.count(600000 + (os.getpid() % 1000) * 64)  # unique per run: test:///default is shared


class Guests:
    """Guests in test:///default: running persistent, running transient, shut-off persistent."""

    def __init__(self) -> None:
        self.conn = libvirt.open(URI)
        self.made: List[str] = []

    def make(self, kind: str, nics: int = 1, metadata: Callable[[int], str] = lambda _i: "") -> Tuple[str, int]:
        """A guest of KIND (running, transient, stopped) whose <metadata> is METADATA(its index)."""
        i = next(_numbers)
        name = f"fleet-{kind}-{i}"
        xml = testdriver.domain_xml(i, nics=nics, guest=name)
        if metadata(i):
            xml = xml.replace("<devices>", f"<metadata>{metadata(i)}</metadata><devices>")
        self.made.append(name)
        if kind == "transient":
            self.conn.createXML(xml, 0)
        else:
            dom = self.conn.defineXML(xml)
            if kind == "running":
                dom.create()
        return name, i

    def allow(self, name: str, inactive: bool = False) -> "domain.Allow | None":
        dom = self.conn.lookupByName(name)
        return domain.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)).allow

    def close(self) -> None:
        for name in self.made:
            try:
                dom = self.conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            persistent = dom.isPersistent()
            if dom.isActive():
                dom.destroy()  # a transient guest is gone with it
            if persistent:
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)  # a failed test's snapshots too
        self.conn.close()


@pytest.fixture
def fleet() -> Iterator[Guests]:
    guests = Guests()
    try:
        yield guests
    finally:
        guests.close()


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "smtp-gate.conf"
    path.write_text(f'LIBVIRT_URI="{URI}"\nRUN_DIR="{tmp_path / "run"}"\nALLOW_STORE="metadata"\n')
    (tmp_path / "whitelist.csv").write_text(HEADER)
    return path


def run(conf: Path, capsys: pytest.CaptureFixture, *args: str) -> Tuple[int, str, str]:
    code = main(["--config", str(conf), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_add_vm_writes_live_and_saved_definition_of_a_running_persistent_guest(
    fleet: Guests, conf: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUDO_USER", "carol")
    name, i = fleet.make("running")
    before = (conf.parent / "whitelist.csv").read_bytes()
    code, out, err = run(conf, capsys, "add-vm", name, "KYC 123")
    assert code == 0, err
    # its taps do not exist on this machine: no kernel change (tests/test_manage.py has the kernel)
    assert out == (
        f"ok: allowed guest '{name}' (UUID {testdriver.uuid(i)}, every NIC) in its libvirt metadata "
        "(live and saved definition)\n"
    )
    for inactive in (False, True):
        allow = fleet.allow(name, inactive)
        assert allow is not None and (allow.by, allow.reason, allow.macs, allow.problems) == ("carol", "KYC 123", None, ())
        assert datetime.fromisoformat(allow.at).utcoffset() is not None, allow.at
    raw = fleet.conn.lookupByName(name).metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, 0)
    assert raw.startswith("<allow ") and 'by="carol"' in raw
    assert (conf.parent / "whitelist.csv").read_bytes() == before, "the metadata store leaves the file alone"

    code, out, err = run(conf, capsys, "add-vm", name)
    assert (code, err) == (0, ""), "an allowance of every NIC is already there, as the file says of its row"
    assert out == (f"ok: guest '{name}' (UUID {testdriver.uuid(i)}, every NIC) is already allowed by its libvirt metadata "
                   f"(by carol, at {allow.at}, reason 'KYC 123'; live and saved definition): already there\n")
    assert fleet.allow(name).reason == "KYC 123", "a second add-vm without a reason keeps the reason"  # type: ignore[union-attr]
    assert fleet.allow(name).at == allow.at, "and writes nothing"  # type: ignore[union-attr]

    code, out, err = run(conf, capsys, "del-vm", name, "--source", "metadata")
    assert code == 0, err
    # del-vm's default source is "all": the file's line ("nothing to remove") comes first
    assert f"ok: removed the allowance from the libvirt metadata of guest '{name}' (live and saved definition)" in out.splitlines()
    assert fleet.allow(name) is None and fleet.allow(name, inactive=True) is None
    code, out, err = run(conf, capsys, "del-vm", name, "--source", "metadata")
    assert (code, out.splitlines()[0], err) == (
        0, f"ok: nothing to remove: the libvirt metadata of guest '{name}' carries no allowance", "")


def test_a_transient_guest_gets_live_metadata_and_a_shut_off_guest_its_saved_definition(
    fleet: Guests, conf: Path, capsys: pytest.CaptureFixture
) -> None:
    transient, _ = fleet.make("transient")
    code, out, err = run(conf, capsys, "add-vm", transient)
    assert code == 0, err
    assert "(live definition only: a transient guest)" in out.splitlines()[0]
    assert fleet.allow(transient) is not None
    assert not fleet.conn.lookupByName(transient).isPersistent()

    stopped, _ = fleet.make("stopped")
    code, out, err = run(conf, capsys, "add-vm", stopped, "verified")
    assert code == 0, err
    assert "(saved definition: the guest is shut off)" in out.splitlines()[0]
    assert f"ok: guest '{stopped}' is not running: its NICs are allowed when it starts" in out
    assert fleet.allow(stopped, inactive=True).reason == "verified"  # type: ignore[union-attr]
    fleet.conn.lookupByName(stopped).create()
    assert fleet.allow(stopped).reason == "verified", "the saved definition is what the guest starts with"  # type: ignore[union-attr]

    code, out, err = run(conf, capsys, "del-vm", transient)
    assert code == 0 and "(live definition only: a transient guest)" in out and fleet.allow(transient) is None
    code, out, err = run(conf, capsys, "del-vm", stopped)  # default --source all: the file had nothing
    assert (code, err) == (0, "")
    assert out == (f"ok: nothing to remove: guest '{stopped}' is not in the whitelist\n"
                   f"ok: removed the allowance from the libvirt metadata of guest '{stopped}' (live and saved definition)\n")


def test_add_vm_replaces_a_limited_allowance_and_says_so(fleet: Guests, conf: Path, capsys: pytest.CaptureFixture) -> None:
    name, i = fleet.make("running", nics=2, metadata=lambda i: (
        f'<sg:allow xmlns:sg="{NS}" by="panel" at="2026-01-01T00:00:00+00:00"><sg:nic mac="{testdriver.mac(i, 1)}"/></sg:allow>'))
    code, out, err = run(conf, capsys, "add-vm", name)
    assert code == 0
    assert err.count("\n") == 2 and "it replaces the allowance its live definition carried (by panel, at 2026-01-01T00:00:00+00:00, " \
        f"NICs {testdriver.mac(i, 1)})" in err
    assert fleet.allow(name).macs is None  # type: ignore[union-attr]


def test_each_revocation_names_the_other_source_that_still_allows(
    fleet: Guests, conf: Path, capsys: pytest.CaptureFixture
) -> None:
    name, i = fleet.make("running")
    uuid, mac = testdriver.uuid(i), testdriver.mac(i, 0)
    (conf.parent / "whitelist.csv").write_text(HEADER + f"{uuid},,2026-01-01T00:00:00+00:00,alice,file row\n")
    assert run(conf, capsys, "add-vm", name)[0] == 0
    # metadata revoked: the file's row still allows the NIC
    code, out, err = run(conf, capsys, "del-vm", name, "--source", "metadata")
    assert code == 3 and "ok: removed the allowance from the libvirt metadata" in out
    assert err == (f"smtp-gate: note: NIC {mac} of guest '{name}' ({uuid}) is still allowed by the whitelist file's "
                   f"line 2 (guest '{name}' (UUID {uuid}, every NIC))\n")
    # and the other way: the file row removed, the metadata still allows it; the hint names a command that works
    assert run(conf, capsys, "add-vm", name, "panel")[0] == 0
    file_conf = conf.parent / "file.conf"
    file_conf.write_text(conf.read_text().replace('ALLOW_STORE="metadata"', 'ALLOW_STORE="file"'))
    code, out, err = run(file_conf, capsys, "del-vm", name, "--source", "file")
    assert code == 3 and out.startswith(f"ok: removed guest '{name}' (UUID {uuid}, every NIC) from line 2\n"), out
    assert err.startswith(f"smtp-gate: note: NIC {mac} of guest '{name}' ({uuid}) is still allowed by its libvirt metadata (by ")
    assert "reason 'panel'" in err and err.count("\n") == 1
    assert err.endswith(f"; `smtp-gate del-vm {name} --source metadata` (or the panel that set it) removes it\n"), err
    assert fleet.allow(name) is not None, "a file revocation never touches the metadata"
    code, out, err = run(file_conf, capsys, *err.split("`")[1].split()[1:])  # the hint, as given
    assert (code, err) == (0, "") and fleet.allow(name) is None and fleet.allow(name, inactive=True) is None


def test_del_vm_blocks_the_guest_in_every_source_by_default_and_says_which(
    fleet: Guests, conf: Path, capsys: pytest.CaptureFixture
) -> None:
    """An abuse desk's `del-vm NAME` must block the guest, whatever ALLOW_STORE and whatever allowed it."""
    name, i = fleet.make("running")
    uuid = testdriver.uuid(i)
    for store in ("file", "metadata"):
        assert run(conf, capsys, "add-vm", name, "--store", "file")[0] == 0
        assert run(conf, capsys, "add-vm", name, "--store", "metadata")[0] == 0
        assert fleet.allow(name) is not None and uuid in (conf.parent / "whitelist.csv").read_text()
        conf.write_text(conf.read_text().replace('ALLOW_STORE="metadata"', f'ALLOW_STORE="{store}"')
                        .replace('ALLOW_STORE="file"', f'ALLOW_STORE="{store}"'))
        code, out, err = run(conf, capsys, "del-vm", name)
        assert (code, err) == (0, ""), (store, err)
        assert out == (f"ok: removed guest '{name}' (UUID {uuid}, every NIC) from line 2\n"
                       f"ok: removed the allowance from the libvirt metadata of guest '{name}' (live and saved definition)\n")
        assert fleet.allow(name) is None and fleet.allow(name, inactive=True) is None
        assert (conf.parent / "whitelist.csv").read_text() == HEADER
    code, out, err = run(conf, capsys, "add-vm", name, "--store", "nowhere")
    assert code == 2 and "invalid choice: 'nowhere'" in err


def test_unknown_guest_and_bad_reason_change_nothing(fleet: Guests, conf: Path, capsys: pytest.CaptureFixture) -> None:
    name, _ = fleet.make("running")
    for args, message in ((["add-vm", "no-such-guest"], "guest 'no-such-guest' not found in libvirt (test:///default)"),
                          (["del-vm", "no-such-guest", "--source", "metadata"], "guest 'no-such-guest' not found in libvirt"),
                          (["add-vm", name, "two\nlines"], "bad reason 'two\\nlines'")):
        code, out, err = run(conf, capsys, *args)
        assert (code, out) == (1, "") and err.startswith("smtp-gate: error: ") and message in err and err.count("\n") == 1, err
    assert fleet.allow(name) is None and fleet.allow(name, inactive=True) is None


def test_add_mac_and_del_mac_stay_in_the_file(fleet: Guests, conf: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(conf, capsys, "add-mac", "52:54:00:ab:cd:ef", "spare")
    assert code == 0 and "ok: added MAC 52:54:00:ab:cd:ef (spare) at line 2" in out
    assert "52:54:00:ab:cd:ef" in (conf.parent / "whitelist.csv").read_text()
    assert run(conf, capsys, "del-mac", "52:54:00:ab:cd:ef")[0] == 0


def test_list_shows_both_sources_with_audit_fields_and_bad_parts(
    fleet: Guests, conf: Path, capsys: pytest.CaptureFixture
) -> None:
    good, g = fleet.make("stopped", metadata=lambda _i: f'<x:allow xmlns:x="{NS}" by="panel" at="2026-02-03T04:05:06+00:00" reason="KYC 9"/>')
    bad, b = fleet.make("running", nics=2, metadata=lambda b: (
        f'<x:allow xmlns:x="{NS}" by="ops"><x:nic mac="not-a-mac"/><x:nic mac="{testdriver.mac(b, 0)}"/></x:allow>'))
    (conf.parent / "whitelist.csv").write_text(HEADER + f"{testdriver.uuid(g)},,2026-01-01T00:00:00+00:00,alice,file\n")
    code, out, err = run(conf, capsys, "list")
    assert code == 3, err
    assert f"   2  {good} ({testdriver.uuid(g)}) (all NICs)" in out
    assert f"# libvirt metadata ({NS}): 2 guest(s)" in out
    assert f"  {good} ({testdriver.uuid(g)}, shut off) (all NICs)  2026-02-03T04:05:06+00:00  panel  KYC 9" in out
    assert f"  {bad} ({testdriver.uuid(b)}, running) {testdriver.mac(b, 0)}  ?  ops  " in out, "as status: `at ?`"
    assert out.splitlines()[-3] == "# guest (UUID, state)  NICs  at  by  reason"
    assert err == (f"smtp-gate: warning: libvirt metadata of guest '{bad}' ({testdriver.uuid(b)}): <allow><nic mac>: bad MAC "
                   "address 'not-a-mac': expected six hex bytes of two digits each, as 52:54:00:ab:cd:ef, 52-54-00-ab-cd-ef "
                   "or 5254.00ab.cdef (that part allows nothing)\n")
    code, out, _ = run(conf, capsys, "list", "--json")
    data = json.loads(out)
    assert code == 3 and data["rows"][0]["source"] == "file"
    meta = {m["guest"]: m for m in data["metadata"]}
    assert (meta[good]["source"], meta[good]["by"], meta[good]["reason"], meta[good]["macs"]) == ("metadata", "panel", "KYC 9", None)
    assert meta[bad]["allows"] == [testdriver.mac(b, 0)] and "not-a-mac" in meta[bad]["problems"][0]
    assert len(data["metadata_problems"]) == 1


def test_status_shows_each_allowance_with_its_source_and_warns_about_bad_parts(
    fleet: Guests, conf: Path
) -> None:
    both, i = fleet.make("stopped", metadata=lambda _i: f'<x:allow xmlns:x="{NS}" by="panel" at="2026-02-03T04:05:06+00:00" reason="KYC 9"/>')
    bad, b = fleet.make("running", metadata=lambda _i: f'<x:allow xmlns:x="{NS}" by="ops"><x:nic mac="ff:ff:ff:ff:ff:ff"/></x:allow>')
    (conf.parent / "whitelist.csv").write_text(HEADER + f"{testdriver.uuid(i)},,2026-01-01T00:00:00+00:00,alice,file\n")
    config = config_mod.load(str(conf))
    report = status.Report(active=True, mode="enforce", counters={"blocked4": 0, "blocked6": 0, "nonip": 0, "malformed": 0})
    status.add_guests(report, config, links={})
    shown = {g["name"]: g for g in report.guests}
    assert shown[both]["allowances"] == [
        {"source": "file", "macs": [testdriver.mac(i, 0)]},
        {"source": "metadata", "macs": [testdriver.mac(i, 0)], "by": "panel", "at": "2026-02-03T04:05:06+00:00",
         "reason": "KYC 9", "nics": None, "problems": []},
    ]
    assert shown[bad]["allowed_macs"] == [] and shown[bad]["allowances"][0]["nics"] == []
    assert [w for w in report.warnings if bad in w] == [
        f"the libvirt metadata allowance of guest '{bad}' ({testdriver.uuid(b)}): <allow><nic mac>: bad MAC address "
        "'ff:ff:ff:ff:ff:ff': that is the broadcast address, not a NIC (that part allows nothing)"
    ]
    text = status.render(report)
    assert (f"whitelisted guest {both}: shut off; ports -; allowance in kernel: -; blocked attempts: 0; allowed by: "
            "whitelist file; metadata (by panel, at 2026-02-03T04:05:06+00:00, reason 'KYC 9')") in text
    assert f"allowed by: metadata (by ops, at ?, NICs none usable, 1 bad part(s))" in text
    json.dumps(report.to_json())  # --json renders it


def test_list_and_status_warn_when_live_and_saved_allowances_differ(fleet: Guests, conf: Path, capsys: pytest.CaptureFixture) -> None:
    """A live-only allowance is lost at the next cold boot and at a `--persistent` migration's
    destination; a saved-only one is not in force now.  Both are warned about (exit 3)."""
    live_only, i = fleet.make("running")
    saved_only, j = fleet.make("running")
    same, _k = fleet.make("running", metadata=lambda _i: f'<x:allow xmlns:x="{NS}" by="panel"/>')
    fleet.conn.lookupByName(live_only).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, '<allow by="panel"/>', "smtpgate", NS,
                                                   libvirt.VIR_DOMAIN_AFFECT_LIVE)
    fleet.conn.lookupByName(saved_only).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, '<allow by="ops" reason="r"/>',
                                                    "smtpgate", NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    tail = ("a live-only allowance is lost at its next cold boot and at a `--persistent` migration's destination, a "
            "saved-only one is not in force now; ")
    expected = [
        f"guest '{live_only}' ({testdriver.uuid(i)}): its live and saved definitions carry different smtp-gate allowances "
        f"(live: by panel, at ?; saved: none): {tail}`smtp-gate add-vm {live_only} --store metadata` writes one into "
        f"both, `smtp-gate del-vm {live_only} --source metadata` removes both",
        f"guest '{saved_only}' ({testdriver.uuid(j)}): its live and saved definitions carry different smtp-gate allowances "
        f"(live: none; saved: by ops, at ?, reason 'r'): {tail}`smtp-gate add-vm {saved_only} --store metadata` writes "
        f"one into both, `smtp-gate del-vm {saved_only} --source metadata` removes both",
    ]
    code, out, err = run(conf, capsys, "list")
    assert code == 3
    assert sorted(line for line in err.splitlines() if "different" in line) == sorted(f"smtp-gate: warning: {w}" for w in expected)
    assert same not in err
    code, out, err = run(conf, capsys, "list", "--json")
    assert code == 3 and sorted(json.loads(out)["warnings"]) == sorted(expected)
    config = config_mod.load(str(conf))
    report = status.Report(active=True, mode="enforce", counters={"blocked4": 0, "blocked6": 0, "nonip": 0, "malformed": 0})
    status.add_guests(report, config, links={})
    assert sorted(w for w in report.warnings if "different" in w) == sorted(expected)
    # made equal again by the command the warning names
    assert run(conf, capsys, "add-vm", live_only, "--store", "metadata")[0] == 0
    code, out, err = run(conf, capsys, "list")
    assert live_only not in err and saved_only in err


def test_export_metadata_dry_run_then_for_real(
    fleet: Guests, conf: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUDO_USER", "carol")
    running, r = fleet.make("running")
    stopped, s = fleet.make("stopped")
    kept, k = fleet.make("transient", metadata=lambda _i: f'<x:allow xmlns:x="{NS}" by="panel"/>')
    # live only: its saved definition lacks it, so a --persistent migration or a cold boot would lose it
    half, h = fleet.make("running")
    fleet.conn.lookupByName(half).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, '<allow by="panel"/>', "smtpgate", NS,
                                              libvirt.VIR_DOMAIN_AFFECT_LIVE)
    rows = (f"{testdriver.uuid(r)},,2026-01-01T00:00:00+00:00,alice,KYC 1\n"
            f"{stopped},,yesterday,,by name\n"
            f"{testdriver.uuid(k)},,2026-01-01T00:00:00+00:00,alice,\n"
            "spare,52:54:00:ab:cd:ef,2026-01-01T00:00:00+00:00,bob,\n"
            "0badc0de-1111-4111-8111-111111111111,,2026-01-01T00:00:00+00:00,bob,gone\n"
            f"{half},,2026-01-01T00:00:00+00:00,alice,half\n")
    path = conf.parent / "whitelist.csv"
    path.write_text(HEADER + rows)
    code, out, err = run(conf, capsys, "export-metadata", "--dry-run")
    assert code == 3, err
    lines = out.splitlines()
    assert lines[0] == (f"dry run: guest '{running}' (line 2): would write <allow by='alice' at='2026-01-01T00:00:00+00:00' "
                        f"reason='KYC 1' uuid='{testdriver.uuid(r)}'/> into its live and saved definition")
    assert lines[1].startswith(f"dry run: guest '{stopped}' (line 3): would write <allow by='carol' at='")
    assert lines[1].endswith(f"' reason='by name' uuid='{testdriver.uuid(s)}'/> into its saved definition: the guest is shut off")
    kept_text = "kept (`--replace` writes the row's allowance over it)"
    assert lines[2] == (f"dry run: guest '{kept}' (line 4): already allowed by its metadata (by panel, at ?; "
                        f"live definition only: a transient guest): {kept_text}")
    assert lines[3] == (f"dry run: guest '{half}' (line 7): already allowed by its metadata (live definition: by panel, "
                        f"at ?; saved definition: none): {kept_text}")
    assert len(lines) == 4
    assert err.splitlines() == [
        "smtp-gate: warning: line 5: MAC 52:54:00:ab:cd:ef (spare) is not exported: a MAC row names no guest (it stays in "
        "the file; `smtp-gate add-vm NAME --store metadata` the guest, or set <nic mac> in its metadata, to make it "
        "follow the guest)",
        "smtp-gate: warning: line 6: guest '0badc0de-1111-4111-8111-111111111111' (every NIC) is not exported: libvirt "
        "does not know it (test:///default)",
        f"smtp-gate: note: the whitelist file {path} was not changed: nothing was written (dry run); once `smtp-gate list` "
        "shows each guest's metadata allowance, remove its file rows with `smtp-gate del-vm NAME --source file` "
        "or by editing the file",
    ]
    assert fleet.allow(running) is None and fleet.allow(stopped, inactive=True) is None, "a dry run writes nothing"

    code, out, err = run(conf, capsys, "export-metadata")
    assert code == 3, err
    assert out.splitlines()[:2] == [
        f"ok: guest '{running}' (line 2): wrote its allowance into its live and saved definition",
        f"ok: guest '{stopped}' (line 3): wrote its allowance into its saved definition: the guest is shut off",
    ]
    assert "each guest written is now allowed by both" in err
    assert out.splitlines()[3] == f"ok: guest '{half}' (line 7): already allowed by its metadata (live definition: by panel, " \
        f"at ?; saved definition: none): {kept_text}"
    assert fleet.allow(half, inactive=True) is None, "a panel's allowance is left as it is"
    for name, inactive in ((running, False), (running, True), (stopped, True)):
        assert fleet.allow(name, inactive) is not None, (name, inactive)
    allow = fleet.allow(running)
    assert (allow.by, allow.at, allow.reason) == ("alice", "2026-01-01T00:00:00+00:00", "KYC 1")  # type: ignore[union-attr]
    assert allow.uuid == testdriver.uuid(r) and not allow.problems, "bound to the guest: a clone's copy allows nothing"  # type: ignore[union-attr]
    stopped_allow = fleet.allow(stopped, inactive=True)
    assert stopped_allow.by == "carol" and datetime.fromisoformat(stopped_allow.at)  # type: ignore[union-attr]
    assert path.read_text() == HEADER + rows, "export never changes the file"
    code, out, _ = run(conf, capsys, "export-metadata")
    assert code == 3 and out.count("already allowed by its metadata") == 4, "a second run keeps what is there"
    code, out, _ = run(conf, capsys, "export-metadata", "--replace")
    assert code == 3 and out.splitlines()[3] == (
        f"ok: guest '{half}' (line 7): wrote its allowance into its live and saved definition, replacing (by panel, at ?)")
    assert fleet.allow(half, inactive=True).reason == "half"  # type: ignore[union-attr]


def test_export_metadata_keeps_a_panels_narrower_allowance(fleet: Guests, conf: Path, capsys: pytest.CaptureFixture) -> None:
    name, i = fleet.make("running", nics=2, metadata=lambda i: (
        f'<sg:allow xmlns:sg="{NS}" by="panel"><sg:nic mac="{testdriver.mac(i, 1)}"/></sg:allow>'))
    (conf.parent / "whitelist.csv").write_text(HEADER + f"{testdriver.uuid(i)},,2026-01-01T00:00:00+00:00,alice,row\n")
    code, out, err = run(conf, capsys, "export-metadata")
    assert code == 0, err
    assert out == (f"ok: guest '{name}' (line 2): already allowed by its metadata (by panel, at ?, NICs "
                   f"{testdriver.mac(i, 1)}; live and saved definition): kept (`--replace` writes the row's allowance over it)\n")
    assert "no guest's metadata was written" in err
    assert fleet.allow(name).macs == (testdriver.mac(i, 1),), "the panel's narrower allowance is left as it is"  # type: ignore[union-attr]


def test_export_metadata_with_nothing_to_export(fleet: Guests, conf: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(conf, capsys, "export-metadata")
    assert (code, out, err) == (0, "ok: no row of the whitelist file names a guest libvirt knows: nothing to export\n", "")
    (conf.parent / "whitelist.csv").unlink()
    code, out, err = run(conf, capsys, "export-metadata")
    assert (code, out, err) == (0, "ok: no row of the whitelist file names a guest libvirt knows: nothing to export\n", ""), \
        "no false note about a file that does not exist"


def test_the_picker_toggles_allowed_and_blocked_whatever_allows_the_guest(fleet: Guests, conf: Path) -> None:
    """A toggle means "allowed <-> blocked": an allowed guest is revoked from every source that
    allows it (its file rows, its MAC rows, its metadata), in either ALLOW_STORE; a blocked
    one is allowed in ALLOW_STORE."""
    name, i = fleet.make("running")
    uuid, mac = testdriver.uuid(i), testdriver.mac(i, 0)
    wl = conf.parent / "whitelist.csv"
    file_conf = conf.parent / "file.conf"
    file_conf.write_text(conf.read_text().replace('ALLOW_STORE="metadata"', 'ALLOW_STORE="file"'))

    def row(config: config_mod.Config) -> manage.Row:
        return next(r for r in manage.picker_rows(config) if r.domain.name == name)

    for conf_path in (file_conf, conf):
        config = config_mod.load(str(conf_path))
        # file + MAC row + metadata: one toggle revokes all three
        wl.write_text(HEADER + f"{uuid},,2026-01-01T00:00:00+00:00,alice,\nlabel,{mac},2026-01-01T00:00:00+00:00,bob,\n")
        fleet.conn.lookupByName(name).setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, '<allow by="panel"/>', "smtpgate", NS,
            libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        assert row(config).allowed_by == "file+metadata"
        assert f"  {name:<24} running   file+metadata " in manage.render_rows([row(config)])
        change = manage.toggle(config, row(config), "dave", manage.now())
        assert change.lines == [
            f"removed guest '{name}' (UUID {uuid}, every NIC) from line 2",
            f"removed MAC {mac} (label) from line 2",
            f"removed the allowance from the libvirt metadata of guest '{name}' (live and saved definition)",
        ], conf_path
        assert change.still_allowed == () and wl.read_text() == HEADER
        assert fleet.allow(name) is None and fleet.allow(name, inactive=True) is None
        assert row(config).allowed_by == "no"
        # metadata alone: revoked, also in file mode (it used to add a file row)
        fleet.conn.lookupByName(name).setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, '<allow by="panel"/>', "smtpgate", NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        assert row(config).allowed_by == "metadata"
        manage.toggle(config, row(config), "dave", manage.now())
        assert fleet.allow(name) is None and wl.read_text() == HEADER and row(config).allowed_by == "no"
        # blocked: allowed in ALLOW_STORE
        change = manage.toggle(config, row(config), "dave", manage.now())
        assert row(config).allowed_by == config.allow_store, conf_path
        manage.toggle(config, row(config), "dave", manage.now())
        assert row(config).allowed_by == "no"


@pytest.mark.parametrize("value", ["files", "libvirt", ""])
def test_a_bad_allow_store_is_refused_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture, value: str) -> None:
    conf = tmp_path / "smtp-gate.conf"
    conf.write_text(f'# fleets\nALLOW_STORE="{value}"\n')
    code, out, err = run(conf, capsys, "list")
    assert (code, out) == (1, "")
    assert err == (f"smtp-gate: error: {conf}:2: ALLOW_STORE: bad value {value!r}: expected one of file, metadata\n")
    assert config_mod.parse('ALLOW_STORE="Metadata"\n', "x").allow_store == "metadata"
    assert config_mod.parse("", "x").allow_store == "file"


def test_when_the_change_cannot_be_applied_the_metadata_is_put_back_verbatim(
    fleet: Guests, conf: Path, capsys: pytest.CaptureFixture
) -> None:
    """The metadata is written first (libvirt is never asked under our lock); if what follows
    fails (here: the whitelist is a directory, read under the lock), the element each
    definition held is written back as it was, bad parts included, and exit 1 is true."""
    old = lambda i: f'<sg:allow xmlns:sg="{NS}" by="panel"><sg:nic mac="{testdriver.mac(i, 0)}"/><sg:nic mac="bad"/></sg:allow>'
    name, _ = fleet.make("running", metadata=old)
    before = {inactive: fleet.allow(name, inactive) for inactive in (False, True)}
    assert before[False] is not None and len(before[False].problems) == 1
    (conf.parent / "whitelist.csv").unlink()
    (conf.parent / "whitelist.csv").mkdir()
    for args in (["add-vm", name, "new"], ["del-vm", name]):
        code, out, err = run(conf, capsys, *args)
        assert (code, out) == (1, ""), (args, out, err)
        assert err.startswith("smtp-gate: error: ") and err.count("\n") == 1, err
        assert "is a directory" in err and err.endswith(f"; the metadata of guest '{name}' was put back as it was\n"), err
        assert {inactive: fleet.allow(name, inactive) for inactive in (False, True)} == before, args


def test_a_clone_of_an_allowed_guest_is_not_allowed_and_list_and_status_say_why(
    fleet: Guests, conf: Path, capsys: pytest.CaptureFixture
) -> None:
    """virt-clone and dumpxml/define templates copy <metadata> whole: add-vm binds the
    allowance to the guest's UUID, so the copy allows nothing (attacker review of issue 11)."""
    original, o = fleet.make("stopped")
    code, _out, err = run(conf, capsys, "add-vm", original, "KYC 7")
    assert code == 0, err
    assert fleet.allow(original, inactive=True).uuid == testdriver.uuid(o)  # type: ignore[union-attr]
    # what virt-clone does: the same definition under a new name, UUID and MAC
    c = next(_numbers)
    clone = f"fleet-clone-{c}"
    text = fleet.conn.lookupByName(original).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    text = text.replace(f"<name>{original}</name>", f"<name>{clone}</name>").replace(
        f"<uuid>{testdriver.uuid(o)}</uuid>", f"<uuid>{testdriver.uuid(c)}</uuid>").replace(testdriver.mac(o, 0), testdriver.mac(c, 0))
    fleet.made.append(clone)
    fleet.conn.defineXML(text).create()
    copied = fleet.allow(clone)
    assert copied is not None and copied.allows([testdriver.mac(c, 0)]) == ()
    code, out, err = run(conf, capsys, "list")
    assert code == 3
    why = (f"<allow> belongs to guest {testdriver.uuid(o)}, not to this one ({testdriver.uuid(c)}): a clone or a copied "
           "definition? remove it, or set it anew for this guest")
    assert f"smtp-gate: warning: libvirt metadata of guest '{clone}' ({testdriver.uuid(c)}): {why}" in err
    assert f"libvirt metadata of guest '{original}'" not in err
    config = config_mod.load(str(conf))
    report = status.Report(active=True, mode="enforce", counters={"blocked4": 0, "blocked6": 0, "nonip": 0, "malformed": 0})
    status.add_guests(report, config, links={})
    shown = {g["name"]: g for g in report.guests}
    assert shown[clone]["allowed_macs"] == [] and shown[clone]["allowances"][0]["problems"] == [why]
    assert shown[original]["allowed_macs"] == [testdriver.mac(o, 0)]
    assert any(clone in w and why in w for w in report.warnings)


def test_del_vm_names_the_snapshots_that_would_bring_the_allowance_back(
    fleet: Guests, conf: Path, capsys: pytest.CaptureFixture
) -> None:
    """libvirt restores a snapshot's metadata on revert: del-vm cannot claim a clean revocation
    while a snapshot carries the allowance (attacker review of issue 11)."""
    name, i = fleet.make("running")
    dom = fleet.conn.lookupByName(name)
    dom.snapshotCreateXML("<domainsnapshot><name>clean</name></domainsnapshot>", 0)
    code, _out, err = run(conf, capsys, "add-vm", name, "KYC 8")
    assert code == 0, err
    dom.snapshotCreateXML("<domainsnapshot><name>before-abuse</name></domainsnapshot>", 0)
    code, out, err = run(conf, capsys, "del-vm", name)
    assert code == 3, err
    # del-vm's default source is "all": the file's line ("nothing to remove") comes first
    assert f"ok: removed the allowance from the libvirt metadata of guest '{name}' (live and saved definition)" in out.splitlines()
    assert err == (
        f"smtp-gate: note: snapshot 'before-abuse' of guest '{name}' still carries an allowance in its saved definition: "
        f"reverting to it (`virsh snapshot-revert`) brings the allowance back; delete the snapshot (`virsh snapshot-delete "
        f"{name} before-abuse`) or redefine it without the allowance (`virsh snapshot-dumpxml`, edit, `virsh "
        "snapshot-create --redefine`)\n"
    )
    assert fleet.allow(name) is None
    dom.revertToSnapshot(dom.snapshotLookupByName("before-abuse"), 0)
    assert fleet.allow(name) is not None, "what the note warns of: the revert brings it back"
    # once the snapshot is gone, del-vm says the plain truth again
    dom.snapshotLookupByName("before-abuse").delete(0)
    code, out, err = run(conf, capsys, "del-vm", name)
    assert (code, err) == (0, ""), err
    code, out, err = run(conf, capsys, "del-vm", name)
    assert (code, err) == (0, "") and "nothing to remove" in out
    for snapshot in dom.listAllSnapshots(0):
        snapshot.delete(0)


def test_a_managed_save_image_that_cannot_be_rewritten_is_refused_and_nothing_is_written(
    fleet: Guests, conf: Path, capsys: pytest.CaptureFixture
) -> None:
    """`virsh start` resumes a managed-saved guest from its image's definition: a libvirt that
    cannot rewrite it (the test driver has no virDomainManagedSaveDefineXML) gets a refusal,
    not a "removed" that the resumed guest would belie (tests/test_managedsave.py rewrites
    it on a real libvirtd)."""
    name, _i = fleet.make("running", metadata=lambda _i: f'<x:allow xmlns:x="{NS}" by="panel" reason="KYC"/>')
    dom = fleet.conn.lookupByName(name)
    dom.managedSave(0)
    assert dom.hasManagedSaveImage(0) and not dom.isActive()
    for args in (("del-vm", name), ("add-vm", name, "again")):
        code, out, err = run(conf, capsys, *args)
        assert (code, out) == (1, ""), (args, out, err)
        assert err.startswith(
            f"smtp-gate: error: guest '{name}' has a managed save image (`virsh managedsave`) whose definition cannot be "
            "read or rewritten here (this function is not supported by the connection driver: "
            "virDomainManagedSaveGetXMLDesc): `virsh start` would resume it with the allowance it saved; nothing was "
            "written (start the guest and run the command again, or discard the image with `virsh managedsave-remove`)"), err
        assert err.count("\n") == 1, err
        assert fleet.allow(name, inactive=True).reason == "KYC", "nothing written"  # type: ignore[union-attr]
    dom.managedSaveRemove(0)
    code, out, err = run(conf, capsys, "del-vm", name)
    assert code == 0 and "(saved definition: the guest is shut off)" in out, err
