"""The desired state, computed from links, records and the kernel's table (pure)."""

from pathlib import Path

from smtp_gate import config, engine, nft
from smtp_gate.discovery import Link
from smtp_gate.runstate import Record

CONF = config.parse('UPLINKS="eno1"\n', Path("/etc/smtp-gate/smtp-gate.conf"))


def links(*items):  # (name, index, master)
    kinds = {"br0": "bridge", "eno1": "physical"}
    return {n: Link(n, i, kinds.get(n, "tun"), m, ()) for n, i, m in items}


HOST = links(("br0", 2, None), ("eno1", 3, "br0"), ("vnet0", 10, "br0"), ("vnet1", 11, "br0"))


def table(allowed=(), guest_ifaces=()):
    t = nft.KernelTable()
    t.elements["allowed"] = [tuple(a) for a in allowed]
    t.elements["guest_ifaces"] = list(guest_ifaces)
    return t


def test_records_give_guest_ports_and_allowances_for_devices_that_exist() -> None:
    records = [
        Record("u1", "web1", guest_ports=(("vnet0", 10), ("gone0", 98)), allowed=((10, "52:54:00:00:00:01"), (99, "52:54:00:00:00:02"))),
        Record("u2", "db", guest_ports=(("vnet1", 11),)),
    ]
    d = engine.compute(CONF, HOST, records, kernel=None).desired
    assert d.allowed == ((10, "52:54:00:00:00:01"),), "index 99 no longer exists: dropped"
    assert d.guest_ifaces == (10, 11), "gone indexes are dropped"
    assert d.uplinks == ("eno1",)


def test_a_record_whose_index_is_gone_exempts_nothing_even_if_its_name_is_back() -> None:
    """libvirt reuses vnetN: a stale record's port must not exempt the new device."""
    stale = Record("u1", "gone", guest_ports=(("vnet1", 57),), foreign_ports=(("vnet0", 58),))
    d = engine.compute(CONF, HOST, [stale], kernel=None).desired
    assert d.guest_ifaces == () and d.foreign_ifaces == ()


def test_a_port_the_hypervisor_reports_is_never_an_uplink() -> None:
    conf = config.parse('UPLINKS="eno1 vnet1"\nGUEST_PATTERNS="tap*"\n', Path("/x.conf"))
    outcome = engine.compute(conf, HOST, [Record("u2", "db", guest_ports=(("vnet1", 11),))], kernel=None)
    assert outcome.desired.uplinks == ("eno1",) and outcome.desired.guest_ifaces == (11,)
    assert any("vnet1" in w and "guest ports" in w for w in outcome.warnings)


def test_keep_kernel_maps_listed_names_to_indexes_and_drops_gone_numbers() -> None:
    kernel = table(allowed=[("vnet0", "52:54:00:00:00:01"), ("57", "52:54:00:00:00:09")], guest_ifaces=["vnet1", "58"])
    kept = engine.compute(CONF, HOST, [], kernel, keep_kernel=True).desired
    assert kept.allowed == ((10, "52:54:00:00:00:01"),)
    assert kept.guest_ifaces == (11,)
    assert engine.compute(CONF, HOST, [], kernel, keep_kernel=False).desired.allowed == ()


def test_a_name_recreated_while_the_table_was_read_inherits_nothing() -> None:
    after = {name: link.ifindex for name, link in HOST.items()}
    after["vnet0"] = 42  # deleted and created again while nft listed the table
    stable = engine.stable_links(HOST, after)
    assert "vnet0" not in stable and "vnet1" in stable
    kernel = table(allowed=[("vnet0", "52:54:00:00:00:01")])
    assert engine.compute(CONF, stable, [], kernel, keep_kernel=True).desired.allowed == ()


def test_keep_gone_keeps_the_numbers_of_devices_that_no_longer_exist_for_revoking() -> None:
    kernel = table(allowed=[("vnet0", "52:54:00:00:00:01"), ("57", "52:54:00:00:00:09")])
    assert engine.kernel_pairs(kernel, HOST) == {(10, "52:54:00:00:00:01")}
    assert engine.kernel_pairs(kernel, HOST, keep_gone=True) == {(10, "52:54:00:00:00:01"), (57, "52:54:00:00:00:09")}
