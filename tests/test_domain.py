"""smtp_gate.domain against the XML libvirt really sends hooks, and hand-written odd shapes.

Golden files pin every field read from every sample; the fact tests below say in words
what the goldens must keep showing (where targets and ids appear, per hook operation).
"""

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List

import pytest

from smtp_gate.domain import Domain, Nic, from_element, normalise_uuid, parse
from smtp_gate.errors import DomainXMLError, SmtpGateError
from tests.golden import assert_golden

TESTS = Path(__file__).resolve().parent
SAMPLES = TESTS / "data" / "libvirt-samples"
FIXTURES = TESTS / "data" / "domain-fixtures"
GOLDEN = TESTS / "golden" / "domain"

SAMPLE_FILES = sorted(SAMPLES.glob("*/*.xml"))
FIXTURE_FILES = sorted(FIXTURES.glob("*.xml"))
ALL_FILES = SAMPLE_FILES + FIXTURE_FILES


def _id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def golden_path(path: Path) -> Path:
    scenario = "fixtures" if path.parent == FIXTURES else path.parent.name
    return GOLDEN / scenario / f"{path.stem}.json"


def render(dom: Domain) -> str:
    """Stable JSON: fields in declaration order, plus the derived protection verdict."""
    data = dom._asdict()
    data["nics"] = [
        {
            **nic._asdict(),
            "problems": list(nic.problems),
            "bridge_visible": nic.bridge_visible,
            "unprotected_reason": nic.unprotected_reason,
        }
        for nic in dom.nics
    ]
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _op(path: Path) -> str:
    """'02-lab1-start-begin' -> 'start'."""
    return path.stem.split("-")[-2]


def test_samples_are_present():
    assert len(SAMPLE_FILES) == 26
    assert {p.parent.name for p in SAMPLE_FILES} == {
        "1nic-daemon-restart-reconnect",
        "1nic-guest-poweroff",
        "1nic-poweroff-while-daemon-down",
        "1nic-qemu-killed-while-daemon-down",
        "2nic-virsh-destroy",
    }


@pytest.mark.parametrize("path", ALL_FILES, ids=_id)
def test_golden(path: Path):
    assert_golden(golden_path(path), render(parse(path.read_bytes())))


@pytest.mark.parametrize("path", ALL_FILES, ids=_id)
def test_lxml_and_stdlib_agree(path: Path):
    data = path.read_bytes()
    assert from_element(ET.fromstring(data)) == parse(data)
    assert parse(data.decode("utf-8")) == parse(data)


def test_no_orphan_golden_files():
    expected = {golden_path(p) for p in ALL_FILES}
    assert set(GOLDEN.glob("*/*.json")) <= expected


# --- facts about the recorded samples ---------------------------------------------------

LIVE_OPS = {"prepare", "start", "started", "reconnect"}  # carry id='N'
TAP_OPS = {"start", "started", "reconnect"}  # carry the auto-named vnetN


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=_id)
def test_sample_facts(path: Path):
    dom = parse(path.read_bytes())
    op = _op(path)
    assert dom.type == "qemu"
    assert dom.name == path.stem.split("-")[1]
    assert (dom.id is not None) == (op in LIVE_OPS)
    for nic in dom.nics:
        assert nic.type == "bridge" and nic.bridge == "br0"
        assert nic.mac is not None and nic.mac.startswith("52:54:00:")
        assert nic.bridge_visible and nic.unprotected_reason is None
        assert nic.problems == ()
    auto = [nic for nic in dom.nics if nic.mac != "52:54:00:aa:00:02"]
    assert len(auto) == 1
    if op in TAP_OPS:
        assert auto[0].target is not None and auto[0].target.startswith("vnet")
    else:
        assert auto[0].target is None
    if path.parent.name == "2nic-virsh-destroy":
        user_set = [nic for nic in dom.nics if nic.mac == "52:54:00:aa:00:02"]
        assert [nic.target for nic in user_set] == ["lab2n1"]  # in every op


