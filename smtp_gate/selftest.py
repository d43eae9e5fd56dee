"""`smtp-gate selftest`: prove, on this very kernel, that the real ruleset blocks what it
should and lets through what it should.

It builds a throwaway lab in network namespaces named `sgself-<pid>-<role>`:

    hv:      br0 with uplink0, vnet0 (a guest), tapallowed0 (the allowed guest); br0 also
             has an address and routes to wan0 (the hypervisor as a guest's next hop)
    inet:    eth0 on uplink0, the "internet", listening on the blocked ports and on 80
    guest:   eth0 on vnet0;  allowed: eth0 on tapallowed0;  far: beyond wan0, routed

then applies the ruleset the product's way: `python -m smtp_gate --config <lab config>
apply` inside the hypervisor namespace (`ip netns exec` gives it the lab's /sys and
nftables), with a whitelist row for a guest that libvirt's test driver (a node file, no
daemon) reports on tapallowed0 -- so the whitelist -> libvirt -> (ifindex, MAC) path is
proven too.  Real TCP connections and hand-built frames then show what passes.  Every
namespace and file is removed at the end, on Ctrl-C and on errors as well; the host's own
links, ruleset and libvirt are never touched (every command names a lab namespace).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, TextIO, Tuple

from smtp_gate import frames, netlab, nft, validate, whitelist
from smtp_gate.config import Config
from smtp_gate.netlab import CONNECTED, TIMED_OUT, Guest, Listener, Netns

PREFIX = "sgself-"
# A dropped SYN is never answered: half a second is plenty on a bridge between namespaces
# (an answered connect takes well under a millisecond), and it keeps the selftest fast.
BLOCK_TIMEOUT = 0.5
PASS_TIMEOUT = 3.0
BLOCK_WAIT = 0.3  # a frame that should not arrive: how long to watch for it
PASS_WAIT = 2.0  # a frame that should arrive returns as soon as it does
WORKERS = 32  # every check of a phase runs at once: the phase takes as long as its slowest check

BRIDGE = "br0"
UPLINK = "uplink0"
GUEST_PORT = "vnet0"
# libvirt's test driver drops <target dev> names starting with vnet (reserved for names it
# generates), so the allowed guest's port is a tap name, as a guest with a set target has.
ALLOWED_PORT = "tapallowed0"
LATE_PORT = "mystery0"  # matches no guest pattern: a device smtp-gate never heard of
LATE_UPLINK = "uplink1"
GUESTLIKE_UPLINK = "vethup0"  # an uplink whose name matches a guest port pattern
RELAY4, RELAY6 = "10.77.0.25", "fd77::25"  # the lab's ALLOWED_DESTINATIONS, a second address of the internet
ROUTED_LINK = "wan0"
ALLOWED_NAME = "sgself-allowed"
ALLOWED_UUID = "5e1f7e57-0000-4000-8000-000000000001"
INET4, INET6 = "10.77.0.1", "fd77::1"
HV4, HV6 = "10.77.0.254", "fd77::fe"
FAR4, FAR6 = "10.88.0.2", "fd88::2"
PASS_PORT_CANDIDATES = (80, 443, 8080, 8443, 53535)

BLOCKED, PASSES = "blocked", "passes"


@dataclass
class Check:
    name: str
    ok: bool
    expect: str = ""  # BLOCKED or PASSES for traffic checks: audit mode explains a failed BLOCKED
    detail: str = ""


@dataclass
class Report:
    mode: str
    blocked_ports: str
    ports_from: str  # "default" or FILE:LINE of BLOCKED_PORTS
    config: str
    lab: str  # the namespaces' prefix
    checks: List[Check] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0
    kept: List[str] = field(default_factory=list)  # how to enter and remove a lab left up (--keep)

    @property
    def failed(self) -> int:
        return sum(not c.ok for c in self.checks)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and not self.failed

    def to_json(self) -> Dict[str, object]:
        data = asdict(self)
        data.update(ok=self.ok, passed=len(self.checks) - self.failed, failed=self.failed)
        return data


Outcome = Tuple[bool, str]


# ------------------------------------------------------------------------- verdicts
def blocked_tcp(ns: Netns, addr: str, port: int) -> Outcome:
    """Blocked means the SYN was dropped: a refused connection reached a host, so it FAILs too."""
    outcome = netlab.tcp_probe(ns, addr, port, BLOCK_TIMEOUT)
    if outcome == TIMED_OUT:
        return True, ""
    if outcome == CONNECTED:
        return False, "connected: it got through"
    return False, f"{outcome}: the SYN reached a host"


def passing_tcp(ns: Netns, addr: str, port: int) -> Outcome:
    outcome = netlab.tcp_probe(ns, addr, port, PASS_TIMEOUT)
    return outcome == CONNECTED, "" if outcome == CONNECTED else f"{outcome} after up to {PASS_TIMEOUT:g}s"


def blocked_frame(sender: Netns, frame: bytes, receiver: Netns) -> Outcome:
    arrived = netlab.frame_arrives(sender, frame, receiver, wait=BLOCK_WAIT)
    return not arrived, "the frame arrived on the far side" if arrived else ""


def passing_frame(sender: Netns, frame: bytes, receiver: Netns) -> Outcome:
    arrived = netlab.frame_arrives(sender, frame, receiver, wait=PASS_WAIT)
    return arrived, "" if arrived else f"the frame did not arrive within {PASS_WAIT:g}s"


def combine(results: Dict[str, Outcome]) -> Outcome:
    """Several outcomes as one: OK when every one is, the failing ones named."""
    bad = [f"{label}: {detail}" for label, (ok, detail) in results.items() if not ok]
    return not bad, "; ".join(bad)


def both(**parts: Callable[[], Outcome]) -> Callable[[], Outcome]:
    """One check of several independent parts (IPv4=..., IPv6=...), run at once."""

    def check() -> Outcome:
        with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="selftest-part") as pool:
            futures = {label: pool.submit(part) for label, part in parts.items()}
            return combine({label: future.result() for label, future in futures.items()})

    return check


def probe_ports(ranges: Sequence[validate.PortRange]) -> List[int]:
    """Every blocked port; a range is probed at both ends."""
    return sorted({port for first, last in ranges for port in (first, last)})


def pass_port(ranges: Sequence[validate.PortRange]) -> Optional[int]:
    """A port the config does not block (80 unless the operator blocks that too)."""
    for port in PASS_PORT_CANDIDATES:
        if not any(first <= port <= last for first, last in ranges):
            return port
    return None


# ----------------------------------------------------------------------------- lab
class Lab:
    """The selftest's namespaces, listeners and files; close() removes every one of them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.names: List[str] = []  # recorded before each is created: an interrupted `ip netns add` is removed too
        self.listeners: List[Listener] = []
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.config_path = self.dir / "smtp-gate.conf"

    def netns(self, role: str) -> Netns:
        self.names.append(f"{self.prefix}{role}")
        return Netns(self.names[-1])

    def listen(self, ns: Netns, ports: Sequence[int]) -> None:
        self.listeners.append(Listener(ns, ports).start())

    def close(self, keep: bool = False) -> None:
        for listener in self.listeners:
            listener.stop()
        if keep:
            return
        for name in reversed(self.names):
            netlab.delete_netns(name)
        shutil.rmtree(self.dir, ignore_errors=True)

    def build(self, blocked: Sequence[int], web: int) -> None:
        """The topology in the module docstring, with listeners; nothing of smtp-gate yet."""
        self.hv = self.netns("hv")
        self.hv.sysctl("net.ipv6.conf.all.disable_ipv6", "0")
        # no duplicate address detection on the hypervisor's links: a router whose link-local
        # address is still tentative delays the first routed IPv6 connection by seconds
        self.hv.sysctl("net.ipv6.conf.default.accept_dad", "0")
        self.hv.ip("link", "add", BRIDGE, "type", "bridge", "stp_state", "0")
        self.hv.ip("link", "set", BRIDGE, "up")
        self.inet = self.netns("inet")
        netlab.veth(self.hv, UPLINK, self.inet, "eth0", ip4=f"{INET4}/24", ip6=f"{INET6}/64")
        self.inet_mac = self.inet.link_mac("eth0")
        self.inet.ip("addr", "add", f"{RELAY4}/24", "dev", "eth0")
        self.inet.ip("-6", "addr", "add", f"{RELAY6}/64", "dev", "eth0", "nodad")
        self.guest = self._guest("guest", GUEST_PORT, 2)
        self.allowed = self._guest("allowed", ALLOWED_PORT, 3)
        # the hypervisor as a next hop: an address on the bridge, forwarding, a routed link
        self.far = self.netns("far")
        netlab.veth(self.hv, ROUTED_LINK, self.far, "eth0", ip4=f"{FAR4}/24", ip6=f"{FAR6}/64", bridge="")
        self.hv.ip("addr", "add", "10.88.0.1/24", "dev", ROUTED_LINK)
        self.hv.ip("-6", "addr", "add", "fd88::1/64", "dev", ROUTED_LINK, "nodad")
        self.hv.ip("addr", "add", f"{HV4}/24", "dev", BRIDGE)
        self.hv.ip("-6", "addr", "add", f"{HV6}/64", "dev", BRIDGE, "nodad")
        self.hv.sysctl("net.ipv4.ip_forward", "1")
        self.hv.sysctl("net.ipv6.conf.all.forwarding", "1")
        self.far.ip("route", "add", "default", "via", "10.88.0.1")
        self.far.ip("-6", "route", "add", "default", "via", "fd88::1")
        self.guest.ns.ip("route", "add", "10.88.0.0/24", "via", HV4)
        self.guest.ns.ip("-6", "route", "add", "fd88::/64", "via", HV6)
        self.listen(self.inet, [*blocked, web])
        self.listen(self.far, [*blocked, web])
        self.listen(self.hv, blocked[:1])
        self.listen(self.guest.ns, blocked[:1])  # inbound from the internet
        self.listen(self.allowed.ns, blocked)  # guest-to-guest

    def _guest(self, role: str, port: str, number: int) -> Guest:
        ns = self.netns(role)
        mac = f"52:54:00:77:00:{number:02x}"
        ip4, ip6 = f"10.77.0.{number}", f"fd77::{number:x}"
        netlab.veth(self.hv, port, ns, "eth0", ip4=f"{ip4}/24", ip6=f"{ip6}/64", mac=mac)
        return Guest(role, ns, port, mac, ip4, ip6)

    def configure(self, config: Config) -> None:
        """The lab's config, whitelist and libvirt node file.  The operator's settings that
        shape the ruleset are kept; the topology, files and libvirt are the lab's own."""
        node = self.dir / "node.xml"
        node.write_text(
            "<node>\n<domain type='test'>"
            f"<name>{ALLOWED_NAME}</name><uuid>{ALLOWED_UUID}</uuid><memory>65536</memory>"
            "<os><type>hvm</type></os><devices><interface type='bridge'>"
            f"<mac address='{self.allowed.mac}'/><source bridge='{BRIDGE}'/><target dev='{ALLOWED_PORT}'/>"
            "</interface></devices></domain>\n</node>\n",
            encoding="utf-8",
        )
        allow_path = self.dir / "whitelist.csv"
        model = whitelist.load(allow_path)
        model.add_guest(
            ALLOWED_NAME,
            added_at=datetime.now(timezone.utc),
            added_by="smtp-gate selftest",
            reason="the selftest's allowed guest",
        )
        whitelist.write(allow_path, model)
        self.config_path.write_text(
            f'BRIDGE="{BRIDGE}"\nUPLINKS="{UPLINK}"\n'
            f'BLOCKED_PORTS="{validate.format_ports(config.blocked_ports)}"\n'
            f'MODE="{config.mode}"\nNON_IP="{config.non_ip}"\n'
            f'LOG_DROPS="{int(config.log_drops)}"\nLOG_RATE="{config.log_rate}"\nLOG_BURST="{config.log_burst}"\n'
            f'LIBVIRT_URI="test://{node}"\nWHITELIST="{allow_path}"\nRUN_DIR="{self.dir / "run"}"\n'
            f'ALLOWED_DESTINATIONS="{RELAY4} {RELAY6}"\n'
            'METRICS_DIR=""\n',  # the lab's state must never replace the host's metrics
            encoding="utf-8",
        )

    def smtp_gate(self, *args: str) -> subprocess.CompletedProcess:
        """The real CLI in the hypervisor namespace, from this very package."""
        package_parent = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONPATH=path)
        return self.hv.exec(
            [sys.executable, "-m", "smtp_gate", "--config", str(self.config_path), *args], check=False, env=env
        )

    def enter_hints(self) -> List[str]:
        names = " ".join(self.names)
        return [
            f"enter:   sudo ip netns exec {self.prefix}hv bash   (then: nft list ruleset; bridge link)",
            f"status:  sudo ip netns exec {self.prefix}hv {sys.executable} -m smtp_gate "
            f"--config {self.config_path} status",
            f"remove:  for ns in {names}; do sudo ip netns del $ns; done; sudo rm -rf {self.dir}",
            "(the listeners ended with the selftest; the next `smtp-gate selftest` also removes this lab)",
        ]


