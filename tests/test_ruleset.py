"""The nft batch as text, and the program the kernel runs for it, against golden files
(SMTP_GATE_REGENERATE=1 rewrites them)."""

import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from smtp_gate import ruleset
from smtp_gate.errors import ValidationError
from smtp_gate.ruleset import Desired
from tests.golden import assert_golden
from tests.netlab import missing_kernel_features

GOLDEN = Path(__file__).parent / "golden" / "ruleset"
NETLINK = Path(__file__).parent / "golden" / "netlink"

VARIANTS: Dict[str, Desired] = {
    "default": Desired(uplinks=("eno1",)),
    "guests": Desired(
        uplinks=("eno1", "bond0.100"),
        guest_ifaces=(7, 12),
        foreign_ifaces=(31,),
        blocked_ports=((25, 25), (465, 465), (2525, 2530)),
        allowed=((12, "52:54:00:aa:00:02"), (7, "52:54:00:fa:2f:a5")),
        log_rate="10/minute",
        log_burst=3,
        log_group=7,
        log_group_rate="20/minute",
        log_group_burst=5,
    ),
    "audit": Desired(uplinks=("eno1",), audit=True, log_drops=False, non_ip="accept"),
    "relay": Desired(
        uplinks=("eno1",),
        relays=((4, "192.0.2.25", (1, 65535)), (4, "198.51.100.0/28", (25, 25)), (6, "2001:db8::/64", (587, 587))),
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ruleset_text(variant: str) -> None:
    text = ruleset.apply_batch(VARIANTS[variant]).text()
    assert_golden(GOLDEN / f"{variant}.nft", text)
    if VARIANTS[variant].audit:
        assert " drop\n" not in text, "audit mode never drops"


def test_the_drop_is_a_rule_of_its_own_after_counting_and_logging() -> None:
    for family in ("4", "6"):
        chain = [rule for name, rule in ruleset.rules(Desired()) if name == f"smtp{family}"]
        assert chain[-1] == "drop"
        assert all("drop" not in rule for rule in chain[:-1])


def test_attributed_events_go_to_the_nflog_group_in_a_rule_of_their_own() -> None:
    """The NFLOG rule is rate-limited per ingress port, then globally; it never carries a
    verdict; the kernel log line stays (LOG_DROPS); audit logs too; LOG_GROUP off removes it."""
    for audit in (False, True):
        for family in ("4", "6"):
            chain = [rule for name, rule in ruleset.rules(Desired(audit=audit)) if name == f"smtp{family}"]
            group = [rule for rule in chain if " group 2525" in rule]
            assert len(group) == 1 and chain.index(group[0]) == len(chain) - 2, chain
            assert group[0].startswith(f"update @{ruleset.LOG_METER_SET} {{ iif limit rate 50/second burst 100 packets }}")
            assert f'prefix "SMTPGATE{family} {"audit " if audit else ""}"' in group[0]
            assert not any(word in group[0].split() for word in ("drop", "accept"))
            assert any("level warn" in rule for rule in chain), "the kernel log line stays"
    off = [rule for _chain, rule in ruleset.rules(Desired(log_group=None))]
    assert not any(" group " in rule for rule in off)
    for bad in ({"log_group": 70000}, {"log_group_rate": "5/s; flush ruleset"}, {"log_group_burst": 0}):
        with pytest.raises(ValidationError):
            ruleset.apply_batch(Desired(**bad))


def test_no_name_grants_an_exemption_except_the_uplinks_inbound() -> None:
    """Every accept or exemption keyed on an interface is keyed on its index; the one name
    set (uplinks) only ever accepts frames that did not come from a known guest port."""
    rules = ruleset.rules(Desired())
    named = [(chain, rule) for chain, rule in rules if "ifname" in rule and "update @attempts" not in rule]
    assert named == [
        ("forward", "iifname @uplinks accept"),
        ("input", "iifname @uplinks accept"),
        ("egress", "oifname @uplinks goto outbound"),
    ]
    for chain in ("forward", "input"):
        body = [rule for name, rule in rules if name == chain]
        assert body.index(f"iif @guest_ifaces {'goto egress' if chain == 'forward' else 'goto outbound'}") < body.index(
            "iifname @uplinks accept"
        ), "a known guest port must be classified before any name is trusted"
    assert not any("pattern" in name for name in ruleset.SET_TYPES)


def test_upgrade_deletes_obsolete_objects_after_flushing_their_references() -> None:
    text = ruleset.apply_batch(Desired(), obsolete_chains=["old"], obsolete_sets=["guest_ports"]).text().splitlines()
    flush_old = text.index("flush chain bridge smtp_gate old")
    assert flush_old < text.index("delete chain bridge smtp_gate old") < text.index("delete set bridge smtp_gate guest_ports")
    assert text.index("flush chain bridge smtp_gate forward") < text.index("delete set bridge smtp_gate guest_ports")
    assert not any(line.startswith("delete table") for line in text), "the table is never deleted by an apply"


def test_element_changes_and_removal_whether_or_not_present() -> None:
    batch = ruleset.element_changes(
        add=[("allowed", (7, "52:54:00:AA:00:02")), ("guest_ifaces", 7)], delete=[("foreign_ifaces", 9)]
    ).batch()
    assert batch.text() == (
        "add element bridge smtp_gate allowed { 7 . 52:54:00:aa:00:02 }\n"
        "add element bridge smtp_gate guest_ifaces { 7 }\n"
        "add element bridge smtp_gate foreign_ifaces { 9 }\n"
        "delete element bridge smtp_gate foreign_ifaces { 9 }\n"
    )
    assert ruleset.remove_batch().text() == "add table bridge smtp_gate\ndelete table bridge smtp_gate\n"
    for bad in [("guest_ifaces", "vnet0"), ("guest_ifaces", True), ("guest_ifaces", 0), ("uplinks", 3)]:
        with pytest.raises(ValidationError):
            ruleset.element_changes(add=[bad])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"uplinks": ('eth0" }; flush ruleset; #',)},
        {"guest_ifaces": (0,)},
        {"foreign_ifaces": (-3,)},
        {"guest_ifaces": ("vnet0",)},
        {"allowed": ((0, "52:54:00:00:00:01"),)},
        {"allowed": ((3, "52:54:00:00:00:0G"),)},
        {"allowed": ((3, "52:54:00:AA:00:01"),)},
        {"blocked_ports": ((25, 25), (25, 25))},
        {"relays": ((4, "192.0.2.0/24; flush ruleset", (25, 25)),)},
        {"relays": ((4, "192.0.2.7/24", (25, 25)),)},
        {"attempts_timeout": "1d; flush ruleset"},
    ],
)
def test_nothing_unchecked_reaches_nft(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        ruleset.apply_batch(Desired(**kwargs))


# -- what the kernel runs ---------------------------------------------------------------------
# nft puts implicit dependencies in front of some matches; in the bridge family some of them
# are `ether type` (link header + 12), which reads the TPID of a single-tagged frame, so such
# a rule silently never matches tagged traffic.  No rule of ours may load it.
LINK_TYPE = "payload load 2b @ link header + 12"
_BLOCK = re.compile(r"^bridge smtp_gate (\S+)$")


def compiled(state: Desired) -> str:
    """`nft --debug=netlink -c` of the whole batch, in a throwaway network namespace."""
    reason = missing_kernel_features()
    if reason:
        pytest.skip(reason)
    name = f"sgnl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        result = subprocess.run(
            ["ip", "netns", "exec", name, "nft", "--debug=netlink", "-c", "-f", "-"],
            input=ruleset.apply_batch(state).text(), capture_output=True, text=True, check=True,
        )
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)
    return result.stdout


