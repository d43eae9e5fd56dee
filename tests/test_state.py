"""State that cannot go stale, and one derivation of what a guest is allowed.

- which records a rebuild keeps when a listing cannot vouch for a guest, and for how long
  (keep_unverified, pure);
- a kept record never exempts a device that merely reuses a name (kernel, real frames);
- a rebuild against a libvirtd that accepts and never answers gives up at the deadline,
  keeps the kernel's allowances and frees rebuild.lock (kernel, the real CLI);
- hooks, rebuilds, status and the picker agree on a table of whitelist rows and NIC shapes.
"""

import fcntl
import json
import os
import sys
import time
import uuid as uuid_mod
from pathlib import Path
from typing import Dict, Set, Tuple

import pytest

from smtp_gate import hypervisor, rebuild
from smtp_gate.domain import Allow
from smtp_gate.runstate import Record, RunState
from tests import testdriver
from tests.netlab import BridgeLab
from tests.silent import SilentDaemon

HEADER = "# vmname,mac,added_at,added_by,reason\n"
QEMU = "qemu:///system"
A = Record("aaaaaaaa-0000-4000-8000-000000000001", "a", (("vnet0", 7),), (), ((7, "52:54:00:00:00:01"),), uri=QEMU)


def _listing(unreachable=(), unread=(), absent=()) -> hypervisor.Listing:
    return hypervisor.Listing([], ["test:///x"], {u: "down" for u in unreachable}, [], {u: "-" for u in absent}, {u: hypervisor.Unread(u, "a", QEMU, "too big", allow=Allow()) for u in unread})


# --- keep_unverified ---------------------------------------------------------------------


def test_only_records_no_answer_could_check_are_kept() -> None:
    keep = lambda listing, record=A: rebuild.keep_unverified({record.uuid: record}, set(), listing, {7}, 100.0)[0]  # noqa: E731
    assert keep(_listing(unreachable=[QEMU])) == [A._replace(unverified_since=100.0)]
    assert keep(_listing(unread=[A.uuid])) == [A._replace(unverified_since=100.0)], "XMLDesc failed: kept"
    assert keep(_listing()) == [], "its URI answered without it: the guest is not running"
    assert keep(_listing(absent=[QEMU])) == [], "its driver is absent here: no guests"
    assert keep(_listing(unreachable=["lxc:///system"])) == [], "another URI's silence vouches for nothing"
    older = A._replace(uri="")
    assert keep(_listing(unreachable=["lxc:///system"]), older) == [older._replace(unverified_since=100.0)]
    assert keep(_listing(), older) == []
    listed = rebuild.keep_unverified({A.uuid: A}, {A.uuid}, _listing(unreachable=[QEMU]), {7}, 100.0)
    assert listed == ([], []), "a listed guest gets a fresh record, not a kept one"


def test_an_unread_guest_keeps_its_ports_and_only_the_allowance_a_source_still_grants() -> None:
    """XMLDesc failed (a description too big for libvirt's RPC), but its metadata was read
    alone: the record keeps its ports, and only the (index, MAC) pairs the whitelist file or
    that metadata still grants (attacker review of issue 11: a revocation was ignored for an hour)."""
    mac = "52:54:00:00:00:01"
    two = A._replace(guest_ports=(("vnet0", 7), ("vnet1", 8)), allowed=((7, mac), (8, "52:54:00:00:00:02")))

    def keep(unread: hypervisor.Unread, record: Record = A, matcher=None):  # type: ignore[no-untyped-def]
        listing = hypervisor.Listing([], [QEMU], {}, [], {}, {unread.uuid: unread})
        return rebuild.keep_unverified({record.uuid: record}, set(), listing, {7, 8}, 100.0, matcher=matcher)

    big = hypervisor.Unread(A.uuid, "a", QEMU, "Unable to encode message payload")
    kept, notes = keep(big)  # the panel removed the allowance: the metadata carries none
    assert kept == [A._replace(allowed=(), unverified_since=100.0)], "ports kept, allowance gone"
    assert len(notes) == 1 and notes[0].startswith(f"guest 'a' ({A.uuid}) on {QEMU}: its XML could not be read "
                                                   "(Unable to encode message payload); its smtp-gate metadata (read alone) "
                                                   f"carries no allowance; allowance revoked on vnet0/{mac}"), notes
    kept, notes = keep(big._replace(allow=Allow(by="panel")))
    assert kept == [A._replace(unverified_since=100.0)] and f"still allowed on vnet0/{mac}" in notes[0]
    kept, notes = keep(big._replace(allow=Allow(macs=("52:54:00:00:00:02",))), two)
    assert kept[0].allowed == ((8, "52:54:00:00:00:02"),), "its <nic mac> list narrows it"
    assert f"allowance revoked on vnet0/{mac}" in notes[0] and "still allowed on vnet1/52:54:00:00:00:02" in notes[0]
    failed = big._replace(allow=Allow(), allow_error="internal error: boom")
    kept, notes = keep(failed)
    assert kept[0].allowed == () and "could not be read either (internal error: boom)" in notes[0], "fail closed"
    by_file = lambda guest: (mac,) if guest.uuid == A.uuid and mac in guest.macs else ()  # noqa: E731
    kept, _ = keep(failed, two, by_file)
    assert kept[0].allowed == ((7, mac),), "the whitelist file still vouches for its row, and only for it"
    kept, notes = keep(big._replace(uuid="bbbbbbbb-0000-4000-8000-000000000002"))
    assert kept == [] and "no record of it here: its NICs stay blocked" in notes[-1]


