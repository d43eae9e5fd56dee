"""`smtp-gate rebuild` with 1 000 running guests of two NICs each and a 10 000-row whitelist,
with its split (libvirt listing, whitelist parse, compute, nft commit); and, side by side,
the naive way the original tool used: one `virsh domiflist <guest>` process per guest.

Where the guests come from (libvirt's test driver, the recorded sample's XML shape, ports
existing as unattached taps in the hypervisor namespace):
- "daemon": a private libvirtd (run as `nobody`, all its files in a temporary directory)
  serving `test+unix:///default` with the 1 000 guests started in it: every call is an
  RPC over a UNIX socket, as against a real qemu:///system.  This is the figure to read.
- "node file": `test:///PATH/node.xml`, no daemon.  libvirt re-parses the whole file on
  every open (tests/testdriver.py: ~0.35 s for 1 000 guests), a cost no real hypervisor
  has; every rebuild and every `virsh` process pays it once.  For the naive way that is
  1 000 parses, so only a sample of guests is run there and the total extrapolated.
- "node file, minimal XML": tests/testdriver.write_node's small domains, for comparison
  with the sample-shaped ones (real guests' XML is larger still: disks, channels, video).

    sudo .venv/bin/python bench/bench_rebuild.py [--runs 5] [--naive-sample 10]
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BenchError, median, ms  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET = 1.0  # seconds: "well under a second" (issue 3)


def set_uri(lab: common.BridgeLab, uri: str) -> None:
    lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="{uri}"\n')


def bare_start(lab: common.BridgeLab) -> float:
    """`python -c pass` run the way the CLI is run: the machine's speed at that moment."""
    start = time.perf_counter()
    common.ns_run(lab.hv, [sys.executable, "-c", "pass"], env=common.prod_env())
    return time.perf_counter() - start


