"""Fleet end to end: the allowance lives in the guest's own libvirt metadata (urn:smtp-gate:1)
and follows a LIVE MIGRATION between two real libvirtds on this machine (issue 11, item 4).

Two labs side by side (tests/libvirt_lab.py): each its own network namespace, bridge, "internet",
libvirtd (distinct host_uuid: libvirt refuses to migrate to a daemon with its own UUID), the
repository's qemu hook and its own smtp-gate configuration, run directory and whitelist (empty:
no row allows anything).  libvirtd runs its hooks as its children, so lab A's hooks change
the `bridge smtp_gate` table of A's network namespace and B's that of B: the recorded hook
calls' netns say so, and each side's kernel is read in its own namespace.

The migration is the one a fleet's orchestrator runs::

    virsh -c <A> migrate --live --p2p --tunnelled [--persistent --undefinesource] GUEST \
        qemu+unix:///system?socket=<B's libvirt-sock>

--p2p: A's libvirtd opens B's unix socket itself (a filesystem path both labs see, so it
crosses network namespaces); --tunnelled: the memory stream goes through that same libvirt
connection, so no address of one namespace needs to be reachable from the other.  The guests
are disk-less (kernel + initramfs from the shared cache, same emulator path on both sides),
so nothing but memory moves; their serial console file is opened with append='on' so that
B's QEMU (which opens it while A's still writes) keeps the lines of both sides, in order.
Each lab's inet0 has the same MAC, as a fleet's gateway has: the guest's neighbour entries
stay valid on B.

What is proven, from the guests' own probes (every round, 1 s apart) and each kernel:
  * a guest DEFINED with the metadata, with no whitelist row at all, connects on 25/465/587
    from its first attempt;
  * the metadata set on a running guest with `virsh metadata --live --config` (as a panel does)
    is applied by `smtp-gate rebuild`;
  * after the migration, on B: the destination's hooks (migrate begin, prepare begin, start
    begin, started begin: each with the metadata in the XML on stdin) hold the allowance for
    the guest's NEW tap (B's ifindex) already at `start begin`, before the guest runs on B; its
    probes keep connecting through B's bridge and B's internet; the definition B saved
    (--persistent) carries the metadata;
  * a guest without any allowance stays blocked across the move (80 open, 25/465/587 blocked);
  * on A, once the source stops (stopped end, release end): its allowance, its guest port and
    its record are gone, and the journal's last word on it is `stop`;
  * `smtp-gate rebuild` on each side afterwards changes nothing.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

try:
    from tests import libvirt_lab
    from tests.test_e2e_libvirt import host_state
except ImportError:  # tests/ run as rootdir modules
    import libvirt_lab  # type: ignore[no-redef]
    from test_e2e_libvirt import host_state  # type: ignore[no-redef]

pytestmark = pytest.mark.libvirt

REPO = Path(__file__).resolve().parent.parent
HOOK = REPO / "hooks" / "qemu"
BLOCKED = (25, 465, 587)
FAMILIES = ("v4", "v6")
UPLINK = "uplink"
HOLD = 300  # the guests stay up for the whole module; teardown destroys them
TIMEOUT = 1  # the guests' connect timeout (s): "blocked" = no answer within it
INTERVAL = 1  # seconds between probe rounds
NS_URI = "urn:smtp-gate:1"
DEFINED_ALLOW = f'<smtpgate:allow xmlns:smtpgate="{NS_URI}" by="test" reason="defined with it"/>'
LIVE_ALLOW = '<allow by="panel" reason="set live"/>'

DEFINED = "meta-defined"  # defined with the metadata: allowed from its first probe
LIVE = "meta-live"  # started blocked; the metadata set on the running guest, then a rebuild
PLAIN = "plain"  # no allowance anywhere: blocked on both sides
IPS = {DEFINED: 2, LIVE: 3, PLAIN: 4}
# how each guest moves: the allowed ones as a fleet moves them (B keeps the definition, A
# forgets it), the blocked one transient on B with A keeping its (shut off) definition
MIGRATE_FLAGS = {DEFINED: ("--persistent", "--undefinesource"), LIVE: ("--persistent", "--undefinesource"),
                 PLAIN: ()}

# installed as qemu.d/zz-kernel-probe: libvirt runs qemu.d/ in name order, so this runs right
# after our hook (qemu.d/qemu) and logs what the kernel's `allowed` set held at that moment
KERNEL_PROBE = """#!/bin/sh
cat >/dev/null
echo "$1 $2 $3 $(nft -j list set bridge smtp_gate allowed 2>/dev/null | tr -d '\\n')" >> {log}
"""

WHITELIST = "# vmname,mac,added_at,added_by,reason\n"  # no row: only the metadata allows


# ----------------------------------------------------------------------------- helpers

class Side:
    """One lab with its own smtp-gate configuration, and how to look at its kernel and files."""

    def __init__(self, label: str, root: Path) -> None:
        self.label = label
        self.root = root
        self.config_dir = root / "config"  # bind-mounted over <repo>/config for this lab only
        self.config = self.config_dir / "smtp-gate.conf"
        self.run_dir = root / "run"
        self.whitelist = root / "whitelist.csv"
        self.kernel_probe_log = root / "kernel-at-hooks.log"
        self.watch_log = root / "watch.log"
        self.watcher: Optional[subprocess.Popen] = None
        self.watch_start = 0  # the length of its log once it made its first check
        self.lab: libvirt_lab.LibvirtLab  # set by the fixture

    def prepare(self) -> Path:
        """Directories and the kernel probe hook; returns the probe (for the lab's hooks)."""
        self.config_dir.mkdir(parents=True)
        self.run_dir.mkdir()
        self.kernel_probe_log.touch()
        probe = self.root / "zz-kernel-probe"
        probe.write_text(KERNEL_PROBE.format(log=self.kernel_probe_log))
        probe.chmod(0o755)
        return probe

    def write_config(self) -> None:
        self.whitelist.write_text(WHITELIST)
        self.config.write_text(
            f"# smtp-gate fleet e2e, lab {self.label} (its hooks read <repo>/config/smtp-gate.conf)\n"
            'BRIDGE="br0"\n'
            f'UPLINKS="{UPLINK}"\n'
            f'BLOCKED_PORTS="{",".join(str(p) for p in BLOCKED)}"\n'
            f'RUN_DIR="{self.run_dir}"\n'
            f'WHITELIST="{self.whitelist}"\n'
            f'LIBVIRT_URI="{self.lab.uri}"\n'
        )

    # -- the product, with this lab's hooks' view (mounts, netns) ----------------------
    def cli_ok(self, *args: str) -> "subprocess.CompletedProcess[str]":
        cmd = ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "smtp_gate", "--config", str(self.config), *args]
        proc = self.lab.run_in_netns(cmd, private_mounts=True, check=False, timeout=60)
        assert proc.returncode == 0, f"{self.label}: smtp-gate {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc

    def start_watcher(self) -> None:
        """`smtp-gate watch` in this lab's namespaces, as the service runs it on a host; returns
        once it follows nftables and libvirt and made its first check."""
        with open(self.watch_log, "ab") as err:
            self.watcher = self.lab.popen_in_netns(
                ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "smtp_gate", "--config", str(self.config), "watch"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            )
        end = time.monotonic() + 30
        while not ("following libvirt events of" in self.watch_text()
                   and ("checked our table against" in self.watch_text() or "restored in" in self.watch_text())):
            assert time.monotonic() < end and self.watcher.poll() is None, f"{self.label}'s watcher: {self.watch_text()}"
            time.sleep(0.1)
        time.sleep(0.5)
        self.watch_start = len(self.watch_text())  # its first check installs a missing table (B's)

    def stop_watcher(self) -> None:
        if self.watcher is not None and self.watcher.poll() is None:
            os.killpg(self.watcher.pid, signal.SIGTERM)
            self.watcher.wait(timeout=15)

    def watch_text(self) -> str:
        return self.watch_log.read_text(errors="replace") if self.watch_log.exists() else ""

    # -- the kernel of this lab's namespace --------------------------------------------
    def table_exists(self) -> bool:
        return "table bridge smtp_gate" in self.lab.run_in_netns(["nft", "list", "tables", "bridge"]).stdout

    def set_elements(self, name: str) -> List[object]:
        """Elements of one of our sets, as nft -j gives them (concatenations as tuples)."""
        proc = self.lab.run_in_netns(["nft", "-j", "list", "set", "bridge", "smtp_gate", name])
        return _elements(json.loads(proc.stdout))

    def allowed(self) -> Set[Tuple[str, str]]:
        """The `allowed` set: (port as nft names it, MAC) pairs."""
        pairs = [tuple(str(v) for v in e) for e in self.set_elements("allowed")]  # type: ignore[union-attr]
        assert len(pairs) == len(set(pairs))
        return set(pairs)  # type: ignore[arg-type]

    def ifindex(self, dev: str) -> int:
        return json.loads(self.lab.run_in_netns(["ip", "-j", "link", "show", "dev", dev]).stdout)[0]["ifindex"]

    def netns_id(self) -> str:
        return self.lab.run_in_netns(["readlink", "/proc/self/ns/net"]).stdout.strip()

    # -- the run directory -------------------------------------------------------------
    def records(self) -> Dict[str, dict]:
        """uuid -> record, for every guest this side's hooks (or rebuilds) recorded."""
        return {p.stem: json.loads(p.read_text()) for p in sorted((self.run_dir / "records").glob("*.json"))}

    def journal(self, guest_uuid: str) -> List[dict]:
        path = self.run_dir / "journal"
        lines = path.read_text().splitlines() if path.exists() else []
        return [e for e in map(json.loads, lines) if e.get("uuid") == guest_uuid]

    def state(self) -> Dict[str, object]:
        """What hooks and rebuilds must agree on: the allowed and guest_ifaces sets, the records."""
        return {"allowed": sorted(self.allowed()), "guest_ifaces": sorted(map(str, self.set_elements("guest_ifaces"))),
                "records": self.records()}

    # -- libvirt's side --------------------------------------------------------------
    def tap(self, name: str) -> Tuple[str, str]:
        """(tap, MAC) of the guest's only NIC (virsh domiflist)."""
        rows = [line.split() for line in self.lab.virsh("domiflist", name).stdout.splitlines()[2:] if line.strip()]
        assert len(rows) == 1, rows
        return rows[0][0], rows[0][4]

    def hook_calls(self, name: str, since: float) -> List[dict]:
        return [c for c in self.lab.hook_calls() if c["argv"][1] == name and c["time"] >= since]

    def kernel_at_hooks(self, name: str) -> List[Tuple[str, Set[Tuple[str, str]]]]:
        """('op sub', allowed pairs right after our hook ran) for each hook call of the guest."""
        out = []
        for line in self.kernel_probe_log.read_text().splitlines():
            guest, op, sub, rest = (line.split(" ", 3) + [""])[:4]
            if guest == name:
                pairs = {tuple(str(v) for v in e) for e in _elements(json.loads(rest))} if rest.strip() else set()
                out.append((f"{op} {sub}", pairs))
        return out  # type: ignore[return-value]

    def connections_from(self, name: str, since: float = 0.0) -> List[Tuple[float, int]]:
        """(time, port) of the connections this side's internet accepted from the guest."""
        g = IPS[name]
        own = re.compile(r"^(\d+\.\d+) port (\d+) from (?:::ffff:)?(?:10\.99\.0\.%d|fd99::%x)$" % (g, g))
        out = []
        for line in self.lab.listener_log().splitlines():
            m = own.match(line)
            if m and float(m.group(1)) >= since:
                out.append((float(m.group(1)), int(m.group(2))))
        return out


