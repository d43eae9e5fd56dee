"""What the metrics file (smtp_gate/metrics.py) costs: one refresh (read the kernel's table
with its `attempts` set, render, write atomically), split into its phases, with 0, 1 000
and 65 536 (the set's size: a MAC-spoofing flood) entries in the `attempts` set, spread
over 1 000 recorded guests; the file's size and series; and `smtp-gate apply --no-libvirt`
with METRICS_DIR="" against METRICS_DIR set (what every rebuild pays).  The watcher pays
one refresh every 30 s (metrics.REFRESH), in a thread of its own.

    sudo .venv/bin/python bench/bench_metrics.py [--runs 5]
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import median, ms  # noqa: E402

GUESTS = 1000

SPLIT = r"""
import json, sys, time
from smtp_gate import config as config_mod, metrics
config = config_mod.load(sys.argv[1])
runs = int(sys.argv[2])
out = {"snapshot": [], "render": [], "write": [], "refresh": []}
for _ in range(runs):
    t0 = time.perf_counter(); snap = metrics.snapshot(config)
    t1 = time.perf_counter(); text = metrics.render(snap, config.metrics_max_guests)
    t2 = time.perf_counter(); metrics.write(config.metrics_dir, text)
    t3 = time.perf_counter(); metrics.refresh(config)
    t4 = time.perf_counter()
    out["snapshot"].append(t1 - t0); out["render"].append(t2 - t1)
    out["write"].append(t3 - t2); out["refresh"].append(t4 - t3)
out["bytes"] = len(text.encode())
out["series"] = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
out["attempts"] = len(snap.attempts)
print(json.dumps(out))
"""


def fill(lab: common.BridgeLab, entries: int) -> None:
    """ENTRIES (port, MAC) elements in `attempts`, on GUESTS ports that records name."""
    from smtp_gate.runstate import Record, RunState

    state = RunState(lab.tmp / "run")
    state.replace_records(
        Record(uuid=f"00000000-0000-0000-0000-{g:012d}", name=f"guest{g}", guest_ports=((f"vnet{g}", 100000 + g),))
        for g in range(GUESTS)
    )
    elements = [f'"vnet{n % GUESTS}" . {common.filler_mac(n)}' for n in range(entries)]
    common.nft_add_elements(lab, "attempts", elements)


def scenario(entries: int, runs: int) -> Dict[str, object]:
    with common.bridge_lab() as lab:
        textfiles = lab.tmp / "textfile"
        textfiles.mkdir()
        off = 'UPLINKS="uplink0"\nMETRICS_DIR=""\n'
        on = f'UPLINKS="uplink0"\nMETRICS_DIR="{textfiles}"\n'
        lab.write_config(on)
        common.cli(lab, "apply", "--no-libvirt")
        fill(lab, entries)
        split = common.ns_run(lab.hv, [sys.executable, "-c", SPLIT, str(lab.config_path), str(runs)],
                              env=common.prod_env(PYTHONPATH=str(common.REPO)))
        out: Dict[str, object] = {"entries": entries, **json.loads(split.stdout)}
        for label, text in (("apply_off", off), ("apply_on", on)):
            lab.write_config(text)
            times: List[float] = []
            for _ in range(runs):
                start = time.perf_counter()
                common.cli(lab, "apply", "--no-libvirt")
                times.append(time.perf_counter() - start)
            out[label] = times
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    common.require_root_and_kernel()
    common.install_signal_cleanup()
    common.compile_bytecode()
    results = [scenario(n, args.runs) for n in (0, 1000, 65536)]
    rows = [
        (r["entries"], ms(median(r["snapshot"])), ms(median(r["render"])), ms(median(r["write"])),
         ms(median(r["refresh"])), r["series"], f"{int(r['bytes']) / 1024:.1f}",
         ms(median(r["apply_off"])), ms(median(r["apply_on"])))
        for r in results
    ]
    common.emit(common.machine_line() + "\n")
    common.emit(common.table(
        f"metrics refresh (ms, median of {args.runs}) by entries in the attempts set, {GUESTS} recorded guests",
        ["attempts", "snapshot", "render", "write", "refresh", "series", "KiB", "apply off", "apply on"],
        rows,
        ["snapshot: the kernel over netlink (base chains, counters, smtp4's rules, attempts, allowed) + off-switch + "
         "records + counters; refresh: all three again",
         "apply off/on: `smtp-gate apply --no-libvirt` with METRICS_DIR=\"\" and with it set (CLI wall time)"],
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
