"""In-process split of `smtp-gate rebuild` (run inside the hypervisor namespace by
bench_rebuild.py), phase by phase with the functions rebuild.py calls.  Prints JSON:
phase -> list of seconds, one per run."""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtp_gate import config as config_mod, discovery, domain, engine, hypervisor, nft, rebuild, whitelist  # noqa: E402
from smtp_gate.runstate import RunState  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    config = config_mod.load(args.config)
    uris = config.uris()
    state = RunState(config.run_dir)
    libvirt = hypervisor._libvirt()
    phases = {k: [] for k in (
        "libvirt: open connection", "libvirt: list_running (open, list, XMLDesc, parse)", "  of which XML parse (lxml)",
        "whitelist parse (10 000 rows)", "compute: records (whitelist parse + lookups)", "compute: discovery (sysfs)",
        "compute: nft read_table", "compute: desired state + batch", "nft commit (nft -f)", "write records",
        "total (sum of the phases but 'of which' and 'open')",
    )}
    sizes = {}
    for _ in range(args.runs):
        t0 = time.perf_counter()
        conn = libvirt.openReadOnly(uris[0])
        t1 = time.perf_counter()
        xmls = [d.XMLDesc(0) for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
        conn.close()
        t2 = time.perf_counter()
        for xml in xmls:
            domain.parse(xml)
        t3 = time.perf_counter()
        listing = hypervisor.list_running(uris)
        t4 = time.perf_counter()
        if listing.unreachable or not listing.domains:
            raise SystemExit(f"libvirt listing failed: {listing.unreachable}")
        whitelist.load(config.whitelist).index()
        t5 = time.perf_counter()
        links = discovery.read_links()
        t6 = time.perf_counter()
        records = rebuild.records_for(config, listing.domains, links)  # loads the whitelist again
        t7 = time.perf_counter()
        kernel = nft.read_table(elements=False)  # as engine.apply reads it when libvirt answered
        t8 = time.perf_counter()
        outcome = engine.compute(config, links, records, kernel)
        batch = engine.build(outcome, kernel)
        batch.text()
        t9 = time.perf_counter()
        nft.run_batch(batch)
        t10 = time.perf_counter()
        state.replace_records(records)
        t11 = time.perf_counter()
        values = (t1 - t0, t4 - t3, t3 - t2, t5 - t4, t7 - t6, t6 - t5, t8 - t7, t9 - t8, t10 - t9, t11 - t10,
                  (t11 - t3))
        for key, value in zip(phases, values):
            phases[key].append(value)
        sizes = {"guests": len(listing.domains), "pairs": len(outcome.desired.allowed),
                 "xml_bytes": sum(len(x) for x in xmls) // max(1, len(xmls))}
    print(json.dumps({"phases": phases, "sizes": sizes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