# ---------------------------------------------------------------------------- checks
def run_parallel(checks: Sequence[Tuple[str, str, Callable[[], Outcome]]]) -> List[Check]:
    """Run independent checks at once; results in the order given.  A check that raises FAILs."""

    def one(item: Tuple[str, str, Callable[[], Outcome]]) -> Check:
        name, expect, fn = item
        try:
            ok, detail = fn()
        except (OSError, netlab.LabError) as exc:
            ok, detail = False, f"could not run: {exc}"
        return Check(name, ok, expect, detail)

    pool = ThreadPoolExecutor(max_workers=min(WORKERS, max(1, len(checks))), thread_name_prefix="selftest")
    try:
        return list(pool.map(one, checks))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def traffic_checks(lab: Lab, blocked: Sequence[int], web: int) -> List[Tuple[str, str, Callable[[], Outcome]]]:
    """Everything that can run at once on the lab as built."""
    g, a, inet = lab.guest, lab.allowed, lab.inet
    first = blocked[0]
    mark = netlab.marker
    checks: List[Tuple[str, str, Callable[[], Outcome]]] = []
    for port in blocked:
        checks += [
            (f"IPv4 TCP {port} from a guest is blocked", BLOCKED, partial(blocked_tcp, g.ns, INET4, port)),
            (f"IPv6 TCP {port} from a guest is blocked", BLOCKED, partial(blocked_tcp, g.ns, INET6, port)),
        ]
    checks += [
        (f"IPv4 TCP {web} from a guest passes", PASSES, lambda: passing_tcp(g.ns, INET4, web)),
        (f"IPv6 TCP {web} from a guest passes", PASSES, lambda: passing_tcp(g.ns, INET6, web)),
    ]
    for port in blocked:
        checks.append(
            (
                f"the allowed guest reaches TCP {port} (IPv4 and IPv6)",
                PASSES,
                both(IPv4=partial(passing_tcp, a.ns, INET4, port), IPv6=partial(passing_tcp, a.ns, INET6, port)),
            )
        )
    tagged = [(frames.ETH_P_8021Q, 10)]
    checks += [
        (
            f"802.1Q-tagged TCP {first} from a guest is blocked (IPv4 and IPv6)",
            BLOCKED,
            both(
                IPv4=lambda: blocked_frame(g.ns, frames.tcp4_frame(g.mac, lab.inet_mac, g.ip4, INET4, first, mark(), tagged), inet),
                IPv6=lambda: blocked_frame(g.ns, frames.tcp6_frame(g.mac, lab.inet_mac, g.ip6, INET6, first, mark(), tagged), inet),
            ),
        ),
        (
            f"802.1Q-tagged TCP {web} from a guest passes (IPv4 and IPv6)",
            PASSES,
            both(
                IPv4=lambda: passing_frame(g.ns, frames.tcp4_frame(g.mac, lab.inet_mac, g.ip4, INET4, web, mark(), tagged), inet),
                IPv6=lambda: passing_frame(g.ns, frames.tcp6_frame(g.mac, lab.inet_mac, g.ip6, INET6, web, mark(), tagged), inet),
            ),
        ),
        (
            f"QinQ (802.1ad + 802.1Q) TCP {first} from a guest is blocked",
            BLOCKED,
            lambda: blocked_frame(
                g.ns,
                frames.tcp4_frame(
                    g.mac, lab.inet_mac, g.ip4, INET4, first, mark(), [(frames.ETH_P_8021AD, 10), (frames.ETH_P_8021Q, 20)]
                ),
                inet,
            ),
        ),
        (
            f"PPPoE-encapsulated TCP {first} from a guest is blocked",
            BLOCKED,
            lambda: blocked_frame(g.ns, frames.pppoe_tcp4_frame(g.mac, lab.inet_mac, g.ip4, INET4, first, mark()), inet),
        ),
        (
            "an IPv6 first fragment whose extension headers hide the TCP header is blocked",
            BLOCKED,
            lambda: blocked_frame(g.ns, frames.ipv6_split_chain_first_fragment(g.mac, lab.inet_mac, g.ip6, INET6, mark()), inet),
        ),
        (
            f"a single-tagged (VID 0, 802.1Q, 802.1ad) IPv6 first fragment of TCP {web} is blocked",
            BLOCKED,
            lambda: combine({
                name: blocked_frame(g.ns, frames.ipv6_tcp_first_fragment(g.mac, lab.inet_mac, g.ip6, INET6, web, mark(), tags), inet)
                for name, tags in (("VID 0", [(frames.ETH_P_8021Q, 0)]), ("802.1Q", tagged), ("802.1ad", [(frames.ETH_P_8021AD, 10)]))
            }),
        ),
        (
            f"the relay (ALLOWED_DESTINATIONS) is reachable on TCP {first} (IPv4 and IPv6)",
            PASSES,
            both(IPv4=lambda: passing_tcp(g.ns, RELAY4, first), IPv6=lambda: passing_tcp(g.ns, RELAY6, first)),
        ),
        (
            f"the relay does not widen: a tagged IPv6 fragment or an IPv4 source route to it (TCP {first}) is blocked",
            BLOCKED,
            lambda: combine({
                "fragment": blocked_frame(
                    g.ns, frames.ipv6_tcp_first_fragment(g.mac, lab.inet_mac, g.ip6, RELAY6, first, mark(), tagged), inet
                ),
                "source route": blocked_frame(
                    g.ns, frames.tcp4_frame(g.mac, lab.inet_mac, g.ip4, RELAY4, first, mark(), options=frames.loose_source_route(FAR4)),
                    inet,
                ),
            }),
        ),
        (
            f"inbound TCP {first} from the internet to a guest passes (IPv4 and IPv6)",
            PASSES,
            both(IPv4=lambda: passing_tcp(inet, g.ip4, first), IPv6=lambda: passing_tcp(inet, g.ip6, first)),
        ),
        (
            f"guest-to-guest TCP {first} passes (IPv4 and IPv6)",
            PASSES,
            both(IPv4=lambda: passing_tcp(g.ns, a.ip4, first), IPv6=lambda: passing_tcp(g.ns, a.ip6, first)),
        ),
        (
            f"via the hypervisor as next hop: TCP {web} to a routed host passes (IPv4 and IPv6)",
            PASSES,
            both(IPv4=lambda: passing_tcp(g.ns, FAR4, web), IPv6=lambda: passing_tcp(g.ns, FAR6, web)),
        ),
    ]
    for port in blocked:
        checks.append(
            (
                f"via the hypervisor as next hop: TCP {port} to a routed host is blocked (IPv4 and IPv6)",
                BLOCKED,
                both(IPv4=partial(blocked_tcp, g.ns, FAR4, port), IPv6=partial(blocked_tcp, g.ns, FAR6, port)),
            )
        )
    checks.append(
        (
            f"TCP {first} to the hypervisor's own bridge address is blocked (IPv4 and IPv6)",
            BLOCKED,
            both(IPv4=lambda: blocked_tcp(g.ns, HV4, first), IPv6=lambda: blocked_tcp(g.ns, HV6, first)),
        )
    )
    return checks