def test_sample_identity_is_stable_across_ops():
    by_scenario: Dict[str, List[Domain]] = {}
    for path in SAMPLE_FILES:
        by_scenario.setdefault(path.parent.name, []).append(parse(path.read_bytes()))
    for doms in by_scenario.values():
        assert len({(d.name, d.uuid) for d in doms}) == 1
        assert len({tuple(n.mac for n in d.nics) for d in doms}) == 1


def test_vnet_numbers_restart_after_daemon_restart_differ_per_scenario():
    started = {
        p.parent.name: parse(p.read_bytes()).nics[0].target
        for p in SAMPLE_FILES
        if _op(p) == "started"
    }
    assert started == {
        "1nic-guest-poweroff": "vnet0",
        "2nic-virsh-destroy": "vnet1",
        "1nic-daemon-restart-reconnect": "vnet2",
        "1nic-poweroff-while-daemon-down": "vnet3",
        "1nic-qemu-killed-while-daemon-down": "vnet0",
    }


# --- hand-written shapes -----------------------------------------------------------------


def fixture(name: str) -> Domain:
    return parse((FIXTURES / f"{name}.xml").read_bytes())


@pytest.mark.parametrize(
    "name, reason_part",
    [
        ("direct-macvtap", "macvtap"),
        ("hostdev-sriov", "SR-IOV"),
        ("vhostuser", "vhost-user"),
        ("ovs-bridge", "Open vSwitch"),
    ],
)
def test_unprotected_shapes(name: str, reason_part: str):
    nic = fixture(name).nics[0]
    assert not nic.bridge_visible
    assert reason_part in nic.unprotected_reason
    assert "\n" not in nic.unprotected_reason


def test_ovs_and_other_virtualports():
    ovs, midonet = fixture("ovs-bridge").nics
    assert (ovs.virtualport, ovs.bridge, ovs.target) == ("openvswitch", "ovsbr0", "vnet5")
    assert midonet.virtualport == "midonet" and not midonet.bridge_visible


def test_network_live_and_inactive():
    nat, ovs, macvtap = fixture("network-live").nics
    assert (nat.type, nat.network, nat.bridge, nat.target) == ("network", "default", "virbr0", "vnet7")
    assert nat.bridge_visible
    assert ovs.bridge == "ovsbr1" and not ovs.bridge_visible
    assert macvtap.bridge is None and not macvtap.bridge_visible
    (inactive,) = fixture("network-inactive").nics
    assert inactive.network == "default" and inactive.bridge is None and inactive.target is None
    assert "no bridge" in inactive.unprotected_reason


def test_lxc_veth_on_a_bridge_is_protected():
    dom = fixture("lxc-veth")
    assert (dom.type, dom.id) == ("lxc", 31337)
    (nic,) = dom.nics
    assert (nic.type, nic.bridge, nic.target, nic.mac) == ("bridge", "br0", "vethXYZ", "00:16:3e:5d:c7:9e")
    assert nic.bridge_visible


def test_xen_vifs():
    dom = fixture("xen-vif")
    assert (dom.type, dom.id) == ("xen", 7)
    assert [n.target for n in dom.nics] == ["vif7.0", "vif7.1-emu"]
    assert all(n.bridge == "xenbr0" and n.bridge_visible for n in dom.nics)


def test_missing_mac_and_target_are_none_not_errors():
    first, empty = fixture("missing-mac").nics
    assert first == Nic("bridge", None, "br0", None, None, None, ())
    assert empty == Nic("bridge", None, None, None, None, None, ())
    assert first.bridge_visible  # the port is still a bridge port: blocked by default


def test_invalid_values_become_none_with_a_reason():
    dom = fixture("invalid-names")
    assert dom.name == 'bad"guest name'  # names never reach nft: kept as libvirt has them
    assert dom.uuid == "8f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    assert dom.id is None  # id='not-a-number'
    bad, multicast, zero, spaced = dom.nics
    assert (bad.mac, bad.bridge, bad.target) == (None, None, None)
    assert len(bad.problems) == 3
    assert any('bad"name' in p and p.startswith("<target dev>") for p in bad.problems)
    assert multicast.mac is None and "multicast" in multicast.problems[0]
    assert multicast.target is None and "all-digit" in multicast.problems[1]
    assert zero.mac is None and zero.target is None
    assert spaced.mac == "52:54:00:ab:cd:ef" and spaced.target is None
    assert all("\n" not in p for nic in dom.nics for p in nic.problems)