def _elements(doc: dict) -> List[object]:
    out: List[object] = []
    for item in doc["nftables"]:
        for elem in item.get("set", {}).get("elem", []):
            if isinstance(elem, dict) and "elem" in elem:
                elem = elem["elem"]["val"]
            if isinstance(elem, dict) and "concat" in elem:
                elem = tuple(elem["concat"])
            out.append(elem)
    return out


class Fleet:
    def __init__(self, a: Side, b: Side) -> None:
        self.a, self.b = a, b
        self.moves: Dict[str, "Move"] = {}

    def results(self, name: str) -> libvirt_lab.GuestResult:
        """The guest's probes on both sides: its console file (append='on') has every line."""
        return libvirt_lab.parse_console(name, self.a.lab.console(name))

    def wait_round(self, name: str, n: int, timeout: float = 60) -> libvirt_lab.GuestResult:
        self.a.lab.wait_console(name, r"LAB: round %d done" % n, timeout)
        return self.results(name)


class Move:
    """One migration: what A held before, when it ran, and the first round surely run on B."""

    def __init__(self, name: str, uuid_: str, tap_a: str, index_a: int, mac: str, t0: float, t1: float,
                 took: float, first_round_on_b: int) -> None:
        self.name, self.uuid, self.tap_a, self.index_a, self.mac = name, uuid_, tap_a, index_a, mac
        self.t0, self.t1, self.took, self.first_round_on_b = t0, t1, took, first_round_on_b


