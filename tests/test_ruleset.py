"""The nft batch as text, against golden files (SMTP_GATE_REGENERATE=1 rewrites them)."""

from pathlib import Path

import pytest

from smtp_gate import ruleset
from smtp_gate.errors import ValidationError
from smtp_gate.ruleset import Desired
from tests.golden import assert_golden

GOLDEN = Path(__file__).parent / "golden" / "ruleset"


def test_default_ruleset() -> None:
    state = Desired(uplinks=("eno1",), guest_patterns=("vnet*", "tap*", "veth*", "vif*"))
    assert_golden(GOLDEN / "default.nft", ruleset.apply_batch(state).text())


def test_full_ruleset_with_guests_and_allowances() -> None:
    state = Desired(
        uplinks=("eno1", "bond0.100"),
        guest_ports=("lab2n1", "vnet3"),
        guest_patterns=("vnet*",),
        foreign_ports=("veth77",),
        blocked_ports=((25, 25), (465, 465), (2525, 2530)),
        allowed=((12, "52:54:00:aa:00:02"), (7, "52:54:00:fa:2f:a5")),
        log_rate="10/minute",
        log_burst=3,
    )
    assert_golden(GOLDEN / "guests.nft", ruleset.apply_batch(state).text())


def test_audit_mode_without_logging_and_non_ip_accepted() -> None:
    state = Desired(uplinks=("eno1",), audit=True, log_drops=False, non_ip="accept")
    text = ruleset.apply_batch(state).text()
    assert_golden(GOLDEN / "audit.nft", text)
    assert " drop\n" not in text, "audit mode never drops"


def test_the_drop_is_a_rule_of_its_own_after_counting_and_logging() -> None:
    for family in ("4", "6"):
        chain = [rule for name, rule in ruleset.rules(Desired()) if name == f"smtp{family}"]
        assert chain[-1] == "drop"
        assert all("drop" not in rule for rule in chain[:-1])


def test_upgrade_deletes_obsolete_objects_after_flushing_their_references() -> None:
    text = ruleset.apply_batch(Desired(), obsolete_chains=["old"], obsolete_sets=["allowed"]).text().splitlines()
    flush_old = text.index("flush chain bridge smtp_gate old")
    assert flush_old < text.index("delete chain bridge smtp_gate old") < text.index("delete set bridge smtp_gate allowed")
    assert text.index("flush chain bridge smtp_gate outbound") < text.index("delete set bridge smtp_gate allowed")
    assert text.index("delete set bridge smtp_gate allowed") < text.index(
        "add set bridge smtp_gate allowed { type iface_index . ether_addr; }"
    )
    assert not any(line.startswith("delete table") for line in text), "the table is never deleted by an apply"


def test_element_changes_and_removal_whether_or_not_present() -> None:
    batch = ruleset.element_changes(add=[("allowed", (7, "52:54:00:AA:00:02"))], delete=[("guest_ports", "vnet3")]).batch()
    assert batch.text() == (
        "add element bridge smtp_gate allowed { 7 . 52:54:00:aa:00:02 }\n"
        'add element bridge smtp_gate guest_ports { "vnet3" }\n'
        'delete element bridge smtp_gate guest_ports { "vnet3" }\n'
    )
    assert ruleset.remove_batch().text() == "add table bridge smtp_gate\ndelete table bridge smtp_gate\n"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"uplinks": ('eth0" }; flush ruleset; #',)},
        {"guest_ports": ("vnet 0",)},
        {"foreign_ports": ("a" * 16,)},
        {"guest_patterns": ("*",)},
        {"allowed": ((0, "52:54:00:00:00:01"),)},
        {"allowed": ((3, "52:54:00:00:00:0G"),)},
        {"allowed": ((3, "52:54:00:AA:00:01"),)},
        {"blocked_ports": ((25, 25), (25, 25))},
    ],
)
def test_nothing_unchecked_reaches_nft(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        ruleset.apply_batch(Desired(**kwargs))