def test_every_odd_type_is_kept_and_marked():
    dom = fixture("odd-types")
    assert [n.type for n in dom.nics] == [
        "user", "ethernet", "mcast", "udp", "server", "client", "vdpa", "null", "vds", "",
    ]
    assert all(not n.bridge_visible and n.unprotected_reason for n in dom.nics)
    assert dom.nics[1].target == "tap-routed"
    assert all(n.bridge is None and n.problems == () for n in dom.nics)


def test_no_devices():
    assert fixture("no-devices") == Domain("bare", "af1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "test", ())


# --- errors and parser safety ------------------------------------------------------------

MINIMAL = "<domain type='kvm'><name>a</name><uuid>{}</uuid></domain>"
UUID = "56ba75c7-fc96-46bd-a78e-ccf8d5907094"


@pytest.mark.parametrize(
    "xml, message",
    [
        ("", "not well-formed"),
        (b"", "not well-formed"),
        ("not xml at all", "not well-formed"),
        ("<domain><name>a</name>", "not well-formed"),
        ("<domstatus><domain/></domstatus>", "root element <domstatus>"),
        (f"<domain><uuid>{UUID}</uuid></domain>", "no <name>"),
        (f"<domain><name></name><uuid>{UUID}</uuid></domain>", "no <name>"),
        ("<domain><name>a</name></domain>", "no <uuid>"),
        ("<domain><name>a</name><uuid> </uuid></domain>", "no <uuid>"),
        (MINIMAL.format("1234"), "bad <uuid> '1234'"),
        (MINIMAL.format(UUID[:-1] + "g"), "bad <uuid>"),
    ],
)
def test_errors_name_what_is_wrong(xml, message):
    with pytest.raises(DomainXMLError, match=re.escape(message)) as info:
        parse(xml)
    assert isinstance(info.value, SmtpGateError)
    if message != "not well-formed":
        with pytest.raises(DomainXMLError, match=re.escape(message)):
            from_element(ET.fromstring(xml))


def test_wrong_input_type():
    with pytest.raises(DomainXMLError, match="text or bytes"):
        parse(None)  # type: ignore[arg-type]


def test_encoding_declarations():
    text = "<?xml version='1.0' encoding='ISO-8859-1'?>" + MINIMAL.format(UUID).replace(">a<", ">café<")
    assert parse(text).name == "café"
    assert parse(text.encode("iso-8859-1")).name == "café"


def test_external_entities_are_not_read(tmp_path: Path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    xml = (
        f'<!DOCTYPE domain [<!ENTITY x SYSTEM "file://{secret}">]>'
        f"<domain><name>a&x;</name><uuid>{UUID}</uuid></domain>"
    )
    assert "s3cret" not in parse(xml).name


def test_from_element_accepts_an_element_tree():
    tree = ET.ElementTree(ET.fromstring(MINIMAL.format(UUID)))
    assert from_element(tree).uuid == UUID


def test_normalise_uuid():
    assert normalise_uuid(UUID.upper()) == UUID
    assert normalise_uuid(UUID.replace("-", "")) == UUID
    assert normalise_uuid(f"  {UUID}\n") == UUID
    for bad in ("", "lab1", UUID + "0", UUID[:-1] + "x", None):
        assert normalise_uuid(bad) is None  # type: ignore[arg-type]


def test_values_are_immutable_and_hashable():
    dom = fixture("xen-vif")
    with pytest.raises(AttributeError):
        dom.name = "other"  # type: ignore[misc]
    assert len({dom, fixture("xen-vif")}) == 1
    assert dom._replace(uri="xen:///system").uri == "xen:///system"


def test_import_stays_cheap():
    """The hook imports this module on every guest start: no lxml, logging or dataclasses."""
    code = (
        "import sys, smtp_gate.domain; "
        "print(','.join(m for m in ('lxml', 'logging', 'dataclasses', 'libvirt') if m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == ""