def assert_round(res: libvirt_lab.GuestResult, n: int, want: str, ports=BLOCKED) -> None:
    got = res.round(n)
    for fam in FAMILIES:
        for port in ports:
            assert got.get((fam, port)) == want, (
                f"{res.name} round {n} {fam} port {port}: {got.get((fam, port))}, want {want}\n" + res.console[-3000:])


def assert_first_attempts(res: libvirt_lab.GuestResult, want: str) -> None:
    """The guest's very first attempt on every blocked port and family had status want, and 80 was open."""
    for fam in FAMILIES:
        for port in BLOCKED + (80,):
            attempts = sorted((r for r in res.results if (r.family, r.port) == (fam, port)), key=lambda r: r.round)
            assert attempts and attempts[0].round == 1, (fam, port, res.console[-3000:])
            assert attempts[0].status == (want if port in BLOCKED else "open"), (attempts[0], res.console[-3000:])


def _uuid(lab: libvirt_lab.LibvirtLab, name: str) -> str:
    return lab.virsh("domuuid", name).stdout.strip()


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    reason = libvirt_lab.missing_requirements()
    if reason:
        pytest.skip(reason)
    before = host_state()
    root = tmp_path_factory.mktemp("fleet")
    a, b = Side("A", root / "a"), Side("B", root / "b")
    labs = []
    for side in (a, b):
        side.root.mkdir()
        probe = side.prepare()
        labs.append(libvirt_lab.LibvirtLab(side.root, hooks={"qemu": [HOOK, probe]}, record_hooks=True,
                                           binds={str(REPO / "config"): side.config_dir},
                                           host_uuid=str(uuid.uuid4())))
    t = time.monotonic()
    with labs[0] as lab_a, labs[1] as lab_b:
        a.lab, b.lab = lab_a, lab_b
        for side in (a, b):
            side.write_config()
            seen = side.lab.run_in_netns(["cat", str(REPO / "config" / "smtp-gate.conf")], private_mounts=True).stdout
            assert seen == side.config.read_text(), f"lab {side.label}'s hooks read their own config"
        assert a.netns_id() != b.netns_id()
        # both namespaces number their links alike (lo, br0, uplink, then the taps): two more
        # links in B (a veth pair: no dummy module here), so that a guest's tap on B never has the
        # index its tap had on A
        b.lab.run_in_netns(["ip", "link", "add", "skew0", "type", "veth", "peer", "name", "skew1"])
        for side in (a, b):  # libvirtd took the host UUID of its libvirtd.conf, not this machine's
            caps = side.lab.virsh("capabilities").stdout
            assert re.search(r"<host>\s*<uuid>%s</uuid>" % side.lab.host_uuid, caps), caps[:500]
        try:
            yield Fleet(a, b)
        finally:
            for side in (a, b):
                side.stop_watcher()
        for side in (a, b):
            print(f"\nfleet lab {side.label} timings (s):", {k: round(v, 2) for k, v in side.lab.timings.items()})
        print("fleet module: %.1f s" % (time.monotonic() - t))
    assert host_state() == before, "the labs changed this machine"