def late_checks(lab: Lab, first: int, web: int) -> List[Tuple[str, str, Callable[[], Outcome]]]:
    """Checks on what changes after apply (new ports), and the MAC spoof, which teaches the
    bridge that the allowed guest's MAC sits on the other port: it runs after every check
    that needs the allowed guest's replies."""
    g, a = lab.guest, lab.allowed
    late = lab.netns("late")
    late_mac = "52:54:00:77:00:04"
    netlab.veth(lab.hv, LATE_PORT, late, "eth0", mac=late_mac)
    inet2 = lab.netns("inet2")
    netlab.veth(lab.hv, LATE_UPLINK, inet2, "eth0")
    inet2_mac = inet2.link_mac("eth0")
    inet3 = lab.netns("inet3")
    netlab.veth(lab.hv, GUESTLIKE_UPLINK, inet3, "eth0")
    inet3_mac = inet3.link_mac("eth0")
    mark = netlab.marker

    def late_port() -> Outcome:
        # the port's first TCP frame ever is the blocked one; no rebuild ran since it appeared
        smtp = blocked_frame(late, frames.tcp4_frame(late_mac, lab.inet_mac, "10.77.0.4", INET4, first, mark()), lab.inet)
        web_ok = passing_frame(late, frames.tcp4_frame(late_mac, lab.inet_mac, "10.77.0.4", INET4, web, mark()), lab.inet)
        return combine({f"TCP {first}": smtp, f"TCP {web}": web_ok})

    def late_uplink() -> Outcome:
        smtp = blocked_frame(g.ns, frames.tcp4_frame(g.mac, inet2_mac, g.ip4, "10.77.0.99", first, mark()), inet2)
        web_ok = passing_frame(g.ns, frames.tcp4_frame(g.mac, inet2_mac, g.ip4, "10.77.0.99", web, mark()), inet2)
        return combine({f"TCP {first}": smtp, f"TCP {web}": web_ok})

    def guestlike_uplink() -> Outcome:
        smtp = blocked_frame(g.ns, frames.tcp4_frame(g.mac, inet3_mac, g.ip4, "10.77.0.98", first, mark()), inet3)
        smtp6 = blocked_frame(g.ns, frames.tcp6_frame(g.mac, inet3_mac, g.ip6, "fd77::98", first, mark()), inet3)
        return combine({f"IPv4 TCP {first}": smtp, f"IPv6 TCP {first}": smtp6})

    return [
        (
            f"an uplink named like a guest port ({GUESTLIKE_UPLINK}) does not carry a guest's TCP {first}",
            BLOCKED,
            guestlike_uplink,
        ),
        (
            f"the allowed guest's MAC sent from the other guest's port is blocked (TCP {first})",
            BLOCKED,
            lambda: blocked_frame(g.ns, frames.tcp4_frame(a.mac, lab.inet_mac, a.ip4, INET4, first, mark()), lab.inet),
        ),
        (f"a port added after apply is blocked from its first frame (TCP {first}; TCP {web} passes)", BLOCKED, late_port),
        (f"an uplink added after apply does not carry a guest's TCP {first} (TCP {web} passes)", BLOCKED, late_uplink),
    ]