def test_a_kept_record_ends_with_its_ports_or_after_the_bound() -> None:
    listing = _listing(unreachable=[QEMU])
    assert rebuild.keep_unverified({A.uuid: A}, set(), listing, {8}, 100.0) == ([], []), "port gone: dropped at once"
    old = A._replace(unverified_since=100.0)
    assert rebuild.keep_unverified({A.uuid: old}, set(), listing, {7}, 100.0 + rebuild.KEEP_UNVERIFIED)[0] == [old]
    kept, notes = rebuild.keep_unverified({A.uuid: old}, set(), listing, {7}, 101.0 + rebuild.KEEP_UNVERIFIED)
    assert kept == [] and "dropped: unverified for 3601s (libvirt qemu:///system did not answer)" in notes[0]
    two = A._replace(guest_ports=(("vnet0", 7), ("vnet1", 9)), allowed=((7, "52:54:00:00:00:01"), (9, "52:54:00:00:00:02")))
    kept, _ = rebuild.keep_unverified({A.uuid: two}, set(), listing, {9}, 5.0)
    assert kept[0].guest_ports == (("vnet1", 9),) and kept[0].allowed == ((9, "52:54:00:00:00:02"),)


def test_records_of_an_older_version_are_read_without_uri(tmp_path: Path) -> None:
    state = RunState(tmp_path)
    state.claim()  # this boot's directory, as a writer leaves it
    Path(state._record_path(A.uuid)).write_text(
        json.dumps({"uuid": A.uuid, "name": "a", "guest_ports": [["vnet0", 7]], "allowed": [[7, "52:54:00:00:00:01"]]})
    )
    assert state.read_record(A.uuid) == A._replace(uri="")
    state.write_record(A._replace(unverified_since=12.5))
    assert state.read_record(A.uuid) == A._replace(unverified_since=12.5)


# --- in the kernel -----------------------------------------------------------------------


def _allowed(lab: BridgeLab) -> Set[Tuple[str, str]]:
    listing = json.loads(lab.nft("-j", "list", "set", "bridge", "smtp_gate", "allowed").stdout)
    elems = [item["set"].get("elem", []) for item in listing["nftables"] if "set" in item][0]
    return {(str(e["concat"][0]), str(e["concat"][1])) for e in elems}


def _guest_ports(lab: BridgeLab) -> Set[str]:
    listing = json.loads(lab.nft("-j", "list", "set", "bridge", "smtp_gate", "guest_ifaces").stdout)
    return {str(e) for item in listing["nftables"] if "set" in item for e in item["set"].get("elem", [])}


