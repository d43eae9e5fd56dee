"""Forwarding throughput through the bridge (guest namespace -> br0 -> uplink -> "internet"
namespace), side by side in one run, in three states:

  no table      no nftables table at all in the hypervisor namespace: the reference, 100 %;
  empty chains  a table `bridge smtp_gate_empty` holding only the `forward` and `input` base
                chains (priority -200, policy accept) and no rule: what hooking the bridge
                costs at all, the limit that no bridge table can beat;
  our table     `smtp-gate apply --no-libvirt`, then what hooks add (set elements): the two
                lab guests' ports and 1 000 stand-in ports in `guest_ifaces` (by index), and
                N allowed (ifindex, MAC) pairs (10 000 by default) spread over those ports,
                one of them the allowed guest's.

Three flows, each a single TCP stream from a guest:

  not allowed, TCP 80   the fast path: the first rule of `forward` (`meta protocol ip
                        th dport != @blocked_ports accept`) accepts it, one set lookup;
  allowed, TCP 25       the full checks: the fast path misses, then `iif @guest_ifaces`,
                        `oifname @uplinks`, and the `allowed` lookup accepts it;
  not allowed, TCP 465  the full checks of a guest that is NOT allowed, without a drop: the
  to a relay            lab's config names the internet namespace's address on port 465 as a
                        relay (ALLOWED_DESTINATIONS), so after the same lookups as above the
                        `allowed` lookup misses, `meta protocol vmap` sends it to out4, and the
                        `relay4` lookup accepts it.  This is the whole outbound path of a
                        blocked SMTP packet except its last rule (`tcp dport @blocked_ports
                        goto smtp4`) and the drop chain.  Nothing else of a not-allowed guest
                        can walk that path and still get through: UDP, ICMP and every other
                        IP protocol, and TCP to unblocked ports, take the fast path.

In every flow the receiver's ACKs (TCP to the guest's unblocked ephemeral port) take the
fast path.  Before measuring, the table is checked to enforce what it should: the allowed
guest reaches port 25, the other does not (nor port 465 over IPv6, which the relay does not
cover), and reaches port 465 on the relay and port 80.

Each round passes through the three states in turn, starting one state further on each
round, so drifting machine load hits every column alike; medians are reported, as Gbit/s
and as % of no table.  Two modes: the veths' default offloads (TSO/GSO: the bridge and
nftables see ~64 KB super-packets, as with virtio-net guests that use TSO) and per-packet
(TSO, GSO and GRO off on the guests' and the ports' veths: every 1500-byte frame crosses
the rules on its own, the worst case).

Uses iperf3 (`apt-get install iperf3`; per-packet mode needs ethtool) and falls back to a
small Python TCP bulk sender/receiver (bench/_tcpbulk.py) when iperf3 is missing.

    sudo .venv/bin/python bench/bench_throughput.py [--seconds 3] [--rounds 3] [--pairs 10000]
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BenchError, median  # noqa: E402

from smtp_gate import ruleset  # noqa: E402  (common put the repository on sys.path)

HERE = Path(__file__).resolve().parent
RELAY_PORT = 465  # blocked by default (BLOCKED_PORTS 25,465); the lab's config names a relay on it
FLOWS = (
    ("not allowed, TCP 80 (fast path)", "blocked", 80),
    ("allowed, TCP 25 (full checks)", "allowed", 25),
    (f"not allowed, TCP {RELAY_PORT} to a relay (full checks)", "blocked", RELAY_PORT),
)
EMPTY_TABLE = "smtp_gate_empty"
FILLER_PORTS = 1000


class Traffic:
    """Bulk TCP from a guest namespace to the internet namespace; Gbit/s received."""

    def __init__(self, lab: common.BridgeLab, seconds: float, tool: str) -> None:
        self.lab, self.seconds, self.tool = lab, seconds, tool
        self.servers: List[subprocess.Popen] = []

    def start_servers(self, ports: Tuple[int, ...]) -> None:
        if self.tool != "iperf3":
            return
        for port in ports:
            self.servers.append(subprocess.Popen(
                ["ip", "netns", "exec", self.lab.inet.name, "iperf3", "-s", "-p", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            ))
        time.sleep(0.5)
        for server in self.servers:
            if server.poll() is not None:
                raise BenchError(f"iperf3 server exited at once ({server.returncode})")

    def stop(self) -> None:
        for server in self.servers:
            common.stop_process(server)

    def measure(self, guest: common.Guest, port: int) -> float:
        if self.tool == "iperf3":
            result = common.ns_run(
                guest.ns,
                ["iperf3", "-c", self.lab.INET4, "-p", str(port), "-t", str(self.seconds), "-O", "1", "-J"],
                check=False, timeout=self.seconds + 30,
            )
            data = json.loads(result.stdout or "{}")
            if result.returncode != 0 or "error" in data:
                raise BenchError(f"iperf3 to port {port} failed ({result.returncode}): {data.get('error', result.stderr)}")
            return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
        receiver = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.inet.name, sys.executable, str(HERE / "_tcpbulk.py"), "recv",
             "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert receiver.stdout is not None
            if receiver.stdout.readline().strip() != "listening":
                raise BenchError("the Python receiver did not start")
            common.ns_run(guest.ns, [sys.executable, str(HERE / "_tcpbulk.py"), "send", "--host", self.lab.INET4,
                           "--port", str(port), "--seconds", str(self.seconds)], timeout=self.seconds + 30)
            out, err = receiver.communicate(timeout=30)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        if receiver.returncode != 0:
            raise BenchError(f"the Python receiver failed ({receiver.returncode}): {err.strip()}")
        return float(json.loads(out.strip().splitlines()[-1])["bits_per_second"]) / 1e9


def set_offloads(lab: common.BridgeLab, on: bool) -> None:
    value = "on" if on else "off"
    for guest in lab.guests.values():
        common.ns_run(guest.ns, ["ethtool", "-K", "eth0", "tso", value, "gso", value, "gro", value])
    for port in [g.port for g in lab.guests.values()] + ["uplink0"]:
        common.ns_run(lab.hv, ["ethtool", "-K", port, "tso", value, "gso", value, "gro", "off"])


def tables(lab: common.BridgeLab) -> List[Tuple[str, str]]:
    """Every nftables table of the hypervisor namespace, as (family, name)."""
    data = json.loads(common.nft(lab, "-j", "list", "tables").stdout)
    return sorted((item["table"]["family"], item["table"]["name"]) for item in data["nftables"] if "table" in item)


def drop_empty_table(lab: common.BridgeLab) -> None:
    # add, then delete: nft 1.0.6 has no `destroy`
    common.nft(lab, "-f", "-", input=f"add table bridge {EMPTY_TABLE}\ndelete table bridge {EMPTY_TABLE}\n")


def empty_chains(lab: common.BridgeLab) -> None:
    """Our base chains' hooks, priority and policy, in a table of their own with no rule."""
    lines = [f"add table bridge {EMPTY_TABLE}"] + [
        f"add chain bridge {EMPTY_TABLE} {chain} {{ type filter hook {hook} priority {ruleset.PRIORITY}; policy accept; }}"
        for chain, hook in ruleset.BASE_CHAINS.items()
    ]
    common.nft(lab, "-f", "-", input="".join(f"{line}\n" for line in lines))


