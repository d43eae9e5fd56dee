"""What may reach an nft command, and in which normal form."""

import pytest

from smtp_gate import validate
from smtp_gate.errors import ValidationError


@pytest.mark.parametrize("name", ["vnet0", "eth0.100", "br-lan", "vif3.0", "veth1a2b3c4d", "a" * 15, "macvtap@x", "tap+1"])
def test_good_interface_names(name: str) -> None:
    assert validate.ifname(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "a" * 16, 'vnet"0', "vnet 0", "vnet0;", "vnet0}", "vn*et", "vnet/0", "vnet:0", ".", "..", "-x", "42", "vnét0", "vnet\n0"],
)
def test_bad_interface_names_are_refused_with_the_value_quoted(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate.ifname(name)
    assert repr(name) in str(info.value)


def test_patterns() -> None:
    assert validate.ifname_pattern("vnet*") == "vnet*"
    assert validate.ifname_pattern("vnet0") == "vnet0"
    assert validate.pattern_matches("vnet*", "vnet12") and not validate.pattern_matches("vnet*", "xvnet1")
    for bad in ("*", "v*n*", "a" * 15 + "*", 'x"*'):
        with pytest.raises(ValidationError):
            validate.ifname_pattern(bad)


@pytest.mark.parametrize(
    "spelling", ["52:54:00:AB:CD:EF", "52-54-00-ab-cd-ef", "5254.00ab.cdef", "5254.00AB.CDEF", "52:54:00:aB:Cd:eF"]
)
def test_mac_spellings_normalise_to_one_form(spelling: str) -> None:
    assert validate.mac(spelling) == "52:54:00:ab:cd:ef"


@pytest.mark.parametrize(
    "bad",
    [
        "52:54:00:ab:cd:e",  # a dropped digit: not 52:54:00:ab:cd:0e, another NIC
        "52:54:0:ab:cd:ef",
        "2:54:00:ab:cd:ef",
        "52:54:00:ab:cd:eff",
        "52:54:00:ab:cd",
        "52:54:00:ab:cd:eg",
        "52:54-00:ab:cd:ef",  # mixed separators
        "52.54.00.ab.cd.ef",
        "525400abcdef",  # bare digits: not a documented spelling
        "5254.00ab.cde",
        "5254:00ab:cdef",
        "5254-00ab-cdef",
        " 52:54:00:ab:cd:ef",
        "52:54:00:ab:cd:ef\n",
        "52::54:00:ab:cd:ef",
        "５２:54:00:ab:cd:ef",  # full-width digits
        "",
        "zz",
        "52:54:00:ab:cd:ef:00",
    ],
)
def test_bad_macs_are_refused_quoting_the_value_and_the_spellings(bad: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate.mac(bad)
    message = str(info.value)
    assert message.startswith(f"bad MAC address {bad!r}: expected six hex bytes")
    assert "52:54:00:ab:cd:ef, 52-54-00-ab-cd-ef or 5254.00ab.cdef" in message and "\n" not in message


@pytest.mark.parametrize(
    "mac, why", [("ff:ff:ff:ff:ff:ff", "broadcast"), ("01:00:5e:00:00:01", "multicast"), ("00:00:00:00:00:00", "all-zero")]
)
def test_no_nic_owns_broadcast_multicast_or_zero(mac: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        validate.unicast_mac(mac)
