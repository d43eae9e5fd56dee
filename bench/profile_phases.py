"""cProfile of the slow paths the benchmarks found, in the same labs, for whoever fixes them.

    sudo .venv/bin/python bench/profile_phases.py rebuild   # rebuild, 1 000 guests x 2 NICs, 10 000 rows
    sudo .venv/bin/python bench/profile_phases.py apply     # apply --no-libvirt, 10 000 pairs on 1 000 ports
    sudo .venv/bin/python bench/profile_phases.py restore   # the watch's restore, 1 000 recorded guests

Each sets up its lab (namespaces, taps, whitelist, records, kernel state) from here, then
runs itself inside the hypervisor namespace (`--inside`) where the profiled function runs
twice (the first run warms imports and writes records) and the second is profiled; the
top entries by cumulative and by own time are printed.  `rebuild` lists guests from
test:///default populated in-process with the sample-shaped XML (no node-file parse, no
RPC: the listing is then only libvirt-python's and our own work).
"""

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

HERE = Path(__file__).resolve()


def inside(what: str, config_path: str, top: int) -> int:
    from smtp_gate import config as config_mod, rebuild

    config = config_mod.load(config_path)
    if what == "rebuild":
        # keep this connection open: libvirt frees test:///default with its last connection
        conn = common.create_guests("test:///default", 1000)  # noqa: F841
        call = lambda: rebuild.rebuild(config)  # noqa: E731
    else:
        call = lambda: rebuild.rebuild(config, use_libvirt=False)  # noqa: E731
    result = call()
    if result.outcome.desired.allowed == () and what != "restore":
        raise SystemExit("nothing allowed: the lab is not what it should be")
    profiler = cProfile.Profile()
    profiler.enable()
    call()
    profiler.disable()
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats(order).print_stats(top)
        text = out.getvalue().replace(str(common.REPO) + "/", "")
        print(f"== {what}: top {top} by {order}\n" + text[text.find("   ncalls"):])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("rebuild", "apply", "restore"))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--inside", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        return inside(args.what, args.inside, args.top)
    common.require_root_and_kernel()
    common.install_signal_cleanup()
    from smtp_gate import domain, guests as guests_mod
    from smtp_gate.runstate import RunState
    from tests import testdriver

    with common.bridge_lab() as lab:
        if args.what == "rebuild":
            text, _ = common.whitelist_text(10000, 1000)
            (lab.tmp / "whitelist.csv").write_text(text, encoding="utf-8")
            common.add_taps(lab.hv, [testdriver.target(i, k) for i in range(1000) for k in range(2)])
            lab.write_config('UPLINKS="uplink0"\nLIBVIRT_URI="test:///default"\n')
        elif args.what == "apply":
            names = [f"tap{i}n0" for i in range(1000)]
            common.add_taps(lab.hv, names)
            common.cli(lab, "apply", "--no-libvirt")
            indexes = common.link_indexes(lab.hv)
            common.add_guest_ifaces(lab, [indexes[n] for n in names])
            common.nft_add_elements(lab, "allowed", common.render_pairs(
                common.filler_pairs({n: indexes[n] for n in names}, 10000)))
        else:
            common.add_taps(lab.hv, [testdriver.target(i, k) for i in range(1000) for k in range(2)])
            indexes = common.link_indexes(lab.hv)
            state = RunState(lab.tmp / "run")
            state.prepare()
            for i in range(1000):
                dom = domain.parse(common.sample_domain_xml(i))
                state.write_record(guests_mod.record_for(dom, ("br0",), tuple(guests_mod.nic_macs(dom)),
                                                         indexes.get, lambda _n: None))
            common.cli(lab, "apply", "--no-libvirt")
            common.nft(lab, "flush", "ruleset")  # what the watch restores from: records only
        result = common.ns_run(lab.hv, [sys.executable, str(HERE), args.what, "--top", str(args.top),
                                        "--inside", str(lab.config_path)], env=common.prod_env(), timeout=3600)
        common.emit(result.stdout)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except common.FAILURES as exc:
        print(f"profile_phases: error: {exc}", file=sys.stderr)
        sys.exit(1)
