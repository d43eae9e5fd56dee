"""The fleet allowance in a guest's libvirt metadata (issue 11): how guests.judge() adds it
to the whitelist file's, for every caller alike (hooks, rebuild, status, picker)."""

import xml.etree.ElementTree as ET

from smtp_gate import domain, guests, runstate

UUID = "0f5e0c3e-6c55-4d7c-9b7e-6a1b2c3d4e5f"
NICS = """<devices>
  <interface type='bridge'><mac address='52:54:00:aa:00:01'/><source bridge='br0'/><target dev='vnet0'/></interface>
  <interface type='bridge'><mac address='52:54:00:aa:00:02'/><source bridge='br0'/><target dev='vnet1'/></interface>
  <interface type='bridge'><mac address='52:54:00:aa:00:03'/><source bridge='other'/><target dev='vnet2'/></interface>
</devices>"""
INDEXES = {"vnet0": 10, "vnet1": 11, "vnet2": 12}


def xml(metadata: str = "") -> str:
    return f"<domain type='kvm'><name>g</name><uuid>{UUID}</uuid><metadata>{metadata}</metadata>{NICS}</domain>"


def judge(text: str, file_macs: tuple = ()) -> guests.Verdict:
    dom = domain.parse(text)
    assert dom == domain.from_element(ET.fromstring(text)), "the hook's parser and lxml disagree"
    return guests.judge(dom, ["br0"], lambda _g: file_macs, INDEXES.get, lambda _n: None)


def test_no_metadata_allows_nothing() -> None:
    assert judge(xml()).allowed == ()
    assert judge(xml('<allow xmlns="urn:other:1"/>')).allowed == ()


def test_allow_without_nics_allows_every_nic_on_a_protected_bridge() -> None:
    verdict = judge(xml('<sg:allow xmlns:sg="urn:smtp-gate:1" by="panel"/>'))
    assert verdict.allowed == ((10, "52:54:00:aa:00:01"), (11, "52:54:00:aa:00:02"))
    assert [v.sources for v in verdict.nics if v.state == guests.ALLOWED] == [("metadata",), ("metadata",)]
    assert verdict.whitelisted == ()


def test_prefix_does_not_matter_only_the_uri() -> None:
    for prefix in ("sg", "smtpgate", "x"):
        assert judge(xml(f'<{prefix}:allow xmlns:{prefix}="urn:smtp-gate:1"/>')).allowed, prefix
    assert judge(xml('<allow xmlns="urn:smtp-gate:1"/>')).allowed
    assert judge(xml('<sg:allow xmlns:sg="urn:smtp-gate:2"/>')).allowed == ()


def test_nic_children_limit_it_and_a_bad_one_never_widens_it() -> None:
    one = judge(xml('<sg:allow xmlns:sg="urn:smtp-gate:1"><sg:nic mac="52:54:00:AA:00:02"/></sg:allow>'))
    assert one.allowed == ((11, "52:54:00:aa:00:02"),)
    bad = judge(xml('<sg:allow xmlns:sg="urn:smtp-gate:1"><nic mac="not-a-mac"/></sg:allow>'))
    assert bad.allowed == ()
    assert bad.domain.allow is not None and "not-a-mac" in bad.domain.allow.problems[0]


def test_file_and_metadata_add_up_with_their_sources() -> None:
    verdict = judge(
        xml('<sg:allow xmlns:sg="urn:smtp-gate:1"><sg:nic mac="52:54:00:aa:00:01"/></sg:allow>'),
        file_macs=("52:54:00:aa:00:01", "52:54:00:aa:00:02"),
    )
    assert verdict.allowed == ((10, "52:54:00:aa:00:01"), (11, "52:54:00:aa:00:02"))
    sources = {v.nic.mac: v.sources for v in verdict.nics}
    assert sources["52:54:00:aa:00:01"] == ("file", "metadata")
    assert sources["52:54:00:aa:00:02"] == ("file",)
    assert sources["52:54:00:aa:00:03"] == ()  # on a bridge we do not protect


def test_the_rebuild_journal_keeps_the_allowance() -> None:
    dom = domain.parse(xml('<sg:allow xmlns:sg="urn:smtp-gate:1" by="a" reason="b"><sg:nic mac="52:54:00:aa:00:01"/></sg:allow>'))
    again = runstate.domain_from_event(runstate.domain_event("start", dom))
    assert again.allow is not None and again.allow.macs == ("52:54:00:aa:00:01",) and again.allow.by == "a"
    assert runstate.domain_from_event(runstate.domain_event("start", domain.parse(xml()))).allow is None


def test_an_unknown_child_never_widens_it() -> None:
    """<nics>, <NIC>, a <nic> of another namespace: meant to narrow, so they allow nothing
    (attacker review of issue 11: they allowed every NIC, silently)."""
    for child in ('<nics mac="52:54:00:aa:00:01"/>', '<NIC mac="52:54:00:aa:00:01"/>',
                  '<o:nic xmlns:o="urn:other" mac="52:54:00:aa:00:01"/>', '<interface mac="52:54:00:aa:00:01"/>'):
        verdict = judge(xml(f'<sg:allow xmlns:sg="urn:smtp-gate:1">{child}</sg:allow>'))
        assert verdict.allowed == (), child
        assert verdict.domain.allow is not None and "unknown child" in verdict.domain.allow.problems[0], child
    narrowed = judge(xml('<sg:allow xmlns:sg="urn:smtp-gate:1"><sg:nic mac="52:54:00:aa:00:02"/><nics/></sg:allow>'))
    assert narrowed.allowed == ((11, "52:54:00:aa:00:02"),)