def install(lab: common.BridgeLab, pairs: List[str], guest_indexes: List[int]) -> None:
    """`smtp-gate apply --no-libvirt`, then the guest ports and pairs added as hooks add them."""
    common.cli(lab, "apply", "--no-libvirt")
    common.add_guest_ifaces(lab, guest_indexes)
    common.nft_add_elements(lab, "allowed", pairs)
    if common.allowed_count(lab) != len(pairs):
        raise BenchError(f"expected {len(pairs)} allowances, found {common.allowed_count(lab)}")
    if common.set_count(lab, "guest_ifaces") != len(set(guest_indexes)):
        raise BenchError(f"expected {len(set(guest_indexes))} guest ports, found {common.set_count(lab, 'guest_ifaces')}")
    if common.set_count(lab, "relay4") != 1:
        raise BenchError("the lab's relay (ALLOWED_DESTINATIONS) is not in relay4")


def enter(lab: common.BridgeLab, state: str, pairs: List[str], guest_indexes: List[int]) -> None:
    """Leave whatever state the namespace is in for STATE, and check it holds only what STATE says."""
    if state == "our table":
        drop_empty_table(lab)
        install(lab, pairs, guest_indexes)
        want = [("bridge", ruleset.TABLE)]
    else:
        common.cli(lab, "rollback")
        drop_empty_table(lab)
        want = []
        if state == "empty chains":
            empty_chains(lab)
            want = [("bridge", EMPTY_TABLE)]
    found = tables(lab)
    if found != want:
        raise BenchError(f"state {state!r}: expected tables {want}, found {found}")