def allowance_check(lab: Lab) -> Check:
    """The whitelist row, resolved through libvirt, is the pair (tapallowed0's ifindex, its MAC)."""
    name = f"whitelist row -> libvirt test driver -> kernel allowance ({ALLOWED_PORT}'s ifindex, its MAC)"
    listing = lab.hv.exec(["nft", "-j", "list", "set", "bridge", "smtp_gate", "allowed"], check=False)
    if listing.returncode != 0:
        return Check(name, False, "", f"nft list set failed: {listing.stderr.strip()}")
    held = nft.parse_listing(json.loads(listing.stdout)).elements.get("allowed", [])
    index = lab.hv.ifindex(ALLOWED_PORT)
    want = (ALLOWED_PORT, lab.allowed.mac)  # nft shows an existing interface index by its name
    ok = [tuple(str(v) for v in item) for item in held if isinstance(item, tuple)] == [want]
    return Check(name, ok, "", f"#{index} {ALLOWED_PORT} . {lab.allowed.mac}" if ok else f"the kernel holds {held!r}")


def status_checks(lab: Lab) -> List[Check]:
    """What `smtp-gate status --json` shows after the traffic: the counters and the allowed guest."""
    counted = "smtp-gate status counts the blocked attempts per guest port and MAC"
    shown = "smtp-gate status shows the whitelisted guest with its allowance held"
    result = lab.smtp_gate("status", "--json")
    try:
        report = json.loads(result.stdout)
    except ValueError:
        why = f"status exited {result.returncode}: {result.stderr.strip()[:300]}"
        return [Check(counted, False, "", why), Check(shown, False, "", why)]
    counters = report.get("counters", {})
    mine = sum(
        int(item.get("packets", 0))
        for item in report.get("attempts", [])
        if item.get("port") == GUEST_PORT and item.get("mac") == lab.guest.mac
    )
    detail = f"IPv4 {counters.get('blocked4', 0)}, IPv6 {counters.get('blocked6', 0)}; {GUEST_PORT} {lab.guest.mac}: {mine} packets"
    ok = counters.get("blocked4", 0) > 0 and counters.get("blocked6", 0) > 0 and mine > 0
    guests = [g for g in report.get("guests", []) if g.get("name") == ALLOWED_NAME]
    held = bool(guests) and guests[0].get("held") == "yes" and ALLOWED_PORT in str(guests[0].get("ports"))
    held_detail = f"{ALLOWED_NAME} on {ALLOWED_PORT}" if held else f"status shows {guests or report.get('notes')!r}"
    return [Check(counted, ok, "", detail), Check(shown, held, "", held_detail)]


