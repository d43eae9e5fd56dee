"""The run directory's per-guest records and journal (smtp_gate.runstate), on a temporary directory."""

import os
from pathlib import Path

import pytest

from smtp_gate.domain import Domain, Nic
from smtp_gate.runstate import Record, RunState, domain_event, replay
from tests.netlab import BridgeLab

OTHER_BOOT = "0badb007-0000-4000-8000-000000000000"


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()

A = Record("aaaaaaaa-0000-4000-8000-000000000001", "a", (("vnet0", 7),), (), ((7, "52:54:00:00:00:01"),))
B = Record("bbbbbbbb-0000-4000-8000-000000000002", "b", (("vnet1", 8),))
C = Record("cccccccc-0000-4000-8000-000000000003", "c", (("vnet2", 9),), (("vnet5", 12),))


def test_a_record_of_an_older_version_keeps_no_bare_name(tmp_path: Path) -> None:
    """Ports written by name alone (before interface indexes) are not read back as ports."""
    state = RunState(tmp_path)
    state.claim()  # this boot's directory, as a writer leaves it
    Path(state._record_path(A.uuid)).write_text(
        '{"uuid": "%s", "name": "a", "guest_ports": ["vnet0"], "foreign_ports": ["vnet5"], "allowed": [[7, "52:54:00:00:00:01"]]}' % A.uuid
    )
    record = state.read_record(A.uuid)
    assert record == Record(A.uuid, "a", (), (), ((7, "52:54:00:00:00:01"),))
    assert record.elements() == [("allowed", (7, "52:54:00:00:00:01"))]
    assert C.elements() == [("guest_ifaces", 9), ("foreign_ifaces", 12)]


def test_replace_records_keeps_exactly_one_record_per_guest_and_rewrites_only_what_changed(tmp_path: Path) -> None:
    state = RunState(tmp_path)
    for record in (A, B, C):
        state.write_record(record)
    untouched = os.stat(state._record_path(A.uuid)).st_ino
    (Path(state.records) / f"{C.uuid}.json").write_text("{damaged")  # a damaged record of a guest still running
    changed_b = B._replace(allowed=((9, "52:54:00:00:00:02"),))

    state.replace_records([A, changed_b, C])

    assert state.all_records() == {A.uuid: A, B.uuid: changed_b, C.uuid: C}
    assert os.stat(state._record_path(A.uuid)).st_ino == untouched  # equal text: not rewritten

    state.replace_records([B])
    assert state.all_records() == {B.uuid: B}
    assert sorted(os.listdir(state.records)) == [f"{B.uuid}.json"]


def test_replay_amends_a_snapshot_with_what_hooks_saw_after_it(tmp_path: Path) -> None:
    state = RunState(tmp_path)
    nic = Nic(type="bridge", mac="52:54:00:00:00:09", bridge="br0", network=None, target="vnet9", virtualport=None)
    stays = Domain("stays", A.uuid, "kvm", ())
    stopped = Domain("stopped", B.uuid, "kvm", ())
    started = Domain("started", C.uuid, "kvm", (nic,))
    state.append(domain_event("start", stopped))  # before the snapshot's offset: not replayed
    offset = state.journal_end()
    state.append(domain_event("stop", stopped))
    state.append(domain_event("start", started))
    amended = replay({stays.uuid: stays, stopped.uuid: stopped}, state.events_since(offset))
    assert amended == {stays.uuid: stays, started.uuid: started}
    state.truncate_journal()
    assert list(state.events_since(0)) == []


