"""Time of `smtp-gate apply` (the CLI, in a namespace, no libvirt) with 0, 1 000 and 10 000
allowed (ifindex, MAC) pairs already in the kernel, median of N runs; and the in-process
split: discovery, reading our table, building the batch, the nft commit.

Ports: an allowance is kept only while its port exists, so the ports are created, as
unattached taps (`ip tuntap add`, cheap stand-ins; not bridge ports: a Linux bridge takes
at most 1 024 ports).  Two shapes for 10 000 pairs: on 1 000 ports (10 MACs each: a
realistic number of links, the set at full size) and on 10 000 ports (one each: every
link read by discovery too).  The pairs and the ports' indexes are put into the kernel the
way hooks put them (set elements), then `apply --no-libvirt` (the boot-time path) and
`apply` with a LIBVIRT_URI that nothing answers (libvirt imported and asked) are timed.

    sudo .venv/bin/python bench/bench_apply.py [--runs 7] [--skip-10k-ports]
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BenchError, median, ms  # noqa: E402

HERE = Path(__file__).resolve().parent


def timed_cli(lab: common.BridgeLab, args: Sequence[str], runs: int) -> List[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        common.cli(lab, *args)
        times.append(time.perf_counter() - start)
    return times


def timed(lab: common.BridgeLab, argv: Sequence[str], runs: int) -> List[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        common.ns_run(lab.hv, list(argv), env=common.prod_env(PYTHONPATH=str(common.REPO)))
        times.append(time.perf_counter() - start)
    return times


def scenario(label: str, ports: int, pairs: int, runs: int, baselines: bool) -> Dict[str, object]:
    with common.bridge_lab() as lab:
        names = [f"tap{i}n0" for i in range(ports)]
        start = time.perf_counter()
        common.add_taps(lab.hv, names)
        setup = time.perf_counter() - start
        common.cli(lab, "apply", "--no-libvirt")
        indexes = {n: i for n, i in common.link_indexes(lab.hv).items() if n in set(names)}
        common.add_guest_ifaces(lab, indexes.values())
        common.nft_add_elements(lab, "allowed", common.render_pairs(common.filler_pairs(indexes, pairs)))
        if common.allowed_count(lab) != pairs:
            raise BenchError(f"expected {pairs} allowances in the kernel, found {common.allowed_count(lab)}")
        out: Dict[str, object] = {"label": label, "ports": ports, "pairs": pairs, "setup_s": setup}
        out["no_libvirt"] = timed_cli(lab, ["apply", "--no-libvirt"], runs)
        out["unreachable"] = timed_cli(lab, ["apply"], runs)
        if common.allowed_count(lab) != pairs:
            raise BenchError("apply lost allowances of existing ports")
        if common.set_count(lab, "guest_ifaces") != len(indexes):
            raise BenchError("apply lost guest ports (guest_ifaces) that still exist")
        split = common.ns_run(
            lab.hv,
            [sys.executable, str(HERE / "_apply_split.py"), "--config", str(lab.config_path), "--runs", str(runs)],
            env=common.prod_env(),
        )
        out["split"] = json.loads(split.stdout)
        if baselines:
            out["netns_exec"] = timed(lab, ["true"], runs)
            out["python"] = timed(lab, [sys.executable, "-c", "pass"], runs)
            out["cli_start"] = timed(lab, [sys.executable, "-m", "smtp_gate", "--version"], runs)
            out["nft_list_chains"] = timed(lab, ["nft", "list", "chains"], runs)
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (median reported)")
    parser.add_argument("--skip-10k-ports", action="store_true", help="skip 10 000 pairs on 10 000 ports (~15 s setup)")
    args = parser.parse_args()
    common.require_root_and_kernel()
    common.install_signal_cleanup()
    common.compile_bytecode()
    plan = [
        ("0 pairs", 0, 0),
        ("1 000 pairs / 1 000 ports", 1000, 1000),
        ("10 000 pairs / 1 000 ports", 1000, 10000),
    ]
    if not args.skip_10k_ports:
        plan.append(("10 000 pairs / 10 000 ports", 10000, 10000))
    results = [scenario(label, ports, pairs, args.runs, baselines=(n == 0)) for n, (label, ports, pairs) in enumerate(plan)]

    common.emit(common.machine_line() + "\n")
    rows = []
    for r in results:
        rows.append([r["label"], ms(median(r["no_libvirt"])), ms(max(r["no_libvirt"])),
                     ms(median(r["unreachable"])), ms(max(r["unreachable"]))])
    base = results[0]
    common.emit(common.table(
        f"bench_apply: `smtp-gate apply` wall time, CLI in the hypervisor namespace (ms, median and max of {args.runs})",
        ["allowed pairs in the kernel", "--no-libvirt p50", "max", "libvirt unreachable p50", "max"],
        rows,
        notes=[
            "wall time of `ip netns exec HV python -m smtp_gate --config C apply ...`, PYTHONDONTWRITEBYTECODE unset, bytecode compiled",
            f"fixed costs inside that: `ip netns exec HV true` {ms(median(base['netns_exec']))}, "
            f"`python -c pass` {ms(median(base['python']))}, `python -m smtp_gate --version` (CLI imports) "
            f"{ms(median(base['cli_start']))}, `nft list chains` {ms(median(base['nft_list_chains']))}",
            "ports are unattached taps, not bridge ports; pairs are spread evenly over them; "
            "every pair and guest port survives each apply (checked)",
        ],
    ))
    phases = list(results[0]["split"]["phases"])
    rows = [[phase] + [ms(median(r["split"]["phases"][phase])) for r in results] for phase in phases]
    rows.append(["links in the namespace"] + [str(r["split"]["sizes"]["links"]) for r in results])
    rows.append(["nft -j listing (KiB)"] + [f"{r['split']['sizes']['listing_bytes'] / 1024:.0f}" for r in results])
    rows.append(["batch text (KiB)"] + [f"{r['split']['sizes']['batch_bytes'] / 1024:.0f}" for r in results])
    common.emit(common.table(
        f"bench_apply: in-process split of apply --no-libvirt (ms, median of {args.runs})",
        ["phase"] + [str(r["label"]) for r in results],
        rows,
        notes=["lock = filelock on the run dir's lock (its import is paid once per process, in the first run)",
               "setup (not timed above): creating the taps took "
               + ", ".join(f"{r['setup_s']:.1f} s for {r['ports']}" for r in results if r["ports"])],
    ))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except common.FAILURES as exc:
        print(f"bench_apply: error: {exc}", file=sys.stderr)
        sys.exit(1)