def run_checks(lab: Lab, config: Config, report: Report) -> None:
    blocked = probe_ports(config.blocked_ports)
    web = pass_port(config.blocked_ports)
    if web is None:
        report.notes.append(f"every port in {PASS_PORT_CANDIDATES} is blocked: there is no port to show traffic passes")
        web = PASS_PORT_CANDIDATES[0]
    lab.build(blocked, web)
    first = blocked[0]
    control = run_parallel(
        [
            (
                f"the lab delivers TCP {first} before smtp-gate is applied (IPv4 and IPv6)",
                PASSES,
                both(IPv4=lambda: passing_tcp(lab.guest.ns, INET4, first), IPv6=lambda: passing_tcp(lab.guest.ns, INET6, first)),
            )
        ]
    )
    report.checks += control
    if not control[0].ok:
        report.notes.append("the lab itself does not carry traffic: no other check would mean anything")
        return
    lab.configure(config)
    applied = lab.smtp_gate("apply")
    summary = (applied.stdout.strip().splitlines() or [""])[-1]
    problems = " | ".join(applied.stderr.strip().splitlines()[:4])
    installed = applied.returncode in (0, 3)  # 3: installed, with warnings (NON_IP="accept", say)
    report.checks.append(
        Check(
            "smtp-gate apply installs the real ruleset in the lab",
            installed,
            "",
            summary if installed else f"exit {applied.returncode}: {problems or summary}",
        )
    )
    if applied.returncode == 3:
        report.notes += [line.replace("smtp-gate: ", "apply said: ", 1) for line in applied.stderr.strip().splitlines()]
    if not installed:
        report.notes.append("apply failed: the traffic checks were not run")
        return
    report.checks.append(allowance_check(lab))
    report.checks += run_parallel(traffic_checks(lab, blocked, web))
    report.checks += run_parallel(late_checks(lab, first, web))
    report.checks += status_checks(lab)


