"""Smoke tests of the libvirt lab harness itself (tests/libvirt_lab.py), with a real libvirtd + TCG guest.

Why: the product's end-to-end tests trust this harness to report "open"/"blocked" truthfully, to
call hooks like a production libvirtd would, and to leave the host exactly as it found it.
"""

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest

try:
    import libvirt_lab
except ImportError:  # tests/ turned into a package
    from tests import libvirt_lab  # type: ignore[no-redef]

LibvirtLab = libvirt_lab.LibvirtLab

pytestmark = pytest.mark.libvirt

BLOCK_25 = """table bridge labblock {
  chain forward {
    type filter hook forward priority -200; policy accept;
    iifname "vnet*" oifname "uplink" tcp dport 25 counter drop
  }
}
"""


@pytest.fixture(scope="module", autouse=True)
def _requirements() -> None:
    """Skip (with the reason) where the lab cannot run; installing packages is not a test's job."""
    reason = libvirt_lab.missing_requirements()
    if reason:
        pytest.skip(reason)


def _out(cmd: List[str]) -> str:
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def _host_state() -> Dict[str, object]:
    """What the lab must never change on the host: ruleset, links, libvirt files, our namespaces."""
    etc = []
    for base, dirs, files in os.walk("/etc/libvirt"):
        for f in sorted(dirs + files):
            p = os.path.join(base, f)
            st = os.lstat(p)
            etc.append((p, st.st_size, st.st_mtime_ns))
    return {
        "ruleset": _out(["nft", "list", "ruleset"]),
        "links": _out(["ip", "-o", "link", "show"]),
        "etc_libvirt": sorted(etc),
        "dirs": [d for d in ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt",
                             "/etc/libvirt/hooks") if os.path.lexists(d)],
        "passwd": Path("/etc/passwd").read_text(),
        "lab_netns": [n for n in _out(["ip", "netns", "list"]).split()
                      if n.startswith((libvirt_lab.NS_PREFIX, libvirt_lab.INET_PREFIX))],
    }


def _gone(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_guest_sees_ports_open_then_25_blocked_by_a_bridge_rule(tmp_path: Path, record_property) -> None:
    """Boot without any hook: everything open; add a bridge drop for 25 in the lab netns: 25 blocked."""
    before = _host_state()
    t0 = time.monotonic()
    with LibvirtLab(tmp_path) as lab:
        pids = [lab.libvirtd_pid()]
        assert lab.virsh("-q", "list", "--all").stdout.strip() == ""
        open_ = lab.boot_guest("smoke")
        # the guest booted Debian's kernel package from the suite's own cache, not this machine's /boot
        kernel_dir = libvirt_lab.cache_dir() / "kernel"
        assert re.fullmatch(r"linux-image-\S+-amd64 \S+", (kernel_dir / "version").read_text().strip())
        xml = (lab.state_dir / "smoke.xml").read_text()
        assert f"<kernel>{kernel_dir}/" in xml and "/boot/" not in xml, xml
        for fam in ("v4", "v6"):
            assert open_.probes[(fam, 80)] == "open", open_.console
            assert open_.probes[(fam, 25)] == "open", open_.console
        assert len(open_.macs) == 1 and open_.macs[0].startswith("52:54:00:")
        assert re.search(r"port 25 from .*10\.99\.0\.2", lab.listener_log())
        assert "starting up" in lab.qemu_log("smoke").read_text()  # written through virtlogd

        lab.run_in_netns(["nft", "-f", "-"], input=BLOCK_25)
        assert "labblock" not in _out(["nft", "list", "ruleset"])  # the host ruleset is untouched
        blocked = lab.boot_guest("smoke")
        for fam in ("v4", "v6"):
            assert blocked.probes[(fam, 25)] == "blocked", blocked.console
            assert blocked.probes[(fam, 80)] == "open", blocked.console
            assert blocked.probes[(fam, 465)] == "open", blocked.console
        # blocked from the very first attempt: round 1 is the guest's first connect
        first = [r for r in blocked.results if r.port == 25 and r.round == 1]
        assert len(first) == 2 and all(r.status == "blocked" for r in first)
        counters = lab.run_in_netns(["nft", "list", "table", "bridge", "labblock"]).stdout
        assert re.search(r"counter packets [1-9]", counters), counters
        timings = dict(lab.timings)
    total = time.monotonic() - t0
    after = _host_state()
    assert after == before
    assert all(_gone(p) for p in pids if p)
    timings.update({"boot_open": open_.timings["boot_to_shutoff"],
                    "boot_blocked": blocked.timings["boot_to_shutoff"], "total": total})
    record_property("lab_timings", {k: round(v, 2) for k, v in timings.items()})
    print("libvirt lab timings (s):", {k: round(v, 2) for k, v in timings.items()})


def test_hooks_reconnect_and_two_nics(tmp_path: Path) -> None:
    """A hook in qemu.d runs in the lab netns with the domain XML; a daemon restart fires reconnect."""
    log = tmp_path / "hook.log"
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\n"
                    "# records: op subop netns and the MACs of the domain XML on stdin\n"
                    "xml=$(cat)\n"
                    "macs=$(printf '%%s' \"$xml\" | grep -o \"mac address='[^']*'\" | tr '\\n' ' ')\n"
                    "echo \"$2 $3 $(readlink /proc/self/ns/net) $macs\" >> %s\n" % log)
    hook.chmod(0o755)
    with LibvirtLab(tmp_path, hooks={"qemu": hook}, record_hooks=True) as lab:
        assert (lab.hooks_dir / "qemu.d" / "hook.sh").resolve() == hook.resolve()
        netns = lab.run_in_netns(["readlink", "/proc/self/ns/net"]).stdout.strip()
        lab.start_guest("h1", nics=2, hold=60)
        res = lab.wait_round("h1", 1, timeout=90)
        assert res.probes[("v4", 25)] == "open" and res.state == "running", res.console
        assert len(res.macs) == 2 and res.macs[1] == "52:54:00:aa:01:02"
        links = lab.run_in_netns(["ip", "-o", "link", "show", "master", "br0"]).stdout
        assert " h1n1:" in links and " vnet" in links, links
        lab.restart_libvirtd()  # its own deadlines raise LabError; how long it took is in lab.timings
        lab.virsh("destroy", "h1")
        calls = [line.split() for line in log.read_text().splitlines()]
        ops = [" ".join(c[:2]) for c in calls]
        assert ops == ["prepare begin", "start begin", "started begin", "reconnect begin",
                       "stopped end", "release end"], ops
        assert all(c[2] == netns for c in calls)
        assert all("mac address='%s'" % m in log.read_text() for m in res.macs)
        recorded = lab.hook_calls()
        assert [c["argv"][2:4] for c in recorded] == [c[:2] for c in calls]
        assert recorded[0]["argv"][4] == "-" and "<domain" in recorded[0]["xml"]
