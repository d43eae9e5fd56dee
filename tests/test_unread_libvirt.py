"""A running guest whose domain XML libvirt cannot send (a live <description> of 1.1 M '<'
characters: XMLDesc fails with "Unable to encode message payload") on a real libvirtd
(tests/libvirt_lab.py), a real QEMU guest probing port 25 through the lab's bridge, and the
kernel of the lab's network namespace (attacker review of issue 11).

Before the fix, such a guest kept its allowance for up to an hour after the panel removed
it from the metadata (`virsh metadata … --remove --live --config`), list and status dropped
it silently, and `del-vm` said "not found".  Now its allowance is read alone
(virDomainGetMetadata: a small reply) and:

  * the watcher's round after the METADATA_CHANGE event deletes the (tap, MAC) pair, and the
    guest's own probes are blocked again; one log line says why;
  * a rebuild keeps its port a guest port, holds no allowance for it, and says so in one line;
  * `list` and `status` name the guest and exit 3;
  * `del-vm` with ALLOW_STORE=metadata removes an allowance the panel set again, through the
    metadata calls alone.
"""

import sys
from pathlib import Path

import pytest

try:
    from tests import libvirt_lab
    from tests.test_watch_libvirt import HOOK, NS, REPO, Env, wait_for
except ImportError:  # tests/ run as rootdir modules
    import libvirt_lab  # type: ignore[no-redef]
    from test_watch_libvirt import HOOK, NS, REPO, Env, wait_for  # type: ignore[no-redef]

pytestmark = pytest.mark.libvirt

GUEST = "bigdesc"
# a tenant's description (a panel feature) too big for libvirt's RPC once escaped
BIG = r'''
import libvirt, sys
dom = libvirt.open(sys.argv[1]).lookupByName(sys.argv[2])
dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, "<" * 1100000, None, None, libvirt.VIR_DOMAIN_AFFECT_LIVE)
try:
    dom.XMLDesc(0)
    print("XMLDesc still works")
except libvirt.libvirtError as exc:
    print("XMLDesc failed:", exc)
'''


def smtp_gate(e: Env, *args: str):  # type: ignore[no-untyped-def]
    cmd = ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "smtp_gate", "--config", str(e.config), *args]
    return e.lab.run_in_netns(cmd, private_mounts=True, check=False, timeout=120)


def test_an_unreadable_guest_loses_a_revoked_allowance_and_is_named(tmp_path: Path) -> None:
    reason = libvirt_lab.missing_requirements()
    if reason:
        pytest.skip(reason)
    (tmp_path / "config").mkdir()
    (tmp_path / "run").mkdir()
    lab = libvirt_lab.LibvirtLab(tmp_path, hooks={"qemu": HOOK}, binds={str(REPO / "config"): tmp_path / "config"})
    with lab:
        e = Env(lab, tmp_path)
        e.write_config()
        (tmp_path / "whitelist.csv").write_text("# vmname,mac,added_at,added_by,reason\n")
        e.cli("apply")
        lab.start_guest(GUEST, guest_ip=7, hold=600, interval=1, connect_timeout=2, ports=(25,),
                        metadata=f'<sg:allow xmlns:sg="{NS}" by="panel" reason="KYC"/>')
        assert lab.wait_round(GUEST, 1, timeout=120).round(1)[("v4", 25)] == "open"
        ((tap, mac),) = e.taps(GUEST)
        assert (tap, mac) in e.allowed()
        (tmp_path / "big.py").write_text(BIG)
        big = lab.run_in_netns([sys.executable, str(tmp_path / "big.py"), lab.uri, GUEST])
        assert "XMLDesc failed: " in big.stdout and "Unable to encode message payload" in big.stdout, big.stdout
        e.start_watcher()
        try:
            # the panel revokes: the watcher's round reads the element alone and deletes the pair
            lab.virsh("metadata", GUEST, NS, "--remove", "--live", "--config")
            wait_for(lambda: (tap, mac) not in e.allowed(), "the revoked allowance gone from the kernel")
            res = e.round_after(GUEST, lab.probe_results(GUEST).rounds)
            assert res.round(res.rounds)[("v4", 25)] == "blocked", res.console[-2000:]
            lines = [line for line in e.log().splitlines() if f"guest {GUEST!r}" in line]
            assert any(
                "its XML could not be read (Unable to encode message payload); its smtp-gate metadata (read alone) "
                f"carries no allowance; allowance revoked on {tap}/{mac}" in line for line in lines
            ), e.log()
        finally:
            e.stop_watcher()
        assert tap in [str(v) for v in e.elements("guest_ifaces")], "still a guest port: blocked, not unknown"

        rb = e.cli("rebuild")
        assert "guest skipped" not in rb.stderr
        assert f"guest {GUEST!r} (" in rb.stderr and "its XML could not be read (Unable to encode message payload)" in rb.stderr
        assert "carries no allowance; it held no allowance" in rb.stderr, rb.stderr
        assert (tap, mac) not in e.allowed() and tap in [str(v) for v in e.elements("guest_ifaces")]
        (record,) = e.records().values()
        assert record["allowed"] == [] and record["guest_ports"][0][0] == tap and record["unverified_since"] is not None

        # the panel allows it again: a guest that cannot be read is never widened (fail closed) ...
        lab.virsh("metadata", GUEST, NS, "--key", "smtpgate", "--set", '<allow by="panel"/>', "--live", "--config")
        rb = e.cli("rebuild")
        assert "its smtp-gate metadata (read alone) allows every NIC (by panel" in rb.stderr, rb.stderr
        assert (tap, mac) not in e.allowed()

        # ... and is named by list and status, never dropped silently
        listed = smtp_gate(e, "list")
        assert listed.returncode == 3, listed.stdout + listed.stderr
        assert f"warning: guest {GUEST!r} (" in listed.stderr
        assert "running: its XML could not be read: Unable to encode message payload" in listed.stderr
        st = smtp_gate(e, "status")
        assert st.returncode == 3, st.stdout + st.stderr
        assert f"warning: guest {GUEST!r} (" in st.stdout and "its XML could not be read: Unable to encode" in st.stdout

        # del-vm through the metadata store removes the panel's allowance with the small calls
        with open(e.config, "a") as handle:
            handle.write('ALLOW_STORE="metadata"\n')
        dv = smtp_gate(e, "del-vm", GUEST)
        assert dv.returncode == 0, dv.stdout + dv.stderr
        assert f"ok: removed the allowance from the libvirt metadata of guest {GUEST!r} (live and saved definition)" in dv.stdout
        assert "its XML could not be read (Unable to encode message payload)" in dv.stderr
        assert lab.virsh("metadata", GUEST, NS, "--live", check=False).returncode != 0
        assert lab.virsh("metadata", GUEST, NS, "--config", check=False).returncode != 0
        assert (tap, mac) not in e.allowed()