def rule_programs(text: str) -> List[Tuple[str, List[str]]]:
    """(chain, expressions) of every rule block of a netlink listing, in order."""
    out: List[Tuple[str, List[str]]] = []
    for line in text.splitlines():
        m = _BLOCK.match(line)
        if m:
            out.append((m.group(1), []))
        elif out and line.startswith("  ["):
            out[-1][1].append(line.strip()[2:-2])
    return out


def dependencies(state: Desired) -> str:
    """Each rule and, for every header it reads, what guards the read: the review listing."""
    rules = ruleset.rules(state)
    programs = rule_programs(compiled(state))
    assert [c for c, _ in programs] == [c for c, _ in rules], "one netlink block per rule, in order"
    lines = []
    for (chain, rule), (_chain, program) in zip(rules, programs):
        guards, reads = [], []
        for i, expr in enumerate(program):
            if expr.startswith("meta load protocol") or expr.startswith("meta load l4proto"):
                guards.append(expr.split()[2] + " " + program[i + 1].split()[-1])
            if expr.startswith("payload load") or expr.startswith("exthdr load"):
                where = expr.split(" => ")[0].replace("payload load ", "").replace("exthdr load ", "exthdr ")
                reads.append(f"{where} [after: {', '.join(guards) or 'nothing'}]")
        lines.append(f"{chain}: {rule}")
        lines += [f"    reads {read}" for read in reads]
    return "\n".join(lines) + "\n"


@pytest.mark.kernel
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_compiled_program(variant: str) -> None:
    """The kernel's program for each variant is reviewed as a golden file; the nft version
    that compiled it is in the file's first line."""
    version = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    golden = NETLINK / f"{variant}.txt"
    if golden.exists() and not golden.read_text().startswith(f"# {version}\n") and not _regenerating():
        pytest.skip(f"{golden.name} was compiled by another nft than {version!r}")
    assert_golden(golden, f"# {version}\n" + compiled(VARIANTS[variant]))


def _regenerating() -> bool:
    from tests.golden import regenerating

    return regenerating()


@pytest.mark.kernel
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_rule_reads_the_link_layer_type_and_every_read_is_guarded(variant: str) -> None:
    listing = dependencies(VARIANTS[variant])
    assert_golden(NETLINK / f"{variant}.dependencies.txt", listing)
    program = compiled(VARIANTS[variant])
    assert LINK_TYPE not in program, "a rule loads the link-layer type, which is the VLAN tag of a tagged frame"
    for chain, exprs in rule_programs(program):
        guarded = set()
        for expr in exprs:
            if expr.startswith("meta load protocol"):
                guarded.add("network")
            if expr.startswith("meta load l4proto"):
                guarded.add("transport")
            if "network" in guarded:
                # the kernel has a transport header only for an IPv4/IPv6 header it validated
                # itself (NFT_PKTINFO_L4PROTO), from the protocol inside at most one tag: after
                # `meta protocol`, a transport read needs no `meta l4proto` in front
                guarded.add("transport")
            for layer in ("network", "transport"):
                if f"@ {layer} header" in expr:
                    assert layer in guarded, (
                        f"{chain}: {expr} reads the {layer} header with no protocol check before it: {exprs}"
                    )
            if expr.startswith("exthdr load ipv6"):
                assert "network" in guarded, f"{chain}: an IPv6 extension header read with no `meta protocol ip6`"