def check_enforcement(lab: common.BridgeLab, blocked: common.Guest, allowed: common.Guest) -> None:
    """The installed table lets through what the flows need, and only that."""
    probe = lab.listen(lab.inet, [80, 25, RELAY_PORT])
    try:
        expect = [
            (allowed, lab.INET4, 25, True),
            (blocked, lab.INET4, 25, False),
            (blocked, lab.INET4, RELAY_PORT, True),  # the relay
            (blocked, lab.INET6, 80, True),  # IPv6 works, so that the next line proves something
            (blocked, lab.INET6, RELAY_PORT, False),  # the port is blocked: no fast path for the relay flow
            (blocked, lab.INET4, 80, True),
        ]
        for guest, addr, port, ok in expect:
            if lab.tcp_connects(guest, addr, port, timeout=1.0 if ok else 0.5) != ok:
                raise BenchError(
                    f"the installed table does not enforce as expected: {guest.name} -> [{addr}]:{port} "
                    + ("blocked" if ok else "got through")
                )
    finally:
        probe.stop()
    time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each transfer")
    parser.add_argument("--rounds", type=int, default=3, help="passes through the three states per mode")
    parser.add_argument("--pairs", type=int, default=10000, help="allowed pairs in the table")
    parser.add_argument("--tool", choices=("auto", "iperf3", "python"), default="auto")
    args = parser.parse_args()
    common.require_root_and_kernel()
    common.install_signal_cleanup()
    common.compile_bytecode()
    tool = args.tool if args.tool != "auto" else ("iperf3" if shutil.which("iperf3") else "python")
    if tool == "iperf3" and not shutil.which("iperf3"):
        raise BenchError("iperf3 not found: apt-get install iperf3")
    modes = [("offloads on (TSO/GSO)", True)]
    if shutil.which("ethtool", path=common.LIBVIRT_PATH):
        modes.append(("per-packet (TSO/GSO/GRO off)", False))
    states = ("no table", "empty chains", "our table")
    results: Dict[Tuple[str, str, str], List[float]] = {}
    relay = f'ALLOWED_DESTINATIONS="{common.BridgeLab.INET4}:{RELAY_PORT}"\n'
    with common.bridge_lab(relay) as lab:
        blocked = lab.add_guest("g1", "vnet0", 2)
        allowed = lab.add_guest("a1", "vnet1", 3)
        fillers = [f"fill{i}" for i in range(FILLER_PORTS)]
        common.add_taps(lab.hv, fillers)
        indexes = common.link_indexes(lab.hv)
        # every guest port known, as hooks make them: the two lab guests' and the stand-ins'
        guest_indexes = [indexes["vnet0"], indexes["vnet1"]] + [indexes[n] for n in fillers]
        pairs = common.render_pairs(
            common.filler_pairs({n: indexes[n] for n in fillers}, args.pairs - 1) + [(indexes["vnet1"], allowed.mac)]
        )
        enter(lab, "our table", pairs, guest_indexes)
        check_enforcement(lab, blocked, allowed)
        traffic = Traffic(lab, args.seconds, tool)
        traffic.start_servers(tuple(port for _label, _who, port in FLOWS))
        guests = {"blocked": blocked, "allowed": allowed}
        try:
            for mode, offloads in modes:
                set_offloads(lab, offloads)
                for round_no in range(args.rounds):
                    # each round starts one state further on, so no state always runs first or last
                    for state in states[round_no % 3:] + states[:round_no % 3]:
                        enter(lab, state, pairs, guest_indexes)
                        for label, who, port in FLOWS:
                            value = traffic.measure(guests[who], port)
                            results.setdefault((mode, state, label), []).append(value)
                            print(f"bench_throughput: {mode}, round {round_no + 1}/{args.rounds}, {state}: "
                                  f"{label}: {value:.2f} Gbit/s", file=sys.stderr, flush=True)
        finally:
            traffic.stop()

    common.emit(common.machine_line() + "\n")
    rows = []
    for mode, _ in modes:
        for label, _who, _port in FLOWS:
            without = median(results[(mode, "no table", label)])
            row = [f"{mode}: {label}", f"{without:.2f}"]
            for state in states[1:]:
                value = median(results[(mode, state, label)])
                row += [f"{value:.2f}", f"{value / without * 100:.0f}%"]
            spread = max(max(v) / min(v) - 1 for k, v in results.items() if k[0] == mode and k[2] == label)
            rows.append(row + [f"{spread * 100:.0f}%"])
    common.emit(common.table(
        f"bench_throughput: TCP through br0, guest ns -> uplink ns (Gbit/s, median of {args.rounds} x {args.seconds:g} s, {tool})",
        ["mode: flow", "no table", "empty chains", "%", f"our table, {len(pairs)} pairs", "%", "max spread"],
        rows,
        notes=[
            "% = median with / median without any table; a single TCP stream, both namespaces on this host's CPUs",
            f"empty chains: table bridge {EMPTY_TABLE}, forward and input base chains at priority {ruleset.PRIORITY}, "
            "no rule: the cost of hooking the bridge at all",
            f"our table: smtp-gate apply, {len(guest_indexes)} ports in guest_ifaces, {len(pairs)} pairs in allowed, "
            f"the relay {common.BridgeLab.INET4}:{RELAY_PORT} in relay4",
            "max spread = largest (max/min - 1) over the rounds of one cell of the row: differences below it are noise",
            "each round passes through the three states in turn, starting one further on each round, "
            "so load drifts hit every column alike",
            "fast path: forward -> `meta protocol ip th dport != @blocked_ports accept`",
            "full checks: fast path misses -> iif @guest_ifaces -> egress: oifname @uplinks -> outbound: "
            "@allowed (allowed: accept) -> vmap -> out4: @relay4 (relay: accept)",
        ],
    ))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except common.FAILURES as exc:
        print(f"bench_throughput: error: {exc}", file=sys.stderr)
        sys.exit(1)