@pytest.fixture(scope="module")
def on_a(fleet: Fleet) -> Dict[str, libvirt_lab.GuestResult]:
    """The three guests started on A, nothing applied before (the prepare hook installs the
    table); until its first probe round, only meta-defined has any allowance."""
    lab = fleet.a.lab
    assert not fleet.a.table_exists() and not fleet.b.table_exists()
    for name in (DEFINED, LIVE, PLAIN):
        lab.start_guest(name, guest_ip=IPS[name], hold=HOLD, interval=INTERVAL, connect_timeout=TIMEOUT,
                        console_append=True, metadata=DEFINED_ALLOW if name == DEFINED else "")
    return {name: lab.wait_round(name, 1, timeout=120) for name in (DEFINED, LIVE, PLAIN)}


@pytest.fixture(scope="module")
def live_set(fleet: Fleet, on_a: Dict[str, libvirt_lab.GuestResult]) -> libvirt_lab.GuestResult:
    """The metadata set on the running, blocked meta-live (live and config, as a panel sets it),
    then `smtp-gate rebuild` on A: a round that starts after it connects."""
    a = fleet.a
    a.lab.virsh("metadata", LIVE, NS_URI, "--key", "smtpgate", "--set", LIVE_ALLOW, "--live", "--config")
    assert a.tap(LIVE)[1] not in {mac for _t, mac in a.allowed()}, "no hook runs on a metadata change"
    a.cli_ok("rebuild")
    done = fleet.results(LIVE).rounds
    return fleet.wait_round(LIVE, done + 2)


