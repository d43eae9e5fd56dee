"""The run directory's per-guest records and journal (smtp_gate.runstate), on a temporary directory."""

import os
from pathlib import Path

from smtp_gate.domain import Domain, Nic
from smtp_gate.runstate import Record, RunState, domain_event, replay

A = Record("aaaaaaaa-0000-4000-8000-000000000001", "a", (("vnet0", 7),), (), ((7, "52:54:00:00:00:01"),))
B = Record("bbbbbbbb-0000-4000-8000-000000000002", "b", (("vnet1", 8),))
C = Record("cccccccc-0000-4000-8000-000000000003", "c", (("vnet2", 9),), (("vnet5", 12),))


def test_a_record_of_an_older_version_keeps_no_bare_name(tmp_path: Path) -> None:
    """Ports written by name alone (before interface indexes) are not read back as ports."""
    state = RunState(tmp_path)
    state.prepare()
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
