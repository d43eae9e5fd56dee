"""What install.sh installs, driving a real libvirtd: the hooks from the install tree (not
the repository's copies) allow and block real QEMU guests, and after `nft flush ruleset`
the installed `smtp-gate watch` blocks SMTP again, keeping the allowance (how fast:
bench/bench_recovery.py; here only a give-up deadline).

install.sh runs with --root into a temporary tree; the app there is a clone of this
repository's committed HEAD, and its hooks find their configuration at the install tree's
own config/smtp-gate.conf, as on a real host.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from tests import libvirt_lab

pytestmark = pytest.mark.libvirt

REPO = Path(__file__).resolve().parent.parent
BLOCKED = (25, 465)
RESTORE_GIVE_UP = 30.0  # seconds: a deadline to stop waiting, not a speed claim (bench/bench_recovery.py measures it)
ALLOWED, BLOCKED_GUEST = "installed-allowed", "installed-blocked"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[libvirt_lab.LibvirtLab, Path, Path]]:
    reason = libvirt_lab.missing_requirements()
    if reason:
        pytest.skip(reason)
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("install.sh installs a git checkout: this tree is not one")
    tmp = tmp_path_factory.mktemp("installed")
    root = tmp / "root"
    result = subprocess.run([str(REPO / "install.sh"), "--root", str(root), "--no-venv"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    app = root / "usr" / "local" / "smtp-gate"
    hook = root / "etc" / "libvirt" / "hooks" / "qemu.d" / "smtp-gate"
    assert hook.is_symlink() and Path(os.path.realpath(hook)) == app / "hooks" / "qemu"
    run_dir = tmp / "run"
    (tmp / "whitelist.csv").write_text(
        f"# vmname,mac,added_at,added_by,reason\n{ALLOWED},,2026-11-25T00:00:00+00:00,e2e,installed hooks\n"
    )
    with libvirt_lab.LibvirtLab(tmp, hooks={"qemu": hook}) as lab:
        (app / "config" / "smtp-gate.conf").write_text(
            'BRIDGE="br0"\nUPLINKS="uplink"\n'
            f'BLOCKED_PORTS="25,465"\nRUN_DIR="{run_dir}"\nWHITELIST="{tmp / "whitelist.csv"}"\nLIBVIRT_URI="{lab.uri}"\n'
            'METRICS_DIR=""\n'  # never the host's node_exporter directory
        )
        yield lab, app, run_dir


def installed_cli(app: Path, *args: str) -> list:
    """The installed application's code (PYTHONPATH wins over the test venv's editable
    install, and the working directory is not the repository); the venv's interpreter supplies lxml, libvirt and filelock, which a --no-venv
    install on this machine does not have."""
    return ["env", "-C", "/", f"PYTHONPATH={app}", sys.executable, "-m", "smtp_gate", *args]


def cli(lab: libvirt_lab.LibvirtLab, app: Path, *args: str) -> "subprocess.CompletedProcess[str]":
    """The installed CLI, in the lab, with the hooks' view of the world."""
    return lab.run_in_netns(installed_cli(app, *args), private_mounts=True, check=False)


def latest_round(lab: libvirt_lab.LibvirtLab, name: str) -> int:
    return lab.probe_results(name).rounds


def test_installed_hooks_allow_and_block_and_watch_restores_after_a_flush(installed) -> None:
    lab, app, run_dir = installed
    for name, ip in ((BLOCKED_GUEST, 2), (ALLOWED, 3)):
        lab.start_guest(name, guest_ip=ip, hold=300, interval=1, connect_timeout=1, ports=(80,) + BLOCKED)
    blocked = lab.wait_round(BLOCKED_GUEST, 1, timeout=120)
    allowed = lab.wait_round(ALLOWED, 1, timeout=120)
    for family in ("v4", "v6"):
        for port in BLOCKED:
            assert blocked.round(1)[(family, port)] == "blocked", blocked.console[-2000:]
            assert allowed.round(1)[(family, port)] == "open", allowed.console[-2000:]
        assert blocked.round(1)[(family, 80)] == "open"
    assert (run_dir / "records").is_dir(), "the installed hooks wrote their records"

    where = lab.run_in_netns(["env", "-C", "/", f"PYTHONPATH={app}", sys.executable, "-c",
                              "import smtp_gate; print(smtp_gate.__file__)"])
    assert where.stdout.strip() == str(app / "smtp_gate" / "__init__.py")
    watcher = lab.popen_in_netns(
        installed_cli(app, "watch"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        time.sleep(1.5)
        flushed_at = time.monotonic()
        lab.run_in_netns(["nft", "flush", "ruleset"])
        while "table bridge smtp_gate" not in lab.run_in_netns(["nft", "list", "tables"]).stdout:
            assert time.monotonic() - flushed_at < RESTORE_GIVE_UP, "enforcement not restored: giving up"
            time.sleep(0.02)
        # rounds that start after the restore: blocked again for one guest, still open for the other
        start = max(latest_round(lab, BLOCKED_GUEST), latest_round(lab, ALLOWED)) + 1
        later_blocked = lab.wait_round(BLOCKED_GUEST, start + 1, timeout=60)
        later_allowed = lab.wait_round(ALLOWED, start + 1, timeout=60)
    finally:
        os.killpg(watcher.pid, signal.SIGTERM)
        _out, err = watcher.communicate(timeout=20)
    for family in ("v4", "v6"):
        for port in BLOCKED:
            assert later_blocked.round(start + 1)[(family, port)] == "blocked"
            assert later_allowed.round(start + 1)[(family, port)] == "open", "the restore kept the allowance"
    assert "restored in" in err
    status = cli(lab, app, "status", "--no-libvirt")
    assert status.returncode == 0, status.stdout + status.stderr
