"""Forwarding throughput through the bridge (guest namespace -> br0 -> uplink -> "internet"
namespace) without our table vs. with it holding 10 000 allowed pairs, side by side in one
run: for a guest that is not allowed (TCP to port 80: every rule of the outbound path is
walked) and for an allowed one (TCP to port 25: the allowance matches first).

Each round goes through three states: no table (`smtp-gate rollback`), our table with only
the allowed guest's pair, and our table with 10 000 pairs (`smtp-gate apply`, then the
allowances added as hooks add them), so drifting machine load hits every column alike;
medians are reported.  The middle column separates the cost of the rules from the cost of
the set's size.  Two modes: the veths' default offloads (TSO/GSO: the bridge and
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

HERE = Path(__file__).resolve().parent
FLOWS = (("not allowed, TCP 80", "blocked", 80), ("allowed, TCP 25", "allowed", 25))


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


def install(lab: common.BridgeLab, pairs: List[str], ports: List[str]) -> None:
    common.cli(lab, "apply", "--no-libvirt")
    common.nft_add_elements(lab, "guest_ports", [f'"{p}"' for p in ports])
    common.nft_add_elements(lab, "allowed", pairs)
    if common.allowed_count(lab) != len(pairs):
        raise BenchError(f"expected {len(pairs)} allowances, found {common.allowed_count(lab)}")


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
    results: Dict[Tuple[str, str, str], List[float]] = {}
    with common.bridge_lab() as lab:
        blocked = lab.add_guest("g1", "vnet0", 2)
        allowed = lab.add_guest("a1", "vnet1", 3)
        fillers = [f"fill{i}" for i in range(1000)]
        common.add_taps(lab.hv, fillers)
        indexes = common.link_indexes(lab.hv)
        pairs = common.render_pairs(
            common.filler_pairs({n: indexes[n] for n in fillers}, args.pairs - 1) + [(indexes["vnet1"], allowed.mac)]
        )
        own = common.render_pairs([(indexes["vnet1"], allowed.mac)])
        states = [("no table", None), ("table, 1 pair", own), (f"table, {len(pairs)} pairs", pairs)]
        # the table does what it should: the allowed guest reaches 25, the other does not
        install(lab, pairs, ["vnet0", "vnet1"])
        probe = lab.listen(lab.inet, [25])
        if lab.tcp_connects(blocked, lab.INET4, 25, timeout=0.5) or not lab.tcp_connects(allowed, lab.INET4, 25):
            raise BenchError("the installed table does not enforce as expected")
        probe.stop()
        time.sleep(0.2)
        traffic = Traffic(lab, args.seconds, tool)
        traffic.start_servers((80, 25))
        guests = {"blocked": blocked, "allowed": allowed}
        try:
            for mode, offloads in modes:
                set_offloads(lab, offloads)
                for _ in range(args.rounds):
                    for state, state_pairs in states:
                        if state_pairs is None:
                            common.cli(lab, "rollback")
                        else:
                            install(lab, state_pairs, ["vnet0", "vnet1"])
                        for label, who, port in FLOWS:
                            results.setdefault((mode, state, label), []).append(traffic.measure(guests[who], port))
        finally:
            traffic.stop()

    common.emit(common.machine_line() + "\n")
    rows = []
    for mode, _ in modes:
        for label, _who, _port in FLOWS:
            without = median(results[(mode, "no table", label)])
            row = [f"{mode}: {label}", f"{without:.2f}"]
            for state, _ in states[1:]:
                value = median(results[(mode, state, label)])
                row += [f"{value:.2f}", f"{(1 - value / without) * 100:+.0f}%"]
            spread = max(max(v) / min(v) - 1 for k, v in results.items() if k[0] == mode and k[2] == label)
            rows.append(row + [f"{spread * 100:.0f}%"])
    common.emit(common.table(
        f"bench_throughput: TCP through br0, guest ns -> uplink ns (Gbit/s, median of {args.rounds} x {args.seconds:g} s, {tool})",
        ["mode: flow", "no table", "table, 1 pair", "cost", f"table, {args.pairs} pairs", "cost", "max spread"],
        rows,
        notes=[
            "cost = 1 - with/without (positive: slower with the table); a single TCP stream, both namespaces on this host's CPUs",
            "max spread = largest (max/min - 1) over the rounds of one cell of the row: differences below it are noise",
            "each round passes through the three states in turn, so load drifts hit every column alike",
            "not allowed: forward -> outbound -> allowed-set miss -> meta protocol vmap -> out4 -> port checks -> accept",
        ],
    ))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except common.FAILURES as exc:
        print(f"bench_throughput: error: {exc}", file=sys.stderr)
        sys.exit(1)
