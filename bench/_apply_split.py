"""In-process split of `smtp-gate apply --no-libvirt` (run inside the hypervisor namespace by
bench_apply.py): discovery, reading our table, computing and building the batch, the nft
commit.  Prints one JSON object: phase -> list of seconds, one per run."""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtp_gate import config as config_mod, discovery, engine, lock, nft  # noqa: E402
from smtp_gate.runstate import RunState  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    config = config_mod.load(args.config)
    state = RunState(config.run_dir)
    state.prepare()
    phases = {k: [] for k in ("lock", "discovery", "read_table: nft -j list", "read_table: json parse",
                              "renamed-link check (netlink names)", "compute + batch build", "nft commit (nft -f)",
                              "total")}
    sizes = {}
    for _ in range(args.runs):
        t0 = time.perf_counter()
        with lock.command_lock(config.lock_path):
            t1 = time.perf_counter()
            links = discovery.read_links()
            t2 = time.perf_counter()
            raw = nft._run(["-j", "list", "table", "bridge", "smtp_gate"])
            if raw.returncode != 0:
                raise SystemExit(f"nft list failed: {raw.stderr}")
            t3 = time.perf_counter()
            kernel = nft.parse_listing(json.loads(raw.stdout))
            t4 = time.perf_counter()
            # as engine.apply(keep_kernel=True): names must keep their index across the listing
            links = engine.stable_links(links, discovery.read_indexes())
            t4b = time.perf_counter()
            recorded = list(state.all_records().values())
            outcome = engine.compute(config, links, recorded, kernel, keep_kernel=True)
            batch = engine.build(outcome, kernel)
            text = batch.text()
            t5 = time.perf_counter()
            nft.run_batch(batch)
            t6 = time.perf_counter()
        for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4b - t4, t5 - t4b, t6 - t5, t6 - t0)):
            phases[key].append(value)
        sizes = {"links": len(links), "allowed": len(outcome.desired.allowed), "batch_bytes": len(text),
                 "listing_bytes": len(raw.stdout)}
    print(json.dumps({"phases": phases, "sizes": sizes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