def test_records_and_journal_of_another_boot_are_ignored_and_the_next_writer_wipes_them(tmp_path: Path) -> None:
    """Interface indexes start again at every boot: a record of another boot may name the index
    of a new, unrelated device.  A RUN_DIR that is not a tmpfs keeps them across a reboot."""
    assert boot_id() != OTHER_BOOT
    state = RunState(tmp_path)
    state.write_record(A)
    state.append(domain_event("start", Domain("a", A.uuid, "kvm", ())))
    assert (tmp_path / "boot_id").read_text() == f"{boot_id()}\n"
    assert RunState(tmp_path).all_records() == {A.uuid: A}, "this boot's records are read"

    (tmp_path / "boot_id").write_text(f"{OTHER_BOOT}\n")  # the machine rebooted, RUN_DIR survived
    after = RunState(tmp_path)
    assert after.read_record(A.uuid) is None and after.all_records() == {}
    assert after.journal_end() == 0 and list(after.events_since(0)) == []
    after.write_record(B)
    assert sorted(os.listdir(state.records)) == [f"{B.uuid}.json"] and not Path(state.journal).exists()
    assert (tmp_path / "boot_id").read_text() == f"{boot_id()}\n"
    assert RunState(tmp_path).all_records() == {B.uuid: B}

    os.unlink(tmp_path / "boot_id")  # no stamp at all (an older version's directory): not this boot's either
    assert RunState(tmp_path).all_records() == {}


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    state = RunState(tmp_path)
    state.write_record(A)
    os.mkdir(state._record_path(B.uuid))  # the rename onto a directory fails, after the write
    with pytest.raises(OSError):
        state.write_record(B)
    assert sorted(os.listdir(state.records)) == sorted([f"{A.uuid}.json", f"{B.uuid}.json"])


@pytest.mark.kernel
def test_after_a_reboot_a_reused_interface_index_inherits_no_allowance(tmp_path: Path, kernel_skip_reason: str) -> None:
    """Boot 1: the whitelisted guest A runs on vnet1 and the machine goes down with it (no stop
    hook).  Boot 2, same RUN_DIR: B, not whitelisted, gets vnet1 with A's old index.  The
    boot service (`apply --no-libvirt --if-enabled`) installs no allowance from boot 1's
    records, so B sending with A's MAC stays blocked."""
    if kernel_skip_reason:
        pytest.skip(kernel_skip_reason)
    mac_a = "52:54:00:77:00:0a"
    (tmp_path / "whitelist.csv").write_text(f"# vmname,mac,added_at,added_by,reason\na,{mac_a},2026-01-01T00:00:00+00:00,r,ok\n")
    lab = BridgeLab(tmp_path)
    try:
        lab.listen(lab.inet, [25])
        a = lab.add_guest("a", "vnet1", 10, mac=mac_a)
        lab.start_guest(a)
        assert lab.tcp_connects(a, lab.INET4, 25)
        index_a = lab.hv.ifindex("vnet1")
    finally:
        lab.close()
    (tmp_path / "run" / "boot_id").write_text(f"{OTHER_BOOT}\n")  # what the next boot finds

    lab = BridgeLab(tmp_path)
    try:
        lab.listen(lab.inet, [25])
        b = lab.add_guest("b", "vnet1", 11)
        assert lab.hv.ifindex("vnet1") == index_a, "the premise: B's device has A's old index"
        r = lab.smtp_gate("apply", "--no-libvirt", "--if-enabled", check=False)
        assert r.returncode == 0, r.stderr
        assert "elements" not in lab.nft("list", "set", "bridge", "smtp_gate", "allowed").stdout
        assert not lab.tcp_connects(b, lab.INET4, 25, timeout=0.5)
        b.ns.ip("link", "set", "eth0", "address", mac_a)
        assert not lab.tcp_connects(b, lab.INET4, 25, timeout=0.5), "B with A's MAC on A's old index got through"
    finally:
        lab.close()


def test_a_journal_mark_sees_a_truncation_even_after_the_journal_grew_back(tmp_path: Path) -> None:
    """The watcher notes the journal's position without a lock and compares later: a rebuild's
    truncation followed by appends past the noted end must not look like "nothing happened"
    (attacker review of issue 11)."""
    state = RunState(tmp_path)
    for name in ("a", "b", "c"):
        state.append(domain_event("start", Domain(name, A.uuid, "kvm", ())))
    generation, end = state.journal_mark()
    assert end == state.journal_end() > 0
    assert state.journal_mark() == (generation, end), "nothing happened: the same mark"
    state.append(domain_event("stop", Domain("a", A.uuid, "kvm", ())))
    assert state.journal_mark()[0] == generation, "an append keeps the generation"
    state.truncate_journal()
    for name in ("victim", "victim", "d", "e", "f"):
        state.append(domain_event("start", Domain(name, B.uuid, "kvm", ())))
    after, grown = state.journal_mark()
    assert grown > end, "regrown past the old end: the end alone cannot tell"
    assert after != generation
    state.truncate_journal()
    assert state.journal_mark()[0] not in (generation, after)
