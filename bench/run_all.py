"""Run every benchmark, one after the other, and print all their tables at the end.

    sudo .venv/bin/python bench/run_all.py [--quick] [--only apply,hook] [--wait-quiet 120]

Each benchmark is its own process (bench/bench_<name>.py), so one that fails or is
skipped does not stop the others; the exit status is 1 if any failed.  --quick passes
smaller run counts (a smoke run: figures noisier).  --wait-quiet N waits up to N seconds
before each benchmark for the 1-minute load average to fall below 1.0, because the
figures of a 2-CPU machine mean little while something else runs on it.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

BENCHES: Dict[str, Tuple[List[str], List[str]]] = {
    # name: (normal arguments, --quick arguments)
    "apply": ([], ["--runs", "3", "--skip-10k-ports"]),
    "throughput": ([], ["--seconds", "2", "--rounds", "1"]),
    "hook": ([], ["--iterations", "15", "--cold", "1"]),
    "rebuild": ([], ["--runs", "2", "--naive-sample", "3"]),
    "recovery": ([], ["--runs", "3"]),
    "selftest": ([], ["--runs", "2"]),
    "flood": ([], ["--seconds", "2"]),
    "metrics": ([], ["--runs", "2"]),
}


def wait_quiet(limit: float) -> str:
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        time.sleep(5)
    return f"load average {os.getloadavg()[0]:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller run counts")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHES)}")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each benchmark, wait up to SECONDS for the load average to fall below 1")
    args = parser.parse_args()
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = [n for n in chosen if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    outputs: List[Tuple[str, int, str, float]] = []
    for name in chosen:
        normal, quick = BENCHES[name]
        argv = [sys.executable, str(HERE / f"bench_{name}.py")] + (quick if args.quick else normal)
        load = wait_quiet(args.wait_quiet) if args.wait_quiet else ""
        print(f"--- bench_{name} {' '.join(argv[2:])} {('(' + load + ')') if load else ''}".rstrip(), flush=True)
        start = time.monotonic()
        # stderr passes through (progress and errors); stdout holds the tables
        result = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        elapsed = time.monotonic() - start
        sys.stdout.write(result.stdout)
        outputs.append((name, result.returncode, result.stdout, elapsed))
    print("\n" + "=" * 30 + " all benchmarks " + "=" * 30)
    failed = False
    for name, code, out, elapsed in outputs:
        status = "ok" if code == 0 else ("skipped" if code == common.EXIT_SKIPPED else f"FAILED (exit {code})")
        failed |= code not in (0, common.EXIT_SKIPPED)
        print(f"\n### bench_{name}: {status}, {elapsed:.0f} s")
        sys.stdout.write(out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