@pytest.fixture(scope="module")
def migrated(fleet: Fleet, on_a: Dict[str, libvirt_lab.GuestResult], live_set: libvirt_lab.GuestResult) -> Dict[str, Move]:
    """Each guest live-migrated from A to B, one after the other, with `smtp-gate watch` running
    on both sides (as the service does on a host); then two more probe rounds."""
    a, b = fleet.a, fleet.b
    for side in (a, b):
        side.start_watcher()
    for name in (DEFINED, LIVE, PLAIN):
        tap_a, mac = a.tap(name)
        index_a = a.ifindex(tap_a)
        guest_uuid = _uuid(a.lab, name)
        t0 = time.time()
        took = a.lab.migrate(name, b.lab, *MIGRATE_FLAGS[name])
        t1 = time.time()
        # the round under way at the switch may have begun on A; the one after it runs on B
        first_on_b = fleet.results(name).rounds + 2
        fleet.moves[name] = Move(name, guest_uuid, tap_a, index_a, mac, t0, t1, took, first_on_b)
    for name, move in fleet.moves.items():
        fleet.wait_round(name, move.first_round_on_b)
        # what libvirt ran where, in order (for docs/protocol.md)
        print(f"\n{name}: migrated in {move.took:.2f}s, A's tap #{move.index_a} -> B's {b.tap(name)[0]} "
              f"#{b.ifindex(b.tap(name)[0])}; hook calls from the start of the migration:")
        calls = sorted([(c["time"], side.label, " ".join(c["argv"][2:4]), NS_URI in c["xml"])
                        for side in (a, b) for c in side.hook_calls(name, move.t0)])
        for when, label, op, has_meta in calls:
            print(f"  +{when - move.t0:6.3f}s {label} {op:16s} metadata in XML: {has_meta}")
        # every round's port 25 (v4), around the switch too (shown, not asserted: a SYN lost in
        # the switch's downtime would time out as "blocked" with a 1 s connect timeout)
        res = fleet.results(name)
        print("  port 25 by round (o open, b blocked; | from the first round surely on B): "
              + "".join(("|" if n == move.first_round_on_b else "") + res.round(n).get(("v4", 25), "?")[0]
                        for n in range(1, res.rounds + 1)))
    return fleet.moves


# ----------------------------------------------------------------------------- tests

def test_guest_defined_with_metadata_is_allowed_from_its_first_probe(
        fleet: Fleet, on_a: Dict[str, libvirt_lab.GuestResult]) -> None:
    """No whitelist row at all: the metadata in the definition lets meta-defined connect on
    25/465/587 from its first attempt, v4 and v6; the two guests without it are blocked from
    theirs.  A's kernel holds exactly that allowance, on the guest's tap; B's kernel has no
    table: each lab's hooks act in their own namespace only."""
    a = fleet.a
    assert a.whitelist.read_text() == WHITELIST
    assert_first_attempts(on_a[DEFINED], "open")
    assert_first_attempts(on_a[LIVE], "blocked")
    assert_first_attempts(on_a[PLAIN], "blocked")
    tap, mac = a.tap(DEFINED)
    assert a.allowed() == {(tap, mac)}
    record = a.records()[_uuid(a.lab, DEFINED)]
    assert record["allowed"] == [[a.ifindex(tap), mac]]
    assert ("start begin", {(tap, mac)}) in a.kernel_at_hooks(DEFINED), "allowed before QEMU ran a guest instruction"
    starts = [e for e in a.journal(_uuid(a.lab, DEFINED)) if e["op"] == "start"]
    assert starts and starts[-1]["allow"][0] == "test", starts
    assert {c["netns"] for c in a.lab.hook_calls()} == {a.netns_id()}
    assert not fleet.b.table_exists()