@pytest.mark.kernel
def test_a_kept_record_never_exempts_a_device_that_reuses_the_name(bare_lab: BridgeLab) -> None:
    """libvirt's qemu URI does not answer, the test URI does (without the guest): the hook's
    record of g1 is kept.  Then vnet0 is deleted and re-created under the same name, for
    the same guest namespace and MAC: nothing exempts it, before and after the next rebuild."""
    lab = bare_lab
    g1 = lab.add_guest("g1", "vnet0", 2)
    empty = testdriver.write_node(lab.tmp, running=0)
    silent_qemu = f"qemu:///system?socket={lab.tmp}/no-libvirtd-here"
    lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="{empty} {silent_qemu}"\n')
    (lab.tmp / "whitelist.csv").write_text(HEADER + "g1,,2026-01-01T00:00:00+00:00,root,ok\n")
    lab.smtp_gate("apply")
    lab.start_guest(g1)
    assert lab.tcp_connects(g1, lab.INET4, 25)
    records = lab.tmp / "run" / "records"
    (path,) = records.glob("*.json")
    assert json.loads(path.read_text())["uri"] == silent_qemu

    r = lab.smtp_gate("rebuild")
    assert f"libvirt {silent_qemu} did not answer" in r.stderr
    assert json.loads(path.read_text())["unverified_since"] is not None, "kept, and it says since when"
    assert lab.tcp_connects(g1, lab.INET4, 25), "the guest of the silent URI keeps its allowance"

    old_index = lab.hv.ifindex("vnet0")
    lab.hv.ip("link", "del", "vnet0")
    lab.connect(g1.ns, "eth0", "vnet0", ip4=f"{g1.ip4}/24", mac=g1.mac)
    assert lab.hv.ifindex("vnet0") != old_index
    assert not lab.tcp_connects(g1, lab.INET4, 25, timeout=0.5), "the new vnet0 inherited the kept allowance"
    lab.smtp_gate("rebuild")
    assert not path.exists(), "a kept record whose ports are gone is dropped at once"
    assert _allowed(lab) == set() and "vnet0" not in _guest_ports(lab)
    assert not lab.tcp_connects(g1, lab.INET4, 25, timeout=0.5)


