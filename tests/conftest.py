"""Shared fixtures: per-test network namespaces that are always removed; the CI switch
SMTP_GATE_REQUIRE_ALL (tests/require_all.py)."""

import os
from pathlib import Path
from typing import Iterator

import pytest

from tests import netlab

pytest_plugins = ["tests.require_all"]

@pytest.fixture(scope="session")
def kernel_skip_reason() -> str:
    return netlab.missing_kernel_features() or ""


@pytest.fixture
def bare_lab(tmp_path: Path, kernel_skip_reason: str) -> Iterator[netlab.BridgeLab]:
    """A hypervisor namespace with br0 and uplink0 to an "internet" listening on
    25/465/587/80/8080, no guests yet."""
    if kernel_skip_reason:
        pytest.skip(kernel_skip_reason)
    bridge_lab = netlab.BridgeLab(tmp_path)
    try:
        bridge_lab.listen(bridge_lab.inet, [25, 465, 587, 80, 8080])
        yield bridge_lab
    finally:
        bridge_lab.close()


@pytest.fixture
def lab(bare_lab: netlab.BridgeLab) -> netlab.BridgeLab:
    """bare_lab with two guests, g1 on vnet0 and g2 on vnet1."""
    bare_lab.add_guest("g1", "vnet0", 2)
    bare_lab.add_guest("g2", "vnet1", 3)
    return bare_lab
