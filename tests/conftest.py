"""Shared fixtures: per-test network namespaces that are always removed; the environment a
test must not inherit from this machine; the CI switch (tests/require_all.py)."""

import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterator

import pytest

from tests import netlab

pytest_plugins = ["tests.require_all"]

# Variables of an operator's shell that would point the code under test at the host's own
# installation: tests name every path themselves.
HOST_ENV = ("SMTP_GATE_CONFIG",)
_saved_env: Dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Drop $SMTP_GATE_CONFIG before collection (modules copy os.environ at import) and for the
    whole session: a CLI or hook that a test starts inherits this process's environment and
    must not find the host's config through it."""
    for name in HOST_ENV:
        if name in os.environ:
            _saved_env[name] = os.environ.pop(name)


def pytest_unconfigure(config: pytest.Config) -> None:
    os.environ.update(_saved_env)


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


@pytest.fixture(scope="session")
def netlink_shim(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/shims/netlink_shim.c built: LD_PRELOAD it to deny or mute nftables' netlink for a
    Python process (a hook, a command) while the nft it spawns works."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        pytest.skip("needs a C compiler for the netlink shim")
    out = tmp_path_factory.mktemp("shim") / "netlink_shim.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(out), str(netlab.REPO / "tests" / "shims" / "netlink_shim.c"), "-ldl"],
                   check=True, capture_output=True)
    return str(out)
