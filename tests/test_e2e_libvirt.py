"""smtp-gate end to end: a real libvirtd runs the repository's hooks/qemu while real QEMU (TCG)
guests probe TCP 25/465/587/80 on an "internet" from their first seconds (tests/libvirt_lab.py).

What is proven comes from the guests' own probes (every attempt, with its round and guest
uptime) and from the kernel state in the lab's network namespace:
  * a guest the whitelist does not allow is blocked on every blocked port from its first
    attempt, whether `smtp-gate apply` ran before or nothing was installed at all (the
    `prepare begin` hook then installs the base table itself);
  * a guest allowed by MAC (only that NIC: its second NIC stays blocked) or by name connects
    from its first attempt;
  * `smtp-gate rebuild` reproduces exactly what the hooks installed, and keeps it when
    libvirtd is down;
  * a libvirtd restart (`reconnect begin` for every running guest) changes nothing and the
    allowed guest's probes keep succeeding across it;
  * `virsh destroy` removes the allowance from the kernel and from `status --json`;
  * with nft failing, the hooks still exit 0, the guest starts and stays blocked (and the next
    rebuild repairs it).

One lab (libvirtd, bridge, internet) serves the whole module; the guests stay up (hold) so
that later tests can use them, and are started two at a time (each TCG boot takes seconds).

The hooks read their configuration from the default path `<repo>/config/smtp-gate.conf` (libvirt
strips the environment): a test directory is bind-mounted over `<repo>/config` in the lab's
private mount namespace only.  The CLI runs in the same namespaces (`private_mounts=True`), so
it shares the lock file and run directory with the hooks.  The host is checked untouched at the
end (ruleset, links, /etc/libvirt, /etc/passwd, the repository's config directory, nft).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

try:
    from tests import libvirt_lab
except ImportError:  # tests/ run as rootdir modules
    import libvirt_lab  # type: ignore[no-redef]

pytestmark = pytest.mark.libvirt

REPO = Path(__file__).resolve().parent.parent
HOOK = REPO / "hooks" / "qemu"
NFT = "/usr/sbin/nft"  # where the hooks find nft (libvirt's PATH starts with /usr/sbin; /sbin -> usr/sbin)
BLOCKED = (25, 465, 587)
FAMILIES = ("v4", "v6")
HOLD = 400  # guests stay up for the whole module; teardown destroys them
TIMEOUT = 3  # the guests' connect timeout (s): "blocked" = no answer within it; open takes ~0.3 s
UPLINK = "uplink"  # the lab's uplink port on br0 (tests/libvirt_lab.py _setup_net)

# the guests, their addresses (10.99.0.g) and the MACs the whitelist names
UNLISTED_BOOT = "unlisted-boot"  # started before anything was applied
MAC_GUEST = "mac-2nic"  # NIC 0 allowed by a MAC row, NIC 1 not listed
UNLISTED = "unlisted"  # started after `smtp-gate apply`
NAME_GUEST = "by-name"  # allowed by a name row (every NIC)
BROKEN = "nft-broken"  # allowed by a MAC row, started while nft fails
IPS = {UNLISTED_BOOT: 2, MAC_GUEST: 3, UNLISTED: 4, NAME_GUEST: 5, BROKEN: 6}
MAC_ALLOWED = "52:54:00:5e:00:03"  # mac-2nic's eth0
MAC_BROKEN = "52:54:00:5e:00:06"
WHITELIST = (
    "# vmname,mac,added_at,added_by,reason\n"
    f"mac-2nic-eth0,{MAC_ALLOWED},2026-01-01T00:00:00+00:00,e2e,by MAC: only this NIC\n"
    f"{NAME_GUEST},,2026-01-01T00:00:00+00:00,e2e,by name: every NIC\n"
    f"nft-broken-eth0,{MAC_BROKEN},2026-01-01T00:00:00+00:00,e2e,allowed but nft fails at its start\n"
)

# installed as qemu.d/zz-table-probe: libvirt runs qemu.d/ in name order, so this runs right
# after our hook (qemu.d/qemu) and sees what it left: is our table there?
TABLE_PROBE = """#!/bin/sh
cat >/dev/null
[ "$1" = "{guest}" ] || exit 0
n=$(nft list tables bridge 2>/dev/null | grep -c "^table bridge smtp_gate")
echo "$2 $3 $n" >> {log}
"""

DENIED_HOOK = """#!/bin/sh
# smtp-gate e2e test: our hook without CAP_NET_ADMIN, so nftables refuses what it sends over netlink
exec setpriv --bounding-set -net_admin --inh-caps -net_admin /usr/bin/python3 {hook} "$@"
"""

FAILING_NFT = """#!/bin/sh
# smtp-gate e2e test: nft that always fails, bind-mounted over {nft} in the lab's mounts only
echo "$$ $*" >> {log}
echo "nft: disabled by the smtp-gate e2e test" >&2
exit 1
"""


# ----------------------------------------------------------------------------- helpers

def _out(cmd: List[str]) -> str:
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def _tree(path: str) -> List[Tuple[str, int, int]]:
    out = []
    for base, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            p = os.path.join(base, name)
            st = os.lstat(p)
            out.append((p, st.st_size, st.st_mtime_ns))
    return sorted(out)


def host_state() -> Dict[str, object]:
    """What the lab must never change on this machine."""
    nft = os.stat(NFT)
    return {
        "ruleset": _out(["nft", "list", "ruleset"]),
        "links": _out(["ip", "-o", "link", "show"]),
        "etc_libvirt": _tree("/etc/libvirt"),
        "repo_config": _tree(str(REPO / "config")),
        "nft": (nft.st_ino, nft.st_size, nft.st_mtime_ns),
        # the lab adds libvirt-qemu in its own view only (the whole files may change meanwhile:
        # this machine is shared, and apt adds users)
        "passwd": [l for l in Path("/etc/passwd").read_text().splitlines() if "libvirt" in l],
        "group": [l for l in Path("/etc/group").read_text().splitlines() if "libvirt" in l],
        "mounts": sorted(line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                         if line.split()[1].startswith((str(REPO), NFT, "/etc/libvirt"))),
    }


class E2E:
    """The module's lab plus the product's files and helpers to look at the kernel and the CLI."""

    def __init__(self, lab: libvirt_lab.LibvirtLab, root: Path) -> None:
        self.lab = lab
        self.root = root
        self.config_dir = root / "config"  # bind-mounted over <repo>/config for the lab
        self.run_dir = root / "run"
        self.whitelist = root / "whitelist.csv"
        self.config = self.config_dir / "smtp-gate.conf"
        self.started: Dict[str, float] = {}
        self.table_probe_log = root / "table-probe.log"

    def write_config(self) -> None:
        self.whitelist.write_text(WHITELIST)
        self.config.write_text(
            "# smtp-gate e2e test config (the hooks find it at <repo>/config/smtp-gate.conf)\n"
            'BRIDGE="br0"\n'
            f'UPLINKS="{UPLINK}"\n'
            f'BLOCKED_PORTS="{",".join(str(p) for p in BLOCKED)}"\n'
            f'RUN_DIR="{self.run_dir}"\n'
            f'WHITELIST="{self.whitelist}"\n'
            f'LIBVIRT_URI="{self.lab.uri}"\n'
            'METRICS_DIR=""\n'  # never the host's node_exporter directory
        )

    # -- the product ----------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 60) -> "subprocess.CompletedProcess[str]":
        """`python -m smtp_gate --config CONF ARGS` in the lab netns with the hooks' mounts."""
        cmd = ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "smtp_gate", "--config", str(self.config), *args]
        return self.lab.run_in_netns(cmd, private_mounts=True, check=False, timeout=timeout)

    def cli_ok(self, *args: str) -> "subprocess.CompletedProcess[str]":
        proc = self.cli(*args)
        assert proc.returncode == 0, f"smtp-gate {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def status(self) -> dict:
        return json.loads(self.cli_ok("status", "--json").stdout)

    # -- the kernel (read with the host's real nft, in the lab netns) ----------------
    def table_exists(self) -> bool:
        proc = self.lab.run_in_netns(["nft", "list", "tables", "bridge"])
        return "table bridge smtp_gate" in proc.stdout

    def set_elements(self, name: str) -> List[object]:
        """Elements of one of our sets, as nft -j gives them (concatenations as tuples)."""
        proc = self.lab.run_in_netns(["nft", "-j", "list", "set", "bridge", "smtp_gate", name])
        out: List[object] = []
        for item in json.loads(proc.stdout)["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                if isinstance(elem, dict) and "elem" in elem:
                    elem = elem["elem"]["val"]
                if isinstance(elem, dict) and "concat" in elem:
                    elem = tuple(elem["concat"])
                out.append(elem)
        return out

    def allowed(self) -> Set[Tuple[str, str]]:
        """The `allowed` set: (port as nft names it, MAC) pairs."""
        pairs = [tuple(str(v) for v in e) for e in self.set_elements("allowed")]  # type: ignore[union-attr]
        assert len(pairs) == len(set(pairs))
        return set(pairs)  # type: ignore[arg-type]

    def state(self) -> Dict[str, object]:
        """What hooks and rebuilds must agree on: the allowed and guest_ports sets, and the records."""
        records = {}
        for path in sorted((self.run_dir / "records").glob("*.json")):
            records[path.name] = json.loads(path.read_text())
        return {"allowed": sorted(self.allowed()), "guest_ports": sorted(map(str, self.set_elements("guest_ifaces"))),
                "records": records}

    # -- guests ---------------------------------------------------------------------
    def start(self, name: str, **kwargs: object) -> None:
        t = time.monotonic()
        self.lab.start_guest(name, guest_ip=IPS[name], hold=HOLD, connect_timeout=TIMEOUT, **kwargs)  # type: ignore[arg-type]
        self.started[name] = time.monotonic() - t

    def taps(self, name: str) -> List[Tuple[str, str]]:
        """(tap, MAC) of each NIC of a running guest, in XML order (virsh domiflist)."""
        out = self.lab.virsh("domiflist", name).stdout
        rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
        return [(row[0], row[4]) for row in rows]

    def connections_from(self, name: str) -> List[str]:
        """Listener log lines of connections the guest made (any of its addresses)."""
        g = IPS[name]
        own = re.compile(r"from (?:::ffff:)?(?:10\.9[6-9]\.0\.%d|fd9[6-9]::%x)$" % (g, g))
        return [line for line in self.lab.listener_log().splitlines() if own.search(line)]

    def hook_ops(self, name: str, since: float = 0.0) -> List[str]:
        return [" ".join(c["argv"][2:4]) for c in self.lab.hook_calls()
                if c["argv"][1] == name and c["time"] >= since]


def assert_round(res: libvirt_lab.GuestResult, n: int, want: str, ports=BLOCKED, nic: Optional[str] = None) -> None:
    """Every probe of round n on nic (default: the first probing NIC) to ports has status want."""
    got = res.round(n, nic)
    for fam in FAMILIES:
        for port in ports:
            assert got.get((fam, port)) == want, (
                f"{res.name} {nic or 'eth0'} round {n} {fam} port {port}: {got.get((fam, port))}, want {want}\n"
                + res.console[-3000:])


def assert_first_attempts(res: libvirt_lab.GuestResult, want: str, nic: Optional[str] = None) -> None:
    """The guest's very first attempt on every blocked port and family had status want, and 80 was open."""
    nic = nic or res.nics[0]
    for fam in FAMILIES:
        for port in BLOCKED + (80,):
            attempts = sorted((r for r in res.results if (r.family, r.port, r.nic) == (fam, port, nic)),
                              key=lambda r: r.round)
            assert attempts, f"{res.name}: no probe {fam} {port} on {nic}\n{res.console[-3000:]}"
            first = attempts[0]
            assert first.round == 1, first  # the init's first connect, whenever the guest got to it
            assert first.status == (want if port in BLOCKED else "open"), (first, res.console[-3000:])


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    reason = libvirt_lab.missing_requirements()
    if reason:
        pytest.skip(reason)
    before = host_state()
    root = tmp_path_factory.mktemp("e2e")
    (root / "config").mkdir()
    (root / "run").mkdir()
    t = time.monotonic()
    lab = libvirt_lab.LibvirtLab(root, hooks={"qemu": HOOK}, record_hooks=True,
                                 binds={str(REPO / "config"): root / "config"})
    with lab:
        env = E2E(lab, root)
        env.write_config()
        # what the hooks will read, through the default path, in the daemons' mount namespace
        seen = lab.run_in_netns(["cat", str(REPO / "config" / "smtp-gate.conf")], private_mounts=True).stdout
        assert seen == env.config.read_text()
        yield env
        timings = {k: round(v, 2) for k, v in {**lab.timings, **{"virsh_start:" + k: v for k, v in env.started.items()}}.items()}
        print("\ne2e lab timings (s):", timings, "module: %.1f" % (time.monotonic() - t))
    assert host_state() == before, "the lab changed this machine"


@pytest.fixture(scope="module")
def first_boot(e2e: E2E) -> Dict[str, libvirt_lab.GuestResult]:
    """The first guests after "boot": nothing applied, our table absent; `prepare begin` must
    install it.  An unlisted guest, and a 2-NIC guest whose eth0 MAC is whitelisted (each NIC
    probes from its own subnet, so each NIC's probes leave through its own tap)."""
    lab = e2e.lab
    assert not e2e.table_exists(), "the lab starts without our table"
    assert not (e2e.run_dir / "records").exists()
    probe = e2e.root / "table-probe"
    probe.write_text(TABLE_PROBE.format(guest=UNLISTED_BOOT, log=e2e.table_probe_log))
    probe.chmod(0o755)
    lab.install_hook("qemu", probe, name="zz-table-probe")
    e2e.start(UNLISTED_BOOT)
    e2e.start(MAC_GUEST, nics=2, macs=[MAC_ALLOWED], probe_nic=[0, 1])
    return {name: lab.wait_round(name, 1, timeout=120) for name in (UNLISTED_BOOT, MAC_GUEST)}


@pytest.fixture(scope="module")
def after_apply(e2e: E2E, first_boot: Dict[str, libvirt_lab.GuestResult]) -> Dict[str, libvirt_lab.GuestResult]:
    """`smtp-gate apply`, then an unlisted guest and a guest allowed by name (re-probing every 2 s)."""
    out = e2e.cli_ok("apply")
    assert "warning" not in out.stderr, out.stderr
    assert [mac for _port, mac in e2e.allowed()] == [MAC_ALLOWED]
    e2e.start(UNLISTED)
    e2e.start(NAME_GUEST, interval=2)
    results = {name: e2e.lab.wait_round(name, 1, timeout=120) for name in (UNLISTED, NAME_GUEST)}
    results.update(first_boot)
    return results


# ----------------------------------------------------------------------------- tests

def test_unlisted_guest_blocked_from_first_attempt_with_nothing_applied(
        e2e: E2E, first_boot: Dict[str, libvirt_lab.GuestResult]) -> None:
    """1 (no apply): the prepare hook installs the base table; the very first guest is blocked
    on 25/465/587, v4 and v6, from its first attempt, while 80 is open."""
    res = first_boot[UNLISTED_BOOT]
    assert_first_attempts(res, "blocked")
    assert not [line for line in e2e.connections_from(UNLISTED_BOOT) if re.search(r"port (25|465|587) ", line)], \
        "no blocked port ever accepted a connection from it"
    assert e2e.hook_ops(UNLISTED_BOOT)[:3] == ["prepare begin", "start begin", "started begin"]
    # absent before (the fixture checked), present right after our `prepare begin` hook ran
    assert e2e.table_probe_log.read_text().splitlines()[:3] == ["prepare begin 1", "start begin 1", "started begin 1"]
    assert e2e.table_exists()
    ((tap, mac),) = e2e.taps(UNLISTED_BOOT)
    assert tap in e2e.set_elements("guest_ifaces")
    assert not [p for p in e2e.allowed() if p[1] == mac]
    assert e2e.set_elements("uplinks") == [UPLINK]


def test_unlisted_guest_blocked_from_first_attempt_after_apply(
        e2e: E2E, after_apply: Dict[str, libvirt_lab.GuestResult]) -> None:
    """1 (apply first): a guest started after `smtp-gate apply` is blocked from its first attempt."""
    res = after_apply[UNLISTED]
    assert_first_attempts(res, "blocked")
    assert not [line for line in e2e.connections_from(UNLISTED) if re.search(r"port (25|465|587) ", line)]
    assert [line for line in e2e.connections_from(UNLISTED) if re.search(r"port 80 ", line)]
    mac = e2e.taps(UNLISTED)[0][1]
    assert not [p for p in e2e.allowed() if p[1] == mac]


def test_guest_allowed_by_mac_connects_from_first_attempt_its_other_nic_stays_blocked(
        e2e: E2E, first_boot: Dict[str, libvirt_lab.GuestResult]) -> None:
    """2 (MAC row): eth0, whose MAC is listed, connects on 25/465/587 from its first attempt
    (even with nothing applied before); eth1 of the same guest, not listed, is blocked."""
    res = first_boot[MAC_GUEST]
    assert res.nics == ["eth0", "eth1"] and res.macs[0] == MAC_ALLOWED, res.console[-2000:]
    assert_first_attempts(res, "open", nic="eth0")
    assert_first_attempts(res, "blocked", nic="eth1")
    (tap0, mac0), (tap1, mac1) = e2e.taps(MAC_GUEST)
    assert mac0 == MAC_ALLOWED and tap0.startswith("vnet") and tap1 == "mac-2nicn1"
    mine = {p for p in e2e.allowed() if p[1] in (mac0, mac1)}
    assert mine == {(tap0, MAC_ALLOWED)}, "allowed on its own port's index, and only that NIC"
    assert {tap0, tap1} <= set(e2e.set_elements("guest_ifaces"))


def test_guest_allowed_by_name_connects_from_first_attempt(
        e2e: E2E, after_apply: Dict[str, libvirt_lab.GuestResult]) -> None:
    """2 (name row): every blocked port opens from the guest's first attempt, v4 and v6."""
    res = after_apply[NAME_GUEST]
    assert_first_attempts(res, "open")
    ((tap, mac),) = e2e.taps(NAME_GUEST)
    assert (tap, mac) in e2e.allowed()
    assert [line for line in e2e.connections_from(NAME_GUEST) if " port 25 " in line]


def test_rebuild_reproduces_the_hooks_state_and_keeps_it_without_libvirtd(
        e2e: E2E, after_apply: Dict[str, libvirt_lab.GuestResult]) -> None:
    """6: with allowed and blocked guests running (two of them known only through their hooks),
    `rebuild` changes neither set nor any record; with libvirtd stopped, it exits 0 with a
    warning and keeps every allowance."""
    before = e2e.state()
    assert len(before["allowed"]) == 2 and len(before["records"]) == 4, before  # type: ignore[arg-type]
    out = e2e.cli_ok("rebuild")
    assert "warning" not in out.stderr, out.stderr
    assert e2e.state() == before

    e2e.lab.stop_libvirtd()
    try:
        proc = e2e.cli("rebuild")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "warning" in proc.stderr, proc.stderr
        assert e2e.state() == before
    finally:
        e2e.lab.start_libvirtd()
    res = e2e.lab.probe_results(NAME_GUEST)
    assert_round(res, res.rounds, "open")


def test_libvirtd_restart_keeps_a_running_allowed_guest_allowed(
        e2e: E2E, after_apply: Dict[str, libvirt_lab.GuestResult]) -> None:
    """4: libvirtd restarts, `reconnect begin` runs for every running guest; the allowed guest's
    probes succeed in every round before, during and after, and the kernel state is unchanged
    (its allowance present exactly once)."""
    lab = e2e.lab
    running = set(lab.virsh("list", "--name").stdout.split())
    before = e2e.state()
    journal = (e2e.run_dir / "journal").read_bytes() if (e2e.run_dir / "journal").exists() else b""
    rounds_before = lab.probe_results(NAME_GUEST).rounds
    t = time.time()
    lab.restart_libvirtd()
    rounds_at_restart = lab.probe_results(NAME_GUEST).rounds
    # round rounds_at_restart + 1 may have begun before the restart ended; the next one cannot
    res = lab.wait_round(NAME_GUEST, rounds_at_restart + 2, timeout=60)
    reconnected = {c["argv"][1] for c in lab.hook_calls() if c["time"] >= t and c["argv"][2:4] == ["reconnect", "begin"]}
    assert reconnected == running, (reconnected, running)
    for n in range(1, res.rounds + 1):
        assert_round(res, n, "open", ports=BLOCKED + (80,))
    assert res.rounds >= rounds_before + 2
    after = e2e.state()
    assert after == before
    ((tap, mac),) = e2e.taps(NAME_GUEST)
    assert [p for p in e2e.allowed() if p[1] == mac] == [(tap, mac)]
    # reconnect found every record matching and did nothing: no new start in the journal
    now = (e2e.run_dir / "journal").read_bytes() if (e2e.run_dir / "journal").exists() else b""
    assert now == journal, now[len(journal):]


def test_virsh_destroy_removes_the_allowance(e2e: E2E, after_apply: Dict[str, libvirt_lab.GuestResult]) -> None:
    """3: `virsh destroy` of the running allowed 2-NIC guest: its allowance leaves the kernel,
    its ports leave guest_ports, `status --json` no longer lists it, its record is gone; the
    other allowed guest keeps its allowance."""
    (tap0, mac0), (tap1, _mac1) = e2e.taps(MAC_GUEST)
    assert (tap0, MAC_ALLOWED) in e2e.allowed()
    other = e2e.taps(NAME_GUEST)[0]
    assert MAC_ALLOWED in [a["mac"] for a in e2e.status()["allowed"]]
    t = time.time()
    e2e.lab.virsh("destroy", MAC_GUEST)
    assert e2e.hook_ops(MAC_GUEST, since=t) == ["stopped end", "release end"]
    assert not [p for p in e2e.allowed() if p[1] == MAC_ALLOWED]
    assert other in e2e.allowed()
    ports = set(map(str, e2e.set_elements("guest_ifaces")))
    assert tap1 not in ports and tap0 not in ports, ports
    status = e2e.status()
    assert MAC_ALLOWED not in [a["mac"] for a in status["allowed"]], status["allowed"]
    assert (other[0], other[1]) in [(a["port"], a["mac"]) for a in status["allowed"]]
    assert not [g for g in status.get("guests", []) if g.get("name") == MAC_GUEST and g.get("state") == "running"]
    records = [json.loads(p.read_text()) for p in (e2e.run_dir / "records").glob("*.json")]
    assert MAC_GUEST not in [r["name"] for r in records]


def test_failing_nft_never_stops_a_guest_and_it_stays_blocked(e2e: E2E, tmp_path: Path) -> None:
    """5: nftables fails for the hooks, both ways they could reach it: the nft command (a failing
    script bind-mounted over /usr/sbin/nft in the lab's mounts) and netlink (the hook runs
    without CAP_NET_ADMIN, so the kernel refuses its requests, and no hook retries that with
    nft), after the real nft installed the base table.  `virsh start` succeeds (the hooks exit 0), the guest, whitelisted by MAC, is
    blocked from its first attempt; once nftables works again, the next rebuild allows it."""
    lab = e2e.lab
    e2e.cli_ok("apply")  # the base table, by the real nft
    assert e2e.table_exists()
    calls = tmp_path / "nft-calls.log"
    calls.touch()
    fake = tmp_path / "nft"
    fake.write_text(FAILING_NFT.format(nft=NFT, log=calls))
    fake.chmod(0o755)
    denied = tmp_path / "qemu-without-net-admin"
    denied.write_text(DENIED_HOOK.format(hook=HOOK))
    denied.chmod(0o755)
    lab.bind_mount(fake, NFT)
    lab.install_hook("qemu", denied, name=HOOK.name)  # replaces the link to the repo's hook
    try:
        assert lab.run_in_netns([NFT, "list", "tables"], private_mounts=True, check=False).returncode == 1
        calls.write_text("")
        t = time.time()
        e2e.start(BROKEN, macs=[MAC_BROKEN], interval=1)  # virsh start succeeded, or LabError
        res = lab.wait_round(BROKEN, 1, timeout=120)
    finally:
        lab.unmount(NFT)
        lab.install_hook("qemu", HOOK, name=HOOK.name)
    assert lab.run_in_netns([NFT, "--version"], private_mounts=True).returncode == 0
    assert lab.domstate(BROKEN) == "running"
    assert e2e.hook_ops(BROKEN, since=t)[:3] == ["prepare begin", "start begin", "started begin"]
    # the kernel's refusal (EPERM) is final: no hook retries it with nft, which would be refused too
    assert not calls.read_text().strip(), "a hook retried a kernel refusal with nft"
    assert "Hook script execution failed" not in lab.libvirtd_log.read_text()
    assert_first_attempts(res, "blocked")
    assert not [p for p in e2e.allowed() if p[1] == MAC_BROKEN]

    # the next rebuild repairs it: from the round after it, the guest connects
    e2e.cli_ok("rebuild")
    tap = e2e.taps(BROKEN)[0][0]
    assert (tap, MAC_BROKEN) in e2e.allowed()
    done = lab.probe_results(BROKEN).rounds
    res = lab.wait_round(BROKEN, done + 2, timeout=60)
    assert_round(res, done + 2, "open")