# --------------------------------------------------------------- housekeeping, output
def _alive(pid: int) -> bool:
    """Whether PID is a running smtp-gate (a reused PID running something else is not)."""
    if pid == os.getpid():
        return True
    try:
        return b"smtp" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def remove_stale_labs() -> List[str]:
    """Remove labs (namespaces, directories) of selftests that are no longer running: one
    killed hard, or left up with --keep."""
    removed = []
    owner = re.compile(re.escape(PREFIX) + r"(\d+)-")
    for name in netlab.netns_names():
        m = owner.match(name)
        if m and not _alive(int(m.group(1))):
            netlab.delete_netns(name)
            removed.append(name)
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        m = owner.match(path.name)
        if m and path.is_dir() and not _alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
    return removed


class _Signals:
    """SIGTERM and SIGHUP end the selftest like Ctrl-C (so the lab is torn down); while it is
    torn down, none of them may interrupt."""

    NAMES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.saved: Dict[int, object] = {}
        self.usable = threading.current_thread() is threading.main_thread()

    def _set(self, handler: object, which: Sequence[int]) -> None:
        if self.usable:
            for sig in which:
                self.saved.setdefault(sig, signal.getsignal(sig))
                signal.signal(sig, handler)  # type: ignore[arg-type]

    def interrupt_on_term(self) -> None:
        self._set(_raise_interrupt, (signal.SIGTERM, signal.SIGHUP))

    def shield(self) -> None:
        self._set(signal.SIG_IGN, self.NAMES)

    def restore(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def render(report: Report, out: TextIO) -> None:
    source = "default" if report.ports_from == "default" else f"from {report.ports_from}"
    out.write(
        f"smtp-gate selftest: blocked ports {report.blocked_ports} ({source}), {report.mode} mode; "
        f"lab in network namespaces {report.lab}*\n"
    )
    for check in report.checks:
        line = f"{'PASS' if check.ok else 'FAIL'}  {check.name}"
        out.write(f"{line}  ({check.detail})\n" if check.detail else f"{line}\n")
    for note in report.notes:
        out.write(f"note: {note}\n")
    for hint in report.kept:
        out.write(f"lab kept: {hint}\n")
    verdict = (
        f"all {len(report.checks)} checks passed"
        if report.ok
        else f"{report.failed} of {len(report.checks)} checks FAILED"
    )
    out.write(f"selftest: {verdict} in {report.seconds:.1f}s\n")


def selftest(config: Config, keep: bool = False) -> Tuple[Report, List[str]]:
    """Build the lab, run every check, tear the lab down.  Returns the report and, when the
    machine cannot run a lab at all, what is missing (the report then has no checks)."""
    started = time.monotonic()
    prefix = f"{PREFIX}{os.getpid()}-"
    report = Report(
        mode=config.mode,
        blocked_ports=validate.format_ports(config.blocked_ports),
        ports_from=config.sources.get("blocked_ports", "default"),
        config=str(config.path),
        lab=prefix,
    )
    signals = _Signals()
    signals.interrupt_on_term()
    lab: Optional[Lab] = None
    try:
        missing = netlab.missing_features(f"{prefix}probe")
        if missing:
            return report, missing
        remove_stale_labs()
        lab = Lab(prefix)
        run_checks(lab, config, report)
    except (netlab.LabError, OSError) as exc:
        report.checks.append(Check("the lab can be built and driven", False, "", str(exc)))
    finally:
        signals.shield()
        try:
            if lab is not None:
                lab.close(keep=keep)
                if keep:
                    report.kept = lab.enter_hints()
        finally:
            signals.restore()
    failed_blocks = [c for c in report.checks if c.expect == BLOCKED and not c.ok]
    if config.audit and failed_blocks:
        for check in failed_blocks:
            check.detail += "; MODE=audit: counted, not dropped"
        report.notes.append(
            f'{config.path} sets MODE="audit": smtp-gate counts and logs what it would block but lets it through, '
            "so with this config guests CAN send SMTP and the blocked checks fail; to prove this kernel would "
            "enforce, run the selftest with MODE=\"enforce\" (e.g. --config /dev/null for all defaults)"
        )
    if config.non_ip == "accept" and any(not c.ok and ("QinQ" in c.name or "PPPoE" in c.name) for c in report.checks):
        report.notes.append(
            f'{config.path} sets NON_IP="accept": frames that are neither IP nor ARP (QinQ, PPPoE) leave '
            "unchecked, so SMTP inside them gets through"
        )
    report.seconds = time.monotonic() - started
    return report, []


def main(config: Config, as_json: bool = False, keep: bool = False, out: Optional[TextIO] = None) -> int:
    """Exit 0 when every check passes, 1 when any fails or the lab cannot be built here."""
    out = out or sys.stdout
    report, missing = selftest(config, keep=keep)
    if missing:
        if as_json:
            out.write(json.dumps({"ok": False, "missing": missing}, indent=2) + "\n")
        else:
            print("smtp-gate: error: selftest cannot run here; missing:", file=sys.stderr)
            for item in missing:
                print(f"  - {item}", file=sys.stderr)
        return 1
    if as_json:
        out.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        render(report, out)
    return 0 if report.ok else 1