def test_a_misspelt_element_of_our_namespace_allows_nothing_and_says_so() -> None:
    verdict = judge(xml('<sg:allowed xmlns:sg="urn:smtp-gate:1" by="panel"/>'))
    assert verdict.allowed == ()
    assert verdict.domain.allow is not None and "{urn:smtp-gate:1}allowed" in verdict.domain.allow.problems[0]


def test_at_must_be_iso_8601_but_only_warns() -> None:
    for good in ("2026-12-01", "2026-12-01T10:00:00+00:00", "2026-12-01T10:00Z", "2026-12-01 10:00:00.5"):
        allow = domain.parse(xml(f'<sg:allow xmlns:sg="urn:smtp-gate:1" at="{good}"/>')).allow
        assert allow is not None and allow.problems == (), good
    verdict = judge(xml('<sg:allow xmlns:sg="urn:smtp-gate:1" at="yesterday"/>'))
    assert "'yesterday' is not an ISO 8601 time" in verdict.domain.allow.problems[0]
    assert len(verdict.allowed) == 2, "an odd audit field does not gate the allowance"


def test_an_allowance_written_for_another_guest_allows_nothing() -> None:
    """A clone (virt-clone) or a dumpxml/define template copies the whole <metadata>: an
    allowance bound to its guest's UUID must not allow the copy (attacker review of issue 11)."""
    mine = judge(xml(f'<sg:allow xmlns:sg="urn:smtp-gate:1" by="ops" uuid="{UUID.upper().replace("-", "")}"/>'))
    assert len(mine.allowed) == 2 and mine.domain.allow is not None and mine.domain.allow.uuid == UUID
    assert mine.domain.allow.problems == ()
    other = "0f5e0c3e-6c55-4d7c-9b7e-000000000001"
    copied = judge(xml(f'<sg:allow xmlns:sg="urn:smtp-gate:1" by="ops" uuid="{other}"/>'))
    assert copied.allowed == ()
    assert copied.domain.allow is not None and copied.domain.allow.problems == (
        f"<allow> belongs to guest {other}, not to this one ({UUID}): a clone or a copied definition? "
        "remove it, or set it anew for this guest",
    )
    narrowed = judge(xml(f'<sg:allow xmlns:sg="urn:smtp-gate:1" uuid="{other}"><sg:nic mac="52:54:00:aa:00:01"/></sg:allow>'))
    assert narrowed.allowed == (), "a copy allows none of the NICs it names either"
    bad = judge(xml('<sg:allow xmlns:sg="urn:smtp-gate:1" uuid="clone-me"/>'))
    assert bad.allowed == () and bad.domain.allow.problems == (  # type: ignore[union-attr]
        "<allow uuid>: bad UUID 'clone-me': expected the guest's own UUID, 32 hex digits",)
    # the journal a rebuild replays keeps "allows nothing"
    again = runstate.domain_from_event(runstate.domain_event("start", copied.domain))
    assert again.allow is not None and again.allow.allows(["52:54:00:aa:00:01"]) == ()
    # without uuid=, as before (the contract stays backward compatible)
    assert len(judge(xml('<sg:allow xmlns:sg="urn:smtp-gate:1"/>')).allowed) == 2


def test_with_allow_edits_only_our_element_as_set_metadata_would() -> None:
    """hypervisor.with_allow() rewrites a managed save image's definition (setMetadata cannot
    reach it): our <allow> set, replaced or removed, everything else kept."""
    from smtp_gate import hypervisor

    other = '<o:thing xmlns:o="urn:other:1">kept</o:thing>'
    old = '<sg:allow xmlns:sg="urn:smtp-gate:1" by="old"/>'
    base = xml(other + old)
    removed = hypervisor.with_allow(base, None)
    assert domain.parse(removed).allow is None and "urn:other:1" in removed and "kept" in removed
    assert domain.parse(removed)._replace(allow=None) == domain.parse(base)._replace(allow=None)
    # as write_allow gives it (no namespace) and as _raw_allow gives it back (namespaced)
    for element in (f'<allow by="new" uuid="{UUID}"><nic mac="52:54:00:aa:00:02"/></allow>',
                    f'<smtpgate:allow xmlns:smtpgate="urn:smtp-gate:1" by="new" uuid="{UUID}"><nic mac="52:54:00:aa:00:02"/></smtpgate:allow>'):
        allow = domain.parse(hypervisor.with_allow(base, element)).allow
        assert allow is not None and (allow.by, allow.macs, allow.uuid, allow.problems) == ("new", ("52:54:00:aa:00:02",), UUID, ())
        assert hypervisor.with_allow(base, element).count("urn:smtp-gate:1") == 1, "the old one is gone"
    bare = f"<domain type='kvm'><name>g</name><uuid>{UUID}</uuid>{NICS}</domain>"  # no <metadata> yet
    assert domain.parse(hypervisor.with_allow(bare, '<allow by="x"/>')).allow.by == "x"  # type: ignore[union-attr]
