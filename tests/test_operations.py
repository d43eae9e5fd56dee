"""What the operator meets when something around a command is absent or broken: a dry run
writes nothing, every apply reads the whitelist for its problems, an operating-system error
names the config key and what was expected, the off-switch works without a usable RUN_DIR,
and `list`, `debug`, `--help` and `guest-bridges` say what is so, each in one line."""

import shutil
from pathlib import Path
from typing import Dict, Tuple

import pytest

from tests import testdriver
from tests.netlab import BridgeLab

HEADER = "# vmname,mac,added_at,added_by,reason\n"
BAD_MAC_ROW = "web1,52:54:0:ab:cd:ef,2026-11-25T14:03:07+00:00,alice,typo\n"
EXPECTED_RUN_DIR = "expected a directory smtp-gate can write (default /run/smtp-gate)"


def tree(root: Path) -> Dict[str, Tuple[int, bytes, int]]:
    """Every file and directory under ROOT: (mode, content, mtime in ns)."""
    out = {}
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, b"" if path.is_dir() else path.read_bytes(), st.st_mtime_ns)
    return out


def table_installed(lab: BridgeLab) -> bool:
    return "table bridge smtp_gate" in lab.nft("list", "tables").stdout


def answering(lab: BridgeLab, running: int = 1) -> str:
    """A libvirt (the test driver) that answers, with RUNNING guests whose ports are on br0."""
    uri = testdriver.write_node(lab.tmp, running=running, nics=1)
    for i in range(running):
        lab.add_guest(f"vm{i}", testdriver.target(i, 0), 20 + i, mac=testdriver.mac(i, 0))
    return uri


# ------------------------------------------------------------------------------ dry run
@pytest.mark.kernel
@pytest.mark.parametrize("libvirt", ["answering", "not answering", "--no-libvirt"])
def test_a_dry_run_creates_no_run_directory(bare_lab: BridgeLab, libvirt: str) -> None:
    lab = bare_lab
    if libvirt == "answering":
        lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="{answering(lab)}"\n')
    before = tree(lab.tmp)
    r = lab.smtp_gate("apply", "--dry-run", *(["--no-libvirt"] if libvirt == "--no-libvirt" else []), check=False)
    assert r.returncode == 0, r.stderr
    assert "table bridge smtp_gate" in r.stdout and "nothing was changed" in r.stderr
    assert not (lab.tmp / "run").exists(), "a dry run created RUN_DIR"
    assert tree(lab.tmp) == before
    assert not table_installed(lab)


@pytest.mark.kernel
def test_a_dry_run_leaves_an_existing_run_directory_as_it_was(bare_lab: BridgeLab) -> None:
    """A run directory as the hooks leave it before the first rebuild (lock, records, a
    journal, no rebuild.lock), with libvirt answering: nothing in it is created or changed."""
    lab = bare_lab
    lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="{answering(lab, running=2)}"\n')
    lab.smtp_gate("apply", "--no-libvirt")
    shutil.rmtree(lab.tmp / "run")
    lab.start_guest(lab.guests["vm0"])  # the hook writes the lock, a record and the journal
    run = lab.tmp / "run"
    assert (run / "journal").stat().st_size > 0 and list((run / "records").iterdir())
    assert not (run / "rebuild.lock").exists()
    before = tree(run)
    r = lab.smtp_gate("apply", "--dry-run", check=False)
    assert r.returncode == 0, r.stderr
    assert tree(run) == before
    r = lab.smtp_gate("apply", check=False)  # the real apply writes them, as the dry run would have
    assert r.returncode == 0 and (run / "rebuild.lock").exists() and (run / "journal").stat().st_size == 0