def test_metadata_set_live_on_a_running_guest_is_applied_by_rebuild(
        fleet: Fleet, live_set: libvirt_lab.GuestResult) -> None:
    """`virsh metadata --live --config` on a running guest, then `smtp-gate rebuild`: its tap
    is allowed and a round after the rebuild connects on every blocked port."""
    a = fleet.a
    tap, mac = a.tap(LIVE)
    assert (tap, mac) in a.allowed()
    assert_round(live_set, live_set.rounds, "open", ports=BLOCKED + (80,))
    for flag in ("--live", "--config"):
        got = a.lab.virsh("metadata", LIVE, NS_URI, flag).stdout
        assert 'by="panel"' in got, (flag, got)


@pytest.mark.parametrize("name", [DEFINED, LIVE])
def test_allowed_guest_stays_allowed_across_a_live_migration(fleet: Fleet, migrated: Dict[str, Move], name: str) -> None:
    """After `virsh migrate --live --p2p --tunnelled --persistent --undefinesource`: B's hooks
    got the metadata with every call and held the allowance for the guest's new tap (B's
    ifindex) from `start begin` on, before the guest ran on B; its probes connect through B's
    internet; B's saved definition carries the metadata.  A forgot the guest: no allowance,
    no guest port, no record, and its journal's last word is `stop`."""
    a, b, move = fleet.a, fleet.b, migrated[name]
    assert b.lab.domstate(name) == "running" and a.lab.domstate(name) == ""
    tap_b, mac = b.tap(name)
    assert mac == move.mac
    index_b = b.ifindex(tap_b)
    assert index_b != move.index_a

    # B's hooks: the incoming sequence, each with the allowance in the XML, in B's namespace
    calls_b = b.hook_calls(name, move.t0)
    assert [" ".join(c["argv"][2:4]) for c in calls_b] == ["migrate begin", "prepare begin", "start begin", "started begin"]
    assert all(NS_URI in c["xml"] for c in calls_b)
    assert {c["netns"] for c in calls_b} == {b.netns_id()}
    # right after our `start begin` hook, B's kernel allowed the new tap: before QEMU ran on B
    at_hooks = dict(b.kernel_at_hooks(name)[-4:])
    assert (tap_b, mac) in at_hooks["start begin"], at_hooks
    assert (tap_b, mac) in b.allowed()
    record = b.records()[move.uuid]
    assert record["allowed"] == [[index_b, mac]] and [tap_b, index_b] in record["guest_ports"], record
    assert b.journal(move.uuid)[-1]["op"] == "start" and b.journal(move.uuid)[-1]["allow"] is not None
    assert NS_URI in b.lab.virsh("dumpxml", "--inactive", name).stdout, "--persistent saved the metadata on B"

    # the probes: every round surely run on B connects, through B's internet, not A's
    res = fleet.results(name)
    for n in range(move.first_round_on_b, res.rounds + 1):
        assert_round(res, n, "open", ports=BLOCKED + (80,))
    assert {port for _t, port in b.connections_from(name, move.t1)} == set(BLOCKED + (80,))
    assert not a.connections_from(name, move.t1 + 1.0), "nothing of it reaches A's internet any more"

    # A: the source stopped, and its hooks cleaned its kernel state and run directory
    calls_a = a.hook_calls(name, move.t0)
    assert [" ".join(c["argv"][2:4]) for c in calls_a] == ["stopped end", "release end"]
    assert mac not in {m for _t, m in a.allowed()} and index_b not in _indexes(a, "guest_ifaces")
    assert move.index_a not in _indexes(a, "guest_ifaces")
    assert move.uuid not in a.records()
    assert a.journal(move.uuid)[-1]["op"] == "stop"