@pytest.mark.kernel
def test_a_rebuild_against_a_libvirtd_that_never_answers_gives_up_and_keeps(bare_lab: BridgeLab) -> None:
    lab = bare_lab
    g1 = lab.add_guest("g1", "vnet0", 2)
    silent = SilentDaemon(lab.tmp / "libvirt-sock")
    try:
        lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="{silent.uri}"\nLIBVIRT_TIMEOUT="1"\n')
        (lab.tmp / "whitelist.csv").write_text(HEADER + "g1,,2026-01-01T00:00:00+00:00,root,ok\n")
        lab.smtp_gate("apply")
        lab.start_guest(g1)
        before = _allowed(lab)
        assert before == {("vnet0", g1.mac)}
        started = time.monotonic()
        r = lab.smtp_gate("rebuild", check=False)
        elapsed = time.monotonic() - started
        assert silent.accepted, "the rebuild really connected to the silent daemon"
        assert r.returncode == 0, r.stderr
        assert "no hypervisor answered" in r.stderr and "no answer within 1s" in r.stderr, r.stderr
        assert elapsed < 1 + 10, f"rebuild took {elapsed:.1f}s"  # the deadline plus a give-up margin
        assert _allowed(lab) == before and lab.tcp_connects(g1, lab.INET4, 25)
        fd = os.open(lab.tmp / "run" / "rebuild.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the rebuild left it held
        finally:
            os.close(fd)
    finally:
        silent.close()


# --- one derivation: every caller agrees -------------------------------------------------

# (guest index, whitelist row, NICs as (kind, bridge, target), which NICs are allowed)
TABLE = (
    (0, "name", (("bridge", "br0", "tap0n0"),), {0}),
    (1, "uuid", (("bridge", "br0", "tap1n0"),), {0}),
    (2, "mac", (("bridge", "br0", "tap2n0"), ("bridge", "br0", "tap2n1")), {0}),
    (3, "name", (("bridge", "virbr9", "tap3n0"),), set()),  # a bridge we do not protect
    (4, "name", (("bridge", "br0", ""),), set()),  # no target
    (5, "name", (("hostdev", "", "tap5n0"),), set()),  # SR-IOV: a bridge rule cannot see it
)


def _table_xml(i: int, nics) -> str:  # type: ignore[no-untyped-def]
    parts = []
    for k, (kind, bridge, target) in enumerate(nics):
        body = f"<source bridge='{bridge}'/>" if kind == "bridge" else (
            "<source><address type='pci' domain='0x0000' bus='0x03' slot='0x10' function='0x1'/></source>")
        parts.append(f"<interface type='{kind}'><mac address='{testdriver.mac(i, k)}'/>{body}"
                     + (f"<target dev='{target}'/>" if target else "") + "</interface>")
    return testdriver._domain(testdriver.name(i), testdriver.uuid(i), "".join(parts), True)


def _table_whitelist() -> str:
    rows = {"name": lambda i: f"{testdriver.name(i)},", "uuid": lambda i: f"{testdriver.uuid(i)},",
            "mac": lambda i: f"label,{testdriver.mac(i, 0)}"}
    return HEADER + "".join(f"{rows[row](i)},2026-01-01T00:00:00+00:00,root,t\n" for i, row, _n, _a in TABLE)


@pytest.mark.kernel
def test_hooks_rebuilds_status_and_the_picker_agree_on_what_a_guest_is_allowed(bare_lab: BridgeLab) -> None:
    lab = bare_lab
    lab.hv.ip("link", "add", "virbr9", "type", "bridge")
    for i, _row, nics, _ok in TABLE:
        for k, (_kind, bridge, target) in enumerate(nics):
            if target:
                lab.hv.ip("tuntap", "add", "name", target, "mode", "tap")
                lab.hv.ip("link", "set", target, "address", testdriver.mac(i, k))
                if _kind == "bridge":
                    lab.hv.ip("link", "set", target, "master", bridge)
    node = lab.tmp / "node.xml"
    node.write_text("<node>\n" + "".join(_table_xml(i, nics) for i, _r, nics, _a in TABLE) + "</node>\n")
    lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="test://{node}"\n')
    (lab.tmp / "whitelist.csv").write_text(_table_whitelist())
    expected = {(nics[k][2], testdriver.mac(i, k)) for i, _r, nics, allowed in TABLE for k in allowed}
    applied = lab.smtp_gate("apply", check=False)
    assert applied.returncode == 3 and applied.stderr.count("UNPROTECTED: ") == 2, applied.stderr  # virbr9, hostdev
    records = lab.tmp / "run" / "records"

    def recorded() -> Dict[str, Set[Tuple[str, str]]]:
        names = {lab.hv.ifindex(t): t for _i, _r, nics, _a in TABLE for _k, _b, t in nics if t}
        out: Dict[str, Set[Tuple[str, str]]] = {}
        for path in records.glob("*.json"):
            data = json.loads(path.read_text())
            out[data["name"]] = {(names[index], mac) for index, mac in data["allowed"]}
        return out

    by_rebuild = recorded()  # apply asked the test driver
    assert set().union(*by_rebuild.values()) == expected and _allowed(lab) == expected
    for path in records.glob("*.json"):
        path.unlink()
    lab.nft("flush", "set", "bridge", "smtp_gate", "allowed")
    for i, _row, nics, _ok in TABLE:
        r = lab.run_hook("start", "begin", _table_xml(i, nics).replace("type='test'", "type='kvm'").encode(),
                         name=testdriver.name(i))
        assert (r.returncode, r.stdout) == (0, b"") and b"failed" not in r.stderr, r.stderr
    assert recorded() == by_rebuild, "the hook (fast whitelist path) and the rebuild disagree"
    assert _allowed(lab) == expected

    status = json.loads(lab.smtp_gate("status", "--json", check=False).stdout)
    shown = {g["name"]: g for g in status["guests"]}
    assert set(shown) == {testdriver.name(i) for i, *_ in TABLE}, "every row's guest is whitelisted"
    # what status says it holds, truthfully: "yes" only where a NIC on a protected bridge is allowed
    held = {0: "yes", 1: "yes", 2: "yes", 3: "no NIC on a protected bridge", 4: "no allowed NIC on a protected bridge",
            5: "no NIC on a protected bridge"}
    for i, _row, nics, allowed in TABLE:
        ports = ", ".join(nics[k][2] for k in sorted(allowed)) or "-"
        assert (shown[testdriver.name(i)]["ports"], shown[testdriver.name(i)]["held"]) == (ports, held[i]), shown
    assert not [w for w in status["warnings"] if "does not hold" in w]

    picker = lab.hv.exec([sys.executable, "-c", (
        "from smtp_gate import config, manage\n"
        f"rows = manage.picker_rows(config.load({str(lab.config_path)!r}))\n"
        "print(sorted(r.domain.name for r in rows if r.whitelisted))\n")],
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    assert picker.stdout.strip() == str(sorted(testdriver.name(i) for i, *_ in TABLE))