def cli_rebuild(lab: common.BridgeLab, runs: int, guests: int, pairs: int, bare: List[float]) -> List[float]:
    """RUNS rebuilds through the CLI; a bare interpreter start after each goes to BARE."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = common.cli(lab, "rebuild")
        times.append(time.perf_counter() - start)
        bare.append(bare_start(lab))
        # test:///default also runs libvirt's own guest "test" (no NIC)
        seen = any(f"{n} running guest(s)" in result.stdout for n in (guests, guests + 1))
        if not seen or f"{pairs} allowed" not in result.stdout:
            raise BenchError(f"rebuild did not see what it should: {result.stdout.strip()} {result.stderr.strip()}")
    return times


def split(lab: common.BridgeLab, runs: int) -> Dict[str, object]:
    result = common.ns_run(lab.hv, [sys.executable, str(HERE / "_rebuild_split.py"), "--config", str(lab.config_path),
                          "--runs", str(runs)], env=common.prod_env(), check=False, timeout=3600)
    if result.returncode != 0:
        raise BenchError(f"rebuild split failed: {result.stderr.strip()[-800:]}")
    return json.loads(result.stdout)


def naive(uri: str, guests: int, sample: Optional[int]) -> Dict[str, float]:
    """`virsh list --name`, then `virsh domiflist NAME` for each guest (or for SAMPLE of them,
    extrapolated to all).  Runs in this (host) namespace: the test driver touches no network."""
    from tests import testdriver

    start = time.perf_counter()
    names = [n for n in common.run(["virsh", "-c", uri, "list", "--name"]).stdout.split() if n.startswith("vm")]
    listed = time.perf_counter() - start
    if len(names) != guests:
        raise BenchError(f"virsh list saw {len(names)} guests, expected {guests}")
    chosen = names if sample is None else names[:: max(1, guests // sample)][:sample]
    start = time.perf_counter()
    for name in chosen:
        out = common.run(["virsh", "-c", uri, "domiflist", name]).stdout
        i = int(name[2:])
        if testdriver.mac(i, 1) not in out:
            raise BenchError(f"virsh domiflist {name} did not show its NICs")
    per_guest = (time.perf_counter() - start) / len(chosen)
    return {"list": listed, "per_guest": per_guest, "total": listed + per_guest * guests,
            "measured": len(chosen)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guests", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=10000, help="whitelist rows")
    parser.add_argument("--runs", type=int, default=5, help="rebuilds per figure (median reported)")
    parser.add_argument("--naive-sample", type=int, default=10,
                        help="guests run through virsh against the node file (extrapolated to all)")
    parser.add_argument("--skip-daemon", action="store_true", help="node files only (no private libvirtd)")
    args = parser.parse_args()
    common.require_root_and_kernel()
    common.install_signal_cleanup()
    common.compile_bytecode()
    from tests import testdriver

    if not shutil.which("virsh"):
        raise BenchError("virsh not found: apt-get install libvirt-clients")
    results = []
    with common.bridge_lab() as lab:
        text, allowed_nics = common.whitelist_text(args.rows, args.guests)
        (lab.tmp / "whitelist.csv").write_text(text, encoding="utf-8")
        common.add_taps(lab.hv, [testdriver.target(i, k) for i in range(args.guests) for k in range(2)])
        nodes = lab.tmp / "nodes"
        (nodes / "minimal").mkdir(parents=True)
        sources = []
        if not args.skip_daemon:
            sources.append(("daemon (test+unix, RPC)", None))
        sources.append(("node file", common.write_sample_node(nodes, args.guests)))
        sources.append(("node file, minimal XML", testdriver.write_node(nodes / "minimal", args.guests, nics=2)))
        for label, uri in sources:
            if uri is None:
                with common.private_libvirtd() as daemon_uri:
                    conn = common.create_guests(daemon_uri, args.guests)
                    try:
                        results.append(measure(lab, label, daemon_uri, args, allowed_nics, sample=None))
                    finally:
                        conn.close()
            else:
                sample = args.naive_sample if label == "node file" else 0
                results.append(measure(lab, label, uri, args, allowed_nics, sample=sample))

    common.emit(common.machine_line() + "\n")
    rows = []
    for r in results:
        cli = r["cli"]
        nv = r["naive"]
        naive_cell = "-" if nv is None else (
            f"{nv['total']:.1f} s" + ("" if nv["measured"] == args.guests else f" (extrapolated from {nv['measured']})"))
        per = "-" if nv is None else ms(nv["per_guest"])
        ratio = "-" if nv is None else f"{nv['total'] / median(cli):.0f}x"
        rows.append([r["label"], ms(median(cli)), ms(max(cli)), f"{median(cli) / median(r['bare']):.0f}x",
                     naive_cell, per, ratio])
    # the target is read on the daemon's figure; a node file's rebuild also pays libvirt's
    # parse of the whole file at each open, which no real hypervisor costs: shown apart
    def own(r: Dict[str, object]) -> float:
        opened = 0.0 if r["label"].startswith("daemon") else median(r["split"]["phases"]["libvirt: open connection"])
        return median(r["cli"]) - opened

    misses = [f"{r['label']}: {own(r):.2f} s" for r in results if own(r) >= TARGET]
    common.emit(common.table(
        f"bench_rebuild: {args.guests} running guests x 2 NICs, {args.rows} whitelist rows (ms; median and max of {args.runs})",
        ["libvirt source", "smtp-gate rebuild", "max", "/bare", "naive: virsh domiflist per guest", "ms/guest",
         "naive/ours"],
        rows,
        notes=[
            "smtp-gate rebuild = wall time of the CLI in the hypervisor namespace (python start, imports, lock, libvirt, nft)",
            "/bare = rebuild / `python -c pass` started the same way right after each rebuild (median "
            + ", ".join(f"{ms(median(r['bare']))} ms" for r in results) + "): how fast this machine was meanwhile; "
            "the issue measured `python3 -c pass` at 11 ms on its machine",
            "naive = `virsh -c URI list --name` + one `virsh -c URI domiflist NAME` process per guest, sequential, "
            "without even the nft work",
            f"each rebuild installs {results[0]['sizes']['pairs']} allowances (checked), average XML "
            f"{results[0]['sizes']['xml_bytes']} bytes per guest ({results[-1]['sizes']['xml_bytes']} minimal)",
            "node file rows: libvirt parses the whole node file at every open ("
            + ", ".join(f"{ms(median(r['split']['phases']['libvirt: open connection']))} ms" for r in results
                        if not r["label"].startswith("daemon"))
            + "), a cost of the test driver only; without it: "
            + ", ".join(f"{ms(own(r))} ms" for r in results if not r["label"].startswith("daemon")),
            (f"MISSES the target of well under {TARGET:g} s: " + "; ".join(misses)) if misses
            else f"target (well under {TARGET:g} s, node files without libvirt's own parse of them): met",
        ],
    ))
    phases = list(results[0]["split"]["phases"])
    rows = [[p] + [ms(median(r["split"]["phases"][p])) for r in results] for p in phases]
    common.emit(common.table(
        f"bench_rebuild: in-process split (ms, median of {args.runs})",
        ["phase"] + [r["label"] for r in results],
        rows,
        notes=["'open connection' is inside list_running too: for a node file it is libvirt parsing the whole file",
               "'of which XML parse' = domain.parse() of every guest's live XML, measured apart (also inside list_running)"],
    ))
    return 0


def measure(lab: common.BridgeLab, label: str, uri: str, args: argparse.Namespace, allowed_nics: int,
            sample: Optional[int]) -> Dict[str, object]:
    set_uri(lab, uri)
    bare: List[float] = []
    cli = cli_rebuild(lab, args.runs + 1, args.guests, allowed_nics, bare)[1:]  # the first writes 1 000 records
    out: Dict[str, object] = {"label": label, "cli": cli, "bare": bare[1:]}
    data = split(lab, args.runs)
    out["split"], out["sizes"] = data["phases"], data["sizes"]
    out["split"] = {"phases": data["phases"]}
    out["naive"] = None if sample == 0 else naive(uri, args.guests, sample)
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except common.FAILURES as exc:
        print(f"bench_rebuild: error: {exc}", file=sys.stderr)
        sys.exit(1)