def test_blocked_guest_stays_blocked_across_a_live_migration(fleet: Fleet, migrated: Dict[str, Move]) -> None:
    """A guest with no allowance, migrated transient (`--live --p2p --tunnelled` only): blocked
    on 25/465/587 on B in every round run there (80 open, through B's internet); B holds its
    new tap as a guest port and no allowance; A kept its definition (shut off) and dropped
    its guest port and record."""
    a, b, move = fleet.a, fleet.b, migrated[PLAIN]
    assert b.lab.domstate(PLAIN) == "running" and a.lab.domstate(PLAIN) == "shut off"
    assert re.search(r"^Persistent:\s+no$", b.lab.virsh("dominfo", PLAIN).stdout, re.M), "transient on B"
    tap_b, mac = b.tap(PLAIN)
    index_b = b.ifindex(tap_b)
    calls_b = b.hook_calls(PLAIN, move.t0)
    assert [" ".join(c["argv"][2:4]) for c in calls_b] == ["migrate begin", "prepare begin", "start begin", "started begin"]
    assert not any(NS_URI in c["xml"] for c in calls_b)
    res = fleet.results(PLAIN)
    for n in range(move.first_round_on_b, res.rounds + 1):
        assert_round(res, n, "blocked")
        assert_round(res, n, "open", ports=(80,))
    assert {port for _t, port in b.connections_from(PLAIN, move.t1)} == {80}
    assert not [p for _t, p in a.connections_from(PLAIN) + b.connections_from(PLAIN) if p in BLOCKED]
    assert mac not in {m for _t, m in b.allowed()}
    assert index_b in _indexes(b, "guest_ifaces")
    assert b.records()[move.uuid]["allowed"] == []
    assert [" ".join(c["argv"][2:4]) for c in a.hook_calls(PLAIN, move.t0)] == ["stopped end", "release end"]
    assert move.index_a not in _indexes(a, "guest_ifaces")
    assert move.uuid not in a.records()


def test_the_watchers_take_no_move_for_tampering(fleet: Fleet, migrated: Dict[str, Move]) -> None:
    """Issue 11 review: with the watcher running, each migration out logged "set guest_ifaces
    has 1 element(s) no record accounts for ...; restored".  A's QEMU exits (its tap goes with
    it) before libvirt runs `stopped end`, and the link change woke A's watcher in between.
    Now neither side's watcher restores anything or calls anything foreign across the three
    moves, and A's kernel ends clean (its hooks removed every element)."""
    a, b = fleet.a, fleet.b
    time.sleep(1.5)  # several debounce windows after the last stop hook
    for side in (a, b):
        log = side.watch_text()
        assert "following libvirt events of" in log, (side.label, log)
        moves = log[side.watch_start:]
        assert "restored in" not in moves and "no record accounts for" not in moves, (side.label, log)
    assert a.allowed() == set() and a.set_elements("guest_ifaces") == [], (a.allowed(), a.set_elements("guest_ifaces"))
    assert a.records() == {}


def test_rebuild_on_each_side_after_the_moves_changes_nothing(fleet: Fleet, migrated: Dict[str, Move]) -> None:
    """After the three moves, A's kernel holds no guest at all and B's holds exactly what its
    hooks installed: a rebuild (which asks each lab's libvirtd) reproduces both."""
    a, b = fleet.a, fleet.b
    assert a.allowed() == set() and a.set_elements("guest_ifaces") == [] and a.records() == {}
    want = {b.tap(DEFINED), b.tap(LIVE)}
    assert b.allowed() == want
    for side in (a, b):
        before = side.state()
        out = side.cli_ok("rebuild")
        assert "warning" not in out.stderr, out.stderr
        assert side.state() == before, side.label


def test_the_lab_checks_host_uuids(tmp_path: Path) -> None:
    """A malformed host_uuid is refused when the lab is made, and migrate() refuses two labs
    with the same one (libvirt would say "Attempt to migrate guest to the same host")."""
    with pytest.raises(libvirt_lab.LabError, match=r"host_uuid 'nope': expected a UUID"):
        libvirt_lab.LibvirtLab(tmp_path, host_uuid="nope")
    same = str(uuid.uuid4())
    a, b = libvirt_lab.LibvirtLab(tmp_path, host_uuid=same), libvirt_lab.LibvirtLab(tmp_path, host_uuid=same.upper())
    with pytest.raises(libvirt_lab.LabError, match="distinct host_uuid"):
        a.migrate("guest", b)
    with pytest.raises(libvirt_lab.LabError, match="distinct host_uuid"):
        a.migrate("guest", libvirt_lab.LibvirtLab(tmp_path))


def _indexes(side: Side, set_name: str) -> Set[int]:
    """The interface indexes in one of our index sets (nft names a present device, else its number)."""
    out = set()
    for elem in side.set_elements(set_name):
        out.add(int(elem) if isinstance(elem, int) or str(elem).isdigit() else side.ifindex(str(elem)))
    return out
